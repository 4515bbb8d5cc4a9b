//! The ZeroMQ side: publisher and subscriber sockets and gap accounting.
//!
//! The publisher binds an XPUB-like socket rather than a PUB ([`zmtp`]):
//! sends wait for a slow subscriber instead of dropping (the `zeromq`
//! crate's PUB drops silently on a full queue), and the subscription frames
//! reach us, so "wait for N subscribers" means N subscriptions really
//! arrived, not N TCP connections that may not have subscribed yet.
//! Subscribers see an ordinary publisher (libzmq SUBs included). The
//! subscriber role reads with [`zmtp::sub`]; the monitors' taps use the
//! `zeromq` crate's SUB.
//!
//! Loss that still happens (a publisher restart, a live feed dropping under
//! back-pressure, a subscriber reconnecting) is made visible by the
//! per-publisher `seq`/`epoch` in every envelope, counted per stream (name
//! and epoch): [`GapTracker`].

use std::collections::HashMap;

use bytes::Bytes;
use zeromq::ZmqMessage;

use crate::config::Codec;
use crate::wire::{self, EncodeError, Envelope};
use crate::zmtp;

/// Checks an endpoint is `tcp://host:port` (the transport this build carries).
pub fn check_endpoint(ep: &str) -> Result<(), String> {
    parse_endpoint(ep).map(|_| ())
}

/// `tcp://host:port` → host and port (1..=65535).
pub fn parse_endpoint(ep: &str) -> Result<(&str, u16), String> {
    let Some(rest) = ep.strip_prefix("tcp://") else {
        return Err("only tcp://HOST:PORT endpoints are supported".into());
    };
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err("missing :PORT".into());
    };
    if host.is_empty() {
        return Err("missing host".into());
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok((host, p)),
        _ => Err(format!("port {port:?} is not 1..=65535")),
    }
}

/// Decodes a received message: two frames are v1, one frame is legacy.
pub fn decode(msg: &ZmqMessage) -> Result<Envelope<'_>, wire::DecodeError> {
    let part = |i| msg.get(i).map(|b: &Bytes| b.as_ref()).unwrap_or(&[]);
    decode_parts(&[part(0), part(1)], msg.len())
}

/// [`decode`] for a message given as its first two frames and its frame
/// count (see [`crate::zmtp::sub::Message`]).
pub fn decode_parts<'a>(
    parts: &[&'a [u8]; 2],
    count: usize,
) -> Result<Envelope<'a>, wire::DecodeError> {
    match count {
        2 => wire::decode_v1(v1_body(parts)?),
        1 => wire::decode_legacy(parts[0]),
        0 => Err(wire::DecodeError::Empty),
        n => Err(wire::DecodeError::FrameCount(n)),
    }
}

/// A frame a subscriber would take: the publisher stamps its own name
/// and epoch, so an envelope that came in under [`wire::MAX_FRAME`] (a
/// replay line) can leave over it, and is then refused as not encodable.
fn within_frame_limit(frame: &[u8]) -> Result<(), wire::EncodeError> {
    if frame.len() > wire::MAX_FRAME {
        return Err(wire::EncodeError::TooLarge(frame.len()));
    }
    Ok(())
}

/// The body of a two-frame (v1) message, once both frames are within the
/// limits: the checks [`decode_parts`] makes before decoding, which the
/// subscriber's fast path makes through here too.
pub fn v1_body<'a>(parts: &[&'a [u8]; 2]) -> Result<&'a [u8], wire::DecodeError> {
    if parts[0].len() > wire::MAX_FRAME {
        return Err(wire::DecodeError::TooLarge(parts[0].len()));
    }
    wire::check_v1_body(parts[1])?;
    Ok(parts[1])
}

/// A topic no message ever has (topics start with a venue name). Monitors
/// (the health daemon, the validator) subscribe to it before they subscribe
/// to everything, so a publisher can tell them from the subscribers it
/// waits for with `wait_for_subscribers`.
pub const MONITOR_TOPIC: &str = "\u{0}nbpy-monitor";

/// The publishing end: a [`zmtp::Publisher`] and its v1 encoder.
pub struct BusPublisher {
    socket: zmtp::Publisher,
    pub endpoint: String,
    topic: Vec<u8>,
    encoder: crate::v1_encoder::V1Encoder,
}

