//! The writer pool: batches in, InfluxDB writes out, nothing dropped.
//!
//! A bounded in-memory queue of batches sits between the subscriber's intake
//! and a few concurrent writers; with a [`Spool`] behind it, whatever cannot
//! be written promptly goes to disk instead of waiting in memory.
//!
//! # Where a batch goes
//!
//! - InfluxDB healthy and the queue has room: the queue, then one write.
//! - InfluxDB failing (connection refused, timeout, 5xx, and also 401/403 or
//!   a missing database/RP, which need a human but must not lose data), or
//!   the queue full (InfluxDB slower than the bus): the spool. A write that
//!   fails spools the batch too. Intake never waits for InfluxDB, only for a
//!   full spool under `when_full = "block"`.
//! - The spool refusing it too (a full or failing disk): memory, offered
//!   again to the spool and to InfluxDB with backoff until one takes it;
//!   `SPOOL FAILING` stays on until then, and a stop offers it to the spool
//!   one last time.
//! - InfluxDB refuses points (400 partial write, field-type conflict, 413):
//!   the batch is split until the refused points are isolated; the rest are
//!   written and the refused ones go to the dead-letter file with
//!   InfluxDB's reason. A field-type conflict names its measurement and
//!   field, so those lines are set apart in one step instead of bisecting.
//!
//! # Replay, and why live data is not queued behind it
//!
//! Writers alternate between the live queue and the spool (oldest record
//! first) whenever both have work, so neither starves: replay gets every
//! write slot live data does not need and at least half when both wait, so
//! a backlog drains at InfluxDB's spare capacity while fresh data keeps
//! reaching the dashboards at once. We chose this over sending new data through the spool
//! while it is non-empty (strict arrival order): InfluxDB stores by series
//! and timestamp, so the order of writes changes nothing in what is stored,
//! while queueing live data behind an hour-long backlog would blind the
//! dashboards and the validator for as long as it takes to drain. Within
//! the backlog, replay is in order.
//!
//! While InfluxDB is failing, one writer probes with a spooled record and
//! capped exponential backoff with jitter; the others keep moving queued
//! batches to disk. The probe's first success reopens the live path.
//!
//! # Exactly once, as far as InfluxDB can tell
//!
//! A spooled record is deleted only after InfluxDB acknowledged it, so a
//! crash can replay a record that was already written: the same lines with
//! the same timestamps, which InfluxDB stores as the same points.
//!
//! # Stopping
//!
//! [`WriterPool::close`] stops replay, lets the writers finish the queue,
//! and when the stop deadline nears, abandons in-flight writes and spools
//! what is left (fsynced), so a stop is lossless whether InfluxDB answers
//! or not.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::Rng;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::batch::Batch;
use super::influx::{InfluxClient, WriteError};
use super::spool::{Appended, Kept, Record, Spool};
use super::RateLimitedLog;
use crate::config::InfluxConfig;

#[derive(Default, Debug)]
pub struct WriterStats {
    /// Points InfluxDB accepted (live and replayed).
    pub written: AtomicU64,
    /// Failed write attempts (each retried, spooled or split).
    pub write_errors: AtomicU64,
    /// Points InfluxDB refused, now in the dead-letter file.
    pub dead_lettered: AtomicU64,
    /// Points InfluxDB refused that the dead-letter file could not take:
    /// lost (the log says why).
    pub refused_lost: AtomicU64,
    /// Points in memory: queued or being written, not yet on disk.
    pub pending: AtomicU64,
    /// Batches waiting in the queue.
    pub queued_batches: AtomicU64,
    /// Last successful write's latency, µs.
    pub latency_us: AtomicU64,
    /// Since when writes have been failing (ms since the pool started;
    /// 0 = they succeed). Feeds STATUS and, without a spool, the watchdog.
    pub failing_since_ms: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// The last failure needs a human (401/403, database or RP missing).
    pub needs_human: AtomicBool,
    /// Points appended to the spool.
    pub spooled: AtomicU64,
    /// Points written to InfluxDB from the spool.
    pub replayed: AtomicU64,
    /// Points deleted from a full spool (drop-oldest) or lost to damage.
    pub dropped: AtomicU64,
    /// Spool size in bytes, and points in it not yet delivered.
    pub spool_bytes: AtomicU64,
    pub spool_points: AtomicU64,
    /// Of `spool_points`, points this run did deliver (written or
    /// refused): a replayed record the stop cut short whose rest the disk
    /// would not take stays whole (see [`Spool::release_rest`]). Counted
    /// once, as delivered; the next start sends them again.
    pub spool_delivered_too: AtomicU64,
    /// Largest `spool_bytes` seen.
    pub spool_high_water: AtomicU64,
    /// Times a batch found the spool full and waited (block policy).
    pub spool_full: AtomicU64,
    /// Damaged places cut from the spool (on open or while replaying).
    pub spool_damaged: AtomicU64,
    /// Bytes cut on open, whose points cannot be counted (damage found
    /// while replaying counts its points in `dropped`).
    pub spool_uncounted_bytes: AtomicU64,
    /// The spool refused the last append (disk error), or points it
    /// refused are still held only in memory (see [`SpoolHealth`]).
    pub spool_failing: AtomicBool,
}

impl WriterStats {
    pub fn get(a: &AtomicU64) -> u64 {
        a.load(Ordering::Relaxed)
    }
    /// The spool's size gauges (points, bytes, and the bytes' high water).
    pub fn note_spool_size(&self, points: u64, bytes: u64) {
        self.spool_points.store(points, Ordering::Relaxed);
        self.spool_bytes.store(bytes, Ordering::Relaxed);
        self.spool_high_water.fetch_max(bytes, Ordering::Relaxed);
    }
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }
}

/// Encoded points on their way: a batch, or part of one after a split.
#[derive(Debug, Clone, PartialEq)]
struct Piece {
    /// Shared, not copied: the same bytes go to each write attempt, the
    /// spool and the dead-letter file, and a split takes two views of them.
    lines: Bytes,
    points: usize,
}

/// A submitted batch, numbered for [`WriterPool::durable_below`].
struct Item {
    id: u64,
    rp: &'static str,
    piece: Piece,
}

