//! Phase 5: an end-to-end check that reconciles every message.
//!
//! `nbpy validate` listens to every configured publisher for a window (a
//! [`Tap`] each, subscribed to everything), then asks InfluxDB how many of
//! exactly those messages were stored, and reports the difference per
//! publisher and measurement.
//!
//! Why this is exact: every message carries its publisher's `seq` (one per
//! message, counting up, never reused within an `epoch`) and every stored
//! point keeps `publisher` as a tag and `seq`/`epoch` as fields. So for each
//! publisher and epoch the validator knows the range of sequence numbers
//! published during the window, `[first, last]`, and which of them it saw
//! itself, as runs of consecutive numbers. It then counts, per measurement,
//! the stored points whose `seq` lies in the runs it saw: the difference to
//! what it saw is loss, attributed to that measurement. Numbers inside the
//! range that it did not see (its own gaps: a live feed dropped them, or the
//! validator joined a restarted publisher late) cannot be attributed to a
//! measurement; they are counted per publisher: published − seen, and of
//! those, how many were stored anyway (counted over the whole range).
//!
//! An epoch that began during the window is counted from `seq` 1, so
//! messages a restarted publisher sent before the validator reconnected are
//! part of the range too. "Began during the window" is what the validator
//! saw, never a comparison of clocks: the epoch is the publisher's start
//! time by the publisher's clock, and one an hour fast would otherwise
//! "start" in the validator's future and have every earlier message of a
//! long-running epoch claimed as lost. So an epoch began in the window when
//! its first message seen is `seq` 1, or when it first appeared after the
//! validator reconnected (the publisher restarted). Likewise the stored
//! points are looked for around the times the messages themselves carry
//! (the publisher's or venue's clock, whichever stamped them), never
//! around the validator's clock.
//!
//! Subscribers write in batches every `influxdb.flush_interval`, so after the
//! window the counts are polled until they are complete or `validate.settle`
//! runs out. A pause in the counts proves nothing: a subscriber that was
//! stopped for a few seconds, or is replaying its spool after an InfluxDB
//! outage, stores the rest late, and calling that loss would be wrong. What
//! is still missing when `settle` runs out is reported as "still not
//! stored after waiting", which is loss as far as this run can tell. Only
//! messages the validator saw are waited for: those it never saw are
//! counted once, after the wait, and reported as never seen on the bus
//! (published while it was not connected, around a publisher restart).
//!
//! Thresholds (`[validate]`): `max_loss_ratio` per publisher and per
//! measurement, `max_latency` for the 99th percentile of receive time −
//! exchange time (not checked for replayed feeds, whose exchange times are
//! historical), `min_rate` per publisher. Breaking one exits with
//! `DATAERR` (65); an unreachable publisher or InfluxDB (or its database
//! missing), or a publisher that went away during the window and did not
//! come back, exits with `UNAVAILABLE` (69); InfluxDB refusing the
//! credentials with `NOPERM` (77), as elsewhere in nbpy. Each names what
//! broke.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::{Config, PublisherConfig};
use crate::exit::{Failure, DATAERR, NOPERM, UNAVAILABLE};
use crate::feeds::FeedKind;
use crate::health::tap::{Tap, TapEvent};
use crate::sink::influx::{InfluxClient, WriteError};
use crate::wire::now_ns;

/// `[validate]`: how long to listen and what counts as broken.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ValidateConfig {
    /// How long to listen to the bus (`nbpy validate --duration` wins).
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// How long to wait after the window for the subscribers' writes to land.
    #[serde(with = "humantime_serde")]
    pub settle: Duration,
    /// How long a publisher may take to accept the validator's connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Largest acceptable (lost / published), per publisher and measurement.
    pub max_loss_ratio: f64,
    /// Largest acceptable 99th percentile of receive − exchange time.
    #[serde(with = "humantime_serde")]
    pub max_latency: Duration,
    /// Smallest acceptable message rate per publisher (msg/s); 0 = any.
    pub min_rate: f64,
    /// Publishers to check; empty = every configured publisher.
    pub publishers: Vec<String>,
    /// Publishers that may legitimately send nothing in a window (a venue
    /// whose market closes: OANDA over the weekend, a Betfair market
    /// between events). For the others, an empty window fails the check:
    /// nothing was reconciled, so "no loss" would vouch for nothing.
    pub idle_ok: Vec<String>,
}

impl Default for ValidateConfig {
    fn default() -> Self {
        ValidateConfig {
            duration: Duration::from_secs(15),
            settle: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(5),
            max_loss_ratio: 0.0,
            max_latency: Duration::from_secs(5),
            min_rate: 0.0,
            publishers: Vec::new(),
            idle_ok: Vec::new(),
        }
    }
}

/// What `nbpy validate` needs past its settle to query and judge.
const QUERY_MARGIN: Duration = Duration::from_secs(10);

impl ValidateConfig {
    pub fn problems(&self, publishers: &BTreeMap<String, PublisherConfig>) -> Vec<String> {
        let mut p = Vec::new();
        if !(0.0..=1.0).contains(&self.max_loss_ratio) {
            p.push(format!(
                "validate.max_loss_ratio = {}: allowed 0.0..=1.0",
                self.max_loss_ratio
            ));
        }
        if !self.min_rate.is_finite() || self.min_rate < 0.0 {
            p.push(format!(
                "validate.min_rate = {}: allowed 0 or a positive number of messages/s",
                self.min_rate
            ));
        }
        if self.duration.is_zero() {
            p.push("validate.duration must be > 0".into());
        }
        if let Some(limit) = crate::units::validate_timeout_start() {
            // Connecting, the window and the settle, and then the queries.
            let need = self.connect_timeout + self.duration + self.settle + QUERY_MARGIN;
            if need > limit {
                p.push(format!(
                    "validate.connect_timeout + duration + settle = {} (+ {} for the queries): more than nbpy-validate.service's TimeoutStartSec={}, which would kill it before its verdict",
                    humantime::format_duration(self.connect_timeout + self.duration + self.settle),
                    humantime::format_duration(QUERY_MARGIN),
                    humantime::format_duration(limit)
                ));
            }
        }
        for (key, names) in [
            ("validate.publishers", &self.publishers),
            ("validate.idle_ok", &self.idle_ok),
        ] {
            for name in names {
                if !publishers.contains_key(name) {
                    p.push(format!("{key}: no publisher named {name:?} is configured"));
                }
            }
        }
        p
    }
}

/// Sequence numbers seen, as sorted disjoint runs `[a, b]`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Runs(Vec<(u64, u64)>);

