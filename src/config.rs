//! Configuration: built-in defaults < TOML file < `NBPY_*` environment.
//!
//! The file is `--config FILE`, else `$NBPY_CONFIG`, else `/etc/nbpy/nbpy.toml`
//! when it exists. Environment keys nest with `__`
//! (`NBPY_INFLUXDB__URL=http://…`). Unknown keys are errors, so a typo is
//! reported instead of silently falling back to a default. Secrets are never
//! values here: only `*_file` paths (or systemd credentials), so `config show`
//! has nothing to leak but URL user-info, which it redacts.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::feeds::FeedKind;

pub const DEFAULT_FILE: &str = "/etc/nbpy/nbpy.toml";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where spools, dead letters, `nbpy up` data and logs live. systemd's
    /// `StateDirectory=` sets `$STATE_DIRECTORY`, which wins when present.
    pub state_dir: PathBuf,
    pub log: LogConfig,
    pub influxdb: InfluxConfig,
    pub grafana: GrafanaConfig,
    /// Phase 2: retention policies, downsampling and InfluxDB users.
    pub schema: SchemaConfig,
    pub health: HealthConfig,
    pub validate: crate::validate::ValidateConfig,
    pub service: ServiceConfig,
    pub publishers: BTreeMap<String, PublisherConfig>,
    pub subscribers: BTreeMap<String, SubscriberConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: PathBuf::from("/var/lib/nbpy"),
            log: LogConfig::default(),
            influxdb: InfluxConfig::default(),
            grafana: GrafanaConfig::default(),
            schema: SchemaConfig::default(),
            health: HealthConfig::default(),
            validate: Default::default(),
            service: ServiceConfig::default(),
            publishers: BTreeMap::new(),
            subscribers: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// journald when stderr is the journal, else text.
    #[default]
    Auto,
    Text,
    Json,
    Journald,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// An `EnvFilter` directive (`info,nbpy::sink=debug`); `RUST_LOG` wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Auto,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct InfluxConfig {
    pub url: String,
    pub database: String,
    pub username: Option<String>,
    /// File holding the password (systemd: `LoadCredential=`); never inline.
    pub password_file: Option<PathBuf>,
    /// Points per write request.
    pub batch_size: usize,
    /// A partly filled batch is written after this long.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Write requests in flight at once.
    pub concurrency: usize,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// `true`, `false` or `"auto"` (compress unless InfluxDB is on this
    /// host): see [`InfluxConfig::gzip_enabled`].
    pub gzip: Gzip,
    /// Retry backoff: first delay, doubling up to `retry_max`, with jitter.
    #[serde(with = "humantime_serde")]
    pub retry_min: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
}

impl Default for InfluxConfig {
    fn default() -> Self {
        InfluxConfig {
            url: "http://127.0.0.1:8086".into(),
            database: "tick".into(),
            username: None,
            password_file: None,
            batch_size: 5000,
            flush_interval: Duration::from_secs(1),
            concurrency: 2,
            timeout: Duration::from_secs(10),
            gzip: Gzip::Auto,
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(10),
        }
    }
}

impl InfluxConfig {
    /// Whether write requests are gzipped. `auto` compresses unless the
    /// URL's host is loopback: there gzip saves no bandwidth and costs CPU
    /// at both ends (in the e2e bench on two cores, without it the
    /// subscriber spent ~1.1 µs and influxd ~3.5 µs less per point, and
    /// ~20% more points per second were stored).
    pub fn gzip_enabled(&self) -> bool {
        match self.gzip {
            Gzip::On => true,
            Gzip::Off => false,
            Gzip::Auto => !is_loopback_url(&self.url),
        }
    }
}

fn is_loopback_url(url: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(url) else {
        return false;
    };
    let host = u.host_str().unwrap_or("").trim_matches(['[', ']']);
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `[influxdb] gzip`: a boolean or `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Gzip {
    #[default]
    Auto,
    On,
    Off,
}

impl Serialize for Gzip {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Gzip::Auto => s.serialize_str("auto"),
            Gzip::On => s.serialize_bool(true),
            Gzip::Off => s.serialize_bool(false),
        }
    }
}

impl<'de> Deserialize<'de> for Gzip {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Gzip;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("true, false or \"auto\"")
            }
            fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<Gzip, E> {
                Ok(if b { Gzip::On } else { Gzip::Off })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Gzip, E> {
                match v {
                    "auto" => Ok(Gzip::Auto),
                    "true" => Ok(Gzip::On),
                    "false" => Ok(Gzip::Off),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GrafanaConfig {
    pub url: Option<String>,
    pub admin_user: Option<String>,
    pub admin_password_file: Option<PathBuf>,
    /// The uid of the provisioned InfluxDB datasource; every dashboard
    /// panel refers to it, so it must not change once dashboards exist.
    pub datasource_uid: String,
    /// The datasource's name as Grafana lists it.
    pub datasource_name: String,
    /// InfluxDB as Grafana reaches it (compose: `http://influxdb:8086`);
    /// default: `influxdb.url`.
    pub influxdb_url: Option<String>,
    /// InfluxDB user the datasource logs in as (a read-only one, ideally).
    pub influxdb_user: Option<String>,
    /// That user's password file *as Grafana sees it*: rendered into the
    /// provisioning YAML as `$__file{PATH}`, read by `grafana apply` unless
    /// that user is `influxdb.username` (then nbpy's own password file is).
    pub influxdb_password_file: Option<PathBuf>,
    /// Where `nbpy grafana render` writes when no directory is given.
    pub provisioning_dir: Option<PathBuf>,
    /// The dashboards directory as Grafana sees it, written into the
    /// dashboard provider (compose mounts the rendered dir elsewhere);
    /// default: `<render dir>/dashboards/nbpy`.
    pub dashboards_path: Option<PathBuf>,
    /// The folder (uid and title) the dashboards go into.
    pub folder: String,
    /// HTTP timeout of `grafana apply`.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for GrafanaConfig {
    fn default() -> Self {
        GrafanaConfig {
            url: None,
            admin_user: None,
            admin_password_file: None,
            datasource_uid: "nbpy-influxdb".into(),
            datasource_name: "nbpy InfluxDB".into(),
            influxdb_url: None,
            influxdb_user: None,
            influxdb_password_file: None,
            provisioning_dir: None,
            dashboards_path: None,
            folder: "nbpy".into(),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Phase 2, declared: what `nbpy schema apply` makes true on the server.
/// The measurement → policy mapping and what downsamples come from
/// `schema.rs`, not from here, so there is one list of names.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SchemaConfig {
    /// Retention policies by name; every policy a measurement names must be
    /// here, and exactly one is the database default.
    pub retention: BTreeMap<String, RetentionConfig>,
    /// How often the downsampling continuous queries run
    /// (`RESAMPLE EVERY`) ...
    #[serde(with = "humantime_serde")]
    pub resample_every: Duration,
    /// ... and how far back each run recomputes bars (`RESAMPLE FOR`), so
    /// points that arrive a little late still make it into their minute.
    #[serde(with = "humantime_serde")]
    pub resample_for: Duration,
    /// InfluxDB users (when auth is on); passwords only from files.
    pub users: BTreeMap<String, InfluxUserConfig>,
}

impl Default for SchemaConfig {
    fn default() -> Self {
        let rp = |d: u64, s: u64, default: bool| RetentionConfig {
            duration: Duration::from_secs(d * 3600),
            shard_duration: Duration::from_secs(s * 3600),
            default,
        };
        SchemaConfig {
            retention: BTreeMap::from([
                (
                    crate::schema::rp::DEFAULT.to_string(),
                    rp(30 * 24, 24, true),
                ),
                (
                    crate::schema::rp::HIGH_FREQUENCY.to_string(),
                    rp(7 * 24, 1, false),
                ),
                (
                    crate::schema::rp::LONG_TERM.to_string(),
                    rp(365 * 24, 7 * 24, false),
                ),
            ]),
            resample_every: Duration::from_secs(30),
            resample_for: Duration::from_secs(120),
            users: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// How long data is kept; `0s` keeps it forever (`INF`).
    #[serde(with = "day_duration")]
    pub duration: Duration,
    #[serde(with = "day_duration")]
    pub shard_duration: Duration,
    /// The database's default policy (writes without `rp=` land here).
    pub default: bool,
}

/// Durations as `365d` / `1h` (humantime would print 365 days as
/// "11months 30days 3h 50m 24s"); read with humantime, so "30 days" works too.
mod day_duration {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        let secs = d.as_secs();
        let text = if d.subsec_nanos() != 0 {
            humantime::format_duration(*d).to_string()
        } else if secs == 0 {
            "0s".to_string()
        } else if secs % 86_400 == 0 {
            format!("{}d", secs / 86_400)
        } else if secs % 3600 == 0 {
            format!("{}h", secs / 3600)
        } else if secs % 60 == 0 {
            format!("{}m", secs / 60)
        } else {
            format!("{secs}s")
        };
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        humantime_serde::deserialize(d)
    }
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            duration: Duration::ZERO,
            shard_duration: Duration::from_secs(7 * 24 * 3600),
            default: false,
        }
    }
}

/// What an InfluxDB user may do on the database.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Privilege {
    #[default]
    Read,
    Write,
    All,
    None,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct InfluxUserConfig {
    /// File holding the password (relative: looked up in
    /// `$CREDENTIALS_DIRECTORY` first).
    pub password_file: Option<PathBuf>,
    /// A server admin (`WITH ALL PRIVILEGES`).
    pub admin: bool,
    /// Privilege on the database (ignored for admins).
    pub privilege: Privilege,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    pub listen: String,
    /// How often the health daemon pings InfluxDB and Grafana, reads the
    /// subscribers' `nbpy_pipeline` counters and measures write lag.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// The window `uptime` percentages in `/status` cover.
    #[serde(with = "humantime_serde")]
    pub uptime_window: Duration,
    /// A subscriber whose newest `nbpy_pipeline` point is older than this is
    /// down; unset = 2 × its `stats_interval` + `influxdb.flush_interval` + 2 s.
    #[serde(default, with = "humantime_serde")]
    pub subscriber_stale_after: Option<Duration>,
    /// Ask systemd for unit states (`systemctl show nbpy-*`): "auto" = when
    /// systemd is the init system, "on", "off".
    pub systemd: HealthSystemd,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            listen: "127.0.0.1:9184".into(),
            poll_interval: Duration::from_secs(2),
            uptime_window: Duration::from_secs(3600),
            subscriber_stale_after: None,
            systemd: HealthSystemd::Auto,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum HealthSystemd {
    #[default]
    Auto,
    On,
    Off,
}

/// What a subscriber needs past `service.stop_timeout` to spool what it
/// could not write and exit; `nbpy up` gives its children the same.
pub const STOP_MARGIN: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// How long a stop may take to drain. Refused above the subscriber
    /// unit's `TimeoutStopSec` less [`STOP_MARGIN`], so the service, not
    /// systemd's SIGKILL, ends the stop.
    #[serde(with = "humantime_serde")]
    pub stop_timeout: Duration,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            stop_timeout: Duration::from_secs(20),
        }
    }
}

