//! `nbpy up` end to end: a real influxd found on PATH, the five phases,
//! `nbpy status`, and an ordered stop with nothing lost; and the file-sink
//! fallback when no InfluxDB can be had.

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn up_cmd(cfg: &std::path::Path, path_env: Option<&str>) -> Command {
    let mut c = Command::new(bin_path("nbpy"));
    c.args(["--config", cfg.to_str().unwrap(), "up"])
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    if let Some(p) = path_env {
        c.env("PATH", p);
    }
    c
}

fn wait_file_contains(path: &std::path::Path, needle: &str, deadline: Duration) -> String {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            t0.elapsed() < deadline,
            "{} never said {needle:?}:\n{text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn up_runs_five_phases_reports_status_and_stops_in_order_without_loss() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let port = nbpy::backend::free_port().unwrap();
    let ep_port = nbpy::backend::free_port().unwrap();
    let cfg = dir.path().join("nbpy.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\n[influxdb]\nurl = \"http://127.0.0.1:{port}\"\n\
             [health]\nlisten = \"127.0.0.1:{}\"\n\
             [publishers.synth]\nendpoint = \"tcp://127.0.0.1:{ep_port}\"\nrate = 5000\n",
            state.display().to_string(),
            nbpy::backend::free_port().unwrap()
        ),
    )
    .unwrap();
    let out = dir.path().join("up.out");
    // Its own process group, as a shell gives a foreground job, so the stop
    // below can be a terminal's Ctrl-C: SIGINT to every process in the group.
    let mut up = StopOnDrop(
        up_cmd(&cfg, None)
            .process_group(0)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(dir.path().join("up.err")).unwrap())
            .spawn()
            .unwrap(),
    );
    let text = wait_file_contains(&out, "nbpy is up", Duration::from_secs(60));
    let phases: Vec<usize> = (1..=5)
        .map(|i| {
            text.find(&format!("phase {i}/5"))
                .expect("every phase reported")
        })
        .collect();
    assert!(
        phases.windows(2).all(|w| w[0] < w[1]),
        "phases in order:\n{text}"
    );
    assert!(
        text.contains("started by nbpy up"),
        "influxd from PATH:\n{text}"
    );
    assert!(text.contains("no loss"), "{text}");

    // `nbpy status` turns ready once the subscriber's first counters are stored.
    let t0 = Instant::now();
    let (status, st) = loop {
        let status = Command::new(bin_path("nbpy"))
            .args(["--config", cfg.to_str().unwrap(), "status"])
            .output()
            .unwrap();
        let st = String::from_utf8_lossy(&status.stdout).into_owned();
        if status.status.success() || t0.elapsed() > Duration::from_secs(30) {
            break (status, st);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        status.status.success(),
        "{st}\n{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(st.contains("supervisor: nbpy up"), "{st}");
    assert!(
        st.contains("publisher   synth") && st.contains("subscriber  main"),
        "{st}"
    );
    assert!(st.contains("running"), "{st}");

    // `nbpy doctor` alongside: the publisher's port is up's own, no problem.
    let doc = Command::new(bin_path("nbpy"))
        .args(["--config", cfg.to_str().unwrap(), "doctor"])
        .output()
        .unwrap();
    let d = String::from_utf8_lossy(&doc.stdout);
    assert!(
        d.contains(&format!(
            "publishers.synth: tcp://127.0.0.1:{ep_port} is bound by the running nbpy up"
        )),
        "{d}"
    );
    assert!(
        doc.status.success(),
        "{d}\n{}",
        String::from_utf8_lossy(&doc.stderr)
    );

    // Ctrl-C. The children must hear it from `nbpy up` only, in order: a
    // subscriber that also got the terminal's SIGINT would take `nbpy up`'s
    // SIGTERM as a second signal and abandon what it holds.
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(up.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let t0 = Instant::now();
    let code = loop {
        if let Some(s) = up.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "nbpy up did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&out).unwrap();
    let logs: String = ["main", "synth", "influxd"]
        .iter()
        .map(|n| {
            std::fs::read_to_string(state.join("logs").join(format!("{n}.log"))).unwrap_or_default()
        })
        .collect();
    assert!(code.success(), "{code}\n{text}\n{logs}");
    assert!(!logs.contains("abandoning"), "{logs}");
    let subs = text
        .find("stopped subscribers")
        .expect("subscribers stopped");
    let pubs = text.find("stopped publishers").expect("publishers stopped");
    assert!(subs < pubs, "subscribers drain first:\n{text}");

    // Reopen the data: everything the subscriber accepted is stored.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut influx = nbpy::backend::LocalInfluxd::spawn(None, &state.join("influxdb"), 0, None).unwrap();
        influx.wait_ready(Duration::from_secs(30)).unwrap();
        let client = nbpy::sink::influx::InfluxClient::new(&nbpy::config::InfluxConfig {
            url: influx.url(),
            ..Default::default()
        })
        .unwrap();
        let q = "SELECT last(\"received\"), last(\"malformed\") FROM \"tick\".\"default\".\"nbpy_pipeline\" WHERE component = 'main'";
        let v = client.query(q).await.unwrap();
        let row = &v["results"][0]["series"][0]["values"][0];
        let accepted = row[1].as_u64().unwrap() - row[2].as_u64().unwrap();
        let mut stored = 0;
        for m in nbpy::schema::MEASUREMENTS.iter().filter(|m| m.name != "nbpy_pipeline") {
            stored += client
                .query_number(&format!("SELECT count(\"seq\") FROM \"tick\".\"{}\".\"{}\"", m.rp, m.name))
                .await
                .unwrap() as u64;
        }
        assert!(accepted > 0);
        assert_eq!(stored, accepted, "accepted vs stored after nbpy up's stop");
    });
}

#[test]
fn without_influxdb_up_falls_back_to_the_file_sink_and_says_how_to_get_influxdb() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let dead = nbpy::backend::free_port().unwrap();
    let ep_port = nbpy::backend::free_port().unwrap();
    let cfg = dir.path().join("nbpy.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\n[influxdb]\nurl = \"http://bob:s3cretpw@127.0.0.1:{dead}\"\n\
             [publishers.synth]\nendpoint = \"tcp://127.0.0.1:{ep_port}\"\nrate = 2000\n",
            state.display().to_string()
        ),
    )
    .unwrap();
    let out = dir.path().join("up.out");
    // No influxd on PATH (the nbpy binaries are found beside `nbpy`).
    let mut up = StopOnDrop(
        up_cmd(&cfg, Some("/nonexistent"))
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(dir.path().join("up.err")).unwrap())
            .spawn()
            .unwrap(),
    );
    let text = wait_file_contains(&out, "nbpy is up", Duration::from_secs(60));
    assert!(
        text.contains("apt-get install influxdb"),
        "says how to get InfluxDB:\n{text}"
    );
    assert!(text.contains("file sink"), "{text}");
    // The URL's password is never shown, and the effective configuration
    // the children read is its owner's alone.
    assert!(
        text.contains("http://bob:***@127.0.0.1") && !text.contains("s3cretpw"),
        "{text}"
    );
    let mode = std::fs::metadata(state.join("run/nbpy.toml"))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600,
        "run/nbpy.toml"
    );
    let points = state.join("points.lp");
    // The terminal closing (SIGHUP) stops it in order, like Ctrl-C.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(up.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let status = up.wait().unwrap();
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(&out).unwrap()
    );
    let lines = std::fs::read_to_string(&points).unwrap();
    let data = lines
        .lines()
        .filter(|l| !l.starts_with("nbpy_pipeline"))
        .count();
    assert!(data > 0, "points written to the file sink");
    // Every line is valid line protocol.
    for l in lines.lines() {
        influxdb_line_protocol::parse_lines(l)
            .next()
            .unwrap()
            .unwrap();
    }
    // The subscriber's own count of what it accepted matches the file.
    let log = std::fs::read_to_string(state.join("logs/main.log")).unwrap();
    let accepted: usize = log
        .lines()
        .find_map(|l| {
            l.split(": ").find_map(|p| {
                p.strip_suffix(" accepted")
                    .and_then(|n| n.rsplit(' ').next()?.parse().ok())
            })
        })
        .or_else(|| {
            log.lines().find_map(|l| {
                let i = l.find(" accepted,")?;
                l[..i].rsplit(' ').next()?.parse().ok()
            })
        })
        .expect("the subscriber logs what it accepted on stop");
    assert_eq!(data, accepted, "accepted vs in the file");
}