impl BusPublisher {
    pub async fn bind(endpoint: &str) -> Result<Self, zmtp::ZmtpError> {
        let (host, port) = parse_endpoint(endpoint)
            .map_err(|e| zmtp::ZmtpError::Protocol(format!("endpoint {endpoint:?}: {e}")))?;
        // Monitors mark themselves with MONITOR_TOPIC: never wait for them.
        let socket = zmtp::Publisher::bind(host, port, Some(MONITOR_TOPIC.as_bytes())).await?;
        let bound = socket.local_addr();
        Ok(BusPublisher {
            endpoint: format!("tcp://{bound}"),
            socket,
            topic: Vec::new(),
            encoder: Default::default(),
        })
    }

    /// Connected subscribers holding a subscription, monitors aside: what
    /// `wait_for_subscribers` waits for. A subscriber with several topic
    /// prefixes counts once.
    pub fn subscribers(&self) -> usize {
        self.socket.subscribers()
    }

    /// Connections turned away (a failed or cut-short handshake, or one
    /// past the connection cap).
    pub fn refused(&self) -> u64 {
        self.socket.refused()
    }

    /// Messages a stalled monitor did not get (it was not waited for).
    pub fn monitor_drops(&self) -> u64 {
        self.socket.dropped()
    }

    /// Messages no subscriber was subscribed to (none connected, or all
    /// had cancelled, as a stopping subscriber does): gone, and counted.
    pub fn unheard(&self) -> u64 {
        self.socket.unheard()
    }

    /// Waits until subscriptions changed (a subscribe, a cancel, a
    /// subscriber leaving) since this last returned; changes while the
    /// caller was busy count as one. Cancel-safe.
    pub async fn next_subscription(&mut self) {
        self.socket.subscriptions_changed().await
    }

    /// Encodes and queues one envelope for every matching subscriber,
    /// without waiting: `Ok(false)` when a subscriber's queue is full and
    /// the message is held for it, to be got through with
    /// [`BusPublisher::retry`] before the next one (see
    /// [`zmtp::Publisher::try_send`]). The wait is the caller's, so its
    /// loop keeps answering a stop and keeps its STATUS while it waits.
    pub fn publish(
        &mut self,
        env: &Envelope<'_>,
        codec: Codec,
        buf: &mut Vec<u8>,
    ) -> Result<bool, EncodeError> {
        buf.clear();
        Ok(match codec {
            Codec::V1 => {
                self.encoder.encode(env, buf)?;
                self.topic.clear();
                env.write_topic(&mut self.topic);
                within_frame_limit(&self.topic)?;
                within_frame_limit(buf)?;
                self.socket.try_send(&[&self.topic, buf])
            }
            Codec::Legacy => {
                buf.extend_from_slice(wire::encode_legacy(env)?.as_bytes());
                within_frame_limit(buf)?;
                self.socket.try_send(&[buf])
            }
        })
    }

    /// A message is held for a full subscriber ([`BusPublisher::retry`]).
    pub fn is_held(&self) -> bool {
        self.socket.is_held()
    }

    /// Gets the held message further without waiting; what to wait for
    /// before retrying if it is still held (see [`zmtp::Publisher::retry`]).
    pub fn retry(&mut self) -> Option<zmtp::HeldWait> {
        self.socket.retry()
    }

    /// The subscriber a held message waits for, and since when (for STATUS).
    pub fn waiting_for(&self) -> Option<(std::net::SocketAddr, std::time::Duration)> {
        self.socket.waiting_for()
    }

    /// See [`zmtp::Publisher::set_stall_limit`].
    pub fn set_stall_limit(&mut self, limit: std::time::Duration) {
        self.socket.set_stall_limit(limit)
    }

    /// See [`zmtp::Publisher::stop_by`].
    pub fn stop_by(&mut self, deadline: std::time::Instant) {
        self.socket.stop_by(deadline)
    }

    /// Subscribers disconnected for stalling, and the messages they did
    /// not get.
    pub fn stalled(&self) -> (u64, u64) {
        self.socket.stalled()
    }

    /// Counts what is still queued as not delivered and disconnects
    /// everyone (see [`zmtp::Publisher::close`]).
    pub fn close(&mut self) {
        self.socket.close()
    }

    /// Waits until every queued message is with the kernel (or its
    /// subscriber is gone).
    pub async fn flush(&mut self) {
        self.socket.flush().await
    }
}

