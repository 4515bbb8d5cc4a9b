//! The subscriber role: bus in, InfluxDB out, every message accounted for.
//!
//! One task per endpoint reads its SUB socket into a bounded channel (so one
//! silent publisher cannot hold up the others); the intake loop decodes,
//! counts gaps, maps through the schema into per-RP batches; the writer pool
//! delivers them. When InfluxDB is down, slow or refusing access, batches go
//! to the subscriber's disk spool and are replayed when it is back (see
//! [`crate::sink::writer`]); only a full spool under `when_full = "block"`
//! makes the intake wait, and then the bus backs up to the publisher.
//! Nothing that was accepted is dropped.
//!
//! Readiness does not wait for InfluxDB when the spool is usable. After a
//! crash the gap tracker resumes from the last safe position, so what the
//! crash lost is reported as a gap (see `Watermark`).
//!
//! On a stop: the sockets close first, every message already received is
//! still processed, the open batches are flushed, and the writers get until
//! `service.stop_timeout` to deliver; what they cannot is spooled.

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bus::{self, GapTracker};
use crate::config::{Config, SubscriberConfig};
use crate::exit::{Failure, TEMPFAIL};
use crate::service::Service;
use crate::sink::batch::Batcher;
use crate::sink::influx::InfluxClient;
use crate::sink::line::LineEncoder;
use crate::sink::spool::{Spool, SpoolOptions};
use crate::sink::writer::{SharedSpool, WriterPool, WriterStats};
use crate::sink::RateLimitedLog;
use crate::wire::{now_ns, Envelope, Value};
use crate::zmtp::sub::{self, Chunk, Message, SubEvent};

/// Chunks (whole messages as read, up to ~64 KiB each) waiting for the
/// intake: a bound of ~16 MiB per subscriber. While intake waits for a
/// full spool (`when_full = "block"`), the readers keep taking what the
/// publishers send, up to this bound, so a publisher that ends meanwhile
/// does not leave it in socket buffers that a stop then closes. At 8
/// chunks the e2e bench's peak RSS was 10 MiB lower (88.6 against 98.8
/// MiB, same CPU per point), but the blocked subscriber in
/// `tests/spool.rs` kept 3,521 of 5,000 messages.
const RAW_CHUNKS: usize = 256;
/// When the second `nbpy_pipeline` report is due (see `run`).
const EARLY_REPORT: Duration = Duration::from_secs(2);
/// How often the gap tracker forgets epochs not heard since the last time
/// ([`GapTracker::forget_idle`]): what a restart replaced stays this long
/// for a late (or second live) publisher of it to be recognised, and no
/// longer, so saved positions do not pile up old epochs.
const FORGET_IDLE: Duration = Duration::from_secs(600);

/// The subscriber's own counters (see also [`WriterStats`]).
#[derive(Default, Debug)]
pub struct IntakeStats {
    pub received: AtomicU64,
    pub accepted: AtomicU64,
    pub malformed: AtomicU64,
    pub gaps: AtomicU64,
    /// Publishers connected now.
    pub connected: AtomicU64,
    /// Connections ever made: readiness latches on the first, because a
    /// publisher can connect, send and leave before the gauge is looked at.
    pub connections: AtomicU64,
    /// Publishers that restarted while this subscriber was down (their
    /// first message after a resume was of a new epoch): the old epoch's
    /// messages after the last safe position that were not stored are lost
    /// and cannot be counted, so `gaps` is short by an unknown amount for
    /// each. Said in STATUS and the stop summary so the loss is not silent.
    pub restarts_unknown_loss: AtomicU64,
    /// Publisher names found shared by two live publishers (one config
    /// deployed twice, or a standby left running): their streams are
    /// counted apart, but which of them a stored point came from is only
    /// in its `epoch`, so someone should look. Said in STATUS and the stop
    /// summary.
    pub shared_names: AtomicU64,
    /// `nbpy_pipeline` points about itself handed to the writers: they are
    /// written (or spooled, dropped…) like accepted messages, so the stop
    /// summary's balance needs them.
    pub reports: AtomicU64,
}

/// Runs [`run`] on one thread, for `nbpy-subscriber` and `nbpy subscriber`:
/// intake, the readers and the writers hand work to each other without
/// cross-thread wake-ups; fsyncs and gzip go to the blocking pool. Against
/// the multi-threaded runtime, over 30 paired e2e runs: CPU per point -3%,
/// peak RSS -9%, throughput the same.
pub fn serve(name: &str, cfg: &Config) -> Result<(), Failure> {
    crate::cli::block_on_current_thread(run(name, cfg))
}

