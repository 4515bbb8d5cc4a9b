//! The built-in feed: a deterministic random walk for several instruments on
//! every channel kind (ticker, book, trade, FX price, betting odds).
//!
//! It is the default for demos, tests and benchmarks, so it must be exact:
//! the same seed gives the same prices, exchange times strictly increase (no
//! two points can collide in InfluxDB), and it waits for the bus instead of
//! dropping, so "published N" means N messages went out.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

use super::FeedContext;
use crate::exit::Failure;
use crate::wire::{now_ns, Envelope, Fields, Value};

pub const SOURCE: &str = "synthetic";
pub const CHANNELS: [&str; 5] = ["ticker", "book", "trade", "price", "odds"];
pub const DEFAULT_INSTRUMENTS: [&str; 4] = ["BTC/USD", "ETH/USD", "EUR_USD", "GBP_USD"];

/// The generator, separate from the async loop so benches can drive it.
pub struct Generator {
    rng: StdRng,
    /// Leaked, a few bytes once per generator (one per feed run): messages
    /// borrow them instead of allocating a copy each.
    instruments: Vec<&'static str>,
    selection_ids: Vec<&'static str>,
    mids: Vec<f64>,
    n: u64,
    last_ts: i64,
    trade_id: i64,
}

impl Generator {
    pub fn new(seed: u64, instruments: &[String]) -> Self {
        let instruments: Vec<&'static str> = if instruments.is_empty() {
            DEFAULT_INSTRUMENTS.to_vec()
        } else {
            instruments
                .iter()
                .map(|s| &*Box::leak(s.clone().into_boxed_str()))
                .collect()
        };
        let selection_ids = (0..instruments.len())
            .map(|i| &*Box::leak(format!("{}", 1000 + i).into_boxed_str()))
            .collect();
        let mids = instruments
            .iter()
            .enumerate()
            .map(|(i, _)| 100.0 * (i as f64 + 1.0))
            .collect();
        Generator {
            rng: StdRng::seed_from_u64(seed),
            instruments,
            selection_ids,
            mids,
            n: 0,
            last_ts: 0,
            trade_id: 0,
        }
    }

    /// The next message: channels rotate fastest, then instruments.
    pub fn next_message(&mut self) -> Envelope<'static> {
        let chi = (self.n % CHANNELS.len() as u64) as usize;
        let ch = CHANNELS[chi];
        let idx = ((self.n / CHANNELS.len() as u64) % self.instruments.len() as u64) as usize;
        self.n += 1;
        let step: f64 = self.rng.gen_range(-0.0005..0.0005);
        let mid = (self.mids[idx] * (1.0 + step)).max(0.01);
        self.mids[idx] = mid;
        let half = mid * 0.0001;
        let (bid, ask) = (round(mid - half), round(mid + half));
        let q = |r: &mut StdRng| round(r.gen_range(0.01..5.0));
        let mut data: Fields<'static> = Vec::with_capacity(FIELDS[chi]);
        let mut put = |k: &'static str, v: Value<'static>| data.push((Cow::Borrowed(k), v));
        match chi {
            0 => {
                put("bid", Value::Float(bid));
                put("bid_qty", Value::Float(q(&mut self.rng)));
                put("ask", Value::Float(ask));
                put("ask_qty", Value::Float(q(&mut self.rng)));
                put("last", Value::Float(round(mid)));
                put(
                    "volume",
                    Value::Float(round(self.rng.gen_range(1000.0..5000.0))),
                );
                put("vwap", Value::Float(round(mid * 0.999)));
                put("low", Value::Float(round(mid * 0.98)));
                put("high", Value::Float(round(mid * 1.02)));
                put("change", Value::Float(round(mid * step)));
                put("change_pct", Value::Float(round(step * 100.0)));
            }
            1 => {
                for level in 0..5 {
                    let off = half * (level as f64 * 2.0 + 1.0);
                    put(BID[level], Value::Float(round(mid - off)));
                    put(BID_QTY[level], Value::Float(q(&mut self.rng)));
                    put(ASK[level], Value::Float(round(mid + off)));
                    put(ASK_QTY[level], Value::Float(q(&mut self.rng)));
                }
                put("mid", Value::Float(round(mid)));
                put("spread", Value::Float(round(ask - bid)));
            }
            2 => {
                self.trade_id += 1;
                let buy = self.rng.gen_bool(0.5);
                put(
                    "side",
                    Value::Str(Cow::Borrowed(if buy { "buy" } else { "sell" })),
                );
                put("ord_type", Value::Str(Cow::Borrowed("market")));
                put("price", Value::Float(if buy { ask } else { bid }));
                put("qty", Value::Float(q(&mut self.rng)));
                put("trade_id", Value::Int(self.trade_id));
            }
            3 => {
                put("bid", Value::Float(bid));
                put("ask", Value::Float(ask));
                put("spread", Value::Float(round(ask - bid)));
                put("liquidity", Value::Float(1_000_000.0));
                put("tradeable", Value::Bool(true));
            }
            _ => {
                // Decimal odds around 1 + mid/100, Betfair-like ladders.
                let odds = 1.01 + (mid / 100.0);
                put("market_id", Value::Str(Cow::Borrowed("1.000000001")));
                put(
                    "selection_id",
                    Value::Str(Cow::Borrowed(self.selection_ids[idx])),
                );
                put("status", Value::Str(Cow::Borrowed("OPEN")));
                for level in 0..3 {
                    put(BACK[level], Value::Float(round(odds - 0.01 * level as f64)));
                    put(BACK_SIZE[level], Value::Float(q(&mut self.rng)));
                    put(
                        LAY[level],
                        Value::Float(round(odds + 0.01 * (level as f64 + 1.0))),
                    );
                    put(LAY_SIZE[level], Value::Float(q(&mut self.rng)));
                }
                put("ltp", Value::Float(round(odds)));
                put(
                    "tv",
                    Value::Float(round(self.rng.gen_range(100.0..10000.0))),
                );
            }
        }
        debug_assert_eq!(data.len(), FIELDS[chi], "FIELDS is out of date");
        let ts = now_ns().max(self.last_ts + 1);
        self.last_ts = ts;
        // Built in place: `Envelope::new` would read the clock a second time.
        Envelope {
            src: Cow::Borrowed(SOURCE),
            ch: Cow::Borrowed(ch),
            sym: Cow::Borrowed(self.instruments[idx]),
            publisher: Cow::Borrowed(""),
            seq: 0,
            epoch: 0,
            ts,
            rx: ts,
            data,
        }
    }
}

