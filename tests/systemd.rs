//! The five phases under a real systemd.
//!
//! The test boots `/lib/systemd/systemd` as PID 1 in private PID, mount and
//! network namespaces, over a throw-away overlay of `/` (upper layer on a
//! tmpfs), with the built binaries bind-mounted into `/usr/bin`, the units
//! installed by `nbpy units install`, Debian's own `influxdb.service` (with
//! auth on), credentials in `/etc/credstore`, and a synthetic-feed
//! configuration. Inside, a oneshot unit runs *this same test
//! binary* again with `HARNESS_SYSTEMD_INNER` set: that is the driver, which
//! starts and stops `nbpy.target`, kills and stalls publishers, and asserts on
//! what systemd itself reports (`systemctl show`, the journal) and on what
//! InfluxDB stored. It writes its verdict to a bind-mounted host directory and
//! powers the namespace off; a deadline and SIGKILL bound the whole run.
//!
//! Differences from a plain chroot, each needed by a unit setting under test:
//! `pivot_root` instead of `chroot` (the kernel refuses user namespaces to a
//! chrooted process, and the units use `PrivateUsers=yes`); the new root is
//! made `rshared` (systemd moves each service's credential mount into place
//! from a child mount namespace, and in a container it leaves propagation to
//! the container manager); a private `/dev` and read-only `/sys` and
//! `/proc/sys`, plus a few masked units (binfmt, sysctl, modules, udev, pstore),
//! so nothing in the boot can touch the host's devices or kernel settings.
//! The network namespace has only `lo`, so the namespace's InfluxDB on 8086
//! and the publishers' ports cannot collide with anything on the host.
//!
//! Needs root, overlayfs, util-linux `unshare`/`pivot_root`, systemd and
//! Debian's `influxdb` package. Without them the test fails and says why,
//! unless `NBPY_ALLOW_SKIP=1` explicitly allows it to skip.
//!
//! Units whose commands other branches are still building (`nbpy grafana`,
//! `nbpy validate`, `nbpy-health`) are held to "active" as soon as the command
//! exists in the build; until then they must fail clearly, and the driver
//! reports them as pending.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Set (to anything) in the driver's environment inside the namespace.
const INNER: &str = "HARNESS_SYSTEMD_INNER";
const TEST_NAME: &str = "appliance_under_real_systemd";
/// Where the driver binary is bind-mounted inside the namespace.
const DRIVER: &str = "/usr/local/libexec/nbpy-systemd-driver";
const FIFO: &str = "/run/nbpy-test/stall.fifo";
/// Credentials in `/etc/credstore`, where a bare-named `LoadCredential=`
/// finds them: the admin's is the one the shipped units load
/// (`influxdb-password`); the writer's no unit file names.
const ADMIN_CREDENTIAL: &str = "influxdb-password";
const WRITER_CREDENTIAL: &str = "nbpy-writer-password";
const ADMIN_PASSWORD: &str = "adm1n-systemd";
const WRITER_PASSWORD: &str = "wr1ter-systemd";

#[test]
fn appliance_under_real_systemd() {
    if std::env::var_os(INNER).is_some() {
        inner::drive();
    } else {
        outer::boot_and_check();
    }
}

/// The configuration the appliance runs with inside the namespace.
fn config() -> String {
    format!(
        r#"# nbpy systemd test: a synthetic publisher, a replay publisher whose feed
# the test can stall, and one subscriber for both. InfluxDB has auth on:
# every unit logs in with the credential its unit file loads, and the
# schema's writer user with one only `nbpy units install`'s drop-in loads.
[influxdb]
url = "http://127.0.0.1:8086"
database = "tick"
username = "admin"
password_file = "{ADMIN_CREDENTIAL}"

[schema.users.admin]
admin = true
password_file = "{ADMIN_CREDENTIAL}"

[schema.users.writer]
privilege = "write"
password_file = "{WRITER_CREDENTIAL}"

[service]
stop_timeout = "20s"

[publishers.synth]
feed = "synthetic"
endpoint = "tcp://127.0.0.1:5570"
rate = 400.0
wait_for_subscribers = 1
stale_after = "10s"

[publishers.stall]
feed = "replay"
endpoint = "tcp://127.0.0.1:5571"
file = "{FIFO}"
wait_for_subscribers = 1
stale_after = "2s"

[subscribers.main]
connect = ["tcp://127.0.0.1:5570", "tcp://127.0.0.1:5571"]
stats_interval = "1s"
"#
    )
}

mod outer {
    use super::*;

