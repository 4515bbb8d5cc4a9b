//! `nbpy doctor`: what the appliance needs, checked before it starts, each
//! problem printed with its fix. Nothing is changed.

use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use crate::config;
use crate::exit::{Failure, CONFIG, UNAVAILABLE};
use crate::feeds::FeedKind;

#[derive(Debug, PartialEq)]
pub enum Level {
    Ok,
    Warn,
    Problem,
}

#[derive(Debug)]
pub struct Finding {
    pub level: Level,
    pub what: String,
    pub fix: Option<String>,
}

fn ok(what: impl Into<String>) -> Finding {
    Finding {
        level: Level::Ok,
        what: what.into(),
        fix: None,
    }
}
fn warn(what: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding {
        level: Level::Warn,
        what: what.into(),
        fix: Some(fix.into()),
    }
}
fn problem(what: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding {
        level: Level::Problem,
        what: what.into(),
        fix: Some(fix.into()),
    }
}

fn on_path(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(bin))
            .find(|p| p.is_file())
    })
}

fn host_port(url: &str, default_port: u16) -> Option<(String, u16)> {
    let u = reqwest::Url::parse(url).ok()?;
    Some((
        u.host_str()?.to_string(),
        u.port_or_known_default().unwrap_or(default_port),
    ))
}

