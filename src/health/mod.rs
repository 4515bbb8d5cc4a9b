//! Monitoring: is data flowing, how fresh is it, how much was lost where.
//!
//! `nbpy-health` serves `/healthz`, `/readyz`, `/status` (JSON, see
//! [`report::Status`]) and `/metrics` (Prometheus text, [`metrics`]);
//! `nbpy status` prints the same picture as a table.
//!
//! # Where the picture comes from
//!
//! - **The bus itself.** The daemon subscribes to every configured publisher
//!   ([`feeds`], one [`tap::Tap`] each). That gives last-message age per feed
//!   and per topic (so per instrument), rates, `seq` gaps and restarts
//!   (epoch changes) without any publisher having to report anything. A
//!   publisher is *down* when the daemon has no TCP connection to it: a
//!   killed process's connections close at once, so it shows as down within
//!   the time the kernel takes to tell us, and as up again within
//!   [`feeds::RECONNECT_EVERY`] of being back. No heartbeat messages are
//!   added to the bus for this: they would cost sequence numbers and every
//!   consumer would have to skip them. The price: a publisher whose process
//!   is alive but hung keeps its connection; it shows as *stale* once it has
//!   been silent for its `stale_after` (and its own watchdog restarts it).
//! - **The subscribers' own counters**, which each subscriber writes to the
//!   `nbpy_pipeline` measurement every `stats_interval` (received, gaps,
//!   malformed, written, write_errors, dead_lettered, queue_depth,
//!   write_latency_ms, and spooled/replayed/spool_bytes when it spools).
//!   The daemon reads the newest point per subscriber; a subscriber whose
//!   newest point is too old (`health.subscriber_stale_after`) is down.
//!   "Old" is by the daemon's own clock: how long ago the daemon first saw
//!   that point (its time or counters changed), not the time the point
//!   carries, which is the subscriber's clock. A point dated more than
//!   [`probe::FUTURE_MARGIN`] ahead is kept apart (it would otherwise sort
//!   newest and hide every later one) and named as clock skew in
//!   `warnings` and the log.
//!   So is one whose newest point has `stopped`: the last report of a clean
//!   stop says so, whoever stopped it (systemd, `nbpy down`, Ctrl-C), so a
//!   deliberate stop shows at once rather than as up until that fresh
//!   report is old. A killed subscriber writes nothing: staleness it is.
//!   These are read from InfluxDB rather than the bus because that is where
//!   subscribers already put them and where dashboards read them, and
//!   because the newest point arriving proves the subscriber's whole write
//!   path works, not just that its process exists.
//! - **Write lag**, per publisher and measurement: the messages the daemon
//!   saw on the bus that are not (yet) in InfluxDB, and the age of the
//!   oldest such message, from `max(seq)` of the publisher's current epoch
//!   in each measurement, one query each. A publisher's `seq` runs across
//!   all its measurements, so pooled, the others' progress hid one
//!   measurement InfluxDB refused entirely; and one failing source (a
//!   dropped retention policy) failed the pooled query, showing no lag at
//!   all. A measurement whose lag cannot be read is named in `warnings`
//!   and left out of the totals. When none can be read (the database is
//!   missing) or InfluxDB does not answer, the publisher has no lag figures
//!   (absent from `/metrics`, `null` in `/status`) and `write_lag_error`
//!   says why: a 0 or the figures from before an outage would read as a
//!   current, small lag while the backlog grows.
//! - **InfluxDB `/ping`**, and **Grafana `/api/health`** when `grafana.url`
//!   is set. InfluxDB is also down when it answers `/ping` but the
//!   counters query above gets no answer within `influxdb.timeout`: a
//!   server with a stuck store answers `/ping` and nothing else.
//! - **systemd**, when it is the init system (or `health.systemd = "on"`):
//!   `systemctl show nbpy-*` gives every unit's state and restart count; a
//!   failed `nbpy-publisher@NAME` / `nbpy-subscriber@NAME` unit marks that
//!   component down. Without systemd the bus and the counters above are the
//!   whole picture, whatever started the processes.
//!
//! `/readyz` answers 200 when the appliance is doing its job: InfluxDB
//! answers, every publisher is connected and not stale, every
//! subscriber's counters are fresh, and no subscriber's newest report shows
//! its `dead_lettered` grown since the one before: points InfluxDB refuses
//! (a field type conflict, a dropped retention policy) are lost to the
//! dashboards, an incident although every process runs. Grafana is reported but is not part of
//! readiness: data is stored without it.

pub mod feeds;
pub mod http;
pub mod metrics;
pub mod probe;
pub mod report;
pub mod tap;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::{Config, HealthSystemd};
use crate::exit::{Failure, UNAVAILABLE};
use crate::service::Service;
use crate::sink::influx::{InfluxClient, WriteError};
use crate::wire::now_ns;
use feeds::FeedWatch;
use probe::PipelinePoint;
use report::{Backend, PublisherStatus, State, Status, SubscriberStatus, TopicStatus, Unit};

