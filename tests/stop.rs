//! A graceful stop under sustained load loses nothing: every message the
//! subscriber accepted is in InfluxDB afterwards, reconciled with `seq`.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_stores_every_accepted_message() {
    let env = Env::start().await;
    let ep = free_endpoint();
    let cfg = env.config(&format!(
        r#"
[publishers.synth]
endpoint = "{ep}"
rate = 20000
wait_for_subscribers = 1

[subscribers.main]
connect = ["{ep}"]
"#
    ));
    let cfg = cfg.to_str().unwrap();
    let mut publisher = env.spawn("nbpy-publisher", &["--config", cfg, "synth"], &[]);
    publisher.wait_log("bound", Duration::from_secs(20));
    let mut subscriber = env.spawn("nbpy-subscriber", &["--config", cfg, "main"], &[]);
    // Let it run under load until a good amount is stored.
    let so_far = env.wait_for_points(40_000, Duration::from_secs(120)).await;
    assert!(so_far >= 40_000, "pipeline too slow to test: {so_far}");

    let t0 = Instant::now();
    subscriber.signal(nix::sys::signal::Signal::SIGTERM);
    let status = subscriber.wait(Duration::from_secs(30));
    let stop_time = t0.elapsed();
    assert_eq!(status.code(), Some(0), "{}", subscriber.log_text());
    // The publisher keeps sending after the subscriber left (subscribers
    // stop first): to no one, and it counts those.
    std::thread::sleep(Duration::from_millis(300));
    publisher.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(publisher.wait(Duration::from_secs(30)).code(), Some(0));
    let (sent, to_subscribers, unheard) = publisher_counts(&publisher.log_text());

    // What the subscriber accepted, by its own final count …
    let q = "SELECT last(\"received\"), last(\"malformed\"), last(\"gaps\") FROM \"tick\".\"default\".\"nbpy_pipeline\" WHERE component = 'main'";
    let v = env.client.query(q).await.unwrap();
    let row = &v["results"][0]["series"][0]["values"][0];
    let (received, malformed, gaps) = (
        row[1].as_u64().unwrap(),
        row[2].as_u64().unwrap(),
        row[3].as_u64().unwrap(),
    );
    assert_eq!((malformed, gaps), (0, 0));
    // … is exactly what is stored, and the stored seqs are one unbroken run.
    let stored = env.count_data().await;
    let (mut lo, mut hi) = (u64::MAX, 0);
    for m in [
        "kraken_tick",
        "kraken_depth",
        "kraken_orders",
        "oanda_tick",
        "betfair_stream",
    ] {
        let rp = nbpy::schema::by_name(m).unwrap().rp;
        let v = env
            .client
            .query(&format!(
                "SELECT min(\"seq\"), max(\"seq\") FROM \"tick\".\"{rp}\".\"{m}\""
            ))
            .await
            .unwrap();
        let r = &v["results"][0]["series"][0]["values"][0];
        lo = lo.min(r[1].as_u64().unwrap());
        hi = hi.max(r[2].as_u64().unwrap());
    }
    eprintln!("stop under load: {stop_time:?} to stop; {sent} sent, {to_subscribers} to the subscriber, {unheard} to no one; {received} accepted, {stored} stored, seq {lo}..={hi}");
    // Nothing in flight is lost uncounted: the subscriber left cleanly, so
    // what the publisher sent it is exactly what it accepted, and the rest
    // the publisher counted as sent to no subscriber.
    assert_eq!(
        to_subscribers, received,
        "sent to the subscriber vs accepted"
    );
    assert_eq!(to_subscribers + unheard, sent);
    assert!(
        unheard > 0,
        "the publisher ran on after the subscriber left"
    );
    assert_eq!(stored, received, "accepted vs stored");
    assert_eq!(
        (lo, hi - lo + 1),
        (1, stored),
        "stored seqs are 1..=N with no hole"
    );
}

