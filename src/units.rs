//! The systemd units, carried inside the `nbpy` binary, and `nbpy units
//! install`, which puts them in place and wires the configured instances.
//!
//! The files in `systemd/` are the single source of truth: they are embedded
//! here with `include_str!`, so the binary installs byte for byte the files
//! that `tests/units.rs` verifies and `tests/systemd.rs` boots. Which
//! publishers and subscribers run is configuration: every `[publishers.NAME]`
//! becomes `nbpy.target.wants/nbpy-publisher@NAME.service` (likewise for
//! subscribers), and stale instance links from an older configuration are
//! removed, so re-running `install` after editing the config is the whole
//! procedure.
//!
//! Paths inside the units are `/usr/bin/nbpy…` (where packages put the
//! binaries); a distribution that installs elsewhere (NixOS) overrides
//! `ExecStart=` with a drop-in.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::config::Config;

/// One embedded unit file.
#[derive(Debug, Clone, Copy)]
pub struct Unit {
    pub name: &'static str,
    pub text: &'static str,
}

macro_rules! unit {
    ($name:literal) => {
        Unit {
            name: $name,
            text: include_str!(concat!("../systemd/", $name)),
        }
    };
}

/// Every file in `systemd/` (a test checks the directory holds no others).
pub const UNITS: &[Unit] = &[
    unit!("nbpy.target"),
    unit!("nbpy-influxdb-ready.service"),
    unit!("nbpy-schema.service"),
    unit!("nbpy-publisher@.service"),
    unit!("nbpy-publishers.target"),
    unit!("nbpy-subscriber@.service"),
    unit!("nbpy-subscribers.target"),
    unit!("nbpy-grafana.service"),
    unit!("nbpy-validate.service"),
    unit!("nbpy-validate-periodic.service"),
    unit!("nbpy-validate.timer"),
    unit!("nbpy-health.service"),
];

pub const TARGET: &str = "nbpy.target";
pub const PUBLISHER_TEMPLATE: &str = "nbpy-publisher@.service";
pub const SUBSCRIBER_TEMPLATE: &str = "nbpy-subscriber@.service";
/// How long systemd waits for a stopping subscriber before SIGKILL: the
/// `TimeoutStopSec=` of the embedded subscriber unit, so the limit
/// `service.stop_timeout` is checked against cannot drift from the unit.
pub fn subscriber_timeout_stop() -> Option<std::time::Duration> {
    timeout_of(SUBSCRIBER_TEMPLATE, "TimeoutStopSec")
}

/// How long systemd lets `nbpy validate` run (the validate unit's
/// `TimeoutStartSec=`): its window, settle and connect time must fit.
pub fn validate_timeout_start() -> Option<std::time::Duration> {
    timeout_of("nbpy-validate.service", "TimeoutStartSec")
}

/// A `Timeout…Sec=` of an embedded unit.
fn timeout_of(unit: &str, key: &str) -> Option<std::time::Duration> {
    let unit = UNITS.iter().find(|u| u.name == unit)?;
    unit.text
        .lines()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| humantime::parse_duration(v.trim()).ok())
}

/// Where `install` puts the units, relative to the root.
pub const UNIT_DIR: &str = "etc/systemd/system";

pub fn get(name: &str) -> Option<&'static Unit> {
    UNITS.iter().find(|u| u.name == name)
}

/// The instance units the configuration asks for, publishers first.
pub fn instances(cfg: &Config) -> Vec<String> {
    let publishers = cfg
        .publishers
        .keys()
        .map(|n| instance(PUBLISHER_TEMPLATE, n));
    let subscribers = cfg
        .subscribers
        .keys()
        .map(|n| instance(SUBSCRIBER_TEMPLATE, n));
    publishers.chain(subscribers).collect()
}