    /// Boot-time units that would reach outside the namespace (kernel
    /// settings, device events, binfmt registrations): masked in the overlay.
    const MASK: &[&str] = &[
        "systemd-binfmt.service",
        "proc-sys-fs-binfmt_misc.automount",
        "proc-sys-fs-binfmt_misc.mount",
        "systemd-modules-load.service",
        "systemd-sysctl.service",
        "systemd-udevd.service",
        "systemd-udevd-control.socket",
        "systemd-udevd-kernel.socket",
        "systemd-udev-trigger.service",
        "systemd-udev-settle.service",
        "systemd-pstore.service",
        "systemd-random-seed.service",
        "systemd-journald-audit.socket",
        "sys-kernel-debug.mount",
        "sys-kernel-tracing.mount",
        "sys-kernel-config.mount",
        "sys-fs-fuse-connections.mount",
    ];

    /// Runs as PID 1 of the new namespaces (`sh -c`), then becomes systemd.
    /// Everything it mounts lives in the private mount namespace and is gone
    /// when systemd exits.
    const SETUP: &str = r#"
B="$HARNESS_BASE"; RES="$HARNESS_RESULTS"
mount -t tmpfs -o mode=0700 tmpfs "$B"
mkdir "$B/upper" "$B/work" "$B/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$B/upper,workdir=$B/work" "$B/root"
R="$B/root"
# The appliance's state starts empty, whatever the host has under /var/lib
# (a host /var/lib/nbpy would make DynamicUser= migrate it across the
# overlay, which fails with EXDEV).
rm -rf "$R/var/lib/nbpy" "$R/var/lib/private/nbpy"
# A private /dev: the few nodes services need, a fresh devpts, and a file as
# the console. No /dev/kmsg, so nothing reaches the host's kernel log.
mount -t tmpfs -o mode=0755,nosuid tmpfs "$R/dev"
for n in null zero full random urandom tty; do
  touch "$R/dev/$n"; mount --bind "/dev/$n" "$R/dev/$n"
done
mkdir "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/dev/shm"
ln -s /proc/self/fd "$R/dev/fd"
touch "$R/dev/console" "$RES/console.log"
mount --bind "$RES/console.log" "$R/dev/console"
# /sys read-only (its cgroup mounts stay writable), a fresh /proc with a
# read-only /proc/sys, empty /run and /tmp.
mount --rbind /sys "$R/sys"
mount -o remount,bind,ro "$R/sys"
mount -t proc proc "$R/proc"
mount --bind "$R/proc/sys" "$R/proc/sys"
mount -o remount,bind,ro "$R/proc/sys"
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$R/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/tmp"
mkdir -p "$R/results"
mount --bind "$RES" "$R/results"
# The payload: binaries (read-only bind mounts of the build), config, units.
for pair in $HARNESS_BINS; do
  name="${pair%%=*}"; path="${pair#*=}"
  touch "$R/usr/bin/$name"; mount --bind -o ro "$path" "$R/usr/bin/$name"
done
mkdir -p "$(dirname "$R$HARNESS_DRIVER_AT")"
touch "$R$HARNESS_DRIVER_AT"; mount --bind -o ro "$HARNESS_DRIVER" "$R$HARNESS_DRIVER_AT"
cp -R "$HARNESS_STAGE/." "$R/"
for u in $HARNESS_MASK; do ln -sfn /dev/null "$R/etc/systemd/system/$u"; done
"$R/usr/bin/nbpy" --config "$R/etc/nbpy/nbpy.toml" units install --root "$R"
# Become the root of this mount namespace (not a chroot), share mounts
# within it, and hand over to systemd.
mkdir "$R/.oldroot"
cd "$R"
pivot_root . .oldroot
umount -l /.oldroot
rmdir /.oldroot
mount --make-rshared /
exec /usr/bin/env -i container=nbpy-test /lib/systemd/systemd --system --unit=nbpy-harness.service
"#;

    fn harness_unit() -> String {
        format!(
            "[Unit]\n\
             Description=nbpy systemd test driver\n\
             [Service]\n\
             Type=oneshot\n\
             Environment={INNER}=1 RUST_BACKTRACE=1\n\
             ExecStart={DRIVER} --exact {TEST_NAME} --nocapture --test-threads=1\n\
             StandardOutput=append:/results/inner.log\n\
             StandardError=append:/results/inner.log\n\
             TimeoutStartSec=8min\n\
             ExecStopPost=/bin/sh -c 'echo \"$$SERVICE_RESULT $$EXIT_CODE $$EXIT_STATUS\" > /results/inner.status; \
             journalctl -b --no-pager -o short-monotonic > /results/journal.txt 2>&1; \
             systemctl poweroff --no-block 2>/dev/null'\n"
        )
    }

