//! End-to-end throughput against InfluxDB's own ceiling, measured in the
//! same run on the same machine:
//!
//! - ceiling: the same synthetic points, pre-encoded, POSTed straight to
//!   /write with the subscriber's batch size, concurrency and gzip (and
//!   stamped as the nbpy run's publisher stamps them: its name, a
//!   nanosecond epoch);
//! - nbpy: synthetic publisher → ZeroMQ TCP → subscriber → the same influxd.
//!
//! Both are timed the same way, in InfluxDB's write counter from the first
//! write landing to all but the last open batches (`steady_rate`: a finite
//! run's final partial batches wait for the flush interval, which is not
//! throughput).
//!
//! Runs alternate (ceiling, nbpy, taxed ceiling, ceiling, …) into fresh
//! databases, each dropped once counted (`drop_database`) and each run
//! starting once influxd is idle again (`settle`), so all see the same
//! server state;
//! medians are reported with their ratio, and the subscriber's peak RSS
//! (VmHWM). Run: `cargo bench --bench e2e`
//! (E2E_POINTS, E2E_RUNS to change the size, E2E_GZIP=true|false|auto,
//! E2E_TAX_US to tax the third run by a fixed CPU cost per point).
//!
//! The end of an nbpy run is seen in InfluxDB's own write counter
//! (`/debug/vars`), not by `count()` queries: on two cores, polling a scan
//! of every stored point took CPU from the very server being measured.
//! The exact count is checked once the clock has stopped.
//!
//! CPU columns are user+system seconds per point of each process over the
//! run, so a lower ratio can be traced to whoever spent the cycles. The
//! machine's idle share over each timed window (/proc/stat, all CPUs) is
//! summed up per kind of run at the end: it says whether the runs were
//! CPU-bound, which the CPU model and the taxed ceiling assume.
//!
//! On a small machine the processes compete for the same cores, so the
//! ratio is mostly nbpy's CPU per point against influxd's. `E2E_PIN=1`
//! answers the other question, whether nbpy keeps up with InfluxDB when
//! each has its own core: influxd on CPU 0, everything else on CPU 1, in
//! both the ceiling and the nbpy runs (needs `taskset` and two CPUs).
//!
//! The third run of each set, the taxed ceiling, measures that bound
//! instead of modelling it: the ceiling again, while a child process burns
//! exactly the CPU seconds that the paired nbpy run's publisher and
//! subscriber used (from the start of the posting, at full speed, as the
//! pipeline spends its CPU in the burst at the start). A pipeline that
//! costs nothing but its CPU delivers what the taxed ceiling does; the
//! taxed ceiling over the ceiling is then the most that any pipeline with
//! nbpy's CPU per point can reach on this machine, and nbpy over the taxed
//! ceiling is what is left to explain by anything else (latency, batching,
//! cache and scheduling effects).
//!
//! `E2E_BASELINE=DIR` compares two builds in the same run: DIR holds
//! another build's `nbpy-publisher` and `nbpy-subscriber` (for instance a
//! `git worktree` of the last release, built with `cargo build --release
//! --bins`). Each ceiling run is then followed by an nbpy run of each
//! build, in alternating order, both divided by that ceiling. Sets run
//! an hour apart on a shared machine differ by more than a 10% change
//! in nbpy's CPU moves the ratio, so a change is judged by the per-run
//! difference against the baseline, not by two sets' medians.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nbpy::backend::LocalInfluxd;
use nbpy::config::InfluxConfig;
use nbpy::feeds::synthetic::Generator;
use nbpy::sink::batch::Batcher;
use nbpy::sink::influx::InfluxClient;
use nbpy::sink::line::LineEncoder;

mod stats;
use stats::{median, quantile};