/// `nbpy-publisher@.service` + `kraken` → `nbpy-publisher@kraken.service`.
/// Config names are limited by [`instance_name_problem`], so systemd takes
/// them verbatim as instance names.
pub fn instance(template: &str, name: &str) -> String {
    template.replacen("@.", &format!("@{name}."), 1)
}

/// The longest name systemd takes for a unit (`UNIT_NAME_MAX` less its NUL)
/// and the longest file name Linux file systems take (`NAME_MAX`): 255.
pub const NAME_MAX: usize = 255;

/// The longest `[publishers.NAME]` / `[subscribers.NAME]` that `template`
/// can carry: the instance's drop-in directory `<instance>.d` (where
/// `install` puts credentials, and an admin their overrides) must still be
/// a file name, and so, two bytes shorter, the unit and its link.
pub fn max_instance_name(template: &str) -> usize {
    NAME_MAX.saturating_sub(template.len() + ".d".len())
}

/// Why `name` cannot be an instance of `template`, or `None`. The one rule
/// for both `config check` (`Config::problems`) and [`install`]: a name
/// that passed the check but not the install would leave the units half
/// written, found only at deploy time. `[a-z0-9_-]` is a subset of what
/// systemd allows in instance names that needs no escaping (`%i` and
/// `%I` agree on it but for '-', and the units use `%i`).
pub fn instance_name_problem(template: &str, name: &str) -> Option<String> {
    let max = max_instance_name(template);
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        Some("names may use a-z, 0-9, '-' and '_' only (they become unit instance names)".into())
    } else if name.starts_with('-') {
        // `ExecStart=… %i` (and `nbpy up`) pass the name as an argument:
        // one starting with '-' is read as an option and never runs.
        Some("a name may not start with '-' (it is passed as a command-line argument, where it reads as an option)".into())
    } else if name.len() > max {
        Some(format!(
            "the name is {} characters long; at most {max} allowed: it becomes the unit {}, whose drop-in directory {}.d must fit the {NAME_MAX}-character limit systemd and the file system put on names",
            name.len(),
            instance(template, "NAME"),
            instance(template, "NAME"),
        ))
    } else {
        None
    }
}

/// `name` for a message: a name too long to be used is cut short, so the
/// message stays readable and still points at the section.
pub fn shown_name(name: &str) -> String {
    const SHOWN: usize = 40;
    match name.char_indices().nth(SHOWN) {
        Some((at, _)) => format!("{}…", &name[..at]),
        None => name.to_string(),
    }
}

/// Every configured publisher or subscriber name its unit template cannot
/// carry, as `section.NAME: why`.
pub fn instance_name_problems(cfg: &Config) -> Vec<String> {
    let publishers = cfg
        .publishers
        .keys()
        .map(|n| ("publishers", PUBLISHER_TEMPLATE, n));
    let subscribers = cfg
        .subscribers
        .keys()
        .map(|n| ("subscribers", SUBSCRIBER_TEMPLATE, n));
    publishers
        .chain(subscribers)
        .filter_map(|(section, template, name)| {
            let why = instance_name_problem(template, name)?;
            Some(format!("{section}.{}: {why}", shown_name(name)))
        })
        .collect()
}

/// The configuration file the installed units read: `/etc/nbpy/nbpy.toml`
/// as seen from inside `root`. Their `ExecStart=` passes no `--config` and
/// they set no `$NBPY_CONFIG`, so it is the loader's default file.
pub fn config_path(root: &Path) -> PathBuf {
    root.join(crate::config::DEFAULT_FILE.trim_start_matches('/'))
}

/// How a configuration file was chosen, for [`config_file`]'s message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chosen {
    /// `--config FILE`
    Flag,
    /// `$NBPY_CONFIG`
    Env,
}

