//! The HTTP side: `/healthz`, `/readyz`, `/status`, `/metrics` (hyper, HTTP/1).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use super::Monitor;

/// Accepts connections until `stop`; each is served on its own task.
pub async fn serve(
    listener: tokio::net::TcpListener,
    monitor: Arc<Monitor>,
    stop: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("health: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let monitor = monitor.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let monitor = monitor.clone();
                async move { Ok::<_, Infallible>(route(&req, &monitor)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!("health: connection: {e}");
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