/// Sequence accounting of one stream: one publisher process, named by its
/// `pub` and told apart by its `epoch` (its start time).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PublisherSeen {
    pub epoch: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub received: u64,
    pub gaps: u64,
    /// 1 when this stream's first message was taken for a restart of
    /// another stream of its name (see [`GapTracker`]), else 0.
    pub restarts: u64,
    pub out_of_order: u64,
    /// Set by [`GapTracker::resume`] until this run's first message of the
    /// stream: the position came from a previous run, so what the first
    /// message reveals is judged differently (see [`Observed`]).
    pub resumed: bool,
    /// When this stream was last left for another of its name (on the
    /// name's `switches` clock; 0: not heard in this run): which stream
    /// was heard least recently (see [`Named::first_of`]).
    last_heard: u64,
    /// The epoch this stream was taken to restart, while that could still
    /// prove wrong: with the gap counted at its start, and whether it took
    /// that epoch's `resumed` (reported a restart with uncounted loss).
    restart_of: Option<u64>,
    start_missed: u64,
    took_resumed: bool,
    /// `received` at the last [`GapTracker::forget_idle`].
    received_at_sweep: u64,
}

/// What one message tells [`GapTracker::observe_detailed`].
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Observed {
    /// Messages this one reveals as missing.
    pub missed: u64,
    /// This was the stream's first message after [`GapTracker::resume`]:
    /// `missed` is then an upper bound, because the resumed position is
    /// the last *safe* one, and messages after it may have been stored
    /// before the previous run ended.
    pub after_resume: bool,
    /// This was the first message of a new epoch, taken for a restart of
    /// a stream resumed by [`GapTracker::resume`]: `(old epoch, last safe
    /// seq)`. The publisher restarted while this subscriber was down, and
    /// how many messages the old epoch sent after that seq (and were not
    /// stored) cannot be known: only the new epoch's missing start is in
    /// `missed`.
    pub restart_unknown_loss: Option<(u64, u64)>,
    /// Messages counted missing earlier that this one shows were not: a
    /// newer epoch's start, counted when it was taken for a restart of
    /// this message's epoch, which is still alive. To be taken back.
    pub withdrawn: u64,
    /// Restarts with uncounted loss reported earlier that this message
    /// shows were none (as for `withdrawn`): 0 or 1.
    pub withdrawn_unknown_loss: u64,
    /// The first time a name is found shared by two live publishers:
    /// `(this message's epoch, the other's)`.
    pub shared: Option<(u64, u64)>,
}

/// Epochs kept per name: its live publishers (one, or two for a duplicate
/// deployment or a standby) and the ones they replaced, which a late or
/// second live publisher may still be heard from. Beyond this the least
/// recently heard one is forgotten, so a name restarting all day costs
/// the same memory as one that never does.
pub const MAX_EPOCHS: usize = 4;

/// The streams of one publisher name.
#[derive(Debug, Default)]
struct Named {
    /// Never empty; at most [`MAX_EPOCHS`].
    streams: Vec<PublisherSeen>,
    /// The newest epoch among `streams` (never forgotten).
    newest: u64,
    /// Switches from one of this name's streams to another: the clock of
    /// `last_heard`. Ticking only on a switch keeps it off the path of a
    /// name with one publisher, where every message is the hint's.
    switches: u64,
    /// The stream of the latest message (the one heard most recently):
    /// looked at first. Out of range when there is none.
    hint: usize,
    /// Two live publishers were seen with this name (said once).
    shared: bool,
    /// Gaps and restarts of the streams forgotten: the totals stay totals.
    gone: (u64, u64),
}

impl Named {
    fn new(s: PublisherSeen) -> Self {
        let mut streams = Vec::with_capacity(2);
        let newest = s.epoch;
        streams.push(s);
        Named {
            streams,
            newest,
            switches: 1,
            ..Default::default()
        }
    }

    /// A message of another epoch than the hint's: the hint's stream is
    /// left (and so was heard at this point of the clock), and the
    /// epoch's becomes the hint. `None`: no stream of that epoch is kept.
    #[cold]
    fn switch_to(&mut self, epoch: u64) -> Option<Observed> {
        if let Some(s) = self.streams.get_mut(self.hint) {
            if s.received > 0 {
                s.last_heard = self.switches;
                self.switches += 1;
            }
        }
        let i = self.streams.iter().position(|s| s.epoch == epoch)?;
        self.hint = i;
        Some(if epoch < self.newest {
            self.settle(i)
        } else {
            Observed::default()
        })
    }