/// Beside an appliance run by systemd or by hand (not `nbpy up`), the
/// publisher's own port is held by the publisher: no problem to report.
#[test]
fn doctor_beside_a_running_publisher_does_not_report_its_port() {
    let dir = tempfile::tempdir().unwrap();
    let port = nbpy::backend::free_port().unwrap();
    let closed = nbpy::backend::free_port().unwrap();
    let cfg = dir.path().join("nbpy.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\n[influxdb]\nurl = \"http://127.0.0.1:{closed}\"\n\
             [publishers.synth]\nendpoint = \"tcp://127.0.0.1:{port}\"\nwait_for_subscribers = 1\n",
            dir.path().join("state").display().to_string()
        ),
    )
    .unwrap();
    let mut publisher = Command::new(bin_path("nbpy-publisher"))
        .args(["--config", cfg.to_str().unwrap(), "synth"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "publisher not bound"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = Command::new(bin_path("nbpy"))
        .args(["--config", cfg.to_str().unwrap(), "doctor"])
        .output()
        .unwrap();
    let _ = publisher.kill();
    let _ = publisher.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "publishers.synth: tcp://127.0.0.1:{port} is served by a running publisher (it answers ZeroMQ as XPUB)"
        )),
        "{text}"
    );
    assert!(!text.contains("cannot bind"), "{text}");

    // A user without a password file is worth a word.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[influxdb]\n", "[influxdb]\nusername = \"nbpy\"\n");
    std::fs::write(&cfg, text).unwrap();
    let out = Command::new(bin_path("nbpy"))
        .args(["--config", cfg.to_str().unwrap(), "doctor"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("influxdb.username = \"nbpy\" without influxdb.password_file"),
        "{text}"
    );
}

