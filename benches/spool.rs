//! Spool throughput against InfluxDB's own ingest rate on this machine.
//!
//! `cargo bench --bench spool` prints one table: medians of several runs of
//! appending real line protocol (synthetic feed → encoder → 5000-point
//! batches) to a spool, replaying it (read + CRC check + ack + segment
//! deletion), and writing the same batches to a private influxd the way
//! the writer pool does (2 requests in flight; gzip as `auto` decides, so
//! off for this local influxd). The spool must be far
//! faster than InfluxDB, or replay would be the bottleneck after an outage.
//!
//! `NBPY_BENCH_POINTS` (default 500000) and `NBPY_BENCH_RUNS` (default 5)
//! scale it.

use std::time::{Duration, Instant};

use nbpy::config::{InfluxConfig, WhenFull};
use nbpy::feeds::synthetic::Generator;
use nbpy::sink::batch::{Batch, Batcher};
use nbpy::sink::influx::InfluxClient;
use nbpy::sink::line::LineEncoder;
use nbpy::sink::spool::{Fsync, Spool, SpoolOptions};

mod stats;
use stats::median;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `points` encoded points in full batches, as the subscriber makes them.
fn batches(gen: &mut Generator, seq: &mut u64, points: u64) -> Vec<Batch> {
    let mut enc = LineEncoder::new();
    let mut b = Batcher::new(5000, Duration::from_secs(3600));
    let mut out = Vec::new();
    for _ in 0..points {
        let mut env = gen.next_message();
        *seq += 1;
        env.seq = *seq;
        env.epoch = 1;
        env.publisher = "bench".into();
        let rp = nbpy::schema::by_channel(&env.ch)
            .map(|m| m.rp)
            .unwrap_or("");
        let buf = b.buffer(rp);
        if enc.encode(&env, buf).is_ok() {
            if let Some(full) = b.commit(rp) {
                out.push(full);
            }
        }
    }
    out.extend(b.due(true));
    out
}

struct Rate {
    points: f64,
    bytes: f64,
}

fn spool_run(data: &[Batch], fsync: Fsync) -> (Rate, Rate) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let opts = SpoolOptions {
        dir: dir.path().to_path_buf(),
        max_bytes: 1 << 40,
        segment_bytes: 64 << 20,
        fsync,
        when_full: WhenFull::Block,
    };
    let (mut spool, _) = Spool::open(opts.clone()).expect("open");
    let points: u64 = data.iter().map(|b| b.points as u64).sum();
    let t0 = Instant::now();
    for b in data {
        spool
            .append(b.rp, b.points as u32, &b.lines, false)
            .expect("append");
    }
    spool.sync().expect("sync");
    let append = t0.elapsed().as_secs_f64();
    let bytes = spool.bytes() as f64;
    drop(spool);
    // Replay as a restarted subscriber would: open (scan + CRC of every
    // record), then read, check and ack each record, deleting segments.
    let t0 = Instant::now();
    let (mut spool, rec) = Spool::open(opts).expect("reopen");
    assert_eq!(rec.points, points);
    let mut n = 0u64;
    while let Some(r) = spool.next_record().expect("next") {
        n += r.points as u64;
        spool.ack(r.segment, r.points).expect("ack");
    }
    let replay = t0.elapsed().as_secs_f64();
    assert_eq!(n, points);
    assert!(spool.is_empty());
    (
        Rate {
            points: points as f64 / append,
            bytes: bytes / append,
        },
        Rate {
            points: points as f64 / replay,
            bytes: bytes / replay,
        },
    )
}

async fn influx_run(client: &InfluxClient, data: Vec<Batch>) -> Rate {
    let points: u64 = data.iter().map(|b| b.points as u64).sum();
    let bytes: u64 = data.iter().map(|b| b.lines.len() as u64).sum();
    let queue = std::sync::Arc::new(std::sync::Mutex::new(data));
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..2)
        .map(|_| {
            let q = queue.clone();
            let c = client.clone();
            tokio::spawn(async move {
                loop {
                    let next = q.lock().ok().and_then(|mut v| v.pop());
                    let Some(b) = next else { break };
                    c.write(b.rp, b.lines.into()).await.expect("influx write");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("writer");
    }
    let secs = t0.elapsed().as_secs_f64();
    Rate {
        points: points as f64 / secs,
        bytes: bytes as f64 / secs,
    }
}

fn main() {
    let points = env_u64("NBPY_BENCH_POINTS", 500_000);
    let runs = env_u64("NBPY_BENCH_RUNS", 5) as usize;
    let mut gen = Generator::new(7, &[]);
    let mut seq = 0u64;
    let data = batches(&mut gen, &mut seq, points);
    let mb: f64 = data.iter().map(|b| b.lines.len() as f64).sum::<f64>() / 1e6;
    println!(
        "spool bench: {points} points in {} batches, {mb:.1} MB of line protocol, {runs} runs each, medians",
        data.len()
    );

    let mut table = Vec::new();
    for (name, fsync) in [
        ("fsync=batch", Fsync::Batch),
        ("fsync=100ms", Fsync::Every(Duration::from_millis(100))),
    ] {
        let (mut ap, mut ab, mut rp, mut rb) = (vec![], vec![], vec![], vec![]);
        for _ in 0..runs {
            let (a, r) = spool_run(&data, fsync);
            ap.push(a.points);
            ab.push(a.bytes);
            rp.push(r.points);
            rb.push(r.bytes);
        }
        table.push((
            format!("spool append, {name}"),
            median(&mut ap),
            median(&mut ab),
        ));
        table.push((
            format!("spool replay, {name}"),
            median(&mut rp),
            median(&mut rb),
        ));
    }

    // InfluxDB's own ingest of the same kind of batches, fresh points each run.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let influx = rt.block_on(async {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
        let mut influx =
            match nbpy::backend::LocalInfluxd::spawn(None, &dir.path().join("influxdb"), 0, None) {
                Ok(i) => i,
                Err(e) => {
                    println!("influxd not available ({e}); skipping the InfluxDB comparison");
                    return None;
                }
            };
        influx
            .wait_ready(Duration::from_secs(60))
            .expect("influxd ready");
        let client = InfluxClient::new(&InfluxConfig {
            url: influx.url(),
            ..Default::default()
        })
        .expect("client");
        nbpy::admin::schema::ensure(&client).await.expect("schema");
        let (mut p, mut b) = (vec![], vec![]);
        for _ in 0..runs {
            let fresh = batches(&mut gen, &mut seq, points);
            let r = influx_run(&client, fresh).await;
            p.push(r.points);
            b.push(r.bytes);
        }
        drop(influx);
        Some((median(&mut p), median(&mut b)))
    });
    if let Some((p, b)) = influx {
        table.push(("InfluxDB ingest (2 in flight)".into(), p, b));
    }
    println!(
        "{:<40} {:>14} {:>10} {:>10}",
        "", "points/s", "MB/s", "× influx"
    );
    for (name, p, b) in &table {
        let ratio = influx
            .map(|(ip, _)| format!("{:.1}", p / ip))
            .unwrap_or_else(|| "-".into());
        println!("{name:<40} {p:>14.0} {:>10.1} {ratio:>10}", b / 1e6);
    }
}
