//! The service contract every long-running binary keeps: readiness, status,
//! an honest watchdog, signal-driven draining stops, and logging that goes
//! to the journal when stderr is the journal.
//!
//! Notifications are sent by hand on a datagram socket rather than through
//! `sd_notify::notify`, because that crate cannot reach an abstract-namespace
//! `NOTIFY_SOCKET` (`@name`), which containers and test harnesses use;
//! the crate still formats the states and reads `WATCHDOG_USEC`/`WATCHDOG_PID`.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::config::LogFormat;

/// How long one notification may wait for room in the manager's queue.
/// systemd reads its socket at once, so this only bites when the manager
/// (or a test harness) has stopped reading: then a bounded wait and a lost
/// status line beat a pipeline frozen in `send()` (the subscriber notifies
/// from the thread that also reads the bus).
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// A connected datagram socket to the service manager, if there is one.
pub struct Notifier {
    socket: Option<UnixDatagram>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`.
    pub fn from_env() -> io::Result<Self> {
        match std::env::var_os("NOTIFY_SOCKET") {
            None => Ok(Notifier { socket: None }),
            Some(raw) => Self::connect(&raw.to_string_lossy()),
        }
    }

    /// To `raw`: a path, or `@name` for the abstract namespace.
    fn connect(raw: &str) -> io::Result<Self> {
        let addr = match raw.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
            None => SocketAddr::from_pathname(raw)?,
        };
        let socket = UnixDatagram::unbound()?;
        socket.connect_addr(&addr)?;
        socket.set_write_timeout(Some(SEND_TIMEOUT))?;
        Ok(Notifier {
            socket: Some(socket),
        })
    }

    pub fn disabled() -> Self {
        Notifier { socket: None }
    }

    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    pub fn notify(&self, states: &[NotifyState<'_>]) {
        let Some(sock) = &self.socket else { return };
        let mut msg = String::new();
        for s in states {
            msg.push_str(&s.to_string());
            msg.push('\n');
        }
        match sock.send(msg.as_bytes()) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                tracing::warn!(
                    "the service manager did not take a notification within {SEND_TIMEOUT:?} \
                     (is it reading NOTIFY_SOCKET?); dropped: {}",
                    msg.trim_end().replace('\n', "; ")
                );
            }
            Err(e) => tracing::debug!("sd_notify send failed: {e}"),
        }
    }
}

/// Raises the soft open-files limit to the hard one. A low soft limit (the
/// 1024 systemd and most containers give, a test's 64) is what runs out
/// first: a publisher serves up to 1024 connections and the health daemon
/// 64 at once, each a descriptor, on top of their own files and sockets.
/// The hard limit is the process's for the asking. Returns the new soft
/// limit, or why it could not be read or raised.
pub fn raise_nofile() -> Result<u64, String> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| e.to_string())?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(|e| e.to_string())?;
    }
    Ok(hard.max(soft))
}

/// What the watchdog looks at before it pings: the main loop beats, and data
/// flows (or the feed is legitimately idle).
pub struct Liveness {
    start: Instant,
    beat_ms: AtomicU64,
    data_ms: AtomicU64,
    /// Data moved since the last beat or check ([`Liveness::mark_data`]).
    moved: AtomicBool,
    idle_ok: AtomicBool,
    stale_after: Duration,
}

impl Liveness {
    pub fn new(stale_after: Duration) -> Self {
        Liveness {
            start: Instant::now(),
            beat_ms: AtomicU64::new(0),
            data_ms: AtomicU64::new(0),
            moved: AtomicBool::new(false),
            idle_ok: AtomicBool::new(false),
            stale_after,
        }
    }
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
    /// The main loop is alive.
    pub fn beat(&self) {
        let now = self.now_ms();
        self.beat_ms.store(now, Ordering::Relaxed);
        self.take_mark(now);
    }
    /// Data moved, said from a per-message path: a flag, which the next
    /// [`Liveness::beat`] or check turns into a time. Reading the clock for
    /// every message was ~3% of a publisher's CPU; main loops beat every
    /// 250 ms, so data's age is still known to well within a second.
    pub fn mark_data(&self) {
        self.moved.store(true, Ordering::Relaxed);
    }
    /// Marked data counts as [`Liveness::data`] does, as a beat too.
    fn take_mark(&self, now: u64) {
        if self.moved.load(Ordering::Relaxed) && self.moved.swap(false, Ordering::Relaxed) {
            self.data_at(now);
        }
    }
    /// Data moved.
    pub fn data(&self) {
        self.data_at(self.now_ms());
    }
    fn data_at(&self, now: u64) {
        self.beat_ms.store(now, Ordering::Relaxed);
        self.data_ms.store(now, Ordering::Relaxed);
    }
    /// No data is expected (count reached, market closed): not stale.
    pub fn set_idle(&self, idle: bool) {
        self.idle_ok.store(idle, Ordering::Relaxed);
    }
    /// Why the service should not be considered alive, if it should not.
    pub fn problem(&self, hung_after: Duration) -> Option<String> {
        let now = self.now_ms();
        self.take_mark(now);
        let beat = now.saturating_sub(self.beat_ms.load(Ordering::Relaxed));
        if beat > hung_after.as_millis() as u64 {
            return Some(format!("main loop silent for {} ms", beat));
        }
        let data = now.saturating_sub(self.data_ms.load(Ordering::Relaxed));
        if !self.idle_ok.load(Ordering::Relaxed) && data > self.stale_after.as_millis() as u64 {
            return Some(format!(
                "no data for {} ms (stale_after = {} ms)",
                data,
                self.stale_after.as_millis()
            ));
        }
        None
    }
}

/// One per process: notifications, the shutdown token, liveness.
pub struct Service {
    pub name: String,
    notifier: Notifier,
    pub shutdown: CancellationToken,
    pub liveness: Arc<Liveness>,
    ready: AtomicBool,
}

impl Service {
    /// Sets up notifications, the signal handler and the watchdog task. Call
    /// inside the tokio runtime. `abandoned` describes, at a second signal,
    /// what an immediate exit leaves behind.
    pub fn start(
        name: impl Into<String>,
        stale_after: Duration,
        abandoned: impl Fn() -> String + Send + Sync + 'static,
    ) -> Arc<Self> {
        Self::start_with(name, stale_after, abandoned, SecondTerm::ExitNow)
    }

    /// [`start`](Self::start), choosing what a second SIGTERM does.
    pub fn start_with(
        name: impl Into<String>,
        stale_after: Duration,
        abandoned: impl Fn() -> String + Send + Sync + 'static,
        second_term: SecondTerm,
    ) -> Arc<Self> {
        let notifier = Notifier::from_env().unwrap_or_else(|e| {
            tracing::warn!("NOTIFY_SOCKET unusable ({e}); running without sd_notify");
            Notifier::disabled()
        });
        let svc = Arc::new(Service {
            name: name.into(),
            notifier,
            shutdown: CancellationToken::new(),
            liveness: Arc::new(Liveness::new(stale_after)),
            ready: AtomicBool::new(false),
        });
        svc.liveness.beat();
        svc.liveness.data();
        spawn_signals(svc.clone(), Box::new(abandoned), second_term);
        if let Some(period) = sd_notify::watchdog_enabled() {
            spawn_watchdog(svc.clone(), period);
        }
        svc
    }

    pub fn ready(&self, status: &str) {
        if !self.ready.swap(true, Ordering::SeqCst) {
            tracing::info!("{}: ready: {status}", self.name);
        }
        self.notifier
            .notify(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn status(&self, status: &str) {
        self.notifier.notify(&[NotifyState::Status(status)]);
    }

    pub fn stopping(&self, status: &str) {
        self.notifier
            .notify(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }
}

/// Makes the child `cmd` starts get `signal` when this process dies,
/// however it dies (SIGKILL included), so that it stops in its own orderly
/// way instead of running on with no one to stop it. Linux sends it when
/// the thread that forked exits (and may send it again as the child is
/// re-parented): callers fork from threads that live as long as the
/// process (the runtime's workers, the main thread), never from a blocking
/// pool's thread, which ends when idle. nbpy's own services are given
/// SIGHUP, which starts their orderly stop and never escalates one under
/// way (a second SIGTERM would abandon what a draining subscriber holds).
pub fn die_with_parent(cmd: &mut std::process::Command, signal: nix::sys::signal::Signal) {
    use std::os::unix::process::CommandExt;
    let parent = nix::unistd::getpid();
    // SAFETY: between fork and exec the closure makes only two system
    // calls (prctl, getppid) and builds its error without allocating,
    // which is all that is allowed in a child of a threaded process.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Some(signal))
                .map_err(|e| std::io::Error::from_raw_os_error(e as i32))?;
            // Dead before the prctl took hold: the signal never comes.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(
                    nix::errno::Errno::ESRCH as i32,
                ));
            }
            Ok(())
        });
    }
}

/// What a second SIGTERM does while a stop is under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecondTerm {
    /// Exit at once, abandoning what is held: a daemon's contract (systemd
    /// sends one SIGTERM; a second comes from a person who means it).
    ExitNow,
    /// Nothing: the stop under way goes on. For `nbpy up`, whose stop is
    /// asked for by `nbpy down`, which may run twice (impatience, a
    /// timeout); abandoning the children there would leave them running.
    /// A second SIGINT (Ctrl-C twice) still exits at once.
    Ignore,
}

fn spawn_signals(
    svc: Arc<Service>,
    abandoned: Box<dyn Fn() -> String + Send + Sync>,
    second_term: SecondTerm,
) {
    use tokio::signal::unix::{signal, SignalKind};
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        // SIGHUP: the terminal closed, or `nbpy up` died (the signal its
        // children get then, see `die_with_parent`). It starts the same
        // orderly stop, and never escalates one under way: the kernel may
        // send it twice, and a stop `nbpy up` began must finish draining.
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = hup.recv() => "SIGHUP",
        };
        let again = match second_term {
            SecondTerm::ExitNow => "a second SIGTERM or SIGINT",
            SecondTerm::Ignore => "a second SIGINT",
        };
        tracing::info!("{which}: stopping intake and draining ({again} exits at once)");
        svc.stopping("draining");
        svc.shutdown.cancel();
        let which = loop {
            let which = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = hup.recv() => "SIGHUP",
            };
            if which == "SIGHUP" || (which == "SIGTERM" && second_term == SecondTerm::Ignore) {
                tracing::info!("{which} again: already stopping in order");
                continue;
            }
            break which;
        };
        let left = abandoned();
        tracing::error!("second {which}: exiting now, abandoning {left}");
        // Not `eprintln!`: with stderr gone it panics, the task dies and
        // the exit promised to the second signal never comes.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "second {which}: exiting now, abandoning {left}"
        );
        std::process::exit(crate::exit::TEMPFAIL);
    });
}

fn spawn_watchdog(svc: Arc<Service>, period: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period / 2);
        let mut withheld = false;
        loop {
            tick.tick().await;
            // Main loops beat every 250 ms or faster; a short WatchdogSec
            // must not mistake that rhythm for a hang.
            match svc.liveness.problem(period.max(Duration::from_secs(2))) {
                None => {
                    if withheld {
                        tracing::info!("watchdog: healthy again");
                        withheld = false;
                    }
                    svc.notifier.notify(&[NotifyState::Watchdog]);
                }
                Some(why) => {
                    if !withheld {
                        tracing::warn!("watchdog: withholding pings: {why}");
                        withheld = true;
                    }
                }
            }
        }
    });
}

/// Is stderr the journal? `$JOURNAL_STREAM` is `device:inode` of the stream
/// systemd connected; it is inherited by children whose stderr may be
/// elsewhere, so it only counts when it matches stderr itself.
pub fn journal_stream_matches(
    journal_stream: Option<&str>,
    stderr_dev: u64,
    stderr_ino: u64,
) -> bool {
    let Some((dev, ino)) = journal_stream.and_then(|s| s.split_once(':')) else {
        return false;
    };
    matches!((dev.parse::<u64>(), ino.parse::<u64>()), (Ok(d), Ok(i)) if d == stderr_dev && i == stderr_ino)
}

fn stderr_is_journal() -> bool {
    let Ok(st) = nix::sys::stat::fstat(2) else {
        return false;
    };
    journal_stream_matches(
        std::env::var("JOURNAL_STREAM").ok().as_deref(),
        st.st_dev,
        st.st_ino,
    )
}

/// Installs the global subscriber. `RUST_LOG` overrides `level`.
pub fn init_logging(format: LogFormat, level: &str) {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::EnvFilter;
    let spec = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| EnvFilter::try_new(s).is_ok())
        .unwrap_or_else(|| level.to_string());
    let filter = EnvFilter::try_new(with_quiet_dependencies(&spec))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let want_journal = match format {
        LogFormat::Journald => true,
        LogFormat::Auto => stderr_is_journal(),
        _ => false,
    };
    let registry = tracing_subscriber::registry().with(filter);
    if want_journal {
        match tracing_journald::layer() {
            Ok(layer) => {
                let _ = registry.with(layer).try_init();
                return;
            }
            Err(e) => {
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "stderr is the journal, but journald is unreachable ({e}); logging to stderr"
                );
            }
        }
    }
    if format == LogFormat::Json {
        let _ = registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(io::stderr),
            )
            .try_init();
    } else {
        use std::io::IsTerminal;
        let ansi = colour(
            io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR").as_deref(),
        );
        let _ = registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(io::stderr),
            )
            .try_init();
    }
}

/// `spec` with the `zeromq` crate held to warnings, unless `spec` names it.
///
/// The crate logs every peer that disconnects at INFO ("Peer … disconnected
/// from …, starting reconnection"). nbpy says itself what a disconnect
/// means where it matters (a publisher gone in `nbpy validate`, a
/// subscriber's gaps), so at the default level that line is only noise in
/// a command's output; `RUST_LOG=zeromq=info` still shows it.
fn with_quiet_dependencies(spec: &str) -> String {
    if spec.contains("zeromq") {
        spec.to_string()
    } else if spec.trim().is_empty() {
        "zeromq=warn".to_string()
    } else {
        format!("{spec},zeromq=warn")
    }
}

/// Text logs are coloured only on a terminal: in a file, a pipe or a log
/// collector the escape codes are noise that breaks grep. `NO_COLOR`
/// (no-color.org: set and not empty) turns colour off on a terminal too.
fn colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeromq_is_held_to_warnings_unless_named() {
        assert_eq!(with_quiet_dependencies("info"), "info,zeromq=warn");
        assert_eq!(with_quiet_dependencies(""), "zeromq=warn");
        assert_eq!(with_quiet_dependencies("zeromq=debug"), "zeromq=debug");
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None));
        assert!(!colour(false, Some(OsStr::new(""))));
    }

    #[test]
    fn journal_stream_must_match_stderr() {
        assert!(journal_stream_matches(Some("8:1234"), 8, 1234));
        assert!(!journal_stream_matches(Some("8:1234"), 8, 1235));
        assert!(!journal_stream_matches(Some("garbage"), 8, 1234));
        assert!(!journal_stream_matches(None, 8, 1234));
    }

    /// A manager that stops reading costs each notification at most
    /// [`SEND_TIMEOUT`], never a hung service.
    #[test]
    fn a_manager_that_does_not_read_does_not_hang_the_service() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let manager = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::connect(&path.to_string_lossy()).unwrap();
        assert!(notifier.enabled());
        // Three more than the kernel queues for an unread datagram socket
        // (net.unix.max_dgram_qlen, 10 by default).
        let qlen: u64 = std::fs::read_to_string("/proc/sys/net/unix/max_dgram_qlen")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(10);
        let sends = qlen + 3;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for i in 0..sends {
                notifier.notify(&[NotifyState::Status(&format!("n{i}"))]);
            }
            let _ = tx.send(());
        });
        let bound = SEND_TIMEOUT * 3 + Duration::from_secs(30);
        assert!(
            rx.recv_timeout(bound).is_ok(),
            "notify blocked for over {bound:?} on a manager that does not read"
        );
        // What did fit is intact and in order.
        let mut buf = [0u8; 64];
        let n = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STATUS=n0\n");
    }

    #[test]
    fn liveness_goes_stale_and_idle_excuses_it() {
        let l = Liveness::new(Duration::from_millis(0));
        l.data();
        std::thread::sleep(Duration::from_millis(5));
        l.beat();
        assert!(l
            .problem(Duration::from_secs(10))
            .unwrap()
            .contains("no data"));
        // Marked data counts from the next beat or check.
        l.mark_data();
        assert_eq!(l.problem(Duration::from_secs(10)), None);
        std::thread::sleep(Duration::from_millis(5));
        assert!(l
            .problem(Duration::from_secs(10))
            .unwrap()
            .contains("no data"));
        l.set_idle(true);
        assert_eq!(l.problem(Duration::from_secs(10)), None);
        std::thread::sleep(Duration::from_millis(5));
        assert!(l
            .problem(Duration::from_millis(1))
            .unwrap()
            .contains("main loop"));
    }
}
