//! The subscribing end of the bus: a SUB socket speaking ZMTP 3.0 to one
//! publisher over TCP, reconnecting by itself.
//!
//! Why not the `zeromq` crate's SUB (the monitors' taps still use it): it
//! hands over one message at a time, each a queue of separately allocated
//! frames, through a channel of its own; under the e2e bench that and its
//! codec were a sixth of the subscriber's CPU, and its reconnect backoff
//! grows to 30 s, so a subscriber could rejoin a restarted publisher half
//! a minute late. Here one read fills a buffer and every whole message in
//! it goes to the caller as one [`Chunk`], whose frames are parsed in place
//! ([`messages`]). Reconnects back off from 100 ms to at most 2 s.
//!
//! A message with a frame over the size limit (or more than twice the limit
//! in all its frames) is never buffered: its bytes are skipped as they
//! arrive and it is reported as
//! [`SubEvent::Oversized`], so a huge frame costs no memory and cannot
//! stall the messages behind it.
//!
//! A connection that dies without a FIN or RST reaching us (the
//! publisher's host reset, a partition, a NAT or firewall that forgot it)
//! would otherwise look connected for ever, and what was published
//! meanwhile would be lost without a gap to show for it. So: to a peer
//! that greets as ZMTP 3.1 (nbpy's publisher, libzmq 4.2 and later) a
//! PING goes out whenever nothing arrived for [`HEARTBEAT`], and a
//! connection that brought nothing at all (data, PONG, any frame) for
//! [`SILENCE_LIMIT`] is given up and made again; a quiet feed stays up on
//! the PONGs. A peer's own PING with a TTL (RFC 37) is honoured the same
//! way: nothing within the TTL after it ends the connection. A ZMTP 3.0
//! peer is not PINGed (it might not answer); TCP keepalive finds its dead
//! connections, more slowly.

use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{
    command, encode_frame, handshake_minor, protocol, ZmtpError, FLAG_COMMAND, FLAG_LONG,
    FLAG_MORE, HANDSHAKE_TIMEOUT, MAX_INBOUND_FRAME,
};

/// Whole messages as received: ZMTP frames, back to back.
pub type Chunk = Bytes;

const BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// The longest wait between reconnect attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// What one read asks the kernel for, at least.
const READ_SIZE: usize = 64 * 1024;
/// A ZMTP 3.1 publisher is PINGed after this long with nothing from it.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// A ZMTP 3.1 publisher that sent nothing at all (no data, no PONG) for
/// this long is presumed gone: three PINGs unanswered.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(15);
/// The context of our liveness PINGs.
const HEARTBEAT_CONTEXT: &[u8] = b"nbpy-alive";

/// Whether bytes (or the peer's close) wait in the socket, asked of the
/// kernel: tokio's readiness can lag behind it.
fn waiting(stream: &TcpStream) -> std::io::Result<bool> {
    let mut one = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    match socket2::SockRef::from(stream).peek(&mut one) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}

/// What [`Subscriber::next`] has to report.
#[derive(Debug)]
pub enum SubEvent {
    /// Handshake done and subscriptions sent.
    Connected,
    /// The connection ended or could not be made; the next call retries
    /// after a backoff. `was_connected` tells a loss from a failed attempt.
    Down { reason: String, was_connected: bool },
    /// One or more whole messages.
    Chunk(Chunk),
    /// A message with a frame over the limit (or frames over twice the
    /// limit in all), skipped; its size in bytes (with frame headers) as
    /// far as it was seen.
    Oversized(u64),
    /// After [`Subscriber::leave`]: the publisher answered the fence, so
    /// every message it sent this subscriber has been handed over.
    Left,
}

/// The PING context of the leave fence, told apart from any other PONG.
const LEAVE_CONTEXT: &[u8] = b"nbpy-leave";

/// A SUB connection to one `host:port`.
pub struct Subscriber {
    host: String,
    port: u16,
    topics: Vec<Vec<u8>>,
    max_frame: u64,
    conn: Option<TcpStream>,
    buf: BytesMut,
    /// Next byte of `buf` not yet looked at.
    pos: usize,
    /// Where the message being received starts (== `pos` between messages).
    msg_start: usize,
    /// Body bytes of an oversized frame still to skip.
    skip: u64,
    /// The current message is oversized: drop frames up to its last.
    discarding: bool,
    backoff: Option<Duration>,
    /// Commands to send (PONGs), written before the next read.
    out: Vec<u8>,
    /// [`Subscriber::leave`] was called: no reconnect; `left` once the
    /// publisher's PONG arrived.
    leaving: bool,
    left: bool,
    /// Cancelled when the owner wants to leave (see [`Subscriber::leave`]);
    /// looked at while waiting, so a leave needs no cancelled future.
    leave_when: CancellationToken,
    /// The peer greeted as ZMTP 3.1: it answers PINGs.
    pings: bool,
    /// See [`HEARTBEAT`] and [`SILENCE_LIMIT`].
    heartbeat: Duration,
    silence_limit: Duration,
    /// When the connection last brought a byte, or was made.
    heard: Instant,
    /// When we last sent a liveness PING.
    pinged: Instant,
    /// A peer's PING with a TTL: nothing more by then ends the connection.
    ttl_until: Option<Instant>,
    /// The most bytes ever buffered, for tests of the skipping.
    #[cfg(test)]
    peak: usize,
}

