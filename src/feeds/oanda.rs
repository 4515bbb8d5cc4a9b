//! OANDA v20 pricing stream → `oanda_tick`.
//!
//! `GET {host}/v3/accounts/{account}/pricing/stream?instruments=EUR_USD,…`
//! with `Authorization: Bearer <token>` answers with a chunked body of JSON
//! lines: `{"type":"PRICE",…}` whenever a price changes and
//! `{"type":"HEARTBEAT","time":…}` every few seconds otherwise. A stream that
//! says nothing, not even a heartbeat, for `heartbeat_timeout` is dead even if
//! its TCP connection is not, and is reconnected with backoff.
//!
//! Each PRICE becomes one message: the best bid and ask, their spread, the
//! smaller of the two top-of-book liquidities (what can be traded both ways
//! at those prices), and whether the instrument is tradeable, stamped with
//! OANDA's own time in ns. OANDA opens every stream with the current price
//! of each instrument, so after a reconnect the feed skips prices not newer
//! than the last one it published for that instrument: a reconnect never
//! stores a point twice. Skipped repeats are counted as `duplicates`.
//!
//! That rule trusts OANDA's clock: one price stamped far in the future would
//! hold its instrument back until that time came, silently. So a price
//! stamped more than [`MAX_AHEAD`] ahead of this host's clock is malformed:
//! counted, logged, not published, and never the reference for the rule.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::upstream::{self, Ended, Line, LineSplitter, Outlet, MAX_LINE};
use super::FeedContext;
use crate::config::PublisherConfig;
use crate::exit::Failure;
use crate::sink::RateLimitedLog;
use crate::wire::{now_ns, Envelope, Fields, Value};

pub const SOURCE: &str = "oanda";
pub const CHANNEL: &str = "price";

/// How far ahead of this host's clock a PRICE may be stamped. OANDA's
/// servers and an NTP-synced host agree within a second, and a price is
/// stamped before it is sent, so anything ahead is clock error. Five
/// minutes tolerates a host whose clock has drifted badly (beyond that its
/// stored times would be wrong anyway) while bounding what a bad stamp
/// that still passes can cost: its instrument held back for at most as
/// long, instead of until the stamp's date comes round.
pub const MAX_AHEAD: Duration = Duration::from_secs(300);

/// How far `ts` lies ahead of `now` (both ns since the epoch) when that is
/// more than [`MAX_AHEAD`]: such a stamp is not believed.
pub fn implausibly_ahead(ts: i64, now: i64) -> Option<Duration> {
    let ahead = ts.saturating_sub(now);
    let ahead = Duration::from_nanos(u64::try_from(ahead).ok()?);
    (ahead > MAX_AHEAD).then_some(ahead)
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    /// fxTrade Practice (demo accounts).
    #[default]
    Practice,
    /// fxTrade (real money).
    Live,
}

