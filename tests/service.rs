//! The service contract over a real unix datagram NOTIFY_SOCKET (a path and
//! an abstract `@name`), with real processes: READY only when able to work,
//! WATCHDOG only while data flows, STOPPING and exit 0 on SIGTERM.

mod common;

use std::io::Write;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// Records every notification with its arrival time.
struct Recorder {
    msgs: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Recorder {
    fn bind(sock: UnixDatagram) -> Recorder {
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let m = msgs.clone();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match sock.recv(&mut buf) {
                    Ok(n) => m.lock().unwrap().push((
                        Instant::now(),
                        String::from_utf8_lossy(&buf[..n]).into_owned(),
                    )),
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => return,
                }
            }
        });
        Recorder { msgs }
    }
    fn all(&self) -> Vec<(Instant, String)> {
        self.msgs.lock().unwrap().clone()
    }
    fn wait_for(&self, needle: &str, deadline: Duration) -> Instant {
        let t0 = Instant::now();
        loop {
            if let Some((t, _)) = self.all().into_iter().find(|(_, m)| m.contains(needle)) {
                return t;
            }
            assert!(
                t0.elapsed() < deadline,
                "no {needle:?} within {deadline:?}: {:?}",
                self.all()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    fn count(&self, needle: &str, after: Instant, before: Instant) -> usize {
        self.all()
            .iter()
            .filter(|(t, m)| m.contains(needle) && *t >= after && *t < before)
            .count()
    }
}

fn envelope_line(seq: u64) -> String {
    let mut e = nbpy::wire::Envelope::new(
        "test",
        "ticker",
        "BTC/USD",
        nbpy::wire::now_ns(),
        vec![("bid".into(), nbpy::wire::Value::Float(seq as f64))],
    );
    e.seq = seq;
    let mut b = Vec::new();
    nbpy::wire::encode_v1(&e, &mut b).unwrap();
    String::from_utf8(b).unwrap() + "\n"
}

/// A replay publisher of `file` with `body` added to its section, its
/// STATUS read from a notify socket. It needs no InfluxDB: it only
/// publishes (to no subscriber unless the test connects one).
fn replay_publisher(dir: &Path, file: &Path, body: &str) -> (Proc, NotifyReader) {
    let cfg = dir.join("nbpy.toml");
    std::fs::write(
        &cfg,
        format!(
            "[publishers.rp]\nfeed = \"replay\"\nfile = {:?}\nendpoint = \"{}\"\n{body}",
            file.display().to_string(),
            free_endpoint()
        ),
    )
    .unwrap();
    let sock = dir.join("notify.sock");
    let notify = NotifyReader::bind(&sock);
    let log = dir.join("publisher.log");
    let f = std::fs::File::create(&log).unwrap();
    let child = std::process::Command::new(bin_path("nbpy-publisher"))
        .args(["--config", cfg.to_str().unwrap(), "rp"])
        .env_remove("WATCHDOG_USEC")
        .env("NOTIFY_SOCKET", &sock)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::from(f.try_clone().unwrap()))
        .stderr(std::process::Stdio::from(f))
        .spawn()
        .expect("spawn nbpy-publisher");
    (Proc { child, log }, notify)
}

/// The replay feed's last line: `replayed N messages, skipped M lines`.
fn replay_summary(log: &str) -> String {
    log.lines()
        .rev()
        .find(|l| l.contains("rp: replayed "))
        .unwrap_or_else(|| panic!("no replay summary in\n{log}"))
        .to_string()
}

/// A replay at a slow rate (a message every 20 s) stops when told, not at
/// its next tick: one that waited for the tick would outlast the unit's
/// stop timeout below about 0.025 msg/s, and be killed.
#[test]
fn a_slow_replay_stops_at_once_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("feed.jsonl");
    std::fs::write(&file, (1..=5).map(envelope_line).collect::<String>()).unwrap();
    let (mut p, mut status) =
        replay_publisher(dir.path(), &file, "rate = 0.05\nwait_for_subscribers = 0\n");
    // The first message is out: the next is due in 20 s.
    status.until("the first message sent", Duration::from_secs(20), |s| {
        s.contains(": 1 sent")
    });
    p.signal(nix::sys::signal::Signal::SIGTERM);
    // Within the publisher's flush limit (10 s).
    assert_eq!(p.wait(Duration::from_secs(10)).code(), Some(0));
    let log = p.log_text();
    assert!(
        replay_summary(&log).contains("replayed 1 messages"),
        "{log}"
    );
}