/// How messages are framed on the bus.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// Topic frame + JSON envelope with `seq`/`epoch` (wire format v1).
    #[default]
    V1,
    /// The predecessor's single text frame; carries no sequence numbers.
    Legacy,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PublisherConfig {
    pub feed: FeedKind,
    /// ZeroMQ endpoint to bind; defaults to the feed's port on loopback.
    pub endpoint: Option<String>,
    /// Where others (validate, the health monitor) connect to reach it,
    /// when that is not `endpoint`: another host's name (compose:
    /// `tcp://publisher-synth:5570`). Default: `endpoint`, a wildcard host
    /// (`0.0.0.0`, `*`, `[::]`) read as loopback.
    pub advertise: Option<String>,
    pub codec: Codec,
    /// Messages per second; 0 = as fast as delivery allows.
    pub rate: f64,
    /// Stop after this many messages; 0 = run forever.
    pub count: u64,
    /// Hold the first message until this many subscriptions have arrived.
    pub wait_for_subscribers: usize,
    /// Instruments (pairs, FX instruments, markets); empty = the feed's default.
    pub instruments: Vec<String>,
    /// No data for this long means the feed is stale: the watchdog stops.
    #[serde(with = "humantime_serde")]
    pub stale_after: Duration,
    /// A subscriber whose queue stays full with nothing written to it for
    /// this long is disconnected (and sees a gap when it is back): waiting
    /// on without a limit froze the feed for every other subscriber.
    #[serde(with = "humantime_serde")]
    pub stall_limit: Duration,
    /// Messages buffered between a venue feed and the socket; beyond it the
    /// newest are dropped and show up downstream as sequence gaps. Feeds
    /// that wait instead (synthetic, replay) use at most 1,024.
    pub queue: usize,
    /// Upstream URL override (tests point it at a local server).
    pub url: Option<String>,
    /// Seed of the synthetic random walk.
    pub seed: u64,
    pub kraken: crate::feeds::kraken::KrakenConfig,
    pub oanda: crate::feeds::oanda::OandaConfig,
    pub betfair: crate::feeds::betfair::BetfairConfig,
    pub social: crate::feeds::social::SocialConfig,
    /// File to replay (feed = "replay"): one v1 envelope per line.
    pub file: Option<PathBuf>,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        PublisherConfig {
            feed: FeedKind::Synthetic,
            endpoint: None,
            advertise: None,
            codec: Codec::V1,
            rate: 0.0,
            count: 0,
            wait_for_subscribers: 0,
            instruments: Vec::new(),
            stale_after: Duration::from_secs(60),
            stall_limit: crate::zmtp::DEFAULT_STALL_LIMIT,
            queue: 65_536,
            url: None,
            seed: 1,
            kraken: Default::default(),
            oanda: Default::default(),
            betfair: Default::default(),
            social: Default::default(),
            file: None,
        }
    }
}

impl PublisherConfig {
    pub fn endpoint(&self) -> String {
        self.endpoint
            .clone()
            .unwrap_or_else(|| format!("tcp://127.0.0.1:{}", self.feed.default_port()))
    }

    /// The endpoint to connect to for this publisher (see `advertise`):
    /// a bind to every address is reached on loopback, not at `0.0.0.0`,
    /// which names no host to connect to.
    pub fn reach(&self) -> String {
        if let Some(a) = &self.advertise {
            return a.clone();
        }
        let ep = self.endpoint();
        match crate::bus::parse_endpoint(&ep) {
            Ok((host, port)) if wildcard_host(host) => {
                let lo = if host.contains(':') {
                    "[::1]"
                } else {
                    "127.0.0.1"
                };
                format!("tcp://{lo}:{port}")
            }
            _ => ep,
        }
    }
}

/// A bind address meaning every interface.
fn wildcard_host(host: &str) -> bool {
    matches!(bind_addr(host), BindAddr::Any4 | BindAddr::Any6)
}

/// The address a bind takes, for telling two binds that collide.
#[derive(Debug, PartialEq)]
enum BindAddr {
    /// Every IPv4 address (`*`, `0.0.0.0`, `0`).
    Any4,
    /// Every address, IPv6 and (Linux's default, dual stack) IPv4.
    Any6,
    Ip(std::net::IpAddr),
    /// A host name other than localhost (it resolves, most likely, to IPv4).
    Name(String),
}

fn bind_addr(host: &str) -> BindAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    match host {
        "*" | "0" => BindAddr::Any4,
        "localhost" => BindAddr::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        "ip6-localhost" => BindAddr::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        h => match h
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            Ok(IpAddr::V4(ip)) if ip.is_unspecified() => BindAddr::Any4,
            Ok(IpAddr::V6(ip)) if ip.is_unspecified() => BindAddr::Any6,
            Ok(ip) => BindAddr::Ip(ip),
            Err(_) => BindAddr::Name(h.to_ascii_lowercase()),
        },
    }
}

/// Two binds on one port that the kernel would not both allow.
fn binds_collide(a: &BindAddr, b: &BindAddr) -> bool {
    use std::net::IpAddr;
    let v4 = |x: &BindAddr| matches!(x, BindAddr::Ip(IpAddr::V4(_)) | BindAddr::Name(_));
    a == b
        || matches!(a, BindAddr::Any6)
        || matches!(b, BindAddr::Any6)
        || (matches!(a, BindAddr::Any4) && v4(b))
        || (matches!(b, BindAddr::Any4) && v4(a))
}

/// What the subscriber does when it has no room left: its in-memory queue
/// without a spool, or the spool's `max_bytes` with one.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    /// Stop reading the bus: ZeroMQ then backs up to the publisher, whose
    /// drops are counted as sequence gaps. Nothing accepted is lost.
    #[default]
    Block,
    /// Spool only: delete the oldest spooled data to make room; the points
    /// deleted are counted as `dropped`.
    DropOldest,
}

/// `[subscribers.NAME.spool]`: where batches wait while InfluxDB cannot
/// take them (see [`crate::sink::spool`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Without a spool, a failing InfluxDB blocks intake once the in-memory
    /// queue is full, and a stop past `service.stop_timeout` loses data.
    pub enabled: bool,
    /// Default `<state_dir>/spool/<name>`.
    pub dir: Option<PathBuf>,
    /// The segment files' total size limit.
    pub max_bytes: u64,
    /// A segment is closed once it reaches this size.
    pub segment_bytes: u64,
    /// `"batch"` (every record) or an interval such as `"100ms"`.
    pub fsync: crate::sink::spool::Fsync,
    /// At `max_bytes`: `"block"` intake or `"drop-oldest"` spooled data.
    pub when_full: WhenFull,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            enabled: true,
            dir: None,
            max_bytes: 1 << 30,
            segment_bytes: 64 << 20,
            fsync: crate::sink::spool::Fsync::Every(Duration::from_millis(100)),
            when_full: WhenFull::Block,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SubscriberConfig {
    pub connect: Vec<String>,
    /// Topic prefix filters; `""` is everything.
    pub topics: Vec<String>,
    pub codec: Codec,
    /// Full batches held in memory while InfluxDB catches up; beyond it
    /// they go to the spool. 64 batches of 5,000 points are ~100 MB: enough
    /// to ride out InfluxDB's latency, while a longer slowdown goes to disk
    /// instead of memory (at 256, a 1M-point burst took the subscriber to
    /// 322 MiB; at 64, 166 MiB at the same throughput).
    pub queue_batches: usize,
    /// Without a spool (`spool.enabled = false`) only `block` applies; with
    /// one, `spool.when_full` decides.
    pub when_full: WhenFull,
    /// The writer is stuck when a batch has been retried this long: the
    /// watchdog stops so systemd can restart (and the spool takes over).
    #[serde(with = "humantime_serde")]
    pub stale_after: Duration,
    /// Counters are written to `nbpy_pipeline` this often.
    #[serde(with = "humantime_serde")]
    pub stats_interval: Duration,
    pub spool: SpoolConfig,
}

