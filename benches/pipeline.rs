//! Decode + map + encode throughput of the subscriber's hot path, one core:
//! ZMTP frames as read from the socket in, line protocol in batches out
//! (`zmtp::sub::messages` + `Intake::accept`).
//! Target: ≥ 1,000,000 ticker messages/s.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nbpy::config::InfluxConfig;
use nbpy::feeds::synthetic::Generator;
use nbpy::subscriber::{Intake, IntakeStats};
use nbpy::zmtp::sub::messages;

/// `n` messages of one channel as one buffer of ZMTP frames.
fn frames(channel: &str, n: usize) -> Vec<u8> {
    let mut gen = Generator::new(1, &[]);
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let mut seq = 0;
    while seq < n as u64 {
        let mut env = gen.next_message();
        if env.ch != channel {
            continue;
        }
        seq += 1;
        env.seq = seq;
        env.epoch = 1;
        env.publisher = "bench".into();
        buf.clear();
        nbpy::wire::encode_v1(&env, &mut buf).unwrap();
        nbpy::zmtp::encode_message(&[env.topic().as_bytes(), &buf], &mut out);
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

criterion_group!(benches, hot_path);
criterion_main!(benches);
