//! Phase 1 without systemd: a private `influxd` on loopback.
//!
//! `nbpy up` and the integration tests run the same code, so what the tests
//! prove about a local InfluxDB is what users get. The config keeps every
//! listener on loopback and every file under one directory, and picks free
//! ports so a second instance (or a system InfluxDB) never collides.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on loopback for a listener someone else will open.
///
/// The port is checked by binding and then released, so it can be taken
/// before its new owner binds it. `bind(0)` would hand out a port from the
/// kernel's ephemeral range, the same range every outgoing connection on the
/// machine draws its local port from: under load (a test suite, a busy
/// host) one of those can land on it in that window, and influxd then exits
/// with "address already in use". So the port is drawn at random from below
/// (else above) the ephemeral range, where only another listener can take it.
pub fn free_port() -> std::io::Result<u16> {
    use rand::Rng;
    let (lo, hi) = ephemeral_range();
    let span = if lo >= 11_024 {
        Some((10_000, lo - 1))
    } else if hi <= 64_511 {
        Some((hi + 1, 65_535))
    } else {
        None
    };
    if let Some((a, b)) = span {
        let mut rng = rand::thread_rng();
        for _ in 0..64 {
            let port = rng.gen_range(a..=b);
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The kernel's ephemeral port range (Linux's default when unreadable).
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut it = t.split_whitespace().map(|v| v.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32_768, 60_999))
}

