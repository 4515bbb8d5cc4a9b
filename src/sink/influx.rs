//! A small InfluxDB 1.x HTTP client: `/ping`, `/write` and `/query`.
//!
//! Write failures are classified by what the caller should do about them,
//! because "retry", "split and retry", and "stop and tell a human" are
//! different code paths, and mixing them up is how data gets lost.

use bytes::Bytes;
use std::io::Write;
use std::time::Duration;

use flate2::write::GzEncoder;
use flate2::Compression;

use crate::config::{read_secret, InfluxConfig};
use crate::exit::Failure;

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum WriteError {
    /// Connection refused/reset, 5xx: retry with backoff.
    #[error("InfluxDB unavailable: {0}")]
    Transient(String),
    /// No answer within `influxdb.timeout`: retried like [`Transient`], but
    /// told apart, because a server that answers `/ping` and not this is
    /// stuck (see [`crate::health`]), not away.
    ///
    /// [`Transient`]: WriteError::Transient
    #[error("InfluxDB did not answer in time: {0}")]
    Timeout(String),
    /// 400: some points were refused (field-type conflict, bad line); the
    /// rest were stored. Carries InfluxDB's message.
    #[error("InfluxDB refused points: {0}")]
    Rejected(String),
    /// A query's statement failed (InfluxQL error, or a later statement
    /// of several "not executed" because an earlier one failed). Told
    /// apart from [`Rejected`] so no message speaks of points for a query.
    ///
    /// [`Rejected`]: WriteError::Rejected
    #[error("InfluxDB refused the statement: {0}")]
    Refused(String),
    /// 413: the request is too large; split it.
    #[error("request too large for InfluxDB")]
    TooLarge,
    /// 401/403: credentials. Retrying will not help until a human acts.
    #[error("InfluxDB denied access ({0}); check influxdb.username / password_file")]
    Auth(String),
    /// Database or retention policy missing (phase 2 has not run).
    #[error("InfluxDB: {0} (run `nbpy schema apply`)")]
    Missing(String),
    /// Something answers HTTP at `influxdb.url`, but not InfluxDB (a web
    /// server, a proxy's error page, Grafana). Waiting or retrying will
    /// not change that: the URL is wrong.
    #[error("{0}: check influxdb.url (InfluxDB's HTTP API, port 8086 by default)")]
    NotInfluxDb(String),
}

impl WriteError {
    pub fn is_transient(&self) -> bool {
        matches!(self, WriteError::Transient(_) | WriteError::Timeout(_))
    }
}

#[derive(Clone)]
pub struct InfluxClient {
    /// `file:///path` URLs select the line-protocol file sink: the fallback
    /// `nbpy up` uses when no InfluxDB can be had. Same lines, same order.
    file: Option<std::sync::Arc<std::sync::Mutex<std::path::PathBuf>>>,
    http: reqwest::Client,
    base: reqwest::Url,
    database: String,
    auth: Option<(String, String)>,
    gzip: bool,
}

impl InfluxClient {
    pub fn new(cfg: &InfluxConfig) -> Result<Self, Failure> {
        let base = reqwest::Url::parse(&cfg.url)
            .map_err(|e| Failure::config(anyhow::anyhow!("influxdb.url {:?}: {e}", cfg.url)))?;
        let auth = match (&cfg.username, &cfg.password_file) {
            (Some(u), Some(p)) => Some((
                u.clone(),
                read_secret("influxdb.password_file", p)
                    .map_err(|e| Failure::new(crate::exit::NOPERM, e))?,
            )),
            (Some(u), None) => Some((u.clone(), String::new())),
            _ => None,
        };
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(Duration::from_secs(3))
            .pool_max_idle_per_host(cfg.concurrency.max(1) * 2)
            .build()
            .map_err(|e| Failure::new(crate::exit::SOFTWARE, e))?;
        let file = (base.scheme() == "file")
            .then(|| base.to_file_path().ok())
            .flatten()
            .map(|p| std::sync::Arc::new(std::sync::Mutex::new(p)));
        Ok(InfluxClient {
            file,
            http,
            base,
            database: cfg.database.clone(),
            auth,
            gzip: cfg.gzip_enabled(),
        })
    }

