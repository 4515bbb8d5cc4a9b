//! Durable delivery with a real influxd that is stopped, restarted and
//! refuses points, and a subscriber that is killed: nothing accepted is
//! lost, nothing is stored twice, and what cannot be stored is accounted for.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

const DATA: [&str; 5] = [
    "kraken_tick",
    "kraken_depth",
    "kraken_orders",
    "oanda_tick",
    "betfair_stream",
];

fn spool_dir(env: &Env) -> PathBuf {
    env.path("state").join("spool").join("main")
}

/// (points, distinct seqs) over the data measurements.
async fn stored(env: &Env) -> (u64, u64) {
    let (mut n, mut d) = (0, 0);
    for m in DATA {
        n += env.count(m).await;
        d += env.count_distinct_seq(m).await;
    }
    (n, d)
}

fn wait_until(what: &str, deadline: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn influxdb_down_for_20s_under_load_every_message_lands_exactly_once() {
    const N: u64 = 600_000;
    let mut env = Env::start().await;
    let ep = free_endpoint();
    // retry_max 1 s: the probe notices InfluxDB's return within a second, so
    // the drain time below measures replay, not the default 10 s backoff cap.
    let cfg = env.config(&format!(
        r#"retry_max = "1s"

[publishers.synth]
feed = "synthetic"
endpoint = "{ep}"
rate = 20000
count = {N}
wait_for_subscribers = 1

[subscribers.main]
connect = ["{ep}"]
stats_interval = "1s"
"#
    ));
    let cfg = cfg.to_str().unwrap();
    let mut publisher = env.spawn("nbpy-publisher", &["--config", cfg, "synth"], &[]);
    publisher.wait_log("bound", Duration::from_secs(20));
    let mut subscriber = env.spawn("nbpy-subscriber", &["--config", cfg, "main"], &[]);

    env.wait_stored(40_000, Duration::from_secs(120)).await;
    env.stop_influx();
    let down = Instant::now();
    let dir = spool_dir(&env);
    let mut high_water = 0u64;
    // The outage itself: 20 s of wall time, watching the spool grow.
    while down.elapsed() < Duration::from_secs(20) {
        high_water = high_water.max(spool_files(&dir).1);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(high_water > 0, "nothing was spooled during the outage");
    let ready_in = env.start_influx_again();
    let up = Instant::now();
    let mut drained_in = None;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(300) {
        let (files, bytes) = spool_files(&dir);
        high_water = high_water.max(bytes);
        if files == 0 {
            drained_in = Some(up.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let drained_in = drained_in.expect("the spool never drained");

    let status = publisher.wait(Duration::from_secs(300));
    assert!(status.success(), "publisher: {status}");
    let n = env.wait_stored(N, Duration::from_secs(300)).await;
    subscriber.signal(Signal::SIGTERM);
    let status = subscriber.wait(Duration::from_secs(60));
    assert!(
        status.success(),
        "subscriber: {status}\n{}",
        subscriber.log_text()
    );

    // Exactly once: N points, N distinct sequence numbers, a fifth each.
    assert_eq!(n, N);
    assert_eq!(stored(&env).await, (N, N));
    for m in DATA {
        assert_eq!(env.count_distinct_seq(m).await, N / 5, "{m}");
    }
    let c = env
        .pipeline_last(
            "main",
            &[
                "spooled",
                "replayed",
                "dropped",
                "dead_lettered",
                "gaps",
                "received",
            ],
        )
        .await;
    let (spooled, replayed) = (c[0].unwrap_or(0), c[1].unwrap_or(0));
    assert!(spooled > 0, "{c:?}");
    assert_eq!(replayed, spooled, "every spooled point was replayed: {c:?}");
    assert_eq!(&c[2..], &[Some(0), Some(0), Some(0), Some(N as i64)]);
    println!(
        "outage 20 s at 20000 msg/s: {spooled} points spooled, spool high-water {:.1} MB, \
         influxd ready {:.1} s after restart, spool drained {:.1} s after restart",
        high_water as f64 / 1e6,
        ready_in.as_secs_f64(),
        drained_in.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_subscriber_resumes_its_spool_and_reports_what_it_missed_as_a_gap() {
    const N: u64 = 200_000;
    let mut env = Env::start().await;
    let ep = free_endpoint();
    let cfg = env.config(&format!(
        r#"retry_max = "1s"

[publishers.synth]
feed = "synthetic"
endpoint = "{ep}"
rate = 20000
count = {N}
wait_for_subscribers = 1

[subscribers.main]
connect = ["{ep}"]
stats_interval = "1s"
"#
    ));
    let cfg = cfg.to_str().unwrap();
    let mut publisher = env.spawn("nbpy-publisher", &["--config", cfg, "synth"], &[]);
    publisher.wait_log("bound", Duration::from_secs(20));
    let mut first = env.spawn_as("main-1", "nbpy-subscriber", &["--config", cfg, "main"]);
    env.wait_stored(20_000, Duration::from_secs(120)).await;

    // InfluxDB goes away; the subscriber spools; then it is killed outright.
    env.stop_influx();
    let dir = spool_dir(&env);
    wait_until("10 MB spooled", Duration::from_secs(120), || {
        spool_files(&dir).1 >= 10_000_000
    });
    first.signal(Signal::SIGKILL);
    let status = first.wait(Duration::from_secs(10));
    assert!(!status.success());
    let (files, bytes) = spool_files(&dir);
    assert!(files > 0);
    let seen = env.path("state").join("seen").join("main.json");
    let seen = std::fs::read_to_string(seen).unwrap_or_default();
    println!("safe position at the kill: {seen}");
    // Down for a second (the scenario, not synchronisation): the publisher
    // keeps sending and ZeroMQ has nobody to deliver to.
    std::thread::sleep(Duration::from_secs(1));

    let mut second = env.spawn_as("main-2", "nbpy-subscriber", &["--config", cfg, "main"]);
    second.wait_log("to replay", Duration::from_secs(30));
    second.wait_log("ready", Duration::from_secs(30));
    env.start_influx_again();
    let status = publisher.wait(Duration::from_secs(300));
    assert!(status.success(), "publisher: {status}");
    wait_until("the spool to drain", Duration::from_secs(300), || {
        spool_files(&dir).0 == 0
    });
    second.signal(Signal::SIGTERM);
    let status = second.wait(Duration::from_secs(60));
    assert!(
        status.success(),
        "subscriber: {status}\n{}",
        second.log_text()
    );

    let (n, distinct) = stored(&env).await;
    assert_eq!(n, distinct, "no sequence number stored twice");
    let missing = N - n;
    let c = env.pipeline_last("main", &["gaps", "replayed"]).await;
    let (gaps, replayed) = (c[0].unwrap_or(0) as u64, c[1].unwrap_or(0) as u64);
    assert!(replayed > 0, "the restarted subscriber replayed its spool");
    assert!(missing > 0, "a second without a subscriber loses messages");
    assert!(
        gaps >= missing,
        "every missing message is reported: {missing} missing, {gaps} reported as gaps\n{}",
        second.log_text()
    );
    assert!(second.log_text().contains("missing from publisher"));
    println!(
        "kill -9 while spooling ({files} segments, {:.1} MB on disk): {n} of {N} stored once, \
         {missing} lost (sent while no subscriber was connected, or only in the killed \
         process's memory), {gaps} reported as gaps (over by {}), {replayed} points \
         replayed after restart",
        bytes as f64 / 1e6,
        gaps - missing
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_type_conflicts_are_dead_lettered_and_the_rest_is_stored() {
    const N: u64 = 2_000;
    let env = Env::start().await;
    // An earlier writer stored kraken_tick.bid as an integer: every float
    // `bid` in the same shard is now a field-type conflict. One point now
    // and one half an hour ahead cover a shard boundary during the test.
    let now = nbpy::wire::now_ns();
    let pre = format!(
        "kraken_tick,instrument=OLD bid=1i {now}\nkraken_tick,instrument=OLD bid=1i {}\n",
        now + 1_800_000_000_000
    );
    env.client.write("default", pre.into()).await.unwrap();
    let ep = free_endpoint();
    let cfg = env.config(&format!(
        r#"
[publishers.synth]
feed = "synthetic"
endpoint = "{ep}"
count = {N}
wait_for_subscribers = 1

[subscribers.main]
connect = ["{ep}"]
stats_interval = "1s"
"#
    ));
    let cfg = cfg.to_str().unwrap();
    let mut publisher = env.spawn("nbpy-publisher", &["--config", cfg, "synth"], &[]);
    publisher.wait_log("bound", Duration::from_secs(20));
    let mut subscriber = env.spawn("nbpy-subscriber", &["--config", cfg, "main"], &[]);
    publisher.wait_success(Duration::from_secs(120));
    env.wait_stored(N / 5 * 4, Duration::from_secs(120)).await;
    let dead = env.path("state").join("dead-letter").join("main.lp");
    wait_until("the dead letters", Duration::from_secs(60), || {
        dead_lines(&dead).0 >= (N / 5) as usize
    });
    subscriber.signal(Signal::SIGTERM);
    let status = subscriber.wait(Duration::from_secs(60));
    assert!(
        status.success(),
        "subscriber: {status}\n{}",
        subscriber.log_text()
    );

    assert_eq!(env.count("kraken_tick").await, 0);
    for m in &DATA[1..] {
        assert_eq!(env.count(m).await, N / 5, "{m}");
    }
    let (lines, reasons) = dead_lines(&dead);
    assert_eq!(lines, (N / 5) as usize, "every refused point, once");
    assert!(!reasons.is_empty());
    for r in &reasons {
        assert!(
            r.contains("field type conflict") && r.contains("\"bid\""),
            "{r}"
        );
    }
    let text = std::fs::read_to_string(&dead).unwrap();
    assert!(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .all(|l| l.starts_with("kraken_tick,")));
    let c = env.pipeline_last("main", &["dead_lettered"]).await;
    assert_eq!(c[0], Some((N / 5) as i64));
    // The stop summary accounts for them too.
    let log = subscriber.log_text();
    let want = format!(
        "points written, {} refused by InfluxDB (dead-letter file),",
        N / 5
    );
    assert!(
        log.lines()
            .any(|l| l.contains("stopped in") && l.contains(&want)),
        "{log}"
    );
}

/// Points InfluxDB refuses while the dead-letter file cannot be written
/// (a regular file where its directory should be) are lost, and counted
/// and logged so: the stop summary used to count them "refused by InfluxDB
/// (dead-letter file)", in a file that did not exist, and the log said
/// "kept in" it before the write was even tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_points_the_dead_letter_file_cannot_take_are_counted_lost() {
    const N: u64 = 2_000;
    let env = Env::start().await;
    let now = nbpy::wire::now_ns();
    let pre = format!(
        "kraken_tick,instrument=OLD bid=1i {now}\nkraken_tick,instrument=OLD bid=1i {}\n",
        now + 1_800_000_000_000
    );
    env.client.write("default", pre.into()).await.unwrap();
    std::fs::create_dir_all(env.path("state")).unwrap();
    let in_the_way = env.path("state").join("dead-letter");
    std::fs::write(&in_the_way, b"not a directory").unwrap();
    let ep = free_endpoint();
    let cfg = env.config(&format!(
        r#"
[publishers.synth]
feed = "synthetic"
endpoint = "{ep}"
count = {N}
wait_for_subscribers = 1

[subscribers.main]
connect = ["{ep}"]
stats_interval = "1s"
"#
    ));
    let cfg = cfg.to_str().unwrap();
    let mut publisher = env.spawn("nbpy-publisher", &["--config", cfg, "synth"], &[]);
    publisher.wait_log("bound", Duration::from_secs(20));
    let mut subscriber = env.spawn("nbpy-subscriber", &["--config", cfg, "main"], &[]);
    publisher.wait_success(Duration::from_secs(120));
    env.wait_stored(N / 5 * 4, Duration::from_secs(120)).await;
    subscriber.wait_log("refused by InfluxDB are lost", Duration::from_secs(60));
    subscriber.signal(Signal::SIGTERM);
    subscriber.wait_success(Duration::from_secs(60));

    assert_eq!(env.count("kraken_tick").await, 0);
    assert_eq!(
        std::fs::read(&in_the_way).unwrap(),
        b"not a directory",
        "nothing was kept"
    );
    let log = subscriber.log_text();
    assert!(!log.contains("kept in"), "{log}");
    let line = stop_summary(&log, "main");
    println!("{line}");
    assert_eq!(
        number_before(
            &line,
            " refused by InfluxDB and lost (the dead-letter file could not be written)"
        ),
        N / 5,
        "{line}"
    );
    assert!(!line.contains("(dead-letter file)"), "{line}");
    assert!(line.contains("every point accounted for"), "{line}");
    // ...and reported, for health and the dashboards: they were in no
    // field of nbpy_pipeline, and health (which watches refused points)
    // called the subscriber ready.
    assert_eq!(
        env.pipeline_last("main", &["refused_lost", "dead_lettered"])
            .await,
        vec![Some(N as i64 / 5), Some(0)]
    );
}

/// (point lines, reason comments) in a dead-letter file.
fn dead_lines(path: &Path) -> (usize, Vec<String>) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let reasons = text
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(str::to_string)
        .collect();
    (
        text.lines().filter(|l| !l.starts_with('#')).count(),
        reasons,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_spool_is_replayed_up_to_the_damage() {
    use nbpy::sink::spool::{Fsync, Spool, SpoolOptions, HEADER_LEN, RECORD_HEADER};
    use std::os::unix::fs::FileExt;

    let env = Env::start().await;
    let dir = spool_dir(&env);
    // A spool left by an earlier run: 3 segments of 10 records of 10 points.
    let now = nbpy::wire::now_ns();
    let record = |r: u64| -> Vec<u8> {
        (0..10)
            .map(|i| {
                let seq = r * 10 + i + 1;
                format!(
                    "kraken_tick,instrument=T,publisher=old,source=test bid=1.5,seq={seq:06}i,epoch=1i {}\n",
                    now + seq as i64
                )
            })
            .collect::<String>()
            .into_bytes()
    };
    let rec_len = RECORD_HEADER + 5 + "default".len() as u64 + record(0).len() as u64;
    let opts = SpoolOptions {
        dir: dir.clone(),
        max_bytes: 1 << 30,
        segment_bytes: HEADER_LEN + 10 * rec_len,
        fsync: Fsync::Batch,
        when_full: nbpy::config::WhenFull::Block,
    };
    let (mut spool, _) = Spool::open(opts).unwrap();
    for r in 0..30 {
        spool.append("default", 10, &record(r), false).unwrap();
    }
    drop(spool);
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segs.sort();
    assert_eq!(segs.len(), 3);
    // A flipped byte inside record 5 of the second segment...
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&segs[1])
        .unwrap();
    let at = HEADER_LEN + 5 * rec_len + RECORD_HEADER + 40;
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0xff], at).unwrap();
    // ...and the third segment torn in its last record.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&segs[2])
        .unwrap();
    f.set_len(HEADER_LEN + 10 * rec_len - 3).unwrap();
    drop(f);
    let expected = 10 * 10 + 5 * 10 + 9 * 10;

    let cfg = env.config(&format!(
        "\n[subscribers.main]\nconnect = [\"{}\"]\nstats_interval = \"1s\"\n",
        free_endpoint()
    ));
    let cfg = cfg.to_str().unwrap();
    let mut subscriber = env.spawn("nbpy-subscriber", &["--config", cfg, "main"], &[]);
    wait_until("the spool to drain", Duration::from_secs(60), || {
        spool_files(&dir).0 == 0
    });
    subscriber.signal(Signal::SIGTERM);
    let status = subscriber.wait(Duration::from_secs(60));
    assert!(
        status.success(),
        "subscriber: {status}\n{}",
        subscriber.log_text()
    );

    assert_eq!(env.count("kraken_tick").await, expected);
    assert_eq!(env.count_distinct_seq("kraken_tick").await, expected);
    let log = subscriber.log_text();
    assert!(log.contains("checksum mismatch"), "{log}");
    assert!(log.contains("torn record"), "{log}");
    // What is cut says whether its loss is counted: a corrupted record was
    // safe (no gap will show it), a torn one was not (the gap covers it).
    let said = |needle: &str| {
        log.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle:?} in {log}"))
            .to_string()
    };
    assert!(
        said("checksum mismatch").contains("cannot be counted"),
        "{log}"
    );
    assert!(said("torn record").contains("sequence gap"), "{log}");
    for s in &segs[1..] {
        let mut d = s.as_os_str().to_owned();
        d.push(".damaged");
        assert!(Path::new(&d).exists(), "the cut bytes are kept for a human");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_database_is_reported_in_status_and_spooled_until_it_exists() {
    const N: u64 = 10_000;
    let env = Env::start().await;
    let ep = free_endpoint();
    let cfg = env.config(&format!(
        r#"retry_max = "1s"

[publishers.synth]
feed = "synthetic"
endpoint = "{ep}"
count = {N}
wait_for_subscribers = 1

[subscribers.main]
connect = ["{ep}"]
stats_interval = "1s"
"#
    ));
    let cfg = cfg.to_str().unwrap();
    let sock_path = env.path("notify.sock");
    let mut statuses = NotifyReader::bind(&sock_path);
    let sock_env = sock_path.to_str().unwrap();
    let mut publisher = env.spawn("nbpy-publisher", &["--config", cfg, "synth"], &[]);
    publisher.wait_log("bound", Duration::from_secs(20));
    // Phase 2 never ran for this database.
    let mut subscriber = env.spawn(
        "nbpy-subscriber",
        &["--config", cfg, "main"],
        &[
            ("NOTIFY_SOCKET", sock_env),
            ("NBPY_INFLUXDB__DATABASE", "elsewhere"),
        ],
    );
    let status = statuses.until("saying NEEDS ATTENTION", Duration::from_secs(60), |s| {
        s.contains("NEEDS ATTENTION")
    });
    assert!(status.contains("database not found"), "{status}");
    assert!(status.contains("nbpy schema apply"), "{status}");
    publisher.wait_success(Duration::from_secs(120));
    let dir = spool_dir(&env);
    wait_until("the data to be spooled", Duration::from_secs(60), || {
        spool_files(&dir).1 > 0
    });
    assert!(subscriber
        .log_text()
        .contains("needs attention: InfluxDB: database not found"));

    // A human runs phase 2: the spool drains into the new database.
    let other = nbpy::sink::influx::InfluxClient::new(&nbpy::config::InfluxConfig {
        url: env.influx.url(),
        database: "elsewhere".into(),
        ..Default::default()
    })
    .unwrap();
    nbpy::admin::schema::ensure(&other).await.unwrap();
    let count = || async {
        let mut n = 0;
        for m in DATA {
            let m = nbpy::schema::by_name(m).unwrap();
            let q = format!(
                "SELECT count(\"seq\") FROM \"elsewhere\".\"{}\".\"{}\"",
                m.rp, m.name
            );
            n += other.query_number(&q).await.unwrap_or(0.0) as u64;
        }
        n
    };
    let t0 = Instant::now();
    while count().await < N {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "only {} stored",
            count().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    subscriber.signal(Signal::SIGTERM);
    let st = subscriber.wait(Duration::from_secs(60));
    assert!(st.success(), "subscriber: {st}\n{}", subscriber.log_text());
    assert_eq!(count().await, N);
    assert_eq!(
        env.count_data().await,
        0,
        "nothing went to the wrong database"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_blocks_intake_and_a_stop_still_keeps_everything() {
    const N: u64 = 5_000;
    let mut env = Env::start().await;
    let ep = free_endpoint();
    // Small batches and a 128 KiB spool: a few records fill it.
    let cfg = env.config(&format!(
        r#"batch_size = 100
retry_max = "1s"

[publishers.synth]
feed = "synthetic"
endpoint = "{ep}"
count = {N}
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
    env.stop_influx();
    let mut publisher = env.spawn("nbpy-publisher", &["--config", cfg, "synth"], &[]);
    publisher.wait_log("bound", Duration::from_secs(20));
    let mut first = env.spawn_as("main-1", "nbpy-subscriber", &["--config", cfg, "main"]);
    first.wait_log("spool full", Duration::from_secs(60));
    let dir = spool_dir(&env);
    assert!(
        spool_files(&dir).1 <= 131072,
        "the limit holds while running"
    );
    // Everything is sent and sits in the blocked subscriber's memory (its
    // bus buffer holds more than N); a stop must not lose any of it.
    publisher.wait_success(Duration::from_secs(120));
    first.signal(Signal::SIGTERM);
    let status = first.wait(Duration::from_secs(60));
    assert!(
        status.success(),
        "a blocked subscriber still stops cleanly: {status}\n{}",
        first.log_text()
    );
    assert!(
        spool_files(&dir).1 > 131072,
        "the stop spooled past the limit rather than lose data"
    );

    env.start_influx_again();
    let mut second = env.spawn_as("main-2", "nbpy-subscriber", &["--config", cfg, "main"]);
    let t0 = Instant::now();
    while env.count_data().await < N && t0.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let n = env.count_data().await;
    assert_eq!(
        n,
        N,
        "stored\nfirst run:\n{}\nsecond run:\n{}",
        first.log_text(),
        second.log_text()
    );
    wait_until("the spool to drain", Duration::from_secs(60), || {
        spool_files(&dir).0 == 0
    });
    second.signal(Signal::SIGTERM);
    second.wait_success(Duration::from_secs(60));
    assert_eq!(n, N);
    assert_eq!(stored(&env).await, (N, N));
    let gaps = env.pipeline_last("main", &["gaps"]).await[0];
    assert_eq!(gaps, Some(0), "nothing lost");
}

/// A spool that could not take data during an outage (its directory gone)
/// is an alarm while InfluxDB is down; once InfluxDB takes the writes
/// again and has stored what the spool refused (held in memory until
/// then), the alarm goes (it stayed until the next successful append,
/// which a healthy InfluxDB never asks for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_failure_alarm_ends_when_influxdb_takes_writes_again() {
    const N: u64 = 20_000;
    let mut env = Env::start().await;
    let ep = free_endpoint();
    let dir = env.path("spool-dir");
    let cfg = env.config(&format!(
        r#"retry_max = "1s"

[publishers.synth]
feed = "synthetic"
endpoint = "{ep}"
rate = 1000
count = {N}
wait_for_subscribers = 1

[subscribers.main]
connect = ["{ep}"]
stats_interval = "1s"

[subscribers.main.spool]
dir = "{}"
"#,
        dir.display()
    ));
    let cfg = cfg.to_str().unwrap();
    let mut status = NotifyReader::bind(&env.path("notify.sock"));
    let sock_env = env.path("notify.sock");
    let mut publisher = env.spawn("nbpy-publisher", &["--config", cfg, "synth"], &[]);
    publisher.wait_log("bound", Duration::from_secs(20));
    let mut subscriber = env.spawn(
        "nbpy-subscriber",
        &["--config", cfg, "main"],
        &[("NOTIFY_SOCKET", sock_env.to_str().unwrap())],
    );
    env.wait_stored(1_000, Duration::from_secs(60)).await;
    // No segment exists yet (nothing was spooled): the first append must
    // create one, in a directory that is now a file.
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::write(&dir, b"not a directory").unwrap();
    env.stop_influx();
    let failing = status.until("saying SPOOL FAILING", Duration::from_secs(60), |s| {
        s.contains("SPOOL FAILING")
    });
    println!("during the outage: {failing}");
    env.start_influx_again();
    // The points held in memory are retried with backoff (retry_max 1 s),
    // so the first STATUS after InfluxDB is back may still hold them.
    let healthy = status.until(
        "neither an InfluxDB failure nor a stale SPOOL FAILING alarm",
        Duration::from_secs(60),
        |s| !s.contains("InfluxDB failing") && !s.contains("SPOOL FAILING"),
    );
    println!("after the outage: {healthy}");
    publisher.wait_success(Duration::from_secs(120));
    env.wait_stored(N, Duration::from_secs(120)).await;
    subscriber.signal(Signal::SIGTERM);
    let st = subscriber.wait(Duration::from_secs(60));
    assert!(st.success(), "subscriber: {st}\n{}", subscriber.log_text());
    assert_eq!(stored(&env).await, (N, N), "everything, once");
}

/// A spool segment deleted while the subscriber runs (by hand, say) is
/// skipped when replay reaches it: its points are counted as dropped and
/// the later segments replay. Replay used to fail on the missing file over
/// and over, leaving every later segment unwritten until a restart, and
/// the stop summary counted the deleted points as spooled for later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_segment_deleted_while_running_is_skipped_and_counted() {
    const N: u64 = 10_000;
    let mut env = Env::start().await;
    let ep = free_endpoint();
    let cfg = env.config(&format!(
        r#"retry_max = "1s"

[publishers.synth]
feed = "synthetic"
endpoint = "{ep}"
rate = 5000
count = {N}
wait_for_subscribers = 1

[subscribers.main]
connect = ["{ep}"]
stats_interval = "1s"

[subscribers.main.spool]
max_bytes = 104857600
segment_bytes = 262144
"#
    ));
    let cfg = cfg.to_str().unwrap();
    env.stop_influx();
    let mut publisher = env.spawn("nbpy-publisher", &["--config", cfg, "synth"], &[]);
    publisher.wait_log("bound", Duration::from_secs(20));
    let mut subscriber = env.spawn("nbpy-subscriber", &["--config", cfg, "main"], &[]);
    publisher.wait_success(Duration::from_secs(120));
    let dir = spool_dir(&env);
    wait_until("4 segments", Duration::from_secs(60), || {
        spool_files(&dir).0 >= 4
    });
    // While InfluxDB is down only the first record is read (the probe):
    // the third segment is closed and unread. What it holds:
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segs.sort();
    let victim = segs[2].clone();
    let (points, data_lines) = segment_points(&victim);
    assert!(points > 0);
    std::fs::remove_file(&victim).unwrap();
    env.start_influx_again();
    wait_until("the spool to drain", Duration::from_secs(60), || {
        spool_files(&dir).0 == 0
    });
    subscriber.signal(Signal::SIGTERM);
    subscriber.wait_success(Duration::from_secs(60));
    let log = subscriber.log_text();
    let name = victim.display().to_string();
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains(&name) && l.contains("missing")),
        "{log}"
    );
    let line = stop_summary(&log, "main");
    println!("{line}");
    assert_eq!(number_before(&line, " dropped"), points, "{line}");
    assert_eq!(number_before(&line, " spooled for later"), 0, "{line}");
    assert!(line.contains("every point accounted for"), "{line}");
    assert_eq!(stored(&env).await, (N - data_lines, N - data_lines));
}

/// (points, data lines) in a closed spool segment, read as
/// `Spool::open` would: `[len][crc][points u32, rp_len u8, rp, lines]`.
fn segment_points(path: &Path) -> (u64, u64) {
    use nbpy::sink::spool::{HEADER_LEN, RECORD_HEADER};
    let b = std::fs::read(path).unwrap();
    let (mut at, mut points, mut data) = (HEADER_LEN as usize, 0, 0);
    while at < b.len() {
        let len = u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize;
        let p = &b[at + RECORD_HEADER as usize..at + RECORD_HEADER as usize + len];
        points += u32::from_le_bytes(p[..4].try_into().unwrap()) as u64;
        let lines = &p[5 + p[4] as usize..];
        data += String::from_utf8_lossy(lines)
            .lines()
            .filter(|l| !l.starts_with("nbpy_pipeline"))
            .count() as u64;
        at += RECORD_HEADER as usize + len;
    }
    (points, data)
}

/// A spooled record that InfluxDB takes only in part before it starts
/// failing, and a stop while the rest waits for a retry: the part written
/// and the part refused are delivered, and only the rest may stay spooled.
/// Keeping the whole record counted those points twice (the stop summary
/// said DOES NOT ADD UP for data that was fine) and sent them again at the
/// next start (refused points reached the dead-letter file twice).
///
/// The failure partway is InfluxDB's own: its cache limit
/// (`cache-max-memory-size`, 500 "cache-max-memory-size exceeded") set so
/// that the record's shard holds what the first pieces put in it and no
/// more. InfluxDB stores a partial write's good points, so the sizes below
/// follow the writer's steps: 16 bytes a value, a series key once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_record_cut_short_by_a_stop_keeps_only_its_rest_spooled() {
    use nbpy::sink::spool::{Fsync, Spool, SpoolOptions};

    let mut env = Env::start().await;
    let dir = spool_dir(&env);
    // Three days back: a shard (and a cache) of its own, apart from the
    // subscriber's own nbpy_pipeline points.
    let t = nbpy::wire::now_ns() - 3 * 86_400 * 1_000_000_000;
    let lines = |range: std::ops::RangeInclusive<i64>, f: &dyn Fn(i64) -> String| -> String {
        range.map(|i| f(i) + "\n").collect()
    };
    // 10 points InfluxDB refuses (kraken_tick.bid is an integer in that
    // shard), 100 it takes, and 1 beyond the 30-day retention policy.
    let refused = lines(1..=10, &|i| {
        format!("kraken_tick,instrument=NEW bid=1.5 {}", t + i)
    });
    let first = lines(1..=50, &|i| format!("replay_test,s=a seq={i}i {}", t + i));
    let second = lines(51..=100, &|i| format!("replay_test,s=a seq={i}i {}", t + i));
    let too_old = format!(
        "replay_test,s=a seq=999i {}\n",
        t - 300 * 86_400 * 1_000_000_000
    );

    // The writer's steps, and the cache of the record's shard after each:
    // the integer bid (16 + a 33-byte key) = 49; the whole record: partial
    // write, its 100 good points stored (+1600 + a 22-byte key) = 1671;
    // the refused 10 alone: nothing stored; the other 101: partial write
    // (beyond retention), 100 stored again = 3271; bisected, the first 50
    // written = 4071; the other 51 would make 4871: over the limit, 500.
    env.stop_influx();
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(env.path("influxd.log"))
        .expect("influxd log");
    let tuned = StopOnDrop(
        std::process::Command::new("influxd")
            .arg("run")
            .arg("-config")
            .arg(&env.influx.config)
            .env("INFLUXDB_DATA_CACHE_MAX_MEMORY_SIZE", "4471")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("influxd"),
    );
    wait_until(
        "influxd with a small cache",
        Duration::from_secs(60),
        || nbpy::backend::ping(&env.influx.addr),
    );
    env.client
        .write(
            "default",
            format!("kraken_tick,instrument=OLD bid=1i {t}\n").into(),
        )
        .await
        .expect("an integer bid");

    let opts = SpoolOptions {
        dir: dir.clone(),
        max_bytes: 1 << 30,
        segment_bytes: 1 << 20,
        fsync: Fsync::Batch,
        when_full: nbpy::config::WhenFull::Block,
    };
    let record = format!("{refused}{first}{second}{too_old}");
    let (mut spool, _) = Spool::open(opts.clone()).expect("spool");
    spool
        .append("default", 111, record.as_bytes(), false)
        .expect("append");
    drop(spool);

    let cfg = env.config(&format!(
        "retry_max = \"1s\"\n\n[subscribers.main]\nconnect = [\"{}\"]\nstats_interval = \"1s\"\n",
        free_endpoint()
    ));
    let cfg = cfg.to_str().unwrap();
    let dead = env.path("state").join("dead-letter").join("main.lp");
    let mut sub = env.spawn_as("main-1", "nbpy-subscriber", &["--config", cfg, "main"]);
    sub.wait_log("cache-max-memory-size exceeded", Duration::from_secs(60));
    wait_until("the refused points", Duration::from_secs(60), || {
        dead_lines(&dead).0 == 10
    });
    sub.signal(Signal::SIGTERM);
    sub.wait_success(Duration::from_secs(60));
    drop(tuned);

    let line = stop_summary(&sub.log_text(), "main");
    println!("{line}");
    assert!(line.contains("every point accounted for"), "{line}");
    assert_eq!(
        number_before(&line, " left in the spool by an earlier run"),
        111
    );
    assert_eq!(number_before(&line, " refused by InfluxDB"), 10, "{line}");
    assert!(number_before(&line, " points written") >= 50, "{line}");
    // The disk holds what the summary says: the 51 points not delivered
    // (and whatever own points the outage spooled), nothing written or
    // refused.
    let (mut spool, rec) = Spool::open(opts).expect("spool");
    assert_eq!(
        rec.points,
        number_before(&line, " spooled for later"),
        "{line}"
    );
    let mut left = String::new();
    while let Some(r) = spool.next_record().expect("read") {
        let text = String::from_utf8_lossy(&r.lines).to_string();
        if !text.starts_with("nbpy_pipeline") {
            assert_eq!(r.points as usize, text.lines().count(), "{text}");
            left.push_str(&text);
        }
    }
    drop(spool);
    assert_eq!(left, format!("{second}{too_old}"));

    // The next start sends the rest, once: nothing is refused twice.
    env.start_influx_again();
    let mut sub = env.spawn_as("main-2", "nbpy-subscriber", &["--config", cfg, "main"]);
    wait_until("the spool to drain", Duration::from_secs(60), || {
        spool_files(&dir).0 == 0
    });
    sub.signal(Signal::SIGTERM);
    sub.wait_success(Duration::from_secs(60));
    let line = stop_summary(&sub.log_text(), "main");
    println!("{line}");
    assert!(line.contains("every point accounted for"), "{line}");
    assert_eq!(number_before(&line, " refused by InfluxDB"), 1, "{line}");
    let q = "SELECT count(distinct(\"seq\")) FROM \"tick\".\"default\".\"replay_test\"";
    assert_eq!(env.client.query_number(q).await.expect("count"), 100.0);
    let text = std::fs::read_to_string(&dead).expect("dead letters");
    let kept: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(kept.len(), 11, "every refused point, once:\n{text}");
    assert_eq!(
        kept.iter()
            .filter(|l| l.starts_with("kraken_tick,"))
            .count(),
        10,
        "{text}"
    );
}
