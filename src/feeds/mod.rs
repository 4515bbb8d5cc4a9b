//! Upstream feeds. Each turns a venue's protocol into [`Envelope`]s and hands
//! them to a [`FeedSender`], which stamps the publisher's sequence numbers.
//!
//! Sequence numbers are assigned when a message enters the publisher, not
//! when it leaves: a message a live feed has to drop (the bus is backed up)
//! has already consumed its number, so every subscriber sees the loss as a
//! gap instead of never learning of it.

pub mod betfair;
pub mod kraken;
pub mod oanda;
pub mod replay;
pub mod social;
pub mod synthetic;
pub mod upstream;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::PublisherConfig;
use crate::exit::Failure;
use crate::service::Liveness;
use crate::wire::Envelope;

/// See [`FeedKind::queue_capacity`].
pub const WAITING_QUEUE: usize = 1024;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum FeedKind {
    #[default]
    Synthetic,
    KrakenTick,
    KrakenDepth,
    KrakenOrders,
    OandaTick,
    BetfairStream,
    Social,
    Replay,
}

impl FeedKind {
    /// Feeds that make their own data wait for the socket rather than drop
    /// it (synthetic, replay). They gain nothing from a deep queue: it only
    /// lets them run ahead into memory, which in the e2e bench cost the
    /// publisher a third of its CPU in page faults and cache misses.
    pub fn waits_for_bus(self) -> bool {
        matches!(self, FeedKind::Synthetic | FeedKind::Replay)
    }

    /// The queue between feed and socket: as configured for venue feeds,
    /// which drop beyond it; at most [`WAITING_QUEUE`] for those that wait.
    pub fn queue_capacity(self, configured: usize) -> usize {
        if self.waits_for_bus() {
            configured.min(WAITING_QUEUE)
        } else {
            configured
        }
    }

    /// Ports from DESIGN.md; every feed has its own so defaults never collide.
    pub fn default_port(self) -> u16 {
        match self {
            FeedKind::KrakenTick => 5558,
            FeedKind::KrakenDepth => 5560,
            FeedKind::KrakenOrders => 5561,
            FeedKind::OandaTick => 5562,
            FeedKind::BetfairStream => 5564,
            FeedKind::Social => 5565,
            FeedKind::Synthetic => 5570,
            FeedKind::Replay => 5571,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FeedKind::Synthetic => "synthetic",
            FeedKind::KrakenTick => "kraken-tick",
            FeedKind::KrakenDepth => "kraken-depth",
            FeedKind::KrakenOrders => "kraken-orders",
            FeedKind::OandaTick => "oanda-tick",
            FeedKind::BetfairStream => "betfair-stream",
            FeedKind::Social => "social",
            FeedKind::Replay => "replay",
        }
    }

    /// Feeds that replay or generate may wait for the bus instead of dropping.
    pub fn is_lossless_source(self) -> bool {
        matches!(self, FeedKind::Synthetic | FeedKind::Replay)
    }
}

/// Feed-specific configuration problems.
pub fn check(cfg: &PublisherConfig) -> Vec<String> {
    match cfg.feed {
        FeedKind::Replay if cfg.file.is_none() => {
            vec!["feed = \"replay\" needs file = \"path/to/envelopes.jsonl\"".into()]
        }
        FeedKind::OandaTick => oanda::check(cfg),
        FeedKind::BetfairStream => betfair::check(cfg),
        FeedKind::Social => social::check(cfg),
        FeedKind::KrakenTick | FeedKind::KrakenDepth | FeedKind::KrakenOrders => kraken::check(cfg),
        _ => Vec::new(),
    }
}

/// A URL key of a publisher's venue and what it must look like.
#[derive(Debug, Clone, PartialEq)]
pub struct VenueUrl<'a> {
    /// The key, relative to `[publishers.NAME]`.
    pub key: &'static str,
    pub url: &'a str,
    /// The schemes the feed's client speaks.
    pub schemes: &'static [&'static str],
    /// The venue's own URL, shown as the example.
    pub example: &'static str,
}

/// The venue URLs `cfg` sets, each with the schemes its feed can use, for
/// `config check` to refuse the wrong kind up front: a URL the feed's
/// client cannot speak (`ftp://`, or a bare `kraken.com`) otherwise parses
/// and fails only at the first connect, as a restart loop. Kraken speaks
/// WebSocket; OANDA's and X's streams and Betfair's login are HTTP
/// requests. Betfair's own `url` is no URL but a raw TLS endpoint
/// (`tls://host:port` or `host:port`), which [`betfair::check`] reads as
/// the stream does; synthetic and replay feeds connect nowhere.
pub fn venue_urls(cfg: &PublisherConfig) -> Vec<VenueUrl<'_>> {
    const WS: &[&str] = &["ws", "wss"];
    const HTTP: &[&str] = &["http", "https"];
    let url = |schemes, example| {
        cfg.url.as_deref().map(|url| VenueUrl {
            key: "url",
            url,
            schemes,
            example,
        })
    };
    let mut v = Vec::new();
    match cfg.feed {
        FeedKind::KrakenTick | FeedKind::KrakenDepth | FeedKind::KrakenOrders => {
            v.extend(url(WS, kraken::protocol::DEFAULT_URL))
        }
        FeedKind::OandaTick => v.extend(url(HTTP, cfg.oanda.environment.stream_url())),
        FeedKind::Social => v.extend(url(HTTP, social::DEFAULT_URL)),
        FeedKind::BetfairStream => v.extend(cfg.betfair.login_url.as_deref().map(|url| VenueUrl {
            key: "betfair.login_url",
            url,
            schemes: HTTP,
            example: betfair::DEFAULT_LOGIN_URL,
        })),
        FeedKind::Synthetic | FeedKind::Replay => {}
    }
    v
}