/// (sent, to subscribers, to no subscriber) from the publisher's stop line:
/// "sent N messages (A to subscribers, B to no subscriber)".
fn publisher_counts(log: &str) -> (u64, u64, u64) {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(" to no subscriber)"))
        .unwrap_or_else(|| panic!("no stop line in {log}"));
    let num = |after: &str| -> u64 {
        let i = line.find(after).unwrap() + after.len();
        line[i..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    (num("sent "), num(" messages ("), num(" to subscribers, "))
}

/// A v1 envelope line for a replay file.
fn envelope_line(ch: &str, sym: &str, data: Vec<(&str, nbpy::wire::Value<'static>)>) -> String {
    let e = nbpy::wire::Envelope::new(
        "test",
        ch,
        sym,
        nbpy::wire::now_ns(),
        data.into_iter()
            .map(|(k, v)| (k.to_string().into(), v))
            .collect(),
    );
    let mut b = Vec::new();
    nbpy::wire::encode_v1(&e, &mut b).unwrap();
    String::from_utf8(b).unwrap() + "\n"
}

/// Messages the legacy codec cannot carry (a channel it has no
/// measurement for, a value holding its separator `\x01`) are counted as
/// not encodable, not as sent: what the publisher says went to the
/// subscriber is what it accepted and stored, and nothing is counted
/// twice. An integer tag goes as its text, as v1 stores it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_messages_that_cannot_be_encoded_are_counted_apart_from_sent() {
    use nbpy::wire::Value;
    let env = Env::start().await;
    let ep = free_endpoint();
    let file = env.path("feed.jsonl");
    let lines = [
        envelope_line("ticker", "BTC/USD", vec![("bid", Value::Float(1.5))]),
        envelope_line("nosuch", "BTC/USD", vec![("bid", Value::Float(2.5))]),
        envelope_line("ticker", "BTC\x01USD", vec![("bid", Value::Float(3.5))]),
        envelope_line(
            "trade",
            "BTC/USD",
            vec![
                ("side", Value::Str("buy\x01".into())),
                ("price", Value::Float(4.5)),
            ],
        ),
        envelope_line(
            "odds",
            "1.23",
            vec![
                ("selection_id", Value::Int(12345)),
                ("back1", Value::Float(2.0)),
            ],
        ),
        envelope_line("ticker", "BTC/USD", vec![("bid", Value::Float(5.5))]),
    ];
    std::fs::write(&file, lines.concat()).unwrap();
    let cfg = env.config(&format!(
        r#"flush_interval = "200ms"
[publishers.leg]
feed = "replay"
file = {:?}
endpoint = "{ep}"
codec = "legacy"
wait_for_subscribers = 1

[subscribers.main]
connect = ["{ep}"]
codec = "legacy"
"#,
        file.display().to_string()
    ));
    let cfg = cfg.to_str().unwrap();
    let mut subscriber = env.spawn("nbpy-subscriber", &["--config", cfg, "main"], &[]);
    let mut publisher = env.spawn("nbpy-publisher", &["--config", cfg, "leg"], &[]);
    publisher.wait_success(Duration::from_secs(60));
    let log = publisher.log_text();
    let (sent, to_subscribers, unheard) = publisher_counts(&log);
    let stop = log
        .lines()
        .rev()
        .find(|l| l.contains(" to no subscriber)"))
        .unwrap();
    assert_eq!((sent, to_subscribers, unheard), (3, 3, 0), "{stop}");
    assert_eq!(number_before(stop, "not encodable"), 3, "{stop}");
    assert!(!stop.contains("never sent"), "counted twice: {stop}");
    // Each is in a WARN, said or counted as held back by the rate limit
    // (at the stop, not lost with it).
    let warned: u64 = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("cannot encode"))
        .map(|l| match l.find(" similar messages suppressed") {
            Some(_) => 1 + number_before(&l.replace('(', "( "), "similar messages suppressed"),
            None => 1,
        })
        .sum::<u64>()
        + log
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("more messages not encodable"))
            .map(|l| number_before(l, "more messages not encodable"))
            .sum::<u64>();
    assert_eq!(warned, 3, "{log}");
    // Legacy frames carry no seq: counted on a field each has.
    let stored = || async {
        let q =
            |m: &str, f: &str| format!("SELECT count(\"{f}\") FROM \"tick\".\"default\".\"{m}\"");
        let c = &env.client;
        c.query_number(&q("kraken_tick", "bid"))
            .await
            .unwrap_or(0.0) as u64
            + c.query_number(&q("kraken_orders", "price"))
                .await
                .unwrap_or(0.0) as u64
            + c.query_number(&q("betfair_stream", "back1"))
                .await
                .unwrap_or(0.0) as u64
    };
    let t0 = Instant::now();
    while stored().await < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{} of 3 stored",
            stored().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    subscriber.signal(nix::sys::signal::Signal::SIGTERM);
    subscriber.wait_success(Duration::from_secs(30));
    let line = stop_summary(&subscriber.log_text(), "main");
    eprintln!("{stop}\n{line}");
    assert_eq!(number_before(&line, " accepted,"), to_subscribers, "{line}");
    assert_eq!(number_before(&line, " malformed"), 0, "{line}");
    assert_eq!(stored().await, 3);
    let v = env
        .client
        .query("SHOW TAG VALUES ON \"tick\" FROM \"betfair_stream\" WITH KEY = \"selection_id\"")
        .await
        .unwrap();
    assert_eq!(v["results"][0]["series"][0]["values"][0][1], "12345", "{v}");
}

