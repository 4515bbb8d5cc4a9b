//! Local servers that speak the venues' real protocols on 127.0.0.1:0:
//! HTTP/1.1 with a chunked streaming body (OANDA pricing stream, X filtered
//! stream and its rules endpoint), the Betfair Exchange Stream (CRLF JSON
//! over TLS with a throw-away certificate) and Betfair's certificate login
//! (HTTPS that requires a client certificate). They stand in for the
//! internet, which tests cannot reach; everything on our side is real.
//!
//! A server replays a script per connection. Timed steps (`Every`) pace the
//! *server* like a venue's heartbeat would; the tests never sleep to
//! synchronise, they poll what the servers and the feed observed.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::rustls::{self, pki_types};
use tokio_rustls::TlsAcceptor;

/// One step of a scripted response.
#[derive(Clone, Debug)]
pub enum Step {
    /// A line (the terminator is added: `\n` for HTTP, `\r\n` for Betfair)
    /// in one chunk.
    Line(String),
    /// Raw bytes in one chunk (to split a line across chunks).
    Raw(String),
    /// `line` `count` times, `every` apart: a venue's heartbeat.
    Every {
        line: String,
        every: Duration,
        count: usize,
    },
    /// Say nothing more and keep the connection open until the client leaves.
    Hold,
    /// End the response / close the connection.
    Close,
    /// Drop the connection as it is: an HTTP body is cut off without its
    /// last chunk.
    Abort,
}

pub fn line(s: impl Into<String>) -> Step {
    Step::Line(s.into())
}

// ---------------------------------------------------------------- HTTP

#[derive(Clone, Debug, Default)]
pub struct Request {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> Json {
        serde_json::from_slice(&self.body).unwrap_or(Json::Null)
    }
}

pub enum Reply {
    Full {
        status: u16,
        body: String,
    },
    /// 200 with a chunked body played from the steps.
    Stream(Vec<Step>),
}

type Handler = dyn Fn(&Request, usize) -> Reply + Send + Sync;

/// HTTP/1.1 server: each request is handled by `handler(request, n)`, `n`
/// counting requests from 0.
pub struct HttpServer {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Request>>>,
    /// Streaming responses that ended because the client went away.
    pub dropped: Arc<Mutex<usize>>,
}

impl HttpServer {
    pub async fn start(handler: impl Fn(&Request, usize) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let dropped = Arc::new(Mutex::new(0));
        let handler: Arc<Handler> = Arc::new(handler);
        let (reqs, drops) = (requests.clone(), dropped.clone());
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (handler, reqs, drops) = (handler.clone(), reqs.clone(), drops.clone());
                tokio::spawn(async move {
                    let _ = serve_http(sock, handler, reqs, drops).await;
                });
            }
        });
        HttpServer {
            addr,
            requests,
            dropped,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests_to(&self, path_prefix: &str) -> Vec<Request> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.target.starts_with(path_prefix))
            .cloned()
            .collect()
    }
}

