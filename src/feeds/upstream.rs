//! What the streaming venue feeds (OANDA, Betfair, social) share: reconnect
//! backoff, a bounded line splitter for newline-delimited streams, reading
//! credentials, venue timestamps, and the outcome of one connection.
//!
//! Each venue runs the same loop: connect, read until the stream fails or
//! goes silent, wait a capped, jittered, growing delay, reconnect. A
//! connection that carried data resets the delay, so a flapping venue is
//! retried quickly once and then ever more slowly, never in a tight loop.
//! Credentials the venue rejects end the feed with [`exit::NOPERM`]:
//! retrying cannot fix them, and hammering a login endpoint gets accounts
//! locked.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

use super::FeedContext;
use crate::exit::{self, Failure};
use crate::wire::Envelope;

/// Longest line accepted from a venue; longer ones are counted as malformed
/// and skipped, so a broken server cannot grow the buffer without bound.
pub const MAX_LINE: usize = 4 << 20;

/// A connection that carried data for at least this long was healthy: the
/// next reconnect starts from the shortest delay again. Shorter ones keep
/// growing it, so a venue that accepts, sends a little and drops every time
/// is not hammered.
pub const HEALTHY: Duration = Duration::from_secs(10);

/// How one connection ended, when the feed should carry on.
#[derive(Debug)]
pub enum Ended {
    /// `ctx.shutdown` fired, or the publisher went away, or `count` was reached.
    Stop,
    /// The connection was lost; reconnect after a delay. `productive` says
    /// whether it carried data (see [`Backoff::after`]).
    Lost { why: String, productive: bool },
}

/// Capped exponential backoff with "equal jitter": each delay is half the
/// current step plus a random share of the other half, so a fleet of
/// publishers that lost the venue at the same instant does not come back
/// at the same instant.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        Backoff {
            min,
            max: max.max(min),
            step: min,
        }
    }

    /// The venue feeds' default: 0.5 s doubling up to 30 s.
    pub fn venue() -> Self {
        Self::new(Duration::from_millis(500), Duration::from_secs(30))
    }

    pub fn reset(&mut self) {
        self.step = self.min;
    }

    /// The delay before reconnecting after a connection that lived `lived`
    /// and did (`productive`) or did not carry data.
    pub fn after(&mut self, productive: bool, lived: Duration) -> Duration {
        if productive && lived >= HEALTHY {
            self.reset();
        }
        self.next_delay()
    }

    /// The delay to wait now; the next one will be about twice as long.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (step * 2).min(self.max);
        let half = step / 2;
        half + rand::thread_rng().gen_range(Duration::ZERO..=half)
    }
}

/// One connection to a venue, from connect to loss.
// The trait is crate-private, so the auto-trait caveat of `async fn` in
// public traits does not apply: callers see the concrete futures.
#[allow(async_fn_in_trait)]
pub(crate) trait Session {
    async fn session(&mut self, out: &mut Outlet<'_>) -> Result<Ended, Failure>;

    /// How long the venue asked to be left alone after the session that
    /// just ended (a ban on logins), if it did; the backoff is no shorter.
    fn wait_at_least(&mut self) -> Option<Duration> {
        None
    }
}

/// A venue's connection life: run a session until it ends, then reconnect
/// after the venue backoff, until `ctx.shutdown` fires. A session's error
/// (bad credentials, bad config) ends the feed with its exit code.
pub(crate) async fn reconnect_loop(
    ctx: &FeedContext,
    venue: &str,
    out: &mut Outlet<'_>,
    conn: &mut impl Session,
) -> Result<(), Failure> {
    let mut backoff = Backoff::venue();
    loop {
        let t0 = std::time::Instant::now();
        let ended = tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => Ended::Stop,
            r = conn.session(out) => r?,
        };
        match ended {
            Ended::Stop => return Ok(()),
            Ended::Lost { why, productive } => {
                let mut d = backoff.after(productive, t0.elapsed());
                if let Some(floor) = conn.wait_at_least() {
                    // Up to a tenth more, so publishers banned together
                    // do not all come back in the same second.
                    let spread = rand::thread_rng().gen_range(Duration::ZERO..=floor / 10);
                    d = d.max(floor + spread);
                }
                tracing::warn!(
                    "publisher {}: {venue} stream {why}; reconnecting in {}",
                    ctx.name,
                    delay(d)
                );
                ctx.out.stats.lost(format!(
                    "{venue} stream {why}; reconnecting in {}",
                    delay(d)
                ));
                if !pause(&ctx.shutdown, d).await {
                    return Ok(());
                }
            }
        }
    }
}

/// A reconnect delay as people read it: milliseconds while short (the
/// backoff's steps), whole seconds once it is minutes (a ban).
fn delay(d: Duration) -> String {
    if d < Duration::from_secs(60) {
        format!("{} ms", d.as_millis())
    } else {
        humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
    }
}

