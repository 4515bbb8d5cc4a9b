//! Kraken spot market data over the public WebSocket API v2
//! (`wss://ws.kraken.com/v2`): `kraken-tick` subscribes to `ticker`,
//! `kraken-depth` to `book`, `kraken-orders` to `trade`, each publisher on
//! its own connection.
//!
//! A connection's life: connect (rustls, never OpenSSL), subscribe every
//! configured pair in one request, read acknowledgements, errors and data,
//! send an application-level `ping` every `ping_interval`. Kraken sends a
//! heartbeat about once a second while subscribed, so a connection silent for
//! `idle_timeout`, or a ping unanswered for as long, is dead and replaced.
//! Heartbeats and pongs tell the service watchdog the feed is alive though
//! quiet; a feed that cannot reconnect stops feeding it, and after the
//! publisher's `stale_after` the watchdog lets systemd restart it.
//!
//! Reconnects back off exponentially (`reconnect_min` doubling up to
//! `reconnect_max`, with jitter), reset after a connection that stayed up.
//! Kraken's edge (Cloudflare) bans an IP for ten minutes beyond roughly 150
//! connection attempts in a rolling ten minutes, and the three Kraken
//! publishers of one host share that budget, so each allows itself
//! `max_connects_per_10min` (default 40) and waits rather than exceed it.
//! Subscribe/unsubscribe requests are paced as well (a burst of 5, then one
//! a second), because Kraken rate-limits them per connection.
//!
//! A book whose checksum fails is resubscribed on the same connection
//! (unsubscribe + subscribe → fresh snapshot). If no snapshot that checks
//! out arrives within `idle_timeout`, the connection itself is replaced.
//!
//! The book is kept and verified in [`handler`] / [`book`]: see there.

pub mod book;
pub mod handler;
pub mod protocol;

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::Message;

use crate::config::PublisherConfig;
use crate::exit::Failure;
use crate::feeds::FeedKind;
use crate::schema::BOOK_LEVELS;
use crate::sink::RateLimitedLog;

use super::FeedContext;
pub use handler::{Action, Handler, KrakenStats, ResyncWhy};
use protocol::{Channel, SubscribeOptions};

/// Book depths Kraken accepts.
pub const DEPTHS: [u32; 5] = [10, 25, 100, 500, 1000];
pub const DEFAULT_INSTRUMENTS: [&str; 2] = ["BTC/USD", "ETH/USD"];
/// Kraken's (Cloudflare's) window for counting connection attempts.
const CONNECT_WINDOW: Duration = Duration::from_secs(600);
/// A connection that stayed up this long resets the backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);
/// Request pacing: burst, then one per this interval.
const REQUEST_BURST: f64 = 5.0;
const REQUEST_EVERY: Duration = Duration::from_secs(1);
/// How often the connection checks its clocks (idle, ping, pacing).
const HOUSEKEEPING: Duration = Duration::from_millis(100);

/// What a ticker update is triggered by.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum EventTrigger {
    /// On every trade (Kraken's default).
    #[default]
    Trades,
    /// On every change of the best bid or offer.
    Bbo,
}

impl EventTrigger {
    fn name(self) -> &'static str {
        match self {
            EventTrigger::Trades => "trades",
            EventTrigger::Bbo => "bbo",
        }
    }
}

/// `[publishers.NAME.kraken]`. The pairs are the publisher's `instruments`
/// (default BTC/USD and ETH/USD) and the endpoint its `url`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KrakenConfig {
    /// Book depth subscribed: 10, 25, 100, 500 or 1000 levels per side.
    pub depth: u32,
    /// Levels per side published to `kraken_depth` (1–10, at most `depth`).
    pub levels: usize,
    /// Ticker updates on `trades` or on `bbo` changes.
    pub event_trigger: EventTrigger,
    /// Application-level ping period.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// No frame at all (data, heartbeat, pong) for this long: reconnect.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// TCP + TLS + WebSocket handshake limit.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// First reconnect delay; doubles per failed attempt.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// Connection attempts allowed in any ten minutes (Kraken bans an IP
    /// for ten minutes beyond about 150, counted over all its connections).
    pub max_connects_per_10min: u32,
}