/// The configuration `install` wires the instances from: the one the units
/// will read ([`config_path`]), when there is one. A file chosen with
/// `--config` or `$NBPY_CONFIG` (`chosen`, with how it was chosen) must be
/// that file, or a byte-for-byte copy of it; any other is refused, since
/// the units would run another configuration than the one checked and
/// wired, and nothing would say so until instances went missing.
///
/// Refused rather than wired in with a drop-in (`Environment=NBPY_CONFIG`):
/// the units' sandbox hides most places such a file is kept (`ProtectHome=`,
/// `PrivateTmp=`, and `DynamicUser=` reads only what anyone may read), so
/// the failure would only move to start time; and `nbpy status`, `doctor`
/// and `validate` run by hand, the NixOS module and the compose file all
/// read `/etc/nbpy/nbpy.toml` too, so one place keeps them all agreeing.
///
/// A chosen file that cannot be read is returned as it is, for the loader
/// to report as it reports every unreadable configuration.
pub fn config_file(
    root: &Path,
    chosen: Option<(&Path, Chosen)>,
) -> Result<Option<PathBuf>, String> {
    let read = config_path(root);
    let Some((file, by)) = chosen else {
        return Ok(read.exists().then_some(read));
    };
    let Ok(meta) = fs::metadata(file) else {
        return Ok(Some(file.to_path_buf()));
    };
    let same = |other: &fs::Metadata| {
        use std::os::unix::fs::MetadataExt;
        (meta.dev(), meta.ino()) == (other.dev(), other.ino())
            || matches!((fs::read(file), fs::read(&read)), (Ok(a), Ok(b)) if a == b)
    };
    if fs::metadata(&read).is_ok_and(|m| same(&m)) {
        return Ok(Some(file.to_path_buf()));
    }
    let seen = if root == Path::new("/") {
        String::new()
    } else {
        format!(
            " ({} once {} is the root)",
            crate::config::DEFAULT_FILE,
            root.display()
        )
    };
    let differs = if read.exists() {
        ", which holds another configuration"
    } else {
        ""
    };
    Err(format!(
        "{how}{file} is not the file the units read: they start without --config and read {read}{seen}{differs}, so they would not run what is wired from {file}. Install it there (e.g. install -Dm644 {file} {read}), then run this again without {without}",
        how = match by {
            Chosen::Flag => "--config ",
            Chosen::Env => "$NBPY_CONFIG=",
        },
        without = match by {
            Chosen::Flag => "--config",
            Chosen::Env => "$NBPY_CONFIG",
        },
        file = file.display(),
        read = read.display(),
    ))
}

/// What `install` did, for the command to print.
#[derive(Debug, Default, PartialEq)]
pub struct Report {
    pub written: Vec<PathBuf>,
    pub unchanged: Vec<PathBuf>,
    pub linked: Vec<PathBuf>,
    pub unlinked: Vec<PathBuf>,
    /// Credential drop-ins the configuration no longer needs.
    pub removed: Vec<PathBuf>,
}

/// The drop-in `install` writes into `<unit>.d/` for the credentials a
/// unit's own `LoadCredential=` lines do not load.
pub const CREDENTIALS_DROPIN: &str = "50-nbpy-credentials.conf";

/// The units that read secrets, each with the config keys (by prefix) it
/// reads them from. A template's entry covers all its instances; `%i` in a
/// prefix stands for the instance name (each publisher reads only its own
/// table). The NixOS module keeps the same table in
/// `nixos-module/credentials.nix` (`secretReaders`), and tests/packaging.rs
/// holds the two equal.
pub const SECRET_READERS: &[(&str, &[&str])] = &[
    ("nbpy-influxdb-ready.service", &["influxdb."]),
    ("nbpy-health.service", &["influxdb."]),
    ("nbpy-validate.service", &["influxdb."]),
    ("nbpy-validate-periodic.service", &["influxdb."]),
    (SUBSCRIBER_TEMPLATE, &["influxdb."]),
    ("nbpy-schema.service", &["influxdb.", "schema."]),
    ("nbpy-grafana.service", &["influxdb.", "grafana."]),
    (PUBLISHER_TEMPLATE, &["publishers.%i."]),
];