/// `GET /ping` without an HTTP client: true when the server answers 2xx.
pub fn ping(addr: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(format!("GET /ping HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && head[9] == b'2'
}

/// A running private `influxd`; stopped (SIGTERM, then SIGKILL) on drop.
pub struct LocalInfluxd {
    child: Option<Child>,
    pub addr: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    /// What `wait_ready` needs to start it again after an early exit.
    binary: PathBuf,
    http_port: u16,
    log: Option<std::fs::File>,
    /// Started for `nbpy up`: SIGTERM when it dies (see
    /// [`crate::service::die_with_parent`]), respawns included.
    dies_with_parent: bool,
}

impl LocalInfluxd {
    /// Starts `influxd` (from `binary`, else PATH) with data under `dir`,
    /// HTTP on `127.0.0.1:http_port` (0 = a free one); output to `log`.
    pub fn spawn(
        binary: Option<&Path>,
        dir: &Path,
        http_port: u16,
        log: Option<std::fs::File>,
    ) -> std::io::Result<Self> {
        Self::spawn_with(binary, dir, http_port, log, false)
    }

    /// [`spawn`](Self::spawn), and with `dies_with_parent` the influxd gets
    /// SIGTERM when this process dies, however it dies: `nbpy up` killed
    /// must not leave a database running that nothing will stop.
    pub fn spawn_with(
        binary: Option<&Path>,
        dir: &Path,
        http_port: u16,
        log: Option<std::fs::File>,
        dies_with_parent: bool,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let requested_port = http_port;
        let http_port = if http_port == 0 {
            free_port()?
        } else {
            http_port
        };
        let rpc_port = free_port()?;
        let addr = format!("127.0.0.1:{http_port}");
        let config = dir.join("influxdb.conf");
        let d = dir.display();
        std::fs::write(
            &config,
            format!(
                "reporting-disabled = true\nbind-address = \"127.0.0.1:{rpc_port}\"\n\
                 [meta]\n  dir = \"{d}/meta\"\n\
                 [data]\n  dir = \"{d}/data\"\n  wal-dir = \"{d}/wal\"\n  query-log-enabled = false\n\
                 [http]\n  enabled = true\n  bind-address = \"{addr}\"\n  log-enabled = false\n  max-body-size = 0\n\
                 [monitor]\n  store-enabled = false\n\
                 [continuous_queries]\n  run-interval = \"1s\"\n"
            ),
        )?;
        let (out, err) = match &log {
            Some(f) => (Stdio::from(f.try_clone()?), Stdio::from(f.try_clone()?)),
            None => (Stdio::null(), Stdio::null()),
        };
        let binary = binary.unwrap_or(Path::new("influxd"));
        let mut cmd = Command::new(binary);
        // Not in our process group: a Ctrl-C meant for `nbpy up` must not
        // stop InfluxDB before the subscribers have drained into it.
        cmd.process_group(0)
            .arg("run")
            .arg("-config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if dies_with_parent {
            // influxd stops in order on SIGTERM (it has no drain to lose).
            crate::service::die_with_parent(&mut cmd, nix::sys::signal::Signal::SIGTERM);
        }
        let child = cmd.spawn()?;
        Ok(LocalInfluxd {
            child: Some(child),
            addr,
            dir: dir.to_path_buf(),
            config,
            binary: binary.to_path_buf(),
            dies_with_parent,
            http_port: requested_port,
            log,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Polls `/ping` until it answers or `timeout` passes. An influxd that
    /// exits before answering is started again, at most `RESPAWNS` times,
    /// on fresh ports: the ports were free when chosen, but another
    /// listener may have taken one since (its log says "address already in
    /// use"). `addr` and `url()` name the instance that answered.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Duration, String> {
        self.wait_ready_unless(timeout, || false)
    }

    /// [`wait_ready`](Self::wait_ready), giving up once `stopped` says so
    /// (a stop asked for while the database starts).
    pub fn wait_ready_unless(
        &mut self,
        timeout: Duration,
        stopped: impl Fn() -> bool,
    ) -> Result<Duration, String> {
        const RESPAWNS: u32 = 3;
        let t0 = Instant::now();
        let mut respawns = 0;
        while t0.elapsed() < timeout {
            if stopped() {
                return Err("stopped while influxd was starting".into());
            }
            if ping(&self.addr) {
                return Ok(t0.elapsed());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    if respawns == RESPAWNS {
                        return Err(format!(
                            "influxd exited with {status} before answering \
                             ({} attempts on fresh ports)",
                            RESPAWNS + 1
                        ));
                    }
                    respawns += 1;
                    tracing::warn!(
                        "influxd on {} exited with {status} before answering; starting it again",
                        self.addr
                    );
                    self.child = None;
                    let log = match &self.log {
                        Some(f) => Some(f.try_clone().map_err(|e| format!("influxd log: {e}"))?),
                        None => None,
                    };
                    *self = LocalInfluxd::spawn_with(
                        Some(&self.binary),
                        &self.dir,
                        self.http_port,
                        log,
                        self.dies_with_parent,
                    )
                    .map_err(|e| format!("starting influxd again: {e}"))?;
                    continue;
                }
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Err(format!(
            "influxd at {} did not answer /ping within {timeout:?}",
            self.addr
        ))
    }

    /// SIGTERM, wait up to 10 s, then SIGKILL.
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    /// How it ended, if it has (killed, crashed, out of memory).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Restarts on the same port and data (for outage tests).
    pub fn restart(&mut self, log: Option<std::fs::File>) -> std::io::Result<()> {
        self.stop();
        let port: u16 = self
            .addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let fresh = LocalInfluxd::spawn_with(
            Some(&self.binary),
            &self.dir,
            port,
            log,
            self.dies_with_parent,
        )?;
        *self = fresh;
        Ok(())
    }
}

impl Drop for LocalInfluxd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Phase 1 gate (`nbpy wait influxdb`, the `nbpy-influxdb-ready.service`
/// oneshot): polls `/ping` on the configured InfluxDB until it answers or
/// `timeout` passes, backing off from 100 ms to 1 s. A distro `influxdb`
/// unit is `Type=simple`, so systemd calls it started long before it
/// answers; this is what makes phase 2 wait for the real thing. Returns how
/// long it waited; else EX_UNAVAILABLE with what the last attempt said, or
/// at once EX_CONFIG when something that is not InfluxDB answers at the
/// URL: that does not change by waiting, and 78 tells the service manager
/// (and `RestartPreventExitStatus=`) that the configuration must.
pub async fn wait_answering(
    client: &crate::sink::influx::InfluxClient,
    timeout: Duration,
) -> Result<Duration, crate::exit::Failure> {
    use crate::exit::{Failure, CONFIG, UNAVAILABLE};
    use crate::sink::influx::WriteError;
    let t0 = Instant::now();
    let mut delay = Duration::from_millis(100);
    let mut told = false;
    loop {
        let err = match client.ping().await {
            Ok(()) => return Ok(t0.elapsed()),
            Err(e @ WriteError::NotInfluxDb(_)) => return Err(Failure::new(CONFIG, e)),
            Err(e) => e,
        };
        if t0.elapsed() + delay > timeout {
            return Err(Failure::new(
                UNAVAILABLE,
                anyhow::anyhow!(
                    "InfluxDB at {} did not answer /ping within {timeout:?}: {err}",
                    client.shown_url()
                ),
            ));
        }
        if !told {
            tracing::info!("waiting for InfluxDB at {}: {err}", client.shown_url());
            told = true;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn chosen_ports_avoid_the_ephemeral_range() {
        let (lo, hi) = ephemeral_range();
        for _ in 0..200 {
            let p = free_port().unwrap();
            assert!(!(lo..=hi).contains(&p), "{p} is in {lo}..={hi}");
            assert!(p >= 1024);
        }
    }

    /// Stands in for influxd: fails its first `fail` starts, then serves
    /// a directory holding `ping` (so `GET /ping` answers 200) on the HTTP
    /// address from the config it was given.
    fn flaky_influxd(dir: &Path, fail: u32) -> PathBuf {
        let bin = dir.join("flaky-influxd");
        std::fs::write(
            &bin,
            format!(
                "#!/bin/sh\n\
                 n=$(cat {d}/starts 2>/dev/null || echo 0); echo $((n+1)) > {d}/starts\n\
                 [ \"$n\" -lt {fail} ] && exit 1\n\
                 addr=$(sed -n 's/^  bind-address = \"\\(.*\\)\"/\\1/p' \"$3\")\n\
                 mkdir -p {d}/www && touch {d}/www/ping\n\
                 exec python3 -m http.server -b \"${{addr%:*}}\" -d {d}/www \"${{addr##*:}}\"\n",
                d = dir.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        bin
    }

    #[test]
    fn an_influxd_that_exits_before_answering_is_started_again() {
        let dir = tempfile::tempdir().unwrap();
        let bin = flaky_influxd(dir.path(), 2);
        let mut db = LocalInfluxd::spawn(Some(&bin), &dir.path().join("db"), 0, None).unwrap();
        db.wait_ready(Duration::from_secs(30)).unwrap();
        assert!(ping(&db.addr));
        let starts = std::fs::read_to_string(dir.path().join("starts")).unwrap();
        assert_eq!(starts.trim(), "3");
    }

    #[test]
    fn an_influxd_that_keeps_exiting_is_reported_after_four_attempts() {
        let dir = tempfile::tempdir().unwrap();
        let bin = flaky_influxd(dir.path(), 100);
        let mut db = LocalInfluxd::spawn(Some(&bin), &dir.path().join("db"), 0, None).unwrap();
        let err = db.wait_ready(Duration::from_secs(30)).unwrap_err();
        assert!(err.contains("before answering (4 attempts"), "{err}");
        let starts = std::fs::read_to_string(dir.path().join("starts")).unwrap();
        assert_eq!(starts.trim(), "4");
    }
}