impl Subscriber {
    /// `topics` are prefix subscriptions; frames over `max_frame` bytes are
    /// skipped (see [`SubEvent::Oversized`]). Nothing connects until
    /// [`Subscriber::next`] is called.
    pub fn new(host: &str, port: u16, topics: &[String], max_frame: usize) -> Self {
        Subscriber {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            topics: topics.iter().map(|t| t.as_bytes().to_vec()).collect(),
            max_frame: max_frame as u64,
            conn: None,
            buf: BytesMut::new(),
            pos: 0,
            msg_start: 0,
            skip: 0,
            discarding: false,
            backoff: None,
            out: Vec::new(),
            leaving: false,
            left: false,
            leave_when: CancellationToken::new(),
            pings: false,
            heartbeat: HEARTBEAT,
            silence_limit: SILENCE_LIMIT,
            heard: Instant::now(),
            pinged: Instant::now(),
            ttl_until: None,
            #[cfg(test)]
            peak: 0,
        }
    }

    /// Other times than [`HEARTBEAT`] and [`SILENCE_LIMIT`] (tests).
    pub fn liveness(mut self, heartbeat: Duration, silence_limit: Duration) -> Self {
        self.heartbeat = heartbeat;
        self.silence_limit = silence_limit;
        self
    }

    /// The next thing that happened. Dropping the future loses nothing that
    /// was already handed over; a partly read message is lost, as it would
    /// be with any ZeroMQ socket that is closed.
    pub async fn next(&mut self) -> SubEvent {
        if self.conn.is_none() && (self.leaving || self.leave_when.is_cancelled()) {
            self.leaving = true;
            return SubEvent::Down {
                reason: "left".into(),
                was_connected: false,
            };
        }
        if self.conn.is_none() {
            let leave = self.leave_when.clone();
            if let Some(d) = self.backoff {
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = leave.cancelled() => return self.down("left".into(), false),
                }
            }
            let attempt = tokio::select! {
                a = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.connect()) => a,
                _ = leave.cancelled() => return self.down("left".into(), false),
            };
            return match attempt {
                Ok(Ok((stream, minor))) => {
                    self.conn = Some(stream);
                    self.backoff = None;
                    self.pings = minor >= 1;
                    (self.heard, self.pinged, self.ttl_until) =
                        (Instant::now(), Instant::now(), None);
                    SubEvent::Connected
                }
                Ok(Err(e)) => self.down(e.to_string(), false),
                Err(_) => self.down("no ZMTP handshake within 10 s".into(), false),
            };
        }
        // Silence is counted from this call at the earliest: while the
        // caller was busy elsewhere, bytes may be waiting unread. And a
        // connection is judged dead only after a read found nothing there.
        let entered = Instant::now();
        let mut woke = false;
        loop {
            match self.scan() {
                Ok(Some(ev)) => return ev,
                Ok(None) => {}
                Err(e) => return self.down(e.to_string(), true),
            }
            let since = self.heard.max(entered);
            // Silence ends a connection only once a PING sent during it
            // went unanswered for a heartbeat: a subscriber that was itself
            // paused (SIGSTOP, a suspended VM) comes back to an old `heard`
            // and must ask before it gives up.
            let silence_dead = (self.pings && self.pinged > since)
                .then(|| (since + self.silence_limit).max(self.pinged + self.heartbeat));
            let dead_at = silence_dead.into_iter().chain(self.ttl_until).min();
            let now = Instant::now();
            if let Some(dead) = dead_at.filter(|&d| woke && now >= d) {
                // Bytes in the socket that the runtime has not reported
                // yet (right after such a pause) are no silence.
                match self.conn.as_ref().map(waiting) {
                    Some(Ok(true)) => {
                        (self.heard, self.ttl_until, woke) = (now, None, false);
                        continue;
                    }
                    Some(Ok(false)) => return self.presumed_dead(dead, since),
                    Some(Err(e)) => return self.down(e.to_string(), true),
                    None => return self.down("not connected".into(), false),
                }
            }
            let ping_at =
                (self.pings && !self.leaving).then(|| since.max(self.pinged) + self.heartbeat);
            if ping_at.is_some_and(|p| now >= p) {
                // No TTL: a libzmq peer would hold it against us while
                // its data flows and we, hearing it, send nothing.
                self.out
                    .extend_from_slice(&ping(Duration::ZERO, HEARTBEAT_CONTEXT));
                self.pinged = now;
                continue;
            }
            let wake = ping_at.into_iter().chain(dead_at).min();
            let Some(stream) = self.conn.as_mut() else {
                return self.down("not connected".into(), false);
            };
            if !self.out.is_empty() {
                // A dead peer's window fills up: bounded like the reads.
                let write = stream.write_all(&self.out);
                let bound = dead_at.or(self.pings.then(|| now + self.silence_limit));
                let written = match bound {
                    Some(dead) => match tokio::time::timeout_at(dead.into(), write).await {
                        Ok(r) => r,
                        Err(_) => return self.presumed_dead(dead, since),
                    },
                    None => write.await,
                };
                if let Err(e) = written {
                    return self.down(e.to_string(), true);
                }
                self.out.clear();
            }
            let want = if self.skip > 0 {
                // Only what is skipped: the buffer stays small.
                (self.skip as usize).min(READ_SIZE)
            } else {
                READ_SIZE
            };
            self.buf.reserve(want);
            let timer = async {
                match wake {
                    Some(w) => tokio::time::sleep_until(w.into()).await,
                    None => std::future::pending().await,
                }
            };
            let read = tokio::select! {
                // Bytes already there count before any timer.
                biased;
                // `read_buf` is cancel-safe: what it read is in `buf`.
                r = stream.read_buf(&mut self.buf) => r,
                _ = self.leave_when.cancelled(), if !self.leaving => {
                    self.leave();
                    continue;
                }
                _ = timer => {
                    woke = true;
                    continue;
                }
            };
            match read {
                Ok(0) => return self.down("publisher closed the connection".into(), true),
                Ok(_) => {
                    (self.heard, self.ttl_until, woke) = (Instant::now(), None, false);
                    #[cfg(test)]
                    {
                        self.peak = self.peak.max(self.buf.len());
                    }
                }
                Err(e) => return self.down(e.to_string(), true),
            }
        }
    }

    /// Leaves cleanly once `token` is cancelled (see `leave`). Keep
    /// calling [`Subscriber::next`] until [`SubEvent::Left`] or
    /// [`SubEvent::Down`], bounding the wait: a publisher that does not
    /// answer PINGs never sends `Left`.
    pub fn leave_on(mut self, token: CancellationToken) -> Self {
        self.leave_when = token;
        self
    }

    /// Cancels every subscription, then sends a PING. The publisher
    /// handles both in order and queues its PONG behind the messages it
    /// queued for us before the cancel, after which it queues none: so
    /// [`SubEvent::Left`] comes after the last message this subscriber will
    /// ever be sent, and what the publisher sends later it counts as sent
    /// to no subscriber. Without it, the messages in flight when a
    /// subscriber stops reading were lost with neither side counting them.
    /// Returns false when not connected: nothing to wait for.
    fn leave(&mut self) -> bool {
        self.leaving = true;
        if self.conn.is_none() {
            return false;
        }
        for t in &self.topics {
            let mut body = Vec::with_capacity(t.len() + 1);
            body.push(0);
            body.extend_from_slice(t);
            encode_frame(0, &body, &mut self.out);
        }
        self.out
            .extend_from_slice(&ping(Duration::ZERO, LEAVE_CONTEXT));
        true
    }

    /// The connection brought nothing since `since` and `dead` passed.
    fn presumed_dead(&mut self, dead: Instant, since: Instant) -> SubEvent {
        let why = if Some(dead) == self.ttl_until {
            "past the TTL of the publisher's last PING"
        } else {
            "no data and no answer to our PINGs"
        };
        let silent = since.elapsed().as_secs_f64();
        self.down(
            format!("nothing received for {silent:.1} s ({why}): connection presumed dead"),
            true,
        )
    }

    fn down(&mut self, reason: String, was_connected: bool) -> SubEvent {
        self.conn = None;
        self.buf.clear();
        self.out.clear();
        (self.pos, self.msg_start, self.skip, self.discarding) = (0, 0, 0, false);
        self.backoff = Some(match self.backoff {
            None => BACKOFF_FIRST,
            Some(d) => (d * 2).min(BACKOFF_MAX),
        });
        SubEvent::Down {
            reason,
            was_connected,
        }
    }

    /// The connection, with the peer's ZMTP minor version.
    async fn connect(&self) -> Result<(TcpStream, u8), ZmtpError> {
        let mut s = TcpStream::connect((self.host.as_str(), self.port)).await?;
        let _ = s.set_nodelay(true);
        super::keep_alive(&s);
        let (minor, kind) = handshake_minor(&mut s, "SUB")
            .await
            .map_err(closed_in_handshake)?;
        match kind.as_str() {
            "PUB" | "XPUB" => {}
            other => {
                return protocol(format!(
                    "a {other:?} socket is not a publisher (need PUB or XPUB)"
                ))
            }
        }
        // ZMTP 3.0 subscriptions are messages: 1, then the prefix. Peers
        // speaking 3.1 accept them from a 3.0 peer.
        let mut subs = Vec::new();
        for t in &self.topics {
            let mut body = Vec::with_capacity(t.len() + 1);
            body.push(1);
            body.extend_from_slice(t);
            encode_frame(0, &body, &mut subs);
        }
        s.write_all(&subs).await?;
        Ok((s, minor))
    }

    /// Looks at what is buffered: whole messages to hand over, commands to
    /// answer, oversized frames to skip. `None` when more bytes are needed.
    fn scan(&mut self) -> Result<Option<SubEvent>, ZmtpError> {
        loop {
            if self.skip > 0 {
                // Only ever entered with nothing else buffered before it.
                let n = (self.skip as usize).min(self.buf.len());
                self.buf.advance(n);
                self.skip -= n as u64;
                if self.skip > 0 {
                    return Ok(None);
                }
                continue;
            }
            let Some((flags, head, len)) = header(&self.buf[self.pos..])? else {
                break;
            };
            if flags & FLAG_COMMAND != 0 {
                if self.pos != self.msg_start || self.discarding {
                    return protocol("command inside a multipart message");
                }
                if len > MAX_INBOUND_FRAME {
                    return protocol(format!("{len}-byte command"));
                }
                let end = self.pos + head + len as usize;
                if self.buf.len() < end {
                    break;
                }
                if let Some(chunk) = self.take_whole() {
                    return Ok(Some(SubEvent::Chunk(chunk)));
                }
                let body = self.buf.split_to(end).split_off(head);
                (self.pos, self.msg_start) = (0, 0);
                self.answer(&body)?;
                if self.left {
                    return Ok(Some(SubEvent::Left));
                }
                continue;
            }
            // A message may hold two frames at the limit (topic and body);
            // past that, a publisher that never ends a multipart message
            // would grow the buffer without bound.
            let so_far = (self.pos - self.msg_start) as u64;
            if len > self.max_frame || self.discarding || so_far + len > 2 * self.max_frame {
                if let Some(chunk) = self.take_whole() {
                    return Ok(Some(SubEvent::Chunk(chunk)));
                }
                // Drop this message's earlier frames and this header.
                self.buf.advance(self.pos + head);
                (self.pos, self.msg_start) = (0, 0);
                self.skip = len;
                let first = !self.discarding;
                self.discarding = flags & FLAG_MORE != 0;
                if first {
                    return Ok(Some(SubEvent::Oversized(so_far + len)));
                }
                continue;
            }
            let end = self.pos + head + len as usize;
            if self.buf.len() < end {
                // A big frame: make room for all of it at once.
                self.buf.reserve(end - self.buf.len());
                break;
            }
            self.pos = end;
            if flags & FLAG_MORE == 0 {
                self.msg_start = end;
            }
        }
        Ok(self.take_whole().map(SubEvent::Chunk))
    }

    /// A command from the publisher: PING is answered (the PONG goes out
    /// before the next read), ERROR ends the connection, others are ignored
    /// as RFC 37 asks.
    fn answer(&mut self, body: &[u8]) -> Result<(), ZmtpError> {
        let (name, data) = command(body)?;
        match name {
            b"PING" => {
                // RFC 37: the TTL, in tenths of a second (0: none), is how
                // long the peer lets the connection go without traffic.
                if let Some(t) = data.get(..2) {
                    let ttl = u64::from(u16::from_be_bytes([t[0], t[1]]));
                    if ttl > 0 {
                        self.ttl_until = Some(Instant::now() + Duration::from_millis(ttl * 100));
                    }
                }
                let mut pong = vec![4];
                pong.extend_from_slice(b"PONG");
                pong.extend_from_slice(data.get(2..).unwrap_or(&[]));
                encode_frame(FLAG_COMMAND, &pong, &mut self.out);
                Ok(())
            }
            b"PONG" if self.leaving && data == LEAVE_CONTEXT => {
                self.left = true;
                Ok(())
            }
            b"ERROR" => protocol(format!(
                "publisher sent ERROR: {}",
                String::from_utf8_lossy(data.get(1..).unwrap_or(&[]))
            )),
            _ => Ok(()),
        }
    }

    /// Splits off the whole messages buffered so far, if any.
    fn take_whole(&mut self) -> Option<Chunk> {
        if self.msg_start == 0 {
            return None;
        }
        let chunk = self.buf.split_to(self.msg_start).freeze();
        self.pos -= self.msg_start;
        self.msg_start = 0;
        Some(chunk)
    }
}

