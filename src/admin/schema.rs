//! Phase 2: the database, its retention policies, the downsampling
//! continuous queries and (with auth) users — declared once, kept true.
//!
//! What is declared comes from two places only: `[schema]` in the
//! configuration (policy durations, resampling, users) and
//! [`crate::schema::MEASUREMENTS`] (which measurement lives in which policy,
//! which ones downsample, their headline and numeric fields). The server's
//! state is read back (`SHOW DATABASES / RETENTION POLICIES / CONTINUOUS
//! QUERIES / USERS / GRANTS`), compared, and turned into a list of
//! [`Change`]s. `apply` runs them, `diff` prints them; both compute the same
//! plan, so `diff` exits 0 exactly when `apply` would do nothing.
//!
//! Downsampling: every measurement with `downsample` gets one continuous
//! query named `<measurement>_1m` writing 1-minute bars into
//! `"long_term"."<measurement>_1m"`, grouped by every tag (`GROUP BY
//! time(1m), *`, so bars stay per instrument, source and publisher). A bar
//! has `open`, `high`, `low`, `close`, `mean` and `count` of the
//! measurement's headline field and `mean_<field>` (InfluxDB's own naming
//! for `mean(*)`) of every other float field. The queries use `RESAMPLE
//! EVERY <resample_every> FOR <resample_for>`: the current bar appears
//! within `resample_every`, and points that arrive late (batching, a
//! subscriber catching up from its spool) are still counted as long as they
//! are younger than `resample_for`.
//!
//! `--prune` also removes what is not declared: retention policies
//! (with their data — InfluxDB's `autogen` among them), continuous queries on
//! the database, and — only when `[schema.users]` declares any — users other
//! than the one nbpy connects as.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::admin::influxql::{self, ident, series};
use crate::config::{Config, InfluxUserConfig, Privilege, SchemaConfig};
use crate::exit::Failure;
use crate::schema::{rp, Measurement, MEASUREMENTS};
use crate::sink::influx::{InfluxClient, WriteError};

/// The width of a bar; part of the bar measurements' names (`_1m`).
pub const BAR: Duration = Duration::from_secs(60);
pub const BAR_SUFFIX: &str = "_1m";

/// A retention policy, declared or as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    /// Zero: kept forever.
    pub duration: Duration,
    pub shard: Duration,
    pub default: bool,
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "duration {}, shard {}",
            influxql::retention(self.duration),
            influxql::duration(self.shard)
        )
    }
}

/// A continuous query: its name and full `CREATE CONTINUOUS QUERY` text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContinuousQuery {
    pub name: String,
    pub text: String,
}

/// A declared InfluxDB user (the password is read when needed, never kept
/// in anything that is printed).
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub name: String,
    pub admin: bool,
    pub privilege: Privilege,
    pub password: String,
}

/// Everything phase 2 makes true.
#[derive(Debug, Clone)]
pub struct Declared {
    pub database: String,
    pub policies: Vec<Policy>,
    pub queries: Vec<ContinuousQuery>,
    pub users: Vec<User>,
    /// The user nbpy connects as (never pruned).
    pub connect_user: Option<String>,
}

/// The declared retention policies, by name.
pub fn policies(cfg: &SchemaConfig) -> Vec<Policy> {
    cfg.retention
        .iter()
        .map(|(name, r)| Policy {
            name: name.clone(),
            duration: r.duration,
            shard: r.shard_duration,
            default: r.default,
        })
        .collect()
}

/// The bar measurement a downsampled measurement feeds: `<name>_1m`.
pub fn bars_measurement(m: &Measurement) -> String {
    format!("{}{BAR_SUFFIX}", m.name)
}

/// The fields of a bar, as `(name in the bar, aggregate over the source)`.
pub fn bar_fields(m: &Measurement) -> Vec<(String, String)> {
    let h = ident(m.headline);
    let mut out: Vec<(String, String)> = [
        ("open", "first"),
        ("high", "max"),
        ("low", "min"),
        ("close", "last"),
        ("mean", "mean"),
        ("count", "count"),
    ]
    .into_iter()
    .map(|(name, agg)| (name.to_string(), format!("{agg}({h})")))
    .collect();
    for f in m.numeric_fields().filter(|f| f.name != m.headline) {
        out.push((
            format!("mean_{}", f.name),
            format!("mean({})", ident(f.name)),
        ));
    }
    out
}

/// The continuous query that downsamples `m` into `long_term`.
pub fn continuous_query(database: &str, m: &Measurement, cfg: &SchemaConfig) -> ContinuousQuery {
    let name = bars_measurement(m);
    let select = bar_fields(m)
        .into_iter()
        .map(|(alias, expr)| format!("{expr} AS {}", ident(&alias)))
        .collect::<Vec<_>>()
        .join(", ");
    let db = ident(database);
    let text = format!(
        "CREATE CONTINUOUS QUERY {} ON {db} RESAMPLE EVERY {} FOR {} BEGIN SELECT {select} INTO {db}.{}.{} FROM {db}.{}.{} GROUP BY time({}), * END",
        ident(&name),
        influxql::duration(cfg.resample_every),
        influxql::duration(cfg.resample_for),
        ident(rp::LONG_TERM),
        ident(&name),
        ident(m.rp),
        ident(m.name),
        influxql::duration(BAR),
    );
    ContinuousQuery { name, text }
}

