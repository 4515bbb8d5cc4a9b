//! The packaging, checked with what runs on this machine: the compose file's
//! services and phase conditions, the Dockerfiles' non-root user and
//! HEALTHCHECK, every `.nix` file parsed by `nix-instantiate` and formatted
//! by `nixpkgs-fmt`, and the NixOS VM test's script compiled as Python.
//! What needs Docker, Nix with nixpkgs, or KVM cannot run here; the README
//! says how it is run elsewhere.
//!
//! A missing tool fails the test (CI installs them: `.ci/run`), unless
//! `NBPY_ALLOW_SKIP=1`, which turns it into a printed skip.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml_ng::Value;

/// The nixpkgs-fmt release `.ci/run` installs; formatting differs between
/// releases, so the check insists on this one.
const NIXPKGS_FMT_VERSION: &str = "1.3.0";

/// How every nbpy container gets its configuration (relative to docker/).
const CONFIG_MOUNT: &str = "./nbpy.toml:/etc/nbpy/nbpy.toml:ro";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// `Some(())` when `tool` runs; else fail, or skip when NBPY_ALLOW_SKIP=1.
fn require(tool: &str, args: &[&str], install: &str) -> Option<()> {
    if Command::new(tool).args(args).output().is_ok() {
        return Some(());
    }
    if std::env::var("NBPY_ALLOW_SKIP").as_deref() == Ok("1") {
        eprintln!("SKIPPED: {tool} is not installed ({install}); NBPY_ALLOW_SKIP=1");
        return None;
    }
    panic!("{tool} is not installed: {install} (or set NBPY_ALLOW_SKIP=1 to skip)");
}

// ---------------------------------------------------------------- compose

struct Compose {
    doc: Value,
}

impl Compose {
    fn load() -> Compose {
        let mut doc: Value =
            serde_yaml_ng::from_str(&read("docker/compose.yaml")).expect("compose.yaml is YAML");
        // Compose resolves `<<: *anchor` merge keys; so must we.
        doc.apply_merge().expect("merge keys");
        Compose { doc }
    }

    fn services(&self) -> BTreeMap<String, &Value> {
        self.doc["services"]
            .as_mapping()
            .expect("services:")
            .iter()
            .map(|(k, v)| (k.as_str().expect("service name").to_string(), v))
            .collect()
    }

    fn service(&self, name: &str) -> &Value {
        let s = &self.doc["services"][name];
        assert!(!s.is_null(), "compose.yaml has no service {name:?}");
        s
    }

