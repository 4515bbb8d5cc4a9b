//! The bus's own ZMTP 3.0 (RFC 23, NULL mechanism): framing and handshake,
//! the publishing end with XPUB semantics (here), and the subscribing end
//! ([`sub`]).
//!
//! Why not the `zeromq` crate for publishing (the monitors' taps still use
//! its SUB):
//! its XPUB flushes each message to the socket on its own, one `sendto`
//! per message per subscriber. Profiled under the end-to-end benchmark
//! that was the largest cost of a publisher (about half its CPU, plus a
//! wake-up of the subscriber per message). Here each subscriber has a
//! byte buffer that `send` appends the encoded frames to and a writer task
//! that takes the whole buffer per write: one message when idle (no added
//! latency), whatever piled up under load (one syscall for many). It also
//! sees subscribers go away, which the crate's XPUB never reported.
//!
//! Semantics kept from XPUB: a message goes to every peer with a matching
//! prefix subscription; `send` waits while a matching peer's buffer is
//! over its high-water mark (a slow subscriber slows the publisher rather
//! than losing messages); the application learns that subscriptions
//! changed ([`Publisher::subscriptions_changed`]).
//!
//! Where it differs from XPUB: a subscriber whose queue stays full with no
//! byte written to it for [`Publisher::set_stall_limit`] (a process
//! stopped with SIGSTOP, a peer that stopped reading but keeps the
//! connection) is disconnected, its queued messages counted as not
//! delivered: waiting for it without a limit froze every feed behind it,
//! and it sees what it missed as a `seq` gap when it reconnects. A peer
//! that reads, however slowly, is waited for.
//!
//! One addition: a peer that subscribes to the publisher's "lossy" topic (a
//! topic no message has; nbpy's monitors send it) is not waited for. A
//! health daemon or validator that stalls loses messages itself, counted,
//! instead of stalling every feed behind it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::sink::RateLimitedLog;

pub mod sub;

/// Bytes buffered per subscriber before `send` waits for it.
pub const HIGH_WATER_BYTES: usize = 1 << 20;
/// How long a subscriber may leave its full queue untouched before it is
/// disconnected, unless [`Publisher::set_stall_limit`] says otherwise.
pub const DEFAULT_STALL_LIMIT: Duration = Duration::from_secs(10);
/// The most of a PING's context a PONG echoes. ZMTP 3.1 (RFC 37) allows
/// at most 16 bytes; a longer one is cut to 16, as libzmq does, rather than
/// taken as a protocol error, so a sloppy peer keeps its connection while
/// a PONG costs a bounded, small amount of memory.
const MAX_PING_CONTEXT: usize = 16;
/// Connections a publisher serves at once, subscribed or still in their
/// handshake; one more is closed as soon as accepted (counted, and logged
/// rate-limited). Each costs a task, a socket and up to `HIGH_WATER_BYTES`
/// plus `MAX_SUBSCRIPTION_BYTES`: this bounds them all to about 1 GiB, far
/// above the handful of subscribers and monitors a feed has.
const MAX_PEERS: usize = 1024;
/// The most often a WARN about single connections is written.
const LOG_EVERY: Duration = Duration::from_secs(5);
/// A peer must finish greeting and handshake within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections in their handshake at once. One more closes the oldest of
/// them: a subscriber greets within a round trip, so under a flood of
/// connections that never greet (which would otherwise hold every one of
/// the `MAX_PEERS` slots for `HANDSHAKE_TIMEOUT`, again and again) the
/// ones that do greet still get in.
const MAX_HANDSHAKES: usize = 64;
/// Frames a subscriber may send us are subscriptions and small commands:
/// a longer one in the handshake ends the connection; after it, it is
/// skipped unbuffered (see [`read_inbound`]).
const MAX_INBOUND_FRAME: u64 = 64 * 1024;
/// The longest topic prefix a peer may subscribe to. nbpy's topics are
/// `source.channel.symbol`, tens of bytes; a longer prefix matches nothing
/// and would only be memory held for as long as the peer stays.
const MAX_TOPIC: usize = 1024;
/// What one peer's subscriptions may cost, each counted as its topic plus
/// `SUBSCRIPTION_OVERHEAD` (its slot and allocation): at most 64 KiB, about
/// 2,000 short prefixes. Without it a peer could hold 10,000 subscriptions
/// of 64 KiB (655 MB), and every connection as many.
///
/// A subscription past either limit is ignored, with a WARN naming the
/// peer, and the peer keeps its connection and what it holds. Dropping it
/// instead would only have a libzmq SUB reconnect and send the same
/// subscriptions again, with gaps in what it does receive each time.
const MAX_SUBSCRIPTION_BYTES: usize = 64 * 1024;
const SUBSCRIPTION_OVERHEAD: usize = 32;

const FLAG_MORE: u8 = 0x01;
const FLAG_LONG: u8 = 0x02;
const FLAG_COMMAND: u8 = 0x04;

/// A subscription change a peer asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Subscribe(Vec<u8>),
    Unsubscribe(Vec<u8>),
}

#[derive(Debug, thiserror::Error)]
pub enum ZmtpError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("ZMTP protocol: {0}")]
    Protocol(String),
}

fn protocol<T>(msg: impl Into<String>) -> Result<T, ZmtpError> {
    Err(ZmtpError::Protocol(msg.into()))
}

/// Appends one ZMTP message (its frames, MORE on all but the last).
pub fn encode_message(frames: &[&[u8]], out: &mut Vec<u8>) {
    let last = frames.len().saturating_sub(1);
    for (i, f) in frames.iter().enumerate() {
        let more = if i < last { FLAG_MORE } else { 0 };
        encode_frame(more, f, out);
    }
}

fn encode_frame(flags: u8, body: &[u8], out: &mut Vec<u8>) {
    if body.len() <= 255 {
        out.push(flags);
        out.push(body.len() as u8);
    } else {
        out.push(flags | FLAG_LONG);
        out.extend_from_slice(&(body.len() as u64).to_be_bytes());
    }
    out.extend_from_slice(body);
}

/// Our greeting as socket type `ours`: NULL mechanism, not as-server.
/// A subscriber announces ZMTP 3.0, which has libzmq publishers take its
/// subscriptions as messages. The publisher announces 3.1 (RFC 37): it
/// answers PINGs and understands the 3.1 SUBSCRIBE/CANCEL commands, and
/// 3.1 is what tells our subscriber that a silent connection can be
/// probed with PINGs (see [`sub`]).
fn greeting(ours: &str) -> [u8; 64] {
    let mut g = [0u8; 64];
    g[0] = 0xFF;
    g[8] = 1; // libzmq's padding: identity length + 1, for old peers
    g[9] = 0x7F;
    g[10] = 3;
    g[11] = u8::from(ours == "XPUB");
    g[12..16].copy_from_slice(b"NULL");
    g
}

fn check_greeting(g: &[u8; 64]) -> Result<(), ZmtpError> {
    if g[0] != 0xFF || g[9] & 1 != 1 {
        return protocol("peer does not speak ZMTP 3 (bad signature)");
    }
    if g[10] < 3 {
        return protocol(format!("peer speaks ZMTP {}.{}, need 3.x", g[10], g[11]));
    }
    let mech = &g[12..32];
    let end = mech.iter().position(|&b| b == 0).unwrap_or(mech.len());
    if &mech[..end] != b"NULL" {
        return protocol(format!(
            "peer wants security mechanism {:?}; only NULL is supported",
            String::from_utf8_lossy(&mech[..end])
        ));
    }
    Ok(())
}

fn ready_command(socket_type: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.push(5);
    body.extend_from_slice(b"READY");
    body.push(11);
    body.extend_from_slice(b"Socket-Type");
    body.extend_from_slice(&(socket_type.len() as u32).to_be_bytes());
    body.extend_from_slice(socket_type.as_bytes());
    let mut out = Vec::new();
    encode_frame(FLAG_COMMAND, &body, &mut out);
    out
}

/// TCP keepalive on bus connections: first probe after this much idle
/// time, then every `KEEPALIVE_INTERVAL`, dead after `KEEPALIVE_PROBES`
/// unanswered (about 25 s). It finds a peer whose host vanished (reset,
/// partition, a NAT or firewall that forgot the connection: no FIN or RST
/// ever arrives) where ZMTP PINGs cannot be used, a ZMTP 3.0 peer, and
/// lets a publisher drop a dead subscriber whose queue is not full.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_PROBES: u32 = 3;

/// Turns on TCP keepalive with the times above. Best effort: a socket
/// that refuses keeps working without it.
fn keep_alive(s: &TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    if let Err(e) = socket2::SockRef::from(s).set_tcp_keepalive(&ka) {
        tracing::debug!("bus: no TCP keepalive on a connection: {e}");
    }
}