/// A replay line just under the 1 MiB frame limit, re-stamped with the
/// publisher's name and epoch, comes out over it: the publisher refuses
/// it as not encodable, not sends it for the subscriber to drop as
/// malformed while counting it delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_frame_limit_once_encoded_is_not_encodable() {
    use nbpy::wire::Value;
    let env = Env::start().await;
    let ep = free_endpoint();
    let file = env.path("feed.jsonl");
    let small = |bid| envelope_line("ticker", "BTC/USD", vec![("bid", Value::Float(bid))]);
    let mut big = envelope_line(
        "ticker",
        "BTC/USD",
        vec![("bid", Value::Float(2.5)), ("note", Value::Str("".into()))],
    );
    // Padded to 10 bytes under the limit, newline aside: the replay takes it.
    let pad = nbpy::wire::MAX_FRAME - 10 - (big.len() - 1);
    big = big.replace(
        "\"note\":\"\"",
        &format!("\"note\":\"{}\"", "x".repeat(pad)),
    );
    assert_eq!(big.len() - 1, nbpy::wire::MAX_FRAME - 10);
    std::fs::write(&file, [small(1.5), big, small(3.5)].concat()).unwrap();
    let cfg = env.config(&format!(
        r#"flush_interval = "200ms"
[publishers.replaybig]
feed = "replay"
file = {:?}
endpoint = "{ep}"
wait_for_subscribers = 1

[subscribers.main]
connect = ["{ep}"]
"#,
        file.display().to_string()
    ));
    let cfg = cfg.to_str().unwrap();
    let mut subscriber = env.spawn("nbpy-subscriber", &["--config", cfg, "main"], &[]);
    let mut publisher = env.spawn("nbpy-publisher", &["--config", cfg, "replaybig"], &[]);
    publisher.wait_success(Duration::from_secs(60));
    let log = publisher.log_text();
    let (sent, to_subscribers, unheard) = publisher_counts(&log);
    let stop = log
        .lines()
        .rev()
        .find(|l| l.contains(" to no subscriber)"))
        .unwrap();
    assert!(log.contains("replayed 3 messages"), "{log}");
    assert_eq!((sent, to_subscribers, unheard), (2, 2, 0), "{stop}");
    assert_eq!(number_before(stop, "not encodable"), 1, "{stop}");
    let stored = || async {
        env.client
            .query_number("SELECT count(\"bid\") FROM \"tick\".\"default\".\"kraken_tick\"")
            .await
            .unwrap_or(0.0) as u64
    };
    let t0 = Instant::now();
    while stored().await < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{} of 2 stored",
            stored().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    subscriber.signal(nix::sys::signal::Signal::SIGTERM);
    subscriber.wait_success(Duration::from_secs(30));
    let line = stop_summary(&subscriber.log_text(), "main");
    eprintln!("{stop}\n{line}");
    assert_eq!(number_before(&line, " accepted,"), 2, "{line}");
    assert_eq!(number_before(&line, " malformed"), 0, "{line}");
    assert_eq!(stored().await, 2);
}

