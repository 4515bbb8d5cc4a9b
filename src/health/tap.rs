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
    ///
    /// The `zeromq` crate retries only a refused TCP connect; a peer that
    /// accepts and then fails the ZMTP handshake ends its `connect` at once.
    /// That is what a publisher that is shutting down looks like (its
    /// listener still accepts while the process exits), and right after a
    /// disconnect is when owners reconnect: so a failed attempt is tried
    /// again, on a fresh socket, until `within` is spent.
    pub async fn connect(endpoint: &str, within: Duration) -> Result<Tap, String> {
        const AGAIN: Duration = Duration::from_millis(100);
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, Self::connect_once(endpoint)).await {
                Ok(Ok(tap)) => return Ok(tap),
                Ok(Err(e)) if tokio::time::Instant::now() + AGAIN < deadline => {
                    tracing::debug!("{e}; trying again");
                    tokio::time::sleep(AGAIN).await;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(format!(
                        "no connection to {endpoint} within {}",
                        humantime::format_duration(within)
                    ))
                }
            }
        }
    }

    async fn connect_once(endpoint: &str) -> Result<Tap, String> {
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
        sock.connect(endpoint)
            .await
            .map_err(|e| format!("cannot connect to {endpoint}: {e}"))?;
        sock.subscribe("")
            .await
            .map_err(|e| format!("subscribe: {e}"))?;
        Ok(Tap {
            sock,
            monitor,
            closed: false,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener that accepts and hangs up (a publisher on its way out)
    /// must not end the attempt: the real publisher that binds the port
    /// after it is reached within the window.
    #[tokio::test]
    async fn a_failed_handshake_is_tried_again_within_the_window() {
        let port = crate::backend::free_port().unwrap();
        let endpoint = format!("tcp://127.0.0.1:{port}");
        let dying = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let tap = tokio::spawn({
            let endpoint = endpoint.clone();
            async move { Tap::connect(&endpoint, Duration::from_secs(20)).await }
        });
        let (conn, _) = dying.accept().await.unwrap();
        drop(conn);
        drop(dying);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _publisher = crate::bus::BusPublisher::bind(&endpoint).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(20), tap)
            .await
            .expect("the tap gave an answer within the window")
            .unwrap();
        assert!(r.is_ok(), "{:?}", r.err());
    }
}