/// A frame as read from a peer.
#[derive(Debug)]
struct Frame {
    flags: u8,
    body: Vec<u8>,
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, ZmtpError> {
    let (flags, len) = read_header(r).await?;
    if len > MAX_INBOUND_FRAME {
        return protocol(format!(
            "peer sent a {len}-byte frame where at most {MAX_INBOUND_FRAME} are expected (handshake, subscriptions)"
        ));
    }
    let mut body = vec![0; len as usize];
    r.read_exact(&mut body).await?;
    Ok(Frame { flags, body })
}

/// A frame's flags and body length.
async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<(u8, u64), ZmtpError> {
    let flags = r.read_u8().await?;
    if flags & !(FLAG_MORE | FLAG_LONG | FLAG_COMMAND) != 0 {
        return protocol(format!("reserved frame flag bits set: {flags:#04x}"));
    }
    let len = if flags & FLAG_LONG != 0 {
        r.read_u64().await?
    } else {
        r.read_u8().await? as u64
    };
    Ok((flags, len))
}

/// How much of a frame over `MAX_INBOUND_FRAME` is kept: enough for a
/// command's name and the start of a topic, for the WARN.
const SKIPPED_HEAD: usize = 64 + 16;

/// A frame from a subscriber after its handshake. One over
/// `MAX_INBOUND_FRAME` (a subscription to a 64 KiB topic: libzmq sends
/// it, and again after every reconnect) is read and thrown away as it
/// arrives, only its first `SKIPPED_HEAD` bytes kept (`skipped` is its
/// whole length): memory stays bounded and the peer keeps its connection
/// and its other subscriptions.
async fn read_inbound<R: AsyncRead + Unpin>(r: &mut R) -> Result<(Frame, Option<u64>), ZmtpError> {
    let (flags, len) = read_header(r).await?;
    if len <= MAX_INBOUND_FRAME {
        let mut body = vec![0; len as usize];
        r.read_exact(&mut body).await?;
        return Ok((Frame { flags, body }, None));
    }
    let mut body = vec![0; SKIPPED_HEAD];
    r.read_exact(&mut body).await?;
    let rest = len - SKIPPED_HEAD as u64;
    let thrown = tokio::io::copy(&mut r.take(rest), &mut tokio::io::sink()).await?;
    if thrown < rest {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    Ok((Frame { flags, body }, Some(len)))
}

/// Splits a command body into its name and data.
fn command(body: &[u8]) -> Result<(&[u8], &[u8]), ZmtpError> {
    let Some((&n, rest)) = body.split_first() else {
        return protocol("empty command");
    };
    if rest.len() < n as usize {
        return protocol("command name longer than its frame");
    }
    Ok(rest.split_at(n as usize))
}

/// The `Socket-Type` property of a READY command's metadata.
fn socket_type(mut props: &[u8]) -> Result<Option<String>, ZmtpError> {
    while let Some((&n, rest)) = props.split_first() {
        let n = n as usize;
        if rest.len() < n + 4 {
            return protocol("truncated READY metadata");
        }
        let (name, rest) = rest.split_at(n);
        let vlen = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let rest = &rest[4..];
        if rest.len() < vlen {
            return protocol("truncated READY metadata value");
        }
        let (value, rest) = rest.split_at(vlen);
        if name.eq_ignore_ascii_case(b"Socket-Type") {
            return Ok(Some(String::from_utf8_lossy(value).into_owned()));
        }
        props = rest;
    }
    Ok(None)
}

/// What one subscriber connection shares between `send`, its writer and
/// its reader.
struct Peer {
    addr: SocketAddr,
    state: Mutex<PeerState>,
    /// Data appended or the peer closed: wakes the writer.
    data: Notify,
    /// Buffer taken, write finished or peer closed: wakes waiting senders
    /// (and the reader, waiting to queue a PONG).
    space: Notify,
    /// Bytes handed to the kernel so far: a waiting sender tells a slow
    /// reader (this moves) from a stalled one (it does not).
    written: AtomicU64,
    /// Cancelled to disconnect a stalled peer: its writer may be stuck in
    /// a write that only the peer reading would finish.
    evicted: CancellationToken,
}

#[derive(Default)]
struct PeerState {
    buf: Vec<u8>,
    subs: Vec<Vec<u8>>,
    /// What `subs` costs, as `MAX_SUBSCRIPTION_BYTES` counts it.
    sub_bytes: usize,
    writing: bool,
    closed: bool,
    /// Subscribed to the lossy topic: full buffer → drop, not wait.
    lossy: bool,
    /// Where each message in `buf` ends (PONGs are not messages): their
    /// number is what a disconnect or a stop leaves undelivered; swapped
    /// with `in_flight_ends` as the writer takes `buf`.
    ends: Vec<usize>,
    /// The same for the write under way, and the peer's `written` when it
    /// began: a disconnect counts only the messages of it that the kernel
    /// had not taken whole, as the rest still reaches the peer.
    in_flight_ends: Vec<usize>,
    in_flight_base: u64,
}

impl PeerState {
    /// Messages of the write under way not yet handed whole to the kernel,
    /// given the peer's `written` now.
    fn in_flight_unsent(&self, written: u64) -> u64 {
        let done = written.saturating_sub(self.in_flight_base);
        self.in_flight_ends
            .iter()
            .filter(|&&end| end as u64 > done)
            .count() as u64
    }
}

impl Peer {
    fn lock(&self) -> MutexGuard<'_, PeerState> {
        // A panic while holding the lock cannot leave the buffer half
        // written in a way that matters more than losing the peer.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a subscription change to the peer's set of topics, as
    /// libzmq's XPUB keeps them: subscribing twice to a topic is once, and
    /// one cancel ends it (a repeat or a cancel of a topic not held is no
    /// change, and XPUB reports none). A subscription past `MAX_TOPIC` or
    /// `MAX_SUBSCRIPTION_BYTES` is not taken.
    fn apply(&self, ev: &Event, lossy: Option<&[u8]>) -> Applied {
        let mut st = self.lock();
        let applied = match ev {
            Event::Subscribe(t) if st.subs.contains(t) => Applied::Unchanged,
            Event::Subscribe(t) if t.len() > MAX_TOPIC => Applied::TooLong,
            Event::Subscribe(t) => {
                let cost = t.len() + SUBSCRIPTION_OVERHEAD;
                if st.sub_bytes + cost > MAX_SUBSCRIPTION_BYTES {
                    Applied::OverBudget
                } else {
                    st.sub_bytes += cost;
                    st.subs.push(t.clone());
                    Applied::Changed
                }
            }
            Event::Unsubscribe(t) => match st.subs.iter().position(|s| s == t) {
                Some(i) => {
                    let gone = st.subs.swap_remove(i);
                    st.sub_bytes -= gone.len() + SUBSCRIPTION_OVERHEAD;
                    Applied::Changed
                }
                None => Applied::Unchanged,
            },
        };
        st.lossy = lossy.is_some_and(|l| st.subs.iter().any(|s| s == l));
        applied
    }

    /// Waits until the peer's buffer is under its high-water mark, so that
    /// what it asks for itself (PONGs) cannot grow it past the mark: until
    /// then its reader reads nothing more, and TCP makes a peer that sends
    /// without reading wait. Returns false once the peer is closed.
    async fn room_for_commands(&self) -> bool {
        loop {
            let space = self.space.notified();
            {
                let st = self.lock();
                if st.closed {
                    return false;
                }
                if st.buf.len() < HIGH_WATER_BYTES {
                    return true;
                }
            }
            space.await;
            if self.lock().buf.len() < HIGH_WATER_BYTES {
                // The writer's `notify_one` may have been meant for a
                // sender waiting on this peer: pass it on (a sender woken
                // for nothing checks again and waits).
                self.space.notify_one();
            }
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.data.notify_one();
        self.space.notify_waiters();
        self.space.notify_one();
    }

    /// Disconnects the peer at once, even mid-write; returns how many
    /// messages it had not been handed yet: its queue, and those of the
    /// write under way that the kernel had not taken whole (what it took
    /// still reaches the peer: the socket is closed, not reset).
    fn evict(&self) -> u64 {
        let pending = {
            let mut st = self.lock();
            st.closed = true;
            st.buf = Vec::new();
            let queued = std::mem::take(&mut st.ends).len() as u64;
            let unsent = st.in_flight_unsent(self.written.load(Ordering::Relaxed));
            st.in_flight_ends = Vec::new();
            queued + unsent
        };
        self.evicted.cancel();
        self.close();
        pending
    }
}

/// What became of a subscription change.
enum Applied {
    Changed,
    Unchanged,
    /// A topic longer than `MAX_TOPIC`: ignored.
    TooLong,
    /// Past the peer's `MAX_SUBSCRIPTION_BYTES`: ignored.
    OverBudget,
}

enum Offer {
    /// Closed, or not subscribed to this topic.
    Skipped,
    /// A lossy peer over its high-water mark: not queued.
    Dropped,
    /// Appended; `wake` when the buffer was empty (the writer may sleep);
    /// `lossy` when the peer is a monitor, not a subscriber.
    Queued { wake: bool, lossy: bool },
    /// Over the high-water mark: wait for the writer.
    Full,
}

impl Peer {
    fn offer(&self, frames: &[&[u8]], topic: &[u8]) -> Offer {
        let mut st = self.lock();
        if st.closed || !matches(&st.subs, topic) {
            return Offer::Skipped;
        }
        if st.buf.len() >= HIGH_WATER_BYTES {
            return if st.lossy {
                Offer::Dropped
            } else {
                Offer::Full
            };
        }
        let wake = st.buf.is_empty();
        encode_message(frames, &mut st.buf);
        let end = st.buf.len();
        st.ends.push(end);
        Offer::Queued {
            wake,
            lossy: st.lossy,
        }
    }
}

fn matches(subs: &[Vec<u8>], topic: &[u8]) -> bool {
    // The empty prefix (everything) is the common subscription: answered
    // without a comparison call per message.
    subs.iter().any(|s| s.is_empty() || topic.starts_with(s))
}

struct Shared {
    peers: Mutex<Vec<Arc<Peer>>>,
    lossy: Option<Vec<u8>>,
    /// Messages not queued for lossy peers that were full.
    dropped: AtomicU64,
    /// Messages no subscriber (monitors aside) was subscribed to: sent into
    /// the void, as PUB does, but counted, so a stop that leaves them
    /// undelivered is accounted for.
    unheard: AtomicU64,
    /// Bumped on every change of `peers`, so `send` re-reads its copy only then.
    generation: AtomicU64,
    /// Subscribers disconnected for stalling (or for not taking their
    /// messages before a stop's limit), and the messages they did not get.
    stalled: AtomicU64,
    undelivered: AtomicU64,
    /// Bumped after every change of some peer's subscriptions (a peer
    /// leaving included). Only that they changed is told, not a queue of
    /// changes, which grew without bound (a copy of each topic) while the
    /// application was busy and a peer churned subscriptions.
    changes: watch::Sender<u64>,
    /// Connections turned away: a handshake that failed or took too long,
    /// or one past `MAX_PEERS`.
    refused: AtomicU64,
    /// Shared by the WARNs about single connections (refused, dropped): a
    /// flood of them wrote a line each (1,500 for 1,000 half-open
    /// connections). One per interval, with how many were held back.
    conn_log: Mutex<RateLimitedLog>,
    /// The same for subscriptions ignored (one line per peer at most).
    subs_log: Mutex<RateLimitedLog>,
}

impl Shared {
    fn peers(&self) -> MutexGuard<'_, Vec<Arc<Peer>>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remove(&self, peer: &Arc<Peer>) {
        let mut peers = self.peers();
        let before = peers.len();
        peers.retain(|p| !Arc::ptr_eq(p, peer));
        if peers.len() != before {
            self.generation.fetch_add(1, Ordering::Release);
        }
    }

    /// A WARN through `conn_log`.
    fn warn_conn(&self, what: impl FnOnce() -> String) {
        let mut log = self.conn_log.lock().unwrap_or_else(|p| p.into_inner());
        crate::warn_limited!(log, what);
    }

    /// Counts a connection turned away, and says so through `conn_log`.
    fn refuse(&self, what: impl FnOnce() -> String) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        self.warn_conn(what);
    }

    /// A WARN through `subs_log`.
    fn warn_subs(&self, what: impl FnOnce() -> String) {
        let mut log = self.subs_log.lock().unwrap_or_else(|p| p.into_inner());
        crate::warn_limited!(log, what);
    }

    fn subscriptions_changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// A bound XPUB-like socket.
pub struct Publisher {
    shared: Arc<Shared>,
    changes: watch::Receiver<u64>,
    local: Vec<Arc<Peer>>,
    generation: u64,
    accept: tokio::task::JoinHandle<()>,
    local_addr: SocketAddr,
    stall_limit: Duration,
    /// Set once a stop is under way: waits for a subscriber end by then.
    stop_by: Option<Instant>,
    /// A message a full subscriber has not taken yet (see [`Publisher::try_send`]).
    held: Option<Held>,
}

/// What a held message waits for ([`Publisher::retry`]): room in a full
/// subscriber's queue, or the time to judge it stalled.
pub struct HeldWait {
    peer: Arc<Peer>,
    until: Instant,
}

impl HeldWait {
    /// Returns at the first of the two; then [`Publisher::retry`] again.
    pub async fn wait(self) {
        tokio::select! {
            _ = self.peer.space.notified() => {}
            _ = tokio::time::sleep_until(self.until.into()) => {}
        }
    }
}

/// A message that is queued for some peers and waits for a full one: kept
/// here, not in a future, so the wait can be given up (for a stop, a
/// STATUS) and taken up again without queueing it twice for anyone.
struct Held {
    frames: Vec<Vec<u8>>,
    /// The peers it still has to be offered to; the first is the full one.
    peers: Vec<Arc<Peer>>,
    /// A subscriber (not a monitor) already has it.
    heard: bool,
    /// When the wait for `peers[0]` began, for STATUS.
    since: Instant,
    /// When `peers[0]` last made progress, and its `written` then.
    progress: (Instant, u64),
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.accept.abort();
        for p in self.shared.peers().drain(..) {
            p.close();
        }
    }
}

impl Publisher {
    /// Binds `host:port` (`*` for every interface, port 0 for any). Peers
    /// that subscribe to `lossy` are never waited for.
    pub async fn bind(host: &str, port: u16, lossy: Option<&[u8]>) -> Result<Self, ZmtpError> {
        Self::bind_serving(host, port, lossy, MAX_PEERS).await
    }

