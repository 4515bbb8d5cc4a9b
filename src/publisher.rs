//! The publisher role: one feed, one bound socket.
//!
//! Its feed runs as a separate task feeding a bounded queue; this loop moves
//! queued messages to the socket and keeps the service contract (READY once
//! bound, STATUS each second, liveness for the watchdog). On a stop the feed
//! is stopped first and every message it had already handed over is sent.
//!
//! A subscriber whose queue is full is waited for here, in this loop, not
//! inside a send: while one waits, a stop, STATUS ("waiting 3s for
//! subscriber …") and the watchdog's beat still happen, and a subscriber
//! that takes nothing for `stall_limit` is disconnected by the bus.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::bus::BusPublisher;
use crate::config::Config;
use crate::exit::{Failure, UNAVAILABLE};
use crate::feeds::{self, FeedContext, FeedSender, FeedStats};
use crate::service::Service;
use crate::sink::RateLimitedLog;
use crate::wire::{now_ns, Envelope};

/// Messages moved from the feed's queue to the socket per turn of the loop.
const BURST: usize = 1024;

/// How long a stop may spend getting what the feed handed over to the
/// subscribers (the unit's TimeoutStopSec is 30 s); a subscriber that has
/// not taken its messages by then is disconnected, and they are counted.
const FLUSH_LIMIT: Duration = Duration::from_secs(10);

/// Runs [`run`] on one thread, for `nbpy-publisher` and `nbpy publisher`:
/// the feed and the bus hand each message over without cross-thread
/// wake-ups.
pub fn serve(name: &str, cfg: &Config) -> Result<(), Failure> {
    crate::cli::block_on_current_thread(run(name, cfg))
}