impl Runs {
    /// Adds `seq`; returns false when it was already there (a duplicate).
    pub fn insert(&mut self, seq: u64) -> bool {
        // Almost always in order: extend or append at the end.
        if let Some(last) = self.0.last_mut() {
            if seq == last.1.saturating_add(1) {
                last.1 = seq;
                return true;
            }
            if seq > last.1.saturating_add(1) {
                self.0.push((seq, seq));
                return true;
            }
        } else {
            self.0.push((seq, seq));
            return true;
        }
        // Out of order: find the run it belongs to or the gap it fills.
        let i = self.0.partition_point(|r| r.1 < seq);
        if i < self.0.len() && self.0[i].0 <= seq {
            return false;
        }
        let joins_prev = i > 0 && self.0[i - 1].1.saturating_add(1) == seq;
        let joins_next = i < self.0.len() && self.0[i].0 == seq.saturating_add(1);
        match (joins_prev, joins_next) {
            (true, true) => {
                self.0[i - 1].1 = self.0[i].1;
                self.0.remove(i);
            }
            (true, false) => self.0[i - 1].1 = seq,
            (false, true) => self.0[i].0 = seq,
            (false, false) => self.0.insert(i, (seq, seq)),
        }
        true
    }

    pub fn count(&self) -> u64 {
        self.0.iter().map(|(a, b)| (b - a).saturating_add(1)).sum()
    }

    pub fn first(&self) -> Option<u64> {
        self.0.first().map(|r| r.0)
    }

    pub fn last(&self) -> Option<u64> {
        self.0.last().map(|r| r.1)
    }

    pub fn runs(&self) -> &[(u64, u64)] {
        &self.0
    }
}

/// What the validator saw of one publisher epoch.
#[derive(Debug, Default)]
struct EpochSeen {
    runs: Runs,
    /// Messages per measurement name.
    per_measurement: BTreeMap<&'static str, u64>,
    /// Stored-time bounds (exchange time, else receive time), ns.
    min_time: i64,
    max_time: i64,
    /// Began during the window, as observed (see the module docs): counted
    /// from `seq` 1.
    began_in_window: bool,
}

/// What the validator saw of one publisher.
#[derive(Default)]
struct Seen {
    received: u64,
    malformed: u64,
    unsequenced: u64,
    /// Messages on a channel no measurement stores, per channel.
    unmapped: BTreeMap<String, u64>,
    duplicates: u64,
    /// Messages naming another publisher (a misconfigured endpoint), per
    /// name they carry.
    foreign: BTreeMap<String, u64>,
    epochs: BTreeMap<u64, EpochSeen>,
    topics: BTreeMap<String, u64>,
    latencies_ns: Vec<i64>,
    latency_stride: u64,
    disconnects: Vec<String>,
    log: Option<crate::sink::RateLimitedLog>,
}

/// Distinct names kept per count map (names come off the wire: a noisy or
/// hostile bus must not grow them without bound); the rest share one entry.
const MAX_NAMES: usize = 16;

/// Counts one message under `key`, or under "(others)" past [`MAX_NAMES`].
fn bump(map: &mut BTreeMap<String, u64>, key: &str) {
    if let Some(n) = map.get_mut(key) {
        *n += 1;
    } else if map.len() < MAX_NAMES {
        map.insert(key.to_string(), 1);
    } else {
        *map.entry("(others)".to_string()).or_default() += 1;
    }
}

/// Samples kept for latency percentiles; beyond this every k-th is kept.
const MAX_LATENCY_SAMPLES: usize = 1 << 20;

impl Seen {
    fn observe(&mut self, name: &str, msg: &zeromq::ZmqMessage) {
        self.received += 1;
        let env = match crate::bus::decode(msg) {
            Ok(e) => e,
            Err(e) => {
                self.malformed += 1;
                let log = self.log.get_or_insert_with(|| {
                    crate::sink::RateLimitedLog::new(Duration::from_secs(10))
                });
                crate::warn_limited!(log, || format!(
                    "validate: malformed message from publisher {name}: {e}"
                ));
                return;
            }
        };
        let recv = now_ns();
        if env.ts > 0 {
            if self.latencies_ns.len() >= MAX_LATENCY_SAMPLES {
                // Thin out: keep every other sample, double the stride.
                let mut i = 0;
                self.latencies_ns.retain(|_| {
                    i += 1;
                    i % 2 == 0
                });
                self.latency_stride = self.latency_stride.max(1) * 2;
            }
            let stride = self.latency_stride.max(1);
            if self.received % stride == 0 {
                self.latencies_ns.push(recv - env.ts);
            }
        }
        *self.topics.entry(env.topic()).or_default() += 1;
        if env.seq == 0 {
            self.unsequenced += 1;
            return;
        }
        if !env.publisher.is_empty() && env.publisher != name {
            bump(&mut self.foreign, &env.publisher);
            return;
        }
        let Some(m) = crate::schema::by_channel(&env.ch) else {
            bump(&mut self.unmapped, &env.ch);
            return;
        };
        let t = env.time();
        let after_reconnect = !self.disconnects.is_empty();
        let e = self.epochs.entry(env.epoch).or_insert_with(|| EpochSeen {
            min_time: t,
            max_time: t,
            began_in_window: env.seq == 1 || after_reconnect,
            ..Default::default()
        });
        if !e.runs.insert(env.seq) {
            self.duplicates += 1;
            return;
        }
        *e.per_measurement.entry(m.name).or_default() += 1;
        e.min_time = e.min_time.min(t);
        e.max_time = e.max_time.max(t);
    }
}

