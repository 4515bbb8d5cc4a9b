//! Phase 5 end to end: a synthetic publisher and a subscriber as real
//! processes over real ZeroMQ, a real influxd, and `nbpy validate` run as
//! the binary, its JSON report checked against numbers the test works out
//! on its own.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use nbpy::validate::Report;

/// Runs `nbpy validate --json`; returns the exit code, the report, stderr.
fn validate(cfg: &str, duration: &str) -> (i32, Report, String) {
    let out = Command::new(bin_path("nbpy"))
        .args([
            "--config",
            cfg,
            "validate",
            "--json",
            "--duration",
            duration,
        ])
        .env_remove("NOTIFY_SOCKET")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run nbpy validate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report: Report = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("not a report ({e}):\n{stdout}\nstderr:\n{stderr}"));
    (out.status.code().unwrap_or(-1), report, stderr)
}

/// Publisher + subscriber running, the subscriber storing.
async fn pipeline(env: &Env, extra_publisher: &str, subscriber_topics: &str) -> (Proc, Proc) {
    pipeline_with(
        env,
        &format!("rate = 2000\n{extra_publisher}"),
        subscriber_topics,
        "settle = \"20s\"",
    )
    .await
}

/// [`pipeline`] with the publisher's settings (`rate` among them) and the
/// `[validate]` section given.
async fn pipeline_with(
    env: &Env,
    publisher: &str,
    subscriber_topics: &str,
    validate: &str,
) -> (Proc, Proc) {
    let ep = free_endpoint();
    let cfg = env.config(&format!(
        r#"
[validate]
{validate}

[publishers.synth]
feed = "synthetic"
endpoint = "{ep}"
wait_for_subscribers = 1
{publisher}

[subscribers.main]
connect = ["{ep}"]
topics = {subscriber_topics}
stats_interval = "1s"
"#
    ));
    let cfg = cfg.to_str().unwrap();
    let publisher = env.spawn("nbpy-publisher", &["--config", cfg, "synth"], &[]);
    publisher.wait_log("bound", Duration::from_secs(20));
    let subscriber = env.spawn("nbpy-subscriber", &["--config", cfg, "main"], &[]);
    subscriber.wait_log("ready", Duration::from_secs(20));
    // The subscriber is there before the validator's window opens.
    assert!(
        env.wait_for_points(1, Duration::from_secs(30)).await > 0,
        "nothing stored\n{}",
        subscriber.log_text()
    );
    (publisher, subscriber)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_run_reconciles_every_message_with_zero_loss() {
    let env = Env::start().await;
    let (_p, _s) = pipeline(&env, "", "[\"\"]").await;
    let cfg = env.path("nbpy.toml");
    let (code, r, stderr) = validate(cfg.to_str().unwrap(), "3s");
    assert_eq!(code, 0, "{stderr}\n{r:#?}");
    assert!(r.ok && r.breaches.is_empty(), "{r:#?}");
    let p = &r.publishers[0];
    assert!(p.connected);
    assert!(p.seen > 1000, "only {} messages seen", p.seen);
    assert_eq!(p.published, p.seen, "the validator has no gaps of its own");
    assert_eq!(p.stored, p.published);
    assert_eq!((p.lost, p.unattributed.missed), (0, 0));
    // The five channel kinds rotate, so all five measurements are there,
    // each fully stored.
    let names: Vec<&str> = p.measurements.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "betfair_stream",
            "kraken_depth",
            "kraken_orders",
            "kraken_tick",
            "oanda_tick"
        ]
    );
    for m in &p.measurements {
        assert_eq!((m.lost, m.stored), (0, m.seen), "{}", m.name);
    }
    let total: u64 = p.measurements.iter().map(|m| m.seen).sum();
    assert_eq!(total, p.seen);
    // Per-topic rates: 5 channels × 4 default instruments.
    assert_eq!(p.topics.len(), 20);
    let e = &p.epochs[0];
    assert_eq!(e.last_seq - e.first_seq + 1, p.published);
    assert!(p
        .latency_ms
        .as_ref()
        .is_some_and(|l| l.checked && l.samples > 0));
}

