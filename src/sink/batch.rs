//! Accumulates encoded lines into batches, one open batch per retention
//! policy (a write request names a single RP).

use std::time::{Duration, Instant};

/// Encoded points for one write request.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub rp: &'static str,
    pub lines: Vec<u8>,
    pub points: usize,
}

/// Room per point in a fresh batch: a ticker line is ~260 bytes, a book
/// line ~600; growing a megabyte buffer by copying is a visible cost.
const LINE_BYTES: usize = 320;

struct Open {
    batch: Batch,
    since: Instant,
}

pub struct Batcher {
    size: usize,
    age: Duration,
    open: Vec<Open>,
}

impl Batcher {
    pub fn new(size: usize, age: Duration) -> Self {
        Batcher {
            size,
            age,
            open: Vec::new(),
        }
    }

    /// The buffer to append one point for `rp` to; call [`Batcher::commit`]
    /// after a successful append.
    pub fn buffer(&mut self, rp: &'static str) -> &mut Vec<u8> {
        let i = match self.open.iter().position(|o| o.batch.rp == rp) {
            Some(i) => i,
            None => {
                self.open.push(Open {
                    batch: Batch {
                        rp,
                        lines: Vec::with_capacity(self.size * LINE_BYTES),
                        points: 0,
                    },
                    since: Instant::now(),
                });
                self.open.len() - 1
            }
        };
        &mut self.open[i].batch.lines
    }

    /// Counts the point just appended; returns the batch once it is full.
    pub fn commit(&mut self, rp: &'static str) -> Option<Batch> {
        let i = self.open.iter().position(|o| o.batch.rp == rp)?;
        let o = &mut self.open[i];
        if o.batch.points == 0 {
            o.since = Instant::now();
        }
        o.batch.points += 1;
        if o.batch.points >= self.size {
            Some(self.take(i))
        } else {
            None
        }
    }

    fn take(&mut self, i: usize) -> Batch {
        let o = &mut self.open[i];
        o.since = Instant::now();
        let fresh = Batch {
            rp: o.batch.rp,
            lines: Vec::with_capacity(self.size * LINE_BYTES),
            points: 0,
        };
        std::mem::replace(&mut o.batch, fresh)
    }

    /// Batches older than the flush interval (or all, with `all`).
    pub fn due(&mut self, all: bool) -> Vec<Batch> {
        let mut out = Vec::new();
        for i in 0..self.open.len() {
            let o = &self.open[i];
            if o.batch.points > 0 && (all || o.since.elapsed() >= self.age) {
                out.push(self.take(i));
            }
        }
        out
    }

    /// Points held in open batches.
    pub fn pending(&self) -> usize {
        self.open.iter().map(|o| o.batch.points).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_by_size_and_flushes_by_age() {
        let mut b = Batcher::new(2, Duration::from_secs(3600));
        b.buffer("a").extend_from_slice(b"x\n");
        assert!(b.commit("a").is_none());
        b.buffer("b").extend_from_slice(b"y\n");
        assert!(b.commit("b").is_none());
        b.buffer("a").extend_from_slice(b"z\n");
        let full = b.commit("a").unwrap();
        assert_eq!(
            (full.rp, full.points, full.lines.as_slice()),
            ("a", 2, &b"x\nz\n"[..])
        );
        assert!(b.due(false).is_empty());
        assert_eq!(b.pending(), 1);
        let rest = b.due(true);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].rp, "b");
        assert_eq!(b.pending(), 0);
    }
}
