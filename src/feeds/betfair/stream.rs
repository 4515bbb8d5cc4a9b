//! The Exchange Stream connection: TLS, credentials, the request/response
//! handshake, and the read loop that feeds the market cache.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::{self, pki_types};
use tokio_rustls::TlsConnector;

use super::cache::{MarketCache, MarketChange, Oddities, Response};
use super::{DEFAULT_LOGIN_URL, DEFAULT_STREAM};
use crate::exit::{self, Failure};
use crate::feeds::upstream::{self, Ended, Line, LineSplitter, Outlet, MAX_LINE};
use crate::feeds::FeedContext;
use crate::sink::RateLimitedLog;

const AUTH_ID: i64 = 1;
const SUB_ID: i64 = 2;
/// Connecting, the TLS handshake and each handshake answer must finish in this.
const STEP_TIMEOUT: Duration = Duration::from_secs(15);
/// The greeting, authentication and subscription together must finish in
/// this. Each read has [`STEP_TIMEOUT`], but a server that keeps answering
/// with something else (a line that is not JSON every second) resets it
/// forever and would hold the feed in its handshake with nothing logged
/// and no reconnect.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// `host:port` of the stream: `tls://host:port`, `ssl://host:port` or
/// `host:port` (port 443 when omitted).
pub(super) fn parse_endpoint(url: &str) -> Result<(String, u16), String> {
    let rest = match url.split_once("://") {
        Some(("tls" | "ssl" | "tcp+tls", rest)) => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "the Exchange Stream is raw TLS: use tls://host:port, not {scheme}://"
            ))
        }
        None => url,
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("{p:?} is not a port number"))?,
        ),
        _ => (rest, 443),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err("no host".into());
    }
    Ok((host.to_string(), port))
}

