//! Where points go: line-protocol encoding, batching, the InfluxDB client,
//! and the disk spool that holds batches while InfluxDB cannot take them.

pub mod batch;
pub mod influx;
pub mod line;
pub mod spool;
pub mod writer;

/// Logs at most one line per interval, counting what it held back, so a
/// flood of bad input cannot flood the journal.
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
    pub fn warn(&mut self, what: impl FnOnce() -> String) {
        let now = std::time::Instant::now();
        if self
            .last
            .is_some_and(|l| now.duration_since(l) < self.every)
        {
            self.suppressed += 1;
            return;
        }
        let held = std::mem::take(&mut self.suppressed);
        if held > 0 {
            tracing::warn!("{} ({held} similar messages suppressed)", what());
        } else {
            tracing::warn!("{}", what());
        }
        self.last = Some(now);
    }
}
