//! Decode + map + encode throughput of the subscriber's hot path, one core:
//! ZMTP frames as read from the socket in, line protocol in batches out
//! (`zmtp::sub::messages` + `Intake::accept`).
//! Target: ≥ 1,000,000 ticker messages/s.
//!
//! And the synthetic publisher's own work per message, for comparison:
//! generate, encode the v1 envelope, frame it for ZMTP (`publish/mixed`,
//! all five channels in turn, as the e2e benchmark publishes them).

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nbpy::config::InfluxConfig;
use nbpy::feeds::synthetic::Generator;
use nbpy::subscriber::{Intake, IntakeStats};
use nbpy::zmtp::sub::messages;

mod common;
use common::Publish;

/// `n` messages of one channel as one buffer of ZMTP frames.
fn frames(channel: &str, n: usize) -> Vec<u8> {
    let mut gen = Generator::new(1, &[]);
    let (mut out, mut publish) = (Vec::new(), Publish::default());
    let mut seq = 0;
    while seq < n as u64 {
        let env = gen.next_message();
        if env.ch != channel {
            continue;
        }
        seq += 1;
        publish.frame(env, seq, &mut out);
    }
    out
}

fn hot_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_map_encode");
    for ch in ["ticker", "book", "trade"] {
        let n = 20_000;
        let chunk = frames(ch, n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(ch, |b| {
            let cfg = InfluxConfig::default();
            let mut intake = Intake::new("bench", &cfg, Arc::new(IntakeStats::default()));
            b.iter(|| {
                let mut batches = 0;
                for m in messages(&chunk) {
                    if intake.accept(&m).is_some() {
                        batches += 1;
                    }
                }
                batches
            })
        });
    }
    g.finish();
}

fn publish_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("publish");
    let n = 20_000u64;
    g.throughput(Throughput::Elements(n));
    g.bench_function("mixed", |b| {
        let mut gen = Generator::new(1, &[]);
        let (mut publish, mut out) = (Publish::default(), Vec::new());
        let mut seq = 0u64;
        b.iter(|| {
            out.clear();
            for _ in 0..n {
                seq += 1;
                publish.frame(gen.next_message(), seq, &mut out);
            }
            out.len()
        })
    });
    g.finish();
}

criterion_group!(benches, hot_path, publish_path);
criterion_main!(benches);