    /// [`Self::bind`], serving at most `max_peers` connections at once.
    async fn bind_serving(
        host: &str,
        port: u16,
        lossy: Option<&[u8]>,
        max_peers: usize,
    ) -> Result<Self, ZmtpError> {
        let host = match host {
            "*" => "0.0.0.0",
            h => h.trim_start_matches('[').trim_end_matches(']'),
        };
        let listener = TcpListener::bind((host, port)).await?;
        let local_addr = listener.local_addr()?;
        let (changes, changes_seen) = watch::channel(0);
        let shared = Arc::new(Shared {
            peers: Mutex::new(Vec::new()),
            lossy: lossy.map(|l| l.to_vec()),
            dropped: AtomicU64::new(0),
            unheard: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            stalled: AtomicU64::new(0),
            undelivered: AtomicU64::new(0),
            changes,
            refused: AtomicU64::new(0),
            conn_log: Mutex::new(RateLimitedLog::new(LOG_EVERY)),
            subs_log: Mutex::new(RateLimitedLog::new(LOG_EVERY)),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone(), max_peers));
        Ok(Publisher {
            shared,
            changes: changes_seen,
            local: Vec::new(),
            generation: u64::MAX,
            accept,
            local_addr,
            stall_limit: DEFAULT_STALL_LIMIT,
            stop_by: None,
            held: None,
        })
    }

    /// How long a subscriber may leave its full queue untouched (no byte
    /// written to it) before it is disconnected.
    pub fn set_stall_limit(&mut self, limit: Duration) {
        self.stall_limit = limit;
    }

    /// A stop is under way: from now on no wait for a subscriber lasts
    /// past `deadline`; one still full then is disconnected and counted.
    pub fn stop_by(&mut self, deadline: Instant) {
        self.stop_by = Some(deadline);
    }

    /// Subscribers disconnected because they stopped taking messages, and
    /// how many messages they did not get.
    pub fn stalled(&self) -> (u64, u64) {
        (
            self.shared.stalled.load(Ordering::Relaxed),
            self.shared.undelivered.load(Ordering::Relaxed),
        )
    }

    /// A message is held for a full subscriber: [`Publisher::resume`]
    /// (or [`Publisher::retry`] until it returns `None`) before the next
    /// [`Publisher::try_send`].
    pub fn is_held(&self) -> bool {
        self.held.is_some()
    }

    /// The subscriber a held message waits for, and for how long: for
    /// STATUS, which must say what the publisher waits for.
    pub fn waiting_for(&self) -> Option<(SocketAddr, Duration)> {
        self.held
            .as_ref()
            .and_then(|h| h.peers.first().map(|p| (p.addr, h.since.elapsed())))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Number of connected subscribers that finished the handshake.
    pub fn peers(&self) -> usize {
        self.shared.peers().len()
    }

    /// Messages lossy peers did not get because they were not reading.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Connections turned away (a failed or timed-out handshake, or one
    /// past `MAX_PEERS`); each is logged, but at most one line per 5 s for
    /// all of them.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::Relaxed)
    }

    /// Messages that went to no subscriber: none was subscribed to their
    /// topic (lossy peers, the monitors, do not count as subscribers).
    pub fn unheard(&self) -> u64 {
        self.shared.unheard.load(Ordering::Relaxed)
    }

    /// Connected peers that are not lossy and hold at least one
    /// subscription: the subscribers `wait_for_subscribers` counts. A
    /// subscriber with several topic prefixes is still one.
    pub fn subscribers(&self) -> usize {
        self.shared
            .peers()
            .iter()
            .filter(|p| {
                let st = p.lock();
                !st.closed && !st.lossy && !st.subs.is_empty()
            })
            .count()
    }

    /// Waits until some peer's subscriptions changed (a subscribe, a
    /// cancel, a subscriber leaving) since this last returned. Any number
    /// of changes while nobody waited is one: read the state that matters
    /// ([`Self::subscribers`]) after. Cancel-safe.
    pub async fn subscriptions_changed(&mut self) {
        if self.changes.changed().await.is_err() {
            // The sender lives in `shared`, which `self` holds: not reached.
            std::future::pending::<()>().await
        }
    }

    fn refresh(&mut self) {
        let g = self.shared.generation.load(Ordering::Acquire);
        if g != self.generation {
            let peers = self.shared.peers();
            self.local.clear();
            self.local.extend(peers.iter().cloned());
            self.generation = g;
        }
    }

    /// Queues a message (its frames; the first is the topic) for every
    /// subscriber whose subscriptions match, waiting while one of them is
    /// over its high-water mark (and up to the stall limit for one that
    /// does not read). Messages nobody subscribed to go nowhere, as with
    /// any PUB.
    pub async fn send(&mut self, frames: &[&[u8]]) {
        // `resume` returns once nothing is held.
        self.resume().await;
        if !self.try_send(frames) {
            self.resume().await;
        }
    }

    /// [`Publisher::send`] without waiting: true when the message is
    /// queued for every matching subscriber; false when one of them is
    /// full, and the message is held for it (and those after it) until
    /// [`Publisher::resume`] gets it through. No clock is read and no
    /// wait is set up unless a queue is full (that was ~3% of the
    /// publisher's CPU per message). Call only while nothing is held.
    pub fn try_send(&mut self, frames: &[&[u8]]) -> bool {
        debug_assert!(self.held.is_none(), "try_send while a message is held");
        self.refresh();
        let mut heard = false;
        match offer_all(&self.shared, &self.local, frames, &mut heard) {
            None => {
                self.heard(heard);
                true
            }
            Some(i) => {
                let now = Instant::now();
                let written = self.local[i].written.load(Ordering::Relaxed);
                self.held = Some(Held {
                    frames: frames.iter().map(|f| f.to_vec()).collect(),
                    peers: self.local[i..].to_vec(),
                    heard,
                    since: now,
                    progress: (now, written),
                });
                false
            }
        }
    }

