//! Shared by the integration tests: a real private influxd, the real nbpy
//! binaries as child processes, and polling with deadlines (never sleeps as
//! synchronisation).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nbpy::backend::LocalInfluxd;
use nbpy::config::InfluxConfig;
use nbpy::sink::influx::InfluxClient;

pub struct Env {
    pub dir: tempfile::TempDir,
    pub influx: LocalInfluxd,
    pub client: InfluxClient,
}

impl Env {
    /// A temp dir and a real influxd with the schema applied.
    pub async fn start() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = std::fs::File::create(dir.path().join("influxd.log")).expect("log");
        let mut influx = LocalInfluxd::spawn(None, &dir.path().join("influxdb"), 0, Some(log))
            .expect("influxd must be installed (apt-get install influxdb); .ci/run installs it");
        influx
            .wait_ready(Duration::from_secs(30))
            .expect("influxd ready");
        let client = InfluxClient::new(&InfluxConfig {
            url: influx.url(),
            ..Default::default()
        })
        .expect("client");
        nbpy::admin::schema::ensure(&client).await.expect("schema");
        Env {
            dir,
            influx,
            client,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `body` as nbpy.toml, prefixed with this env's InfluxDB and state dir.
    pub fn config(&self, body: &str) -> PathBuf {
        let p = self.path("nbpy.toml");
        let text = format!(
            "state_dir = {:?}\n[influxdb]\nurl = {:?}\ndatabase = \"tick\"\n{body}",
            self.path("state").display().to_string(),
            self.influx.url()
        );
        std::fs::write(&p, text).expect("write config");
        p
    }

    /// Starts an nbpy binary with its stderr in `<name>.log`.
    pub fn spawn(&self, bin: &str, args: &[&str], envs: &[(&str, &str)]) -> Proc {
        let log = self.path(&format!("{}.log", args.last().copied().unwrap_or(bin)));
        let f = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(bin_path(bin));
        cmd.args(args)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(f.try_clone().expect("clone")))
            .stderr(Stdio::from(f));
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Proc {
            child: cmd.spawn().expect("spawn"),
            log,
        }
    }

    /// Points stored in a measurement (counted on its `seq` field, so only
    /// sequenced data points count).
    pub async fn count(&self, measurement: &str) -> u64 {
        let m = nbpy::schema::by_name(measurement).expect("known measurement");
        let q = format!(
            "SELECT count(\"seq\") FROM \"tick\".\"{}\".\"{}\"",
            m.rp, m.name
        );
        self.client.query_number(&q).await.unwrap_or(0.0) as u64
    }

    pub async fn count_data(&self) -> u64 {
        let mut n = 0;
        for m in nbpy::schema::MEASUREMENTS
            .iter()
            .filter(|m| m.name != "nbpy_pipeline")
        {
            n += self.count(m.name).await;
        }
        n
    }

    /// Polls until `total()` reaches `want` or the deadline passes; returns the last value.
    pub async fn wait_for_points(&self, want: u64, deadline: Duration) -> u64 {
        let t0 = Instant::now();
        loop {
            let n = self.count_data().await;
            if n >= want || t0.elapsed() > deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

pub fn bin_path(bin: &str) -> PathBuf {
    match bin {
        "nbpy" => PathBuf::from(env!("CARGO_BIN_EXE_nbpy")),
        "nbpy-publisher" => PathBuf::from(env!("CARGO_BIN_EXE_nbpy-publisher")),
        "nbpy-subscriber" => PathBuf::from(env!("CARGO_BIN_EXE_nbpy-subscriber")),
        "nbpy-health" => PathBuf::from(env!("CARGO_BIN_EXE_nbpy-health")),
        other => panic!("unknown binary {other}"),
    }
}

pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig);
    }