    /// `depends_on` as {dependency: condition}; the short list form means
    /// `service_started`, as in compose.
    fn depends(&self, name: &str) -> BTreeMap<String, String> {
        let d = &self.service(name)["depends_on"];
        if let Some(list) = d.as_sequence() {
            return list
                .iter()
                .map(|v| (v.as_str().unwrap().to_string(), "service_started".into()))
                .collect();
        }
        d.as_mapping()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().unwrap().to_string(),
                            v["condition"]
                                .as_str()
                                .unwrap_or("service_started")
                                .to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn assert_depends(&self, name: &str, on: &str, condition: &str) {
        let d = self.depends(name);
        assert_eq!(
            d.get(on).map(String::as_str),
            Some(condition),
            "{name} must depend on {on} with condition {condition}; has {d:?}"
        );
    }

    fn strings(v: &Value) -> Vec<String> {
        v.as_sequence()
            .map(|s| {
                s.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn command(&self, name: &str) -> Vec<String> {
        Self::strings(&self.service(name)["command"])
    }

    /// Services that run the nbpy image.
    fn nbpy_services(&self) -> Vec<String> {
        self.services()
            .into_iter()
            .filter(|(_, s)| {
                s["image"]
                    .as_str()
                    .is_some_and(|i| i.contains("nbpy") && !i.contains("grafana"))
            })
            .map(|(n, _)| n)
            .collect()
    }

    /// Every service's transitive dependencies.
    fn ancestors(&self, name: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut todo = vec![name.to_string()];
        while let Some(n) = todo.pop() {
            for d in self.depends(&n).into_keys() {
                if out.insert(d.clone()) {
                    todo.push(d);
                }
            }
        }
        out
    }
}

#[test]
fn compose_gives_the_subscriber_the_units_stop_time() {
    // `config check` allows service.stop_timeout up to the subscriber
    // unit's TimeoutStopSec less a margin; a shorter grace period would
    // SIGKILL a drain the configuration allowed.
    let c = Compose::load();
    let grace = c.service("subscriber-main")["stop_grace_period"]
        .as_str()
        .expect("subscriber-main has a stop_grace_period");
    let grace = humantime::parse_duration(grace).unwrap();
    let unit = nbpy::units::subscriber_timeout_stop().unwrap();
    assert!(
        grace >= unit,
        "stop_grace_period {grace:?} < TimeoutStopSec {unit:?}"
    );
}

#[test]
fn compose_expresses_the_five_phases_with_depends_on_conditions() {
    let c = Compose::load();
    for s in [
        "influxdb",
        "grafana",
        "grafana-render",
        "schema",
        "publisher-synth",
        "subscriber-main",
        "health",
        "dashboards",
        "validate",
    ] {
        c.service(s);
    }

    // Phase 1: the backends report healthy; InfluxDB is 1.8.
    let influx = c.service("influxdb");
    assert!(
        influx["image"]
            .as_str()
            .is_some_and(|i| i.ends_with("influxdb:1.8")),
        "InfluxDB 1.8: {:?}",
        influx["image"]
    );
    for b in ["influxdb", "grafana"] {
        assert!(
            !Compose::strings(&c.service(b)["healthcheck"]["test"]).is_empty(),
            "{b} needs a healthcheck: later phases wait for service_healthy"
        );
    }
    assert!(c.service("grafana")["image"]
        .as_str()
        .is_some_and(|i| i.contains("grafana/grafana")));

    // Grafana is file-provisioned from what the one-shot render wrote.
    c.assert_depends(
        "grafana",
        "grafana-render",
        "service_completed_successfully",
    );
    assert_eq!(
        c.command("grafana-render")[..3],
        ["nbpy", "grafana", "render"]
    );
    let render_dir = &c.command("grafana-render")[3];
    let mounts = |s: &str| Compose::strings(&c.service(s)["volumes"]);
    let shared = format!("grafana-provisioning:{render_dir}");
    assert!(
        mounts("grafana-render").contains(&shared),
        "{:?}",
        mounts("grafana-render")
    );
    // Same path in both: provider files may name absolute paths.
    assert!(
        mounts("grafana").contains(&format!("{shared}:ro")),
        "{:?}",
        mounts("grafana")
    );

    // Phase 2 after InfluxDB is healthy; everything else after phase 2.
    c.assert_depends("schema", "influxdb", "service_healthy");
    assert_eq!(c.command("schema"), ["nbpy", "schema", "apply"]);

    // Phase 3: publishers, then subscribers.
    let services = c.services();
    let publishers: Vec<&String> = services
        .keys()
        .filter(|n| n.starts_with("publisher-"))
        .collect();
    let subscribers: Vec<&String> = services
        .keys()
        .filter(|n| n.starts_with("subscriber-"))
        .collect();
    assert!(!publishers.is_empty() && !subscribers.is_empty());
    for p in &publishers {
        c.assert_depends(p, "schema", "service_completed_successfully");
        assert_eq!(c.command(p)[0], "nbpy-publisher");
    }
    for s in &subscribers {
        c.assert_depends(s, "schema", "service_completed_successfully");
        assert_eq!(c.command(s)[0], "nbpy-subscriber");
        for p in &publishers {
            assert!(
                c.depends(s).contains_key(*p),
                "{s} starts after {p} (and so stops before it)"
            );
        }
    }

    // Phase 4 after Grafana is healthy and the schema exists.
    c.assert_depends("dashboards", "grafana", "service_healthy");
    c.assert_depends("dashboards", "schema", "service_completed_successfully");
    assert_eq!(c.command("dashboards"), ["nbpy", "grafana", "apply"]);

    // Phase 5 last: after the dashboards, with every feed running.
    c.assert_depends("validate", "dashboards", "service_completed_successfully");
    assert_eq!(c.command("validate"), ["nbpy", "validate"]);
    let before_validate = c.ancestors("validate");
    for s in publishers.iter().chain(&subscribers) {
        assert!(before_validate.contains(*s), "validate runs after {s}");
    }

    // The health service is what the image's HEALTHCHECK probes.
    assert_eq!(c.command("health"), ["nbpy-health"]);
    assert_eq!(
        Compose::strings(&c.service("health")["healthcheck"]["test"]),
        ["CMD", "nbpy", "health-check"]
    );
    c.assert_depends("validate", "health", "service_healthy");

    // Nothing depends on a service that does not exist, and there is no cycle.
    for name in services.keys() {
        for d in c.depends(name).keys() {
            assert!(services.contains_key(d), "{name} depends on unknown {d}");
        }
        assert!(
            !c.ancestors(name).contains(name),
            "{name} depends on itself"
        );
    }
}

#[test]
fn compose_secrets_are_compose_secrets_read_through_credentials_directory() {
    let c = Compose::load();
    let declared: BTreeMap<String, String> = c.doc["secrets"]
        .as_mapping()
        .expect("top-level secrets:")
        .iter()
        .map(|(k, v)| {
            let file = v["file"]
                .as_str()
                .unwrap_or_else(|| panic!("secret {k:?} must come from a file"));
            (k.as_str().unwrap().to_string(), file.to_string())
        })
        .collect();
    assert!(declared.contains_key("influxdb-password"));
    assert!(declared.contains_key("grafana-admin-password"));

    for (name, s) in c.services() {
        for secret in Compose::strings(&s["secrets"]) {
            assert!(declared.contains_key(&secret), "{name}: unknown {secret}");
        }
    }
    let nbpy = c.nbpy_services();
    assert!(nbpy.len() >= 7, "nbpy services: {nbpy:?}");
    for name in &nbpy {
        let s = c.service(name);
        assert_eq!(
            s["environment"]["CREDENTIALS_DIRECTORY"].as_str(),
            Some("/run/secrets"),
            "{name}: secrets are found as systemd credentials are"
        );
        assert!(
            Compose::strings(&s["volumes"]).contains(&CONFIG_MOUNT.to_string()),
            "{name}: {CONFIG_MOUNT}, the path every binary reads by default"
        );
    }

    // No password is a literal anywhere: only *__FILE variables or secrets.
    for (name, s) in c.services() {
        if let Some(env) = s["environment"].as_mapping() {
            for (k, v) in env {
                let k = k.as_str().unwrap();
                if k.contains("PASSWORD") {
                    assert!(
                        k.ends_with("__FILE")
                            && v.as_str().is_some_and(|p| p.starts_with("/run/secrets/")),
                        "{name}: {k} must be a *__FILE pointing into /run/secrets"
                    );
                }
            }
        }
    }
    let influx_entry = Compose::strings(&c.service("influxdb")["entrypoint"]).join(" ");
    assert!(
        influx_entry.contains("/run/secrets/influxdb-password"),
        "{influx_entry}"
    );
}

#[test]
fn compose_config_is_valid_and_matches_the_services() {
    let c = Compose::load();
    let file = CONFIG_MOUNT.split(':').next().unwrap();
    let path = root().join("docker").join(file);
    // The same loader and validation the binaries use.
    let loaded = nbpy::config::load(Some(&path)).unwrap_or_else(|e| panic!("{e}"));
    let cfg = loaded.config;
    assert_eq!(cfg.influxdb.url, "http://influxdb:8086");
    assert_eq!(cfg.grafana.url.as_deref(), Some("http://grafana:3000"));
    assert_eq!(
        cfg.influxdb.password_file.as_deref(),
        Some(Path::new("influxdb-password")),
        "a credential name, resolved in $CREDENTIALS_DIRECTORY"
    );
    assert!(cfg.health.listen.starts_with("0.0.0.0:"));
    let services = c.services();
    for (name, p) in &cfg.publishers {
        let svc = format!("publisher-{name}");
        assert!(services.contains_key(&svc), "no service {svc}");
        assert_eq!(c.command(&svc), ["nbpy-publisher", name.as_str()]);
        assert!(
            p.endpoint().starts_with("tcp://0.0.0.0:"),
            "{svc} must bind beyond its container's loopback"
        );
    }
    for (name, s) in &cfg.subscribers {
        let svc = format!("subscriber-{name}");
        assert_eq!(c.command(&svc), ["nbpy-subscriber", name.as_str()]);
        for ep in &s.connect {
            let host = ep
                .trim_start_matches("tcp://")
                .rsplit_once(':')
                .map(|(h, _)| h)
                .unwrap_or_default();
            assert!(
                services.contains_key(host),
                "{svc} connects to {ep}: no such service"
            );
            assert!(
                c.depends(&svc).contains_key(host),
                "{svc} starts after {host}"
            );
        }
    }
}

/// A real compose implementation reads the file the same way: docker-compose
/// 1.29 (Debian's; it needs no engine for `config`) validates it against the
/// compose schema and resolves the merge keys, and what it sees as services
/// and `depends_on` conditions is what the tests above checked. (1.x predates
/// the top-level `name:`, so that one line is left out for it.)
#[test]
fn docker_compose_accepts_the_file_and_agrees_on_the_phases() {
    if require(
        "docker-compose",
        &["version"],
        "apt-get install docker-compose",
    )
    .is_none()
    {
        return;
    }
    let text: String = read("docker/compose.yaml")
        .lines()
        .filter(|l| !l.starts_with("name:"))
        .map(|l| format!("{l}\n"))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("compose.yaml");
    std::fs::write(&file, text).unwrap();
    let out = Command::new("docker-compose")
        .arg("-f")
        .arg(&file)
        .arg("config")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker-compose config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs = Compose {
        doc: serde_yaml_ng::from_slice(&out.stdout).unwrap(),
    };
    let ours = Compose::load();
    assert_eq!(
        theirs.services().keys().collect::<Vec<_>>(),
        ours.services().keys().collect::<Vec<_>>()
    );
    for name in ours.services().keys() {
        assert_eq!(theirs.depends(name), ours.depends(name), "{name}");
        assert_eq!(theirs.command(name), ours.command(name), "{name}");
    }
}

// ---------------------------------------------------------------- images

/// The instructions of a Dockerfile's last stage, continuation lines joined.
fn final_stage(text: &str) -> (usize, Vec<String>) {
    let joined = text.replace("\\\n", " ");
    let lines: Vec<String> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    let froms = lines.iter().filter(|l| l.starts_with("FROM ")).count();
    let last = lines
        .iter()
        .rposition(|l| l.starts_with("FROM "))
        .expect("a FROM");
    (froms, lines[last..].to_vec())
}

#[test]
fn images_run_as_non_root_with_the_health_check() {
    for (file, multi_stage) in [
        ("docker/Dockerfile", true),
        ("docker/Containerfile.local", false),
    ] {
        let (froms, stage) = final_stage(&read(file));
        if multi_stage {
            assert!(froms >= 2, "{file}: a builder stage and a runtime stage");
        }
        let user = stage
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix("USER "))
            .unwrap_or_else(|| panic!("{file}: no USER in the final stage"));
        let uid = user.split(':').next().unwrap().trim();
        assert!(
            uid != "0" && uid != "root",
            "{file}: runs as {user}, must not be root"
        );
        assert_eq!(uid, "10001", "{file}: the uid all images share");
        let hc = stage
            .iter()
            .find(|l| l.starts_with("HEALTHCHECK "))
            .unwrap_or_else(|| panic!("{file}: no HEALTHCHECK"));
        assert!(
            hc.contains(r#"CMD ["nbpy", "health-check"]"#),
            "{file}: {hc}"
        );
    }
    // The Nix-built image: the same user and probe.
    let nix = read("nix/oci-image.nix");
    assert!(nix.contains(r#"uid = "10001";"#) && nix.contains(r#"User = "${uid}:${uid}";"#));
    assert!(nix.contains(r#"Test = [ "CMD" "/bin/nbpy" "health-check" ];"#));
}

/// The builder stage copies every directory the build reads: the sources
/// embed files from outside `src/` (`include_str!("../systemd/…")`), and
/// an image build without them fails at `cargo build`.
#[test]
fn the_image_build_copies_every_directory_the_sources_embed() {
    let text = read("docker/Dockerfile");
    let copied: Vec<String> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("COPY "))
        .filter(|l| !l.starts_with("--from"))
        .flat_map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            parts[..parts.len().saturating_sub(1)]
                .iter()
                .map(|p| p.trim_end_matches('/').to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    let mut embedded = std::collections::BTreeSet::new();
    let mut stack = vec![std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let src = std::fs::read_to_string(&path).unwrap_or_default();
            // `include_str!("…")`, or of `concat!("…", …)`: its first literal.
            for (i, _) in src
                .match_indices("include_str!(")
                .chain(src.match_indices("include_bytes!("))
            {
                let arg = &src[i..].split('"').nth(1).unwrap_or_default();
                // Relative to the file: the top-level directory it reaches.
                let target = path.parent().unwrap().join(arg);
                let rel = target
                    .components()
                    .fold(std::path::PathBuf::new(), |mut acc, c| {
                        match c {
                            std::path::Component::ParentDir => {
                                acc.pop();
                            }
                            other => acc.push(other),
                        }
                        acc
                    });
                let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
                if let Ok(inside) = rel.strip_prefix(root) {
                    if let Some(top) = inside.components().next() {
                        embedded.insert(top.as_os_str().to_string_lossy().into_owned());
                    }
                }
            }
        }
    }
    assert!(embedded.contains("systemd"), "found: {embedded:?}");
    for dir in &embedded {
        assert!(
            copied.iter().any(|c| c == dir),
            "docker/Dockerfile does not COPY {dir}/, which the sources embed; COPY lines: {copied:?}"
        );
    }
}

#[test]
fn health_check_probe_is_a_real_subcommand() {
    // The HEALTHCHECK's command line parses (a typo would make every
    // container unhealthy): `nbpy health-check --help` exits 0.
    let out = Command::new(env!("CARGO_BIN_EXE_nbpy"))
        .args(["health-check", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // Against nothing listening it must fail with EX_UNAVAILABLE.
    let port = nbpy::backend::free_port().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nbpy"))
        .args([
            "health-check",
            "--url",
            &format!("http://127.0.0.1:{port}/healthz"),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(nbpy::exit::UNAVAILABLE), "{out:?}");
}

// ---------------------------------------------------------------- nix

fn nix_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let name = e.file_name();
            if name == "target" || name == ".git" {
                continue;
            }
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "nix") {
                out.push(p);
            }
        }
    }
    let mut v = Vec::new();
    walk(&root(), &mut v);
    v.sort();
    for expected in [
        "flake.nix",
        "nix/package.nix",
        "nix/oci-image.nix",
        "nix/up.nix",
        "nixos-module/default.nix",
        "nixos-module/test.nix",
    ] {
        assert!(v.contains(&root().join(expected)), "{expected} is missing");
    }
    v
}

#[test]
fn every_nix_file_parses() {
    let files = nix_files();
    if require("nix-instantiate", &["--version"], "apt-get install nix-bin").is_none() {
        return;
    }
    for f in &files {
        let out = Command::new("nix-instantiate")
            .arg("--parse")
            .arg(f)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // nix/package.nix takes its name and version from Cargo.toml through
    // Nix's own TOML parser; it must read this Cargo.toml.
    let out = Command::new("nix-instantiate")
        .current_dir(root())
        .args([
            "--eval",
            "--json",
            "-E",
            "(builtins.fromTOML (builtins.readFile ./Cargo.toml)).package",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["name"], "nbpy");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn every_nix_file_is_formatted() {
    let files = nix_files();
    let install = format!("cargo install --locked nixpkgs-fmt --version {NIXPKGS_FMT_VERSION}");
    if require("nixpkgs-fmt", &["--version"], &install).is_none() {
        return;
    }
    let v = Command::new("nixpkgs-fmt")
        .arg("--version")
        .output()
        .unwrap();
    let v = String::from_utf8_lossy(&v.stdout);
    assert!(
        v.contains(NIXPKGS_FMT_VERSION),
        "nixpkgs-fmt {v:?}: formatting is checked with {NIXPKGS_FMT_VERSION} ({install})"
    );
    let out = Command::new("nixpkgs-fmt")
        .arg("--check")
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "run `nixpkgs-fmt .` to format:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The VM test's Python, as Nix renders it, compiles and passes pyflakes
/// with the NixOS test driver's globals (what the driver itself checks
/// before booting anything).
#[test]
fn vm_test_script_is_valid_python() {
    if require("nix-instantiate", &["--version"], "apt-get install nix-bin").is_none() {
        return;
    }
    let out = Command::new("nix-instantiate")
        .current_dir(root())
        .args([
            "--eval",
            "--strict",
            "--json",
            "-E",
            "(import ./nixos-module/test.nix { nixosModule = { }; }).testScript",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script: String = serde_json::from_slice(&out.stdout).unwrap();
    for needle in [
        "nbpy.target",
        "systemctl restart influxdb.service",
        "/api/search",
        "systemctl stop nbpy.target",
        "LoadCredential=nbpy-writer-password:",
    ] {
        assert!(script.contains(needle), "the VM test checks {needle}");
    }
    let dir = tempfile::tempdir().unwrap();
    let py = dir.path().join("vm_test.py");
    std::fs::write(&py, &script).unwrap();
    let out = Command::new("python3")
        .args(["-c", "import ast,sys; ast.parse(open(sys.argv[1]).read())"])
        .arg(&py)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = Command::new("python3")
        .args(["-c", "import pyflakes"])
        .status()
        .unwrap()
        .success();
    if !ok {
        assert!(
            std::env::var("NBPY_ALLOW_SKIP").as_deref() == Ok("1"),
            "pyflakes is not installed: python3 -m pip install pyflakes (or NBPY_ALLOW_SKIP=1)"
        );
        eprintln!("SKIPPED: pyflakes; NBPY_ALLOW_SKIP=1");
        return;
    }
    let out = Command::new("python3")
        .args(["-m", "pyflakes"])
        .arg(&py)
        .env("PYFLAKES_BUILTINS", "machine,start_all,subtest")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Quoted strings in `text` (Nix string literals without escapes).
fn quoted(text: &str) -> Vec<String> {
    text.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// The Nix attribute set or list that starts at `marker`, up to its `};` / `];`.
fn nix_block<'a>(text: &'a str, marker: &str, end: &str) -> &'a str {
    let start = text
        .find(marker)
        .unwrap_or_else(|| panic!("{marker} not found"));
    let len = text[start..].find(end).expect("block end");
    &text[start..start + len]
}

/// The NixOS module adds drop-ins to the package's units by name and loads
/// each unit's credentials again when it overrides them (the table in
/// nixos-module/credentials.nix); nix/package.nix refuses to build without
/// the units it expects. Both lists must match systemd/ exactly, or NixOS
/// would run something other than the tested units.
#[test]
fn nix_files_name_the_units_and_credentials_of_systemd_dir() {
    let dir = root().join("systemd");
    let mut on_disk: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut unit_files = BTreeSet::new();
    for e in std::fs::read_dir(&dir).expect("systemd/").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        unit_files.insert(name.clone());
        if let Some(unit) = name.strip_suffix(".service") {
            let text = std::fs::read_to_string(e.path()).unwrap();
            let mut ids: Vec<String> = text
                .lines()
                .filter_map(|l| l.strip_prefix("LoadCredential="))
                .map(|v| v.split(':').next().unwrap().trim().to_string())
                .filter(|id| !id.is_empty())
                .collect();
            ids.sort();
            on_disk.insert(unit.to_string(), ids);
        }
    }
    assert!(on_disk.len() >= 8, "{on_disk:?}");

    let credentials = read("nixos-module/credentials.nix");
    let block = nix_block(&credentials, "unitCredentials = {", "  };");
    let mut in_module: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in block.lines().filter(|l| l.contains("= [")) {
        let (key, list) = line.split_once("= [").unwrap();
        let mut ids = quoted(list);
        ids.sort();
        in_module.insert(quoted(key).remove(0), ids);
    }
    assert_eq!(
        in_module, on_disk,
        "nixos-module/credentials.nix unitCredentials vs the LoadCredential= lines in systemd/*.service"
    );

    let module = read("nixos-module/default.nix");
    // The firewall opens each publisher's port: the module's table of
    // default ports must be the code's.
    let ports = nix_block(&module, "feedPorts = {", "  };");
    let mut n = 0;
    for line in ports
        .lines()
        .filter(|l| l.contains(" = ") && l.ends_with(';'))
    {
        let (name, port) = line.trim().trim_end_matches(';').split_once(" = ").unwrap();
        let kind: nbpy::feeds::FeedKind = serde_json::from_value(serde_json::json!(name))
            .unwrap_or_else(|e| panic!("feedPorts.{name}: {e}"));
        assert_eq!(kind.default_port().to_string(), port, "feedPorts.{name}");
        n += 1;
    }
    assert!(n >= 8, "{ports}");

    let package = read("nix/package.nix");
    let expected: BTreeSet<String> = quoted(nix_block(&package, "expectedUnits = [", "];"))
        .into_iter()
        .collect();
    assert_eq!(
        expected, unit_files,
        "nix/package.nix expectedUnits vs the files in systemd/"
    );
}

/// `expr`, evaluated by `nix-instantiate` in the repository, as JSON.
fn nix_eval<T: serde::de::DeserializeOwned>(expr: &str) -> T {
    let out = Command::new("nix-instantiate")
        .current_dir(root())
        .args(["--eval", "--strict", "--json", "-E", expr])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{expr}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{expr}: {e}"))
}

/// Configurations whose credentials cover every reader of
/// `units::SECRET_READERS`: the systemd test's (an admin and a writer from
/// the credstore), the venues', and one where every InfluxDB reader needs
/// a credential its unit file does not load.
const CREDENTIAL_CONFIGS: &[(&str, &str)] = &[
    (
        "admin and writer",
        r#"
[influxdb]
username = "admin"
password_file = "influxdb-password"
[schema.users.admin]
admin = true
password_file = "influxdb-password"
[schema.users.writer]
privilege = "write"
password_file = "nbpy-writer-password"
[publishers.synth]
feed = "synthetic"
endpoint = "tcp://127.0.0.1:5570"
[publishers.stall]
feed = "replay"
endpoint = "tcp://127.0.0.1:5571"
file = "stall.fifo"
[subscribers.main]
connect = ["tcp://127.0.0.1:5570", "tcp://127.0.0.1:5571"]
"#,
    ),
    (
        "venues",
        r#"
[publishers.fx]
feed = "oanda-tick"
instruments = ["EUR_USD"]
[publishers.fx.oanda]
account = "101-004-1234567-001"
token_file = "oanda-token"
[publishers.odds]
feed = "betfair-stream"
[publishers.odds.betfair]
app_key_file = "betfair-app-key"
cert_file = "/etc/nbpy/betfair-client.crt"
key_file = "/etc/nbpy/betfair-client.key"
username = "punter"
password_file = "betfair-password"
event_types = ["7"]
[publishers.social-x_1]
feed = "social"
[publishers.social-x_1.social]
bearer_token_file = "x.bearer@token"
rules = [{ value = "btc" }]
"#,
    ),
    (
        "renamed credentials",
        r#"
[influxdb]
username = "nbpy"
password_file = "nbpy-influx.pw"
[grafana]
admin_password_file = "grafana-admin"
influxdb_user = "grafana"
influxdb_password_file = "/run/credentials/grafana.service/influxdb-grafana-password"
[schema.users.nbpy]
admin = true
password_file = "nbpy-influx.pw"
[schema.users.grafana]
privilege = "read"
password_file = "influxdb-grafana-password"
[subscribers.main]
connect = ["tcp://127.0.0.1:5570"]
"#,
    ),
];

/// The NixOS module gives each unit the credentials `nbpy units install`
/// gives it elsewhere: nixos-module/credentials.nix, evaluated on the same
/// configuration (the module's `settings` are that file's contents), names
/// the same extra credentials for the same units as
/// `units::missing_credentials`, and its `LoadCredential=` lists load them
/// with the unit file's own, from the files given or else the credstore.
/// Its table of which unit reads which keys is `units::SECRET_READERS`.
#[test]
fn nixos_module_loads_the_credentials_units_install_would() {
    if require("nix-instantiate", &["--version"], "apt-get install nix-bin").is_none() {
        return;
    }
    let module = read("nixos-module/default.nix");
    assert!(
        module.contains("import ./credentials.nix")
            && module.contains("serviceConfig.LoadCredential = loadCredential;"),
        "nixos-module/default.nix takes its LoadCredential= lists from credentials.nix"
    );
    let unit = |u: &str| u.trim_end_matches(".service").to_string();
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };

    let readers: BTreeMap<String, Vec<String>> =
        nix_eval("(import ./nixos-module/credentials.nix).secretReaders");
    let code: BTreeMap<String, Vec<String>> = nbpy::units::SECRET_READERS
        .iter()
        .map(|(u, ps)| (unit(u), ps.iter().map(|p| p.to_string()).collect()))
        .collect();
    assert_eq!(
        readers
            .into_iter()
            .map(|(u, v)| (u, sorted(v)))
            .collect::<BTreeMap<_, _>>(),
        code.into_iter()
            .map(|(u, v)| (u, sorted(v)))
            .collect::<BTreeMap<_, _>>(),
        "nixos-module/credentials.nix secretReaders vs units::SECRET_READERS"
    );

    // What each unit file loads itself (an instance: its template's).
    let own = |u: &str| -> Vec<String> {
        let template = match u.split_once('@') {
            Some((t, _)) => format!("{t}@.service"),
            None => format!("{u}.service"),
        };
        nbpy::units::get(&template)
            .unwrap_or_else(|| panic!("{u}: no unit {template}"))
            .text
            .lines()
            .filter_map(|l| l.strip_prefix("LoadCredential="))
            .map(|v| v.split(':').next().unwrap().trim().to_string())
            .collect()
    };

    let dir = tempfile::tempdir().unwrap();
    for (what, toml) in CREDENTIAL_CONFIGS {
        let file = dir.path().join("nbpy.toml");
        std::fs::write(&file, toml).unwrap();
        let cfg = nbpy::config::load(Some(&file))
            .unwrap_or_else(|e| panic!("{what}: {e}"))
            .config;
        assert_eq!(cfg.problems(), Vec::<String>::new(), "{what}");
        let settings = format!("(builtins.fromTOML (builtins.readFile {}))", file.display());

        let install: BTreeMap<String, Vec<String>> = nbpy::units::missing_credentials(&cfg)
            .into_iter()
            .map(|(u, ids)| (unit(&u), ids))
            .collect();
        assert!(
            !install.is_empty(),
            "{what}: no credential drop-ins to compare"
        );
        let nix: BTreeMap<String, Vec<String>> = nix_eval(&format!(
            "(import ./nixos-module/credentials.nix).missing {settings}"
        ));
        assert_eq!(
            nix, install,
            "{what}: credentials.nix `missing` vs the drop-ins of `nbpy units install`"
        );

        // The module's LoadCredential= lists: with no files, the extra IDs
        // from the credstore; with a file for every ID, each from its file.
        for with_files in [false, true] {
            let files = if with_files {
                let mut ids: BTreeSet<String> = install.values().flatten().cloned().collect();
                ids.extend(["influxdb-password".into(), "grafana-admin-password".into()]);
                let attrs: String = ids
                    .iter()
                    .map(|id| format!("\"{id}\" = \"/run/keys/{id}\"; "))
                    .collect();
                format!("{{ {attrs}}}")
            } else {
                "{ }".to_string()
            };
            let lists: BTreeMap<String, Vec<String>> = nix_eval(&format!(
                "(import ./nixos-module/credentials.nix).loadCredentials {{ settings = {settings}; files = {files}; }}"
            ));
            for u in install.keys() {
                assert!(
                    lists.contains_key(u),
                    "{what}: the module gives {u} no drop-in"
                );
            }
            for (u, list) in &lists {
                let mut ids = own(u);
                ids.extend(install.get(u).cloned().unwrap_or_default());
                let expected: Vec<String> =
                    if ids.is_empty() || (!with_files && !install.contains_key(u)) {
                        vec![]
                    } else {
                        let mut v: Vec<String> = ids
                            .iter()
                            .map(|id| match with_files {
                                true => format!("{id}:/run/keys/{id}"),
                                false => id.clone(),
                            })
                            .collect();
                        v.sort();
                        v.insert(0, String::new());
                        v
                    };
                let mut got = list.clone();
                if !got.is_empty() {
                    got[1..].sort();
                }
                assert_eq!(
                    got, expected,
                    "{what}: LoadCredential= of {u} (files: {with_files})"
                );
            }
        }
    }
}

// ---------------------------------------------------------------- nix run

/// Stand-in for Grafana, which cannot run here: answers `/api/health`,
/// records every request line and its `GF_*` environment, and accepts the
/// API calls `nbpy grafana apply` makes.
const GRAFANA_STANDIN: &str = r#"#!/bin/sh
env | grep '^GF_' | sort > "$GF_PATHS_DATA.env"
exec python3 -c '
import http.server, os, sys
log = open(os.environ["GF_PATHS_DATA"] + ".requests", "a", buffering=1)
class H(http.server.BaseHTTPRequestHandler):
    def reply(self):
        log.write(self.command + " " + self.path + "\n")
        n = int(self.headers.get("Content-Length") or 0)
        if n: self.rfile.read(n)
        found = self.path == "/api/health" or self.command != "GET"
        body = b"{\"database\":\"ok\"}" if self.path == "/api/health" else b"{}"
        self.send_response(200 if found else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_PUT = reply
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["GF_SERVER_HTTP_PORT"])), H).serve_forever()
'
"#;

/// `nix run`'s wrapper (nix/nbpy-up.sh, run as writeShellApplication runs
/// it): starts Grafana, waits for it, hands it to a real `nbpy up` (real
/// influxd), and stops Grafana when `nbpy up` ends (`nbpy down`).
#[test]
fn nix_run_wrapper_brings_grafana_up_with_nbpy_up_and_down_again() {
    use std::os::unix::fs::PermissionsExt;
    use std::time::{Duration, Instant};

    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::write(bin.join("grafana"), GRAFANA_STANDIN).unwrap();
    std::fs::set_permissions(bin.join("grafana"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let gport = nbpy::backend::free_port().unwrap();
    let iport = nbpy::backend::free_port().unwrap();
    let cfg = tmp.path().join("nbpy.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\n[influxdb]\nurl = \"http://127.0.0.1:{iport}\"\n",
            tmp.path().join("state").display().to_string()
        ),
    )
    .unwrap();
    let nbpy_dir = Path::new(env!("CARGO_BIN_EXE_nbpy")).parent().unwrap();
    let path = format!(
        "{}:{}:{}",
        bin.display(),
        nbpy_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log = tmp.path().join("nbpy-up.log");

    /// Stops whatever is left if an assertion fails half-way.
    struct Cleanup<'a>(std::process::Child, &'a Path);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = Command::new(env!("CARGO_BIN_EXE_nbpy"))
                .arg("--config")
                .arg(self.1)
                .arg("down")
                .output();
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = Command::new("bash")
        .args(["-o", "errexit", "-o", "nounset", "-o", "pipefail"])
        .arg(root().join("nix/nbpy-up.sh"))
        .arg("--config")
        .arg(&cfg)
        .env("PATH", &path)
        .env("GRAFANA_HOME", "/nix/store/grafana/share/grafana")
        .env("GRAFANA_PORT", gport.to_string())
        .env("XDG_STATE_HOME", tmp.path())
        .env_remove("NBPY_GRAFANA__URL")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(tmp.path().join("nbpy-up.err")).unwrap())
        .spawn()
        .unwrap();
    let mut guard = Cleanup(child, &cfg);
    let text = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let all_logs = || format!("{}{}", text(&log), text(&tmp.path().join("nbpy-up.err")));
    let t0 = Instant::now();
    while !text(&log).contains("nbpy is up") {
        if let Ok(Some(st)) = guard.0.try_wait() {
            panic!("nbpy-up ended early ({st}):\n{}", all_logs());
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "nbpy up did not come up:\n{}",
            all_logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = all_logs();
    let url = format!("http://127.0.0.1:{gport}");
    assert!(out.contains(&format!("Grafana at {url}")), "{out}");

    // Grafana got its state, port and admin password file from the wrapper…
    let gstate = tmp.path().join("nbpy-grafana");
    let genv = text(&gstate.join("data.env"));
    assert!(
        genv.contains(&format!("GF_SERVER_HTTP_PORT={gport}")),
        "{genv}"
    );
    assert!(genv.contains("GF_SERVER_HTTP_ADDR=127.0.0.1"), "{genv}");
    let pw = gstate.join("admin-password");
    assert!(genv.contains(&format!(
        "GF_SECURITY_ADMIN_PASSWORD__FILE={}",
        pw.display()
    )));
    let mode = std::fs::metadata(&pw).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the admin password is for its owner only");
    assert_eq!(text(&pw).len(), 32);
    // …and phase 4 applied the datasource and dashboards to it.
    let requests = text(&gstate.join("data.requests"));
    assert!(
        requests.contains("/api/datasources") && requests.contains("/api/dashboards/db"),
        "{requests}"
    );

    // `nbpy down` ends `nbpy up`, and the wrapper then stops Grafana.
    let down = Command::new(env!("CARGO_BIN_EXE_nbpy"))
        .arg("--config")
        .arg(&cfg)
        .arg("down")
        .output()
        .unwrap();
    assert!(down.status.success(), "{down:?}");
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = guard.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "wrapper still running"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}\n{}", all_logs());
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", gport)).is_err(),
        "Grafana must stop with nbpy up"
    );
}