/// Public web roots plus `ca_file`, with the ring provider (the one reqwest
/// uses), so a second provider in the build can never make this ambiguous.
fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    use pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let path = resolve(path);
        let mut n = 0;
        for cert in pki_types::CertificateDer::pem_file_iter(&path)
            .map_err(|e| format!("betfair.ca_file {}: {e}", path.display()))?
        {
            let cert = cert.map_err(|e| format!("betfair.ca_file {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("betfair.ca_file {}: {e}", path.display()))?;
            n += 1;
        }
        if n == 0 {
            return Err(format!(
                "betfair.ca_file {}: no PEM certificate in it",
                path.display()
            ));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// A relative path is a systemd credential name when `$CREDENTIALS_DIRECTORY` has it.
fn resolve(path: &Path) -> PathBuf {
    if path.is_relative() {
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            let p = PathBuf::from(dir).join(path);
            if p.exists() {
                return p;
            }
        }
    }
    path.to_path_buf()
}

enum TokenSource {
    /// Re-read on every new session, so an outside refresher can rotate it.
    File(PathBuf),
    Login {
        client: reqwest::Client,
        url: String,
        username: String,
        password: String,
    },
}

struct Credentials {
    app_key: String,
    source: TokenSource,
    token: Option<String>,
    /// The current token has been accepted by the stream at least once, so
    /// a later session error means it expired rather than that it is wrong.
    proven: bool,
    /// The last login was refused with a temporary ban: the next one waits
    /// `login_ban_wait`.
    banned: bool,
}

impl Credentials {
    fn new(ctx: &FeedContext) -> Result<Self, Failure> {
        let name = &ctx.name;
        let b = &ctx.cfg.betfair;
        let cfg_err = |e: String| Failure::config(anyhow::anyhow!("publisher {name}: {e}"));
        let key_path = b
            .app_key_file
            .as_deref()
            .ok_or_else(|| cfg_err("betfair.app_key_file is missing".into()))?;
        let app_key = upstream::secret(name, "betfair.app_key_file", key_path)?;
        let source = match (&b.cert_file, &b.key_file, &b.username, &b.password_file) {
            (Some(cert), Some(key), Some(user), Some(pw)) => {
                let password = upstream::secret(name, "betfair.password_file", pw)?;
                let mut pem = std::fs::read(resolve(cert))
                    .map_err(|e| cfg_err(format!("betfair.cert_file {}: {e}", cert.display())))?;
                pem.push(b'\n');
                pem.extend(
                    std::fs::read(resolve(key))
                        .map_err(|e| cfg_err(format!("betfair.key_file {}: {e}", key.display())))?,
                );
                let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
                    cfg_err(format!(
                        "betfair.cert_file/key_file: not a PEM certificate and private key: {e}"
                    ))
                })?;
                let mut builder = reqwest::Client::builder()
                    .use_rustls_tls()
                    .identity(identity)
                    .timeout(STEP_TIMEOUT)
                    .user_agent(concat!("nbpy/", env!("CARGO_PKG_VERSION")));
                if let Some(ca) = &b.ca_file {
                    let text = std::fs::read(resolve(ca))
                        .map_err(|e| cfg_err(format!("betfair.ca_file {}: {e}", ca.display())))?;
                    for c in reqwest::Certificate::from_pem_bundle(&text)
                        .map_err(|e| cfg_err(format!("betfair.ca_file: {e}")))?
                    {
                        builder = builder.add_root_certificate(c);
                    }
                }
                let client = builder
                    .build()
                    .map_err(|e| cfg_err(format!("login HTTP client: {e}")))?;
                TokenSource::Login {
                    client,
                    url: b
                        .login_url
                        .clone()
                        .unwrap_or_else(|| DEFAULT_LOGIN_URL.to_string()),
                    username: user.clone(),
                    password,
                }
            }
            _ => match &b.session_token_file {
                Some(p) => TokenSource::File(p.clone()),
                None => return Err(cfg_err(
                    "betfair: neither session_token_file nor the certificate login is configured"
                        .into(),
                )),
            },
        };
        Ok(Credentials {
            app_key,
            source,
            token: None,
            proven: false,
            banned: false,
        })
    }

    fn describe(&self) -> &'static str {
        match self.source {
            TokenSource::File(_) => "the session token from betfair.session_token_file",
            TokenSource::Login { .. } => "the session token from the certificate login",
        }
    }

    /// The session token, logging in or reading the file when there is none.
    async fn token(&mut self, name: &str) -> Result<Result<String, Ended>, Failure> {
        if let Some(t) = &self.token {
            return Ok(Ok(t.clone()));
        }
        let token = match &self.source {
            TokenSource::File(p) => upstream::secret(name, "betfair.session_token_file", p)?,
            TokenSource::Login {
                client,
                url,
                username,
                password,
            } => match login(name, client, url, username, password, &self.app_key).await? {
                Ok(t) => t,
                Err(Refused { ended, banned }) => {
                    self.banned = banned;
                    return Ok(Err(ended));
                }
            },
        };
        self.token = Some(token.clone());
        self.proven = false;
        Ok(Ok(token))
    }

    /// The session expired: the next connection gets a new token.
    fn expire(&mut self) {
        self.token = None;
        self.proven = false;
    }
}