impl Default for KrakenConfig {
    fn default() -> Self {
        KrakenConfig {
            depth: 10,
            levels: BOOK_LEVELS,
            event_trigger: EventTrigger::Trades,
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(60),
            max_connects_per_10min: 40,
        }
    }
}

/// The pairs a publisher subscribes.
pub fn instruments(cfg: &PublisherConfig) -> Vec<String> {
    if cfg.instruments.is_empty() {
        DEFAULT_INSTRUMENTS.iter().map(|s| s.to_string()).collect()
    } else {
        cfg.instruments.clone()
    }
}

fn url(cfg: &PublisherConfig) -> String {
    cfg.url
        .clone()
        .unwrap_or_else(|| protocol::DEFAULT_URL.to_string())
}

fn channel(kind: FeedKind) -> Channel {
    match kind {
        FeedKind::KrakenTick => Channel::Ticker,
        FeedKind::KrakenOrders => Channel::Trade,
        _ => Channel::Book,
    }
}

pub fn check(cfg: &PublisherConfig) -> Vec<String> {
    let k = &cfg.kraken;
    let mut p = Vec::new();
    if !DEPTHS.contains(&k.depth) {
        p.push(format!(
            "kraken.depth = {}: Kraken allows 10, 25, 100, 500 or 1000",
            k.depth
        ));
    }
    if !(1..=BOOK_LEVELS).contains(&k.levels) || k.levels > k.depth as usize {
        p.push(format!(
            "kraken.levels = {}: allowed 1..={BOOK_LEVELS} and at most kraken.depth",
            k.levels
        ));
    }
    // `url` is checked with every venue URL (`feeds::venue_urls`).
    for i in &cfg.instruments {
        let ok = i.split('/').count() == 2
            && i.split('/').all(|s| !s.is_empty())
            && i.bytes().all(|b| b.is_ascii_graphic());
        if !ok {
            p.push(format!(
                "instruments: {i:?} is not a Kraken v2 pair such as \"BTC/USD\""
            ));
        }
    }
    if k.idle_timeout < Duration::from_secs(2) {
        p.push(
            "kraken.idle_timeout must be at least 2s (Kraken's heartbeat comes about once a second)"
                .into(),
        );
    }
    if k.ping_interval.is_zero() {
        p.push("kraken.ping_interval must be > 0".into());
    }
    if k.connect_timeout.is_zero() {
        p.push("kraken.connect_timeout must be > 0".into());
    }
    if k.reconnect_min.is_zero() || k.reconnect_min > k.reconnect_max {
        p.push("kraken.reconnect_min must be > 0 and <= kraken.reconnect_max".into());
    }
    if !(1..=150).contains(&k.max_connects_per_10min) {
        p.push(format!(
            "kraken.max_connects_per_10min = {}: allowed 1..=150 (Kraken bans an IP beyond about 150)",
            k.max_connects_per_10min
        ));
    }
    p
}

pub async fn run(ctx: FeedContext) -> Result<(), Failure> {
    run_with_stats(ctx, Arc::new(KrakenStats::default())).await
}

/// Capped exponential backoff with jitter: the n-th consecutive failure
/// waits a random time in [d/2, d], d = min(max, min·2ⁿ).
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            failures: 0,
        }
    }
    pub fn reset(&mut self) {
        self.failures = 0;
    }
    pub fn next_delay(&mut self) -> Duration {
        let d = self
            .min
            .saturating_mul(1u32 << self.failures.min(20))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        let half = d / 2;
        half + half.mul_f64(rand::thread_rng().gen_range(0.0..=1.0))
    }
}

/// At most `max` attempts in any `window`.
#[derive(Debug)]
pub struct AttemptWindow {
    window: Duration,
    max: usize,
    times: VecDeque<Instant>,
}