    /// Adds a stream, forgetting the least recently heard one (never the
    /// newest) when [`MAX_EPOCHS`] are kept already.
    fn add(&mut self, s: PublisherSeen) {
        if self.streams.len() >= MAX_EPOCHS {
            let newest = self.newest;
            if let Some(i) = self
                .streams
                .iter()
                .enumerate()
                .filter(|(_, s)| s.epoch != newest)
                .min_by_key(|(_, s)| (s.last_heard, s.epoch))
                .map(|(i, _)| i)
            {
                let s = self.streams.swap_remove(i);
                self.forget(&s);
            }
        }
        self.newest = self.newest.max(s.epoch);
        self.streams.push(s);
        self.hint = self.streams.len() - 1;
    }

    /// The first message of an epoch not kept for this name.
    fn first_of(&mut self, epoch: u64, seq: u64) -> Observed {
        let joined = PublisherSeen {
            epoch,
            first_seq: seq,
            last_seq: seq,
            received: 1,
            last_heard: self.switches,
            ..Default::default()
        };
        if epoch < self.newest {
            // Not a restart (a restart's epoch, its start time, is newer):
            // a second live publisher, or a late message of a forgotten
            // one. Where it joined is no gap.
            let other = self.newest;
            self.add(joined);
            return Observed {
                shared: self.mark_shared(epoch, other),
                ..Default::default()
            };
        }
        // Newer than all: a restart, as ever, or a second live publisher
        // that only time tells apart. Taken for a restart of the stream
        // heard least recently (the one that went quiet to restart; of
        // equals, the newest), and counted so, until that one is heard
        // again ([`Named::settle`]).
        let Some(p) = self
            .streams
            .iter_mut()
            .min_by_key(|s| (s.last_heard, std::cmp::Reverse(s.epoch)))
        else {
            self.add(joined);
            return Observed::default();
        };
        let took = std::mem::take(&mut p.resumed);
        let old = (p.epoch, p.last_seq);
        let missed = seq - 1;
        self.add(PublisherSeen {
            gaps: missed,
            restarts: 1,
            restart_of: Some(old.0),
            start_missed: missed,
            took_resumed: took,
            ..joined
        });
        Observed {
            missed,
            restart_unknown_loss: took.then_some(old),
            ..Default::default()
        }
    }

    /// Stream `i`, not the newest, is heard: it is alive, so a newer
    /// stream taken for its restart was a second live publisher. Its
    /// counted start and restart are taken back. Heard while the newest
    /// is heard too (in this run: both may have been resumed), the name
    /// is shared by two live publishers even with nothing to take back.
    #[cold]
    fn settle(&mut self, i: usize) -> Observed {
        let (epoch, newest) = (self.streams[i].epoch, self.newest);
        let mut o = Observed::default();
        let mut other = None;
        let mut gave_back = false;
        for s in self.streams.iter_mut() {
            if s.restart_of == Some(epoch) {
                s.restart_of = None;
                s.restarts = 0;
                s.gaps -= s.start_missed;
                o.withdrawn += std::mem::take(&mut s.start_missed);
                if std::mem::take(&mut s.took_resumed) {
                    o.withdrawn_unknown_loss += 1;
                    gave_back = true;
                }
                other = Some(s.epoch);
            } else if s.epoch == newest && s.received > 0 {
                other = other.or(Some(newest));
            }
        }
        // The resumed mark the newer one took is this stream's again: its
        // first message (this one) is judged against the resumed position.
        if gave_back {
            self.streams[i].resumed = true;
        }
        if let Some(newer) = other {
            o.shared = self.mark_shared(epoch, newer);
        }
        o
    }

    fn forget(&mut self, s: &PublisherSeen) {
        self.gone.0 += s.gaps;
        self.gone.1 += s.restarts;
    }

    fn mark_shared(&mut self, epoch: u64, other: u64) -> Option<(u64, u64)> {
        (!std::mem::replace(&mut self.shared, true)).then_some((epoch, other))
    }
}