/// An end of the connection in the handshake, said as what it likely is:
/// a libzmq publisher that requires CURVE or PLAIN closes once it has read
/// our greeting (after at most its own signature), which read as a bare
/// "early eof", like a network fault.
fn closed_in_handshake(e: ZmtpError) -> ZmtpError {
    match e {
        ZmtpError::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            ) =>
        {
            ZmtpError::Protocol(format!(
                "the peer closed the connection during the handshake ({io}): \
                 nbpy speaks only the NULL security mechanism, and a peer that \
                 requires CURVE or PLAIN does this (so does a publisher serving \
                 all the connections it may)"
            ))
        }
        e => e,
    }
}

/// A PING command frame (RFC 37): `ttl` (0: none) in tenths of a second,
/// at most 6553.5 s, then `context`.
fn ping(ttl: Duration, context: &[u8]) -> Vec<u8> {
    let tenths = (ttl.as_millis() / 100).min(u128::from(u16::MAX)) as u16;
    let mut body = vec![4];
    body.extend_from_slice(b"PING");
    body.extend_from_slice(&tenths.to_be_bytes());
    body.extend_from_slice(context);
    let mut out = Vec::new();
    encode_frame(FLAG_COMMAND, &body, &mut out);
    out
}

/// A frame header at the start of `b`: (flags, header length, body length),
/// or `None` until all of it is there.
fn header(b: &[u8]) -> Result<Option<(u8, usize, u64)>, ZmtpError> {
    let Some(&flags) = b.first() else {
        return Ok(None);
    };
    if flags & !(FLAG_MORE | FLAG_LONG | FLAG_COMMAND) != 0 {
        return protocol(format!("reserved frame flag bits set: {flags:#04x}"));
    }
    if flags & FLAG_LONG == 0 {
        return Ok(b.get(1).map(|&n| (flags, 2, n as u64)));
    }
    Ok(b.get(1..9).map(|l| {
        let mut n = [0u8; 8];
        n.copy_from_slice(l);
        (flags, 9, u64::from_be_bytes(n))
    }))
}