/// A login that did not give a token, but may next time.
struct Refused {
    ended: Ended,
    /// Betfair banned new logins for a while.
    banned: bool,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct LoginAnswer {
    session_token: Option<String>,
    login_status: Option<String>,
}

/// Betfair's non-interactive login: a form POST over TLS with the client
/// certificate. `loginStatus` other than SUCCESS is a credential problem,
/// except the temporary ban on too many logins.
async fn login(
    name: &str,
    client: &reqwest::Client,
    url: &str,
    username: &str,
    password: &str,
    app_key: &str,
) -> Result<Result<String, Refused>, Failure> {
    let lost = |why: String| {
        Ok(Err(Refused {
            ended: Ended::Lost {
                why,
                productive: false,
            },
            banned: false,
        }))
    };
    let resp = client
        .post(url)
        .header("X-Application", app_key)
        .header("Accept", "application/json")
        .form(&[("username", username), ("password", password)])
        .send()
        .await;
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            if let Some(alert) = tls_alert(&e) {
                return Err(upstream::rejected(
                    name,
                    format!(
                        "the Betfair login server refused the client certificate in betfair.cert_file (TLS alert {alert:?})"
                    ),
                ));
            }
            return lost(format!(
                "certificate login failed: {}",
                upstream::http_error(e)
            ));
        }
    };
    let status = resp.status();
    if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
        return Err(upstream::rejected(
            name,
            format!("the Betfair certificate login answered HTTP {status}"),
        ));
    }
    if !status.is_success() {
        return lost(format!("certificate login answered HTTP {status}"));
    }
    let answer: LoginAnswer = match resp.json().await {
        Ok(a) => a,
        Err(e) => {
            return lost(format!(
                "certificate login answer unreadable: {}",
                upstream::http_error(e)
            ))
        }
    };
    match (answer.login_status.as_deref(), answer.session_token) {
        (Some("SUCCESS"), Some(t)) if !t.is_empty() => Ok(Ok(t)),
        // Too many logins in a minute: Betfair bans new ones for a while
        // (20 minutes, it documents). The credentials are fine, so this is
        // not exit 77 but a temporary failure, tried again once the ban is
        // likely over (`login_ban_wait`), not every backoff step.
        (Some(status @ "TEMPORARY_BAN_TOO_MANY_REQUESTS"), _) => Ok(Err(Refused {
            ended: Ended::Lost {
                why: format!(
                    "certificate login refused for now: a temporary ban after too many logins ({status}); Betfair lifts it by itself, the next login waits betfair.login_ban_wait"
                ),
                productive: false,
            },
            banned: true,
        })),
        (status, _) => Err(upstream::rejected(
            name,
            format!(
                "the Betfair certificate login for betfair.username {username:?} failed: {}",
                status.unwrap_or("no loginStatus")
            ),
        )),
    }
}

/// The TLS alert a server sent, if that is why `e` happened (a client
/// certificate the server does not accept).
fn tls_alert(e: &(dyn std::error::Error + 'static)) -> Option<rustls::AlertDescription> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(rustls::Error::AlertReceived(a)) = err.downcast_ref::<rustls::Error>() {
            return Some(*a);
        }
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(a) = tls_alert(inner) {
                return Some(a);
            }
        }
        cur = err.source();
    }
    None
}

/// One TLS connection with a line splitter on its read side.
struct Conn {
    tls: TlsStream<TcpStream>,
    lines: LineSplitter,
    buf: Vec<u8>,
}

enum Read {
    Line(Vec<u8>),
    TooLong,
    Silent,
    Closed(String),
}

impl Conn {
    async fn open(host: &str, port: u16, tls: &Arc<rustls::ClientConfig>) -> Result<Conn, String> {
        let tcp = tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect((host, port)))
            .await
            .map_err(|_| format!("connecting to {host}:{port} timed out"))?
            .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let server = pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| format!("{host:?} is not a TLS server name: {e}"))?;
        let tls = tokio::time::timeout(
            STEP_TIMEOUT,
            TlsConnector::from(tls.clone()).connect(server, tcp),
        )
        .await
        .map_err(|_| format!("TLS handshake with {host}:{port} timed out"))?
        .map_err(|e| format!("TLS handshake with {host}:{port} failed: {e}"))?;
        Ok(Conn {
            tls,
            lines: LineSplitter::new(MAX_LINE),
            buf: vec![0; 64 * 1024],
        })
    }

    async fn send(&mut self, msg: &serde_json::Value) -> Result<(), String> {
        let mut bytes = serde_json::to_vec(msg).map_err(|e| e.to_string())?;
        bytes.extend_from_slice(b"\r\n");
        let w = async {
            self.tls.write_all(&bytes).await?;
            self.tls.flush().await
        };
        tokio::time::timeout(STEP_TIMEOUT, w)
            .await
            .map_err(|_| "sending timed out".to_string())?
            .map_err(|e| format!("sending failed: {e}"))
    }

    async fn read(&mut self, silent: Duration) -> Read {
        loop {
            match self.lines.next_line() {
                Some(Line::Text(t)) => return Read::Line(t),
                Some(Line::TooLong) => return Read::TooLong,
                None => {}
            }
            match tokio::time::timeout(silent, self.tls.read(&mut self.buf)).await {
                Err(_) => return Read::Silent,
                Ok(Err(e)) => return Read::Closed(format!("read failed: {e}")),
                Ok(Ok(0)) => return Read::Closed("closed by the server".into()),
                Ok(Ok(n)) => self.lines.push(&self.buf[..n]),
            }
        }
    }
}