/// Which measurement a synthetic message lands in, and for which of
/// `instruments` instruments: channels rotate fastest, then instruments.
fn synthetic_slot(seq: u64, instruments: u64) -> (&'static str, u64) {
    let n = seq - 1;
    let ch = nbpy::feeds::synthetic::CHANNELS[(n % 5) as usize];
    let m = nbpy::schema::by_channel(ch).unwrap().name;
    (m, (n / 5) % instruments)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_a_subscriber_never_stores_are_counted_exactly() {
    let env = Env::start().await;
    // The subscriber's topic filter leaves out every message of CCC: those
    // are published and seen on the bus, and never stored.
    let mut topics = Vec::new();
    for ch in nbpy::feeds::synthetic::CHANNELS {
        for sym in ["AAA", "BBB"] {
            topics.push(format!("\"synthetic.{ch}.{sym}\""));
        }
    }
    // What is never stored is waited for until `settle` runs out: short here.
    let (_p, _s) = pipeline_with(
        &env,
        "rate = 2000\ninstruments = [\"AAA\", \"BBB\", \"CCC\"]",
        &format!("[{}]", topics.join(", ")),
        "settle = \"6s\"",
    )
    .await;
    let cfg = env.path("nbpy.toml");
    let (code, r, stderr) = validate(cfg.to_str().unwrap(), "3s");

    assert_eq!(
        code,
        nbpy::exit::DATAERR,
        "loss must fail the check\n{stderr}"
    );
    let p = &r.publishers[0];
    assert_eq!(p.unattributed.missed, 0);
    let e = &p.epochs[0];
    // Work out on our own how many CCC messages the range holds, per measurement.
    let mut want = std::collections::BTreeMap::<&str, u64>::new();
    for seq in e.first_seq..=e.last_seq {
        let (m, inst) = synthetic_slot(seq, 3);
        if inst == 2 {
            *want.entry(m).or_default() += 1;
        }
    }
    let total_want: u64 = want.values().sum();
    assert!(total_want > 100, "window too short: {total_want}");
    for m in &p.measurements {
        assert_eq!(m.lost, want[m.name.as_str()], "{}: {m:?}", m.name);
        assert_eq!(m.stored + m.lost, m.seen, "{}", m.name);
        assert!(
            r.breaches
                .iter()
                .any(|b| b.contains(&format!("synth / {}", m.name))
                    && b.contains(&format!("{} of {}", m.lost, m.seen))),
            "breach for {} not named: {:?}",
            m.name,
            r.breaches
        );
    }
    assert_eq!(p.lost, total_want);
    assert_eq!(p.stored, p.published - total_want);
    // InfluxDB agrees, counted independently of the validator's queries.
    let q = format!(
        "SELECT count(\"seq\") FROM \"tick\".\"default\".\"kraken_tick\" WHERE \"epoch\" = {} AND \"seq\" >= {} AND \"seq\" <= {}",
        e.epoch, e.first_seq, e.last_seq
    );
    let stored_ticks = env.client.query_number(&q).await.unwrap() as u64;
    let tick = p
        .measurements
        .iter()
        .find(|m| m.name == "kraken_tick")
        .unwrap();
    assert_eq!(stored_ticks, tick.seen - tick.lost);
    assert!(stderr.contains("validation failed"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_publisher_is_named_and_exits_unavailable() {
    let env = Env::start().await;
    let ep = free_endpoint();
    let cfg = env.config(&format!(
        r#"
[validate]
connect_timeout = "1s"

[publishers.ghost]
endpoint = "{ep}"
"#
    ));
    let (code, r, stderr) = validate(cfg.to_str().unwrap(), "1s");
    assert_eq!(code, nbpy::exit::UNAVAILABLE, "{stderr}");
    assert!(!r.ok);
    assert!(
        r.breaches.iter().any(|b| b.contains("publisher ghost")),
        "{:?}",
        r.breaches
    );
    // Waiting for the connection that never came is not listening.
    assert_eq!(r.duration_s, 0.0, "{r:#?}");
    assert!(r.elapsed_s >= 1.0, "{r:#?}");
    // A window of nothing is a usage error, as in the configuration.
    let out = Command::new(bin_path("nbpy"))
        .args(["--config", cfg.to_str().unwrap(), "validate"])
        .args(["--duration", "0s"])
        .env_remove("NOTIFY_SOCKET")
        .output()
        .expect("run nbpy validate");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(nbpy::exit::USAGE), "{text}");
    assert!(!text.contains("OK"), "{text}");
}

/// InfluxDB down while the pipeline runs: the subscriber spools, and the
/// validator cannot tell stored from lost. It says so, claims no loss, and
/// exits unavailable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn influxdb_down_leaves_stored_unknown_not_lost() {
    let mut env = Env::start().await;
    let (_p, _s) = pipeline(&env, "", "[\"\"]").await;
    env.stop_influx();
    let cfg = env.path("nbpy.toml");
    let cfg = cfg.to_str().unwrap();
    let (code, r, stderr) = validate(cfg, "2s");
    assert_eq!(code, nbpy::exit::UNAVAILABLE, "{stderr}\n{r:#?}");
    assert!(!r.ok);
    assert!(r.stored_unknown.is_some(), "{r:#?}");
    let p = &r.publishers[0];
    assert!(p.seen > 0, "{r:#?}");
    assert_eq!((p.lost, p.loss_ratio), (0, 0.0), "{r:#?}");
    assert!(
        !r.breaches
            .iter()
            .any(|b| b.contains("lost") || b.contains("not stored")),
        "{:?}",
        r.breaches
    );
    let out = Command::new(bin_path("nbpy"))
        .args(["--config", cfg, "validate", "--duration", "1s"])
        .env_remove("NOTIFY_SOCKET")
        .output()
        .expect("run nbpy validate");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(nbpy::exit::UNAVAILABLE), "{text}");
    assert!(
        text.contains("stored: unknown — InfluxDB unreachable: "),
        "{text}"
    );
    assert!(!text.contains("lost"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_restart_inside_the_window_is_reconciled_across_both_epochs() {
    let env = Env::start().await;
    let ep = free_endpoint();
    // The restarted publisher holds its first message until the subscriber
    // is back (the validator is a monitor and is not waited for), so nothing
    // is lost and every number of the new epoch, from 1, must be accounted
    // for: seen by the validator, or missed by it but found stored.
    let cfg = env.config(&format!(
        r#"
[validate]
settle = "20s"

[publishers.synth]
feed = "synthetic"
endpoint = "{ep}"
rate = 1000
wait_for_subscribers = 1

[subscribers.main]
connect = ["{ep}"]
stats_interval = "1s"
"#
    ));
    let cfg = cfg.to_str().unwrap();
    let publisher = env.spawn("nbpy-publisher", &["--config", cfg, "synth"], &[]);
    publisher.wait_log("bound", Duration::from_secs(20));
    let subscriber = env.spawn("nbpy-subscriber", &["--config", cfg, "main"], &[]);
    subscriber.wait_log("ready", Duration::from_secs(20));
    let out = env.path("report.json");
    let validator = Command::new(bin_path("nbpy"))
        .args(["--config", cfg, "validate", "--json", "--duration", "12s"])
        .env("RUST_LOG", "warn")
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    assert!(env.wait_for_points(1000, Duration::from_secs(30)).await >= 1000);
    publisher.signal(nix::sys::signal::Signal::SIGTERM);
    let mut publisher = publisher;
    publisher.wait_success(Duration::from_secs(30));
    let _publisher = env.spawn("nbpy-publisher", &["--config", cfg, "synth"], &[]);
    let status = validator.wait_with_output().unwrap().status;
    let text = std::fs::read_to_string(&out).unwrap();
    let r: Report = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!(status.success(), "{:?}\n{r:#?}", status);
    let p = &r.publishers[0];
    assert_eq!(p.epochs.len(), 2, "{:?}", p.epochs);
    assert!(p.epochs[0].epoch < p.epochs[1].epoch);
    assert_eq!(
        p.epochs[1].first_seq, 1,
        "the new epoch is reconciled from its start"
    );
    assert!(p.epochs[1].last_seq > 0);
    assert_eq!(p.lost, 0, "{r:#?}");
    assert_eq!(p.published, p.stored);
    assert_eq!(
        (p.unattributed.lost, p.unattributed.stored),
        (0, p.unattributed.missed),
        "what the validator missed while reconnecting is stored: {:?}",
        p.epochs
    );
    let range: u64 = p.epochs.iter().map(|e| e.last_seq - e.first_seq + 1).sum();
    assert_eq!(range, p.published);
    assert!(p
        .problem
        .as_deref()
        .is_some_and(|s| s.contains("reconnected 1 time")));
}

/// A password in influxdb.url (`http://user:password@host`) is shown as
/// `***` by the phase-1 gate, when InfluxDB answers and when it does not,
/// and by `nbpy validate`'s report and its message on stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_in_influxdb_url_is_never_printed() {
    const SECRET: &str = "s3cretpw";
    let env = Env::start().await;
    let answering = env
        .influx
        .url()
        .replace("http://", &format!("http://bob:{SECRET}@"));
    let closed = format!(
        "http://bob:{SECRET}@127.0.0.1:{}",
        nbpy::backend::free_port().unwrap()
    );
    let wait = |url: &str| {
        let out = Command::new(bin_path("nbpy"))
            .args(["wait", "influxdb", "--timeout", "2s"])
            .env("NBPY_INFLUXDB__URL", url)
            .env_remove("NBPY_CONFIG")
            .env("RUST_LOG", "info")
            .output()
            .expect("run nbpy wait influxdb");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    };
    let (code, text) = wait(&answering);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("influxdb: http://bob:***@127.0.0.1:"),
        "{text}"
    );
    assert!(!text.contains(SECRET), "{text}");
    let (code, text) = wait(&closed);
    assert_eq!(code, Some(nbpy::exit::UNAVAILABLE), "{text}");
    assert!(
        text.contains("InfluxDB at http://bob:***@127.0.0.1:"),
        "{text}"
    );
    assert!(!text.contains(SECRET), "{text}");

    let cfg = env.path("creds.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\n[influxdb]\nurl = \"{closed}\"\n\
             [validate]\nconnect_timeout = \"1s\"\n\
             [publishers.ghost]\nendpoint = \"{}\"\n",
            env.path("state").display().to_string(),
            free_endpoint()
        ),
    )
    .unwrap();
    let out = Command::new(bin_path("nbpy"))
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "validate",
            "--duration",
            "1s",
        ])
        .env("RUST_LOG", "info")
        .output()
        .expect("run nbpy validate");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(nbpy::exit::UNAVAILABLE), "{text}");
    assert!(
        text.contains("InfluxDB at http://bob:***@127.0.0.1:"),
        "{text}"
    );
    assert!(!text.contains(SECRET), "{text}");
    let (code, r, stderr) = validate(cfg.to_str().unwrap(), "1s");
    assert_eq!(code, nbpy::exit::UNAVAILABLE, "{stderr}");
    let json = serde_json::to_string(&r).unwrap();
    assert!(json.contains("bob:***@"), "{json}");
    assert!(
        !json.contains(SECRET) && !stderr.contains(SECRET),
        "{json}\n{stderr}"
    );
}