async fn read_head<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> Option<Request> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            buf.drain(..end + 4);
            let mut lines = head.split("\r\n");
            let mut first = lines.next()?.split(' ');
            let method = first.next()?.to_string();
            let target = first.next()?.to_string();
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect();
            let mut req = Request {
                method,
                target,
                headers,
                body: Vec::new(),
            };
            let len: usize = req
                .header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            while buf.len() < len {
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            req.body = buf.drain(..len).collect();
            return Some(req);
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn serve_http<S: AsyncRead + AsyncWrite + Unpin>(
    mut sock: S,
    handler: Arc<Handler>,
    reqs: Arc<Mutex<Vec<Request>>>,
    drops: Arc<Mutex<usize>>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    while let Some(req) = read_head(&mut sock, &mut buf).await {
        let n = {
            let mut r = reqs.lock().unwrap();
            r.push(req.clone());
            r.len() - 1
        };
        match handler(&req, n) {
            Reply::Full { status, body } => {
                let head = format!(
                    "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    reason(status),
                    body.len()
                );
                sock.write_all(head.as_bytes()).await?;
                sock.write_all(body.as_bytes()).await?;
                sock.flush().await?;
            }
            Reply::Stream(steps) => {
                sock.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
                )
                .await?;
                sock.flush().await?;
                let chunk = |data: &str| format!("{:x}\r\n{data}\r\n", data.len());
                for step in steps {
                    match step {
                        Step::Line(l) => {
                            sock.write_all(chunk(&format!("{l}\n")).as_bytes()).await?
                        }
                        Step::Raw(r) => sock.write_all(chunk(&r).as_bytes()).await?,
                        Step::Every { line, every, count } => {
                            for _ in 0..count {
                                tokio::time::sleep(every).await;
                                sock.write_all(chunk(&format!("{line}\n")).as_bytes())
                                    .await?;
                                sock.flush().await?;
                            }
                        }
                        Step::Hold => {
                            sock.flush().await?;
                            hold(&mut sock).await;
                            *drops.lock().unwrap() += 1;
                            return Ok(());
                        }
                        Step::Close => break,
                        Step::Abort => return Ok(()),
                    }
                    sock.flush().await?;
                }
                sock.write_all(b"0\r\n\r\n").await?;
                sock.flush().await?;
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Reads and discards until the peer closes.
async fn hold<S: AsyncRead + Unpin>(s: &mut S) {
    let mut b = [0u8; 1024];
    while let Ok(n) = s.read(&mut b).await {
        if n == 0 {
            break;
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        _ => "Error",
    }
}

// ---------------------------------------------------------------- TLS

/// A throw-away CA with a server certificate for 127.0.0.1/localhost and a
/// client certificate, all written as PEM files into `dir`.
pub struct Pki {
    pub ca_pem: PathBuf,
    pub server_chain: Vec<pki_types::CertificateDer<'static>>,
    pub server_key: Vec<u8>,
    pub ca_der: pki_types::CertificateDer<'static>,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path, name: &str) -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose, SanType,
        };
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, format!("nbpy test CA {name}"));
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = ca.self_signed(&ca_key).unwrap();

        let server_key = KeyPair::generate().unwrap();
        let mut sp = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        sp.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server = sp.signed_by(&server_key, &ca, &ca_key).unwrap();

        let client_key = KeyPair::generate().unwrap();
        let mut cp = CertificateParams::new(Vec::<String>::new()).unwrap();
        cp.distinguished_name
            .push(DnType::CommonName, "nbpy test client");
        cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client = cp.signed_by(&client_key, &ca, &ca_key).unwrap();

        let ca_pem = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca_pem, ca.pem()).unwrap();
        let client_cert = dir.join(format!("{name}-client.pem"));
        std::fs::write(&client_cert, client.pem()).unwrap();
        let client_key_path = dir.join(format!("{name}-client.key"));
        std::fs::write(&client_key_path, client_key.serialize_pem()).unwrap();
        Pki {
            ca_pem,
            server_chain: vec![server.der().clone()],
            server_key: server_key.serialize_der(),
            ca_der: ca.der().clone(),
            client_cert,
            client_key: client_key_path,
        }
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    pub fn acceptor(&self, require_client_cert: bool) -> TlsAcceptor {
        let key = pki_types::PrivateKeyDer::Pkcs8(self.server_key.clone().into());
        let builder = rustls::ServerConfig::builder_with_provider(Self::provider())
            .with_safe_default_protocol_versions()
            .unwrap();
        let cfg = if require_client_cert {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.ca_der.clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                Self::provider(),
            )
            .build()
            .unwrap();
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(self.server_chain.clone(), key)
                .unwrap()
        } else {
            builder
                .with_no_client_auth()
                .with_single_cert(self.server_chain.clone(), key)
                .unwrap()
        };
        TlsAcceptor::from(Arc::new(cfg))
    }
}

// ---------------------------------------------------------------- Betfair login

/// Betfair's certificate login: HTTPS that requires a client certificate
/// from the test CA; `answer(request, n)` gives the JSON body.
pub struct LoginServer {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Request>>>,
}

impl LoginServer {
    pub async fn start(
        pki: &Pki,
        answer: impl Fn(&Request, usize) -> String + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = pki.acceptor(true);
        let requests = Arc::new(Mutex::new(Vec::new()));
        let reqs = requests.clone();
        let answer = Arc::new(answer);
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (acceptor, reqs, answer) = (acceptor.clone(), reqs.clone(), answer.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(sock).await else {
                        return;
                    };
                    let handler: Arc<Handler> =
                        Arc::new(move |r: &Request, n: usize| Reply::Full {
                            status: 200,
                            body: answer(r, n),
                        });
                    let _ = serve_http(tls, handler, reqs, Arc::new(Mutex::new(0))).await;
                });
            }
        });
        LoginServer { addr, requests }
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}/api/certlogin", self.addr.port())
    }

    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

