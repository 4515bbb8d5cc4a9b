//! `nbpy grafana apply`: the provisioning of [`super::render_to`] through
//! Grafana's HTTP API, idempotently.
//!
//! Endpoints (Grafana's documented legacy `/api` routes, served by every
//! Grafana since 9 and still by 11–13):
//! - folder: `GET /api/folders/:uid`, `POST /api/folders {uid,title}`,
//!   `PUT /api/folders/:uid {title,overwrite}`;
//! - datasource: `GET /api/datasources/uid/:uid`, `POST /api/datasources`,
//!   `PUT /api/datasources/uid/:uid`;
//! - dashboards: `GET /api/dashboards/uid/:uid`,
//!   `POST /api/dashboards/db {dashboard, folderUid, overwrite, message}`.
//!
//! Each object is read first and written only when it differs from what
//! nbpy renders (every key nbpy sets must match), so a second run changes
//! nothing and leaves no new dashboard version behind. Admin credentials:
//! `grafana.admin_user` (default `admin`) and `grafana.admin_password_file`.
//! A datasource password is only written when the datasource is created or
//! differs otherwise; Grafana never shows it back, so a changed password
//! file alone is not detected (delete the datasource, or re-render).

use serde_json::{json, Value};

use crate::config::{read_secret, Config};
use crate::exit::{Failure, CONFIG, NOPERM, SOFTWARE, TEMPFAIL, UNAVAILABLE};

#[derive(Debug, Default, Clone)]
pub struct ApplyReport {
    pub created: usize,
    pub updated: usize,
    pub unchanged: usize,
    /// One line per object: `+ dashboard nbpy-kraken_tick` …
    pub lines: Vec<String>,
}

impl ApplyReport {
    fn note(&mut self, mark: char, what: String) {
        match mark {
            '+' => self.created += 1,
            '~' => self.updated += 1,
            _ => self.unchanged += 1,
        }
        self.lines.push(format!("{mark} {what}"));
    }
}

struct Grafana {
    http: reqwest::Client,
    base: reqwest::Url,
    user: String,
    password: String,
}

/// `base` with `path` appended to its own path (Grafana may be served
/// under a sub-path, `http://host/grafana`).
fn endpoint(base: &reqwest::Url, path: &str) -> reqwest::Url {
    let mut url = base.clone();
    url.set_path(&format!("{}{path}", base.path().trim_end_matches('/')));
    url
}

fn unreachable(base: &reqwest::Url, e: reqwest::Error) -> Failure {
    let why = if e.is_connect() {
        "connection refused or host unreachable"
    } else if e.is_timeout() {
        "timed out"
    } else {
        "request failed"
    };
    Failure::new(
        UNAVAILABLE,
        anyhow::anyhow!(
            "cannot reach Grafana at {} ({why}): {}",
            crate::config::redact_url(base.as_str()),
            crate::exit::http_error(e)
        ),
    )
}

/// Is the server at `base` Grafana? Every Grafana answers `GET
/// /api/health` without credentials with a JSON object that has a
/// `database` field ("ok", or "failing" with a 503). Anything else — an
/// InfluxDB, a reverse proxy's 404 for a wrong sub-path, a web server's
/// HTML on every path — is not, and the API calls made to it would
/// "succeed" or fail in ways that say nothing about the real mistake. Asked
/// first, and without the admin credentials, so they are never sent to
/// whatever else answers at that URL.
pub async fn identify(http: &reqwest::Client, base: &reqwest::Url) -> Result<(), Failure> {
    let url = endpoint(base, "/api/health");
    let shown = crate::config::redact_url(url.as_str());
    let r = http
        .get(url)
        .header("Accept", "application/json")
        .send()
        .await
        .map_err(|e| unreachable(base, e))?;
    let status = r.status();
    let text = r.text().await.unwrap_or_default();
    let health: Option<Value> = serde_json::from_str(&text).ok();
    let database = health
        .as_ref()
        .and_then(|v| v.get("database"))
        .and_then(Value::as_str);
    match (status.as_u16(), database) {
        (200..=299, Some(_)) => Ok(()),
        (500..=599, Some(db)) => Err(Failure::new(
            TEMPFAIL,
            anyhow::anyhow!(
                "Grafana is not healthy (GET {shown}: {status}, database {db:?}); retry once its database is back"
            ),
        )),
        (500..=599, None) => Err(Failure::new(
            TEMPFAIL,
            anyhow::anyhow!(
                "GET {shown} answered {status}: Grafana (or the proxy in front of it) is failing; retry later"
            ),
        )),
        _ => Err(Failure::new(
            UNAVAILABLE,
            anyhow::anyhow!(
                "grafana.url does not point at Grafana: GET {shown} answered {status} without Grafana's health JSON (a \"database\" field); \
                 set grafana.url to Grafana's root URL (its port, 3000 by default, and its sub-path when served under one, e.g. http://host/grafana)"
            ),
        )),
    }
}

