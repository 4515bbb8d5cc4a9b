//! Frames in, envelopes and connection actions out: everything the feed
//! does with what Kraken says, without the network, so it is tested and
//! benchmarked on its own.
//!
//! Book rule: a pair's book is published only while its last checksum
//! matched. A mismatch (or a level that cannot be read) marks the pair
//! unsynced, asks the connection to resubscribe it, and every update for it
//! is dropped until a fresh snapshot arrives and checks out.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::value::RawValue;

use super::book::{Book, DecError, Side};
use super::protocol::{
    number_f64, number_text, timestamp_ns, BookData, Channel, Frame, SubscribeResult, TickerData,
    TradeData,
};
use crate::schema::BOOK_LEVELS;
use crate::wire::{Envelope, Fields, Value};

pub const SOURCE: &str = "kraken";

/// Counters for what the Kraken feed saw; shared with tests and logs.
#[derive(Debug, Default)]
pub struct KrakenStats {
    /// Text frames read.
    pub frames: AtomicU64,
    /// Envelopes handed to the publisher.
    pub published: AtomicU64,
    pub heartbeats: AtomicU64,
    pub pongs: AtomicU64,
    /// Book snapshots and updates whose checksum matched.
    pub checksums_ok: AtomicU64,
    /// Book messages whose checksum did not match (each one leads to a resync).
    pub checksum_mismatches: AtomicU64,
    /// Book messages with a level that could not be read (a negative or
    /// overlong price or quantity). Each one is malformed and leads to a
    /// resync too, but says nothing about our book being wrong, so it is
    /// kept apart from `checksum_mismatches`.
    pub unreadable_levels: AtomicU64,
    /// Resubscriptions sent to get a fresh book snapshot.
    pub resyncs: AtomicU64,
    /// Book updates dropped because their pair was waiting for a snapshot.
    pub unsynced_updates: AtomicU64,
    /// Trades already published before a reconnect, skipped in a snapshot.
    pub duplicate_trades: AtomicU64,
    /// Ticker elements that repeat the pair's last published tick exactly
    /// (same Kraken timestamp, same values): the subscribe snapshot after
    /// a reconnect does, and storing it again would duplicate the point.
    pub duplicate_ticks: AtomicU64,
    /// Requests Kraken refused (`success: false`).
    pub rejected: AtomicU64,
    /// Subscriptions Kraken acknowledged.
    pub subscribed: AtomicU64,
}

impl KrakenStats {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// What the connection has to do about a frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// A heartbeat: the feed is alive though quiet.
    Heartbeat,
    Pong(Option<u64>),
    /// Unsubscribe and subscribe this pair again for a fresh snapshot.
    Resync {
        symbol: String,
        why: ResyncWhy,
    },
    Subscribed {
        symbol: Option<String>,
    },
    /// Kraken refused a request.
    Rejected {
        method: String,
        symbol: Option<String>,
        error: String,
    },
    /// The `status` channel: system state (`online`, `maintenance`, …).
    Status(String),
}

/// Why a pair's book is resubscribed: the log has to say which, since one
/// means our book drifted from Kraken's and the other that Kraken sent a
/// level we cannot read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncWhy {
    ChecksumMismatch,
    UnreadableLevel,
}

impl std::fmt::Display for ResyncWhy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ResyncWhy::ChecksumMismatch => "book checksum mismatch",
            ResyncWhy::UnreadableLevel => "unreadable book level",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("not a Kraken v2 frame: {0}")]
    Json(String),
    #[error("{channel} data: {error}")]
    Data { channel: String, error: String },
    #[error("{symbol}: unreadable book level: {error}")]
    Level { symbol: String, error: DecError },
    #[error("{0}")]
    Field(String),
}

struct PairBook {
    book: Book,
    synced: bool,
    resync_requested: bool,
}