enum Work {
    Live(Item),
    /// A spooled record; `probe` when it was taken to test a failing InfluxDB.
    Replay(Record, bool),
}

struct Picker {
    rx: mpsc::Receiver<Item>,
    prefer_live: bool,
    closed: bool,
}

/// Which submitted batches are not yet safe (written, spooled or
/// dead-lettered): the intake uses it to know which of its sequence
/// numbers survive a crash.
#[derive(Default)]
struct Durability {
    next: u64,
    open: BTreeSet<u64>,
}

/// What `spool_failing` is made of. Either alone is an alarm: the last
/// append failing, or a batch the spool refused earlier still held only in
/// memory. A later append succeeding says the disk works again, not that
/// the refused batch is safe: it is until it is spooled or written.
#[derive(Default)]
struct SpoolHealth {
    append_failed: bool,
    /// Batches the spool refused, retried in memory.
    held: u64,
}

/// The spool, shared by the writers; file work runs on blocking threads.
pub struct SharedSpool {
    inner: Mutex<Spool>,
    room: Notify,
}

impl SharedSpool {
    pub fn new(spool: Spool) -> Arc<Self> {
        Arc::new(SharedSpool {
            inner: Mutex::new(spool),
            room: Notify::new(),
        })
    }

    /// Runs `f` on the spool under its lock (a panic elsewhere while holding
    /// it leaves the spool's state as consistent as its last operation).
    pub fn with<R>(&self, f: impl FnOnce(&mut Spool) -> R) -> R {
        let mut g = match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut g)
    }

    async fn blocking<R: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Spool) -> std::io::Result<R> + Send + 'static,
    ) -> std::io::Result<R> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.with(f))
            .await
            .map_err(std::io::Error::other)?
    }
}

pub struct WriterPool {
    tx: mpsc::Sender<Item>,
    handles: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
    pub stats: Arc<WriterStats>,
}

struct Shared {
    client: InfluxClient,
    stats: Arc<WriterStats>,
    retry_min: Duration,
    retry_max: Duration,
    dead_letter: PathBuf,
    log: Mutex<RateLimitedLog>,
    /// Spool trouble has its own limit, so InfluxDB's noise cannot hide it.
    spool_log: Mutex<RateLimitedLog>,
    started: Instant,
    spool: Option<Arc<SharedSpool>>,
    healthy: AtomicBool,
    probing: AtomicBool,
    /// Spooled points not yet handed out (a copy, so the picker need not
    /// take the spool's lock, which an fsync may hold).
    spool_unread: AtomicU64,
    picker: tokio::sync::Mutex<Picker>,
    /// Something for the picker: spooled data, health back.
    wake: Notify,
    /// Stop taking spooled records (the pool is closing).
    closing: CancellationToken,
    /// The stop deadline is near: abandon writes, spool what is held.
    hurry: CancellationToken,
    durable: Mutex<Durability>,
    /// Sets `stats.spool_failing`; a lock, so that a batch held and a
    /// successful append at the same time cannot leave the alarm off.
    spool_health: Mutex<SpoolHealth>,
    /// Beaten while intake waits for a full spool: waiting for room is the
    /// configured behaviour, not a hang for the watchdog to act on.
    liveness: std::sync::OnceLock<Arc<crate::service::Liveness>>,
    /// The service is stopping: a batch waiting for room in a full spool
    /// is spooled past the limit instead (see `close`).
    stopping: std::sync::OnceLock<CancellationToken>,
}

impl WriterPool {
    /// A pool without a spool: failing writes are retried in memory.
    pub fn start(
        client: InfluxClient,
        cfg: &InfluxConfig,
        queue_batches: usize,
        dead_letter: PathBuf,
    ) -> Self {
        Self::start_with_spool(client, cfg, queue_batches, dead_letter, None)
    }

    pub fn start_with_spool(
        client: InfluxClient,
        cfg: &InfluxConfig,
        queue_batches: usize,
        dead_letter: PathBuf,
        spool: Option<Arc<SharedSpool>>,
    ) -> Self {
        let (tx, rx) = mpsc::channel::<Item>(queue_batches.max(1));
        let stats = Arc::new(WriterStats::default());
        let shared = Arc::new(Shared {
            client,
            stats: stats.clone(),
            retry_min: cfg.retry_min,
            retry_max: cfg.retry_max,
            dead_letter,
            log: Mutex::new(RateLimitedLog::new(Duration::from_secs(5))),
            spool_log: Mutex::new(RateLimitedLog::new(Duration::from_secs(5))),
            started: Instant::now(),
            spool,
            healthy: AtomicBool::new(true),
            probing: AtomicBool::new(false),
            spool_unread: AtomicU64::new(0),
            picker: tokio::sync::Mutex::new(Picker {
                rx,
                prefer_live: true,
                closed: false,
            }),
            wake: Notify::new(),
            closing: CancellationToken::new(),
            hurry: CancellationToken::new(),
            durable: Mutex::new(Durability::default()),
            spool_health: Mutex::new(SpoolHealth::default()),
            liveness: std::sync::OnceLock::new(),
            stopping: std::sync::OnceLock::new(),
        });
        shared.refresh_spool_gauges();
        let handles = (0..cfg.concurrency.max(1))
            .map(|_| {
                let shared = shared.clone();
                tokio::spawn(async move {
                    while let Some(work) = shared.pick().await {
                        match work {
                            Work::Live(item) => shared.deliver_live(item).await,
                            Work::Replay(rec, probe) => shared.deliver_replay(rec, probe).await,
                        }
                    }
                })
            })
            .collect();
        WriterPool {
            tx,
            handles,
            stats,
            shared,
        }
    }

    /// The service's liveness, kept beating while a full spool blocks intake.
    pub fn set_liveness(&self, l: Arc<crate::service::Liveness>) {
        let _ = self.shared.liveness.set(l);
    }

    /// The service's stop signal: intake waiting for a full spool (block
    /// policy) must not hold up a stop, so its batch then goes past the limit.
    pub fn set_stop_signal(&self, t: CancellationToken) {
        let _ = self.shared.stopping.set(t);
    }

    pub fn has_spool(&self) -> bool {
        self.shared.spool.is_some()
    }

