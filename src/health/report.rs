//! The picture `/status` returns (and `nbpy status` prints): plain data,
//! serialisable both ways so the CLI reads exactly what the daemon serves.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Doing its job.
    Up,
    /// Running, but not delivering (a silent feed).
    Stale,
    Down,
    /// Not known yet (no probe has answered).
    Unknown,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Up => "up",
            State::Stale => "stale",
            State::Down => "down",
            State::Unknown => "unknown",
        }
    }
    pub fn is_up(self) -> bool {
        self == State::Up
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// When this picture was taken, ns since the Unix epoch.
    pub time_ns: i64,
    /// How long the daemon has been watching, s.
    pub watching_s: f64,
    /// The window `uptime_pct` values cover, s.
    pub uptime_window_s: f64,
    /// Where process states come from besides the bus and the counters:
    /// "systemd" or "none".
    pub supervisor: String,
    pub ready: bool,
    /// Why not ready, one line per reason.
    pub not_ready: Vec<String>,
    /// What is wrong without making the appliance unready (Grafana down,
    /// systemd not answering).
    pub warnings: Vec<String>,
    pub influxdb: Backend,
    pub grafana: Option<Backend>,
    pub publishers: Vec<PublisherStatus>,
    pub subscribers: Vec<SubscriberStatus>,
    /// Every `nbpy-*` unit systemd knows, when under systemd.
    pub units: Vec<Unit>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Backend {
    pub url: String,
    pub state: State,
    pub error: Option<String>,
    /// Age of the last check, s.
    pub checked_age_s: Option<f64>,
    /// What it says about itself (Grafana: version and database).
    pub detail: Option<String>,
    pub uptime_pct: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PublisherStatus {
    pub name: String,
    pub feed: String,
    pub endpoint: String,
    pub state: State,
    /// Why it is not up.
    pub problem: Option<String>,
    /// How long it has been connected or disconnected, s.
    pub since_s: f64,
    pub last_message_age_s: Option<f64>,
    /// Messages the daemon received from it since the daemon started.
    pub received: u64,
    pub rate: f64,
    /// Sequence numbers missing on the daemon's own connection (its bus
    /// tap): not data lost in the pipeline, which is the subscribers' `gaps`.
    pub gaps: u64,
    pub malformed: u64,
    /// Epoch changes seen on the bus, or systemd's restart count.
    pub restarts: u64,
    pub disconnects: u64,
    pub epoch: u64,
    pub last_seq: u64,
    /// The newest message's receive − exchange time.
    pub latency_ms: Option<f64>,
    /// Sequence numbers seen on the bus and not (yet) in InfluxDB; `None`
    /// when it cannot be measured now (InfluxDB does not answer, or no
    /// measurement's stored seq could be read: `write_lag_error` says why).
    pub write_lag_messages: Option<u64>,
    /// Age of the oldest message seen on the bus and not (yet) in InfluxDB;
    /// `None` when it cannot be measured, as above.
    pub write_lag_s: Option<f64>,
    /// The same per measurement (the totals above are their sum and
    /// oldest): one measurement InfluxDB refuses shows here though the
    /// others are stored.
    #[serde(default)]
    pub write_lag_by_measurement: std::collections::BTreeMap<String, MeasurementLag>,
    /// Why the write lag of some measurement could not be read (a dropped
    /// retention policy, a query error; "every measurement: InfluxDB does
    /// not answer" during an outage); those measurements are left out of
    /// the totals, and with none read there are no totals.
    #[serde(default)]
    pub write_lag_error: Option<String>,
    pub uptime_pct: Option<f64>,
    pub unit: Option<Unit>,
    pub topics: Vec<TopicStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MeasurementLag {
    pub messages: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TopicStatus {
    pub topic: String,
    pub instrument: String,
    pub received: u64,
    pub rate: f64,
    pub last_message_age_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SubscriberStatus {
    pub name: String,
    pub state: State,
    pub problem: Option<String>,
    /// How long ago the daemon first saw its newest `nbpy_pipeline`
    /// point, s (by the daemon's clock, not the point's time).
    pub report_age_s: Option<f64>,
    /// Points InfluxDB refused (its `dead_lettered` grew) between its last
    /// two reports, when any: the appliance is not ready meanwhile.
    #[serde(default)]
    pub refused_recently: Option<f64>,
    /// Its newest counters, as it wrote them (received, gaps, malformed,
    /// written, write_errors, dead_lettered, queue_depth,
    /// write_latency_ms, and spooled/replayed/spool_bytes when spooling).
    pub counters: std::collections::BTreeMap<String, f64>,
    /// Spool depth in bytes, when the subscriber spools (from its counters).
    pub spool_bytes: Option<f64>,
    /// Counter resets seen (a restart), or systemd's restart count.
    pub restarts: u64,
    pub uptime_pct: Option<f64>,
    pub unit: Option<Unit>,
}

impl SubscriberStatus {
    pub fn counter(&self, name: &str) -> Option<f64> {
        self.counters.get(name).copied()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Unit {
    pub id: String,
    pub active_state: String,
    pub sub_state: String,
    pub restarts: u64,
}

/// Seconds as a short human age: `0.4s`, `12s`, `3m`, `2h`.
pub fn age(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s < 10.0 => format!("{s:.1}s"),
        Some(s) if s < 120.0 => format!("{s:.0}s"),
        Some(s) if s < 7200.0 => format!("{:.0}m", s / 60.0),
        Some(s) => format!("{:.0}h", s / 3600.0),
    }
}

fn pct(p: Option<f64>) -> String {
    p.map(|p| format!("{p:.1}%")).unwrap_or_else(|| "-".into())
}

/// The compact terminal table `nbpy status` prints.
pub fn render(s: &Status) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{} (watching {}, supervisor: {})",
        if s.ready { "READY" } else { "NOT READY" },
        age(Some(s.watching_s)),
        s.supervisor
    );
    for r in &s.not_ready {
        let _ = writeln!(o, "  - {r}");
    }
    for w in &s.warnings {
        let _ = writeln!(o, "  ! {w}");
    }
    let _ = writeln!(
        o,
        "\n{:<10} {:<28} {:<7} {:>7} DETAIL",
        "BACKEND", "URL", "STATE", "UPTIME"
    );
    let mut backend = |name: &str, b: &Backend| {
        let _ = writeln!(
            o,
            "{:<10} {:<28} {:<7} {:>7} {}",
            name,
            b.url,
            b.state.as_str(),
            pct(b.uptime_pct),
            b.error.as_deref().or(b.detail.as_deref()).unwrap_or("")
        );
    };
    backend("influxdb", &s.influxdb);
    if let Some(g) = &s.grafana {
        backend("grafana", g);
    }
    if !s.publishers.is_empty() {
        let _ = writeln!(
            o,
            "\n{:<14} {:<7} {:>8} {:>9} {:>8} {:>8} {:>9} {:>7} {:>7}",
            "PUBLISHER",
            "STATE",
            "LAST MSG",
            "MSG/S",
            "TAP GAPS",
            "RESTARTS",
            "WRITE LAG",
            "LAG S",
            "UPTIME"
        );
        for p in &s.publishers {
            let _ = writeln!(
                o,
                "{:<14} {:<7} {:>8} {:>9.1} {:>8} {:>8} {:>9} {:>7} {:>7}",
                p.name,
                p.state.as_str(),
                age(p.last_message_age_s),
                p.rate,
                p.gaps,
                p.restarts,
                p.write_lag_messages
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "-".into()),
                age(p.write_lag_s),
                pct(p.uptime_pct)
            );
            if let Some(why) = &p.problem {
                let _ = writeln!(o, "{:<14} ! {why}", "");
            }
        }
        // The publisher's gaps column counts what the health daemon's own
        // bus connection missed; read as a publisher column it looked like
        // data lost in the pipeline, which the subscribers' GAPS are.
        let _ = writeln!(
            o,
            "  (TAP GAPS: seq numbers this monitor's own bus connection missed, not pipeline loss; \
             a subscriber's GAPS are what it missed)"
        );
    }
    if !s.subscribers.is_empty() {
        let _ = writeln!(
            o,
            "\n{:<14} {:<7} {:>8} {:>11} {:>11} {:>6} {:>7} {:>8} {:>9} {:>7}",
            "SUBSCRIBER",
            "STATE",
            "REPORTED",
            "RECEIVED",
            "WRITTEN",
            "GAPS",
            "ERRORS",
            "QUEUED",
            "SPOOL B",
            "UPTIME"
        );
        let n = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into());
        for sub in &s.subscribers {
            let _ = writeln!(
                o,
                "{:<14} {:<7} {:>8} {:>11} {:>11} {:>6} {:>7} {:>8} {:>9} {:>7}",
                sub.name,
                sub.state.as_str(),
                age(sub.report_age_s),
                n(sub.counter("received")),
                n(sub.counter("written")),
                n(sub.counter("gaps")),
                n(sub.counter("write_errors")),
                n(sub.counter("queue_depth")),
                n(sub.spool_bytes),
                pct(sub.uptime_pct)
            );
            if let Some(why) = &sub.problem {
                let _ = writeln!(o, "{:<14} ! {why}", "");
            }
        }
    }
    let mut feeds: Vec<(&str, &TopicStatus)> = Vec::new();
    for p in &s.publishers {
        for t in &p.topics {
            feeds.push((&p.name, t));
        }
    }
    if !feeds.is_empty() {
        let _ = writeln!(
            o,
            "\n{:<14} {:<36} {:>8} {:>9}",
            "FEED", "TOPIC", "LAST MSG", "MSG/S"
        );
        for (p, t) in feeds {
            let _ = writeln!(
                o,
                "{:<14} {:<36} {:>8} {:>9.1}",
                p,
                t.topic,
                age(t.last_message_age_s),
                t.rate
            );
        }
    }
    if !s.units.is_empty() {
        let _ = writeln!(
            o,
            "\n{:<40} {:<10} {:<10} {:>8}",
            "UNIT", "ACTIVE", "SUB", "RESTARTS"
        );
        for u in &s.units {
            let _ = writeln!(
                o,
                "{:<40} {:<10} {:<10} {:>8}",
                u.id, u.active_state, u.sub_state, u.restarts
            );
        }
    }
    o
}