/// `tcp://*:P`, ZeroMQ's every-address bind, is a valid endpoint: doctor
/// finds the port free, then served by the publisher bound there, not a
/// host it cannot resolve.
#[test]
fn doctor_takes_a_star_endpoint_as_every_address() {
    let dir = tempfile::tempdir().unwrap();
    let port = nbpy::backend::free_port().unwrap();
    let closed = nbpy::backend::free_port().unwrap();
    let cfg = dir.path().join("nbpy.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\n[influxdb]\nurl = \"http://127.0.0.1:{closed}\"\n\
             [publishers.star]\nendpoint = \"tcp://*:{port}\"\nwait_for_subscribers = 1\n",
            dir.path().join("state").display().to_string()
        ),
    )
    .unwrap();
    let doctor = || {
        let out = Command::new(bin_path("nbpy"))
            .args(["--config", cfg.to_str().unwrap(), "doctor"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let text = doctor();
    assert!(
        text.contains(&format!("publishers.star: tcp://*:{port} is free")),
        "{text}"
    );
    let mut publisher = Command::new(bin_path("nbpy-publisher"))
        .args(["--config", cfg.to_str().unwrap(), "star"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "publisher not bound"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = doctor();
    let _ = publisher.kill();
    let _ = publisher.wait();
    assert!(
        text.contains(&format!(
            "publishers.star: tcp://*:{port} is served by a running publisher (it answers ZeroMQ as XPUB)"
        )),
        "{text}"
    );
    assert!(!text.contains("cannot bind"), "{text}");
}

#[test]
fn doctor_names_each_problem_with_its_fix() {
    let dir = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    let closed = nbpy::backend::free_port().unwrap();
    let cfg = dir.path().join("nbpy.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\n[influxdb]\nurl = \"http://127.0.0.1:{closed}\"\nusername = \"nbpy\"\npassword_file = \"/nonexistent/influx-pw\"\n\
             [publishers.k]\nfeed = \"kraken-tick\"\nendpoint = \"tcp://127.0.0.1:{busy_port}\"\nurl = \"ws://127.0.0.1:{closed}\"\n",
            dir.path().join("state").display().to_string()
        ),
    )
    .unwrap();
    let doctor = || {
        Command::new(bin_path("nbpy"))
            .args(["--config", cfg.to_str().unwrap(), "doctor"])
            .env("PATH", "/nonexistent")
            .output()
            .unwrap()
    };
    let out = doctor();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(69), "{text}");
    for needle in [
        &format!("cannot bind tcp://127.0.0.1:{busy_port}"),
        "influxdb.password_file",
        "no influxd on PATH",
        &format!("127.0.0.1:{closed} unreachable"),
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    assert!(text.matches("fix:").count() >= 4, "{text}");

    // A secret every user can read is named, with the chmod that fixes it.
    let pw = dir.path().join("influx-pw");
    std::fs::write(&pw, "s3cret\n").unwrap();
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("/nonexistent/influx-pw", pw.to_str().unwrap());
    std::fs::write(&cfg, text).unwrap();
    let out = doctor();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "{} is readable by every user (mode 0644)",
            pw.display()
        )) && text.contains(&format!("chmod 0600 {}", pw.display())),
        "{text}"
    );
    drop(busy);
}

