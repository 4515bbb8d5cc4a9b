//! Interop with a foreign client: real pyzmq (libzmq) on both ends of
//! nbpy's bus, in both codecs, over real TCP.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn python() -> Command {
    let ok = Command::new("python3")
        .args(["-c", "import zmq"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "pyzmq is required (pip install pyzmq); .ci/run installs it"
    );
    Command::new("python3")
}

fn script(name: &str) -> String {
    format!("{}/tests/interop/{name}", env!("CARGO_MANIFEST_DIR"))
}

async fn pyzmq_reads_our_publisher(codec: &'static str) -> serde_json::Value {
    let env = Env::start().await;
    let ep = free_endpoint();
    let n = 5000;
    let cfg = env.config(&format!(
        "[publishers.synth]\nfeed = \"synthetic\"\nendpoint = \"{ep}\"\ncodec = \"{codec}\"\ncount = {n}\nwait_for_subscribers = 1\n"
    ));
    let mut publisher = env.spawn(
        "nbpy-publisher",
        &["--config", cfg.to_str().unwrap(), "synth"],
        &[],
    );
    publisher.wait_log("bound", Duration::from_secs(20));
    let out = tokio::task::spawn_blocking(move || {
        python()
            .args([&script("sub_decode.py"), &ep, &n.to_string(), codec])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        publisher.log_text()
    );
    publisher.wait_success(Duration::from_secs(30));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyzmq_sub_decodes_v1_envelopes_in_sequence() {
    let s = pyzmq_reads_our_publisher("v1").await;
    assert_eq!(s["count"], 5000);
    assert_eq!(
        (s["first_seq"].as_u64(), s["last_seq"].as_u64()),
        (Some(1), Some(5000))
    );
    assert_eq!(s["in_order"], true);
    for ch in ["ticker", "book", "trade", "price", "odds"] {
        assert_eq!(s["by_kind"][ch], 1000, "{ch}");
    }
}

/// libzmq's prefix subscriptions are understood by our publisher: two SUBs
/// with different prefixes each get their share. (A libzmq SUB filters on
/// its side too, so that the publisher sends nothing unsubscribed is shown
/// by a raw peer in `zmtp`'s unit tests, not here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyzmq_prefix_subscriptions_are_understood() {
    let env = Env::start().await;
    let ep = free_endpoint();
    let n = 5000;
    let cfg = env.config(&format!(
        "[publishers.synth]\nfeed = \"synthetic\"\nendpoint = \"{ep}\"\ncount = {n}\nwait_for_subscribers = 2\n"
    ));
    let mut publisher = env.spawn(
        "nbpy-publisher",
        &["--config", cfg.to_str().unwrap(), "synth"],
        &[],
    );
    publisher.wait_log("bound", Duration::from_secs(20));
    // The synthetic feed cycles through five channels (topic
    // `synthetic.CH.SYM`); "synthetic.t" is a prefix of two of them.
    let subs: Vec<_> = [("synthetic.t", 2000), ("synthetic.price", 1000)]
        .into_iter()
        .map(|(prefix, want)| {
            let ep = ep.clone();
            tokio::task::spawn_blocking(move || {
                let out = python()
                    .args([
                        &script("sub_decode.py"),
                        &ep,
                        &want.to_string(),
                        "v1",
                        prefix,
                    ])
                    .output()
                    .unwrap();
                (prefix, out)
            })
        })
        .collect();
    for s in subs {
        let (prefix, out) = s.await.unwrap();
        assert!(
            out.status.success(),
            "{prefix}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            publisher.log_text()
        );
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let kinds: Vec<&str> = s["by_kind"]
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        match prefix {
            "synthetic.t" => assert_eq!(kinds, ["ticker", "trade"], "{s}"),
            _ => assert_eq!(kinds, ["price"], "{s}"),
        }
    }
    publisher.wait_success(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyzmq_sub_decodes_legacy_frames() {
    let s = pyzmq_reads_our_publisher("legacy").await;
    assert_eq!(s["count"], 5000);
    for m in [
        "kraken_tick",
        "kraken_depth",
        "kraken_orders",
        "oanda_tick",
        "betfair_stream",
    ] {
        assert_eq!(s["by_kind"][m], 1000, "{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_subscriber_stores_both_codecs_from_a_pyzmq_publisher() {
    let env = Env::start().await;
    let ep = free_endpoint();
    let n = 3000u64;
    let cfg = env.config(&format!(
        "[subscribers.main]\nconnect = [\"{ep}\"]\nstats_interval = \"1s\"\n"
    ));
    let ep2 = ep.clone();
    let py = tokio::task::spawn_blocking(move || {
        python()
            .args([&script("pub_send.py"), &ep2, &n.to_string()])
            .output()
            .unwrap()
    });
    let mut sub = env.spawn(
        "nbpy-subscriber",
        &["--config", cfg.to_str().unwrap(), "main"],
        &[],
    );
    let out = py.await.unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        sub.log_text()
    );

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let legacy_q =
        "SELECT count(\"bid\") FROM \"tick\".\"default\".\"oanda_tick\" WHERE source = 'pyleg'";
    let (mut v1, mut legacy) = (0, 0.0);
    while std::time::Instant::now() < deadline {
        v1 = env.count("kraken_tick").await;
        legacy = env.client.query_number(legacy_q).await.unwrap_or(0.0);
        if v1 >= n && legacy as u64 >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sub.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        sub.wait(Duration::from_secs(30)).success(),
        "{}",
        sub.log_text()
    );
    assert_eq!(v1, n, "v1 envelopes stored\n{}", sub.log_text());
    assert_eq!(legacy as u64, n, "legacy frames stored");
    let q = "SELECT last(\"gaps\"), last(\"malformed\") FROM \"tick\".\"default\".\"nbpy_pipeline\" WHERE component = 'main'";
    let v = env.client.query(q).await.unwrap();
    let row = &v["results"][0]["series"][0]["values"][0];
    assert_eq!((row[1].as_u64(), row[2].as_u64()), (Some(0), Some(0)));
}

/// A libzmq XSUB subscribing to a prefix twice passes both subscribes on,
/// and only the last of two cancels (it counts, and leaves the set to the
/// publisher): our publisher keeps a set per peer, as libzmq's XPUB does,
/// so the prefix ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyzmq_xsub_doubled_subscription_ends_with_its_cancels() {
    let env = Env::start().await;
    let ep = free_endpoint();
    let cfg = env.config(&format!(
        "[publishers.synth]\nfeed = \"synthetic\"\nendpoint = \"{ep}\"\nrate = 2000\ncount = 0\nwait_for_subscribers = 1\n"
    ));
    let publisher = env.spawn(
        "nbpy-publisher",
        &["--config", cfg.to_str().unwrap(), "synth"],
        &[],
    );
    publisher.wait_log("bound", Duration::from_secs(20));
    let out = tokio::task::spawn_blocking(move || {
        python()
            .args([&script("xsub_cancel.py"), &ep, "400"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        publisher.log_text()
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let kinds: Vec<&str> = s.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    assert_eq!(kinds, ["odds", "price"], "{s}");
}
