//! Bad input interleaved with good: every good message is stored, every bad
//! one is counted exactly once, and the subscriber neither crashes nor
//! stalls. The bad frames come over real ZeroMQ TCP from an XPUB socket in
//! this test, as a broken or hostile peer would send them.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use nbpy::wire::{encode_v1, Envelope, Value};
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

fn good(seq: u64) -> ZmqMessage {
    good_sym(seq, "BTC/USD")
}

fn good_sym(seq: u64, sym: &str) -> ZmqMessage {
    let mut e = Envelope::new(
        "test",
        "ticker",
        sym.to_string(),
        nbpy::wire::now_ns(),
        vec![
            ("bid".into(), Value::Float(1.0 + seq as f64)),
            ("ask".into(), Value::Float(2.0)),
        ],
    );
    e.seq = seq;
    e.epoch = 42;
    e.publisher = "fuzz".into();
    let mut body = Vec::new();
    encode_v1(&e, &mut body).unwrap();
    let mut m = ZmqMessage::from(Bytes::from(e.topic()));
    m.push_back(Bytes::from(body));
    m
}

fn two(topic: &str, body: Vec<u8>) -> ZmqMessage {
    let mut m = ZmqMessage::from(Bytes::from(topic.to_string()));
    m.push_back(Bytes::from(body));
    m
}