    /// Why this machine cannot run the test, if it cannot.
    fn preflight() -> Result<(), String> {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let euid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1));
        if euid != Some("0") {
            return Err("not running as root".into());
        }
        let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
        if !fs
            .lines()
            .any(|l| l.split_whitespace().last() == Some("overlay"))
        {
            return Err("overlayfs is not available (no 'overlay' in /proc/filesystems)".into());
        }
        for tool in ["unshare", "pivot_root", "systemctl", "journalctl"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !found {
                return Err(format!("{tool} is not installed"));
            }
        }
        for (path, what) in [
            ("/lib/systemd/systemd", "systemd"),
            (
                "/lib/systemd/system/influxdb.service",
                "Debian's influxdb package",
            ),
            ("/usr/bin/influxd", "Debian's influxdb package"),
        ] {
            if !Path::new(path).exists() {
                return Err(format!("{path} is missing ({what})"));
            }
        }
        Ok(())
    }

    pub fn boot_and_check() {
        if let Err(why) = preflight() {
            if std::env::var("NBPY_ALLOW_SKIP").as_deref() == Ok("1") {
                eprintln!("SKIPPED (NBPY_ALLOW_SKIP=1): the systemd test cannot run here: {why}");
                return;
            }
            panic!(
                "the systemd test cannot run here: {why}. It needs root, overlayfs, \
                 util-linux (unshare, pivot_root), systemd and Debian's influxdb package \
                 (.ci/run installs them). Set NBPY_ALLOW_SKIP=1 to skip it explicitly."
            );
        }
        let work = tempfile::Builder::new()
            .prefix("nbpy-systemd.")
            .tempdir()
            .unwrap();
        let base = work.path().join("base");
        let results = work.path().join("results");
        let stage = work.path().join("stage");
        for d in [&base, &results] {
            std::fs::create_dir_all(d).unwrap();
        }
        let put = |rel: &str, text: &str| {
            let p = stage.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        put("etc/nbpy/nbpy.toml", &config());
        put("etc/systemd/system/nbpy-harness.service", &harness_unit());
        // Keeps the long-running units loaded once they are inactive, so
        // their stop timestamps and exit status can still be read: systemd
        // unloads an inactive unit nothing references. Started only after
        // everything is up, so it changes nothing about the start.
        put(
            "etc/systemd/system/harness-pin.service",
            "[Unit]\nDescription=test harness: pin nbpy units in memory\n\
             Wants=nbpy-subscriber@main.service nbpy-publisher@synth.service nbpy-publisher@stall.service nbpy-health.service\n\
             [Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/true\n",
        );
        // InfluxDB with auth on (Debian's unit, configured by environment),
        // and the credentials the units load, readable by root only.
        put(
            "etc/systemd/system/influxdb.service.d/auth.conf",
            "[Service]\nEnvironment=INFLUXDB_HTTP_AUTH_ENABLED=true\n",
        );
        for (name, secret) in [
            (ADMIN_CREDENTIAL, ADMIN_PASSWORD),
            (WRITER_CREDENTIAL, WRITER_PASSWORD),
        ] {
            let rel = format!("etc/credstore/{name}");
            put(&rel, &format!("{secret}\n"));
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(stage.join(rel), std::fs::Permissions::from_mode(0o600))
                .unwrap();
        }
        // The stalled-feed check: a short watchdog for the publisher the
        // driver will starve (its config has stale_after = 2s).
        put(
            "etc/systemd/system/nbpy-publisher@stall.service.d/watchdog.conf",
            "[Service]\nWatchdogSec=3s\n",
        );

        let mut bins = vec![
            ("nbpy", env!("CARGO_BIN_EXE_nbpy")),
            ("nbpy-publisher", env!("CARGO_BIN_EXE_nbpy-publisher")),
            ("nbpy-subscriber", env!("CARGO_BIN_EXE_nbpy-subscriber")),
        ];
        if let Some(health) = option_env!("CARGO_BIN_EXE_nbpy-health") {
            bins.push(("nbpy-health", health));
        }
        let bins: Vec<String> = bins.iter().map(|(n, p)| format!("{n}={p}")).collect();
        let driver = std::env::current_exe().unwrap();

        let log = std::fs::File::create(results.join("boot.log")).unwrap();
        let mut child = Command::new("unshare")
            .args([
                "--pid",
                "--fork",
                "--kill-child",
                "--mount",
                "--propagation",
                "private",
                "--net",
                "--",
                "/bin/sh",
                "-eu",
                "-c",
                SETUP,
            ])
            .env("HARNESS_BASE", &base)
            .env("HARNESS_RESULTS", &results)
            .env("HARNESS_STAGE", &stage)
            .env("HARNESS_BINS", bins.join(" "))
            .env("HARNESS_DRIVER", &driver)
            .env("HARNESS_DRIVER_AT", DRIVER)
            .env("HARNESS_MASK", MASK.join(" "))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();

        // The backstop: the driver has its own deadlines, this bounds the boot.
        let deadline = Duration::from_secs(600);
        let t0 = Instant::now();
        let timed_out = loop {
            if child.try_wait().unwrap().is_some() {
                break false;
            }
            if t0.elapsed() > deadline {
                // SIGKILL to unshare; --kill-child takes the namespace's PID 1
                // (and with it every process in the namespace) down too.
                let _ = child.kill();
                let _ = child.wait();
                break true;
            }
            std::thread::sleep(Duration::from_millis(100));
        };

        let read = |name: &str| std::fs::read_to_string(results.join(name)).unwrap_or_default();
        let tail = |text: String, n: usize| {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        };
        let status = read("inner.status");
        let diagnostics = || {
            format!(
                "--- boot.log\n{}\n--- console (tail)\n{}\n--- driver\n{}\n--- journal (tail)\n{}",
                read("boot.log"),
                tail(read("console.log"), 40),
                read("inner.log"),
                tail(read("journal.txt"), 150)
            )
        };
        if timed_out {
            panic!(
                "the namespace did not power off within {deadline:?}; killed it\n{}",
                diagnostics()
            );
        }
        assert_eq!(
            status.trim(),
            "success exited 0",
            "the driver inside the namespace failed\n{}",
            diagnostics()
        );
        println!("{}", read("inner.log"));
    }
}