impl AttemptWindow {
    pub fn new(max: usize, window: Duration) -> Self {
        AttemptWindow {
            window,
            max: max.max(1),
            times: VecDeque::new(),
        }
    }
    /// How long to wait before the next attempt is allowed.
    pub fn wait(&mut self, now: Instant) -> Option<Duration> {
        while self
            .times
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            self.times.pop_front();
        }
        if self.times.len() < self.max {
            return None;
        }
        self.times
            .front()
            .map(|t| (*t + self.window).saturating_duration_since(now))
    }
    pub fn record(&mut self, now: Instant) {
        self.times.push_back(now);
    }
}

/// Token bucket for requests on one connection.
struct Pacer {
    tokens: f64,
    last: Instant,
}

impl Pacer {
    fn new() -> Self {
        Pacer {
            tokens: REQUEST_BURST,
            last: Instant::now(),
        }
    }
    fn take(&mut self, n: f64) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() / REQUEST_EVERY.as_secs_f64();
        self.tokens = (self.tokens + refill).min(REQUEST_BURST);
        self.last = now;
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

enum End {
    /// Stop asked for, or the publisher has gone.
    Shutdown,
    /// `count` messages published.
    Done,
    /// The connection ended; try again.
    Lost { why: String, healthy: bool },
    /// Retrying cannot help.
    Fatal(Failure),
}

/// Runs the feed, counting into `stats` (tests read them).
pub async fn run_with_stats(ctx: FeedContext, stats: Arc<KrakenStats>) -> Result<(), Failure> {
    let k = ctx.cfg.kraken.clone();
    let ch = channel(ctx.cfg.feed);
    let mut handler = Handler::new(ch, k.depth as usize, k.levels, stats.clone());
    let mut backoff = Backoff::new(k.reconnect_min, k.reconnect_max);
    let mut attempts = AttemptWindow::new(k.max_connects_per_10min as usize, CONNECT_WINDOW);
    let mut published = 0u64;
    let mut malformed_log = RateLimitedLog::new(Duration::from_secs(5));
    let url = url(&ctx.cfg);
    let result = loop {
        if ctx.shutdown.is_cancelled() {
            break Ok(());
        }
        if let Some(wait) = attempts.wait(Instant::now()) {
            tracing::warn!(
                "{}: {} connection attempts in the last 10 minutes; waiting {:.0?} to stay inside Kraken's limit",
                ctx.name, k.max_connects_per_10min, wait
            );
            tokio::select! {
                _ = ctx.shutdown.cancelled() => break Ok(()),
                _ = tokio::time::sleep(wait) => {}
            }
        }
        attempts.record(Instant::now());
        let end = session(
            &ctx,
            &url,
            ch,
            &mut handler,
            &mut published,
            &mut malformed_log,
        )
        .await;
        match end {
            End::Shutdown | End::Done => break Ok(()),
            End::Fatal(f) => break Err(f),
            End::Lost { why, healthy } => {
                if healthy {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                tracing::warn!(
                    "{}: Kraken connection lost: {why}; reconnecting in {delay:.1?}",
                    ctx.name
                );
                ctx.out
                    .stats
                    .lost(format!("Kraken: {why}; reconnecting in {delay:.1?}"));
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => break Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    };
    let g = KrakenStats::get;
    tracing::info!(
        "{}: Kraken {} feed stopping: {} published, {} connects, {} frames, {} malformed, {} repeats skipped ({} trades, {} ticks), {} checksum mismatches, {} unreadable book levels, {} resyncs, {} book updates dropped awaiting a snapshot",
        ctx.name,
        ch.name(),
        g(&stats.published),
        ctx.out.stats.connects.load(Ordering::Relaxed),
        g(&stats.frames),
        ctx.out.stats.malformed.load(Ordering::Relaxed),
        g(&stats.duplicate_trades) + g(&stats.duplicate_ticks),
        g(&stats.duplicate_trades),
        g(&stats.duplicate_ticks),
        g(&stats.checksum_mismatches),
        g(&stats.unreadable_levels),
        g(&stats.resyncs),
        g(&stats.unsynced_updates),
    );
    result
}

async fn session(
    ctx: &FeedContext,
    url: &str,
    ch: Channel,
    h: &mut Handler,
    published: &mut u64,
    malformed_log: &mut RateLimitedLog,
) -> End {
    let k = &ctx.cfg.kraken;
    let symbols = instruments(&ctx.cfg);
    let opts = SubscribeOptions {
        depth: (ch == Channel::Book).then_some(k.depth),
        event_trigger: (ch == Channel::Ticker).then_some(k.event_trigger.name()),
    };
    let lost = |why: String| End::Lost {
        why,
        healthy: false,
    };

    let connect = tokio_tungstenite::connect_async(url);
    let mut ws = tokio::select! {
        _ = ctx.shutdown.cancelled() => return End::Shutdown,
        r = tokio::time::timeout(k.connect_timeout, connect) => match r {
            Ok(Ok((ws, _))) => ws,
            Ok(Err(e)) => return lost(format!("cannot connect to {url}: {e}")),
            Err(_) => return lost(format!("connecting to {url} took over {:?}", k.connect_timeout)),
        }
    };
    let since = Instant::now();
    ctx.out.stats.connects.fetch_add(1, Ordering::Relaxed);
    h.reset_connection();
    let stats = h.stats.clone();
    let mut req_id = 0u64;
    let mut next_id = || {
        req_id += 1;
        req_id
    };
    let mut pacer = Pacer::new();
    pacer.take(1.0);
    let sub = protocol::subscribe(ch, &symbols, &opts, next_id());
    if let Err(e) = send(&mut ws, sub, k.connect_timeout).await {
        return lost(format!("subscribe: {e}"));
    }
    tracing::info!(
        "{}: connected to {url}; subscribing {} for {}",
        ctx.name,
        ch.name(),
        symbols.join(", ")
    );

    let healthy = |since: Instant| since.elapsed() >= HEALTHY_AFTER;
    let mut last_frame = Instant::now();
    let mut next_ping = Instant::now() + k.ping_interval;
    let mut ping_sent: Option<Instant> = None;
    let mut resyncs: VecDeque<String> = VecDeque::new();
    // Pairs resubscribed and waiting for their fresh snapshot.
    let mut resync_started: Vec<(String, Instant)> = Vec::new();
    let mut refused: HashSet<String> = HashSet::new();
    let mut tick = tokio::time::interval(HOUSEKEEPING);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                return End::Shutdown;
            }
            _ = tick.tick() => {
                let now = Instant::now();
                if now.duration_since(last_frame) >= k.idle_timeout {
                    return End::Lost { why: format!("nothing from Kraken for {:?}", k.idle_timeout), healthy: healthy(since) };
                }
                if let Some(t) = ping_sent {
                    if now.duration_since(t) >= k.idle_timeout {
                        return End::Lost { why: format!("ping unanswered for {:?}", k.idle_timeout), healthy: healthy(since) };
                    }
                }
                if let Some((s, _)) = resync_started.iter().find(|(_, t)| now.duration_since(*t) >= k.idle_timeout) {
                    return End::Lost { why: format!("{s}: no fresh snapshot {:?} after resubscribing", k.idle_timeout), healthy: healthy(since) };
                }
                if now >= next_ping {
                    next_ping = now + k.ping_interval;
                    if ping_sent.is_none() {
                        if let Err(e) = send(&mut ws, protocol::ping(next_id()), k.connect_timeout).await {
                            return End::Lost { why: format!("ping: {e}"), healthy: healthy(since) };
                        }
                        ping_sent = Some(now);
                    }
                }
                while let Some(symbol) = resyncs.front() {
                    if !h.book_synced(symbol) && pacer.take(2.0) {
                        let one = [symbol.clone()];
                        let reqs = [
                            protocol::unsubscribe(ch, &one, &opts, next_id()),
                            protocol::subscribe(ch, &one, &opts, next_id()),
                        ];
                        for r in reqs {
                            if let Err(e) = send(&mut ws, r, k.connect_timeout).await {
                                return End::Lost { why: format!("resubscribe: {e}"), healthy: healthy(since) };
                            }
                        }
                        stats.resyncs.fetch_add(1, Ordering::Relaxed);
                        resync_started.push((symbol.clone(), now));
                        resyncs.pop_front();
                    } else if h.book_synced(symbol) {
                        resyncs.pop_front();
                    } else {
                        break;
                    }
                }
                // A fresh snapshot that checks out ends the wait.
                resync_started.retain(|(s, _)| !h.book_synced(s));
            }
            msg = ws.next() => {
                last_frame = Instant::now();
                let text = match msg {
                    None => return End::Lost { why: "server ended the stream".into(), healthy: healthy(since) },
                    Some(Err(e)) => return End::Lost { why: e.to_string(), healthy: healthy(since) },
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(f))) => {
                        let why = f.map(|f| format!("server closed ({} {})", f.code, f.reason)).unwrap_or_else(|| "server closed".into());
                        return End::Lost { why, healthy: healthy(since) };
                    }
                    Some(Ok(Message::Binary(b))) => {
                        ctx.out.stats.malformed.fetch_add(1, Ordering::Relaxed);
                        crate::warn_limited!(malformed_log, || format!("{}: unexpected binary frame of {} bytes from Kraken", ctx.name, b.len()));
                        continue;
                    }
                    // Protocol pings are answered by tungstenite itself.
                    Some(Ok(_)) => continue,
                };
                if let Err(e) = h.handle(text.as_str()) {
                    ctx.out.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    crate::warn_limited!(malformed_log, || format!("{}: {e}: {}", ctx.name, excerpt(text.as_str())));
                }
                // What the frame held back goes where STATUS reads it.
                let repeats = std::mem::take(&mut h.repeats);
                if repeats > 0 {
                    ctx.out.stats.duplicates.fetch_add(repeats, Ordering::Relaxed);
                }
                let unsynced = std::mem::take(&mut h.unsynced);
                if unsynced > 0 {
                    ctx.out.stats.awaiting_snapshot.fetch_add(unsynced, Ordering::Relaxed);
                }
                for env in h.out.drain(..) {
                    if !ctx.out.offer(env) {
                        return End::Shutdown;
                    }
                    *published += 1;
                    stats.published.fetch_add(1, Ordering::Relaxed);
                    if ctx.cfg.count > 0 && *published >= ctx.cfg.count {
                        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                        return End::Done;
                    }
                }
                for action in std::mem::take(&mut h.actions) {
                    match action {
                        Action::Heartbeat => ctx.out.alive(),
                        Action::Pong(_) => {
                            ping_sent = None;
                            ctx.out.alive();
                        }
                        Action::Subscribed { symbol } => {
                            ctx.out.alive();
                            tracing::debug!("{}: subscribed {} {}", ctx.name, ch.name(), symbol.as_deref().unwrap_or("?"));
                        }
                        Action::Resync { symbol, why } => {
                            tracing::warn!("{}: {symbol}: {why}; resubscribing for a fresh snapshot", ctx.name);
                            if !resyncs.contains(&symbol) {
                                resyncs.push_back(symbol);
                            }
                        }
                        Action::Status(s) => tracing::info!("{}: Kraken system status: {s}", ctx.name),
                        Action::Rejected { method, symbol, error } => {
                            if method != "subscribe" {
                                // An unsubscribe of a pair Kraken had already
                                // dropped is harmless; the subscribe decides.
                                tracing::debug!("{}: Kraken refused {method} {symbol:?}: {error}", ctx.name);
                                continue;
                            }
                            tracing::error!("{}: Kraken refused to subscribe {} {}: {error}", ctx.name, ch.name(), symbol.as_deref().unwrap_or("?"));
                            if error.to_ascii_lowercase().contains("rate limit") {
                                return lost(format!("Kraken rate limit: {error}"));
                            }
                            if error.to_ascii_lowercase().contains("already subscribed") {
                                // A resync whose unsubscribe was lost: only a new
                                // connection brings a fresh snapshot.
                                return lost(format!("cannot resubscribe: {error}"));
                            }
                            if let Some(s) = symbol {
                                refused.insert(s);
                            }
                            if symbols.iter().all(|s| refused.contains(s)) {
                                return End::Fatal(Failure::config(anyhow::anyhow!(
                                    "publisher {}: Kraken refused every instrument ({}): {error}",
                                    ctx.name, symbols.join(", ")
                                )));
                            }
                        }
                    }
                }
            }
        }
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Sends one text frame; a peer that stops reading cannot hold us forever.
async fn send(ws: &mut Ws, text: String, limit: Duration) -> Result<(), String> {
    match tokio::time::timeout(limit, ws.send(Message::text(text))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("not sent within {limit:?}")),
    }
}

