//! End-to-end throughput against InfluxDB's own ceiling, measured in the
//! same run on the same machine:
//!
//! - ceiling: the same synthetic points, pre-encoded, POSTed straight to
//!   /write with the subscriber's batch size, concurrency and gzip;
//! - nbpy: synthetic publisher → ZeroMQ TCP → subscriber → the same influxd,
//!   timed from the subscriber's start until every point is stored.
//!
//! Runs alternate (ceiling, nbpy, ceiling, …) into fresh databases so both
//! see the same server state; medians are reported with their ratio, and
//! the subscriber's peak RSS (VmHWM). Run: `cargo bench --bench e2e`
//! (E2E_POINTS, E2E_RUNS to change the size).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nbpy::backend::LocalInfluxd;
use nbpy::config::InfluxConfig;
use nbpy::feeds::synthetic::Generator;
use nbpy::sink::batch::Batcher;
use nbpy::sink::influx::InfluxClient;
use nbpy::sink::line::LineEncoder;

fn env_num(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn client(url: &str, db: &str) -> InfluxClient {
    InfluxClient::new(&InfluxConfig {
        url: url.into(),
        database: db.into(),
        ..Default::default()
    })
    .unwrap()
}

async fn count(c: &InfluxClient) -> u64 {
    let mut n = 0;
    for m in nbpy::schema::MEASUREMENTS
        .iter()
        .filter(|m| m.name != "nbpy_pipeline")
    {
        let q = format!(
            "SELECT count(\"seq\") FROM \"{}\".\"{}\".\"{}\"",
            c.database(),
            m.rp,
            m.name
        );
        n += c.query_number(&q).await.unwrap_or(0.0) as u64;
    }
    n
}

async fn ceiling(url: &str, db: &str, n: u64, cfg: &InfluxConfig) -> f64 {
    let c = client(url, db);
    nbpy::admin::schema::ensure(&c).await.unwrap();
    let mut gen = Generator::new(1, &[]);
    let mut enc = LineEncoder::new();
    let mut batcher = Batcher::new(cfg.batch_size, Duration::from_secs(3600));
    let mut batches = Vec::new();
    for seq in 1..=n {
        let mut e = gen.next_message();
        e.seq = seq;
        e.epoch = 1;
        e.publisher = "ceiling".into();
        let rp = nbpy::schema::by_channel(&e.ch).unwrap().rp;
        enc.encode(&e, batcher.buffer(rp)).unwrap();
        if let Some(b) = batcher.commit(rp) {
            batches.push(b);
        }
    }
    batches.extend(batcher.due(true));
    let queue = std::sync::Arc::new(std::sync::Mutex::new(batches));
    let t0 = Instant::now();
    let workers: Vec<_> = (0..cfg.concurrency)
        .map(|_| {
            let (q, c) = (queue.clone(), c.clone());
            tokio::spawn(async move {
                loop {
                    let next = q.lock().unwrap().pop();
                    let Some(b) = next else { break };
                    c.write(b.rp, &b.lines).await.unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(count(&c).await, n, "ceiling run stored everything");
    n as f64 / secs
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

async fn nbpy_run(dir: &std::path::Path, url: &str, db: &str, n: u64) -> (f64, u64) {
    let c = client(url, db);
    nbpy::admin::schema::ensure(&c).await.unwrap();
    let port = nbpy::backend::free_port().unwrap();
    let cfg = dir.join(format!("{db}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\n[influxdb]\nurl = \"{url}\"\ndatabase = \"{db}\"\n\
             [publishers.synth]\nendpoint = \"tcp://127.0.0.1:{port}\"\ncount = {n}\nwait_for_subscribers = 1\n\
             [subscribers.main]\nconnect = [\"tcp://127.0.0.1:{port}\"]\n",
            dir.join("state").display().to_string()
        ),
    )
    .unwrap();
    let spawn = |bin: &str, name: &str| {
        Command::new(bin)
            .args(["--config", cfg.to_str().unwrap(), name])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut publisher = spawn(env!("CARGO_BIN_EXE_nbpy-publisher"), "synth");
    // Start the clock once the publisher is bound, so the subscriber's
    // connect does not sit in ZeroMQ's reconnect backoff on our time.
    let bound = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            bound.elapsed() < Duration::from_secs(30),
            "publisher never bound"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t0 = Instant::now();
    let mut subscriber = spawn(env!("CARGO_BIN_EXE_nbpy-subscriber"), "main");
    let deadline = Duration::from_secs(600);
    loop {
        if count(&c).await >= n {
            break;
        }
        assert!(t0.elapsed() < deadline, "nbpy run did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let rss = vm_hwm_kib(subscriber.id());
    for child in [&mut subscriber, &mut publisher] {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = child.wait();
    }
    (n as f64 / secs, rss)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("e2e: bench");
        return;
    }
    let n = env_num("E2E_POINTS", 300_000);
    let runs = env_num("E2E_RUNS", 5);
    let dir = tempfile::tempdir().unwrap();
    let mut influx =
        LocalInfluxd::spawn(None, &dir.path().join("influx"), 0, None).expect("influxd on PATH");
    influx.wait_ready(Duration::from_secs(30)).unwrap();
    let url = influx.url();
    let cfg = InfluxConfig::default();
    let (mut ceil, mut ours, mut ratios, mut rss) = (vec![], vec![], vec![], vec![]);
    println!(
        "{n} points per run, batch {} , concurrency {}, gzip {}",
        cfg.batch_size, cfg.concurrency, cfg.gzip
    );
    println!(
        "{:>4} {:>16} {:>16} {:>8} {:>12}",
        "run", "ceiling pts/s", "nbpy pts/s", "ratio", "sub RSS MiB"
    );
    for i in 0..runs {
        let c = ceiling(&url, &format!("ceil{i}"), n, &cfg).await;
        let (o, r) = nbpy_run(dir.path(), &url, &format!("nbpy{i}"), n).await;
        println!(
            "{i:>4} {c:>16.0} {o:>16.0} {:>8.3} {:>12.1}",
            o / c,
            r as f64 / 1024.0
        );
        ceil.push(c);
        ours.push(o);
        ratios.push(o / c);
        rss.push(r as f64 / 1024.0);
    }
    println!(
        "median {:>14.0} {:>16.0} {:>8.3} {:>12.1}",
        median(&mut ceil),
        median(&mut ours),
        median(&mut ratios),
        median(&mut rss)
    );
}