impl Grafana {
    /// One API request. 404 means "absent" only for a lookup (GET of an
    /// object by uid); on a write it means the route itself is missing —
    /// the URL is not Grafana's API, e.g. a proxy path without Grafana's
    /// sub-path — and taking it for success would report objects as
    /// created that were never stored.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), Failure> {
        let mut req = self
            .http
            .request(method.clone(), endpoint(&self.base, path))
            .basic_auth(&self.user, Some(&self.password))
            .header("Accept", "application/json");
        if let Some(b) = body {
            req = req.json(b);
        }
        let r = req.send().await.map_err(|e| unreachable(&self.base, e))?;
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let msg = v
            .get("message")
            .and_then(|m| m.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| text.chars().take(200).collect());
        match status {
            401 => Err(Failure::new(
                NOPERM,
                anyhow::anyhow!(
                    "Grafana refused the credentials of {:?} (401 {msg}); check grafana.admin_user and grafana.admin_password_file",
                    self.user
                ),
            )),
            403 => Err(Failure::new(
                NOPERM,
                anyhow::anyhow!(
                    "Grafana user {:?} may not {method} {path} (403 {msg}); it needs the Admin role",
                    self.user
                ),
            )),
            200..=299 => Ok((status, v)),
            404 if method == reqwest::Method::GET => Ok((status, v)),
            404 => Err(Failure::new(
                UNAVAILABLE,
                anyhow::anyhow!(
                    "{method} {} answered 404 ({msg}): Grafana's API is not served there; \
                     check that grafana.url is Grafana's root URL, with its sub-path when served under one",
                    crate::config::redact_url(endpoint(&self.base, path).as_str())
                ),
            )),
            500..=599 => Err(Failure::new(
                TEMPFAIL,
                anyhow::anyhow!("Grafana failed {method} {path}: {status} {msg}"),
            )),
            _ => Err(Failure::new(
                SOFTWARE,
                anyhow::anyhow!("Grafana refused {method} {path}: {status} {msg}"),
            )),
        }
    }
}

/// Does `have` carry every key of `want` with the same value (recursively
/// for objects)? Grafana adds its own keys (id, version, meta); only ours
/// count.
pub fn covers(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(h), Value::Object(w)) => w
            .iter()
            .all(|(k, wv)| h.get(k).is_some_and(|hv| covers(hv, wv))),
        (h, w) => h == w,
    }
}