/// A URL where something answers HTTP but is not the service it names (a
/// web server's page on every path) is a problem with its fix, not "answers".
#[test]
fn doctor_tells_a_web_server_from_influxdb_and_grafana() {
    let dir = tempfile::tempdir().unwrap();
    let nginx = FixedHttp::nginx();
    let cfg = dir.path().join("nbpy.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\n[influxdb]\nurl = \"{url}\"\n[grafana]\nurl = \"{url}\"\n",
            dir.path().join("state").display().to_string(),
            url = nginx.url
        ),
    )
    .unwrap();
    let out = Command::new(bin_path("nbpy"))
        .args(["--config", cfg.to_str().unwrap(), "doctor"])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(69), "{text}");
    let finding = |needle: &str| {
        let lines: Vec<&str> = text.lines().collect();
        let i = lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no finding with {needle:?} in:\n{text}"));
        (lines[i], lines.get(i + 1).copied().unwrap_or(""))
    };
    let (influx, fix) = finding("is not InfluxDB");
    assert!(
        influx.starts_with("PROBLEM")
            && influx.contains("no X-Influxdb-Version header on /ping")
            && fix.contains("fix:")
            && fix.contains("influxdb.url"),
        "{text}"
    );
    let (grafana, _) = finding("/api/health");
    assert!(
        grafana.starts_with("PROBLEM") && grafana.contains("does not point at Grafana"),
        "{text}"
    );
    assert!(
        !text.contains("InfluxDB answers") && !text.contains("Grafana answers"),
        "{text}"
    );
}

/// `nbpy config show | head -1`: once the reader has gone, the rest of the
/// output is dropped, without the panic and backtrace `print!` makes of a
/// closed pipe, and the command keeps its own exit code.
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let (read, write) = nix::unistd::pipe().unwrap();
    // The reader is gone before the command writes a byte.
    drop(read);
    let out = Command::new(bin_path("nbpy"))
        .args(["config", "show"])
        .env_remove("NBPY_CONFIG")
        .stdout(Stdio::from(write))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
}