/// Fields per message of each channel, to allocate them exactly: the
/// allocator's fast path takes up to 1 KiB (18 fields), and a book's 22
/// take the slower one anyway, but a common capacity for all (24) sent
/// every message there, 5% of the publisher's instructions.
const FIELDS: [usize; 5] = [11, 22, 5, 5, 17];

const BID: [&str; 5] = ["bid1", "bid2", "bid3", "bid4", "bid5"];
const BID_QTY: [&str; 5] = ["bid1_qty", "bid2_qty", "bid3_qty", "bid4_qty", "bid5_qty"];
const ASK: [&str; 5] = ["ask1", "ask2", "ask3", "ask4", "ask5"];
const ASK_QTY: [&str; 5] = ["ask1_qty", "ask2_qty", "ask3_qty", "ask4_qty", "ask5_qty"];
const BACK: [&str; 3] = ["back1", "back2", "back3"];
const BACK_SIZE: [&str; 3] = ["back1_size", "back2_size", "back3_size"];
const LAY: [&str; 3] = ["lay1", "lay2", "lay3"];
const LAY_SIZE: [&str; 3] = ["lay1_size", "lay2_size", "lay3_size"];

/// To 6 decimals, half away from zero, by a cast: `f64::round` is a libm
/// call on baseline x86-64, and this runs 20 times per book message.
fn round(x: f64) -> f64 {
    let m = x * 1e6;
    (m + 0.5f64.copysign(m)) as i64 as f64 / 1e6
}

/// Paces a loop to `rate` per second (0 = unpaced) without drifting.
///
/// A loop that fell behind (the bus waited for a subscriber) catches up
/// by running unpaced, but only by up to [`CATCH_UP`]: further behind, the
/// pacer starts counting again from now. Catching up on a 9 s wait
/// once made a 2,000 msg/s feed send 20,000 msg/s, a burst no subscriber
/// had asked for. Nothing is lost by it: the feed generates fewer messages
/// over that time, every one it generates is sent, and `count` still
/// counts generated messages.
pub struct Pacer {
    start: Instant,
    rate: f64,
    /// Ticks since `start`.
    sent: u64,
    /// Times the pacer started over, and the seconds it did not catch up.
    pub restarts: u64,
    pub skipped_secs: f64,
}