pub struct Handler {
    channel: Channel,
    depth: usize,
    levels: usize,
    books: HashMap<String, PairBook>,
    last_trade: HashMap<String, u64>,
    /// The last ticker point published per pair: its Kraken time and values.
    last_tick: HashMap<String, (i64, Fields<'static>)>,
    pub stats: std::sync::Arc<KrakenStats>,
    /// Repeats skipped (trades and ticks) since the caller last took them,
    /// for the publisher's `FeedStats::duplicates` (STATUS).
    pub repeats: u64,
    /// Book updates dropped while their pair waited for a snapshot, since
    /// the caller last took them, for `FeedStats::awaiting_snapshot`.
    pub unsynced: u64,
    /// Envelopes produced by the last frames, for the caller to drain.
    pub out: Vec<Envelope<'static>>,
    pub actions: Vec<Action>,
}

impl Handler {
    pub fn new(
        channel: Channel,
        depth: usize,
        levels: usize,
        stats: std::sync::Arc<KrakenStats>,
    ) -> Handler {
        Handler {
            channel,
            depth,
            levels: levels.clamp(1, BOOK_LEVELS),
            books: HashMap::new(),
            last_trade: HashMap::new(),
            last_tick: HashMap::new(),
            stats,
            repeats: 0,
            unsynced: 0,
            out: Vec::new(),
            actions: Vec::new(),
        }
    }

    /// A new connection: every book waits for its snapshot again. Trade ids
    /// seen and the last tick of each pair are kept, so a snapshot's replay
    /// of recent trades or of the current ticker is not published twice.
    pub fn reset_connection(&mut self) {
        for b in self.books.values_mut() {
            b.synced = false;
            b.resync_requested = false;
            b.book.clear();
        }
    }

    /// Is this pair's book checked and publishable?
    pub fn book_synced(&self, symbol: &str) -> bool {
        self.books.get(symbol).is_some_and(|b| b.synced)
    }

    /// The local book of a pair, if one was started.
    pub fn book(&self, symbol: &str) -> Option<&Book> {
        self.books.get(symbol).map(|b| &b.book)
    }

    /// Handles one text frame. Envelopes go to `self.out`, connection
    /// actions to `self.actions`. An error means the frame (or part of it)
    /// could not be understood; whatever was understood still counts.
    pub fn handle(&mut self, text: &str) -> Result<(), FrameError> {
        KrakenStats::add(&self.stats.frames, 1);
        let frame: Frame<'_> =
            serde_json::from_str(text).map_err(|e| FrameError::Json(e.to_string()))?;
        if let Some(method) = frame.method.as_deref() {
            return self.response(method, &frame);
        }
        let Some(channel) = frame.channel.as_deref() else {
            return Err(FrameError::Json(
                "neither a channel message nor a response".into(),
            ));
        };
        let data = frame.data.map(RawValue::get).unwrap_or("[]");
        let snapshot = frame.kind.as_deref() == Some("snapshot");
        match channel {
            "heartbeat" => {
                KrakenStats::add(&self.stats.heartbeats, 1);
                self.actions.push(Action::Heartbeat);
                Ok(())
            }
            "status" => {
                #[derive(serde::Deserialize)]
                struct Status<'a> {
                    #[serde(borrow, default)]
                    system: Option<Cow<'a, str>>,
                }
                let v: Vec<Status<'_>> =
                    serde_json::from_str(data).map_err(|e| data_err("status", e))?;
                for s in v {
                    if let Some(sys) = s.system {
                        self.actions.push(Action::Status(sys.into_owned()));
                    }
                }
                Ok(())
            }
            "book" if self.channel == Channel::Book => {
                let v: Vec<BookData<'_>> =
                    serde_json::from_str(data).map_err(|e| data_err("book", e))?;
                let mut first_err = None;
                for d in v {
                    if let Err(e) = self.on_book(d, snapshot) {
                        first_err.get_or_insert(e);
                    }
                }
                first_err.map_or(Ok(()), Err)
            }
            "ticker" if self.channel == Channel::Ticker => {
                let v: Vec<TickerData<'_>> =
                    serde_json::from_str(data).map_err(|e| data_err("ticker", e))?;
                let mut first_err = None;
                for d in v {
                    if let Err(e) = self.ticker(d) {
                        first_err.get_or_insert(e);
                    }
                }
                first_err.map_or(Ok(()), Err)
            }
            "trade" if self.channel == Channel::Trade => {
                let v: Vec<TradeData<'_>> =
                    serde_json::from_str(data).map_err(|e| data_err("trade", e))?;
                let mut first_err = None;
                for d in v {
                    if let Err(e) = self.trade(d, snapshot) {
                        first_err.get_or_insert(e);
                    }
                }
                first_err.map_or(Ok(()), Err)
            }
            // Another channel (not ours, or one Kraken added): not an error.
            _ => Ok(()),
        }
    }