/// The declared state; reads user password files (exit NOPERM if unreadable).
pub fn declared(cfg: &Config) -> Result<Declared, Failure> {
    let s = &cfg.schema;
    let database = cfg.influxdb.database.clone();
    let queries = MEASUREMENTS
        .iter()
        .filter(|m| m.downsample)
        .map(|m| continuous_query(&database, m, s))
        .collect();
    let mut users = Vec::new();
    for (name, u) in &s.users {
        users.push(user(name, u)?);
    }
    // Admins first: on a server with auth on and no admin yet, creating one
    // is the only statement InfluxDB accepts.
    users.sort_by_key(|u| !u.admin);
    Ok(Declared {
        database,
        policies: policies(s),
        queries,
        users,
        connect_user: cfg.influxdb.username.clone(),
    })
}

fn user(name: &str, u: &InfluxUserConfig) -> Result<User, Failure> {
    let file = u.password_file.as_deref().ok_or_else(|| {
        Failure::config(anyhow::anyhow!(
            "schema.users.{name}.password_file is required"
        ))
    })?;
    let key = format!("schema.users.{name}.password_file");
    let password =
        crate::config::read_secret(&key, file).map_err(|e| Failure::new(crate::exit::NOPERM, e))?;
    if let Some(c) = password
        .chars()
        .find(|c| c.is_control() && !matches!(c, '\n' | '\t'))
    {
        // InfluxQL's reader turns a carriage return into a newline, which
        // ends a string literal, and its error then quotes the password.
        return Err(Failure::new(
            crate::exit::NOPERM,
            anyhow::anyhow!(
                "{key} ({}): the password contains the control character U+{:04X}, which an InfluxQL string cannot carry; choose a password without control characters (a trailing newline is fine)",
                file.display(),
                c as u32
            ),
        ));
    }
    Ok(User {
        name: name.to_string(),
        admin: u.admin,
        privilege: u.privilege,
        password,
    })
}

/// What the server has.
#[derive(Debug, Clone, Default)]
pub struct Actual {
    pub database: bool,
    pub policies: Vec<Policy>,
    /// Continuous queries on our database: name → query text.
    pub queries: BTreeMap<String, String>,
    /// Users: name → admin.
    pub users: BTreeMap<String, bool>,
    /// Privilege on our database per (declared) user.
    pub grants: BTreeMap<String, Privilege>,
    /// Declared users whose password the server refused.
    pub wrong_password: Vec<String>,
    /// Auth is on (a request with made-up credentials was refused).
    pub auth: bool,
    /// Auth is on and no admin exists yet: only creating one is allowed.
    pub needs_first_admin: bool,
}

/// One thing `apply` does.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    CreateDatabase {
        name: String,
        default: Policy,
    },
    CreatePolicy(Policy),
    AlterPolicy {
        from: Policy,
        to: Policy,
    },
    SetDefaultPolicy {
        name: String,
        was: Option<String>,
    },
    CreateQuery(ContinuousQuery),
    ReplaceQuery {
        from: String,
        to: ContinuousQuery,
    },
    CreateUser {
        name: String,
        admin: bool,
    },
    SetPassword {
        name: String,
    },
    SetAdmin {
        name: String,
        admin: bool,
    },
    Grant {
        user: String,
        from: Privilege,
        to: Privilege,
    },
    DropQuery {
        name: String,
    },
    DropPolicy {
        name: String,
    },
    DropUser {
        name: String,
    },
}

impl Change {
    /// Removes something that is not declared (only with `--prune`).
    pub fn is_prune(&self) -> bool {
        matches!(
            self,
            Change::DropQuery { .. } | Change::DropPolicy { .. } | Change::DropUser { .. }
        )
    }

    /// The InfluxQL that makes the change; may contain passwords — run it,
    /// never print it.
    fn statements(&self, d: &Declared) -> Vec<String> {
        let db = ident(&d.database);
        let password = |name: &str| {
            d.users
                .iter()
                .find(|u| u.name == name)
                .map(|u| influxql::string(&u.password))
                .unwrap_or_else(|| "''".into())
        };
        match self {
            Change::CreateDatabase { default, .. } => vec![format!(
                "CREATE DATABASE {db} WITH DURATION {} REPLICATION 1 SHARD DURATION {} NAME {}",
                influxql::retention(default.duration),
                influxql::duration(default.shard),
                ident(&default.name)
            )],
            Change::CreatePolicy(p) => vec![format!(
                "CREATE RETENTION POLICY {} ON {db} DURATION {} REPLICATION 1 SHARD DURATION {}{}",
                ident(&p.name),
                influxql::retention(p.duration),
                influxql::duration(p.shard),
                if p.default { " DEFAULT" } else { "" }
            )],
            Change::AlterPolicy { to, .. } => vec![format!(
                "ALTER RETENTION POLICY {} ON {db} DURATION {} SHARD DURATION {}",
                ident(&to.name),
                influxql::retention(to.duration),
                influxql::duration(to.shard),
            )],
            Change::SetDefaultPolicy { name, .. } => {
                vec![format!(
                    "ALTER RETENTION POLICY {} ON {db} DEFAULT",
                    ident(name)
                )]
            }
            Change::CreateQuery(q) => vec![q.text.clone()],
            Change::ReplaceQuery { to, .. } => vec![
                format!("DROP CONTINUOUS QUERY {} ON {db}", ident(&to.name)),
                to.text.clone(),
            ],
            Change::DropQuery { name } => {
                vec![format!("DROP CONTINUOUS QUERY {} ON {db}", ident(name))]
            }
            Change::DropPolicy { name } => {
                vec![format!("DROP RETENTION POLICY {} ON {db}", ident(name))]
            }
            Change::CreateUser { name, admin } => vec![format!(
                "CREATE USER {} WITH PASSWORD {}{}",
                ident(name),
                password(name),
                if *admin { " WITH ALL PRIVILEGES" } else { "" }
            )],
            Change::SetPassword { name } => vec![format!(
                "SET PASSWORD FOR {} = {}",
                ident(name),
                password(name)
            )],
            Change::SetAdmin { name, admin } => vec![if *admin {
                format!("GRANT ALL PRIVILEGES TO {}", ident(name))
            } else {
                format!("REVOKE ALL PRIVILEGES FROM {}", ident(name))
            }],
            Change::Grant { user, from, to } => match to {
                Privilege::None => vec![format!(
                    "REVOKE {} ON {db} FROM {}",
                    privilege_word(*from),
                    ident(user)
                )],
                p => vec![format!(
                    "GRANT {} ON {db} TO {}",
                    privilege_word(*p),
                    ident(user)
                )],
            },
            Change::DropUser { name } => vec![format!("DROP USER {}", ident(name))],
        }
    }
}

