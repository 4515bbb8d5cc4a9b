//! The command line as a user meets it: exit codes, and messages that name
//! the key, the file and what is allowed. No backend runs here: each case
//! fails (or passes) before anything would be contacted.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::bin_path;

/// Runs `bin` with `args`, outside any configuration the machine has.
fn run(bin: &str, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut c = Command::new(bin_path(bin));
    c.args(args)
        .env_remove("NBPY_CONFIG")
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR");
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().expect("run the binary")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn write_config(dir: &Path, body: &str) -> String {
    let p = dir.join("nbpy.toml");
    std::fs::write(&p, body).expect("write config");
    p.to_str().expect("utf-8 path").to_string()
}

/// An InfluxDB URL nothing answers on: the commands below must fail
/// before they would try it.
fn closed_url() -> String {
    format!("http://127.0.0.1:{}", nbpy::backend::free_port().unwrap())
}

#[test]
fn schema_apply_refuses_an_empty_password_file() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "[influxdb]\nurl = {:?}\n[schema.users.writer]\nprivilege = \"write\"\npassword_file = {:?}\n",
            closed_url(),
            empty.display().to_string()
        ),
    );
    let out = run("nbpy", &["--config", &cfg, "schema", "apply"], &[]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(77), "{t}");
    assert!(
        t.contains(&format!(
            "schema.users.writer.password_file: secret file {} is empty",
            empty.display()
        )),
        "{t}"
    );
    // `nbpy doctor` names it too, with its fix.
    let out = run(
        "nbpy",
        &["--config", &cfg, "doctor"],
        &[("PATH", "/nonexistent")],
    );
    let t = text(&out);
    assert!(
        t.contains(&format!(
            "PROBLEM schema.users.writer.password_file: secret file {} is empty (or only whitespace)\n        fix: write the secret into the file",
            empty.display()
        )),
        "{t}"
    );
}

/// Settings that parse but make every command fail later, with an error
/// that points elsewhere: `config check` refuses each, naming its key.
#[test]
fn config_check_refuses_settings_every_command_would_trip_over() {
    let dir = tempfile::tempdir().unwrap();
    for (body, says) in [
        (
            "[influxdb]\nurl = \"localhost:8086\"\n",
            "influxdb.url = \"localhost:8086\": must start with http:// or https://",
        ),
        (
            "[grafana]\nurl = \"ftp://grafana\"\n",
            "grafana.url = \"ftp://grafana\": must start with http:// or https://",
        ),
        (
            "[influxdb]\ntimeout = \"0s\"\n",
            "influxdb.timeout = 0s: must be > 0",
        ),
        (
            "[influxdb]\ndatabase = \"a/b\"\n",
            "influxdb.database = \"a/b\": InfluxDB refuses that name",
        ),
        (
            "[influxdb]\ndatabase = \"..\"\n",
            "influxdb.database = \"..\": InfluxDB refuses that name",
        ),
        (
            "[log]\nlevel = \"verbose!!\"\n",
            "log.level = \"verbose!!\": \"verbose!!\" is not a level",
        ),
        (
            "[service]\nstop_timeout = \"60s\"\n",
            "service.stop_timeout = 1m: at most 40s: nbpy-subscriber@.service has TimeoutStopSec=45s",
        ),
    ] {
        let cfg = write_config(dir.path(), body);
        let out = run("nbpy", &["--config", &cfg, "config", "check"], &[]);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(78), "{body}: {t}");
        assert!(t.contains(says), "{body}: missing {says:?} in {t}");
    }
}

/// A venue URL its feed cannot speak is refused by `config check` (exit
/// 78), naming the key, the file and what is allowed, instead of failing
/// at the publisher's first connect.
#[test]
fn config_check_refuses_venue_urls_of_the_wrong_scheme() {
    let dir = tempfile::tempdir().unwrap();
    for (body, says) in [
        (
            "[publishers.k]\nfeed = \"kraken-tick\"\nurl = \"kraken.com\"\n",
            "publishers.k.url = \"kraken.com\": relative URL without a base; must start with ws:// or wss:// (e.g. wss://ws.kraken.com/v2)",
        ),
        (
            "[publishers.fx]\nfeed = \"oanda-tick\"\nurl = \"ftp://x\"\ninstruments = [\"EUR_USD\"]\n\
             [publishers.fx.oanda]\naccount = \"101-004-1234567-001\"\ntoken_file = \"oanda-token\"\n",
            "publishers.fx.url = \"ftp://x\": must start with http:// or https:// (e.g. https://stream-fxpractice.oanda.com)",
        ),
    ] {
        let cfg = write_config(dir.path(), body);
        let out = run("nbpy", &["--config", &cfg, "config", "check"], &[]);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(78), "{body}: {t}");
        assert!(
            t.contains(&format!("invalid configuration ({cfg}): {says}")),
            "{body}: missing {says:?} in {t}"
        );
    }
}