impl Environment {
    pub fn stream_url(self) -> &'static str {
        match self {
            Environment::Practice => "https://stream-fxpractice.oanda.com",
            Environment::Live => "https://stream-fxtrade.oanda.com",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OandaConfig {
    /// v20 account id, e.g. `101-004-1234567-001`.
    pub account: Option<String>,
    /// File (or systemd credential name) holding the personal access token.
    pub token_file: Option<PathBuf>,
    /// Which host to stream from; the publisher's `url` overrides it.
    pub environment: Environment,
    /// No price and no heartbeat for this long: reconnect. OANDA sends a
    /// heartbeat every 5 s.
    #[serde(with = "humantime_serde")]
    pub heartbeat_timeout: Duration,
}

impl Default for OandaConfig {
    fn default() -> Self {
        OandaConfig {
            account: None,
            token_file: None,
            environment: Environment::Practice,
            heartbeat_timeout: Duration::from_secs(20),
        }
    }
}

fn valid_account(a: &str) -> bool {
    !a.is_empty() && a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn valid_instrument(i: &str) -> bool {
    !i.is_empty() && i.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

pub fn check(cfg: &PublisherConfig) -> Vec<String> {
    let o = &cfg.oanda;
    let mut p = Vec::new();
    match o.account.as_deref() {
        None | Some("") => p.push(
            "feed = \"oanda-tick\" needs oanda.account = \"<v20 account id>\" (e.g. \"101-004-1234567-001\")"
                .to_string(),
        ),
        Some(a) if !valid_account(a) => p.push(format!(
            "oanda.account = {a:?}: an account id has letters, digits and '-' only"
        )),
        Some(_) => {}
    }
    if o.token_file.is_none() {
        p.push(
            "feed = \"oanda-tick\" needs oanda.token_file = \"<file or systemd credential with the API token>\""
                .into(),
        );
    }
    if cfg.instruments.is_empty() {
        p.push("feed = \"oanda-tick\" needs instruments = [\"EUR_USD\", …]".into());
    }
    for i in &cfg.instruments {
        if !valid_instrument(i) {
            p.push(format!(
                "instruments: {i:?} is not an OANDA instrument name like \"EUR_USD\""
            ));
        }
    }
    if o.heartbeat_timeout.is_zero() {
        p.push(
            "oanda.heartbeat_timeout must be more than 0 (OANDA sends a heartbeat every 5s)".into(),
        );
    }
    p
}

/// One decoded line of the stream.
#[derive(Debug, PartialEq)]
pub enum Message {
    Price(Envelope<'static>),
    Heartbeat,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "type")]
    kind: Option<String>,
    instrument: Option<String>,
    time: Option<String>,
    #[serde(default)]
    bids: Vec<Bucket>,
    #[serde(default)]
    asks: Vec<Bucket>,
    tradeable: Option<bool>,
    /// Deprecated by OANDA but still sent: "tradeable" / "non-tradeable".
    status: Option<String>,
}

#[derive(Deserialize)]
struct Bucket {
    #[serde(deserialize_with = "decimal")]
    price: f64,
    liquidity: Option<f64>,
}

/// OANDA sends prices as decimal strings ("1.11590"); numbers are accepted too.
fn decimal<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        S(String),
        F(f64),
    }
    let v = match N::deserialize(d)? {
        N::S(s) => s.trim().parse::<f64>().map_err(serde::de::Error::custom)?,
        N::F(f) => f,
    };
    if v.is_finite() {
        Ok(v)
    } else {
        Err(serde::de::Error::custom("not a finite number"))
    }
}

/// Decodes one line of the pricing stream.
pub fn decode(line: &[u8]) -> Result<Message, String> {
    let raw: Raw = serde_json::from_slice(line).map_err(|e| format!("not JSON: {e}"))?;
    match raw.kind.as_deref() {
        Some("HEARTBEAT") => return Ok(Message::Heartbeat),
        Some("PRICE") => {}
        Some(other) => return Err(format!("unexpected message type {other:?}")),
        None => return Err("message without a type".into()),
    }
    let instrument = raw.instrument.ok_or("PRICE without instrument")?;
    if instrument.is_empty() {
        return Err("PRICE with an empty instrument".into());
    }
    let time = raw.time.ok_or("PRICE without time")?;
    let ts = upstream::parse_time_ns(&time).ok_or_else(|| format!("bad time {time:?}"))?;
    let bid = raw.bids.first();
    let ask = raw.asks.first();
    for (side, bucket) in [("bid", bid), ("ask", ask)] {
        let Some(b) = bucket else { continue };
        // A price of 0 or less, or a negative liquidity, is no market: a
        // broken message, never a point to store.
        if b.price <= 0.0 {
            return Err(format!(
                "PRICE for {instrument}: {side} price {} is not above 0",
                b.price
            ));
        }
        if let Some(l) = b.liquidity.filter(|l| *l < 0.0) {
            return Err(format!(
                "PRICE for {instrument}: {side} liquidity {l} is negative"
            ));
        }
    }
    let tradeable = raw
        .tradeable
        .or_else(|| raw.status.as_deref().map(|s| s == "tradeable"));
    let mut data: Fields<'static> = Vec::with_capacity(5);
    if let Some(b) = bid {
        data.push(("bid".into(), Value::Float(b.price)));
    }
    if let Some(a) = ask {
        data.push(("ask".into(), Value::Float(a.price)));
    }
    if let (Some(b), Some(a)) = (bid, ask) {
        data.push((
            "spread".into(),
            Value::Float(upstream::round_price(a.price - b.price)),
        ));
    }
    let liquidity = match (bid.and_then(|b| b.liquidity), ask.and_then(|a| a.liquidity)) {
        (Some(b), Some(a)) => Some(b.min(a)),
        (one, other) => one.or(other),
    };
    if let Some(l) = liquidity.filter(|l| l.is_finite()) {
        data.push(("liquidity".into(), Value::Float(l)));
    }
    if let Some(t) = tradeable {
        data.push(("tradeable".into(), Value::Bool(t)));
    }
    if data.is_empty() {
        return Err(format!("PRICE for {instrument} carries no prices"));
    }
    Ok(Message::Price(Envelope::new(
        SOURCE, CHANNEL, instrument, ts, data,
    )))
}

pub async fn run(ctx: FeedContext) -> Result<(), Failure> {
    upstream::config_ok(&ctx.name, check(&ctx.cfg))?;
    let o = &ctx.cfg.oanda;
    let (Some(account), Some(token_file)) = (o.account.as_deref(), o.token_file.as_deref()) else {
        return Err(Failure::config(anyhow::anyhow!("oanda: unreachable")));
    };
    let token = upstream::secret(&ctx.name, "oanda.token_file", token_file)?;
    let base = upstream::base_url(ctx.cfg.url.as_deref(), o.environment.stream_url());
    let url = format!(
        "{base}/v3/accounts/{account}/pricing/stream?instruments={}",
        ctx.cfg.instruments.join("%2C")
    );
    let client = upstream::stream_client(&ctx.name)?;
    let mut stream = Stream {
        ctx: &ctx,
        client,
        url,
        token,
        last: HashMap::new(),
        log: RateLimitedLog::new(Duration::from_secs(5)),
    };
    let mut out = Outlet::new(&ctx);
    upstream::reconnect_loop(&ctx, "OANDA", &mut out, &mut stream).await?;
    let stats = &ctx.out.stats;
    tracing::info!(
        "publisher {}: OANDA feed published {} prices, skipped {} repeated, {} malformed, {} connects",
        ctx.name,
        out.sent,
        stats.duplicates.load(Ordering::Relaxed),
        stats.malformed.load(Ordering::Relaxed),
        stats.connects.load(Ordering::Relaxed),
    );
    Ok(())
}

struct Stream<'a> {
    ctx: &'a FeedContext,
    client: reqwest::Client,
    url: String,
    token: String,
    /// Last published OANDA time per instrument, across reconnects.
    last: HashMap<String, i64>,
    log: RateLimitedLog,
}