impl Default for SubscriberConfig {
    fn default() -> Self {
        SubscriberConfig {
            connect: Vec::new(),
            topics: vec![String::new()],
            codec: Codec::V1,
            queue_batches: 64,
            when_full: WhenFull::Block,
            stale_after: Duration::from_secs(120),
            stats_interval: Duration::from_secs(10),
            spool: SpoolConfig::default(),
        }
    }
}

impl SubscriberConfig {
    /// The spool directory: configured, else `<state_dir>/spool/<name>`.
    pub fn spool_dir(&self, state_dir: &Path, name: &str) -> PathBuf {
        self.spool
            .dir
            .clone()
            .unwrap_or_else(|| state_dir.join("spool").join(name))
    }
}

/// Where the effective configuration came from, for messages.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    Missing(PathBuf),
    /// Found but not readable as a file (a directory, no permission):
    /// figment's own error for that names no file.
    #[error("config file {0}: {1}")]
    Unreadable(PathBuf, String),
    /// Keys that do not parse, each as `key: what (source)`.
    #[error("invalid configuration: {}", .0.join("; "))]
    Parse(Vec<String>),
    #[error("invalid configuration{}: {}", .file.as_ref().map(|f| format!(" ({})", f.display())).unwrap_or_default(), .problems.join("; "))]
    Invalid {
        file: Option<PathBuf>,
        problems: Vec<String>,
    },
}

/// Which file to read: explicit, `$NBPY_CONFIG`, or the system default when present.
pub fn resolve_file(explicit: Option<&Path>) -> Result<Option<PathBuf>, ConfigError> {
    let chosen = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("NBPY_CONFIG").map(PathBuf::from));
    let file = match chosen {
        Some(p) if !p.exists() => return Err(ConfigError::Missing(p)),
        Some(p) => p,
        None if !Path::new(DEFAULT_FILE).exists() => return Ok(None),
        None => PathBuf::from(DEFAULT_FILE),
    };
    if file.is_dir() {
        return Err(ConfigError::Unreadable(file, "is a directory".into()));
    }
    match std::fs::File::open(&file) {
        Ok(_) => Ok(Some(file)),
        Err(e) => Err(ConfigError::Unreadable(file, e.to_string())),
    }
}

pub fn figment(file: Option<&Path>) -> Figment {
    let mut fig = Figment::from(Serialized::defaults(Config::default()));
    if let Some(f) = file {
        fig = fig.merge(Toml::file_exact(f));
    }
    fig.merge(env())
}

/// The `NBPY_*` layer. NBPY_ALLOW_SKIP tells the test suite which tests
/// may skip; it is not configuration, and must not make every binary
/// reject its environment.
fn env() -> Env {
    Env::prefixed("NBPY_")
        .ignore(&["config", "allow_skip"])
        .split("__")
}

/// Extracts the configuration, or every key that does not parse. serde
/// stops at the first bad key, so each one found is taken out and the rest
/// extracted again: a file with two typos is fixed in one round, not two.
fn extract(fig: &Figment) -> Result<Config, Vec<String>> {
    let mut err = match fig.extract::<Config>() {
        Ok(c) => return Ok(c),
        Err(e) => e,
    };
    let mut problems = Vec::new();
    // A syntax error leaves no data to retry with.
    let Ok(mut data) = figment::Provider::data(fig) else {
        return Err(err.into_iter().map(|e| describe(fig, &e)).collect());
    };
    // Each round changes at least one key, so this bounds nothing real.
    for _ in 0..100 {
        let mut changed = false;
        for e in err {
            if let Some(raw) = env_text_for_string(&e) {
                let set = data
                    .values_mut()
                    .fold(false, |set, dict| set | set_string(dict, &e.path, &raw));
                if set {
                    changed = true;
                    continue;
                }
            }
            let p = describe(fig, &e);
            if !problems.contains(&p) {
                problems.push(p);
            }
            for dict in data.values_mut() {
                changed |= remove_key(dict, &e.path);
            }
        }
        if !changed {
            break;
        }
        let rest = data.iter().fold(Figment::new(), |f, (profile, dict)| {
            f.merge(Serialized::from(dict, profile.clone()))
        });
        match rest.extract::<Config>() {
            Ok(c) if problems.is_empty() => return Ok(c),
            Ok(_) => break,
            Err(e) => err = e,
        }
    }
    Err(problems)
}

/// The text of the `NBPY_*` variable behind `e`, when `e` is a string key
/// refusing the number or boolean figment read that text as:
/// `NBPY_INFLUXDB__DATABASE=123` means the database "123". The variable's
/// own text is used, not the number printed back, so `007` or `1.10` stay
/// as written; keys of other types still get numbers and booleans.
fn env_text_for_string(e: &figment::Error) -> Option<String> {
    use figment::error::{Actual, Kind};
    let Kind::InvalidType(actual, expected) = &e.kind else {
        return None;
    };
    let scalar = matches!(
        actual,
        Actual::Bool(_) | Actual::Unsigned(_) | Actual::Signed(_) | Actual::Float(_)
    );
    if !scalar || !matches!(expected.as_str(), "a string" | "path string") {
        return None;
    }
    let key = e.path.join(".");
    env()
        .iter()
        .find(|(k, _)| k.as_str().eq_ignore_ascii_case(&key))
        .map(|(_, v)| v)
}

/// Replaces the value at `path` with `text`; false when it is not there.
fn set_string(dict: &mut figment::value::Dict, path: &[String], text: &str) -> bool {
    use figment::value::{Tag, Value};
    match path {
        [] => false,
        [last] => match dict.get_mut(last) {
            Some(v) => {
                *v = Value::String(Tag::Default, text.to_string());
                true
            }
            None => false,
        },
        [first, rest @ ..] => match dict.get_mut(first) {
            Some(Value::Dict(_, inner)) => set_string(inner, rest, text),
            _ => false,
        },
    }
}

/// `key: what (source)`. figment's own message names the key with the
/// profile in front (`"default.influxdb.batchsize"`), which means nothing
/// to whoever wrote the file, and lists allowed keys in nested backquotes.
fn describe(fig: &Figment, e: &figment::Error) -> String {
    use figment::error::Kind;
    let key = e.path.join(".");
    let what = match &e.kind {
        Kind::UnknownField(_, allowed) => {
            format!("unknown key (allowed here: {})", allowed.join(", "))
        }
        Kind::UnknownVariant(v, allowed) => {
            format!("unknown value {v:?} (allowed: {})", allowed.join(", "))
        }
        other => other.to_string(),
    };
    // The longest part of the path that is a key of its own (an array's
    // items are not) says where the value came from.
    let found = (1..=e.path.len())
        .rev()
        .find_map(|n| Some((n, fig.find_metadata(&e.path[..n].join("."))?)));
    let (n, md) = match found {
        Some((n, md)) => (n, Some(md)),
        None => (0, e.metadata.as_ref()),
    };
    let source = match md {
        Some(md) => match &md.source {
            Some(figment::Source::File(p)) => format!(" (in {})", p.display()),
            _ if n > 0 && md.name.contains("environment") => {
                let var: Vec<String> = e.path[..n].iter().map(|k| k.to_ascii_uppercase()).collect();
                format!(" (from NBPY_{})", var.join("__"))
            }
            _ => String::new(),
        },
        None => String::new(),
    };
    if key.is_empty() {
        format!("{what}{source}")
    } else {
        format!("{key}: {what}{source}")
    }
}

/// Takes `path` out of `dict` (all of an array, for a path into one);
/// false when it is not there.
fn remove_key(dict: &mut figment::value::Dict, path: &[String]) -> bool {
    match path {
        [] => false,
        [last] => dict.remove(last).is_some(),
        [first, rest @ ..] => match dict.get_mut(first) {
            Some(figment::value::Value::Dict(_, inner)) => remove_key(inner, rest),
            Some(_) => dict.remove(first).is_some(),
            None => false,
        },
    }
}

/// Loads, layers and validates the configuration.
pub fn load(explicit: Option<&Path>) -> Result<Loaded, ConfigError> {
    load_resolved(resolve_file(explicit)?)
}

/// [`load`] from `file` as chosen already (`None`: no file, built-in
/// defaults), for a caller whose choice differs from [`resolve_file`]'s:
/// `units install --root` reads the file inside the root.
pub fn load_resolved(file: Option<PathBuf>) -> Result<Loaded, ConfigError> {
    loaded_from(&figment(file.as_deref()), file)
}

/// The file (or the built-in defaults) alone, without `NBPY_*` variables:
/// what a systemd unit reads, for `units install`, which wires instances
/// from it. The installer's environment is not the units'.
pub fn load_file_only(file: Option<PathBuf>) -> Result<Loaded, ConfigError> {
    let mut fig = Figment::from(Serialized::defaults(Config::default()));
    if let Some(f) = &file {
        fig = fig.merge(Toml::file_exact(f));
    }
    loaded_from(&fig, file)
}