/// How far back the newest `nbpy_pipeline` points are looked for.
const PIPELINE_LOOKBACK: Duration = Duration::from_secs(3600);

/// A publisher's write lag: the sum over its measurements, each judged on
/// its own (see [`feeds::MeasurementSeen`]).
#[derive(Debug, Clone, Default)]
struct Lag {
    messages: u64,
    /// The oldest unstored message's age, over all measurements.
    seconds: f64,
    by_measurement: BTreeMap<&'static str, MeasurementLag>,
    /// Measurements whose stored seq could not be read, and why.
    errors: Vec<String>,
}

impl Lag {
    /// The publisher's totals, `(messages, seconds)`: over the measurements
    /// whose stored seq was read, none when not one was. A failed query
    /// measured nothing; summing no measurements gave a lag of 0 after
    /// `DROP DATABASE`, while nothing at all was being stored.
    fn totals(&self) -> Option<(u64, f64)> {
        if self.by_measurement.is_empty() && !self.errors.is_empty() {
            return None;
        }
        Some((self.messages, self.seconds))
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct MeasurementLag {
    messages: u64,
    seconds: f64,
    /// The newest stored (epoch, seq), to bound the next query.
    stored: Option<(u64, u64)>,
}

/// Exchange times of one publisher are not strictly in order (trades can
/// carry older times than tickers); points this much older than the newest
/// known stored one are still looked at.
const LAG_TIME_MARGIN_NS: i64 = 30_000_000_000;

#[derive(Default)]
struct Polled {
    influx: Option<(Instant, Result<(), String>)>,
    grafana: Option<(Instant, Result<String, String>)>,
    pipeline: BTreeMap<String, Report>,
    pipeline_error: Option<String>,
    /// Clock-skew warnings go to the log at most this often.
    skew_log: Option<crate::sink::RateLimitedLog>,
    /// Counter resets per subscriber: its `received` went down (a restart).
    resets: BTreeMap<String, u64>,
    lag: BTreeMap<String, Lag>,
    /// Why no write lag is measured now (InfluxDB does not answer). The
    /// last figures in `lag` are then not shown: frozen at their values
    /// from before an outage, they hid a backlog growing all through it.
    /// `lag` is kept for its stored positions, which bound the next query.
    lag_unknown: Option<String>,
    units: Vec<Unit>,
    units_error: Option<String>,
    uptime: BTreeMap<String, VecDeque<(Instant, bool)>>,
}

/// A subscriber's newest report, timed by the daemon's own clock.
///
/// Freshness is judged by when the daemon saw a report *change* (its time
/// or its counters), not by the time the report carries: that time comes
/// from the subscriber's clock. A clock an hour ahead made one report the
/// newest for an hour, so a subscriber killed after writing it stayed up;
/// a clock half a minute behind made every report look stale, so a
/// working subscriber showed down for ever.
#[derive(Debug, Clone)]
struct Report {
    /// The report shown: counters, `stopped`.
    point: PipelinePoint,
    /// When the daemon first saw `point`.
    seen: Instant,
    /// The last answers, to notice a change: newest point dated up to
    /// [`probe::FUTURE_MARGIN`] ahead, and newest dated further ahead.
    current: Option<PipelinePoint>,
    future: Option<PipelinePoint>,
    /// How far ahead of the daemon's clock `future` was dated, s.
    skew_s: Option<f64>,
    /// How many points InfluxDB refused (its `dead_lettered` grew) between
    /// the previous report and `point`; `None` before a second report.
    refused: Option<f64>,
}

/// The [`Report`] after a poll answered `current` and `future` for one
/// subscriber (`None` when it has neither). A first sight has no earlier
/// answer to compare with, so it is dated by the point's own time, in the
/// past at most (a one-shot `nbpy status` has only this).
fn next_report(
    prev: Option<&Report>,
    current: Option<PipelinePoint>,
    future: Option<PipelinePoint>,
    now: Instant,
    now_ns: i64,
) -> Option<Report> {
    let skew_s = future
        .as_ref()
        .map(|f| (f.time_ns.saturating_sub(now_ns)) as f64 / 1e9);
    let (point, seen) = match prev {
        None => match (&current, &future) {
            (Some(c), _) => {
                let age = Duration::from_nanos(now_ns.saturating_sub(c.time_ns).max(0) as u64);
                (c.clone(), now.checked_sub(age).unwrap_or(now))
            }
            (None, Some(f)) => (f.clone(), now),
            (None, None) => return None,
        },
        Some(p) => {
            let cur_changed = current.is_some() && current != p.current;
            let fut_changed = future.is_some() && future != p.future;
            match (&current, &future) {
                (Some(c), _) if cur_changed => (c.clone(), now),
                (_, Some(f)) if fut_changed => (f.clone(), now),
                _ => (p.point.clone(), p.seen),
            }
        }
    };
    let refused = match prev {
        None => None,
        Some(p) if p.seen == seen => p.refused,
        Some(p) => {
            let field = |pt: &PipelinePoint, k: &str| pt.counters.get(k).copied().unwrap_or(0.0);
            // Refused points are kept in the dead-letter file, or lost when
            // it cannot be written: refused either way.
            let refused =
                |pt: &PipelinePoint| field(pt, "dead_lettered") + field(pt, "refused_lost");
            let (before, after) = (refused(&p.point), refused(&point));
            // A restart starts its counters from zero: all it counted is new.
            let restarted = field(&point, "received") < field(&p.point, "received");
            Some(if restarted {
                after
            } else {
                (after - before).max(0.0)
            })
        }
    };
    Some(Report {
        point,
        seen,
        current: current.or_else(|| prev.and_then(|p| p.current.clone())),
        future,
        skew_s,
        refused,
    })
}

/// Everything the daemon knows; `/status` is a [`Monitor::snapshot`].
pub struct Monitor {
    cfg: Config,
    started: Instant,
    feeds: Vec<Arc<FeedWatch>>,
    client: InfluxClient,
    http: reqwest::Client,
    systemd: bool,
    polled: Mutex<Polled>,
}

impl Monitor {
    /// Starts watching every configured publisher; they stop with `stop`.
    pub fn start(cfg: &Config, stop: &CancellationToken) -> Result<Arc<Monitor>, Failure> {
        let client = InfluxClient::new(&cfg.influxdb)?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| Failure::new(crate::exit::SOFTWARE, e))?;
        let feeds = cfg
            .publishers
            .iter()
            .map(|(name, p)| FeedWatch::start(name, p, stop.child_token()))
            .collect();
        let systemd = match cfg.health.systemd {
            HealthSystemd::On => true,
            HealthSystemd::Off => false,
            HealthSystemd::Auto => probe::systemd_booted(),
        };
        Ok(Arc::new(Monitor {
            cfg: cfg.clone(),
            started: Instant::now(),
            feeds,
            client,
            http,
            systemd,
            polled: Mutex::new(Polled::default()),
        }))
    }

    fn polled(&self) -> MutexGuard<'_, Polled> {
        self.polled.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refreshes rates; about once a second.
    pub fn tick(&self) {
        for f in &self.feeds {
            f.state().tick();
        }
    }

    /// One round of checks (InfluxDB, counters, lag, Grafana, systemd),
    /// then an uptime sample of every component.
    pub async fn poll(&self) {
        let mut ping = self.client.ping().await.map_err(|e| e.to_string());
        let pipeline = if ping.is_ok() {
            Some(probe::pipeline(&self.client, PIPELINE_LOOKBACK).await)
        } else {
            None
        };
        // `/ping` is answered without touching the store. A server whose
        // store is stuck (influxd 1.6 deadlocked in `DROP DATABASE` here:
        // queries and writes waited for ever while `/ping` answered) or
        // whose disk has stalled still answers it, so one small query that
        // times out counts as InfluxDB down, and the lag queries, which
        // would each wait as long, are skipped.
        if let Some(Err(WriteError::Timeout(_))) = &pipeline {
            ping = Err(format!(
                "answers /ping, but a query of nbpy_pipeline got no answer within {}: its store may be stuck",
                humantime::format_duration(self.cfg.influxdb.timeout)
            ));
        }
        let influx_up = ping.is_ok();
        let mut lags = BTreeMap::new();
        if influx_up {
            for f in &self.feeds {
                if let Some(l) = self.lag(f).await {
                    lags.insert(f.name.clone(), l);
                }
            }
        }
        let grafana = match &self.cfg.grafana.url {
            Some(url) => Some(probe::grafana(&self.http, url).await),
            None => None,
        };
        let units = if self.systemd {
            Some(probe::systemd_units().await)
        } else {
            None
        };
        {
            let mut p = self.polled();
            let now = Instant::now();
            p.influx = Some((now, ping));
            if let Some(g) = grafana {
                p.grafana = Some((now, g));
            }
            match pipeline {
                Some(Ok(answer)) => {
                    p.pipeline_error = None;
                    let mut current: BTreeMap<String, PipelinePoint> = answer
                        .current
                        .into_iter()
                        .map(|pt| (pt.component.clone(), pt))
                        .collect();
                    let mut future: BTreeMap<String, PipelinePoint> = answer
                        .future
                        .into_iter()
                        .map(|pt| (pt.component.clone(), pt))
                        .collect();
                    let names: Vec<String> = current
                        .keys()
                        .chain(future.keys())
                        .chain(p.pipeline.keys())
                        .cloned()
                        .collect();
                    let t_ns = now_ns();
                    for name in names {
                        let (c, f) = (current.remove(&name), future.remove(&name));
                        if c.is_none() && f.is_none() {
                            // Not answered this time (older than the
                            // lookback): what was seen stays, ageing.
                            continue;
                        }
                        let prev = p.pipeline.get(&name);
                        let Some(next) = next_report(prev, c, f, now, t_ns) else {
                            continue;
                        };
                        let before = prev.and_then(|o| o.point.counters.get("received").copied());
                        let after = next.point.counters.get("received").copied();
                        if let (Some(b), Some(a)) = (before, after) {
                            if a < b {
                                *p.resets.entry(name.clone()).or_default() += 1;
                            }
                        }
                        if let Some(ahead) = next.skew_s {
                            let log = p.skew_log.get_or_insert_with(|| {
                                crate::sink::RateLimitedLog::new(Duration::from_secs(60))
                            });
                            crate::warn_limited!(log, || skew_warning(&name, ahead));
                        }
                        p.pipeline.insert(name, next);
                    }
                }
                Some(Err(e)) => p.pipeline_error = Some(e.to_string()),
                None => {}
            }
            if influx_up {
                p.lag = lags;
                p.lag_unknown = None;
            } else {
                p.lag_unknown = Some("InfluxDB does not answer".into());
            }
            match units {
                Some(Ok(u)) => {
                    p.units = u;
                    p.units_error = None;
                }
                Some(Err(e)) => p.units_error = Some(e),
                None => {}
            }
        }
        let snap = self.snapshot();
        let mut p = self.polled();
        let now = Instant::now();
        let window = self.cfg.health.uptime_window;
        let mut sample = |key: String, up: bool| {
            let q = p.uptime.entry(key).or_default();
            q.push_back((now, up));
            while q
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > window)
            {
                q.pop_front();
            }
        };
        sample("influxdb".into(), snap.influxdb.state.is_up());
        if let Some(g) = &snap.grafana {
            sample("grafana".into(), g.state.is_up());
        }
        for pb in &snap.publishers {
            sample(format!("publisher/{}", pb.name), pb.state.is_up());
        }
        for s in &snap.subscribers {
            sample(format!("subscriber/{}", s.name), s.state.is_up());
        }
    }