pub async fn run(name: &str, cfg: &Config) -> Result<(), Failure> {
    let pcfg = cfg
        .publisher(name)
        .map_err(|e| Failure::config(anyhow::anyhow!(e)))?
        .clone();
    let (tx, mut rx) = mpsc::channel::<Envelope<'static>>(pcfg.feed.queue_capacity(pcfg.queue));
    let queued = {
        let weak = tx.downgrade();
        move || {
            weak.upgrade()
                .map(|t| t.max_capacity() - t.capacity())
                .unwrap_or(0)
        }
    };
    let svc = Service::start(name, pcfg.stale_after, move || {
        format!("{} queued messages", queued())
    });
    match crate::service::raise_nofile() {
        Ok(n) => tracing::debug!("publisher {name}: open-files limit {n}"),
        Err(e) => tracing::warn!("publisher {name}: cannot raise the open-files limit: {e}"),
    }
    let endpoint = pcfg.endpoint();
    let mut bus = BusPublisher::bind(&endpoint).await.map_err(|e| {
        Failure::new(
            UNAVAILABLE,
            anyhow::anyhow!("publisher {name}: cannot bind {endpoint}: {e} (is another process using the port?)"),
        )
    })?;
    bus.set_stall_limit(pcfg.stall_limit);
    let epoch = now_ns() as u64;
    let stats = Arc::new(FeedStats::default());
    let sender = FeedSender::new(tx, name, epoch, stats.clone(), svc.liveness.clone());
    let feed_stop = svc.shutdown.child_token();
    let mut feed = tokio::spawn(feeds::run(FeedContext {
        name: name.to_string(),
        cfg: pcfg.clone(),
        out: sender,
        shutdown: feed_stop.clone(),
    }));
    let want = pcfg.wait_for_subscribers;
    svc.liveness.set_idle(want > 0);
    svc.ready(&format!(
        "bound {}, feed {}",
        bus.endpoint,
        pcfg.feed.name()
    ));
    tracing::info!(
        "publisher {name}: {} on {} (epoch {epoch})",
        pcfg.feed.name(),
        bus.endpoint
    );

    let mut sent = Sent::default();
    let mut errors = RateLimitedLog::new(Duration::from_secs(5));
    let mut buf = Vec::with_capacity(1024);
    // What `recv_many` took; `burst[next..]` is not handed to the bus yet
    // (a message is held for a full subscriber).
    let mut burst = Vec::with_capacity(BURST);
    let mut next = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last = (Instant::now(), 0u64);
    let mut feed_result: Option<Result<(), Failure>> = None;
    let mut started = false;
    let mut stop_by: Option<Instant> = None;
    let unpaced = pcfg.feed.waits_for_bus() && pcfg.rate == 0.0;
    let mut was_paused = false;
    loop {
        // Holding applies to the first message only: once sending, a
        // subscriber that leaves sees what it missed as a gap when it is
        // back, while the others keep getting data.
        if !started {
            started = bus.subscribers() >= want;
        }
        let sending = started;
        // A feed that waits for the bus and is paced by delivery alone
        // (rate 0), told to wait for subscribers, waits again once the
        // last one has left, instead of spending a core on messages for no
        // one that a returning subscriber would count as a gap.
        // (`wait_for_subscribers = 0` asks for no waiting at all.) A stop
        // still drains what was queued.
        let paused = sending && unpaced && want > 0 && stop_by.is_none() && bus.subscribers() == 0;
        if paused != was_paused {
            was_paused = paused;
            svc.liveness.set_idle(paused);
            if paused {
                tracing::info!("publisher {name}: no subscriber left; rate = 0 waits for one");
            } else {
                tracing::info!(
                    "publisher {name}: {} subscriber(s), sending",
                    bus.subscribers()
                );
            }
        }
        // A message held for a full subscriber: get it (and the rest of
        // its burst) further; what is still held is waited for below.
        let wait = loop {
            if !bus.is_held() {
                break None;
            }
            match bus.retry() {
                Some(w) => break Some(w),
                None => publish_burst(
                    &mut bus,
                    &mut burst,
                    &mut next,
                    pcfg.codec,
                    &mut buf,
                    &mut errors,
                    &mut sent,
                ),
            }
        };
        let held = wait.is_some();
        tokio::select! {
            biased;
            // `feed_stop` is the shutdown's child: cancelled with it.
            _ = svc.shutdown.cancelled(), if stop_by.is_none() => {
                feed_stop.cancel();
                // What the feed handed over still goes out, but no
                // subscriber is waited for past the flush limit.
                let by = Instant::now() + FLUSH_LIMIT;
                stop_by = Some(by);
                bus.stop_by(by);
            }
            _ = svc.shutdown.cancelled(), if !sending => {
                tracing::info!("publisher {name}: stopping before any subscriber arrived");
                break;
            }
            r = &mut feed, if feed_result.is_none() => {
                feed_result = Some(r.unwrap_or_else(|e| Err(Failure::from(anyhow::anyhow!("feed task: {e}")))));
                // The queue closes once the feed's sender is gone; what is in
                // it still goes out below.
            }
            _ = bus.next_subscription() => {
                if !started && bus.subscribers() >= want && want > 0 {
                    tracing::info!("publisher {name}: {} subscriber(s), sending", bus.subscribers());
                    svc.liveness.set_idle(false);
                }
            }
            // Room, or time to judge the full subscriber: the top of the
            // loop retries.
            _ = async { if let Some(w) = wait { w.wait().await } }, if held => {
                svc.liveness.beat();
            }
            // A burst at a time, without going back through select: and
            // `recv` gave each message's queue slot back under the queue's
            // lock, one lock per message, where `recv_many` takes it once.
            n = rx.recv_many(&mut burst, BURST), if sending && !held && !paused => {
                if n == 0 { break }
                publish_burst(&mut bus, &mut burst, &mut next, pcfg.codec, &mut buf, &mut errors, &mut sent);
                // A flat-out feed keeps this branch ready, and the tick
                // below waits behind it: the loop is alive, say so.
                svc.liveness.beat();
            }
            _ = tick.tick() => {
                svc.liveness.beat();
                if last.0.elapsed() < Duration::from_secs(1) {
                    continue;
                }
                let (t, n) = last;
                let published = sent.published;
                let rate = (published - n) as f64 / t.elapsed().as_secs_f64().max(1e-3);
                last = (Instant::now(), published);
                let upstream = stats.problem().map(|p| format!("; upstream: {p}")).unwrap_or_default();
                let monitors = counted(bus.monitor_drops(), "not sent to stalled monitors");
                // Each is logged, rate-limited; the count says how many.
                let refused = counted(bus.refused(), "connections refused");
                let unheard = counted(bus.unheard(), "to no subscriber");
                let stalled = match bus.stalled() {
                    (0, _) => String::new(),
                    (n, m) => format!(", {m} not delivered to {n} stalled subscriber(s)"),
                };
                let unencodable = counted(sent.unencodable, "not encodable");
                let waiting = if was_paused {
                    "paused until a subscriber connects (rate = 0), ".to_string()
                } else {
                    waiting_for(&bus, started, want)
                };
                svc.status(&format!(
                    "{} on {}: {waiting}{published} sent{unheard}, {rate:.0} msg/s, {} subscriber(s), {} dropped{unencodable}{}{stalled}{monitors}{refused}{upstream}",
                    pcfg.feed.name(), bus.endpoint, bus.subscribers(), stats.dropped.load(Ordering::Relaxed),
                    feed_counters(&stats)
                ));
            }
        }
    }
    // Hand every queued message to the kernel before the socket closes,
    // within what is left of the stop's flush limit.
    let limit = stop_by.map_or(FLUSH_LIMIT, |by| {
        by.saturating_duration_since(Instant::now())
    });
    if tokio::time::timeout(limit, bus.flush()).await.is_err() {
        tracing::warn!(
            "publisher {name}: a subscriber did not take the last messages within {} s",
            FLUSH_LIMIT.as_secs()
        );
    }
    // What is still queued is counted before the socket closes.
    bus.close();
    // A feed still waiting for room in the queue gives up now.
    rx.close();
    if feed_result.is_none() {
        // The queue can close (the feed's sender dropped with its future)
        // before the task's end is seen: fetch its result so a feed's
        // failure still decides the exit code.
        feed_result = match tokio::time::timeout(Duration::from_secs(5), &mut feed).await {
            Ok(r) => {
                Some(r.unwrap_or_else(|e| Err(Failure::from(anyhow::anyhow!("feed task: {e}")))))
            }
            Err(_) => {
                feed.abort();
                None
            }
        };
    }
    crate::warn_suppressed!(errors, |n| format!(
        "publisher {name}: {n} more messages not encodable (not logged one by one)"
    ));
    let dropped = stats.dropped.load(Ordering::Relaxed);
    // Messages that took a seq but were never sent: queued for
    // subscribers that had not come when the stop did, or stamped by a
    // feed that was waiting for room. No subscriber can see them as a gap,
    // so they are counted here.
    let accepted = stats.accepted.load(Ordering::Relaxed);
    // Messages the codec refused took a seq too, and are counted apart.
    let Sent {
        published,
        unencodable,
    } = sent;
    let never_sent = accepted.saturating_sub(published + dropped + unencodable);
    // Sent to no subscriber: before the first arrived (without
    // wait_for_subscribers), or after the last cancelled (subscribers
    // stop first and cancel, see `zmtp::sub`). Counted here because no
    // subscriber can see them as a gap.
    let unheard = bus.unheard();
    // Not delivered to subscribers that stopped reading (disconnected,
    // they see a gap if they come back), and not sent to monitors that
    // fell behind or were still behind at the stop.
    let (stalled, undelivered) = bus.stalled();
    let monitors = bus.monitor_drops();
    let held = match never_sent {
        0 => String::new(),
        n => format!(
            ", {n} of the feed's {accepted} never sent ({})",
            if started {
                "still with the feed at the stop"
            } else {
                "held for subscribers that had not come"
            }
        ),
    };
    // As in STATUS: each was logged, rate-limited; the count says how many.
    let refused = counted(bus.refused(), "connections refused");
    let lost = format!(
        "{undelivered} not delivered to {stalled} stalled subscriber(s), {monitors} not sent to stalled monitors{held}{refused}"
    );
    svc.stopping(&format!(
        "sent {published}, {unheard} to no subscriber, {unencodable} not encodable, {lost}"
    ));
    tracing::info!(
        "publisher {name}: sent {published} messages ({} to subscribers, {unheard} to no subscriber), dropped {dropped}, {unencodable} not encodable, {lost}, stopping",
        published.saturating_sub(unheard)
    );
    match feed_result {
        Some(Err(f)) => Err(f),
        _ => Ok(()),
    }
}