fn loaded_from(fig: &Figment, file: Option<PathBuf>) -> Result<Loaded, ConfigError> {
    let mut config = extract(fig).map_err(ConfigError::Parse)?;
    if let Some(dir) = std::env::var_os("STATE_DIRECTORY") {
        // systemd may pass several, colon-separated; the first is ours.
        let first = dir
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_string();
        if !first.is_empty() {
            config.state_dir = PathBuf::from(first);
        }
    }
    let problems = config.problems();
    if !problems.is_empty() {
        return Err(ConfigError::Invalid { file, problems });
    }
    Ok(Loaded { config, file })
}

impl Config {
    /// Everything wrong with the configuration, each naming its key.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if let Err(e) = log_level_problem(&self.log.level) {
            p.push(format!(
                "log.level = {:?}: {e} (allowed: trace, debug, info, warn, error or off, and TARGET=LEVEL directives, e.g. \"info,nbpy::sink=debug\")",
                self.log.level
            ));
        }
        p.extend(http_url_problem(
            "influxdb.url",
            &self.influxdb.url,
            "http://127.0.0.1:8086",
            true,
        ));
        if !influx_name_ok(&self.influxdb.database) {
            p.push(format!(
                "influxdb.database = {:?}: InfluxDB refuses that name; {INFLUX_NAMES}",
                self.influxdb.database
            ));
        }
        if self.influxdb.timeout.is_zero() {
            p.push(
                "influxdb.timeout = 0s: must be > 0 (every request would time out at once)".into(),
            );
        }
        if !(1..=1_000_000).contains(&self.influxdb.batch_size) {
            p.push(format!(
                "influxdb.batch_size = {}: allowed 1..=1000000",
                self.influxdb.batch_size
            ));
        }
        if !(1..=64).contains(&self.influxdb.concurrency) {
            p.push(format!(
                "influxdb.concurrency = {}: allowed 1..=64",
                self.influxdb.concurrency
            ));
        }
        if self.influxdb.retry_min.is_zero() || self.influxdb.retry_min > self.influxdb.retry_max {
            p.push("influxdb.retry_min must be > 0 and <= influxdb.retry_max".into());
        }
        p.extend(self.schema.problems());
        if let Some(user) = &self.influxdb.username {
            // Basic auth splits at the first ':' (see schema.users).
            if user.contains(':') {
                p.push(format!(
                    "influxdb.username = {user:?}: a user name with ':' cannot log in over HTTP Basic auth (it is split at the first ':'); choose a name without ':'"
                ));
            }
            // `schema apply` runs as this user: declared without admin, it
            // would REVOKE its own admin right half-way and leave a server
            // nobody can administer (not even a corrected re-run).
            if let Some(u) = self.schema.users.get(user) {
                if !u.admin {
                    p.push(format!(
                        "schema.users.{user}: admin = true is required: it is influxdb.username, the user `nbpy schema apply` connects as, and without admin apply would revoke its own admin right and lock every admin out"
                    ));
                }
            }
        }
        p.extend(self.grafana.problems());
        // Names become systemd instance names: checked by the rule `nbpy
        // units install` applies, so a name it would fail on fails here.
        p.extend(crate::units::instance_name_problems(self));
        // (port, host) of each bind so far: two on one port collide when
        // their hosts are the same or either is a wildcard (it takes the
        // port on every address); only the second would fail, at start.
        let mut binds: Vec<(u16, BindAddr, &str)> = Vec::new();
        for (name, publ) in &self.publishers {
            let ep = publ.endpoint();
            match crate::bus::parse_endpoint(&ep) {
                Err(e) => p.push(format!("publishers.{name}.endpoint = {ep:?}: {e}")),
                Ok((host, port)) => {
                    let addr = bind_addr(host);
                    if let Some((_, _, other)) = binds
                        .iter()
                        .find(|(p, a, _)| *p == port && binds_collide(a, &addr))
                    {
                        p.push(format!(
                            "publishers.{name}.endpoint = {ep:?} takes the port publishers.{other} binds ({}): only one of them could start",
                            self.publishers[*other].endpoint()
                        ));
                    }
                    binds.push((port, addr, name));
                }
            }
            if let Some(a) = &publ.advertise {
                if let Err(e) = crate::bus::check_endpoint(a) {
                    p.push(format!("publishers.{name}.advertise = {a:?}: {e}"));
                } else if matches!(crate::bus::parse_endpoint(a), Ok((h, _)) if wildcard_host(h)) {
                    // What others connect to: a wildcard is a bind's, and
                    // names no host (validate and health cannot reach it).
                    p.push(format!(
                        "publishers.{name}.advertise = {a:?}: a wildcard host names no host to connect to; give the host name or address subscribers reach this publisher at, or leave advertise out (a wildcard endpoint is then reached on loopback)"
                    ));
                }
            }
            if !publ.rate.is_finite() || publ.rate < 0.0 {
                p.push(format!(
                    "publishers.{name}.rate = {}: allowed 0 (flat out) or a positive number of messages/s",
                    publ.rate
                ));
            }
            if publ.queue == 0 {
                p.push(format!("publishers.{name}.queue must be at least 1"));
            }
            if publ.stall_limit.is_zero() {
                p.push(format!(
                    "publishers.{name}.stall_limit = 0s: must be > 0 (every subscriber whose queue fills would be disconnected at once)"
                ));
            }
            for v in crate::feeds::venue_urls(publ) {
                p.extend(url_problem(
                    &format!("publishers.{name}.{}", v.key),
                    v.url,
                    v.schemes,
                    v.example,
                    false,
                ));
            }
            p.extend(
                crate::feeds::check(publ)
                    .into_iter()
                    .map(|e| format!("publishers.{name}: {e}")),
            );
        }
        for (name, sub) in &self.subscribers {
            if sub.connect.is_empty() {
                p.push(format!(
                    "subscribers.{name}.connect is empty: list at least one endpoint, e.g. [\"tcp://127.0.0.1:5558\"]"
                ));
            }
            for ep in &sub.connect {
                if let Err(e) = crate::bus::check_endpoint(ep) {
                    p.push(format!("subscribers.{name}.connect: {ep:?}: {e}"));
                }
            }
            if sub.queue_batches == 0 {
                p.push(format!(
                    "subscribers.{name}.queue_batches must be at least 1"
                ));
            }
            if sub.when_full == WhenFull::DropOldest {
                p.push(format!(
                    "subscribers.{name}.when_full = \"drop-oldest\" applies to the spool: set subscribers.{name}.spool.when_full instead"
                ));
            }
            let sp = &sub.spool;
            if sp.segment_bytes < 4096 {
                p.push(format!(
                    "subscribers.{name}.spool.segment_bytes = {}: at least 4096",
                    sp.segment_bytes
                ));
            }
            if sp.max_bytes < 2 * sp.segment_bytes {
                p.push(format!(
                    "subscribers.{name}.spool.max_bytes = {} must be at least twice segment_bytes ({})",
                    sp.max_bytes, sp.segment_bytes
                ));
            }
        }
        if let Err(e) = self.health.listen.parse::<std::net::SocketAddr>() {
            p.push(format!(
                "health.listen = {:?}: {e} (expected e.g. 127.0.0.1:9184)",
                self.health.listen
            ));
        }
        if self.health.poll_interval.is_zero() {
            p.push("health.poll_interval must be > 0".into());
        }
        p.extend(self.validate.problems(&self.publishers));
        if let Some(kill) = crate::units::subscriber_timeout_stop() {
            let max = kill.saturating_sub(STOP_MARGIN);
            if self.service.stop_timeout > max {
                p.push(format!(
                    "service.stop_timeout = {}: at most {}: nbpy-subscriber@.service has TimeoutStopSec={}, and a subscriber needs up to {} past its drain budget to spool what is left and exit, or systemd's SIGKILL ends the stop",
                    humantime::format_duration(self.service.stop_timeout),
                    humantime::format_duration(max),
                    humantime::format_duration(kill),
                    humantime::format_duration(STOP_MARGIN),
                ));
            }
        }
        p
    }

    pub fn publisher(&self, name: &str) -> Result<&PublisherConfig, String> {
        self.publishers.get(name).ok_or_else(|| {
            format!(
                "no publisher named {name:?}; configured: {}",
                list(self.publishers.keys())
            )
        })
    }

    pub fn subscriber(&self, name: &str) -> Result<&SubscriberConfig, String> {
        self.subscribers.get(name).ok_or_else(|| {
            format!(
                "no subscriber named {name:?}; configured: {}",
                list(self.subscribers.keys())
            )
        })
    }

    /// The configuration as TOML with URL credentials redacted.
    pub fn to_redacted_toml(&self) -> String {
        let mut c = self.clone();
        c.influxdb.url = redact_url(&c.influxdb.url);
        if let Some(u) = &c.grafana.url {
            c.grafana.url = Some(redact_url(u));
        }
        if let Some(u) = &c.grafana.influxdb_url {
            c.grafana.influxdb_url = Some(redact_url(u));
        }
        for p in c.publishers.values_mut() {
            for u in [&mut p.url, &mut p.betfair.login_url, &mut p.advertise]
                .into_iter()
                .flatten()
            {
                *u = redact_url(u);
            }
        }
        toml::to_string_pretty(&c).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

impl SchemaConfig {
    /// Everything wrong with `[schema]`, each naming its key.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let hour = Duration::from_secs(3600);
        for m in crate::schema::MEASUREMENTS {
            if !self.retention.contains_key(m.rp) {
                p.push(format!(
                    "schema.retention.{} is missing: measurement {} is stored there",
                    m.rp, m.name
                ));
            }
        }
        if crate::schema::MEASUREMENTS.iter().any(|m| m.downsample)
            && !self.retention.contains_key(crate::schema::rp::LONG_TERM)
        {
            p.push(format!(
                "schema.retention.{} is missing: the 1-minute bars are stored there",
                crate::schema::rp::LONG_TERM
            ));
        }
        let defaults: Vec<&String> = self
            .retention
            .iter()
            .filter(|(_, r)| r.default)
            .map(|(n, _)| n)
            .collect();
        if defaults.len() != 1 {
            p.push(format!(
                "schema.retention: exactly one policy must have default = true (found {})",
                if defaults.is_empty() {
                    "none".to_string()
                } else {
                    list(defaults.into_iter())
                }
            ));
        }
        for (name, r) in &self.retention {
            if !influx_name_ok(name) || name.contains('"') {
                p.push(format!(
                    "schema.retention.{name:?}: not a usable policy name: {INFLUX_NAMES}, and no '\"'"
                ));
            }
            if !r.duration.is_zero() && r.duration < hour {
                p.push(format!(
                    "schema.retention.{name}.duration = {}: InfluxDB keeps data at least 1h (or 0s = forever)",
                    humantime::format_duration(r.duration)
                ));
            }
            if r.shard_duration < hour {
                p.push(format!(
                    "schema.retention.{name}.shard_duration = {}: at least 1h",
                    humantime::format_duration(r.shard_duration)
                ));
            }
            if !r.duration.is_zero() && r.shard_duration > r.duration {
                p.push(format!(
                    "schema.retention.{name}.shard_duration must not exceed its duration"
                ));
            }
            if r.duration.subsec_nanos() != 0 || r.shard_duration.subsec_nanos() != 0 {
                p.push(format!("schema.retention.{name}: use whole seconds"));
            }
        }
        if self.resample_every.is_zero() || self.resample_every.subsec_nanos() != 0 {
            p.push("schema.resample_every must be a whole number of seconds, > 0".into());
        }
        if self.resample_for < Duration::from_secs(60) || self.resample_for.subsec_nanos() != 0 {
            p.push("schema.resample_for must be whole seconds and at least 1m (one bar)".into());
        }
        // InfluxDB refuses a query whose FOR is shorter than its EVERY
        // ("FOR duration must be >= GROUP BY time duration"): caught here,
        // `schema apply` would only find out after dropping the old query.
        if self.resample_for < self.resample_every {
            p.push(format!(
                "schema.resample_for = {} is shorter than schema.resample_every = {}: InfluxDB requires FOR >= EVERY (raise resample_for or lower resample_every)",
                humantime::format_duration(self.resample_for),
                humantime::format_duration(self.resample_every)
            ));
        }
        for (name, u) in &self.users {
            if name.is_empty() || name.contains(['"', '\\', '\n', '\'']) {
                p.push(format!("schema.users.{name:?}: not a usable user name"));
            }
            // HTTP Basic auth splits user:password at the first ':', so
            // such a user can never log in: its password would be "wrong"
            // and re-set on every apply.
            if name.contains(':') {
                p.push(format!(
                    "schema.users.{name:?}: a user name with ':' cannot log in over HTTP Basic auth (it is split at the first ':'); choose a name without ':'"
                ));
            }
            if u.password_file.is_none() {
                p.push(format!(
                    "schema.users.{name}.password_file is required (passwords are never inline)"
                ));
            }
        }
        p
    }
}