    fn heard(&self, heard: bool) {
        if !heard {
            self.shared.unheard.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Gets a held message to the rest of its peers: waits while the first
    /// is full and writing, disconnects it once it has written nothing for
    /// the stall limit (or at the stop's deadline). Returns when nothing is
    /// held. Cancel-safe: what got through stays through, and the rest is
    /// still held.
    pub async fn resume(&mut self) {
        while let Some(w) = self.retry() {
            w.wait().await;
        }
    }

    /// [`Publisher::resume`] without the wait: offers the held message to
    /// its peers again, disconnects a full one that stalled (or at the
    /// stop's deadline), and returns what to wait for if it is still held.
    /// The wait owns what it needs, so a caller can wait for it alongside
    /// other uses of the publisher (its subscription events).
    pub fn retry(&mut self) -> Option<HeldWait> {
        loop {
            let held = self.held.as_mut()?;
            let frames: Vec<&[u8]> = held.frames.iter().map(Vec::as_slice).collect();
            let full = offer_all(&self.shared, &held.peers, &frames, &mut held.heard);
            let now = Instant::now();
            match full {
                None => {
                    let heard = held.heard;
                    self.held = None;
                    self.heard(heard);
                    return None;
                }
                Some(i) if i > 0 => {
                    held.peers.drain(..i);
                    let written = held.peers[0].written.load(Ordering::Relaxed);
                    (held.since, held.progress) = (now, (now, written));
                }
                Some(_) => {}
            }
            let peer = held.peers[0].clone();
            let written = peer.written.load(Ordering::Relaxed);
            if written != held.progress.1 {
                held.progress = (now, written);
            }
            let stalled_at = held.progress.0 + self.stall_limit;
            let why = match self.stop_by {
                Some(stop) if now >= stop => {
                    Some("still had its queue full at the stop's limit".to_string())
                }
                _ if now >= stalled_at => Some(format!(
                    "took nothing for {:.1} s with its queue full (stall limit)",
                    (now - held.progress.0).as_secs_f64()
                )),
                _ => None,
            };
            let Some(why) = why else {
                // The writer's `notify_one` after it takes the buffer or
                // finishes a write leaves a permit if it comes before the
                // wait is set up: no wake-up is lost.
                let until = self.stop_by.map_or(stalled_at, |s| s.min(stalled_at));
                return Some(HeldWait { peer, until });
            };
            // Not delivered to it: its queue and the held message.
            let lost = peer.evict() + 1;
            // It was subscribed to the held message: that message went to
            // a subscriber (counted as not delivered), not to no one.
            held.heard = true;
            self.shared.stalled.fetch_add(1, Ordering::Relaxed);
            self.shared.undelivered.fetch_add(lost, Ordering::Relaxed);
            tracing::warn!(
                "bus: subscriber {} {why}: disconnected, {lost} messages not delivered to it (it sees them as a gap if it comes back)",
                peer.addr,
            );
            held.peers.remove(0);
        }
    }

    /// Counts what is left in every queue as not delivered, monitors'
    /// as dropped, and disconnects everyone: for the end of a stop, after
    /// [`Publisher::flush`] had its time, so the stop line adds up.
    pub fn close(&mut self) {
        let peers: Vec<_> = self.shared.peers().drain(..).collect();
        for p in peers {
            let (lossy, pending) = {
                let st = p.lock();
                (
                    st.lossy,
                    if st.closed {
                        0
                    } else {
                        st.ends.len() as u64
                            + st.in_flight_unsent(p.written.load(Ordering::Relaxed))
                    },
                )
            };
            p.evict();
            if pending == 0 {
                continue;
            }
            if lossy {
                self.shared.dropped.fetch_add(pending, Ordering::Relaxed);
            } else {
                self.shared.stalled.fetch_add(1, Ordering::Relaxed);
                self.shared
                    .undelivered
                    .fetch_add(pending, Ordering::Relaxed);
                tracing::warn!(
                    "bus: subscriber {} had not taken {pending} messages when the publisher stopped",
                    p.addr
                );
            }
        }
        // The rate-limited WARNs held back since their last line: no later
        // line will carry their count.
        for (log, about) in [
            (
                &self.shared.conn_log,
                "single connections (refused, dropped)",
            ),
            (&self.shared.subs_log, "ignored subscriptions"),
        ] {
            let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
            crate::warn_suppressed!(log, |n| format!(
                "bus: {n} more WARNs about {about} suppressed"
            ));
        }
        if let Some(h) = self.held.take() {
            // Only a stop cut short leaves one: its peers did not get it.
            self.shared
                .undelivered
                .fetch_add(h.peers.len() as u64, Ordering::Relaxed);
        }
        self.shared.generation.fetch_add(1, Ordering::Release);
    }

    /// Waits until everything queued so far has been handed to the kernel
    /// (or its peer is gone). Lossy peers are not waited for here either.
    pub async fn flush(&mut self) {
        self.refresh();
        for peer in &self.local {
            loop {
                let space = peer.space.notified();
                let done = {
                    let st = peer.lock();
                    st.closed || st.lossy || (st.buf.is_empty() && !st.writing)
                };
                if done {
                    break;
                }
                space.await;
            }
        }
    }
}

/// Offers a message to `peers` in turn; the index of the first that is
/// full, if one is. `heard` becomes true once a subscriber (not a monitor)
/// has it.
fn offer_all(
    shared: &Shared,
    peers: &[Arc<Peer>],
    frames: &[&[u8]],
    heard: &mut bool,
) -> Option<usize> {
    let topic = frames.first().copied().unwrap_or(&[]);
    for (i, peer) in peers.iter().enumerate() {
        match peer.offer(frames, topic) {
            Offer::Skipped => {}
            Offer::Dropped => {
                shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Offer::Queued { wake, lossy } => {
                *heard |= !lossy;
                if wake {
                    peer.data.notify_one();
                }
            }
            Offer::Full => return Some(i),
        }
    }
    None
}

/// The connections still in their handshake, oldest first (see
/// [`MAX_HANDSHAKES`]).
#[derive(Default)]
struct Handshaking {
    next: u64,
    open: std::collections::VecDeque<(u64, CancellationToken)>,
}

impl Handshaking {
    /// A new connection's place, closing the oldest one in its handshake
    /// when `MAX_HANDSHAKES` already are.
    fn admit(this: &Mutex<Handshaking>) -> (u64, CancellationToken) {
        let mut h = this.lock().unwrap_or_else(|p| p.into_inner());
        if h.open.len() >= MAX_HANDSHAKES {
            if let Some((_, oldest)) = h.open.pop_front() {
                oldest.cancel();
            }
        }
        h.next += 1;
        let token = CancellationToken::new();
        let id = h.next;
        h.open.push_back((id, token.clone()));
        (id, token)
    }

    fn done(this: &Mutex<Handshaking>, id: u64) {
        let mut h = this.lock().unwrap_or_else(|p| p.into_inner());
        h.open.retain(|(i, _)| *i != id);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, max_peers: usize) {
    let slots = Arc::new(Semaphore::new(max_peers));
    let handshaking = Arc::new(Mutex::new(Handshaking::default()));
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => match slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    let shared = shared.clone();
                    let handshaking = handshaking.clone();
                    let (id, cut) = Handshaking::admit(&handshaking);
                    tokio::spawn(async move {
                        serve_peer(stream, addr, shared, cut, || {
                            Handshaking::done(&handshaking, id)
                        })
                        .await;
                        drop(slot);
                    });
                }
                Err(_) => {
                    // Closed unanswered (a libzmq peer retries later).
                    drop(stream);
                    shared.refuse(|| {
                        format!("bus: refused {addr}: {max_peers} connections are open, the most served")
                    });
                }
            },
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                shared.warn_conn(|| format!("bus: accept failed: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What ZeroMQ socket listens at `addr`: connects, greets as SUB and
/// returns the peer's socket type (`"XPUB"` for an nbpy publisher). It
/// subscribes to nothing, so a publisher sends it nothing; for telling a
/// running publisher from a stranger holding its port.
pub async fn socket_type_at(addr: &str) -> Result<String, ZmtpError> {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await?;
        handshake(&mut s, "SUB").await
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT.min(Duration::from_secs(2)), attempt)
        .await
        .map_err(|_| ZmtpError::Protocol("no ZMTP greeting within 2 s".into()))?
}

/// Both ends' handshake (RFC 23): greetings, our READY as `ours`, the
/// peer's READY (or ERROR). Returns the peer's socket type, for the caller
/// to judge.
async fn handshake(stream: &mut TcpStream, ours: &str) -> Result<String, ZmtpError> {
    Ok(handshake_minor(stream, ours).await?.1)
}

/// [`handshake`], also returning the ZMTP minor version the peer greeted
/// with: 1 or more (ZMTP 3.1, RFC 37) promises PONGs to our PINGs.
async fn handshake_minor(stream: &mut TcpStream, ours: &str) -> Result<(u8, String), ZmtpError> {
    stream.write_all(&greeting(ours)).await?;
    let mut g = [0u8; 64];
    stream.read_exact(&mut g).await?;
    check_greeting(&g)?;
    stream.write_all(&ready_command(ours)).await?;
    let f = read_frame(stream).await?;
    if f.flags & FLAG_COMMAND == 0 {
        return protocol("expected READY, got a message");
    }
    let (name, data) = command(&f.body)?;
    match name {
        b"READY" => {}
        b"ERROR" => {
            let reason = data.get(1..).unwrap_or(&[]);
            return protocol(format!(
                "peer refused the handshake: {}",
                String::from_utf8_lossy(reason)
            ));
        }
        other => {
            return protocol(format!(
                "expected READY, got {}",
                String::from_utf8_lossy(other)
            ))
        }
    }
    Ok((g[11], socket_type(data)?.unwrap_or_default()))
}

/// The publisher's side: only a SUB or XSUB may connect.
async fn subscriber_handshake(stream: &mut TcpStream) -> Result<String, ZmtpError> {
    let kind = handshake(stream, "XPUB").await?;
    match kind.as_str() {
        "SUB" | "XSUB" => Ok(kind),
        other => protocol(format!(
            "a {other:?} socket cannot subscribe to a publisher (need SUB or XSUB)"
        )),
    }
}

/// One subscriber's connection, from its handshake (given up when `cut`
/// fires: newer connections are waiting for theirs; `handshaken` is
/// called once it is over, either way) to its end.
async fn serve_peer(
    mut stream: TcpStream,
    addr: SocketAddr,
    shared: Arc<Shared>,
    cut: CancellationToken,
    handshaken: impl FnOnce(),
) {
    let _ = stream.set_nodelay(true);
    keep_alive(&stream);
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, subscriber_handshake(&mut stream));
    let outcome = tokio::select! {
        r = handshake => Some(r),
        _ = cut.cancelled() => None,
    };
    handshaken();
    let Some(outcome) = outcome else {
        shared.refuse(|| {
            format!("bus: {addr} closed in its handshake: {MAX_HANDSHAKES} newer connections were in theirs")
        });
        return;
    };
    let kind = match outcome {
        Ok(Ok(kind)) => kind,
        // A connect-and-close (a port probe, `nbpy doctor`, a load
        // balancer's check, a subscriber that gave up waiting for this
        // publisher while it was paused: a broken pipe on our greeting) is
        // not worth a warning nor a refusal; a peer that talks nonsense is.
        Ok(Err(ZmtpError::Io(e))) if left(&e) => {
            tracing::debug!("bus: {addr} closed before the ZMTP handshake: {e}");
            return;
        }
        Ok(Err(e)) => {
            shared.refuse(|| format!("bus: connection from {addr} rejected: {e}"));
            return;
        }
        Err(_) => {
            shared.refuse(|| format!("bus: {addr} did not finish the ZMTP handshake in time"));
            return;
        }
    };
    tracing::debug!("bus: {kind} connected from {addr}");
    let peer = Arc::new(Peer {
        addr,
        state: Mutex::new(PeerState::default()),
        data: Notify::new(),
        space: Notify::new(),
        written: AtomicU64::new(0),
        evicted: CancellationToken::new(),
    });
    shared.peers().push(peer.clone());
    shared.generation.fetch_add(1, Ordering::Release);

    let (rd, mut wr) = stream.into_split();
    // Frames are read a few bytes at a time: buffered, a burst of small
    // commands (subscriptions, PINGs) costs a few reads, not 3 per frame.
    let mut rd = tokio::io::BufReader::new(rd);
    let writer = {
        let peer = peer.clone();
        async move {
            let mut out = Vec::with_capacity(64 * 1024);
            loop {
                let data = peer.data.notified();
                let took = {
                    let mut st = peer.lock();
                    if st.closed {
                        return;
                    }
                    if st.buf.is_empty() {
                        false
                    } else {
                        std::mem::swap(&mut st.buf, &mut out);
                        st.writing = true;
                        let st = &mut *st;
                        st.in_flight_ends.clear();
                        std::mem::swap(&mut st.ends, &mut st.in_flight_ends);
                        st.in_flight_base = peer.written.load(Ordering::Relaxed);
                        true
                    }
                };
                if !took {
                    data.await;
                    continue;
                }
                peer.space.notify_one();
                let r = tokio::select! {
                    r = write_counted(&mut wr, &out, &peer.written) => r,
                    _ = peer.evicted.cancelled() => return,
                };
                out.clear();
                {
                    let mut st = peer.lock();
                    st.writing = false;
                    st.in_flight_ends.clear();
                }
                peer.space.notify_waiters();
                peer.space.notify_one();
                if let Err(e) = r {
                    tracing::debug!("bus: write to {} failed: {e}", peer.addr);
                    return;
                }
            }
        }
    };
    let reader = {
        let (peer, shared) = (peer.clone(), shared.clone());
        async move {
            // Told that a subscription of this peer's was not taken.
            let mut warned = false;
            loop {
                let (f, skipped) = match read_inbound(&mut rd).await {
                    Ok(f) => f,
                    Err(ZmtpError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                };
                // Bytes before the topic, for a skipped frame's topic length.
                let mut before_topic = 1;
                let change = if f.flags & FLAG_COMMAND != 0 {
                    let (name, data) = command(&f.body)?;
                    before_topic += name.len();
                    match name {
                        b"SUBSCRIBE" => Some(Event::Subscribe(data.to_vec())),
                        b"CANCEL" => Some(Event::Unsubscribe(data.to_vec())),
                        b"PING" => {
                            // PONG echoes the ping's context (after its 2-byte TTL),
                            // at most MAX_PING_CONTEXT bytes of it.
                            let context = data.get(2..).unwrap_or(&[]);
                            let context = &context[..context.len().min(MAX_PING_CONTEXT)];
                            let mut body = vec![4];
                            body.extend_from_slice(b"PONG");
                            body.extend_from_slice(context);
                            if !peer.room_for_commands().await {
                                return Ok(());
                            }
                            encode_frame(FLAG_COMMAND, &body, &mut peer.lock().buf);
                            peer.data.notify_one();
                            None
                        }
                        _ => None,
                    }
                } else {
                    // A subscription is a one-frame message: 1 or 0, then the
                    // prefix. Other messages to a publisher are ignored.
                    match f.body.split_first() {
                        Some((1, t)) if f.flags & FLAG_MORE == 0 => {
                            Some(Event::Subscribe(t.to_vec()))
                        }
                        Some((0, t)) if f.flags & FLAG_MORE == 0 => {
                            Some(Event::Unsubscribe(t.to_vec()))
                        }
                        _ => None,
                    }
                };
                let Some(ev) = change else { continue };
                // Of a skipped frame only its start is here: its topic is
                // too long to subscribe to, and to be held (so a cancel of
                // it changes nothing).
                let topic_len = match (skipped, &ev) {
                    (None, Event::Subscribe(t) | Event::Unsubscribe(t)) => t.len() as u64,
                    (Some(n), _) => n.saturating_sub(before_topic as u64),
                };
                let applied = match (skipped, &ev) {
                    (None, _) => peer.apply(&ev, shared.lossy.as_deref()),
                    (Some(_), Event::Subscribe(_)) => Applied::TooLong,
                    (Some(_), Event::Unsubscribe(_)) => Applied::Unchanged,
                };
                let why = match applied {
                    Applied::Changed => {
                        shared.subscriptions_changed();
                        continue;
                    }
                    Applied::Unchanged => continue,
                    Applied::TooLong => format!("its topic is longer than {MAX_TOPIC} bytes"),
                    Applied::OverBudget => format!(
                        "it would hold more than the {} KiB of subscriptions one subscriber may",
                        MAX_SUBSCRIPTION_BYTES / 1024
                    ),
                };
                if !std::mem::replace(&mut warned, true) {
                    let Event::Subscribe(topic) = &ev else {
                        continue;
                    };
                    let shown = String::from_utf8_lossy(&topic[..topic.len().min(64)]);
                    shared.warn_subs(|| {
                        format!(
                            "bus: subscriber {addr}: ignoring its subscription to {shown:?} ({topic_len} bytes): {why}; \
                             its other subscriptions stand, and later ones like it are ignored without a line each",
                        )
                    });
                }
            }
        }
    };
    let result: Result<(), ZmtpError> = tokio::select! {
        r = reader => r,
        _ = writer => Ok(()),
    };
    // What was queued for it and will not reach it (the accounting of a
    // stop or a stall is elsewhere and unchanged; this is for the line).
    let pending = {
        let st = peer.lock();
        if st.closed {
            0
        } else {
            st.ends.len() as u64 + st.in_flight_unsent(peer.written.load(Ordering::Relaxed))
        }
    };
    match result {
        // A subscriber leaving is routine, even by a reset: a SUB closed
        // with our data unread in its socket resets the connection. Churning
        // clients made that hundreds of WARNs.
        Err(ZmtpError::Io(e)) if left(&e) => tracing::info!(
            "bus: subscriber {addr} left ({e}); {pending} messages queued for it not delivered"
        ),
        Err(e) => shared.warn_conn(|| {
            format!("bus: dropping subscriber {addr}: {e}; {pending} messages queued for it not delivered")
        }),
        Ok(()) if pending > 0 => tracing::info!(
            "bus: subscriber {addr} left; {pending} messages queued for it not delivered"
        ),
        Ok(()) => tracing::debug!("bus: subscriber {addr} went away"),
    }
    shared.remove(&peer);
    // Its subscriptions end with it, as if it had cancelled them.
    let had = {
        let mut st = peer.lock();
        st.sub_bytes = 0;
        !std::mem::take(&mut st.subs).is_empty()
    };
    peer.close();
    if had {
        shared.subscriptions_changed();
    }
}

/// The peer went away (closed or reset), as opposed to breaking the protocol.
fn left(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
    )
}

/// `write_all`, counting bytes into `written` as the kernel takes them, so
/// a waiting sender sees a slow reader progress.
async fn write_counted(
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    mut out: &[u8],
    written: &AtomicU64,
) -> std::io::Result<()> {
    while !out.is_empty() {
        match wr.write(out).await? {
            0 => return Err(std::io::ErrorKind::WriteZero.into()),
            n => {
                written.fetch_add(n as u64, Ordering::Relaxed);
                out = &out[n..];
            }
        }
    }
    Ok(())
}

/// The peer side of a handshake written from RFC 23's bytes, not from this
/// module's encoder, for the tests of both ends.
#[cfg(test)]
mod rfc_peer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// Greets as ZMTP 3.1 NULL and sends READY with `socket_type`; leaves
    /// the other side's READY unread.
    pub async fn handshake(s: &mut TcpStream, socket_type: &[u8]) {
        let mut g = [0u8; 64];
        g[0] = 0xFF;
        g[9] = 0x7F;
        g[10] = 3;
        g[11] = 1;
        g[12..16].copy_from_slice(b"NULL");
        s.write_all(&g).await.unwrap();
        let mut theirs = [0u8; 64];
        s.read_exact(&mut theirs).await.unwrap();
        assert_eq!(&theirs[12..16], b"NULL");
        let mut body = vec![5];
        body.extend_from_slice(b"READY");
        body.push(11);
        body.extend_from_slice(b"Socket-Type");
        body.extend_from_slice(&(socket_type.len() as u32).to_be_bytes());
        body.extend_from_slice(socket_type);
        s.write_all(&[0x04, body.len() as u8]).await.unwrap();
        s.write_all(&body).await.unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_use_the_short_form_up_to_255_bytes() {
        let mut out = Vec::new();
        encode_message(&[b"tick", &[7u8; 255], &[9u8; 256]], &mut out);
        assert_eq!(&out[..6], &[FLAG_MORE, 4, b't', b'i', b'c', b'k']);
        assert_eq!(&out[6..8], &[FLAG_MORE, 255]);
        let long = &out[8 + 255..];
        assert_eq!(long[0], FLAG_LONG);
        assert_eq!(&long[1..9], &256u64.to_be_bytes());
        assert_eq!(long.len(), 9 + 256);
    }

    #[test]
    fn greeting_is_zmtp_3_null() {
        let g = greeting("SUB");
        assert!(check_greeting(&g).is_ok());
        assert_eq!((g[10], g[11]), (3, 0));
        assert_eq!(greeting("XPUB")[11], 1, "the publisher speaks 3.1");
        let mut curve = g;
        curve[12..17].copy_from_slice(b"CURVE");
        assert!(check_greeting(&curve)
            .unwrap_err()
            .to_string()
            .contains("CURVE"));
        let mut old = g;
        old[10] = 2;
        assert!(check_greeting(&old).is_err());
    }

    #[test]
    fn ready_metadata_round_trips() {
        let cmd = ready_command("SUB");
        let (name, data) = command(&cmd[2..]).unwrap();
        assert_eq!(name, b"READY");
        assert_eq!(socket_type(data).unwrap().as_deref(), Some("SUB"));
        assert!(socket_type(&data[..data.len() - 1]).is_err());
    }

    /// A subscriber written from the RFC's bytes, not from this module's encoder.
    async fn raw_sub(addr: SocketAddr, socket_type: &[u8]) -> TcpStream {
        let mut s = TcpStream::connect(addr).await.unwrap();
        rfc_peer::handshake(&mut s, socket_type).await;
        s
    }

    impl Publisher {
        /// Every peer's subscriptions, sorted.
        pub(super) fn subscriptions(&self) -> Vec<Vec<u8>> {
            let peers = self.shared.peers();
            let mut all: Vec<_> = peers.iter().flat_map(|p| p.lock().subs.clone()).collect();
            all.sort();
            all
        }
    }

    /// A 3.0 subscription message (`on`: subscribe, else cancel).
    fn sub_msg(on: bool, topic: &[u8]) -> Vec<u8> {
        let mut body = vec![on as u8];
        body.extend_from_slice(topic);
        let mut out = Vec::new();
        encode_frame(0, &body, &mut out);
        out
    }

    /// A PING with `context`, as RFC 37 frames it.
    fn ping(context: &[u8]) -> Vec<u8> {
        let mut body = vec![4];
        body.extend_from_slice(b"PING");
        body.extend_from_slice(&[0, 0]);
        body.extend_from_slice(context);
        let mut out = Vec::new();
        encode_frame(FLAG_COMMAND, &body, &mut out);
        out
    }

    /// Sends a PING and reads up to its PONG: the publisher handles a
    /// peer's frames in order, so everything sent before is applied.
    async fn fence(s: &mut TcpStream) {
        s.write_all(&ping(b"fence")).await.unwrap();
        loop {
            let f = tokio::time::timeout(Duration::from_secs(20), read_frame(s))
                .await
                .expect("no PONG")
                .unwrap();
            if f.flags & FLAG_COMMAND != 0
                && command(&f.body).unwrap() == (&b"PONG"[..], &b"fence"[..])
            {
                return;
            }
        }
    }

    #[tokio::test]
    async fn subscriptions_are_a_set_per_peer_as_in_xpub() {
        let mut p = Publisher::bind("127.0.0.1", 0, None).await.unwrap();
        let mut s = raw_sub(p.local_addr(), b"SUB").await;
        let _ready = read_frame(&mut s).await.unwrap();
        // "a" twice (a 3.0 message, then a 3.1 command), one cancel.
        s.write_all(&sub_msg(true, b"a")).await.unwrap();
        let mut cmd = vec![9];
        cmd.extend_from_slice(b"SUBSCRIBE");
        cmd.push(b'a');
        let mut out = Vec::new();
        encode_frame(FLAG_COMMAND, &cmd, &mut out);
        s.write_all(&out).await.unwrap();
        s.write_all(&sub_msg(false, b"a")).await.unwrap();
        fence(&mut s).await;
        assert_eq!(p.subscribers(), 0, "one cancel ends a doubled subscription");
        p.send(&[b"ab", b"x"]).await;
        assert_eq!(p.unheard(), 1);
    }

    #[tokio::test]
    async fn subscribe_receive_and_see_the_subscriber_leave() {
        let mut p = Publisher::bind("127.0.0.1", 0, None).await.unwrap();
        let mut s = raw_sub(p.local_addr(), b"SUB").await;
        let ready = read_frame(&mut s).await.unwrap();
        assert_eq!(command(&ready.body).unwrap().0, b"READY");
        // ZMTP 3.0 subscription message and a 3.1 SUBSCRIBE command.
        s.write_all(&[0x00, 4, 1, b'a', b'b', b'c']).await.unwrap();
        let mut cmd = vec![9];
        cmd.extend_from_slice(b"SUBSCRIBE");
        cmd.extend_from_slice(b"zz");
        s.write_all(&[0x04, cmd.len() as u8]).await.unwrap();
        s.write_all(&cmd).await.unwrap();
        fence(&mut s).await;
        assert_eq!(p.subscriptions(), [b"abc".to_vec(), b"zz".to_vec()]);
        // Two subscriptions, one subscriber; both told (as one change).
        assert_eq!(p.subscribers(), 1);
        p.subscriptions_changed().await;

        p.send(&[b"other", b"x"]).await; // nobody wants it
        p.send(&[b"abcd", b"payload"]).await;
        p.send(&[b"zz", &[1u8; 300]]).await;
        assert_eq!(p.unheard(), 1);
        p.flush().await;
        let f = read_frame(&mut s).await.unwrap();
        assert_eq!((f.flags, f.body.as_slice()), (FLAG_MORE, &b"abcd"[..]));
        let f = read_frame(&mut s).await.unwrap();
        assert_eq!((f.flags, f.body.as_slice()), (0, &b"payload"[..]));
        let f = read_frame(&mut s).await.unwrap();
        assert_eq!(f.body, b"zz");
        let f = read_frame(&mut s).await.unwrap();
        assert_eq!((f.flags, f.body.len()), (FLAG_LONG, 300));

        // Leaving is a change, as if it had cancelled what it held.
        drop(s);
        tokio::time::timeout(Duration::from_secs(10), p.subscriptions_changed())
            .await
            .expect("the subscriber's leaving was not told");
        assert_eq!(p.peers(), 0);
        assert_eq!(p.subscribers(), 0);
    }

    /// A peer's subscriptions past its budget are ignored (logged), not
    /// held; the peer keeps what fit, and its connection.
    #[tokio::test]
    async fn subscriptions_past_a_peers_budget_are_ignored_and_it_stays() {
        let (logs, _guard) = capture_logs();
        let mut p = Publisher::bind("127.0.0.1", 0, None).await.unwrap();
        let mut s = raw_sub(p.local_addr(), b"SUB").await;
        let _ready = read_frame(&mut s).await.unwrap();
        let topic = |i: u32| {
            let mut t = format!("t{i:04}.").into_bytes();
            t.resize(1000, b'x');
            t
        };
        // 100 KB of topics, where a peer may hold 64 KiB.
        for i in 0..100 {
            s.write_all(&sub_msg(true, &topic(i))).await.unwrap();
        }
        fence(&mut s).await;
        let held = p.subscriptions();
        let bytes: usize = held.iter().map(|t| t.len()).sum();
        assert!(
            bytes <= MAX_SUBSCRIPTION_BYTES,
            "{} subscriptions of {bytes} bytes held",
            held.len()
        );
        assert_eq!(p.peers(), 1);
        assert_eq!(held[0], topic(0), "the first ones are kept");
        let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
        let warns: Vec<_> = text.lines().filter(|l| l.contains("WARN")).collect();
        assert_eq!(warns.len(), 1, "{text}");
        assert!(
            warns[0].contains(&s.local_addr().unwrap().to_string()),
            "{text}"
        );
        // What it holds still reaches it; what was ignored does not.
        p.send(&[&topic(0), b"x"]).await;
        p.send(&[&topic(99), b"x"]).await;
        assert_eq!(p.unheard(), 1);
        // A cancel makes room for another.
        s.write_all(&sub_msg(false, &topic(0))).await.unwrap();
        s.write_all(&sub_msg(true, &topic(99))).await.unwrap();
        fence(&mut s).await;
        let now = p.subscriptions();
        assert!(now.contains(&topic(99)) && !now.contains(&topic(0)));
        assert_eq!(now.len(), held.len());
    }

    #[tokio::test]
    async fn a_subscription_to_an_overlong_topic_is_ignored() {
        let p = Publisher::bind("127.0.0.1", 0, None).await.unwrap();
        let mut s = raw_sub(p.local_addr(), b"SUB").await;
        let _ready = read_frame(&mut s).await.unwrap();
        s.write_all(&sub_msg(true, &[b'a'; 1025])).await.unwrap();
        s.write_all(&sub_msg(true, &[b'b'; 1024])).await.unwrap();
        fence(&mut s).await;
        let held: Vec<usize> = p.subscriptions().iter().map(|t| t.len()).collect();
        assert_eq!(held, [MAX_TOPIC]);
        assert_eq!(p.peers(), 1);
    }

    /// A subscription too long to buffer (past the 64 KiB frame limit) is
    /// ignored like any over-long one, as a message or as a 3.1 command:
    /// the peer stays, keeps its other subscriptions and gets its data.
    #[tokio::test]
    async fn a_subscription_past_the_frame_limit_is_ignored_and_the_peer_stays() {
        let mut p = Publisher::bind("127.0.0.1", 0, None).await.unwrap();
        let mut s = raw_sub(p.local_addr(), b"SUB").await;
        let _ready = read_frame(&mut s).await.unwrap();
        s.write_all(&sub_msg(true, b"")).await.unwrap();
        s.write_all(&sub_msg(true, &[b'x'; 70_000])).await.unwrap();
        let mut cmd = b"\x09SUBSCRIBE".to_vec();
        cmd.extend_from_slice(&[b'y'; 100_000]);
        let mut out = Vec::new();
        encode_frame(FLAG_COMMAND, &cmd, &mut out);
        s.write_all(&out).await.unwrap();
        s.write_all(&sub_msg(false, &[b'x'; 70_000])).await.unwrap();
        s.write_all(&sub_msg(true, b"t")).await.unwrap();
        fence(&mut s).await;
        assert_eq!(p.subscriptions(), vec![b"".to_vec(), b"t".to_vec()]);
        assert_eq!(p.peers(), 1);
        p.send(&[b"tick", b"data"]).await;
        p.flush().await;
        let f = tokio::time::timeout(Duration::from_secs(20), read_frame(&mut s))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(f.body, b"tick");
    }

    #[tokio::test]
    async fn endless_short_subscriptions_stop_at_the_budget_too() {
        let p = Publisher::bind("127.0.0.1", 0, None).await.unwrap();
        let mut s = raw_sub(p.local_addr(), b"SUB").await;
        let _ready = read_frame(&mut s).await.unwrap();
        let mut burst = Vec::new();
        for i in 0..10_000u32 {
            burst.extend_from_slice(&sub_msg(true, &i.to_be_bytes()));
        }
        s.write_all(&burst).await.unwrap();
        fence(&mut s).await;
        let held = p.subscriptions().len();
        assert_eq!(
            held,
            MAX_SUBSCRIPTION_BYTES / (4 + SUBSCRIPTION_OVERHEAD),
            "each counts its bookkeeping, not only its 4 bytes"
        );
        assert_eq!(p.peers(), 1);
        drop(s);
    }

    #[tokio::test]
    async fn a_stalled_lossy_peer_does_not_stall_the_others() {
        let mut p = Publisher::bind("127.0.0.1", 0, Some(b"\0mon"))
            .await
            .unwrap();
        // A monitor that subscribes to everything and then never reads.
        let mut mon = raw_sub(p.local_addr(), b"SUB").await;
        let _ready = read_frame(&mut mon).await.unwrap();
        mon.write_all(&[0x00, 5, 1, 0, b'm', b'o', b'n'])
            .await
            .unwrap();
        mon.write_all(&[0x00, 1, 1]).await.unwrap();
        let mut s = raw_sub(p.local_addr(), b"SUB").await;
        let _ready = read_frame(&mut s).await.unwrap();
        s.write_all(&[0x00, 1, 1]).await.unwrap();
        fence(&mut mon).await;
        fence(&mut s).await;
        // The monitor (lossy) is not a subscriber.
        assert_eq!(p.subscribers(), 1);
        let n = 20_000u32;
        let reader = tokio::spawn(async move {
            // Every message, in order: the topic frame is the number.
            for i in 0..n {
                let topic = read_frame(&mut s).await.unwrap();
                assert_eq!(topic.body, i.to_be_bytes());
                let body = read_frame(&mut s).await.unwrap();
                assert_eq!(body.body.len(), 1000);
            }
        });
        let payload = vec![b'x'; 1000];
        let sent = tokio::time::timeout(Duration::from_secs(30), async {
            for i in 0..n {
                p.send(&[&i.to_be_bytes(), &payload]).await;
            }
            p.flush().await;
        })
        .await;
        assert!(sent.is_ok(), "a stalled monitor stalled the publisher");
        reader.await.unwrap();
        // 20 MB cannot all fit in its 1 MiB buffer and socket buffers.
        assert!(p.dropped() > 10_000, "dropped {}", p.dropped());
        drop(mon);
    }

    #[tokio::test]
    async fn a_ping_is_answered_with_its_context() {
        let p = Publisher::bind("127.0.0.1", 0, None).await.unwrap();
        let mut s = raw_sub(p.local_addr(), b"SUB").await;
        let _ready = read_frame(&mut s).await.unwrap();
        // PING: name, 2-byte TTL (deciseconds), context.
        let mut ping = vec![4];
        ping.extend_from_slice(b"PING");
        ping.extend_from_slice(&[0, 30, b'c', b'x']);
        s.write_all(&[FLAG_COMMAND, ping.len() as u8])
            .await
            .unwrap();
        s.write_all(&ping).await.unwrap();
        let pong = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut s))
            .await
            .expect("no PONG")
            .unwrap();
        assert_eq!(pong.flags, FLAG_COMMAND);
        assert_eq!(command(&pong.body).unwrap(), (&b"PONG"[..], &b"cx"[..]));
    }

    /// How many subscription changes the application could take now without
    /// waiting: what a busy main loop has left piling up.
    async fn pending_changes(p: &mut Publisher) -> usize {
        let mut n = 0;
        while tokio::time::timeout(Duration::from_millis(20), p.subscriptions_changed())
            .await
            .is_ok()
        {
            n += 1;
        }
        n
    }

    /// Subscribe/cancel churn while the application is busy elsewhere:
    /// what it is told about stays one "changed", however many changes.
    #[tokio::test]
    async fn subscription_churn_piles_up_nothing_for_a_busy_publisher() {
        let mut p = Publisher::bind("127.0.0.1", 0, None).await.unwrap();
        let mut s = raw_sub(p.local_addr(), b"SUB").await;
        let _ready = read_frame(&mut s).await.unwrap();
        let topic = [b'x'; 200];
        let burst = [sub_msg(true, &topic), sub_msg(false, &topic)]
            .concat()
            .repeat(1000);
        for _ in 0..20 {
            s.write_all(&burst).await.unwrap();
        }
        s.write_all(&sub_msg(true, b"last")).await.unwrap();
        fence(&mut s).await;
        let pending = pending_changes(&mut p).await;
        assert!(pending <= 1, "{pending} changes pending");
        assert_eq!(p.subscribers(), 1);
        // Leaving is one change too, whatever it held.
        s.write_all(&burst[..burst.len() / 2]).await.unwrap();
        fence(&mut s).await;
        drop(s);
        let left = tokio::time::timeout(Duration::from_secs(10), async {
            while p.peers() > 0 {
                p.subscriptions_changed().await;
            }
        });
        assert!(left.await.is_ok(), "the peer's leaving was not told");
        let pending = pending_changes(&mut p).await;
        assert!(
            pending <= 1,
            "{pending} changes pending after the peer left"
        );
        assert_eq!(p.subscribers(), 0);
    }

    /// The most bytes any peer has waiting in its buffer now.
    fn most_buffered(p: &Publisher) -> usize {
        let peers = p.shared.peers();
        peers.iter().map(|p| p.lock().buf.len()).max().unwrap_or(0)
    }

    #[tokio::test]
    async fn a_long_ping_context_is_echoed_cut_to_16_bytes_as_libzmq_does() {
        let p = Publisher::bind("127.0.0.1", 0, None).await.unwrap();
        let mut s = raw_sub(p.local_addr(), b"SUB").await;
        let _ready = read_frame(&mut s).await.unwrap();
        let context: Vec<u8> = (0..60_000u32).map(|i| i as u8).collect();
        s.write_all(&ping(&context)).await.unwrap();
        let pong = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut s))
            .await
            .expect("no PONG")
            .unwrap();
        let (name, echoed) = command(&pong.body).unwrap();
        assert_eq!(name, b"PONG");
        assert!(
            echoed == &context[..16],
            "a PONG context of {} bytes",
            echoed.len()
        );
    }