/// `config check` promises every problem: two unknown keys, one from the
/// file and one from the environment, are both named, as written.
#[test]
fn config_check_names_every_key_that_does_not_parse() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "bogus = 1\n[influxdb]\nbatchsize = 5\n");
    let out = run(
        "nbpy",
        &["--config", &cfg, "config", "check"],
        &[("NBPY_INFLUXDB__CONCURENCY", "2")],
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(78), "{t}");
    for says in [
        format!("bogus: unknown key (allowed here: state_dir, log, influxdb, grafana, schema, health, validate, service, publishers, subscribers) (in {cfg})"),
        format!("influxdb.batchsize: unknown key (allowed here: url, database, username, password_file, batch_size, flush_interval, concurrency, timeout, gzip, retry_min, retry_max) (in {cfg})"),
        "influxdb.concurency: unknown key (allowed here: url,".to_string(),
        "(from NBPY_INFLUXDB__CONCURENCY)".to_string(),
    ] {
        assert!(t.contains(&says), "missing {says:?} in {t}");
    }
    assert!(!t.contains("default."), "{t}");
}

/// A command line that is wrong is EX_USAGE (64), which the units name in
/// `RestartPreventExitStatus=`; clap's own 2 would be restarted forever.
/// Asking for help or the version is not an error.
#[test]
fn usage_errors_exit_64_and_help_exits_0_in_every_binary() {
    let bins = ["nbpy", "nbpy-publisher", "nbpy-subscriber", "nbpy-health"];
    let mut cases: Vec<(&str, Vec<&str>)> = vec![
        ("nbpy", vec!["bogus"]),
        ("nbpy", vec!["schema", "apply", "--bogus"]),
        ("nbpy", vec!["wait", "influxdb", "--timeout", "abc"]),
        ("nbpy", vec![]),
        ("nbpy-publisher", vec![]),
    ];
    cases.extend(bins.iter().map(|b| (*b, vec!["--bogus"])));
    for (bin, args) in cases {
        let out = run(bin, &args, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{bin} {args:?}: {err}");
        assert!(
            err.contains("Usage:") || err.contains("try '--help'"),
            "{bin} {args:?}: clap's message: {err}"
        );
    }
    for bin in bins {
        for flag in ["--help", "--version"] {
            let out = run(bin, &[flag], &[]);
            assert_eq!(out.status.code(), Some(0), "{bin} {flag}");
            assert!(!out.stdout.is_empty(), "{bin} {flag} prints to stdout");
        }
    }
    let out = run("nbpy", &["schema", "--help"], &[]);
    assert_eq!(out.status.code(), Some(0));
}

/// Text logs written to a file carry no colour escape codes.
#[test]
fn text_logs_into_a_file_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "[publishers.p]\nfeed = \"synthetic\"\nendpoint = {:?}\ncount = 3\n",
            common::free_endpoint()
        ),
    );
    let out = run(
        "nbpy-publisher",
        &["--config", &cfg, "--log-format", "text", "p"],
        &[("RUST_LOG", "info")],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("INFO"), "the publisher logged nothing: {err}");
    assert!(!err.contains('\x1b'), "colour codes in a file: {err:?}");
}

/// A string key set from the environment keeps the variable's text, even
/// when it reads as a number or a boolean; numeric keys still take numbers.
#[test]
fn env_values_that_look_numeric_or_boolean_fit_string_keys_as_written() {
    let envs = [
        ("NBPY_INFLUXDB__DATABASE", "007"),
        ("NBPY_INFLUXDB__USERNAME", "true"),
        ("NBPY_GRAFANA__DATASOURCE_NAME", "1.10"),
        ("NBPY_INFLUXDB__BATCH_SIZE", "100"),
    ];
    let out = run("nbpy", &["config", "show"], &envs);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    for line in [
        "database = \"007\"",
        "username = \"true\"",
        "datasource_name = \"1.10\"",
        "batch_size = 100",
    ] {
        assert!(t.lines().any(|l| l == line), "missing {line:?} in {t}");
    }
    // A number where a number is wanted is still checked as one.
    let out = run(
        "nbpy",
        &["config", "check"],
        &[
            ("NBPY_INFLUXDB__DATABASE", "123"),
            ("NBPY_INFLUXDB__BATCH_SIZE", "many"),
        ],
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(78), "{t}");
    assert!(
        t.contains("influxdb.batch_size: invalid type: found string \"many\", expected usize (from NBPY_INFLUXDB__BATCH_SIZE)")
            && !t.contains("influxdb.database"),
        "{t}"
    );
}