fn privilege_word(p: Privilege) -> &'static str {
    match p {
        Privilege::Read => "READ",
        Privilege::Write => "WRITE",
        Privilege::All | Privilege::None => "ALL",
    }
}

fn parse_privilege(s: &str) -> Privilege {
    match s {
        "READ" => Privilege::Read,
        "WRITE" => Privilege::Write,
        "ALL PRIVILEGES" | "ALL" => Privilege::All,
        _ => Privilege::None,
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::CreateDatabase { name, default } => write!(
                f,
                "+ database {name:?} with default retention policy {:?} ({default})",
                default.name
            ),
            Change::CreatePolicy(p) => write!(f, "+ retention policy {:?}: {p}", p.name),
            Change::AlterPolicy { from, to } => {
                write!(f, "~ retention policy {:?}: {from} -> {to}", to.name)
            }
            Change::SetDefaultPolicy { name, was } => write!(
                f,
                "~ default retention policy: {} -> {name:?}",
                was.as_deref()
                    .map(|w| format!("{w:?}"))
                    .unwrap_or_else(|| "none".into())
            ),
            Change::CreateQuery(q) => write!(f, "+ continuous query {:?}", q.name),
            Change::ReplaceQuery { from, to } => write!(
                f,
                "~ continuous query {:?}:\n    was:  {from}\n    want: {}",
                to.name,
                influxql::normalize(&to.text)
            ),
            Change::CreateUser { name, admin } => {
                write!(f, "+ user {name:?}{}", if *admin { " (admin)" } else { "" })
            }
            Change::SetPassword { name } => {
                write!(f, "~ user {name:?}: password differs from its file")
            }
            Change::SetAdmin { name, admin } => write!(
                f,
                "~ user {name:?}: {}",
                if *admin {
                    "make admin"
                } else {
                    "no longer admin"
                }
            ),
            Change::Grant { user, from, to } => {
                write!(f, "~ user {user:?}: privilege {from:?} -> {to:?}")
            }
            Change::DropQuery { name } => write!(f, "- continuous query {name:?} (not declared)"),
            Change::DropPolicy { name } => write!(
                f,
                "- retention policy {name:?} (not declared; its data goes with it)"
            ),
            Change::DropUser { name } => write!(f, "- user {name:?} (not declared)"),
        }
    }
}

/// Compares declared and actual state. Changes come in the order they must
/// run: first admins (a fresh auth-enabled server accepts nothing else),
/// then the database, policies, queries, users and grants, and last what
/// `prune` removes. Undeclared things are only listed when `prune` is set.
pub fn plan(d: &Declared, a: &Actual, prune: bool) -> Vec<Change> {
    let mut out = Vec::new();
    for u in d.users.iter().filter(|u| u.admin) {
        if !a.users.contains_key(&u.name) {
            out.push(Change::CreateUser {
                name: u.name.clone(),
                admin: true,
            });
        }
    }
    let declared_default = d.policies.iter().find(|p| p.default);
    let mut existing = a.policies.clone();
    if !a.database {
        if let Some(p) = declared_default {
            out.push(Change::CreateDatabase {
                name: d.database.clone(),
                default: p.clone(),
            });
            existing.push(p.clone());
        } else {
            // Config validation requires a default; keep going without.
            out.push(Change::CreateDatabase {
                name: d.database.clone(),
                default: Policy {
                    name: "autogen".into(),
                    duration: Duration::ZERO,
                    shard: Duration::from_secs(7 * 24 * 3600),
                    default: true,
                },
            });
        }
    }
    for p in &d.policies {
        match existing.iter().find(|e| e.name == p.name) {
            None => out.push(Change::CreatePolicy(p.clone())),
            Some(e) if e.duration != p.duration || e.shard != p.shard => {
                out.push(Change::AlterPolicy {
                    from: e.clone(),
                    to: p.clone(),
                })
            }
            Some(_) => {}
        }
    }
    if let Some(p) = declared_default {
        let current = existing.iter().find(|e| e.default).map(|e| e.name.clone());
        let created_default = out
            .iter()
            .any(|c| matches!(c, Change::CreatePolicy(x) if x.name == p.name));
        if current.as_deref() != Some(p.name.as_str()) && !created_default {
            out.push(Change::SetDefaultPolicy {
                name: p.name.clone(),
                was: current,
            });
        }
    }
    for q in &d.queries {
        match a.queries.get(&q.name) {
            None => out.push(Change::CreateQuery(q.clone())),
            Some(have) if influxql::normalize(have) != influxql::normalize(&q.text) => {
                out.push(Change::ReplaceQuery {
                    from: have.clone(),
                    to: q.clone(),
                })
            }
            Some(_) => {}
        }
    }
    for u in &d.users {
        match a.users.get(&u.name) {
            None if !u.admin => out.push(Change::CreateUser {
                name: u.name.clone(),
                admin: false,
            }),
            None => {}
            Some(admin) => {
                if a.wrong_password.contains(&u.name) {
                    out.push(Change::SetPassword {
                        name: u.name.clone(),
                    });
                }
                if *admin != u.admin {
                    out.push(Change::SetAdmin {
                        name: u.name.clone(),
                        admin: u.admin,
                    });
                }
            }
        }
        if !u.admin {
            let have = a.grants.get(&u.name).copied().unwrap_or(Privilege::None);
            if have != u.privilege {
                out.push(Change::Grant {
                    user: u.name.clone(),
                    from: have,
                    to: u.privilege,
                });
            }
        }
    }
    if prune {
        for name in a.queries.keys() {
            if !d.queries.iter().any(|q| &q.name == name) {
                out.push(Change::DropQuery { name: name.clone() });
            }
        }
        for e in &a.policies {
            if !d.policies.iter().any(|p| p.name == e.name) {
                out.push(Change::DropPolicy {
                    name: e.name.clone(),
                });
            }
        }
        if !d.users.is_empty() {
            for name in a.users.keys() {
                if !d.users.iter().any(|u| &u.name == name)
                    && d.connect_user.as_deref() != Some(name.as_str())
                {
                    out.push(Change::DropUser { name: name.clone() });
                }
            }
        }
    }
    out
}