/// Everything that outlives one connection.
struct Feed<'a> {
    ctx: &'a FeedContext,
    host: String,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    creds: Credentials,
    cache: MarketCache,
    initial_clk: Option<String>,
    clk: Option<String>,
    /// What Betfair said it will send, once it said so.
    heartbeat_ms: u64,
    conflate_ms: u64,
    /// Markets imaged so far in the current (possibly segmented) message.
    imaged: std::collections::HashSet<String>,
    log: RateLimitedLog,
}

pub(super) async fn run(ctx: FeedContext) -> Result<(), Failure> {
    let b = &ctx.cfg.betfair;
    let cfg_err = |e: String| Failure::config(anyhow::anyhow!("publisher {}: {e}", ctx.name));
    let (host, port) = parse_endpoint(ctx.cfg.url.as_deref().unwrap_or(DEFAULT_STREAM))
        .map_err(|e| cfg_err(format!("url: {e}")))?;
    let tls = tls_config(b.ca_file.as_deref()).map_err(cfg_err)?;
    let creds = Credentials::new(&ctx)?;
    let mut feed = Feed {
        ctx: &ctx,
        host,
        port,
        tls,
        creds,
        cache: MarketCache::new(b.ladder_levels as usize),
        initial_clk: None,
        clk: None,
        heartbeat_ms: b.heartbeat_ms,
        conflate_ms: b.conflate_ms.unwrap_or(0),
        imaged: Default::default(),
        log: RateLimitedLog::new(Duration::from_secs(5)),
    };
    let mut out = Outlet::new(&ctx);
    upstream::reconnect_loop(&ctx, "Betfair", &mut out, &mut feed).await?;
    // The malformed count says whether the venue was healthy, the
    // connection count how often the feed had to start over.
    let stats = &ctx.out.stats;
    tracing::info!(
        "publisher {}: Betfair feed published {} runner updates, {} malformed upstream messages, {} connections",
        ctx.name,
        out.sent,
        stats.malformed.load(Ordering::Relaxed),
        stats.connects.load(Ordering::Relaxed)
    );
    Ok(())
}

impl upstream::Session for Feed<'_> {
    async fn session(&mut self, out: &mut Outlet<'_>) -> Result<Ended, Failure> {
        Feed::session(self, out).await
    }

    fn wait_at_least(&mut self) -> Option<Duration> {
        std::mem::take(&mut self.creds.banned).then_some(self.ctx.cfg.betfair.login_ban_wait)
    }
}

