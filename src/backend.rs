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

/// A free TCP port on loopback (bound, then released).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
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
        std::fs::create_dir_all(dir)?;
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
        let (out, err) = match log {
            Some(f) => (Stdio::from(f.try_clone()?), Stdio::from(f)),
            None => (Stdio::null(), Stdio::null()),
        };
        let child = Command::new(binary.unwrap_or(Path::new("influxd")))
            // Not in our process group: a Ctrl-C meant for `nbpy up` must not
            // stop InfluxDB before the subscribers have drained into it.
            .process_group(0)
            .arg("run")
            .arg("-config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()?;
        Ok(LocalInfluxd {
            child: Some(child),
            addr,
            dir: dir.to_path_buf(),
            config,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Polls `/ping` until it answers or `timeout` passes; fails early if
    /// the process has exited.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Duration, String> {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if ping(&self.addr) {
                return Ok(t0.elapsed());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    return Err(format!("influxd exited with {status} before answering"));
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

    /// Restarts on the same port and data (for outage tests).
    pub fn restart(&mut self, log: Option<std::fs::File>) -> std::io::Result<()> {
        self.stop();
        let port: u16 = self
            .addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let fresh = LocalInfluxd::spawn(None, &self.dir.clone(), port, log)?;
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
/// long it waited, or what the last attempt said.
pub async fn wait_answering(
    client: &crate::sink::influx::InfluxClient,
    timeout: Duration,
) -> Result<Duration, String> {
    let t0 = Instant::now();
    let mut delay = Duration::from_millis(100);
    let mut told = false;
    loop {
        let err = match client.ping().await {
            Ok(()) => return Ok(t0.elapsed()),
            Err(e) => e,
        };
        if t0.elapsed() + delay > timeout {
            return Err(format!(
                "InfluxDB at {} did not answer /ping within {timeout:?}: {err}",
                client.url()
            ));
        }
        if !told {
            tracing::info!("waiting for InfluxDB at {}: {err}", client.url());
            told = true;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}