    /// Waits for exit with a deadline; kills and panics (showing the log) past it.
    pub fn wait(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s;
            }
            if t0.elapsed() > deadline {
                let _ = self.child.kill();
                panic!(
                    "process did not exit within {deadline:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`Proc::wait`], and the exit must be a success: else the panic
    /// shows how it ended and the process's log.
    pub fn wait_success(&mut self, deadline: Duration) {
        let s = self.wait(deadline);
        assert!(
            s.success(),
            "{} ended with {s}; log:\n{}",
            self.log.display(),
            self.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls the log until it contains `needle`.
    pub fn wait_log(&self, needle: &str, deadline: Duration) {
        let t0 = Instant::now();
        while !self.log_text().contains(needle) {
            if t0.elapsed() > deadline {
                panic!("log never said {needle:?}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn free_endpoint() -> String {
    format!("tcp://127.0.0.1:{}", free_test_port())
}

/// A free loopback port: from `TEST_PORT_RANGE` (`LO-HI`) when set, for a
/// machine where each user of the tests has a range of its own; else
/// [`nbpy::backend::free_port`].
pub fn free_test_port() -> u16 {
    let range = std::env::var("TEST_PORT_RANGE").ok().and_then(|r| {
        let (lo, hi) = r.split_once('-')?;
        Some((
            lo.trim().parse::<u16>().ok()?,
            hi.trim().parse::<u16>().ok()?,
        ))
    });
    let Some((lo, hi)) = range else {
        return nbpy::backend::free_port().expect("port");
    };
    use rand::Rng;
    let mut rng = rand::thread_rng();
    for _ in 0..256 {
        let port = rng.gen_range(lo..=hi);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in TEST_PORT_RANGE={lo}-{hi}");
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}

/// Outage tests: stopping and restarting the private influxd, counting
/// distinct sequence numbers, reading a subscriber's own counters.
impl Env {
    /// Stops influxd (SIGTERM, then SIGKILL after 10 s).
    pub fn stop_influx(&mut self) {
        self.influx.stop();
    }

    /// Starts influxd again on the same port and data, and waits until it answers.
    pub fn start_influx_again(&mut self) -> Duration {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(self.path("influxd.log"))
            .expect("influxd log");
        self.influx.restart(Some(log)).expect("restart influxd");
        self.influx
            .wait_ready(Duration::from_secs(60))
            .expect("influxd ready again")
    }

    /// Distinct `seq` values stored in a measurement.
    pub async fn count_distinct_seq(&self, measurement: &str) -> u64 {
        let m = nbpy::schema::by_name(measurement).expect("known measurement");
        let q = format!(
            "SELECT count(distinct(\"seq\")) FROM \"tick\".\"{}\".\"{}\"",
            m.rp, m.name
        );
        self.client.query_number(&q).await.unwrap_or(0.0) as u64
    }

    /// The last value of each field in a subscriber's `nbpy_pipeline` points.
    pub async fn pipeline_last(&self, component: &str, fields: &[&str]) -> Vec<Option<i64>> {
        let sel: Vec<String> = fields.iter().map(|f| format!("last(\"{f}\")")).collect();
        let q = format!(
            "SELECT {} FROM \"tick\".\"default\".\"nbpy_pipeline\" WHERE component = '{component}'",
            sel.join(", ")
        );
        let v = self.client.query(&q).await.expect("query nbpy_pipeline");
        let row = &v["results"][0]["series"][0]["values"][0];
        (0..fields.len()).map(|i| row[i + 1].as_i64()).collect()
    }
}

/// Segment files (`*.seg`) in a spool directory and their total size.
pub fn spool_files(dir: &Path) -> (usize, u64) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return (0, 0);
    };
    rd.filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
        .fold((0, 0), |(n, b), e| {
            (n + 1, b + e.metadata().map(|m| m.len()).unwrap_or(0))
        })
}

impl Env {
    /// Like [`Env::spawn`], with the output in `<log>.log` (for a second
    /// run of the same binary and name).
    pub fn spawn_as(&self, log: &str, bin: &str, args: &[&str]) -> Proc {
        let path = self.path(&format!("{log}.log"));
        let f = std::fs::File::create(&path).expect("log file");
        let mut cmd = Command::new(bin_path(bin));
        cmd.args(args)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(f.try_clone().expect("clone")))
            .stderr(Stdio::from(f));
        Proc {
            child: cmd.spawn().expect("spawn"),
            log: path,
        }
    }
}

/// A child that is asked to stop (SIGTERM, then SIGKILL after 15 s) when the
/// test ends, even by a failed assertion, so a supervisor like `nbpy up`
/// takes its own children down instead of leaving them running.
pub struct StopOnDrop(pub Child);

impl std::ops::Deref for StopOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for StopOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(15) {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// An HTTP server that is not the one a URL should point at: it answers
/// every request, whatever its path, with one fixed status line, headers
/// and body (InfluxDB's 404 for Grafana's `/api/...`, a web server's HTML
/// page on every path), until dropped.
pub struct FixedHttp {
    pub url: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FixedHttp {
    /// `status` is the status line's tail (`"200 OK"`), `headers` are
    /// `Name: value` lines added to Content-Length and Connection.
    pub fn start(
        status: &'static str,
        headers: &'static [&'static str],
        body: &'static str,
    ) -> FixedHttp {
        use std::io::{Read, Write};
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                let Ok((mut s, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                // The whole request (headers, then Content-Length bytes),
                // so the client never sees a reset while still sending.
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let n = s.read(&mut buf).unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    req.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&req).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len: usize = text[..end]
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse().ok())?
                            })
                            .unwrap_or(0);
                        if req.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                let mut head = format!("HTTP/1.1 {status}\r\n");
                for h in headers {
                    head.push_str(h);
                    head.push_str("\r\n");
                }
                let _ = write!(
                    s,
                    "{head}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        FixedHttp { url, stop }
    }

    /// Nginx's welcome page with 200 on every path.
    pub fn nginx() -> FixedHttp {
        FixedHttp::start(
            "200 OK",
            &["Server: nginx/1.22.1", "Content-Type: text/html"],
            "<!DOCTYPE html>\n<html><head><title>Welcome to nginx!</title></head>\
             <body><h1>Welcome to nginx!</h1></body></html>\n",
        )
    }
}

impl Drop for FixedHttp {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The service manager's end of sd_notify, read all along on a thread of
/// its own, as systemd does: once the socket's queue (10 datagrams) is
/// full, a reader that stopped would cost the service a second per
/// notification and lose the lines the test looks for.
pub struct NotifyReader {
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    seen: usize,
    /// `WATCHDOG=1` notifications so far.
    pub pings: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl NotifyReader {
    pub fn bind(path: &Path) -> NotifyReader {
        let sock = std::os::unix::net::UnixDatagram::bind(path).expect("bind the notify socket");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let to = lines.clone();
        let pings = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let ping = pings.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg.lines().any(|l| l == "WATCHDOG=1") {
                    ping.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                if let Some(s) = msg.lines().find_map(|l| l.strip_prefix("STATUS=")) {
                    to.lock().unwrap().push(s.to_string());
                }
            }
        });
        NotifyReader {
            lines,
            seen: 0,
            pings,
        }
    }

    /// The first STATUS not looked at yet for which `f` holds; panics with
    /// the last few past the deadline.
    pub fn until(&mut self, what: &str, deadline: Duration, f: impl Fn(&str) -> bool) -> String {
        let t0 = Instant::now();
        loop {
            {
                let lines = self.lines.lock().unwrap();
                while self.seen < lines.len() {
                    self.seen += 1;
                    if f(&lines[self.seen - 1]) {
                        return lines[self.seen - 1].clone();
                    }
                }
                assert!(
                    t0.elapsed() < deadline,
                    "no STATUS {what} within {deadline:?}; the last ones:\n{}",
                    lines[lines.len().saturating_sub(5)..].join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The STATUS lines not looked at yet, after waiting `wait` for more.
    pub fn during(&mut self, wait: Duration) -> Vec<String> {
        std::thread::sleep(wait);
        let lines = self.lines.lock().unwrap();
        let new = lines[self.seen..].to_vec();
        self.seen = lines.len();
        new
    }
}

impl Env {
    /// Waits until the data measurements hold at least `want` points.
    pub async fn wait_stored(&self, want: u64, deadline: Duration) -> u64 {
        let t0 = Instant::now();
        loop {
            let n = self.count_data().await;
            if n >= want {
                return n;
            }
            assert!(t0.elapsed() < deadline, "only {n} of {want} points stored");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The number just before `word` in `line` (a stop summary's counts).
pub fn number_before(line: &str, word: &str) -> u64 {
    let i = line
        .find(word)
        .unwrap_or_else(|| panic!("{word:?} in {line:?}"));
    line[..i]
        .trim_end()
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a number before {word:?} in {line:?}"))
}

/// Subscriber `name`'s last stop summary in `log`.
pub fn stop_summary(log: &str, name: &str) -> String {
    let needle = format!("subscriber {name}: stopped in");
    log.lines()
        .rev()
        .find(|l| l.contains(&needle))
        .unwrap_or_else(|| panic!("no stop summary of {name} in\n{log}"))
        .to_string()
}