/// One of each kind of malformed message the subscriber must survive.
fn bad_kinds() -> Vec<ZmqMessage> {
    let env = |data: &str| {
        format!(r#"{{"v":1,"src":"test","ch":"ticker","sym":"X","seq":1,"epoch":1,"ts":1,"rx":1,"data":{data}}}"#)
            .into_bytes()
    };
    let three = {
        let mut m = two("t.ticker.X", b"{}".to_vec());
        m.push_back(Bytes::from_static(b"extra"));
        m
    };
    vec![
        two("t.ticker.X", b"{not json".to_vec()),
        two(
            "t.ticker.X",
            br#"{"v":2,"src":"a","ch":"ticker","sym":"X","seq":1,"epoch":1,"data":{}}"#.to_vec(),
        ),
        two(
            "t.ticker.X",
            br#"{"v":1,"src":"a","ch":"ticker","sym":"X","seq":"one","epoch":1,"data":{}}"#
                .to_vec(),
        ),
        // Sequence numbers InfluxDB cannot store, from the good messages'
        // publisher: accepted, they would also wreck its gap accounting.
        two(
            "t.ticker.X",
            br#"{"v":1,"src":"test","ch":"ticker","sym":"X","pub":"fuzz","seq":18446744073709551615,"epoch":42,"ts":1,"rx":1,"data":{"bid":1.0}}"#
                .to_vec(),
        ),
        two(
            "t.ticker.X",
            br#"{"v":1,"src":"test","ch":"ticker","sym":"X","pub":"fuzz","seq":1,"epoch":9223372036854775808,"ts":1,"rx":1,"data":{"bid":1.0}}"#
                .to_vec(),
        ),
        // A time past InfluxDB's last storable instant (2262-04-11).
        two(
            "t.ticker.X",
            br#"{"v":1,"src":"test","ch":"ticker","sym":"X","seq":1,"epoch":1,"ts":9223372036854775807,"rx":1,"data":{"bid":1.0}}"#
                .to_vec(),
        ),
        // Tags ending in a backslash: line protocol cannot carry them.
        two(
            "t.ticker.X",
            br#"{"v":1,"src":"test","ch":"ticker","sym":"BACK\\","ts":1,"rx":1,"seq":1,"epoch":1,"data":{"bid":1.0}}"#
                .to_vec(),
        ),
        two(
            "t.ticker.X",
            br#"{"v":1,"src":"test","ch":"ticker","sym":"X","pub":"p\\","seq":1,"epoch":1,"ts":1,"rx":1,"data":{"bid":1.0}}"#
                .to_vec(),
        ),
        two("t.ticker.X", env(r#"{"bid":"a string"}"#)),
        two("t.ticker.X", env(r#"{"bid":[1,2]}"#)),
        two("t.ticker.X", env(r#"{"nothing":1.0}"#)),
        two("t.nosuch.X", env(r#"{"bid":1.0}"#).replace_ticker()),
        two("t.ticker.X", Vec::new()),
        two("t.ticker.X", vec![b' '; nbpy::wire::MAX_FRAME + 10]),
        three,
        ZmqMessage::from(Bytes::from_static(b"kraken_tick BTC\x01notatime")),
        ZmqMessage::from(Bytes::from_static(&[0xff, 0xfe, 0x00])),
    ]
}

trait ReplaceTicker {
    fn replace_ticker(self) -> Vec<u8>;
}
impl ReplaceTicker for Vec<u8> {
    fn replace_ticker(self) -> Vec<u8> {
        String::from_utf8(self)
            .unwrap()
            .replace("\"ticker\"", "\"nosuch\"")
            .into_bytes()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_are_counted_exactly_and_good_ones_all_stored() {
    let env = Env::start().await;
    let ep = free_endpoint();
    let cfg = env.config(&format!(
        "[subscribers.main]\nconnect = [\"{ep}\"]\nstats_interval = \"1s\"\n"
    ));
    let mut xpub = zeromq::XPubSocket::new();
    xpub.bind(&ep).await.unwrap();
    let mut sub = env.spawn(
        "nbpy-subscriber",
        &["--config", cfg.to_str().unwrap(), "main"],
        &[],
    );
    // Wait for the subscriber's subscription frame before sending anything.
    let frame = tokio::time::timeout(Duration::from_secs(30), xpub.recv())
        .await
        .expect("subscription")
        .unwrap();
    assert_eq!(frame.get(0).unwrap()[0], 1, "a subscribe frame");

    let bad = bad_kinds();
    let rounds = 50u64;
    let mut seq = 0;
    for _ in 0..rounds {
        for b in &bad {
            seq += 1;
            xpub.send(good(seq)).await.unwrap();
            xpub.send(b.clone()).await.unwrap();
        }
    }
    // Backslashes not at a tag's end are stored as they are, also before
    // a character that needs escaping.
    const ODD: &str = r"a\,b\\c\ d";
    seq += 1;
    xpub.send(good_sym(seq, ODD)).await.unwrap();
    let n_good = seq;
    let n_bad = rounds * bad.len() as u64;
    let stored = env.wait_for_points(n_good, Duration::from_secs(60)).await;
    sub.signal(nix::sys::signal::Signal::SIGTERM);
    let status = sub.wait(Duration::from_secs(30));
    assert!(status.success(), "{status}\n{}", sub.log_text());
    assert_eq!(stored, n_good, "{}", sub.log_text());
    let q = "SELECT last(\"malformed\"), last(\"received\"), last(\"gaps\") FROM \"tick\".\"default\".\"nbpy_pipeline\" WHERE component = 'main'";
    let v = env.client.query(q).await.unwrap();
    let row = &v["results"][0]["series"][0]["values"][0];
    assert_eq!(row[1].as_u64(), Some(n_bad), "malformed counted exactly");
    assert_eq!(row[2].as_u64(), Some(n_good + n_bad), "received");
    assert_eq!(
        row[3].as_u64(),
        Some(0),
        "the bad frames did not disturb gap accounting"
    );
    let v = env
        .client
        .query("SHOW TAG VALUES ON \"tick\" WITH KEY = \"instrument\"")
        .await
        .unwrap();
    let stored: Vec<&str> = v["results"][0]["series"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["values"].as_array().into_iter().flatten())
        .filter_map(|r| r[1].as_str())
        .collect();
    assert!(stored.contains(&ODD), "{ODD:?} not in {stored:?}");
    // Logging is rate-limited: far fewer lines than bad messages.
    let lines = sub
        .log_text()
        .lines()
        .filter(|l| l.contains("malformed") || l.contains("cannot store"))
        .count();
    assert!(
        lines > 0 && (lines as u64) < n_bad / 4,
        "{lines} log lines for {n_bad} bad messages"
    );
}
