//! The core pipeline end to end: synthetic publisher → real ZeroMQ over TCP
//! → subscriber → a real influxd.

mod common;

use std::time::Duration;

use common::*;

const N: u64 = 200_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_published_message_is_stored_once_with_no_gaps() {
    let env = Env::start().await;
    let ep = free_endpoint();
    let cfg = env.config(&format!(
        r#"
[publishers.synth]
feed = "synthetic"
endpoint = "{ep}"
rate = 0
count = {N}
wait_for_subscribers = 1

[subscribers.main]
connect = ["{ep}"]
topics = [""]
stats_interval = "1s"
"#
    ));
    let cfg = cfg.to_str().unwrap();
    let mut publisher = env.spawn("nbpy-publisher", &["--config", cfg, "synth"], &[]);
    publisher.wait_log("bound", Duration::from_secs(20));
    let mut subscriber = env.spawn("nbpy-subscriber", &["--config", cfg, "main"], &[]);

    let status = publisher.wait(Duration::from_secs(300));
    assert!(
        status.success(),
        "publisher: {status}\n{}",
        publisher.log_text()
    );
    let stored = env.wait_for_points(N, Duration::from_secs(300)).await;
    subscriber.signal(nix::sys::signal::Signal::SIGTERM);
    let status = subscriber.wait(Duration::from_secs(60));
    assert!(
        status.success(),
        "subscriber: {status}\n{}",
        subscriber.log_text()
    );

    assert_eq!(stored, N, "stored points\n{}", subscriber.log_text());
    // Five channel kinds in rotation: an exact fifth of the messages each.
    for m in [
        "kraken_tick",
        "kraken_depth",
        "kraken_orders",
        "oanda_tick",
        "betfair_stream",
    ] {
        assert_eq!(env.count(m).await, N / 5, "{m}");
    }
    // Exactly once: the distinct sequence numbers cover 1..=N.
    let q = "SELECT max(\"seq\"), min(\"seq\") FROM \"tick\".\"default\".\"kraken_tick\"";
    let v = env.client.query(q).await.unwrap();
    let row = &v["results"][0]["series"][0]["values"][0];
    assert_eq!((row[2].as_u64(), row[1].as_u64()), (Some(1), Some(N - 4)));
    // The subscriber's own accounting, as it stored it on stopping.
    let q = "SELECT last(\"gaps\"), last(\"received\"), last(\"malformed\") FROM \"tick\".\"default\".\"nbpy_pipeline\" WHERE component = 'main'";
    let v = env.client.query(q).await.unwrap();
    let row = &v["results"][0]["series"][0]["values"][0];
    assert_eq!(row[1].as_u64(), Some(0), "gaps");
    assert_eq!(row[2].as_u64(), Some(N), "received");
    assert_eq!(row[3].as_u64(), Some(0), "malformed");
}

/// Monitors (health daemon, validator) subscribe too, but a publisher that
/// waits for its subscriber must not take a monitor for it: it would start
/// sending before the subscriber is there, and those messages would be gaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_subscribers_does_not_count_monitors() {
    let env = Env::start().await;
    let ep = free_endpoint();
    let n = 2000u64;
    let cfg = env.config(&format!(
        "[publishers.synth]\nendpoint = \"{ep}\"\ncount = {n}\nwait_for_subscribers = 1\n\
         [subscribers.main]\nconnect = [\"{ep}\"]\nstats_interval = \"1s\"\n"
    ));
    let cfg = cfg.to_str().unwrap();
    let mut publisher = env.spawn("nbpy-publisher", &["--config", cfg, "synth"], &[]);
    publisher.wait_log("bound", Duration::from_secs(20));
    let mut tap = nbpy::health::tap::Tap::connect(&ep, Duration::from_secs(10))
        .await
        .unwrap();
    // The monitor is connected and subscribed; the publisher must hold still.
    let early = tokio::time::timeout(Duration::from_secs(1), tap.next()).await;
    match early {
        Err(_) => {}
        Ok(nbpy::health::tap::TapEvent::Message(m)) => panic!(
            "the publisher sent to a monitor before any subscriber: {m:?}\n{}",
            publisher.log_text()
        ),
        Ok(nbpy::health::tap::TapEvent::Disconnected(why)) => panic!("tap disconnected: {why}"),
    }
    let mut subscriber = env.spawn("nbpy-subscriber", &["--config", cfg, "main"], &[]);
    publisher.wait_success(Duration::from_secs(120));
    assert_eq!(env.wait_for_points(n, Duration::from_secs(120)).await, n);
    subscriber.signal(nix::sys::signal::Signal::SIGTERM);
    subscriber.wait_success(Duration::from_secs(30));
    let q = "SELECT last(\"gaps\") FROM \"tick\".\"default\".\"nbpy_pipeline\" WHERE component = 'main'";
    assert_eq!(env.client.query_number(q).await.unwrap(), 0.0);
}

