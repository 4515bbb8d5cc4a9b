//! The health daemon against real processes: a synthetic publisher and a
//! subscriber over real ZeroMQ, a real influxd, `nbpy-health` as the binary,
//! spoken to over HTTP. Grafana cannot run here, so one test stands up a
//! small HTTP server answering `/api/health` the way Grafana does.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nbpy::health::report::{State, Status};
use nix::sys::signal::Signal;

struct Health {
    base: String,
    http: reqwest::Client,
}

impl Health {
    async fn get(&self, path: &str) -> (u16, String) {
        match self.http.get(format!("{}{path}", self.base)).send().await {
            Ok(r) => {
                let code = r.status().as_u16();
                (code, r.text().await.unwrap_or_default())
            }
            Err(_) => (0, String::new()),
        }
    }

    async fn status(&self) -> Option<Status> {
        let (code, body) = self.get("/status").await;
        (code == 200).then(|| serde_json::from_str(&body).expect("status JSON"))
    }

    /// Polls `/status` until `pred` holds; panics with the last picture past the deadline.
    async fn wait(
        &self,
        what: &str,
        deadline: Duration,
        pred: impl Fn(&Status) -> bool,
    ) -> Duration {
        let t0 = Instant::now();
        let mut last = None;
        loop {
            if let Some(s) = self.status().await {
                if pred(&s) {
                    return t0.elapsed();
                }
                last = Some(s);
            }
            if t0.elapsed() > deadline {
                panic!("{what}: not within {deadline:?}; last /status:\n{last:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn publisher_state(s: &Status, name: &str) -> Option<State> {
    s.publishers
        .iter()
        .find(|p| p.name == name)
        .map(|p| p.state)
}

fn subscriber_state(s: &Status, name: &str) -> Option<State> {
    s.subscribers
        .iter()
        .find(|p| p.name == name)
        .map(|p| p.state)
}

/// Config with one publisher, one subscriber, the daemon on a free port.
fn config(env: &Env, grafana: Option<&str>) -> (String, String, String) {
    let ep = free_endpoint();
    let port = nbpy::backend::free_port().unwrap();
    let grafana = grafana
        .map(|u| format!("[grafana]\nurl = \"{u}\"\n"))
        .unwrap_or_default();
    let cfg = env.config(&format!(
        r#"
{grafana}
[health]
listen = "127.0.0.1:{port}"
poll_interval = "500ms"

[publishers.synth]
feed = "synthetic"
endpoint = "{ep}"
rate = 500
instruments = ["BTC/USD", "EUR_USD"]

[subscribers.main]
connect = ["{ep}"]
stats_interval = "1s"
"#
    ));
    (
        cfg.to_str().unwrap().to_string(),
        format!("http://127.0.0.1:{port}"),
        format!("127.0.0.1:{port}"),
    )
}

fn start_health(env: &Env, cfg: &str, base: &str) -> (Proc, Health) {
    start_health_with(env, cfg, base, &[])
}

/// [`start_health`] with `NBPY_*` settings for the daemon alone.
fn start_health_with(env: &Env, cfg: &str, base: &str, envs: &[(&str, &str)]) -> (Proc, Health) {
    let p = env.spawn(
        "nbpy-health",
        &["--config", cfg, "--log-format", "text"],
        envs,
    );
    p.wait_log("health: serving on", Duration::from_secs(20));
    let h = Health {
        base: base.to_string(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap(),
    };
    (p, h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_publisher_shows_down_and_recovers_and_readyz_follows() {
    let env = Env::start().await;
    let (cfg, base, _) = config(&env, None);
    let (_health, h) = start_health(&env, &cfg, &base);
    assert_eq!(h.get("/healthz").await.0, 200);
    // Nothing runs yet: not ready, and it says why.
    let (code, body) = h.get("/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("publisher synth"), "{body}");

    let mut publisher = env.spawn("nbpy-publisher", &["--config", &cfg, "synth"], &[]);
    let mut subscriber = env.spawn("nbpy-subscriber", &["--config", &cfg, "main"], &[]);
    h.wait("everything up", Duration::from_secs(60), |s| s.ready)
        .await;
    assert_eq!(h.get("/readyz").await.0, 200);
    let s = h.status().await.unwrap();
    let p = &s.publishers[0];
    assert_eq!(p.state, State::Up);
    assert!(p.received > 0 && p.last_message_age_s.is_some());
    // Last-message age per feed and instrument.
    let instruments: std::collections::BTreeSet<&str> =
        p.topics.iter().map(|t| t.instrument.as_str()).collect();
    assert_eq!(
        instruments.into_iter().collect::<Vec<_>>(),
        ["BTC/USD", "EUR_USD"]
    );
    assert_eq!(p.topics.len(), 10);
    assert!(p.topics.iter().all(|t| t.last_message_age_s.is_some()));
    assert_eq!(s.subscribers[0].state, State::Up);
    assert_eq!(s.influxdb.state, State::Up);
    // The subscriber's own counters come through as it writes them.
    h.wait("subscriber counters", Duration::from_secs(30), |s| {
        s.subscribers[0].counter("written").is_some_and(|w| w > 0.0)
    })
    .await;

    // Kill the publisher outright: no goodbye on the bus.
    publisher.signal(Signal::SIGKILL);
    publisher.wait(Duration::from_secs(10));
    let took = h
        .wait("publisher down", Duration::from_secs(10), |s| {
            publisher_state(s, "synth") == Some(State::Down)
        })
        .await;
    eprintln!("killed publisher reported down after {took:?}");
    let (code, body) = h.get("/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("publisher synth down"), "{body}");

    // Back again: up, ready, and the restart counted (a new epoch).
    let _publisher = env.spawn("nbpy-publisher", &["--config", &cfg, "synth"], &[]);
    let took = h
        .wait("publisher up again", Duration::from_secs(20), |s| {
            publisher_state(s, "synth") == Some(State::Up) && s.publishers[0].restarts >= 1
        })
        .await;
    eprintln!("restarted publisher reported up after {took:?}");
    h.wait("ready again", Duration::from_secs(30), |s| s.ready)
        .await;
    assert_eq!(h.get("/readyz").await.0, 200);

    // A subscriber that stops writing its counters is down too.
    subscriber.signal(Signal::SIGKILL);
    subscriber.wait(Duration::from_secs(10));
    h.wait("subscriber down", Duration::from_secs(30), |s| {
        subscriber_state(s, "main") == Some(State::Down)
    })
    .await;
    let (code, body) = h.get("/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("subscriber main down"), "{body}");
    // And the bus messages pile up unstored: write lag grows.
    h.wait("write lag", Duration::from_secs(30), |s| {
        s.publishers[0].write_lag_messages.unwrap_or(0) > 0
            && s.publishers[0].write_lag_s.unwrap_or(0.0) > 0.0
    })
    .await;
}

/// `promtool check metrics` on what `/metrics` serves. promtool comes with
/// Debian's `prometheus` package; without it the test fails, unless
/// NBPY_ALLOW_SKIP=1 says a skip is acceptable here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_check() {
    let promtool = ["/usr/bin/promtool", "promtool"]
        .into_iter()
        .find(|p| Command::new(p).arg("--version").output().is_ok());
    let Some(promtool) = promtool else {
        if std::env::var("NBPY_ALLOW_SKIP").as_deref() == Ok("1") {
            eprintln!("SKIP: promtool not installed (NBPY_ALLOW_SKIP=1)");
            return;
        }
        panic!(
            "promtool is not installed (apt-get install prometheus); set NBPY_ALLOW_SKIP=1 to skip"
        );
    };
    let env = Env::start().await;
    let (cfg, base, _) = config(&env, None);
    let (_health, h) = start_health(&env, &cfg, &base);
    let _publisher = env.spawn("nbpy-publisher", &["--config", &cfg, "synth"], &[]);
    let _subscriber = env.spawn("nbpy-subscriber", &["--config", &cfg, "main"], &[]);
    h.wait("everything up", Duration::from_secs(60), |s| s.ready)
        .await;
    let (code, text) = h.get("/metrics").await;
    assert_eq!(code, 200);
    // Every family is there with real values, not just declared.
    for needle in [
        "nbpy_ready 1",
        "nbpy_component_up{kind=\"publisher\",name=\"synth\"} 1",
        "nbpy_component_up{kind=\"subscriber\",name=\"main\"} 1",
        "nbpy_component_up{kind=\"influxdb\",name=\"influxdb\"} 1",
        "nbpy_publisher_messages_received_total{publisher=\"synth\"}",
        "nbpy_feed_last_message_age_seconds{publisher=\"synth\",topic=\"synthetic.ticker.BTC/USD\",instrument=\"BTC/USD\"}",
        "nbpy_subscriber_reported{subscriber=\"main\",field=\"written\"}",
        "nbpy_publisher_write_lag_messages{publisher=\"synth\"}",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- metrics ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Grafana cannot run here: this answers `GET /api/health` with the body
/// Grafana gives (`{"commit":…,"database":"ok","version":…}`) until stopped.
fn fake_grafana() -> (String, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    std::thread::spawn(move || {
        while !stopped.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    let mut buf = [0u8; 2048];
                    let n = s.read(&mut buf).unwrap_or(0);
                    let req = String::from_utf8_lossy(&buf[..n]);
                    let (status, body) = if req.starts_with("GET /api/health ") {
                        (
                            "200 OK",
                            r#"{"commit":"abc123","database":"ok","version":"10.4.2"}"#,
                        )
                    } else {
                        ("404 Not Found", r#"{"message":"Not found"}"#)
                    };
                    let _ = write!(
                        s,
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    (url, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_is_reported_but_not_needed_for_readiness_and_nbpy_status_shows_it_all() {
    let env = Env::start().await;
    let (grafana, grafana_stop) = fake_grafana();
    let (cfg, base, _) = config(&env, Some(&grafana));
    let (_health, h) = start_health(&env, &cfg, &base);
    let _publisher = env.spawn("nbpy-publisher", &["--config", &cfg, "synth"], &[]);
    let _subscriber = env.spawn("nbpy-subscriber", &["--config", &cfg, "main"], &[]);
    h.wait("ready with grafana up", Duration::from_secs(60), |s| {
        s.ready && s.grafana.as_ref().is_some_and(|g| g.state == State::Up)
    })
    .await;
    let s = h.status().await.unwrap();
    assert!(s
        .grafana
        .as_ref()
        .and_then(|g| g.detail.as_deref())
        .is_some_and(|d| d.contains("10.4.2")));

    // The table, from the daemon.
    let out = Command::new(bin_path("nbpy"))
        .args(["--config", &cfg, "status"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("from nbpy-health"), "{text}");
    assert!(text.starts_with("# ") && text.contains("\nREADY"), "{text}");
    // The publisher's gaps are the monitor's own, and the table says so.
    for needle in [
        "synth ",
        "main ",
        "grafana ",
        "synthetic.ticker.EUR_USD",
        "TAP GAPS",
        "not pipeline loss",
    ] {
        assert!(text.contains(needle), "{needle:?} missing:\n{text}");
    }

    // Grafana gone: reported down, the appliance still ready.
    grafana_stop.store(true, Ordering::Relaxed);
    h.wait("grafana down", Duration::from_secs(20), |s| {
        s.grafana.as_ref().is_some_and(|g| g.state == State::Down)
    })
    .await;
    assert_eq!(h.get("/readyz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbpy_status_probes_directly_when_no_daemon_answers() {
    let env = Env::start().await;
    let (cfg, _base, listen) = config(&env, None);
    let publisher = env.spawn("nbpy-publisher", &["--config", &cfg, "synth"], &[]);
    let subscriber = env.spawn("nbpy-subscriber", &["--config", &cfg, "main"], &[]);
    subscriber.wait_log("ready", Duration::from_secs(30));
    // Poll until the subscriber has written its counters once.
    let t0 = Instant::now();
    while count_pipeline(&env).await == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no nbpy_pipeline point"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = Command::new(bin_path("nbpy"))
        .args(["--config", &cfg, "status", "--json"])
        .output()
        .unwrap();
    let s: Status = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(s.ready, "{s:#?}");
    assert!(out.status.success());
    assert_eq!(s.publishers[0].state, State::Up);
    assert!(s.publishers[0].received > 0);

    // A hung daemon (its port takes connections, nothing answers) is no
    // reason to give up: the picture is probed directly, and says why.
    let hung = std::net::TcpListener::bind(&listen).unwrap();
    let out = Command::new(bin_path("nbpy"))
        .args(["--config", &cfg, "status"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!(
            "nbpy-health at {listen} did not answer within 3 s; probed directly"
        )),
        "{text}"
    );
    drop(hung);

    // And with the publisher gone, it says so and exits non-zero.
    drop(publisher);
    let out = Command::new(bin_path("nbpy"))
        .args(["--config", &cfg, "status"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(nbpy::exit::UNAVAILABLE), "{text}");
    assert!(
        text.contains("NOT READY") && text.contains("publisher synth down"),
        "{text}"
    );
}

async fn count_pipeline(env: &Env) -> u64 {
    env.client
        .query_number("SELECT count(\"received\") FROM \"tick\".\"default\".\"nbpy_pipeline\"")
        .await
        .unwrap_or(0.0) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_counted_not_fatal() {
    use zeromq::{Socket, SocketSend, ZmqMessage};
    let env = Env::start().await;
    let ep = free_endpoint();
    let port = nbpy::backend::free_port().unwrap();
    let cfg = env.config(&format!(
        r#"
[health]
listen = "127.0.0.1:{port}"
poll_interval = "500ms"

[publishers.junk]
endpoint = "{ep}"
"#
    ));
    let cfg = cfg.to_str().unwrap().to_string();
    // A publisher that speaks ZeroMQ but sends nonsense.
    let mut sock = zeromq::PubSocket::new();
    sock.bind(&ep).await.unwrap();
    let (health, h) = start_health(&env, &cfg, &format!("http://127.0.0.1:{port}"));
    let t0 = Instant::now();
    loop {
        let mut two = ZmqMessage::from("synthetic.ticker.X");
        two.push_back("{not json".into());
        let mut three = ZmqMessage::from("a");
        three.push_back("b".into());
        three.push_back("c".into());
        for m in [two, three, ZmqMessage::from("\u{1}\u{1}")] {
            sock.send(m).await.unwrap();
        }
        let s = h.status().await.unwrap();
        if s.publishers[0].malformed >= 3 {
            assert_eq!(s.publishers[0].state, State::Up, "connected and sending");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{s:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(h.get("/healthz").await.0, 200);
    assert!(health
        .log_text()
        .contains("malformed message from publisher junk"));
}

/// An HTTP proxy in front of the real influxd that can be made to stop
/// answering everything but `/ping`, as influxd 1.6.7 did when it
/// deadlocked in `DROP DATABASE` during the e2e bench: `/ping` answered,
/// every request touching the store waited. That state cannot be produced
/// on demand, so the proxy stands in for it; the answers it does pass on
/// are the real server's.
async fn stuck_store_proxy(upstream: String) -> (String, Arc<AtomicBool>) {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stuck = Arc::new(AtomicBool::new(false));
    let flag = stuck.clone();
    let http = reqwest::Client::new();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (flag, http, upstream) = (flag.clone(), http.clone(), upstream.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (flag, http, upstream) = (flag.clone(), http.clone(), upstream.clone());
                        async move {
                            let ping = req.uri().path() == "/ping";
                            while !ping && flag.load(Ordering::Relaxed) {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await?.to_bytes();
                            let pq = parts
                                .uri
                                .path_and_query()
                                .map(|p| p.as_str())
                                .unwrap_or("/");
                            let mut fwd = http.request(parts.method, format!("{upstream}{pq}"));
                            if let Some(ct) = parts.headers.get(hyper::header::CONTENT_TYPE) {
                                fwd = fwd.header(hyper::header::CONTENT_TYPE, ct);
                            }
                            let r = fwd.body(body).send().await.expect("upstream influxd");
                            let status = r.status().as_u16();
                            // Its headers too: X-Influxdb-Version is how
                            // nbpy tells InfluxDB from another server.
                            let headers = r.headers().clone();
                            let mut out = hyper::Response::new(Full::new(
                                r.bytes().await.unwrap_or_default(),
                            ));
                            *out.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            for (k, v) in &headers {
                                if k != hyper::header::CONTENT_LENGTH
                                    && k != hyper::header::TRANSFER_ENCODING
                                    && k != hyper::header::CONNECTION
                                {
                                    out.headers_mut().append(k, v.clone());
                                }
                            }
                            Ok::<_, hyper::Error>(out)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (url, stuck)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn influxdb_answering_ping_but_not_queries_is_down_until_it_answers_again() {
    let env = Env::start().await;
    let (proxy, stuck) = stuck_store_proxy(env.influx.url()).await;
    let (cfg, base, _) = config(&env, None);
    // Only the daemon looks through the proxy; the pipeline writes straight
    // to influxd, so its counters keep landing while the daemon is blind.
    let p = env.spawn(
        "nbpy-health",
        &["--config", &cfg, "--log-format", "text"],
        &[
            ("NBPY_INFLUXDB__URL", proxy.as_str()),
            ("NBPY_INFLUXDB__TIMEOUT", "2s"),
        ],
    );
    p.wait_log("health: serving on", Duration::from_secs(20));
    let h = Health {
        base,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap(),
    };
    let _publisher = env.spawn("nbpy-publisher", &["--config", &cfg, "synth"], &[]);
    let _subscriber = env.spawn("nbpy-subscriber", &["--config", &cfg, "main"], &[]);
    h.wait("ready through the proxy", Duration::from_secs(60), |s| {
        s.ready
    })
    .await;
    assert_eq!(h.get("/readyz").await.0, 200);

    stuck.store(true, Ordering::Relaxed);
    let took = h
        .wait(
            "influxdb down while /ping answers",
            Duration::from_secs(30),
            |s| s.influxdb.state == State::Down,
        )
        .await;
    eprintln!("stuck store reported after {took:?}");
    let s = h.status().await.unwrap();
    let err = s.influxdb.error.clone().unwrap_or_default();
    assert!(
        err.contains("answers /ping") && err.contains("within 2s"),
        "{err}"
    );
    assert!(!s.ready);
    assert_eq!(subscriber_state(&s, "main"), Some(State::Unknown));
    let (code, body) = h.get("/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("InfluxDB down: answers /ping"), "{body}");

    stuck.store(false, Ordering::Relaxed);
    h.wait("ready again", Duration::from_secs(30), |s| {
        s.ready && s.influxdb.state == State::Up
    })
    .await;
}

/// With the default stats interval (10 s), the subscriber's second
/// `nbpy_pipeline` report comes ~2 s after its start, so `nbpy status`
/// does not show the start's zeros for a whole interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_second_pipeline_report_comes_early() {
    let env = Env::start().await;
    let ep = free_endpoint();
    let cfg = env.config(&format!(
        "[publishers.synth]\nendpoint = \"{ep}\"\nrate = 500\n\
         [subscribers.main]\nconnect = [\"{ep}\"]\n"
    ));
    let cfg = cfg.to_str().unwrap();
    let _publisher = env.spawn("nbpy-publisher", &["--config", cfg, "synth"], &[]);
    let subscriber = env.spawn("nbpy-subscriber", &["--config", cfg, "main"], &[]);
    subscriber.wait_log("ready", Duration::from_secs(30));
    let t0 = Instant::now();
    let q = "SELECT last(\"received\") FROM \"tick\".\"default\".\"nbpy_pipeline\" WHERE component = 'main'";
    while env.client.query_number(q).await.unwrap_or(0.0) == 0.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(6),
            "only the start's report within 6 s of ready"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `nbpy status --json`, probing directly (no daemon listens in these tests).
fn nbpy_status(cfg: &str) -> Status {
    let out = Command::new(bin_path("nbpy"))
        .args(["--config", cfg, "status", "--json"])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A subscriber that was stopped cleanly shows as down at once, though its
/// last report is fresh: `subscriber_stale_after` is ten minutes here, so
/// only its saying it stopped can make it down. A new start is up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleanly_stopped_subscriber_shows_down_at_once_not_up_until_stale() {
    let env = Env::start().await;
    let ep = free_endpoint();
    let port = nbpy::backend::free_port().unwrap();
    let cfg = env.config(&format!(
        "[health]\nlisten = \"127.0.0.1:{port}\"\nsubscriber_stale_after = \"10m\"\n\
         [publishers.synth]\nendpoint = \"{ep}\"\nrate = 200\n\
         [subscribers.main]\nconnect = [\"{ep}\"]\n"
    ));
    let cfg = cfg.to_str().unwrap();
    let mut publisher = env.spawn("nbpy-publisher", &["--config", cfg, "synth"], &[]);
    let mut subscriber = env.spawn("nbpy-subscriber", &["--config", cfg, "main"], &[]);
    let wait_up = |what: &str| {
        let t0 = Instant::now();
        while subscriber_state(&nbpy_status(cfg), "main") != Some(State::Up) {
            assert!(t0.elapsed() < Duration::from_secs(30), "subscriber {what}");
        }
    };
    wait_up("never up");

    subscriber.signal(Signal::SIGTERM);
    subscriber.wait_success(Duration::from_secs(30));
    let s = nbpy_status(cfg);
    let sub = &s.subscribers[0];
    assert_eq!(sub.state, State::Down, "right after a clean stop: {s:#?}");
    assert!(
        sub.problem
            .as_deref()
            .is_some_and(|p| p.contains("stopped")),
        "{s:#?}"
    );
    assert!(
        !s.ready
            && s.not_ready
                .iter()
                .any(|r| r.contains("subscriber main down")),
        "{s:#?}"
    );

    // Started again: its first report supersedes the stopped one.
    let mut subscriber = env.spawn("nbpy-subscriber", &["--config", cfg, "main"], &[]);
    wait_up("not up again");

    // `nbpy down`'s order: subscribers, then publishers. Both show down.
    subscriber.signal(Signal::SIGTERM);
    subscriber.wait_success(Duration::from_secs(30));
    publisher.signal(Signal::SIGTERM);
    publisher.wait_success(Duration::from_secs(30));
    let s = nbpy_status(cfg);
    assert_eq!(subscriber_state(&s, "main"), Some(State::Down), "{s:#?}");
    assert_eq!(publisher_state(&s, "synth"), Some(State::Down), "{s:#?}");
}

/// A subscriber whose clock is an hour ahead wrote one report; then it was
/// killed. That report sorts newest for an hour, but the daemon judges
/// freshness by when it saw reports change, so the subscriber shows down
/// within its stale limit, and /status says the report is future-dated.
/// While it runs, its later (correctly dated) reports are still seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_future_dated_report_does_not_keep_a_killed_subscriber_up() {
    let env = Env::start().await;
    let (cfg, base, _) = config(&env, None);
    let (_health, h) = start_health(&env, &cfg, &base);
    let _publisher = env.spawn("nbpy-publisher", &["--config", &cfg, "synth"], &[]);
    let mut subscriber = env.spawn("nbpy-subscriber", &["--config", &cfg, "main"], &[]);
    h.wait("subscriber up", Duration::from_secs(60), |s| {
        subscriber_state(s, "main") == Some(State::Up)
    })
    .await;

    let ahead = nbpy::wire::now_ns() + 3_600_000_000_000;
    let line =
        format!("nbpy_pipeline,component=main,role=subscriber received=7i,written=7i {ahead}\n");
    env.client
        .write("default", line.into_bytes().into())
        .await
        .expect("write a future-dated report");
    // Still up on its later reports, and the skew is named.
    h.wait("skew warning while up", Duration::from_secs(30), |s| {
        subscriber_state(s, "main") == Some(State::Up)
            && s.subscribers[0].counter("received") != Some(7.0)
            && s.warnings.iter().any(|w| w.contains("in the future"))
    })
    .await;

    subscriber.signal(Signal::SIGKILL);
    subscriber.wait(Duration::from_secs(10));
    h.wait("killed subscriber down", Duration::from_secs(30), |s| {
        subscriber_state(s, "main") == Some(State::Down)
            && s.subscribers[0].report_age_s.is_some_and(|a| a > 1.0)
    })
    .await;
    let (code, body) = h.get("/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("subscriber main down"), "{body}");
}

/// InfluxDB refuses every point of one measurement (a field type conflict:
/// `bid` was first written as a string), while the others are stored.
/// The subscriber dead-letters them: /readyz says so and is 503, and the
/// write lag of that measurement shows, not hidden by the others' progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_measurement_influxdb_refuses_makes_readyz_fail_and_shows_in_write_lag() {
    let env = Env::start().await;
    let (cfg, base, _) = config(&env, None);
    let (_health, h) = start_health(&env, &cfg, &base);
    let m = nbpy::schema::by_name("kraken_tick").expect("kraken_tick");
    let now = nbpy::wire::now_ns();
    env.client
        .write(
            m.rp,
            format!("kraken_tick,publisher=other bid=\"text\" {now}\n")
                .into_bytes()
                .into(),
        )
        .await
        .expect("a string mid");
    let _publisher = env.spawn("nbpy-publisher", &["--config", &cfg, "synth"], &[]);
    let _subscriber = env.spawn("nbpy-subscriber", &["--config", &cfg, "main"], &[]);
    h.wait("refused points shown", Duration::from_secs(60), |s| {
        s.subscribers[0].counter("dead_lettered").unwrap_or(0.0) > 0.0
            && s.subscribers[0].refused_recently.is_some()
            && !s.ready
            && s.publishers
                .first()
                .and_then(|p| p.write_lag_by_measurement.get("kraken_tick"))
                .is_some_and(|l| l.messages > 0)
    })
    .await;
    let (code, body) = h.get("/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("subscriber main") && body.contains("refused"),
        "{body}"
    );
    let (_, metrics) = h.get("/metrics").await;
    assert!(
        metrics.contains(
            "nbpy_measurement_write_lag_messages{publisher=\"synth\",measurement=\"kraken_tick\"}"
        ),
        "{metrics}"
    );
}

/// A dropped retention policy: the write lag of the measurement in it
/// cannot be read, and /status says so rather than showing no write lag
/// at all (the pooled query failed as a whole).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_retention_policy_shows_as_a_write_lag_warning() {
    let env = Env::start().await;
    let (cfg, base, _) = config(&env, None);
    let (_health, h) = start_health(&env, &cfg, &base);
    let _publisher = env.spawn("nbpy-publisher", &["--config", &cfg, "synth"], &[]);
    let _subscriber = env.spawn("nbpy-subscriber", &["--config", &cfg, "main"], &[]);
    h.wait("everything up", Duration::from_secs(60), |s| s.ready)
        .await;
    let depth = nbpy::schema::by_name("kraken_depth").expect("kraken_depth");
    env.client
        .query(&format!(
            "DROP RETENTION POLICY \"{}\" ON \"tick\"",
            depth.rp
        ))
        .await
        .expect("drop the retention policy");
    h.wait("write lag warning", Duration::from_secs(30), |s| {
        let p = &s.publishers[0];
        p.write_lag_error
            .as_deref()
            .is_some_and(|e| e.contains("kraken_depth"))
            && p.write_lag_messages.is_some()
            && p.write_lag_by_measurement.contains_key("kraken_tick")
            && s.warnings
                .iter()
                .any(|w| w.contains("write lag cannot be read") && w.contains("kraken_depth"))
    })
    .await;
}

/// While InfluxDB is down the write lag cannot be measured, so none is
/// shown, and /status says why: the figures from before the outage stayed
/// for its whole length while the unstored backlog grew. Back up, it is
/// measured again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_lag_is_not_shown_while_influxdb_is_down() {
    let mut env = Env::start().await;
    let (cfg, base, _) = config(&env, None);
    let (_health, h) = start_health(&env, &cfg, &base);
    let _publisher = env.spawn("nbpy-publisher", &["--config", &cfg, "synth"], &[]);
    let _subscriber = env.spawn("nbpy-subscriber", &["--config", &cfg, "main"], &[]);
    h.wait("write lag measured", Duration::from_secs(60), |s| {
        s.ready && s.publishers[0].write_lag_messages.is_some()
    })
    .await;

    env.stop_influx();
    h.wait("InfluxDB down", Duration::from_secs(30), |s| {
        s.influxdb.state == State::Down
    })
    .await;
    let s = h.status().await.expect("/status");
    assert_eq!(s.influxdb.state, State::Down, "{s:#?}");
    let p = &s.publishers[0];
    assert_eq!(
        (p.write_lag_messages, p.write_lag_s),
        (None, None),
        "{s:#?}"
    );
    assert!(p.write_lag_by_measurement.is_empty(), "{s:#?}");
    assert_eq!(
        p.write_lag_error.as_deref(),
        Some("every measurement: InfluxDB does not answer"),
        "{s:#?}"
    );
    let (_, metrics) = h.get("/metrics").await;
    assert!(
        !metrics.contains("nbpy_publisher_write_lag_messages{")
            && !metrics.contains("nbpy_measurement_write_lag_messages{"),
        "{metrics}"
    );

    env.start_influx_again();
    h.wait("write lag measured again", Duration::from_secs(60), |s| {
        s.influxdb.state == State::Up
            && s.publishers[0].write_lag_messages.is_some()
            && s.publishers[0].write_lag_error.is_none()
    })
    .await;
}

/// The daemon reads a database that does not exist (as after `DROP
/// DATABASE`): every write lag query fails, so there is no write lag
/// rather than a lag of 0 for data nothing stores, and the subscriber's
/// state names the missing database instead of InfluxDB's bare "not
/// executed" (its answer to a query of two statements there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_database_is_named_and_leaves_no_write_lag() {
    let env = Env::start().await;
    let (cfg, base, _) = config(&env, None);
    let (_health, h) = start_health_with(&env, &cfg, &base, &[("NBPY_INFLUXDB__DATABASE", "gone")]);
    let _publisher = env.spawn("nbpy-publisher", &["--config", &cfg, "synth"], &[]);
    h.wait("write lag unreadable", Duration::from_secs(60), |s| {
        s.publishers[0]
            .write_lag_error
            .as_deref()
            .is_some_and(|e| e.contains("database not found"))
    })
    .await;
    let s = h.status().await.expect("/status");
    let p = &s.publishers[0];
    assert_eq!(
        (p.write_lag_messages, p.write_lag_s),
        (None, None),
        "{s:#?}"
    );
    assert!(p.write_lag_by_measurement.is_empty(), "{s:#?}");
    let sub = &s.subscribers[0];
    assert_eq!(sub.state, State::Unknown, "{s:#?}");
    assert_eq!(
        sub.problem.as_deref(),
        Some(
            "reading nbpy_pipeline: InfluxDB: database \"gone\" does not exist (run `nbpy schema apply`)"
        ),
        "{s:#?}"
    );
    let (_, metrics) = h.get("/metrics").await;
    assert!(
        !metrics.contains("nbpy_publisher_write_lag_messages{"),
        "{metrics}"
    );
}
