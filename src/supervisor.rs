//! `nbpy up`: the five phases without systemd, for a laptop or a CI box.
//!
//! The same library calls the units make (schema `ensure_with`, Grafana
//! `render_to`/`apply`, the publisher and subscriber binaries), so `nbpy up`
//! is not a second implementation of the appliance, only a second service
//! manager. It speaks the children's own service contract: each child gets
//! a private `NOTIFY_SOCKET`, and `READY=1`/`STATUS=` from there drive the
//! phase progress and the status line, exactly as systemd would see them.
//!
//! State lives under the state directory: `run/nbpy.toml` (the effective
//! configuration every child reads), `run/status.json` (what `nbpy status`
//! shows), `up.pid` (what `nbpy down` signals), `logs/NAME.log` (one file
//! per child, what `nbpy logs NAME` prints).

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::backend::LocalInfluxd;
use crate::config::{Config, PublisherConfig, SubscriberConfig};
use crate::exit::{Failure, CANTCREAT, SOFTWARE, TEMPFAIL, UNAVAILABLE};
use crate::feeds::FeedKind;
use crate::sink::influx::InfluxClient;

pub struct UpOptions {
    /// Live public Kraken feeds instead of the synthetic demo.
    pub live: bool,
    /// How long phase 5 listens to the bus before reconciling (and, with
    /// the file sink, how long it waits for the first points).
    pub validate_within: Duration,
}

/// One supervised child as `nbpy status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ChildState {
    pub name: String,
    pub role: String,
    pub pid: Option<u32>,
    pub ready: bool,
    pub status: String,
    pub restarts: u32,
    pub state: String,
    pub log: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct UpStatus {
    pub pid: u32,
    pub phase: String,
    pub influxdb: String,
    pub grafana: String,
    pub started_unix: u64,
    pub children: Vec<ChildState>,
    /// Once stopped: whether every child stopped cleanly (`nbpy down`
    /// says so in its exit code).
    #[serde(default)]
    pub stopped_cleanly: Option<bool>,
}

/// The state directory `nbpy up` uses: a configured one always (unwritable,
/// `nbpy up` says so and stops: silently running elsewhere would start on
/// an empty database without its spool, and leave `nbpy down` looking in
/// the wrong place); the default `/var/lib/nbpy` when writable, else
/// `~/.local/state/nbpy` (a non-root user's quick start).
/// Nothing is created here (`nbpy doctor` and `nbpy status` only look).
pub fn state_dir(cfg: &Config) -> PathBuf {
    let configured = cfg.state_dir.clone();
    if configured != Config::default().state_dir {
        return configured;
    }
    // The configured directory, or the nearest existing ancestor, must be
    // writable for `nbpy up` to use it.
    let probe = configured
        .ancestors()
        .find(|a| a.exists())
        .map(Path::to_path_buf);
    if probe.as_deref().is_some_and(writable) {
        return configured;
    }
    let home = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("."));
    home.join("nbpy")
}

/// Asked, not tried: `status`, `down` and `logs` only look, and must not
/// create files in /var/lib/nbpy to find out (access(2) also answers
/// EROFS for a read-only file system).
fn writable(dir: &Path) -> bool {
    nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_ok()
}

/// The demo pipeline when nothing is configured: synthetic (or, with
/// `--live`, Kraken's public feeds) into one subscriber; and a subscriber
/// for configured publishers that have none.
pub fn with_defaults(mut cfg: Config, live: bool) -> Config {
    let demo = cfg.publishers.is_empty();
    if demo {
        let feeds: Vec<(&str, FeedKind)> = if live {
            vec![
                ("kraken-tick", FeedKind::KrakenTick),
                ("kraken-depth", FeedKind::KrakenDepth),
                ("kraken-orders", FeedKind::KrakenOrders),
            ]
        } else {
            vec![("synth", FeedKind::Synthetic)]
        };
        for (name, feed) in feeds {
            let mut p = PublisherConfig {
                feed,
                ..Default::default()
            };
            if feed == FeedKind::Synthetic {
                // A demo should look alive, not saturate the machine.
                p.rate = 2000.0;
            }
            cfg.publishers.insert(name.to_string(), p);
        }
    }
    if cfg.subscribers.is_empty() {
        cfg.subscribers.insert(
            "main".into(),
            SubscriberConfig {
                connect: cfg
                    .publishers
                    .values()
                    .map(PublisherConfig::reach)
                    .collect(),
                ..Default::default()
            },
        );
        if demo {
            // Publishers start before subscribers (phase 3), and a PUB
            // socket drops what it sends before anyone subscribed: the demo
            // feed lost its first ~20 ms, which a second `nbpy up` (whose
            // subscriber resumes from the first one's positions) reported
            // as 40 gaps. The demo's own subscriber is the one to wait for.
            for p in cfg.publishers.values_mut() {
                if p.feed.waits_for_bus() {
                    p.wait_for_subscribers = 1;
                }
            }
        }
    }
    cfg
}

/// Progress for the person at the terminal (the children's own logs are
/// in their files).
fn say(msg: &str) {
    crate::outln!("{msg}");
}

struct Child {
    state: Arc<Mutex<ChildState>>,
    proc: Option<tokio::process::Child>,
    args: Vec<String>,
    bin: PathBuf,
    notify: PathBuf,
    next_restart: Option<Instant>,
    backoff: Duration,
    /// When the running process was started: a run this long resets the
    /// backoff (as systemd's start-rate window forgets old failures).
    started_at: Instant,
    done: bool,
    /// Cleared when the process it belongs to is gone, so that process's
    /// notify reader ends (each start binds a new socket and a new reader;
    /// the old one used to read nothing for ever, a thread and an fd
    /// leaked per restart).
    listening: Arc<AtomicBool>,
    /// The current notify reader.
    reader: Option<std::thread::JoinHandle<()>>,
}

/// A child that ran this long before it exited was healthy: its restart
/// waits the shortest backoff again, not the doubled one.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Exit codes that a restart cannot fix (64 usage, 77 a refused
/// credential, 78 configuration): not restarted, as the units'
/// `RestartPreventExitStatus=64 77 78`.
const NO_RESTART: [i32; 3] = [64, 77, 78];

