//! The HTTP side: `/healthz`, `/readyz`, `/status`, `/metrics` (hyper, HTTP/1).

use std::convert::Infallible;
use std::sync::Arc;
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
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A connection that has not sent a whole request head within this is
    /// closed (also between keep-alive requests).
    pub header_read_timeout: Duration,
    /// Connections served at once; one more is closed at once rather than
    /// queued, since a queued one still holds its descriptor.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(5),
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
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!("health: connection from {peer}: {e}");
            }
        });
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
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET\n",
        );
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
}