/// What the feed counted upstream, for the STATUS line: `, N malformed,
/// M connects, D repeats skipped, U updates dropped awaiting a snapshot`,
/// each only when not 0 (generated feeds connect nowhere). Without it a
/// venue sending garbage, or a connection that keeps being replaced, looks
/// healthy until the data stops.
fn feed_counters(stats: &FeedStats) -> String {
    let mut s = String::new();
    for (n, what) in [
        (&stats.malformed, "malformed"),
        (&stats.connects, "connects"),
        (&stats.duplicates, "repeats skipped"),
        (
            &stats.awaiting_snapshot,
            "updates dropped awaiting a snapshot",
        ),
    ] {
        s.push_str(&counted(n.load(Ordering::Relaxed), what));
    }
    s
}

/// `, N what` for a STATUS or stop line, or nothing when N is 0.
fn counted(n: u64, what: &str) -> String {
    match n {
        0 => String::new(),
        n => format!(", {n} {what}"),
    }
}

/// What the loop counts of the messages it hands to the bus.
#[derive(Default)]
struct Sent {
    /// Handed to the bus (sent, or held for a full subscriber).
    published: u64,
    /// Refused by the codec (e.g. a channel the legacy codec has no
    /// measurement for): never sent, so neither sent nor delivered.
    unencodable: u64,
}

