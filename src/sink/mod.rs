//! Where points go: line-protocol encoding, batching, the InfluxDB client,
//! and the disk spool that holds batches while InfluxDB cannot take them.

pub mod batch;
pub mod influx;
pub mod line;
pub mod spool;
pub mod writer;

/// Logs at most one line per interval, counting what it held back, so a
/// flood of bad input cannot flood the journal. The lines go out through
/// [`warn_limited!`](crate::warn_limited), expanded where it is called, so
/// they carry the caller's target (`nbpy::subscriber`, not `nbpy::sink`)
/// and `RUST_LOG` filters them with the rest of the caller's logs.
pub struct RateLimitedLog {
    every: std::time::Duration,
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    pub fn new(every: std::time::Duration) -> Self {
        RateLimitedLog {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// Whether a line may go out now: `Some(lines held back since the last
    /// one)`, or `None` (counted as held back).
    pub fn admit(&mut self) -> Option<u64> {
        let now = std::time::Instant::now();
        if self
            .last
            .is_some_and(|l| now.duration_since(l) < self.every)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }

    /// The lines held back since the last one went out, and starts over:
    /// for [`warn_suppressed!`](crate::warn_suppressed) when no more lines
    /// will come to carry that count.
    pub fn take_suppressed(&mut self) -> u64 {
        std::mem::take(&mut self.suppressed)
    }
}

/// `warn_limited!(log, || message)`: a WARN line through the
/// [`RateLimitedLog`] `log`, under the calling module's target; the
/// message is only formatted when the line goes out.
#[macro_export]
macro_rules! warn_limited {
    ($log:expr, $what:expr) => {{
        if let Some(held) = $log.admit() {
            let what: String = ($what)();
            if held > 0 {
                ::tracing::warn!("{what} ({held} similar messages suppressed)");
            } else {
                ::tracing::warn!("{what}");
            }
        }
    }};
}

/// `warn_suppressed!(log, |n| message)`: when what `log` limited has
/// ended (a replay's file, a publisher's stop), a WARN with the `n` lines
/// it held back since its last one, if any, under the calling module's
/// target. Without it, the count would wait for a next line that never
/// comes, and a file of bad lines would show as one.
#[macro_export]
macro_rules! warn_suppressed {
    ($log:expr, $what:expr) => {{
        let held = $log.take_suppressed();
        if held > 0 {
            let what: String = ($what)(held);
            ::tracing::warn!("{what}");
        }
    }};
}