fn reachable(host: &str, port: u16) -> Result<(), String> {
    let addrs = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?;
    let mut last = String::from("no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, Duration::from_secs(3)) {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// The venue a publisher talks to, as host and port.
pub fn upstream(p: &config::PublisherConfig) -> Option<(String, u16)> {
    if let Some(u) = &p.url {
        return host_port(u, 443);
    }
    match p.feed {
        FeedKind::KrakenTick | FeedKind::KrakenDepth | FeedKind::KrakenOrders => {
            Some(("ws.kraken.com".into(), 443))
        }
        FeedKind::OandaTick => host_port(p.oanda.environment.stream_url(), 443),
        FeedKind::BetfairStream => Some(("stream-api.betfair.com".into(), 443)),
        FeedKind::Social => Some(("api.x.com".into(), 443)),
        FeedKind::Synthetic | FeedKind::Replay => None,
    }
}

pub async fn check(explicit: Option<&std::path::Path>) -> Vec<Finding> {
    let mut f = Vec::new();
    let loaded = match config::load(explicit) {
        Ok(l) => {
            f.push(ok(format!(
                "configuration valid ({})",
                l.file
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "built-in defaults".into())
            )));
            l
        }
        Err(e) => {
            f.push(problem(
                format!("configuration: {e}"),
                "fix the named keys; `nbpy config show` prints what is in effect",
            ));
            return f;
        }
    };
    // Beside a running `nbpy up`, what it runs (its ports are then its own).
    let up = crate::supervisor::running_up(&loaded.config);
    let cfg = match &up {
        Some((_, Some(effective))) => effective.clone(),
        _ => crate::supervisor::with_defaults(loaded.config.clone(), false),
    };
    let held_by_up = |name: &str| {
        up.as_ref().and_then(|(s, _)| {
            s.children
                .iter()
                .any(|c| c.role == "publisher" && c.name == name)
                .then_some(s.pid)
        })
    };

    // InfluxDB.
    // /ping needs no credentials; a missing password file is reported below.
    let client = crate::sink::influx::InfluxClient::new(&config::InfluxConfig {
        password_file: None,
        username: None,
        ..cfg.influxdb.clone()
    });
    match client {
        Ok(c) if c.file_sink().is_some() => f.push(warn("influxdb.url is a file sink", "set influxdb.url to an InfluxDB server to query and graph the data")),
        Ok(c) => match c.ping().await {
            Ok(()) => f.push(ok(format!("InfluxDB answers at {}", config::redact_url(&cfg.influxdb.url)))),
            // Not "not running": `nbpy up` would start its own beside it,
            // and every other command would talk to the wrong server.
            Err(e @ crate::sink::influx::WriteError::NotInfluxDb(_)) => f.push(problem(
                e.to_string(),
                "point influxdb.url at InfluxDB, or stop what answers there",
            )),
            Err(e) => match on_path("influxd") {
                Some(p) => f.push(ok(format!("InfluxDB not running at {} ({e}); `nbpy up` will start {}", config::redact_url(&cfg.influxdb.url), p.display()))),
                None => f.push(problem(
                    format!("no InfluxDB at {} and no influxd on PATH", config::redact_url(&cfg.influxdb.url)),
                    "apt-get install influxdb, or point influxdb.url at a server (`nbpy up` would fall back to a line-protocol file)",
                )),
            },
        },
        Err(e) => f.push(problem(format!("influxdb: {e}"), "fix influxdb.url / password_file")),
    }

    // Grafana.
    match &cfg.grafana.url {
        Some(u) => {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(3))
                .build();
            let identified = match (reqwest::Url::parse(u), http) {
                (Ok(base), Ok(http)) => crate::admin::grafana::api::identify(&http, &base)
                    .await
                    .map_err(|e| e.to_string()),
                (Err(e), _) => Err(format!("grafana.url {:?}: {e}", config::redact_url(u))),
                (_, Err(e)) => Err(e.to_string()),
            };
            match identified {
                Ok(()) => f.push(ok(format!("Grafana answers at {}", config::redact_url(u)))),
                Err(e) => f.push(problem(
                    e,
                    "start Grafana, or correct grafana.url",
                )),
            }
        }
        None => match on_path("grafana-server").or_else(|| on_path("grafana")) {
            Some(p) => f.push(ok(format!("Grafana binary at {} (set grafana.url once it runs)", p.display()))),
            None => f.push(warn(
                "no Grafana configured",
                "dashboards are still rendered for file provisioning (`nbpy grafana render DIR`); set grafana.url to apply them",
            )),
        },
    }

    // Ports.
    for (name, p) in &cfg.publishers {
        let ep = p.endpoint();
        if let Some(raw) = ep.strip_prefix("tcp://") {
            // `*` is ZeroMQ's spelling of every address, which the bus
            // binds as 0.0.0.0; the OS resolves no host named `*`.
            let addr = match raw.strip_prefix("*:") {
                Some(port) => format!("0.0.0.0:{port}"),
                None => raw.to_string(),
            };
            let addr = addr.as_str();
            match TcpListener::bind(addr) {
                Ok(_) => f.push(ok(format!("publishers.{name}: {ep} is free"))),
                Err(e) => match held_by_up(name) {
                    Some(pid) => f.push(ok(format!(
                        "publishers.{name}: {ep} is bound by the running nbpy up (pid {pid})"
                    ))),
                    // Beside an appliance run by systemd (or by hand) its
                    // publisher holds the port: that is no problem.
                    None => match crate::zmtp::socket_type_at(addr).await {
                        Ok(kind) if kind == "XPUB" || kind == "PUB" => f.push(ok(format!(
                            "publishers.{name}: {ep} is served by a running publisher (it answers ZeroMQ as {kind})"
                        ))),
                        _ => f.push(problem(
                            format!("publishers.{name}: cannot bind {ep}: {e}"),
                            "stop what holds the port or set publishers.NAME.endpoint",
                        )),
                    },
                },
            }
        }
    }
    match TcpListener::bind(&cfg.health.listen) {
        Ok(_) => f.push(ok(format!("health.listen {} is free", cfg.health.listen))),
        Err(e) => f.push(warn(
            format!("health.listen {}: {e}", cfg.health.listen),
            "a running nbpy-health holds it, or set health.listen",
        )),
    }

    // Secrets.
    if let (Some(user), None) = (&cfg.influxdb.username, &cfg.influxdb.password_file) {
        f.push(warn(
            format!("influxdb.username = {user:?} without influxdb.password_file: nbpy logs in with an empty password"),
            "set influxdb.password_file (a credential name or a path), or drop influxdb.username when InfluxDB has no auth",
        ));
    }
    for (key, path) in config::secret_files(&cfg) {
        match config::read_secret(&key, &path) {
            Err(e) if e.is_empty() => {
                f.push(problem(e.to_string(), "write the secret into the file"))
            }
            Ok(_) => {
                use std::os::unix::fs::PermissionsExt;
                let at = config::secret_path(&path);
                // Group-readable (root:nbpy 0640) is how a service reads
                // it; readable by every user is a leak. A credential (a
                // relative name found under $CREDENTIALS_DIRECTORY) is the
                // service manager's to protect, as compose secrets are.
                let credential = at != path;
                match std::fs::metadata(&at).map(|m| m.permissions().mode() & 0o777) {
                    Ok(mode) if mode & 0o004 != 0 && !credential => f.push(warn(
                        format!("{key}: {} is readable by every user (mode {mode:04o})", at.display()),
                        format!("chmod 0600 {} (or 0640 with the service's group), or use a systemd credential", at.display()),
                    )),
                    _ => f.push(ok(format!("{key}: {} readable", path.display()))),
                }
            }
            Err(e) => f.push(problem(
                e.to_string(),
                "create the file (mode 0600) or, under systemd, a LoadCredential= of that name",
            )),
        }
    }

    // State directory.
    let dir = crate::supervisor::state_dir(&cfg);
    f.push(ok(format!("state directory {}", dir.display())));

    // Venues.
    for (name, p) in &cfg.publishers {
        if let Some((host, port)) = upstream(p) {
            let (h, pt) = (host.clone(), port);
            match tokio::task::spawn_blocking(move || reachable(&h, pt))
                .await
                .unwrap_or_else(|e| Err(e.to_string()))
            {
                Ok(()) => f.push(ok(format!("publishers.{name}: {host}:{port} reachable"))),
                Err(e) => f.push(problem(
                    format!("publishers.{name}: {host}:{port} unreachable: {e}"),
                    "check network, DNS and firewall (or publishers.NAME.url)",
                )),
            }
        }
    }
    f
}

pub fn render(findings: &[Finding]) -> String {
    let mut s = String::new();
    for x in findings {
        let tag = match x.level {
            Level::Ok => "ok     ",
            Level::Warn => "warn   ",
            Level::Problem => "PROBLEM",
        };
        s.push_str(&format!("{tag} {}\n", x.what));
        if let Some(fix) = &x.fix {
            s.push_str(&format!("        fix: {fix}\n"));
        }
    }
    s
}

pub async fn command(explicit: Option<&std::path::Path>) -> Result<(), Failure> {
    let findings = check(explicit).await;
    crate::cli::emit(&render(&findings));
    let problems: Vec<&Finding> = findings
        .iter()
        .filter(|f| f.level == Level::Problem)
        .collect();
    if problems.is_empty() {
        crate::outln!("no problems found");
        return Ok(());
    }
    let code = if problems.iter().any(|p| p.what.starts_with("configuration")) {
        CONFIG
    } else {
        UNAVAILABLE
    };
    Err(Failure::new(
        code,
        anyhow::anyhow!("{} problem(s) found", problems.len()),
    ))
}
