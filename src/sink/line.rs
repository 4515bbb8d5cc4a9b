//! Envelope → InfluxDB line protocol, through the schema.
//!
//! Escaping follows the line-protocol reference: measurement names escape
//! commas and spaces; tag keys, tag values and field keys escape commas,
//! equals signs and spaces; string field values escape `"` and `\`.
//! What InfluxDB would misread is refused instead of escaped: a newline
//! anywhere, NaN and infinities, an empty instrument.
//!
//! Two messages of one series with the same timestamp would overwrite each
//! other in InfluxDB (trades in the same microsecond do happen), so the
//! encoder remembers each series' last time and moves a colliding point one
//! nanosecond later: every accepted message stays a point.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

use crate::schema::{self, Kind, Measurement};
use crate::wire::{Envelope, Value};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MapError {
    #[error("channel {0:?} has no measurement")]
    UnknownChannel(String),
    #[error("{measurement}.{key}: expected {expected:?}, got {got}")]
    FieldType {
        measurement: &'static str,
        key: String,
        expected: Kind,
        got: &'static str,
    },
    #[error("{0}: not a finite number")]
    NonFinite(String),
    #[error("{0}: newlines cannot be stored")]
    Newline(String),
    #[error("{0}: no field of the measurement present")]
    NoFields(&'static str),
    #[error("empty instrument")]
    EmptyInstrument,
    #[error("no timestamp")]
    NoTime,
}

/// Encodes points, remembering series times to keep colliding points apart.
#[derive(Default)]
pub struct LineEncoder {
    last: HashMap<u64, i64>,
    hasher: std::collections::hash_map::RandomState,
    tags: Vec<(&'static str, usize, usize)>,
    tagbuf: Vec<u8>,
}

/// Collisions further apart than this are real out-of-order data, not
/// same-instant duplicates, and are stored as they come.
const COLLISION_WINDOW_NS: i64 = 1_000_000;

impl LineEncoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one line (with `\n`) for `env` to `out`. On error `out` is
    /// left as it was.
    pub fn encode(
        &mut self,
        env: &Envelope<'_>,
        out: &mut Vec<u8>,
    ) -> Result<&'static Measurement, MapError> {
        let start = out.len();
        let r = self.encode_inner(env, out);
        if r.is_err() {
            out.truncate(start);
        }
        r
    }

    fn encode_inner(
        &mut self,
        env: &Envelope<'_>,
        out: &mut Vec<u8>,
    ) -> Result<&'static Measurement, MapError> {
        let m = schema::by_channel(&env.ch)
            .ok_or_else(|| MapError::UnknownChannel(env.ch.to_string()))?;
        if env.sym.is_empty() {
            return Err(MapError::EmptyInstrument);
        }
        let start = out.len();
        // Schema names are plain (schema test `names_need_no_escaping…`).
        out.extend_from_slice(m.name.as_bytes());
        // Tags sorted by key, as InfluxDB prefers; values as escaped bytes.
        let mut tagbuf = std::mem::take(&mut self.tagbuf);
        tagbuf.clear();
        self.tags.clear();
        let mut add = |tags: &mut Vec<(&'static str, usize, usize)>,
                       key: &'static str,
                       val: &str|
         -> Result<(), MapError> {
            if val.is_empty() {
                return Ok(());
            }
            if val.contains('\n') {
                return Err(MapError::Newline(key.into()));
            }
            let s = tagbuf.len();
            escape(&mut tagbuf, val.as_bytes(), b",= ");
            tags.push((key, s, tagbuf.len()));
            Ok(())
        };
        let mut tags = std::mem::take(&mut self.tags);
        add(&mut tags, schema::TAG_INSTRUMENT, &env.sym)?;
        add(&mut tags, schema::TAG_SOURCE, &env.src)?;
        add(&mut tags, schema::TAG_PUBLISHER, &env.publisher)?;
        for (k, v) in &env.data {
            if let Some(key) = m.tags.iter().find(|t| **t == k.as_ref()) {
                match v {
                    Value::Str(s) => add(&mut tags, key, s)?,
                    Value::Int(i) => add(&mut tags, key, itoa::Buffer::new().format(*i))?,
                    other => {
                        return Err(MapError::FieldType {
                            measurement: m.name,
                            key: k.to_string(),
                            expected: Kind::Str,
                            got: kind_name(other),
                        })
                    }
                }
            }
        }
        tags.sort_unstable_by_key(|t| t.0);
        for (key, s, e) in &tags {
            out.push(b',');
            out.extend_from_slice(key.as_bytes());
            out.push(b'=');
            out.extend_from_slice(&tagbuf[*s..*e]);
        }
        self.tags = tags;
        self.tagbuf = tagbuf;
        let series_end = out.len();
        out.push(b' ');
        let mut n = 0usize;
        let mut ib = itoa::Buffer::new();
        // Publishers send fields in schema order: try the next one first.
        let mut hint = 0usize;
        for (k, v) in &env.data {
            let field = match m.fields.get(hint) {
                Some(f) if f.name == k.as_ref() => f,
                _ => match m.fields.iter().position(|f| f.name == k.as_ref()) {
                    Some(i) => {
                        hint = i;
                        &m.fields[i]
                    }
                    None => continue,
                },
            };
            hint += 1;
            if field.name == "seq" || field.name == "epoch" {
                continue;
            }
            if n > 0 {
                out.push(b',');
            }
            n += 1;
            out.extend_from_slice(field.name.as_bytes());
            out.push(b'=');
            match (field.kind, v) {
                (Kind::Float, Value::Num(t)) => out.extend_from_slice(t.as_bytes()),
                (Kind::Float, Value::Float(_) | Value::Int(_)) => {
                    let f = v.as_f64().unwrap_or(f64::NAN);
                    if !f.is_finite() {
                        return Err(MapError::NonFinite(field.name.into()));
                    }
                    crate::wire::push_f64(out, f);
                }
                (Kind::Int, Value::Int(i)) => {
                    out.extend_from_slice(ib.format(*i).as_bytes());
                    out.push(b'i');
                }
                (Kind::Bool, Value::Bool(b)) => {
                    out.extend_from_slice(if *b { b"true" } else { b"false" })
                }
                (Kind::Str, Value::Str(s)) => {
                    if s.contains('\n') {
                        return Err(MapError::Newline(field.name.into()));
                    }
                    out.push(b'"');
                    escape(out, s.as_bytes(), b"\"\\");
                    out.push(b'"');
                }
                (expected, other) => {
                    return Err(MapError::FieldType {
                        measurement: m.name,
                        key: field.name.into(),
                        expected,
                        got: kind_name(other),
                    })
                }
            }
        }
        if n == 0 {
            return Err(MapError::NoFields(m.name));
        }
        if env.seq > 0 {
            out.extend_from_slice(b",seq=");
            out.extend_from_slice(ib.format(env.seq).as_bytes());
            out.extend_from_slice(b"i,epoch=");
            out.extend_from_slice(ib.format(env.epoch).as_bytes());
            out.push(b'i');
        }
        let mut t = env.time();
        if t <= 0 {
            return Err(MapError::NoTime);
        }
        let mut h = self.hasher.build_hasher();
        h.write(&out[start..series_end]);
        let slot = self.last.entry(h.finish()).or_insert(i64::MIN);
        if t <= *slot && *slot - t < COLLISION_WINDOW_NS {
            t = *slot + 1;
        }
        *slot = (*slot).max(t);
        if self.last.len() > 1_000_000 {
            // Bounded memory under instrument churn; collisions only matter
            // between neighbours in time, which a fresh map still sees.
            self.last.clear();
        }
        out.push(b' ');
        out.extend_from_slice(ib.format(t).as_bytes());
        out.push(b'\n');
        Ok(m)
    }
}