/// `nbpy logs NAME -f | head -1` on a quiet log: the follower notices
/// that its reader went away without waiting for a line to write.
#[test]
fn following_a_quiet_log_ends_when_its_reader_goes() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(state.join("logs")).unwrap();
    std::fs::write(state.join("logs/synth.log"), "one line\n").unwrap();
    let cfg = dir.path().join("nbpy.toml");
    std::fs::write(
        &cfg,
        format!("state_dir = {:?}\n", state.display().to_string()),
    )
    .unwrap();
    let mut follow = StopOnDrop(
        Command::new(bin_path("nbpy"))
            .args(["--config", cfg.to_str().unwrap(), "logs", "synth", "-f"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut first = String::new();
    std::io::BufReader::new(follow.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first, "one line\n");
    // The reader is dropped here, as `head -1` exits.
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = follow.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "nbpy logs -f still running 10 s after its reader went"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}

/// A publisher that is ready and then fails during the start (here OANDA
/// refuses its token: exit 77) ends `nbpy up` at once, with its reason and
/// its exit code. It used to go unnoticed: `up` waited 60 s for the
/// subscriber (which cannot get ready without its publisher), then blamed
/// the subscriber with exit 69.
#[test]
fn a_publisher_failing_during_the_start_ends_up_with_its_own_reason() {
    // OANDA, as far as refusing a token goes: 401 to every request.
    let venue = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let venue_port = venue.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in venue.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut buf = [0u8; 4096];
            let _ = std::io::Read::read(&mut conn, &mut buf);
            let body = r#"{"errorMessage":"Insufficient authorization to perform request."}"#;
            let _ = std::io::Write::write_all(
                &mut conn,
                format!(
                    "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let token = dir.path().join("oanda-token");
    std::fs::write(&token, "not-a-valid-token\n").unwrap();
    let ep_port = nbpy::backend::free_port().unwrap();
    let cfg = dir.path().join("nbpy.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {state:?}\n[influxdb]\nurl = \"file://{}/points.lp\"\n\
             [health]\nlisten = \"127.0.0.1:{}\"\n\
             [publishers.fx]\nfeed = \"oanda-tick\"\nendpoint = \"tcp://127.0.0.1:{ep_port}\"\n\
             url = \"http://127.0.0.1:{venue_port}\"\ninstruments = [\"EUR_USD\"]\n\
             [publishers.fx.oanda]\naccount = \"101-004-1234567-001\"\ntoken_file = {token:?}\n\
             [subscribers.main]\nconnect = [\"tcp://127.0.0.1:{ep_port}\"]\n",
            state.display(),
            nbpy::backend::free_port().unwrap()
        ),
    )
    .unwrap();
    let out = dir.path().join("up.out");
    let err = dir.path().join("up.err");
    let t0 = Instant::now();
    let mut up = StopOnDrop(
        up_cmd(&cfg, None)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap(),
    );
    let status = loop {
        if let Some(s) = up.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "nbpy up still running after {:?}",
            t0.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = t0.elapsed();
    let text = format!(
        "{}{}",
        std::fs::read_to_string(&out).unwrap_or_default(),
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    assert_eq!(status.code(), Some(77), "{text}");
    assert!(text.contains("publisher fx exited"), "{text}");
    assert!(
        text.contains("token"),
        "the publisher's own reason:\n{text}"
    );
    // Far below the 60 s the subscriber's wait allows: it did not wait.
    assert!(took < Duration::from_secs(45), "took {took:?}:\n{text}");
}

/// A running `nbpy up` on a config of its own: (config path, state dir,
/// the process, its output file). Waits until it says it is up.
fn started_up(
    dir: &std::path::Path,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    StopOnDrop,
    std::path::PathBuf,
) {
    let state = dir.join("state");
    let cfg = dir.join("nbpy.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\n[influxdb]\nurl = \"http://127.0.0.1:{}\"\n\
             [health]\nlisten = \"127.0.0.1:{}\"\n\
             [publishers.synth]\nendpoint = \"tcp://127.0.0.1:{}\"\nrate = 2000\n",
            state.display().to_string(),
            nbpy::backend::free_port().unwrap(),
            nbpy::backend::free_port().unwrap(),
            nbpy::backend::free_port().unwrap()
        ),
    )
    .unwrap();
    let out = dir.join("up.out");
    let up = StopOnDrop(
        up_cmd(&cfg, None)
            .process_group(0)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(dir.join("up.err")).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_file_contains(&out, "nbpy is up", Duration::from_secs(60));
    (cfg, state, up, out)
}

/// A stop asked for while phase 5 listens is a stop, not a failed
/// validation: `nbpy up` exits 0, and does not announce itself up after it.
#[test]
fn a_stop_during_the_validation_is_no_failure() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cfg = dir.path().join("nbpy.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\n[influxdb]\nurl = \"http://127.0.0.1:{}\"\n\
             [health]\nlisten = \"127.0.0.1:{}\"\n\
             [publishers.synth]\nendpoint = \"tcp://127.0.0.1:{}\"\nrate = 2000\n",
            state.display().to_string(),
            nbpy::backend::free_port().unwrap(),
            nbpy::backend::free_port().unwrap(),
            nbpy::backend::free_port().unwrap()
        ),
    )
    .unwrap();
    let out = dir.path().join("up.out");
    let mut up = StopOnDrop(
        up_cmd(&cfg, None)
            .args(["--validate-within", "30s"])
            .process_group(0)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(dir.path().join("up.err")).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_file_contains(&out, "phase 4/5", Duration::from_secs(60));
    let down = nbpy_down(&cfg).wait_with_output().unwrap();
    let status = up.wait().unwrap();
    let text = std::fs::read_to_string(&out).unwrap();
    let err = std::fs::read_to_string(dir.path().join("up.err")).unwrap();
    assert!(status.success(), "{status}\n{text}\n{err}");
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert!(
        text.contains("phase 5/5 validation stopped before done"),
        "{text}"
    );
    assert!(
        !text.contains("FAILED") && !text.contains("nbpy is up"),
        "{text}"
    );
}

/// The processes `nbpy up` started: its children by `run/status.json`, and
/// the private influxd by its config file under the state directory.
fn up_children(state: &std::path::Path) -> Vec<(String, i32)> {
    let status: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("run/status.json")).unwrap())
            .unwrap();
    let mut found: Vec<(String, i32)> = status["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["pid"].as_i64().unwrap() as i32,
            )
        })
        .collect();
    let conf = state.join("influxdb/influxdb.conf").display().to_string();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(&conf) {
            found.push(("influxd".into(), pid));
        }
    }
    assert_eq!(
        found.len(),
        3,
        "publisher, subscriber and influxd: {found:?}"
    );
    found
}