/// What is on the server but not declared (kept unless `--prune`).
pub fn undeclared(d: &Declared, a: &Actual) -> Vec<Change> {
    plan(d, a, true)
        .into_iter()
        .filter(Change::is_prune)
        .collect()
}

/// A failed schema step, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {error}{}", after.as_deref().map(|a| format!(" ({a})")).unwrap_or_default())]
pub struct SchemaError {
    pub what: String,
    pub error: WriteError,
    /// What was done about the failure (a replaced query put back).
    pub after: Option<String>,
}

impl SchemaError {
    /// Its sysexits code: denied → NOPERM, unreachable → UNAVAILABLE,
    /// something else at influxdb.url → CONFIG (the URL must change).
    pub fn exit_code(&self) -> i32 {
        match self.error {
            WriteError::Auth(_) => crate::exit::NOPERM,
            WriteError::NotInfluxDb(_) => crate::exit::CONFIG,
            // Missing: phase 2 has not run (yet); a later try can succeed.
            WriteError::Transient(_) | WriteError::Timeout(_) | WriteError::Missing(_) => {
                crate::exit::UNAVAILABLE
            }
            _ => crate::exit::SOFTWARE,
        }
    }
}

impl From<SchemaError> for Failure {
    fn from(e: SchemaError) -> Failure {
        Failure::new(e.exit_code(), e)
    }
}

fn ctx(what: impl Into<String>) -> impl FnOnce(WriteError) -> SchemaError {
    let what = what.into();
    move |error| SchemaError {
        what,
        error,
        after: None,
    }
}

/// Reads the server's state for what `d` declares.
pub async fn read(
    client: &InfluxClient,
    d: &Declared,
    cfg: &Config,
) -> Result<Actual, SchemaError> {
    let mut a = Actual::default();
    // Auth on? A request with made-up credentials is refused only then.
    match login(client, cfg, Some(("nbpy-auth-probe", ""))).await {
        Ok(true) => {}
        Ok(false) => a.auth = true,
        Err(WriteError::Rejected(m) | WriteError::Refused(m))
            if m.contains("create admin user first") =>
        {
            a.auth = true;
            a.needs_first_admin = true;
        }
        Err(e) => return Err(ctx("probing for authentication")(e)),
    }
    if a.needs_first_admin {
        return Ok(a);
    }
    let v = client
        .query("SHOW DATABASES")
        .await
        .map_err(ctx("reading databases"))?;
    a.database = series(&v, 0)
        .iter()
        .flat_map(|s| s.values.iter())
        .any(|r| r.first().and_then(|x| x.as_str()) == Some(d.database.as_str()));
    if a.database {
        let v = client
            .query(&format!(
                "SHOW RETENTION POLICIES ON {}",
                ident(&d.database)
            ))
            .await
            .map_err(ctx("reading retention policies"))?;
        for s in series(&v, 0) {
            for row in &s.values {
                let dur = |c: &str| {
                    s.get(row, c)
                        .as_str()
                        .and_then(influxql::parse_go_duration)
                        .unwrap_or_default()
                };
                a.policies.push(Policy {
                    name: s.get(row, "name").as_str().unwrap_or("").to_string(),
                    duration: dur("duration"),
                    shard: dur("shardGroupDuration"),
                    default: s.get(row, "default").as_bool().unwrap_or(false),
                });
            }
        }
        let v = client
            .query("SHOW CONTINUOUS QUERIES")
            .await
            .map_err(ctx("reading continuous queries"))?;
        for s in series(&v, 0).into_iter().filter(|s| s.name == d.database) {
            for row in &s.values {
                if let (Some(n), Some(q)) =
                    (s.get(row, "name").as_str(), s.get(row, "query").as_str())
                {
                    a.queries.insert(n.to_string(), q.to_string());
                }
            }
        }
    }
    if d.users.is_empty() {
        return Ok(a);
    }
    let v = client
        .query("SHOW USERS")
        .await
        .map_err(ctx("reading users"))?;
    for s in series(&v, 0) {
        for row in &s.values {
            if let Some(n) = s.get(row, "user").as_str() {
                a.users.insert(
                    n.to_string(),
                    s.get(row, "admin").as_bool().unwrap_or(false),
                );
            }
        }
    }
    for u in d.users.iter().filter(|u| a.users.contains_key(&u.name)) {
        let v = client
            .query(&format!("SHOW GRANTS FOR {}", ident(&u.name)))
            .await
            .map_err(ctx(format!("reading grants of {:?}", u.name)))?;
        for s in series(&v, 0) {
            for row in &s.values {
                if s.get(row, "database").as_str() == Some(d.database.as_str()) {
                    let p = parse_privilege(s.get(row, "privilege").as_str().unwrap_or(""));
                    a.grants.insert(u.name.clone(), p);
                }
            }
        }
        if a.auth
            && !login(client, cfg, Some((&u.name, &u.password)))
                .await
                .map_err(ctx(format!("logging in as {:?}", u.name)))?
        {
            a.wrong_password.push(u.name.clone());
        }
    }
    Ok(a)
}