    fn response(&mut self, method: &str, frame: &Frame<'_>) -> Result<(), FrameError> {
        if method == "pong" {
            KrakenStats::add(&self.stats.pongs, 1);
            self.actions.push(Action::Pong(frame.req_id));
            return Ok(());
        }
        let result: Option<SubscribeResult<'_>> = frame
            .result
            .and_then(|r| serde_json::from_str(r.get()).ok());
        let symbol = result
            .as_ref()
            .and_then(|r| r.symbol.as_deref())
            .or(frame.symbol.as_deref())
            .map(str::to_string);
        if frame.success == Some(false) || frame.error.is_some() {
            KrakenStats::add(&self.stats.rejected, 1);
            self.actions.push(Action::Rejected {
                method: method.to_string(),
                symbol,
                error: frame
                    .error
                    .as_deref()
                    .unwrap_or("no error message")
                    .to_string(),
            });
        } else if method == "subscribe" {
            KrakenStats::add(&self.stats.subscribed, 1);
            self.actions.push(Action::Subscribed { symbol });
        }
        Ok(())
    }

    fn on_book(&mut self, d: BookData<'_>, snapshot: bool) -> Result<(), FrameError> {
        if !self.books.contains_key(d.symbol.as_ref()) {
            self.books.insert(
                d.symbol.to_string(),
                PairBook {
                    book: Book::new(self.depth),
                    synced: false,
                    resync_requested: false,
                },
            );
        }
        let Some(pair) = self.books.get_mut(d.symbol.as_ref()) else {
            return Ok(());
        };
        if snapshot {
            pair.book.clear();
            pair.resync_requested = false;
        } else if !pair.synced {
            KrakenStats::add(&self.stats.unsynced_updates, 1);
            self.unsynced += 1;
            return Ok(());
        }
        let applied = apply_levels(&mut pair.book, &d);
        pair.book.truncate();
        let ours = pair.book.checksum();
        if let Err(error) = applied {
            KrakenStats::add(&self.stats.unreadable_levels, 1);
            pair.synced = false;
            request_resync(
                pair,
                &d.symbol,
                ResyncWhy::UnreadableLevel,
                &mut self.actions,
            );
            return Err(FrameError::Level {
                symbol: d.symbol.into_owned(),
                error,
            });
        }
        if ours != d.checksum {
            KrakenStats::add(&self.stats.checksum_mismatches, 1);
            pair.synced = false;
            request_resync(
                pair,
                &d.symbol,
                ResyncWhy::ChecksumMismatch,
                &mut self.actions,
            );
            return Ok(());
        }
        KrakenStats::add(&self.stats.checksums_ok, 1);
        pair.synced = true;
        let ts = d.timestamp.as_deref().and_then(timestamp_ns).unwrap_or(0);
        let env = depth_envelope(&pair.book, self.levels, &d.symbol, ts, ours);
        self.push(env);
        Ok(())
    }