/// [`SECRET_READERS`] for `cfg`: templates whose prefixes name the instance
/// become one entry per configured instance.
fn secret_readers(cfg: &Config) -> Vec<(String, Vec<String>)> {
    let mut v = Vec::new();
    for (unit, prefixes) in SECRET_READERS {
        if !prefixes.iter().any(|p| p.contains("%i")) {
            v.push((
                unit.to_string(),
                prefixes.iter().map(|p| p.to_string()).collect(),
            ));
            continue;
        }
        let names: Vec<&String> = if *unit == PUBLISHER_TEMPLATE {
            cfg.publishers.keys().collect()
        } else {
            cfg.subscribers.keys().collect()
        };
        for name in names {
            v.push((
                instance(unit, name),
                prefixes.iter().map(|p| p.replace("%i", name)).collect(),
            ));
        }
    }
    v
}

/// A `*_file` value that is a bare name is a systemd credential (see
/// `config::read_secret`); paths are read as they are.
fn credential_name(path: &Path) -> Option<String> {
    let name = path.to_str()?;
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b));
    ok.then(|| name.to_string())
}

/// Per unit, the credentials its `*_file` keys name that the unit file
/// does not load already: what its drop-in must add. The shipped units load
/// only `influxdb-password` (and Grafana's admin password); schema users'
/// passwords and venue tokens are named by the configuration alone.
pub fn missing_credentials(cfg: &Config) -> Vec<(String, Vec<String>)> {
    let secrets = crate::config::secret_files(cfg);
    let mut out = Vec::new();
    for (unit, prefixes) in secret_readers(cfg) {
        let template = if unit.starts_with("nbpy-publisher@") {
            PUBLISHER_TEMPLATE
        } else {
            unit.as_str()
        };
        let loaded: Vec<&str> = get(template)
            .map(|u| {
                u.text
                    .lines()
                    .filter_map(|l| l.trim().strip_prefix("LoadCredential="))
                    .map(|v| v.split(':').next().unwrap_or(v).trim())
                    .collect()
            })
            .unwrap_or_default();
        let mut names: Vec<String> = secrets
            .iter()
            .filter(|(k, _)| prefixes.iter().any(|p| k.starts_with(p.as_str())))
            .filter_map(|(_, p)| credential_name(p))
            .filter(|n| !loaded.contains(&n.as_str()))
            .collect();
        names.sort();
        names.dedup();
        if !names.is_empty() {
            out.push((unit, names));
        }
    }
    out
}

fn dropin_text(names: &[String]) -> String {
    let mut t = String::from(
        "# Written by `nbpy units install` from the configuration: the systemd\n\
         # credentials its *_file keys name that the unit does not load itself.\n\
         # Re-run `nbpy units install` after changing them; do not edit.\n[Service]\n",
    );
    for n in names {
        t.push_str(&format!("LoadCredential={n}\n"));
    }
    t
}