/// `SHOW DATABASES` as `user` (None: no credentials at all). `Ok(false)`
/// when the server refuses the credentials.
async fn login(
    client: &InfluxClient,
    cfg: &Config,
    user: Option<(&str, &str)>,
) -> Result<bool, WriteError> {
    let base = client.url().clone();
    let mut url = base.clone();
    url.set_path(&format!("{}/query", base.path().trim_end_matches('/')));
    let http = reqwest::Client::builder()
        .timeout(cfg.influxdb.timeout)
        .build()
        .map_err(|e| WriteError::Transient(e.to_string()))?;
    let mut req = http.post(url).form(&[("q", "SHOW DATABASES")]);
    if let Some((u, p)) = user {
        req = req.basic_auth(u, Some(p));
    }
    let r = req.send().await.map_err(|e| {
        WriteError::Transient(format!(
            "cannot reach InfluxDB: {}",
            crate::exit::http_error(e)
        ))
    })?;
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    if text.contains("create admin user first") {
        return Err(WriteError::Rejected(text));
    }
    match status {
        200..=299 => Ok(true),
        401 | 403 => Ok(false),
        _ => Err(crate::sink::influx::classify(status, text)),
    }
}

/// What `apply` did (or `diff` would do).
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub changes: Vec<Change>,
    /// Undeclared things left in place (no `--prune`).
    pub kept: Vec<Change>,
    /// What the plan could not see (a server that shows nothing yet).
    pub note: Option<String>,
}

/// On a server with auth on and no admin yet, only creating an admin works:
/// say so instead of failing on the first other statement.
fn check_bootstrap(d: &Declared, a: &Actual) -> Result<(), Failure> {
    if a.needs_first_admin && !d.users.iter().any(|u| u.admin) {
        return Err(Failure::new(
            crate::exit::NOPERM,
            anyhow::anyhow!(
                "InfluxDB has auth on and no admin user yet: declare one under [schema.users.NAME] \
                 with admin = true and password_file, and set influxdb.username / password_file to it"
            ),
        ));
    }
    Ok(())
}

/// Computes the plan without changing anything.
pub async fn diff(client: &InfluxClient, cfg: &Config, prune: bool) -> Result<Report, Failure> {
    let d = declared(cfg)?;
    let a = read(client, &d, cfg).await?;
    check_bootstrap(&d, &a)?;
    if a.needs_first_admin {
        // An admin-less server shows nothing: planning against that would
        // list everything as missing, also what exists. Only the admins'
        // creation is known; apply plans the rest once they exist.
        return Ok(Report {
            changes: plan(&d, &a, prune)
                .into_iter()
                .take_while(|c| matches!(c, Change::CreateUser { admin: true, .. }))
                .collect(),
            kept: Vec::new(),
            note: Some(
                "InfluxDB has auth on and no admin user yet, so it shows nothing else: the rest is planned by `nbpy schema apply` once the admin exists"
                    .into(),
            ),
        });
    }
    Ok(Report {
        changes: plan(&d, &a, prune),
        kept: if prune {
            Vec::new()
        } else {
            undeclared(&d, &a)
        },
        note: None,
    })
}

/// Makes the declared state true. Idempotent: a second run finds nothing
/// to change. `applied` is called with each change once it is made, so
/// that a run failing part-way still tells what it did.
pub async fn apply(
    client: &InfluxClient,
    cfg: &Config,
    prune: bool,
    applied: &mut dyn FnMut(&Change),
) -> Result<Report, Failure> {
    let d = declared(cfg)?;
    let mut a = read(client, &d, cfg).await?;
    check_bootstrap(&d, &a)?;
    let mut changes = Vec::new();
    if a.needs_first_admin {
        // Until an admin exists the server shows nothing (and accepts only
        // CREATE USER … WITH ALL PRIVILEGES): create the admins, then read
        // what really is there — a database from before auth was turned
        // on must not be planned as missing.
        let admins: Vec<Change> = plan(&d, &a, prune)
            .into_iter()
            .take_while(|c| matches!(c, Change::CreateUser { admin: true, .. }))
            .collect();
        for c in admins {
            run(client, &d, &c).await?;
            applied(&c);
            changes.push(c);
        }
        a = read(client, &d, cfg).await?;
    }
    for c in plan(&d, &a, prune) {
        run(client, &d, &c).await?;
        applied(&c);
        changes.push(c);
    }
    Ok(Report {
        changes,
        kept: if prune {
            Vec::new()
        } else {
            undeclared(&d, &a)
        },
        note: None,
    })
}

/// Runs one change's statements.
///
/// A replaced continuous query is dropped before its new text is created
/// (InfluxDB has no ALTER for it); when the CREATE fails, the query as it
/// was is created again, so a failed apply never leaves a declared query
/// dropped (its bars would stop).
///
/// Errors of statements that carry a password never show InfluxDB's text
/// as is: a parse error quotes the statement.
async fn run(client: &InfluxClient, d: &Declared, c: &Change) -> Result<(), SchemaError> {
    let what = c
        .to_string()
        .trim_start_matches(['+', '~', '-', ' '])
        .to_string();
    let password = match c {
        Change::CreateUser { name, .. } | Change::SetPassword { name } => d
            .users
            .iter()
            .find(|u| &u.name == name)
            .map(|u| u.password.as_str()),
        _ => None,
    };
    let stmts = c.statements(d);
    let last = stmts.len().saturating_sub(1);
    for (i, stmt) in stmts.iter().enumerate() {
        let Err(e) = client.query(stmt).await else {
            continue;
        };
        let mut e = ctx(what.clone())(match password {
            Some(p) => redact(e, p),
            None => e,
        });
        if let Change::ReplaceQuery { from, to } = c {
            if i == last && i > 0 {
                e.after = Some(match client.query(from).await {
                    Ok(_) => format!(
                        "the previous query {:?} was re-created and still runs",
                        to.name
                    ),
                    Err(r) => format!(
                        "re-creating the previous query {:?} failed too: {r}; it is missing until an apply succeeds",
                        to.name
                    ),
                });
            }
        }
        return Err(e);
    }
    Ok(())
}