/// The next chunk of a streaming HTTP body (OANDA, X), or how the stream
/// ended: `shutdown`, silence past `silent` (`quiet` names what stopped
/// arriving), a read error, or the server closing it.
pub(crate) async fn next_chunk(
    ctx: &FeedContext,
    resp: &mut reqwest::Response,
    silent: Duration,
    quiet: &str,
    productive: bool,
) -> Result<bytes::Bytes, Ended> {
    let chunk = tokio::select! {
        biased;
        _ = ctx.shutdown.cancelled() => return Err(Ended::Stop),
        c = tokio::time::timeout(silent, resp.chunk()) => c,
    };
    let why = match chunk {
        Ok(Ok(Some(b))) => return Ok(b),
        Err(_) => format!("was silent for {} ms ({quiet})", silent.as_millis()),
        Ok(Err(e)) => format!("read failed: {}", http_error(e)),
        Ok(Ok(None)) => "was closed by the server".into(),
    };
    Err(Ended::Lost { why, productive })
}

pub use crate::exit::http_error;

/// Sleeps for `d` unless `stop` fires first; false when it fired.
pub async fn pause(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// Splits a byte stream into lines (`\n`, with an optional `\r` before it),
/// refusing lines longer than `max`.
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    /// Where the next line starts: lines are taken by moving this, and the
    /// bytes before it are dropped once per chunk pushed, not once per
    /// line (which moved the rest of a chunk up for every line in it).
    start: usize,
    /// Bytes of `buf` already searched for a newline.
    scanned: usize,
    max: usize,
    /// Inside an overlong line: drop bytes until the next newline.
    skipping: bool,
}

/// One item out of a [`LineSplitter`].
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    Text(Vec<u8>),
    /// A line exceeded the limit and was dropped.
    TooLong,
}

impl LineSplitter {
    pub fn new(max: usize) -> Self {
        LineSplitter {
            buf: Vec::with_capacity(8192),
            start: 0,
            scanned: 0,
            max,
            skipping: false,
        }
    }

    pub fn push(&mut self, chunk: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete line, without its terminator.
    pub fn next_line(&mut self) -> Option<Line> {
        loop {
            match self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                Some(off) => {
                    let end = self.scanned + off;
                    let mut line = &self.buf[self.start..end];
                    self.start = end + 1;
                    self.scanned = self.start;
                    if line.last() == Some(&b'\r') {
                        line = &line[..line.len() - 1];
                    }
                    if std::mem::take(&mut self.skipping) {
                        // The tail of a line already reported as too long.
                        continue;
                    }
                    if line.len() > self.max {
                        return Some(Line::TooLong);
                    }
                    return Some(Line::Text(line.to_vec()));
                }
                None => {
                    self.scanned = self.buf.len();
                    if self.buf.len() - self.start > self.max {
                        self.buf.clear();
                        self.start = 0;
                        self.scanned = 0;
                        let first = !self.skipping;
                        self.skipping = true;
                        if first {
                            return Some(Line::TooLong);
                        }
                    }
                    return None;
                }
            }
        }
    }
}

/// A feed's configuration problems (its module's `check`) as the one
/// error it starts with, or nothing when there are none.
pub fn config_ok(name: &str, problems: Vec<String>) -> Result<(), Failure> {
    if problems.is_empty() {
        return Ok(());
    }
    Err(Failure::config(anyhow::anyhow!(
        "publisher {name}: {}",
        problems.join("; ")
    )))
}