/// A synthetic publisher of `n` messages into subscriber `main` (`influx`
/// and `sub` are extra lines for `[influxdb]` and `[subscribers.main]`):
/// waits for the publisher to finish and for `want` points, stops the
/// subscriber cleanly and returns it, for its log.
async fn synth_into_main(env: &Env, n: u64, influx: &str, sub: &str, want: u64) -> Proc {
    let ep = free_endpoint();
    let cfg = env.config(&format!(
        "{influx}[publishers.synth]\nendpoint = \"{ep}\"\ncount = {n}\nwait_for_subscribers = 1\n\
         [subscribers.main]\nconnect = [\"{ep}\"]\n{sub}"
    ));
    let cfg = cfg.to_str().unwrap();
    let mut publisher = env.spawn("nbpy-publisher", &["--config", cfg, "synth"], &[]);
    publisher.wait_log("bound", Duration::from_secs(20));
    let mut subscriber = env.spawn("nbpy-subscriber", &["--config", cfg, "main"], &[]);
    publisher.wait_success(Duration::from_secs(60));
    assert_eq!(
        env.wait_for_points(want, Duration::from_secs(30)).await,
        want,
        "{}",
        subscriber.log_text()
    );
    subscriber.signal(nix::sys::signal::Signal::SIGTERM);
    subscriber.wait_success(Duration::from_secs(30));
    subscriber
}

/// A short-lived publisher can connect, send everything and leave before
/// the subscriber has looked at whether anyone is connected: its messages
/// are already in hand and must be stored (the subscriber once waited for
/// a connection that had come and gone, and never got ready).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_that_sends_and_leaves_at_once_is_still_stored() {
    let env = Env::start().await;
    synth_into_main(&env, 50, "", "", 50).await;
}

/// `seq` counts every message of a publisher, so a subscriber that filters
/// by topic sees jumps that are not loss: it must not report them as gaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_filter_stores_its_topics_and_reports_no_false_gaps() {
    let env = Env::start().await;
    let n = 1000u64;
    // Channels rotate, so the ticker is every fifth message.
    let filter = "topics = [\"synthetic.ticker\"]\nstats_interval = \"1s\"\n";
    let subscriber = synth_into_main(&env, n, "", filter, n / 5).await;
    assert_eq!(env.count("kraken_tick").await, n / 5);
    assert_eq!(env.count("kraken_depth").await, 0);
    assert_eq!(
        env.pipeline_last("main", &["gaps", "received"]).await,
        vec![Some(0), Some((n / 5) as i64)],
        "{}",
        subscriber.log_text()
    );
    assert!(
        subscriber.log_text().contains("gaps are not counted"),
        "the subscriber says why it counts no gaps\n{}",
        subscriber.log_text()
    );
}

/// The default (`gzip = "auto"`) sends this local influxd plain bodies; a
/// remote one gets gzip. Both paths against the real server: compressed
/// bodies must be taken whole (a bad one would be refused and counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzipped_writes_are_stored_like_plain_ones() {
    let env = Env::start().await;
    let n = 12_000u64;
    let subscriber =
        synth_into_main(&env, n, "gzip = true\n", "stats_interval = \"1s\"\n", n).await;
    assert_eq!(
        env.pipeline_last("main", &["write_errors", "dead_lettered", "received"])
            .await,
        vec![Some(0), Some(0), Some(n as i64)],
        "{}",
        subscriber.log_text()
    );
}