/// `e` without `password` in its text. InfluxDB's parse errors quote the
/// statement, possibly only part of the password (up to a character that
/// ended the literal), so they are replaced as a whole.
fn redact(e: WriteError, password: &str) -> WriteError {
    let hide = |m: String| {
        if m.contains("error parsing query") {
            "error parsing query (InfluxDB's message is not shown: it quotes the statement, which carries a password)".to_string()
        } else if password.is_empty() {
            m
        } else {
            let literal = influxql::string(password);
            m.replace(&literal[1..literal.len() - 1], "***")
                .replace(password, "***")
        }
    };
    match e {
        WriteError::Transient(m) => WriteError::Transient(hide(m)),
        WriteError::Timeout(m) => WriteError::Timeout(hide(m)),
        WriteError::Rejected(m) => WriteError::Rejected(hide(m)),
        WriteError::Refused(m) => WriteError::Refused(hide(m)),
        WriteError::Auth(m) => WriteError::Auth(hide(m)),
        WriteError::Missing(m) => WriteError::Missing(hide(m)),
        WriteError::NotInfluxDb(m) => WriteError::NotInfluxDb(hide(m)),
        WriteError::TooLarge => WriteError::TooLarge,
    }
}

/// Creates the database, retention policies and continuous queries from the
/// built-in defaults (what the tests and `nbpy up` need before writing).
/// Idempotent; never prunes.
pub async fn ensure(client: &InfluxClient) -> Result<(), WriteError> {
    let cfg = Config {
        influxdb: crate::config::InfluxConfig {
            database: client.database().to_string(),
            ..Default::default()
        },
        ..Default::default()
    };
    ensure_with(client, &cfg).await
}

/// [`ensure`] with a given configuration's `[schema]` (users excluded).
pub async fn ensure_with(client: &InfluxClient, cfg: &Config) -> Result<(), WriteError> {
    let mut cfg = cfg.clone();
    cfg.schema.users.clear();
    let d = declared(&cfg).map_err(|e| WriteError::Rejected(e.to_string()))?;
    let a = read(client, &d, &cfg).await.map_err(|e| e.error)?;
    for c in plan(&d, &a, false) {
        run(client, &d, &c).await.map_err(|e| e.error)?;
    }
    Ok(())
}