/// What `nbpy up` does about a child that exited, as the units'
/// `Restart=on-failure` with `RestartPreventExitStatus=64 77 78` would.
#[derive(Debug, PartialEq)]
enum AfterExit {
    /// Exit 0: a finite feed that is done.
    Finished,
    /// A code in [`NO_RESTART`]: left stopped, and the stop is not clean.
    Failed,
    /// Restarted `after` this long; the restart after that waits `next`.
    Restart { after: Duration, next: Duration },
}

/// `code` is `None` for a death by signal. The wait doubles from 1 s up
/// to 30 s; a run of [`HEALTHY_RUN`] starts again from 1 s.
fn after_exit(code: Option<i32>, ran_for: Duration, backoff: Duration) -> AfterExit {
    match code {
        Some(0) => AfterExit::Finished,
        Some(c) if NO_RESTART.contains(&c) => AfterExit::Failed,
        _ => {
            let after = if ran_for >= HEALTHY_RUN {
                Duration::from_secs(1)
            } else {
                backoff
            };
            AfterExit::Restart {
                after,
                next: (after * 2).min(Duration::from_secs(30)),
            }
        }
    }
}

struct Up {
    dir: PathBuf,
    config_file: PathBuf,
    children: Vec<Child>,
    status: Arc<Mutex<UpStatus>>,
}

/// The program and leading arguments that run a child role: the
/// `nbpy-ROLE` binary beside this one, else this `nbpy` itself (`nbpy ROLE`),
/// so `cargo run --bin nbpy -- up` works without the other binaries built.
fn child_command(role: &str) -> (PathBuf, Vec<String>) {
    let me = std::env::current_exe().ok();
    if let Some(sib) = me
        .as_ref()
        .and_then(|e| e.parent())
        .map(|d| d.join(format!("nbpy-{role}")))
    {
        if sib.is_file() {
            return (sib, Vec::new());
        }
    }
    match me {
        Some(me) => (me, vec![role.to_string()]),
        None => (PathBuf::from(format!("nbpy-{role}")), Vec::new()),
    }
}

fn on_path(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(bin))
            .find(|p| p.is_file())
    })
}

impl Up {
    fn spawn_child(&mut self, role: &str, name: &str) -> Result<(), Failure> {
        let (bin, mut args) = child_command(role);
        let log = self.dir.join("logs").join(format!("{name}.log"));
        let notify = self.dir.join("run").join(format!("{name}.notify"));
        let state = Arc::new(Mutex::new(ChildState {
            name: name.into(),
            role: role.into(),
            log,
            state: "starting".into(),
            ..Default::default()
        }));
        let mut c = Child {
            state,
            proc: None,
            args: {
                args.extend([
                    "--config".into(),
                    self.config_file.display().to_string(),
                    name.into(),
                ]);
                args
            },
            bin,
            notify,
            next_restart: None,
            backoff: Duration::from_secs(1),
            started_at: Instant::now(),
            done: false,
            listening: Arc::default(),
            reader: None,
        };
        start(&mut c)?;
        self.children.push(c);
        Ok(())
    }

    fn write_status(&self, phase: &str) {
        let mut s = match self.status.lock() {
            Ok(s) => s.clone(),
            Err(_) => return,
        };
        s.children = self
            .children
            .iter()
            .filter_map(|c| c.state.lock().ok().map(|s| s.clone()))
            .collect();
        // A child that stopped for good (an exit no restart fixes) leaves
        // the appliance short of a feed: not "up".
        s.phase = if phase == "up" && s.children.iter().any(|c| c.state == "failed") {
            "degraded".into()
        } else {
            phase.into()
        };
        if let Ok(mut shared) = self.status.lock() {
            *shared = s.clone();
        }
        write_status_file(&self.dir, &s);
    }