    /// A ticker element becomes one `kraken_tick` point, or none at all: a
    /// field that is present but not a number, or outside what its meaning
    /// allows (see [`TickerRange`]), makes the element malformed.
    fn ticker(&mut self, d: TickerData<'_>) -> Result<(), FrameError> {
        let mut data: Fields<'static> = Vec::with_capacity(11);
        for (name, raw) in d.fields() {
            // JSON `null` is an absent field; anything else must be a number.
            let Some(raw) = raw else { continue };
            let bad = |why: &str| {
                FrameError::Field(format!("ticker {}: {name} {} {why}", d.symbol, raw.get()))
            };
            let v = number_f64(raw).ok_or_else(|| bad("is not a number"))?;
            match TickerRange::of(name) {
                TickerRange::Quote if v <= 0.0 => return Err(bad("is not a price above 0")),
                TickerRange::Traded if v < 0.0 => return Err(bad("is not a price above 0")),
                // No trade in 24 hours: unknown, not a price of 0.
                TickerRange::Traded if v == 0.0 => continue,
                TickerRange::Size if v < 0.0 => return Err(bad("is a negative quantity")),
                _ => {}
            }
            data.push((Cow::Borrowed(name), Value::Float(v)));
        }
        if data.is_empty() {
            return Err(FrameError::Field(format!(
                "ticker {}: no numeric field",
                d.symbol
            )));
        }
        let ts = d.timestamp.as_deref().and_then(timestamp_ns).unwrap_or(0);
        // The snapshot a (re)subscription opens with is the current ticker,
        // which after a reconnect is the tick already published. Only an
        // exact repeat (same Kraken time, same values) is skipped: a new
        // tick in the same instant is news. Without a Kraken time (0) a
        // repeat cannot be told from a new tick that changed nothing.
        if ts != 0 {
            if let Some((last_ts, last)) = self.last_tick.get_mut(d.symbol.as_ref()) {
                if *last_ts == ts && *last == data {
                    KrakenStats::add(&self.stats.duplicate_ticks, 1);
                    self.repeats += 1;
                    return Ok(());
                }
                *last_ts = ts;
                last.clone_from(&data);
            } else {
                self.last_tick
                    .insert(d.symbol.to_string(), (ts, data.clone()));
            }
        }
        self.push(Envelope::new(
            SOURCE,
            "ticker",
            d.symbol.into_owned(),
            ts,
            data,
        ));
        Ok(())
    }

    fn trade(&mut self, d: TradeData<'_>, snapshot: bool) -> Result<(), FrameError> {
        let bad =
            |what: &str| FrameError::Field(format!("trade {} {}: {what}", d.symbol, d.trade_id));
        let price = number_f64(d.price).ok_or_else(|| bad("price is not a number"))?;
        let qty = number_f64(d.qty).ok_or_else(|| bad("qty is not a number"))?;
        if price <= 0.0 {
            return Err(bad(&format!("price {price} is not above 0")));
        }
        if qty < 0.0 {
            return Err(bad(&format!("qty {qty} is negative")));
        }
        let ts = timestamp_ns(&d.timestamp).ok_or_else(|| bad("timestamp is not RFC 3339"))?;
        let trade_id = i64::try_from(d.trade_id).map_err(|_| bad("trade_id out of range"))?;
        let side = tag(&d.side, &["buy", "sell"]).ok_or_else(|| bad("side"))?;
        let ord_type = tag(&d.ord_type, &["limit", "market"]).ok_or_else(|| bad("ord_type"))?;
        if !self.last_trade.contains_key(d.symbol.as_ref()) {
            self.last_trade.insert(d.symbol.to_string(), 0);
        }
        let Some(last) = self.last_trade.get_mut(d.symbol.as_ref()) else {
            return Ok(());
        };
        // A snapshot replays the latest trades; after a reconnect some were
        // published already. Live updates are never second-guessed.
        if snapshot && d.trade_id <= *last {
            KrakenStats::add(&self.stats.duplicate_trades, 1);
            self.repeats += 1;
            return Ok(());
        }
        *last = (*last).max(d.trade_id);
        let data: Fields<'static> = vec![
            (Cow::Borrowed("side"), side),
            (Cow::Borrowed("ord_type"), ord_type),
            (Cow::Borrowed("price"), Value::Float(price)),
            (Cow::Borrowed("qty"), Value::Float(qty)),
            (Cow::Borrowed("trade_id"), Value::Int(trade_id)),
        ];
        self.push(Envelope::new(
            SOURCE,
            "trade",
            d.symbol.into_owned(),
            ts,
            data,
        ));
        Ok(())
    }

    fn push(&mut self, env: Envelope<'static>) {
        self.out.push(env);
    }
}