    /// A peer that sends PINGs and never reads: its PONGs stop at its
    /// high-water mark (the publisher stops reading from it), and once it
    /// reads, every PING is answered.
    #[tokio::test]
    async fn pings_from_a_peer_that_does_not_read_stop_at_its_high_water_mark() {
        let p = Publisher::bind("127.0.0.1", 0, None).await.unwrap();
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let mut s = sock.connect(p.local_addr()).await.unwrap();
        rfc_peer::handshake(&mut s, b"SUB").await;
        let _ready = read_frame(&mut s).await.unwrap();
        let (rd, mut wr) = s.into_split();
        // Far more PONGs than the high-water mark and the kernel's buffers.
        let one = ping(&[7u8; 16]);
        let pings = (8 << 20) / one.len();
        let writer = tokio::spawn(async move {
            let chunk = one.repeat(4096);
            for _ in 0..pings / 4096 {
                wr.write_all(&chunk).await.unwrap();
            }
            wr
        });
        let pings = pings / 4096 * 4096;
        let bound = HIGH_WATER_BYTES + 32;
        let mut most = 0;
        // Until the buffer reaches the mark (the PONGs are more than the
        // kernel's buffers take), then a while longer, to see it stay there.
        let mut after = None;
        let watched = tokio::time::timeout(Duration::from_secs(60), async {
            while after.is_none_or(|n| n > 0) && most <= bound {
                tokio::time::sleep(Duration::from_millis(5)).await;
                most = most.max(most_buffered(&p));
                if most + 32 >= HIGH_WATER_BYTES {
                    after = Some(after.unwrap_or(100) - 1);
                }
            }
        });
        let reached = watched.await.is_ok();
        assert!(most <= bound, "{most} bytes of PONGs buffered");
        assert!(
            reached,
            "the PONGs never reached the high-water mark ({most} bytes)"
        );
        // Now read: every PING gets its PONG.
        let mut rd = tokio::io::BufReader::new(rd);
        for _ in 0..pings {
            let f = tokio::time::timeout(Duration::from_secs(30), read_frame(&mut rd))
                .await
                .expect("a PONG is missing")
                .unwrap();
            assert_eq!(command(&f.body).unwrap(), (&b"PONG"[..], &[7u8; 16][..]));
            most = most.max(most_buffered(&p));
        }
        assert!(most <= bound, "{most} bytes of PONGs buffered");
        drop(writer.await.unwrap());
    }