impl upstream::Session for Stream<'_> {
    async fn session(&mut self, out: &mut Outlet<'_>) -> Result<Ended, Failure> {
        Stream::session(self, out).await
    }
}

impl Stream<'_> {
    async fn session(&mut self, out: &mut Outlet<'_>) -> Result<Ended, Failure> {
        let ctx = self.ctx;
        let name = &ctx.name;
        let silent = ctx.cfg.oanda.heartbeat_timeout;
        let req = self
            .client
            .get(&self.url)
            .bearer_auth(&self.token)
            .header("Accept-Datetime-Format", "RFC3339")
            .send();
        let resp = tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => return Ok(Ended::Stop),
            r = tokio::time::timeout(silent.max(Duration::from_secs(10)), req) => r,
        };
        let mut resp = match resp {
            Err(_) => {
                return Ok(Ended::Lost {
                    why: "did not answer".into(),
                    productive: false,
                })
            }
            Ok(Err(e)) => {
                return Ok(Ended::Lost {
                    why: format!("cannot connect: {}", upstream::http_error(e)),
                    productive: false,
                })
            }
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if !status.is_success() {
            let body = error_body(&mut resp).await;
            return match status.as_u16() {
                401 | 403 => Err(upstream::rejected(
                    name,
                    format!("OANDA refused the API token from oanda.token_file (HTTP {status}: {body})"),
                )),
                400 | 404 | 405 => Err(Failure::config(anyhow::anyhow!(
                    "publisher {name}: OANDA rejected the request for account {:?} and instruments {:?} (HTTP {status}: {body}); check oanda.account, oanda.environment and instruments",
                    ctx.cfg.oanda.account.as_deref().unwrap_or(""),
                    ctx.cfg.instruments
                ))),
                _ => Ok(Ended::Lost {
                    why: format!("answered HTTP {status}: {body}"),
                    productive: false,
                }),
            };
        }
        out.connected();
        tracing::info!(
            "publisher {name}: streaming {} OANDA instrument(s)",
            ctx.cfg.instruments.len()
        );
        let mut lines = LineSplitter::new(MAX_LINE);
        let mut productive = false;
        loop {
            let bytes = match upstream::next_chunk(
                ctx,
                &mut resp,
                silent,
                "no price, no heartbeat",
                productive,
            )
            .await
            {
                Ok(b) => b,
                Err(end) => return Ok(end),
            };
            lines.push(&bytes);
            while let Some(line) = lines.next_line() {
                let line = match line {
                    Line::TooLong => {
                        out.malformed();
                        crate::warn_limited!(self.log, || {
                            format!("publisher {name}: OANDA line over {MAX_LINE} bytes skipped")
                        });
                        continue;
                    }
                    Line::Text(t) => t,
                };
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                match decode(&line) {
                    Ok(Message::Heartbeat) => {
                        productive = true;
                        out.alive();
                    }
                    Ok(Message::Price(env)) => {
                        productive = true;
                        if let Some(ahead) = implausibly_ahead(env.ts, now_ns()) {
                            // Checked before the duplicate rule so that it
                            // never becomes `last`: it would hold every
                            // later price of the instrument back.
                            out.malformed();
                            crate::warn_limited!(self.log, || {
                                format!(
                                "publisher {name}: skipping OANDA {} price stamped {} s ahead of this host's clock (more than {} s; is this host's clock right?)",
                                env.sym,
                                ahead.as_secs(),
                                MAX_AHEAD.as_secs()
                            )
                            });
                            continue;
                        }
                        let last = self.last.entry(env.sym.to_string()).or_insert(i64::MIN);
                        if env.ts <= *last {
                            // Already published (the snapshot a reconnect
                            // opens with): the stream is alive, the price
                            // is not news.
                            out.duplicate();
                            out.alive();
                            continue;
                        }
                        *last = env.ts;
                        if !out.offer(env) {
                            return Ok(Ended::Stop);
                        }
                    }
                    Err(e) => {
                        out.malformed();
                        crate::warn_limited!(self.log, || format!(
                            "publisher {name}: skipping OANDA line: {e}"
                        ));
                    }
                }
            }
        }
    }
}