/// Figures per measurement and retention policy.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MeasurementStats {
    pub measurement: String,
    pub rp: String,
    pub series: u64,
    /// Per series the largest per-field count, summed: exact for raw data
    /// (every point has `seq`).
    pub points: u64,
    /// Newest point's time, ns since the epoch.
    pub newest_ns: Option<i64>,
    /// Its age when the figures were taken, seconds.
    pub newest_age_s: Option<f64>,
    // No shards or disk size: InfluxDB keeps those per shard, and a shard
    // holds every measurement of its policy. Repeated on each row they
    // read as per-measurement sizes and sum to several times the disk.
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PolicyStats {
    pub rp: String,
    pub shards: u64,
    /// TSM files + WAL of the policy's shards (`SHOW STATS FOR 'shard'`).
    pub disk_bytes: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Stats {
    pub database: String,
    pub measurements: Vec<MeasurementStats>,
    pub policies: Vec<PolicyStats>,
}

/// Reads the figures of every declared measurement (and its bars).
pub async fn stats(client: &InfluxClient) -> Result<Stats, SchemaError> {
    let db = client.database().to_string();
    let now_ns = crate::wire::now_ns();
    // Asked first: InfluxDB answers a query of several statements on a
    // missing database with a bare "not executed".
    let v = client
        .query("SHOW DATABASES")
        .await
        .map_err(ctx("reading databases"))?;
    let exists = series(&v, 0)
        .iter()
        .flat_map(|s| s.values.iter())
        .any(|r| r.first().and_then(|x| x.as_str()) == Some(db.as_str()));
    if !exists {
        return Err(ctx("reading figures")(WriteError::Missing(format!(
            "database {db:?} not found"
        ))));
    }
    let mut policies: BTreeMap<String, PolicyStats> = BTreeMap::new();
    // Every policy gets a row, also one with no shard yet (`long_term`
    // before its first bar): absent would read as "not created".
    let v = client
        .query(&format!("SHOW RETENTION POLICIES ON {}", ident(&db)))
        .await
        .map_err(ctx("reading retention policies"))?;
    for s in series(&v, 0) {
        for row in &s.values {
            if let Some(rp) = s.get(row, "name").as_str() {
                policies.insert(
                    rp.to_string(),
                    PolicyStats {
                        rp: rp.to_string(),
                        shards: 0,
                        disk_bytes: 0,
                    },
                );
            }
        }
    }
    let v = client
        .query("SHOW SHARDS")
        .await
        .map_err(ctx("reading shards"))?;
    for s in series(&v, 0).into_iter().filter(|s| s.name == db) {
        for row in &s.values {
            let rp = s
                .get(row, "retention_policy")
                .as_str()
                .unwrap_or("")
                .to_string();
            policies
                .entry(rp.clone())
                .or_insert(PolicyStats {
                    rp,
                    shards: 0,
                    disk_bytes: 0,
                })
                .shards += 1;
        }
    }
    let v = client
        .query("SHOW STATS FOR 'shard'")
        .await
        .map_err(ctx("reading shard statistics"))?;
    for s in series(&v, 0) {
        if s.tags.get("database").and_then(|x| x.as_str()) != Some(db.as_str()) {
            continue;
        }
        let rp = s
            .tags
            .get("retentionPolicy")
            .and_then(|x| x.as_str())
            .unwrap_or("")
            .to_string();
        let bytes: u64 = s
            .values
            .iter()
            .map(|r| s.get(r, "diskBytes").as_u64().unwrap_or(0))
            .sum();
        policies
            .entry(rp.clone())
            .or_insert(PolicyStats {
                rp,
                shards: 0,
                disk_bytes: 0,
            })
            .disk_bytes += bytes;
    }
    let mut targets: Vec<(String, &str)> = Vec::new();
    for m in MEASUREMENTS {
        targets.push((m.name.to_string(), m.rp));
        if m.downsample {
            targets.push((bars_measurement(m), rp::LONG_TERM));
        }
    }
    let mut measurements = Vec::new();
    for (name, rp_name) in targets {
        let from = format!("{}.{}.{}", ident(&db), ident(rp_name), ident(&name));
        let v = client
            .query(&format!(
                "SELECT count(*) FROM {from} GROUP BY *; SELECT * FROM {from} ORDER BY time DESC LIMIT 1"
            ))
            .await
            .map_err(ctx(format!("reading figures of {name}")))?;
        let counted = series(&v, 0);
        let points = counted
            .iter()
            .map(|s| {
                s.values
                    .iter()
                    .map(|r| {
                        r.iter()
                            .skip(1)
                            .filter_map(|x| x.as_u64())
                            .max()
                            .unwrap_or(0)
                    })
                    .sum::<u64>()
            })
            .sum();
        let newest_ns = series(&v, 1)
            .first()
            .and_then(|s| s.values.first().map(|r| s.get(r, "time").clone()))
            .and_then(|t| t.as_str().and_then(parse_rfc3339_ns));
        measurements.push(MeasurementStats {
            measurement: name,
            rp: rp_name.to_string(),
            series: counted.len() as u64,
            points,
            newest_ns,
            newest_age_s: newest_ns.map(|t| (now_ns - t) as f64 / 1e9),
        });
    }
    Ok(Stats {
        database: db,
        measurements,
        policies: policies.into_values().collect(),
    })
}

/// `2026-11-26T20:34:16.891633192Z` → ns since the epoch (UTC only, as
/// InfluxDB answers).
pub fn parse_rfc3339_ns(s: &str) -> Option<i64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-');
    let (y, mo, da): (i64, i64, i64) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.split(':');
    let (h, mi, se): (i64, i64, i64) = (
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
    );
    let mut ns: i64 = 0;
    if !frac.is_empty() {
        if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        ns = frac.parse::<i64>().ok()? * 10i64.pow(9 - frac.len() as u32);
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = if y2 >= 0 { y2 } else { y2 - 399 } / 400;
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + h * 3600 + mi * 60 + se) * 1_000_000_000) + ns)
}

impl Stats {
    /// A table for people.
    pub fn render(&self) -> String {
        let mut out = format!(
            "database {:?}\n{:<28} {:<15} {:>7} {:>11} {:>12}\n",
            self.database, "measurement", "rp", "series", "points", "newest age"
        );
        for m in &self.measurements {
            let age = m
                .newest_age_s
                .map(|a| format!("{:.1}s", a.max(0.0)))
                .unwrap_or_else(|| "-".into());
            out.push_str(&format!(
                "{:<28} {:<15} {:>7} {:>11} {:>12}\n",
                m.measurement, m.rp, m.series, m.points, age
            ));
        }
        out.push_str("\nretention policy  shards  disk (all its measurements)\n");
        for p in &self.policies {
            out.push_str(&format!(
                "{:<17} {:>6}  {}\n",
                p.rp,
                p.shards,
                human_bytes(p.disk_bytes)
            ));
        }
        out
    }
}

