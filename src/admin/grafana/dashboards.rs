//! Dashboard JSON (Grafana's classic dashboard model, `schemaVersion` 39),
//! generated from [`crate::schema::MEASUREMENTS`] — the list the writer
//! uses — so every field a panel queries is one the writer may store.
//!
//! One dashboard per measurement (uid `nbpy-<measurement>`), and for
//! `nbpy_pipeline` a pipeline-health dashboard instead. Every query is
//! InfluxQL with Grafana's macros: `$timeFilter`, `$__interval`, and the
//! template variables `$instrument` (`$component` on pipeline health) and
//! `$field` (which numeric fields the "fields" panel plots).

use serde_json::{json, Value};

use crate::admin::influxql::ident;
use crate::admin::schema::{bar_fields, bars_measurement};
use crate::schema::{rp, Kind, Measurement, MEASUREMENTS, TAG_INSTRUMENT};

pub const SCHEMA_VERSION: u64 = 39;
pub const PIPELINE: &str = "nbpy_pipeline";
/// Buckets of the messages/s panels: count per bucket / seconds.
const RATE_BUCKET_S: u64 = 10;

/// The uid of a measurement's dashboard: stable, derived from its name.
pub fn dashboard_uid(measurement: &str) -> String {
    format!("nbpy-{measurement}")
}

/// Every dashboard nbpy provisions.
pub fn all(datasource_uid: &str) -> Vec<Value> {
    MEASUREMENTS
        .iter()
        .map(|m| {
            if m.name == PIPELINE {
                pipeline_health(m, datasource_uid)
            } else {
                measurement(m, datasource_uid)
            }
        })
        .collect()
}

fn ds(uid: &str) -> Value {
    json!({"type": "influxdb", "uid": uid})
}

fn from(m_rp: &str, name: &str) -> String {
    format!("{}.{}", ident(m_rp), ident(name))
}

/// A raw InfluxQL target.
fn target(ds_uid: &str, ref_id: &str, query: String, format: &str, alias: Option<&str>) -> Value {
    let mut t = json!({
        "refId": ref_id,
        "datasource": ds(ds_uid),
        "query": query,
        "rawQuery": true,
        "resultFormat": format,
    });
    if let Some(a) = alias {
        t["alias"] = json!(a);
    }
    t
}

struct Layout {
    next_id: u64,
    x: u64,
    y: u64,
    row_h: u64,
}

impl Layout {
    fn new() -> Self {
        Layout {
            next_id: 1,
            x: 0,
            y: 0,
            row_h: 0,
        }
    }
    /// Places a panel of width `w` (of 24) and height `h`, wrapping rows.
    fn place(&mut self, w: u64, h: u64) -> (u64, Value) {
        if self.x + w > 24 {
            self.x = 0;
            self.y += self.row_h;
            self.row_h = 0;
        }
        let pos = json!({"h": h, "w": w, "x": self.x, "y": self.y});
        self.x += w;
        self.row_h = self.row_h.max(h);
        let id = self.next_id;
        self.next_id += 1;
        (id, pos)
    }
}

fn timeseries(
    l: &mut Layout,
    ds_uid: &str,
    title: &str,
    w: u64,
    unit: Option<&str>,
    targets: Vec<Value>,
) -> Value {
    let (id, pos) = l.place(w, 8);
    let mut defaults = json!({
        "color": {"mode": "palette-classic"},
        "custom": {
            "drawStyle": "line",
            "lineInterpolation": "linear",
            "lineWidth": 1,
            "fillOpacity": 0,
            "showPoints": "never",
            "spanNulls": true,
            "axisPlacement": "auto"
        }
    });
    if let Some(u) = unit {
        defaults["unit"] = json!(u);
    }
    json!({
        "id": id,
        "type": "timeseries",
        "title": title,
        "gridPos": pos,
        "datasource": ds(ds_uid),
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"showLegend": true, "displayMode": "list", "placement": "bottom", "calcs": []},
            "tooltip": {"mode": "multi", "sort": "none"}
        }
    })
}

fn stat(
    l: &mut Layout,
    ds_uid: &str,
    title: &str,
    w: u64,
    unit: Option<&str>,
    targets: Vec<Value>,
) -> Value {
    let (id, pos) = l.place(w, 8);
    let mut defaults = json!({
        "color": {"mode": "thresholds"},
        "thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": null}]}
    });
    if let Some(u) = unit {
        defaults["unit"] = json!(u);
    }
    json!({
        "id": id,
        "type": "stat",
        "title": title,
        "gridPos": pos,
        "datasource": ds(ds_uid),
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": false},
            "orientation": "auto",
            "textMode": "value_and_name",
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "percentChangeColorMode": "standard",
            "showPercentChange": false,
            "wideLayout": true
        }
    })
}