mod inner {
    use super::*;
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use nbpy::config::InfluxConfig;
    use nbpy::sink::influx::InfluxClient;

    const GATE: &str = "nbpy-influxdb-ready.service";
    const SCHEMA: &str = "nbpy-schema.service";
    const SYNTH: &str = "nbpy-publisher@synth.service";
    const STALL: &str = "nbpy-publisher@stall.service";
    const PUBLISHERS: &str = "nbpy-publishers.target";
    const MAIN: &str = "nbpy-subscriber@main.service";
    const SUBSCRIBERS: &str = "nbpy-subscribers.target";
    const GRAFANA: &str = "nbpy-grafana.service";
    const VALIDATE: &str = "nbpy-validate.service";
    const TIMER: &str = "nbpy-validate.timer";
    const HEALTH: &str = "nbpy-health.service";
    const TARGET: &str = "nbpy.target";
    const INFLUXDB: &str = "influxdb.service";

    const ALL: &[&str] = &[
        INFLUXDB,
        GATE,
        SCHEMA,
        SYNTH,
        STALL,
        PUBLISHERS,
        MAIN,
        SUBSCRIBERS,
        GRAFANA,
        VALIDATE,
        TIMER,
        HEALTH,
        TARGET,
    ];

    const PROPS: &str =
        "Id,ActiveState,SubState,Result,MainPID,NRestarts,ExecMainCode,ExecMainStatus,\
        InactiveExitTimestampMonotonic,ActiveEnterTimestampMonotonic,\
        ActiveExitTimestampMonotonic,InactiveEnterTimestampMonotonic,\
        TimeoutStopUSec,WatchdogUSec";

    type Props = BTreeMap<String, String>;

    /// `systemctl show` for several units at once, keyed by unit.
    fn show(units: &[&str]) -> BTreeMap<String, Props> {
        let out = Command::new("systemctl")
            .args(["show", "-p", PROPS])
            .args(units)
            .output()
            .unwrap();
        assert!(out.status.success(), "systemctl show: {out:?}");
        let mut all = BTreeMap::new();
        for block in String::from_utf8_lossy(&out.stdout).split("\n\n") {
            let props: Props = block
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            if let Some(id) = props.get("Id") {
                all.insert(id.clone(), props);
            }
        }
        all
    }

