//! Decode + map + encode throughput of the subscriber's hot path, one core:
//! ZeroMQ frames in, line protocol in batches out (`Intake::accept`).
//! Target: ≥ 1,000,000 ticker messages/s.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nbpy::config::InfluxConfig;
use nbpy::feeds::synthetic::Generator;
use nbpy::subscriber::{Intake, IntakeStats};
use zeromq::ZmqMessage;

fn frames(channel: &str, n: usize) -> Vec<ZmqMessage> {
    let mut gen = Generator::new(1, &[]);
    let mut out = Vec::with_capacity(n);
    let mut buf = Vec::new();
    let mut seq = 0;
    while out.len() < n {
        let mut env = gen.next_message();
        if env.ch != channel {
            continue;
        }
        seq += 1;
        env.seq = seq;
        env.epoch = 1;
        env.publisher = "bench".into();
        out.push(nbpy::bus::encode(&env, nbpy::config::Codec::V1, &mut buf).unwrap());
    }
    out
}

fn hot_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_map_encode");
    for ch in ["ticker", "book", "trade"] {
        let msgs = frames(ch, 20_000);
        g.throughput(Throughput::Elements(msgs.len() as u64));
        g.bench_function(ch, |b| {
            let cfg = InfluxConfig::default();
            let mut intake = Intake::new("bench", &cfg, Arc::new(IntakeStats::default()));
            b.iter(|| {
                let mut batches = 0;
                for m in &msgs {
                    if intake.accept(m).is_some() {
                        batches += 1;
                    }
                }
                batches
            })
        });
    }
    g.finish();
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
