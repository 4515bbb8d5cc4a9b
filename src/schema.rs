//! The measurements: one definition that the writer, retention, dashboards
//! and validator all read, so a name cannot drift between them.
//!
//! A message's channel (`ch` in the envelope) selects its measurement; the
//! source venue becomes the `source` tag, so the synthetic feed fills the same
//! measurements as the live venues and dashboards work on day one. Every data
//! point also carries `seq` and `epoch` as integer fields and the publisher
//! name as a tag: that is what lets the validator reconcile stored points
//! against published sequence ranges.

/// Tags every measurement carries, filled from the envelope.
pub const TAG_INSTRUMENT: &str = "instrument";
pub const TAG_SOURCE: &str = "source";
pub const TAG_PUBLISHER: &str = "publisher";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Float,
    Int,
    Bool,
    Str,
}

#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub name: &'static str,
    pub kind: Kind,
}

const fn f(name: &'static str) -> Field {
    Field {
        name,
        kind: Kind::Float,
    }
}
const fn i(name: &'static str) -> Field {
    Field {
        name,
        kind: Kind::Int,
    }
}
const fn b(name: &'static str) -> Field {
    Field {
        name,
        kind: Kind::Bool,
    }
}
const fn s(name: &'static str) -> Field {
    Field {
        name,
        kind: Kind::Str,
    }
}

/// Retention policy names, declared in one place (phase 2 creates them).
pub mod rp {
    pub const DEFAULT: &str = "default";
    pub const HIGH_FREQUENCY: &str = "high_frequency";
    pub const LONG_TERM: &str = "long_term";
}

#[derive(Debug)]
pub struct Measurement {
    pub name: &'static str,
    /// The envelope channel that lands here.
    pub channel: &'static str,
    /// Tags taken from the message's data, beyond instrument/source/publisher.
    pub tags: &'static [&'static str],
    /// Fields in the order the legacy codec lays them out.
    pub fields: &'static [Field],
    pub rp: &'static str,
    /// The field a dashboard or validator plots first.
    pub headline: &'static str,
    /// Downsampled into 1-minute bars in `long_term`.
    pub downsample: bool,
    pub about: &'static str,
}

impl Measurement {
    pub fn field(&self, name: &str) -> Option<&'static Field> {
        self.fields.iter().find(|f| f.name == name)
    }
    pub fn is_tag(&self, name: &str) -> bool {
        self.tags.contains(&name)
    }
    /// Float fields, the ones that downsample into bars.
    pub fn numeric_fields(&self) -> impl Iterator<Item = &'static Field> {
        self.fields.iter().filter(|f| f.kind == Kind::Float)
    }
}

/// Depth levels the `kraken_depth` measurement has room for.
pub const BOOK_LEVELS: usize = 10;

macro_rules! book_fields {
    ($($n:literal),*) => {
        &[
            $(f(concat!("bid", $n)), f(concat!("bid", $n, "_qty")), f(concat!("ask", $n)), f(concat!("ask", $n, "_qty")),)*
            f("mid"), f("spread"), i("checksum"), i("seq"), i("epoch"),
        ]
    };
}

macro_rules! ladder_fields {
    ($($n:literal),*) => {
        &[
            $(f(concat!("back", $n)), f(concat!("back", $n, "_size")), f(concat!("lay", $n)), f(concat!("lay", $n, "_size")),)*
            f("ltp"), f("tv"), i("seq"), i("epoch"),
        ]
    };
}