/// The HTTP client of a streaming feed (OANDA, X): the body is a
/// long-lived stream of lines, so no gzip, and TCP keepalive so a dead
/// peer is noticed even between the venue's heartbeats.
pub fn stream_client(name: &str) -> Result<reqwest::Client, Failure> {
    reqwest::Client::builder()
        .no_gzip()
        .connect_timeout(Duration::from_secs(10))
        .tcp_keepalive(Duration::from_secs(30))
        .user_agent(concat!("nbpy/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| Failure::config(anyhow::anyhow!("publisher {name}: HTTP client: {e}")))
}

/// Reads a credential named by a `*_file` key. A missing or unreadable file
/// is a configuration problem (the key points at nothing), reported with
/// the key's name and path but never the content.
pub fn secret(name: &str, key: &str, path: &Path) -> Result<String, Failure> {
    let s = crate::config::read_secret(&format!("publishers.{name}.{key}"), path)
        .map_err(Failure::config)?;
    Ok(s.trim().to_string())
}

/// A venue said the credentials are wrong: exit 77 with one clear line.
pub fn rejected(name: &str, what: impl std::fmt::Display) -> Failure {
    Failure::new(
        exit::NOPERM,
        anyhow::anyhow!("publisher {name}: {what}; not retrying (fix the credential and restart)"),
    )
}

/// RFC 3339 (`2016-09-20T15:05:47.960449532Z`, as OANDA and X send it) or
/// OANDA's UNIX format (`1474383947.960449532`), to ns since the epoch.
pub fn parse_time_ns(s: &str) -> Option<i64> {
    if s.contains('T') {
        // Both venues send UTC with a `Z`; offsets are not accepted.
        let t = humantime::parse_rfc3339_weak(s).ok()?;
        let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
        return i64::try_from(d.as_nanos()).ok();
    }
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut ns: i64 = 0;
    for b in frac.bytes().chain(std::iter::repeat(b'0')).take(9) {
        ns = ns * 10 + i64::from(b - b'0');
    }
    secs.checked_mul(1_000_000_000)?.checked_add(ns)
}

/// Counts what a live feed has published against `count` and hands
/// envelopes to the publisher without ever waiting.
pub struct Outlet<'a> {
    ctx: &'a FeedContext,
    pub sent: u64,
}

impl<'a> Outlet<'a> {
    pub fn new(ctx: &'a FeedContext) -> Self {
        Outlet { ctx, sent: 0 }
    }

    /// False once the feed should stop: the publisher went away or
    /// `count` messages went out.
    pub fn offer(&mut self, env: Envelope<'static>) -> bool {
        if !self.ctx.out.offer(env) {
            return false;
        }
        self.sent += 1;
        self.ctx.cfg.count == 0 || self.sent < self.ctx.cfg.count
    }

    pub fn done(&self) -> bool {
        self.ctx.cfg.count > 0 && self.sent >= self.ctx.cfg.count
    }

    pub fn alive(&self) {
        self.ctx.out.alive();
    }

    pub fn malformed(&self) {
        self.ctx.out.stats.malformed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn duplicate(&self) {
        self.ctx
            .out
            .stats
            .duplicates
            .fetch_add(1, Ordering::Relaxed);
    }

    pub fn connected(&self) {
        self.ctx.out.stats.connects.fetch_add(1, Ordering::Relaxed);
    }
}

/// `url` without a trailing slash, or the venue's default.
pub fn base_url(cfg_url: Option<&str>, default: &str) -> String {
    cfg_url.unwrap_or(default).trim_end_matches('/').to_string()
}

/// Rounds away binary noise from a difference of decimal prices.
pub fn round_price(x: f64) -> f64 {
    (x * 1e10).round() / 1e10
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_across_chunks_with_crlf_and_limits() {
        let mut s = LineSplitter::new(8);
        s.push(b"ab");
        assert_eq!(s.next_line(), None);
        s.push(b"c\r\n\r\nde");
        assert_eq!(s.next_line(), Some(Line::Text(b"abc".to_vec())));
        assert_eq!(s.next_line(), Some(Line::Text(Vec::new())));
        assert_eq!(s.next_line(), None);
        s.push(b"fghijklmnop");
        assert_eq!(s.next_line(), Some(Line::TooLong));
        s.push(b"qrs");
        assert_eq!(s.next_line(), None);
        s.push(b"t\nok\n");
        assert_eq!(s.next_line(), Some(Line::Text(b"ok".to_vec())));
        assert_eq!(s.next_line(), None);
        s.push(b"123456789\n");
        assert_eq!(s.next_line(), Some(Line::TooLong));
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let d: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        for (d, step) in d.iter().zip([100u64, 200, 400, 800, 800, 800]) {
            assert!(
                *d >= Duration::from_millis(step / 2) && *d <= Duration::from_millis(step),
                "{d:?} for step {step}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn only_a_healthy_connection_resets_the_backoff() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        for _ in 0..4 {
            b.after(false, Duration::ZERO);
        }
        // Data, but dropped at once: a flapping venue keeps backing off.
        assert!(b.after(true, Duration::from_millis(50)) >= Duration::from_millis(800));
        // Silent for long: still not healthy.
        assert!(b.after(false, HEALTHY * 2) >= Duration::from_millis(1600));
        assert!(b.after(true, HEALTHY) <= Duration::from_millis(100));
    }

    #[test]
    fn venue_times() {
        assert_eq!(
            parse_time_ns("2016-09-20T15:05:47.960449532Z"),
            Some(1_474_383_947_960_449_532)
        );
        assert_eq!(
            parse_time_ns("1474383947.960449532"),
            Some(1_474_383_947_960_449_532)
        );
        assert_eq!(
            parse_time_ns("1474383947.5"),
            Some(1_474_383_947_500_000_000)
        );
        assert_eq!(
            parse_time_ns("2022-09-14T18:44:40.000Z"),
            Some(1_663_181_080_000_000_000)
        );
        assert_eq!(parse_time_ns("yesterday"), None);
        assert_eq!(parse_time_ns("1.x"), None);
    }
}