/// What a `ticker` field may hold, from its meaning in Kraken's WS v2
/// ticker reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TickerRange {
    /// `bid`, `ask`: the best prices standing in the book, always above 0.
    Quote,
    /// `last`, `vwap`, `low`, `high`: prices of trades in the past 24
    /// hours, which Kraken only guarantees for a pair that traded. Above
    /// 0, or 0 for "no trade", which leaves the field out of the point.
    Traded,
    /// `bid_qty`, `ask_qty`, `volume`: quantities, 0 or more.
    Size,
    /// `change`, `change_pct`: 24-hour change, negative when it fell.
    Signed,
}

impl TickerRange {
    fn of(field: &str) -> TickerRange {
        match field {
            "bid" | "ask" => TickerRange::Quote,
            "last" | "vwap" | "low" | "high" => TickerRange::Traded,
            "bid_qty" | "ask_qty" | "volume" => TickerRange::Size,
            _ => TickerRange::Signed,
        }
    }
}

fn data_err(channel: &str, e: serde_json::Error) -> FrameError {
    FrameError::Data {
        channel: channel.into(),
        error: e.to_string(),
    }
}

fn request_resync(pair: &mut PairBook, symbol: &str, why: ResyncWhy, actions: &mut Vec<Action>) {
    if !pair.resync_requested {
        pair.resync_requested = true;
        actions.push(Action::Resync {
            symbol: symbol.to_string(),
            why,
        });
    }
}

/// Applies every level of a book message, in order, bids then asks.
pub fn apply_levels(book: &mut Book, d: &BookData<'_>) -> Result<(), DecError> {
    for (side, levels) in [(Side::Bid, &d.bids), (Side::Ask, &d.asks)] {
        for l in levels {
            let p = number_text(l.price).ok_or_else(|| DecError::Syntax(l.price.get().into()))?;
            let q = number_text(l.qty).ok_or_else(|| DecError::Syntax(l.qty.get().into()))?;
            book.set(side, p, q)?;
        }
    }
    Ok(())
}