/// The subscriber's last `nbpy_pipeline` report (`stopped`) is what
/// health's `/metrics` and the dashboards show from then on, so it states
/// the stop's final counts, as the stop line does, itself included. It
/// was written before the open batches went out, and said fewer points
/// written than were: here every point is still batched at the stop (no
/// batch fills up or ages out), so it said none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_report_states_the_counts_of_the_stop_line() {
    const N: u64 = 3000;
    let env = Env::start().await;
    let ep = free_endpoint();
    let cfg = env.config(&format!(
        r#"batch_size = 100000
flush_interval = "1h"

[publishers.synth]
endpoint = "{ep}"
count = {N}
wait_for_subscribers = 1

[subscribers.main]
connect = ["{ep}"]
"#
    ));
    let cfg = cfg.to_str().unwrap();
    let mut publisher = env.spawn("nbpy-publisher", &["--config", cfg, "synth"], &[]);
    publisher.wait_log("bound", Duration::from_secs(20));
    let mut subscriber = env.spawn("nbpy-subscriber", &["--config", cfg, "main"], &[]);
    publisher.wait_success(Duration::from_secs(60));
    subscriber.signal(nix::sys::signal::Signal::SIGTERM);
    subscriber.wait_success(Duration::from_secs(60));

    let line = stop_summary(&subscriber.log_text(), "main");
    println!("{line}");
    assert_eq!(number_before(&line, " accepted,"), N, "{line}");
    assert!(line.contains("every point accounted for"), "{line}");
    let reports = number_before(&line, " own nbpy_pipeline points");
    let written = number_before(&line, " points written");
    assert_eq!(
        (written, number_before(&line, " spooled for later")),
        (N + reports, 0),
        "{line}"
    );
    let v = env
        .client
        .query(
            "SELECT \"written\", \"spooled\", \"dead_lettered\", \"queue_depth\", \"stopped\" \
             FROM \"tick\".\"default\".\"nbpy_pipeline\" WHERE component = 'main' \
             ORDER BY time DESC LIMIT 1",
        )
        .await
        .unwrap();
    let row = &v["results"][0]["series"][0]["values"][0];
    assert_eq!(
        row[5].as_bool(),
        Some(true),
        "the newest report is the stop's: {row}"
    );
    assert_eq!(
        (
            row[1].as_u64(),
            row[2].as_u64(),
            row[3].as_u64(),
            row[4].as_u64()
        ),
        (Some(written), Some(0), Some(0), Some(0)),
        "the last report (written, spooled, dead_lettered, queue_depth) against the stop line: {line}"
    );
    // Every report was stored, the last one included.
    let stored = env
        .client
        .query_number(
            "SELECT count(\"written\") FROM \"tick\".\"default\".\"nbpy_pipeline\" WHERE component = 'main'",
        )
        .await
        .unwrap();
    assert_eq!(stored as u64, reports, "{line}");
}

/// When InfluxDB cannot take the last report at the stop, it is spooled,
/// stating itself as spooled (so it still states the stop line's counts),
/// and the next start writes it with the rest; that start's own last
/// report again states its stop line's counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_report_is_spooled_while_influxdb_is_down_and_written_next_start() {
    const N: u64 = 2000;
    let mut env = Env::start().await;
    let ep = free_endpoint();
    let cfg = env.config(&format!(
        r#"
[publishers.synth]
endpoint = "{ep}"
count = {N}
wait_for_subscribers = 1

[subscribers.main]
connect = ["{ep}"]
"#
    ));
    let cfg = cfg.to_str().unwrap();
    env.stop_influx();
    let mut publisher = env.spawn("nbpy-publisher", &["--config", cfg, "synth"], &[]);
    publisher.wait_log("bound", Duration::from_secs(20));
    let mut subscriber = env.spawn("nbpy-subscriber", &["--config", cfg, "main"], &[]);
    publisher.wait_success(Duration::from_secs(60));
    subscriber.signal(nix::sys::signal::Signal::SIGTERM);
    subscriber.wait_success(Duration::from_secs(60));
    let first = stop_summary(&subscriber.log_text(), "main");
    println!("{first}");
    assert_eq!(number_before(&first, " accepted,"), N, "{first}");
    assert!(first.contains("every point accounted for"), "{first}");
    assert_eq!(number_before(&first, " points written"), 0, "{first}");
    let spooled = number_before(&first, " spooled for later");
    assert_eq!(
        spooled,
        N + number_before(&first, " own nbpy_pipeline points"),
        "{first}"
    );

    env.start_influx_again();
    let mut again = env.spawn_as("main-again", "nbpy-subscriber", &["--config", cfg, "main"]);
    // The first run's last report comes from the spool, as it was spooled.
    let stopped = "SELECT \"written\", \"spooled\", \"queue_depth\" FROM \"tick\".\"default\".\"nbpy_pipeline\" \
                   WHERE component = 'main' AND \"stopped\" = true ORDER BY time ASC";
    let t0 = Instant::now();
    let row = loop {
        let v = env.client.query(stopped).await.unwrap();
        let row = v["results"][0]["series"][0]["values"][0].clone();
        if !row.is_null() {
            break row;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the spooled last report was not written: {}",
            again.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (row[1].as_u64(), row[2].as_u64(), row[3].as_u64()),
        (Some(0), Some(spooled), Some(0)),
        "the first run's last report (written, spooled, queue_depth) against its stop line: {first}"
    );
    assert_eq!(env.count_data().await, N);

    again.signal(nix::sys::signal::Signal::SIGTERM);
    again.wait_success(Duration::from_secs(60));
    let second = stop_summary(&again.log_text(), "main");
    println!("{second}");
    assert!(second.contains("every point accounted for"), "{second}");
    assert_eq!(
        number_before(&second, " left in the spool by an earlier run"),
        spooled,
        "{second}"
    );
    let v = env
        .client
        .query(
            "SELECT \"written\", \"spooled\", \"queue_depth\", \"stopped\" FROM \"tick\".\"default\".\"nbpy_pipeline\" \
             WHERE component = 'main' ORDER BY time DESC LIMIT 1",
        )
        .await
        .unwrap();
    let row = &v["results"][0]["series"][0]["values"][0];
    assert_eq!(row[4].as_bool(), Some(true), "{row}");
    assert_eq!(
        (row[1].as_u64(), row[2].as_u64(), row[3].as_u64()),
        (Some(number_before(&second, " points written")), Some(0), Some(0)),
        "the second run's last report (written, spooled, queue_depth) against its stop line: {second}"
    );
}

