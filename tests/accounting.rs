//! The subscriber's own account of what it handled, against real parts (a
//! private influxd that is stopped, real publishers, a real NOTIFY_SOCKET):
//! the stop summary names every outcome and adds up, STATUS keeps coming
//! while intake is blocked, and loss it cannot count exactly is worded as
//! a bound, or said to be uncounted, never left silent.

mod common;

use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stop_summary_names_what_a_full_spool_dropped_and_adds_up() {
    const N: u64 = 20_000;
    let mut env = Env::start().await;
    let ep = free_endpoint();
    // InfluxDB is down throughout: everything goes to a 256 KiB spool that
    // deletes its oldest records to make room.
    let cfg = env.config(&format!(
        r#"batch_size = 500

[publishers.synth]
feed = "synthetic"
endpoint = "{ep}"
count = {N}
wait_for_subscribers = 1

[subscribers.main]
connect = ["{ep}"]
stats_interval = "1s"

[subscribers.main.spool]
max_bytes = 262144
segment_bytes = 65536
when_full = "drop-oldest"
"#
    ));
    let cfg = cfg.to_str().unwrap();
    env.stop_influx();
    let mut publisher = env.spawn("nbpy-publisher", &["--config", cfg, "synth"], &[]);
    publisher.wait_log("bound", Duration::from_secs(20));
    let mut subscriber = env.spawn("nbpy-subscriber", &["--config", cfg, "main"], &[]);
    publisher.wait_success(Duration::from_secs(120));
    subscriber.wait_log("when_full = drop-oldest", Duration::from_secs(60));
    subscriber.signal(Signal::SIGTERM);
    subscriber.wait_success(Duration::from_secs(60));

    let line = stop_summary(&subscriber.log_text(), "main");
    println!("{line}");
    assert_eq!(number_before(&line, " accepted,"), N, "{line}");
    assert!(
        line.contains(" dropped ("),
        "the summary names the dropped points: {line}"
    );
    let dropped = number_before(&line, " dropped (");
    assert!(dropped > 0, "{line}");
    assert!(line.contains("when_full = drop-oldest"), "{line}");
    assert!(line.contains("every point accounted for"), "{line}");
    assert!(!line.contains("DOES NOT ADD UP"), "{line}");
    // The balance, recomputed from the line's own numbers.
    let came = number_before(&line, " accepted +")
        + number_before(&line, " own nbpy_pipeline points")
        + number_before(&line, " left in the spool by an earlier run");
    let went = number_before(&line, " points written")
        + dropped
        + number_before(&line, " spooled for later");
    assert_eq!(came, went, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_keeps_coming_while_a_full_spool_blocks_intake() {
    // Batches fill up as messages come in: intake waits handing one over.
    blocked_by_a_full_spool("batch_size = 100", 2000).await;
}

/// The same at a rate that never fills a batch (the default 5,000 points):
/// batches are cut on the flush interval, in the main loop's tick, and the
/// wait for room is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_keeps_coming_while_a_full_spool_blocks_a_low_rate_intake() {
    blocked_by_a_full_spool("", 500).await;
}

async fn blocked_by_a_full_spool(influx_keys: &str, rate: u32) {
    let mut env = Env::start().await;
    let ep = free_endpoint();
    let cfg = env.config(&format!(
        r#"{influx_keys}

[publishers.synth]
feed = "synthetic"
endpoint = "{ep}"
rate = {rate}
count = 0
wait_for_subscribers = 1

[subscribers.main]
connect = ["{ep}"]
stats_interval = "1s"

[subscribers.main.spool]
max_bytes = 131072
segment_bytes = 65536
when_full = "block"
"#
    ));
    let cfg = cfg.to_str().unwrap();
    let sock_path = env.path("notify.sock");
    let mut sock = NotifyReader::bind(&sock_path);
    env.stop_influx();
    let mut publisher = env.spawn("nbpy-publisher", &["--config", cfg, "synth"], &[]);
    publisher.wait_log("bound", Duration::from_secs(20));
    let mut subscriber = env.spawn(
        "nbpy-subscriber",
        &["--config", cfg, "main"],
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    );
    subscriber.wait_log("spool full", Duration::from_secs(60));
    // Blocked for good (InfluxDB stays down): STATUS must say so, and keep
    // coming, with intake's real rate.
    let first = sock.until("saying INTAKE BLOCKED", Duration::from_secs(30), |s| {
        s.contains("INTAKE BLOCKED")
    });
    assert!(first.contains("spool full"), "{first}");
    let later = sock.during(Duration::from_secs(4));
    assert!(
        later.len() >= 2,
        "STATUS kept coming while blocked: {later:?}"
    );
    let last = later.last().unwrap();
    println!("STATUS while blocked: {last}");
    assert!(last.contains("INTAKE BLOCKED"), "{last}");
    assert!(last.contains("; 0 msg/s,"), "nothing is accepted: {last}");

    subscriber.signal(Signal::SIGTERM);
    subscriber.wait_success(Duration::from_secs(60));
    publisher.signal(Signal::SIGTERM);
    publisher.wait_success(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_keeps_coming_while_a_full_queue_blocks_intake_without_a_spool() {
    let mut env = Env::start().await;
    let ep = free_endpoint();
    let cfg = env.config(&format!(
        r#"batch_size = 100
retry_max = "1s"

[publishers.synth]
feed = "synthetic"
endpoint = "{ep}"
rate = 2000
count = 0
wait_for_subscribers = 1

[subscribers.main]
connect = ["{ep}"]
stats_interval = "1s"
queue_batches = 1

[subscribers.main.spool]
enabled = false
"#
    ));
    let cfg = cfg.to_str().unwrap();
    let sock_path = env.path("notify.sock");
    let mut sock = NotifyReader::bind(&sock_path);
    let mut publisher = env.spawn("nbpy-publisher", &["--config", cfg, "synth"], &[]);
    publisher.wait_log("bound", Duration::from_secs(20));
    let mut subscriber = env.spawn(
        "nbpy-subscriber",
        &["--config", cfg, "main"],
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    );
    env.wait_stored(2_000, Duration::from_secs(120)).await;
    env.stop_influx();
    let first = sock.until("saying INTAKE BLOCKED", Duration::from_secs(60), |s| {
        s.contains("INTAKE BLOCKED")
    });
    println!("STATUS while blocked: {first}");
    assert!(first.contains("queue is full"), "{first}");
    let later = sock.during(Duration::from_secs(4));
    assert!(
        later.len() >= 2 && later.iter().all(|s| s.contains("INTAKE BLOCKED")),
        "STATUS kept coming while blocked: {later:?}"
    );

    // InfluxDB back: intake resumes, STATUS says so, and the stop is clean.
    env.start_influx_again();
    sock.until("without INTAKE BLOCKED", Duration::from_secs(60), |s| {
        !s.contains("INTAKE BLOCKED")
    });
    subscriber.signal(Signal::SIGTERM);
    subscriber.wait_success(Duration::from_secs(60));
    publisher.signal(Signal::SIGTERM);
    publisher.wait_success(Duration::from_secs(30));
}

/// Publisher and subscriber config at 2,000 msg/s, forever.
fn running_config(env: &Env) -> String {
    let ep = free_endpoint();
    env.config(&format!(
        r#"
[publishers.synth]
feed = "synthetic"
endpoint = "{ep}"
rate = 2000
count = 0
wait_for_subscribers = 1

[subscribers.main]
connect = ["{ep}"]
stats_interval = "1s"
"#
    ))
    .to_str()
    .unwrap()
    .to_string()
}

/// Waits until the subscriber has saved a position for some publisher: a
/// kill before that leaves nothing to resume from (a loaded machine can
/// store points before the tick that saves their position has run).
fn wait_saved_position(env: &Env) {
    let path = env.path("state").join("seen").join("main.json");
    let t0 = std::time::Instant::now();
    while !std::fs::read_to_string(&path)
        .unwrap_or_default()
        .contains("\"positions\":[[")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no position saved in {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_counted_from_a_crash_position_are_worded_as_an_upper_bound() {
    let env = Env::start().await;
    let cfg = running_config(&env);
    let cfg = cfg.as_str();
    let mut publisher = env.spawn("nbpy-publisher", &["--config", cfg, "synth"], &[]);
    publisher.wait_log("bound", Duration::from_secs(20));
    let mut first = env.spawn_as("main-1", "nbpy-subscriber", &["--config", cfg, "main"]);
    env.wait_stored(4_000, Duration::from_secs(120)).await;
    wait_saved_position(&env);
    first.signal(Signal::SIGKILL);
    first.wait(Duration::from_secs(10));

    // The publisher runs on (same epoch): what it sent meanwhile, and what
    // the killed process held, is a gap counted from the saved position.
    let mut second = env.spawn_as("main-2", "nbpy-subscriber", &["--config", cfg, "main"]);
    second.wait_log("missing from publisher", Duration::from_secs(60));
    let log = second.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("missing from publisher"))
        .unwrap_or_default();
    assert!(
        line.contains("at most ") && line.contains("may have been stored"),
        "a count from the resumed position is an upper bound: {line}"
    );
    second.signal(Signal::SIGTERM);
    second.wait_success(Duration::from_secs(60));
    publisher.signal(Signal::SIGTERM);
    publisher.wait_success(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_restart_while_the_subscriber_was_down_is_reported_not_silent() {
    let env = Env::start().await;
    let cfg = running_config(&env);
    let cfg = cfg.as_str();
    let mut publisher = env.spawn_as("pub-1", "nbpy-publisher", &["--config", cfg, "synth"]);
    publisher.wait_log("bound", Duration::from_secs(20));
    let mut first = env.spawn_as("main-1", "nbpy-subscriber", &["--config", cfg, "main"]);
    env.wait_stored(4_000, Duration::from_secs(120)).await;
    wait_saved_position(&env);
    // The crash, then the publisher restarts while no subscriber runs.
    first.signal(Signal::SIGKILL);
    first.wait(Duration::from_secs(10));
    publisher.signal(Signal::SIGTERM);
    publisher.wait_success(Duration::from_secs(30));
    let mut publisher = env.spawn_as("pub-2", "nbpy-publisher", &["--config", cfg, "synth"]);
    publisher.wait_log("bound", Duration::from_secs(20));
    let mut second = env.spawn_as("main-2", "nbpy-subscriber", &["--config", cfg, "main"]);
    let warning = "restarted while this subscriber was down";
    second.wait_log(warning, Duration::from_secs(60));
    let log = second.log_text();
    let line = log
        .lines()
        .find(|l| l.contains(warning))
        .unwrap_or_default();
    assert!(
        line.contains("WARN") && line.contains("\"synth\"") && line.contains("cannot be counted"),
        "{line}"
    );
    let seen = std::fs::read_to_string(env.path("state").join("seen").join("main.json"))
        .unwrap_or_default();
    println!("{line}\nposition now: {seen}");

    // A restart while the subscriber runs is counted exactly, as before:
    // no second warning.
    let before = env.count_data().await;
    publisher.signal(Signal::SIGTERM);
    publisher.wait_success(Duration::from_secs(30));
    let mut publisher = env.spawn_as("pub-3", "nbpy-publisher", &["--config", cfg, "synth"]);
    publisher.wait_log("bound", Duration::from_secs(20));
    // The new epoch's messages are stored only after the subscriber saw them.
    let stored_then = env.count_data().await;
    env.wait_stored(stored_then.max(before) + 4_000, Duration::from_secs(120))
        .await;
    second.signal(Signal::SIGTERM);
    second.wait_success(Duration::from_secs(60));
    publisher.signal(Signal::SIGTERM);
    publisher.wait_success(Duration::from_secs(30));

    let log = second.log_text();
    assert_eq!(log.matches(warning).count(), 1, "{log}");
    let line = stop_summary(&log, "main");
    assert!(
        line.contains(", 1 publisher restart(s) with uncounted loss"),
        "{line}"
    );

    // After a clean stop the saved position is exact, and what the
    // publisher sent later it counted as sent to no subscriber: a publisher
    // restart in between is no unknown loss (it was one warning per
    // routine `systemctl restart nbpy.target`).
    let before = env.count_data().await;
    let mut publisher = env.spawn_as("pub-4", "nbpy-publisher", &["--config", cfg, "synth"]);
    publisher.wait_log("bound", Duration::from_secs(20));
    let mut third = env.spawn_as("main-3", "nbpy-subscriber", &["--config", cfg, "main"]);
    env.wait_stored(before + 4_000, Duration::from_secs(120))
        .await;
    third.signal(Signal::SIGTERM);
    third.wait_success(Duration::from_secs(60));
    publisher.signal(Signal::SIGTERM);
    publisher.wait_success(Duration::from_secs(30));
    let log = third.log_text();
    assert!(!log.contains(warning), "after a clean stop:\n{log}");
    let line = stop_summary(&log, "main");
    assert!(!line.contains("uncounted loss"), "{line}");
}

/// Two publishers with one name (one config deployed on two hosts, or a
/// standby left running) and a subscriber connected to both: each
/// publisher process is a stream of its own (name + epoch). Their
/// alternating epochs used to pass for a restart per message, each one
/// "missing" `seq - 1` messages: millions of gaps for nothing lost.
/// Both publishers wait for the subscriber, so everything they send until
/// it stops reaches it: the first run has no gap at all. After its clean
/// stop, both positions are saved and resumed: the second run's gaps are
/// exactly what the two sent to no subscriber meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_live_publishers_of_one_name_count_no_false_gaps() {
    let env = Env::start().await;
    let (ep_a, ep_b) = (free_endpoint(), free_endpoint());
    let publisher_config = |host: &str, ep: &str| {
        let p = env.path(&format!("{host}.toml"));
        let text = format!(
            "state_dir = {:?}\n\n[publishers.synth]\nfeed = \"synthetic\"\nendpoint = \"{ep}\"\nrate = 1000\ncount = 0\nwait_for_subscribers = 1\n",
            env.path(&format!("state-{host}")).display().to_string()
        );
        std::fs::write(&p, text).expect("write config");
        p.to_str().expect("utf-8 path").to_string()
    };
    let (cfg_a, cfg_b) = (publisher_config("a", &ep_a), publisher_config("b", &ep_b));
    let cfg = env.config(&format!(
        r#"
[subscribers.main]
connect = ["{ep_a}", "{ep_b}"]
stats_interval = "1s"
"#
    ));
    let cfg = cfg.to_str().unwrap();
    let mut pub_a = env.spawn_as("pub-a", "nbpy-publisher", &["--config", &cfg_a, "synth"]);
    pub_a.wait_log("bound", Duration::from_secs(20));
    let mut pub_b = env.spawn_as("pub-b", "nbpy-publisher", &["--config", &cfg_b, "synth"]);
    pub_b.wait_log("bound", Duration::from_secs(20));

    let mut first = env.spawn_as("main-1", "nbpy-subscriber", &["--config", cfg, "main"]);
    env.wait_stored(4_000, Duration::from_secs(120)).await;
    first.signal(Signal::SIGTERM);
    first.wait_success(Duration::from_secs(60));
    let log = first.log_text();
    let line = stop_summary(&log, "main");
    println!("first run: {line}");
    assert_eq!(number_before(&line, " gaps"), 0, "{line}");
    assert!(!log.contains("missing from publisher"), "{log}");
    let warning = "two live publishers named \"synth\"";
    assert_eq!(log.matches(warning).count(), 1, "{log}");
    println!(
        "{}",
        log.lines()
            .find(|l| l.contains(warning))
            .unwrap_or_default()
    );
    assert!(
        line.contains(", 1 publisher name(s) shared by two live publishers"),
        "{line}"
    );
    let seen = std::fs::read_to_string(env.path("state").join("seen").join("main.json"))
        .unwrap_or_default();
    assert_eq!(
        seen.matches("[\"synth\",").count(),
        2,
        "both streams saved: {seen}"
    );

    // Down for a while: what both publishers send meanwhile goes to no
    // subscriber, and is the second run's gap, exactly.
    let stored = env.count_data().await;
    let mut second = env.spawn_as("main-2", "nbpy-subscriber", &["--config", cfg, "main"]);
    env.wait_stored(stored + 4_000, Duration::from_secs(120))
        .await;
    // The publishers stop first: all they sent to the subscriber is then
    // in, and what they sent to no subscriber is only the downtime's.
    let mut unheard = 0;
    for p in [&mut pub_a, &mut pub_b] {
        p.signal(Signal::SIGTERM);
        p.wait_success(Duration::from_secs(30));
        let log = p.log_text();
        let sent = log
            .lines()
            .find(|l| l.contains("publisher synth: sent"))
            .unwrap_or_else(|| panic!("no stop line in\n{log}"))
            .to_string();
        unheard += number_before(&sent, " to no subscriber");
    }
    second.signal(Signal::SIGTERM);
    second.wait_success(Duration::from_secs(60));
    let log = second.log_text();
    let line = stop_summary(&log, "main");
    println!("second run: {line}");
    assert!(unheard > 0, "the subscriber was down a while");
    assert_eq!(number_before(&line, " gaps"), unheard, "{line}");
    assert!(!log.contains("restart"), "{log}");
    // Both resumed and both heard: still said, by this run too.
    assert_eq!(log.matches(warning).count(), 1, "{log}");
    assert!(
        line.contains(", 1 publisher name(s) shared by two live publishers"),
        "{line}"
    );
}

/// The record a replay writer holds while InfluxDB is down (the probe) used
/// to lose its segment to drop-oldest; given back at a stop, it vanished
/// from every counter (the stop summary above came out one batch short).
/// Its segment now stays, and the spool's account balances.
#[test]
fn a_record_in_flight_keeps_its_segment_and_the_spool_balances() {
    use nbpy::sink::spool::{Appended, Fsync, Spool, SpoolOptions, HEADER_LEN, RECORD_HEADER};
    let d = tempfile::tempdir().expect("tempdir");
    let lines: Vec<u8> = (0..10)
        .flat_map(|i| format!("m,t=x f={i}i {i}\n").into_bytes())
        .collect();
    let rec_len = RECORD_HEADER + 5 + "default".len() as u64 + lines.len() as u64;
    let opts = SpoolOptions {
        dir: d.path().to_path_buf(),
        max_bytes: 3 * (HEADER_LEN + 2 * rec_len),
        segment_bytes: HEADER_LEN + 2 * rec_len,
        fsync: Fsync::Batch,
        when_full: nbpy::config::WhenFull::DropOldest,
    };
    let (mut s, _) = Spool::open(opts).expect("open");
    for _ in 0..6 {
        s.append("default", 10, &lines, false).expect("append");
    }
    let probe = s.next_record().expect("read").expect("a record");
    assert_eq!(
        s.append("default", 10, &lines, false).expect("append"),
        Appended::Stored { dropped: 20 },
        "the segment of the record in flight stays; the next oldest goes"
    );
    s.release(probe.segment, probe.points);
    assert_eq!(
        s.counters.dropped_points, 20,
        "the released one is not dropped"
    );
    // What is left balances: 7 appended = 2 dropped + 5 held (the released
    // one among them, on disk for the next start).
    assert_eq!(s.points(), 50);
}