/// Known tag values borrow a static string; others are kept if they are
/// short plain words (a new Kraken order type should not be lost).
fn tag(v: &str, known: &[&'static str]) -> Option<Value<'static>> {
    if let Some(k) = known.iter().find(|k| **k == v) {
        return Some(Value::Str(Cow::Borrowed(k)));
    }
    (!v.is_empty() && v.len() <= 32 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .then(|| Value::Str(Cow::Owned(v.to_string())))
}

const BID: [&str; BOOK_LEVELS] = [
    "bid1", "bid2", "bid3", "bid4", "bid5", "bid6", "bid7", "bid8", "bid9", "bid10",
];
const BID_QTY: [&str; BOOK_LEVELS] = [
    "bid1_qty",
    "bid2_qty",
    "bid3_qty",
    "bid4_qty",
    "bid5_qty",
    "bid6_qty",
    "bid7_qty",
    "bid8_qty",
    "bid9_qty",
    "bid10_qty",
];
const ASK: [&str; BOOK_LEVELS] = [
    "ask1", "ask2", "ask3", "ask4", "ask5", "ask6", "ask7", "ask8", "ask9", "ask10",
];
const ASK_QTY: [&str; BOOK_LEVELS] = [
    "ask1_qty",
    "ask2_qty",
    "ask3_qty",
    "ask4_qty",
    "ask5_qty",
    "ask6_qty",
    "ask7_qty",
    "ask8_qty",
    "ask9_qty",
    "ask10_qty",
];

/// The `kraken_depth` point: the top `levels` of each side, mid, spread
/// and the checksum that vouched for them.
pub fn depth_envelope(
    book: &Book,
    levels: usize,
    symbol: &str,
    ts: i64,
    checksum: u32,
) -> Envelope<'static> {
    let levels = levels.min(BOOK_LEVELS);
    let mut data: Fields<'static> = Vec::with_capacity(4 * levels + 3);
    for (i, l) in book.bids().iter().take(levels).enumerate() {
        data.push((Cow::Borrowed(BID[i]), Value::Float(l.price.to_f64())));
        data.push((Cow::Borrowed(BID_QTY[i]), Value::Float(l.qty.to_f64())));
    }
    for (i, l) in book.asks().iter().take(levels).enumerate() {
        data.push((Cow::Borrowed(ASK[i]), Value::Float(l.price.to_f64())));
        data.push((Cow::Borrowed(ASK_QTY[i]), Value::Float(l.qty.to_f64())));
    }
    if let (Some(mid), Some(spread)) = (book.mid(), book.spread()) {
        data.push((Cow::Borrowed("mid"), Value::Float(mid)));
        data.push((Cow::Borrowed("spread"), Value::Float(spread)));
    }
    data.push((Cow::Borrowed("checksum"), Value::Int(checksum as i64)));
    Envelope::new(SOURCE, "book", symbol.to_string(), ts, data)
}

/// Re-exported for benches: parse a book frame and apply it to `book`
/// without the rest of the handler.
pub fn parse_book_frame(text: &str) -> Result<Vec<BookData<'_>>, FrameError> {
    let frame: Frame<'_> =
        serde_json::from_str(text).map_err(|e| FrameError::Json(e.to_string()))?;
    let data = frame.data.map(RawValue::get).unwrap_or("[]");
    serde_json::from_str(data).map_err(|e| data_err("book", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn handler(ch: Channel) -> Handler {
        Handler::new(ch, 10, 10, Arc::new(KrakenStats::default()))
    }

    /// Kraken's trade reference example (snapshot of MATIC/USD).
    const TRADE_SNAPSHOT: &str = r#"{
        "channel": "trade",
        "type": "snapshot",
        "data": [
            {"symbol": "MATIC/USD", "side": "buy", "price": 0.5147, "qty": 6423.46326,
             "ord_type": "limit", "trade_id": 4665846, "timestamp": "2023-09-25T07:48:36.925533Z"},
            {"symbol": "MATIC/USD", "side": "buy", "price": 0.5147, "qty": 1136.19677815,
             "ord_type": "limit", "trade_id": 4665847, "timestamp": "2023-09-25T07:49:36.925603Z"}
        ]
    }"#;

    #[test]
    fn trades_become_envelopes_and_a_replayed_snapshot_is_not_published_twice() {
        let mut h = handler(Channel::Trade);
        h.handle(TRADE_SNAPSHOT).unwrap();
        assert_eq!(h.out.len(), 2);
        let e = &h.out[0];
        assert_eq!(
            (e.src.as_ref(), e.ch.as_ref(), e.sym.as_ref()),
            ("kraken", "trade", "MATIC/USD")
        );
        assert_eq!(e.ts, timestamp_ns("2023-09-25T07:48:36.925533Z").unwrap());
        assert_eq!(e.get("side"), Some(&Value::Str("buy".into())));
        assert_eq!(e.get("ord_type"), Some(&Value::Str("limit".into())));
        assert_eq!(e.get("price"), Some(&Value::Float(0.5147)));
        assert_eq!(e.get("qty"), Some(&Value::Float(6423.46326)));
        assert_eq!(e.get("trade_id"), Some(&Value::Int(4665846)));
        h.out.clear();
        h.reset_connection();
        h.handle(TRADE_SNAPSHOT).unwrap();
        assert!(h.out.is_empty());
        assert_eq!(KrakenStats::get(&h.stats.duplicate_trades), 2);
    }

    #[test]
    fn ticker_example_maps_every_field() {
        // Kraken's ticker reference example.
        let mut h = handler(Channel::Ticker);
        h.handle(r#"{"channel":"ticker","type":"snapshot","data":[{"symbol":"ALGO/USD","bid":0.10025,"bid_qty":740.0,"ask":0.10036,"ask_qty":1361.44813783,"last":0.10035,"volume":997038.98383185,"vwap":0.10148,"low":0.09979,"high":0.10285,"change":-0.00017,"change_pct":-0.17,"timestamp":"2023-09-25T09:04:31.742648Z"}]}"#).unwrap();
        let e = &h.out[0];
        assert_eq!(e.data.len(), 11);
        assert_eq!(e.get("change"), Some(&Value::Float(-0.00017)));
        assert_eq!(e.get("ask_qty"), Some(&Value::Float(1361.44813783)));
        assert_eq!(e.ts, timestamp_ns("2023-09-25T09:04:31.742648Z").unwrap());
    }

    #[test]
    fn only_an_exact_repeat_of_the_last_stamped_tick_is_skipped() {
        let tick = |sym: &str, last: &str, ts: Option<&str>| {
            let ts = ts.map_or(String::new(), |t| format!(r#","timestamp":"{t}""#));
            format!(
                r#"{{"channel":"ticker","type":"snapshot","data":[{{"symbol":"{sym}","bid":0.1,"ask":0.2,"last":{last}{ts}}}]}}"#
            )
        };
        let t = Some("2023-09-25T09:04:31.742648Z");
        let mut h = handler(Channel::Ticker);
        h.handle(&tick("ALGO/USD", "0.15", t)).unwrap();
        h.reset_connection();
        // The same tick again, for another pair, in the same instant with
        // another value, and without a Kraken time: only the first repeats.
        for frame in [
            tick("ALGO/USD", "0.15", t),
            tick("ETH/USD", "0.15", t),
            tick("ALGO/USD", "0.16", t),
            tick("ALGO/USD", "0.15", t),
            tick("ALGO/USD", "0.15", None),
            tick("ALGO/USD", "0.15", None),
        ] {
            h.handle(&frame).unwrap();
        }
        let got: Vec<(&str, Option<&Value>, i64)> = h
            .out
            .iter()
            .map(|e| (e.sym.as_ref(), e.get("last"), e.ts))
            .collect();
        let ts = timestamp_ns("2023-09-25T09:04:31.742648Z").unwrap();
        let (a, b) = (Value::Float(0.15), Value::Float(0.16));
        assert_eq!(
            got,
            [
                ("ALGO/USD", Some(&a), ts),
                ("ETH/USD", Some(&a), ts),
                ("ALGO/USD", Some(&b), ts),
                ("ALGO/USD", Some(&a), ts),
                ("ALGO/USD", Some(&a), 0),
                ("ALGO/USD", Some(&a), 0),
            ]
        );
        assert_eq!(KrakenStats::get(&h.stats.duplicate_ticks), 1);
        assert_eq!(h.repeats, 1);
    }

    #[test]
    fn ticker_values_outside_their_meaning_make_the_element_malformed() {
        let tick = |fields: &str| {
            format!(
                r#"{{"channel":"ticker","type":"update","data":[{{"symbol":"ALGO/USD",{fields},"timestamp":"2023-09-25T09:04:31.742648Z"}}]}}"#
            )
        };
        let mut h = handler(Channel::Ticker);
        for (fields, named) in [
            (r#""bid":-5.0,"ask":-4.0"#, "bid"),
            (r#""bid":0.1,"ask":0"#, "ask"),
            (r#""bid":0.1,"bid_qty":-1"#, "bid_qty"),
            (r#""volume":-0.5"#, "volume"),
            (r#""last":-0.1"#, "last"),
            (r#""bid":0.1,"high":"abc""#, "high"),
        ] {
            let e = h.handle(&tick(fields)).expect_err(fields).to_string();
            assert!(e.contains(named), "{e} names {named}");
        }
        assert!(h.out.is_empty());
        // A fall is negative; no trade in 24 hours leaves its statistics out.
        h.handle(&tick(
            r#""bid":0.1,"ask":0.2,"bid_qty":0,"last":0,"vwap":0,"change":-0.01,"change_pct":-1.5"#,
        ))
        .unwrap();
        let e = &h.out[0];
        assert_eq!(e.get("change"), Some(&Value::Float(-0.01)));
        assert_eq!(e.get("change_pct"), Some(&Value::Float(-1.5)));
        assert_eq!(e.get("bid_qty"), Some(&Value::Float(0.0)));
        assert_eq!((e.get("last"), e.get("vwap")), (None, None));
    }

    #[test]
    fn a_trade_at_no_price_or_negative_size_is_malformed() {
        let mut h = handler(Channel::Trade);
        for (price, qty) in [("-0.5", "1.0"), ("0", "1.0"), ("0.5", "-1.0")] {
            let t = format!(
                r#"{{"channel":"trade","type":"update","data":[{{"symbol":"MATIC/USD","side":"buy","price":{price},"qty":{qty},"ord_type":"limit","trade_id":1,"timestamp":"2023-09-25T07:48:36.925533Z"}}]}}"#
            );
            assert!(h.handle(&t).is_err(), "{price} {qty}");
        }
        assert!(h.out.is_empty());
    }

    #[test]
    fn responses_heartbeats_and_junk() {
        let mut h = handler(Channel::Book);
        h.handle(r#"{"channel":"heartbeat"}"#).unwrap();
        h.handle(r#"{"method":"pong","req_id":101,"time_in":"2023-09-24T14:10:23.799685Z","time_out":"2023-09-24T14:10:23.799703Z"}"#).unwrap();
        h.handle(r#"{"method":"subscribe","result":{"channel":"book","depth":10,"snapshot":true,"symbol":"ALGO/USD"},"success":true,"time_in":"2023-10-06T17:35:55.219022Z","time_out":"2023-10-06T17:35:55.219067Z"}"#).unwrap();
        h.handle(r#"{"error":"Currency pair not supported","method":"subscribe","req_id":1,"success":false,"symbol":"BTC/USDD","time_in":"2023-10-06T17:35:55.219022Z","time_out":"2023-10-06T17:35:55.219067Z"}"#).unwrap();
        h.handle(r#"{"channel":"status","type":"update","data":[{"api_version":"v2","connection_id":1,"system":"online","version":"2.0.0"}]}"#).unwrap();
        assert_eq!(
            h.actions,
            vec![
                Action::Heartbeat,
                Action::Pong(Some(101)),
                Action::Subscribed {
                    symbol: Some("ALGO/USD".into())
                },
                Action::Rejected {
                    method: "subscribe".into(),
                    symbol: Some("BTC/USDD".into()),
                    error: "Currency pair not supported".into()
                },
                Action::Status("online".into()),
            ]
        );
        for junk in [
            "",
            "not json",
            "[1,2]",
            "{}",
            r#"{"channel":"book","type":"update","data":{"x":1}}"#,
        ] {
            assert!(h.handle(junk).is_err(), "{junk:?}");
        }
        assert!(h.out.is_empty());
    }
}