/// Lines that are not envelopes are skipped and counted, and the replay
/// goes on: not JSON, not UTF-8 (once the end of the replay, exit 66),
/// and longer than the largest envelope, which is dropped as it is read
/// rather than held whole (a 128 MiB line once took 300 MiB). The summary
/// says how many were skipped, and the WARNs held back by the rate limit
/// are counted at the end, not lost with it.
#[test]
fn replay_skips_and_counts_bad_lines_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("feed.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // Read+write: the publisher's open does not block, and the replay
    // ends only once this is closed, so the publisher's memory can be
    // read after the long line.
    let mut feed = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    let (mut p, mut status) = replay_publisher(
        dir.path(),
        &fifo,
        "rate = 10000\nwait_for_subscribers = 0\n",
    );
    let long = 128usize << 20;
    // Written on a thread: a publisher that ended early leaves it blocked
    // on the full pipe, and the test says so instead of hanging.
    let writer = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(envelope_line(1).as_bytes());
        bytes.extend_from_slice(b"not json 1\n");
        bytes.extend_from_slice(envelope_line(2).as_bytes());
        bytes.extend_from_slice(b"caf\xe9 latin-1 comment line\n");
        bytes.extend_from_slice(envelope_line(3).as_bytes());
        feed.write_all(&bytes).unwrap();
        let block = vec![b'a'; 1 << 20];
        for _ in 0..long >> 20 {
            feed.write_all(&block).unwrap();
        }
        let mut bytes = b"\n".to_vec();
        bytes.extend_from_slice(envelope_line(4).as_bytes());
        bytes.extend_from_slice(b"not json 2\n");
        // The last line without its newline.
        bytes.extend_from_slice(envelope_line(5).trim_end().as_bytes());
        feed.write_all(&bytes).unwrap();
        feed
    });
    let t0 = Instant::now();
    while !status
        .during(Duration::from_millis(100))
        .iter()
        .any(|s| s.contains(": 4 sent"))
    {
        if let Ok(Some(code)) = p.child.try_wait() {
            panic!("the replay ended early ({code}):\n{}", p.log_text());
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "not 4 replayed within 60 s:\n{}",
            p.log_text()
        );
    }
    let feed = writer.join().unwrap();
    let hwm_kib: u64 = std::fs::read_to_string(format!("/proc/{}/status", p.child.id()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    assert!(
        hwm_kib < (long as u64 >> 10) / 2,
        "peak memory {hwm_kib} KiB for a line of {} KiB",
        long >> 10
    );
    drop(feed);
    assert_eq!(p.wait(Duration::from_secs(20)).code(), Some(0));
    let log = p.log_text();
    let summary = replay_summary(&log);
    eprintln!("peak memory {hwm_kib} KiB; {summary}");
    assert!(
        summary.contains("replayed 5 messages, skipped 4 lines"),
        "{summary}"
    );
    // Every skipped line is in a WARN, said or counted as held back.
    let warned: u64 = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("skipping"))
        .map(|l| match l.find(" similar messages suppressed") {
            Some(_) => 1 + number_before(&l.replace('(', "( "), "similar messages suppressed"),
            None => 1,
        })
        .sum::<u64>()
        + log
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("more lines skipped"))
            .map(|l| number_before(l, "more lines skipped"))
            .sum::<u64>();
    assert_eq!(warned, 4, "{log}");
    let stop = log
        .lines()
        .rev()
        .find(|l| l.contains(" to no subscriber)"))
        .unwrap_or_else(|| panic!("no stop line in\n{log}"));
    assert!(stop.contains("sent 5 messages"), "{stop}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_ready_when_bound_watchdog_only_while_data_flows_clean_stop() {
    let env = Env::start().await;
    let sock_path = env.path("notify.sock");
    let rec = Recorder::bind(UnixDatagram::bind(&sock_path).unwrap());
    let fifo = env.path("feed.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // Read+write open never blocks on Linux and keeps the FIFO from hitting EOF.
    let mut feed = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    let ep = free_endpoint();
    let port: u16 = ep.rsplit(':').next().unwrap().parse().unwrap();
    let cfg = env.config(&format!(
        "[publishers.replay]\nfeed = \"replay\"\nfile = {:?}\nendpoint = \"{ep}\"\nstale_after = \"1s\"\n",
        fifo.display().to_string()
    ));
    let sock = sock_path.to_str().unwrap();
    let mut p = env.spawn(
        "nbpy-publisher",
        &["--config", cfg.to_str().unwrap(), "replay"],
        &[("NOTIFY_SOCKET", sock), ("WATCHDOG_USEC", "400000")],
    );
    rec.wait_for("READY=1", Duration::from_secs(20));
    // READY means the socket is bound: a connection succeeds right away.
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "READY before bind"
    );

    // Data flows for 2 s: pings keep coming.
    let flow_start = Instant::now();
    let mut seq = 0;
    while flow_start.elapsed() < Duration::from_secs(2) {
        seq += 1;
        feed.write_all(envelope_line(seq).as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(20)); // the data's pace, not synchronisation
    }
    let stall = Instant::now();
    let during_flow = rec.count("WATCHDOG=1", flow_start, stall);
    assert!(
        during_flow >= 5,
        "only {during_flow} pings while data flowed: {:?}",
        rec.all()
    );

    // The feed stalls: after stale_after (1 s) + one ping period the pings stop.
    let quiet_from = stall + Duration::from_millis(1000 + 400 + 300);
    let observe_until = quiet_from + Duration::from_secs(2);
    while Instant::now() < observe_until {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        rec.count("WATCHDOG=1", quiet_from, observe_until),
        0,
        "pings continued on a stalled feed: {:?}",
        rec.all()
    );
    assert!(
        p.log_text().contains("withholding pings"),
        "{}",
        p.log_text()
    );

    p.signal(nix::sys::signal::Signal::SIGTERM);
    let status = p.wait(Duration::from_secs(20));
    rec.wait_for("STOPPING=1", Duration::from_secs(5));
    assert_eq!(status.code(), Some(0), "{}", p.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Without a spool, READY waits for InfluxDB. (With one, the default, the
/// subscriber can work without InfluxDB: `tests/spool.rs` covers that.)
async fn subscriber_without_spool_ready_only_once_influxdb_answers_via_abstract_socket() {
    let dir = tempfile::tempdir().unwrap();
    let name = format!("nbpy-test-{}", std::process::id());
    let sock =
        UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
    let rec = Recorder::bind(sock);
    let port = nbpy::backend::free_port().unwrap();
    let ep = free_endpoint();
    let cfg = dir.path().join("nbpy.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\n[influxdb]\nurl = \"http://127.0.0.1:{port}\"\n[subscribers.main]\nconnect = [\"{ep}\"]\n[subscribers.main.spool]\nenabled = false\n",
            dir.path().join("state").display().to_string()
        ),
    )
    .unwrap();
    let mut xpub = <zeromq::XPubSocket as zeromq::Socket>::new();
    zeromq::Socket::bind(&mut xpub, &ep).await.unwrap();
    let log = dir.path().join("sub.log");
    let f = std::fs::File::create(&log).unwrap();
    let mut child = StopOnDrop(
        std::process::Command::new(bin_path("nbpy-subscriber"))
            .args(["--config", cfg.to_str().unwrap(), "main"])
            .env("NOTIFY_SOCKET", format!("@{name}"))
            .env_remove("WATCHDOG_USEC")
            .stderr(f)
            .spawn()
            .unwrap(),
    );
    rec.wait_for("waiting for InfluxDB", Duration::from_secs(20));
    assert!(
        !rec.all().iter().any(|(_, m)| m.contains("READY=1")),
        "READY without InfluxDB: {:?}",
        rec.all()
    );

    // Now InfluxDB comes up on the configured port: READY follows.
    let mut influx =
        nbpy::backend::LocalInfluxd::spawn(None, &dir.path().join("influx"), port, None).unwrap();
    influx.wait_ready(Duration::from_secs(30)).unwrap();
    let client = nbpy::sink::influx::InfluxClient::new(&nbpy::config::InfluxConfig {
        url: influx.url(),
        ..Default::default()
    })
    .unwrap();
    nbpy::admin::schema::ensure(&client).await.unwrap();
    let ready = rec.wait_for("READY=1", Duration::from_secs(30));
    let waiting: Vec<_> = rec
        .all()
        .into_iter()
        .filter(|(t, m)| m.contains("waiting for InfluxDB") && *t < ready)
        .collect();
    assert!(!waiting.is_empty());

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    rec.wait_for("STOPPING=1", Duration::from_secs(5));
    assert_eq!(
        status.code(),
        Some(0),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

/// The journald decision: `JOURNAL_STREAM` counts only when it names the
/// process's own stderr. (No journald runs on this machine, so the chosen
/// path shows as the fallback note; under the systemd harness the journal
/// itself receives the logs.)
#[test]
fn journal_is_chosen_only_when_journal_stream_matches_stderr() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let run = |journal_stream: Option<String>, log: &std::path::Path| {
        let f = std::fs::File::create(log).unwrap();
        let mut cmd = std::process::Command::new(bin_path("nbpy-publisher"));
        cmd.args(["no-such-publisher"])
            .env_remove("NBPY_CONFIG")
            .stderr(f);
        match journal_stream {
            Some(v) => cmd.env("JOURNAL_STREAM", v),
            None => cmd.env_remove("JOURNAL_STREAM"),
        };
        let status = cmd.status().unwrap();
        assert_eq!(
            status.code(),
            Some(78),
            "an unknown publisher is a config error"
        );
        std::fs::read_to_string(log).unwrap()
    };
    let log = dir.path().join("a.log");
    std::fs::write(&log, "").unwrap();
    let md = std::fs::metadata(&log).unwrap();
    // The file is recreated in place (same inode) by File::create's truncate.
    let matching = run(Some(format!("{}:{}", md.dev(), md.ino())), &log);
    assert!(matching.contains("stderr is the journal"), "{matching}");
    let other = dir.path().join("other");
    std::fs::write(&other, "").unwrap();
    let omd = std::fs::metadata(&other).unwrap();
    let mismatched = run(
        Some(format!("{}:{}", omd.dev(), omd.ino())),
        &dir.path().join("b.log"),
    );
    assert!(
        !mismatched.contains("stderr is the journal"),
        "{mismatched}"
    );
    assert!(mismatched.contains("no publisher named"), "{mismatched}");
    let unset = run(None, &dir.path().join("c.log"));
    assert!(!unset.contains("stderr is the journal"), "{unset}");
}

/// With its spool (the default), a subscriber can do its job while InfluxDB
/// is away, so it is READY and says it is spooling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_with_spool_is_ready_without_influxdb_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let rec = Recorder::bind(UnixDatagram::bind(&sock_path).unwrap());
    let port = nbpy::backend::free_port().unwrap();
    let ep = free_endpoint();
    let cfg = dir.path().join("nbpy.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\n[influxdb]\nurl = \"http://127.0.0.1:{port}\"\n[subscribers.main]\nconnect = [\"{ep}\"]\n",
            dir.path().join("state").display().to_string()
        ),
    )
    .unwrap();
    let mut xpub = <zeromq::XPubSocket as zeromq::Socket>::new();
    zeromq::Socket::bind(&mut xpub, &ep).await.unwrap();
    let mut child = StopOnDrop(
        std::process::Command::new(bin_path("nbpy-subscriber"))
            .args(["--config", cfg.to_str().unwrap(), "main"])
            .env("NOTIFY_SOCKET", &sock_path)
            .env_remove("WATCHDOG_USEC")
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    rec.wait_for("READY=1", Duration::from_secs(20));
    let ready = rec
        .all()
        .into_iter()
        .find(|(_, m)| m.contains("READY=1"))
        .unwrap()
        .1;
    assert!(
        ready.contains("spooling while InfluxDB is unreachable"),
        "{ready}"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
}