/// Counts missing messages per stream from `seq`/`epoch`.
///
/// A stream is one publisher process: its name (`pub`) and its `epoch`
/// (start time). Keying by name alone took two live publishers sharing a
/// name (one config deployed on two hosts, or a standby) for one that
/// restarted at every alternation, each time "missing" `seq - 1`
/// messages: millions of gaps where nothing was lost.
///
/// The first message of a name this subscriber has never seen is where it
/// joined, not a gap (it may simply have started later). After that, a
/// jump within a stream counts the skipped numbers. A new epoch newer than
/// all of its name's is a publisher restart, and whatever the new epoch
/// sent before our first message of it is a gap, because we were
/// listening all along. Should the epoch it was taken to replace be heard
/// again, it was a second live publisher instead: the restart and its gap
/// are withdrawn ([`Observed::withdrawn`]) and the name is reported as
/// shared ([`Observed::shared`]). A new epoch *older* than the newest is
/// never a restart (epochs are start times): a second live publisher, or a
/// late message, which joins without a gap.
///
/// After [`GapTracker::resume`] (positions saved by a previous run) the
/// first message of each stream is different: a jump is an upper bound,
/// and a new epoch hides an unknown loss of the old one ([`Observed`]).
///
/// Publisher names come off the bus, so the map is hashed with foldhash
/// seeded per process (as the line encoder's series map is), not SipHash,
/// which cost ~200 instructions per message here. A name's epochs are a
/// short list behind that one lookup, the latest heard looked at first:
/// a message costs what it did when names were the key.
#[derive(Debug, Default)]
pub struct GapTracker {
    seen: HashMap<String, Named, foldhash::fast::RandomState>,
}

impl GapTracker {
    /// Returns how many messages this one reveals as missing.
    pub fn observe(&mut self, publisher: &str, epoch: u64, seq: u64) -> u64 {
        self.observe_detailed(publisher, epoch, seq).missed
    }

    /// [`GapTracker::observe`], also saying when the count rests on a
    /// resumed position, or corrects an earlier one (see [`Observed`]):
    /// the subscriber must word those as bounds, or as loss it cannot
    /// count, not as exact counts, and take back what is withdrawn.
    pub fn observe_detailed(&mut self, publisher: &str, epoch: u64, seq: u64) -> Observed {
        if seq == 0 {
            return Observed::default(); // unsequenced (legacy)
        }
        let key = if publisher.is_empty() { "?" } else { publisher };
        let Some(n) = self.seen.get_mut(key) else {
            self.seen.insert(
                key.to_string(),
                Named::new(PublisherSeen {
                    epoch,
                    first_seq: seq,
                    last_seq: seq,
                    received: 1,
                    ..Default::default()
                }),
            );
            return Observed::default();
        };
        let mut o = Observed::default();
        if n.streams.get(n.hint).is_none_or(|s| s.epoch != epoch) {
            match n.switch_to(epoch) {
                Some(settled) => o = settled,
                None => return n.first_of(epoch, seq),
            }
        }
        let Some(p) = n.streams.get_mut(n.hint) else {
            return o; // switch_to set the hint to a stream it found
        };
        p.received += 1;
        let resumed = std::mem::take(&mut p.resumed);
        if seq > p.last_seq {
            let missed = seq - p.last_seq - 1;
            p.gaps += missed;
            p.last_seq = seq;
            o.missed = missed;
            o.after_resume = resumed;
        } else {
            p.out_of_order += 1;
        }
        o
    }

    /// Continues from a previous run's position, so what a publisher sent
    /// while this subscriber was down counts as a gap instead of passing
    /// for a late join. `exact`: the previous run stopped cleanly and saved
    /// its exact position, so nothing after it was stored or lost unseen;
    /// otherwise it is the last *safe* position of a run that crashed, and
    /// the first message judges against it as [`Observed`] says. A name
    /// saved with several epochs (live publishers sharing it) resumes each.
    pub fn resume(&mut self, publisher: &str, epoch: u64, seq: u64, exact: bool) {
        let s = PublisherSeen {
            epoch,
            first_seq: seq,
            last_seq: seq,
            resumed: !exact,
            ..Default::default()
        };
        match self.seen.get_mut(publisher) {
            Some(n) => match n.streams.iter_mut().find(|p| p.epoch == epoch) {
                Some(p) => *p = s,
                None => n.add(s),
            },
            None => {
                self.seen.insert(publisher.to_string(), Named::new(s));
            }
        }
    }

