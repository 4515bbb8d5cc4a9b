//! A listening-only connection to one publisher, for the validator and the
//! health daemon.
//!
//! It is an ordinary SUB socket subscribed to everything, plus the socket's
//! monitor, so that a publisher that dies is seen at once: the kernel closes
//! its TCP connections, the SUB's reader sees the end of the stream and the
//! monitor reports `Disconnected`. Without that, a killed publisher and an
//! idle one would look the same until some staleness timeout ran out.
//!
//! The `zeromq` crate reconnects by itself, but with a backoff that grows to
//! 30 s, which is far too slow to tell that a restarted publisher is back.
//! So a [`Tap`] ends at the first disconnect, and [`Tap::connect`] is simply
//! called again in a loop by its owner, at whatever pace it wants.
//!
//! A tap is a real subscriber of the publisher, marked as a monitor by its
//! subscription to [`crate::bus::MONITOR_TOPIC`]: the publisher does not
//! count it towards `wait_for_subscribers` and does not wait for it, so an
//! owner that stops reading misses messages (seen here as `seq` gaps)
//! rather than stalling the feed.

use std::time::Duration;

use futures::StreamExt;
use zeromq::{Socket, SocketEvent, SocketRecv, ZmqMessage};

/// What happened on a tap.
pub enum TapEvent {
    Message(ZmqMessage),
    /// The connection is gone; this tap will not deliver anything more.
    Disconnected(String),
}

pub struct Tap {
    sock: zeromq::SubSocket,
    monitor: futures::channel::mpsc::Receiver<SocketEvent>,
    closed: bool,
}

impl Tap {
    /// Connects to `endpoint` (retrying inside `within`) and subscribes to
    /// every topic. Cancel-safe: dropping the future drops the socket.
    pub async fn connect(endpoint: &str, within: Duration) -> Result<Tap, String> {
        let mut options = zeromq::SocketOptions::default();
        options.no_connect_timeout();
        let mut sock = zeromq::SubSocket::with_options(options);
        // The monitor must exist before the connection does, or a disconnect
        // right after connecting could go unreported.
        let monitor = sock.monitor();
        // The marker must reach the publisher before the real subscription,
        // so it never counts this tap as a subscriber it waits for (see
        // `bus::MONITOR_TOPIC`). Subscriptions known at connect time are sent
        // in no particular order (a set), so only the marker is known then;
        // "" follows on the same connection once it is up.
        sock.subscribe(crate::bus::MONITOR_TOPIC)
            .await
            .map_err(|e| format!("subscribe: {e}"))?;
        match tokio::time::timeout(within, sock.connect(endpoint)).await {
            Ok(Ok(())) => {
                sock.subscribe("")
                    .await
                    .map_err(|e| format!("subscribe: {e}"))?;
                Ok(Tap {
                    sock,
                    monitor,
                    closed: false,
                })
            }
            Ok(Err(e)) => Err(format!("cannot connect to {endpoint}: {e}")),
            Err(_) => Err(format!(
                "no connection to {endpoint} within {}",
                humantime::format_duration(within)
            )),
        }
    }

    /// The next message, or the end of the connection. After
    /// `Disconnected` it only ever returns `Disconnected`.
    pub async fn next(&mut self) -> TapEvent {
        if self.closed {
            return TapEvent::Disconnected("closed".into());
        }
        loop {
            tokio::select! {
                biased;
                m = self.sock.recv() => match m {
                    Ok(m) => return TapEvent::Message(m),
                    Err(e) => {
                        self.closed = true;
                        return TapEvent::Disconnected(format!("receive failed: {e}"));
                    }
                },
                ev = self.monitor.next() => match ev {
                    Some(SocketEvent::Disconnected(_)) | None => {
                        self.closed = true;
                        return TapEvent::Disconnected("connection closed by the publisher".into());
                    }
                    Some(_) => continue,
                },
            }
        }
    }
}
