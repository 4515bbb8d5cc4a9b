//! The periodic checks: InfluxDB `/ping`, the subscribers' newest
//! `nbpy_pipeline` counters, write lag, Grafana `/api/health`, systemd.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value as Json;

use super::report::Unit;
use crate::sink::influx::{InfluxClient, WriteError};
use crate::validate::{ident, string_lit};

/// A subscriber's newest counters, as it wrote them.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelinePoint {
    pub component: String,
    pub time_ns: i64,
    pub counters: BTreeMap<String, f64>,
    /// The point is the last report of a clean stop.
    pub stopped: bool,
}

/// Points dated more than this ahead of InfluxDB's clock are reported apart,
/// as future-dated: clocks kept by NTP agree to milliseconds, so anything
/// past a few seconds is a skewed clock, not jitter.
pub const FUTURE_MARGIN: Duration = Duration::from_secs(5);

/// The newest `nbpy_pipeline` points per component: those dated up to
/// [`FUTURE_MARGIN`] ahead, and apart from them the newest dated further
/// ahead. Without the upper bound one point from a clock that is ahead
/// would be "the newest" until its time came, hiding every later report
/// (and a subscriber killed after writing it).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pipeline {
    pub current: Vec<PipelinePoint>,
    pub future: Vec<PipelinePoint>,
}

/// Reads the newest `nbpy_pipeline` points of every component written in
/// the last `within` (and any dated in the future), in one request.
pub async fn pipeline(client: &InfluxClient, within: Duration) -> Result<Pipeline, WriteError> {
    let m = crate::schema::by_name("nbpy_pipeline")
        .map(|m| (m.rp, m.name))
        .unwrap_or((crate::schema::rp::DEFAULT, "nbpy_pipeline"));
    let from = format!("{}.{}.{}", ident(client.database()), ident(m.0), ident(m.1));
    let margin = FUTURE_MARGIN.as_secs();
    let q = format!(
        "SELECT * FROM {from} WHERE time > now() - {}s AND time <= now() + {margin}s GROUP BY \"component\" ORDER BY time DESC LIMIT 1; \
         SELECT * FROM {from} WHERE time > now() + {margin}s GROUP BY \"component\" ORDER BY time DESC LIMIT 1",
        within.as_secs().max(1)
    );
    let v = match client.query(&q).await {
        Ok(v) => v,
        // InfluxDB 1.x answers a query of several statements on a missing
        // database with a bare "not executed" (the trap `admin::schema::stats`
        // works around too): ask whether the database exists, to say so.
        Err(WriteError::Refused(m)) if m.contains("not executed") => {
            return Err(match client.query("SHOW DATABASES").await {
                Ok(dbs) if !database_listed(&dbs, client.database()) => {
                    WriteError::Missing(format!("database {:?} does not exist", client.database()))
                }
                _ => WriteError::Refused(m),
            });
        }
        Err(e) => return Err(e),
    };
    Ok(Pipeline {
        current: parse_pipeline_at(&v, 0),
        future: parse_pipeline_at(&v, 1),
    })
}

/// Does a `SHOW DATABASES` answer list `db`?
fn database_listed(answer: &Json, db: &str) -> bool {
    answer
        .pointer("/results/0/series/0/values")
        .and_then(|v| v.as_array())
        .is_some_and(|rows| {
            rows.iter()
                .any(|r| r.pointer("/0").and_then(|x| x.as_str()) == Some(db))
        })
}