/// One message of a [`Chunk`]: its first two frames (a v1 message has two,
/// a legacy one one) and how many it had.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub parts: [&'a [u8]; 2],
    pub count: usize,
}

/// The messages of a chunk, in order. Commands never reach a chunk.
pub fn messages(chunk: &[u8]) -> Messages<'_> {
    Messages { rest: chunk }
}

pub struct Messages<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Messages<'a> {
    type Item = Message<'a>;

    fn next(&mut self) -> Option<Message<'a>> {
        let mut m = Message {
            parts: [&[], &[]],
            count: 0,
        };
        loop {
            // A chunk holds whole, checked frames; a short one ends it.
            let (flags, head, len) = header(self.rest).ok()??;
            let body = self.rest.get(head..head + len as usize)?;
            self.rest = &self.rest[head + len as usize..];
            if let Some(p) = m.parts.get_mut(m.count) {
                *p = body;
            }
            m.count += 1;
            if flags & FLAG_MORE == 0 {
                return Some(m);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{encode_message, socket_type, Publisher};
    use super::*;
    use tokio::net::TcpListener;

    fn collect(chunk: &[u8]) -> Vec<(Vec<u8>, Vec<u8>, usize)> {
        messages(chunk)
            .map(|m| (m.parts[0].to_vec(), m.parts[1].to_vec(), m.count))
            .collect()
    }

    async fn expect_connected(s: &mut Subscriber) {
        match tokio::time::timeout(Duration::from_secs(10), s.next()).await {
            Ok(SubEvent::Connected) => {}
            other => panic!("expected Connected, got {other:?}"),
        }
    }

    /// Everything `s` hands over until `n` messages have arrived.
    async fn receive(s: &mut Subscriber, n: usize) -> Vec<(Vec<u8>, Vec<u8>, usize)> {
        let mut got = Vec::new();
        while got.len() < n {
            match tokio::time::timeout(Duration::from_secs(10), s.next()).await {
                Ok(SubEvent::Chunk(c)) => got.extend(collect(&c)),
                other => panic!("expected data, got {other:?}"),
            }
        }
        got
    }

    #[tokio::test]
    async fn receives_what_our_publisher_sends_in_order_with_prefix_filters() {
        let mut p = Publisher::bind("127.0.0.1", 0, None).await.unwrap();
        let port = p.local_addr().port();
        let topics = ["a.".to_string(), "c".to_string()];
        let mut s = Subscriber::new("127.0.0.1", port, &topics, 1 << 20);
        expect_connected(&mut s).await;
        while p.subscriptions().len() < 2 {
            p.subscriptions_changed().await;
        }
        let big = vec![7u8; 100_000];
        let mut want = Vec::new();
        for i in 0..5000u32 {
            let topic = ["a.x", "b.y", "cz"][i as usize % 3].as_bytes();
            let body = if i % 1000 == 0 {
                big.clone()
            } else {
                i.to_be_bytes().to_vec()
            };
            p.send(&[topic, &body]).await;
            if !topic.starts_with(b"b") {
                want.push((topic.to_vec(), body, 2));
            }
        }
        // A one-frame message (the legacy codec's shape).
        p.send(&[b"a.legacy"]).await;
        want.push((b"a.legacy".to_vec(), Vec::new(), 1));
        p.flush().await;
        assert_eq!(receive(&mut s, want.len()).await, want);
    }

    #[tokio::test]
    async fn a_leave_hands_over_every_message_sent_and_the_rest_is_unheard() {
        let mut p = Publisher::bind("127.0.0.1", 0, None).await.unwrap();
        let port = p.local_addr().port();
        let leave = CancellationToken::new();
        let topics = ["a.".to_string(), "c".to_string()];
        let mut s = Subscriber::new("127.0.0.1", port, &topics, 1 << 20).leave_on(leave.clone());
        expect_connected(&mut s).await;
        while p.subscriptions().len() < 2 {
            p.subscriptions_changed().await;
        }
        // Two prefixes, one subscriber.
        assert_eq!(p.subscribers(), 1);
        // Queued and partly in the kernel, none read yet when leaving.
        for i in 0..3000u32 {
            p.send(&[b"a.x", &i.to_be_bytes()]).await;
        }
        leave.cancel();
        let mut got = 0;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), s.next()).await {
                Ok(SubEvent::Chunk(c)) => got += collect(&c).len(),
                Ok(SubEvent::Left) => break,
                other => panic!("expected data or Left, got {other:?}"),
            }
        }
        assert_eq!(got, 3000, "every message sent before the leave");
        assert_eq!(p.unheard(), 0);
        // The cancels were applied before the PONG: later sends reach no one.
        assert_eq!(p.subscribers(), 0);
        for i in 0..10u32 {
            p.send(&[b"a.x", &i.to_be_bytes()]).await;
        }
        assert_eq!(p.unheard(), 10);
        // Leaving means no reconnect.
        drop(p);
        match tokio::time::timeout(Duration::from_secs(10), s.next()).await {
            Ok(SubEvent::Down { .. }) => {}
            other => panic!("expected Down, got {other:?}"),
        }
        assert!(matches!(s.next().await, SubEvent::Down { .. }));
    }

    /// A publisher written from RFC 23's bytes: greeting, READY as `kind`.
    async fn raw_pub(l: &TcpListener, kind: &[u8]) -> TcpStream {
        let (mut c, _) = l.accept().await.unwrap();
        super::super::rfc_peer::handshake(&mut c, kind).await;
        c
    }

    /// Reads the subscriber's READY and its one subscription message.
    async fn read_ready_and_subscription(c: &mut TcpStream) -> Vec<u8> {
        let mut head = [0u8; 2];
        c.read_exact(&mut head).await.unwrap();
        assert_eq!(head[0], 0x04, "READY is a command");
        let mut ready = vec![0; head[1] as usize];
        c.read_exact(&mut ready).await.unwrap();
        assert_eq!(
            socket_type(command(&ready).unwrap().1).unwrap().unwrap(),
            "SUB"
        );
        c.read_exact(&mut head).await.unwrap();
        assert_eq!(head[0], 0x00, "a 3.0 subscription is a message");
        let mut sub = vec![0; head[1] as usize];
        c.read_exact(&mut sub).await.unwrap();
        sub
    }

    #[tokio::test]
    async fn oversized_messages_are_skipped_unbuffered_and_pings_answered() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let mut s = Subscriber::new("127.0.0.1", port, &["".into()], 1000);
        let server = tokio::spawn(async move {
            let mut c = raw_pub(&l, b"PUB").await;
            assert_eq!(read_ready_and_subscription(&mut c).await, vec![1]);
            let mut out = Vec::new();
            encode_message(&[b"t", b"before"], &mut out);
            // Oversized body, with a frame after it in the same message.
            encode_message(&[b"t", &[9u8; 5000], b"tail"], &mut out);
            // A PING between messages: TTL 0, context "ctx".
            encode_frame(FLAG_COMMAND, b"\x04PING\x00\x00ctx", &mut out);
            encode_message(&[b"t", b"after"], &mut out);
            // Dribbled a few bytes at a time: every boundary gets split.
            for piece in out.chunks(7) {
                c.write_all(piece).await.unwrap();
                c.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let mut pong = [0u8; 2 + 1 + 4 + 3];
            c.read_exact(&mut pong).await.unwrap();
            pong
        });
        expect_connected(&mut s).await;
        let mut got = Vec::new();
        let mut oversized = Vec::new();
        while got.len() < 2 {
            match tokio::time::timeout(Duration::from_secs(10), s.next()).await {
                Ok(SubEvent::Chunk(c)) => got.extend(collect(&c)),
                Ok(SubEvent::Oversized(n)) => oversized.push(n),
                other => panic!("unexpected {other:?}"),
            }
        }
        let bodies: Vec<_> = got.iter().map(|m| m.1.clone()).collect();
        assert_eq!(bodies, vec![b"before".to_vec(), b"after".to_vec()]);
        // The topic frame (2 + 1 bytes) and the oversized body.
        assert_eq!(oversized, vec![3 + 5000]);
        assert!(
            s.peak < 1000,
            "the big frame was buffered: {} bytes",
            s.peak
        );
        // The PONG goes out before the next read; the server closes once it
        // has it.
        match tokio::time::timeout(Duration::from_secs(10), s.next()).await {
            Ok(SubEvent::Down {
                was_connected: true,
                ..
            }) => {}
            other => panic!("expected the server to close, got {other:?}"),
        }
        let pong = server.await.unwrap();
        assert_eq!(&pong, b"\x04\x08\x04PONGctx");
    }

    #[tokio::test]
    async fn a_multipart_message_that_never_ends_is_skipped_not_buffered() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let mut s = Subscriber::new("127.0.0.1", port, &["".into()], 1000);
        tokio::spawn(async move {
            let mut c = raw_pub(&l, b"PUB").await;
            read_ready_and_subscription(&mut c).await;
            // 100 KB of 100-byte frames, every one with MORE, then an end
            // and a good message.
            let mut out = Vec::new();
            for _ in 0..1000 {
                encode_frame(FLAG_MORE, &[5u8; 100], &mut out);
            }
            encode_frame(0, b"end", &mut out);
            encode_message(&[b"t", b"good"], &mut out);
            c.write_all(&out).await.unwrap();
            // Held open until the test is done.
            let mut rest = Vec::new();
            let _ = c.read_to_end(&mut rest).await;
        });
        expect_connected(&mut s).await;
        let mut oversized = 0;
        let got = loop {
            match tokio::time::timeout(Duration::from_secs(10), s.next()).await {
                Ok(SubEvent::Oversized(n)) => {
                    assert!(n > 2000, "{n}");
                    oversized += 1;
                }
                Ok(SubEvent::Chunk(c)) => break collect(&c),
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(oversized, 1);
        assert_eq!(got, vec![(b"t".to_vec(), b"good".to_vec(), 2)]);
        assert!(s.peak < 64 * 1024 + 2100, "buffered {} bytes", s.peak);
    }

    #[tokio::test]
    async fn a_wrong_peer_is_refused_and_a_restarted_publisher_rejoined() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let mut s = Subscriber::new("127.0.0.1", port, &["".into()], 1 << 20);
        let wrong = tokio::spawn(async move {
            let c = raw_pub(&l, b"SUB").await;
            (l, c)
        });
        match s.next().await {
            SubEvent::Down {
                reason,
                was_connected: false,
            } => assert!(reason.contains("not a publisher"), "{reason}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        let (l, _c) = wrong.await.unwrap();
        // A real publisher on the same port, then it goes away.
        let server = tokio::spawn(async move {
            let mut c = raw_pub(&l, b"XPUB").await;
            read_ready_and_subscription(&mut c).await;
            let mut out = Vec::new();
            encode_message(&[b"t", b"one"], &mut out);
            c.write_all(&out).await.unwrap();
            drop(c);
            l
        });
        expect_connected(&mut s).await;
        assert_eq!(receive(&mut s, 1).await[0].1, b"one");
        let l = server.await.unwrap();
        match s.next().await {
            SubEvent::Down {
                was_connected: true,
                ..
            } => {}
            other => panic!("expected the loss, got {other:?}"),
        }
        // Back within the capped backoff.
        let t0 = std::time::Instant::now();
        let again = tokio::spawn(async move {
            let mut c = raw_pub(&l, b"PUB").await;
            read_ready_and_subscription(&mut c).await;
        });
        expect_connected(&mut s).await;
        again.await.unwrap();
        assert!(t0.elapsed() < BACKOFF_MAX + Duration::from_secs(1));
    }

    /// Reads frames from the subscriber until `n` liveness PINGs came,
    /// answering each with a PONG when `answer`.
    async fn take_pings(c: &mut TcpStream, n: usize, answer: bool) {
        let mut seen = 0;
        while seen < n {
            let mut head = [0u8; 2];
            c.read_exact(&mut head).await.unwrap();
            let mut body = vec![0; head[1] as usize];
            c.read_exact(&mut body).await.unwrap();
            if head[0] == FLAG_COMMAND && body.starts_with(b"\x04PING\x00\x00") {
                assert_eq!(&body[7..], HEARTBEAT_CONTEXT);
                seen += 1;
                if answer {
                    let mut pong = b"\x04PONG".to_vec();
                    pong.extend_from_slice(&body[7..]);
                    let mut out = Vec::new();
                    encode_frame(FLAG_COMMAND, &pong, &mut out);
                    c.write_all(&out).await.unwrap();
                }
            }
        }
    }

    /// A 3.1 publisher that answers PINGs keeps a quiet connection up
    /// well past the silence limit; one that goes quiet and answers
    /// nothing is given up, and connected to again.
    #[tokio::test]
    async fn a_silent_publisher_is_pinged_and_given_up_when_it_never_answers() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let mut s = Subscriber::new("127.0.0.1", port, &["".into()], 1 << 20)
            .liveness(Duration::from_millis(50), Duration::from_millis(200));
        let server = tokio::spawn(async move {
            let mut c = raw_pub(&l, b"PUB").await;
            read_ready_and_subscription(&mut c).await;
            // 10 PINGs answered: 500 ms of no data, over twice the limit.
            take_pings(&mut c, 10, true).await;
            let mut out = Vec::new();
            encode_message(&[b"t", b"still here"], &mut out);
            c.write_all(&out).await.unwrap();
            // Then silence, the connection held open.
            take_pings(&mut c, 2, false).await;
            let again = raw_pub(&l, b"PUB").await;
            (c, again)
        });
        expect_connected(&mut s).await;
        assert_eq!(receive(&mut s, 1).await[0].1, b"still here");
        match tokio::time::timeout(Duration::from_secs(10), s.next()).await {
            Ok(SubEvent::Down {
                reason,
                was_connected: true,
            }) => assert!(
                reason.contains("nothing received for") && reason.contains("presumed dead"),
                "{reason}"
            ),
            other => panic!("expected the silent connection given up, got {other:?}"),
        }
        expect_connected(&mut s).await;
        server.await.unwrap();
    }

    /// A peer's PING with a TTL (tenths of a second) ends the connection
    /// when nothing follows it within the TTL, even from a 3.0 peer that
    /// we do not PING ourselves.
    #[tokio::test]
    async fn a_ping_ttl_is_honoured() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let mut s = Subscriber::new("127.0.0.1", port, &["".into()], 1 << 20);
        let server = tokio::spawn(async move {
            let (mut c, _) = l.accept().await.unwrap();
            let mut g = [0u8; 64];
            (g[0], g[9], g[10], g[11]) = (0xFF, 0x7F, 3, 0);
            g[12..16].copy_from_slice(b"NULL");
            c.write_all(&g).await.unwrap();
            let mut theirs = [0u8; 64];
            c.read_exact(&mut theirs).await.unwrap();
            let mut out = Vec::new();
            let ready = b"\x05READY\x0bSocket-Type\x00\x00\x00\x03PUB";
            encode_frame(FLAG_COMMAND, ready, &mut out);
            c.write_all(&out).await.unwrap();
            read_ready_and_subscription(&mut c).await;
            // TTL 0.3 s, then nothing.
            out.clear();
            encode_frame(FLAG_COMMAND, b"\x04PING\x00\x03", &mut out);
            c.write_all(&out).await.unwrap();
            let mut rest = Vec::new();
            let _ = c.read_to_end(&mut rest).await;
        });
        expect_connected(&mut s).await;
        match tokio::time::timeout(Duration::from_secs(10), s.next()).await {
            Ok(SubEvent::Down {
                reason,
                was_connected: true,
            }) => assert!(reason.contains("TTL"), "{reason}"),
            other => panic!("expected the connection given up, got {other:?}"),
        }
        server.await.unwrap();
    }

    /// libzmq with CURVE or PLAIN required closes after (at most) its
    /// signature: said as a handshake refusal, not "early eof".
    #[tokio::test]
    async fn a_close_in_the_handshake_names_the_security_mechanism() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let mut s = Subscriber::new("127.0.0.1", port, &["".into()], 1 << 20);
        tokio::spawn(async move {
            let (mut c, _) = l.accept().await.unwrap();
            let mut theirs = [0u8; 64];
            c.read_exact(&mut theirs).await.unwrap();
            c.write_all(&[0xFF, 0, 0, 0, 0, 0, 0, 0, 1, 0x7F])
                .await
                .unwrap();
        });
        match s.next().await {
            SubEvent::Down {
                reason,
                was_connected: false,
            } => assert!(
                reason.contains("closed the connection during the handshake")
                    && reason.contains("only the NULL security mechanism"),
                "{reason}"
            ),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_chunk_iterates_messages_of_any_frame_count() {
        let mut c = Vec::new();
        encode_message(&[b"one"], &mut c);
        encode_message(&[b"t", b"two"], &mut c);
        encode_message(&[b"t", b"x", b"three"], &mut c);
        let got: Vec<_> = messages(&c).map(|m| (m.parts, m.count)).collect();
        assert_eq!(
            got,
            vec![
                ([&b"one"[..], &b""[..]], 1),
                ([&b"t"[..], &b"two"[..]], 2),
                ([&b"t"[..], &b"x"[..]], 3),
            ]
        );
    }
}