/// How far behind its rate a paced loop may run flat out to catch up.
pub const CATCH_UP: Duration = Duration::from_secs(1);

impl Pacer {
    pub fn new(rate: f64) -> Self {
        Self::starting_at(Instant::now(), rate)
    }

    fn starting_at(start: Instant, rate: f64) -> Self {
        Pacer {
            start,
            rate,
            sent: 0,
            restarts: 0,
            skipped_secs: 0.0,
        }
    }

    /// When the next tick is due (None unpaced).
    fn due(&self) -> Option<Instant> {
        (self.rate > 0.0)
            .then(|| self.start + Duration::from_secs_f64(self.sent as f64 / self.rate))
    }

    /// Waits until the next tick is due; false (at once) when `stop` is
    /// cancelled first. A stop must not wait for the tick: at a slow rate
    /// the wait is up to 1/rate s (50 s at 0.02/s), past the unit's stop
    /// timeout. Unpaced, or behind, it does not wait, and does not touch
    /// `stop` either (a flat-out feed calls this per message).
    pub async fn tick_unless(&mut self, stop: &CancellationToken) -> bool {
        let Some(due) = self.advance() else {
            return true;
        };
        tokio::select! {
            biased;
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep_until(due.into()) => true,
        }
    }

    /// Counts a tick: when the next one is due, if that is worth waiting
    /// for (None unpaced or behind).
    fn advance(&mut self) -> Option<Instant> {
        self.sent += 1;
        let due = self.due()?;
        let now = Instant::now();
        if due > now + Duration::from_millis(1) {
            return Some(due);
        }
        if now > due + CATCH_UP {
            self.skipped_secs += (now - due).as_secs_f64();
            self.restarts += 1;
            self.start = now;
            self.sent = 0;
        }
        None
    }
}

pub async fn run(ctx: FeedContext) -> Result<(), Failure> {
    let mut gen = Generator::new(ctx.cfg.seed, &ctx.cfg.instruments);
    let mut pacer = Pacer::new(ctx.cfg.rate);
    let mut sent = 0u64;
    while ctx.cfg.count == 0 || sent < ctx.cfg.count {
        let env = gen.next_message();
        if !ctx.out.send_unless(env, &ctx.shutdown).await {
            break;
        }
        sent += 1;
        let behind = pacer.skipped_secs;
        if !pacer.tick_unless(&ctx.shutdown).await {
            break;
        }
        if pacer.skipped_secs != behind {
            tracing::info!(
                "{}: synthetic feed {:.1} s behind its rate of {}/s (the bus waited); going on at that rate from now, not catching up ({} times so far; nothing is lost: fewer messages are generated)",
                ctx.name,
                pacer.skipped_secs - behind,
                ctx.cfg.rate,
                pacer.restarts
            );
        }
    }
    tracing::info!("{}: synthetic feed generated {sent} messages", ctx.name);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After a stall the next message is due from now on, not at once
    /// (with many more behind it): the feed does not burst to catch up.
    #[tokio::test]
    async fn a_pacer_far_behind_does_not_burst_to_catch_up() {
        let Some(long_ago) = Instant::now().checked_sub(Duration::from_secs(9)) else {
            return; // a machine up for less than 9 s
        };
        let mut p = Pacer::starting_at(long_ago, 2000.0);
        p.tick_unless(&CancellationToken::new()).await;
        let due = p.due().unwrap();
        assert!(
            due + Duration::from_millis(1) >= Instant::now(),
            "next message due {:?} ago: the pacer would burst",
            Instant::now() - due
        );
        // A little behind (under CATCH_UP) it still catches up.
        let recently = Instant::now()
            .checked_sub(Duration::from_millis(100))
            .unwrap_or(long_ago);
        let mut p = Pacer::starting_at(recently, 2000.0);
        p.tick_unless(&CancellationToken::new()).await;
        assert_eq!(p.restarts, 0);
    }

    #[test]
    fn deterministic_and_strictly_increasing() {
        let mut a = Generator::new(7, &[]);
        let mut b = Generator::new(7, &[]);
        let mut last = 0;
        for i in 0..100 {
            let (x, y) = (a.next_message(), b.next_message());
            assert_eq!(x.data, y.data);
            assert_eq!(x.ch, CHANNELS[i % 5]);
            assert!(x.ts > last);
            last = x.ts;
        }
    }
}