// ---------------------------------------------------------------- Betfair stream

/// What the Betfair server saw on one connection.
#[derive(Clone, Debug, Default)]
pub struct BfConn {
    pub auth: Option<Json>,
    pub subscription: Option<Json>,
    pub ended_by_client: bool,
}

/// How the server answers an `authentication`.
pub enum AuthReply {
    /// A SUCCESS status; the subscription follows.
    Accept,
    /// This status, then the connection is closed.
    Refuse(Json),
    /// These steps instead of any status: a server that never answers
    /// the authentication properly.
    Play(Vec<Step>),
}

impl From<Option<Json>> for AuthReply {
    fn from(status: Option<Json>) -> Self {
        status.map_or(AuthReply::Accept, AuthReply::Refuse)
    }
}

pub type AuthCheck = dyn Fn(usize, &Json) -> AuthReply + Send + Sync;
pub type SubAnswer = dyn Fn(usize, &Json) -> Option<Json> + Send + Sync;
pub type StreamScript = dyn Fn(usize, &Json) -> Vec<Step> + Send + Sync;

/// The Exchange Stream: greets with `connection`, checks `authentication`
/// with `auth(n, msg)` (None = accept, Some(status) = send that status and
/// close, or an [`AuthReply`]), answers the `marketSubscription` with a
/// SUCCESS status (or what `sub_answer` gives, see [`Self::start_with`])
/// and then plays `script(n, subscription)`.
pub struct BetfairServer {
    pub addr: SocketAddr,
    pub conns: Arc<Mutex<Vec<BfConn>>>,
}

impl BetfairServer {
    pub async fn start<A: Into<AuthReply>>(
        pki: &Pki,
        auth: impl Fn(usize, &Json) -> A + Send + Sync + 'static,
        script: impl Fn(usize, &Json) -> Vec<Step> + Send + Sync + 'static,
    ) -> Self {
        Self::start_with(pki, auth, |_, _| None, script).await
    }

    /// As [`Self::start`], but `sub_answer(n, subscription)` may replace
    /// the subscription's SUCCESS status with another (a refusal).
    pub async fn start_with<A: Into<AuthReply>>(
        pki: &Pki,
        auth: impl Fn(usize, &Json) -> A + Send + Sync + 'static,
        sub_answer: impl Fn(usize, &Json) -> Option<Json> + Send + Sync + 'static,
        script: impl Fn(usize, &Json) -> Vec<Step> + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = pki.acceptor(false);
        let conns = Arc::new(Mutex::new(Vec::new()));
        let auth: Arc<AuthCheck> = Arc::new(move |n, a| auth(n, a).into());
        let sub_answer: Arc<SubAnswer> = Arc::new(sub_answer);
        let script: Arc<StreamScript> = Arc::new(script);
        let c = conns.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (acceptor, conns, auth, sub_answer, script) = (
                    acceptor.clone(),
                    c.clone(),
                    auth.clone(),
                    sub_answer.clone(),
                    script.clone(),
                );
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(sock).await else {
                        return;
                    };
                    let n = {
                        let mut c = conns.lock().unwrap();
                        c.push(BfConn::default());
                        c.len() - 1
                    };
                    let _ = serve_betfair(tls, n, conns, auth, sub_answer, script).await;
                });
            }
        });
        BetfairServer { addr, conns }
    }

    pub fn url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.addr.port())
    }

    pub fn connections(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    pub fn conn(&self, n: usize) -> BfConn {
        self.conns.lock().unwrap()[n].clone()
    }
}