/// An InfluxDB answer's time: RFC 3339 (the default), or ns since the epoch.
fn time_ns(x: &Json) -> i64 {
    if let Some(n) = x.as_i64() {
        return n;
    }
    x.as_str()
        .and_then(|s| humantime::parse_rfc3339(s).ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Parses a `GROUP BY "component"` answer.
pub fn parse_pipeline(v: &Json) -> Vec<PipelinePoint> {
    parse_pipeline_at(v, 0)
}

/// Parses the `GROUP BY "component"` answer of statement `i`.
pub fn parse_pipeline_at(v: &Json, i: usize) -> Vec<PipelinePoint> {
    let mut out = Vec::new();
    let Some(series) = v
        .pointer(&format!("/results/{i}/series"))
        .and_then(|s| s.as_array())
    else {
        return out;
    };
    for s in series {
        let Some(component) = s.pointer("/tags/component").and_then(|c| c.as_str()) else {
            continue;
        };
        let cols: Vec<&str> = s
            .get("columns")
            .and_then(|c| c.as_array())
            .map(|c| c.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        let Some(row) = s.pointer("/values/0").and_then(|r| r.as_array()) else {
            continue;
        };
        let mut p = PipelinePoint {
            component: component.to_string(),
            time_ns: 0,
            counters: BTreeMap::new(),
            stopped: false,
        };
        for (c, x) in cols.iter().zip(row) {
            if *c == "time" {
                p.time_ns = time_ns(x);
            } else if *c == "stopped" {
                p.stopped = x.as_bool() == Some(true);
            } else if *c != "seq" && *c != "epoch" {
                if let Some(n) = x.as_f64() {
                    p.counters.insert(c.to_string(), n);
                }
            }
        }
        out.push(p);
    }
    out
}

/// The newest stored `seq` of a publisher epoch in one measurement, among
/// points stored at or after `since_ns`. One query per measurement, not
/// one over all: pooled, the others' progress hid a measurement that
/// stored nothing, and one failing source (a dropped retention policy)
/// failed them all, so write lag showed nothing rather than the problem.
pub async fn max_stored_seq(
    client: &InfluxClient,
    publisher: &str,
    epoch: u64,
    measurement: &str,
    since_ns: i64,
) -> Result<Option<u64>, WriteError> {
    let Some(m) = crate::schema::by_name(measurement) else {
        return Ok(None);
    };
    let q = format!(
        "SELECT max(\"seq\") FROM {}.{}.{} WHERE {} = {} AND \"epoch\" = {epoch} AND time >= {since_ns}",
        ident(client.database()),
        ident(m.rp),
        ident(m.name),
        ident(crate::schema::TAG_PUBLISHER),
        string_lit(publisher)
    );
    let v = client.query(&q).await?;
    Ok(v.pointer("/results/0/series/0/values/0/1")
        .and_then(|x| x.as_u64()))
}

/// Grafana's own health answer: `{"database":"ok","version":…}`.
pub async fn grafana(http: &reqwest::Client, base: &str) -> Result<String, String> {
    let url = format!("{}/api/health", base.trim_end_matches('/'));
    // What /status and the log show: never a password from grafana.url.
    let shown = crate::config::redact_url(&url);
    let r = http
        .get(&url)
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .map_err(|e| format!("{shown}: {}", crate::exit::http_error(e)))?;
    let status = r.status();
    let body: Json = r.json().await.map_err(|e| {
        format!(
            "{shown}: answer is not JSON: {}",
            crate::exit::http_error(e)
        )
    })?;
    let db = body.get("database").and_then(|d| d.as_str()).unwrap_or("?");
    let version = body.get("version").and_then(|d| d.as_str()).unwrap_or("?");
    if status.is_success() && db == "ok" {
        Ok(format!("version {version}, database ok"))
    } else {
        Err(format!("{shown}: {status}, database {db}"))
    }
}

/// Is systemd the init system (`sd_booted()`)?
pub fn systemd_booted() -> bool {
    std::path::Path::new("/run/systemd/system").is_dir()
}

/// `systemctl show` of every `nbpy-*` unit systemd has loaded.
pub async fn systemd_units() -> Result<Vec<Unit>, String> {
    let out = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::process::Command::new("systemctl")
            .args([
                "show",
                "--property=Id,ActiveState,SubState,NRestarts",
                "nbpy-*",
            ])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| "systemctl show did not answer within 5 s".to_string())?
    .map_err(|e| format!("systemctl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "systemctl show: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(parse_units(&String::from_utf8_lossy(&out.stdout)))
}

/// Parses `systemctl show` output: `Key=Value` blocks separated by blank lines.
pub fn parse_units(text: &str) -> Vec<Unit> {
    let mut units = Vec::new();
    for block in text.split("\n\n") {
        let mut kv = BTreeMap::new();
        for line in block.lines() {
            if let Some((k, v)) = line.split_once('=') {
                kv.insert(k.trim(), v.trim());
            }
        }
        let Some(id) = kv.get("Id").filter(|i| !i.is_empty()) else {
            continue;
        };
        units.push(Unit {
            id: id.to_string(),
            active_state: kv.get("ActiveState").unwrap_or(&"").to_string(),
            sub_state: kv.get("SubState").unwrap_or(&"").to_string(),
            restarts: kv
                .get("NRestarts")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0),
        });
    }
    units
}

/// The unit that runs a publisher or subscriber, by the template names
/// `nbpy-publisher@NAME.service` / `nbpy-subscriber@NAME.service`.
pub fn unit_for<'a>(units: &'a [Unit], role: &str, name: &str) -> Option<&'a Unit> {
    let want = format!("nbpy-{role}@{name}.service");
    units.iter().find(|u| u.id == want)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_systemctl_show() {
        let text = "Id=nbpy-publisher@kraken.service\nActiveState=active\nSubState=running\nNRestarts=2\n\n\
                    Id=nbpy-subscriber@main.service\nActiveState=failed\nSubState=failed\nNRestarts=0\n";
        let u = parse_units(text);
        assert_eq!(u.len(), 2);
        assert_eq!(
            unit_for(&u, "publisher", "kraken").map(|u| (u.active_state.as_str(), u.restarts)),
            Some(("active", 2))
        );
        assert_eq!(
            unit_for(&u, "subscriber", "main").map(|u| u.sub_state.as_str()),
            Some("failed")
        );
        assert!(unit_for(&u, "subscriber", "other").is_none());
    }

    #[test]
    fn parses_pipeline_groups() {
        let v: Json = serde_json::from_str(
            r#"{"results":[{"statement_id":0,"series":[
              {"name":"nbpy_pipeline","tags":{"component":"main"},
               "columns":["time","gaps","instrument","received","role","seq","written","write_latency_ms"],
               "values":[[1700000000000000000,0,"main",42,"subscriber",null,40,1.5]]}]}]}"#,
        )
        .unwrap();
        let p = parse_pipeline(&v);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].component, "main");
        assert_eq!(p[0].time_ns, 1_700_000_000_000_000_000);
        assert_eq!(p[0].counters.get("received"), Some(&42.0));
        assert_eq!(p[0].counters.get("write_latency_ms"), Some(&1.5));
        assert_eq!(
            time_ns(&Json::from("2023-11-14T22:13:20.5Z")),
            1_700_000_000_500_000_000
        );
        assert!(!p[0].counters.contains_key("role"));
        assert!(!p[0].stopped);
    }

    #[test]
    fn a_last_report_says_stopped() {
        let v: Json = serde_json::from_str(
            r#"{"results":[{"statement_id":0,"series":[
              {"name":"nbpy_pipeline","tags":{"component":"main"},
               "columns":["time","received","stopped"],
               "values":[[1700000000000000000,42,true]]}]}]}"#,
        )
        .unwrap();
        let p = parse_pipeline(&v);
        assert!(p[0].stopped);
        assert!(!p[0].counters.contains_key("stopped"));
    }
}