pub static MEASUREMENTS: &[Measurement] = &[
    Measurement {
        name: "kraken_tick",
        channel: "ticker",
        tags: &[],
        fields: &[
            f("bid"),
            f("bid_qty"),
            f("ask"),
            f("ask_qty"),
            f("last"),
            f("volume"),
            f("vwap"),
            f("low"),
            f("high"),
            f("change"),
            f("change_pct"),
            i("seq"),
            i("epoch"),
        ],
        rp: rp::DEFAULT,
        headline: "last",
        downsample: true,
        about: "best bid/ask and 24h statistics per pair",
    },
    Measurement {
        name: "kraken_depth",
        channel: "book",
        tags: &[],
        fields: book_fields!("1", "2", "3", "4", "5", "6", "7", "8", "9", "10"),
        rp: rp::HIGH_FREQUENCY,
        headline: "mid",
        downsample: true,
        about: "top levels of the order book, mid and spread",
    },
    Measurement {
        name: "kraken_orders",
        channel: "trade",
        tags: &["side", "ord_type"],
        fields: &[f("price"), f("qty"), i("trade_id"), i("seq"), i("epoch")],
        rp: rp::DEFAULT,
        headline: "price",
        downsample: true,
        about: "executed trades",
    },
    Measurement {
        name: "oanda_tick",
        channel: "price",
        tags: &[],
        fields: &[
            f("bid"),
            f("ask"),
            f("spread"),
            f("liquidity"),
            b("tradeable"),
            i("seq"),
            i("epoch"),
        ],
        rp: rp::DEFAULT,
        headline: "bid",
        downsample: true,
        about: "FX bid/ask",
    },
    Measurement {
        name: "betfair_stream",
        channel: "odds",
        tags: &["market_id", "selection_id", "status"],
        fields: ladder_fields!("1", "2", "3"),
        rp: rp::DEFAULT,
        headline: "back1",
        downsample: true,
        about: "betting-exchange best back/lay ladder per runner",
    },
    Measurement {
        name: "twitter_sentiment",
        channel: "post",
        tags: &["rule"],
        fields: &[f("score"), i("words"), s("id"), i("seq"), i("epoch")],
        rp: rp::DEFAULT,
        headline: "score",
        downsample: true,
        about: "social posts matching rules, with a lexicon sentiment score",
    },
    Measurement {
        name: "nbpy_pipeline",
        channel: "pipeline",
        tags: &["component", "role"],
        fields: &[
            i("received"),
            i("published"),
            i("gaps"),
            i("malformed"),
            i("written"),
            i("write_errors"),
            i("spooled"),
            i("replayed"),
            i("dead_lettered"),
            // Refused by InfluxDB and lost: the dead-letter file could not
            // be written. Health counts these as refused too.
            i("refused_lost"),
            i("dropped"),
            i("spool_bytes"),
            i("queue_depth"),
            f("rate"),
            f("write_latency_ms"),
            i("restarts"),
            // True on a subscriber's last report of a clean stop: that
            // report is fresh, and health would otherwise take it for "up".
            b("stopped"),
            i("seq"),
            i("epoch"),
        ],
        rp: rp::DEFAULT,
        headline: "rate",
        downsample: false,
        about: "the appliance's own counters",
    },
];

pub fn by_channel(channel: &str) -> Option<&'static Measurement> {
    MEASUREMENTS.iter().find(|m| m.channel == channel)
}

pub fn by_name(name: &str) -> Option<&'static Measurement> {
    MEASUREMENTS.iter().find(|m| m.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_channels_are_unique_and_fields_typed_once() {
        for (n, m) in MEASUREMENTS.iter().enumerate() {
            for other in &MEASUREMENTS[n + 1..] {
                assert_ne!(m.name, other.name);
                assert_ne!(m.channel, other.channel);
            }
            let mut names: Vec<&str> = m.fields.iter().map(|f| f.name).collect();
            names.extend(m.tags);
            names.extend([TAG_INSTRUMENT, TAG_SOURCE, TAG_PUBLISHER]);
            let before = names.len();
            names.sort();
            names.dedup();
            assert_eq!(before, names.len(), "{} repeats a key", m.name);
            assert!(m.field(m.headline).is_some(), "{} headline", m.name);
        }
        assert_eq!(by_channel("book").map(|m| m.name), Some("kraken_depth"));
    }

    /// The line encoder writes these names unescaped.
    #[test]
    fn names_need_no_escaping_in_line_protocol() {
        let plain = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        for m in MEASUREMENTS {
            assert!(plain(m.name), "{}", m.name);
            for t in m
                .tags
                .iter()
                .chain(&[TAG_INSTRUMENT, TAG_SOURCE, TAG_PUBLISHER])
            {
                assert!(plain(t), "{}.{t}", m.name);
            }
            for f in m.fields {
                assert!(plain(f.name), "{}.{}", m.name, f.name);
            }
        }
        assert_eq!(
            by_name("kraken_depth").map(|m| m.fields.len()),
            Some(4 * BOOK_LEVELS + 5)
        );
    }
}
