//! Kraken's public WebSocket API v2 (`wss://ws.kraken.com/v2`): the frames
//! we read and the requests we send, in the shapes of Kraken's reference.
//!
//! Every frame is a JSON object. Channel data has `channel`, `type`
//! (`snapshot`/`update`) and a `data` array; request responses have
//! `method`, `success`, `error`, `req_id`, `result`; a heartbeat is just
//! `{"channel":"heartbeat"}`. Prices and quantities are JSON numbers that
//! carry their full precision; they are read as raw text ([`RawValue`]) so
//! the book checksum sees the digits Kraken sent, and become `f64` only
//! when an envelope is built.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

/// The public endpoint.
pub const DEFAULT_URL: &str = "wss://ws.kraken.com/v2";

/// The outer shape shared by every frame; `data`/`result` stay raw until
/// the channel says what they are.
#[derive(Debug, Deserialize)]
pub struct Frame<'a> {
    #[serde(borrow, default)]
    pub channel: Option<Cow<'a, str>>,
    #[serde(rename = "type", borrow, default)]
    pub kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub method: Option<Cow<'a, str>>,
    #[serde(default)]
    pub success: Option<bool>,
    #[serde(borrow, default)]
    pub error: Option<Cow<'a, str>>,
    #[serde(default)]
    pub req_id: Option<u64>,
    #[serde(borrow, default)]
    pub result: Option<&'a RawValue>,
    /// Error responses name the symbol they refused.
    #[serde(borrow, default)]
    pub symbol: Option<Cow<'a, str>>,
}

/// `result` of a subscribe/unsubscribe acknowledgement.
#[derive(Debug, Deserialize)]
pub struct SubscribeResult<'a> {
    #[serde(borrow, default)]
    pub channel: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub symbol: Option<Cow<'a, str>>,
    #[serde(default)]
    pub depth: Option<u32>,
}

/// One price level of a `book` message.
#[derive(Debug, Deserialize)]
pub struct BookLevel<'a> {
    #[serde(borrow)]
    pub price: &'a RawValue,
    #[serde(borrow)]
    pub qty: &'a RawValue,
}

/// An element of a `book` snapshot or update.
#[derive(Debug, Deserialize)]
pub struct BookData<'a> {
    #[serde(borrow)]
    pub symbol: Cow<'a, str>,
    #[serde(borrow, default)]
    pub bids: Vec<BookLevel<'a>>,
    #[serde(borrow, default)]
    pub asks: Vec<BookLevel<'a>>,
    pub checksum: u32,
    #[serde(borrow, default)]
    pub timestamp: Option<Cow<'a, str>>,
}

/// An element of a `ticker` snapshot or update.
#[derive(Debug, Deserialize)]
pub struct TickerData<'a> {
    #[serde(borrow)]
    pub symbol: Cow<'a, str>,
    #[serde(borrow, default)]
    pub bid: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub bid_qty: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub ask: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub ask_qty: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub last: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub volume: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub vwap: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub low: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub high: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub change: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub change_pct: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub timestamp: Option<Cow<'a, str>>,
}

impl<'a> TickerData<'a> {
    /// The fields in the order of the `kraken_tick` schema.
    pub fn fields(&self) -> [(&'static str, Option<&'a RawValue>); 11] {
        [
            ("bid", self.bid),
            ("bid_qty", self.bid_qty),
            ("ask", self.ask),
            ("ask_qty", self.ask_qty),
            ("last", self.last),
            ("volume", self.volume),
            ("vwap", self.vwap),
            ("low", self.low),
            ("high", self.high),
            ("change", self.change),
            ("change_pct", self.change_pct),
        ]
    }
}

/// An element of a `trade` snapshot or update.
#[derive(Debug, Deserialize)]
pub struct TradeData<'a> {
    #[serde(borrow)]
    pub symbol: Cow<'a, str>,
    #[serde(borrow)]
    pub side: Cow<'a, str>,
    #[serde(borrow)]
    pub price: &'a RawValue,
    #[serde(borrow)]
    pub qty: &'a RawValue,
    #[serde(borrow)]
    pub ord_type: Cow<'a, str>,
    pub trade_id: u64,
    #[serde(borrow)]
    pub timestamp: Cow<'a, str>,
}

/// The decimal text of a raw JSON number (or of a quoted decimal, which
/// Kraken's checksum guide uses in its string-decoder example).
pub fn number_text(raw: &RawValue) -> Option<&str> {
    let s = raw.get();
    match s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        Some(inner) if !inner.contains('\\') => Some(inner),
        Some(_) => None,
        None => Some(s),
    }
}

