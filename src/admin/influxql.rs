//! The few pieces of InfluxQL (1.x) that schema management writes and
//! reads back: quoting, duration literals, and the JSON answers of `/query`.

use std::time::Duration;

/// A double-quoted identifier: `"default"` (a keyword) stays usable.
pub fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A single-quoted string literal (passwords, tag values).
pub fn string(s: &str) -> String {
    format!(
        "'{}'",
        s.replace('\\', "\\\\")
            .replace('\'', "\\'")
            .replace('\n', "\\n")
    )
}

/// A duration literal the way InfluxDB prints one (`influxql.FormatDuration`):
/// the largest unit that divides it evenly, so what we send is what
/// `SHOW CONTINUOUS QUERIES` shows back.
pub fn duration(d: Duration) -> String {
    let ns = d.as_nanos();
    const US: u128 = 1_000;
    const MS: u128 = 1_000_000;
    const S: u128 = 1_000_000_000;
    const M: u128 = 60 * S;
    const H: u128 = 60 * M;
    const D: u128 = 24 * H;
    const W: u128 = 7 * D;
    if ns == 0 {
        return "0s".into();
    }
    for (unit, suffix) in [
        (W, "w"),
        (D, "d"),
        (H, "h"),
        (M, "m"),
        (S, "s"),
        (MS, "ms"),
        (US, "u"),
    ] {
        if ns % unit == 0 {
            return format!("{}{suffix}", ns / unit);
        }
    }
    format!("{ns}ns")
}

/// A retention duration: `INF` for "forever" (zero).
pub fn retention(d: Duration) -> String {
    if d.is_zero() {
        "INF".into()
    } else {
        duration(d)
    }
}

/// Parses Go's `time.Duration.String()` (`720h0m0s`, `1h30m0s`, `0s`,
/// `1.5s`, `300ms`) as `SHOW RETENTION POLICIES` prints it.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    if s == "0" || s == "0s" {
        return Some(Duration::ZERO);
    }
    let mut total: f64 = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_end == 0 {
            return None;
        }
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..unit_end] {
            "h" => 3600e9,
            "m" => 60e9,
            "s" => 1e9,
            "ms" => 1e6,
            "us" | "µs" | "μs" => 1e3,
            "ns" => 1.0,
            _ => return None,
        };
        total += n * mult;
        rest = &rest[unit_end..];
    }
    Some(Duration::from_nanos(total.round() as u64))
}

/// One series of a `/query` answer.
#[derive(Debug, Clone, Default)]
pub struct Series {
    pub name: String,
    pub tags: serde_json::Map<String, serde_json::Value>,
    pub columns: Vec<String>,
    pub values: Vec<Vec<serde_json::Value>>,
}

impl Series {
    pub fn col(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == name)
    }
    /// `row[column]`, or null.
    pub fn get<'a>(&self, row: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
        self.col(name)
            .and_then(|i| row.get(i))
            .unwrap_or(&serde_json::Value::Null)
    }
}

/// The series of statement `n` of a `/query` answer.
pub fn series(answer: &serde_json::Value, n: usize) -> Vec<Series> {
    let Some(list) = answer
        .pointer(&format!("/results/{n}/series"))
        .and_then(|s| s.as_array())
    else {
        return Vec::new();
    };
    list.iter()
        .map(|s| Series {
            name: s
                .get("name")
                .and_then(|n| n.as_str())
                .unwrap_or("")
                .to_string(),
            tags: s
                .get("tags")
                .and_then(|t| t.as_object())
                .cloned()
                .unwrap_or_default(),
            columns: s
                .get("columns")
                .and_then(|c| c.as_array())
                .map(|c| {
                    c.iter()
                        .map(|x| x.as_str().unwrap_or("").to_string())
                        .collect()
                })
                .unwrap_or_default(),
            values: s
                .get("values")
                .and_then(|v| v.as_array())
                .map(|rows| {
                    rows.iter()
                        .map(|r| r.as_array().cloned().unwrap_or_default())
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect()
}

/// A statement as InfluxDB stores it, for comparing: quotes dropped and
/// whitespace collapsed (the server re-prints statements, quoting only
/// what needs it).
pub fn normalize(stmt: &str) -> String {
    stmt.replace('"', "")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_like_influxdb_and_parse_back() {
        let h = Duration::from_secs(3600);
        assert_eq!(duration(30 * 24 * h), "30d");
        assert_eq!(duration(365 * 24 * h), "365d");
        assert_eq!(duration(7 * 24 * h), "1w");
        assert_eq!(duration(h), "1h");
        assert_eq!(duration(Duration::from_secs(120)), "2m");
        assert_eq!(duration(Duration::from_secs(90)), "90s");
        assert_eq!(duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(retention(Duration::ZERO), "INF");
        assert_eq!(parse_go_duration("720h0m0s"), Some(30 * 24 * h));
        assert_eq!(parse_go_duration("1h30m0s"), Some(h + h / 2));
        assert_eq!(parse_go_duration("0s"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("h"), None);
        assert_eq!(parse_go_duration("3x"), None);
    }

    #[test]
    fn quoting_escapes_what_influxql_would_misread() {
        assert_eq!(ident("default"), "\"default\"");
        assert_eq!(ident("a\"b"), "\"a\\\"b\"");
        assert_eq!(string("it's\\"), "'it\\'s\\\\'");
        assert_eq!(
            normalize("SELECT  \"a\"\n FROM \"b\""),
            normalize("SELECT a FROM b")
        );
    }
}