    /// Forgets, per name, the epochs other than the newest that were not
    /// heard since the last call: publishers that restarted or went away.
    /// Called every few minutes, it bounds what is kept (and saved) to
    /// what is alive; [`MAX_EPOCHS`] bounds it in between. One that comes
    /// back after all joins again, without a gap.
    pub fn forget_idle(&mut self) {
        for n in self.seen.values_mut() {
            // The hint's stream is left too: by index, which retain moves.
            if let Some(s) = n.streams.get_mut(n.hint).filter(|s| s.received > 0) {
                s.last_heard = n.switches;
                n.switches += 1;
            }
            n.hint = usize::MAX;
            let newest = n.newest;
            let mut gone = n.gone;
            n.streams.retain_mut(|s| {
                let keep = s.received != s.received_at_sweep || s.epoch == newest;
                s.received_at_sweep = s.received;
                if !keep {
                    gone.0 += s.gaps;
                    gone.1 += s.restarts;
                }
                keep
            });
            n.gone = gone;
        }
    }

    /// `(publisher, epoch, last seq)` of every stream kept.
    pub fn positions(&self) -> Vec<(String, u64, u64)> {
        let mut v: Vec<_> = self
            .streams()
            .map(|(k, p)| (k.to_string(), p.epoch, p.last_seq))
            .collect();
        v.sort();
        v
    }

    /// Gaps counted, forgotten streams' included.
    pub fn total_gaps(&self) -> u64 {
        let gone: u64 = self.seen.values().map(|n| n.gone.0).sum();
        gone + self.streams().map(|(_, p)| p.gaps).sum::<u64>()
    }

    /// Restarts counted, forgotten streams' included.
    pub fn total_restarts(&self) -> u64 {
        let gone: u64 = self.seen.values().map(|n| n.gone.1).sum();
        gone + self.streams().map(|(_, p)| p.restarts).sum::<u64>()
    }

