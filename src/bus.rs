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
//! per-publisher `seq`/`epoch` in every envelope: [`GapTracker`].

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

    /// Encodes and queues one envelope for every matching subscriber.
    pub async fn publish(
        &mut self,
        env: &Envelope<'_>,
        codec: Codec,
        buf: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        buf.clear();
        match codec {
            Codec::V1 => {
                self.encoder.encode(env, buf)?;
                self.topic.clear();
                env.write_topic(&mut self.topic);
                self.socket.send(&[&self.topic, buf]).await;
            }
            Codec::Legacy => {
                buf.extend_from_slice(wire::encode_legacy(env)?.as_bytes());
                self.socket.send(&[buf]).await;
            }
        }
        Ok(())
    }

    /// Waits until every queued message is with the kernel (or its
    /// subscriber is gone).
    pub async fn flush(&mut self) {
        self.socket.flush().await
    }
}

/// Per-publisher sequence accounting.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PublisherSeen {
    pub epoch: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub received: u64,
    pub gaps: u64,
    pub restarts: u64,
    pub out_of_order: u64,
    /// Set by [`GapTracker::resume`] until this run's first message of the
    /// publisher: the position came from a previous run, so what the first
    /// message reveals is judged differently (see [`Observed`]).
    pub resumed: bool,
}

/// What one message tells [`GapTracker::observe_detailed`].
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Observed {
    /// Messages this one reveals as missing.
    pub missed: u64,
    /// This was the publisher's first message after [`GapTracker::resume`],
    /// of the resumed epoch: `missed` is then an upper bound, because the
    /// resumed position is the last *safe* one, and messages after it may
    /// have been stored before the previous run ended.
    pub after_resume: bool,
    /// This was the publisher's first message after [`GapTracker::resume`],
    /// of a new epoch: `(old epoch, last safe seq)`. The publisher restarted
    /// while this subscriber was down, and how many messages the old epoch
    /// sent after that seq (and were not stored) cannot be known: only the
    /// new epoch's missing start is in `missed`.
    pub restart_unknown_loss: Option<(u64, u64)>,
}

/// Counts missing messages per publisher from `seq`/`epoch`.
///
/// The first message of a publisher this subscriber has never seen is where
/// it joined, not a gap (it may simply have started later). After that, a
/// jump counts the skipped numbers; a new epoch is a publisher restart, and
/// whatever the new epoch sent before our first message of it is a gap,
/// because we were listening all along.
///
/// After [`GapTracker::resume`] (a position saved by a previous run) the
/// first message of each publisher is different: a jump is an upper bound,
/// and a new epoch hides an unknown loss of the old one ([`Observed`]).
///
/// Publisher names come off the bus, so the map is hashed with foldhash
/// seeded per process (as the line encoder's series map is), not SipHash,
/// which cost ~200 instructions per message here.
#[derive(Debug, Default)]
pub struct GapTracker {
    seen: HashMap<String, PublisherSeen, foldhash::fast::RandomState>,
}

impl GapTracker {
    /// Returns how many messages this one reveals as missing.
    pub fn observe(&mut self, publisher: &str, epoch: u64, seq: u64) -> u64 {
        self.observe_detailed(publisher, epoch, seq).missed
    }

    /// [`GapTracker::observe`], also saying when the count rests on a
    /// resumed position (see [`Observed`]): the subscriber must word those
    /// as bounds, or as loss it cannot count, not as exact counts.
    pub fn observe_detailed(&mut self, publisher: &str, epoch: u64, seq: u64) -> Observed {
        if seq == 0 {
            return Observed::default(); // unsequenced (legacy)
        }
        let key = if publisher.is_empty() { "?" } else { publisher };
        let Some(p) = self.seen.get_mut(key) else {
            self.seen.insert(
                key.to_string(),
                PublisherSeen {
                    epoch,
                    first_seq: seq,
                    last_seq: seq,
                    received: 1,
                    ..Default::default()
                },
            );
            return Observed::default();
        };
        p.received += 1;
        let resumed = std::mem::take(&mut p.resumed);
        if epoch != p.epoch {
            let old = (p.epoch, p.last_seq);
            p.restarts += 1;
            p.epoch = epoch;
            p.first_seq = seq;
            p.last_seq = seq;
            let missed = seq - 1;
            p.gaps += missed;
            return Observed {
                missed,
                after_resume: false,
                restart_unknown_loss: resumed.then_some(old),
            };
        }
        if seq > p.last_seq {
            let missed = seq - p.last_seq - 1;
            p.gaps += missed;
            p.last_seq = seq;
            Observed {
                missed,
                after_resume: resumed,
                restart_unknown_loss: None,
            }
        } else {
            p.out_of_order += 1;
            Observed::default()
        }
    }

    /// Continues from a previous run's position, so what a publisher sent
    /// while this subscriber was down counts as a gap instead of passing
    /// for a late join. `exact`: the previous run stopped cleanly and saved
    /// its exact position, so nothing after it was stored or lost unseen;
    /// otherwise it is the last *safe* position of a run that crashed, and
    /// the first message judges against it as [`Observed`] says.
    pub fn resume(&mut self, publisher: &str, epoch: u64, seq: u64, exact: bool) {
        self.seen.insert(
            publisher.to_string(),
            PublisherSeen {
                epoch,
                first_seq: seq,
                last_seq: seq,
                resumed: !exact,
                ..Default::default()
            },
        );
    }

    /// `(publisher, epoch, last seq)` of every publisher seen.
    pub fn positions(&self) -> Vec<(String, u64, u64)> {
        let mut v: Vec<_> = self
            .seen
            .iter()
            .map(|(k, p)| (k.clone(), p.epoch, p.last_seq))
            .collect();
        v.sort();
        v
    }

    pub fn total_gaps(&self) -> u64 {
        self.seen.values().map(|p| p.gaps).sum()
    }

    pub fn publishers(&self) -> &HashMap<String, PublisherSeen, foldhash::fast::RandomState> {
        &self.seen
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
        let a = &g.publishers()["a"];
        assert_eq!((a.restarts, a.out_of_order, a.received), (1, 1, 5));
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
}
