//! The HTTP side: `/healthz`, `/readyz`, `/status`, `/metrics` (hyper, HTTP/1).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::Monitor;

/// Bounds on what clients may hold of the daemon.
///
/// The health endpoint is what operators and orchestrators look at when
/// something is wrong; a few idle or half-sent connections must not be able
/// to take it away. Without a header timeout hyper waits for a request's
/// head for ever, and every such connection keeps a file descriptor: with
/// `nofile` 64, sixty slow clients made `/healthz` itself time out.
/// A client that sends requests but never reads the answers is the same
/// starvation from the other side: hyper waits on the full socket (the
/// header timer does not run while an answer is being written), so 64 such
/// clients held every slot for as long as they stayed connected.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A connection that has not sent a whole request head within this is
    /// closed (also between keep-alive requests).
    pub header_read_timeout: Duration,
    /// A connection whose answer the kernel has refused to take (the client
    /// is not reading it) for this long is closed; see [`AnswerDeadline`].
    pub answer_write_timeout: Duration,
    /// Connections served at once; one more is closed at once rather than
    /// queued, since a queued one still holds its descriptor.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(5),
            answer_write_timeout: Duration::from_secs(5),
            max_connections: 64,
        }
    }
}

/// After a failed `accept` (typically EMFILE: out of descriptors), wait this
/// long before the next: the pending connection stays in the backlog and
/// would fail again at once, spinning the loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(250);

/// Accepts connections until `stop`; each is served on its own task,
/// within `limits`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    monitor: Arc<Monitor>,
    stop: CancellationToken,
    limits: Limits,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // One line per 10 s, not one per retry: a descriptor shortage lasts.
    let mut accept_log = crate::sink::RateLimitedLog::new(Duration::from_secs(10));
    let mut full_log = crate::sink::RateLimitedLog::new(Duration::from_secs(10));
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    crate::warn_limited!(accept_log, || format!(
                        "health: accept failed: {e}; retrying every {} ms",
                        ACCEPT_BACKOFF.as_millis()
                    ));
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    }
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            crate::warn_limited!(full_log, || format!(
                "health: {} connections open already; closing the one from {peer}",
                limits.max_connections
            ));
            drop(stream);
            continue;
        };
        let monitor = monitor.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = hyper::service::service_fn(move |req| {
                let monitor = monitor.clone();
                async move { Ok::<_, Infallible>(route(&req, &monitor)) }
            });
            // The timer is what makes hyper enforce header_read_timeout:
            // without one the setting is silently ignored.
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(
                    TokioIo::new(AnswerDeadline::new(stream, limits.answer_write_timeout)),
                    svc,
                )
                .await
            {
                tracing::debug!("health: connection from {peer}: {e}");
            }
        });
    }
}

/// A connection's socket that fails a write (so hyper drops the connection
/// and its slot) once an answer has waited `limit` for the client to take it.
///
/// The clock starts when the kernel first refuses bytes of an answer (its
/// buffers are full: the client is not reading) and stops when hyper's flush
/// completes, i.e. the whole answer was handed over. So a client reading
/// slowly but taking each answer within `limit` keeps its connection, and
/// one that only sends does not keep its slot for more than `limit` past
/// filling the buffers. Progress within an answer does not restart the
/// clock: a client trickling a few bytes at a time would otherwise hold a
/// slot for ever just the same. hyper has no write timeout of its own.
struct AnswerDeadline<S> {
    inner: S,
    limit: Duration,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> AnswerDeadline<S> {
    fn new(inner: S, limit: Duration) -> Self {
        AnswerDeadline {
            inner,
            limit,
            deadline: None,
        }
    }

    /// The socket would block: start the clock if it is not running, and
    /// have this task woken when it runs out (then the write fails).
    fn blocked<T>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<T>> {
        let limit = self.limit;
        let d = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match d.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the client took no answer within {} (not reading); closing",
                    humantime::format_duration(limit)
                ),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for AnswerDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for AnswerDeadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Pending => this.blocked(cx),
            ready => ready,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Ready(Ok(())) => {
                // hyper flushes once an answer's bytes are all written.
                this.deadline = None;
                Poll::Ready(Ok(()))
            }
            Poll::Pending => this.blocked(cx),
            err => err,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// One request → one answer; a pure function of the monitor's state.
pub fn route(req: &Request<Incoming>, monitor: &Monitor) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET\n",
        );
        // RFC 9110 15.5.6: a 405 names the methods that are allowed.
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    respond(req.uri().path(), monitor)
}