    fn get<'a>(s: &'a BTreeMap<String, Props>, unit: &str, prop: &str) -> &'a str {
        s.get(unit)
            .and_then(|p| p.get(prop))
            .map(String::as_str)
            .unwrap_or("")
    }

    fn mono(s: &BTreeMap<String, Props>, unit: &str, prop: &str) -> u64 {
        get(s, unit, prop).parse().unwrap_or(0)
    }

    fn prop(unit: &str, p: &str) -> String {
        let out = Command::new("systemctl")
            .args(["show", "-p", p, "--value", unit])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The unit's journal, including what systemd itself said about it.
    fn journal(unit: &str) -> String {
        let out = Command::new("journalctl")
            .args(["-b", "--no-pager", "-o", "cat", "-u", unit])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `systemctl ARGS` to completion within `deadline`.
    fn systemctl_within(args: &[&str], deadline: Duration) -> std::process::ExitStatus {
        let mut child = Command::new("systemctl").args(args).spawn().unwrap();
        let t0 = Instant::now();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if t0.elapsed() > deadline {
                let _ = child.kill();
                panic!("systemctl {args:?} did not finish within {deadline:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls `f` until it returns Some or the deadline passes.
    fn poll<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
        let t0 = Instant::now();
        loop {
            if let Some(v) = f() {
                return v;
            }
            if t0.elapsed() > deadline {
                panic!("timed out after {deadline:?} waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Writes one replayable envelope every 50 ms into the FIFO the `stall`
    /// publisher reads, until paused. Holding the FIFO open read-write means
    /// the publisher never sees end-of-file: a pause is a stall, not an end.
    struct Feeder {
        paused: Arc<AtomicBool>,
    }

    impl Feeder {
        fn start() -> Feeder {
            std::fs::create_dir_all(Path::new(FIFO).parent().unwrap()).unwrap();
            nix::unistd::mkfifo(FIFO, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
            let mut fifo = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(FIFO)
                .unwrap();
            let paused = Arc::new(AtomicBool::new(false));
            let p = paused.clone();
            std::thread::spawn(move || {
                let mut last = 0i64;
                for i in 1u64.. {
                    while p.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    // Distinct exchange times, so every point is its own.
                    let ts = nbpy::wire::now_ns().max(last + 1);
                    last = ts;
                    let line = format!(
                        "{{\"v\":1,\"src\":\"replay\",\"ch\":\"ticker\",\"sym\":\"XBT/USD\",\"seq\":{i},\"epoch\":1,\"ts\":{ts},\"rx\":{ts},\"data\":{{\"bid\":100.0,\"ask\":100.5,\"last\":100.25}}}}\n"
                    );
                    if fifo.write_all(line.as_bytes()).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
            Feeder { paused }
        }
        fn pause(&self) {
            self.paused.store(true, Ordering::SeqCst);
        }
        fn resume(&self) {
            self.paused.store(false, Ordering::SeqCst);
        }
    }

    struct Influx {
        rt: tokio::runtime::Runtime,
        client: InfluxClient,
    }

    impl Influx {
        fn new() -> Influx {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let client = InfluxClient::new(&Self::login("admin", ADMIN_CREDENTIAL)).unwrap();
            Influx { rt, client }
        }

        fn login(user: &str, credential: &str) -> InfluxConfig {
            InfluxConfig {
                url: "http://127.0.0.1:8086".into(),
                username: Some(user.into()),
                password_file: Some(Path::new("/etc/credstore").join(credential)),
                ..Default::default()
            }
        }

        /// HTTP status of a query as `user` (None: anonymous).
        fn status_as(&self, user: Option<(&str, &str)>, q: &str) -> u16 {
            self.rt.block_on(async {
                let mut req = reqwest::Client::new()
                    .post("http://127.0.0.1:8086/query")
                    .form(&[("q", q), ("db", "tick")]);
                if let Some((u, pw)) = user {
                    req = req.basic_auth(u, Some(pw));
                }
                req.send().await.map(|r| r.status().as_u16()).unwrap_or(0)
            })
        }

        fn number(&self, q: &str) -> u64 {
            self.rt.block_on(self.client.query_number(q)).unwrap_or(0.0) as u64
        }

        /// Data points one publisher's messages became, over every measurement.
        fn stored(&self, publisher: &str) -> u64 {
            nbpy::schema::MEASUREMENTS
                .iter()
                .filter(|m| m.name != "nbpy_pipeline")
                .map(|m| {
                    self.number(&format!(
                        "SELECT count(\"seq\") FROM \"tick\".\"{}\".\"{}\" WHERE \"publisher\" = '{publisher}'",
                        m.rp, m.name
                    ))
                })
                .sum()
        }

        fn epochs(&self, publisher: &str) -> u64 {
            self.number(&format!(
                "SELECT count(distinct(\"epoch\")) FROM \"tick\".\"default\".\"kraken_tick\" WHERE \"publisher\" = '{publisher}'"
            ))
        }
    }

    /// Units whose command is not in this build yet, and why.
    fn pending() -> BTreeMap<&'static str, String> {
        let has_subcommand = |sub: &str| {
            Command::new("/usr/bin/nbpy")
                .args([sub, "--help"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        let mut p = BTreeMap::new();
        if !has_subcommand("grafana") {
            p.insert(GRAFANA, "`nbpy grafana` is not in this build".to_string());
        }
        if !has_subcommand("validate") {
            p.insert(VALIDATE, "`nbpy validate` is not in this build".to_string());
        }
        if !Path::new("/usr/bin/nbpy-health").exists() {
            p.insert(
                HEALTH,
                "the nbpy-health binary is not in this build".to_string(),
            );
        }
        p
    }

    fn ms(us: u64, origin: u64) -> String {
        if us == 0 {
            "-".into()
        } else {
            format!("{:.0}", (us as f64 - origin as f64) / 1000.0)
        }
    }

    pub fn drive() {
        let feeder = Feeder::start();
        let influx = Influx::new();
        let pending = pending();

        // ---- start ---------------------------------------------------------
        let status = systemctl_within(&["start", TARGET], Duration::from_secs(240));
        assert!(status.success(), "systemctl start {TARGET}: {status}");
        let s = show(ALL);

        let mut problems = Vec::new();
        for u in ALL {
            let active = get(&s, u, "ActiveState");
            match pending.get(u) {
                None if active != "active" => problems.push(format!(
                    "{u} is {active}/{} (result {})\n{}",
                    get(&s, u, "SubState"),
                    get(&s, u, "Result"),
                    journal(u)
                )),
                Some(why) => {
                    // Not active, and failing with a message a human can act on.
                    let j = journal(u);
                    let clear = j.contains("unrecognized subcommand") || j.contains("203/EXEC");
                    if active == "active" || !clear {
                        problems.push(format!(
                            "{u} (pending: {why}) should fail clearly, is {active}:\n{j}"
                        ));
                    }
                }
                None => {}
            }
        }
        assert!(problems.is_empty(), "after start:\n{}", problems.join("\n"));

        // ---- phase order ---------------------------------------------------
        // began = left "inactive" (the start job ran); up = entered "active"
        // (READY=1 for notify services, exit 0 for oneshots). A pending unit
        // that failed counts as done when it went inactive again.
        let began = |u: &str| mono(&s, u, "InactiveExitTimestampMonotonic");
        let up = |u: &str| match mono(&s, u, "ActiveEnterTimestampMonotonic") {
            0 => mono(&s, u, "InactiveEnterTimestampMonotonic"),
            t => t,
        };
        let phases: &[(&str, &[&str])] = &[
            ("0 distro unit", &[INFLUXDB]),
            ("1 backends", &[GATE]),
            ("2 schema", &[SCHEMA]),
            ("3a publishers", &[SYNTH, STALL, PUBLISHERS]),
            ("3b subscribers", &[MAIN, SUBSCRIBERS]),
            ("4 dashboards", &[GRAFANA]),
            ("5 validation", &[VALIDATE, TIMER]),
        ];
        let origin = began(INFLUXDB);
        println!("start (ms from influxdb.service starting; systemd's monotonic timestamps):");
        println!(
            "  {:<16} {:<32} {:>8} {:>8}  state",
            "phase", "unit", "began", "active"
        );
        for (name, units) in phases
            .iter()
            .chain([("  health", &[HEALTH][..]), ("  all", &[TARGET][..])].iter())
        {
            for u in *units {
                println!(
                    "  {:<16} {:<32} {:>8} {:>8}  {}/{}{}",
                    name,
                    u,
                    ms(began(u), origin),
                    ms(mono(&s, u, "ActiveEnterTimestampMonotonic"), origin),
                    get(&s, u, "ActiveState"),
                    get(&s, u, "SubState"),
                    pending
                        .get(u)
                        .map(|w| format!("  (pending: {w})"))
                        .unwrap_or_default()
                );
            }
        }
        let mut order = Vec::new();
        for pair in phases.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            let a_up = a.1.iter().map(|u| up(u)).max().unwrap();
            for u in b.1 {
                if began(u) < a_up {
                    order.push(format!(
                        "{u} began at {} before phase {} was up at {a_up}",
                        began(u),
                        a.0
                    ));
                }
                let ok_pending = pending.contains_key(u);
                if !ok_pending && up(u) < a_up {
                    order.push(format!("{u} became active before phase {}", a.0));
                }
            }
        }
        if began(HEALTH) < up(SCHEMA) {
            order.push("nbpy-health started before phase 2 was done".into());
        }
        for u in ALL.iter().filter(|u| **u != TARGET) {
            if up(u) > mono(&s, TARGET, "ActiveEnterTimestampMonotonic") && !pending.contains_key(u)
            {
                order.push(format!("{TARGET} became active before {u}"));
            }
        }
        assert!(
            order.is_empty(),
            "phase order violated:\n{}",
            order.join("\n")
        );
        // The gate waited for answers, not for "started".
        let gate = journal(GATE);
        let answered = gate
            .lines()
            .find(|l| l.contains("answers /ping"))
            .unwrap_or_else(|| panic!("the readiness gate never saw InfluxDB answer:\n{gate}"));
        println!("phase 1 gate: {answered}");

        // ---- credentials ---------------------------------------------------
        // Auth is really on, so every unit that reached InfluxDB above
        // logged in with its loaded credential; and phase 2 created the
        // writer with the password only the drop-in loads.
        let q = "SHOW MEASUREMENTS";
        let anonymous = influx.status_as(None, q);
        assert_eq!(anonymous, 401, "InfluxDB should refuse anonymous queries");
        // 403, not 401: the password is right and the user may not read,
        // as declared (`privilege = "write"`).
        let writer = influx.status_as(Some(("writer", WRITER_PASSWORD)), q);
        let wrong = influx.status_as(Some(("writer", "not-its-password")), q);
        assert_eq!(
            (writer, wrong),
            (403, 401),
            "the writer user should log in with {WRITER_CREDENTIAL} (and only with it) and not read"
        );
        let dropin = std::fs::read_to_string(format!(
            "/etc/systemd/system/{SCHEMA}.d/{}",
            nbpy::units::CREDENTIALS_DROPIN
        ))
        .unwrap_or_default();
        assert!(
            dropin.contains(&format!("LoadCredential={WRITER_CREDENTIAL}")),
            "{SCHEMA}'s credential drop-in: {dropin:?}"
        );
        println!(
            "credentials: anonymous query {anonymous}; writer (password from {WRITER_CREDENTIAL}, loaded by {SCHEMA}'s drop-in) {writer}, wrong password {wrong}"
        );

        // ---- points arrive -------------------------------------------------
        let (synth, stall) = poll(
            "points from both publishers in InfluxDB",
            Duration::from_secs(60),
            || {
                let (a, b) = (influx.stored("synth"), influx.stored("stall"));
                (a > 0 && b > 0).then_some((a, b))
            },
        );
        println!("points arrive: synth {synth}, stall {stall} stored so far");

        // ---- kill -9 of a publisher: systemd restarts it ------------------
        let pid: i32 = prop(SYNTH, "MainPID").parse().unwrap();
        let restarts: u32 = prop(SYNTH, "NRestarts").parse().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let new_pid = poll(
            "systemd to restart the killed publisher",
            Duration::from_secs(60),
            || {
                let s = show(&[SYNTH]);
                let n: u32 = get(&s, SYNTH, "NRestarts").parse().unwrap_or(0);
                let p: i32 = get(&s, SYNTH, "MainPID").parse().unwrap_or(0);
                (n > restarts && get(&s, SYNTH, "SubState") == "running" && p != 0 && p != pid)
                    .then_some(p)
            },
        );
        let j = journal(SYNTH);
        assert!(
            j.contains("code=killed, status=9/KILL"),
            "journal of {SYNTH}:\n{j}"
        );
        // ...and the restarted publisher (a new epoch) reaches InfluxDB again.
        poll(
            "points from the restarted publisher",
            Duration::from_secs(60),
            || (influx.epochs("synth") >= 2).then_some(()),
        );
        println!("kill -9: {SYNTH} pid {pid} killed; restarted by systemd as pid {new_pid}; its new epoch is stored");

        // ---- a stalled feed: the watchdog restarts it ----------------------
        let watchdog_kills = |j: &str| j.matches("Failed with result 'watchdog'").count();
        assert_eq!(
            watchdog_kills(&journal(STALL)),
            0,
            "the watchdog fired while data was flowing:\n{}",
            journal(STALL)
        );
        let restarts: u32 = prop(STALL, "NRestarts").parse().unwrap();
        let watchdog = prop(STALL, "WatchdogUSec");
        let t_pause = Instant::now();
        feeder.pause();
        poll(
            "the watchdog to stop the stalled publisher",
            Duration::from_secs(60),
            || (watchdog_kills(&journal(STALL)) >= 1).then_some(()),
        );
        let stalled_for = t_pause.elapsed();
        feeder.resume();
        let j = journal(STALL);
        assert!(j.contains("Watchdog timeout"), "journal of {STALL}:\n{j}");
        assert!(
            j.contains("withholding pings: no data for"),
            "the publisher should say why it stopped feeding the watchdog:\n{j}"
        );
        poll(
            "systemd to restart the stalled publisher",
            Duration::from_secs(60),
            || {
                let s = show(&[STALL]);
                let n: u32 = get(&s, STALL, "NRestarts").parse().unwrap_or(0);
                (n > restarts && get(&s, STALL, "SubState") == "running").then_some(())
            },
        );
        let before = influx.stored("stall");
        poll(
            "the restarted replay publisher to deliver again",
            Duration::from_secs(60),
            || (influx.stored("stall") > before).then_some(()),
        );
        println!(
            "stalled feed: {STALL} (WatchdogSec={watchdog}, stale_after=2s) stopped by systemd with result 'watchdog' {:.1}s after its feed stalled, restarted, delivering again",
            stalled_for.as_secs_f64()
        );

        // ---- stop: subscribers first, inside the timeouts, nothing lost ----
        let pin = systemctl_within(&["start", "harness-pin.service"], Duration::from_secs(30));
        assert!(pin.success(), "starting the harness pin: {pin}");
        let status = systemctl_within(&["stop", TARGET], Duration::from_secs(240));
        assert!(status.success(), "systemctl stop {TARGET}: {status}");
        // `systemctl stop nbpy.target` returns when the target itself is
        // down, which (stop order being reversed) is first; the PartOf stops
        // it queued are still running. Wait for them, bounded.
        let nbpy: Vec<&str> = ALL.iter().copied().filter(|u| *u != INFLUXDB).collect();
        let s = poll(
            "every nbpy unit to be down",
            Duration::from_secs(120),
            || {
                let s = show(ALL);
                nbpy.iter()
                    .all(|u| matches!(get(&s, u, "ActiveState"), "inactive" | "failed"))
                    .then_some(s)
            },
        );
        let mut problems = Vec::new();
        println!("stop (ms from the subscriber being told to stop):");
        let origin = mono(&s, MAIN, "ActiveExitTimestampMonotonic");
        println!(
            "  {:<32} {:>8} {:>8} {:>8} {:>10}  result",
            "unit", "stopping", "inactive", "took", "timeout"
        );
        for u in [MAIN, SYNTH, STALL, HEALTH] {
            let exit = mono(&s, u, "ActiveExitTimestampMonotonic");
            let gone = mono(&s, u, "InactiveEnterTimestampMonotonic");
            let timeout =
                humantime::parse_duration(get(&s, u, "TimeoutStopUSec")).unwrap_or(Duration::ZERO);
            let took = Duration::from_micros(gone.saturating_sub(exit));
            if let Some(why) = pending.get(u) {
                println!("  {u:<32} (pending: {why})");
                continue;
            }
            println!(
                "  {:<32} {:>8} {:>8} {:>8} {:>10}  {}/{} exit {}",
                u,
                ms(exit, origin),
                ms(gone, origin),
                format!("{:.0}", took.as_secs_f64() * 1000.0),
                get(&s, u, "TimeoutStopUSec"),
                get(&s, u, "ActiveState"),
                get(&s, u, "Result"),
                get(&s, u, "ExecMainStatus")
            );
            if get(&s, u, "ActiveState") != "inactive"
                || get(&s, u, "Result") != "success"
                || get(&s, u, "ExecMainCode") != "1"
                || get(&s, u, "ExecMainStatus") != "0"
            {
                problems.push(format!(
                    "{u} did not stop cleanly: {}/{} code {} status {}\n{}",
                    get(&s, u, "ActiveState"),
                    get(&s, u, "Result"),
                    get(&s, u, "ExecMainCode"),
                    get(&s, u, "ExecMainStatus"),
                    journal(u)
                ));
            }
            if timeout.is_zero() || took >= timeout {
                problems.push(format!(
                    "{u} took {took:?} to stop; TimeoutStopSec is {timeout:?}"
                ));
            }
        }
        for u in ALL.iter().filter(|u| **u != INFLUXDB) {
            if get(&s, u, "ActiveState") == "active" {
                problems.push(format!("{u} is still active after stopping {TARGET}"));
            }
        }
        // Subscribers were inactive before any publisher was even told to stop.
        for p in [SYNTH, STALL] {
            let sub_gone = mono(&s, MAIN, "InactiveEnterTimestampMonotonic");
            if sub_gone == 0 || sub_gone > mono(&s, p, "ActiveExitTimestampMonotonic") {
                problems.push(format!(
                    "{MAIN} went inactive at {sub_gone}, after {p} began stopping at {}",
                    mono(&s, p, "ActiveExitTimestampMonotonic")
                ));
            }
        }
        if get(&s, INFLUXDB, "ActiveState") != "active" {
            problems.push(
                "influxdb.service was stopped with nbpy.target (it is shared, only wanted)".into(),
            );
        }
        assert!(problems.is_empty(), "after stop:\n{}", problems.join("\n"));

        // Every message the subscriber accepted is stored: its own final
        // accounting (logged when it exits) against what InfluxDB holds.
        let line = common::stop_summary(&journal(MAIN), "main");
        let number_before = |word: &str| common::number_before(&line, word);
        let accepted = number_before(" accepted");
        // Both publishers wait for their subscriber, so even across the
        // kill -9 and the watchdog restart (new epochs) no sequence number
        // went missing in between.
        assert_eq!(number_before(" gaps"), 0, "gaps in {line:?}");
        let (synth, stall) = (influx.stored("synth"), influx.stored("stall"));
        println!("subscriber: {line}");
        println!("stored: synth {synth} + stall {stall} = {}", synth + stall);
        assert_eq!(
            synth + stall,
            accepted,
            "every message the subscriber accepted must be stored"
        );
        assert!(accepted > 0);
        for (u, why) in &pending {
            println!("PENDING: {u}: {why} (it fails clearly; ordering checked)");
        }
        println!("ok");
    }
}