fn human_bytes(b: u64) -> String {
    match b {
        0..=9_999 => format!("{b} B"),
        10_000..=9_999_999 => format!("{:.1} KiB", b as f64 / 1024.0),
        _ => format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn declared_default() -> Declared {
        declared(&Config::default()).unwrap()
    }

    #[test]
    fn bars_are_derived_from_the_schema_and_names_do_not_collide() {
        for m in MEASUREMENTS.iter().filter(|m| m.downsample) {
            let f = bar_fields(m);
            let mut names: Vec<&str> = f.iter().map(|(n, _)| n.as_str()).collect();
            let before = names.len();
            names.sort();
            names.dedup();
            assert_eq!(before, names.len(), "{}", m.name);
            assert_eq!(
                f.len(),
                6 + m.numeric_fields().filter(|x| x.name != m.headline).count()
            );
            assert!(
                m.numeric_fields().any(|x| x.name == m.headline),
                "{}",
                m.name
            );
        }
        let d = declared_default();
        assert_eq!(
            d.queries.len(),
            MEASUREMENTS.iter().filter(|m| m.downsample).count()
        );
        let tick = d
            .queries
            .iter()
            .find(|q| q.name == "kraken_tick_1m")
            .unwrap();
        assert_eq!(
            influxql::normalize(&tick.text),
            "CREATE CONTINUOUS QUERY kraken_tick_1m ON tick RESAMPLE EVERY 30s FOR 2m BEGIN \
             SELECT first(last) AS open, max(last) AS high, min(last) AS low, last(last) AS close, \
             mean(last) AS mean, count(last) AS count, mean(bid) AS mean_bid, mean(bid_qty) AS mean_bid_qty, \
             mean(ask) AS mean_ask, mean(ask_qty) AS mean_ask_qty, mean(volume) AS mean_volume, \
             mean(vwap) AS mean_vwap, mean(low) AS mean_low, mean(high) AS mean_high, \
             mean(change) AS mean_change, mean(change_pct) AS mean_change_pct \
             INTO tick.long_term.kraken_tick_1m FROM tick.default.kraken_tick GROUP BY time(1m), * END"
        );
    }

    #[test]
    fn an_empty_server_gets_everything_and_a_matching_one_nothing() {
        let d = declared_default();
        let empty = Actual::default();
        let p = plan(&d, &empty, false);
        assert!(
            matches!(&p[0], Change::CreateDatabase { default, .. } if default.name == "default")
        );
        assert_eq!(
            p.iter()
                .filter(|c| matches!(c, Change::CreatePolicy(_)))
                .count(),
            2
        );
        assert!(!p
            .iter()
            .any(|c| matches!(c, Change::SetDefaultPolicy { .. })));
        let mut a = Actual {
            database: true,
            policies: d.policies.clone(),
            ..Default::default()
        };
        for q in &d.queries {
            // As the server prints it back: quotes only where needed.
            a.queries
                .insert(q.name.clone(), q.text.replace("\"long_term\"", "long_term"));
        }
        assert_eq!(plan(&d, &a, true), vec![]);

        // Drift: a changed duration, a dropped query, an extra policy.
        a.policies[1].duration = Duration::from_secs(3600 * 24);
        a.queries.remove("kraken_depth_1m");
        a.policies.push(Policy {
            name: "autogen".into(),
            duration: Duration::ZERO,
            shard: Duration::from_secs(7 * 86400),
            default: false,
        });
        let p = plan(&d, &a, false);
        assert_eq!(p.len(), 2, "{p:#?}");
        assert!(matches!(&p[0], Change::AlterPolicy { to, .. } if to.name == a.policies[1].name));
        assert!(matches!(&p[1], Change::CreateQuery(q) if q.name == "kraken_depth_1m"));
        assert_eq!(undeclared(&d, &a).len(), 1);
        let p = plan(&d, &a, true);
        assert!(matches!(p.last(), Some(Change::DropPolicy { name }) if name == "autogen"));
    }

    #[test]
    fn users_admins_first_and_passwords_never_printed() {
        let d = Declared {
            users: vec![
                User {
                    name: "admin".into(),
                    admin: true,
                    privilege: Privilege::All,
                    password: "s3cr'et".into(),
                },
                User {
                    name: "grafana".into(),
                    admin: false,
                    privilege: Privilege::Read,
                    password: "pw".into(),
                },
            ],
            ..declared_default()
        };
        let p = plan(&d, &Actual::default(), false);
        assert!(matches!(&p[0], Change::CreateUser { name, admin: true } if name == "admin"));
        let stmts = p[0].statements(&d);
        assert_eq!(
            stmts,
            vec!["CREATE USER \"admin\" WITH PASSWORD 's3cr\\'et' WITH ALL PRIVILEGES"]
        );
        for c in &p {
            assert!(!c.to_string().contains("s3cr"), "{c}");
        }
        assert!(p.iter().any(
            |c| matches!(c, Change::Grant { user, to: Privilege::Read, .. } if user == "grafana")
        ));
    }

    /// InfluxQL cannot carry a carriage return in a string (its reader
    /// makes it a newline, which ends the literal), and the parse error
    /// would quote the password: such a password is refused when read.
    #[test]
    fn a_password_with_a_carriage_return_is_refused_without_showing_it() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("graf.pw");
        std::fs::write(&f, "TopSecret42\rtail\n").unwrap();
        let u = InfluxUserConfig {
            password_file: Some(f.clone()),
            admin: false,
            privilege: Privilege::Read,
        };
        let e = user("grafana", &u).unwrap_err();
        assert_eq!(e.code, crate::exit::NOPERM);
        let text = format!("{:#}", e.error);
        assert_eq!(
            text,
            format!(
                "schema.users.grafana.password_file ({}): the password contains the control character U+000D, which an InfluxQL string cannot carry; choose a password without control characters (a trailing newline is fine)",
                f.display()
            )
        );
        // Tab and an inner newline are carried (`\n` is escaped).
        std::fs::write(&f, "a\tb\nc\r\n").unwrap();
        assert_eq!(user("grafana", &u).unwrap().password, "a\tb\nc");
    }

    #[test]
    fn errors_of_password_statements_never_show_the_password() {
        let pw = "Top'Secret";
        let parse = WriteError::Refused(
            "error parsing query: found Top, expected string at line 1, char 29".into(),
        );
        let shown = redact(parse, pw).to_string();
        assert!(!shown.contains("Top"), "{shown}");
        assert!(shown.contains("error parsing query"), "{shown}");
        let echoed = WriteError::Refused("user x has password Top\\'Secret or Top'Secret".into());
        assert_eq!(
            redact(echoed, pw).to_string(),
            "InfluxDB refused the statement: user x has password *** or ***"
        );
        assert_eq!(
            redact(WriteError::Refused("user already exists".into()), pw).to_string(),
            "InfluxDB refused the statement: user already exists"
        );
    }

    #[test]
    fn rfc3339_times_parse_to_ns() {
        assert_eq!(parse_rfc3339_ns("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_ns("2001-09-09T01:46:40.5Z"),
            Some(1_000_000_000_500_000_000)
        );
        assert_eq!(parse_rfc3339_ns("nonsense"), None);
    }
}
