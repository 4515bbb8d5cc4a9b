//! The writer pool: batches in, InfluxDB writes out, nothing dropped.
//!
//! A bounded queue of batches sits between the subscriber's intake and a
//! few concurrent writers. Transient failures retry with capped exponential
//! backoff and jitter; a refused batch is split until the bad points are
//! isolated, the good ones are stored (rewriting a stored point is harmless:
//! same series and time overwrite) and the bad ones go to a dead-letter file
//! with InfluxDB's reason.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::batch::Batch;
use super::influx::{InfluxClient, WriteError};
use super::RateLimitedLog;
use crate::config::InfluxConfig;

#[derive(Default, Debug)]
pub struct WriterStats {
    /// Points InfluxDB accepted.
    pub written: AtomicU64,
    /// Failed write attempts (each retried or split).
    pub write_errors: AtomicU64,
    /// Points InfluxDB refused, now in the dead-letter file.
    pub dead_lettered: AtomicU64,
    /// Points queued or being written.
    pub pending: AtomicU64,
    /// Batches waiting in the queue.
    pub queued_batches: AtomicU64,
    /// Last successful write's latency, µs.
    pub latency_us: AtomicU64,
    /// Since when the oldest in-flight batch has been failing (ms since the
    /// pool started; 0 = nothing failing). Feeds the watchdog.
    pub failing_since_ms: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

pub struct WriterPool {
    tx: mpsc::Sender<Batch>,
    handles: Vec<JoinHandle<()>>,
    pub stats: Arc<WriterStats>,
    started: Instant,
}

struct Shared {
    client: InfluxClient,
    stats: Arc<WriterStats>,
    retry_min: Duration,
    retry_max: Duration,
    dead_letter: PathBuf,
    log: Mutex<RateLimitedLog>,
    started: Instant,
}

impl WriterPool {
    pub fn start(
        client: InfluxClient,
        cfg: &InfluxConfig,
        queue_batches: usize,
        dead_letter: PathBuf,
    ) -> Self {
        let (tx, rx) = mpsc::channel::<Batch>(queue_batches.max(1));
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let stats = Arc::new(WriterStats::default());
        let started = Instant::now();
        let shared = Arc::new(Shared {
            client,
            stats: stats.clone(),
            retry_min: cfg.retry_min,
            retry_max: cfg.retry_max,
            dead_letter,
            log: Mutex::new(RateLimitedLog::new(Duration::from_secs(5))),
            started,
        });
        let handles = (0..cfg.concurrency.max(1))
            .map(|_| {
                let rx = rx.clone();
                let shared = shared.clone();
                tokio::spawn(async move {
                    loop {
                        let next = rx.lock().await.recv().await;
                        let Some(batch) = next else { break };
                        shared.stats.queued_batches.fetch_sub(1, Ordering::Relaxed);
                        shared.deliver(batch).await;
                    }
                })
            })
            .collect();
        WriterPool {
            tx,
            handles,
            stats,
            started,
        }
    }

    /// Queues a batch, waiting for room when the queue is full.
    pub async fn submit(&self, batch: Batch) {
        if batch.points == 0 {
            return;
        }
        self.stats
            .pending
            .fetch_add(batch.points as u64, Ordering::Relaxed);
        self.stats.queued_batches.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(batch).await.is_err() {
            tracing::error!("writer pool closed while submitting");
        }
    }

    /// Is there room for another batch without waiting?
    pub fn has_room(&self) -> bool {
        self.tx.capacity() > 0
    }

    /// How long the writers have been failing to deliver, if they are.
    pub fn failing_for(&self) -> Option<Duration> {
        match self.stats.failing_since_ms.load(Ordering::Relaxed) {
            0 => None,
            since => Some(
                self.started
                    .elapsed()
                    .saturating_sub(Duration::from_millis(since)),
            ),
        }
    }