/// `nbpy validate` (the human table); returns the exit code and stdout + stderr.
fn validate_text(cfg: &str, duration: &str, envs: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(bin_path("nbpy"));
    cmd.args(["--config", cfg, "validate", "--duration", duration])
        .env_remove("NOTIFY_SOCKET")
        .env("RUST_LOG", "warn");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run nbpy validate");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// A publisher alone, no subscriber; `publisher` is its settings.
fn lone_publisher(env: &Env, name: &str, publisher: &str, validate: &str) -> (String, Proc) {
    let ep = free_endpoint();
    let cfg = env.config(&format!(
        r#"
[validate]
{validate}

[publishers.{name}]
feed = "synthetic"
endpoint = "{ep}"
{publisher}
"#
    ));
    let cfg = cfg.to_str().unwrap().to_string();
    let p = env.spawn("nbpy-publisher", &["--config", &cfg, name], &[]);
    p.wait_log("bound", Duration::from_secs(20));
    (cfg, p)
}

/// A publisher that sends nothing in the window (here it holds its first
/// message for `wait_for_subscribers`, and no subscriber runs) leaves
/// nothing checked: that fails the check instead of passing as "OK".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_that_saw_nothing_fails_the_check() {
    let env = Env::start().await;
    let (cfg, _p) = lone_publisher(
        &env,
        "synth",
        "rate = 200\nwait_for_subscribers = 1",
        "settle = \"2s\"",
    );
    let (code, r, stderr) = validate(&cfg, "1s");
    assert_eq!(code, nbpy::exit::DATAERR, "{stderr}\n{r:#?}");
    assert!(!r.ok);
    let p = &r.publishers[0];
    assert!(p.connected && p.received == 0 && p.seen == 0, "{p:#?}");
    assert!(
        r.breaches
            .iter()
            .any(|b| b.contains("publisher synth") && b.contains("no messages")),
        "{:?}",
        r.breaches
    );
    // A feed that can be idle (a market that closes) is allowed to be.
    let idle = env.path("idle.toml");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[validate]\n", "[validate]\nidle_ok = [\"synth\"]\n");
    std::fs::write(&idle, text).unwrap();
    let (code, text) = validate_text(idle.to_str().unwrap(), "1s", &[]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("no messages in the window (validate.idle_ok: allowed)"),
        "{text}"
    );
}