impl GrafanaConfig {
    /// Everything wrong with `[grafana]`, each naming its key.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let uid_ok = |u: &str| {
            !u.is_empty()
                && u.len() <= 40
                && u.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !uid_ok(&self.datasource_uid) {
            p.push(format!(
                "grafana.datasource_uid = {:?}: 1-40 characters of a-z, A-Z, 0-9, '-', '_'",
                self.datasource_uid
            ));
        }
        if !uid_ok(&self.folder) {
            p.push(format!(
                "grafana.folder = {:?}: 1-40 characters of a-z, A-Z, 0-9, '-', '_' (it is also the folder uid)",
                self.folder
            ));
        }
        for (key, url, example) in [
            ("grafana.url", &self.url, "http://127.0.0.1:3000"),
            (
                "grafana.influxdb_url",
                &self.influxdb_url,
                "http://127.0.0.1:8086",
            ),
        ] {
            if let Some(u) = url {
                p.extend(http_url_problem(key, u, example, false));
            }
        }
        if self.timeout.is_zero() {
            p.push(
                "grafana.timeout = 0s: must be > 0 (every request would time out at once)".into(),
            );
        }
        if self.influxdb_password_file.is_some() && self.influxdb_user.is_none() {
            p.push("grafana.influxdb_password_file is set but grafana.influxdb_user is not".into());
        }
        p
    }
}

fn list<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let v: Vec<&str> = names.map(String::as_str).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// `log.level` must be an `EnvFilter` whose every directive names a level.
/// EnvFilter reads a bare word that is no level (`verbose`, `inf`,
/// `warning`) as a target to log at every level, so a typo would silently
/// leave nbpy logging nothing at all; a bare target is refused here (it
/// can be written `TARGET=trace`).
fn log_level_problem(level: &str) -> Result<(), String> {
    // An empty filter passes EnvFilter and logs nothing but errors: an
    // unset variable in a compose file silencing every service.
    if level.trim().is_empty() {
        return Err("empty".into());
    }
    tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())?;
    for d in level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if !d.contains('=') && d.parse::<tracing::level_filters::LevelFilter>().is_err() {
            return Err(format!("{d:?} is not a level"));
        }
    }
    Ok(())
}

/// `key = url` must be http(s) with a host. A bare `localhost:8086` parses
/// as a URL (scheme "localhost"), so only the HTTP client would refuse it,
/// later, as "builder error for url". `influxdb.url` may also be
/// `file:///PATH`: the line-protocol file sink that `nbpy up` falls back to
/// (and writes into the configuration its children read).
fn http_url_problem(key: &str, url: &str, example: &str, file_ok: bool) -> Option<String> {
    url_problem(key, url, HTTP, example, file_ok)
}

/// The schemes of a URL that HTTP requests go to.
const HTTP: &[&str] = &["http", "https"];

/// `key = url` must use one of `schemes` and name a host (with `file_ok`,
/// `file:///PATH` too). Every URL key is checked here, so each says what is
/// wrong the same way: the key and value, then what is allowed with an
/// example. A URL of the wrong kind otherwise parses and fails only when
/// the service first connects, far from the file that holds it.
pub(crate) fn url_problem(
    key: &str,
    url: &str,
    schemes: &[&str],
    example: &str,
    file_ok: bool,
) -> Option<String> {
    let starts: Vec<String> = schemes.iter().map(|s| format!("{s}://")).collect();
    let starts = match starts.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    };
    let allowed = if file_ok {
        format!("must start with {starts} (e.g. {example}), or be file:///PATH for a line-protocol file")
    } else {
        format!("must start with {starts} (e.g. {example})")
    };
    // Printed without its password: `config check` goes to logs.
    let shown = redact_url(url);
    match reqwest::Url::parse(url) {
        Err(e) => Some(format!("{key} = {shown:?}: {e}; {allowed}")),
        Ok(u) if schemes.contains(&u.scheme()) && u.host_str().is_some_and(|h| !h.is_empty()) => {
            None
        }
        Ok(u) if file_ok && u.scheme() == "file" && u.to_file_path().is_ok() => None,
        Ok(_) => Some(format!("{key} = {shown:?}: {allowed}")),
    }
}

/// What [`influx_name_ok`] allows, for messages.
const INFLUX_NAMES: &str = "allowed: 1-255 bytes of letters, digits, ASCII punctuation and inner spaces, not \".\" or \"..\", without '/' or '\\'";

/// Whether InfluxDB 1.x takes `name` for a database or retention policy.
/// It refuses (tried against influxd 1.6) names that are empty, `.` or
/// `..`, contain `/` or `\` (names become directories under its data dir)
/// or any character Go's `unicode.IsPrint` rejects (controls, tabs, other
/// spaces than ' ', zero-width and format characters), and names over 255
/// bytes; `CREATE DATABASE` then fails with just "invalid name". Rust's std
/// cannot tell format characters apart, so beyond ASCII only letters and
/// digits pass here: a subset of InfluxDB's rule, so a name that passes is
/// one it takes. Leading and trailing spaces are refused too: later 1.x
/// releases trim them, so the name would change under an upgrade.
fn influx_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.starts_with(' ')
        && !name.ends_with(' ')
        && name.chars().all(|c| {
            (c.is_ascii() && (' '..='~').contains(&c) && c != '/' && c != '\\')
                || (!c.is_ascii() && c.is_alphanumeric())
        })
}