pub async fn run(name: &str, cfg: &Config) -> Result<(), Failure> {
    let scfg = cfg
        .subscriber(name)
        .map_err(|e| Failure::config(anyhow::anyhow!(e)))?
        .clone();
    let client = InfluxClient::new(&cfg.influxdb)?;
    let dead_letter = cfg.state_dir.join("dead-letter").join(format!("{name}.lp"));
    // Points an earlier run left in the spool: this run delivers them too,
    // so the stop summary's balance counts them in.
    let mut spooled_at_start = 0;
    let spool = if scfg.spool.enabled {
        let (spool, points) = open_spool(name, cfg, &scfg)?;
        spooled_at_start = points;
        Some(spool)
    } else {
        None
    };
    let spooling = spool.is_some();
    // For the last report, which is written after the pool has closed.
    let report_spool = spool.clone();
    let pool = WriterPool::start_with_spool(
        client.clone(),
        &cfg.influxdb,
        scfg.queue_batches,
        dead_letter,
        spool,
    );
    let wstats = pool.stats.clone();
    let abandoned = {
        let w = wstats.clone();
        move || format!("{} unwritten points", w.pending.load(Ordering::Relaxed))
    };
    let svc = Service::start(name, scfg.stale_after, abandoned);
    pool.set_liveness(svc.liveness.clone());
    pool.set_stop_signal(svc.shutdown.clone());

    // Readiness: InfluxDB answers, or the spool can hold what it cannot take.
    let mut delay = Duration::from_millis(100);
    loop {
        match client.ping().await {
            Ok(()) => break,
            // Not a store at all: its /write would answer 2xx and keep
            // nothing, so neither writing nor spooling-then-replaying there
            // is safe. A configuration error, not an outage.
            Err(e @ crate::sink::influx::WriteError::NotInfluxDb(_)) => {
                return Err(Failure::new(
                    crate::exit::CONFIG,
                    anyhow::anyhow!("subscriber {name}: {e}"),
                ));
            }
            Err(e) if spooling => {
                tracing::warn!(
                    "subscriber {name}: InfluxDB at {} unreachable ({e}); spooling until it answers",
                    client.shown_url()
                );
                pool.set_healthy(Err(e));
                break;
            }
            Err(e) => {
                svc.status(&format!(
                    "waiting for InfluxDB at {}: {e}",
                    client.shown_url()
                ));
                tracing::warn!(
                    "subscriber {name}: waiting for InfluxDB at {}: {e}",
                    client.shown_url()
                );
                svc.liveness.beat();
                tokio::select! {
                    _ = svc.shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }

    let intake = Arc::new(IntakeStats::default());
    let (raw_tx, mut raw_rx) = mpsc::channel::<Chunk>(RAW_CHUNKS);
    let mut readers = Vec::new();
    let leave = CancellationToken::new();
    for ep in &scfg.connect {
        readers.push(tokio::spawn(read_endpoint(
            ep.clone(),
            scfg.topics.clone(),
            raw_tx.clone(),
            intake.clone(),
            leave.clone(),
        )));
    }
    drop(raw_tx);
    // Ready once data has somewhere to go and a publisher is connected.
    // STATUS once: it is a datagram to systemd, not for every poll.
    if intake.connections.load(Ordering::Relaxed) == 0 {
        svc.status(&format!(
            "waiting for publishers: {}",
            scfg.connect.join(", ")
        ));
    }
    while intake.connections.load(Ordering::Relaxed) == 0 {
        svc.liveness.beat();
        tokio::select! {
            _ = svc.shutdown.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    // Stopped while waiting: STOPPING=1 went out, READY=1 must not follow.
    if !svc.shutdown.is_cancelled() {
        svc.ready(&format!(
            "connected to {}/{} publishers, {} {}",
            intake.connected.load(Ordering::Relaxed),
            scfg.connect.len(),
            if pool.is_healthy() {
                "writing to"
            } else {
                "spooling while InfluxDB is unreachable at"
            },
            client.shown_url()
        ));
    }

    let mut st = Intake::new(name, &cfg.influxdb, intake.clone()).with_topics(&scfg.topics);
    if !gaps_countable(&scfg.topics) {
        tracing::info!(
            "subscriber {name}: topics {:?}: sequence gaps are not counted (seq numbers are per publisher, and a topic filter skips some of them by design)",
            scfg.topics
        );
    }
    let mut marks = Watermark::load(cfg.state_dir.join("seen").join(format!("{name}.json")));
    let exact = marks.clean_stop();
    for (publisher, epoch, seq) in marks.resumed() {
        st.gaps.resume(&publisher, epoch, seq, exact);
    }
    let mut last_cut = Instant::now();
    let mut last_forget = Instant::now();
    // Report at once, so health sees a live subscriber before the first
    // stats interval has passed.
    st.pipeline_point(name, &wstats, &pool, false).await;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut status = StatusClock::new();
    let shown = || Shown {
        svc: &svc,
        intake: &intake,
        wstats: &wstats,
        pool: &pool,
        scfg: &scfg,
    };
    let mut last_stats = Instant::now();
    // The second report comes early, past the first flush: until then the
    // stored counters are the start's zeros, which `nbpy status` showed
    // for a whole interval beside a subscriber writing thousands.
    let mut stats_every = scfg.stats_interval.min(EARLY_REPORT);
    loop {
        tokio::select! {
            biased;
            _ = svc.shutdown.cancelled() => break,
            // The tick first: under sustained load the bus is never empty,
            // and a biased select would otherwise starve flushing, STATUS
            // and the counters.
            _ = tick.tick() => {
                if last_cut.elapsed() >= cfg.influxdb.flush_interval {
                    // Every open batch goes, so the gap tracker's position
                    // now is covered by submitted batches: a checkpoint.
                    last_cut = Instant::now();
                    // At a low rate this is where batches are cut, so it is
                    // where intake waits for room: STATUS must keep coming.
                    let cut = async {
                        for b in st.batcher.due(true) {
                            pool.submit(b).await;
                        }
                    };
                    report_while_waiting(cut, &mut status, shown()).await;
                    if last_forget.elapsed() >= FORGET_IDLE {
                        last_forget = Instant::now();
                        st.gaps.forget_idle();
                    }
                    marks.checkpoint(pool.submitted(), st.gaps.positions());
                    marks.persist_safe(&pool).await;
                }
                pool.sync_spool(true).await;
                beat(&svc, &pool, &scfg);
                if status.due() {
                    status.send(&svc, &intake, &wstats, &scfg, None);
                }
                if last_stats.elapsed() >= stats_every {
                    last_stats = Instant::now();
                    stats_every = scfg.stats_interval;
                    let report = st.pipeline_point(name, &wstats, &pool, false);
                    report_while_waiting(report, &mut status, shown()).await;
                }
            }
            c = raw_rx.recv() => {
                let Some(c) = c else { break };
                let work = async {
                    st.process_chunk(&c, &pool).await;
                    svc.liveness.data();
                    // Drain a burst without going back through select.
                    for _ in 0..16 {
                        match raw_rx.try_recv() {
                            Ok(c) => st.process_chunk(&c, &pool).await,
                            Err(_) => break,
                        }
                    }
                };
                report_while_waiting(work, &mut status, shown()).await;
            }
        }
    }

    // Drain: every publisher is left cleanly (it stops sending to us and
    // counts what it sends later as sent to no subscriber), and everything
    // it sent before is processed. The readers end by themselves, within
    // LEAVE_TIMEOUT; the channel closes with the last of them.
    let t0 = Instant::now();
    leave.cancel();
    // A bound for readers blocked handing over a chunk while the writers
    // are slow; half the stop timeout, so flushing keeps the other half.
    let until = tokio::time::Instant::now()
        + (cfg.service.stop_timeout / 2).max(LEAVE_TIMEOUT + Duration::from_secs(1));
    loop {
        // Only the wait is cancelled, never a chunk being processed.
        let c = tokio::select! {
            c = raw_rx.recv() => c,
            _ = tokio::time::sleep_until(until) => {
                tracing::warn!("subscriber {name}: publishers not left within {:?}; stopped reading", until - tokio::time::Instant::from_std(t0));
                for r in &readers {
                    r.abort();
                }
                None
            }
        };
        match c {
            Some(c) => st.process_chunk(&c, &pool).await,
            None => break,
        }
    }
    for r in readers {
        let _ = r.await;
    }
    while let Ok(c) = raw_rx.try_recv() {
        st.process_chunk(&c, &pool).await;
    }
    for b in st.batcher.due(true) {
        pool.submit(b).await;
    }
    svc.stopping(&format!(
        "flushing {} points",
        wstats.pending.load(Ordering::Relaxed)
    ));
    let left = cfg.service.stop_timeout.saturating_sub(t0.elapsed());
    let result = pool
        .close(left.saturating_sub(final_report_time(left)))
        .await;
    // The last report says the stop was deliberate: without it, health
    // would show a subscriber that has just stopped as up until this
    // (fresh) report went stale. It goes after the writers are done, so
    // that it states the final counts, as the stop line does.
    // Its slice of the stop budget, not what is left: with InfluxDB hung
    // and nothing else to write, the report took the whole stop budget.
    st.final_report(
        name,
        &wstats,
        &client,
        report_spool.as_ref(),
        cfg.service
            .stop_timeout
            .saturating_sub(t0.elapsed())
            .min(final_report_time(left)),
    )
    .await;
    let summary = stop_summary(
        &intake,
        &wstats,
        spooled_at_start,
        &scfg,
        result.err().unwrap_or(0),
    );
    match result {
        Ok(()) => {
            // Everything accepted is written or spooled: the tracker's
            // position is exact.
            marks.persist(st.gaps.positions(), true).await;
            if summary.adds_up {
                tracing::info!(
                    "subscriber {name}: stopped in {:?}: {}",
                    t0.elapsed(),
                    summary.line
                );
            } else {
                tracing::error!(
                    "subscriber {name}: stopped in {:?}: {}",
                    t0.elapsed(),
                    summary.line
                );
            }
            Ok(())
        }
        Err(left) => {
            tracing::error!(
                "subscriber {name}: stopped in {:?}: {}",
                t0.elapsed(),
                summary.line
            );
            Err(Failure::new(
                TEMPFAIL,
                anyhow::anyhow!("subscriber {name}: stop timeout after {:?}: {left} points not written (InfluxDB: {})", t0.elapsed(), wstats.last_error.lock().ok().and_then(|e| e.clone()).unwrap_or_default()),
            ))
        }
    }
}

/// The stop summary: one line, and whether its balance holds.
struct Summary {
    line: String,
    adds_up: bool,
}

/// Names every outcome of the points this run handled, and checks they add
/// up: what came in (accepted messages, the subscriber's own
/// `nbpy_pipeline` points, and what an earlier run left in the spool) is
/// what went out (written, refused into the dead-letter file, dropped by
/// the spool, still spooled, or lost at a stop timeout). A line that leaves
/// an outcome out cannot be checked by its reader; one that does not add
/// up says so instead of passing for a clean account.
fn stop_summary(
    i: &IntakeStats,
    w: &WriterStats,
    spooled_at_start: u64,
    scfg: &SubscriberConfig,
    lost: u64,
) -> Summary {
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let (accepted, reports) = (n(&i.accepted), n(&i.reports));
    let (written, dead, dropped, spooled) = (
        n(&w.written),
        n(&w.dead_lettered),
        n(&w.dropped),
        n(&w.spool_points),
    );
    let refused_lost = n(&w.refused_lost);
    let mut line = format!("{accepted} accepted, {written} points written");
    if dead > 0 {
        line.push_str(&format!(", {dead} refused by InfluxDB (dead-letter file)"));
    }
    if refused_lost > 0 {
        line.push_str(&format!(
            ", {refused_lost} refused by InfluxDB and lost (the dead-letter file could not be written)"
        ));
    }
    // Spooled points this run also delivered are counted as delivered; the
    // line still says what the disk holds.
    let again = n(&w.spool_delivered_too).min(spooled);
    let already = if again > 0 {
        format!(
            "; {again} of them already written or refused, in a replayed record the disk \
             would not let the stop shorten: sent again at the next start"
        )
    } else {
        String::new()
    };
    line.push_str(&format!(
        ", {spooled} spooled for later ({} bytes{already}), {dropped} dropped",
        n(&w.spool_bytes)
    ));
    if dropped > 0 {
        let mut why = Vec::new();
        if scfg.spool.when_full == crate::config::WhenFull::DropOldest {
            why.push(
                "oldest spooled points deleted when the spool was full, when_full = drop-oldest"
                    .to_string(),
            );
        }
        if n(&w.spool_damaged) > 0 {
            why.push(format!("spool damage: {} cut(s)", n(&w.spool_damaged)));
        }
        if !why.is_empty() {
            line.push_str(&format!(" ({})", why.join("; ")));
        }
    }
    if lost > 0 {
        line.push_str(&format!(
            ", {lost} lost (neither written nor spooled by the stop timeout)"
        ));
    }
    line.push_str(&format!(
        ", {} malformed, {} gaps",
        n(&i.malformed),
        n(&i.gaps)
    ));
    let unknown = n(&i.restarts_unknown_loss);
    if unknown > 0 {
        line.push_str(&format!(
            ", {unknown} publisher restart(s) with uncounted loss"
        ));
    }
    line.push_str(&shared_names(i));
    let came = accepted + reports + spooled_at_start;
    let went = written + dead + refused_lost + dropped + spooled - again + lost;
    let terms = format!(
        "{accepted} accepted + {reports} own nbpy_pipeline points + {spooled_at_start} left in the spool by an earlier run \
         = written + refused{} + dropped + spooled{}{}",
        if refused_lost > 0 {
            " + refused and lost"
        } else {
            ""
        },
        if again > 0 {
            " - spooled but already written or refused"
        } else {
            ""
        },
        if lost > 0 { " + lost" } else { "" }
    );
    if came == went {
        line.push_str(&format!("; every point accounted for: {terms}"));
    } else {
        line.push_str(&format!(
            "; DOES NOT ADD UP: {terms} should hold, but {came} came in and {went} went out ({} point(s) unaccounted for)",
            came.abs_diff(went)
        ));
    }
    Summary {
        line,
        adds_up: came == went,
    }
}

fn beat(svc: &Service, pool: &WriterPool, scfg: &SubscriberConfig) {
    // The loop is alive; the writer is stuck only if it has been failing for
    // longer than stale_after. An idle bus is legitimately idle.
    match pool.failing_for() {
        Some(d) if d > scfg.stale_after => svc.liveness.set_idle(false),
        _ => {
            svc.liveness.set_idle(true);
            svc.liveness.data();
        }
    }
}

/// What STATUS is made of, borrowed from the main loop.
struct Shown<'a> {
    svc: &'a Service,
    intake: &'a IntakeStats,
    wstats: &'a WriterStats,
    pool: &'a WriterPool,
    scfg: &'a SubscriberConfig,
}

/// STATUS at most once a second (a datagram to systemd, not for every
/// tick), with the intake rate since the last one.
struct StatusClock {
    at: Instant,
    accepted: u64,
    /// Since when intake has been seen blocked (see [`report_while_waiting`]).
    blocked_since: Option<Instant>,
}

impl StatusClock {
    fn new() -> Self {
        StatusClock {
            at: Instant::now(),
            accepted: 0,
            blocked_since: None,
        }
    }

    fn due(&self) -> bool {
        self.at.elapsed() >= Duration::from_secs(1)
    }

    /// Sends STATUS; `blocked` says why intake is waiting, if it is.
    fn send(
        &mut self,
        svc: &Service,
        intake: &IntakeStats,
        wstats: &WriterStats,
        scfg: &SubscriberConfig,
        blocked: Option<&str>,
    ) {
        let acc = intake.accepted.load(Ordering::Relaxed);
        let rate = acc.saturating_sub(self.accepted) as f64 / self.at.elapsed().as_secs_f64();
        self.at = Instant::now();
        self.accepted = acc;
        let line = status_line(intake, wstats, rate, scfg);
        match blocked {
            Some(why) => {
                let since = *self.blocked_since.get_or_insert_with(Instant::now);
                svc.status(&format!(
                    "INTAKE BLOCKED for {}s: {why}; {line}",
                    since.elapsed().as_secs()
                ));
            }
            None => {
                self.blocked_since = None;
                svc.status(&line);
            }
        }
    }
}

/// Runs intake's `work` (handing messages to the writers) and keeps STATUS
/// current while it waits. `WriterPool::submit` waits for room in a full
/// spool (`when_full = "block"`) or, without a spool, in the writers'
/// queue, for as long as an outage lasts; the main loop's tick cannot run
/// meanwhile, and STATUS used to show the last healthy rate all along.
/// Only STATUS is sent from here (a datagram made from counters): flushing,
/// the checkpoint and the `nbpy_pipeline` point need the intake state that
/// `work` holds, and that point would wait for the same room anyway. Nothing
/// is read ahead here, so message order and the memory bound are unchanged.
/// The main loop's tick is left alone (taking it here would starve its
/// flushing under load, when `work` is pending at most ticks): a timer of
/// its own starts only once `work` has had to wait.
async fn report_while_waiting(
    work: impl std::future::Future<Output = ()>,
    status: &mut StatusClock,
    s: Shown<'_>,
) {
    tokio::pin!(work);
    // Read before the first poll: that poll can already find the spool
    // full and count it (the append on the blocking pool may be done by
    // the time its handle is polled), and only then wait.
    let full_before = s.wstats.spool_full.load(Ordering::Relaxed);
    if futures::poll!(&mut work).is_ready() {
        return;
    }
    let second = Duration::from_secs(1);
    let mut every = tokio::time::interval_at(tokio::time::Instant::now() + second, second);
    loop {
        tokio::select! {
            biased;
            () = &mut work => return,
            _ = every.tick() => {
                if !status.due() {
                    continue;
                }
                // `spool_full` counts each batch that found the spool full
                // and waited; one since `work` began, with `work` still
                // pending, is intake's own batch waiting.
                let why = if s.pool.has_spool() {
                    (s.wstats.spool_full.load(Ordering::Relaxed) > full_before).then_some(
                        "spool full (when_full = block), waiting for InfluxDB to take the replay and make room; the bus backs up to the publishers",
                    )
                } else {
                    (!s.pool.has_room()).then_some(
                        "the writers' queue is full (no spool; InfluxDB down or slower than the bus); the bus backs up to the publishers",
                    )
                };
                status.send(s.svc, s.intake, s.wstats, s.scfg, why);
            }
        }
    }
}

/// `", N publisher name(s) shared by two live publishers"`, for STATUS and
/// the stop summary; empty when there are none.
fn shared_names(i: &IntakeStats) -> String {
    match i.shared_names.load(Ordering::Relaxed) {
        0 => String::new(),
        n => format!(", {n} publisher name(s) shared by two live publishers"),
    }
}

fn status_line(i: &IntakeStats, w: &WriterStats, rate: f64, scfg: &SubscriberConfig) -> String {
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut gaps = if gaps_countable(&scfg.topics) {
        format!("{} gaps", n(&i.gaps))
    } else {
        "gaps not counted (topic filter)".to_string()
    };
    if n(&i.restarts_unknown_loss) > 0 {
        gaps.push_str(&format!(
            " + {} publisher restart(s) with uncounted loss",
            n(&i.restarts_unknown_loss)
        ));
    }
    let mut s = format!(
        "{rate:.0} msg/s, {} written, {gaps}, {} malformed, {}/{} publishers, {} queued",
        n(&w.written),
        n(&i.malformed),
        n(&i.connected),
        scfg.connect.len(),
        n(&w.pending),
    );
    s.push_str(&shared_names(i));
    if scfg.spool.enabled && (n(&w.spool_points) > 0 || n(&w.spooled) > 0) {
        s.push_str(&format!(
            ", spool {} points / {:.1} MB",
            n(&w.spool_points),
            n(&w.spool_bytes) as f64 / 1e6
        ));
    }
    for (what, a) in [
        ("dead-lettered", &w.dead_lettered),
        ("refused and lost (no dead-letter file)", &w.refused_lost),
        ("dropped", &w.dropped),
    ] {
        if n(a) > 0 {
            s.push_str(&format!(", {} {what}", n(a)));
        }
    }
    if n(&w.spool_damaged) > 0 {
        s.push_str(&format!(", spool damage: {} cut(s)", n(&w.spool_damaged)));
        if n(&w.spool_uncounted_bytes) > 0 {
            s.push_str(&format!(
                " ({} bytes of points that cannot be counted)",
                n(&w.spool_uncounted_bytes)
            ));
        }
    }
    if w.spool_failing.load(Ordering::Relaxed) {
        s.push_str("; SPOOL FAILING (disk)");
    }
    if let Some(e) = w.last_error() {
        if n(&w.failing_since_ms) != 0 {
            if w.needs_human.load(Ordering::Relaxed) {
                s.push_str(&format!("; NEEDS ATTENTION: {e}"));
            } else {
                s.push_str(&format!("; InfluxDB failing: {e}"));
            }
        }
    }
    s
}

/// Opens the spool and reports what it found there: the spool, and the
/// points it holds from an earlier run.
fn open_spool(
    name: &str,
    cfg: &Config,
    scfg: &SubscriberConfig,
) -> Result<(Arc<SharedSpool>, u64), Failure> {
    let dir = scfg.spool_dir(&cfg.state_dir, name);
    let opts = SpoolOptions {
        dir: dir.clone(),
        max_bytes: scfg.spool.max_bytes,
        segment_bytes: scfg.spool.segment_bytes,
        fsync: scfg.spool.fsync,
        when_full: scfg.spool.when_full,
    };
    let (spool, rec) = Spool::open(opts).map_err(|e| {
        let code = if e.kind() == std::io::ErrorKind::PermissionDenied {
            crate::exit::NOPERM
        } else {
            crate::exit::UNAVAILABLE
        };
        Failure::new(
            code,
            anyhow::anyhow!(
                "subscriber {name}: cannot open the spool {}: {e} (subscribers.{name}.spool.dir)",
                dir.display()
            ),
        )
    })?;
    for d in &rec.damage {
        tracing::error!("subscriber {name}: spool damage cut off: {d}");
    }
    if rec.records > 0 {
        tracing::info!(
            "subscriber {name}: spool {} holds {} records ({} points, {} bytes) to replay",
            dir.display(),
            rec.records,
            rec.points,
            rec.bytes
        );
    }
    Ok((SharedSpool::new(spool), rec.points))
}

/// `(publisher, epoch, last seq)`, as [`GapTracker::positions`] gives them.
type Positions = Vec<(String, u64, u64)>;

/// Where the gap tracker may resume after a crash: the publisher positions
/// of the newest checkpoint whose batches are all safe (written, spooled or
/// dead-lettered), kept in `<state_dir>/seen/<name>.json`.
///
/// What was in memory at a crash (open batches, the queue, the bus buffer)
/// is lost with the process; resuming from a safe position makes that loss
/// a counted gap. The count can exceed the loss by what was made safe after
/// the last checkpoint (about one `flush_interval` of messages): it is an
/// upper bound, never silence. A clean stop writes the exact position and
/// says so (`clean`): the next start then counts from it exactly, and a
/// publisher restart in between is no unknown loss (what the publisher
/// sent after the subscriber left, it counted as sent to no subscriber).
struct Watermark {
    path: PathBuf,
    /// Checkpoints not yet safe: (batches submitted before it, positions).
    pending: std::collections::VecDeque<(u64, Positions)>,
    saved: Positions,
    /// The file was written by a clean stop.
    clean: bool,
    log: RateLimitedLog,
}

/// `<state_dir>/seen/<name>.json`. Files from before `clean` existed are
/// a bare list of positions, read as not clean (the cautious reading).
#[derive(serde::Serialize, serde::Deserialize)]
struct Marks {
    clean: bool,
    positions: Positions,
}

impl Watermark {
    fn load(path: PathBuf) -> Self {
        let (saved, clean) = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Marks>(&bytes) {
                Ok(m) => (m.positions, m.clean),
                Err(e) => match serde_json::from_slice::<Positions>(&bytes) {
                    Ok(v) => (v, false),
                    Err(_) => {
                        tracing::warn!(
                            "{}: unreadable ({e}); gaps before this start are not counted",
                            path.display()
                        );
                        (Vec::new(), false)
                    }
                },
            },
            Err(_) => (Vec::new(), false),
        };
        if clean {
            // From now on this run may crash: until it stops cleanly, the
            // position on disk is only a safe one.
            if let Err(e) = save_marks(&path, &saved, false) {
                tracing::warn!("cannot save {}: {e}", path.display());
            }
        }
        Watermark {
            path,
            pending: Default::default(),
            saved,
            clean,
            log: RateLimitedLog::new(Duration::from_secs(60)),
        }
    }

    fn resumed(&self) -> Vec<(String, u64, u64)> {
        self.saved.clone()
    }

    /// The positions [`Watermark::resumed`] gives are exact.
    fn clean_stop(&self) -> bool {
        self.clean
    }

    fn checkpoint(&mut self, submitted: u64, positions: Vec<(String, u64, u64)>) {
        if self.pending.back().is_some_and(|(_, p)| *p == positions) {
            return;
        }
        self.pending.push_back((submitted, positions));
        // Bounded: while InfluxDB is slow and nothing spools, only the
        // oldest unsafe checkpoints matter.
        while self.pending.len() > 64 {
            self.pending.remove(1);
        }
    }

    async fn persist_safe(&mut self, pool: &WriterPool) {
        let safe = pool.durable_below();
        let mut newest = None;
        while self.pending.front().is_some_and(|(k, _)| *k <= safe) {
            newest = self.pending.pop_front().map(|(_, p)| p);
        }
        if let Some(p) = newest {
            if p != self.saved {
                // Spooled batches must be on disk before the mark says so.
                pool.sync_spool(false).await;
                self.persist(p, false).await;
            }
        }
    }

    /// Saves `positions`; the fsync runs off the runtime's thread, which
    /// intake shares.
    async fn persist(&mut self, positions: Vec<(String, u64, u64)>, clean: bool) {
        let path = self.path.clone();
        let r = tokio::task::spawn_blocking(move || {
            save_marks(&path, &positions, clean).map(|()| positions)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match r {
            Ok(positions) => self.saved = positions,
            Err(e) => {
                let path = self.path.display().to_string();
                crate::warn_limited!(self.log, || format!("cannot save {path}: {e}"));
            }
        }
    }
}

/// Writes the positions to `path` durably: a temporary file, fsynced, then
/// renamed over it.
fn save_marks(path: &std::path::Path, positions: &Positions, clean: bool) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    let marks = Marks {
        clean,
        positions: positions.clone(),
    };
    f.write_all(&serde_json::to_vec(&marks).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// How long a stopping subscriber waits for a publisher to answer its
/// leave fence (see [`sub::Subscriber::leave_on`]) before it stops reading
/// anyway. nbpy's publishers answer within a round trip plus what was
/// queued for us (at most the high-water mark); foreign ones may not.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads one publisher into the intake's channel, reconnecting until
/// `leave` is cancelled; then leaves cleanly (every message the publisher
/// sent us is handed over) and returns.
async fn read_endpoint(
    ep: String,
    topics: Vec<String>,
    out: mpsc::Sender<Chunk>,
    stats: Arc<IntakeStats>,
    leave: CancellationToken,
) {
    let (host, port) = match bus::parse_endpoint(&ep) {
        Ok(hp) => hp,
        Err(e) => {
            // `config check` refuses this; never reached from a checked config.
            tracing::error!("cannot connect to {ep:?}: {e}");
            return;
        }
    };
    let mut sock =
        sub::Subscriber::new(host, port, &topics, crate::wire::MAX_FRAME).leave_on(leave.clone());
    let mut retry_log = RateLimitedLog::new(Duration::from_secs(60));
    let mut oversized_log = RateLimitedLog::new(Duration::from_secs(5));
    // Armed by the leave: `sock` itself reacts to the token (it sends the
    // fence), so only the bound on waiting for the answer lives here, and
    // `next` is never dropped on the leave itself.
    let give_up = async {
        leave.cancelled().await;
        tokio::time::sleep(LEAVE_TIMEOUT).await;
    };
    tokio::pin!(give_up);
    loop {
        let ev = tokio::select! {
            ev = sock.next() => ev,
            _ = &mut give_up => {
                tracing::warn!(
                    "{ep}: no answer to the leave fence within {LEAVE_TIMEOUT:?}: stopped reading; messages in flight are not counted"
                );
                return;
            }
        };
        match ev {
            SubEvent::Left => {
                tracing::debug!("{ep}: left cleanly");
                return;
            }
            SubEvent::Down { .. } if leave.is_cancelled() => return,
            SubEvent::Chunk(c) => {
                if out.send(c).await.is_err() {
                    break;
                }
            }
            SubEvent::Connected => {
                stats.connected.fetch_add(1, Ordering::Relaxed);
                stats.connections.fetch_add(1, Ordering::Relaxed);
                tracing::info!("connected to {ep}");
            }
            SubEvent::Down {
                reason,
                was_connected: true,
            } => {
                stats.connected.fetch_sub(1, Ordering::Relaxed);
                tracing::warn!("lost {ep}: {reason}; reconnecting");
            }
            SubEvent::Down { reason, .. } => {
                crate::warn_limited!(retry_log, || {
                    format!(
                        "cannot reach {ep}: {reason}; retrying at least every {:?}",
                        sub::BACKOFF_MAX
                    )
                });
            }
            SubEvent::Oversized(n) => {
                stats.received.fetch_add(1, Ordering::Relaxed);
                stats.malformed.fetch_add(1, Ordering::Relaxed);
                crate::warn_limited!(oversized_log, || {
                    format!(
                        "{ep}: malformed message skipped: {n}+ bytes, over the limit of {} per frame or twice that per message",
                        crate::wire::MAX_FRAME
                    )
                });
            }
        }
    }
}

/// Decode → account → encode → batch.
pub struct Intake {
    pub batcher: Batcher,
    encoder: LineEncoder,
    pub gaps: GapTracker,
    stats: Arc<IntakeStats>,
    log: RateLimitedLog,
    /// For names shared by live publishers: apart from `log`, so a burst
    /// of gap warnings cannot hide the one that explains them.
    shared_log: RateLimitedLog,
    name: String,
    /// False under a topic filter (see [`gaps_countable`]).
    count_gaps: bool,
}

/// `seq` counts every message of a publisher, so a subscriber that filters
/// by topic sees jumps that are not loss: gaps can be counted only when it
/// takes everything (a `""` prefix).
pub fn gaps_countable(topics: &[String]) -> bool {
    topics.iter().any(|t| t.is_empty())
}

impl Intake {
    pub fn new(name: &str, influx: &crate::config::InfluxConfig, stats: Arc<IntakeStats>) -> Self {
        Intake {
            batcher: Batcher::new(influx.batch_size, influx.flush_interval),
            encoder: LineEncoder::new(),
            gaps: GapTracker::default(),
            stats,
            log: RateLimitedLog::new(Duration::from_secs(5)),
            shared_log: RateLimitedLog::new(Duration::from_secs(60)),
            name: name.to_string(),
            count_gaps: true,
        }
    }

    pub async fn process_chunk(&mut self, chunk: &[u8], pool: &WriterPool) {
        for m in sub::messages(chunk) {
            if let Some(b) = self.accept(&m) {
                pool.submit(b).await;
            }
        }
    }

    /// The synchronous part, for benchmarks: returns a full batch, if any.
    pub fn accept(&mut self, m: &Message<'_>) -> Option<crate::sink::batch::Batch> {
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        if let Some(done) = self.accept_canonical(m) {
            return done;
        }
        let env = match bus::decode_parts(&m.parts, m.count) {
            Ok(e) => e,
            Err(e) => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                let topic = (m.count > 0).then(|| {
                    let t = m.parts[0];
                    String::from_utf8_lossy(&t[..t.len().min(80)]).into_owned()
                });
                crate::warn_limited!(self.log, || format!(
                    "{}: malformed message (topic {topic:?}): {e}",
                    self.name
                ));
                return None;
            }
        };
        self.accept_envelope(&env)
    }

    /// The fast path for what our own publishers send (a v1 message in
    /// canonical form, of a known channel, that stores without complaint):
    /// straight from the frame to line protocol. `None` leaves the message
    /// to the general path, as if this had not looked at it.
    fn accept_canonical(&mut self, m: &Message<'_>) -> Option<Option<crate::sink::batch::Batch>> {
        if m.count != 2 {
            return None;
        }
        let body = bus::v1_body(&m.parts).ok()?;
        let mut parsed = self.encoder.prepare(body)?;
        let meas = parsed.m;
        let buf = self.batcher.buffer(meas.rp);
        if !self.encoder.encode_prepared(&mut parsed, buf) {
            return None;
        }
        let h = &parsed.body.head;
        self.observe_gaps(h.publisher, h.epoch, h.seq);
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        Some(self.batcher.commit(meas.rp))
    }

    fn observe_gaps(&mut self, publisher: &str, epoch: u64, seq: u64) {
        let o = self.gaps.observe_detailed(publisher, epoch, seq);
        if o.shared.is_some() || o.withdrawn > 0 || o.withdrawn_unknown_loss > 0 {
            self.shared_name(publisher, epoch, &o);
        }
        if !self.count_gaps {
            return;
        }
        if let Some((old_epoch, safe_seq)) = o.restart_unknown_loss {
            // Once per publisher and start at most: never rate-limited away.
            self.stats
                .restarts_unknown_loss
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "{}: publisher {publisher:?} restarted while this subscriber was down (epoch {old_epoch} -> {epoch}): \
                 its epoch {old_epoch} messages after seq {safe_seq} (the last safe position saved here) that were not stored \
                 are lost and cannot be counted; counted as a publisher restart with uncounted loss",
                self.name
            );
        }
        let missed = o.missed;
        if missed == 0 {
            return;
        }
        self.stats.gaps.fetch_add(missed, Ordering::Relaxed);
        if o.after_resume {
            // Counted from the last safe position, which can trail what was
            // really stored by about one flush_interval (see `Watermark`).
            tracing::warn!(
                "{}: at most {missed} message(s) missing from publisher {publisher:?} before seq {seq} \
                 (counted from the last safe position saved before this start; some of them may have been stored before)",
                self.name
            );
        } else {
            crate::warn_limited!(self.log, || {
                format!(
                    "{}: {missed} message(s) missing from publisher {publisher:?} before seq {seq}",
                    self.name
                )
            });
        }
    }

    /// A name found shared by two live publishers, and what an earlier
    /// message was counted for that this one shows was no loss (see
    /// [`bus::Observed::withdrawn`]): the "missing" start of a newer epoch
    /// taken for a restart of this one, which is alive. Taken back, and
    /// said, because the earlier count was logged too.
    #[cold]
    fn shared_name(&mut self, publisher: &str, epoch: u64, o: &bus::Observed) {
        if o.shared.is_some() {
            self.stats.shared_names.fetch_add(1, Ordering::Relaxed);
        }
        let withdrawn = if self.count_gaps { o.withdrawn } else { 0 };
        if self.count_gaps {
            let take = |a: &AtomicU64, n: u64| {
                let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                    Some(v.saturating_sub(n))
                });
            };
            take(&self.stats.gaps, withdrawn);
            take(&self.stats.restarts_unknown_loss, o.withdrawn_unknown_loss);
        }
        let taken_back = if withdrawn > 0 {
            format!(
                "; the {withdrawn} message(s) counted missing when the newer one was taken for a restart of epoch {epoch} are taken back"
            )
        } else {
            String::new()
        };
        let name = &self.name;
        match o.shared {
            Some((this, other)) => crate::warn_limited!(self.shared_log, || {
                format!(
                "{name}: two live publishers named {publisher:?} (epochs {this} and {other}): check for a duplicate deployment; \
                 their sequences are counted apart{taken_back}"
            )
            }),
            None => crate::warn_limited!(self.shared_log, || {
                format!(
                "{name}: publisher {publisher:?} epoch {epoch} is alive: a newer epoch was not its restart but another live publisher{taken_back}"
            )
            }),
        }
    }

    pub fn accept_envelope(&mut self, env: &Envelope<'_>) -> Option<crate::sink::batch::Batch> {
        self.observe_gaps(&env.publisher, env.epoch, env.seq);
        let rp = match crate::schema::by_channel(&env.ch) {
            Some(m) => m.rp,
            None => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                crate::warn_limited!(self.log, || format!(
                    "{}: unknown channel {:?}",
                    self.name, env.ch
                ));
                return None;
            }
        };
        let buf = self.batcher.buffer(rp);
        match self.encoder.encode(env, buf) {
            Ok(_) => {
                self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                self.batcher.commit(rp)
            }
            Err(e) => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                crate::warn_limited!(self.log, || format!(
                    "{}: cannot store {}: {e}",
                    self.name,
                    env.topic()
                ));
                None
            }
        }
    }

    /// Subscribed to these topics only (see [`gaps_countable`]).
    pub fn with_topics(mut self, topics: &[String]) -> Self {
        self.count_gaps = gaps_countable(topics);
        self
    }

    pub fn gaps(&self) -> &GapTracker {
        &self.gaps
    }

    /// Writes this subscriber's counters to `nbpy_pipeline`; `stopped` on
    /// the last one of a clean stop.
    async fn pipeline_point(
        &mut self,
        name: &str,
        w: &WriterStats,
        pool: &WriterPool,
        stopped: bool,
    ) {
        let env = self.pipeline_envelope(name, w, stopped, Own::Uncounted, now_ns());
        let rp = crate::schema::rp::DEFAULT;
        let buf = self.batcher.buffer(rp);
        if self.encoder.encode(&env, buf).is_ok() {
            self.stats.reports.fetch_add(1, Ordering::Relaxed);
            if let Some(b) = self.batcher.commit(rp) {
                pool.submit(b).await;
            }
        }
    }

    /// An `nbpy_pipeline` point of the counters now, stamped `at`; `own`
    /// counts the point itself in (see [`Own`]).
    fn pipeline_envelope(
        &self,
        name: &str,
        w: &WriterStats,
        stopped: bool,
        own: Own,
        at: i64,
    ) -> Envelope<'static> {
        let i = &self.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let n = |a: &AtomicU64| Value::Int(get(a) as i64);
        let (written, spooled) = match own {
            Own::Uncounted => (get(&w.written), get(&w.spooled)),
            Own::Written => (get(&w.written) + 1, get(&w.spooled)),
            Own::Spooled => (get(&w.written), get(&w.spooled) + 1),
        };
        let data = vec![
            (
                Cow::Borrowed("component"),
                Value::Str(Cow::Owned(name.to_string())),
            ),
            (
                Cow::Borrowed("role"),
                Value::Str(Cow::Borrowed("subscriber")),
            ),
            (Cow::Borrowed("received"), n(&i.received)),
            (Cow::Borrowed("gaps"), n(&i.gaps)),
            (Cow::Borrowed("malformed"), n(&i.malformed)),
            (Cow::Borrowed("written"), Value::Int(written as i64)),
            (Cow::Borrowed("write_errors"), n(&w.write_errors)),
            (Cow::Borrowed("dead_lettered"), n(&w.dead_lettered)),
            (Cow::Borrowed("refused_lost"), n(&w.refused_lost)),
            (Cow::Borrowed("spooled"), Value::Int(spooled as i64)),
            (Cow::Borrowed("replayed"), n(&w.replayed)),
            (Cow::Borrowed("dropped"), n(&w.dropped)),
            (Cow::Borrowed("spool_bytes"), n(&w.spool_bytes)),
            (Cow::Borrowed("queue_depth"), n(&w.pending)),
            (
                Cow::Borrowed("write_latency_ms"),
                Value::Float(w.latency_us.load(Ordering::Relaxed) as f64 / 1000.0),
            ),
            (Cow::Borrowed("stopped"), Value::Bool(stopped)),
        ];
        Envelope::new("nbpy", "pipeline", name.to_string(), at, data)
    }

    /// The stop's last report (`stopped`), once the writer pool has closed:
    /// the counters are final then, and the report states them as the
    /// stop line does, itself included. Health's `/metrics` and the
    /// dashboards show it from then on; written before the last batches
    /// went out, it said hundreds of points fewer written than were, with
    /// `queue_depth` 0.
    ///
    /// It is written straight to InfluxDB, within `budget`; when InfluxDB
    /// is failing, does not answer in time or refuses it, it is spooled
    /// (as spooled: what it states is then true of it, but for
    /// `spool_bytes`, the size before it), and the next start replays it
    /// like any spooled point. Only without a usable spool can
    /// it be lost: then it is not counted among the reports, the balance
    /// holds, and the log says so.
    async fn final_report(
        &self,
        name: &str,
        w: &WriterStats,
        client: &InfluxClient,
        spool: Option<&Arc<SharedSpool>>,
        budget: Duration,
    ) {
        let rp = crate::schema::rp::DEFAULT;
        // One timestamp for both forms: a direct write that timed out may
        // still be applied by InfluxDB, and the spooled copy, replayed
        // later, then overwrites it (same series, same time) instead of
        // leaving a second stopped report with other counts.
        // (A fresh encoder for each: the intake's own would move the
        // second form's time by a nanosecond to keep it apart.)
        let at = now_ns();
        let encode = |own| {
            let env = self.pipeline_envelope(name, w, true, own, at);
            let mut line = Vec::new();
            match LineEncoder::new().encode(&env, &mut line) {
                Ok(_) => Some(line),
                Err(e) => {
                    tracing::error!(
                        "subscriber {name}: cannot encode the last nbpy_pipeline report: {e}"
                    );
                    None
                }
            }
        };
        // The writers were failing when they stopped: a direct write
        // would only spend the stop's time.
        let failing = w.failing_since_ms.load(Ordering::Relaxed) != 0;
        let why = if failing && spool.is_some() {
            w.last_error().unwrap_or_else(|| "InfluxDB failing".into())
        } else {
            let Some(line) = encode(Own::Written) else {
                return;
            };
            match tokio::time::timeout(
                budget.max(Duration::from_millis(100)),
                client.write(rp, line.into()),
            )
            .await
            {
                Ok(Ok(())) => {
                    w.written.fetch_add(1, Ordering::Relaxed);
                    self.stats.reports.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {budget:?}"),
            }
        };
        let Some(sp) = spool else {
            tracing::warn!(
                "subscriber {name}: the last nbpy_pipeline report (stopped) was not stored: {why}; \
                 health shows this subscriber down once its previous report is stale"
            );
            return;
        };
        let Some(line) = encode(Own::Spooled) else {
            return;
        };
        let sp = sp.clone();
        // `force`: the stop does not wait for room (as the writers spool
        // what is left at a stop).
        let appended = tokio::task::spawn_blocking(move || {
            sp.with(|s| {
                let r = s
                    .append(rp, 1, &line, true)
                    .and_then(|a| s.sync().map(|_| a));
                (r, s.points(), s.bytes())
            })
        })
        .await;
        match appended {
            Ok((Ok(_), points, bytes)) => {
                w.spooled.fetch_add(1, Ordering::Relaxed);
                w.note_spool_size(points, bytes);
                self.stats.reports.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    "subscriber {name}: the last nbpy_pipeline report is spooled ({why}); the next start writes it"
                );
            }
            Ok((Err(e), ..)) => tracing::warn!(
                "subscriber {name}: the last nbpy_pipeline report (stopped) was not stored: {why}, and the spool refused it: {e}"
            ),
            Err(e) => tracing::warn!(
                "subscriber {name}: the last nbpy_pipeline report (stopped) was not stored: {why}, and spooling it failed: {e}"
            ),
        }
    }
}

