//! The venue feeds (OANDA v20 pricing stream, Betfair Exchange Stream, X
//! filtered stream) against local servers that speak each venue's real
//! protocol and replay messages in the documented shapes, and end to end
//! through the real publisher/subscriber binaries into a real influxd.
//!
//! The venues themselves are on the internet, which tests cannot reach:
//! `venues/servers.rs` replaces them (and only them) with local servers.

mod common;
#[path = "venues/servers.rs"]
mod servers;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use nbpy::config::PublisherConfig;
use nbpy::exit::Failure;
use nbpy::feeds::betfair::cache::{MarketCache, MarketChange, Oddities};
use nbpy::feeds::betfair::BetfairConfig;
use nbpy::feeds::oanda::OandaConfig;
use nbpy::feeds::social::{Rule, SocialConfig};
use nbpy::feeds::{self, FeedContext, FeedKind, FeedSender, FeedStats};
use nbpy::service::Liveness;
use nbpy::wire::{Envelope, Value};
use serde_json::{json, Value as Json};
use servers::*;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

// ------------------------------------------------------------ harness

/// A feed running in-process, its output collected from the channel the
/// publisher would read.
struct Feed {
    rx: mpsc::Receiver<Envelope<'static>>,
    stats: Arc<FeedStats>,
    stop: CancellationToken,
    task: JoinHandle<Result<(), Failure>>,
}

fn start(cfg: PublisherConfig) -> Feed {
    let (tx, rx) = mpsc::channel(4096);
    let stats = Arc::new(FeedStats::default());
    let out = FeedSender::new(
        tx,
        "test",
        1,
        stats.clone(),
        Arc::new(Liveness::new(Duration::from_secs(60))),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(feeds::run(FeedContext {
        name: "test".into(),
        cfg,
        out,
        shutdown: stop.clone(),
    }));
    Feed {
        rx,
        stats,
        stop,
        task,
    }
}

impl Feed {
    async fn next(&mut self) -> Envelope<'static> {
        match tokio::time::timeout(WAIT, self.rx.recv()).await {
            Ok(Some(e)) => e,
            Ok(None) => panic!("feed ended: {:?}", (&mut self.task).await),
            Err(_) => panic!("no message within {WAIT:?}"),
        }
    }
    fn connects(&self) -> u64 {
        self.stats
            .connects
            .load(std::sync::atomic::Ordering::Relaxed)
    }
    fn malformed(&self) -> u64 {
        self.stats
            .malformed
            .load(std::sync::atomic::Ordering::Relaxed)
    }
    /// Stops it the way the publisher does; it must end promptly and cleanly.
    async fn stop(self) {
        self.stop.cancel();
        let r = tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("feed stops promptly on shutdown")
            .expect("feed task");
        assert!(r.is_ok(), "{:?}", r.err().map(|f| f.to_string()));
    }
    /// The feed must end by itself with a failure.
    async fn failure(self) -> Failure {
        match tokio::time::timeout(WAIT, self.task).await {
            Ok(Ok(Err(f))) => f,
            Ok(Ok(Ok(()))) => panic!("feed ended without an error"),
            Ok(Err(e)) => panic!("feed task: {e}"),
            Err(_) => panic!("feed did not give up within {WAIT:?}"),
        }
    }
}

fn f(env: &Envelope<'_>, key: &str) -> Option<f64> {
    env.get(key).and_then(Value::as_f64)
}

fn s(env: &Envelope<'_>, key: &str) -> Option<String> {
    match env.get(key) {
        Some(Value::Str(v)) => Some(v.to_string()),
        _ => None,
    }
}

fn secret(dir: &Path, name: &str, value: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{value}\n")).unwrap();
    p
}

// ------------------------------------------------------------ OANDA

/// The PRICE and HEARTBEAT shapes of OANDA's v20 pricing-stream documentation.
fn oanda_price(instrument: &str, time: &str, bid: &str, ask: &str, liq: u64) -> String {
    json!({
        "type": "PRICE", "time": time,
        "bids": [{"price": bid, "liquidity": liq}, {"price": "1.11589", "liquidity": 10_000_000}],
        "asks": [{"price": ask, "liquidity": liq / 2}, {"price": "1.11606", "liquidity": 10_000_000}],
        "closeoutBid": bid, "closeoutAsk": ask,
        "status": "tradeable", "tradeable": true, "instrument": instrument,
    })
    .to_string()
}

fn oanda_heartbeat(time: &str) -> String {
    json!({"type": "HEARTBEAT", "time": time}).to_string()
}