/// The reason an HTTP error response gives: OANDA's `errorMessage`, else the
/// start of the body. Bounded in size and time.
pub(crate) async fn error_body(resp: &mut reqwest::Response) -> String {
    let mut body = Vec::new();
    let read = async {
        while let Ok(Some(c)) = resp.chunk().await {
            body.extend_from_slice(&c);
            if body.len() > 4096 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
        for key in ["errorMessage", "detail", "title", "error"] {
            if let Some(s) = v.get(key).and_then(|s| s.as_str()) {
                return s.chars().take(300).collect();
            }
        }
    }
    let text = String::from_utf8_lossy(&body);
    let text = text.trim();
    if text.is_empty() {
        "no details".into()
    } else {
        text.chars().take(300).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_documented_price_and_heartbeat() {
        // The shape of OANDA's v20 pricing stream documentation example.
        let line = br#"{"type":"PRICE","time":"2016-09-20T15:05:47.960449532Z","bids":[{"price":"1.11590","liquidity":10000000},{"price":"1.11589","liquidity":10000000}],"asks":[{"price":"1.11605","liquidity":10000000},{"price":"1.11606","liquidity":5000000}],"closeoutBid":"1.11587","closeoutAsk":"1.11606","status":"tradeable","tradeable":true,"instrument":"EUR_USD"}"#;
        let Message::Price(env) = decode(line).unwrap() else {
            panic!("not a price")
        };
        assert_eq!(
            (env.src.as_ref(), env.ch.as_ref(), env.sym.as_ref()),
            ("oanda", "price", "EUR_USD")
        );
        assert_eq!(env.ts, 1_474_383_947_960_449_532);
        assert_eq!(env.get("bid"), Some(&Value::Float(1.1159)));
        assert_eq!(env.get("ask"), Some(&Value::Float(1.11605)));
        assert_eq!(env.get("spread"), Some(&Value::Float(0.00015)));
        assert_eq!(env.get("liquidity"), Some(&Value::Float(10_000_000.0)));
        assert_eq!(env.get("tradeable"), Some(&Value::Bool(true)));
        assert_eq!(
            decode(br#"{"type":"HEARTBEAT","time":"2016-09-20T15:05:50.163791738Z"}"#),
            Ok(Message::Heartbeat)
        );
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        for bad in [
            &b"{"[..],
            br#"{"type":"PRICE","time":"2016-09-20T15:05:47Z","bids":[]}"#,
            br#"{"type":"PRICE","instrument":"EUR_USD","bids":[{"price":"1.1"}]}"#,
            br#"{"type":"PRICE","instrument":"EUR_USD","time":"x","bids":[{"price":"1.1"}]}"#,
            br#"{"type":"PRICE","instrument":"EUR_USD","time":"2016-09-20T15:05:47Z","bids":[{"price":"abc"}]}"#,
            br#"{"type":"PRICE","instrument":"EUR_USD","time":"2016-09-20T15:05:47Z"}"#,
            br#"{"type":"ORDER"}"#,
            br#"{"type":"PRICE","instrument":"EUR_USD","time":"2016-09-20T15:05:47Z","bids":[{"price":"-1.1"}],"asks":[{"price":"1.2"}]}"#,
            br#"{"type":"PRICE","instrument":"EUR_USD","time":"2016-09-20T15:05:47Z","asks":[{"price":"0"}]}"#,
            br#"{"type":"PRICE","instrument":"EUR_USD","time":"2016-09-20T15:05:47Z","bids":[{"price":"1.1","liquidity":-5}]}"#,
        ] {
            assert!(decode(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn only_stamps_far_ahead_of_the_local_clock_are_implausible() {
        let now = 1_700_000_000_000_000_000;
        let min = 60_000_000_000;
        assert_eq!(implausibly_ahead(now - 365 * 24 * 60 * min, now), None);
        assert_eq!(implausibly_ahead(now + 5 * min, now), None, "clock skew");
        assert_eq!(
            implausibly_ahead(now + 6 * min, now),
            Some(Duration::from_secs(360))
        );
        assert!(implausibly_ahead(i64::MAX, i64::MIN).is_some());
    }

    #[test]
    fn check_names_missing_keys() {
        let cfg = PublisherConfig {
            feed: super::super::FeedKind::OandaTick,
            ..Default::default()
        };
        let p = check(&cfg).join("\n");
        for key in ["oanda.account", "oanda.token_file", "instruments"] {
            assert!(p.contains(key), "{key} in {p}");
        }
        let cfg = PublisherConfig {
            feed: super::super::FeedKind::OandaTick,
            instruments: vec!["EUR_USD".into(), "EUR/USD".into()],
            oanda: OandaConfig {
                account: Some("101/../x".into()),
                token_file: Some("t".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let p = check(&cfg);
        assert_eq!(p.len(), 2, "{p:?}");
    }
}