pub fn respond(path: &str, monitor: &Monitor) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    match path {
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n"),
        "/readyz" => {
            let s = monitor.snapshot();
            if s.ready {
                reply(StatusCode::OK, TEXT, "ready\n")
            } else {
                let mut body = String::from("not ready:\n");
                for r in &s.not_ready {
                    body.push_str("- ");
                    body.push_str(r);
                    body.push('\n');
                }
                reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, body)
            }
        }
        "/status" => match serde_json::to_vec_pretty(&monitor.snapshot()) {
            Ok(b) => reply(StatusCode::OK, "application/json", b),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                TEXT,
                format!("cannot render status: {e}\n"),
            ),
        },
        "/metrics" => match super::metrics::encode(&monitor.snapshot()) {
            Ok(text) => reply(StatusCode::OK, super::metrics::CONTENT_TYPE, text),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                TEXT,
                format!("cannot encode metrics: {e}\n"),
            ),
        },
        "/" => reply(
            StatusCode::OK,
            TEXT,
            "nbpy-health: /healthz /readyz /status /metrics\n",
        ),
        _ => reply(StatusCode::NOT_FOUND, TEXT, "not found\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    /// A daemon watching nothing, serving with `limits` on a free port.
    async fn server(limits: Limits) -> (std::net::SocketAddr, CancellationToken) {
        let stop = CancellationToken::new();
        let monitor = Monitor::start(&crate::config::Config::default(), &stop).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, monitor, stop.clone(), limits));
        (addr, stop)
    }

    /// Reads until the server closes the connection; false when it is
    /// still open after `wait` (a generous bound, not a speed assertion).
    fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
        s.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 512];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    fn healthz(addr: std::net::SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    /// A client that sends half a request head and then nothing is
    /// disconnected after the header timeout, so it cannot hold a
    /// descriptor for ever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partial_request_is_closed_after_the_header_timeout() {
        let (addr, stop) = server(Limits {
            header_read_timeout: Duration::from_millis(300),
            max_connections: 8,
            ..Limits::default()
        })
        .await;
        let closed = tokio::task::spawn_blocking(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            closed_within(&mut s, Duration::from_secs(10))
        })
        .await
        .unwrap();
        assert!(closed, "a half-sent request was kept open for 10 s");
        stop.cancel();
    }

    /// Past `max_connections`, a new connection is closed at once; the
    /// slots come back when the holders go, and /healthz answers again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_past_the_cap_are_closed_and_slots_come_back() {
        let (addr, stop) = server(Limits {
            header_read_timeout: Duration::from_secs(60),
            max_connections: 2,
            ..Limits::default()
        })
        .await;
        tokio::task::spawn_blocking(move || {
            let mut held: Vec<TcpStream> = (0..2)
                .map(|_| {
                    let mut s = TcpStream::connect(addr).unwrap();
                    s.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
                    s
                })
                .collect();
            // Both holders are accepted (they are answered nothing yet).
            for s in &mut held {
                assert!(!closed_within(s, Duration::from_millis(300)));
            }
            let mut third = TcpStream::connect(addr).unwrap();
            assert!(
                closed_within(&mut third, Duration::from_secs(10)),
                "a third connection was kept though the cap is 2"
            );
            drop(held);
            let t0 = std::time::Instant::now();
            loop {
                let answer = healthz(addr);
                if answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200") {
                    break;
                }
                assert!(t0.elapsed() < Duration::from_secs(10), "{answer:?}");
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .await
        .unwrap();
        stop.cancel();
    }

    /// Connects and sends pipelined requests until the socket takes no
    /// more: the daemon has stopped reading them, its answers unread here.
    fn pipeline_without_reading(addr: std::net::SocketAddr) -> TcpStream {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_nonblocking(true).unwrap();
        let burst = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(500);
        let mut refused = 0;
        while refused < 10 {
            match s.write(&burst) {
                Ok(_) => refused = 0,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    refused += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                // Already closed by the daemon: it holds no slot.
                Err(_) => break,
            }
        }
        s
    }

    /// Clients that pipeline requests and never read the answers hold every
    /// slot; once an answer has waited `answer_write_timeout` their
    /// connections are closed, so /healthz answers while they stay
    /// connected (the header timeout, 60 s here, does not run meanwhile).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn clients_that_never_read_their_answers_lose_their_slots() {
        let (addr, stop) = server(Limits {
            header_read_timeout: Duration::from_secs(60),
            answer_write_timeout: Duration::from_millis(300),
            max_connections: 4,
        })
        .await;
        tokio::task::spawn_blocking(move || {
            let held: Vec<TcpStream> = (0..4).map(|_| pipeline_without_reading(addr)).collect();
            let t0 = std::time::Instant::now();
            loop {
                let answer = healthz(addr);
                if answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200") {
                    break;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "/healthz not answered in 10 s while {} clients do not read: {answer:?}",
                    held.len()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            drop(held);
        })
        .await
        .unwrap();
        stop.cancel();
    }

    /// A 405 says which methods are allowed (RFC 9110 15.5.6).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_405_names_the_allowed_methods() {
        let (addr, stop) = server(Limits::default()).await;
        let answer = tokio::task::spawn_blocking(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"POST /healthz HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out
        })
        .await
        .unwrap();
        assert!(answer.contains(" 405 "), "{answer:?}");
        assert!(
            answer
                .lines()
                .any(|l| l.eq_ignore_ascii_case("allow: GET, HEAD")),
            "{answer:?}"
        );
        stop.cancel();
    }
}