/// Writes the units under `root/etc/systemd/system`, links the configured
/// instances into `nbpy.target.wants/` (removing instance links the
/// configuration no longer names) and, with `enable`, links `nbpy.target`
/// into `multi-user.target.wants/` so the appliance starts at boot.
///
/// Links point at `/etc/systemd/system/…` as seen from inside `root`, the
/// way `systemctl enable` makes them, so a staged root stays correct once
/// it is the real one.
///
/// Instance names the units cannot carry are refused (`InvalidInput`)
/// before anything is written: `Config::problems` refuses them by the same
/// rule, so this only guards callers that built a `Config` by hand.
pub fn install(root: &Path, cfg: &Config, enable: bool) -> io::Result<Report> {
    let bad = instance_name_problems(cfg);
    if !bad.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, bad.join("; ")));
    }
    let dir = root.join(UNIT_DIR);
    fs::create_dir_all(&dir)?;
    let mut report = Report::default();
    for u in UNITS {
        put(dir.join(u.name), u.text, &mut report)?;
    }

    let wants = dir.join(format!("{TARGET}.wants"));
    fs::create_dir_all(&wants)?;
    let wanted = instances(cfg);
    for entry in fs::read_dir(&wants)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = name.starts_with("nbpy-publisher@") || name.starts_with("nbpy-subscriber@");
        if ours && !wanted.contains(&name) {
            fs::remove_file(entry.path())?;
            report.unlinked.push(entry.path());
        }
    }
    for inst in &wanted {
        let template = if inst.starts_with("nbpy-publisher@") {
            PUBLISHER_TEMPLATE
        } else {
            SUBSCRIBER_TEMPLATE
        };
        if link(
            &wants.join(inst),
            &Path::new("/").join(UNIT_DIR).join(template),
        )? {
            report.linked.push(wants.join(inst));
        }
    }
    // Credentials the units do not load themselves, as drop-ins; ours that
    // the configuration no longer needs go.
    let dropins = missing_credentials(cfg);
    for (unit, names) in &dropins {
        let d = dir.join(format!("{unit}.d"));
        fs::create_dir_all(&d)?;
        put(d.join(CREDENTIALS_DROPIN), &dropin_text(names), &mut report)?;
    }
    for entry in fs::read_dir(&dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(unit) = name.strip_suffix(".d") else {
            continue;
        };
        let ours = entry.path().join(CREDENTIALS_DROPIN);
        if unit.starts_with("nbpy-") && ours.exists() && !dropins.iter().any(|(u, _)| u == unit) {
            fs::remove_file(&ours)?;
            // Only when nothing else (an admin's own drop-in) is left.
            let _ = fs::remove_dir(entry.path());
            report.removed.push(ours);
        }
    }
    if enable {
        let mu = dir.join("multi-user.target.wants");
        fs::create_dir_all(&mu)?;
        if link(
            &mu.join(TARGET),
            &Path::new("/").join(UNIT_DIR).join(TARGET),
        )? {
            report.linked.push(mu.join(TARGET));
        }
    }
    Ok(report)
}