/// Hands `burst[*next..]` to the bus until it is all sent (and cleared)
/// or a message is held for a full subscriber, counting what it took in
/// `sent`.
fn publish_burst(
    bus: &mut BusPublisher,
    burst: &mut Vec<Envelope<'static>>,
    next: &mut usize,
    codec: crate::config::Codec,
    buf: &mut Vec<u8>,
    errors: &mut RateLimitedLog,
    sent: &mut Sent,
) {
    while let Some(env) = burst.get(*next) {
        *next += 1;
        match bus.publish(env, codec, buf) {
            Ok(true) => sent.published += 1,
            Ok(false) => {
                sent.published += 1;
                return;
            }
            Err(e) => {
                sent.unencodable += 1;
                crate::warn_limited!(errors, || format!(
                    "cannot encode message seq {}: {e}; counted as not encodable",
                    env.seq
                ))
            }
        }
    }
    burst.clear();
    *next = 0;
}

/// What the loop waits for, for STATUS: a full subscriber, or enough
/// subscribers for the first message (`wait_for_subscribers`). Empty when
/// it waits for nothing.
fn waiting_for(bus: &BusPublisher, started: bool, want: usize) -> String {
    if let Some((addr, for_)) = bus.waiting_for() {
        return format!(
            "waiting {}s for subscriber {addr} (queue full), ",
            for_.as_secs()
        );
    }
    if !started {
        return format!(
            "holding the first message for {want} subscriber(s), {} connected; ",
            bus.subscribers()
        );
    }
    String::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_shows_the_feeds_upstream_counters_when_not_zero() {
        let stats = FeedStats::default();
        assert_eq!(feed_counters(&stats), "");
        stats.malformed.store(3, Ordering::Relaxed);
        stats.connects.store(2, Ordering::Relaxed);
        assert_eq!(feed_counters(&stats), ", 3 malformed, 2 connects");
        stats.duplicates.store(5, Ordering::Relaxed);
        assert_eq!(
            feed_counters(&stats),
            ", 3 malformed, 2 connects, 5 repeats skipped"
        );
        stats.awaiting_snapshot.store(4, Ordering::Relaxed);
        assert_eq!(
            feed_counters(&stats),
            ", 3 malformed, 2 connects, 5 repeats skipped, 4 updates dropped awaiting a snapshot"
        );
    }
}