    pub fn url(&self) -> &reqwest::Url {
        &self.base
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    fn endpoint(&self, path: &str) -> reqwest::Url {
        let mut u = self.base.clone();
        let joined = format!("{}/{}", u.path().trim_end_matches('/'), path);
        u.set_path(&joined);
        u
    }

    fn with_auth(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.auth {
            Some((u, p)) => req.basic_auth(u, Some(p)),
            None => req,
        }
    }

    /// The file the file sink appends to, if this client is one.
    pub fn file_sink(&self) -> Option<std::path::PathBuf> {
        self.file
            .as_ref()
            .and_then(|f| f.lock().ok().map(|p| p.clone()))
    }

    fn append_file(&self, lines: &[u8]) -> Result<(), WriteError> {
        use std::io::Write as _;
        let Some(f) = &self.file else { return Ok(()) };
        let path = f
            .lock()
            .map_err(|_| WriteError::Transient("file sink lock poisoned".into()))?;
        let io =
            |e: std::io::Error| WriteError::Transient(format!("file sink {}: {e}", path.display()));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&*path)
            .map_err(io)?;
        out.write_all(lines).map_err(io)?;
        out.sync_data().map_err(io)
    }

    /// `influxdb.url` for messages: a password in it shows as `***`.
    pub fn shown_url(&self) -> String {
        crate::config::redact_url(self.base.as_str())
    }