/// Whether an `nbpy_pipeline` point counts itself in `written` or
/// `spooled`. Running reports do not (they state the counts before them);
/// the stop's last one does, because it is the last word and is compared
/// with the stop line, whose counts include it.
#[derive(Clone, Copy)]
enum Own {
    Uncounted,
    Written,
    Spooled,
}

/// Of the time a stop has left, what the last report's write may take (the
/// writers get the rest). A write to a working InfluxDB takes milliseconds;
/// one not answered within this goes to the spool instead.
fn final_report_time(left: Duration) -> Duration {
    (left / 10).min(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replayed record the stop could not shorten (the disk refused its
    /// rest) holds points this run also delivered: the line says so, and
    /// the balance counts them once.
    #[test]
    fn spooled_points_already_delivered_are_named_and_counted_once() {
        let (i, w) = (IntakeStats::default(), WriterStats::default());
        let set = |a: &AtomicU64, v| a.store(v, Ordering::Relaxed);
        set(&i.reports, 1);
        set(&w.written, 51);
        set(&w.dead_lettered, 10);
        set(&w.spool_points, 111);
        set(&w.spool_delivered_too, 60);
        let s = stop_summary(&i, &w, 111, &SubscriberConfig::default(), 0);
        assert!(s.adds_up, "{}", s.line);
        assert!(
            s.line
                .contains("111 spooled for later (0 bytes; 60 of them already written or refused"),
            "{}",
            s.line
        );
        assert!(
            s.line
                .contains("spooled - spooled but already written or refused"),
            "{}",
            s.line
        );
        // Without the overlap, the same counts do not add up, and say so.
        set(&w.spool_delivered_too, 0);
        let s = stop_summary(&i, &w, 111, &SubscriberConfig::default(), 0);
        assert!(
            !s.adds_up && s.line.contains("60 point(s) unaccounted for"),
            "{}",
            s.line
        );
    }
}