/// With InfluxDB hung (SIGSTOP: it accepts connections and answers
/// nothing) at the stop and nothing else left to write, the last report
/// waits only its slice of the stop budget before it is spooled. It used
/// to take the whole budget (8.0 s of 8 s), and once InfluxDB went on,
/// the timed-out write landed beside the spooled copy: two stopped reports
/// of one run with different counts. Now both forms share a timestamp, so
/// the replayed copy overwrites the late one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_report_keeps_to_its_slice_of_the_stop_when_influxdb_hangs() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    const N: u64 = 1000;
    let env = Env::start().await;
    let ep = free_endpoint();
    let cfg = env.config(&format!(
        r#"
[service]
stop_timeout = "8s"

[publishers.synth]
endpoint = "{ep}"
count = {N}
wait_for_subscribers = 1

[subscribers.main]
connect = ["{ep}"]
"#
    ));
    let cfg = cfg.to_str().unwrap();
    let mut publisher = env.spawn("nbpy-publisher", &["--config", cfg, "synth"], &[]);
    publisher.wait_log("bound", Duration::from_secs(20));
    let mut subscriber = env.spawn("nbpy-subscriber", &["--config", cfg, "main"], &[]);
    publisher.wait_success(Duration::from_secs(60));
    assert_eq!(env.wait_for_points(N, Duration::from_secs(60)).await, N);
    let influxd = Pid::from_raw(env.influx.pid().expect("influxd pid") as i32);
    kill(influxd, Signal::SIGSTOP).unwrap();
    let t0 = Instant::now();
    subscriber.signal(Signal::SIGTERM);
    subscriber.wait(Duration::from_secs(30));
    let took = t0.elapsed();
    kill(influxd, Signal::SIGCONT).unwrap();
    let first = stop_summary(&subscriber.log_text(), "main");
    println!("stopped in {took:?}: {first}");
    assert!(first.contains("every point accounted for"), "{first}");
    // Its slice is a tenth of the budget, at most 1 s; the whole budget
    // was 8 s.
    assert!(took < Duration::from_secs(5), "the stop took {took:?}");
    assert_eq!(number_before(&first, " spooled for later"), 1, "{first}");

    // The next start replays the spooled report over the late write.
    let mut again = env.spawn_as("main-again", "nbpy-subscriber", &["--config", cfg, "main"]);
    let stopped = "SELECT \"written\", \"spooled\" FROM \"tick\".\"default\".\"nbpy_pipeline\" \
                   WHERE component = 'main' AND \"stopped\" = true ORDER BY time ASC";
    let t1 = Instant::now();
    loop {
        let v = env.client.query(stopped).await.unwrap();
        if v["results"][0]["series"][0]["values"][0][2].as_u64() == Some(1) {
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(60),
            "the spooled report was not replayed: {v}\n{}",
            again.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    again.signal(Signal::SIGTERM);
    again.wait_success(Duration::from_secs(60));
    let second = stop_summary(&again.log_text(), "main");
    assert_eq!(
        number_before(&second, " left in the spool by an earlier run"),
        1,
        "{second}"
    );
    let v = env.client.query(stopped).await.unwrap();
    let rows = v["results"][0]["series"][0]["values"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(rows.len(), 2, "one stopped report per run: {rows:?}");
    assert_eq!(
        (rows[0][1].as_u64(), rows[0][2].as_u64()),
        (Some(number_before(&first, " points written")), Some(1)),
        "the first run's report against its stop line: {first}"
    );
}
