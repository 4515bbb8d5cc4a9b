//! Phase 2 against a real influxd: `nbpy schema apply | diff | stats`.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nbpy::admin::influxql::series;
use nbpy::backend::LocalInfluxd;
use nbpy::config::InfluxConfig;
use nbpy::sink::influx::InfluxClient;

/// Runs `nbpy ARGS` to completion (killed past the deadline); exit code and
/// stdout + stderr.
fn nbpy(config: &Path, args: &[&str]) -> (i32, String) {
    let out_path = config.with_file_name(format!("nbpy-{}.out", rand_suffix()));
    let f = std::fs::File::create(&out_path).unwrap();
    let mut child = Command::new(bin_path("nbpy"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::from(f.try_clone().unwrap()))
        .stderr(Stdio::from(f))
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!(
                "nbpy {args:?} hung:\n{}",
                std::fs::read_to_string(&out_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    (status.code().unwrap_or(-1), text)
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A real influxd with nothing applied (Env::start applies the schema).
struct Bare {
    dir: tempfile::TempDir,
    influx: LocalInfluxd,
    client: InfluxClient,
}

fn bare() -> Bare {
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("influxd.log")).unwrap();
    let mut influx =
        LocalInfluxd::spawn(None, &dir.path().join("influxdb"), 0, Some(log)).expect("influxd");
    influx.wait_ready(Duration::from_secs(30)).expect("ready");
    let client = InfluxClient::new(&InfluxConfig {
        url: influx.url(),
        ..Default::default()
    })
    .unwrap();
    Bare {
        dir,
        influx,
        client,
    }
}

impl Bare {
    fn config(&self, extra: &str) -> std::path::PathBuf {
        let p = self.dir.path().join("nbpy.toml");
        std::fs::write(
            &p,
            format!(
                "[influxdb]\nurl = {:?}\ndatabase = \"tick\"\n{extra}",
                self.influx.url()
            ),
        )
        .unwrap();
        p
    }
}

/// name → (duration, shard, default) as the server reports them.
async fn policies(c: &InfluxClient) -> Vec<(String, String, String, bool)> {
    let v = c
        .query("SHOW RETENTION POLICIES ON \"tick\"")
        .await
        .unwrap();
    let mut out = Vec::new();
    for s in series(&v, 0) {
        for r in &s.values {
            out.push((
                s.get(r, "name").as_str().unwrap().to_string(),
                s.get(r, "duration").as_str().unwrap().to_string(),
                s.get(r, "shardGroupDuration").as_str().unwrap().to_string(),
                s.get(r, "default").as_bool().unwrap(),
            ));
        }
    }
    out.sort();
    out
}

async fn queries(c: &InfluxClient) -> Vec<String> {
    let v = c.query("SHOW CONTINUOUS QUERIES").await.unwrap();
    let mut out: Vec<String> = series(&v, 0)
        .into_iter()
        .filter(|s| s.name == "tick")
        .flat_map(|s| {
            s.values
                .iter()
                .map(|r| s.get(r, "name").as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_creates_everything_is_idempotent_and_repairs_drift() {
    let b = bare();
    let cfg = b.config("");

    // Empty server: diff says everything is missing (exit 1), apply makes it.
    let (code, out) = nbpy(&cfg, &["schema", "diff"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("+ database \"tick\""), "{out}");
    let (code, out) = nbpy(&cfg, &["schema", "apply"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        policies(&b.client).await,
        vec![
            ("default".into(), "720h0m0s".into(), "24h0m0s".into(), true),
            (
                "high_frequency".into(),
                "168h0m0s".into(),
                "1h0m0s".into(),
                false
            ),
            (
                "long_term".into(),
                "8760h0m0s".into(),
                "168h0m0s".into(),
                false
            ),
        ],
        "no autogen: the database is created with its declared default policy"
    );
    let want_cqs: Vec<String> = {
        let mut v: Vec<String> = nbpy::schema::MEASUREMENTS
            .iter()
            .filter(|m| m.downsample)
            .map(|m| format!("{}_1m", m.name))
            .collect();
        v.sort();
        v
    };
    assert_eq!(queries(&b.client).await, want_cqs);

    // A second apply changes nothing; diff agrees (exit 0).
    let (code, out) = nbpy(&cfg, &["schema", "apply"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("schema: 0 change(s)"), "{out}");
    let (code, out) = nbpy(&cfg, &["schema", "diff"]);
    assert_eq!((code, out.contains("no drift")), (0, true), "{out}");

    // Hand-made drift: a changed duration, a dropped CQ, another default,
    // a policy nobody declared.
    for q in [
        "ALTER RETENTION POLICY \"long_term\" ON \"tick\" DURATION 400d SHARD DURATION 30d",
        "DROP CONTINUOUS QUERY \"kraken_depth_1m\" ON \"tick\"",
        "ALTER RETENTION POLICY \"high_frequency\" ON \"tick\" DEFAULT",
        "CREATE RETENTION POLICY \"scratch\" ON \"tick\" DURATION 2h REPLICATION 1",
    ] {
        b.client.query(q).await.unwrap();
    }
    let before = policies(&b.client).await;
    let (code, out) = nbpy(&cfg, &["schema", "diff"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(
            "~ retention policy \"long_term\": duration 400d, shard 30d -> duration 365d, shard 1w"
        ),
        "{out}"
    );
    assert!(
        out.contains("+ continuous query \"kraken_depth_1m\""),
        "{out}"
    );
    assert!(
        out.contains("~ default retention policy: \"high_frequency\" -> \"default\""),
        "{out}"
    );
    assert!(
        out.contains("not declared") && out.contains("\"scratch\""),
        "{out}"
    );
    assert_eq!(policies(&b.client).await, before, "diff changed nothing");

    let (code, out) = nbpy(&cfg, &["schema", "apply"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("schema: 3 change(s)"), "{out}");
    let (code, out) = nbpy(&cfg, &["schema", "diff"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(queries(&b.client).await, want_cqs);
    let p = policies(&b.client).await;
    assert!(p.contains(&(
        "long_term".into(),
        "8760h0m0s".into(),
        "168h0m0s".into(),
        false
    )));
    assert!(p.contains(&("default".into(), "720h0m0s".into(), "24h0m0s".into(), true)));

    // The undeclared policy is drift only for --prune, which removes it.
    let (code, out) = nbpy(&cfg, &["schema", "diff", "--prune"]);
    assert_eq!(code, 1, "{out}");
    let (code, out) = nbpy(&cfg, &["schema", "apply", "--prune"]);
    assert_eq!(code, 0, "{out}");
    assert!(!policies(&b.client).await.iter().any(|p| p.0 == "scratch"));
    let (code, out) = nbpy(&cfg, &["schema", "diff", "--prune"]);
    assert_eq!(code, 0, "{out}");

    // Drift in the declaration: the config now wants other durations and a
    // faster resample; apply follows it (CQs are dropped and re-created).
    let cfg = b.config(
        "[schema]\nresample_every = \"10s\"\n[schema.retention.default]\nduration = \"60d\"\nshard_duration = \"1d\"\ndefault = true\n",
    );
    let (code, out) = nbpy(&cfg, &["schema", "diff"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("~ continuous query \"kraken_tick_1m\""),
        "{out}"
    );
    let (code, out) = nbpy(&cfg, &["schema", "apply"]);
    assert_eq!(code, 0, "{out}");
    assert!(policies(&b.client).await.contains(&(
        "default".into(),
        "1440h0m0s".into(),
        "24h0m0s".into(),
        true
    )));
    let v = b.client.query("SHOW CONTINUOUS QUERIES").await.unwrap();
    assert!(v.to_string().contains("RESAMPLE EVERY 10s FOR 2m"), "{v}");
    let (code, out) = nbpy(&cfg, &["schema", "diff"]);
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_and_bad_config_have_their_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let port = nbpy::backend::free_port().unwrap();
    let cfg = dir.path().join("nbpy.toml");
    std::fs::write(
        &cfg,
        format!("[influxdb]\nurl = \"http://127.0.0.1:{port}\"\n"),
    )
    .unwrap();
    let (code, out) = nbpy(&cfg, &["schema", "diff"]);
    assert_eq!(code, nbpy::exit::UNAVAILABLE, "{out}");
    std::fs::write(
        &cfg,
        "[schema.retention.default]\nduration = \"30d\"\nshard_duration = \"1d\"\ndefault = false\n",
    )
    .unwrap();
    let (code, out) = nbpy(&cfg, &["schema", "apply"]);
    assert_eq!(code, nbpy::exit::CONFIG, "{out}");
    assert!(
        out.contains("exactly one policy must have default = true"),
        "{out}"
    );
}

/// influxdb.url at a web server that answers 200 with its page on every
/// path: the phase-1 gate does not take it for InfluxDB (it fails at once
/// with EX_CONFIG instead of waiting), and `schema apply` says the answer
/// was not InfluxDB's instead of "error decoding response body".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_server_at_influxdb_url_is_not_taken_for_influxdb() {
    let nginx = FixedHttp::nginx();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("nbpy.toml");
    std::fs::write(&cfg, format!("[influxdb]\nurl = \"{}\"\n", nginx.url)).unwrap();

    let t0 = Instant::now();
    let (code, out) = nbpy(&cfg, &["wait", "influxdb", "--timeout", "30s"]);
    assert_eq!(code, nbpy::exit::CONFIG, "{out}");
    assert!(
        out.contains(&format!(
            "something at {}/ answers HTTP but is not InfluxDB (no X-Influxdb-Version header on /ping)",
            nginx.url
        )) && out.contains("check influxdb.url"),
        "{out}"
    );
    assert!(!out.contains("answers /ping (waited"), "{out}");
    assert!(t0.elapsed() < Duration::from_secs(20), "it waited: {out}");

    for args in [&["schema", "apply"][..], &["schema", "diff"][..]] {
        let (code, out) = nbpy(&cfg, args);
        assert_eq!(code, nbpy::exit::CONFIG, "{args:?}: {out}");
        assert!(
            out.contains("is not InfluxDB's JSON") && out.contains("check influxdb.url"),
            "{args:?}: {out}"
        );
        assert!(
            !out.contains("error decoding response body"),
            "{args:?}: {out}"
        );
    }

    // A subscriber, even one that could spool through an outage, refuses
    // to start: the server's 2xx to /write would keep nothing.
    let sub_cfg = dir.path().join("sub.toml");
    std::fs::write(
        &sub_cfg,
        format!(
            "state_dir = {:?}\n[influxdb]\nurl = \"{}\"\n[subscribers.main]\nconnect = [\"{}\"]\n[subscribers.main.spool]\nenabled = true\n",
            dir.path().join("state"),
            nginx.url,
            free_endpoint()
        ),
    )
    .unwrap();
    let (code, out) = nbpy(&sub_cfg, &["subscriber", "main"]);
    assert_eq!(code, nbpy::exit::CONFIG, "{out}");
    assert!(out.contains("is not InfluxDB"), "{out}");

    // A server that answers 404 to /ping is not InfluxDB either (which
    // sets its header on every answer): at once, not after the timeout.
    // A 502 without the header is a proxy whose InfluxDB is down: waited.
    let not_found = FixedHttp::start(
        "404 Not Found",
        &["Content-Type: text/plain"],
        "404 page not found\n",
    );
    std::fs::write(&cfg, format!("[influxdb]\nurl = \"{}\"\n", not_found.url)).unwrap();
    let t0 = Instant::now();
    let (code, out) = nbpy(&cfg, &["wait", "influxdb", "--timeout", "30s"]);
    assert_eq!(code, nbpy::exit::CONFIG, "{out}");
    assert!(out.contains("is not InfluxDB"), "{out}");
    assert!(t0.elapsed() < Duration::from_secs(20), "it waited: {out}");
    let proxy = FixedHttp::start("502 Bad Gateway", &["Server: nginx"], "bad gateway\n");
    std::fs::write(&cfg, format!("[influxdb]\nurl = \"{}\"\n", proxy.url)).unwrap();
    let (code, out) = nbpy(&cfg, &["wait", "influxdb", "--timeout", "1s"]);
    assert_eq!(code, nbpy::exit::UNAVAILABLE, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_match_the_points_of_a_synthetic_run() {
    const N: u64 = 5_000;
    let env = Env::start().await;
    let ep = free_endpoint();
    let cfg = env.config(&format!(
        r#"
[publishers.synth]
feed = "synthetic"
endpoint = "{ep}"
count = {N}
wait_for_subscribers = 1

[subscribers.main]
connect = ["{ep}"]
stats_interval = "1s"
"#
    ));
    let cfg_s = cfg.to_str().unwrap();
    let mut publisher = env.spawn("nbpy-publisher", &["--config", cfg_s, "synth"], &[]);
    publisher.wait_log("bound", Duration::from_secs(20));
    let mut subscriber = env.spawn("nbpy-subscriber", &["--config", cfg_s, "main"], &[]);
    publisher.wait_success(Duration::from_secs(120));
    assert_eq!(env.wait_for_points(N, Duration::from_secs(120)).await, N);
    subscriber.signal(nix::sys::signal::Signal::SIGTERM);
    subscriber.wait_success(Duration::from_secs(60));

    let (code, out) = nbpy(&cfg, &["schema", "stats", "--json"]);
    assert_eq!(code, 0, "{out}");
    let json_start = out.find('{').unwrap();
    let s: serde_json::Value = serde_json::from_str(&out[json_start..]).unwrap();
    let row = |m: &str| {
        s["measurements"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["measurement"] == m)
            .unwrap_or_else(|| panic!("{m} missing in {s}"))
            .clone()
    };
    let instruments = nbpy::feeds::synthetic::DEFAULT_INSTRUMENTS.len() as u64;
    for m in [
        "kraken_tick",
        "kraken_depth",
        "oanda_tick",
        "betfair_stream",
    ] {
        let r = row(m);
        assert_eq!(r["points"], N / 5, "{m}: {r}");
        // One publisher, one source: a series per instrument.
        assert_eq!(r["series"], instruments, "{m}: {r}");
        let age = r["newest_age_s"].as_f64().unwrap();
        assert!((0.0..600.0).contains(&age), "{m}: {r}");
        // Sizes are the policy's (below), not repeated per measurement.
        assert!(r.get("disk_bytes").is_none(), "{m}: {r}");
    }
    // Trades are also split by side (buy/sell) and order type.
    let orders = row("kraken_orders");
    assert_eq!(orders["points"], N / 5);
    let series_n = orders["series"].as_u64().unwrap();
    assert!(
        (instruments..=2 * instruments).contains(&series_n),
        "{orders}"
    );
    // Cross-check with a count of our own on the same data.
    for m in ["kraken_tick", "kraken_depth", "kraken_orders"] {
        assert_eq!(row(m)["points"].as_u64().unwrap(), env.count(m).await);
    }
    assert!(row("nbpy_pipeline")["points"].as_u64().unwrap() >= 1);
    assert_eq!(row("twitter_sentiment")["points"], 0);
    assert_eq!(
        row("twitter_sentiment")["newest_age_s"],
        serde_json::Value::Null
    );
    let rp = |name: &str| {
        s["policies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["rp"] == name)
            .cloned()
            .unwrap_or_default()
    };
    assert!(rp("default")["shards"].as_u64().unwrap() >= 1);
    assert!(rp("high_frequency")["disk_bytes"].as_u64().unwrap() > 0);
    // Every policy is listed, also one that may have no shard yet (bars
    // appear only once a downsampling query has run).
    for name in ["default", "high_frequency", "long_term"] {
        assert_eq!(rp(name)["rp"], name, "{s}");
    }

    // The table form names every measurement.
    let (code, out) = nbpy(&cfg, &["schema", "stats"]);
    assert_eq!(code, 0, "{out}");
    for m in nbpy::schema::MEASUREMENTS {
        assert!(out.contains(m.name), "{out}");
    }

    // A database that does not exist is named as such (InfluxDB itself
    // answers the figures' two-statement query with "not executed").
    let text = std::fs::read_to_string(&cfg).unwrap();
    let missing = cfg.with_file_name("missing-db.toml");
    std::fs::write(
        &missing,
        text.replacen("database = ", "database = \"nosuchdb\"\n# was: ", 1),
    )
    .unwrap();
    let (code, out) = nbpy(&missing, &["schema", "stats"]);
    assert_eq!(code, nbpy::exit::UNAVAILABLE, "{out}");
    assert!(out.contains("\"nosuchdb\" not found"), "{out}");
    assert!(out.contains("nbpy schema apply"), "{out}");
}

/// An influxd with `auth-enabled = true` (LocalInfluxd's layout plus auth).
fn auth_influxd(dir: &Path) -> (std::process::Child, String) {
    let http = nbpy::backend::free_port().unwrap();
    let rpc = nbpy::backend::free_port().unwrap();
    influxd_at(dir, http, rpc, true)
}

/// An influxd on the given ports with its data under `dir`; started again
/// on the same `dir` it finds its data (auth can be switched on between).
fn influxd_at(dir: &Path, http: u16, rpc: u16, auth: bool) -> (std::process::Child, String) {
    let d = dir.display();
    let conf = dir.join("influxdb.conf");
    std::fs::write(
        &conf,
        format!(
            "reporting-disabled = true\nbind-address = \"127.0.0.1:{rpc}\"\n\
             [meta]\n  dir = \"{d}/meta\"\n[data]\n  dir = \"{d}/data\"\n  wal-dir = \"{d}/wal\"\n  query-log-enabled = false\n\
             [http]\n  enabled = true\n  bind-address = \"127.0.0.1:{http}\"\n  auth-enabled = {auth}\n  log-enabled = false\n\
             [monitor]\n  store-enabled = false\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("influxd.log")).unwrap();
    let child = Command::new("influxd")
        .args(["run", "-config"])
        .arg(&conf)
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("influxd");
    let addr = format!("127.0.0.1:{http}");
    let t0 = Instant::now();
    while !nbpy::backend::ping(&addr) {
        assert!(t0.elapsed() < Duration::from_secs(30), "influxd not ready");
        std::thread::sleep(Duration::from_millis(25));
    }
    (child, format!("http://{addr}"))
}

struct KillOnDrop(std::process::Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn login(url: &str, user: &str, password: &str, q: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("{url}/query"))
        .basic_auth(user, Some(password))
        .form(&[("q", q), ("db", "tick")])
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_and_grants_when_auth_is_on() {
    let dir = tempfile::tempdir().unwrap();
    let (child, url) = auth_influxd(dir.path());
    let _guard = KillOnDrop(child);
    let pw = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, format!("{text}\n")).unwrap();
        p
    };
    let admin_pw = pw("admin.pw", "adm'in\\pw");
    let grafana_pw = pw("grafana.pw", "gr4fana");
    let writer_pw = pw("writer.pw", "wr1ter");
    let cfg = dir.path().join("nbpy.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[influxdb]
url = "{url}"
username = "admin"
password_file = {admin_pw:?}
[schema.users.admin]
admin = true
password_file = {admin_pw:?}
[schema.users.grafana]
privilege = "read"
password_file = {grafana_pw:?}
[schema.users.writer]
privilege = "write"
password_file = {writer_pw:?}
"#
        ),
    )
    .unwrap();

    // Auth on, no admin yet, none declared: a clear refusal.
    let bare_cfg = dir.path().join("no-users.toml");
    std::fs::write(&bare_cfg, format!("[influxdb]\nurl = \"{url}\"\n")).unwrap();
    let (code, out) = nbpy(&bare_cfg, &["schema", "apply"]);
    assert_eq!(code, nbpy::exit::NOPERM, "{out}");
    assert!(out.contains("no admin user yet"), "{out}");

    // diff cannot see past an admin-less server: it lists the admin and
    // says so, instead of listing everything as missing.
    let (code, out) = nbpy(&cfg, &["schema", "diff"]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        out,
        "+ user \"admin\" (admin)\n\
         schema: InfluxDB has auth on and no admin user yet, so it shows nothing else: \
         the rest is planned by `nbpy schema apply` once the admin exists\n\
         schema: 1 difference(s)\n"
    );

    // Fresh server with auth on: the first admin is created first, then
    // everything else as that admin.
    let (code, out) = nbpy(&cfg, &["schema", "apply"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        !out.contains("adm'in") && !out.contains("gr4fana"),
        "password printed: {out}"
    );
    assert_eq!(login(&url, "admin", "adm'in\\pw", "SHOW USERS").await, 200);
    assert_eq!(
        login(&url, "grafana", "gr4fana", "SHOW MEASUREMENTS").await,
        200
    );
    assert_eq!(
        login(&url, "grafana", "wrong", "SHOW MEASUREMENTS").await,
        401
    );
    // READ may not write, WRITE may.
    let write = |user: &'static str, pass: &'static str| {
        let url = url.clone();
        async move {
            reqwest::Client::new()
                .post(format!("{url}/write?db=tick"))
                .basic_auth(user, Some(pass))
                .body("kraken_tick,instrument=X last=1")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(write("grafana", "gr4fana").await, 403);
    assert_eq!(write("writer", "wr1ter").await, 204);
    let (code, out) = nbpy(&cfg, &["schema", "diff"]);
    assert_eq!(code, 0, "{out}");

    // A changed password file and a changed grant are drift; apply fixes both.
    std::fs::write(&grafana_pw, "n3w\n").unwrap();
    let admin = InfluxClient::new(&InfluxConfig {
        url: url.clone(),
        username: Some("admin".into()),
        password_file: Some(admin_pw.clone()),
        ..Default::default()
    })
    .unwrap();
    admin
        .query("GRANT ALL ON \"tick\" TO \"writer\"")
        .await
        .unwrap();
    admin
        .query("CREATE USER \"stranger\" WITH PASSWORD 'x'")
        .await
        .unwrap();
    let (code, out) = nbpy(&cfg, &["schema", "diff"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("~ user \"grafana\": password differs"),
        "{out}"
    );
    assert!(
        out.contains("~ user \"writer\": privilege All -> Write"),
        "{out}"
    );
    let (code, out) = nbpy(&cfg, &["schema", "apply", "--prune"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("- user \"stranger\""), "{out}");
    assert_eq!(
        login(&url, "grafana", "n3w", "SHOW MEASUREMENTS").await,
        200
    );
    assert_eq!(login(&url, "stranger", "x", "SHOW MEASUREMENTS").await, 401);
    let (code, out) = nbpy(&cfg, &["schema", "diff", "--prune"]);
    assert_eq!(code, 0, "{out}");

    // A carriage return cannot be carried by an InfluxQL string (and
    // InfluxDB's parse error would quote the password): refused when the
    // file is read, naming key and file, without showing the password.
    std::fs::write(&grafana_pw, "TopSecret42\rtail\n").unwrap();
    let (code, out) = nbpy(&cfg, &["schema", "apply"]);
    assert_eq!(code, nbpy::exit::NOPERM, "{out}");
    assert!(
        out.contains(&format!(
            "schema.users.grafana.password_file ({}): the password contains the control character U+000D",
            grafana_pw.display()
        )),
        "{out}"
    );
    assert!(!out.contains("TopSecret"), "password printed: {out}");
    std::fs::write(&grafana_pw, "n3w\n").unwrap();

    // Wrong admin password: refused, with the NOPERM exit code.
    std::fs::write(&admin_pw, "not-it\n").unwrap();
    let (code, out) = nbpy(&cfg, &["schema", "diff"]);
    assert_eq!(code, nbpy::exit::NOPERM, "{out}");
    assert!(out.contains("denied"), "{out}");
}

/// A replaced continuous query is dropped before the new one is created;
/// when InfluxDB refuses the new one, the old one is created again, so
/// the bars never stop because of a failed apply. Each change made before
/// the failure is reported. (Config check refuses this pair, so the
/// library is called with it directly.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_query_replacement_puts_the_previous_query_back() {
    let b = bare();
    let cfg = b.config("");
    let (code, out) = nbpy(&cfg, &["schema", "apply"]);
    assert_eq!(code, 0, "{out}");
    let want_cqs = queries(&b.client).await;
    assert_eq!(
        want_cqs.len(),
        nbpy::schema::MEASUREMENTS
            .iter()
            .filter(|m| m.downsample)
            .count()
    );
    // Drift that apply repairs before it gets to the queries.
    b.client
        .query("ALTER RETENTION POLICY \"long_term\" ON \"tick\" DURATION 400d SHARD DURATION 30d")
        .await
        .unwrap();

    let mut c = nbpy::config::Config::default();
    c.influxdb.url = b.influx.url();
    c.influxdb.database = "tick".into();
    c.schema.resample_every = Duration::from_secs(180);
    c.schema.resample_for = Duration::from_secs(120);
    assert!(
        c.problems().iter().any(|p| p
            .starts_with("schema.resample_for = 2m is shorter than schema.resample_every = 3m")),
        "{:?}",
        c.problems()
    );
    let mut applied = Vec::new();
    let e =
        nbpy::admin::schema::apply(&b.client, &c, false, &mut |ch| applied.push(ch.to_string()))
            .await
            .unwrap_err();
    let text = format!("{:#}", e.error);
    assert!(
        text.contains("FOR duration must be >= GROUP BY time duration")
            && text
                .ends_with("(the previous query \"kraken_tick_1m\" was re-created and still runs)"),
        "{text}"
    );
    assert_eq!(queries(&b.client).await, want_cqs, "{text}");
    assert_eq!(
        applied,
        vec![
            "~ retention policy \"long_term\": duration 400d, shard 30d -> duration 365d, shard 1w"
        ]
    );
    // What was put back is what ran before: the good config finds no drift.
    let (code, out) = nbpy(&cfg, &["schema", "diff"]);
    assert_eq!(code, 0, "{out}");
}

/// Auth switched on for a database made before: the first admin is
/// created, and then the plan is made against what the server really has
/// (before, it planned against the empty state an admin-less server shows,
/// and failed on "continuous query already exists").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_turned_on_later_plans_against_what_the_server_has() {
    let dir = tempfile::tempdir().unwrap();
    let http = nbpy::backend::free_port().unwrap();
    let rpc = nbpy::backend::free_port().unwrap();
    let (child, url) = influxd_at(dir.path(), http, rpc, false);
    let guard = KillOnDrop(child);
    let pre = dir.path().join("pre.toml");
    std::fs::write(
        &pre,
        format!("[influxdb]\nurl = \"{url}\"\n[schema]\nresample_every = \"5s\"\n"),
    )
    .unwrap();
    let (code, out) = nbpy(&pre, &["schema", "apply"]);
    assert_eq!(code, 0, "{out}");
    drop(guard);

    let (child, url) = influxd_at(dir.path(), http, rpc, true);
    let _guard = KillOnDrop(child);
    let admin_pw = dir.path().join("admin.pw");
    let grafana_pw = dir.path().join("grafana.pw");
    std::fs::write(&admin_pw, "4dmin\n").unwrap();
    std::fs::write(&grafana_pw, "gr4fana\n").unwrap();
    let cfg = dir.path().join("nbpy.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[influxdb]
url = "{url}"
username = "admin"
password_file = {admin_pw:?}
[schema.users.admin]
admin = true
password_file = {admin_pw:?}
[schema.users.grafana]
privilege = "read"
password_file = {grafana_pw:?}
"#
        ),
    )
    .unwrap();
    let (code, out) = nbpy(&cfg, &["schema", "apply"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("+ user \"admin\" (admin)"), "{out}");
    // The real drift: resample_every 5s -> 30s, and the read-only user.
    assert!(
        out.contains("~ continuous query \"kraken_tick_1m\"")
            && out.contains("+ user \"grafana\"")
            && out.contains("~ user \"grafana\": privilege None -> Read"),
        "{out}"
    );
    assert!(
        !out.contains("+ database")
            && !out.contains("+ retention policy")
            && !out.contains("+ continuous query"),
        "planned against an empty server: {out}"
    );
    let cqs = nbpy::schema::MEASUREMENTS
        .iter()
        .filter(|m| m.downsample)
        .count();
    assert!(
        out.contains(&format!("schema: {} change(s) applied", cqs + 3)),
        "{out}"
    );
    let (code, out) = nbpy(&cfg, &["schema", "diff"]);
    assert_eq!(code, 0, "{out}");
}

/// An apply that fails part-way has still changed the server: what it did
/// is printed before the error. Here the first admin is created, and the
/// connect user (another name, never created) is then refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_apply_still_prints_what_it_changed() {
    let dir = tempfile::tempdir().unwrap();
    let (child, url) = auth_influxd(dir.path());
    let _guard = KillOnDrop(child);
    let pw = dir.path().join("root.pw");
    std::fs::write(&pw, "r00t\n").unwrap();
    let cfg = dir.path().join("nbpy.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[influxdb]
url = "{url}"
username = "nbpy"
password_file = {pw:?}
[schema.users.root]
admin = true
password_file = {pw:?}
"#
        ),
    )
    .unwrap();
    let (code, out) = nbpy(&cfg, &["schema", "apply"]);
    assert_eq!(code, nbpy::exit::NOPERM, "{out}");
    assert!(
        out.contains(&format!(
            "+ user \"root\" (admin)\nschema: 1 change(s) applied to database \"tick\" at {url}/ before the error"
        )),
        "{out}"
    );
    assert_eq!(login(&url, "root", "r00t", "SHOW USERS").await, 200);
}