fn oanda_cfg(url: &str, token_file: &Path, timeout: Duration) -> PublisherConfig {
    PublisherConfig {
        feed: FeedKind::OandaTick,
        url: Some(url.into()),
        instruments: vec!["EUR_USD".into(), "USD_JPY".into()],
        oanda: OandaConfig {
            account: Some("101-004-1234567-001".into()),
            token_file: Some(token_file.into()),
            heartbeat_timeout: timeout,
            ..Default::default()
        },
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oanda_prices_are_decoded_and_heartbeats_keep_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let token = secret(dir.path(), "oanda-token", "tok-0123456789abcdef");
    let jpy = oanda_price(
        "USD_JPY",
        "2016-09-20T15:05:48.000000001Z",
        "101.520",
        "101.540",
        2_000_000,
    );
    let (jpy_a, jpy_b) = jpy.split_at(40);
    let script = vec![
        line(oanda_price(
            "EUR_USD",
            "2016-09-20T15:05:47.960449532Z",
            "1.11590",
            "1.11605",
            10_000_000,
        )),
        // One line split over two chunks.
        Step::Raw(jpy_a.to_string()),
        Step::Raw(format!("{jpy_b}\n")),
        line("this is not JSON"),
        line(
            r#"{"type":"PRICE","time":"2016-09-20T15:05:49Z","bids":[{"price":"1.1","liquidity":1}]}"#,
        ),
        // 2 s of heartbeats only: longer than the 1 s heartbeat_timeout.
        Step::Every {
            line: oanda_heartbeat("2016-09-20T15:05:50.163791738Z"),
            every: Duration::from_millis(250),
            count: 8,
        },
        line(oanda_price(
            "EUR_USD",
            "2016-09-20T15:05:52.5Z",
            "1.11600",
            "1.11610",
            3_000_000,
        )),
        Step::Hold,
    ];
    let server = HttpServer::start(move |_, _| Reply::Stream(script.clone())).await;
    let mut feed = start(oanda_cfg(&server.url(), &token, Duration::from_secs(1)));

    let eur = feed.next().await;
    assert_eq!(eur.topic(), "oanda.price.EUR_USD");
    assert_eq!(eur.ts, 1_474_383_947_960_449_532, "OANDA's own time in ns");
    assert_eq!(f(&eur, "bid"), Some(1.1159));
    assert_eq!(f(&eur, "ask"), Some(1.11605));
    assert_eq!(f(&eur, "spread"), Some(0.00015));
    assert_eq!(
        f(&eur, "liquidity"),
        Some(5_000_000.0),
        "the smaller top of book"
    );
    assert_eq!(eur.get("tradeable"), Some(&Value::Bool(true)));
    let jpy = feed.next().await;
    assert_eq!(jpy.topic(), "oanda.price.USD_JPY");
    assert_eq!(jpy.ts, 1_474_383_948_000_000_001);
    assert_eq!(f(&jpy, "spread"), Some(0.02));
    // Published after 2 s of nothing but heartbeats, on the same connection.
    let later = feed.next().await;
    assert_eq!(later.ts, 1_474_383_952_500_000_000);
    assert_eq!(f(&later, "bid"), Some(1.116));
    assert_eq!(
        server.requests_to("/").len(),
        1,
        "no reconnect while heartbeats flow"
    );
    assert_eq!(feed.connects(), 1);
    assert_eq!(
        feed.malformed(),
        2,
        "the junk line and the PRICE without instrument"
    );

    let req = &server.requests_to("/")[0];
    assert_eq!(req.method, "GET");
    assert_eq!(
        req.target,
        "/v3/accounts/101-004-1234567-001/pricing/stream?instruments=EUR_USD%2CUSD_JPY"
    );
    assert_eq!(
        req.header("authorization"),
        Some("Bearer tok-0123456789abcdef")
    );
    assert_eq!(req.header("accept-datetime-format"), Some("RFC3339"));

    feed.stop().await;
    until("the server to see the stream closed", WAIT, || {
        *server.dropped.lock().unwrap() == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oanda_silent_stream_reconnects_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let token = secret(dir.path(), "oanda-token", "tok");
    let a = oanda_price(
        "EUR_USD",
        "2016-09-20T15:05:47.960449532Z",
        "1.11590",
        "1.11605",
        10_000_000,
    );
    let b = oanda_price(
        "EUR_USD",
        "2016-09-20T15:06:01.25Z",
        "1.11700",
        "1.11702",
        1_000_000,
    );
    let server = HttpServer::start(move |_, n| {
        Reply::Stream(match n {
            // Goes silent: no price, no heartbeat.
            0 => vec![line(a.clone()), Step::Hold],
            // A new stream opens with the current price again, then moves on.
            _ => vec![line(a.clone()), line(b.clone()), Step::Hold],
        })
    })
    .await;
    let mut feed = start(oanda_cfg(&server.url(), &token, Duration::from_millis(500)));
    let first = feed.next().await;
    assert_eq!(first.ts, 1_474_383_947_960_449_532);
    let second = feed.next().await;
    assert_eq!(
        second.ts, 1_474_383_961_250_000_000,
        "the reopening snapshot is not published twice"
    );
    assert_eq!(server.requests_to("/v3/").len(), 2);
    assert_eq!(feed.connects(), 2);
    assert_eq!(
        feed.stats
            .duplicates
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the repeated price is counted"
    );
    assert_eq!(
        *server.dropped.lock().unwrap(),
        1,
        "the silent stream was dropped"
    );
    feed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oanda_connection_failures_name_their_cause() {
    let dir = tempfile::tempdir().unwrap();
    let token = secret(dir.path(), "oanda-token", "tok");
    // A port just released: nothing listens there. The URL's password
    // must not reach the log.
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://nbpy:hunter2@{}", l.local_addr().unwrap())
    };
    // HTTPS with a certificate from a CA this host does not trust.
    let pki = Pki::new(dir.path(), "untrusted");
    let tls = LoginServer::start(&pki, |_, _| "{}".into()).await;
    for (url, cause) in [
        (refused, "Connection refused"),
        ("http://nonexistent-host.invalid".to_string(), "dns error"),
        (
            format!("https://127.0.0.1:{}", tls.addr.port()),
            "invalid peer certificate",
        ),
    ] {
        let feed = start(oanda_cfg(&url, &token, Duration::from_secs(5)));
        let mut problem = None;
        until("the connection failure in STATUS", WAIT, || {
            problem = feed.stats.problem();
            problem.is_some()
        })
        .await;
        let problem = problem.unwrap_or_default();
        assert!(
            problem.starts_with("OANDA stream cannot connect: error sending request: ")
                && problem.contains(cause),
            "{url}: the failure names {cause:?}: {problem}"
        );
        assert!(
            !problem.contains("hunter2") && !problem.contains("/v3/"),
            "{problem}"
        );
        assert_eq!(feed.connects(), 0);
        feed.stop().await;
    }
    assert_eq!(tls.count(), 0, "no request went over the untrusted TLS");

    // A stream cut off mid-body says how it was cut.
    let price = oanda_price(
        "EUR_USD",
        "2016-09-20T15:05:47.960449532Z",
        "1.11590",
        "1.11605",
        10_000_000,
    );
    let server = HttpServer::start(move |_, n| {
        Reply::Stream(match n {
            0 => vec![line(price.clone()), Step::Abort],
            _ => vec![Step::Hold],
        })
    })
    .await;
    let mut feed = start(oanda_cfg(&server.url(), &token, Duration::from_secs(5)));
    feed.next().await;
    until("a second request", WAIT, || {
        server.requests_to("/v3/").len() == 2
    })
    .await;
    let problem = feed.stats.problem().unwrap_or_default();
    assert!(
        problem.starts_with(
            "OANDA stream read failed: error decoding response body: error reading a body from connection"
        ),
        "the cause follows: {problem}"
    );
    feed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oanda_price_stamped_a_year_ahead_is_malformed_and_holds_nothing_back() {
    let dir = tempfile::tempdir().unwrap();
    let token = secret(dir.path(), "oanda-token", "tok");
    let rfc = |t: SystemTime| humantime::format_rfc3339_nanos(t).to_string();
    let now = SystemTime::now();
    let (t1, t2) = (rfc(now), rfc(now + Duration::from_millis(1)));
    let year = rfc(now + Duration::from_secs(365 * 24 * 3600));
    let script = vec![
        line(oanda_price("EUR_USD", &year, "1.20000", "1.20010", 1_000)),
        line(oanda_price("EUR_USD", &t1, "1.10000", "1.10010", 1_000)),
        line(oanda_price("USD_JPY", &t1, "150.000", "150.010", 1_000)),
        line(oanda_price("EUR_USD", &t2, "1.10001", "1.10011", 1_000)),
        Step::Hold,
    ];
    let server = HttpServer::start(move |_, _| Reply::Stream(script.clone())).await;
    let mut feed = start(oanda_cfg(&server.url(), &token, Duration::from_secs(5)));
    let ns = |t: &str| nbpy::feeds::upstream::parse_time_ns(t).unwrap();
    let got: Vec<(String, i64)> = [feed.next().await, feed.next().await, feed.next().await]
        .iter()
        .map(|e| (e.sym.to_string(), e.ts))
        .collect();
    assert_eq!(
        got,
        [
            ("EUR_USD".to_string(), ns(&t1)),
            ("USD_JPY".to_string(), ns(&t1)),
            ("EUR_USD".to_string(), ns(&t2)),
        ],
        "the year-ahead price is not published and does not hold EUR_USD back"
    );
    assert_eq!(feed.malformed(), 1, "the year-ahead price");
    feed.stop().await;
}

/// Log lines written on this thread: the feed's too, on the current-thread
/// runtime.
#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// Current-thread runtime: the feed logs on this thread, into `log`.
#[tokio::test]
async fn oanda_negative_prices_and_liquidity_are_malformed_and_never_published() {
    let log = LogBuf::default();
    let w = log.clone();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .with_ansi(false)
            .finish(),
    );
    let dir = tempfile::tempdir().unwrap();
    let token = secret(dir.path(), "oanda-token", "tok");
    let t = |s: u32| format!("2016-09-20T15:05:{s:02}Z");
    let script = vec![
        line(oanda_price("EUR_USD", &t(1), "-1.10000", "-1.09990", 1_000)),
        line(oanda_price("EUR_USD", &t(2), "1.10000", "0", 1_000)),
        line(
            json!({"type": "PRICE", "time": t(3), "instrument": "EUR_USD",
                   "bids": [{"price": "1.1", "liquidity": -1_000}],
                   "asks": [{"price": "1.2", "liquidity": 1_000}]})
            .to_string(),
        ),
        line(oanda_price("EUR_USD", &t(4), "1.10000", "1.10010", 1_000)),
        Step::Hold,
    ];
    let server = HttpServer::start(move |_, _| Reply::Stream(script.clone())).await;
    let mut feed = start(oanda_cfg(&server.url(), &token, Duration::from_secs(5)));
    let e = feed.next().await;
    assert_eq!(
        (f(&e, "bid"), f(&e, "ask")),
        (Some(1.1), Some(1.1001)),
        "only the sound price is published"
    );
    assert_eq!(feed.malformed(), 3);
    feed.stop().await;
    let text = String::from_utf8_lossy(&log.0.lock().unwrap()).into_owned();
    assert!(
        text.contains("published 1 prices, skipped 0 repeated, 3 malformed, 1 connects"),
        "the stop line counts what was refused: {text}"
    );
}

/// Runs the real publisher binary for `publisher` in `cfg` to its exit.
async fn run_publisher(cfg: &Path, publisher: &str) -> (Option<i32>, String) {
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(common::bin_path("nbpy-publisher"))
            .args(["--config", cfg.to_str().unwrap(), publisher])
            .env_remove("NOTIFY_SOCKET")
            .env("RUST_LOG", "info")
            .output(),
    )
    .await
    .expect("publisher exits by itself")
    .expect("spawn publisher");
    let log =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    (out.status.code(), log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oanda_rejected_token_exits_77_once() {
    let dir = tempfile::tempdir().unwrap();
    let token = secret(dir.path(), "oanda-token", "tok-wrong-4f1e2d");
    let server = HttpServer::start(|_, _| Reply::Full {
        status: 401,
        body: r#"{"errorMessage":"Insufficient authorization to perform request."}"#.into(),
    })
    .await;
    let cfg = dir.path().join("nbpy.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[publishers.fx]
feed = "oanda-tick"
endpoint = "{}"
url = "{}"
instruments = ["EUR_USD"]
[publishers.fx.oanda]
account = "101-004-1234567-001"
token_file = {:?}
"#,
            common::free_endpoint(),
            server.url(),
            token.display().to_string()
        ),
    )
    .unwrap();
    let (code, log) = run_publisher(&cfg, "fx").await;
    assert_eq!(code, Some(77), "EX_NOPERM\n{log}");
    assert!(
        log.contains("OANDA refused the API token")
            && log.contains("Insufficient authorization to perform request."),
        "{log}"
    );
    assert!(
        !log.contains("tok-wrong-4f1e2d"),
        "the token leaked into the log:\n{log}"
    );
    assert_eq!(server.requests_to("/").len(), 1, "no retry loop");
}

// ------------------------------------------------------------ Betfair

const MARKET: &str = "1.120684740";
const APP_KEY: &str = "appkey-Xy12";
const SESSION: &str = "session-Zx8i4oigut5nc";
/// Publish time of the documented image example, ms.
const PT: i64 = 1_465_207_623_149;

fn mcm(body: Json) -> String {
    let mut m = json!({"op": "mcm", "id": 2});
    for (k, v) in body.as_object().unwrap() {
        m[k] = v.clone();
    }
    m.to_string()
}

/// The subscription image: a WIN market with three runners, documented shape.
fn image(pt: i64) -> Json {
    json!({
        "initialClk": "G7u8qOIOHrOXiegOGMHPw+AO", "clk": "AAAAAAAA",
        "conflateMs": 0, "heartbeatMs": 500, "pt": pt, "ct": "SUB_IMAGE",
        "mc": [{
            "id": MARKET, "img": true,
            "marketDefinition": {"status": "OPEN", "inPlay": false, "bettingType": "ODDS",
                "marketType": "WIN", "countryCode": "GB", "eventTypeId": "7", "version": 1_234_567,
                "runners": [{"id": 47972, "sortPriority": 1, "status": "ACTIVE"},
                            {"id": 47973, "sortPriority": 2, "status": "ACTIVE"},
                            {"id": 47974, "sortPriority": 3, "status": "ACTIVE"}]},
            "rc": [
                {"id": 47972, "batb": [[0, 2.0, 10.5], [1, 1.99, 20], [2, 1.98, 31]],
                              "batl": [[0, 2.02, 5], [1, 2.04, 6], [2, 2.06, 8]], "ltp": 2.0, "tv": 1520.3},
                {"id": 47973, "batb": [[0, 3.5, 4]], "batl": [[0, 3.6, 2]], "ltp": 3.55, "tv": 200},
                {"id": 47974, "batb": [[0, 9.0, 1]], "batl": [[0, 10.0, 1]]}
            ]
        }]
    })
}

/// Level 1 of the back ladder goes (the levels below move up), the third
/// lay level empties, a trade happens.
fn delta1(pt: i64) -> Json {
    json!({"clk": "AAAAAAAB", "pt": pt + 1114, "mc": [{"id": MARKET, "rc": [
        {"id": 47972, "batb": [[1, 1.98, 31], [2, 1.97, 40]], "batl": [[2, 0, 0]], "ltp": 2.02, "tv": 1600}
    ]}]})
}

fn delta2(pt: i64) -> Json {
    json!({"clk": "AAAAAAAC", "pt": pt + 1852, "mc": [{"id": MARKET, "rc": [
        {"id": 47973, "batl": [[0, 3.65, 3]], "ltp": 3.6, "tv": 260}
    ]}]})
}

/// The market as it stands after the image and both deltas, as one image.
fn image_after_deltas(ct: &str, clk: &str) -> Json {
    json!({"ct": ct, "clk": clk, "pt": 1_465_207_630_000i64, "mc": [{
    "id": MARKET, "img": true, "marketDefinition": {"status": "OPEN"},
    "rc": [
        {"id": 47972, "batb": [[0, 2.0, 10.5], [1, 1.98, 31], [2, 1.97, 40]],
                      "batl": [[0, 2.02, 5], [1, 2.04, 6]], "ltp": 2.02, "tv": 1600},
        {"id": 47973, "batb": [[0, 3.5, 4]], "batl": [[0, 3.65, 3]], "ltp": 3.6, "tv": 260},
        {"id": 47974, "batb": [[0, 9.0, 1]], "batl": [[0, 10.0, 1]]}
    ]}]})
}

fn delta3() -> Json {
    json!({"clk": "AAAAAAAE", "pt": 1_465_207_631_500i64, "mc": [{"id": MARKET, "rc": [
        {"id": 47974, "batb": [[0, 9.2, 3]], "ltp": 9.2, "tv": 15}
    ]}]})
}

fn heartbeat(clk: &str) -> String {
    mcm(json!({"ct": "HEARTBEAT", "clk": clk, "pt": 1_465_207_640_000i64}))
}

fn status_failure(id: i64, code: &str, msg: &str) -> Json {
    json!({"op": "status", "id": id, "statusCode": "FAILURE", "errorCode": code,
           "errorMessage": msg, "connectionClosed": true, "connectionId": "002-051134157842-0"})
}

struct BetfairFiles {
    dir: tempfile::TempDir,
    pki: Pki,
    app_key: PathBuf,
    session: PathBuf,
}

fn betfair_files() -> BetfairFiles {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "betfair");
    let app_key = secret(dir.path(), "betfair-app-key", APP_KEY);
    let session = secret(dir.path(), "betfair-session", SESSION);
    BetfairFiles {
        dir,
        pki,
        app_key,
        session,
    }
}

fn betfair_cfg(url: &str, files: &BetfairFiles, heartbeat_ms: u64) -> PublisherConfig {
    PublisherConfig {
        feed: FeedKind::BetfairStream,
        url: Some(url.into()),
        betfair: BetfairConfig {
            app_key_file: Some(files.app_key.clone()),
            session_token_file: Some(files.session.clone()),
            ca_file: Some(files.pki.ca_pem.clone()),
            event_types: vec!["7".into()],
            countries: vec!["GB".into(), "IE".into()],
            market_types: vec!["WIN".into()],
            ladder_levels: 3,
            conflate_ms: Some(0),
            heartbeat_ms,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Accepts the app key and session from the files.
fn good_auth(_: usize, a: &Json) -> Option<Json> {
    if a["appKey"] != APP_KEY {
        return Some(status_failure(1, "INVALID_APP_KEY", "Invalid AppKey"));
    }
    if a["session"] != SESSION {
        return Some(status_failure(
            1,
            "INVALID_SESSION_INFORMATION",
            "Invalid session",
        ));
    }
    None
}

/// The published fields without the envelope's timing: what a runner shows.
fn shown(env: &Envelope<'_>) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = env
        .data
        .iter()
        .map(|(k, v)| (k.to_string(), format!("{v:?}")))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn betfair_image_and_deltas_publish_and_a_reconnect_resumes_from_the_clock() {
    let files = betfair_files();
    let server = BetfairServer::start(&files.pki, good_auth, |n, sub| match n {
        0 => vec![
            line(mcm(image(PT))),
            line(mcm(delta1(PT))),
            line(mcm(delta2(PT))),
            // The connection drops.
            Step::Close,
        ],
        _ => {
            // Betfair resumes from the clocks it is given: only what was
            // missed, here the unchanged market as an image, then news.
            assert_eq!(sub["initialClk"], "G7u8qOIOHrOXiegOGMHPw+AO");
            assert_eq!(sub["clk"], "AAAAAAAC");
            vec![
                line(mcm(image_after_deltas("RESUB_DELTA", "AAAAAAAD"))),
                line(mcm(delta3())),
                Step::Hold,
            ]
        }
    })
    .await;
    let mut feed = start(betfair_cfg(&server.url(), &files, 500));

    // The image: one message per runner, best first.
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(feed.next().await);
    }
    let e = &got[0];
    assert_eq!(e.topic(), format!("betfair.odds.{MARKET}"));
    assert_eq!(
        e.ts, 1_465_207_623_149_000_000,
        "Betfair's publish time in ns"
    );
    assert_eq!(s(e, "market_id").as_deref(), Some(MARKET));
    assert_eq!(s(e, "selection_id").as_deref(), Some("47972"));
    assert_eq!(s(e, "status").as_deref(), Some("OPEN"));
    for (k, v) in [
        ("back1", 2.0),
        ("back1_size", 10.5),
        ("back2", 1.99),
        ("back2_size", 20.0),
        ("back3", 1.98),
        ("back3_size", 31.0),
        ("lay1", 2.02),
        ("lay1_size", 5.0),
        ("lay2", 2.04),
        ("lay3", 2.06),
        ("lay3_size", 8.0),
        ("ltp", 2.0),
        ("tv", 1520.3),
    ] {
        assert_eq!(f(e, k), Some(v), "{k}");
    }
    assert_eq!(s(&got[1], "selection_id").as_deref(), Some("47973"));
    assert_eq!(s(&got[2], "selection_id").as_deref(), Some("47974"));
    assert_eq!(f(&got[2], "ltp"), None, "no trade yet");

    // Delta 1: only the runner that changed.
    let d1 = feed.next().await;
    assert_eq!(s(&d1, "selection_id").as_deref(), Some("47972"));
    assert_eq!(d1.ts, 1_465_207_624_263_000_000);
    assert_eq!(
        (f(&d1, "back2"), f(&d1, "back3"), f(&d1, "back3_size")),
        (Some(1.98), Some(1.97), Some(40.0))
    );
    assert_eq!(
        (f(&d1, "lay3"), f(&d1, "lay3_size")),
        (None, None),
        "emptied level"
    );
    assert_eq!((f(&d1, "ltp"), f(&d1, "tv")), (Some(2.02), Some(1600.0)));
    let d2 = feed.next().await;
    assert_eq!(s(&d2, "selection_id").as_deref(), Some("47973"));
    // After the reconnect: the resumed image repeats nothing, the news follows.
    let d3 = feed.next().await;
    assert_eq!(
        (s(&d3, "selection_id").as_deref(), f(&d3, "back1")),
        (Some("47974"), Some(9.2)),
        "the first message after the resume is the new change, not a duplicate"
    );
    assert_eq!(server.connections(), 2);
    assert_eq!(feed.connects(), 2);
    assert_eq!(feed.malformed(), 0);
    let resub = server.conn(1).subscription.unwrap();
    assert_eq!(
        (resub["initialClk"].as_str(), resub["clk"].as_str()),
        (Some("G7u8qOIOHrOXiegOGMHPw+AO"), Some("AAAAAAAC")),
        "resubscribed from the clocks of the last change"
    );

    // The deltas built the same ladder as a fresh image of the same state.
    let mut last = std::collections::BTreeMap::new();
    for e in got.iter().chain([&d1, &d2]) {
        last.insert(s(e, "selection_id").unwrap(), shown(e));
    }
    let mut fresh = MarketCache::new(3);
    let img: MarketChange =
        serde_json::from_value(image_after_deltas("SUB_IMAGE", "x")["mc"][0].clone()).unwrap();
    let views = fresh.apply(&img, &mut Oddities::default());
    assert_eq!(views.len(), 3);
    for v in views {
        assert_eq!(
            last[&v.selection_id],
            shown(&v.envelope(None)),
            "{}",
            v.selection_id
        );
    }

    // What the feed asked for.
    let c0 = server.conn(0);
    let auth = c0.auth.unwrap();
    assert_eq!(
        (
            auth["op"].as_str(),
            auth["appKey"].as_str(),
            auth["session"].as_str()
        ),
        (Some("authentication"), Some(APP_KEY), Some(SESSION))
    );
    let sub = c0.subscription.unwrap();
    assert_eq!(sub["op"], "marketSubscription");
    assert_eq!(
        sub["marketFilter"],
        json!({"eventTypeIds": ["7"], "countryCodes": ["GB", "IE"], "marketTypes": ["WIN"]})
    );
    assert_eq!(sub["marketDataFilter"]["ladderLevels"], 3);
    let fields = sub["marketDataFilter"]["fields"].as_array().unwrap();
    for want in ["EX_BEST_OFFERS", "EX_MARKET_DEF", "EX_LTP", "EX_TRADED_VOL"] {
        assert!(fields.iter().any(|f| f == want), "{want} in {fields:?}");
    }
    assert_eq!(
        (sub["conflateMs"].as_u64(), sub["heartbeatMs"].as_u64()),
        (Some(0), Some(500))
    );
    assert!(
        sub.get("clk").is_none(),
        "a first subscription has no clock"
    );

    feed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn betfair_heartbeats_keep_it_alive_and_silence_reconnects() {
    let files = betfair_files();
    // The image in three segments, one runner each (segmentationEnabled).
    let full = image(PT);
    let segments: Vec<String> = ["SEG_START", "SEG", "SEG_END"]
        .iter()
        .enumerate()
        .map(|(i, seg)| {
            let mut m = full.clone();
            m["segmentType"] = json!(seg);
            m["mc"][0]["rc"] = json!([full["mc"][0]["rc"][i].clone()]);
            if *seg != "SEG_START" {
                m["mc"][0]
                    .as_object_mut()
                    .unwrap()
                    .remove("marketDefinition");
            }
            mcm(m)
        })
        .collect();
    let server = BetfairServer::start(&files.pki, good_auth, move |n, sub| match n {
        0 => vec![
            line(segments[0].clone()),
            line(segments[1].clone()),
            line(segments[2].clone()),
            // 2.5 s of heartbeats only; silence would be noticed after 1.5 s.
            Step::Every {
                line: heartbeat("HB"),
                every: Duration::from_millis(250),
                count: 10,
            },
            line(mcm(delta1(PT))),
            // Now silent, though the connection stays open.
            Step::Hold,
        ],
        _ => {
            assert_eq!(sub["clk"], "AAAAAAAB", "the clock of the last change");
            vec![line(mcm(delta2(PT))), Step::Hold]
        }
    })
    .await;
    let mut feed = start(betfair_cfg(&server.url(), &files, 500));
    for _ in 0..3 {
        feed.next().await;
    }
    let d1 = feed.next().await;
    assert_eq!(d1.ts, 1_465_207_624_263_000_000);
    assert_eq!(
        (f(&d1, "back1"), f(&d1, "lay1"), s(&d1, "status").as_deref()),
        (Some(2.0), Some(2.02), Some("OPEN")),
        "the first segment's runner survived the later segments"
    );
    assert_eq!(
        server.connections(),
        1,
        "heartbeats kept the first connection"
    );
    let d2 = feed.next().await;
    assert_eq!(s(&d2, "selection_id").as_deref(), Some("47973"));
    assert_eq!(server.connections(), 2);
    until("the silent connection to be dropped", WAIT, || {
        server.conn(0).ended_by_client
    })
    .await;
    feed.stop().await;
}

/// A change the feed cannot apply must not leave the published ladder
/// wrong: it resynchronises from a fresh image (no clocks) instead of
/// skipping the line and building every later delta on a stale ladder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn betfair_a_change_that_cannot_be_read_resyncs_from_a_fresh_image() {
    for bad in [
        // Runner 47972's change is valid, 47973's ltp is not a number.
        mcm(json!({"clk": "AAAAAAAB", "pt": PT + 1000, "mc": [{"id": MARKET, "rc": [
            {"id": 47972, "batb": [[0, 2.5, 10.5]]}, {"id": 47973, "ltp": "n/a"}]}]})),
        // A change cut off in the middle.
        r#"{"op":"mcm","id":2,"clk":"AAAAAAAB","mc":[{"id":"1.120684740","rc":[{"id":47972,"batb":[[0,2.5"#.to_string(),
    ] {
        resyncs_after(bad).await;
    }
}

/// Betfair's prices are odds of 1.01 to 1000 and its sizes are not
/// negative: a change saying otherwise is malformed, never published, and
/// leaves the level unknown, so the feed resynchronises.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn betfair_prices_and_sizes_betfair_cannot_send_are_never_published() {
    for entry in [
        json!([0, -3.0, -1.0]),
        json!([0, 0.5, 4]),
        json!([0, 2.5, -1]),
    ] {
        resyncs_after(mcm(
            json!({"clk": "AAAAAAAB", "pt": PT + 1000, "mc": [{"id": MARKET,
            "rc": [{"id": 47972, "batb": [entry]}]}]}),
        ))
        .await;
    }
}

/// Image, then `bad`, then a valid change: the feed must publish neither
/// `bad` nor anything built on it, but Betfair's fresh image.
async fn resyncs_after(bad: String) {
    let files = betfair_files();
    let first = bad.clone();
    let server = BetfairServer::start(&files.pki, good_auth, move |n, sub| match n {
        0 => vec![
            line(mcm(image(PT))),
            line(first.clone()),
            // A later change of another runner, with a later clock.
            line(mcm(delta2(PT))),
            Step::Hold,
        ],
        // Resumed from a clock, Betfair sends what came after it: the
        // lost change is never sent again.
        _ if sub.get("clk").is_some() => vec![
            line(mcm(
                json!({"ct": "RESUB_DELTA", "clk": "AAAAAAAD", "pt": PT + 4000}),
            )),
            line(mcm(delta3())),
            Step::Hold,
        ],
        _ => {
            let mut fresh = image(PT + 5000);
            fresh["initialClk"] = json!("FRESH");
            fresh["mc"][0]["rc"][0]["batb"][0] = json!([0, 2.5, 10.5]);
            fresh["mc"][0]["rc"][1]["batl"][0] = json!([0, 3.65, 3]);
            fresh["mc"][0]["rc"][1]["ltp"] = json!(3.6);
            fresh["mc"][0]["rc"][1]["tv"] = json!(260);
            vec![line(mcm(fresh)), Step::Hold]
        }
    })
    .await;
    let mut feed = start(betfair_cfg(&server.url(), &files, 500));
    for _ in 0..3 {
        feed.next().await;
    }
    // The fresh image: both runners that changed, at Betfair's values.
    let mut after: Vec<_> = vec![feed.next().await, feed.next().await];
    after.sort_by_key(|e| s(e, "selection_id"));
    for e in &after {
        for (k, v) in &e.data {
            if let Some(x) = v.as_f64() {
                assert!(x >= 0.0, "{bad}: published {k} = {x}");
            }
        }
    }
    assert_eq!(
        (
            s(&after[0], "selection_id").as_deref(),
            f(&after[0], "back1")
        ),
        (Some("47972"), Some(2.5)),
        "{bad}: runner 47972 shows Betfair's back1, not the stale 2.0"
    );
    assert_eq!(
        (
            s(&after[1], "selection_id").as_deref(),
            f(&after[1], "lay1")
        ),
        (Some("47973"), Some(3.65)),
        "{bad}"
    );
    assert_eq!(
        after[0].ts,
        (PT + 5000) * 1_000_000,
        "{bad}: published from the fresh image, not the diverged cache"
    );
    let resub = server.conn(1).subscription.unwrap();
    assert!(
        resub.get("clk").is_none() && resub.get("initialClk").is_none(),
        "{bad}: resubscribed without the clocks, for a full image: {resub}"
    );
    assert_eq!(feed.malformed(), 1, "{bad}");
    assert_eq!(feed.connects(), 2, "{bad}");
    feed.stop().await;
}

/// A server that answers the authentication with garbage every second
/// resets each read's timeout; the handshake as a whole is bounded, so the
/// feed says so and reconnects instead of waiting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn betfair_a_handshake_that_never_completes_is_abandoned_and_retried() {
    let files = betfair_files();
    let server = BetfairServer::start(
        &files.pki,
        |n, a| match n {
            0 => AuthReply::Play(vec![
                Step::Every {
                    line: "garbage".into(),
                    every: Duration::from_millis(1000),
                    count: 60,
                },
                Step::Hold,
            ]),
            _ => good_auth(n, a).into(),
        },
        |_, _| vec![line(mcm(image(PT))), Step::Hold],
    )
    .await;
    let mut feed = start(betfair_cfg(&server.url(), &files, 500));
    let stats = feed.stats.clone();
    until(
        "the stuck handshake to be reported as the upstream problem",
        Duration::from_secs(30),
        || {
            stats
                .problem()
                .is_some_and(|p| p.contains("did not complete the authentication"))
        },
    )
    .await;
    assert!(feed.malformed() >= 5, "unreadable answers are counted");
    let e = feed.next().await;
    assert_eq!(s(&e, "selection_id").as_deref(), Some("47972"));
    assert_eq!(server.connections(), 2);
    feed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn betfair_status_errors_end_the_feed_once_with_the_right_code() {
    for (code, exit) in [
        ("NO_APP_KEY", 77),
        ("INVALID_APP_KEY", 77),
        ("INVALID_SESSION_INFORMATION", 77),
        ("NOT_AUTHORIZED", 77),
        ("MAX_CONNECTION_LIMIT_EXCEEDED", 75),
    ] {
        let files = betfair_files();
        let server = BetfairServer::start(
            &files.pki,
            move |_, _| Some(status_failure(1, code, "refused by the test server")),
            |_, _| vec![],
        )
        .await;
        let failure = start(betfair_cfg(&server.url(), &files, 500))
            .failure()
            .await;
        assert_eq!(failure.code, exit, "{code}: {failure}");
        let text = failure.to_string();
        assert!(
            text.contains(code) && text.contains("refused by the test server"),
            "{text}"
        );
        assert!(!text.contains(SESSION) && !text.contains(APP_KEY), "{text}");
        assert_eq!(server.connections(), 1, "{code}: no retry loop");
    }
    // A filter Betfair refuses is a configuration problem.
    let files = betfair_files();
    let server = BetfairServer::start(&files.pki, good_auth, |_, _| {
        vec![line(
            status_failure(2, "SUBSCRIPTION_LIMIT_EXCEEDED", "too many markets").to_string(),
        )]
    })
    .await;
    let failure = start(betfair_cfg(&server.url(), &files, 500))
        .failure()
        .await;
    assert_eq!(failure.code, 78, "{failure}");
    assert_eq!(server.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn betfair_rejected_session_exits_77_from_the_publisher() {
    let files = betfair_files();
    let server = BetfairServer::start(&files.pki, good_auth, |_, _| vec![]).await;
    let wrong = secret(files.dir.path(), "stale-session", "session-expired-77aa");
    let cfg = betfair_publisher_toml(&files, &server, 0, &wrong);
    let (code, log) = run_publisher(&cfg, "odds").await;
    assert_eq!(code, Some(77), "EX_NOPERM\n{log}");
    assert!(
        log.contains("Betfair refused the session token from betfair.session_token_file")
            && log.contains("INVALID_SESSION_INFORMATION"),
        "{log}"
    );
    for leaked in ["session-expired-77aa", APP_KEY] {
        assert!(
            !log.contains(leaked),
            "{leaked} leaked into the log:\n{log}"
        );
    }
    assert_eq!(server.connections(), 1, "no retry loop");
}

/// The publisher's config for `server`, stopping after `count` messages
/// (0: never), with the session token in `session`.
fn betfair_publisher_toml(
    files: &BetfairFiles,
    server: &BetfairServer,
    count: u64,
    session: &Path,
) -> PathBuf {
    let cfg = files.dir.path().join(format!("nbpy-{count}.toml"));
    std::fs::write(
        &cfg,
        format!(
            r#"
[publishers.odds]
feed = "betfair-stream"
endpoint = "{}"
url = "{}"
count = {count}
[publishers.odds.betfair]
app_key_file = {:?}
session_token_file = {:?}
ca_file = {:?}
event_types = ["7"]
heartbeat_ms = 500
"#,
            common::free_endpoint(),
            server.url(),
            files.app_key.display().to_string(),
            session.display().to_string(),
            files.pki.ca_pem.display().to_string(),
        ),
    )
    .unwrap();
    cfg
}

/// "subscribed" is said once Betfair acknowledged the subscription, never
/// before a refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn betfair_subscribed_is_logged_only_once_acknowledged() {
    let files = betfair_files();
    let refusing = BetfairServer::start_with(
        &files.pki,
        good_auth,
        |_, _| {
            Some(status_failure(
                2,
                "SUBSCRIPTION_LIMIT_EXCEEDED",
                "too many markets",
            ))
        },
        |_, _| vec![],
    )
    .await;
    let (code, log) = run_publisher(
        &betfair_publisher_toml(&files, &refusing, 0, &files.session),
        "odds",
    )
    .await;
    assert_eq!(code, Some(78), "{log}");
    assert!(log.contains("SUBSCRIPTION_LIMIT_EXCEEDED"), "{log}");
    assert!(
        !log.contains("subscribed to Betfair markets"),
        "claimed a subscription Betfair refused:\n{log}"
    );

    let server = BetfairServer::start(&files.pki, good_auth, |_, _| {
        vec![line(mcm(image(PT))), Step::Hold]
    })
    .await;
    let (code, log) = run_publisher(
        &betfair_publisher_toml(&files, &server, 3, &files.session),
        "odds",
    )
    .await;
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("subscribed to Betfair markets"), "{log}");
}

/// The stop line says how healthy the venue was: malformed messages and
/// connections besides what was published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn betfair_stop_line_counts_malformed_messages_and_connections() {
    let files = betfair_files();
    let server = BetfairServer::start(&files.pki, good_auth, |n, _| match n {
        0 => vec![
            line(mcm(image(PT))),
            Step::Line(r#"{"op":"mcm","id":2,"mc":[{"id"#.into()),
            Step::Hold,
        ],
        _ => {
            let mut fresh = image(PT + 5000);
            fresh["mc"][0]["rc"][0]["ltp"] = json!(2.04);
            vec![line(mcm(fresh)), Step::Hold]
        }
    })
    .await;
    let (code, log) = run_publisher(
        &betfair_publisher_toml(&files, &server, 4, &files.session),
        "odds",
    )
    .await;
    assert_eq!(code, Some(0), "{log}");
    assert!(
        log.contains(
            "Betfair feed published 4 runner updates, 1 malformed upstream messages, 2 connections"
        ),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn betfair_certificate_login_renews_an_expired_session() {
    let files = betfair_files();
    let password = secret(files.dir.path(), "betfair-password", "pa ss&word");
    let logins = LoginServer::start(&files.pki, |r, n| {
        let body = String::from_utf8_lossy(&r.body).to_string();
        if r.header("x-application") == Some(APP_KEY)
            && body.contains("username=punter")
            && body.contains("password=pa+ss%26word")
        {
            json!({"sessionToken": format!("login-token-{n}"), "loginStatus": "SUCCESS"})
                .to_string()
        } else {
            json!({"sessionToken": "", "loginStatus": "INVALID_USERNAME_OR_PASSWORD"}).to_string()
        }
    })
    .await;
    let issued = Arc::new(Mutex::new(0usize));
    let seen = issued.clone();
    let server = BetfairServer::start(
        &files.pki,
        move |n, a| {
            // Each connection must use the newest token: 0, then 1 after renewal.
            (a["session"] != format!("login-token-{n}") || a["appKey"] != APP_KEY)
                .then(|| status_failure(1, "INVALID_SESSION_INFORMATION", "bad session"))
        },
        move |n, _| {
            *seen.lock().unwrap() = n + 1;
            match n {
                0 => vec![
                    line(mcm(image(PT))),
                    // The session expires while streaming.
                    line(
                        status_failure(0, "INVALID_SESSION_INFORMATION", "session expired")
                            .to_string(),
                    ),
                ],
                _ => vec![line(mcm(delta1(PT))), Step::Hold],
            }
        },
    )
    .await;
    let mut cfg = betfair_cfg(&server.url(), &files, 500);
    cfg.betfair.session_token_file = None;
    cfg.betfair.cert_file = Some(files.pki.client_cert.clone());
    cfg.betfair.key_file = Some(files.pki.client_key.clone());
    cfg.betfair.username = Some("punter".into());
    cfg.betfair.password_file = Some(password);
    cfg.betfair.login_url = Some(logins.url());
    let mut feed = start(cfg.clone());
    for _ in 0..3 {
        feed.next().await;
    }
    let d1 = feed.next().await;
    assert_eq!(d1.ts, 1_465_207_624_263_000_000);
    assert_eq!(logins.count(), 2, "one login, one renewal");
    assert_eq!(*issued.lock().unwrap(), 2);
    feed.stop().await;

    // A wrong password: one login attempt, one clear error, no stream.
    let wrong = secret(files.dir.path(), "wrong-password", "nope");
    cfg.betfair.password_file = Some(wrong);
    let failure = start(cfg.clone()).failure().await;
    assert_eq!(failure.code, 77, "{failure}");
    assert!(
        failure.to_string().contains("INVALID_USERNAME_OR_PASSWORD"),
        "{failure}"
    );
    assert_eq!(logins.count(), 3);
    assert_eq!(
        server.connections(),
        2,
        "no stream connection without a session"
    );

    // A client certificate the login server does not trust.
    let other = Pki::new(files.dir.path(), "other");
    cfg.betfair.cert_file = Some(other.client_cert.clone());
    cfg.betfair.key_file = Some(other.client_key.clone());
    let failure = start(cfg).failure().await;
    assert_eq!(failure.code, 77, "{failure}");
    assert!(
        failure
            .to_string()
            .contains("refused the client certificate"),
        "{failure}"
    );
}

/// Too many logins earn a temporary ban: not a credential problem (exit
/// 77) but a temporary one. Betfair bans new logins for 20 minutes, so the
/// next login waits `login_ban_wait` (shortened here), not a backoff step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn betfair_a_temporary_login_ban_is_waited_out_not_fatal() {
    let files = betfair_files();
    let password = secret(files.dir.path(), "betfair-password", "pw");
    let at = Arc::new(Mutex::new(Vec::new()));
    let seen = at.clone();
    let logins = LoginServer::start(&files.pki, move |_, n| {
        seen.lock().unwrap().push(std::time::Instant::now());
        if n < 2 {
            json!({"sessionToken": "", "loginStatus": "TEMPORARY_BAN_TOO_MANY_REQUESTS"})
                .to_string()
        } else {
            json!({"sessionToken": "login-token", "loginStatus": "SUCCESS"}).to_string()
        }
    })
    .await;
    let server = BetfairServer::start(
        &files.pki,
        |_, a| {
            (a["session"] != "login-token")
                .then(|| status_failure(1, "INVALID_SESSION_INFORMATION", "bad session"))
        },
        |_, _| vec![line(mcm(image(PT))), Step::Hold],
    )
    .await;
    let mut cfg = betfair_cfg(&server.url(), &files, 500);
    cfg.betfair.session_token_file = None;
    cfg.betfair.cert_file = Some(files.pki.client_cert.clone());
    cfg.betfair.key_file = Some(files.pki.client_key.clone());
    cfg.betfair.username = Some("punter".into());
    cfg.betfair.password_file = Some(password);
    cfg.betfair.login_url = Some(logins.url());
    let ban_wait = Duration::from_millis(1500);
    cfg.betfair.login_ban_wait = ban_wait;
    let mut feed = start(cfg);
    let stats = feed.stats.clone();
    until("the ban to be reported", WAIT, || {
        stats
            .problem()
            .is_some_and(|p| p.contains("temporary ban") && p.contains("TEMPORARY_BAN"))
    })
    .await;
    let e = feed.next().await;
    assert_eq!(s(&e, "selection_id").as_deref(), Some("47972"));
    assert_eq!(logins.count(), 3, "tried again until the ban was lifted");
    assert_eq!(server.connections(), 1, "no stream connection while banned");
    let at = at.lock().unwrap().clone();
    for pair in at.windows(2) {
        let waited = pair[1] - pair[0];
        assert!(
            waited >= ban_wait,
            "a login {waited:?} after a ban, before betfair.login_ban_wait = {ban_wait:?}"
        );
    }
    feed.stop().await;
}

// ------------------------------------------------------------ social

fn x_post(id: &str, text: &str, created: &str, rules: Json) -> String {
    json!({"data": {"created_at": created, "edit_history_tweet_ids": [id], "id": id, "text": text},
           "matching_rules": rules})
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn social_rules_are_synced_and_posts_scored_and_keepalives_keep_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let token = secret(dir.path(), "x-bearer", "AAAA-bearer-secret");
    // The stream's rule set as X keeps it: one stale rule, one wanted.
    let rules = Arc::new(Mutex::new(vec![
        json!({"id": "100", "value": "old rule", "tag": "old"}),
        json!({"id": "101", "value": "bitcoin lang:en", "tag": "btc"}),
    ]));
    let state = rules.clone();
    let streams = std::sync::atomic::AtomicUsize::new(0);
    let server = HttpServer::start(move |r, _| {
        let meta = json!({"sent": "2024-01-15T10:30:00.000Z", "result_count": 0});
        match (r.method.as_str(), r.target.as_str()) {
            (_, _) if r.header("authorization") != Some("Bearer AAAA-bearer-secret") => Reply::Full {
                status: 401,
                body: r#"{"title":"Unauthorized","type":"about:blank","status":401,"detail":"Unauthorized"}"#.into(),
            },
            ("GET", "/2/tweets/search/stream/rules") => Reply::Full {
                status: 200,
                body: json!({"data": *state.lock().unwrap(), "meta": meta}).to_string(),
            },
            ("POST", "/2/tweets/search/stream/rules") => {
                let body = r.json();
                let mut st = state.lock().unwrap();
                if let Some(ids) = body["delete"]["ids"].as_array() {
                    st.retain(|rule| !ids.contains(&rule["id"]));
                }
                let mut created = Vec::new();
                for add in body["add"].as_array().into_iter().flatten() {
                    let mut rule = add.clone();
                    rule["id"] = json!("200");
                    st.push(rule.clone());
                    created.push(rule);
                }
                Reply::Full {
                    status: 200,
                    body: json!({"data": created, "meta": {"sent": "2024-01-15T10:30:00.000Z",
                        "summary": {"created": created.len(), "not_created": 0, "valid": created.len(), "invalid": 0}}})
                    .to_string(),
                }
            }
            ("GET", "/2/tweets/search/stream?tweet.fields=created_at")
                if streams.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 =>
            {
                Reply::Stream(vec![
                line(x_post("1570129049470599170", "Bitcoin rally looks strong today",
                            "2022-09-14T18:44:40.000Z", json!([{"id": "101", "tag": "btc"}]))),
                // 1.6 s of keep-alives (empty lines); silence would end it after 1 s.
                Step::Every { line: "\r".into(), every: Duration::from_millis(200), count: 8 },
                line(x_post("1570129049470599171", "Not good: bitcoin and ethereum crash",
                            "2022-09-14T18:44:45.000Z", json!([{"id": "101", "tag": "btc"}, {"id": "200"}]))),
                Step::Hold,
                ])
            }
            ("GET", "/2/tweets/search/stream?tweet.fields=created_at") => Reply::Stream(vec![
                line(x_post("1570129049470599172", "ethereum", "2022-09-14T18:45:00.000Z", json!([{"id": "200"}]))),
                Step::Hold,
            ]),
            _ => Reply::Full { status: 404, body: "{}".into() },
        }
    })
    .await;
    let cfg = PublisherConfig {
        feed: FeedKind::Social,
        url: Some(server.url()),
        social: SocialConfig {
            bearer_token_file: Some(token),
            rules: vec![
                Rule {
                    value: "bitcoin lang:en".into(),
                    tag: Some("btc".into()),
                },
                Rule {
                    value: "ethereum".into(),
                    tag: None,
                },
            ],
            heartbeat_timeout: Duration::from_secs(1),
        },
        ..Default::default()
    };
    let mut feed = start(cfg);
    let p1 = feed.next().await;
    assert_eq!(p1.topic(), "social.post.btc");
    assert_eq!(p1.ts, 1_663_181_080_000_000_000, "the post's creation time");
    assert_eq!(s(&p1, "rule").as_deref(), Some("btc"));
    assert_eq!(s(&p1, "id").as_deref(), Some("1570129049470599170"));
    assert_eq!(p1.get("words"), Some(&Value::Int(5)));
    assert!(f(&p1, "score").unwrap() > 0.5, "{:?}", p1.get("score"));
    // After the keep-alives, on the same connection: one message per rule.
    let (p2a, p2b) = (feed.next().await, feed.next().await);
    assert_eq!(s(&p2a, "rule").as_deref(), Some("btc"));
    assert_eq!(
        s(&p2b, "rule").as_deref(),
        Some("ethereum"),
        "untagged rule named by its value"
    );
    assert_eq!(s(&p2a, "id"), s(&p2b, "id"));
    assert!(f(&p2a, "score").unwrap() < -0.5);
    assert_eq!(server.requests_to("/2/tweets/search/stream?").len(), 1);
    // Then silence: a new connection.
    let p3 = feed.next().await;
    assert_eq!(s(&p3, "id").as_deref(), Some("1570129049470599172"));
    assert_eq!(server.requests_to("/2/tweets/search/stream?").len(), 2);
    assert_eq!(feed.connects(), 2);

    // The rule set became the configured one, once.
    let posts = server.requests_to("/2/tweets/search/stream/rules");
    let bodies: Vec<Json> = posts
        .iter()
        .filter(|r| r.method == "POST")
        .map(|r| r.json())
        .collect();
    assert_eq!(
        bodies,
        vec![
            json!({"delete": {"ids": ["100"]}}),
            json!({"add": [{"value": "ethereum"}]})
        ]
    );
    let mut now: Vec<String> = rules
        .lock()
        .unwrap()
        .iter()
        .map(|r| r["value"].to_string())
        .collect();
    now.sort();
    assert_eq!(now, vec!["\"bitcoin lang:en\"", "\"ethereum\""]);
    feed.stop().await;

    // A bearer token X does not accept.
    let bad = secret(dir.path(), "x-bad", "not-the-token");
    let cfg = PublisherConfig {
        feed: FeedKind::Social,
        url: Some(server.url()),
        social: SocialConfig {
            bearer_token_file: Some(bad),
            rules: vec![Rule {
                value: "ethereum".into(),
                tag: None,
            }],
            ..Default::default()
        },
        ..Default::default()
    };
    let before = server.requests.lock().unwrap().len();
    let failure = start(cfg).failure().await;
    assert_eq!(failure.code, 77, "{failure}");
    assert!(
        failure.to_string().contains("X refused the bearer token"),
        "{failure}"
    );
    assert!(!failure.to_string().contains("not-the-token"));
    assert_eq!(
        server.requests.lock().unwrap().len(),
        before + 1,
        "no retry loop"
    );
}

// ------------------------------------------------------------ end to end

/// `SELECT *` with ns timestamps, as rows of column → value.
async fn rows(env: &common::Env, q: &str) -> Vec<std::collections::HashMap<String, Json>> {
    let url = format!("{}/query", env.influx.url());
    let v: Json = reqwest::Client::new()
        .post(url)
        .form(&[("db", "tick"), ("q", q), ("epoch", "ns")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let series = &v["results"][0]["series"][0];
    let cols: Vec<String> = series["columns"]
        .as_array()
        .map(|c| c.iter().map(|c| c.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    series["values"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|row| {
            cols.iter()
                .cloned()
                .zip(row.as_array().unwrap().iter().cloned())
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_venue_streams_land_in_influxdb_with_their_tags_fields_and_times() {
    let env = common::Env::start().await;
    // Recent venue times (InfluxDB drops points older than the retention
    // policy): a minute ago, with nanosecond (OANDA) and ms (Betfair) detail.
    let base_ns = (nbpy::wire::now_ns() / 1_000_000_000 - 60) * 1_000_000_000;
    let at = |ns: i64| {
        humantime::format_rfc3339_nanos(std::time::UNIX_EPOCH + Duration::from_nanos(ns as u64))
            .to_string()
    };
    let t = [
        base_ns + 960_449_532,
        base_ns + 3_000_000_007,
        base_ns + 4_500_000_000,
    ];
    let (t0, t1, t2) = (at(t[0]), at(t[1]), at(t[2]));
    // OANDA: three prices and heartbeats, then the stream stays open.
    let oanda = HttpServer::start(move |_, _| {
        Reply::Stream(vec![
            line(oanda_price(
                "EUR_USD", &t0, "1.11590", "1.11605", 10_000_000,
            )),
            line(oanda_heartbeat(&t0)),
            line(oanda_price("USD_JPY", &t1, "101.520", "101.540", 2_000_000)),
            line(oanda_price("EUR_USD", &t2, "1.11600", "1.11610", 3_000_000)),
            Step::Hold,
        ])
    })
    .await;
    // Betfair: the image and two deltas.
    let pt = base_ns / 1_000_000 + 149;
    let files = betfair_files();
    let betfair = BetfairServer::start(&files.pki, good_auth, move |_, _| {
        vec![
            line(mcm(image(pt))),
            line(mcm(delta1(pt))),
            line(mcm(delta2(pt))),
            Step::Hold,
        ]
    })
    .await;
    // The OANDA token comes as a systemd credential, by name.
    let creds = env.path("credentials");
    std::fs::create_dir_all(&creds).unwrap();
    secret(&creds, "oanda-token", "tok-e2e-secret-31337");
    let (ep_fx, ep_odds) = (common::free_endpoint(), common::free_endpoint());
    let cfg = env.config(&format!(
        r#"
[publishers.fx]
feed = "oanda-tick"
endpoint = "{ep_fx}"
url = "{}"
instruments = ["EUR_USD", "USD_JPY"]
count = 3
wait_for_subscribers = 1
[publishers.fx.oanda]
account = "101-004-1234567-001"
token_file = "oanda-token"
environment = "practice"
heartbeat_timeout = "10s"

[publishers.odds]
feed = "betfair-stream"
endpoint = "{ep_odds}"
url = "{}"
count = 5
wait_for_subscribers = 1
[publishers.odds.betfair]
app_key_file = {:?}
session_token_file = {:?}
ca_file = {:?}
event_types = ["7"]
countries = ["GB"]
market_types = ["WIN"]
heartbeat_ms = 5000

[subscribers.main]
connect = ["{ep_fx}", "{ep_odds}"]
topics = [""]
stats_interval = "1s"
"#,
        oanda.url(),
        betfair.url(),
        files.app_key.display().to_string(),
        files.session.display().to_string(),
        files.pki.ca_pem.display().to_string(),
    ));
    let cfg = cfg.to_str().unwrap();
    let cred_dir = creds.to_str().unwrap();
    let mut fx = env.spawn(
        "nbpy-publisher",
        &["--config", cfg, "fx"],
        &[("CREDENTIALS_DIRECTORY", cred_dir)],
    );
    let mut odds = env.spawn("nbpy-publisher", &["--config", cfg, "odds"], &[]);
    fx.wait_log("bound", WAIT);
    odds.wait_log("bound", WAIT);
    let mut sub = env.spawn("nbpy-subscriber", &["--config", cfg, "main"], &[]);
    for p in [&mut fx, &mut odds] {
        let status = p.wait(Duration::from_secs(60));
        assert!(status.success(), "publisher: {status}\n{}", p.log_text());
    }
    let stored = env.wait_for_points(8, Duration::from_secs(60)).await;
    sub.signal(nix::sys::signal::Signal::SIGTERM);
    let status = sub.wait(Duration::from_secs(60));
    assert!(status.success(), "subscriber: {status}\n{}", sub.log_text());
    assert_eq!(stored, 8, "{}", sub.log_text());
    for p in [&fx, &odds, &sub] {
        let log = p.log_text();
        for leaked in ["tok-e2e-secret-31337", SESSION, APP_KEY] {
            assert!(!log.contains(leaked), "{leaked} in a log:\n{log}");
        }
    }

    let fx_rows = rows(
        &env,
        r#"SELECT * FROM "tick"."default"."oanda_tick" ORDER BY time"#,
    )
    .await;
    assert_eq!(fx_rows.len(), 3);
    let r = &fx_rows[0];
    assert_eq!(r["time"], json!(t[0]), "OANDA's time, to the ns");
    assert_eq!(
        (
            r["instrument"].as_str(),
            r["source"].as_str(),
            r["publisher"].as_str()
        ),
        (Some("EUR_USD"), Some("oanda"), Some("fx"))
    );
    assert_eq!(
        (r["bid"].as_f64(), r["ask"].as_f64(), r["spread"].as_f64()),
        (Some(1.1159), Some(1.11605), Some(0.00015))
    );
    assert_eq!(
        (r["liquidity"].as_f64(), r["tradeable"].as_bool()),
        (Some(5_000_000.0), Some(true))
    );
    assert_eq!(r["seq"], json!(1));
    assert_eq!(fx_rows[1]["time"], json!(t[1]));
    assert_eq!(fx_rows[1]["instrument"], "USD_JPY");
    assert_eq!(fx_rows[2]["time"], json!(t[2]));

    let odds_rows = rows(
        &env,
        r#"SELECT * FROM "tick"."default"."betfair_stream" ORDER BY time"#,
    )
    .await;
    assert_eq!(odds_rows.len(), 5);
    let r = &odds_rows[0];
    assert_eq!(r["time"], json!(pt * 1_000_000), "Betfair's publish time");
    assert_eq!(
        (
            r["instrument"].as_str(),
            r["source"].as_str(),
            r["publisher"].as_str()
        ),
        (Some(MARKET), Some("betfair"), Some("odds"))
    );
    assert_eq!(
        (r["market_id"].as_str(), r["status"].as_str()),
        (Some(MARKET), Some("OPEN"))
    );
    let mut image_runners: Vec<&str> = odds_rows[..3]
        .iter()
        .map(|r| r["selection_id"].as_str().unwrap())
        .collect();
    image_runners.sort();
    assert_eq!(image_runners, ["47972", "47973", "47974"]);
    let r = odds_rows
        .iter()
        .find(|r| r["selection_id"] == "47972")
        .unwrap();
    assert_eq!(
        (
            r["back1"].as_f64(),
            r["back1_size"].as_f64(),
            r["lay3"].as_f64(),
            r["ltp"].as_f64(),
            r["tv"].as_f64()
        ),
        (Some(2.0), Some(10.5), Some(2.06), Some(2.0), Some(1520.3))
    );
    let d1 = &odds_rows[3];
    assert_eq!(d1["time"], json!((pt + 1114) * 1_000_000));
    assert_eq!(
        (
            d1["selection_id"].as_str(),
            d1["back3"].as_f64(),
            d1["lay3"].as_f64()
        ),
        (Some("47972"), Some(1.97), None)
    );
    assert_eq!(odds_rows[4]["time"], json!((pt + 1852) * 1_000_000));
    assert_eq!(odds_rows[4]["lay1"].as_f64(), Some(3.65));
}
