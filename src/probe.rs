//! `nbpy health-check`: a one-shot HTTP probe of the health endpoint.
//!
//! Container images have no curl (the runtime image is kept to the
//! binaries), yet Docker's `HEALTHCHECK` and compose's `service_healthy`
//! need a command that exits 0 when the service answers. This is that
//! command: one `GET`, plain HTTP/1.0 over std sockets, a bounded wait, exit 0
//! on a 2xx and `EX_UNAVAILABLE` otherwise.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// The URL to probe for a `[health] listen` address: a wildcard bind is
/// probed on loopback, since that is where the probe runs.
pub fn default_url(listen: &str) -> String {
    let addr = match listen.rsplit_once(':') {
        Some(("0.0.0.0", port)) | Some(("", port)) => format!("127.0.0.1:{port}"),
        Some(("[::]", port)) => format!("[::1]:{port}"),
        _ => listen.to_string(),
    };
    format!("http://{addr}/healthz")
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{0}: only http://HOST:PORT/PATH URLs are supported")]
    Url(String),
    #[error("{url}: {error}")]
    Io { url: String, error: std::io::Error },
    #[error("{url}: answered {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: not an HTTP response")]
    Garbled { url: String },
    /// Connected (or trying to), but nothing came back in time: a hung
    /// daemon. Said plainly; the OS's words for a timed-out socket read
    /// are "Resource temporarily unavailable (os error 11)".
    #[error("{url}: no answer within {}", humantime::format_duration(*.timeout))]
    NoAnswer { url: String, timeout: Duration },
}

/// `GET url`; the status code when it is 2xx.
pub fn check(url: &str, timeout: Duration) -> Result<u16, ProbeError> {
    let parsed = reqwest::Url::parse(url).map_err(|_| ProbeError::Url(url.into()))?;
    let host = match (parsed.scheme(), parsed.host_str()) {
        ("http", Some(h)) => h.to_string(),
        _ => return Err(ProbeError::Url(url.into())),
    };
    let port = parsed.port_or_known_default().unwrap_or(80);
    let io = |error: std::io::Error| match error.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ProbeError::NoAnswer {
            url: url.into(),
            timeout,
        },
        _ => ProbeError::Io {
            url: url.into(),
            error,
        },
    };
    let addr = (host.trim_start_matches('[').trim_end_matches(']'), port)
        .to_socket_addrs()
        .map_err(io)?
        .next()
        .ok_or_else(|| ProbeError::Url(url.into()))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    let path = match parsed.query() {
        Some(q) => format!("{}?{q}", parsed.path()),
        None => parsed.path().to_string(),
    };
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n").as_bytes())
        .map_err(io)?;
    // "HTTP/1.x NNN": the status is all we need.
    let mut head = [0u8; 12];
    s.read_exact(&mut head).map_err(io)?;
    let status = std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|_| head.starts_with(b"HTTP/1."))
        .ok_or_else(|| ProbeError::Garbled { url: url.into() })?;
    if (200..300).contains(&status) {
        Ok(status)
    } else {
        Err(ProbeError::Status {
            url: url.into(),
            status,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A real one-request HTTP server on loopback answering `status`.
    fn serve_once(status: &'static str) -> (String, std::thread::JoinHandle<String>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/healthz", l.local_addr().unwrap());
        let h = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut buf = [0u8; 1024];
            let n = c.read(&mut buf).unwrap();
            c.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                .unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        (url, h)
    }

    #[test]
    fn ok_on_2xx_and_sends_the_path() {
        let (url, h) = serve_once("200 OK");
        assert_eq!(check(&url, Duration::from_secs(5)).unwrap(), 200);
        assert!(h.join().unwrap().starts_with("GET /healthz HTTP/1.0\r\n"));
    }

    #[test]
    fn fails_on_503_and_on_nothing_listening() {
        let (url, h) = serve_once("503 Service Unavailable");
        let e = check(&url, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, ProbeError::Status { status: 503, .. }), "{e}");
        h.join().unwrap();
        // The same port, now closed.
        let e = check(&url, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, ProbeError::Io { .. }), "{e}");
        assert!(matches!(
            check("https://127.0.0.1:1/x", Duration::from_secs(1)),
            Err(ProbeError::Url(_))
        ));
    }

    /// A daemon that accepts (the kernel does, from the backlog) but never
    /// answers: the error says so in words, not as EAGAIN.
    #[test]
    fn a_hung_server_is_no_answer_within_the_timeout() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/healthz", l.local_addr().unwrap());
        let e = check(&url, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, ProbeError::NoAnswer { .. }), "{e}");
        assert!(e.to_string().ends_with("no answer within 300ms"), "{e}");
        drop(l);
    }

    #[test]
    fn wildcard_listen_is_probed_on_loopback() {
        assert_eq!(default_url("0.0.0.0:9184"), "http://127.0.0.1:9184/healthz");
        assert_eq!(default_url("[::]:9184"), "http://[::1]:9184/healthz");
        assert_eq!(
            default_url("127.0.0.1:9184"),
            "http://127.0.0.1:9184/healthz"
        );
    }
}