/// A publisher name too long for a systemd unit is refused by `config
/// check`, naming the limit, not first by `units install` with exit 73
/// after half the units were written.
#[test]
fn config_check_refuses_names_too_long_for_a_unit() {
    let dir = tempfile::tempdir().unwrap();
    let name = "x".repeat(300);
    let cfg = write_config(
        dir.path(),
        &format!("[publishers.{name}]\nfeed = \"synthetic\"\n"),
    );
    let says = format!(
        "publishers.{}…: the name is 300 characters long; at most 230 allowed: it becomes the unit nbpy-publisher@NAME.service",
        "x".repeat(40)
    );
    let out = run("nbpy", &["--config", &cfg, "config", "check"], &[]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(78), "{t}");
    assert!(t.contains(&says), "missing {says:?} in {t}");

    // Where the units read it, so the install reads it too.
    let root = dir.path().join("root");
    let staged = root.join("etc/nbpy/nbpy.toml");
    std::fs::create_dir_all(staged.parent().unwrap()).unwrap();
    std::fs::copy(&cfg, &staged).unwrap();
    let out = run(
        "nbpy",
        &[
            "--config",
            staged.to_str().unwrap(),
            "units",
            "install",
            "--root",
            root.to_str().unwrap(),
        ],
        &[],
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(78), "{t}");
    assert!(t.contains(&says), "missing {says:?} in {t}");
    assert!(!root.join("etc/systemd").exists(), "units written: {t}");
}

/// `units install` wires the instances of the file the units will read,
/// `/etc/nbpy/nbpy.toml` inside the root: another file given with
/// `--config` (or `$NBPY_CONFIG`) is refused with exit 64, saying where to
/// put it, and nothing is written.
#[test]
fn units_install_refuses_a_config_the_units_will_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let other = write_config(dir.path(), "[publishers.synth]\nfeed = \"synthetic\"\n");
    let root = dir.path().join("root");
    let r = root.to_str().unwrap();
    let read = root.join("etc/nbpy/nbpy.toml");
    for (args, envs, how) in [
        (
            vec!["--config", other.as_str(), "units", "install", "--root", r],
            vec![],
            "--config ",
        ),
        (
            vec!["units", "install", "--root", r],
            vec![("NBPY_CONFIG", other.as_str())],
            "$NBPY_CONFIG=",
        ),
    ] {
        let out = run("nbpy", &args, &envs);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(64), "{t}");
        let says = format!(
            "error: {how}{other} is not the file the units read: they start without --config and read {}",
            read.display()
        );
        assert!(t.starts_with(&says), "missing {says:?} in {t}");
        assert!(
            t.contains(&format!("install -Dm644 {other} {}", read.display())),
            "{t}"
        );
        assert!(!root.join("etc/systemd").exists(), "units written: {t}");
    }

    // Put where the units read it: wired from there, by default too.
    std::fs::create_dir_all(read.parent().unwrap()).unwrap();
    std::fs::copy(&other, &read).unwrap();
    for args in [
        vec!["units", "install", "--root", r],
        vec![
            "--config",
            read.to_str().unwrap(),
            "units",
            "install",
            "--root",
            r,
        ],
        vec!["--config", other.as_str(), "units", "install", "--root", r],
    ] {
        let out = run("nbpy", &args, &[]);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {t}");
        assert!(
            t.contains("instances (from ") && t.contains("): nbpy-publisher@synth.service"),
            "{args:?}: {t}"
        );
    }

    // The installer's NBPY_* variables are not the units': a publisher
    // only they define is not wired (its unit would exit 78 at boot).
    let out = run(
        "nbpy",
        &["units", "install", "--root", r],
        &[("NBPY_PUBLISHERS__EXTRA__ENDPOINT", "tcp://127.0.0.1:5999")],
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(!t.contains("nbpy-publisher@extra"), "{t}");
    assert!(
        t.contains("ignoring NBPY_PUBLISHERS__EXTRA__ENDPOINT"),
        "{t}"
    );
    assert!(!root
        .join("etc/systemd/system/multi-user.target.wants/nbpy-publisher@extra.service")
        .exists());
}

/// A reader that went away (`nbpy validate 2>&1 | head -3`) must not turn
/// the command's own exit code into a panic's 101: scripts and units act on
/// 65, 69, 77, 78.
#[test]
fn a_closed_stderr_keeps_the_commands_exit_code() {
    use std::process::Stdio;
    let mut child = Command::new(bin_path("nbpy"))
        .args(["config", "check", "--config", "/nonexistent/nbpy.toml"])
        .env_remove("NBPY_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nbpy");
    // Close the read end before the child writes its error.
    drop(child.stderr.take());
    let status = child.wait().expect("wait for nbpy");
    assert_eq!(status.code(), Some(78), "{status:?}");
}