/// Upserts folder, datasource and dashboards.
pub async fn apply(cfg: &Config) -> Result<ApplyReport, Failure> {
    let g = &cfg.grafana;
    let url = g.url.as_deref().ok_or_else(|| {
        Failure::new(
            CONFIG,
            anyhow::anyhow!("grafana.url is not set (e.g. http://127.0.0.1:3000)"),
        )
    })?;
    let base = reqwest::Url::parse(url)
        .map_err(|e| Failure::new(CONFIG, anyhow::anyhow!("grafana.url {url:?}: {e}")))?;
    let pw_file = g.admin_password_file.as_deref().ok_or_else(|| {
        Failure::new(
            CONFIG,
            anyhow::anyhow!("grafana.admin_password_file is not set (the admin password is only read from a file)"),
        )
    })?;
    let password =
        read_secret("grafana.admin_password_file", pw_file).map_err(|e| Failure::new(NOPERM, e))?;
    let http = reqwest::Client::builder()
        .timeout(g.timeout)
        .connect_timeout(std::time::Duration::from_secs(3))
        .build()
        .map_err(|e| Failure::new(SOFTWARE, e))?;
    identify(&http, &base).await?;
    let api = Grafana {
        http,
        base,
        user: g.admin_user.clone().unwrap_or_else(|| "admin".into()),
        password,
    };
    let mut report = ApplyReport::default();
    use reqwest::Method;

    // Folder.
    let folder = &g.folder;
    let (st, have) = api
        .call(Method::GET, &format!("/api/folders/{folder}"), None)
        .await?;
    if st == 404 {
        api.call(
            Method::POST,
            "/api/folders",
            Some(&json!({"uid": folder, "title": folder})),
        )
        .await?;
        report.note('+', format!("folder {folder}"));
    } else if have["title"] != json!(folder) {
        api.call(
            Method::PUT,
            &format!("/api/folders/{folder}"),
            Some(&json!({"title": folder, "overwrite": true})),
        )
        .await?;
        report.note('~', format!("folder {folder}"));
    } else {
        report.note('=', format!("folder {folder}"));
    }

    // Datasource.
    let mut ds = super::datasource(cfg);
    let uid = &g.datasource_uid;
    let (st, have) = api
        .call(Method::GET, &format!("/api/datasources/uid/{uid}"), None)
        .await?;
    let target = super::influx_target(cfg);
    let password = target.password;
    let has_secret = have["secureJsonFields"]["password"] == json!(true);
    let same = st != 404 && covers(&have, &ds) && has_secret == password.is_some();
    if same {
        report.note('=', format!("datasource {uid}"));
    } else {
        if let Some(p) = password {
            let secret = match p {
                // The datasource logging in as nbpy does has nbpy's own
                // password, read where nbpy reads it: the configured path
                // is where *Grafana* reads it (file provisioning), which
                // this process may not be able to (NixOS: grafana.service's
                // own credential directory).
                super::Password::File(p) => match &cfg.influxdb.password_file {
                    Some(own) if target.user.is_some() && target.user == cfg.influxdb.username => {
                        read_secret("influxdb.password_file", own)
                    }
                    _ => read_secret("grafana.influxdb_password_file", &p),
                }
                .map_err(|e| Failure::new(NOPERM, e))?,
                super::Password::InUrl(s) => s,
            };
            ds["secureJsonData"] = json!({"password": secret});
        }
        if st == 404 {
            api.call(Method::POST, "/api/datasources", Some(&ds))
                .await?;
            report.note('+', format!("datasource {uid}"));
        } else {
            api.call(
                Method::PUT,
                &format!("/api/datasources/uid/{uid}"),
                Some(&ds),
            )
            .await?;
            report.note('~', format!("datasource {uid}"));
        }
    }

    // Dashboards.
    for d in super::dashboards::all(uid) {
        let duid = d["uid"].as_str().unwrap_or_default().to_string();
        let (st, have) = api
            .call(Method::GET, &format!("/api/dashboards/uid/{duid}"), None)
            .await?;
        let mut want = d.clone();
        if let Some(o) = want.as_object_mut() {
            o.remove("version");
        }
        if st != 404
            && covers(&have["dashboard"], &want)
            && have["meta"]["folderUid"] == json!(folder)
        {
            report.note('=', format!("dashboard {duid}"));
            continue;
        }
        let mut body_dash = d.clone();
        body_dash["id"] = Value::Null;
        let body = json!({
            "dashboard": body_dash,
            "folderUid": folder,
            "overwrite": true,
            "message": "nbpy grafana apply"
        });
        api.call(Method::POST, "/api/dashboards/db", Some(&body))
            .await?;
        report.note(
            if st == 404 { '+' } else { '~' },
            format!("dashboard {duid}"),
        );
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covers_compares_only_our_keys() {
        let have = json!({"id": 3, "version": 7, "a": {"b": 1, "extra": 2}, "l": [1, 2]});
        assert!(covers(&have, &json!({"a": {"b": 1}, "l": [1, 2]})));
        assert!(!covers(&have, &json!({"a": {"b": 2}})));
        assert!(!covers(&have, &json!({"missing": null})));
        assert!(!covers(&have, &json!({"l": [1]})));
    }
}
