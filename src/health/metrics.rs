//! `/metrics`: the [`Status`] in the Prometheus text format (0.0.4), via
//! `prometheus-client`.
//!
//! A fresh registry is filled from a snapshot on every scrape, so a
//! metric always says what `/status` says at that moment and nothing has
//! to be kept in step. Counters the daemon counts itself (messages it
//! received, gaps it saw) are Prometheus counters; values copied from a
//! subscriber's own counters are gauges, because they reset when that
//! subscriber restarts and this process did not do the counting.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::report::{State, Status};

pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

type Labels = Vec<(String, String)>;
type G = Family<Labels, Gauge<f64, AtomicU64>>;
type C = Family<Labels, Counter>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn gauge(reg: &mut Registry, name: &str, help: &str) -> G {
    let g = G::default();
    reg.register(name, help, g.clone());
    g
}

fn counter(reg: &mut Registry, name: &str, help: &str) -> C {
    let c = C::default();
    reg.register(name, help, c.clone());
    c
}

fn up(s: State) -> f64 {
    if s.is_up() {
        1.0
    } else {
        0.0
    }
}

/// Encodes a snapshot as Prometheus text.
pub fn encode(s: &Status) -> Result<String, std::fmt::Error> {
    let mut reg = Registry::default();
    let ready = gauge(
        &mut reg,
        "nbpy_ready",
        "1 when the appliance is doing its job (what /readyz answers)",
    );
    let comp_up = gauge(
        &mut reg,
        "nbpy_component_up",
        "1 when the component is up, 0 when down, stale or unknown",
    );
    let uptime = gauge(
        &mut reg,
        "nbpy_component_uptime_ratio",
        "Fraction of health checks over the uptime window that found the component up",
    );
    let restarts = gauge(
        &mut reg,
        "nbpy_component_restarts",
        "Restarts: systemd's NRestarts, else epoch changes (publishers) or counter resets (subscribers) seen",
    );
    let watching = gauge(
        &mut reg,
        "nbpy_health_watching_seconds",
        "How long the health daemon has been watching",
    );
    let last_msg = gauge(
        &mut reg,
        "nbpy_publisher_last_message_age_seconds",
        "Seconds since the publisher's newest message on the bus",
    );
    let received = counter(
        &mut reg,
        "nbpy_publisher_messages_received",
        "Messages the health daemon received from the publisher",
    );
    let gaps = counter(
        &mut reg,
        "nbpy_publisher_gap_messages",
        "Sequence numbers missing on the health daemon's connection",
    );
    let rate = gauge(
        &mut reg,
        "nbpy_publisher_message_rate",
        "Messages per second over the last 10 s",
    );
    let latency = gauge(
        &mut reg,
        "nbpy_publisher_latency_seconds",
        "Receive time minus exchange time of the newest message",
    );
    let lag_msgs = gauge(
        &mut reg,
        "nbpy_publisher_write_lag_messages",
        "Messages seen on the bus and not (yet) stored in InfluxDB, summed over the publisher's measurements",
    );
    let lag_s = gauge(
        &mut reg,
        "nbpy_publisher_write_lag_seconds",
        "Age of the oldest message seen on the bus and not (yet) stored, over the publisher's measurements",
    );
    let m_lag_msgs = gauge(
        &mut reg,
        "nbpy_measurement_write_lag_messages",
        "Messages of one measurement seen on the bus and not (yet) stored in InfluxDB",
    );
    let m_lag_s = gauge(
        &mut reg,
        "nbpy_measurement_write_lag_seconds",
        "Age of the oldest message of one measurement seen on the bus and not (yet) stored",
    );
    let topic_age = gauge(
        &mut reg,
        "nbpy_feed_last_message_age_seconds",
        "Seconds since the newest message per feed topic (source.channel.instrument)",
    );
    let topic_rate = gauge(
        &mut reg,
        "nbpy_feed_message_rate",
        "Messages per second per feed topic",
    );
    let report_age = gauge(
        &mut reg,
        "nbpy_subscriber_report_age_seconds",
        "Seconds since the health daemon first saw the subscriber's newest nbpy_pipeline point (its own clock, not the point's time)",
    );
    let refused = gauge(
        &mut reg,
        "nbpy_subscriber_refused_points",
        "Points InfluxDB refused (the subscriber's dead_lettered grew) between its last two reports; above 0 makes /readyz fail",
    );
    let sub_counter = gauge(
        &mut reg,
        "nbpy_subscriber_reported",
        "The subscriber's own counters as it last wrote them to nbpy_pipeline, by field (received, gaps, written, queue_depth, spool_bytes, ...)",
    );
    let write_latency = gauge(
        &mut reg,
        "nbpy_subscriber_write_latency_seconds",
        "The subscriber's last InfluxDB write latency",
    );

    ready
        .get_or_create(&Vec::new())
        .set(if s.ready { 1.0 } else { 0.0 });
    watching.get_or_create(&Vec::new()).set(s.watching_s);
    let component = |kind: &str, name: &str, st: State, up_pct: Option<f64>| {
        let l = labels(&[("kind", kind), ("name", name)]);
        comp_up.get_or_create(&l).set(up(st));
        if let Some(p) = up_pct {
            uptime.get_or_create(&l).set(p / 100.0);
        }
    };
    component(
        "influxdb",
        "influxdb",
        s.influxdb.state,
        s.influxdb.uptime_pct,
    );
    if let Some(g) = &s.grafana {
        component("grafana", "grafana", g.state, g.uptime_pct);
    }
    for p in &s.publishers {
        component("publisher", &p.name, p.state, p.uptime_pct);
        let l = labels(&[("kind", "publisher"), ("name", &p.name)]);
        restarts.get_or_create(&l).set(p.restarts as f64);
        let l = labels(&[("publisher", &p.name)]);
        if let Some(a) = p.last_message_age_s {
            last_msg.get_or_create(&l).set(a);
        }
        received.get_or_create(&l).inc_by(p.received);
        gaps.get_or_create(&l).inc_by(p.gaps);
        rate.get_or_create(&l).set(p.rate);
        if let Some(ms) = p.latency_ms {
            latency.get_or_create(&l).set(ms / 1e3);
        }
        if let Some(n) = p.write_lag_messages {
            lag_msgs.get_or_create(&l).set(n as f64);
        }
        if let Some(sec) = p.write_lag_s {
            lag_s.get_or_create(&l).set(sec);
        }
        for (m, ml) in &p.write_lag_by_measurement {
            let l = labels(&[("publisher", &p.name), ("measurement", m)]);
            m_lag_msgs.get_or_create(&l).set(ml.messages as f64);
            m_lag_s.get_or_create(&l).set(ml.seconds);
        }
        for t in &p.topics {
            let l = labels(&[
                ("publisher", &p.name),
                ("topic", &t.topic),
                ("instrument", &t.instrument),
            ]);
            if let Some(a) = t.last_message_age_s {
                topic_age.get_or_create(&l).set(a);
            }
            topic_rate.get_or_create(&l).set(t.rate);
        }
    }
    for sub in &s.subscribers {
        component("subscriber", &sub.name, sub.state, sub.uptime_pct);
        let l = labels(&[("kind", "subscriber"), ("name", &sub.name)]);
        restarts.get_or_create(&l).set(sub.restarts as f64);
        let l = labels(&[("subscriber", &sub.name)]);
        if let Some(a) = sub.report_age_s {
            report_age.get_or_create(&l).set(a);
        }
        refused
            .get_or_create(&l)
            .set(sub.refused_recently.unwrap_or(0.0));
        for (k, v) in &sub.counters {
            if k == "write_latency_ms" {
                write_latency.get_or_create(&l).set(v / 1e3);
                continue;
            }
            let l = labels(&[("subscriber", &sub.name), ("field", k)]);
            sub_counter.get_or_create(&l).set(*v);
        }
    }
    let mut out = String::new();
    prometheus_text::encode(&mut out, &reg)?;
    Ok(out)
}