fn table(l: &mut Layout, ds_uid: &str, title: &str, targets: Vec<Value>) -> Value {
    let (id, pos) = l.place(24, 8);
    json!({
        "id": id,
        "type": "table",
        "title": title,
        "gridPos": pos,
        "datasource": ds(ds_uid),
        "targets": targets,
        "fieldConfig": {
            "defaults": {"custom": {"align": "auto", "cellOptions": {"type": "auto"}, "inspect": false}},
            "overrides": []
        },
        "options": {"showHeader": true, "frameIndex": 0, "cellHeight": "sm"}
    })
}

/// A variable listing a tag's values, multi-select with "All".
fn tag_variable(ds_uid: &str, name: &str, measurement: &str, key: &str) -> Value {
    let q = format!(
        "SHOW TAG VALUES FROM {} WITH KEY = {}",
        ident(measurement),
        ident(key)
    );
    json!({
        "type": "query",
        "name": name,
        "label": name,
        "datasource": ds(ds_uid),
        "query": q,
        "refresh": 2,
        "multi": true,
        "includeAll": true,
        "current": {"selected": true, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "sort": 1,
        "hide": 0
    })
}

/// A custom variable over the measurement's float fields (from the schema).
fn field_variable(m: &Measurement) -> Value {
    let fields: Vec<&str> = m.numeric_fields().map(|f| f.name).collect();
    let options: Vec<Value> = fields
        .iter()
        .map(|f| json!({"selected": *f == m.headline, "text": f, "value": f}))
        .collect();
    json!({
        "type": "custom",
        "name": "field",
        "label": "fields",
        "query": fields.join(","),
        "multi": true,
        "includeAll": false,
        "current": {"selected": true, "text": [m.headline], "value": [m.headline]},
        "options": options,
        "hide": 0
    })
}

fn dashboard(
    uid: String,
    title: String,
    m: &Measurement,
    panels: Vec<Value>,
    vars: Vec<Value>,
) -> Value {
    json!({
        "uid": uid,
        "title": title,
        "description": format!("{} — generated by nbpy from its schema; edits are overwritten", m.about),
        "tags": ["nbpy", m.name],
        "timezone": "browser",
        "editable": false,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "5s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {"refresh_intervals": ["5s", "10s", "30s", "1m", "5m", "15m"]},
        "templating": {"list": vars},
        "annotations": {"list": []},
        "links": [],
        "panels": panels
    })
}

/// A market-data measurement's dashboard.
pub fn measurement(m: &Measurement, ds_uid: &str) -> Value {
    let src = from(m.rp, m.name);
    let inst = format!(
        "{} =~ /^$instrument$/ AND $timeFilter",
        ident(TAG_INSTRUMENT)
    );
    let by_inst = ident(TAG_INSTRUMENT);
    let h = ident(m.headline);
    let mut l = Layout::new();
    let mut panels = vec![
        timeseries(
            &mut l,
            ds_uid,
            &format!("{} by instrument", m.headline),
            16,
            None,
            vec![target(
                ds_uid,
                "A",
                format!("SELECT mean({h}) FROM {src} WHERE {inst} GROUP BY time($__interval), {by_inst} fill(none)"),
                "time_series",
                Some("$tag_instrument"),
            )],
        ),
        stat(
            &mut l,
            ds_uid,
            &format!("latest {}", m.headline),
            8,
            None,
            vec![target(
                ds_uid,
                "A",
                format!("SELECT last({h}) FROM {src} WHERE {inst} GROUP BY {by_inst}"),
                "time_series",
                Some("$tag_instrument"),
            )],
        ),
        timeseries(
            &mut l,
            ds_uid,
            "fields ($field)",
            12,
            None,
            vec![target(
                ds_uid,
                "A",
                format!("SELECT mean(/^$field$/) FROM {src} WHERE {inst} GROUP BY time($__interval), {by_inst} fill(none)"),
                "time_series",
                Some("$tag_instrument $col"),
            )],
        ),
        timeseries(
            &mut l,
            ds_uid,
            "messages/s",
            12,
            Some("mps"),
            vec![target(
                ds_uid,
                "A",
                format!(
                    "SELECT count(\"seq\") / {RATE_BUCKET_S} FROM {src} WHERE {inst} GROUP BY time({RATE_BUCKET_S}s), {by_inst} fill(0)"
                ),
                "time_series",
                Some("$tag_instrument"),
            )],
        ),
    ];
    if m.downsample {
        let bars = from(rp::LONG_TERM, &bars_measurement(m));
        // Only bar fields the schema defines (see schema::bar_fields).
        let f: Vec<String> = bar_fields(m).into_iter().map(|(n, _)| n).collect();
        let pick = |n: &str| {
            f.iter()
                .find(|x| x.as_str() == n)
                .map(|x| ident(x))
                .unwrap_or_default()
        };
        panels.push(timeseries(
            &mut l,
            ds_uid,
            &format!("1-minute bars of {} (long_term)", m.headline),
            24,
            None,
            vec![target(
                ds_uid,
                "A",
                format!(
                    "SELECT max({}) AS \"high\", min({}) AS \"low\", last({}) AS \"close\" FROM {bars} WHERE {inst} GROUP BY time(1m), {by_inst} fill(none)",
                    pick("high"),
                    pick("low"),
                    pick("close"),
                ),
                "time_series",
                Some("$tag_instrument $col"),
            )],
        ));
    }
    let cols = m
        .fields
        .iter()
        .map(|f| format!("last({}) AS {}", ident(f.name), ident(f.name)))
        .collect::<Vec<_>>()
        .join(", ");
    panels.push(table(
        &mut l,
        ds_uid,
        "latest values per instrument",
        vec![target(
            ds_uid,
            "A",
            format!("SELECT {cols} FROM {src} WHERE {inst} GROUP BY {by_inst}"),
            "table",
            None,
        )],
    ));
    dashboard(
        dashboard_uid(m.name),
        format!("nbpy / {}", m.name),
        m,
        panels,
        vec![
            tag_variable(ds_uid, "instrument", m.name, TAG_INSTRUMENT),
            field_variable(m),
        ],
    )
}

/// The pipeline-health dashboard over `nbpy_pipeline`: rates, gaps, spool
/// depth, write latency, per component.
pub fn pipeline_health(m: &Measurement, ds_uid: &str) -> Value {
    let src = from(m.rp, m.name);
    let comp = ident("component");
    let w = format!("{comp} =~ /^$component$/ AND $timeFilter");
    // Only fields the schema declares for nbpy_pipeline.
    let f = |name: &str| -> String {
        match m.field(name) {
            Some(_) => ident(name),
            None => String::new(),
        }
    };
    let per = |expr: String| {
        format!("SELECT {expr} FROM {src} WHERE {w} GROUP BY time($__interval), {comp} fill(none)")
    };
    let mut l = Layout::new();
    let mut panels = vec![
        timeseries(
            &mut l,
            ds_uid,
            "messages/s received and written",
            12,
            Some("mps"),
            vec![
                target(
                    ds_uid,
                    "A",
                    per(format!(
                        "non_negative_derivative(last({}), 1s)",
                        f("received")
                    )),
                    "time_series",
                    Some("$tag_component received"),
                ),
                target(
                    ds_uid,
                    "B",
                    per(format!(
                        "non_negative_derivative(last({}), 1s)",
                        f("written")
                    )),
                    "time_series",
                    Some("$tag_component written"),
                ),
            ],
        ),
        timeseries(
            &mut l,
            ds_uid,
            "gaps and malformed (new per interval)",
            12,
            None,
            vec![
                target(
                    ds_uid,
                    "A",
                    per(format!("non_negative_difference(last({}))", f("gaps"))),
                    "time_series",
                    Some("$tag_component gaps"),
                ),
                target(
                    ds_uid,
                    "B",
                    per(format!("non_negative_difference(last({}))", f("malformed"))),
                    "time_series",
                    Some("$tag_component malformed"),
                ),
            ],
        ),
        timeseries(
            &mut l,
            ds_uid,
            "spool depth",
            12,
            Some("bytes"),
            vec![target(
                ds_uid,
                "A",
                per(format!("last({})", f("spool_bytes"))),
                "time_series",
                Some("$tag_component spool"),
            )],
        ),
        timeseries(
            &mut l,
            ds_uid,
            "write latency",
            12,
            Some("ms"),
            vec![target(
                ds_uid,
                "A",
                per(format!("mean({})", f("write_latency_ms"))),
                "time_series",
                Some("$tag_component"),
            )],
        ),
        timeseries(
            &mut l,
            ds_uid,
            "batches queued in memory",
            12,
            None,
            vec![target(
                ds_uid,
                "A",
                per(format!("last({})", f("queue_depth"))),
                "time_series",
                Some("$tag_component"),
            )],
        ),
    ];
    for (name, title) in [
        ("gaps", "gaps (total)"),
        ("write_errors", "write errors (total)"),
        ("dead_lettered", "dead-lettered (total)"),
        ("refused_lost", "refused and lost (total)"),
    ] {
        panels.push(stat(
            &mut l,
            ds_uid,
            title,
            4,
            None,
            vec![target(
                ds_uid,
                "A",
                format!(
                    "SELECT last({}) FROM {src} WHERE {w} GROUP BY {comp}",
                    f(name)
                ),
                "time_series",
                Some("$tag_component"),
            )],
        ));
    }
    let cols = m
        .fields
        .iter()
        .filter(|x| x.kind != Kind::Str)
        .map(|x| format!("last({}) AS {}", ident(x.name), ident(x.name)))
        .collect::<Vec<_>>()
        .join(", ");
    panels.push(table(
        &mut l,
        ds_uid,
        "latest counters per component",
        vec![target(
            ds_uid,
            "A",
            format!("SELECT {cols} FROM {src} WHERE {w} GROUP BY {comp}, \"role\""),
            "table",
            None,
        )],
    ));
    let mut d = dashboard(
        dashboard_uid(m.name),
        "nbpy / pipeline health".into(),
        m,
        panels,
        vec![tag_variable(ds_uid, "component", m.name, "component")],
    );
    d["tags"] = json!(["nbpy", m.name, "health"]);
    d
}

/// Every InfluxQL query in a dashboard: panel targets and query variables.
pub fn queries(d: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] == "query" {
            if let Some(q) = v["query"].as_str() {
                out.push(q.to_string());
            }
        }
    }
    for p in d["panels"].as_array().into_iter().flatten() {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(q) = t["query"].as_str() {
                out.push(q.to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::by_name;

    /// Every quoted identifier in every query is a name the schema defines
    /// (measurement, bar measurement, policy, tag, field, bar field): a
    /// dashboard cannot ask for what the writer never stores.
    #[test]
    fn every_identifier_in_every_query_comes_from_the_schema() {
        let mut known: Vec<String> = vec![
            rp::DEFAULT.into(),
            rp::HIGH_FREQUENCY.into(),
            rp::LONG_TERM.into(),
            "instrument".into(),
            "source".into(),
            "publisher".into(),
        ];
        for m in MEASUREMENTS {
            known.push(m.name.into());
            known.extend(m.tags.iter().map(|t| t.to_string()));
            known.extend(m.fields.iter().map(|f| f.name.to_string()));
            if m.downsample {
                known.push(bars_measurement(m));
                known.extend(bar_fields(m).into_iter().map(|(n, _)| n));
            }
        }
        let boards = all("ds");
        assert_eq!(boards.len(), MEASUREMENTS.len());
        let mut n = 0;
        for d in &boards {
            for q in queries(d) {
                n += 1;
                let parts: Vec<&str> = q.split('"').collect();
                assert!(parts.len() % 2 == 1, "unbalanced quotes: {q}");
                for id in parts.iter().skip(1).step_by(2) {
                    assert!(known.iter().any(|k| k == id), "{id:?} in {q}");
                }
                assert!(!q.contains("\"\""), "empty identifier in {q}");
            }
        }
        assert!(n > 40, "{n} queries");
    }

    #[test]
    fn uids_are_stable_unique_and_valid() {
        let boards = all("ds");
        let mut uids: Vec<&str> = boards.iter().map(|d| d["uid"].as_str().unwrap()).collect();
        assert!(uids.contains(&"nbpy-kraken_tick"));
        assert!(uids.contains(&"nbpy-nbpy_pipeline"));
        for u in &uids {
            assert!(u.len() <= 40);
        }
        uids.sort();
        uids.dedup();
        assert_eq!(uids.len(), boards.len());
        for d in &boards {
            assert_eq!(d["refresh"], "5s");
            assert_eq!(d["time"]["from"], "now-1h");
            let kinds: Vec<&str> = d["panels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["type"].as_str().unwrap())
                .collect();
            for k in ["timeseries", "stat", "table"] {
                assert!(kinds.contains(&k), "{} lacks {k}", d["uid"]);
            }
            let mut ids: Vec<u64> = d["panels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["id"].as_u64().unwrap())
                .collect();
            ids.dedup();
            assert_eq!(ids.len(), d["panels"].as_array().unwrap().len());
        }
        let tick = measurement(by_name("kraken_tick").unwrap(), "ds");
        assert_eq!(tick["templating"]["list"][0]["name"], "instrument");
    }
}