    /// Waits until the children from `from` on are ready. Every child is
    /// watched meanwhile, those already ready too: nothing restarts them
    /// during the start, so a publisher that is ready and then fails (a
    /// venue refusing its credential) must end the start with its own
    /// reason and exit code, not leave it waiting for the subscribers that
    /// cannot get ready without it.
    async fn wait_ready(&mut self, from: usize, deadline: Duration) -> Result<(), Failure> {
        let t0 = Instant::now();
        loop {
            for c in &mut self.children {
                let Some(status) = c.proc.as_mut().and_then(|p| p.try_wait().ok().flatten()) else {
                    continue;
                };
                c.proc = None;
                let Ok(mut s) = c.state.lock() else { continue };
                s.pid = None;
                if status.success() {
                    // A feed with a count can be done early; that is no failure.
                    s.state = "finished".into();
                    c.done = true;
                    say(&format!("{} {} finished", s.role, s.name));
                    continue;
                }
                s.state = "exited".into();
                let when = if s.ready {
                    "after it was ready"
                } else {
                    "before it was ready"
                };
                s.ready = false;
                // Its own sysexits code says what to fix (77: a refused
                // credential, 78: configuration); anything else (a signal,
                // a crash) is the service being unavailable.
                let code = status
                    .code()
                    .filter(|c| (64..=78).contains(c))
                    .unwrap_or(UNAVAILABLE);
                return Err(Failure::new(
                    code,
                    anyhow::anyhow!(
                        "{} {} exited ({status}) {when}, during the start; last lines of {}:\n{}",
                        s.role,
                        s.name,
                        s.log.display(),
                        tail(&s.log, 10)
                    ),
                ));
            }
            let mut waiting = Vec::new();
            for c in &self.children[from..] {
                let s = c.state.lock().map(|s| s.clone()).unwrap_or_default();
                if !s.ready && !c.done {
                    waiting.push(format!(
                        "{} ({})",
                        s.name,
                        if s.status.is_empty() {
                            "starting"
                        } else {
                            &s.status
                        }
                    ));
                }
            }
            if waiting.is_empty() {
                return Ok(());
            }
            if t0.elapsed() > deadline {
                return Err(Failure::new(
                    UNAVAILABLE,
                    anyhow::anyhow!("not ready after {deadline:?}: {}", waiting.join(", ")),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Restarts children that died, with backoff; notes those that finished.
    fn supervise(&mut self) {
        for c in &mut self.children {
            if c.done {
                continue;
            }
            if let Some(p) = c.proc.as_mut() {
                if let Ok(Some(status)) = p.try_wait() {
                    c.proc = None;
                    c.listening.store(false, Ordering::Relaxed);
                    let mut s = match c.state.lock() {
                        Ok(s) => s,
                        Err(_) => continue,
                    };
                    s.pid = None;
                    match after_exit(status.code(), c.started_at.elapsed(), c.backoff) {
                        AfterExit::Finished => {
                            s.state = "finished".into();
                            c.done = true;
                            say(&format!("{} {} finished", s.role, s.name));
                        }
                        AfterExit::Failed => {
                            s.state = "failed".into();
                            s.ready = false;
                            s.status.clear();
                            c.done = true;
                            say(&format!(
                                "{} {} exited ({status}): not restarted, a restart cannot fix that; the reason is at the end of {}:\n{}",
                                s.role,
                                s.name,
                                s.log.display(),
                                tail(&s.log, 5)
                            ));
                        }
                        AfterExit::Restart { after, next } => {
                            s.state = "exited".into();
                            s.ready = false;
                            // Its last STATUS (a rate, a count) no longer holds.
                            s.status.clear();
                            say(&format!(
                                "{} {} exited ({status}); restarting in {after:?} (log: {})",
                                s.role,
                                s.name,
                                s.log.display()
                            ));
                            c.next_restart = Some(Instant::now() + after);
                            c.backoff = next;
                        }
                    }
                }
            } else if c.next_restart.is_some_and(|t| Instant::now() >= t) {
                c.next_restart = None;
                if let Ok(mut s) = c.state.lock() {
                    s.restarts += 1;
                }
                if let Err(e) = start(c) {
                    // Tried again like a failed run: a spawn that failed
                    // once (out of fds, a binary being replaced) used to
                    // leave the child down for good, with a clean stop.
                    let name = c.state.lock().map(|s| s.name.clone()).unwrap_or_default();
                    say(&format!(
                        "{name}: restart failed: {e}; trying again in {:?}",
                        c.backoff
                    ));
                    c.next_restart = Some(Instant::now() + c.backoff);
                    c.backoff = (c.backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// Subscribers first (they drain into InfluxDB), then publishers.
    async fn stop_all(&mut self, timeout: Duration) -> bool {
        let mut clean = true;
        for role in ["subscriber", "publisher"] {
            let t0 = Instant::now();
            for c in self
                .children
                .iter_mut()
                .filter(|c| c.state.lock().map(|s| s.role == role).unwrap_or(false))
            {
                c.next_restart = None;
                c.done = true;
                if let Some(p) = &c.proc {
                    if let Some(pid) = p.id() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid as i32),
                            nix::sys::signal::Signal::SIGTERM,
                        );
                    }
                }
            }
            for c in self
                .children
                .iter_mut()
                .filter(|c| c.state.lock().map(|s| s.role == role).unwrap_or(false))
            {
                let Some(mut p) = c.proc.take() else {
                    // Stopped for good earlier, or down awaiting a restart:
                    // the stop found it not running, so it is not clean.
                    let down = c.state.lock().ok().and_then(|s| {
                        let why = match s.state.as_str() {
                            "failed" => "stopped for good earlier (an exit a restart cannot fix)",
                            "exited" => "down, awaiting a restart",
                            _ => return None,
                        };
                        Some(format!(
                            "{role} {} was not running at the stop: {why}",
                            s.name
                        ))
                    });
                    if let Some(line) = down {
                        say(&line);
                        clean = false;
                    }
                    continue;
                };
                let name = c.state.lock().map(|s| s.name.clone()).unwrap_or_default();
                // One deadline for the role: they were all signalled at
                // once, so three hung ones take `timeout`, not three times it.
                match tokio::time::timeout_at((t0 + timeout).into(), p.wait()).await {
                    Ok(Ok(st)) if st.success() => {}
                    Ok(Ok(st)) => {
                        clean = false;
                        say(&format!("{role} {name} stopped with {st}"));
                    }
                    _ => {
                        clean = false;
                        say(&format!(
                            "{role} {name} did not stop within {timeout:?}; killing it"
                        ));
                        let _ = p.kill().await;
                    }
                }
                if let Ok(mut s) = c.state.lock() {
                    s.state = "stopped".into();
                    s.pid = None;
                }
            }
            say(&format!("stopped {role}s in {:.1?}", t0.elapsed()));
        }
        clean
    }
}

/// `run/status.json`, replaced whole (written aside, then renamed), so a
/// reader never sees half of it.
fn write_status_file(dir: &Path, s: &UpStatus) {
    if let Ok(json) = serde_json::to_vec_pretty(s) {
        let tmp = dir.join("run/status.json.tmp");
        if std::fs::write(&tmp, json).is_ok() {
            let _ = std::fs::rename(&tmp, dir.join("run/status.json"));
        }
    }
}

fn start(c: &mut Child) -> Result<(), Failure> {
    let _ = std::fs::remove_file(&c.notify);
    let sock = UnixDatagram::bind(&c.notify).map_err(|e| {
        Failure::new(
            CANTCREAT,
            anyhow::anyhow!("notify socket {}: {e}", c.notify.display()),
        )
    })?;
    let log_path = c.state.lock().map(|s| s.log.clone()).unwrap_or_default();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| Failure::new(CANTCREAT, anyhow::anyhow!("{}: {e}", log_path.display())))?;
    let err = log
        .try_clone()
        .map_err(|e| Failure::new(CANTCREAT, anyhow::anyhow!("{}: {e}", log_path.display())))?;
    let mut cmd = std::process::Command::new(&c.bin);
    // A group of its own: a terminal's Ctrl-C (SIGINT to the whole
    // foreground group) must reach `nbpy up` only, which then stops the
    // children in order. A subscriber that heard it too would take our
    // SIGTERM as a second signal and abandon what it holds.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0)
        .args(&c.args)
        .env("NOTIFY_SOCKET", &c.notify)
        .env("WATCHDOG_USEC", "10000000")
        .env_remove("JOURNAL_STREAM")
        .env("NBPY_LOG__FORMAT", "text")
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(err);
    // `nbpy up` gone (killed, or Ctrl-C twice): the children get SIGHUP
    // and stop on their own, in their own order (a drain under way goes
    // on), instead of running on orphaned.
    crate::service::die_with_parent(&mut cmd, nix::sys::signal::Signal::SIGHUP);
    let child = tokio::process::Command::from(cmd)
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| {
            Failure::new(
                UNAVAILABLE,
                anyhow::anyhow!("cannot start {}: {e}", c.bin.display()),
            )
        })?;
    let pid = child.id();
    c.proc = Some(child);
    c.listening.store(false, Ordering::Relaxed);
    c.listening = Arc::new(AtomicBool::new(true));
    let listening = c.listening.clone();
    c.started_at = Instant::now();
    if let Ok(mut s) = c.state.lock() {
        s.pid = pid;
        s.state = "starting".into();
        s.ready = false;
    }
    // The child's notifications: READY and STATUS as systemd would see them.
    let state = c.state.clone();
    c.reader = Some(std::thread::spawn(move || {
        let _ = sock.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 4096];
        loop {
            match sock.recv(&mut buf) {
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    let Ok(mut s) = state.lock() else { return };
                    for line in text.lines() {
                        if line == "READY=1" {
                            s.ready = true;
                            s.state = "running".into();
                        } else if line == "STOPPING=1" {
                            s.state = "stopping".into();
                        } else if let Some(st) = line.strip_prefix("STATUS=") {
                            s.status = st.to_string();
                        }
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    // Its process is gone (a restart has its own reader),
                    // or the stop is done.
                    if !listening.load(Ordering::Relaxed)
                        || state.lock().map(|s| s.state == "stopped").unwrap_or(true)
                    {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    }));
    Ok(())
}

pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Phase 1: an InfluxDB that answers, or a private one, or the file sink.
async fn backends(
    cfg: &mut Config,
    dir: &Path,
    stop: &tokio_util::sync::CancellationToken,
) -> Result<(Option<LocalInfluxd>, String), Failure> {
    let client = InfluxClient::new(&cfg.influxdb)?;
    if client.file_sink().is_none() {
        match client.ping().await {
            Ok(()) => {
                return Ok((
                    None,
                    format!(
                        "InfluxDB at {} (already running)",
                        crate::config::redact_url(&cfg.influxdb.url)
                    ),
                ))
            }
            // Said, not passed over: a private influxd on another port
            // is then not what the configuration pointed at.
            Err(crate::sink::influx::WriteError::NotInfluxDb(why)) => say(&format!(
                "{why}; nbpy up leaves it alone and uses another InfluxDB"
            )),
            Err(_) => {}
        }
    }
    if let Some(p) = client.file_sink() {
        return Ok((None, format!("file sink {}", p.display())));
    }
    if let Some(influxd) = on_path("influxd") {
        let wanted = reqwest::Url::parse(&cfg.influxdb.url)
            .ok()
            .and_then(|u| u.port())
            .unwrap_or(8086);
        let port = if std::net::TcpListener::bind(("127.0.0.1", wanted)).is_ok() {
            wanted
        } else {
            0
        };
        let log = std::fs::File::create(dir.join("logs/influxd.log"))
            .map_err(|e| Failure::new(CANTCREAT, anyhow::anyhow!("influxd log: {e}")))?;
        let mut local =
            LocalInfluxd::spawn_with(Some(&influxd), &dir.join("influxdb"), port, Some(log), true)
                .map_err(|e| {
                    Failure::new(
                        UNAVAILABLE,
                        anyhow::anyhow!("starting {}: {e}", influxd.display()),
                    )
                })?;
        let took = local
            .wait_ready_unless(Duration::from_secs(30), || stop.is_cancelled())
            .map_err(|e| {
                if stop.is_cancelled() {
                    return Failure::new(TEMPFAIL, anyhow::anyhow!("stopped during start-up"));
                }
                Failure::new(
                    UNAVAILABLE,
                    anyhow::anyhow!("{e}; see {}", dir.join("logs/influxd.log").display()),
                )
            })?;
        cfg.influxdb.url = local.url();
        let what = format!(
            "InfluxDB at {} (started by nbpy up from {}, ready in {took:.1?})",
            local.url(),
            influxd.display()
        );
        return Ok((Some(local), what));
    }
    let file = dir.join("points.lp");
    cfg.influxdb.url = format!("file://{}", file.display());
    say(&format!(
        "No InfluxDB answers at {} and no `influxd` is on PATH: writing line protocol to {} instead.\n\
         To get InfluxDB: `apt-get install influxdb` (Debian/Ubuntu), `nix run` (the flake brings it), or docker/compose.yaml.",
        client.shown_url(),
        file.display()
    ));
    Ok((None, format!("file sink {}", file.display())))
}

/// Writes a file only its owner may read (0600, also when it existed
/// before): the effective configuration holds `influxdb.url` as given,
/// credentials included, and the children that read it run as the same
/// user.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(text.as_bytes())
}

/// Runs the appliance until SIGTERM/SIGINT, then stops it in order.
pub async fn up(mut cfg: Config, opts: UpOptions) -> Result<(), Failure> {
    let t_start = Instant::now();
    let dir = state_dir(&cfg);
    for sub in ["logs", "run"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| {
            Failure::new(
                CANTCREAT,
                anyhow::anyhow!("{}: {e}", dir.join(sub).display()),
            )
        })?;
    }
    cfg.state_dir = dir.clone();
    let _claim = Claim::take(&dir)?;
    // This run's status from the start (phase 3 fills it in): `nbpy
    // status` must not show the last run's as this one's, nor lend the
    // last run's effective configuration.
    let _ = std::fs::remove_file(dir.join("run/nbpy.toml"));
    let starting = UpStatus {
        pid: std::process::id(),
        phase: "starting".into(),
        ..Default::default()
    };
    write_status_file(&dir, &starting);
    let stop = crate::service::Service::start_with(
        "nbpy-up",
        Duration::from_secs(3600),
        || "the supervised children (they get SIGHUP and stop on their own)".into(),
        crate::service::SecondTerm::Ignore,
    );
    // A closed terminal sends SIGHUP to its foreground group, which holds
    // `nbpy up` alone (children have groups of their own): the service's
    // handler stops in order on it, as for Ctrl-C.
    say(&format!("nbpy up: state in {}", dir.display()));

    // Phase 1.
    let t = Instant::now();
    let stopped = || Failure::new(TEMPFAIL, anyhow::anyhow!("stopped during start-up"));
    let (mut influxd, influx_what) = tokio::select! {
        r = backends(&mut cfg, &dir, &stop.shutdown) => r?,
        _ = stop.shutdown.cancelled() => return Err(stopped()),
    };
    let grafana_what = match &cfg.grafana.url {
        Some(u) => format!("Grafana at {}", crate::config::redact_url(u)),
        None => "no Grafana configured: dashboards are rendered for file provisioning".to_string(),
    };
    say(&format!(
        "phase 1/5 backends   {influx_what}; {grafana_what} [{:.1?}]",
        t.elapsed()
    ));
    let file_sink = cfg.influxdb.url.starts_with("file:");

    // Phase 2.
    let t = Instant::now();
    if file_sink {
        say("phase 2/5 schema     skipped (file sink)");
    } else {
        let client = InfluxClient::new(&cfg.influxdb)?;
        tokio::select! {
            r = crate::admin::schema::ensure_with(&client, &cfg) => {
                r.map_err(|e| Failure::unavailable(anyhow::anyhow!("schema: {e}")))?
            }
            _ = stop.shutdown.cancelled() => return Err(stopped()),
        };
        say(&format!(
            "phase 2/5 schema     database {:?}, retention policies, downsampling [{:.1?}]",
            cfg.influxdb.database,
            t.elapsed()
        ));
    }

    // Phase 3.
    let t = Instant::now();
    let cfg = with_defaults(cfg, opts.live);
    let problems = cfg.problems();
    if !problems.is_empty() {
        return Err(Failure::config(anyhow::anyhow!(problems.join("; "))));
    }
    let config_file = dir.join("run/nbpy.toml");
    write_private(
        &config_file,
        &toml::to_string_pretty(&cfg).map_err(|e| Failure::new(SOFTWARE, e))?,
    )
    .map_err(|e| Failure::new(CANTCREAT, anyhow::anyhow!("{}: {e}", config_file.display())))?;
    let status = Arc::new(Mutex::new(UpStatus {
        pid: std::process::id(),
        influxdb: influx_what.clone(),
        grafana: grafana_what.clone(),
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        ..Default::default()
    }));
    let mut up = Up {
        dir: dir.clone(),
        config_file,
        children: Vec::new(),
        status,
    };
    let phase3 = async {
        for name in cfg.publishers.keys() {
            up.spawn_child("publisher", name)?;
        }
        up.wait_ready(0, Duration::from_secs(30)).await?;
        let n = up.children.len();
        for name in cfg.subscribers.keys() {
            up.spawn_child("subscriber", name)?;
        }
        up.wait_ready(n, Duration::from_secs(60)).await
    };
    let r = tokio::select! {
        r = phase3 => r,
        _ = stop.shutdown.cancelled() => Err(Failure::new(TEMPFAIL, anyhow::anyhow!("stopped during start-up"))),
    };
    if let Err(e) = r {
        up.stop_all(cfg.service.stop_timeout).await;
        return Err(e);
    }
    up.write_status("feeds");
    say(&format!(
        "phase 3/5 feeds      {} publisher(s) ({}), {} subscriber(s) ready [{:.1?}]",
        cfg.publishers.len(),
        cfg.publishers
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", "),
        cfg.subscribers.len(),
        t.elapsed()
    ));

    // Phase 4. A stop here or in phase 5 is heard at once (Grafana or the
    // validation may take their time), and is no failed validation.
    let t = Instant::now();
    let gdir = dir.join("grafana");
    let provisioned = tokio::select! {
        r = crate::admin::grafana::provision(&cfg, Some(&gdir)) => Some(r),
        _ = stop.shutdown.cancelled() => None,
    };
    let verdict = match provisioned {
        None => {
            say("phase 4/5 dashboards stopped before done");
            None
        }
        Some(r) => {
            let dashboards = match r {
                Ok(line) => line,
                Err(e) => format!(
                    "Grafana apply failed ({e}); files are in {}",
                    gdir.display()
                ),
            };
            say(&format!(
                "phase 4/5 dashboards {dashboards} [{:.1?}]",
                t.elapsed()
            ));
            // Phase 5.
            let t = Instant::now();
            let verdict = tokio::select! {
                v = validate_flow(&cfg, opts.validate_within) => Some(v),
                _ = stop.shutdown.cancelled() => None,
            };
            match &verdict {
                Some(Ok(what)) => say(&format!(
                    "phase 5/5 validation {what} [{:.1?}]",
                    t.elapsed()
                )),
                Some(Err(why)) => say(&format!(
                    "phase 5/5 validation FAILED: {why} [{:.1?}]",
                    t.elapsed()
                )),
                None => say("phase 5/5 validation stopped before done"),
            }
            verdict
        }
    };
    let phase = match &verdict {
        Some(Err(_)) => "degraded",
        _ => "up",
    };
    if verdict.is_some() {
        up.write_status(phase);
        say(&format!(
            "nbpy is up in {:.1?}. Logs: {}/logs  Status: `nbpy status`  Stop: Ctrl-C or `nbpy down`",
            t_start.elapsed(),
            dir.display()
        ));
    }

    // Supervise until stopped.
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut last_line = Instant::now();
    // At most one restart of the private influxd per 5 s.
    let mut influxd_restarted: Option<Instant> = None;
    while !stop.shutdown.is_cancelled() {
        tokio::select! {
            _ = stop.shutdown.cancelled() => break,
            _ = tick.tick() => {
                up.supervise();
                // The private influxd is supervised too: the subscribers
                // spool while it is gone, and it comes back on the same
                // port and data.
                if let Some(i) = influxd.as_mut() {
                    let due = influxd_restarted.is_none_or(|t| t.elapsed() >= Duration::from_secs(5));
                    if let Some(status) = i.exited().filter(|_| due) {
                        influxd_restarted = Some(Instant::now());
                        let log = dir.join("logs/influxd.log");
                        say(&format!(
                            "the private influxd exited ({status}); starting it again on the same port and data (log: {})",
                            log.display()
                        ));
                        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log).ok();
                        if let Err(e) = i.restart(file) {
                            say(&format!("cannot start the private influxd again: {e}; subscribers spool until it is back"));
                        }
                    }
                }
                up.write_status(phase);
                if last_line.elapsed() >= Duration::from_secs(10) {
                    last_line = Instant::now();
                    for c in &up.children {
                        if let Ok(s) = c.state.lock() {
                            say(&format!("  {:<11} {:<16} {:<9} {}", s.role, s.name, s.state, s.status));
                        }
                    }
                }
                if up.children.iter().all(|c| c.done) {
                    say("every child has finished");
                    break;
                }
            }
        }
    }
    let t = Instant::now();
    say("stopping: subscribers drain first, then publishers");
    up.write_status("stopping");
    let clean = up
        .stop_all(cfg.service.stop_timeout + crate::config::STOP_MARGIN)
        .await;
    if let Some(mut i) = influxd.take() {
        tokio::task::spawn_blocking(move || i.stop()).await.ok();
        say("stopped the private influxd");
    }
    if let Ok(mut st) = up.status.lock() {
        st.stopped_cleanly = Some(clean);
    }
    up.write_status("down");
    say(&format!(
        "nbpy stopped in {:.1?}{}",
        t.elapsed(),
        if clean {
            ""
        } else {
            " (not cleanly: see above)"
        }
    ));
    match (clean, verdict) {
        // A stop asked for before the validation ended is no failure.
        (true, None | Some(Ok(_))) => Ok(()),
        (true, Some(Err(why))) => Err(Failure::new(
            TEMPFAIL,
            anyhow::anyhow!("validation failed: {why}"),
        )),
        (false, _) => Err(Failure::new(
            TEMPFAIL,
            anyhow::anyhow!("a child did not stop cleanly"),
        )),
    }
}

/// Phase 5 for `nbpy up`: every publisher's data reaches the store.
async fn validate_flow(cfg: &Config, within: Duration) -> Result<String, String> {
    let client = InfluxClient::new(&cfg.influxdb).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    if let Some(file) = client.file_sink() {
        loop {
            let n = std::fs::read(&file)
                .map(|b| b.iter().filter(|c| **c == b'\n').count())
                .unwrap_or(0);
            if n > 0 {
                return Ok(format!("{n} points written to {}", file.display()));
            }
            if t0.elapsed() > within {
                return Err(format!(
                    "nothing written to {} within {within:?}",
                    file.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The same reconciliation the phase-5 unit runs (`nbpy validate`),
    // except that a silent feed is named below rather than failed: right
    // after the start a live venue may still be connecting (or retrying),
    // and `nbpy up` goes on supervising it either way.
    let mut cfg = cfg.clone();
    cfg.validate.idle_ok = cfg.publishers.keys().cloned().collect();
    let report = crate::validate::run(&cfg, within)
        .await
        .map_err(|e| e.to_string())?;
    crate::validate::verdict(&report).map_err(|e| e.to_string())?;
    let published: u64 = report.publishers.iter().map(|p| p.published).sum();
    let stored: u64 = report.publishers.iter().map(|p| p.stored).sum();
    // "No loss" of nothing is not a healthy start: name the silent feeds
    // (a live venue that cannot be reached stays silent while it retries).
    let silent: Vec<&str> = report
        .publishers
        .iter()
        .filter(|p| p.published == 0)
        .map(|p| p.name.as_str())
        .collect();
    let quiet = match silent.first() {
        None => String::new(),
        Some(first) => format!(
            "; NO DATA from {} in {within:?} — is the venue reachable? see `nbpy logs {first}`",
            silent.join(", ")
        ),
    };
    Ok(format!(
        "{} publisher(s) reconciled: {published} published, {stored} stored, no loss{quiet}",
        report.publishers.len()
    ))
}

/// `nbpy up`'s hold on a state directory: an exclusive lock on `up.pid`
/// for as long as it runs. The kernel drops the lock when the process
/// ends, however it ends, so a pid file left by a crash is never taken
/// for a running `nbpy up`, and `nbpy down` never signals whatever
/// process has since been given that pid.
struct Claim {
    path: PathBuf,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl Claim {
    fn take(dir: &Path) -> Result<Claim, Failure> {
        use std::io::Write;
        let path = dir.join("up.pid");
        let cant = |e: &dyn std::fmt::Display| {
            Failure::new(CANTCREAT, anyhow::anyhow!("{}: {e}", path.display()))
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| cant(&e))?;
        let mut lock =
            match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(l) => l,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    let pid = running_pid(dir).map_or("?".to_string(), |p| p.to_string());
                    return Err(Failure::new(
                        TEMPFAIL,
                        anyhow::anyhow!(
                        "nbpy up is already running (pid {pid}, state {}); `nbpy down` stops it",
                        dir.display()
                    ),
                    ));
                }
                Err((_, e)) => return Err(cant(&e)),
            };
        lock.set_len(0).map_err(|e| cant(&e))?;
        write!(lock, "{}", std::process::id()).map_err(|e| cant(&e))?;
        Ok(Claim { path, _lock: lock })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // Removed while still locked: a reader sees a locked file or none.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The pid of a live `nbpy up` using `dir`, if any: one holds the lock on
/// `up.pid` (see [`Claim`]); a pid file nobody holds is left over.
pub fn running_pid(dir: &Path) -> Option<i32> {
    let file = std::fs::File::open(dir.join("up.pid")).ok()?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockSharedNonblock) {
        // Nobody holds it: no `nbpy up` runs, whatever the file says.
        Ok(_) => None,
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            use std::io::{Read, Seek};
            // Locked an instant before the pid is written: read again.
            for _ in 0..50 {
                let mut text = String::new();
                file.rewind().ok()?;
                file.read_to_string(&mut text).ok()?;
                if let Ok(pid) = text.trim().parse() {
                    return Some(pid);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            None
        }
        Err(_) => None,
    }
}

/// `nbpy down`: SIGTERM to a running `nbpy up`, then wait for it to finish.
pub fn down(cfg: &Config, timeout: Duration) -> Result<(), Failure> {
    let dir = state_dir(cfg);
    let Some(pid) = running_pid(&dir) else {
        return Err(Failure::new(
            UNAVAILABLE,
            anyhow::anyhow!("no nbpy up is running (state {})", dir.display()),
        ));
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .map_err(|e| {
        Failure::new(
            crate::exit::NOPERM,
            anyhow::anyhow!("signal pid {pid}: {e}"),
        )
    })?;
    let t0 = Instant::now();
    while running_pid(&dir).is_some() {
        if t0.elapsed() > timeout {
            return Err(Failure::new(
                TEMPFAIL,
                anyhow::anyhow!("nbpy up (pid {pid}) still running after {timeout:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = t0.elapsed();
    // What that `nbpy up` wrote last (not an older run's status).
    let unclean = matches!(
        read_status(cfg),
        Ok((UpStatus { pid: of, stopped_cleanly: Some(false), .. }, _)) if of == pid as u32
    );
    if unclean {
        return Err(Failure::new(
            TEMPFAIL,
            anyhow::anyhow!(
                "nbpy up (pid {pid}) stopped in {took:.1?}, but not cleanly: a child did not stop in time or exited with an error (its summary is in {}/logs)",
                dir.display()
            ),
        ));
    }
    crate::outln!("nbpy up (pid {pid}) stopped in {took:.1?}");
    Ok(())
}

/// A running `nbpy up`, with the configuration it runs (its defaults filled
/// in, as it wrote them to `<state_dir>/run/nbpy.toml`) where that reads.
pub fn running_up(cfg: &Config) -> Option<(UpStatus, Option<Config>)> {
    let (up, running) = read_status(cfg).ok()?;
    running.then(|| {
        let effective = state_dir(cfg).join("run/nbpy.toml");
        (
            up,
            crate::config::load(Some(&effective)).ok().map(|l| l.config),
        )
    })
}

/// What a running (or the last) `nbpy up` wrote to `run/status.json`.
pub fn read_status(cfg: &Config) -> Result<(UpStatus, bool), Failure> {
    let dir = state_dir(cfg);
    let path = dir.join("run/status.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Failure::new(
            UNAVAILABLE,
            anyhow::anyhow!(
                "no status at {} ({e}); is `nbpy up` running?",
                path.display()
            ),
        )
    })?;
    let s: UpStatus = serde_json::from_str(&text)
        .map_err(|e| Failure::new(SOFTWARE, anyhow::anyhow!("{}: {e}", path.display())))?;
    // Running: the `nbpy up` holding the lock is the one that wrote it.
    let running = running_pid(&dir).is_some_and(|p| i64::from(p) == i64::from(s.pid));
    Ok((s, running))
}

pub fn render_status(s: &UpStatus, running: bool) -> String {
    let mut out = format!(
        "nbpy up: {} (pid {}, {})\n  influxdb: {}\n  grafana:  {}\n",
        s.phase,
        s.pid,
        if running { "running" } else { "not running" },
        s.influxdb,
        s.grafana
    );
    out.push_str(&format!(
        "  {:<11} {:<16} {:<9} {:>8} {:>8}  {}\n",
        "ROLE", "NAME", "STATE", "PID", "RESTARTS", "STATUS"
    ));
    for c in &s.children {
        out.push_str(&format!(
            "  {:<11} {:<16} {:<9} {:>8} {:>8}  {}\n",
            c.role,
            c.name,
            c.state,
            c.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            c.restarts,
            c.status
        ));
    }
    out
}

/// `nbpy logs NAME [-f]`.
/// Standard output is a pipe whose reader has closed it: a write would
/// fail with EPIPE. Polling says so (POLLERR) without writing anything.
fn stdout_reader_gone() -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let out = std::io::stdout();
    let mut fds = [PollFd::new(
        std::os::fd::AsFd::as_fd(&out),
        PollFlags::POLLOUT,
    )];
    poll(&mut fds, PollTimeout::ZERO).is_ok()
        && fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP))
}

pub fn logs(cfg: &Config, name: &str, follow: bool) -> Result<(), Failure> {
    use std::io::{Read, Seek};
    let dir = state_dir(cfg).join("logs");
    let path = dir.join(format!("{name}.log"));
    let mut f = std::fs::File::open(&path).map_err(|e| {
        let known: Vec<String> = std::fs::read_dir(&dir)
            .map(|r| {
                r.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        e.file_name()
                            .to_str()
                            .and_then(|n| n.strip_suffix(".log"))
                            .map(String::from)
                    })
                    .collect()
            })
            .unwrap_or_default();
        Failure::new(
            crate::exit::NOINPUT,
            anyhow::anyhow!("{}: {e}; logs here: {}", path.display(), known.join(", ")),
        )
    })?;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        f.read_to_end(&mut buf)
            .map_err(|e| Failure::new(SOFTWARE, e))?;
        // A reader that went away (`nbpy logs NAME -f | head`) ends it:
        // seen when writing, or, while the log is quiet, by asking.
        if !crate::cli::emit_bytes(&buf) || !follow || stdout_reader_gone() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
        let pos = f.stream_position().unwrap_or(0);
        if std::fs::metadata(&path)
            .map(|m| m.len() < pos)
            .unwrap_or(false)
        {
            let _ = f.seek(std::io::SeekFrom::Start(0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `role` child that ignores SIGTERM, as a hung service would; it
    /// creates `ready` once it does.
    fn hung(role: &str, ready: &Path) -> Child {
        let proc = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "trap '' TERM; : > '{}'; exec sleep 60",
                ready.display()
            ))
            .kill_on_drop(true)
            .spawn()
            .ok();
        Child {
            state: Arc::new(Mutex::new(ChildState {
                name: ready.display().to_string(),
                role: role.into(),
                state: "running".into(),
                ..Default::default()
            })),
            proc,
            args: Vec::new(),
            bin: PathBuf::new(),
            notify: PathBuf::new(),
            next_restart: None,
            backoff: Duration::from_secs(1),
            started_at: Instant::now(),
            done: false,
            listening: Arc::default(),
            reader: None,
        }
    }

    /// A child `start` runs as `sh -c SCRIPT`, with its notify socket and
    /// log in `dir`.
    fn scripted(dir: &Path, script: &str) -> Child {
        Child {
            bin: PathBuf::from("/bin/sh"),
            args: vec!["-c".into(), script.into()],
            notify: dir.join("c.notify"),
            state: Arc::new(Mutex::new(ChildState {
                name: "c".into(),
                role: "publisher".into(),
                log: dir.join("c.log"),
                ..Default::default()
            })),
            ..hung("publisher", &dir.join("unused"))
        }
    }

    #[tokio::test]
    async fn a_restart_ends_the_notify_reader_of_the_process_before() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = scripted(dir.path(), "exit 3");
        start(&mut c).unwrap();
        let first = c.reader.take().unwrap();
        let mut up = Up {
            dir: dir.path().into(),
            config_file: PathBuf::new(),
            children: vec![c],
            status: Arc::default(),
        };
        let t0 = Instant::now();
        // Exit noticed, restart scheduled after 1 s, restarted.
        while up.children[0].reader.is_none() {
            assert!(t0.elapsed() < Duration::from_secs(10), "never restarted");
            up.supervise();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The first reader times out within 1 s and sees it is not wanted.
        while !first.is_finished() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the first process's notify reader outlived it"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        up.stop_all(Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn a_restart_that_cannot_start_is_tried_again_and_the_stop_is_unclean() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = scripted(dir.path(), "exit 3");
        c.proc = None;
        c.bin = dir.path().join("no-such-binary");
        c.next_restart = Some(Instant::now());
        if let Ok(mut s) = c.state.lock() {
            s.state = "exited".into();
        }
        let mut up = Up {
            dir: dir.path().into(),
            config_file: PathBuf::new(),
            children: vec![c],
            status: Arc::default(),
        };
        up.supervise();
        let c = &up.children[0];
        assert!(c.proc.is_none());
        assert!(
            c.next_restart.is_some(),
            "a failed restart was not rescheduled"
        );
        assert_eq!(c.backoff, Duration::from_secs(2));
        assert!(!up.stop_all(Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn a_child_stopped_for_good_degrades_the_status_and_the_stop() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("run")).unwrap();
        let failed = Child {
            proc: None,
            done: true,
            ..hung("publisher", &dir.path().join("q"))
        };
        if let Ok(mut s) = failed.state.lock() {
            s.state = "failed".into();
        }
        let mut up = Up {
            dir: dir.path().into(),
            config_file: PathBuf::new(),
            children: vec![failed],
            status: Arc::default(),
        };
        up.write_status("up");
        let written: UpStatus =
            serde_json::from_slice(&std::fs::read(dir.path().join("run/status.json")).unwrap())
                .unwrap();
        assert_eq!(written.phase, "degraded");
        up.write_status("stopping");
        assert_eq!(up.status.lock().unwrap().phase, "stopping");
        assert!(!up.stop_all(Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn hung_children_of_one_role_share_one_stop_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let marks: Vec<PathBuf> = (0..3).map(|i| dir.path().join(format!("s{i}"))).collect();
        let mut up = Up {
            dir: dir.path().into(),
            config_file: PathBuf::new(),
            children: marks.iter().map(|m| hung("subscriber", m)).collect(),
            status: Arc::default(),
        };
        assert!(
            up.children.iter().all(|c| c.proc.is_some()),
            "sh did not start"
        );
        let t0 = Instant::now();
        while !marks.iter().all(|m| m.exists()) {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "children never ignored SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let timeout = Duration::from_secs(1);
        let t0 = Instant::now();
        let clean = up.stop_all(timeout).await;
        let took = t0.elapsed();
        assert!(!clean, "killed children are no clean stop");
        // Each was waited for (none stopped on its own), but all three
        // within one deadline: one after another would take 3 s.
        assert!(
            took >= timeout,
            "stopped in {took:?}: the children were not hung"
        );
        assert!(
            took < timeout * 2,
            "3 hung children took {took:?} for a {timeout:?} deadline"
        );
        assert!(up.children.iter().all(|c| c.proc.is_none()));
    }

    #[test]
    fn restarts_follow_the_units_policy() {
        let s = Duration::from_secs;
        let quick = s(2);
        assert_eq!(after_exit(Some(0), quick, s(1)), AfterExit::Finished);
        for code in [64, 77, 78] {
            assert_eq!(after_exit(Some(code), quick, s(1)), AfterExit::Failed);
        }
        // Any other failure, a signal too, is restarted with a doubling wait...
        let mut backoff = s(1);
        let mut waits = Vec::new();
        for code in [Some(1), None, Some(70), Some(75), Some(1), Some(1), Some(1)] {
            match after_exit(code, quick, backoff) {
                AfterExit::Restart { after, next } => {
                    waits.push(after.as_secs());
                    backoff = next;
                }
                other => panic!("{code:?}: {other:?}"),
            }
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        // ...which a healthy run resets.
        assert_eq!(
            after_exit(Some(1), HEALTHY_RUN, backoff),
            AfterExit::Restart {
                after: s(1),
                next: s(2)
            }
        );
    }

    #[test]
    fn the_demo_feed_waits_for_the_demo_subscriber_only() {
        let cfg = with_defaults(Config::default(), false);
        assert_eq!(cfg.publishers["synth"].wait_for_subscribers, 1);
        assert_eq!(
            cfg.subscribers["main"].connect,
            vec![cfg.publishers["synth"].reach()]
        );
        // A publisher bound to every address is reached on loopback.
        let mut wild = Config::default();
        wild.publishers.insert(
            "w".into(),
            PublisherConfig {
                endpoint: Some("tcp://*:5999".into()),
                ..Default::default()
            },
        );
        let wild = with_defaults(wild, false);
        assert_eq!(
            wild.subscribers["main"].connect,
            vec!["tcp://127.0.0.1:5999"]
        );
        // Live venues cannot wait: their sockets must keep being read.
        let live = with_defaults(Config::default(), true);
        assert!(live
            .publishers
            .values()
            .all(|p| p.wait_for_subscribers == 0));
        // With subscribers of the user's own, who connects is theirs to say.
        let mut own = Config::default();
        own.subscribers
            .insert("mine".into(), SubscriberConfig::default());
        let own = with_defaults(own, false);
        assert_eq!(own.publishers["synth"].wait_for_subscribers, 0);
    }

    /// `nbpy validate` and `nbpy status` beside `nbpy up` on built-in
    /// defaults: the configuration has no publishers, what `up` runs has.
    #[test]
    fn a_running_up_lends_its_effective_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::config::Config {
            state_dir: dir.path().to_path_buf(),
            ..Default::default()
        };
        assert!(running_up(&cfg).is_none(), "no `nbpy up` here yet");

        let run = dir.path().join("run");
        std::fs::create_dir_all(&run).unwrap();
        let effective = with_defaults(cfg.clone(), false);
        std::fs::write(
            run.join("nbpy.toml"),
            toml::to_string_pretty(&effective).unwrap(),
        )
        .unwrap();
        std::fs::write(
            run.join("status.json"),
            serde_json::to_vec(&UpStatus {
                pid: std::process::id(),
                ..Default::default()
            })
            .unwrap(),
        )
        .unwrap();
        // A pid file naming a live process is no running `up` …
        std::fs::write(dir.path().join("up.pid"), std::process::id().to_string()).unwrap();
        assert!(running_up(&cfg).is_none(), "a pid file nobody holds");
        // … one that holds it is.
        let _claim = Claim::take(dir.path()).unwrap();
        let (_, lent) = running_up(&cfg).expect("a running up");
        let lent = lent.expect("its configuration reads");
        assert!(cfg.publishers.is_empty());
        assert_eq!(
            lent.publishers.keys().collect::<Vec<_>>(),
            vec!["synth"],
            "the demo publisher `up` runs"
        );
    }
}