/// The whole result, as printed (`--json`) and as the exit code judges it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// Window start, ns since the Unix epoch.
    pub start_ns: i64,
    /// How long the bus was really listened to (the longest of the
    /// publishers' windows): waiting for a publisher that never connects is
    /// not validation.
    pub duration_s: f64,
    /// How long the run took in all before reconciling, when that is more
    /// than `duration_s`: the rest was spent waiting for connections.
    #[serde(default)]
    pub elapsed_s: f64,
    /// Why the stored counts are unknown (InfluxDB could not be queried:
    /// unreachable, credentials refused, database missing).
    /// Then every `stored`, `lost` and `loss_ratio` is 0 and means nothing:
    /// the data may well be safe in a subscriber's spool, so no loss is
    /// claimed or judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_unknown: Option<String>,
    /// How long the stored counts were polled after the window: until
    /// complete, or `validate.settle` when some were still missing.
    pub settle_s: f64,
    pub database: String,
    pub thresholds: Thresholds,
    pub publishers: Vec<PublisherReport>,
    /// Every broken threshold, each naming publisher and measurement.
    pub breaches: Vec<String>,
    /// Of the breaches, those that mean "could not check" (unreachable).
    pub unavailable: Vec<String>,
    /// Of the breaches, InfluxDB refusing the credentials: exit 77.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub denied: Vec<String>,
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Thresholds {
    pub max_loss_ratio: f64,
    pub max_latency_ms: f64,
    pub min_rate: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PublisherReport {
    pub name: String,
    pub endpoint: String,
    pub feed: String,
    pub connected: bool,
    /// Connected, then gone during the window and not back by its end: the
    /// publisher is unavailable (exit 69), whatever was seen before.
    #[serde(default)]
    pub went_away: bool,
    /// Why it could not be listened to, or how the connection ended.
    pub problem: Option<String>,
    pub received: u64,
    pub rate: f64,
    pub malformed: u64,
    pub unsequenced: u64,
    pub duplicates: u64,
    /// Messages naming another publisher, per name: the endpoint belongs
    /// to someone else, or two configurations disagree. Not reconciled.
    #[serde(default)]
    pub foreign: BTreeMap<String, u64>,
    /// Messages on a channel no measurement stores, per channel. Not
    /// reconciled.
    #[serde(default)]
    pub unmapped: BTreeMap<String, u64>,
    /// `validate.idle_ok` names it: an empty window is no breach.
    #[serde(default)]
    pub idle_ok: bool,
    pub latency_ms: Option<Latency>,
    pub epochs: Vec<EpochReport>,
    /// Sequence numbers in the reconciled ranges.
    pub published: u64,
    /// Of those, messages the validator received.
    pub seen: u64,
    /// Of the published, points found in InfluxDB.
    pub stored: u64,
    pub lost: u64,
    pub loss_ratio: f64,
    /// Published messages the validator itself never saw (its own gaps):
    /// `missed`; of those `stored` were in InfluxDB and `lost` were not.
    pub unattributed: Unattributed,
    pub measurements: Vec<MeasurementReport>,
    pub topics: Vec<TopicReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Unattributed {
    pub missed: u64,
    pub stored: u64,
    pub lost: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub samples: usize,
    /// Whether `max_latency` applies (not for replayed, historical times).
    pub checked: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EpochReport {
    pub epoch: u64,
    /// First `seq` of the reconciled range (1 when the epoch began in the window).
    pub first_seq: u64,
    pub last_seq: u64,
    pub first_seen: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MeasurementReport {
    pub name: String,
    pub seen: u64,
    pub stored: u64,
    pub lost: u64,
    pub loss_ratio: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TopicReport {
    pub topic: String,
    pub received: u64,
    pub rate: f64,
}

/// Listens for `duration`, reconciles, judges. Errors only for what stops a
/// report being made at all (configuration); everything else is in it.
pub async fn run(cfg: &Config, duration: Duration) -> Result<Report, Failure> {
    let v = &cfg.validate;
    let names: Vec<String> = if v.publishers.is_empty() {
        cfg.publishers.keys().cloned().collect()
    } else {
        v.publishers.clone()
    };
    if names.is_empty() {
        return Err(Failure::config(anyhow::anyhow!(
            "no publishers configured: nothing to validate (add [publishers.NAME])"
        )));
    }
    let client = InfluxClient::new(&cfg.influxdb)?;
    let start_ns = now_ns();
    let t0 = Instant::now();

    // Listen to all publishers at once, each for `duration` from its connection.
    let mut tasks = Vec::new();
    for name in &names {
        let pcfg = cfg
            .publisher(name)
            .map_err(|e| Failure::config(anyhow::anyhow!(e)))?
            .clone();
        let name = name.clone();
        let within = v.connect_timeout;
        tasks.push(tokio::spawn(async move {
            listen(name, pcfg, within, duration).await
        }));
    }
    let mut listened = Vec::new();
    for t in tasks {
        match t.await {
            Ok(l) => listened.push(l),
            Err(e) => return Err(Failure::from(anyhow::anyhow!("listener task: {e}"))),
        }
    }
    let window = t0.elapsed();

    // Reconcile against InfluxDB.
    let mut unavailable = Vec::new();
    let mut denied = Vec::new();
    let settle_t0 = Instant::now();
    let failed = match client.ping().await {
        Err(e) => Err((format!("InfluxDB at {}: {e}", client.shown_url()), e)),
        Ok(()) => reconcile(&client, &listened, window, cfg)
            .await
            .map_err(|e| (format!("InfluxDB query failed: {e}"), e)),
    };
    let (stored, stored_unknown) = match failed {
        Ok(s) => (Some(s), None),
        Err((breach, e)) => {
            let (why, list) = influx_problem(&e, breach, &client);
            match list {
                Problem::Denied => denied.push(why.clone()),
                Problem::Unavailable => unavailable.push(why.clone()),
            }
            (None, Some(why))
        }
    };
    let settle = settle_t0.elapsed();
    let listened_for = listened
        .iter()
        .map(|l| l.listened_for)
        .max()
        .unwrap_or_default();

    let mut report = Report {
        start_ns,
        duration_s: listened_for.as_secs_f64(),
        elapsed_s: window.as_secs_f64(),
        stored_unknown,
        settle_s: settle.as_secs_f64(),
        database: cfg.influxdb.database.clone(),
        thresholds: Thresholds {
            max_loss_ratio: v.max_loss_ratio,
            max_latency_ms: v.max_latency.as_secs_f64() * 1e3,
            min_rate: v.min_rate,
        },
        publishers: Vec::new(),
        breaches: Vec::new(),
        unavailable,
        denied,
        ok: false,
    };
    for (i, l) in listened.iter().enumerate() {
        let counts = stored.as_ref().map(|s| &s[i]);
        let mut p = publisher_report(l, counts, v.idle_ok.contains(&l.name));
        if counts.is_none() {
            p.forget_loss();
        }
        report.publishers.push(p);
    }
    judge(&mut report, v);
    Ok(report)
}

/// Which exit an InfluxDB failure deserves.
enum Problem {
    /// Credentials refused: `NOPERM` (77), as elsewhere in nbpy; retrying
    /// will not help until someone fixes them.
    Denied,
    /// Away, stuck, or not set up yet (phase 2 has not run): `UNAVAILABLE`.
    Unavailable,
}

/// What to say about an InfluxDB failure, and which exit it deserves. It
/// is said as what it is: a missing database is not an unreachable server.
fn influx_problem(e: &WriteError, breach: String, client: &InfluxClient) -> (String, Problem) {
    match e {
        WriteError::Auth(_) => (
            format!("InfluxDB at {}: {e}", client.shown_url()),
            Problem::Denied,
        ),
        WriteError::Missing(msg) if msg.to_ascii_lowercase().contains("database not found") => (
            format!(
                "database {:?} does not exist in InfluxDB at {} (run `nbpy schema apply`)",
                client.database(),
                client.shown_url()
            ),
            Problem::Unavailable,
        ),
        WriteError::Missing(_) => (
            format!("InfluxDB at {}: {e}", client.shown_url()),
            Problem::Unavailable,
        ),
        WriteError::Transient(_) | WriteError::Timeout(_) => (
            format!("InfluxDB unreachable: {breach}"),
            Problem::Unavailable,
        ),
        _ => (breach, Problem::Unavailable),
    }
}

/// One publisher's window.
struct Listened {
    name: String,
    pcfg: PublisherConfig,
    connected: bool,
    /// It went away during the window and did not come back.
    went_away: bool,
    problem: Option<String>,
    /// Time really connected: from the connection to the end of the window,
    /// less the time spent reconnecting after a restart, or only up to the
    /// disconnect of a publisher that went away.
    listened_for: Duration,
    seen: Seen,
}

async fn listen(
    name: String,
    pcfg: PublisherConfig,
    within: Duration,
    duration: Duration,
) -> Listened {
    let endpoint = pcfg.reach();
    let mut out = Listened {
        name: name.clone(),
        pcfg,
        connected: false,
        went_away: false,
        problem: None,
        listened_for: Duration::ZERO,
        seen: Seen::default(),
    };
    let mut tap = match Tap::connect(&endpoint, within).await {
        Ok(t) => t,
        Err(e) => {
            out.problem = Some(e);
            return out;
        }
    };
    out.connected = true;
    let t0 = tokio::time::Instant::now();
    let end = t0 + duration;
    // Time without a connection (reconnecting after a restart): not listened.
    let mut deaf = Duration::ZERO;
    loop {
        tokio::select! {
            biased;
            _ = tokio::time::sleep_until(end) => break,
            ev = tap.next() => match ev {
                TapEvent::Message(m) => out.seen.observe(&name, &m),
                TapEvent::Disconnected(why) => {
                    let gone_at = tokio::time::Instant::now();
                    out.seen.disconnects.push(why.clone());
                    // A restart: listen again for the rest of the window.
                    // The old socket goes first: left alone, the zeromq
                    // crate's own reconnect would subscribe it to the new
                    // publisher too, a phantom subscriber that counts towards
                    // its `wait_for_subscribers` without reading anything.
                    drop(tap);
                    let left = end.saturating_duration_since(tokio::time::Instant::now());
                    match Tap::connect(&endpoint, left).await {
                        Ok(t) => {
                            tap = t;
                            deaf += gone_at.elapsed();
                        }
                        Err(_) => {
                            // Unavailable, not checked: what it would have
                            // sent for the rest of the window is unknown.
                            // Its rate counts the time it was there.
                            out.went_away = true;
                            out.problem = Some(format!("publisher went away during the window ({why}) and did not come back"));
                            out.listened_for = gone_at.saturating_duration_since(t0).saturating_sub(deaf);
                            return out;
                        }
                    }
                }
            }
        }
    }
    out.listened_for = t0.elapsed().saturating_sub(deaf);
    out
}

/// The reconciled range of one epoch: `[first, last]`.
fn range_of(e: &EpochSeen) -> (u64, u64) {
    let first_seen = e.runs.first().unwrap_or(1);
    let last = e.runs.last().unwrap_or(0);
    // An epoch that began during the window: everything it sent counts.
    let first = if e.began_in_window { 1 } else { first_seen };
    (first, last)
}

/// Stored counts per publisher (in `listened` order) and epoch.
type Stored = Vec<BTreeMap<u64, EpochStored>>;

#[derive(Debug, Default, Clone)]
struct EpochStored {
    /// Per measurement: stored points whose seq the validator saw.
    seen: BTreeMap<&'static str, u64>,
    /// Stored points over the whole range, all measurements (only queried
    /// when the validator has gaps of its own; else equal to the sum above).
    whole: Option<u64>,
}

/// Margin around the seen stored-times in which points are looked for:
/// exchange times of one window are rarely further apart than this from the
/// ones the validator saw, and it keeps the queries off the rest of history.
const TIME_MARGIN_NS: i64 = 5 * 60 * 1_000_000_000;

/// Runs per query: InfluxQL has no "seq IN (...)", so runs become ORs.
const RUNS_PER_QUERY: usize = 40;

async fn reconcile(
    client: &InfluxClient,
    listened: &[Listened],
    window: Duration,
    cfg: &Config,
) -> Result<Stored, crate::sink::influx::WriteError> {
    let expected: u64 = listened
        .iter()
        .flat_map(|l| l.seen.epochs.values())
        .map(|e| e.runs.count())
        .sum();
    let deadline = Instant::now() + cfg.validate.settle;
    let mut stored: Stored;
    loop {
        stored = Vec::new();
        let mut total = 0;
        for l in listened {
            let mut per_epoch = BTreeMap::new();
            for (epoch, e) in &l.seen.epochs {
                let mut s = EpochStored::default();
                for m in e.per_measurement.keys() {
                    let n = count_seen(client, &l.name, *epoch, e, m).await?;
                    total += n;
                    s.seen.insert(m, n);
                }
                per_epoch.insert(*epoch, s);
            }
            stored.push(per_epoch);
        }
        if total >= expected || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The validator's own gaps: count the whole range once, all measurements.
    for (l, per_epoch) in listened.iter().zip(stored.iter_mut()) {
        for (epoch, e) in &l.seen.epochs {
            let (first, last) = range_of(e);
            if (last - first).saturating_add(1) > e.runs.count() {
                let n = count_range(client, &l.name, *epoch, e, first, last, window).await?;
                if let Some(s) = per_epoch.get_mut(epoch) {
                    s.whole = Some(n);
                }
            }
        }
    }
    Ok(stored)
}

fn source(m: &crate::schema::Measurement, db: &str) -> String {
    format!("{}.{}.{}", ident(db), ident(m.rp), ident(m.name))
}

/// Publisher, epoch and a time range around what was seen, widened by
/// `before_ns` towards the past.
fn common_where(publisher: &str, epoch: u64, e: &EpochSeen, before_ns: i64) -> String {
    format!(
        "{} = {} AND \"epoch\" = {epoch} AND time >= {} AND time <= {}",
        ident(crate::schema::TAG_PUBLISHER),
        string_lit(publisher),
        e.min_time
            .saturating_sub(TIME_MARGIN_NS)
            .saturating_sub(before_ns),
        e.max_time.saturating_add(TIME_MARGIN_NS)
    )
}

async fn count_seen(
    client: &InfluxClient,
    publisher: &str,
    epoch: u64,
    e: &EpochSeen,
    measurement: &str,
) -> Result<u64, crate::sink::influx::WriteError> {
    let Some(m) = crate::schema::by_name(measurement) else {
        return Ok(0);
    };
    let mut n = 0u64;
    for chunk in e.runs.runs().chunks(RUNS_PER_QUERY) {
        let runs: Vec<String> = chunk
            .iter()
            .map(|(a, b)| format!("(\"seq\" >= {a} AND \"seq\" <= {b})"))
            .collect();
        let q = format!(
            "SELECT count(\"seq\") FROM {} WHERE {} AND ({})",
            source(m, client.database()),
            common_where(publisher, epoch, e, 0),
            runs.join(" OR ")
        );
        n += client.query_number(&q).await? as u64;
    }
    Ok(n)
}

async fn count_range(
    client: &InfluxClient,
    publisher: &str,
    epoch: u64,
    e: &EpochSeen,
    first: u64,
    last: u64,
    window: Duration,
) -> Result<u64, crate::sink::influx::WriteError> {
    // Numbers before the first seen of an epoch that began in the window
    // were sent after it began, so at most the window's length before the
    // first one seen, by the same clock that stamped it: skew between that
    // clock and the validator's cannot push them out of the range.
    let before_ns = if e.began_in_window {
        i64::try_from(window.as_nanos()).unwrap_or(i64::MAX)
    } else {
        0
    };
    let mut n = 0u64;
    for m in crate::schema::MEASUREMENTS
        .iter()
        .filter(|m| m.field("seq").is_some() && m.name != "nbpy_pipeline")
    {
        let q = format!(
            "SELECT count(\"seq\") FROM {} WHERE {} AND \"seq\" >= {first} AND \"seq\" <= {last}",
            source(m, client.database()),
            common_where(publisher, epoch, e, before_ns),
        );
        n += client.query_number(&q).await? as u64;
    }
    Ok(n)
}

/// An InfluxQL identifier, double-quoted.
pub fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// An InfluxQL string literal, single-quoted.
pub fn string_lit(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn ratio(lost: u64, of: u64) -> f64 {
    if of == 0 {
        0.0
    } else {
        lost as f64 / of as f64
    }
}

fn publisher_report(
    l: &Listened,
    stored: Option<&BTreeMap<u64, EpochStored>>,
    idle_ok: bool,
) -> PublisherReport {
    let secs = l.listened_for.as_secs_f64().max(1e-3);
    let s = &l.seen;
    let mut epochs = Vec::new();
    let (mut published, mut seen, mut stored_total) = (0u64, 0u64, 0u64);
    let mut un = Unattributed::default();
    let mut per_m: BTreeMap<&'static str, (u64, u64)> = BTreeMap::new();
    for (epoch, e) in &s.epochs {
        let (first, last) = range_of(e);
        epochs.push(EpochReport {
            epoch: *epoch,
            first_seq: first,
            last_seq: last,
            first_seen: e.runs.first().unwrap_or(0),
        });
        let range = (last - first).saturating_add(1);
        let seen_here = e.runs.count();
        published += range;
        seen += seen_here;
        let st = stored.and_then(|s| s.get(epoch));
        let stored_seen: u64 = st.map(|s| s.seen.values().sum()).unwrap_or(0);
        for (m, n) in &e.per_measurement {
            let x = per_m.entry(m).or_default();
            x.0 += n;
            x.1 += st.and_then(|s| s.seen.get(m)).copied().unwrap_or(0);
        }
        let missed = range.saturating_sub(seen_here);
        let whole = st.and_then(|s| s.whole).unwrap_or(stored_seen);
        let stored_unseen = whole.saturating_sub(stored_seen).min(missed);
        un.missed += missed;
        un.stored += stored_unseen;
        un.lost += missed - stored_unseen;
        stored_total += stored_seen.min(seen_here) + stored_unseen;
    }
    let lost = published.saturating_sub(stored_total);
    let measurements = per_m
        .into_iter()
        .map(|(name, (seen, stored))| {
            let lost = seen.saturating_sub(stored);
            MeasurementReport {
                name: name.to_string(),
                seen,
                stored: stored.min(seen),
                lost,
                loss_ratio: ratio(lost, seen),
            }
        })
        .collect();
    let topics = s
        .topics
        .iter()
        .map(|(t, n)| TopicReport {
            topic: t.clone(),
            received: *n,
            rate: *n as f64 / secs,
        })
        .collect();
    let latency_ms = latency(&s.latencies_ns, l.pcfg.feed != FeedKind::Replay);
    let mut problem = l.problem.clone();
    if problem.is_none() && !s.disconnects.is_empty() {
        problem = Some(format!(
            "reconnected {} time(s) during the window",
            s.disconnects.len()
        ));
    }
    PublisherReport {
        name: l.name.clone(),
        endpoint: l.pcfg.reach(),
        feed: l.pcfg.feed.name().to_string(),
        connected: l.connected,
        went_away: l.went_away,
        problem,
        received: s.received,
        rate: s.received as f64 / secs,
        malformed: s.malformed,
        unsequenced: s.unsequenced,
        duplicates: s.duplicates,
        foreign: s.foreign.clone(),
        unmapped: s.unmapped.clone(),
        idle_ok,
        latency_ms,
        epochs,
        published,
        seen,
        stored: stored_total,
        lost,
        loss_ratio: ratio(lost, published),
        unattributed: un,
        measurements,
        topics,
    }
}

fn latency(samples: &[i64], checked: bool) -> Option<Latency> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_unstable();
    let pct = |p: f64| {
        let i = ((v.len() - 1) as f64 * p).round() as usize;
        v[i.min(v.len() - 1)] as f64 / 1e6
    };
    Some(Latency {
        p50: pct(0.5),
        p99: pct(0.99),
        max: v[v.len() - 1] as f64 / 1e6,
        samples: v.len(),
        checked,
    })
}

fn judge(r: &mut Report, v: &ValidateConfig) {
    let mut b = Vec::new();
    let mut unavailable = std::mem::take(&mut r.unavailable);
    for p in &r.publishers {
        if !p.connected {
            unavailable.push(format!(
                "publisher {}: {}",
                p.name,
                p.problem.as_deref().unwrap_or("not reachable")
            ));
            continue;
        }
        if p.went_away {
            unavailable.push(format!(
                "publisher {}: {}",
                p.name,
                p.problem
                    .as_deref()
                    .unwrap_or("went away during the window")
            ));
        }
        if p.all_unsequenced() {
            continue;
        }
        if !p.foreign.is_empty() {
            b.push(format!(
                "publisher {}: {} message(s) at {} name another publisher ({}): not reconciled; is the endpoint configured under the right name?",
                p.name,
                p.foreign.values().sum::<u64>(),
                p.endpoint,
                named(&p.foreign)
            ));
        }
        if !p.unmapped.is_empty() {
            b.push(format!(
                "publisher {}: {} message(s) on channels no measurement stores ({}): not reconciled",
                p.name,
                p.unmapped.values().sum::<u64>(),
                named(&p.unmapped)
            ));
        }
        if p.received == 0 {
            if !p.idle_ok {
                b.push(format!(
                    "publisher {}: no messages in the {:.1} s window, so nothing was checked (is it holding its first message for wait_for_subscribers, with no subscriber? if the feed can be idle, list it in validate.idle_ok)",
                    p.name, r.duration_s
                ));
            }
            continue;
        }
        if p.seen == 0 && p.foreign.is_empty() && p.unmapped.is_empty() {
            b.push(format!(
                "publisher {}: none of its {} message(s) could be reconciled",
                p.name, p.received
            ));
        }
        if v.min_rate > 0.0 && p.rate < v.min_rate {
            b.push(format!(
                "publisher {}: rate {:.1} msg/s below validate.min_rate = {}",
                p.name, p.rate, v.min_rate
            ));
        }
        if r.stored_unknown.is_some() {
            // Loss cannot be told from data not yet stored.
        } else if p.loss_ratio > v.max_loss_ratio {
            b.push(loss_breach(p, v, r.settle_s));
        } else if p.unattributed.lost > 0 && v.max_loss_ratio < 1.0 {
            // Within the ratio, but named: the breach above names them
            // when it is broken.
            b.push(format!(
                "publisher {}: {} message(s) never seen on the bus nor stored (measurement unknown)",
                p.name, p.unattributed.lost
            ));
        }
        for m in &p.measurements {
            if r.stored_unknown.is_none() && m.loss_ratio > v.max_loss_ratio {
                b.push(format!(
                    "publisher {} / {}: {} of {} messages seen on the bus still not stored after waiting {:.1} s (validate.settle = {}; loss ratio {:.6} > {})",
                    p.name,
                    m.name,
                    m.lost,
                    m.seen,
                    r.settle_s,
                    humantime::format_duration(v.settle),
                    m.loss_ratio,
                    v.max_loss_ratio
                ));
            }
        }
        if let Some(l) = &p.latency_ms {
            let max_ms = v.max_latency.as_secs_f64() * 1e3;
            if l.checked && l.p99 > max_ms {
                b.push(format!(
                    "publisher {}: p99 latency {:.1} ms > validate.max_latency = {:.0} ms",
                    p.name, l.p99, max_ms
                ));
            }
        }
    }
    r.ok = b.is_empty() && unavailable.is_empty() && r.denied.is_empty();
    b.extend(r.denied.iter().cloned());
    b.extend(unavailable.iter().cloned());
    r.breaches = b;
    r.unavailable = unavailable;
}

/// A publisher's broken loss ratio, its missing messages told apart by
/// what was done about them: only those the validator saw are waited for
/// (until stored, or `validate.settle` runs out); those it never saw (its
/// own gaps: sent while it was not connected, around a publisher restart
/// or reconnect) are counted once, after that wait. Blaming the settle
/// time for those claimed a 15 s wait after one of a second.
fn loss_breach(p: &PublisherReport, v: &ValidateConfig, settle_s: f64) -> String {
    let unseen = p.lost_unseen();
    let seen = p.lost - unseen;
    let mut why = Vec::new();
    if seen > 0 {
        why.push(format!(
            "{seen} seen on the bus and still not stored after waiting {settle_s:.1} s (validate.settle = {})",
            humantime::format_duration(v.settle)
        ));
    }
    if unseen > 0 {
        why.push(format!(
            "{unseen} never seen on the bus (published while the validator was not connected, e.g. around a publisher restart, \
             when no subscriber may have been either) and not in InfluxDB when counted after the wait"
        ));
    }
    format!(
        "publisher {}: {} of {} messages not stored (loss ratio {:.6} > validate.max_loss_ratio = {}): {}",
        p.name,
        p.lost,
        p.published,
        p.loss_ratio,
        v.max_loss_ratio,
        why.join("; ")
    )
}

/// `"a" ×3, "b" ×1` for a breach.
fn named(map: &BTreeMap<String, u64>) -> String {
    map.iter()
        .map(|(k, n)| format!("{k:?} ×{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl PublisherReport {
    /// Of the lost messages, those the validator never saw on the bus
    /// (the rest it saw and then waited for in InfluxDB).
    fn lost_unseen(&self) -> u64 {
        self.unattributed.lost.min(self.lost)
    }

    /// Stored counts unknown: zero what was worked out from them rather
    /// than report everything published as lost.
    fn forget_loss(&mut self) {
        self.stored = 0;
        self.lost = 0;
        self.loss_ratio = 0.0;
        self.unattributed.stored = 0;
        self.unattributed.lost = 0;
        for m in &mut self.measurements {
            m.stored = 0;
            m.lost = 0;
            m.loss_ratio = 0.0;
        }
    }

    /// A legacy-codec publisher: nothing to reconcile.
    fn all_unsequenced(&self) -> bool {
        self.received > 0 && self.unsequenced == self.received
    }
}

/// The exit this report deserves: none, `NOPERM` (credentials refused:
/// retrying will not help), `UNAVAILABLE`, or `DATAERR`.
pub fn verdict(r: &Report) -> Result<(), Failure> {
    if r.ok {
        return Ok(());
    }
    let code = if !r.denied.is_empty() {
        NOPERM
    } else if !r.unavailable.is_empty() {
        UNAVAILABLE
    } else {
        DATAERR
    };
    Err(Failure::new(
        code,
        anyhow::anyhow!("validation failed: {}", r.breaches.join("; ")),
    ))
}

/// The human table.
pub fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    // What the wait after the window did, when there was one: nothing
    // was reconciled when InfluxDB could not be asked or no sequenced
    // message was seen, and only messages seen were waited for.
    let checked = r.stored_unknown.is_none() && r.publishers.iter().any(|p| p.published > 0);
    let seen_missing = r.publishers.iter().any(|p| p.lost > p.lost_unseen());
    let settled = if !checked {
        String::new()
    } else if seen_missing {
        format!(" (writes still missing after {:.1} s)", r.settle_s)
    } else if r.publishers.iter().any(|p| p.lost > 0) {
        format!(
            " (what it saw was stored within {:.1} s; some it never saw was not)",
            r.settle_s
        )
    } else {
        format!(" (writes settled in {:.1} s)", r.settle_s)
    };
    let _ = write!(
        s,
        "validated {:.1} s of the bus against InfluxDB database {:?}{settled}",
        r.duration_s, r.database
    );
    if r.elapsed_s - r.duration_s >= 0.5 {
        let _ = write!(
            s,
            "; {:.1} s in all, the rest waiting for publishers to connect",
            r.elapsed_s
        );
    }
    let _ = writeln!(s);
    if let Some(why) = &r.stored_unknown {
        let _ = writeln!(
            s,
            "stored: unknown — {why}; loss is not judged (the subscribers may hold the data in their spools)"
        );
    }
    // Stored counts, or "?" where they are unknown.
    let known = |n: u64| match r.stored_unknown {
        Some(_) => "?".to_string(),
        None => n.to_string(),
    };
    let pct = |x: f64| match r.stored_unknown {
        Some(_) => "?".to_string(),
        None => format!("{:.4}%", x * 100.0),
    };
    let _ = writeln!(
        s,
        "{:<16} {:<16} {:>10} {:>10} {:>8} {:>9} {:>10} {:>10}",
        "PUBLISHER", "MEASUREMENT", "SEEN", "STORED", "LOST", "LOSS", "MSG/S", "P99 MS"
    );
    for p in &r.publishers {
        if !p.connected {
            let _ = writeln!(
                s,
                "{:<16} {}",
                p.name,
                p.problem.as_deref().unwrap_or("unreachable")
            );
            continue;
        }
        let lat = p
            .latency_ms
            .as_ref()
            .map(|l| {
                if l.checked {
                    format!("{:.1}", l.p99)
                } else {
                    "replay".into()
                }
            })
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            s,
            "{:<16} {:<16} {:>10} {:>10} {:>8} {:>9} {:>10.1} {:>10}",
            p.name,
            "(all)",
            p.seen,
            known(p.stored),
            known(p.lost),
            pct(p.loss_ratio),
            p.rate,
            lat
        );
        for m in &p.measurements {
            let _ = writeln!(
                s,
                "{:<16} {:<16} {:>10} {:>10} {:>8} {:>9}",
                "",
                m.name,
                m.seen,
                known(m.stored),
                known(m.lost),
                pct(m.loss_ratio)
            );
        }
        if p.unattributed.missed > 0 {
            let _ = writeln!(
                s,
                "{:<16} {:<16} {:>10} {:>10} {:>8}",
                "",
                "(not seen)",
                p.unattributed.missed,
                known(p.unattributed.stored),
                known(p.unattributed.lost)
            );
        }
        if p.unsequenced > 0 {
            let _ = writeln!(
                s,
                "{:<16} {} message(s) without seq (legacy codec): not reconciled",
                "", p.unsequenced
            );
        }
        if let Some(pr) = &p.problem {
            let _ = writeln!(s, "{:<16} note: {pr}", "");
        }
        if !p.foreign.is_empty() {
            let _ = writeln!(
                s,
                "{:<16} {} message(s) naming another publisher: {}",
                "",
                p.foreign.values().sum::<u64>(),
                named(&p.foreign)
            );
        }
        if !p.unmapped.is_empty() {
            let _ = writeln!(
                s,
                "{:<16} {} message(s) on unstored channels: {}",
                "",
                p.unmapped.values().sum::<u64>(),
                named(&p.unmapped)
            );
        }
        if p.received == 0 {
            let why = if p.idle_ok {
                " (validate.idle_ok: allowed)"
            } else {
                ""
            };
            let _ = writeln!(s, "{:<16} note: no messages in the window{why}", "");
        }
    }
    if r.ok {
        let _ = writeln!(s, "OK: every threshold holds");
    } else {
        let _ = writeln!(s, "FAILED:");
        for b in &r.breaches {
            let _ = writeln!(s, "  - {b}");
        }
    }
    s
}

/// `nbpy validate`.
pub async fn command(cfg: &Config, duration: Option<Duration>, json: bool) -> Result<(), Failure> {
    let duration = duration.unwrap_or(cfg.validate.duration);
    if duration.is_zero() {
        // As `validate.duration = "0s"` is refused: a window that sees
        // nothing cannot vouch for anything.
        return Err(Failure::new(
            crate::exit::USAGE,
            anyhow::anyhow!("--duration must be more than 0"),
        ));
    }
    let report = run(cfg, duration).await?;
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => {
                crate::cli::emit(&format!("{s}\n"));
            }
            Err(e) => return Err(Failure::from(anyhow::anyhow!("report as JSON: {e}"))),
        }
    } else {
        crate::cli::emit(&render(&report));
    }
    verdict(&report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_in_any_order_and_spot_duplicates() {
        let mut r = Runs::default();
        for s in [5, 6, 7, 10, 11, 9, 1, 3, 2] {
            assert!(r.insert(s));
        }
        assert!(!r.insert(6));
        assert!(!r.insert(1));
        assert_eq!(r.runs(), &[(1, 3), (5, 7), (9, 11)]);
        assert!(r.insert(8));
        assert!(r.insert(4));
        assert_eq!(r.runs(), &[(1, 11)]);
        assert_eq!(r.count(), 11);
    }

    #[test]
    fn quoting() {
        assert_eq!(ident("a\"b"), "\"a\\\"b\"");
        assert_eq!(string_lit("o'k"), "'o\\'k'");
    }

    /// One connected publisher's report, judged, from what it saw.
    fn judged(seen: Seen, idle_ok: bool) -> Report {
        let l = Listened {
            name: "p".into(),
            pcfg: PublisherConfig::default(),
            connected: true,
            went_away: false,
            problem: None,
            listened_for: Duration::from_secs(1),
            seen,
        };
        let mut r = Report {
            start_ns: 0,
            duration_s: 1.0,
            elapsed_s: 1.0,
            stored_unknown: None,
            settle_s: 0.0,
            database: "tick".into(),
            thresholds: Thresholds {
                max_loss_ratio: 0.0,
                max_latency_ms: 5000.0,
                min_rate: 0.0,
            },
            publishers: vec![publisher_report(&l, Some(&BTreeMap::new()), idle_ok)],
            breaches: Vec::new(),
            unavailable: Vec::new(),
            denied: Vec::new(),
            ok: false,
        };
        judge(&mut r, &ValidateConfig::default());
        r
    }

    #[test]
    fn messages_nothing_stores_or_of_another_publisher_fail_the_check() {
        let mut s = Seen {
            received: 3,
            ..Default::default()
        };
        bump(&mut s.unmapped, "weather");
        bump(&mut s.unmapped, "weather");
        bump(&mut s.foreign, "synth");
        let r = judged(s, false);
        assert!(!r.ok);
        assert!(verdict(&r).is_err_and(|f| f.code == DATAERR));
        let p = &r.publishers[0];
        assert_eq!(p.unmapped.get("weather"), Some(&2));
        assert_eq!(p.foreign.get("synth"), Some(&1));
        assert!(
            r.breaches
                .iter()
                .any(|b| b
                    .contains("2 message(s) on channels no measurement stores (\"weather\" ×2)")),
            "{:?}",
            r.breaches
        );
        assert!(
            r.breaches.iter().any(|b| b.contains("\"synth\" ×1")),
            "{:?}",
            r.breaches
        );
    }

    #[test]
    fn an_empty_window_fails_unless_the_feed_may_be_idle() {
        let r = judged(Seen::default(), false);
        assert!(verdict(&r).is_err_and(|f| f.code == DATAERR), "{r:?}");
        let r = judged(Seen::default(), true);
        assert!(r.ok, "{:?}", r.breaches);
    }

    #[test]
    fn names_off_the_wire_are_kept_bounded() {
        let mut m = BTreeMap::new();
        for i in 0..100 {
            bump(&mut m, &format!("n{i}"));
        }
        assert_eq!(m.len(), MAX_NAMES + 1);
        assert_eq!(m["(others)"], 100 - MAX_NAMES as u64);
        assert_eq!(m.values().sum::<u64>(), 100);
    }

    #[test]
    fn the_time_range_widens_towards_the_past_only_as_asked() {
        let e = EpochSeen {
            min_time: 10 * TIME_MARGIN_NS,
            max_time: 11 * TIME_MARGIN_NS,
            ..Default::default()
        };
        let w = common_where("p", 7, &e, 0);
        assert!(
            w.contains(&format!("time >= {}", 9 * TIME_MARGIN_NS)),
            "{w}"
        );
        assert!(
            w.contains(&format!("time <= {}", 12 * TIME_MARGIN_NS)),
            "{w}"
        );
        let w = common_where("p", 7, &e, 3 * TIME_MARGIN_NS);
        assert!(
            w.contains(&format!("time >= {}", 6 * TIME_MARGIN_NS)),
            "{w}"
        );
        assert!(
            w.contains(&format!("time <= {}", 12 * TIME_MARGIN_NS)),
            "{w}"
        );
    }

    /// One publisher epoch of `kraken_tick` messages: `seen` are the seqs
    /// the validator saw, `stored_seen` of them stored, `stored_whole`
    /// stored over the whole range (when the validator has gaps);
    /// reconciled (or not: `stored_unknown`), judged with the defaults
    /// (`settle` 15 s, no loss allowed), after waiting `settle_s`.
    fn reconciled(
        seen: std::ops::RangeInclusive<u64>,
        began_in_window: bool,
        stored_seen: u64,
        stored_whole: Option<u64>,
        stored_unknown: Option<&str>,
        settle_s: f64,
    ) -> Report {
        let mut e = EpochSeen {
            began_in_window,
            ..Default::default()
        };
        for seq in seen {
            e.runs.insert(seq);
        }
        e.per_measurement.insert("kraken_tick", e.runs.count());
        let mut s = Seen {
            received: e.runs.count(),
            ..Default::default()
        };
        s.epochs.insert(7, e);
        let l = Listened {
            name: "synth".into(),
            pcfg: PublisherConfig::default(),
            connected: true,
            went_away: false,
            problem: None,
            listened_for: Duration::from_secs(8),
            seen: s,
        };
        let stored = BTreeMap::from([(
            7,
            EpochStored {
                seen: BTreeMap::from([("kraken_tick", stored_seen)]),
                whole: stored_whole,
            },
        )]);
        let mut p = publisher_report(&l, stored_unknown.is_none().then_some(&stored), false);
        if stored_unknown.is_some() {
            p.forget_loss();
        }
        let mut r = Report {
            start_ns: 0,
            duration_s: 8.0,
            elapsed_s: 8.0,
            stored_unknown: stored_unknown.map(str::to_string),
            settle_s,
            database: "tick".into(),
            thresholds: Thresholds {
                max_loss_ratio: 0.0,
                max_latency_ms: 5000.0,
                min_rate: 0.0,
            },
            publishers: vec![p],
            breaches: Vec::new(),
            unavailable: stored_unknown.map(str::to_string).into_iter().collect(),
            denied: Vec::new(),
            ok: false,
        };
        judge(&mut r, &ValidateConfig::default());
        r
    }

    /// After a publisher restart the validator never saw the messages sent
    /// before it reconnected: they are counted once, after the wait for
    /// the seen ones (here 1.2 s), so no 15 s settle is claimed for them.
    #[test]
    fn messages_never_seen_are_not_said_to_have_been_waited_for() {
        // seq 1..=100 published before the validator reconnected; 10 of
        // them stored (a subscriber was back sooner), 90 not.
        let r = reconciled(101..=200, true, 100, Some(110), None, 1.2);
        assert!(verdict(&r).is_err_and(|f| f.code == DATAERR), "{r:?}");
        assert_eq!(
            r.breaches,
            vec![
                "publisher synth: 90 of 200 messages not stored (loss ratio 0.450000 > validate.max_loss_ratio = 0): \
                 90 never seen on the bus (published while the validator was not connected, e.g. around a publisher restart, \
                 when no subscriber may have been either) and not in InfluxDB when counted after the wait"
                    .to_string()
            ]
        );
        let text = render(&r);
        assert!(!text.contains("validate.settle"), "{text}");
        assert!(
            text.starts_with(
                "validated 8.0 s of the bus against InfluxDB database \"tick\" \
                 (what it saw was stored within 1.2 s; some it never saw was not)\n"
            ),
            "{text}"
        );
    }

    /// Messages seen and still missing were waited for: the breach says
    /// for how long, beside the configured settle.
    #[test]
    fn messages_seen_and_missing_name_the_wait_they_had() {
        let r = reconciled(1..=100, true, 95, None, None, 15.3);
        assert!(verdict(&r).is_err_and(|f| f.code == DATAERR), "{r:?}");
        assert!(
            r.breaches.contains(
                &"publisher synth: 5 of 100 messages not stored (loss ratio 0.050000 > validate.max_loss_ratio = 0): \
                  5 seen on the bus and still not stored after waiting 15.3 s (validate.settle = 15s)"
                    .to_string()
            ),
            "{:?}",
            r.breaches
        );
        assert!(
            r.breaches.iter().any(|b| b
                == "publisher synth / kraken_tick: 5 of 100 messages seen on the bus still not stored after waiting 15.3 s \
                    (validate.settle = 15s; loss ratio 0.050000 > 0)"),
            "{:?}",
            r.breaches
        );
        let text = render(&r);
        assert!(
            text.starts_with(
                "validated 8.0 s of the bus against InfluxDB database \"tick\" (writes still missing after 15.3 s)\n"
            ),
            "{text}"
        );
        let r = reconciled(1..=100, true, 100, None, None, 0.4);
        assert!(r.ok, "{:?}", r.breaches);
        assert!(
            render(&r).starts_with(
                "validated 8.0 s of the bus against InfluxDB database \"tick\" (writes settled in 0.4 s)\n"
            ),
            "{}",
            render(&r)
        );
    }

    /// InfluxDB not asked (down, database missing) or no publisher heard:
    /// nothing was reconciled, so the header claims no settling.
    #[test]
    fn nothing_reconciled_claims_no_settling() {
        let why = "database \"tick\" does not exist (run `nbpy schema apply`)";
        let r = reconciled(1..=100, true, 0, None, Some(why), 0.0);
        assert!(verdict(&r).is_err_and(|f| f.code == UNAVAILABLE), "{r:?}");
        let text = render(&r);
        assert!(
            text.starts_with(
                "validated 8.0 s of the bus against InfluxDB database \"tick\"\nstored: unknown"
            ),
            "{text}"
        );
        let mut r = judged(Seen::default(), false);
        r.publishers[0].connected = false;
        let text = render(&r);
        assert!(
            text.starts_with("validated 1.0 s of the bus against InfluxDB database \"tick\"\n"),
            "{text}"
        );
    }

    #[test]
    fn restarted_epoch_counts_from_one() {
        let mut e = EpochSeen::default();
        e.runs.insert(40);
        e.runs.insert(41);
        assert_eq!(range_of(&e), (40, 41));
        e.began_in_window = true;
        assert_eq!(range_of(&e), (1, 41));
    }
}