    /// Closes the queue and waits up to `deadline` for every batch to be
    /// written. Returns the points still unwritten when time ran out.
    pub async fn close(self, deadline: Duration) -> Result<(), u64> {
        drop(self.tx);
        let all = futures::future::join_all(self.handles);
        match tokio::time::timeout(deadline, all).await {
            Ok(_) => Ok(()),
            Err(_) => Err(self.stats.pending.load(Ordering::Relaxed)),
        }
    }
}

impl Shared {
    async fn deliver(&self, batch: Batch) {
        let mut work = vec![batch];
        while let Some(b) = work.pop() {
            match self.write_with_retry(&b).await {
                Ok(()) => {}
                Err(WriteError::TooLarge) | Err(WriteError::Rejected(_)) if b.points > 1 => {
                    let (l, r) = split(&b);
                    work.push(r);
                    work.push(l);
                }
                Err(e) => self.dead_letter(&b, &e),
            }
        }
    }

    /// Retries until the batch is written or refused for what it contains.
    async fn write_with_retry(&self, b: &Batch) -> Result<(), WriteError> {
        let mut delay = self.retry_min;
        let mut failing = false;
        loop {
            let t0 = Instant::now();
            let r = self.client.write(b.rp, &b.lines).await;
            match r {
                Ok(()) => {
                    self.stats
                        .latency_us
                        .store(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
                    self.stats
                        .written
                        .fetch_add(b.points as u64, Ordering::Relaxed);
                    self.stats
                        .pending
                        .fetch_sub(b.points as u64, Ordering::Relaxed);
                    if failing {
                        self.stats.failing_since_ms.store(0, Ordering::Relaxed);
                        tracing::info!("InfluxDB writes succeed again");
                    }
                    return Ok(());
                }
                Err(e @ (WriteError::TooLarge | WriteError::Rejected(_))) => {
                    self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                    return Err(e);
                }
                Err(e) => {
                    self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                    if !failing {
                        failing = true;
                        let now = (self.started.elapsed().as_millis() as u64).max(1);
                        let _ = self.stats.failing_since_ms.compare_exchange(
                            0,
                            now,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                    }
                    if let Ok(mut last) = self.stats.last_error.lock() {
                        *last = Some(e.to_string());
                    }
                    if let Ok(mut log) = self.log.lock() {
                        log.warn(|| {
                            format!(
                                "write of {} points failed, retrying in {delay:?}: {e}",
                                b.points
                            )
                        });
                    }
                    let jitter = rand::thread_rng().gen_range(0.5..1.0);
                    tokio::time::sleep(delay.mul_f64(jitter)).await;
                    delay = (delay * 2).min(self.retry_max);
                }
            }
        }
    }

    fn dead_letter(&self, b: &Batch, e: &WriteError) {
        use std::io::Write;
        self.stats
            .dead_lettered
            .fetch_add(b.points as u64, Ordering::Relaxed);
        self.stats
            .pending
            .fetch_sub(b.points as u64, Ordering::Relaxed);
        if let Ok(mut log) = self.log.lock() {
            log.warn(|| {
                format!(
                    "{} point(s) refused by InfluxDB, kept in {}: {e}",
                    b.points,
                    self.dead_letter.display()
                )
            });
        }
        let r = (|| -> std::io::Result<()> {
            if let Some(dir) = self.dead_letter.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.dead_letter)?;
            let reason = e.to_string().replace('\n', " ");
            writeln!(f, "# rp={} reason: {reason}", b.rp)?;
            f.write_all(&b.lines)?;
            f.sync_data()
        })();
        if let Err(io) = r {
            tracing::error!(
                "cannot write dead-letter file {}: {io}",
                self.dead_letter.display()
            );
        }
    }
}

/// Splits a batch in two at a line boundary.
fn split(b: &Batch) -> (Batch, Batch) {
    let half = b.points / 2;
    let mut cut = 0;
    let mut seen = 0;
    for (i, c) in b.lines.iter().enumerate() {
        if *c == b'\n' {
            seen += 1;
            if seen == half {
                cut = i + 1;
                break;
            }
        }
    }
    (
        Batch {
            rp: b.rp,
            lines: b.lines[..cut].to_vec(),
            points: half,
        },
        Batch {
            rp: b.rp,
            lines: b.lines[cut..].to_vec(),
            points: b.points - half,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_every_line() {
        let b = Batch {
            rp: "x",
            lines: b"a\nb\nc\n".to_vec(),
            points: 3,
        };
        let (l, r) = split(&b);
        assert_eq!((l.lines.as_slice(), l.points), (&b"a\n"[..], 1));
        assert_eq!((r.lines.as_slice(), r.points), (&b"b\nc\n"[..], 2));
    }
}