/// `http://user:secret@host` → `http://user:***@host`.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(_) => url.to_string(),
        // One that does not parse (the error that names it is printed)
        // may still hold a password: `scheme://user:secret@host…` by text.
        Err(_) => {
            let Some((scheme, rest)) = url.split_once("://") else {
                return url.to_string();
            };
            let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            match rest[..auth_end].rsplit_once('@') {
                Some((userinfo, _)) if userinfo.contains(':') => {
                    let user = userinfo.split(':').next().unwrap_or("");
                    format!("{scheme}://{user}:***@{}", &rest[userinfo.len() + 1..])
                }
                _ => url.to_string(),
            }
        }
    }
}

/// Reads the secret that the config key `key` names, trimming trailing
/// newlines. A relative name is looked up in `$CREDENTIALS_DIRECTORY` first
/// (systemd `LoadCredential=`), so units can say `password_file =
/// "influxdb-password"`, and in the working directory after that.
///
/// A file that is empty or only whitespace is refused: read as a password
/// it would set (or log in with) the empty string, which is never what
/// whoever pointed a key at the file meant.
pub fn read_secret(key: &str, path: &Path) -> Result<String, SecretError> {
    read_secret_in(
        key,
        path,
        std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
    )
}

fn read_secret_in(key: &str, path: &Path, creds: Option<PathBuf>) -> Result<String, SecretError> {
    let credential = credential_path(path, creds.as_deref());
    let resolved = match &credential {
        Some(c) if c.exists() => c.clone(),
        _ => path.to_path_buf(),
    };
    let error = |problem| SecretError {
        key: key.to_string(),
        path: resolved.clone(),
        // Both places were tried only when the credential was not there.
        credential: credential.clone().filter(|c| *c != resolved),
        problem,
    };
    let text = std::fs::read_to_string(&resolved).map_err(|e| error(SecretProblem::Io(e)))?;
    if text.trim().is_empty() {
        return Err(error(SecretProblem::Empty));
    }
    Ok(text.trim_end_matches(['\n', '\r']).to_string())
}

/// Every `*_file` key in the configuration, with its dotted name.
pub fn secret_files(cfg: &Config) -> Vec<(String, PathBuf)> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut Vec<(String, PathBuf)>) {
        if let toml::Value::Table(t) = v {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match v {
                    toml::Value::String(s) if k.ends_with("_file") && k != "file" => {
                        out.push((key, PathBuf::from(s)))
                    }
                    _ => walk(&key, v, out),
                }
            }
        }
    }
    let mut out = Vec::new();
    if let Ok(v) = toml::Value::try_from(cfg) {
        walk("", &v, &mut out);
    }
    out
}

/// Where a secret file is read from: a relative name is a systemd
/// credential (under `$CREDENTIALS_DIRECTORY`) when there is one.
pub fn secret_path(path: &Path) -> PathBuf {
    let creds = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    credential_path(path, creds.as_deref())
        .filter(|p| p.exists())
        .unwrap_or_else(|| path.to_path_buf())
}

/// A relative name under the credentials directory, when there is one.
fn credential_path(path: &Path, creds: Option<&Path>) -> Option<PathBuf> {
    creds.filter(|_| path.is_relative()).map(|d| d.join(path))
}

#[derive(Debug)]
pub struct SecretError {
    /// The config key that names the file.
    pub key: String,
    /// The file read (or tried last).
    pub path: PathBuf,
    /// `$CREDENTIALS_DIRECTORY/<name>`, when it was tried first and was not
    /// there: a relative name that is in neither place is easier to fix
    /// when the message says where it was looked for.
    pub credential: Option<PathBuf>,
    pub problem: SecretProblem,
}

#[derive(Debug)]
pub enum SecretProblem {
    Io(std::io::Error),
    /// Empty, or nothing but whitespace.
    Empty,
}

impl SecretError {
    pub fn is_empty(&self) -> bool {
        matches!(self.problem, SecretProblem::Empty)
    }
}

impl fmt::Display for SecretError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = &self.key;
        let path = self.path.display();
        match (&self.problem, &self.credential) {
            (SecretProblem::Empty, _) => {
                write!(f, "{key}: secret file {path} is empty (or only whitespace)")
            }
            (SecretProblem::Io(e), None) => {
                write!(f, "{key}: cannot read secret file {path}: {e}")
            }
            (SecretProblem::Io(e), Some(c)) => {
                let cwd = std::env::current_dir()
                    .map(|d| d.join(&self.path))
                    .unwrap_or_else(|_| self.path.clone());
                write!(
                    f,
                    "{key}: cannot read secret file {path}: {e} (looked in $CREDENTIALS_DIRECTORY as {} and in the working directory as {})",
                    c.display(),
                    cwd.display()
                )
            }
        }
    }
}