/// The start of a frame, for a log line.
fn excerpt(text: &str) -> String {
    let mut end = text.len().min(120);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    if end < text.len() {
        format!("{}…", &text[..end])
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut caps = Vec::new();
        for _ in 0..6 {
            let d = b.next_delay();
            caps.push(d);
        }
        let want = [100u64, 200, 400, 800, 1000, 1000];
        for (d, cap) in caps.iter().zip(want) {
            let cap = Duration::from_millis(cap);
            assert!(
                *d >= cap / 2 && *d <= cap,
                "{d:?} not in [{:?}, {cap:?}]",
                cap / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn attempt_window_holds_the_next_attempt_until_the_oldest_expires() {
        let t0 = Instant::now();
        let mut w = AttemptWindow::new(2, Duration::from_secs(600));
        assert_eq!(w.wait(t0), None);
        w.record(t0);
        w.record(t0 + Duration::from_secs(10));
        assert_eq!(
            w.wait(t0 + Duration::from_secs(20)),
            Some(Duration::from_secs(580))
        );
        assert_eq!(w.wait(t0 + Duration::from_secs(600)), None);
    }

    #[test]
    fn config_checks_name_the_key() {
        let mut cfg = PublisherConfig {
            feed: FeedKind::KrakenDepth,
            ..Default::default()
        };
        assert!(check(&cfg).is_empty(), "{:?}", check(&cfg));
        cfg.kraken.depth = 7;
        cfg.kraken.levels = 11;
        cfg.instruments = vec!["BTCUSD".into(), "ETH/USD".into()];
        cfg.kraken.max_connects_per_10min = 500;
        let p = check(&cfg).join("\n");
        for key in [
            "kraken.depth = 7",
            "kraken.levels = 11",
            "\"BTCUSD\"",
            "kraken.max_connects_per_10min = 500",
        ] {
            assert!(p.contains(key), "{key} missing from:\n{p}");
        }
        assert!(!p.contains("ETH/USD"));
        cfg = PublisherConfig::default();
        cfg.kraken.depth = 25;
        cfg.kraken.levels = 10;
        assert!(check(&cfg).is_empty());
    }

    #[test]
    fn config_reads_from_toml() {
        let text = r#"
feed = "kraken-depth"
instruments = ["BTC/USD"]
url = "ws://127.0.0.1:9"
[kraken]
depth = 100
levels = 5
ping_interval = "15s"
event_trigger = "bbo"
"#;
        let cfg: PublisherConfig = toml::from_str(text).unwrap();
        assert_eq!(cfg.kraken.depth, 100);
        assert_eq!(cfg.kraken.levels, 5);
        assert_eq!(cfg.kraken.ping_interval, Duration::from_secs(15));
        assert_eq!(cfg.kraken.event_trigger, EventTrigger::Bbo);
        assert!(check(&cfg).is_empty());
        assert!(toml::from_str::<PublisherConfig>("[kraken]\ndeph = 10\n").is_err());
    }
}