/// Every message at the endpoint names another publisher (the endpoint
/// is configured under the wrong name, or two configurations disagree):
/// nothing could be reconciled, and the report says whose they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_of_another_publisher_are_reported_and_fail_the_check() {
    let env = Env::start().await;
    let (cfg, _p) = lone_publisher(&env, "synth", "rate = 200", "settle = \"2s\"");
    let other = env.path("other.toml");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[publishers.synth]", "[publishers.other]");
    std::fs::write(&other, text).unwrap();
    let (code, r, stderr) = validate(other.to_str().unwrap(), "1s");
    assert_eq!(code, nbpy::exit::DATAERR, "{stderr}\n{r:#?}");
    let p = &r.publishers[0];
    assert!(p.received > 0 && p.seen == 0, "{p:#?}");
    assert_eq!(p.foreign.get("synth"), Some(&p.received), "{p:#?}");
    assert!(
        r.breaches
            .iter()
            .any(|b| b.contains("publisher other") && b.contains("\"synth\"")),
        "{:?}",
        r.breaches
    );
}

/// A publisher that stops for good inside the window is unavailable (69),
/// and its rate is over the time it was really listened to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_that_goes_away_in_the_window_is_unavailable() {
    let env = Env::start().await;
    let (mut publisher, _s) = pipeline(&env, "", "[\"\"]").await;
    let cfg = env.path("nbpy.toml");
    let validator = Command::new(bin_path("nbpy"))
        .args(["--config", cfg.to_str().unwrap()])
        .args(["validate", "--json", "--duration", "8s"])
        .env_remove("NOTIFY_SOCKET")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The scenario: the publisher stops about 2 s into the 8 s window.
    std::thread::sleep(Duration::from_secs(2));
    publisher.signal(nix::sys::signal::Signal::SIGTERM);
    publisher.wait_success(Duration::from_secs(30));
    let out = validator.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let r: Report = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("not a report ({e}):\n{stdout}\nstderr:\n{stderr}"));
    assert_eq!(
        out.status.code(),
        Some(nbpy::exit::UNAVAILABLE),
        "{stderr}\n{r:#?}"
    );
    let p = &r.publishers[0];
    assert!(p.received > 0, "{p:#?}");
    assert!(
        r.unavailable
            .iter()
            .any(|u| u.contains("publisher synth") && u.contains("went away")),
        "{:?}",
        r.unavailable
    );
    // Listened to until it went away, not for the whole window.
    assert!(r.duration_s < 7.5, "{r:#?}");
    assert!(
        (p.rate - p.received as f64 / r.duration_s).abs() < 1.0,
        "{r:#?}"
    );
    // zeromq's own reconnect logging is not the validator's output.
    assert!(!stderr.contains("zeromq::"), "{stderr}");
}