    /// Tells the pool InfluxDB is (not) answering, e.g. from a start-up
    /// ping, so batches go to the spool without a failed write each.
    pub fn set_healthy(&self, result: Result<(), WriteError>) {
        match result {
            Ok(()) => self.shared.note_success(),
            Err(e) => self.shared.note_failure(&e),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Relaxed)
    }

    /// Hands a batch over. Goes to the spool when InfluxDB is failing or the
    /// queue is full; waits only when the spool is full under the block
    /// policy (or, without a spool, for room in the queue).
    pub async fn submit(&self, batch: Batch) {
        if batch.points == 0 {
            return;
        }
        let id = match self.shared.durable.lock() {
            Ok(mut d) => {
                let id = d.next;
                d.next += 1;
                d.open.insert(id);
                id
            }
            Err(_) => 0,
        };
        self.stats
            .pending
            .fetch_add(batch.points as u64, Ordering::Relaxed);
        let item = Item {
            id,
            rp: batch.rp,
            piece: Piece {
                lines: batch.lines.into(),
                points: batch.points,
            },
        };
        let item = if self.shared.spool.is_some() {
            let item = if self.shared.healthy.load(Ordering::Relaxed) {
                self.stats.queued_batches.fetch_add(1, Ordering::Relaxed);
                match self.tx.try_send(item) {
                    Ok(()) => return,
                    Err(mpsc::error::TrySendError::Full(i))
                    | Err(mpsc::error::TrySendError::Closed(i)) => {
                        self.stats.queued_batches.fetch_sub(1, Ordering::Relaxed);
                        i
                    }
                }
            } else {
                item
            };
            match self.shared.spool_piece(item.rp, item.piece).await {
                Ok(()) => {
                    self.shared.done(item.id);
                    return;
                }
                // The disk failed: keep it in memory like a pool without a spool.
                Err(piece) => Item { piece, ..item },
            }
        } else {
            item
        };
        self.stats.queued_batches.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(item).await.is_err() {
            self.stats.queued_batches.fetch_sub(1, Ordering::Relaxed);
            tracing::error!("writer pool closed while submitting");
        }
    }

    /// Is there room for another batch without waiting?
    pub fn has_room(&self) -> bool {
        self.tx.capacity() > 0
    }

    /// Batches submitted so far (their numbers are `0..submitted()`).
    pub fn submitted(&self) -> u64 {
        self.shared.durable.lock().map(|d| d.next).unwrap_or(0)
    }

    /// Every batch numbered below this is safe: written, spooled or
    /// dead-lettered.
    pub fn durable_below(&self) -> u64 {
        self.shared
            .durable
            .lock()
            .map(|d| d.open.first().copied().unwrap_or(d.next))
            .unwrap_or(0)
    }

    /// How long the writers have been failing to keep data safe, if they
    /// are. With a working spool, InfluxDB being down is not a failure.
    pub fn failing_for(&self) -> Option<Duration> {
        if self.shared.spool.is_some() && !self.stats.spool_failing.load(Ordering::Relaxed) {
            return None;
        }
        match self.stats.failing_since_ms.load(Ordering::Relaxed) {
            0 => None,
            since => Some(
                self.shared
                    .started
                    .elapsed()
                    .saturating_sub(Duration::from_millis(since)),
            ),
        }
    }

    /// Forces the spool to disk (for the fsync interval policy's timer).
    pub async fn sync_spool(&self, only_if_due: bool) {
        if let Some(sp) = &self.shared.spool {
            let r = sp
                .blocking(move |s| {
                    if only_if_due {
                        s.sync_if_due()
                    } else {
                        s.sync()
                    }
                })
                .await;
            if let Err(e) = r {
                self.shared
                    .spool_warn(|| format!("spool fsync failed: {e}"));
            }
        }
    }

    /// Stops replay, lets the writers finish the queue, and past 3/4 of
    /// `deadline` spools whatever is still held. Returns the points neither
    /// written nor spooled when time ran out (only possible without a spool
    /// or with a failing disk).
    pub async fn close(self, deadline: Duration) -> Result<(), u64> {
        let WriterPool {
            tx,
            handles,
            shared,
            stats,
        } = self;
        shared.closing.cancel();
        drop(tx);
        shared.wake.notify_one();
        let mut all = futures::future::join_all(handles);
        let (patient, rest) = match shared.spool {
            Some(_) => (deadline.mul_f64(0.75), deadline.mul_f64(0.25)),
            None => (deadline, Duration::ZERO),
        };
        if tokio::time::timeout(patient, &mut all).await.is_err() {
            tracing::warn!(
                "{}",
                abandon_note(
                    match shared.spool {
                        None => StopSpool::None,
                        Some(_) if stats.spool_failing.load(Ordering::Relaxed) =>
                            StopSpool::Failing,
                        Some(_) => StopSpool::Working,
                    },
                    WriterStats::get(&stats.pending)
                )
            );
            shared.hurry.cancel();
            shared.wake.notify_one();
            let _ = tokio::time::timeout(rest, &mut all).await;
        }
        if let Some(sp) = &shared.spool {
            // Segment files deleted behind the spool's back hold nothing
            // for later: the summary must count them dropped, not spooled.
            if let Err(e) = sp.blocking(|s| s.forget_missing()).await {
                tracing::error!("spool check on stop failed: {e}");
            }
            if let Err(e) = sp.blocking(|s| s.sync()).await {
                tracing::error!("spool fsync on stop failed: {e}");
            }
            shared.refresh_spool_gauges();
        }
        match stats.pending.load(Ordering::Relaxed) {
            0 => Ok(()),
            left => Err(left),
        }
    }
}

impl Shared {
    fn log_warn(&self, what: impl FnOnce() -> String) {
        if let Ok(mut log) = self.log.lock() {
            crate::warn_limited!(log, what);
        }
    }

    fn spool_warn(&self, what: impl FnOnce() -> String) {
        if let Ok(mut log) = self.spool_log.lock() {
            crate::warn_limited!(log, what);
        }
    }