    /// `/ping`: is InfluxDB answering? Any web server answers 2xx to
    /// `GET /ping` (the same page on every path), so the answer counts only
    /// with the `X-Influxdb-Version` header, which every InfluxDB sets on
    /// it (1.x, and 2.x's 1.x-compatible API): a gate that let anything
    /// through would have `nbpy schema apply` fail later with a message
    /// about decoding JSON.
    pub async fn ping(&self) -> Result<(), WriteError> {
        if self.file.is_some() {
            return self.append_file(b"");
        }
        let r = self
            .http
            .get(self.endpoint("ping"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .map_err(request_failed)?;
        let influx = r.headers().contains_key("x-influxdb-version");
        // InfluxDB sets the header on every answer, errors included; a
        // 5xx without it is a proxy whose InfluxDB is down (wait for it),
        // any other answer without it is some other server (do not).
        if !r.status().is_success() && (influx || r.status().is_server_error()) {
            return Err(WriteError::Transient(format!(
                "/ping answered {}",
                r.status()
            )));
        }
        if !influx {
            return Err(WriteError::NotInfluxDb(format!(
                "something at {} answers HTTP but is not InfluxDB (no X-Influxdb-Version header on /ping)",
                self.shown_url()
            )));
        }
        Ok(())
    }

    /// Gzips (when configured) and writes newline-separated points.
    /// Takes the body as [`Bytes`] so that a batch goes out without a copy
    /// (it was a megabyte per batch, fresh pages included) and a retry
    /// re-sends the same bytes.
    pub async fn write(&self, rp: &str, lines: Bytes) -> Result<(), WriteError> {
        if self.file.is_some() {
            let me = self.clone();
            return tokio::task::spawn_blocking(move || me.append_file(&lines))
                .await
                .map_err(|e| WriteError::Transient(format!("file sink task: {e}")))?;
        }
        let mut url = self.endpoint("write");
        url.query_pairs_mut()
            .append_pair("db", &self.database)
            .append_pair("precision", "ns");
        if !rp.is_empty() {
            url.query_pairs_mut().append_pair("rp", rp);
        }
        let mut req = self.with_auth(self.http.post(url));
        let body = if self.gzip {
            req = req.header("Content-Encoding", "gzip");
            // Milliseconds of CPU for a full batch: off the runtime's
            // thread, which the subscriber's intake shares.
            tokio::task::spawn_blocking(move || {
                let mut gz =
                    GzEncoder::new(Vec::with_capacity(lines.len() / 4), Compression::fast());
                gz.write_all(&lines).and_then(|_| gz.finish())
            })
            .await
            .map_err(|e| WriteError::Transient(format!("gzip task: {e}")))?
            .map_err(|e| WriteError::Transient(format!("gzip: {e}")))?
            .into()
        } else {
            lines
        };
        let r = req.body(body).send().await.map_err(request_failed)?;
        let status = r.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(());
        }
        let text = r.text().await.unwrap_or_default();
        let msg = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or(text);
        Err(classify(status, msg))
    }

    /// Runs an InfluxQL statement; returns the JSON result.
    pub async fn query(&self, q: &str) -> Result<serde_json::Value, WriteError> {
        if let Some(p) = self.file_sink() {
            return Err(WriteError::Transient(format!(
                "the file sink ({}) cannot answer queries; install InfluxDB",
                p.display()
            )));
        }
        let mut url = self.endpoint("query");
        url.query_pairs_mut().append_pair("db", &self.database);
        let r = self
            .with_auth(self.http.post(url))
            .form(&[("q", q)])
            .send()
            .await
            .map_err(request_failed)?;
        let status = r.status().as_u16();
        let body = r.bytes().await.map_err(|e| {
            let timeout = e.is_timeout();
            let why = format!("query answer: {}", crate::exit::http_error(e));
            if timeout {
                WriteError::Timeout(why)
            } else {
                WriteError::Transient(why)
            }
        })?;
        // InfluxDB answers every query, refused ones included, with JSON.
        // Anything else came from another server: a proxy's 5xx page while
        // InfluxDB is away (retry) or its 401/403 (credentials), else
        // something that is not InfluxDB at all — "error decoding response
        // body" would not say which.
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|_| {
            let start: String = String::from_utf8_lossy(&body)
                .chars()
                .filter(|c| !c.is_control())
                .take(60)
                .collect();
            match status {
                500..=599 | 401 | 403 => {
                    classify(status, format!("no JSON from /query: {start:?}"))
                }
                _ => WriteError::NotInfluxDb(format!(
                    "the answer from {} ({status}) is not InfluxDB's JSON: {start:?}",
                    crate::config::redact_url(self.endpoint("query").as_str())
                )),
            }
        })?;
        if !(200..300).contains(&status) {
            let msg = v
                .get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("")
                .to_string();
            return Err(classify_query(status, msg));
        }
        // Every statement's error, not only the first's: with several
        // statements a later one can fail alone.
        let errors = v
            .get("results")
            .and_then(|r| r.as_array())
            .map(|rs| {
                rs.iter()
                    .filter_map(|r| r.get("error").and_then(|e| e.as_str()))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        if let Some(first) = errors.first() {
            return Err(classify_query(400, first.to_string()));
        }
        Ok(v)
    }

    /// The single number a `SELECT count(..)`-style query returns (0 when empty).
    pub async fn query_number(&self, q: &str) -> Result<f64, WriteError> {
        let v = self.query(q).await?;
        Ok(v.pointer("/results/0/series/0/values/0/1")
            .and_then(|x| x.as_f64())
            .unwrap_or(0.0))
    }
}

/// [`classify`] for a query: what it calls refused points is a refused
/// statement here.
fn classify_query(status: u16, msg: String) -> WriteError {
    match classify(status, msg) {
        WriteError::Rejected(m) => WriteError::Refused(m),
        e => e,
    }
}

pub fn classify(status: u16, msg: String) -> WriteError {
    let lower = msg.to_ascii_lowercase();
    match status {
        401 | 403 => WriteError::Auth(format!("{status} {msg}")),
        413 => WriteError::TooLarge,
        _ if lower.contains("database not found")
            || lower.contains("retention policy not found") =>
        {
            WriteError::Missing(msg)
        }
        400 => WriteError::Rejected(msg),
        404 => WriteError::Missing(msg),
        _ => WriteError::Transient(format!("{status} {msg}")),
    }
}

/// Without the URL: `influxdb.url` may carry a password, and these texts
/// are logged.
fn request_failed(e: reqwest::Error) -> WriteError {
    if e.is_timeout() {
        WriteError::Timeout(crate::exit::http_error(e))
    } else if e.is_connect() {
        WriteError::Transient(format!("cannot connect: {}", crate::exit::http_error(e)))
    } else {
        WriteError::Transient(crate::exit::http_error(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_by_what_to_do() {
        assert!(matches!(classify(401, "".into()), WriteError::Auth(_)));
        assert!(matches!(classify(413, "".into()), WriteError::TooLarge));
        assert!(matches!(
            classify(404, "database not found: \"tick\"".into()),
            WriteError::Missing(_)
        ));
        assert!(matches!(
            classify(500, "retention policy not found: x".into()),
            WriteError::Missing(_)
        ));
        assert!(matches!(
            classify(400, "partial write: field type conflict".into()),
            WriteError::Rejected(_)
        ));
        assert!(classify(503, "busy".into()).is_transient());
    }
}
