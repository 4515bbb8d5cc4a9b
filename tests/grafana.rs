//! Phase 4: `nbpy grafana render | apply`.
//!
//! - Every InfluxQL query in the rendered dashboards runs against a real
//!   influxd holding synthetic data written through the subscriber's own
//!   path (`Intake` → `WriterPool`), and must return rows with a value in
//!   every column: that is what proves dashboards and data agree.
//! - The dashboard JSON is type-checked against Grafana's published model
//!   (`@grafana/schema`'s `Dashboard` and the timeseries/stat/table panel
//!   option types) with `tsc`, from the pinned package in
//!   `tests/grafana-schema/`.
//! - Grafana itself cannot run here: `apply` is exercised against a local
//!   stand-in (`grafana_standin`) that checks the request shapes of
//!   Grafana's documented HTTP API and answers like it.

mod common;
mod grafana_standin;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use grafana_standin::{Mode, StandIn};
use nbpy::admin::grafana::dashboards::queries;
use nbpy::admin::influxql::series;
use nbpy::config::InfluxConfig;
use nbpy::schema::{Kind, MEASUREMENTS};
use nbpy::sink::influx::InfluxClient;
use nbpy::wire::{Envelope, Value};
use serde_json::json;

/// Runs `nbpy ARGS` to completion (killed past a deadline): exit code and
/// stdout + stderr.
fn nbpy(config: &Path, args: &[&str]) -> (i32, String) {
    let out = tempfile::NamedTempFile::new().unwrap();
    let f = out.reopen().unwrap();
    let mut child = Command::new(bin_path("nbpy"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
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
            panic!("nbpy {args:?} hung");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (
        status.code().unwrap_or(-1),
        std::fs::read_to_string(out.path()).unwrap_or_default(),
    )
}

fn write_config(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("nbpy.toml");
    std::fs::write(&p, body).unwrap();
    p
}

fn rendered(dir: &Path) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(dir.join("dashboards/nbpy"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    for p in names {
        out.push(serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap());
    }
    out
}

#[test]
fn render_writes_datasource_provider_and_a_dashboard_per_measurement() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        r#"
[influxdb]
url = "http://127.0.0.1:8086"
database = "tick"
[grafana]
influxdb_url = "http://influxdb:8086"
influxdb_user = "grafana"
influxdb_password_file = "/run/credentials/grafana.service/influxdb-password"
dashboards_path = "/var/lib/grafana/dashboards/nbpy"
"#,
    );
    let out_dir = dir.path().join("provisioning");
    let (code, out) = nbpy(&cfg, &["grafana", "render", out_dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    let ds = std::fs::read_to_string(out_dir.join("datasources/nbpy.yaml")).unwrap();
    for want in [
        "apiVersion: 1",
        "uid: \"nbpy-influxdb\"",
        "type: \"influxdb\"",
        "url: \"http://influxdb:8086\"",
        "user: \"grafana\"",
        "version: \"InfluxQL\"",
        "dbName: \"tick\"",
        "password: \"$__file{/run/credentials/grafana.service/influxdb-password}\"",
    ] {
        assert!(ds.contains(want), "{want} not in\n{ds}");
    }
    let prov = std::fs::read_to_string(out_dir.join("dashboards/nbpy.yaml")).unwrap();
    assert!(
        prov.contains("path: \"/var/lib/grafana/dashboards/nbpy\""),
        "{prov}"
    );
    assert!(prov.contains("folderUid: \"nbpy\""), "{prov}");
    let boards = rendered(&out_dir);
    assert_eq!(boards.len(), MEASUREMENTS.len());
    for m in MEASUREMENTS {
        assert!(
            boards
                .iter()
                .any(|d| d["uid"] == format!("nbpy-{}", m.name)),
            "{}",
            m.name
        );
    }
    // Rendering again gives byte-identical files (stable uids, no timestamps).
    let before: Vec<_> = boards.iter().map(|d| d.to_string()).collect();
    let (code, _) = nbpy(&cfg, &["grafana", "render", out_dir.to_str().unwrap()]);
    assert_eq!(code, 0);
    let after: Vec<_> = rendered(&out_dir).iter().map(|d| d.to_string()).collect();
    assert_eq!(before, after);
}

/// Grafana expands `$NAME` / `${NAME}` in every value of a provisioning
/// file (`$$` is a literal `$`): each value nbpy writes there has its `$`
/// doubled, so the datasource points at the database that is configured.
/// The password file reference keeps its one `$`, meant for Grafana.
#[test]
fn dollar_signs_in_rendered_provisioning_values_are_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        r#"
[influxdb]
url = "http://127.0.0.1:8086"
database = "px$HOME${USER}"
[grafana]
influxdb_url = "http://influxdb:8086/a$b"
influxdb_user = "gr$fana"
influxdb_password_file = "/run/credentials/grafana.service/influxdb-password"
datasource_name = "nbpy $x"
dashboards_path = "/var/lib/grafana/dash$boards"
"#,
    );
    let out_dir = dir.path().join("provisioning");
    let (code, out) = nbpy(&cfg, &["grafana", "render", out_dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    let text = std::fs::read_to_string(out_dir.join("datasources/nbpy.yaml")).unwrap();
    let yaml: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
    let ds = &yaml["datasources"][0];
    assert_eq!(ds["database"], "px$$HOME$${USER}", "{text}");
    assert_eq!(ds["jsonData"]["dbName"], "px$$HOME$${USER}", "{text}");
    assert_eq!(ds["user"], "gr$$fana", "{text}");
    assert_eq!(ds["url"], "http://influxdb:8086/a$$b", "{text}");
    assert_eq!(ds["name"], "nbpy $$x", "{text}");
    assert_eq!(
        ds["secureJsonData"]["password"],
        "$__file{/run/credentials/grafana.service/influxdb-password}",
        "{text}"
    );
    let text = std::fs::read_to_string(out_dir.join("dashboards/nbpy.yaml")).unwrap();
    let yaml: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
    assert_eq!(
        yaml["providers"][0]["options"]["path"], "/var/lib/grafana/dash$$boards",
        "{text}"
    );
}

/// Grafana's `regexEscape` (what it does to each value of a multi-value
/// variable interpolated into an InfluxQL regex).
fn regex_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if "\\^$*+?.()|[]{}/".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A multi-value selection as Grafana renders it into a regex: `(a|b)`.
fn all_of(values: &[String]) -> String {
    format!(
        "({})",
        values
            .iter()
            .map(|v| regex_escape(v))
            .collect::<Vec<_>>()
            .join("|")
    )
}

/// One envelope per measurement carrying every tag and field the schema
/// declares, `k` steps into a short history (counters grow with `k`).
fn complete(m: &nbpy::schema::Measurement, sym: &str, k: i64, ts: i64) -> Envelope<'static> {
    let mut data: Vec<(std::borrow::Cow<'static, str>, Value<'static>)> = Vec::new();
    for t in m.tags {
        let v = if *t == "component" {
            sym.to_string()
        } else {
            format!("{t}-{}", k % 2)
        };
        data.push(((*t).into(), Value::Str(v.into())));
    }
    for f in m.fields {
        if f.name == "seq" || f.name == "epoch" {
            continue;
        }
        let v = match f.kind {
            Kind::Float => Value::Float(100.0 + k as f64 * 0.25),
            Kind::Int => Value::Int(k * 10),
            Kind::Bool => Value::Bool(k % 2 == 0),
            Kind::Str => Value::Str(format!("s{k}").into()),
        };
        data.push((f.name.into(), v));
    }
    Envelope::new("synthetic", m.channel, sym.to_string(), ts, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_rows_from_synthetic_data() {
    let env = Env::start().await;
    // The CQs resample every second here, so bars appear without waiting
    // for a 30 s default; `apply` replaces the defaults Env::start created.
    let cfg = env.config("[schema]\nresample_every = \"1s\"\n");
    let (code, out) = nbpy(&cfg, &["schema", "apply"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("~ continuous query"), "{out}");

    let icfg = InfluxConfig {
        url: env.influx.url(),
        batch_size: 500,
        ..Default::default()
    };
    let stats = Arc::new(nbpy::subscriber::IntakeStats::default());
    let mut intake = nbpy::subscriber::Intake::new("dashboards", &icfg, stats);
    let pool = nbpy::sink::writer::WriterPool::start(
        InfluxClient::new(&icfg).unwrap(),
        &icfg,
        64,
        env.path("dead-letter"),
    );
    // The synthetic feed's own messages (the market-data measurements) …
    let mut gen = nbpy::feeds::synthetic::Generator::new(7, &[]);
    for seq in 1..=2_000u64 {
        let mut e = gen.next_message();
        e.publisher = "synth".into();
        e.seq = seq;
        e.epoch = 1;
        if let Some(b) = intake.accept_envelope(&e) {
            pool.submit(b).await;
        }
    }
    // … and a short history of every measurement with every declared tag
    // and field (the feed fills 5 of 10 book levels and no social posts;
    // the subscriber does not yet write spool counters): the dashboards may
    // show any field the schema declares, so the data here has them all.
    let now = nbpy::wire::now_ns();
    let mut seq = 0;
    for k in 0..24i64 {
        let ts = now - (115 - 5 * k) * 1_000_000_000;
        for m in MEASUREMENTS {
            let syms: &[&str] = if m.name == "nbpy_pipeline" {
                &["main", "edge"]
            } else {
                &["BTC/USD", "EUR_USD"]
            };
            for sym in syms {
                seq += 1;
                let mut e = complete(m, sym, k, ts);
                e.publisher = "complete".into();
                e.seq = seq;
                e.epoch = 1;
                let b = intake.accept_envelope(&e);
                if let Some(b) = b {
                    pool.submit(b).await;
                }
            }
        }
    }
    for b in intake.batcher.due(true) {
        pool.submit(b).await;
    }
    pool.close(Duration::from_secs(30)).await.unwrap();

    // Wait (polling) for the continuous queries to write bars.
    let t0 = Instant::now();
    for m in MEASUREMENTS.iter().filter(|m| m.downsample) {
        let q = format!(
            "SELECT count(\"close\") FROM \"tick\".\"long_term\".\"{}_1m\"",
            m.name
        );
        while env.client.query_number(&q).await.unwrap_or(0.0) < 1.0 {
            assert!(
                t0.elapsed() < Duration::from_secs(90),
                "no bars for {} after 90 s",
                m.name
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let (code, out) = nbpy(&cfg, &["grafana", "render", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    let mut ran = 0;
    for d in rendered(dir.path()) {
        // Variables, resolved as Grafana would with "All" selected.
        let mut subst: Vec<(String, String)> = vec![
            ("$timeFilter".into(), "time >= now() - 1h".into()),
            ("$__interval".into(), "10s".into()),
        ];
        for v in d["templating"]["list"].as_array().unwrap() {
            let name = v["name"].as_str().unwrap();
            let values: Vec<String> = if v["type"] == "query" {
                let r = env
                    .client
                    .query(v["query"].as_str().unwrap())
                    .await
                    .unwrap();
                ran += 1;
                series(&r, 0)
                    .iter()
                    .flat_map(|s| {
                        s.values
                            .iter()
                            .map(|row| s.get(row, "value").as_str().unwrap().to_string())
                    })
                    .collect()
            } else {
                v["options"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|o| o["value"].as_str().unwrap().to_string())
                    .collect()
            };
            assert!(
                !values.is_empty(),
                "{}: variable {name} has no values",
                d["uid"]
            );
            subst.push((format!("${name}"), all_of(&values)));
        }
        for q in queries(&d).into_iter().filter(|q| q.starts_with("SELECT")) {
            let mut sql = q.clone();
            for (k, v) in &subst {
                sql = sql.replace(k.as_str(), v);
            }
            let unresolved = sql
                .match_indices('$')
                .any(|(i, _)| sql[i + 1..].starts_with(|c: char| c.is_alphanumeric() || c == '_'));
            assert!(!unresolved, "unresolved variable in {sql}");
            let r = env
                .client
                .query(&sql)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}\n{sql}", d["uid"]));
            ran += 1;
            let ss = series(&r, 0);
            assert!(
                ss.iter().any(|s| !s.values.is_empty()),
                "{}: no rows for\n{sql}",
                d["uid"]
            );
            // Every column (field) the panel asks for has data somewhere.
            let cols = &ss[0].columns;
            for (i, c) in cols.iter().enumerate().skip(1) {
                if c == "instrument" || c == "component" || c == "role" {
                    continue;
                }
                let any = ss
                    .iter()
                    .any(|s| s.values.iter().any(|row| !row[i].is_null()));
                assert!(any, "{}: column {c} is empty in\n{sql}", d["uid"]);
            }
        }
    }
    assert!(ran >= 50, "only {ran} queries ran");
}

fn grafana_config(dir: &Path, url: &str, admin_pw: &Path) -> PathBuf {
    let ds_pw = dir.join("influx-grafana.pw");
    std::fs::write(&ds_pw, "ds-secret\n").unwrap();
    write_config(
        dir,
        &format!(
            r#"
[influxdb]
url = "http://127.0.0.1:8086"
[grafana]
url = "{url}"
admin_user = "admin"
admin_password_file = {admin_pw:?}
influxdb_user = "grafana"
influxdb_password_file = {ds_pw:?}
"#
        ),
    )
}

/// The datasource logs in as nbpy does (the NixOS module's way): its
/// password file is a path as *Grafana* sees it (grafana.service's own
/// credential directory), which `grafana apply` cannot read. It sends
/// nbpy's own password instead, read where nbpy reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_sends_nbpys_own_password_for_a_datasource_logging_in_as_nbpy() {
    let g = StandIn::start("admin", "hunter2").await;
    let dir = tempfile::tempdir().unwrap();
    let admin = dir.path().join("grafana-admin.pw");
    std::fs::write(&admin, "hunter2\n").unwrap();
    let own = dir.path().join("influxdb.pw");
    std::fs::write(&own, "nbpy-secret\n").unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            r#"
[influxdb]
url = "http://127.0.0.1:8086"
username = "nbpy"
password_file = {own:?}
[grafana]
url = "{}"
admin_user = "admin"
admin_password_file = {admin:?}
influxdb_user = "nbpy"
influxdb_password_file = "/run/credentials/grafana.service/influxdb-password"
"#,
            g.url()
        ),
    );
    let (code, out) = nbpy(&cfg, &["grafana", "apply"]);
    assert_eq!(code, 0, "{out}");
    let s = g.state.lock().unwrap();
    assert_eq!(s.secrets["nbpy-influxdb"]["password"], "nbpy-secret");
    assert!(!out.contains("nbpy-secret"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_upserts_by_uid_and_a_second_run_changes_nothing() {
    let g = StandIn::start("admin", "hunter2").await;
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("grafana-admin.pw");
    std::fs::write(&pw, "hunter2\n").unwrap();
    let cfg = grafana_config(dir.path(), &g.url(), &pw);

    let (code, out) = nbpy(&cfg, &["grafana", "apply"]);
    assert_eq!(code, 0, "{out}");
    let n = MEASUREMENTS.len();
    assert!(
        out.contains(&format!(
            "grafana: {} created, 0 updated, 0 unchanged",
            n + 2
        )),
        "{out}"
    );
    {
        let s = g.state.lock().unwrap();
        assert!(s.refused.is_empty(), "refused: {:?}", s.refused);
        assert_eq!(s.folders["nbpy"]["title"], "nbpy");
        let ds = &s.datasources["nbpy-influxdb"];
        assert_eq!(ds["type"], "influxdb");
        assert_eq!(ds["jsonData"]["dbName"], "tick");
        assert_eq!(ds["jsonData"]["version"], "InfluxQL");
        // The datasource password came from its file, and only in secureJsonData.
        assert_eq!(s.secrets["nbpy-influxdb"]["password"], "ds-secret");
        assert_eq!(ds["secureJsonFields"]["password"], true);
        assert_eq!(s.dashboards.len(), n);
        for (uid, (d, folder)) in &s.dashboards {
            assert_eq!(folder, "nbpy", "{uid}");
            assert_eq!(d["version"], 1, "{uid}");
        }
    }
    assert!(
        !out.contains("ds-secret") && !out.contains("hunter2"),
        "{out}"
    );

    // Second run: reads only, writes nothing, no new dashboard versions.
    let writes_before = g.writes().len();
    let (code, out) = nbpy(&cfg, &["grafana", "apply"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!(
            "grafana: 0 created, 0 updated, {} unchanged",
            n + 2
        )),
        "{out}"
    );
    assert_eq!(g.writes().len(), writes_before, "{:?}", g.writes());

    // Someone edits a dashboard in the UI and renames the folder: the next
    // apply puts back exactly those two.
    {
        let mut s = g.state.lock().unwrap();
        s.dashboards.get_mut("nbpy-kraken_tick").unwrap().0["title"] = json!("mine now");
        s.folders.get_mut("nbpy").unwrap()["title"] = json!("Renamed");
    }
    let (code, out) = nbpy(&cfg, &["grafana", "apply"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("~ dashboard nbpy-kraken_tick"), "{out}");
    assert!(out.contains("~ folder nbpy"), "{out}");
    assert!(
        out.contains(&format!("0 created, 2 updated, {} unchanged", n)),
        "{out}"
    );
    let s = g.state.lock().unwrap();
    assert_eq!(
        s.dashboards["nbpy-kraken_tick"].0["title"],
        "nbpy / kraken_tick"
    );
    assert_eq!(s.dashboards["nbpy-kraken_tick"].0["version"], 2);
    assert!(s.refused.is_empty(), "refused: {:?}", s.refused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_names_the_problem_on_401_403_and_connection_refused() {
    let g = StandIn::start("admin", "right").await;
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("grafana-admin.pw");

    std::fs::write(&pw, "wrong\n").unwrap();
    let cfg = grafana_config(dir.path(), &g.url(), &pw);
    let (code, out) = nbpy(&cfg, &["grafana", "apply"]);
    assert_eq!(code, nbpy::exit::NOPERM, "{out}");
    assert!(
        out.contains("401") && out.contains("grafana.admin_password_file"),
        "{out}"
    );

    std::fs::write(&pw, "right\n").unwrap();
    *g.mode.lock().unwrap() = Mode::Forbidden;
    let (code, out) = nbpy(&cfg, &["grafana", "apply"]);
    assert_eq!(code, nbpy::exit::NOPERM, "{out}");
    assert!(out.contains("403") && out.contains("Admin role"), "{out}");

    let port = nbpy::backend::free_port().unwrap();
    let cfg = grafana_config(dir.path(), &format!("http://127.0.0.1:{port}"), &pw);
    let (code, out) = nbpy(&cfg, &["grafana", "apply"]);
    assert_eq!(code, nbpy::exit::UNAVAILABLE, "{out}");
    assert!(
        out.contains("cannot reach Grafana") && out.contains("connection refused"),
        "{out}"
    );

    // No admin password file configured: a configuration error, not a guess.
    let cfg = write_config(dir.path(), &format!("[grafana]\nurl = \"{}\"\n", g.url()));
    let (code, out) = nbpy(&cfg, &["grafana", "apply"]);
    assert_eq!(code, nbpy::exit::CONFIG, "{out}");
}

/// Credentials in the InfluxDB URL (`http://bob:pw@host`) never reach the
/// datasource's `url`: the user goes to `user`, the password to
/// `secureJsonData` (Grafana's encrypted store), and a rendered file that
/// holds it is not readable by every user. Configured datasource
/// credentials win over the URL's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_the_influxdb_url_stay_out_of_the_datasource_url() {
    use std::os::unix::fs::PermissionsExt;
    const SECRET: &str = "s3c$ret";
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("provisioning");
    let ds_file = out_dir.join("datasources/nbpy.yaml");
    let render = |cfg: &Path| {
        let (code, out) = nbpy(cfg, &["grafana", "render", out_dir.to_str().unwrap()]);
        assert_eq!(code, 0, "{out}");
        assert!(!out.contains("s3c"), "{out}");
        let text = std::fs::read_to_string(&ds_file).unwrap();
        let yaml: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
        let mode = std::fs::metadata(&ds_file).unwrap().permissions().mode() & 0o777;
        (text, yaml["datasources"][0].clone(), mode)
    };

    // Only the URL carries credentials.
    let cfg = write_config(
        dir.path(),
        "[influxdb]\nurl = \"http://bob:s3c%24ret@127.0.0.1:28086\"\n",
    );
    let (text, ds, mode) = render(&cfg);
    assert_eq!(ds["url"], "http://127.0.0.1:28086", "{text}");
    assert_eq!(ds["user"], "bob", "{text}");
    // `$$` is Grafana's escape for a literal `$` in provisioning files.
    assert_eq!(ds["secureJsonData"]["password"], "s3c$$ret", "{text}");
    assert!(!text.contains("bob:"), "{text}");
    assert_eq!(mode, 0o640, "{text}");

    // grafana.influxdb_user and its password file win; the URL's password
    // is not written at all.
    let cfg = write_config(
        dir.path(),
        "[influxdb]\nurl = \"http://bob:s3c%24ret@127.0.0.1:28086\"\n\
         [grafana]\ninfluxdb_user = \"grafana\"\n\
         influxdb_password_file = \"/run/credentials/grafana.service/influxdb-password\"\n",
    );
    let (text, ds, mode) = render(&cfg);
    assert_eq!(ds["url"], "http://127.0.0.1:28086", "{text}");
    assert_eq!(ds["user"], "grafana", "{text}");
    assert_eq!(
        ds["secureJsonData"]["password"],
        "$__file{/run/credentials/grafana.service/influxdb-password}",
        "{text}"
    );
    assert!(!text.contains("s3c") && !text.contains("bob"), "{text}");
    assert_ne!(mode & 0o600, 0, "{text}");

    // Through the API: the same split, the password in secureJsonData only.
    let g = StandIn::start("admin", "hunter2").await;
    let pw = dir.path().join("grafana-admin.pw");
    std::fs::write(&pw, "hunter2\n").unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "[influxdb]\nurl = \"http://bob:s3c%24ret@127.0.0.1:28086\"\n\
             [grafana]\nurl = \"{}\"\nadmin_password_file = {pw:?}\n",
            g.url()
        ),
    );
    for run in 0..2 {
        let (code, out) = nbpy(&cfg, &["grafana", "apply"]);
        assert_eq!(code, 0, "{out}");
        let want = if run == 0 {
            "+ datasource"
        } else {
            "= datasource"
        };
        assert!(out.contains(want), "run {run}: {out}");
    }
    let s = g.state.lock().unwrap();
    let ds = &s.datasources["nbpy-influxdb"];
    assert_eq!(ds["url"], "http://127.0.0.1:28086");
    assert_eq!(ds["user"], "bob");
    assert_eq!(s.secrets["nbpy-influxdb"]["password"], SECRET);
    assert!(!ds.to_string().contains("s3c"), "{ds}");
}

/// grafana.url at something else (InfluxDB, which answers 404 to every
/// `/api/...` path; a web server with the same HTML page on every path):
/// `apply` and `provision` fail with EX_UNAVAILABLE and say that grafana.url
/// is not Grafana, instead of counting 404s (or HTML) as objects created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_and_provision_fail_when_grafana_url_is_not_grafana() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("grafana-admin.pw");
    std::fs::write(&pw, "hunter2\n").unwrap();
    // InfluxDB's answer to every path it does not serve.
    let influx_404 = FixedHttp::start(
        "404 Not Found",
        &["Content-Type: text/plain; charset=utf-8"],
        "404 page not found\n",
    );
    let html = FixedHttp::nginx();
    for server in [&influx_404, &html] {
        let cfg = grafana_config(dir.path(), &server.url, &pw);
        let provision_dir = dir.path().join("provisioning");
        for args in [
            &["grafana", "apply"][..],
            &["grafana", "provision", provision_dir.to_str().unwrap()][..],
        ] {
            let (code, out) = nbpy(&cfg, args);
            assert_eq!(
                code,
                nbpy::exit::UNAVAILABLE,
                "{args:?} {}: {out}",
                server.url
            );
            assert!(
                out.contains("grafana.url does not point at Grafana")
                    && out.contains(&format!("{}/api/health", server.url)),
                "{args:?}: {out}"
            );
            assert!(!out.contains("created"), "{args:?}: {out}");
            assert!(!out.contains("hunter2"), "{args:?}: {out}");
        }
    }
}

/// A Grafana whose writes all answer 404 (a proxy passing only reads on,
/// a wrong sub-path for writes): every lookup says "absent", and the first
/// write's 404 is an error naming the URL, not "created".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_fails_on_a_404_to_a_write() {
    let g = StandIn::start("admin", "hunter2").await;
    *g.mode.lock().unwrap() = Mode::WritesNotFound;
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("grafana-admin.pw");
    std::fs::write(&pw, "hunter2\n").unwrap();
    let cfg = grafana_config(dir.path(), &g.url(), &pw);
    let (code, out) = nbpy(&cfg, &["grafana", "apply"]);
    assert_eq!(code, nbpy::exit::UNAVAILABLE, "{out}");
    assert!(
        out.contains(&format!("POST {}/api/folders answered 404", g.url()))
            && out.contains("grafana.url"),
        "{out}"
    );
    assert!(!out.contains("created"), "{out}");
    assert_eq!(
        g.writes(),
        ["POST /api/folders"],
        "stops at the first failed write"
    );
}

/// `npm`, or a failure (a skip only with NBPY_ALLOW_SKIP=1).
fn npm_or_skip() -> bool {
    let ok = Command::new("npm")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if std::env::var("NBPY_ALLOW_SKIP").as_deref() == Ok("1") {
            eprintln!("SKIPPED: npm not installed (NBPY_ALLOW_SKIP=1)");
            return false;
        }
        panic!("npm is needed to check dashboards against @grafana/schema (apt-get install nodejs npm; .ci/run does); NBPY_ALLOW_SKIP=1 skips");
    }
    true
}

#[test]
fn dashboards_conform_to_grafanas_published_dashboard_model() {
    if !npm_or_skip() {
        return;
    }
    let pkg = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/grafana-schema");
    // Installed already at the pinned versions? Else `npm ci` from the lock.
    let version = |p: &str| -> serde_json::Value {
        std::fs::read(pkg.join(p))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    };
    let want = version("package.json")["devDependencies"].clone();
    let installed = ["@grafana/schema", "typescript"].iter().all(|name| {
        version(&format!("node_modules/{name}/package.json"))["version"] == want[*name]
    });
    if !installed {
        let s = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&pkg)
            .status()
            .unwrap();
        assert!(s.success(), "npm ci in {}", pkg.display());
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "");
    let out_dir = dir.path().join("p");
    let (code, out) = nbpy(&cfg, &["grafana", "render", out_dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    let check = |dir: &Path| {
        Command::new("node")
            .arg(pkg.join("check.mjs"))
            .arg(dir)
            .output()
            .unwrap()
    };
    let r = check(&out_dir.join("dashboards/nbpy"));
    let text = String::from_utf8_lossy(&r.stdout).to_string() + &String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{text}");
    assert!(
        text.contains(&format!("{} dashboard(s) conform", MEASUREMENTS.len())),
        "{text}"
    );

    // The check can fail: a misspelt key, a missing stat option and an
    // unknown colour mode are each refused.
    let bad = dir.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    let good: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out_dir.join("dashboards/nbpy/nbpy-kraken_tick.json")).unwrap(),
    )
    .unwrap();
    let mut a = good.clone();
    a["refreshh"] = json!("5s");
    let mut b = good.clone();
    for p in b["panels"].as_array_mut().unwrap() {
        if p["type"] == "stat" {
            p["options"].as_object_mut().unwrap().remove("graphMode");
        }
    }
    let mut c = good.clone();
    c["panels"][0]["fieldConfig"]["defaults"]["color"]["mode"] = json!("rainbow");
    for (name, d) in [("a", &a), ("b", &b), ("c", &c)] {
        std::fs::write(bad.join(format!("{name}.json")), d.to_string()).unwrap();
    }
    let r = check(&bad);
    let text = String::from_utf8_lossy(&r.stdout).to_string();
    assert!(!r.status.success(), "broken dashboards passed:\n{text}");
    for (file, want) in [("a", "refreshh"), ("b", "graphMode"), ("c", "rainbow")] {
        assert!(
            text.lines()
                .any(|l| l.contains(&format!("gen/{file}.ts(")) && l.contains(want)),
            "{file}: no error naming {want}:\n{text}"
        );
    }
}