struct CrlfReader {
    buf: Vec<u8>,
}

impl CrlfReader {
    async fn next<S: AsyncRead + Unpin>(&mut self, s: &mut S) -> Option<Json> {
        loop {
            if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..p + 2).take(p).collect();
                return serde_json::from_slice(&line).ok();
            }
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

async fn send_line<S: AsyncWrite + Unpin>(s: &mut S, line: &str) -> std::io::Result<()> {
    s.write_all(line.as_bytes()).await?;
    s.write_all(b"\r\n").await?;
    s.flush().await
}

async fn serve_betfair<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    n: usize,
    conns: Arc<Mutex<Vec<BfConn>>>,
    auth: Arc<AuthCheck>,
    sub_answer: Arc<SubAnswer>,
    script: Arc<StreamScript>,
) -> std::io::Result<()> {
    send_line(
        &mut s,
        &format!(r#"{{"op":"connection","connectionId":"002-051134157842-{n}"}}"#),
    )
    .await?;
    let mut r = CrlfReader { buf: Vec::new() };
    let Some(a) = r.next(&mut s).await else {
        return Ok(());
    };
    conns.lock().unwrap()[n].auth = Some(a.clone());
    match auth(n, &a) {
        AuthReply::Accept => {}
        AuthReply::Refuse(status) => {
            send_line(&mut s, &status.to_string()).await?;
            let _ = s.shutdown().await;
            return Ok(());
        }
        AuthReply::Play(steps) => return play(s, n, &conns, steps).await,
    }
    send_line(
        &mut s,
        r#"{"op":"status","id":1,"statusCode":"SUCCESS","connectionClosed":false,"connectionsAvailable":9}"#,
    )
    .await?;
    let Some(sub) = r.next(&mut s).await else {
        return Ok(());
    };
    conns.lock().unwrap()[n].subscription = Some(sub.clone());
    let id = sub["id"].as_i64().unwrap_or(0);
    let answer = sub_answer(n, &sub).map_or_else(
        || {
            format!(
                r#"{{"op":"status","id":{id},"statusCode":"SUCCESS","connectionClosed":false}}"#
            )
        },
        |a| a.to_string(),
    );
    send_line(&mut s, &answer).await?;
    play(s, n, &conns, script(n, &sub)).await
}

/// Plays `steps` on one connection, then closes it.
async fn play<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    n: usize,
    conns: &Mutex<Vec<BfConn>>,
    steps: Vec<Step>,
) -> std::io::Result<()> {
    for step in steps {
        match step {
            Step::Line(l) => send_line(&mut s, &l).await?,
            Step::Raw(r) => {
                s.write_all(r.as_bytes()).await?;
                s.flush().await?
            }
            Step::Every { line, every, count } => {
                for _ in 0..count {
                    tokio::time::sleep(every).await;
                    send_line(&mut s, &line).await?;
                }
            }
            Step::Hold => {
                hold(&mut s).await;
                conns.lock().unwrap()[n].ended_by_client = true;
                return Ok(());
            }
            Step::Close => break,
            Step::Abort => return Ok(()),
        }
    }
    let _ = s.shutdown().await;
    Ok(())
}

/// Polls `f` until it is true; panics with `what` past the deadline.
pub async fn until(what: &str, deadline: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        if t0.elapsed() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