fn kind_name(v: &Value<'_>) -> &'static str {
    match v {
        Value::Float(_) => "a float",
        Value::Int(_) => "an integer",
        Value::Bool(_) => "a boolean",
        Value::Str(_) => "a string",
        Value::Num(_) => "a float",
    }
}

/// Inlined so that each call's `special` is a constant set.
#[inline(always)]
fn escape(out: &mut Vec<u8>, s: &[u8], special: &[u8]) {
    // Two or three specials: a byte scan with a small match beats a
    // slice search per byte on the hot path.
    let is_special = |b: u8| special.contains(&b);
    match s.iter().position(|&b| is_special(b)) {
        None => out.extend_from_slice(s),
        Some(first) => {
            out.extend_from_slice(&s[..first]);
            for &b in &s[first..] {
                if is_special(b) {
                    out.push(b'\\');
                }
                out.push(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    fn env(sym: &str, data: Vec<(&'static str, Value<'static>)>) -> Envelope<'static> {
        let mut e = Envelope::new(
            "kraken",
            "trade",
            sym.to_string(),
            1_000_000_000,
            data.into_iter()
                .map(|(k, v)| (Cow::Borrowed(k), v))
                .collect(),
        );
        e.publisher = "k-1".into();
        e.seq = 3;
        e.epoch = 9;
        e
    }

    #[test]
    fn encodes_escaped_sorted_typed_and_parses_back() {
        let mut enc = LineEncoder::new();
        let mut out = Vec::new();
        let e = env(
            "BTC/USD, x=y",
            vec![
                ("price", Value::Int(42)),
                ("qty", Value::Float(0.5)),
                ("trade_id", Value::Int(77)),
                ("side", Value::Str("buy".into())),
                ("ord_type", Value::Str("limit".into())),
                ("unknown", Value::Str("ignored".into())),
            ],
        );
        enc.encode(&e, &mut out).unwrap();
        let line = std::str::from_utf8(&out).unwrap();
        assert_eq!(
            line,
            "kraken_orders,instrument=BTC/USD\\,\\ x\\=y,ord_type=limit,publisher=k-1,side=buy,source=kraken price=42.0,qty=0.5,trade_id=77i,seq=3i,epoch=9i 1000000000\n"
        );
        // The reference parser agrees on every key and value.
        let parsed = influxdb_line_protocol::parse_lines(line)
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(parsed.series.measurement.to_string(), "kraken_orders");
        let tags = parsed.series.tag_set.unwrap();
        assert_eq!(tags[0].1.to_string(), "BTC/USD, x=y");
        assert_eq!(parsed.field_set.len(), 5);
        assert_eq!(parsed.timestamp, Some(1_000_000_000));
    }

    #[test]
    fn refuses_what_influx_would_misread() {
        let mut enc = LineEncoder::new();
        let mut out = b"keep".to_vec();
        let bad = [
            env("a\nb", vec![("price", Value::Float(1.0))]),
            env("x", vec![("price", Value::Float(f64::INFINITY))]),
            env("x", vec![("price", Value::Str("1".into()))]),
            env(
                "x",
                vec![("side", Value::Float(1.0)), ("price", Value::Float(1.0))],
            ),
            env("x", vec![("nothing", Value::Float(1.0))]),
            env("", vec![("price", Value::Float(1.0))]),
        ];
        for e in &bad {
            assert!(enc.encode(e, &mut out).is_err(), "{e:?}");
            assert_eq!(out, b"keep", "a refused point leaves nothing behind");
        }
    }

    #[test]
    fn same_instant_points_of_one_series_get_distinct_times() {
        let mut enc = LineEncoder::new();
        let mut out = Vec::new();
        for _ in 0..3 {
            enc.encode(&env("x", vec![("price", Value::Float(1.0))]), &mut out)
                .unwrap();
        }
        enc.encode(&env("y", vec![("price", Value::Float(1.0))]), &mut out)
            .unwrap();
        let times: Vec<&str> = std::str::from_utf8(&out)
            .unwrap()
            .lines()
            .map(|l| l.rsplit(' ').next().unwrap())
            .collect();
        assert_eq!(
            times,
            ["1000000000", "1000000001", "1000000002", "1000000000"]
        );
    }
}