    async fn lag(&self, f: &FeedWatch) -> Option<Lag> {
        // (measurement, last seq, time bound, samples) of the current epoch.
        let todo: Vec<(&'static str, feeds::MeasurementSeen)> = {
            let st = f.state();
            if st.last_seq == 0 {
                return None;
            }
            st.by_measurement
                .iter()
                .filter(|(_, m)| m.epoch == st.epoch && m.last_seq > 0)
                .map(|(name, m)| (*name, m.clone()))
                .collect()
        };
        let before = self.polled().lag.get(&f.name).cloned().unwrap_or_default();
        let mut lag = Lag::default();
        for (name, seen) in todo {
            // Only the recent past is scanned: from the newest point known
            // to be stored (the last answer), else from the oldest sample.
            let from = match before.by_measurement.get(name).and_then(|l| l.stored) {
                Some((e, seq)) if e == seen.epoch => seen
                    .samples
                    .iter()
                    .filter(|s| s.seq <= seq)
                    .map(|s| s.time_ns)
                    .max(),
                _ => None,
            };
            let since = from
                .or_else(|| seen.samples.iter().map(|s| s.time_ns).min())
                .unwrap_or(0)
                .saturating_sub(LAG_TIME_MARGIN_NS);
            match probe::max_stored_seq(&self.client, &f.name, seen.epoch, name, since).await {
                Ok(stored) => {
                    let mut m = measurement_lag(&seen, stored, Instant::now());
                    m.stored = stored.map(|s| (seen.epoch, s));
                    lag.messages += m.messages;
                    lag.seconds = lag.seconds.max(m.seconds);
                    lag.by_measurement.insert(name, m);
                }
                Err(WriteError::Timeout(e)) => {
                    tracing::debug!("health: write lag of {} in {name}: {e}", f.name);
                    lag.errors.push(format!("{name}: no answer: {e}"));
                }
                Err(e) => {
                    tracing::debug!("health: write lag of {} in {name}: {e}", f.name);
                    lag.errors.push(format!("{name}: {e}"));
                }
            }
        }
        Some(lag)
    }