impl std::error::Error for SecretError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_path_that_is_no_readable_file_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = load(Some(dir.path())).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("config file {}: is a directory", dir.path().display())
        );
        let missing = dir.path().join("nbpy.toml");
        let e = load(Some(&missing)).unwrap_err().to_string();
        assert!(e.contains(&missing.display().to_string()), "{e}");
    }

    #[test]
    fn an_empty_or_blank_secret_file_is_refused_naming_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [("empty", ""), ("newline", "\n"), ("blank", " \t\r\n ")] {
            let f = dir.path().join(name);
            std::fs::write(&f, text).unwrap();
            let e = read_secret_in("influxdb.password_file", &f, None).unwrap_err();
            assert!(e.is_empty(), "{name}: {e}");
            assert_eq!(
                e.to_string(),
                format!(
                    "influxdb.password_file: secret file {} is empty (or only whitespace)",
                    f.display()
                )
            );
        }
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3 cret\r\n").unwrap();
        assert_eq!(read_secret_in("k", &f, None).unwrap(), "s3 cret");
    }

    #[test]
    fn a_missing_relative_secret_names_both_places_it_was_looked_for() {
        let creds = tempfile::tempdir().unwrap();
        let name = Path::new("nbpy-test-no-such-credential");
        let e = read_secret_in(
            "schema.users.w.password_file",
            name,
            Some(creds.path().into()),
        )
        .unwrap_err()
        .to_string();
        let cwd = std::env::current_dir().unwrap().join(name);
        assert!(
            e.starts_with(
                "schema.users.w.password_file: cannot read secret file nbpy-test-no-such-credential: "
            ) && e.ends_with(&format!(
                "(looked in $CREDENTIALS_DIRECTORY as {} and in the working directory as {})",
                creds.path().join(name).display(),
                cwd.display()
            )),
            "{e}"
        );
        // Found as a credential: read from there, and an empty one names it.
        std::fs::write(creds.path().join(name), "").unwrap();
        let e = read_secret_in("k", name, Some(creds.path().into())).unwrap_err();
        assert!(e.is_empty());
        assert_eq!(e.path, creds.path().join(name));
        std::fs::write(creds.path().join(name), "pw\n").unwrap();
        assert_eq!(
            read_secret_in("k", name, Some(creds.path().into())).unwrap(),
            "pw"
        );
        // Without a credentials directory only the file itself is named.
        let e = read_secret_in("k", name, None).unwrap_err().to_string();
        assert!(!e.contains("CREDENTIALS_DIRECTORY"), "{e}");
    }

    #[test]
    fn every_key_that_does_not_parse_is_reported_without_the_profile() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("nbpy.toml");
        std::fs::write(
            &f,
            "bogus = 1\n[influxdb]\nbatchsize = 5\ntimeout = \"soon\"\n\
             [subscribers.s]\nconnect = [1]\nqueue_batches = \"x\"\n",
        )
        .unwrap();
        let fig =
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::file_exact(&f));
        let p = extract(&fig).unwrap_err();
        let at = format!(" (in {})", f.display());
        let keys: Vec<&str> = p.iter().map(|p| p.split(':').next().unwrap()).collect();
        assert_eq!(
            keys,
            [
                "bogus",
                "influxdb.batchsize",
                "influxdb.timeout",
                "subscribers.s.connect.0",
                "subscribers.s.queue_batches"
            ],
            "{p:#?}"
        );
        assert!(
            p.iter()
                .all(|p| p.ends_with(&at) && !p.contains("default.")),
            "{p:#?}"
        );
        assert!(
            p[0].starts_with("bogus: unknown key (allowed here: state_dir, log, influxdb,"),
            "{}",
            p[0]
        );

        // A syntax error is one problem, still naming the file.
        std::fs::write(&f, "[influxdb\n").unwrap();
        let fig =
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::file_exact(&f));
        let p = extract(&fig).unwrap_err();
        assert!(
            p.len() == 1 && p[0].contains("TOML parse error") && p[0].ends_with(&at),
            "{p:?}"
        );
    }

    /// The problems of `toml_text` over the built-in defaults.
    fn problems_of(toml_text: &str) -> Vec<String> {
        let c: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(toml_text))
            .extract()
            .unwrap();
        c.problems()
    }

    fn assert_one_problem(toml_text: &str, starts: &str, says: &str) {
        let p = problems_of(toml_text);
        assert!(
            p.len() == 1 && p[0].starts_with(starts) && p[0].contains(says),
            "{toml_text}: {p:?}"
        );
    }

    /// InfluxDB refuses a continuous query whose FOR is shorter than its
    /// EVERY; `schema apply` replaces a query by DROP + CREATE, so the
    /// pair is refused before any apply can get that far.
    #[test]
    fn resample_for_shorter_than_resample_every_is_refused() {
        for (every, for_) in [("3m", "2m"), ("5m", "2m"), ("1w", "1m"), ("3600s", "61s")] {
            assert_one_problem(
                &format!("[schema]\nresample_every = \"{every}\"\nresample_for = \"{for_}\"\n"),
                "schema.resample_for = ",
                "is shorter than schema.resample_every = ",
            );
        }
        let p = problems_of("[schema]\nresample_every = \"3m\"\nresample_for = \"2m\"\n");
        assert_eq!(
            p,
            vec!["schema.resample_for = 2m is shorter than schema.resample_every = 3m: InfluxDB requires FOR >= EVERY (raise resample_for or lower resample_every)"]
        );
        for ok in [("3m", "3m"), ("30s", "2m"), ("5m", "1h")] {
            let t = format!(
                "[schema]\nresample_every = \"{}\"\nresample_for = \"{}\"\n",
                ok.0, ok.1
            );
            assert_eq!(problems_of(&t), Vec::<String>::new(), "{t}");
        }
    }

    /// The user `schema apply` connects as must stay admin: declared
    /// without `admin = true`, apply would revoke its own right half-way.
    #[test]
    fn the_connect_user_declared_without_admin_is_refused() {
        let base = "[influxdb]\nusername = \"admin\"\npassword_file = \"a.pw\"\n";
        assert_one_problem(
            &format!("{base}[schema.users.admin]\nprivilege = \"all\"\npassword_file = \"a.pw\"\n"),
            "schema.users.admin: admin = true is required",
            "influxdb.username",
        );
        for ok in [
            format!("{base}[schema.users.admin]\nadmin = true\npassword_file = \"a.pw\"\n"),
            // Another user may well be a non-admin.
            format!(
                "{base}[schema.users.grafana]\nprivilege = \"read\"\npassword_file = \"g.pw\"\n"
            ),
            // No auth in use: nothing to lock out.
            "[schema.users.admin]\nprivilege = \"all\"\npassword_file = \"a.pw\"\n".to_string(),
        ] {
            assert_eq!(problems_of(&ok), Vec::<String>::new(), "{ok}");
        }
    }

    /// HTTP Basic auth splits `user:password` at the first ':': such a
    /// user never logs in, so apply would re-set its password forever.
    #[test]
    fn user_names_with_a_colon_are_refused() {
        assert_one_problem(
            "[schema.users.\"svc:ro\"]\nprivilege = \"read\"\npassword_file = \"c.pw\"\n",
            "schema.users.\"svc:ro\": a user name with ':' cannot log in",
            "HTTP Basic auth",
        );
        assert_one_problem(
            "[influxdb]\nusername = \"a:b\"\npassword_file = \"a.pw\"\n",
            "influxdb.username = \"a:b\": a user name with ':' cannot log in",
            "HTTP Basic auth",
        );
    }

    #[test]
    fn urls_without_http_are_refused_naming_the_key() {
        for (toml_text, key) in [
            (
                "[influxdb]\nurl = \"localhost:8086\"",
                "influxdb.url = \"localhost:8086\"",
            ),
            (
                "[influxdb]\nurl = \"ftp://h/x\"",
                "influxdb.url = \"ftp://h/x\"",
            ),
            (
                "[influxdb]\nurl = \"127.0.0.1:8086\"",
                "influxdb.url = \"127.0.0.1:8086\"",
            ),
            (
                "[grafana]\nurl = \"localhost:3000\"",
                "grafana.url = \"localhost:3000\"",
            ),
            (
                "[grafana]\ninfluxdb_url = \"influxdb:8086\"",
                "grafana.influxdb_url = \"influxdb:8086\"",
            ),
            (
                "[grafana]\nurl = \"file:///tmp/g\"",
                "grafana.url = \"file:///tmp/g\"",
            ),
        ] {
            assert_one_problem(toml_text, key, "must start with http:// or https://");
        }
        for ok in [
            "[influxdb]\nurl = \"https://influx.example.com/sub\"",
            "[influxdb]\nurl = \"file:///var/lib/nbpy/points.lp\"",
            "[grafana]\nurl = \"http://127.0.0.1:3000\"",
        ] {
            assert_eq!(problems_of(ok), Vec::<String>::new(), "{ok}");
        }
    }

    /// Each feed's venue URL keys take only the schemes its client speaks
    /// (WebSocket for Kraken, HTTP for OANDA, X and Betfair's login), in
    /// the words `influxdb.url` uses: the key, the value, what is allowed.
    #[test]
    fn venue_urls_of_the_wrong_kind_are_refused_naming_the_key() {
        let oanda = "[publishers.fx]\nfeed = \"oanda-tick\"\ninstruments = [\"EUR_USD\"]\n\
                     [publishers.fx.oanda]\naccount = \"1-2\"\ntoken_file = \"t\"\n";
        let social = "[publishers.s]\nfeed = \"social\"\n[publishers.s.social]\n\
                      bearer_token_file = \"t\"\nrules = [{ value = \"btc\" }]\n";
        let betfair = "[publishers.odds]\nfeed = \"betfair-stream\"\n[publishers.odds.betfair]\n\
                       app_key_file = \"k\"\nsession_token_file = \"t\"\nevent_types = [\"7\"]\n";
        let kraken = "[publishers.k]\nfeed = \"kraken-tick\"\n";
        let ws = "must start with ws:// or wss:// (e.g. wss://ws.kraken.com/v2)";
        let http = |e: &str| format!("must start with http:// or https:// (e.g. {e})");
        let oanda_http = http("https://stream-fxpractice.oanda.com");
        let social_http = http("https://api.x.com");
        let login_http = http("https://identitysso-cert.betfair.com/api/certlogin");
        for (base, at, set, key, says) in [
            (
                kraken,
                "publishers.k",
                "url = \"kraken.com\"",
                "publishers.k.url = \"kraken.com\"",
                ws,
            ),
            (
                kraken,
                "publishers.k",
                "url = \"https://ws.kraken.com\"",
                "publishers.k.url = \"https://ws.kraken.com\"",
                ws,
            ),
            (
                oanda,
                "publishers.fx",
                "url = \"ftp://x\"",
                "publishers.fx.url = \"ftp://x\"",
                &oanda_http,
            ),
            (
                oanda,
                "publishers.fx",
                "url = \"wss://x\"",
                "publishers.fx.url = \"wss://x\"",
                &oanda_http,
            ),
            (
                oanda,
                "publishers.fx",
                "url = \"stream-fxtrade.oanda.com\"",
                "publishers.fx.url = \"stream-fxtrade.oanda.com\"",
                &oanda_http,
            ),
            (
                social,
                "publishers.s",
                "url = \"api.x.com\"",
                "publishers.s.url = \"api.x.com\"",
                &social_http,
            ),
            (
                betfair,
                "publishers.odds.betfair",
                "login_url = \"ftp://login\"",
                "publishers.odds.betfair.login_url = \"ftp://login\"",
                &login_http,
            ),
        ] {
            let (head, rest) = base.split_at(base.find(&format!("[{at}]")).unwrap());
            let (table, tail) = rest.split_at(rest.find('\n').unwrap() + 1);
            let toml_text = format!("{head}{table}{set}\n{tail}");
            assert_one_problem(&toml_text, key, says);
        }
        for ok in [
            format!("{kraken}url = \"ws://127.0.0.1:9\"\n"),
            oanda.replace("instruments", "url = \"http://127.0.0.1:9/\"\ninstruments"),
            social.replace(
                "[publishers.s.social]",
                "url = \"https://api.x.com\"\n[publishers.s.social]",
            ),
            // Betfair's stream is a raw TLS endpoint, host:port allowed.
            betfair.replace(
                "[publishers.odds.betfair]",
                "url = \"stream-api.betfair.com:443\"\n[publishers.odds.betfair]",
            ) + "login_url = \"http://127.0.0.1:9/login\"\n",
        ] {
            assert_eq!(problems_of(&ok), Vec::<String>::new(), "{ok}");
        }
    }

    #[test]
    fn a_zero_timeout_is_refused() {
        assert_one_problem(
            "[influxdb]\ntimeout = \"0s\"",
            "influxdb.timeout = 0s",
            "> 0",
        );
        assert_one_problem("[grafana]\ntimeout = \"0s\"", "grafana.timeout = 0s", "> 0");
        assert_one_problem(
            "[publishers.p]\nstall_limit = \"0s\"",
            "publishers.p.stall_limit = 0s",
            "> 0",
        );
    }

    #[test]
    fn database_names_influxdb_refuses_are_refused() {
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "x\\\\y",
            "a\\tb",
            "a\\nb",
            "a\\u0001b",
            "a\\u007fb",
            "a\\u00a0b",
            "a\\u200bb",
            " tick",
            "tick ",
        ] {
            assert_one_problem(
                &format!("[influxdb]\ndatabase = \"{bad}\""),
                "influxdb.database = ",
                "allowed: 1-255 bytes",
            );
        }
        assert_one_problem(
            &format!("[influxdb]\ndatabase = \"{}\"", "x".repeat(256)),
            "influxdb.database = ",
            "allowed",
        );
        for good in [
            "tick",
            "tick-1",
            "a.b",
            "a b",
            "1m",
            "t\\u00e9st",
            "_x",
            &"x".repeat(255),
        ] {
            let t = format!("[influxdb]\ndatabase = \"{good}\"");
            assert_eq!(problems_of(&t), Vec::<String>::new(), "{t}");
        }
        assert_one_problem(
            "[schema.retention.\"a/b\"]\nduration = \"1d\"\nshard_duration = \"1h\"",
            "schema.retention.\"a/b\": not a usable policy name",
            "allowed",
        );
    }

    #[test]
    fn a_log_level_that_is_no_filter_is_refused() {
        for bad in [
            "verbose!!",
            "verbose",
            "inf",
            "info,nbpy::sink",
            "nbpy=loud",
        ] {
            assert_one_problem(
                &format!("[log]\nlevel = \"{bad}\""),
                &format!("log.level = {bad:?}: "),
                "allowed: trace, debug, info, warn, error or off",
            );
        }
        for ok in [
            "debug",
            "info,nbpy::sink=debug",
            "WARN",
            "off",
            "nbpy=trace",
        ] {
            let t = format!("[log]\nlevel = \"{ok}\"");
            assert_eq!(problems_of(&t), Vec::<String>::new(), "{t}");
        }
    }

    #[test]
    fn a_stop_timeout_the_unit_would_cut_short_is_refused() {
        let kill = crate::units::subscriber_timeout_stop()
            .expect("the subscriber unit has TimeoutStopSec=");
        assert_eq!(kill, Duration::from_secs(45));
        assert_one_problem(
            "[service]\nstop_timeout = \"41s\"",
            "service.stop_timeout = 41s: at most 40s: nbpy-subscriber@.service has TimeoutStopSec=45s",
            "SIGKILL",
        );
        assert!(problems_of("[service]\nstop_timeout = \"40s\"").is_empty());
    }

    #[test]
    fn a_validate_run_the_unit_would_kill_is_refused() {
        let limit = crate::units::validate_timeout_start().expect("TimeoutStartSec=");
        assert_eq!(limit, Duration::from_secs(180));
        // 5 s connect + 150 s + 15 s settle + 10 s for the queries = 180 s.
        assert!(problems_of("[validate]\nduration = \"150s\"").is_empty());
        assert_one_problem(
            "[validate]\nduration = \"151s\"",
            "validate.connect_timeout + duration + settle = 2m 51s",
            "TimeoutStartSec=3m",
        );
    }

    #[test]
    fn an_empty_log_level_is_refused() {
        assert_one_problem("[log]\nlevel = \"\"", "log.level = \"\": empty", "allowed");
    }

    #[test]
    fn a_name_starting_with_a_dash_is_refused() {
        assert_one_problem(
            "[publishers.-x]\nendpoint = \"tcp://127.0.0.1:5999\"",
            "publishers.-x: a name may not start with '-'",
            "option",
        );
    }

    #[test]
    fn binds_that_would_collide_are_refused_whatever_their_spelling() {
        for (a, b) in [
            ("tcp://0.0.0.0:5999", "tcp://127.0.0.1:5999"),
            ("tcp://localhost:5999", "tcp://127.0.0.1:5999"),
            ("tcp://127.0.0.1:5999", "tcp://*:5999"),
        ] {
            let t =
                format!("[publishers.a]\nendpoint = \"{a}\"\n[publishers.b]\nendpoint = \"{b}\"");
            assert_one_problem(
                &t,
                &format!("publishers.b.endpoint = \"{b}\" takes the port publishers.a binds"),
                "only one",
            );
        }
        // Two addresses of this host on one port do not collide, nor an IPv4
        // wildcard and an IPv6 address.
        for (a, b) in [
            ("tcp://127.0.0.1:5999", "tcp://127.0.0.2:5999"),
            ("tcp://0.0.0.0:5999", "tcp://[::1]:5999"),
            ("tcp://*:5999", "tcp://[::1]:5999"),
        ] {
            let t =
                format!("[publishers.a]\nendpoint = \"{a}\"\n[publishers.b]\nendpoint = \"{b}\"");
            assert!(problems_of(&t).is_empty(), "{t}");
        }
        // One address spelled two ways, or a wildcard spelled `0`, does.
        for (a, b) in [
            ("tcp://[::1]:5999", "tcp://[0:0:0:0:0:0:0:1]:5999"),
            ("tcp://0:5999", "tcp://127.0.0.1:5999"),
            ("tcp://[::]:5999", "tcp://127.0.0.1:5999"),
        ] {
            let t =
                format!("[publishers.a]\nendpoint = \"{a}\"\n[publishers.b]\nendpoint = \"{b}\"");
            assert_eq!(problems_of(&t).len(), 1, "{t}");
        }
    }

    #[test]
    fn a_wildcard_advertise_is_refused() {
        for host in ["*", "0.0.0.0", "[::]"] {
            let t = format!(
                "[publishers.a]\nendpoint = \"tcp://*:5999\"\nadvertise = \"tcp://{host}:5999\""
            );
            let problems = problems_of(&t);
            assert!(
                problems
                    .iter()
                    .any(|p| p.contains("publishers.a.advertise") && p.contains("names no host")),
                "{host}: {problems:?}"
            );
        }
        let t = "[publishers.a]\nendpoint = \"tcp://*:5999\"\nadvertise = \"tcp://pub-a:5999\"";
        assert!(problems_of(t).is_empty());
    }

    #[test]
    fn a_wildcard_bind_is_reached_on_loopback_unless_advertised() {
        let p = |t: &str| -> PublisherConfig {
            Figment::from(Serialized::defaults(PublisherConfig::default()))
                .merge(Toml::string(t))
                .extract()
                .unwrap()
        };
        assert_eq!(
            p("endpoint = \"tcp://0.0.0.0:5570\"").reach(),
            "tcp://127.0.0.1:5570"
        );
        assert_eq!(
            p("endpoint = \"tcp://*:5570\"").reach(),
            "tcp://127.0.0.1:5570"
        );
        assert_eq!(
            p("endpoint = \"tcp://[::]:5570\"").reach(),
            "tcp://[::1]:5570"
        );
        assert_eq!(
            p("endpoint = \"tcp://10.0.0.5:5570\"").reach(),
            "tcp://10.0.0.5:5570"
        );
        assert_eq!(
            p("endpoint = \"tcp://0.0.0.0:5570\"\nadvertise = \"tcp://publisher-synth:5570\"")
                .reach(),
            "tcp://publisher-synth:5570"
        );
    }

    #[test]
    fn passwords_in_urls_are_never_printed() {
        // A URL that is wrong (its scheme) still hides its password.
        let p = problems_of("[influxdb]\nurl = \"htp://admin:s3cretpw@influx:8086\"");
        assert!(
            p.len() == 1 && !p[0].contains("s3cretpw") && p[0].contains("admin:***@"),
            "{p:?}"
        );
        let p = problems_of("[influxdb]\nurl = \"http://admin:s3cretpw@\"");
        assert!(p.len() == 1 && !p[0].contains("s3cretpw"), "{p:?}");
        // config show: every URL key, Betfair's login too.
        let c: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(
                "[publishers.odds.betfair]\nlogin_url = \"https://u:s3cretpw@login.example/api\"",
            ))
            .extract()
            .unwrap();
        let shown = c.to_redacted_toml();
        assert!(
            !shown.contains("s3cretpw") && shown.contains("u:***@"),
            "{shown}"
        );
    }

    fn influx(toml_text: &str) -> Result<InfluxConfig, String> {
        Figment::from(Serialized::defaults(InfluxConfig::default()))
            .merge(Toml::string(toml_text))
            .extract()
            .map_err(|e| e.to_string())
    }

    #[test]
    fn gzip_is_a_boolean_or_auto_and_auto_skips_loopback() {
        assert_eq!(influx("").unwrap().gzip, Gzip::Auto);
        assert_eq!(influx("gzip = true").unwrap().gzip, Gzip::On);
        assert_eq!(influx("gzip = false").unwrap().gzip, Gzip::Off);
        assert_eq!(influx("gzip = \"auto\"").unwrap().gzip, Gzip::Auto);
        let err = influx("gzip = \"fast\"").unwrap_err();
        assert!(err.contains("true, false or \"auto\""), "{err}");
        assert!(influx("gzip = 1").is_err());

        let at = |url: &str, gzip| {
            InfluxConfig {
                url: url.into(),
                gzip,
                ..Default::default()
            }
            .gzip_enabled()
        };
        for local in [
            "http://127.0.0.1:8086",
            "http://127.8.9.10:8086",
            "http://localhost:8086",
            "http://[::1]:8086",
        ] {
            assert!(!at(local, Gzip::Auto), "{local}");
            assert!(at(local, Gzip::On), "{local}");
        }
        for remote in [
            "http://10.0.0.5:8086",
            "https://influx.example.com",
            "http://[2001:db8::1]:8086",
        ] {
            assert!(at(remote, Gzip::Auto), "{remote}");
            assert!(!at(remote, Gzip::Off), "{remote}");
        }
        // What `config show` prints reads back the same.
        for g in [Gzip::Auto, Gzip::On, Gzip::Off] {
            let c = InfluxConfig {
                gzip: g,
                ..Default::default()
            };
            let text = toml::to_string(&c).unwrap();
            assert_eq!(influx(&text).unwrap().gzip, g, "{text}");
        }
    }
}