fn alive(pid: i32) -> bool {
    // A zombie is gone for this purpose: it runs nothing any more.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn nbpy_down(cfg: &std::path::Path) -> std::process::Child {
    Command::new(bin_path("nbpy"))
        .args(["--config", cfg.to_str().unwrap(), "down"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The private influxd killed under `nbpy up` is started again; then two
/// `nbpy down`s at once (or a second one while the first waits): the
/// second SIGTERM must not turn the ordered stop into an abandonment that
/// leaves the children running with no one to stop them.
#[test]
fn a_second_down_waits_for_the_same_ordered_stop() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, state, mut up, out) = started_up(dir.path());
    // The private influxd dies: `nbpy up` says so and starts it again.
    let (_, influxd) = up_children(&state)
        .into_iter()
        .find(|(n, _)| n == "influxd")
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(influxd),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_file_contains(&out, "the private influxd exited", Duration::from_secs(10));
    let t0 = Instant::now();
    let children = loop {
        let status: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(state.join("run/status.json")).unwrap())
                .unwrap();
        let again = std::panic::catch_unwind(|| up_children(&state));
        match again {
            Ok(c) if c.iter().any(|(n, p)| n == "influxd" && *p != influxd) => break c,
            _ => assert!(
                t0.elapsed() < Duration::from_secs(20),
                "no new influxd: {status}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (a, b) = (nbpy_down(&cfg), nbpy_down(&cfg));
    for d in [a, b] {
        let o = d.wait_with_output().unwrap();
        // The second may come after the first finished: nothing to stop.
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success() || err.contains("no nbpy up is running"),
            "{}\n{err}",
            o.status
        );
    }
    let status = up.wait().unwrap();
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(status.success(), "{status}\n{text}");
    assert!(!text.contains("abandoning"), "{text}");
    for (name, pid) in children {
        assert!(
            !alive(pid),
            "{name} (pid {pid}) still running after nbpy down:\n{text}"
        );
    }
}

/// `nbpy up` killed outright: its children (and the influxd it started)
/// stop on their own instead of running on orphaned; and the pid file it
/// left is not taken for a running `nbpy up`, even when that pid now
/// belongs to another process, which `nbpy down` must leave alone.
#[test]
fn a_killed_up_takes_its_children_along_and_its_pid_file_is_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, state, mut up, _out) = started_up(dir.path());
    let children = up_children(&state);
    up.kill().unwrap();
    up.wait().unwrap();
    let t0 = Instant::now();
    while children.iter().any(|(_, pid)| alive(*pid)) {
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "still running after nbpy up was killed: {:?}",
            children
                .iter()
                .filter(|(_, p)| alive(*p))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A pid file naming a live process that is not `nbpy up`.
    let mut other = StopOnDrop(Command::new("sleep").arg("60").spawn().unwrap());
    std::fs::write(state.join("up.pid"), other.id().to_string()).unwrap();
    let o = nbpy_down(&cfg).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(69), "{err}");
    assert!(err.contains("no nbpy up is running"), "{err}");
    assert!(
        other.try_wait().unwrap().is_none(),
        "nbpy down signalled pid {}",
        other.id()
    );
    let st = Command::new(bin_path("nbpy"))
        .args(["--config", cfg.to_str().unwrap(), "status"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(!text.contains(&format!("pid {}", other.id())), "{text}");
}