impl Feed<'_> {
    /// Greeting, authentication and subscription on a fresh connection,
    /// up to Betfair's acknowledgement of the subscription. `Ok(Ok)` may
    /// carry a change that arrived before the acknowledgement; `Err` is the
    /// end of the feed, `Ok(Err)` the end of this connection.
    async fn handshake(
        &mut self,
        conn: &mut Conn,
        token: &str,
        out: &Outlet<'_>,
    ) -> Result<Result<Option<Vec<u8>>, Ended>, Failure> {
        let name = self.ctx.name.clone();
        let lost = |why: String| {
            Ok(Err(Ended::Lost {
                why,
                productive: false,
            }))
        };
        // The server speaks first.
        let greeting = match conn.read(STEP_TIMEOUT).await {
            Read::Line(l) => l,
            Read::Silent => return lost("sent no connection message".into()),
            Read::TooLong => return lost("sent an oversized greeting".into()),
            Read::Closed(e) => return lost(e),
        };
        match serde_json::from_slice::<Response>(&greeting) {
            Ok(r) if r.op == "connection" => tracing::info!(
                "publisher {name}: connected to the Betfair stream at {}:{} (connection {})",
                self.host,
                self.port,
                r.connection_id.as_deref().unwrap_or("?")
            ),
            Ok(r) if r.op == "status" => return self.on_status(&r, false).map(Err),
            _ => return lost("did not greet with a connection message".into()),
        }
        let auth = json!({
            "op": "authentication",
            "id": AUTH_ID,
            "appKey": self.creds.app_key,
            "session": token,
        });
        if let Err(e) = conn.send(&auth).await {
            return lost(e);
        }
        loop {
            let line = match conn.read(STEP_TIMEOUT).await {
                Read::Line(l) => l,
                Read::Silent => return lost("did not answer the authentication".into()),
                Read::TooLong => {
                    out.malformed();
                    continue;
                }
                Read::Closed(e) => return lost(format!("{e} during authentication")),
            };
            let r = match serde_json::from_slice::<Response>(&line) {
                Ok(r) => r,
                Err(e) => {
                    out.malformed();
                    crate::warn_limited!(self.log, || format!(
                        "publisher {name}: unreadable answer to the Betfair authentication: {e}"
                    ));
                    continue;
                }
            };
            if r.op == "status"
                && (r.id == Some(AUTH_ID) || r.status_code.as_deref() == Some("FAILURE"))
            {
                if r.status_code.as_deref() == Some("SUCCESS") {
                    break;
                }
                return self.on_status(&r, false).map(Err);
            }
        }
        self.creds.proven = true;
        let resuming = self.clk.is_some();
        if let Err(e) = conn.send(&self.subscription()).await {
            return lost(e);
        }
        // Subscribed only once Betfair says so: it may refuse the filter.
        let early = loop {
            let line = match conn.read(STEP_TIMEOUT).await {
                Read::Line(l) => l,
                Read::Silent => return lost("did not answer the subscription".into()),
                Read::TooLong => {
                    let what = format!("sent a line over {MAX_LINE} bytes");
                    return Ok(Err(self.desync(out, what, false)));
                }
                Read::Closed(e) => return lost(format!("{e} during the subscription")),
            };
            let r = match serde_json::from_slice::<Response>(&line) {
                Ok(r) => r,
                Err(e) if may_carry_changes(&line) => {
                    let what = format!("sent a market change that cannot be read ({e})");
                    return Ok(Err(self.desync(out, what, false)));
                }
                Err(e) => {
                    out.malformed();
                    crate::warn_limited!(self.log, || format!(
                        "publisher {name}: unreadable answer to the Betfair subscription: {e}"
                    ));
                    continue;
                }
            };
            match r.op.as_str() {
                "status" if r.id == Some(SUB_ID) || r.status_code.as_deref() == Some("FAILURE") => {
                    if r.status_code.as_deref() == Some("SUCCESS") {
                        break None;
                    }
                    return self.on_status(&r, false).map(Err);
                }
                "status" if r.connection_closed == Some(true) => {
                    return lost("closed the connection during the subscription".into())
                }
                // Changes for the subscription mean it was taken; they
                // are the first data, handed on unapplied.
                "mcm" if r.id.is_none_or(|id| id == SUB_ID) => break Some(line),
                _ => {}
            }
        };
        tracing::info!(
            "publisher {name}: subscribed to Betfair markets{}",
            if resuming {
                " (resuming from the last clock)"
            } else {
                ""
            }
        );
        Ok(Ok(early))
    }

    /// Three missed heartbeats (plus the conflation delay) mean it is dead.
    fn silence(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms.saturating_mul(3) + self.conflate_ms)
    }

    fn subscription(&self) -> serde_json::Value {
        let b = &self.ctx.cfg.betfair;
        let mut filter = serde_json::Map::new();
        for (key, v) in [
            ("eventTypeIds", &b.event_types),
            ("countryCodes", &b.countries),
            ("marketTypes", &b.market_types),
            ("marketIds", &b.market_ids),
        ] {
            if !v.is_empty() {
                filter.insert(key.into(), json!(v));
            }
        }
        let mut msg = json!({
            "op": "marketSubscription",
            "id": SUB_ID,
            "segmentationEnabled": true,
            "heartbeatMs": b.heartbeat_ms,
            "marketFilter": filter,
            "marketDataFilter": {
                "ladderLevels": b.ladder_levels,
                "fields": ["EX_BEST_OFFERS", "EX_MARKET_DEF", "EX_LTP", "EX_TRADED_VOL"],
            },
        });
        if let Some(c) = b.conflate_ms {
            msg["conflateMs"] = json!(c);
        }
        if let (Some(i), Some(c)) = (&self.initial_clk, &self.clk) {
            msg["initialClk"] = json!(i);
            msg["clk"] = json!(c);
        }
        msg
    }

    async fn session(&mut self, out: &mut Outlet<'_>) -> Result<Ended, Failure> {
        let name = self.ctx.name.clone();
        let lost = |why: String| {
            Ok(Ended::Lost {
                why,
                productive: false,
            })
        };
        let token = match self.creds.token(&name).await? {
            Ok(t) => t,
            Err(e) => return Ok(e),
        };
        let mut conn = match Conn::open(&self.host, self.port, &self.tls).await {
            Ok(c) => c,
            Err(e) => return lost(e),
        };
        out.connected();
        let handshake =
            tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake(&mut conn, &token, out)).await;
        let mut early = match handshake {
            Ok(Ok(Ok(early))) => early,
            Ok(Ok(Err(ended))) => return Ok(ended),
            Ok(Err(failure)) => return Err(failure),
            Err(_) => {
                return lost(format!(
                    "did not complete the authentication and subscription within {} s",
                    HANDSHAKE_TIMEOUT.as_secs()
                ))
            }
        };
        let mut productive = false;
        loop {
            let read = match early.take() {
                Some(l) => Read::Line(l),
                None => conn.read(self.silence()).await,
            };
            let line = match read {
                Read::Line(l) => l,
                Read::TooLong => {
                    // Whatever it was (an image is the likely one) is lost.
                    return Ok(self.desync(
                        out,
                        format!("sent a line over {MAX_LINE} bytes"),
                        productive,
                    ));
                }
                Read::Silent => {
                    return Ok(Ended::Lost {
                        why: format!(
                            "was silent for {} ms (three heartbeats missed)",
                            self.silence().as_millis()
                        ),
                        productive,
                    })
                }
                Read::Closed(e) => return Ok(Ended::Lost { why: e, productive }),
            };
            let r: Response = match serde_json::from_slice(&line) {
                Ok(r) => r,
                Err(e) if !may_carry_changes(&line) => {
                    out.malformed();
                    crate::warn_limited!(self.log, || format!(
                        "publisher {name}: skipping Betfair line: {e}"
                    ));
                    continue;
                }
                Err(e) => {
                    return Ok(self.desync(
                        out,
                        format!("sent a market change that cannot be read ({e})"),
                        productive,
                    ))
                }
            };
            match r.op.as_str() {
                "mcm" => {
                    if r.id.is_some_and(|id| id != SUB_ID) {
                        continue;
                    }
                    productive = true;
                    if let Err(ended) = self.on_change(&r, out) {
                        return Ok(ended);
                    }
                }
                "status" => {
                    if r.status_code.as_deref() == Some("FAILURE") || r.error_code.is_some() {
                        return self.on_status(&r, productive);
                    }
                    if r.connection_closed == Some(true) {
                        return Ok(Ended::Lost {
                            why: "closed the connection".into(),
                            productive,
                        });
                    }
                }
                "connection" => {}
                other => {
                    out.malformed();
                    crate::warn_limited!(self.log, || format!(
                        "publisher {name}: unexpected Betfair op {other:?}"
                    ));
                }
            }
        }
    }

    /// A market change that cannot be applied leaves the cache different
    /// from Betfair's markets with nothing to show it: every later delta
    /// builds on the wrong ladder, and resuming from the clocks would skip
    /// the lost change again. So it is not a line to skip but a desync:
    /// count it, say so (rate-limited), forget the markets and the clocks
    /// and reconnect without them, which Betfair answers with a full image
    /// (`SUB_IMAGE`). Nothing is published from the cache in between; the
    /// image then publishes exactly the runners whose view differs from
    /// what was published.
    ///
    /// Reconnecting rather than resubscribing on the same connection: it is
    /// the path `INVALID_CLOCK` already takes, it goes through the backoff
    /// (a venue that keeps sending bad changes is not hammered), and no
    /// message of the old subscription can arrive after the new image.
    fn desync(&mut self, out: &Outlet<'_>, what: String, productive: bool) -> Ended {
        out.malformed();
        let name = &self.ctx.name;
        crate::warn_limited!(self.log, || {
            format!(
            "publisher {name}: Betfair {what}; the market cache may no longer match Betfair, dropping it and its clocks for a fresh image"
        )
        });
        self.cache.clear();
        self.imaged.clear();
        self.initial_clk = None;
        self.clk = None;
        Ended::Lost {
            why: format!("{what}; reconnecting for a fresh image"),
            productive,
        }
    }

    /// Applies one market change message; `Err` ends the connection (the
    /// feed should stop, or it must resynchronise).
    fn on_change(&mut self, r: &Response, out: &mut Outlet<'_>) -> Result<(), Ended> {
        if let Some(hb) = r.heartbeat_ms.filter(|h| *h > 0) {
            self.heartbeat_ms = hb;
        }
        if let Some(c) = r.conflate_ms {
            self.conflate_ms = c;
        }
        let ct = r.ct.as_deref();
        if ct == Some("HEARTBEAT") {
            out.alive();
        } else {
            // Checked before anything is applied: a value that cannot be
            // applied leaves its level unknown, and nothing of the message
            // may be published from a cache that no longer matches Betfair.
            let problem = r.mc.iter().flatten().find_map(|mc| {
                mc.problem().map(|p| {
                    format!(
                        "sent a market change that cannot be applied (market {}: {p})",
                        mc.id
                    )
                })
            });
            if let Some(what) = problem {
                return Err(self.desync(out, what, true));
            }
            let first_segment = matches!(r.segment_type.as_deref(), None | Some("SEG_START"));
            if ct == Some("SUB_IMAGE") && first_segment {
                // A full image replaces whatever the cache held (the clocks
                // were refused or never sent); what was published is kept,
                // so unchanged runners are not sent again.
                self.cache.clear();
            }
            if first_segment {
                self.imaged.clear();
            }
            let mut odd = Oddities::default();
            for mc in r.mc.iter().flatten() {
                // A market's image may go on in a later segment of the same
                // message: that continues it rather than replacing it.
                let merged;
                let mc = if mc.img && !self.imaged.insert(mc.id.clone()) {
                    merged = MarketChange {
                        img: false,
                        ..mc.clone()
                    };
                    &merged
                } else {
                    mc
                };
                for view in self.cache.apply(mc, &mut odd) {
                    if !out.offer(view.envelope(r.pt)) {
                        return Err(Ended::Stop);
                    }
                }
            }
            if odd.bad_levels > 0 {
                out.malformed();
                let name = &self.ctx.name;
                crate::warn_limited!(self.log, || {
                    format!(
                        "publisher {name}: {} malformed ladder entries skipped",
                        odd.bad_levels
                    )
                });
            }
            out.alive();
        }
        if let Some(c) = &r.initial_clk {
            self.initial_clk = Some(c.clone());
        }
        if let Some(c) = &r.clk {
            self.clk = Some(c.clone());
        }
        Ok(())
    }

    /// A failure status: what it means for this feed.
    fn on_status(&mut self, r: &Response, productive: bool) -> Result<Ended, Failure> {
        let name = &self.ctx.name;
        let code = r.error_code.as_deref().unwrap_or("UNKNOWN");
        let msg = r.error_message.as_deref().unwrap_or("no message");
        let what = format!("{code}: {msg}");
        match code {
            "NO_APP_KEY" | "INVALID_APP_KEY" => Err(upstream::rejected(
                name,
                format!("Betfair refused the application key from betfair.app_key_file ({what})"),
            )),
            "NOT_AUTHORIZED" => Err(upstream::rejected(
                name,
                format!("Betfair says this account may not use the Exchange Stream ({what})"),
            )),
            "NO_SESSION" | "INVALID_SESSION_INFORMATION" if self.creds.proven => {
                self.creds.expire();
                Ok(Ended::Lost {
                    why: format!("session ended ({what}); getting a new session token"),
                    productive: true,
                })
            }
            "NO_SESSION" | "INVALID_SESSION_INFORMATION" => Err(upstream::rejected(
                name,
                format!("Betfair refused {} ({what})", self.creds.describe()),
            )),
            "MAX_CONNECTION_LIMIT_EXCEEDED" => Err(Failure::new(
                exit::TEMPFAIL,
                anyhow::anyhow!(
                    "publisher {name}: Betfair refused the connection: the application key already has its maximum of stream connections open ({what}); close the others, the service manager will retry later"
                ),
            )),
            "INVALID_INPUT" | "INVALID_REQUEST" | "SUBSCRIPTION_LIMIT_EXCEEDED" => {
                Err(Failure::config(anyhow::anyhow!(
                    "publisher {name}: Betfair refused the market subscription ({what}); narrow betfair.event_types / countries / market_types / market_ids"
                )))
            }
            "INVALID_CLOCK" => {
                self.initial_clk = None;
                self.clk = None;
                Ok(Ended::Lost {
                    why: format!("refused the resume clock ({what}); resubscribing for a fresh image"),
                    productive: true,
                })
            }
            _ => Ok(Ended::Lost {
                why: format!("reported {what}"),
                productive,
            }),
        }
    }
}

/// Whether a line that did not parse may have been a market change: an
/// `mcm`, or something whose `op` cannot be told (not JSON, cut off). A
/// well-formed message of another op changes no market and can be skipped.
fn may_carry_changes(line: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Op {
        op: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Op>(line) {
        Ok(Op {
            op: Some(serde_json::Value::String(op)),
        }) => op == "mcm",
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            parse_endpoint("stream-api.betfair.com:443"),
            Ok(("stream-api.betfair.com".into(), 443))
        );
        assert_eq!(
            parse_endpoint("tls://127.0.0.1:4430"),
            Ok(("127.0.0.1".into(), 4430))
        );
        assert_eq!(parse_endpoint("tls://[::1]:99"), Ok(("::1".into(), 99)));
        assert_eq!(
            parse_endpoint("ssl://example.org"),
            Ok(("example.org".into(), 443))
        );
        assert!(parse_endpoint("https://x:1").is_err());
        assert!(parse_endpoint("tls://x:http").is_err());
    }
}