/// A raw number as the nearest `f64` (std's parser rounds correctly);
/// `None` for null, text, or anything not finite.
pub fn number_f64(raw: &RawValue) -> Option<f64> {
    let t = number_text(raw)?;
    if !t
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'))
    {
        return None;
    }
    t.parse::<f64>().ok().filter(|f| f.is_finite())
}

/// RFC 3339 (`2023-10-06T17:35:55.440295Z`) → ns since the Unix epoch.
pub fn timestamp_ns(s: &str) -> Option<i64> {
    let t = humantime::parse_rfc3339(s).ok()?;
    let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(d.as_nanos()).ok()
}

/// The channels this feed subscribes to, one per publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Ticker,
    Book,
    Trade,
}

impl Channel {
    pub fn name(self) -> &'static str {
        match self {
            Channel::Ticker => "ticker",
            Channel::Book => "book",
            Channel::Trade => "trade",
        }
    }
}

/// What a subscription asks for beyond channel and symbols.
#[derive(Debug, Clone, Default)]
pub struct SubscribeOptions<'a> {
    /// `book` only.
    pub depth: Option<u32>,
    /// `ticker` only: `trades` or `bbo`.
    pub event_trigger: Option<&'a str>,
}

/// `{"method":"subscribe","params":{"channel":..,"symbol":[..],..,"snapshot":true},"req_id":N}`.
pub fn subscribe(
    channel: Channel,
    symbols: &[String],
    opts: &SubscribeOptions<'_>,
    req_id: u64,
) -> String {
    request("subscribe", channel, symbols, opts, Some(true), req_id)
}

/// `{"method":"unsubscribe","params":{"channel":..,"symbol":[..],..},"req_id":N}`.
pub fn unsubscribe(
    channel: Channel,
    symbols: &[String],
    opts: &SubscribeOptions<'_>,
    req_id: u64,
) -> String {
    request("unsubscribe", channel, symbols, opts, None, req_id)
}

fn request(
    method: &str,
    channel: Channel,
    symbols: &[String],
    opts: &SubscribeOptions<'_>,
    snapshot: Option<bool>,
    req_id: u64,
) -> String {
    let mut params = serde_json::Map::new();
    params.insert("channel".into(), channel.name().into());
    params.insert("symbol".into(), symbols.into());
    if let Some(d) = opts.depth {
        params.insert("depth".into(), d.into());
    }
    if let Some(t) = opts.event_trigger {
        params.insert("event_trigger".into(), t.into());
    }
    if let Some(s) = snapshot {
        params.insert("snapshot".into(), s.into());
    }
    serde_json::json!({ "method": method, "params": params, "req_id": req_id }).to_string()
}

/// `{"method":"ping","req_id":N}`: Kraken answers with `pong`.
pub fn ping(req_id: u64) -> String {
    format!(r#"{{"method":"ping","req_id":{req_id}}}"#)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_kraken_shapes() {
        let syms = vec!["ALGO/USD".to_string(), "MATIC/USD".to_string()];
        let v: serde_json::Value = serde_json::from_str(&subscribe(
            Channel::Book,
            &syms,
            &SubscribeOptions {
                depth: Some(10),
                event_trigger: None,
            },
            7,
        ))
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"method":"subscribe","params":{"channel":"book","symbol":["ALGO/USD","MATIC/USD"],"depth":10,"snapshot":true},"req_id":7})
        );
        let v: serde_json::Value = serde_json::from_str(&ping(101)).unwrap();
        assert_eq!(v, serde_json::json!({"method":"ping","req_id":101}));
    }

    #[test]
    fn raw_numbers_keep_their_text() {
        let f: BookLevel =
            serde_json::from_str(r#"{"price": 45283.5, "qty": 0.10000000}"#).unwrap();
        assert_eq!(number_text(f.price), Some("45283.5"));
        assert_eq!(number_text(f.qty), Some("0.10000000"));
        let f: BookLevel =
            serde_json::from_str(r#"{"price": "45283.5", "qty": "0.10000000"}"#).unwrap();
        assert_eq!(number_text(f.qty), Some("0.10000000"));
        let r: Box<RawValue> = serde_json::from_str("-0.00017").unwrap();
        assert_eq!(number_f64(&r), Some(-0.00017));
        for bad in ["null", "\"NaN\"", "\"inf\"", "true"] {
            let r: Box<RawValue> = serde_json::from_str(bad).unwrap();
            assert_eq!(number_f64(&r), None, "{bad}");
        }
    }

    #[test]
    fn rfc3339_to_ns() {
        assert_eq!(
            timestamp_ns("2023-10-06T17:35:55.440295Z"),
            Some(1_696_613_755_440_295_000)
        );
        assert_eq!(timestamp_ns("yesterday"), None);
    }
}