    /// Log lines written while the returned guard lives, on this thread
    /// (a `#[tokio::test]` runs every task on it).
    fn capture_logs() -> (Arc<Mutex<Vec<u8>>>, tracing::subscriber::DefaultGuard) {
        #[derive(Clone)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf(Arc::default());
        let w = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        (buf.0, tracing::subscriber::set_default(sub))
    }

    /// A flood of connections that are not ZMTP: one WARN, not one each.
    #[tokio::test]
    async fn rejected_connections_are_logged_rate_limited() {
        let (logs, _guard) = capture_logs();
        let p = Publisher::bind("127.0.0.1", 0, None).await.unwrap();
        for _ in 0..50 {
            let mut c = TcpStream::connect(p.local_addr()).await.unwrap();
            c.write_all(&[0u8; 64]).await.unwrap();
            // Closed by the publisher once it has judged (and logged) it.
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut rest))
                .await
                .expect("a bad greeting was not refused");
        }
        let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
        let warns = text.lines().filter(|l| l.contains("WARN")).count();
        assert!(warns <= 2, "{warns} WARN lines:\n{text}");
        assert_eq!(p.refused(), 50);
        assert!(text.contains("bad signature"), "{text}");
    }

    /// A SUB that closes with our data unread in its socket resets the
    /// connection: that is a subscriber leaving, said at INFO, not a WARN.
    #[tokio::test]
    async fn a_subscriber_leaving_by_a_reset_is_not_a_warning() {
        let (logs, _guard) = capture_logs();
        let mut p = Publisher::bind("127.0.0.1", 0, None).await.unwrap();
        let mut s = raw_sub(p.local_addr(), b"SUB").await;
        let _ready = read_frame(&mut s).await.unwrap();
        s.write_all(&sub_msg(true, b"")).await.unwrap();
        fence(&mut s).await;
        for i in 0..100u32 {
            p.send(&[b"t", &i.to_be_bytes()]).await;
        }
        p.flush().await;
        // Unread data in its socket: the close is a reset.
        drop(s);
        while p.subscribers() > 0 {
            p.subscriptions_changed().await;
        }
        let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
        assert!(!text.contains("WARN"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.contains("INFO") && l.contains("left (Connection reset")),
            "{text}"
        );
    }

    /// Past its connection limit a publisher closes a new connection at
    /// once, ungreeted, and takes one again when one has gone.
    #[tokio::test]
    async fn connections_past_the_limit_are_refused() {
        let (logs, _guard) = capture_logs();
        let p = Publisher::bind_serving("127.0.0.1", 0, None, 3)
            .await
            .unwrap();
        let greeted = |mut c: TcpStream| async move {
            let mut g = [0u8; 64];
            let r = tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut g)).await;
            r.expect("neither greeted nor closed").ok().map(|_| c)
        };
        // Three half-open connections (never greeting back) hold every slot.
        let mut held = Vec::new();
        for _ in 0..3 {
            let c = TcpStream::connect(p.local_addr()).await.unwrap();
            held.push(greeted(c).await.expect("a connection within the limit"));
        }
        for _ in 0..5 {
            let c = TcpStream::connect(p.local_addr()).await.unwrap();
            assert!(
                greeted(c).await.is_none(),
                "a connection past the limit was served"
            );
        }
        assert_eq!(p.refused(), 5);
        let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
        let warns = text.lines().filter(|l| l.contains("WARN")).count();
        assert_eq!(warns, 1, "{text}");
        assert!(text.contains("3 connections are open"), "{text}");
        // One leaves: its slot is free once the publisher has seen it go.
        drop(held.pop());
        let served = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let c = TcpStream::connect(p.local_addr()).await.unwrap();
                if let Some(c) = greeted(c).await {
                    return c;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        held.push(served.await.expect("a freed slot was not taken again"));
    }

    #[tokio::test]
    async fn a_pub_socket_cannot_subscribe() {
        let p = Publisher::bind("127.0.0.1", 0, None).await.unwrap();
        let mut s = raw_sub(p.local_addr(), b"PUB").await;
        let _ready = read_frame(&mut s).await.unwrap();
        // The publisher closes the connection instead of taking it as a peer.
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0);
        assert_eq!(p.peers(), 0);
    }

    /// A subscriber to everything, on a connection of its own.
    async fn subscribed(p: &mut Publisher) -> TcpStream {
        let mut s = raw_sub(p.local_addr(), b"SUB").await;
        let _ready = read_frame(&mut s).await.unwrap();
        s.write_all(&[0x00, 1, 1]).await.unwrap();
        fence(&mut s).await;
        assert!(p.subscribers() > 0);
        s
    }

    /// Reads `n` messages of `[seq, payload]` and checks they come in order.
    fn read_all(mut s: TcpStream, n: u32, pace: Option<Duration>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            for i in 0..n {
                let seq = read_frame(&mut s).await.unwrap();
                assert_eq!(seq.body, i.to_be_bytes());
                let _payload = read_frame(&mut s).await.unwrap();
                if let Some(d) = pace.filter(|_| i % 64 == 0) {
                    tokio::time::sleep(d).await; // the reader's pace
                }
            }
        })
    }

    #[tokio::test]
    async fn a_stalled_subscriber_is_disconnected_and_the_others_get_everything() {
        let mut p = Publisher::bind("127.0.0.1", 0, None).await.unwrap();
        p.set_stall_limit(Duration::from_millis(300));
        let good = subscribed(&mut p).await;
        // Subscribed, and then it never reads.
        let _stalled = subscribed(&mut p).await;
        let n = 20_000u32;
        let reader = read_all(good, n, None);
        let payload = vec![b'x'; 1000];
        let sent = tokio::time::timeout(Duration::from_secs(30), async {
            for i in 0..n {
                p.send(&[&i.to_be_bytes(), &payload]).await;
            }
            p.flush().await;
        })
        .await;
        assert!(sent.is_ok(), "a stalled subscriber stalled the publisher");
        reader.await.unwrap();
        let (peers, lost) = p.stalled();
        assert_eq!(peers, 1);
        // Its 1 MiB queue, at least, and the message that found it full.
        assert!(lost > 1000, "{lost}");
        assert_eq!(p.subscribers(), 1);
    }

    #[tokio::test]
    async fn a_slow_subscriber_that_reads_is_waited_for_past_the_stall_limit() {
        let mut p = Publisher::bind("127.0.0.1", 0, None).await.unwrap();
        p.set_stall_limit(Duration::from_millis(300));
        let s = subscribed(&mut p).await;
        // ~64 KB every 20 ms: seconds behind a flat-out sender, but never
        // 300 ms without taking something.
        let n = 4_000u32;
        let reader = read_all(s, n, Some(Duration::from_millis(20)));
        let payload = vec![b'x'; 1000];
        for i in 0..n {
            p.send(&[&i.to_be_bytes(), &payload]).await;
        }
        p.flush().await;
        reader.await.unwrap();
        assert_eq!(p.stalled(), (0, 0));
    }

    #[tokio::test]
    async fn a_stop_ends_the_wait_for_a_stalled_subscriber_at_its_deadline() {
        let mut p = Publisher::bind("127.0.0.1", 0, None).await.unwrap();
        p.set_stall_limit(Duration::from_secs(3600));
        let _stalled = subscribed(&mut p).await;
        let payload = vec![b'x'; 1000];
        p.stop_by(Instant::now() + Duration::from_millis(200));
        // Until its queue and the kernel's buffers are full, and then
        // until the deadline: no longer.
        let mut i = 0u32;
        let sent = tokio::time::timeout(Duration::from_secs(20), async {
            while p.stalled().0 == 0 {
                if !p.try_send(&[&i.to_be_bytes(), &payload]) {
                    assert!(p.waiting_for().is_some());
                    p.resume().await;
                }
                i += 1;
            }
        })
        .await;
        assert!(sent.is_ok(), "the wait outlived the stop's deadline");
        assert!(!p.is_held());
        assert_eq!(p.subscribers(), 0);
    }

    #[tokio::test]
    async fn a_slow_subscriber_makes_send_wait_and_loses_nothing() {
        let mut p = Publisher::bind("127.0.0.1", 0, None).await.unwrap();
        let mut s = raw_sub(p.local_addr(), b"SUB").await;
        let _ready = read_frame(&mut s).await.unwrap();
        s.write_all(&[0x00, 1, 1]).await.unwrap();
        fence(&mut s).await;
        assert_eq!(p.subscriptions(), [Vec::<u8>::new()]);
        let n = 20_000u32;
        let payload = vec![b'x'; 1000];
        // Far more than the high-water mark plus socket buffers: the sender
        // must wait for the reader rather than drop.
        let sender = tokio::spawn(async move {
            for i in 0..n {
                p.send(&[b"t", &i.to_be_bytes(), &payload]).await;
            }
            p.flush().await;
            p
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!sender.is_finished(), "send did not wait for a slow reader");
        for i in 0..n {
            let topic = read_frame(&mut s).await.unwrap();
            assert_eq!(topic.body, b"t");
            let seq = read_frame(&mut s).await.unwrap();
            assert_eq!(seq.body, i.to_be_bytes());
            let body = read_frame(&mut s).await.unwrap();
            assert_eq!(body.body.len(), 1000);
        }
        let _p = sender.await.unwrap();
    }
}