fn env_num(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// `E2E_GZIP=true|false|auto` (default auto: off for this local influxd),
/// for the ceiling's client and the subscriber alike.
fn gzip() -> nbpy::config::Gzip {
    use nbpy::config::Gzip;
    match std::env::var("E2E_GZIP").as_deref() {
        Ok("true") => Gzip::On,
        Ok("false") => Gzip::Off,
        _ => Gzip::Auto,
    }
}

fn client(url: &str, db: &str) -> InfluxClient {
    InfluxClient::new(&InfluxConfig {
        url: url.into(),
        database: db.into(),
        gzip: gzip(),
        ..Default::default()
    })
    .unwrap()
}

/// Stored points per measurement (`seq` is in every one of them).
async fn counts(c: &InfluxClient) -> Vec<(&'static str, u64)> {
    let mut out = Vec::new();
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
        out.push((m.name, c.query_number(&q).await.unwrap_or(0.0) as u64));
    }
    out
}

async fn count(c: &InfluxClient) -> u64 {
    counts(c).await.iter().map(|(_, k)| k).sum()
}

/// The stored count, read until it reaches `n` or `within` has passed
/// (the caller checks it is exactly `n`).
async fn count_until(c: &InfluxClient, n: u64, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let got = count(c).await;
        if got >= n || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Once a run is counted. The schema's downsampling queries re-aggregate
/// the last two minutes of every database every 30 s; with a database kept
/// per run they piled up into bursts of work that hit whichever run was
/// going, the largest part of the run-to-run spread.
///
/// A failed drop is retried, then ends the set (see [`WEDGED`]); the run
/// it follows was already measured and counts.
async fn drop_database(c: &InfluxClient) {
    const TRIES: u32 = 5;
    let q = format!("DROP DATABASE \"{}\"", c.database());
    for attempt in 1..=TRIES {
        match c.query(&q).await {
            Ok(_) => return,
            Err(e) if attempt == TRIES => {
                eprintln!("could not drop {}: {e}", c.database());
                WEDGED.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Set when a `DROP DATABASE` never completed. Debian's influxd (1.6) can
/// deadlock there: closing a shard waits for a TSM reader that is never
/// released, and every later request that touches the shard, `/debug/vars`
/// included, waits behind it (seen in a goroutine dump after a 30-run set
/// hung at run 21). No later run could be timed, so the set ends with the
/// runs it has.
static WEDGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// CPU microseconds per point, by process.
#[derive(Default, Clone, Copy)]
struct Cpu {
    influxd: f64,
    client: f64,
    publisher: f64,
}

/// A ceiling run; with `tax`, a burner child spends that many CPU seconds
/// alongside it (see the module doc), and the CPU seconds it really spent
/// by the time the run was complete are returned with the rates.
async fn ceiling(
    url: &str,
    db: &str,
    (n, tail): (u64, u64),
    cfg: &InfluxConfig,
    influxd: u32,
    tax: Option<f64>,
) -> Option<(Rates, Cpu)> {
    let c = client(url, db);
    nbpy::admin::schema::ensure(&c).await.unwrap();
    let mut gen = Generator::new(1, &[]);
    let mut enc = LineEncoder::new();
    let mut batcher = Batcher::new(cfg.batch_size, Duration::from_secs(3600));
    let mut batches = Vec::new();
    let epoch = nbpy::wire::now_ns() as u64;
    for seq in 1..=n {
        let mut e = gen.next_message();
        // As the nbpy run's publisher stamps them: its name, and its
        // start in ns as the epoch (a 19-digit field in every line; `1`
        // here was 18 bytes a point shorter than what nbpy writes).
        e.seq = seq;
        e.epoch = epoch;
        e.publisher = "synth".into();
        let rp = nbpy::schema::by_channel(&e.ch).unwrap().rp;
        enc.encode(&e, batcher.buffer(rp)).unwrap();
        if let Some(b) = batcher.commit(rp) {
            batches.push(b);
        }
    }
    batches.extend(batcher.due(true));
    // Oldest first, as the subscriber sends them; as Bytes, the form the
    // subscriber's writer hands to the client.
    let queue = std::sync::Arc::new(std::sync::Mutex::new(
        batches
            .into_iter()
            .map(|b| (b.rp, bytes::Bytes::from(b.lines)))
            .collect::<std::collections::VecDeque<_>>(),
    ));
    let me = std::process::id();
    settle(influxd).await;
    let (i0, m0) = (cpu_secs(influxd), cpu_secs(me));
    let w0 = start_count(url).await;
    let mut burner = tax.map(|secs| {
        command(&std::env::current_exe().unwrap())
            .args(["--burn", &secs.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    });
    let workers: Vec<_> = (0..cfg.concurrency)
        .map(|_| {
            let (q, c) = (queue.clone(), c.clone());
            tokio::spawn(async move {
                loop {
                    let next = q.lock().unwrap().pop_front();
                    let Some((rp, lines)) = next else { break };
                    c.write(rp, lines).await.unwrap();
                }
            })
        })
        .collect();
    let rate = steady_rate(url, w0, n, tail).await;
    for w in workers {
        w.await.unwrap();
    }
    let per = |d: f64| d * 1e6 / n as f64;
    // What the burner spent within the run; one still burning when the
    // last point landed is stopped there, and the row shows the shortfall.
    let burned = burner.as_mut().map_or(0.0, |b| {
        let spent = cpu_secs(b.id());
        let _ = b.kill();
        let _ = b.wait();
        spent
    });
    let cpu = Cpu {
        influxd: per(cpu_secs(influxd) - i0),
        client: per(cpu_secs(me) - m0),
        publisher: per(burned),
    };
    // InfluxDB answered 2xx to every write, yet twice in a few hundred
    // runs the count stayed one batch short (295,000 of 300,000) for all of
    // the 30 s; two concurrent first writes into a fresh database, tried 60
    // times alone, did not reproduce it, so the cause is not known. Such a
    // run has no valid ceiling: it is reported, per measurement, and its
    // pair left out, instead of ending a long set. (A short nbpy run still
    // ends the bench: that count is the pipeline's promise.)
    let stored = count_until(&c, n, Duration::from_secs(30)).await;
    let result = if stored == n {
        Some((rate, cpu))
    } else {
        println!(
            "{db}: ceiling run stored {stored} of {n} acknowledged points ({:?}); pair left out",
            counts(&c).await
        );
        None
    };
    drop_database(&c).await;
    result
}

/// Points per second in InfluxDB's write counter, from the first write of
/// a run landing to the counter being `tail` short of `n`. Both kinds of
/// run are timed this way, so neither pays for what precedes its first
/// write: the ceiling's batches are ready at once, while nbpy's first batch
/// waits for the subscriber to start, connect and fill 5,000 points (~3% of
/// a 300k run when it was timed from the subscriber's spawn). Nor for the
/// end of a finite stream: its last, partial batches wait for the
/// subscriber's flush interval (up to 1 s, on runs of 2–3 s), which is
/// latency at the end of a burst, not throughput; `tail` is what can wait
/// there, a batch per retention policy. Returns once all `n` have landed,
/// so the CPU columns cover the whole run.
async fn steady_rate(url: &str, w0: u64, n: u64, tail: u64) -> Rates {
    let deadline = Instant::now() + Duration::from_secs(600);
    // Each poll costs influxd and the bench a /debug/vars document.
    let poll = Duration::from_millis(25);
    let (t1, w1, k1) = loop {
        let w = points_written(url).await.unwrap_or(0);
        if w > w0 {
            break (Instant::now(), w, cpu_ticks());
        }
        assert!(Instant::now() < deadline, "no write landed");
        tokio::time::sleep(poll).await;
    };
    // The subscriber also writes a few nbpy_pipeline points, so the
    // counter can pass n a moment early; the exact count is checked after.
    // A run too short to leave the tail out (its first write already
    // passed the cut) is timed to its last point.
    let target = w0 + n.saturating_sub(tail);
    let mut cut = None;
    let (t3, w3, k3) = loop {
        let w = points_written(url).await.unwrap_or(0);
        if cut.is_none() && target > w1 && w >= target {
            cut = Some((Instant::now(), w, cpu_ticks()));
        }
        if w >= w0 + n {
            break (Instant::now(), w, cpu_ticks());
        }
        assert!(Instant::now() < deadline, "the run did not finish");
        tokio::time::sleep(poll).await;
    };
    let (t2, w2, k2) = cut.unwrap_or((t3, w3, k3));
    let per_s = |w: u64, t: Instant| (w - w1) as f64 / (t - t1).as_secs_f64().max(1e-3);
    Rates {
        steady: per_s(w2, t2),
        whole: per_s(w3, t3),
        idle: (k2.0 - k1.0) as f64 / (k2.1 - k1.1).max(1) as f64,
    }
}

/// Points per second of a run: sustained, and to the last point landing.
#[derive(Clone, Copy)]
struct Rates {
    steady: f64,
    whole: f64,
    /// Share of all CPUs' time left idle over the steady window.
    idle: f64,
}

/// All CPUs' idle (with iowait) and total time so far, in ticks, from
/// the first line of /proc/stat (user nice system idle iowait irq softirq
/// steal; guest time is already in user).
fn cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (idle, v.iter().sum())
}

/// Points InfluxDB has accepted for writing since it started, all databases.
async fn points_written(url: &str) -> Result<u64, String> {
    // One client for every poll (40 a second): `reqwest::get` built a
    // client and a connection per call, CPU billed to the bench itself,
    // the ceiling's "poster" column. The timeout turns a wedged influxd
    // into an error instead of a hang.
    static HTTP: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    let http = HTTP.get_or_init(|| {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    });
    let r = http
        .get(format!("{url}/debug/vars"))
        .send()
        .await
        .map_err(|e| format!("GET /debug/vars: {e}"))?;
    let v = r
        .json::<serde_json::Value>()
        .await
        .map_err(|e| format!("/debug/vars answer: {e}"))?;
    v["write"]["values"]["pointReqLocal"]
        .as_u64()
        .ok_or_else(|| "/debug/vars has no write.values.pointReqLocal".to_string())
}

/// The count a run is timed from. Polls during a run may miss (they then
/// count as no progress, and the run's deadline ends a stuck one), but a
/// wrong starting point would time the whole run wrongly and silently.
async fn start_count(url: &str) -> u64 {
    points_written(url)
        .await
        .unwrap_or_else(|e| panic!("cannot read InfluxDB's write counter before a run: {e}"))
}

/// Waits until influxd is idle (under ~8% of a core over 250 ms), at most
/// 20 s. After a run it keeps working for a while (cache snapshots, TSM
/// compactions of what was just written); without this the run that
/// starts right after another paid for its predecessor's data. Each run
/// now starts from a quiet server, as the ceiling runs did by accident
/// (they pre-encode their batches first).
async fn settle(influxd: u32) {
    let t0 = Instant::now();
    loop {
        let c0 = cpu_secs(influxd);
        tokio::time::sleep(Duration::from_millis(250)).await;
        if cpu_secs(influxd) - c0 < 0.02 || t0.elapsed() > Duration::from_secs(20) {
            return;
        }
    }
}

/// User + system CPU seconds a process has used so far.
fn cpu_secs(pid: u32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f
        .get(11..13)
        .map(|v| v.iter().filter_map(|x| x.parse::<f64>().ok()).sum())
        .unwrap_or(0.0);
    ticks / 100.0
}

/// Moves every thread of `pid` to `cpu` (`taskset -a`).
fn pin(pid: u32, cpu: u32) {
    let ok = Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "taskset could not pin pid {pid} to CPU {cpu}");
}

fn pinned() -> bool {
    std::env::var("E2E_PIN").is_ok_and(|v| v == "1")
}

/// A command for a process that takes nbpy's place: on CPU 1 when pinned.
fn command(bin: &std::path::Path) -> Command {
    if pinned() {
        let mut c = Command::new("taskset");
        c.args(["-c", "1"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

/// `E2E_TAX_US`: a fixed tax in CPU µs per point for the taxed ceiling,
/// to find the CPU budget a target ratio leaves a pipeline on this machine.
fn tax_us() -> Option<f64> {
    let v = std::env::var("E2E_TAX_US").ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("E2E_TAX_US={v:?}: not a number of CPU µs per point")),
    )
}

/// `--burn SECS`: this binary as the taxed ceiling's burner.
fn burn_arg() -> Option<f64> {
    let args: Vec<String> = std::env::args().collect();
    let at = args.iter().position(|a| a == "--burn")?;
    args.get(at + 1).and_then(|v| v.parse().ok())
}

/// Spins until this process has used `secs` of CPU. The work is integer
/// hashing over a small array, so it takes a core without filling its
/// caches; a pipeline's memory traffic is not reproduced, and that is one
/// of the things nbpy against the taxed ceiling shows.
fn burn(secs: f64) {
    let me = std::process::id();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut a = [0u64; 64];
    while cpu_secs(me) < secs {
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            a[(x & 63) as usize] = a[(x & 63) as usize].wrapping_add(x);
        }
    }
    std::hint::black_box(a);
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

/// The two binaries an nbpy run starts.
struct Build {
    publisher: std::path::PathBuf,
    subscriber: std::path::PathBuf,
}

impl Build {
    fn this() -> Self {
        Build {
            publisher: env!("CARGO_BIN_EXE_nbpy-publisher").into(),
            subscriber: env!("CARGO_BIN_EXE_nbpy-subscriber").into(),
        }
    }

    /// `E2E_BASELINE`'s build, if set.
    fn baseline() -> Option<Self> {
        let dir = std::path::PathBuf::from(std::env::var_os("E2E_BASELINE")?);
        let b = Build {
            publisher: dir.join("nbpy-publisher"),
            subscriber: dir.join("nbpy-subscriber"),
        };
        for p in [&b.publisher, &b.subscriber] {
            assert!(p.is_file(), "E2E_BASELINE: {} is not there", p.display());
        }
        Some(b)
    }
}

async fn nbpy_run(
    dir: &std::path::Path,
    url: &str,
    db: &str,
    (n, tail): (u64, u64),
    influxd: u32,
    build: &Build,
) -> (Rates, u64, Cpu) {
    let c = client(url, db);
    nbpy::admin::schema::ensure(&c).await.unwrap();
    let port = nbpy::backend::free_port().unwrap();
    let cfg = dir.join(format!("{db}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\n[influxdb]\nurl = \"{url}\"\ndatabase = \"{db}\"\ngzip = {}\n\
             [publishers.synth]\nendpoint = \"tcp://127.0.0.1:{port}\"\ncount = {n}\nwait_for_subscribers = 1\n\
             [subscribers.main]\nconnect = [\"tcp://127.0.0.1:{port}\"]\n",
            dir.join("state").display().to_string(),
            // As the config writes it: `true`, `false` or `"auto"`.
            toml::Value::try_from(gzip()).unwrap()
        ),
    )
    .unwrap();
    let spawn = |bin: &std::path::Path, name: &str| {
        command(bin)
            .args(["--config", cfg.to_str().unwrap(), name])
            .env("RUST_LOG", "warn,zeromq=error")
            .stdin(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut publisher = spawn(&build.publisher, "synth");
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
    settle(influxd).await;
    let written0 = start_count(url).await;
    let (i0, p0) = (cpu_secs(influxd), cpu_secs(publisher.id()));
    let t0 = Instant::now();
    let mut subscriber = spawn(&build.subscriber, "main");
    let deadline = Duration::from_secs(600);
    let rate = steady_rate(url, written0, n, tail).await;
    let per = |d: f64| d * 1e6 / n as f64;
    let cpu = Cpu {
        influxd: per(cpu_secs(influxd) - i0),
        client: per(cpu_secs(subscriber.id())),
        publisher: per(cpu_secs(publisher.id()) - p0),
    };
    let rss = vm_hwm_kib(subscriber.id());
    let stored = count_until(&c, n, deadline.saturating_sub(t0.elapsed())).await;
    if stored != n {
        panic!(
            "{db}: nbpy run stored {stored} of {n} points ({:?})",
            counts(&c).await
        );
    }
    for child in [&mut subscriber, &mut publisher] {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = child.wait();
    }
    drop_database(&c).await;
    (rate, rss, cpu)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("e2e: bench");
        return;
    }
    if let Some(secs) = burn_arg() {
        burn(secs);
        return;
    }
    let n = env_num("E2E_POINTS", 300_000);
    let runs = env_num("E2E_RUNS", 5);
    let dir = tempfile::tempdir().unwrap();
    let mut influx =
        LocalInfluxd::spawn(None, &dir.path().join("influx"), 0, None).expect("influxd on PATH");
    influx.wait_ready(Duration::from_secs(30)).unwrap();
    let url = influx.url();
    let cfg = InfluxConfig {
        url: url.clone(),
        gzip: gzip(),
        ..Default::default()
    };
    let influxd = influx.pid().expect("influxd running");
    if pinned() {
        pin(influxd, 0);
        pin(std::process::id(), 1);
        println!("pinned: influxd on CPU 0; poster, publisher and subscriber on CPU 1");
    }
    // What a finite run can leave in open batches at its end (see
    // `steady_rate`): a batch per retention policy the synthetic feed uses.
    let rps: std::collections::BTreeSet<&str> = nbpy::feeds::synthetic::CHANNELS
        .iter()
        .filter_map(|ch| nbpy::schema::by_channel(ch))
        .map(|m| m.rp)
        .collect();
    let tail = rps.len() as u64 * cfg.batch_size as u64;
    // One column per field of a row (see `line`).
    let mut cols: [Vec<f64>; COLS] = Default::default();
    println!(
        "{n} points per run, batch {}, concurrency {}, gzip {}; pts/s and ratio to {} points, \
         'to last' = ratio to the last point",
        cfg.batch_size,
        cfg.concurrency,
        cfg.gzip_enabled(),
        n - tail.min(n)
    );
    println!("CPU µs/point: ceiling influxd + poster | nbpy influxd + subscriber + publisher");
    match tax_us() {
        Some(us) => println!(
            "taxed: the ceiling again while a burner spends {us} CPU µs per point (E2E_TAX_US); \
             tax/ceil = what a pipeline of that CPU allows"
        ),
        None => println!(
            "taxed: the ceiling again while a burner spends nbpy's CPU (sub + pub) of the pair; \
             tax/ceil = what nbpy's CPU alone allows, nbpy/tax = the rest"
        ),
    }
    println!(
        "{:>6} {:>14} {:>14} {:>7} {:>7} {:>8} {:>22} {:>22} {:>7} {:>7} {:>6}",
        "run",
        "ceiling pts/s",
        "nbpy pts/s",
        "ratio",
        "to last",
        "RSS MiB",
        "ceiling cpu ifx/post",
        "nbpy cpu ifx/sub/pub",
        "tax/ceil",
        "nbpy/tax",
        "burned"
    );
    let (this, baseline) = (Build::this(), Build::baseline());
    if baseline.is_some() {
        println!("'base' rows: the E2E_BASELINE build against the same ceiling run");
    }
    let mut base_cols: [Vec<f64>; COLS] = Default::default();
    // Idle share of the machine per run kind: ceiling, nbpy, taxed.
    let mut idle: [Vec<f64>; 3] = Default::default();
    let (mut left_out, mut tried) = (0, 0);
    for i in 0..runs {
        if WEDGED.load(std::sync::atomic::Ordering::Relaxed) {
            println!("influxd did not drop a run's database; the set ends after {i} runs");
            break;
        }
        tried += 1;
        let Some((c, cc)) =
            ceiling(&url, &format!("ceil{i}"), (n, tail), &cfg, influxd, None).await
        else {
            left_out += 1;
            continue;
        };
        // With a baseline, which build goes first alternates, so neither
        // always follows the ceiling run directly.
        let mut order = vec![(&this, false)];
        if let Some(b) = &baseline {
            order.insert(i as usize % 2, (b, true));
        }
        let mut runs = Vec::new();
        for (build, is_base) in order {
            let db = format!("nbpy{i}{}", if is_base { "b" } else { "" });
            runs.push((
                is_base,
                nbpy_run(dir.path(), &url, &db, (n, tail), influxd, build).await,
            ));
        }
        // The ceiling again, taxed with this build's CPU from its run, or
        // with E2E_TAX_US per point.
        let (_, (_, _, this_cpu)) = runs.iter().find(|(b, _)| !b).unwrap();
        let tax_us = tax_us().unwrap_or(this_cpu.client + this_cpu.publisher);
        let tax = tax_us * n as f64 / 1e6;
        let Some((t, tc)) = ceiling(
            &url,
            &format!("tax{i}"),
            (n, tail),
            &cfg,
            influxd,
            Some(tax),
        )
        .await
        else {
            left_out += 1;
            continue;
        };
        for (is_base, (o, r, oc)) in runs {
            let row = [
                c.steady,
                o.steady,
                o.steady / c.steady,
                o.whole / c.whole,
                r as f64 / 1024.0,
                cc.influxd,
                cc.client,
                oc.influxd,
                oc.client,
                oc.publisher,
                t.steady / c.steady,
                o.steady / t.steady,
                tc.publisher,
            ];
            let (label, cols) = if is_base {
                ("  base".to_string(), &mut base_cols)
            } else {
                for (v, x) in idle.iter_mut().zip([c.idle, o.idle, t.idle]) {
                    v.push(100.0 * x);
                }
                (format!("{i:>6}"), &mut cols)
            };
            println!("{}", line(&label, &row));
            for (col, x) in cols.iter_mut().zip(row) {
                col.push(x);
            }
        }
    }
    if cols[0].is_empty() {
        println!("no run counted ({left_out} of {tried} left out: their ceiling run lost acknowledged points)");
        return;
    }
    // Pinned, influxd has a core to itself and the runs are not bound by
    // the same CPU, so the model does not apply.
    let share = (!pinned()).then(|| cpu_share(&cols));
    let medians = cols.clone().map(|mut c| median(&mut c));
    println!("{}", line("median", &medians));
    // On a shared machine single pairs swing widely; the spread says how
    // far a set's median can be trusted, and the ratio of the median
    // rates is a second estimate that should agree with it.
    let (q1, q3) = (
        cols.clone().map(|mut c| quantile(&mut c, 1, 4)),
        cols.clone().map(|mut c| quantile(&mut c, 3, 4)),
    );
    println!("{}", line("q1", &q1));
    println!("{}", line("q3", &q3));
    println!(
        "ratio: median of pairs {:.3} (quartiles {:.3}–{:.3}); ratio of median rates {:.3}",
        medians[2],
        q1[2],
        q3[2],
        medians[1] / medians[0]
    );
    if let Some(s) = share {
        println!("{s}");
    }
    println!(
        "taxed ceiling: median {:.3} of the ceiling (quartiles {:.3}–{:.3}); nbpy against it: median {:.3} (quartiles {:.3}–{:.3})",
        medians[10], q1[10], q3[10], medians[11], q1[11], q3[11]
    );
    // The CPU model and the taxed ceiling assume every run keeps both
    // cores busy; this says how far each kind of run fell short of that.
    let pct = |v: &[f64]| {
        let [mid, q1, q3] = spread(v);
        format!("{mid:.1}% ({q1:.1}–{q3:.1})")
    };
    println!(
        "machine idle in the timed window (all CPUs, /proc/stat): ceiling {}, nbpy {}, taxed {}",
        pct(&idle[0]),
        pct(&idle[1]),
        pct(&idle[2])
    );
    if baseline.is_some() {
        compare(&cols, &base_cols);
    }
    if left_out > 0 {
        println!("{left_out} of {tried} runs left out: their ceiling run lost acknowledged points");
    }
}

/// This build against the baseline, run by run (each against the same
/// ceiling run), then the baseline's own summary.
fn compare(this_cols: &[Vec<f64>; COLS], base_cols: &[Vec<f64>; COLS]) {
    let this = &this_cols[2];
    let diff: Vec<f64> = this.iter().zip(&base_cols[2]).map(|(t, b)| t - b).collect();
    let ahead = diff.iter().filter(|d| **d > 0.0).count();
    let medians = base_cols.clone().map(|mut c| median(&mut c));
    println!("{}", line("b.med", &medians));
    let [mid, q1, q3] = spread(&diff);
    println!(
        "baseline: median of pairs {:.3}; this − baseline per run: median {mid:+.3} \
         (quartiles {q1:+.3} to {q3:+.3}), this build ahead in {ahead} of {} runs",
        medians[2],
        this.len()
    );
    if pinned() {
        return;
    }
    println!("baseline {}", cpu_share(base_cols));
    // nbpy's CPU per point (subscriber + publisher), run against run: a
    // change to either binary shows here long before it shows in a ratio.
    let d: Vec<f64> = (0..this.len())
        .map(|i| nbpy_cpu(this_cols, i) - nbpy_cpu(base_cols, i))
        .collect();
    let [mid, q1, q3] = spread(&d);
    println!(
        "nbpy CPU µs/point, this − baseline per run: median {mid:+.3} (quartiles {q1:+.3} to {q3:+.3})"
    );
}

/// The ratio the CPU columns predict when both kinds of run keep both
/// cores busy, as they do unpinned on a small machine: points per second
/// are then the cores over the CPU per point of everyone, so the ratio is
/// (ceiling influxd + poster) / (ceiling influxd + subscriber + publisher),
/// with influxd's cost per point taken from the same pair's ceiling run.
/// Unlike the measured ratio, it does not swing with influxd's cost per
/// point from one run to the next (9–17 µs on this shared machine), so it
/// says what nbpy's own CPU allows, and how much of it that is.
fn cpu_share(cols: &[Vec<f64>; COLS]) -> String {
    let model: Vec<f64> = (0..cols[0].len())
        .map(|i| (cols[5][i] + cols[6][i]) / (cols[5][i] + nbpy_cpu(cols, i)))
        .collect();
    let mut share: Vec<f64> = (0..cols[0].len())
        .map(|i| nbpy_cpu(cols, i) / cols[5][i])
        .collect();
    let [mid, q1, q3] = spread(&model);
    format!(
        "cpu model: ratio {mid:.3} (quartiles {q1:.3}–{q3:.3}) if all runs are CPU-bound; \
         nbpy's CPU per point is {:.1}% of influxd's",
        100.0 * median(&mut share)
    )
}

/// Subscriber + publisher CPU µs per point in run `i` (see [`line`]).
fn nbpy_cpu(cols: &[Vec<f64>; COLS], i: usize) -> f64 {
    cols[8][i] + cols[9][i]
}

/// Median, first and third quartile of `v`.
fn spread(v: &[f64]) -> [f64; 3] {
    let mut v = v.to_vec();
    [
        median(&mut v),
        quantile(&mut v, 1, 4),
        quantile(&mut v, 3, 4),
    ]
}

/// Fields of a row (see [`line`]).
const COLS: usize = 13;

/// One row of the table: pts/s, ratios, RSS, CPU; then the taxed
/// ceiling's ratio to the ceiling, nbpy's ratio to the taxed ceiling and
/// the burner's CPU µs per point (nbpy's, when it burned all it was given).
fn line(label: &str, v: &[f64; COLS]) -> String {
    format!(
        "{label:>6} {:>14.0} {:>14.0} {:>7.3} {:>7.3} {:>8.1} {:>12.2} /{:>7.2} {:>8.2} /{:>5.2} /{:>5.2} {:>7.3} {:>7.3} {:>6.2}",
        v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11], v[12]
    )
}