/// Messages held up for seconds (the subscriber stopped, then resumed) are
/// stored late, not lost: the validator waits for them up to `settle`. If
/// they are still missing then, it says so in those words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_stored_late_within_settle_are_not_lost() {
    use nix::sys::signal::Signal;
    let env = Env::start().await;
    let (_p, subscriber) = pipeline_with(&env, "rate = 200", "[\"\"]", "settle = \"20s\"").await;
    let cfg = env.path("nbpy.toml");
    let cfg = cfg.to_str().unwrap().to_string();
    subscriber.signal(Signal::SIGSTOP);
    let validator = {
        let cfg = cfg.clone();
        std::thread::spawn(move || validate(&cfg, "2s"))
    };
    // The scenario: the subscriber stays stopped past the end of the
    // window and some seconds beyond, then catches up.
    std::thread::sleep(Duration::from_secs(7));
    subscriber.signal(Signal::SIGCONT);
    let (code, r, stderr) = validator.join().unwrap();
    assert_eq!(code, 0, "{stderr}\n{r:#?}");
    let p = &r.publishers[0];
    assert!(
        p.seen > 0 && p.lost == 0 && p.stored == p.published,
        "{p:#?}"
    );

    // Still stopped when `settle` runs out: not stored after waiting it.
    let short = env.path("short.toml");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("settle = \"20s\"", "settle = \"2s\"");
    std::fs::write(&short, text).unwrap();
    subscriber.signal(Signal::SIGSTOP);
    let (code, r, stderr) = validate(short.to_str().unwrap(), "1s");
    subscriber.signal(Signal::SIGCONT);
    assert_eq!(code, nbpy::exit::DATAERR, "{stderr}\n{r:#?}");
    assert!(
        r.breaches.iter().any(|b| b.contains("publisher synth")
            && b.contains("seen on the bus and still not stored after waiting")),
        "{:?}",
        r.breaches
    );
}

