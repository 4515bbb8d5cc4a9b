//! Kraken book throughput on one core.
//!
//! - `apply_checksum/depthN`: book updates applied (insert, change, delete,
//!   truncate to depth) and CRC32-checksummed, from already-split decimal
//!   text. This is the figure the feed promises: ≥ 500 000/s at depth 10.
//! - `frame_to_envelope/depth10`: the whole path of one update frame: JSON
//!   with raw decimals → levels applied → checksum verified → the
//!   `kraken_depth` envelope built.
//!
//! Updates are a deterministic random walk around Kraken's documented
//! BTC/USD book: mostly quantity changes near the touch, inserts inside and
//! beyond the depth, deletes, one to three levels per message.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use nbpy::feeds::kraken::book::{Book, Side};
use nbpy::feeds::kraken::protocol::Channel;
use nbpy::feeds::kraken::{Handler, KrakenStats};

const UPDATES: usize = 20_000;

type Update = Vec<(Side, String, String)>;

fn snapshot(depth: usize) -> Book {
    let mut b = Book::new(depth);
    // Kraken's checksum guide example, widened to the depth.
    for i in 0..depth {
        let bid = format!("{:.1}", 45283.5 - i as f64 * 0.7);
        let ask = format!("{:.1}", 45285.2 + i as f64 * 0.7);
        b.set(Side::Bid, &bid, "0.10000000").unwrap();
        b.set(Side::Ask, &ask, "1.54571953").unwrap();
    }
    b.truncate();
    b
}

/// A replayable sequence of update messages, with the checksum Kraken would
/// send after each.
fn updates(depth: usize, seed: u64) -> (Book, Vec<(Update, u32)>) {
    let start = snapshot(depth);
    let mut book = start.clone();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(UPDATES);
    for _ in 0..UPDATES {
        let mut msg = Vec::new();
        for _ in 0..rng.gen_range(1..=3) {
            let side = if rng.gen_bool(0.5) {
                Side::Bid
            } else {
                Side::Ask
            };
            let levels = match side {
                Side::Bid => book.bids(),
                Side::Ask => book.asks(),
            };
            let qty = format!(
                "{}.{:08}",
                rng.gen_range(0..20u32),
                rng.gen_range(1..100_000_000u32)
            );
            let near = rng.gen_range(0..levels.len().min(10));
            let (p, q) = match rng.gen_range(0..10) {
                0..=5 => (levels[near].price.as_str().to_string(), qty),
                6 | 7 if levels.len() > depth / 2 => (
                    levels[near].price.as_str().to_string(),
                    "0.00000000".to_string(),
                ),
                _ => {
                    let (bb, ba): (f64, f64) = (
                        book.bids()[0].price.as_str().parse().unwrap(),
                        book.asks()[0].price.as_str().parse().unwrap(),
                    );
                    let ticks = rng.gen_range(1..(depth as i64 + 5)) as f64 / 10.0;
                    let price = match side {
                        Side::Bid => ba - ticks,
                        Side::Ask => bb + ticks,
                    };
                    (format!("{price:.1}"), qty)
                }
            };
            book.set(side, &p, &q).unwrap();
            msg.push((side, p, q));
        }
        book.truncate();
        out.push((msg, book.checksum()));
    }
    (start, out)
}

fn apply_checksum(c: &mut Criterion) {
    let mut g = c.benchmark_group("apply_checksum");
    g.throughput(Throughput::Elements(UPDATES as u64));
    for depth in [10usize, 25, 100, 1000] {
        let (start, seq) = updates(depth, depth as u64);
        g.bench_with_input(BenchmarkId::new("depth", depth), &seq, |b, seq| {
            b.iter(|| {
                let mut book = start.clone();
                let mut ok = 0u32;
                for (msg, want) in seq {
                    for (side, p, q) in msg {
                        book.set(*side, p, q).unwrap();
                    }
                    book.truncate();
                    ok += (book.checksum() == *want) as u32;
                }
                assert_eq!(ok as usize, seq.len());
                ok
            })
        });
    }
    g.finish();
}

fn frame_to_envelope(c: &mut Criterion) {
    let depth = 10;
    let (start, seq) = updates(depth, 7);
    let level = |p: &str, q: &str| format!(r#"{{"price":{p},"qty":{q}}}"#);
    let frame = |kind: &str, bids: Vec<String>, asks: Vec<String>, checksum: u32| {
        format!(
            r#"{{"channel":"book","type":"{kind}","data":[{{"symbol":"BTC/USD","bids":[{}],"asks":[{}],"checksum":{checksum},"timestamp":"2023-10-06T17:35:55.440295Z"}}]}}"#,
            bids.join(","),
            asks.join(",")
        )
    };
    let snap = frame(
        "snapshot",
        start
            .bids()
            .iter()
            .map(|l| level(l.price.as_str(), l.qty.as_str()))
            .collect(),
        start
            .asks()
            .iter()
            .map(|l| level(l.price.as_str(), l.qty.as_str()))
            .collect(),
        start.checksum(),
    );
    let frames: Vec<String> = seq
        .iter()
        .map(|(msg, sum)| {
            let side = |s: Side| {
                msg.iter()
                    .filter(|(x, _, _)| *x == s)
                    .map(|(_, p, q)| level(p, q))
                    .collect()
            };
            frame("update", side(Side::Bid), side(Side::Ask), *sum)
        })
        .collect();
    let mut g = c.benchmark_group("frame_to_envelope");
    g.throughput(Throughput::Elements(frames.len() as u64));
    g.bench_function("depth10", |b| {
        b.iter(|| {
            let stats = Arc::new(KrakenStats::default());
            let mut h = Handler::new(Channel::Book, depth, 10, stats.clone());
            h.handle(&snap).unwrap();
            for f in &frames {
                h.handle(f).unwrap();
                h.out.clear();
            }
            assert_eq!(KrakenStats::get(&stats.checksum_mismatches), 0);
            KrakenStats::get(&stats.checksums_ok)
        })
    });
    g.finish();
}

criterion_group!(benches, apply_checksum, frame_to_envelope);
criterion_main!(benches);