    /// Updates what the spool alarm is made of, and the alarm.
    fn spool_health(&self, f: impl FnOnce(&mut SpoolHealth)) {
        let mut h = match self.spool_health.lock() {
            Ok(h) => h,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut h);
        self.stats
            .spool_failing
            .store(h.append_failed || h.held > 0, Ordering::Relaxed);
    }

    fn done(&self, id: u64) {
        if let Ok(mut d) = self.durable.lock() {
            d.open.remove(&id);
        }
    }

    fn note_failure(&self, e: &WriteError) {
        let was = self.healthy.swap(false, Ordering::Relaxed);
        let now = (self.started.elapsed().as_millis() as u64).max(1);
        let _ = self.stats.failing_since_ms.compare_exchange(
            0,
            now,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        if let Ok(mut last) = self.stats.last_error.lock() {
            *last = Some(e.to_string());
        }
        let human = matches!(
            e,
            WriteError::Auth(_) | WriteError::Missing(_) | WriteError::NotInfluxDb(_)
        );
        self.stats.needs_human.store(human, Ordering::Relaxed);
        let spooling = if self.spool.is_some() {
            "; spooling to disk until it recovers"
        } else {
            ""
        };
        if was || human {
            if human {
                tracing::error!("InfluxDB write failed and needs attention: {e}{spooling}");
            } else {
                tracing::warn!("InfluxDB write failed: {e}{spooling}");
            }
        } else {
            self.log_warn(|| format!("InfluxDB still failing: {e}"));
        }
    }

    fn note_success(&self) {
        if !self.healthy.swap(true, Ordering::Relaxed) {
            self.stats.failing_since_ms.store(0, Ordering::Relaxed);
            self.stats.needs_human.store(false, Ordering::Relaxed);
            // What the spool could not take during the outage now goes to
            // InfluxDB; until the spool is needed again (and fails again),
            // "SPOOL FAILING" would be a stale alarm. Only a successful
            // append cleared it, and while InfluxDB is healthy there is none.
            // Batches still held in memory keep it until they are written.
            self.spool_health(|h| h.append_failed = false);
            tracing::info!(
                "InfluxDB writes succeed again; {} spooled points to replay",
                WriterStats::get(&self.stats.spool_points)
            );
            self.wake.notify_one();
        }
    }

    fn refresh_spool_gauges(&self) {
        if let Some(sp) = &self.spool {
            sp.with(|s| self.copy_spool_gauges(s));
        }
    }

    fn copy_spool_gauges(&self, s: &Spool) {
        let st = &self.stats;
        st.note_spool_size(s.points(), s.bytes());
        self.spool_unread
            .store(s.unread_points(), Ordering::Relaxed);
        st.dropped
            .store(s.counters.dropped_points, Ordering::Relaxed);
        st.spool_damaged
            .store(s.counters.damaged_records, Ordering::Relaxed);
        st.spool_uncounted_bytes
            .store(s.counters.uncounted_bytes, Ordering::Relaxed);
    }

    fn replay_available(&self) -> bool {
        let Some(sp) = &self.spool else { return false };
        if self.closing.is_cancelled() {
            return false;
        }
        if !self.healthy.load(Ordering::Relaxed) && self.probing.load(Ordering::Relaxed) {
            return false;
        }
        let _ = sp;
        self.spool_unread.load(Ordering::Relaxed) > 0
    }

    async fn take_replay(self: &Arc<Self>) -> Option<Work> {
        let sp = self.spool.as_ref()?;
        let probe = !self.healthy.load(Ordering::Relaxed);
        if probe && self.probing.swap(true, Ordering::Relaxed) {
            return None;
        }
        let me = self.clone();
        let next = sp
            .blocking(move |s| {
                let r = s.next_record();
                me.copy_spool_gauges(s);
                r
            })
            .await;
        match next {
            Ok(Some(rec)) => Some(Work::Replay(rec, probe)),
            Ok(None) => {
                if probe {
                    self.probing.store(false, Ordering::Relaxed);
                }
                None
            }
            Err(e) => {
                if probe {
                    self.probing.store(false, Ordering::Relaxed);
                }
                self.spool_warn(|| format!("cannot read the spool: {e}"));
                None
            }
        }
    }

    /// The next thing to write: live and spooled work alternate when both
    /// wait. `None` once the pool is closed and the queue is empty.
    async fn pick(self: &Arc<Self>) -> Option<Work> {
        let mut p = self.picker.lock().await;
        loop {
            let replay = self.replay_available();
            let order = if p.prefer_live || !replay {
                [true, false]
            } else {
                [false, true]
            };
            for live in order {
                if live {
                    match p.rx.try_recv() {
                        Ok(item) => {
                            self.stats.queued_batches.fetch_sub(1, Ordering::Relaxed);
                            p.prefer_live = false;
                            return Some(Work::Live(item));
                        }
                        Err(mpsc::error::TryRecvError::Disconnected) => p.closed = true,
                        Err(mpsc::error::TryRecvError::Empty) => {}
                    }
                } else if replay {
                    if let Some(w) = self.take_replay().await {
                        p.prefer_live = true;
                        return Some(w);
                    }
                }
            }
            if p.closed {
                return None;
            }
            let closed = p.closed;
            tokio::select! {
                r = p.rx.recv(), if !closed => match r {
                    Some(item) => {
                        self.stats.queued_batches.fetch_sub(1, Ordering::Relaxed);
                        p.prefer_live = false;
                        return Some(Work::Live(item));
                    }
                    None => p.closed = true,
                },
                _ = self.wake.notified() => {}
                // A safety net: health and spool state are re-read anyway.
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    async fn deliver_live(self: &Arc<Self>, item: Item) {
        let Item { id, rp, piece } = item;
        let mut left = vec![piece];
        let go_direct = self.healthy.load(Ordering::Relaxed) && !self.hurry.is_cancelled();
        if self.spool.is_none() || go_direct {
            left = self.write_held(rp, left).await;
            if left.is_empty() {
                self.done(id);
                return;
            }
        }
        if self.spool.is_some() {
            left = self.spool_pieces(rp, left).await;
        }
        if !left.is_empty() {
            self.retry_in_memory(rp, left).await;
        }
        self.done(id);
    }

    /// Points neither InfluxDB nor the spool took: retried with backoff in
    /// memory until one of them does. With a spool, each round offers them
    /// to the spool too: a disk that refused them (full, failing) may work
    /// again, and once it takes them they are safe (replay writes them), the
    /// batch stops holding back the safe position (`durable_below`) and a
    /// stop has nothing left to lose. Retrying only InfluxDB kept them in
    /// memory as long as InfluxDB was down, however long ago the disk
    /// recovered, and a stop then lost them. While InfluxDB is failing the
    /// spool goes first (it is local and quick); while it is healthy,
    /// InfluxDB does, so a broken disk is not asked in vain.
    ///
    /// At the stop deadline they get one last offer to the spool (forced
    /// past its size limit, like everything else a stop spools); what it
    /// still refuses stays counted as pending: lost.
    async fn retry_in_memory(self: &Arc<Self>, rp: &'static str, mut left: Vec<Piece>) {
        let held = self.spool.is_some();
        if held {
            self.spool_health(|h| h.held += 1);
        }
        let mut written = false;
        let mut delay = self.retry_min;
        loop {
            let jitter = rand::thread_rng().gen_range(0.5..1.0);
            let hurry = tokio::select! {
                _ = tokio::time::sleep(delay.mul_f64(jitter)) => false,
                _ = self.hurry.cancelled() => true,
            };
            delay = (delay * 2).min(self.retry_max);
            let influx_first = !hurry && self.healthy.load(Ordering::Relaxed);
            if influx_first {
                left = self.write_held(rp, left).await;
                if left.is_empty() {
                    written = true;
                    break;
                }
            }
            if held {
                let points: usize = left.iter().map(|p| p.points).sum();
                left = self.spool_pieces(rp, left).await;
                if left.is_empty() {
                    tracing::info!(
                        "spooled {points} points held in memory since the spool refused them"
                    );
                    break;
                }
            }
            if hurry {
                break;
            }
            if !influx_first {
                left = self.write_held(rp, left).await;
                if left.is_empty() {
                    written = true;
                    break;
                }
            }
        }
        if held {
            // Written, they no longer need the spool: its refusals are no
            // alarm until it is needed (and fails) again, as in
            // `note_success` (this loop's own offers may have renewed them).
            self.spool_health(|h| {
                h.held = h.held.saturating_sub(1);
                if written {
                    h.append_failed = false;
                }
            });
        }
    }

    /// Offers each piece to the spool; returns those it refused.
    async fn spool_pieces(self: &Arc<Self>, rp: &str, left: Vec<Piece>) -> Vec<Piece> {
        let mut kept = Vec::new();
        for piece in left {
            if let Err(p) = self.spool_piece(rp, piece).await {
                kept.push(p);
            }
        }
        kept
    }

    /// One InfluxDB attempt; returns what is left.
    async fn write_held(&self, rp: &str, left: Vec<Piece>) -> Vec<Piece> {
        let out = self.write_resolving(rp, left).await;
        self.stats
            .pending
            .fetch_sub((out.written + out.dead) as u64, Ordering::Relaxed);
        match out.failed {
            None => {
                self.note_success();
                Vec::new()
            }
            Some((e, rest)) => {
                self.note_failure(&e);
                rest
            }
        }
    }

    async fn deliver_replay(self: &Arc<Self>, rec: Record, probe: bool) {
        let (segment, points) = (rec.segment, rec.points);
        let rp = rec.rp;
        let mut left = vec![Piece {
            lines: rec.lines.into(),
            points: points as usize,
        }];
        let mut delay = self.retry_min;
        loop {
            let out = self.write_resolving(&rp, left).await;
            self.stats
                .replayed
                .fetch_add(out.written as u64, Ordering::Relaxed);
            match out.failed {
                None => {
                    if probe {
                        self.probing.store(false, Ordering::Relaxed);
                    }
                    self.note_success();
                    if let Some(sp) = &self.spool {
                        let me = self.clone();
                        let r = sp
                            .blocking(move |s| {
                                let r = s.ack(segment, points);
                                me.copy_spool_gauges(s);
                                r
                            })
                            .await;
                        if let Err(e) = r {
                            self.spool_warn(|| {
                                format!("cannot delete a replayed spool segment: {e}")
                            });
                        }
                        sp.room.notify_waiters();
                    }
                    self.wake.notify_one();
                    return;
                }
                Some((e, rest)) => {
                    self.note_failure(&e);
                    left = rest;
                }
            }
            let jitter = rand::thread_rng().gen_range(0.5..1.0);
            let stop = tokio::select! {
                _ = tokio::time::sleep(delay.mul_f64(jitter)) => false,
                _ = self.closing.cancelled() => true,
            };
            if stop {
                // What is left stays on disk for the next start.
                self.keep_rest(segment, points, &rp, &left).await;
                if probe {
                    self.probing.store(false, Ordering::Relaxed);
                }
                return;
            }
            delay = (delay * 2).min(self.retry_max);
        }
    }

    /// A replayed record the stop interrupts: when InfluxDB wrote or
    /// refused part of it, only the rest (`left`) may stay spooled, or the
    /// stop summary counts that part twice and the next start sends it
    /// again (see [`Spool::release_rest`]).
    async fn keep_rest(self: &Arc<Self>, segment: u64, points: u32, rp: &str, left: &[Piece]) {
        let Some(sp) = &self.spool else { return };
        let rest_points: usize = left.iter().map(|p| p.points).sum();
        if rest_points >= points as usize {
            sp.with(|s| s.release(segment, points));
            return;
        }
        // One record: a piece may end without a newline (the record's
        // last line), and the next must not run on from it.
        let mut rest = Vec::with_capacity(left.iter().map(|p| p.lines.len() + 1).sum());
        for p in left {
            if !rest.is_empty() && !rest.ends_with(b"\n") {
                rest.push(b'\n');
            }
            rest.extend_from_slice(&p.lines);
        }
        let (me, rp) = (self.clone(), rp.to_string());
        let kept = sp
            .blocking(move |s| {
                let r = s.release_rest(segment, points, &rp, rest_points as u32, &rest);
                me.copy_spool_gauges(s);
                r
            })
            .await;
        match kept {
            Ok(Kept::Rest) => {}
            Ok(Kept::Whole {
                delivered_too,
                error,
            }) => {
                self.stats
                    .spool_delivered_too
                    .fetch_add(delivered_too, Ordering::Relaxed);
                self.spool_warn(|| {
                    format!(
                        "cannot spool the {rest_points} undelivered points of a replayed record ({error}); \
                         the whole record stays spooled, {delivered_too} points already written or refused with it"
                    )
                });
            }
            Err(e) => {
                self.spool_warn(|| format!("spool, keeping the rest of a replayed record: {e}"))
            }
        }
    }

    /// Appends to the spool, waiting for room under the block policy (not
    /// once the stop deadline is near). Gives the piece back on a disk error.
    async fn spool_piece(self: &Arc<Self>, rp: &str, piece: Piece) -> Result<(), Piece> {
        let Some(sp) = self.spool.clone() else {
            return Err(piece);
        };
        let piece_points = piece.points;
        let mut piece = piece;
        let mut waited = false;
        loop {
            let room = sp.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            let force =
                self.hurry.is_cancelled() || self.stopping.get().is_some_and(|t| t.is_cancelled());
            let me = self.clone();
            let rp_owned = rp.to_string();
            let r = tokio::task::spawn_blocking(move || {
                let r = me.spool.as_ref().map(|sp| {
                    sp.with(|s| {
                        let r = s.append(&rp_owned, piece.points as u32, &piece.lines, force);
                        me.copy_spool_gauges(s);
                        r
                    })
                });
                (r, piece)
            })
            .await;
            let (r, back) = match r {
                Ok((Some(r), back)) => (r, back),
                Ok((None, back)) => return Err(back),
                Err(join) => {
                    // A bug (a panic in the spool code): the piece went down
                    // with the task. Say so loudly, and do not count it as
                    // pending forever, which would only make every stop fail.
                    tracing::error!("spool task failed, batch lost: {join}");
                    self.spool_health(|h| h.append_failed = true);
                    self.stats
                        .pending
                        .fetch_sub(piece_points as u64, Ordering::Relaxed);
                    return Ok(());
                }
            };
            piece = back;
            match r {
                Ok(Appended::Stored { dropped }) => {
                    self.spool_health(|h| h.append_failed = false);
                    self.stats
                        .spooled
                        .fetch_add(piece.points as u64, Ordering::Relaxed);
                    self.stats
                        .pending
                        .fetch_sub(piece.points as u64, Ordering::Relaxed);
                    if dropped > 0 {
                        self.spool_warn(|| {
                            format!("spool full: dropped the oldest {dropped} spooled point(s) (when_full = drop-oldest)")
                        });
                    }
                    self.wake.notify_one();
                    return Ok(());
                }
                Ok(Appended::Full) => {
                    if let Some(l) = self.liveness.get() {
                        l.beat();
                    }
                    if !waited {
                        waited = true;
                        self.stats.spool_full.fetch_add(1, Ordering::Relaxed);
                        self.spool_warn(|| {
                            format!(
                                "spool full ({} bytes): intake waits for replay to make room (when_full = block)",
                                WriterStats::get(&self.stats.spool_bytes)
                            )
                        });
                    }
                    let stopping = self.stopping.get().cloned().unwrap_or_default();
                    tokio::select! {
                        _ = room => {}
                        _ = self.hurry.cancelled() => {}
                        _ = stopping.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                Err(e) => {
                    self.spool_health(|h| h.append_failed = true);
                    self.spool_warn(|| format!("cannot spool {} points: {e}", piece.points));
                    return Err(piece);
                }
            }
        }
    }

    /// Writes pieces, splitting refused ones and dead-lettering what
    /// InfluxDB refuses point by point. Stops at the first failure that is
    /// not about the content, returning what is left.
    async fn write_resolving(&self, rp: &str, pieces: Vec<Piece>) -> Outcome {
        let mut work: Vec<Piece> = pieces.into_iter().rev().collect();
        let mut out = Outcome::default();
        while let Some(pc) = work.pop() {
            match self.write_once(rp, &pc).await {
                Ok(()) => out.written += pc.points,
                Err(e @ (WriteError::Rejected(_) | WriteError::TooLarge)) => {
                    let msg = match &e {
                        WriteError::Rejected(m) => m.as_str(),
                        _ => "",
                    };
                    if pc.points <= 1 || dropped_count(msg) == Some(pc.points) {
                        // InfluxDB refused every point of this piece.
                        self.dead_letter(rp, &pc, &e);
                        out.dead += pc.points;
                    } else if let Some((bad, good)) = set_apart_conflict(&pc, msg) {
                        work.push(good);
                        work.push(bad);
                    } else {
                        let (l, r) = split(&pc);
                        work.push(r);
                        work.push(l);
                    }
                }
                Err(e) => {
                    work.push(pc);
                    work.reverse();
                    out.failed = Some((e, work));
                    return out;
                }
            }
        }
        out
    }

    async fn write_once(&self, rp: &str, pc: &Piece) -> Result<(), WriteError> {
        let t0 = Instant::now();
        let r = tokio::select! {
            r = self.client.write(rp, pc.lines.clone()) => r,
            _ = self.hurry.cancelled() => Err(WriteError::Transient("stopping: write abandoned".into())),
        };
        match &r {
            Ok(()) => {
                self.stats
                    .latency_us
                    .store(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
                self.stats
                    .written
                    .fetch_add(pc.points as u64, Ordering::Relaxed);
            }
            Err(_) => {
                self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }

    /// Appends refused points to the dead-letter file, and counts them by
    /// what happened: kept there, or (the file could not be written) lost.
    /// Counting them first and only logging a failed write had the stop
    /// summary say they were in a file that did not exist.
    fn dead_letter(&self, rp: &str, pc: &Piece, e: &WriteError) {
        use std::io::Write;
        let r = (|| -> std::io::Result<()> {
            if let Some(dir) = self.dead_letter.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.dead_letter)?;
            let reason = e.to_string().replace('\n', " ");
            let at = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
            writeln!(f, "# {at} rp={rp} points={} reason: {reason}", pc.points)?;
            f.write_all(&pc.lines)?;
            f.sync_data()
        })();
        match r {
            Ok(()) => {
                self.stats
                    .dead_lettered
                    .fetch_add(pc.points as u64, Ordering::Relaxed);
                self.log_warn(|| {
                    format!(
                        "{} point(s) refused by InfluxDB, kept in {}: {e}",
                        pc.points,
                        self.dead_letter.display()
                    )
                });
            }
            Err(io) => {
                self.stats
                    .refused_lost
                    .fetch_add(pc.points as u64, Ordering::Relaxed);
                // Rate-limited with the dead-letter WARNs (one per refused
                // batch was 64 ERRORs in a minute); an ERROR all the same.
                if let Ok(mut log) = self.log.lock() {
                    if let Some(held) = log.admit() {
                        let more = if held > 0 {
                            format!(" ({held} similar messages suppressed)")
                        } else {
                            String::new()
                        };
                        tracing::error!(
                            "{} point(s) refused by InfluxDB are lost: cannot write the dead-letter file {} \
                             ({io}; make its directory writable); InfluxDB said: {e}{more}",
                            pc.points,
                            self.dead_letter.display()
                        );
                    }
                }
            }
        }
    }
}

#[derive(Default)]
struct Outcome {
    written: usize,
    dead: usize,
    failed: Option<(WriteError, Vec<Piece>)>,
}

/// `dropped=N` at the end of InfluxDB 1.x's partial-write message.
fn dropped_count(msg: &str) -> Option<usize> {
    let at = msg.rfind("dropped=")?;
    let digits: String = msg[at + 8..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// For `field type conflict: input field "F" on measurement "M" ...`: the
/// lines of `M` carrying field `F` (the suspects) and the rest, when both
/// are non-empty. One round trip then settles a whole class of points.
fn set_apart_conflict(pc: &Piece, msg: &str) -> Option<(Piece, Piece)> {
    let field = between(msg, "input field \"", "\"")?;
    let meas = between(msg, "on measurement \"", "\"")?;
    let (mut bad, mut good) = ((Vec::new(), 0), (Vec::new(), 0));
    for line in pc.lines.split_inclusive(|b| *b == b'\n') {
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let target = if line_has(line, meas.as_bytes(), field.as_bytes()) {
            &mut bad
        } else {
            &mut good
        };
        target.0.extend_from_slice(line);
        target.1 += 1;
    }
    let piece = |(lines, points): (Vec<u8>, usize)| Piece {
        lines: lines.into(),
        points,
    };
    (bad.1 > 0 && good.1 > 0).then(|| (piece(bad), piece(good)))
}

fn between<'a>(s: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let start = s.find(open)? + open.len();
    let len = s[start..].find(close)?;
    Some(&s[start..start + len])
}

/// Does this line belong to `meas` and carry the field `field`?
fn line_has(line: &[u8], meas: &[u8], field: &[u8]) -> bool {
    if !(line.starts_with(meas) && matches!(line.get(meas.len()), Some(b',') | Some(b' '))) {
        return false;
    }
    // The field set starts after the first unescaped space.
    let mut i = meas.len();
    let mut esc = false;
    while i < line.len() {
        match line[i] {
            b'\\' if !esc => esc = true,
            b' ' if !esc => break,
            _ => esc = false,
        }
        i += 1;
    }
    let fields = &line[(i + 1).min(line.len())..];
    let mut key = Vec::with_capacity(field.len() + 2);
    key.extend_from_slice(field);
    key.push(b'=');
    fields.starts_with(&key) || {
        let mut k2 = vec![b','];
        k2.extend_from_slice(&key);
        fields.windows(k2.len()).any(|w| w == k2.as_slice())
    }
}

/// Splits a piece in two at a line boundary.
fn split(b: &Piece) -> (Piece, Piece) {
    let half = b.points / 2;
    let mut cut = 0;
    let mut seen = 0;
    for (i, c) in b.lines.iter().enumerate() {
        if *c == b'\n' {
            seen += 1;
            if seen == half {
                cut = i + 1;
                break;
            }
        }
    }
    (
        Piece {
            lines: b.lines.slice(..cut),
            points: half,
        },
        Piece {
            lines: b.lines.slice(cut..),
            points: b.points - half,
        },
    )
}

/// The spool as the stop deadline finds it.
#[derive(Clone, Copy)]
enum StopSpool {
    None,
    /// Its last append failed (a full or broken disk).
    Failing,
    Working,
}

/// What the stop deadline does to the points still in memory: with a
/// working spool they go to disk; without one they are lost; with a failing
/// one they are tried, and what it refuses is lost. The log must not
/// promise more (the final summary counts what was lost).
fn abandon_note(spool: StopSpool, points: u64) -> String {
    match spool {
        StopSpool::Working => format!("stop deadline near: abandoning writes to InfluxDB, spooling {points} points still in memory"),
        StopSpool::Failing => format!("stop deadline near: abandoning writes to InfluxDB; trying to spool {points} points still in memory, but the spool is failing: what it refuses is lost"),
        StopSpool::None => format!("stop deadline near: abandoning writes to InfluxDB; no spool, so {points} points still in memory will be lost"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::spool::{Fsync, SpoolOptions};

    /// A pool whose InfluxDB is absent (nothing listens on its port) and
    /// whose spool needs a new segment file for every record, so that
    /// moving the spool directory away makes every append fail and moving
    /// it back makes them work: a disk that refuses data for a while.
    struct Rig {
        _tmp: tempfile::TempDir,
        dir: PathBuf,
        away: PathBuf,
        pool: WriterPool,
    }

    impl Rig {
        fn new(retry_min: Duration) -> Rig {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("spool");
            let away = tmp.path().join("away");
            let (spool, _) = Spool::open(SpoolOptions {
                dir: dir.clone(),
                max_bytes: 1 << 30,
                segment_bytes: 1,
                fsync: Fsync::Batch,
                when_full: crate::config::WhenFull::Block,
            })
            .unwrap();
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let cfg = InfluxConfig {
                url: format!("http://127.0.0.1:{port}"),
                concurrency: 1,
                retry_min,
                retry_max: retry_min,
                ..Default::default()
            };
            let pool = WriterPool::start_with_spool(
                InfluxClient::new(&cfg).unwrap(),
                &cfg,
                4,
                tmp.path().join("dead-letter.lp"),
                Some(SharedSpool::new(spool)),
            );
            pool.set_healthy(Err(WriteError::Transient("absent".into())));
            Rig {
                _tmp: tmp,
                dir,
                away,
                pool,
            }
        }

        fn disk_fails(&self) {
            std::fs::rename(&self.dir, &self.away).unwrap();
        }

        fn disk_works(&self) {
            std::fs::rename(&self.away, &self.dir).unwrap();
        }

        fn held(&self) -> u64 {
            self.pool.shared.spool_health.lock().unwrap().held
        }

        /// Waits (bounded) for `f`; false if it never held.
        async fn until(&self, mut f: impl FnMut(&Rig) -> bool) -> bool {
            for _ in 0..1000 {
                if f(self) {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            f(self)
        }

        /// Stops the pool (2 s deadline); what it returned, and the points
        /// the spool then holds on disk.
        async fn close_and_reopen(self) -> (Result<(), u64>, u64) {
            let opts = self
                .pool
                .shared
                .spool
                .as_ref()
                .map(|sp| sp.with(|s| s.options().clone()))
                .unwrap();
            let closed = self.pool.close(Duration::from_secs(2)).await;
            let (_, rec) = Spool::open(opts).unwrap();
            (closed, rec.points)
        }
    }

    fn batch(tag: &str) -> Batch {
        Batch {
            rp: "default",
            lines: (0..10)
                .map(|i| format!("m,t={tag} v={i}i {i}\n"))
                .collect::<String>()
                .into_bytes(),
            points: 10,
        }
    }

    /// A batch the spool refused once, with InfluxDB down: once the disk
    /// works again it is spooled (not kept in memory until InfluxDB
    /// returns), so it is safe, the safe position moves past it and the
    /// alarm ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_the_spool_refused_is_spooled_once_the_disk_works_again() {
        let rig = Rig::new(Duration::from_millis(20));
        rig.disk_fails();
        rig.pool.submit(batch("a")).await;
        assert!(rig.until(|r| r.held() == 1).await, "the batch is held");
        assert!(rig.pool.stats.spool_failing.load(Ordering::Relaxed));
        assert_eq!(rig.pool.durable_below(), 0);
        rig.disk_works();
        assert!(
            rig.until(|r| r.pool.durable_below() == 1).await,
            "the refused batch never became safe: {} points still in memory, {} spooled",
            WriterStats::get(&rig.pool.stats.pending),
            WriterStats::get(&rig.pool.stats.spooled),
        );
        assert_eq!(WriterStats::get(&rig.pool.stats.pending), 0);
        assert_eq!(WriterStats::get(&rig.pool.stats.spooled), 10);
        assert!(!rig.pool.stats.spool_failing.load(Ordering::Relaxed));
        assert_eq!(rig.close_and_reopen().await, (Ok(()), 10));
    }

    /// A stop before the next retry: the stop spools the held batch (the
    /// disk works by then) instead of counting it lost; until then the
    /// alarm stays on, although later batches are spooled fine.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_spools_a_batch_the_spool_refused_earlier() {
        let rig = Rig::new(Duration::from_secs(600));
        rig.disk_fails();
        rig.pool.submit(batch("a")).await;
        assert!(rig.until(|r| r.held() == 1).await, "the batch is held");
        rig.disk_works();
        rig.pool.submit(batch("b")).await;
        assert_eq!(WriterStats::get(&rig.pool.stats.spooled), 10);
        assert!(
            rig.pool.stats.spool_failing.load(Ordering::Relaxed),
            "10 points are still only in memory: SPOOL FAILING stays"
        );
        let stats = rig.pool.stats.clone();
        assert_eq!(rig.close_and_reopen().await, (Ok(()), 20));
        assert_eq!(WriterStats::get(&stats.pending), 0);
        assert_eq!(WriterStats::get(&stats.spooled), 20);
        assert_eq!(WriterStats::get(&stats.spool_points), 20);
        assert!(!stats.spool_failing.load(Ordering::Relaxed));
    }

    #[test]
    fn the_stop_note_promises_spooling_only_with_a_working_spool() {
        assert!(abandon_note(StopSpool::Working, 7).contains(", spooling 7 points"));
        let failing = abandon_note(StopSpool::Failing, 27798);
        assert!(
            failing.contains("trying to spool 27798 points")
                && failing.contains("the spool is failing"),
            "{failing}"
        );
        let none = abandon_note(StopSpool::None, 2003);
        assert!(!none.contains("spooling"), "{none}");
        assert!(
            none.contains("2003 points still in memory will be lost"),
            "{none}"
        );
    }

    #[test]
    fn split_keeps_every_line() {
        let b = Piece {
            lines: Bytes::from_static(b"a\nb\nc\n"),
            points: 3,
        };
        let (l, r) = split(&b);
        assert_eq!((l.lines.as_ref(), l.points), (&b"a\n"[..], 1));
        assert_eq!((r.lines.as_ref(), r.points), (&b"b\nc\n"[..], 2));
    }

    #[test]
    fn a_field_type_conflict_sets_its_lines_apart() {
        let pc = Piece {
            lines: b"kraken_tick,instrument=A bid=1.0,ask=2.0 1\n\
kraken_orders,instrument=A price=3.0 2\n\
kraken_tick,instrument=B\\ x ask=2.0 3\n\
kraken_tick,instrument=C last=1.0,bid=4.0 4\n"
                .to_vec()
                .into(),
            points: 4,
        };
        let msg = "partial write: field type conflict: input field \"bid\" on measurement \"kraken_tick\" is type float, already exists as type integer dropped=2";
        assert_eq!(dropped_count(msg), Some(2));
        let (bad, good) = set_apart_conflict(&pc, msg).unwrap();
        assert_eq!(bad.points, 2);
        assert_eq!(
            bad.lines.as_ref(),
            b"kraken_tick,instrument=A bid=1.0,ask=2.0 1\nkraken_tick,instrument=C last=1.0,bid=4.0 4\n"
        );
        assert_eq!(good.points, 2);
        assert!(set_apart_conflict(&pc, "unable to parse 'x'").is_none());
        assert_eq!(dropped_count("unable to parse"), None);
    }
}