/// A publisher whose clock is an hour ahead of the validator's, running
/// since before the window: its epoch (its start time by its own clock)
/// lies in the validator's future, which must not make the validator
/// count its messages from `seq` 1 and call the earlier ones lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_clock_ahead_does_not_make_earlier_messages_lost() {
    const HOUR: i64 = 3600 * 1_000_000_000;
    let env = Env::start().await;
    let mut bus = nbpy::bus::BusPublisher::bind(&free_endpoint())
        .await
        .unwrap();
    let ep = bus.endpoint.clone();
    let cfg = env.config(&format!(
        r#"
[validate]
settle = "10s"

[publishers.fake]
feed = "kraken-tick"
endpoint = "{ep}"

[subscribers.main]
connect = ["{ep}"]
stats_interval = "1s"
"#
    ));
    let cfg = cfg.to_str().unwrap();
    let _subscriber = env.spawn("nbpy-subscriber", &["--config", cfg, "main"], &[]);
    let sender = tokio::spawn(async move {
        while bus.subscribers() == 0 {
            bus.next_subscription().await;
        }
        // Started 30 min ago by its own clock, which is an hour fast.
        let epoch = (nbpy::wire::now_ns() + HOUR - HOUR / 2) as u64;
        let mut buf = Vec::new();
        for seq in 5_000u64.. {
            let now = nbpy::wire::now_ns() + HOUR;
            let mut env = nbpy::wire::Envelope::new(
                "kraken",
                "ticker",
                "BTC/USD",
                now,
                vec![
                    ("bid".into(), nbpy::wire::Value::Float(100.0)),
                    ("ask".into(), nbpy::wire::Value::Float(101.0)),
                    ("last".into(), nbpy::wire::Value::Float(100.5)),
                ],
            );
            env.publisher = "fake".into();
            env.seq = seq;
            env.epoch = epoch;
            env.rx = now;
            let sent = bus
                .publish(&env, nbpy::config::Codec::V1, &mut buf)
                .unwrap();
            if !sent {
                // Held for a full subscriber: through before the next one.
                while let Some(wait) = bus.retry() {
                    wait.wait().await;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    assert!(env.wait_for_points(1, Duration::from_secs(30)).await > 0);
    let (code, r, stderr) = validate(cfg, "2s");
    sender.abort();
    assert_eq!(code, 0, "{stderr}\n{r:#?}");
    let p = &r.publishers[0];
    assert!(p.seen > 0, "{p:#?}");
    assert!(p.epochs[0].first_seq > 5_000, "{:?}", p.epochs);
    assert_eq!((p.published, p.stored, p.lost), (p.seen, p.seen, 0));
}

/// An HTTP server that answers `/ping` as InfluxDB does and refuses every
/// other request with 401, as InfluxDB with auth on refuses a wrong password.
fn refusing_influxdb() -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&req).contains("\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let head = String::from_utf8_lossy(&req).to_string();
            let (status, body) = if head.starts_with("GET /ping") || head.starts_with("HEAD /ping")
            {
                ("204 No Content", "")
            } else {
                ("401 Unauthorized", "{\"error\":\"authorization failed\"}")
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nX-Influxdb-Version: 1.8.10\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

/// InfluxDB refusing the credentials exits 77 (NOPERM), as elsewhere in
/// nbpy; a database that does not exist is named as missing, not as
/// InfluxDB being unreachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_exit_noperm_and_a_missing_database_is_named() {
    let env = Env::start().await;
    let (cfg, _p) = lone_publisher(&env, "synth", "rate = 200", "settle = \"2s\"");
    let refusing = refusing_influxdb();
    let (code, text) = validate_text(&cfg, "1s", &[("NBPY_INFLUXDB__URL", &refusing)]);
    assert_eq!(code, nbpy::exit::NOPERM, "{text}");
    assert!(text.contains("denied"), "{text}");
    assert!(!text.contains("unreachable"), "{text}");

    let (code, text) = validate_text(&cfg, "1s", &[("NBPY_INFLUXDB__DATABASE", "nosuchdb")]);
    assert_eq!(code, nbpy::exit::UNAVAILABLE, "{text}");
    assert!(
        text.contains("database \"nosuchdb\" does not exist"),
        "{text}"
    );
    assert!(text.contains("nbpy schema apply"), "{text}");
    assert!(!text.contains("unreachable"), "{text}");
}

/// A publisher bound to every address (`tcp://*:PORT`, as in a container)
/// is listened to on loopback: `*` names no host to connect to, and the
/// validator used to fail on it with exit 69.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_bound_to_every_address_is_reached_on_loopback() {
    let env = Env::start().await;
    let port = free_test_port();
    let cfg = env.config(&format!(
        r#"
[validate]
settle = "20s"

[publishers.synth]
endpoint = "tcp://*:{port}"
rate = 2000
wait_for_subscribers = 1

[subscribers.main]
connect = ["tcp://127.0.0.1:{port}"]
stats_interval = "1s"
"#
    ));
    let cfg = cfg.to_str().unwrap();
    let publisher = env.spawn("nbpy-publisher", &["--config", cfg, "synth"], &[]);
    publisher.wait_log("bound", Duration::from_secs(20));
    let subscriber = env.spawn("nbpy-subscriber", &["--config", cfg, "main"], &[]);
    subscriber.wait_log("ready", Duration::from_secs(20));
    assert!(env.wait_for_points(1, Duration::from_secs(30)).await > 0);
    let (code, r, stderr) = validate(cfg, "2s");
    assert_eq!(code, 0, "{stderr}\n{r:#?}");
    let p = &r.publishers[0];
    assert!(p.connected && p.seen > 0, "{p:#?}");
    assert_eq!(p.lost, 0);
}