/// Puts `text` at `path` (mode 0644, renamed into place so systemd never
/// reads half a file) unless it is there already.
fn put(path: PathBuf, text: &str, report: &mut Report) -> io::Result<()> {
    if fs::read_to_string(&path).ok().as_deref() == Some(text) {
        report.unchanged.push(path);
        return Ok(());
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    fs::write(&tmp, text)?;
    set_mode(&tmp, 0o644)?;
    fs::rename(&tmp, &path)?;
    report.written.push(path);
    Ok(())
}

/// Makes `at` a symlink to `to`; false when it already was exactly that.
fn link(at: &Path, to: &Path) -> io::Result<bool> {
    if fs::read_link(at).ok().as_deref() == Some(to) {
        return Ok(false);
    }
    match fs::symlink_metadata(at) {
        Ok(_) => fs::remove_file(at)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::os::unix::fs::symlink(to, at)?;
    Ok(true)
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PublisherConfig, SubscriberConfig};

    fn cfg(publishers: &[&str], subscribers: &[&str]) -> Config {
        let mut c = Config::default();
        for p in publishers {
            c.publishers
                .insert(p.to_string(), PublisherConfig::default());
        }
        for s in subscribers {
            c.subscribers
                .insert(s.to_string(), SubscriberConfig::default());
        }
        c
    }

    #[test]
    fn every_file_in_the_systemd_dir_is_embedded_and_nothing_else() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
        let mut on_disk: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        let mut embedded: Vec<String> = UNITS.iter().map(|u| u.name.to_string()).collect();
        embedded.sort();
        assert_eq!(on_disk, embedded);
        for u in UNITS {
            assert_eq!(fs::read_to_string(dir.join(u.name)).unwrap(), u.text);
        }
    }

    /// The sandbox block, as written in the publisher template.
    fn sandbox() -> Vec<&'static str> {
        let text = get(PUBLISHER_TEMPLATE).unwrap().text;
        let start = text.find("# --- sandbox").unwrap();
        text[start..]
            .lines()
            .skip(1)
            .take_while(|l| !l.is_empty())
            .filter(|l| !l.starts_with('#'))
            .collect()
    }

    #[test]
    fn every_service_carries_the_same_sandbox() {
        let block = sandbox();
        assert!(block.len() > 20, "{block:?}");
        for u in UNITS.iter().filter(|u| u.name.ends_with(".service")) {
            for line in &block {
                assert!(
                    u.text.lines().any(|l| l == *line),
                    "{} lacks {line:?}",
                    u.name
                );
            }
        }
    }

    #[test]
    fn everything_stops_with_the_target_and_templates_keep_instance_names() {
        for u in UNITS.iter().filter(|u| u.name != TARGET) {
            assert!(
                u.text.lines().any(|l| l == "PartOf=nbpy.target"),
                "{} is not PartOf=nbpy.target",
                u.name
            );
            // %I would turn a '-' in a configured name into '/'.
            assert!(
                !u.text
                    .lines()
                    .any(|l| !l.starts_with('#') && l.contains("%I")),
                "{} uses %I",
                u.name
            );
        }
        let sub = get(SUBSCRIBER_TEMPLATE).unwrap().text;
        assert!(sub
            .lines()
            .any(|l| l.starts_with("After=") && l.contains("nbpy-publishers.target")));
        let publ = get(PUBLISHER_TEMPLATE).unwrap().text;
        assert!(publ.lines().any(|l| l == "Before=nbpy-publishers.target"));
    }

    #[test]
    fn instance_names_keep_dashes() {
        assert_eq!(
            instance(PUBLISHER_TEMPLATE, "kraken-tick"),
            "nbpy-publisher@kraken-tick.service"
        );
    }

    /// The longest name the rule allows installs, drop-in directory and
    /// all; one more is refused before anything is written, and
    /// `Config::problems` refuses it by the same words.
    #[test]
    fn names_too_long_for_a_unit_are_refused_before_anything_is_written() {
        assert_eq!(max_instance_name(PUBLISHER_TEMPLATE), 230);
        assert_eq!(max_instance_name(SUBSCRIBER_TEMPLATE), 229);
        let longest = |template, n: usize| {
            let mut c = cfg(&[], &[]);
            let name = "p".repeat(n);
            if template == PUBLISHER_TEMPLATE {
                let mut p = PublisherConfig::default();
                // A credential: the instance gets a drop-in directory.
                p.oanda.token_file = Some("oanda-token".into());
                c.publishers.insert(name, p);
            } else {
                let s = SubscriberConfig {
                    connect: vec!["tcp://127.0.0.1:5570".into()],
                    ..Default::default()
                };
                c.subscribers.insert(name, s);
            }
            c
        };
        for template in [PUBLISHER_TEMPLATE, SUBSCRIBER_TEMPLATE] {
            let max = max_instance_name(template);
            let root = tempfile::tempdir().unwrap();
            install(root.path(), &longest(template, max), false).unwrap();
            if template == PUBLISHER_TEMPLATE {
                let inst = instance(template, &"p".repeat(max));
                assert_eq!(inst.len() + 2, NAME_MAX);
                let d = root.path().join(UNIT_DIR).join(format!("{inst}.d"));
                assert!(d.join(CREDENTIALS_DROPIN).exists());
            }

            let root = tempfile::tempdir().unwrap();
            let c = longest(template, max + 1);
            let e = install(root.path(), &c, false).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
            let section = if template == PUBLISHER_TEMPLATE {
                "publishers"
            } else {
                "subscribers"
            };
            let says = format!(
                "{section}.{}…: the name is {} characters long; at most {max} allowed",
                "p".repeat(40),
                max + 1
            );
            assert!(e.to_string().starts_with(&says), "{e}");
            assert!(
                !root.path().join(UNIT_DIR).exists(),
                "something was written"
            );
            assert_eq!(c.problems(), [e.to_string()]);
        }
        for bad in ["Kraken", "a.b", "a b", "a@b", "é", ""] {
            assert!(
                instance_name_problem(PUBLISHER_TEMPLATE, bad)
                    .is_some_and(|e| e.contains("a-z, 0-9, '-' and '_' only")),
                "{bad:?}"
            );
        }
        assert_eq!(
            instance_name_problem(SUBSCRIBER_TEMPLATE, "kraken-tick_2"),
            None
        );
    }

    /// `install` wires from the file the units read; another file chosen
    /// is refused, saying where the units read and how to put it there.
    #[test]
    fn the_config_installed_from_is_the_one_the_units_read() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        let read = config_path(root);
        assert_eq!(read, root.join("etc/nbpy/nbpy.toml"));
        let other = root.join("other.toml");
        fs::write(&other, "[publishers.synth]\n").unwrap();

        // Nothing chosen: the file inside the root, when there is one.
        assert_eq!(config_file(root, None), Ok(None));
        let e = config_file(root, Some((&other, Chosen::Flag))).unwrap_err();
        assert_eq!(
            e,
            format!(
                "--config {o} is not the file the units read: they start without --config and read {r} (/etc/nbpy/nbpy.toml once {root} is the root), so they would not run what is wired from {o}. Install it there (e.g. install -Dm644 {o} {r}), then run this again without --config",
                o = other.display(),
                r = read.display(),
                root = root.display(),
            )
        );
        fs::create_dir_all(read.parent().unwrap()).unwrap();
        fs::write(&read, "[publishers.other]\n").unwrap();
        assert_eq!(config_file(root, None), Ok(Some(read.clone())));
        let e = config_file(root, Some((&other, Chosen::Env))).unwrap_err();
        assert!(
            e.starts_with(&format!("$NBPY_CONFIG={} is not the file", other.display()))
                && e.contains(", which holds another configuration,")
                && e.ends_with("without $NBPY_CONFIG"),
            "{e}"
        );
        // The file itself by another path, or a copy of it: what the units
        // read is what is wired.
        let link = root.join("link.toml");
        std::os::unix::fs::symlink(&read, &link).unwrap();
        assert_eq!(
            config_file(root, Some((&link, Chosen::Flag))),
            Ok(Some(link))
        );
        fs::copy(&read, &other).unwrap();
        assert_eq!(
            config_file(root, Some((&other, Chosen::Flag))),
            Ok(Some(other.clone()))
        );
        // A file that is not there is the loader's to report.
        let gone = root.join("gone.toml");
        assert_eq!(
            config_file(root, Some((&gone, Chosen::Flag))),
            Ok(Some(gone))
        );
    }

    #[test]
    fn install_links_configured_instances_and_drops_stale_ones() {
        let root = tempfile::tempdir().unwrap();
        let r = install(root.path(), &cfg(&["a", "kraken-tick"], &["main"]), false).unwrap();
        assert_eq!(r.written.len(), UNITS.len());
        let wants = root.path().join(UNIT_DIR).join("nbpy.target.wants");
        let mut names: Vec<String> = fs::read_dir(&wants)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "nbpy-publisher@a.service",
                "nbpy-publisher@kraken-tick.service",
                "nbpy-subscriber@main.service"
            ]
        );
        assert_eq!(
            fs::read_link(wants.join("nbpy-subscriber@main.service")).unwrap(),
            Path::new("/etc/systemd/system/nbpy-subscriber@.service")
        );
        assert!(!root
            .path()
            .join(UNIT_DIR)
            .join("multi-user.target.wants")
            .exists());

        // The config changes: `a` goes, `b` comes; units are left alone.
        let r = install(root.path(), &cfg(&["b", "kraken-tick"], &["main"]), true).unwrap();
        assert!(r.written.is_empty());
        assert_eq!(r.unchanged.len(), UNITS.len());
        assert_eq!(r.unlinked, [wants.join("nbpy-publisher@a.service")]);
        assert!(r.linked.contains(&wants.join("nbpy-publisher@b.service")));
        assert!(!wants.join("nbpy-publisher@a.service").exists());
        assert_eq!(
            fs::read_link(
                root.path()
                    .join(UNIT_DIR)
                    .join("multi-user.target.wants/nbpy.target")
            )
            .unwrap(),
            Path::new("/etc/systemd/system/nbpy.target")
        );
        // Idempotent.
        let r = install(root.path(), &cfg(&["b", "kraken-tick"], &["main"]), true).unwrap();
        assert!(r.written.is_empty() && r.linked.is_empty() && r.unlinked.is_empty());
    }

    #[test]
    fn credentials_the_units_do_not_load_get_drop_ins_and_lose_them_again() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("nbpy.toml");
        std::fs::write(
            &file,
            r#"
[influxdb]
username = "nbpy"
password_file = "influxdb-password"
[schema.users.writer]
privilege = "write"
password_file = "influxdb-writer-password"
[publishers.fx]
feed = "oanda-tick"
endpoint = "tcp://127.0.0.1:5599"
instruments = ["EUR_USD"]
[publishers.fx.oanda]
account = "101-004-1234567-001"
token_file = "oanda-token"
[publishers.odds]
feed = "betfair-stream"
endpoint = "tcp://127.0.0.1:5598"
[publishers.odds.betfair]
app_key_file = "betfair-app-key"
cert_file = "/etc/nbpy/betfair-client.crt"
key_file = "/etc/nbpy/betfair-client.key"
username = "punter"
password_file = "betfair-password"
event_types = ["7"]
"#,
        )
        .unwrap();
        let cfg = crate::config::load(Some(&file)).unwrap().config;
        let root = tempfile::tempdir().unwrap();
        let units = root.path().join(UNIT_DIR);
        let dropin = |unit: &str| units.join(format!("{unit}.d")).join(CREDENTIALS_DROPIN);
        let loads = |unit: &str| -> Vec<String> {
            fs::read_to_string(dropin(unit))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.strip_prefix("LoadCredential="))
                .map(str::to_string)
                .collect()
        };
        let r = install(root.path(), &cfg, false).unwrap();
        // The schema unit loads influxdb-password itself; the writer's is
        // the configuration's alone. Paths (the certificate) are no
        // credentials.
        assert_eq!(loads("nbpy-schema.service"), ["influxdb-writer-password"]);
        assert_eq!(loads("nbpy-publisher@fx.service"), ["oanda-token"]);
        assert_eq!(
            loads("nbpy-publisher@odds.service"),
            ["betfair-app-key", "betfair-password"]
        );
        for unit in [
            SUBSCRIBER_TEMPLATE,
            "nbpy-health.service",
            "nbpy-grafana.service",
        ] {
            assert!(!dropin(unit).exists(), "{unit}");
        }
        assert!(r.written.contains(&dropin("nbpy-publisher@fx.service")));
        // Idempotent.
        let again = install(root.path(), &cfg, false).unwrap();
        assert!(again.written.is_empty() && again.removed.is_empty());

        // The venues go and the writer is declared no more: the drop-ins
        // go too, but an admin's own drop-in beside ours stays.
        let own = units.join("nbpy-schema.service.d").join("90-local.conf");
        fs::write(&own, "[Service]\nEnvironment=X=1\n").unwrap();
        let r = install(root.path(), &Config::default(), false).unwrap();
        assert_eq!(r.removed.len(), 3, "{r:?}");
        assert!(!dropin("nbpy-schema.service").exists());
        assert!(own.exists());
        assert!(!units.join("nbpy-publisher@fx.service.d").exists());
    }
}