/// Counters a feed shares with its publisher.
#[derive(Default, Debug)]
pub struct FeedStats {
    /// Messages stamped with a sequence number.
    pub accepted: AtomicU64,
    /// Messages dropped because the bus was backed up (each is a seq gap).
    pub dropped: AtomicU64,
    /// Upstream frames that could not be understood.
    pub malformed: AtomicU64,
    /// Upstream (re)connections.
    pub connects: AtomicU64,
    /// Upstream messages skipped because they repeat what was already
    /// published (the snapshot a venue reopens a stream with). Expected
    /// after each reconnect; a count that keeps growing without reconnects
    /// means the feed is holding data back.
    pub duplicates: AtomicU64,
    /// Upstream updates dropped because what they change is being rebuilt
    /// (a Kraken book waiting for a fresh snapshot after a checksum
    /// mismatch or a reconnect). The snapshot supersedes them, so nothing
    /// is lost; a count that keeps growing means the book keeps failing.
    pub awaiting_snapshot: AtomicU64,
    /// The last upstream connection problem and `accepted` at that moment.
    upstream: std::sync::Mutex<Option<(u64, String)>>,
}

impl FeedStats {
    /// Records why the upstream connection was lost (or never made).
    pub fn lost(&self, why: String) {
        let n = self.accepted.load(Ordering::Relaxed);
        if let Ok(mut u) = self.upstream.lock() {
            *u = Some((n, why));
        }
    }

    /// The last upstream problem, as long as no message has arrived since:
    /// what a STATUS line should say about a feed that is silent.
    pub fn problem(&self) -> Option<String> {
        let n = self.accepted.load(Ordering::Relaxed);
        let u = self.upstream.lock().ok()?;
        u.as_ref()
            .filter(|(at, _)| *at == n)
            .map(|(_, w)| w.clone())
    }
}

/// Stamps and queues a feed's messages for the publisher socket.
#[derive(Clone)]
pub struct FeedSender {
    tx: mpsc::Sender<Envelope<'static>>,
    /// Leaked once per publisher process, so that stamping a message
    /// borrows it instead of allocating a copy.
    publisher: &'static str,
    epoch: u64,
    seq: Arc<AtomicU64>,
    pub stats: Arc<FeedStats>,
    liveness: Arc<Liveness>,
}

impl FeedSender {
    pub fn new(
        tx: mpsc::Sender<Envelope<'static>>,
        publisher: &str,
        epoch: u64,
        stats: Arc<FeedStats>,
        liveness: Arc<Liveness>,
    ) -> Self {
        FeedSender {
            tx,
            publisher: Box::leak(publisher.into()),
            epoch,
            seq: Arc::new(AtomicU64::new(0)),
            stats,
            liveness,
        }
    }

    fn stamp(&self, env: &mut Envelope<'static>) {
        env.publisher = std::borrow::Cow::Borrowed(self.publisher);
        env.epoch = self.epoch;
        env.seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        self.liveness.mark_data();
    }

    /// Waits for room: for generated and replayed data, which can wait.
    /// Returns false once the publisher has gone away.
    pub async fn send(&self, mut env: Envelope<'static>) -> bool {
        self.stamp(&mut env);
        self.tx.send(env).await.is_ok()
    }

    /// [`send`](Self::send), giving up once `stop` is cancelled. The queue
    /// has room for all but about one message in a thousand, so that case
    /// is a plain `try_send`: waiting on `stop` and the queue together for
    /// every message (a `select!`, two futures and a registration with
    /// `stop`'s waiters) cost a flat-out feed more than the queueing did.
    pub async fn send_unless(&self, mut env: Envelope<'static>, stop: &CancellationToken) -> bool {
        if stop.is_cancelled() {
            return false;
        }
        self.stamp(&mut env);
        let env = match self.tx.try_send(env) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
            Err(mpsc::error::TrySendError::Full(env)) => env,
        };
        tokio::select! {
            biased;
            _ = stop.cancelled() => false,
            r = self.tx.send(env) => r.is_ok(),
        }
    }

    /// Never waits: for live venues, whose socket must keep being read. A
    /// full queue drops the message after it took a number, so it is a gap
    /// downstream and a `dropped` count here.
    pub fn offer(&self, mut env: Envelope<'static>) -> bool {
        self.stamp(&mut env);
        match self.tx.try_send(env) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// The feed is alive but has nothing to say (a heartbeat arrived).
    pub fn alive(&self) {
        self.liveness.data();
    }
}

/// What a feed gets to run with.
pub struct FeedContext {
    pub name: String,
    pub cfg: PublisherConfig,
    pub out: FeedSender,
    pub shutdown: CancellationToken,
}

/// Runs the configured feed until it ends (count reached, file replayed) or
/// `shutdown` fires.
pub async fn run(ctx: FeedContext) -> Result<(), Failure> {
    match ctx.cfg.feed {
        FeedKind::Synthetic => synthetic::run(ctx).await,
        FeedKind::Replay => replay::run(ctx).await,
        FeedKind::KrakenTick | FeedKind::KrakenDepth | FeedKind::KrakenOrders => {
            kraken::run(ctx).await
        }
        FeedKind::OandaTick => oanda::run(ctx).await,
        FeedKind::BetfairStream => betfair::run(ctx).await,
        FeedKind::Social => social::run(ctx).await,
    }
}