    /// The picture right now: live bus state plus the last poll's results.
    pub fn snapshot(&self) -> Status {
        let now = Instant::now();
        let p = self.polled();
        let uptime = |key: &str| {
            p.uptime
                .get(key)
                .filter(|q| !q.is_empty())
                .map(|q| 100.0 * q.iter().filter(|(_, up)| *up).count() as f64 / q.len() as f64)
        };
        let influxdb = Backend {
            url: self.client.shown_url(),
            state: match &p.influx {
                None => State::Unknown,
                Some((_, Ok(()))) => State::Up,
                Some((_, Err(_))) => State::Down,
            },
            error: p
                .influx
                .as_ref()
                .and_then(|(_, r)| r.as_ref().err().cloned()),
            checked_age_s: p.influx.as_ref().map(|(t, _)| secs(now, *t)),
            detail: None,
            uptime_pct: uptime("influxdb"),
        };
        let grafana = self.cfg.grafana.url.as_ref().map(|url| Backend {
            url: crate::config::redact_url(url),
            state: match &p.grafana {
                None => State::Unknown,
                Some((_, Ok(_))) => State::Up,
                Some((_, Err(_))) => State::Down,
            },
            error: p
                .grafana
                .as_ref()
                .and_then(|(_, r)| r.as_ref().err().cloned()),
            checked_age_s: p.grafana.as_ref().map(|(t, _)| secs(now, *t)),
            detail: p
                .grafana
                .as_ref()
                .and_then(|(_, r)| r.as_ref().ok().cloned()),
            uptime_pct: uptime("grafana"),
        });
        let unit_down = |u: Option<&Unit>| {
            u.filter(|u| {
                !matches!(
                    u.active_state.as_str(),
                    "active" | "activating" | "reloading"
                )
            })
            .map(|u| format!("unit {} is {} ({})", u.id, u.active_state, u.sub_state))
        };

        let mut publishers = Vec::new();
        for f in &self.feeds {
            let st = f.state();
            let unit = probe::unit_for(&p.units, "publisher", &f.name).cloned();
            let last_age = st.last_message.map(|t| secs(now, t));
            let silent_for = last_age.unwrap_or_else(|| secs(now, st.since));
            let (state, problem) = if let Some(why) = unit_down(unit.as_ref()) {
                (State::Down, Some(why))
            } else if !st.connected {
                (
                    State::Down,
                    Some(st.problem.clone().unwrap_or_else(|| "not connected".into())),
                )
            } else if silent_for > f.cfg.stale_after.as_secs_f64() {
                (
                    State::Stale,
                    Some(format!(
                        "connected, but no message for {} (stale_after = {})",
                        report::age(Some(silent_for)),
                        humantime::format_duration(f.cfg.stale_after)
                    )),
                )
            } else {
                (State::Up, None)
            };
            let lag = p.lag.get(&f.name).filter(|_| p.lag_unknown.is_none());
            let totals = lag.and_then(Lag::totals);
            let mut topics: Vec<TopicStatus> = st
                .topics
                .iter()
                .map(|(topic, t)| TopicStatus {
                    topic: topic.clone(),
                    instrument: topic.splitn(3, '.').nth(2).unwrap_or("").to_string(),
                    received: t.received,
                    rate: t.rate,
                    last_message_age_s: t.last.map(|l| secs(now, l)),
                })
                .collect();
            topics.sort_by(|a, b| a.topic.cmp(&b.topic));
            publishers.push(PublisherStatus {
                name: f.name.clone(),
                feed: f.cfg.feed.name().to_string(),
                endpoint: f.cfg.reach(),
                state,
                problem,
                since_s: secs(now, st.since),
                last_message_age_s: last_age,
                received: st.received,
                rate: st.rate(),
                gaps: st.gaps.total_gaps(),
                malformed: st.malformed,
                restarts: unit
                    .as_ref()
                    .map(|u| u.restarts)
                    .unwrap_or_else(|| st.restarts()),
                disconnects: st.disconnects,
                epoch: st.epoch,
                last_seq: st.last_seq,
                latency_ms: st.latency_ms,
                write_lag_messages: totals.map(|t| t.0),
                write_lag_s: totals.map(|t| t.1),
                write_lag_by_measurement: lag
                    .map(|l| {
                        l.by_measurement
                            .iter()
                            .map(|(m, ml)| {
                                (
                                    m.to_string(),
                                    report::MeasurementLag {
                                        messages: ml.messages,
                                        seconds: ml.seconds,
                                    },
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                write_lag_error: match &p.lag_unknown {
                    Some(why) if st.last_seq > 0 => Some(format!("every measurement: {why}")),
                    _ => lag
                        .filter(|l| !l.errors.is_empty())
                        .map(|l| l.errors.join("; ")),
                },
                uptime_pct: uptime(&format!("publisher/{}", f.name)),
                unit,
                topics,
            });
        }

        let mut subscribers = Vec::new();
        for (name, scfg) in &self.cfg.subscribers {
            let unit = probe::unit_for(&p.units, "subscriber", name).cloned();
            let report = p.pipeline.get(name);
            let point = report.map(|r| &r.point);
            let report_age = report.map(|r| secs(now, r.seen));
            let limit = self.cfg.health.subscriber_stale_after.unwrap_or(
                scfg.stats_interval * 2 + self.cfg.influxdb.flush_interval + Duration::from_secs(2),
            );
            let influx_known = matches!(p.influx, Some((_, Ok(()))));
            let (state, problem) = if let Some(why) = unit_down(unit.as_ref()) {
                (State::Down, Some(why))
            } else if !influx_known {
                (
                    State::Unknown,
                    Some("InfluxDB does not answer: its counters cannot be read".into()),
                )
            } else if let Some(e) = &p.pipeline_error {
                (State::Unknown, Some(format!("reading nbpy_pipeline: {e}")))
            } else {
                match report_age {
                    // Its newest report is fresh, but it is the last one.
                    Some(a) if point.is_some_and(|pt| pt.stopped) => (
                        State::Down,
                        Some(format!("stopped cleanly {} ago", report::age(Some(a)))),
                    ),
                    None => (
                        State::Down,
                        Some(format!(
                            "no nbpy_pipeline counters in the last {}",
                            humantime::format_duration(PIPELINE_LOOKBACK)
                        )),
                    ),
                    Some(a) if a > limit.as_secs_f64() => (
                        State::Down,
                        Some(format!(
                            "counters last written {} ago (expected every {})",
                            report::age(Some(a)),
                            humantime::format_duration(scfg.stats_interval)
                        )),
                    ),
                    Some(_) => (State::Up, None),
                }
            };
            let refusing = report
                .and_then(|r| r.refused)
                .filter(|n| *n > 0.0 && state.is_up());
            let problem = match refusing {
                Some(n) => {
                    let total = |k: &str| {
                        point
                            .and_then(|pt| pt.counters.get(k).copied())
                            .unwrap_or(0.0)
                    };
                    let lost = total("refused_lost");
                    Some(if lost > 0.0 {
                        format!(
                            "InfluxDB refused {n:.0} point(s) since its previous report (dead_lettered {:.0}, refused and lost {lost:.0}: the dead-letter file could not be written), not stored",
                            total("dead_lettered")
                        )
                    } else {
                        format!(
                            "InfluxDB refused {n:.0} point(s) since its previous report (dead_lettered {:.0}): they are in its dead-letter files, not stored",
                            total("dead_lettered")
                        )
                    })
                }
                None => problem,
            };
            subscribers.push(SubscriberStatus {
                name: name.clone(),
                state,
                problem,
                report_age_s: report_age,
                refused_recently: refusing,
                counters: point.map(|pt| pt.counters.clone()).unwrap_or_default(),
                spool_bytes: point.and_then(|pt| pt.counters.get("spool_bytes").copied()),
                restarts: unit
                    .as_ref()
                    .map(|u| u.restarts)
                    .unwrap_or_else(|| p.resets.get(name).copied().unwrap_or(0)),
                uptime_pct: uptime(&format!("subscriber/{name}")),
                unit,
            });
        }

        let mut not_ready = Vec::new();
        if !influxdb.state.is_up() {
            not_ready.push(format!(
                "InfluxDB {}: {}",
                influxdb.state.as_str(),
                influxdb.error.as_deref().unwrap_or("not checked yet")
            ));
        }
        for pb in &publishers {
            if !pb.state.is_up() {
                not_ready.push(format!(
                    "publisher {} {}: {}",
                    pb.name,
                    pb.state.as_str(),
                    pb.problem.as_deref().unwrap_or("")
                ));
            }
        }
        for s in &subscribers {
            // Data InfluxDB refuses is lost to the dashboards: an incident,
            // though the subscriber itself runs.
            if !s.state.is_up() || s.refused_recently.is_some() {
                not_ready.push(format!(
                    "subscriber {} {}: {}",
                    s.name,
                    s.state.as_str(),
                    s.problem.as_deref().unwrap_or("")
                ));
            }
        }
        let mut warnings = Vec::new();
        for (name, r) in &p.pipeline {
            if let Some(ahead) = r.skew_s {
                warnings.push(skew_warning(name, ahead));
            }
        }
        for pb in &publishers {
            if let Some(e) = &pb.write_lag_error {
                warnings.push(format!(
                    "publisher {}: write lag cannot be read for {e}",
                    pb.name
                ));
            }
        }
        if let Some(e) = &p.units_error {
            warnings.push(format!("systemd: {e}"));
        }
        if let Some(g) = grafana.as_ref().filter(|g| g.state == State::Down) {
            warnings.push(format!(
                "Grafana down: {}",
                g.error.as_deref().unwrap_or("")
            ));
        }
        Status {
            time_ns: now_ns(),
            watching_s: secs(now, self.started),
            uptime_window_s: self.cfg.health.uptime_window.as_secs_f64(),
            supervisor: if self.systemd {
                "systemd".into()
            } else {
                match crate::supervisor::read_status(&self.cfg) {
                    Ok((up, true)) => format!("nbpy up (pid {})", up.pid),
                    _ => "none".into(),
                }
            },
            ready: not_ready.is_empty(),
            not_ready,
            warnings,
            influxdb,
            grafana,
            publishers,
            subscribers,
            units: p.units.clone(),
        }
    }

    /// Keeps polling until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut poll = tokio::time::interval(self.cfg.health.poll_interval);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.tick(),
                _ = poll.tick() => self.poll().await,
            }
        }
    }

    /// A one-off picture without the daemon: watch the bus for `observe`,
    /// poll once. For `nbpy status` when `nbpy-health` is not running.
    pub async fn probe(cfg: &Config, observe: Duration) -> Result<Status, Failure> {
        let stop = CancellationToken::new();
        let m = Monitor::start(cfg, &stop)?;
        m.tick();
        let t0 = Instant::now();
        // Done early once every publisher has been heard from.
        while t0.elapsed() < observe {
            let all = m
                .feeds
                .iter()
                .all(|f| f.state().last_message.is_some() && t0.elapsed() > observe / 2);
            if all {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        m.tick();
        m.poll().await;
        let s = m.snapshot();
        stop.cancel();
        Ok(s)
    }
}

/// What a future-dated report means, for `/status` and the log.
fn skew_warning(component: &str, ahead_s: f64) -> String {
    format!(
        "{component}: its newest nbpy_pipeline report is dated {} in the future: clock skew \
         between it and InfluxDB? Its freshness is judged by when this daemon saw its reports change",
        report::age(Some(ahead_s))
    )
}

fn secs(now: Instant, then: Instant) -> f64 {
    now.saturating_duration_since(then).as_secs_f64()
}

/// One measurement's write lag from its newest stored seq: nothing when
/// everything it received is stored; else how many of its messages came
/// after the newest stored one (to the sampling's grain,
/// [`feeds::MeasurementSeen::samples`]), and since when the oldest of them
/// has been waiting.
fn measurement_lag(
    seen: &feeds::MeasurementSeen,
    stored: Option<u64>,
    now: Instant,
) -> MeasurementLag {
    if stored.is_some_and(|s| s >= seen.last_seq) {
        return MeasurementLag::default();
    }
    let stored_to = stored.unwrap_or(0);
    // Messages counted up to the newest sample known stored; with none
    // (nothing stored, or not since the oldest sample), up to just before
    // the oldest sample.
    let stored_count = match seen.samples.iter().rev().find(|s| s.seq <= stored_to) {
        Some(s) => s.count,
        None => seen.samples.front().map(|s| s.count - 1).unwrap_or(0),
    };
    let first_unstored = seen
        .samples
        .iter()
        .find(|s| s.seq > stored_to)
        .map(|s| s.at)
        .unwrap_or(now);
    MeasurementLag {
        messages: seen.count.saturating_sub(stored_count),
        seconds: secs(now, first_unstored),
        stored: None,
    }
}

/// `nbpy-health`: serves until SIGTERM/SIGINT.
pub async fn run(cfg: &Config, listen: Option<&str>) -> Result<(), Failure> {
    let svc = Service::start("nbpy-health", Duration::from_secs(3600), String::new);
    // The daemon carries no data; its loop beating is what matters.
    svc.liveness.set_idle(true);
    match crate::service::raise_nofile() {
        Ok(n) => tracing::debug!("health: open-files limit {n}"),
        Err(e) => tracing::warn!("health: cannot raise the open-files limit: {e}"),
    }
    let addr = listen.unwrap_or(&cfg.health.listen).to_string();
    let listener = tokio::net::TcpListener::bind(&addr).await.map_err(|e| {
        Failure::new(
            UNAVAILABLE,
            anyhow::anyhow!("health: cannot listen on {addr}: {e} (health.listen)"),
        )
    })?;
    let bound = listener.local_addr().map(|a| a.to_string()).unwrap_or(addr);
    let monitor = Monitor::start(cfg, &svc.shutdown)?;
    tokio::spawn(monitor.clone().run(svc.shutdown.child_token()));
    let server = tokio::spawn(http::serve(
        listener,
        monitor.clone(),
        svc.shutdown.child_token(),
        http::Limits::default(),
    ));
    svc.ready(&format!("serving on http://{bound}"));
    tracing::info!(
        "health: serving on http://{bound} (watching {} publisher(s), {} subscriber(s))",
        cfg.publishers.len(),
        cfg.subscribers.len()
    );
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = svc.shutdown.cancelled() => break,
            _ = tick.tick() => {
                svc.liveness.beat();
                let s = monitor.snapshot();
                let up = s.publishers.iter().filter(|p| p.state.is_up()).count();
                let subs = s.subscribers.iter().filter(|p| p.state.is_up()).count();
                svc.status(&format!(
                    "{}: {up}/{} publishers up, {subs}/{} subscribers up, InfluxDB {}",
                    if s.ready { "ready" } else { "not ready" },
                    s.publishers.len(),
                    s.subscribers.len(),
                    s.influxdb.state.as_str()
                ));
            }
        }
    }
    svc.stopping("stopping");
    let _ = server.await;
    tracing::info!("health: stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(time_ns: i64, received: f64) -> PipelinePoint {
        PipelinePoint {
            component: "main".into(),
            time_ns,
            counters: [("received".to_string(), received)].into(),
            stopped: false,
        }
    }

    /// A subscriber whose clock is a minute behind: its first report looks
    /// a minute old (nothing better is known yet), but every later one is
    /// fresh when it arrives, so it is not down for ever.
    #[test]
    fn a_report_is_fresh_when_it_changes_whatever_time_it_carries() {
        let t0 = Instant::now();
        let ns0: i64 = 1_700_000_000_000_000_000;
        let behind = 60_000_000_000;
        let r = next_report(None, Some(point(ns0 - behind, 1.0)), None, t0, ns0).unwrap();
        assert!((secs(t0, r.seen) - 60.0).abs() < 1.0, "{r:?}");
        let t1 = t0 + Duration::from_secs(1);
        let r = next_report(
            Some(&r),
            Some(point(ns0 + 1_000_000_000 - behind, 2.0)),
            None,
            t1,
            ns0 + 1_000_000_000,
        )
        .unwrap();
        assert_eq!(r.seen, t1);
        assert_eq!(r.point.counters.get("received"), Some(&2.0));
        assert_eq!(r.skew_s, None);
    }

    /// One point dated an hour ahead, then nothing: it does not stay fresh
    /// (the daemon saw it once), and it is reported as clock skew.
    #[test]
    fn a_future_dated_report_ages_by_the_daemons_clock() {
        let t0 = Instant::now();
        let ns0: i64 = 1_700_000_000_000_000_000;
        let hour = 3_600_000_000_000;
        let live = point(ns0 - 1_000_000_000, 5.0);
        let ahead = point(ns0 + hour, 6.0);
        let r = next_report(None, Some(live.clone()), Some(ahead.clone()), t0, ns0).unwrap();
        assert!(r.skew_s.is_some_and(|s| s > 3590.0), "{r:?}");
        let seen = r.seen;
        let t1 = t0 + Duration::from_secs(30);
        let r = next_report(
            Some(&r),
            Some(live),
            Some(ahead.clone()),
            t1,
            ns0 + 30_000_000_000,
        )
        .unwrap();
        assert_eq!(r.seen, seen, "nothing changed: the report only ages");
        assert!(secs(t1, r.seen) >= 30.0);
        // A new report from a live subscriber is seen though the old
        // future-dated one still sorts first.
        let t2 = t1 + Duration::from_secs(1);
        let r = next_report(
            Some(&r),
            Some(point(ns0 + 31_000_000_000, 7.0)),
            Some(ahead),
            t2,
            ns0 + 31_000_000_000,
        )
        .unwrap();
        assert_eq!((r.seen, r.point.counters.get("received")), (t2, Some(&7.0)));
    }

    /// Within a measurement: its messages after its newest stored seq,
    /// whatever the other measurements of the publisher stored.
    #[test]
    fn write_lag_counts_a_measurements_messages_after_its_newest_stored_seq() {
        let t0 = Instant::now();
        let s = |ms: u64, seq: u64, count: u64| feeds::MeasurementSample {
            at: t0 + Duration::from_millis(ms),
            seq,
            count,
            time_ns: 0,
        };
        let seen = feeds::MeasurementSeen {
            epoch: 1,
            last_seq: 35,
            count: 12,
            samples: [s(0, 10, 1), s(100, 20, 5), s(200, 30, 9)].into(),
        };
        let now = t0 + Duration::from_millis(1000);
        let l = measurement_lag(&seen, Some(35), now);
        assert_eq!((l.messages, l.seconds), (0, 0.0));
        let l = measurement_lag(&seen, Some(20), now);
        assert_eq!(l.messages, 7);
        assert!((l.seconds - 0.8).abs() < 1e-9);
        // Nothing stored (every point refused): all of it, since the first.
        let l = measurement_lag(&seen, None, now);
        assert_eq!(l.messages, 12);
        assert!((l.seconds - 1.0).abs() < 1e-9);
    }
}