    /// Every stream kept, with its publisher name.
    pub fn streams(&self) -> impl Iterator<Item = (&str, &PublisherSeen)> {
        self.seen
            .iter()
            .flat_map(|(k, n)| n.streams.iter().map(move |p| (k.as_str(), p)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert!(check_endpoint("tcp://127.0.0.1:5558").is_ok());
        assert!(check_endpoint("tcp://[::1]:5558").is_ok());
        assert!(check_endpoint("ipc:///tmp/x").is_err());
        assert!(check_endpoint("tcp://127.0.0.1").is_err());
        assert!(check_endpoint("tcp://127.0.0.1:0").is_err());
    }

    #[test]
    fn gaps_joins_restarts_and_reorders() {
        let mut g = GapTracker::default();
        assert_eq!(g.observe("a", 1, 50), 0, "joining late is not a gap");
        assert_eq!(g.observe("a", 1, 51), 0);
        assert_eq!(g.observe("a", 1, 55), 3);
        assert_eq!(g.observe("a", 1, 54), 0);
        assert_eq!(
            g.observe("a", 2, 4),
            3,
            "restart: seq 1..3 of the new epoch missed"
        );
        assert_eq!(g.observe("b", 9, 1), 0);
        assert_eq!(g.observe("x", 0, 0), 0);
        assert_eq!(g.total_gaps(), 6);
        let a = |e| {
            g.streams()
                .find(|(n, p)| *n == "a" && p.epoch == e)
                .map(|(_, p)| p.clone())
        };
        let (old, new) = (a(1).unwrap_or_default(), a(2).unwrap_or_default());
        assert_eq!((old.out_of_order, old.received, new.received), (1, 4, 1));
        assert_eq!(g.total_restarts(), 1);
    }

    #[test]
    fn resuming_counts_what_was_missed_while_down() {
        let mut g = GapTracker::default();
        g.resume("a", 7, 100, false);
        assert_eq!(g.observe("a", 7, 150), 49);
        assert_eq!(g.positions(), vec![("a".to_string(), 7, 150)]);
    }

    #[test]
    fn a_count_resting_on_a_resumed_position_says_so_once() {
        let mut g = GapTracker::default();
        g.resume("a", 7, 100, false);
        let o = g.observe_detailed("a", 7, 150);
        assert_eq!((o.missed, o.after_resume), (49, true), "an upper bound");
        let o = g.observe_detailed("a", 7, 152);
        assert_eq!((o.missed, o.after_resume), (1, false), "exact again");
    }

    #[test]
    fn a_restart_while_down_is_loss_that_cannot_be_counted() {
        let mut g = GapTracker::default();
        g.resume("a", 7, 100, false);
        g.resume("b", 3, 10, false);
        let o = g.observe_detailed("a", 8, 5);
        assert_eq!(o.missed, 4, "the new epoch's start is counted");
        assert_eq!(o.restart_unknown_loss, Some((7, 100)));
        assert!(!o.after_resume);
        // A restart while running is counted exactly, as always.
        assert_eq!(g.observe_detailed("a", 9, 1), Observed::default());
        g.observe_detailed("b", 3, 11);
        let o = g.observe_detailed("b", 4, 1);
        assert_eq!(o.restart_unknown_loss, None, "b was seen in this run");
    }

    #[test]
    fn after_a_clean_stop_the_position_is_exact() {
        let mut g = GapTracker::default();
        g.resume("a", 7, 100, true);
        g.resume("b", 3, 10, true);
        // Sent while the subscriber was down: an exact gap (its publisher
        // counted them as sent to no subscriber).
        assert_eq!(
            g.observe_detailed("a", 7, 150),
            Observed {
                missed: 49,
                ..Default::default()
            }
        );
        // A publisher restarted since: the old epoch ended where the clean
        // stop saw it (the rest went to no subscriber, counted there).
        let o = g.observe_detailed("b", 4, 1);
        assert_eq!(o.restart_unknown_loss, None);
    }

    /// One config deployed twice (two hosts, or a standby left running):
    /// two live publishers with one name, their messages interleaved. Each
    /// is a stream of its own (name + epoch); neither restarts the other.
    #[test]
    fn two_live_publishers_of_one_name_count_no_false_gaps() {
        let mut g = GapTracker::default();
        for i in 0..1000 {
            assert_eq!(g.observe("a", 100, 300 + i), 0);
            g.observe("a", 200, 310 + i);
        }
        assert_eq!(g.total_gaps(), 0, "interleaved epochs are no loss");
        // A real gap in one of them is counted, in that one only.
        assert_eq!(g.observe("a", 200, 1312), 2);
        assert_eq!(g.observe("a", 100, 1300), 0);
        assert_eq!(g.total_gaps(), 2);
        assert_eq!(
            g.positions(),
            vec![("a".to_string(), 100, 1300), ("a".to_string(), 200, 1312)]
        );
    }

    /// The second publisher heard first may be the newer one or the older
    /// one: either way, no gap.
    #[test]
    fn a_second_publisher_with_an_older_epoch_joins_without_a_gap() {
        let mut g = GapTracker::default();
        for i in 0..100 {
            assert_eq!(g.observe("a", 200, 5000 + i), 0);
            assert_eq!(g.observe("a", 100, 9000 + i), 0);
        }
        assert_eq!(g.total_gaps(), 0);
    }

    /// Both streams of a shared name are saved, and a restarted subscriber
    /// resumes both: what each sent while it was down is a gap, nothing more.
    #[test]
    fn both_publishers_of_a_shared_name_resume_without_false_gaps() {
        let mut g = GapTracker::default();
        g.resume("a", 100, 500, true);
        g.resume("a", 200, 700, true);
        assert_eq!(g.observe("a", 200, 711), 10);
        assert_eq!(g.observe("a", 100, 506), 5);
        for i in 0..100 {
            assert_eq!(g.observe("a", 100, 507 + i), 0);
            assert_eq!(g.observe("a", 200, 712 + i), 0);
        }
        assert_eq!(g.total_gaps(), 15);
        // After a crash, the first message of each is judged as a bound.
        let mut g = GapTracker::default();
        g.resume("a", 100, 500, false);
        g.resume("a", 200, 700, false);
        let o = g.observe_detailed("a", 100, 510);
        assert_eq!((o.missed, o.after_resume), (9, true));
        let o = g.observe_detailed("a", 200, 701);
        assert_eq!((o.missed, o.after_resume), (0, true));
        assert_eq!(o.restart_unknown_loss, None);
    }

    /// The newer publisher heard second is taken for a restart at first
    /// (as a real restart would be), until the older one is heard again:
    /// then its start and restart are withdrawn, once, and the name is
    /// said to be shared, once.
    #[test]
    fn a_restart_taken_back_when_the_old_epoch_is_heard_again() {
        let mut g = GapTracker::default();
        g.observe("a", 100, 300);
        let o = g.observe_detailed("a", 200, 310);
        assert_eq!((o.missed, o.shared), (309, None), "a restart, for now");
        let o = g.observe_detailed("a", 100, 301);
        assert_eq!(o.withdrawn, 309);
        assert_eq!(o.shared, Some((100, 200)));
        assert_eq!((g.total_gaps(), g.total_restarts()), (0, 0));
        let o = g.observe_detailed("a", 100, 302);
        assert_eq!(o, Observed::default(), "said once");
        // An older epoch never heard before is no restart either.
        let mut g = GapTracker::default();
        g.observe("b", 200, 300);
        let o = g.observe_detailed("b", 100, 900);
        assert_eq!((o.missed, o.shared), (0, Some((100, 200))));
        assert_eq!(g.total_restarts(), 0);
    }

    /// With two live publishers, a restart of either is still one: the
    /// one that went quiet to restart is the one replaced, and the other,
    /// heard on, withdraws nothing.
    #[test]
    fn a_restart_of_one_of_two_live_publishers_is_counted_exactly() {
        for restarting in [100, 200] {
            let mut g = GapTracker::default();
            for i in 0..50 {
                g.observe("a", 100, 1 + i);
                g.observe("a", 200, 1 + i);
            }
            let other = 300 - restarting;
            // The restarting one is quiet while the other goes on.
            for i in 50..60 {
                g.observe("a", other, 1 + i);
            }
            assert_eq!(g.observe("a", 500, 4), 3, "{restarting}: the new start");
            for i in 60..100 {
                let o = g.observe_detailed("a", other, 1 + i);
                assert_eq!(o, Observed::default(), "{restarting}");
                assert_eq!(g.observe("a", 500, 5 + i - 60), 0);
            }
            assert_eq!((g.total_gaps(), g.total_restarts()), (3, 1), "{restarting}");
        }
    }

    /// A restart while the subscriber was down, of one of two resumed
    /// publishers sharing a name: reported as a restart with uncounted
    /// loss; the other one heard on takes nothing back.
    #[test]
    fn a_restart_while_down_of_one_of_two_resumed_publishers() {
        let mut g = GapTracker::default();
        g.resume("a", 100, 500, false);
        g.resume("a", 200, 700, false);
        assert_eq!(g.observe_detailed("a", 200, 701).missed, 0);
        let o = g.observe_detailed("a", 300, 3);
        assert_eq!((o.missed, o.restart_unknown_loss), (2, Some((100, 500))));
        let o = g.observe_detailed("a", 200, 702);
        assert_eq!((o.withdrawn, o.shared), (0, Some((200, 300))), "both live");
        // Taken for a restart of the one not heard yet (200), which then
        // is heard: the uncounted loss is taken back with the restart,
        // and 200's first message is judged against its resumed position.
        let mut g = GapTracker::default();
        g.resume("a", 100, 500, false);
        g.resume("a", 200, 500, false);
        g.observe("a", 100, 501);
        let o = g.observe_detailed("a", 300, 3);
        assert_eq!(o.restart_unknown_loss, Some((200, 500)));
        let o = g.observe_detailed("a", 200, 510);
        assert_eq!((o.withdrawn, o.withdrawn_unknown_loss), (2, 1));
        assert_eq!((o.missed, o.after_resume), (9, true));
    }

    /// A name that restarts all day keeps at most MAX_EPOCHS epochs, and
    /// the ones not heard for a while are forgotten; the totals stay.
    #[test]
    fn old_epochs_are_forgotten_and_the_totals_kept() {
        let mut g = GapTracker::default();
        for e in 1..=100 {
            g.observe("a", e, 2);
            g.observe("a", e, 3);
        }
        assert_eq!(g.positions().len(), MAX_EPOCHS);
        assert_eq!((g.total_gaps(), g.total_restarts()), (99, 99));
        g.forget_idle();
        g.observe("a", 100, 4);
        g.forget_idle();
        assert_eq!(g.positions(), vec![("a".to_string(), 100, 4)]);
        assert_eq!((g.total_gaps(), g.total_restarts()), (99, 99));
        // A forgotten one heard again joins without a gap.
        assert_eq!(g.observe_detailed("a", 97, 50).missed, 0);
    }

    /// Both resumed, both heard again: the name is still shared, and a
    /// new run says so too.
    #[test]
    fn a_shared_name_resumed_is_said_again_when_both_are_heard() {
        let mut g = GapTracker::default();
        g.resume("a", 100, 500, true);
        g.resume("a", 200, 700, true);
        assert_eq!(g.observe_detailed("a", 100, 501), Observed::default());
        let o = g.observe_detailed("a", 200, 701);
        assert_eq!(o, Observed::default(), "the newest heard: nothing to say");
        let o = g.observe_detailed("a", 100, 502);
        assert_eq!(o.shared, Some((100, 200)));
        assert_eq!(g.observe_detailed("a", 100, 503), Observed::default());
        assert_eq!(g.total_gaps(), 0);
    }
}
