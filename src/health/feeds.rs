//! The health daemon's view of the bus: one [`Tap`] per configured
//! publisher, kept connected, counting what flows.
//!
//! A publisher is `down` while its tap has no connection (the process is
//! gone or not listening), `stale` while connected but silent for longer
//! than its `stale_after`, else `up`. The connection state is live: a
//! killed publisher's connection closes at once and shows as down on the
//! next `/status`, and a restarted one is found again by re-connecting
//! every [`RECONNECT_EVERY`].

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use zeromq::ZmqMessage;

use super::tap::{Tap, TapEvent};
use crate::bus::GapTracker;
use crate::config::PublisherConfig;
use crate::wire::now_ns;

/// How often a lost publisher is tried again.
pub const RECONNECT_EVERY: Duration = Duration::from_millis(250);
/// Samples of (time, seq) kept for write-lag estimates, and how far back.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
pub const LAG_HORIZON: Duration = Duration::from_secs(600);
/// Rates are measured over this much recent history.
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// Before a topic has a full window, its rate so far, once it spans this.
const FIRST_RATE_AFTER: Duration = Duration::from_millis(500);

#[derive(Debug)]
pub struct TopicState {
    pub received: u64,
    pub last: Option<Instant>,
    /// (when, received) a RATE_WINDOW ago, for the rate: at first, the
    /// topic's first message.
    pub mark: (Instant, u64),
    pub rate: f64,
}

/// A (receive time, seq, exchange time) sample of the publisher's stream.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Instant,
    pub epoch: u64,
    pub seq: u64,
    pub time_ns: i64,
}

/// What one measurement of a publisher received on the bus, for its own
/// write lag: the publisher's `seq` is shared by all its measurements, so
/// "everything up to the newest stored seq is stored" only holds within a
/// measurement. One whose every point InfluxDB refuses (a field type
/// conflict) was hidden by the others' progress when they were pooled.
#[derive(Debug, Clone, Default)]
pub struct MeasurementSeen {
    pub epoch: u64,
    pub last_seq: u64,
    /// Messages of this measurement received in `epoch`.
    pub count: u64,
    /// Sampled every [`SAMPLE_EVERY`]; `count` includes the sampled message.
    pub samples: VecDeque<MeasurementSample>,
}

#[derive(Debug, Clone, Copy)]
pub struct MeasurementSample {
    pub at: Instant,
    pub seq: u64,
    pub count: u64,
    /// The exchange time, to bound the time range queried.
    pub time_ns: i64,
}

impl MeasurementSeen {
    fn observe(&mut self, now: Instant, epoch: u64, seq: u64, time_ns: i64) {
        if epoch != self.epoch {
            *self = MeasurementSeen {
                epoch,
                ..Default::default()
            };
        }
        self.count += 1;
        self.last_seq = self.last_seq.max(seq);
        if self
            .samples
            .back()
            .is_none_or(|s| now.duration_since(s.at) >= SAMPLE_EVERY)
        {
            self.samples.push_back(MeasurementSample {
                at: now,
                seq,
                count: self.count,
                time_ns,
            });
        }
    }
}

pub struct FeedState {
    pub connected: bool,
    /// Since when `connected` has had its current value.
    pub since: Instant,
    pub problem: Option<String>,
    pub disconnects: u64,
    pub received: u64,
    pub malformed: u64,
    pub unsequenced: u64,
    pub gaps: GapTracker,
    pub last_message: Option<Instant>,
    /// The newest message's epoch, seq and receive − exchange time.
    pub epoch: u64,
    pub last_seq: u64,
    pub latency_ms: Option<f64>,
    pub topics: HashMap<String, TopicState>,
    /// Measurements this publisher's messages land in.
    pub measurements: BTreeSet<&'static str>,
    pub samples: VecDeque<Sample>,
    /// Per measurement, sequenced messages only.
    pub by_measurement: HashMap<&'static str, MeasurementSeen>,
    rate_marks: VecDeque<(Instant, u64)>,
    log: crate::sink::RateLimitedLog,
}

impl FeedState {
    fn new() -> Self {
        FeedState {
            connected: false,
            since: Instant::now(),
            problem: Some("not connected yet".into()),
            disconnects: 0,
            received: 0,
            malformed: 0,
            unsequenced: 0,
            gaps: GapTracker::default(),
            last_message: None,
            epoch: 0,
            last_seq: 0,
            latency_ms: None,
            topics: HashMap::new(),
            measurements: BTreeSet::new(),
            samples: VecDeque::new(),
            by_measurement: HashMap::new(),
            rate_marks: VecDeque::new(),
            log: crate::sink::RateLimitedLog::new(Duration::from_secs(10)),
        }
    }

    fn set_connected(&mut self, up: bool, problem: Option<String>) {
        if self.connected != up {
            self.since = Instant::now();
            if !up {
                self.disconnects += 1;
            }
        }
        self.connected = up;
        self.problem = problem;
    }

    fn observe(&mut self, name: &str, m: &ZmqMessage) {
        let now = Instant::now();
        self.received += 1;
        self.last_message = Some(now);
        let env = match crate::bus::decode(m) {
            Ok(e) => e,
            Err(e) => {
                self.malformed += 1;
                crate::warn_limited!(self.log, || format!(
                    "health: malformed message from publisher {name}: {e}"
                ));
                return;
            }
        };
        // The topic frame when there is one, so the common case allocates nothing.
        let topic_frame = (m.len() == 2)
            .then(|| m.get(0).and_then(|t| std::str::from_utf8(t).ok()))
            .flatten();
        // A topic's rate is counted from its first message, not from the
        // next tick: a status probe watches for a second or two, and its
        // topics showed 0.0 msg/s while their publisher showed 2,000.
        let new_topic = || TopicState {
            received: 0,
            last: None,
            mark: (now, 0),
            rate: 0.0,
        };
        let t = match topic_frame {
            Some(t) => match self.topics.get_mut(t) {
                Some(s) => s,
                None => self.topics.entry(t.to_string()).or_insert_with(new_topic),
            },
            None => self.topics.entry(env.topic()).or_insert_with(new_topic),
        };
        t.received += 1;
        t.last = Some(now);
        let measurement = crate::schema::by_channel(&env.ch).map(|ms| ms.name);
        if let Some(ms) = measurement {
            if !self.measurements.contains(ms) {
                self.measurements.insert(ms);
            }
        }
        if env.ts > 0 {
            self.latency_ms = Some((now_ns() - env.ts) as f64 / 1e6);
        }
        if env.seq == 0 {
            self.unsequenced += 1;
            return;
        }
        let publisher = if env.publisher.is_empty() {
            name
        } else {
            &env.publisher
        };
        self.gaps.observe(publisher, env.epoch, env.seq);
        if let Some(ms) = measurement {
            self.by_measurement
                .entry(ms)
                .or_default()
                .observe(now, env.epoch, env.seq, env.time());
        }
        if env.epoch != self.epoch || env.seq > self.last_seq {
            self.epoch = env.epoch;
            self.last_seq = env.seq;
        }
        if self
            .samples
            .back()
            .is_none_or(|s| now.duration_since(s.at) >= SAMPLE_EVERY || s.epoch != env.epoch)
        {
            self.samples.push_back(Sample {
                at: now,
                epoch: env.epoch,
                seq: env.seq,
                time_ns: env.time(),
            });
        }
    }

    /// Drops old samples and refreshes rates; called about once a second.
    pub fn tick(&mut self) {
        let now = Instant::now();
        while self
            .samples
            .front()
            .is_some_and(|s| now.duration_since(s.at) > LAG_HORIZON)
        {
            self.samples.pop_front();
        }
        for m in self.by_measurement.values_mut() {
            while m
                .samples
                .front()
                .is_some_and(|s| now.duration_since(s.at) > LAG_HORIZON)
            {
                m.samples.pop_front();
            }
        }
        self.rate_marks.push_back((now, self.received));
        while self.rate_marks.len() > 2
            && self
                .rate_marks
                .get(1)
                .is_some_and(|m| now.duration_since(m.0) >= RATE_WINDOW)
        {
            self.rate_marks.pop_front();
        }
        for t in self.topics.values_mut() {
            let (at, n) = t.mark;
            let span = now.duration_since(at);
            if span >= FIRST_RATE_AFTER {
                t.rate = (t.received - n) as f64 / span.as_secs_f64();
            }
            if span >= RATE_WINDOW {
                t.mark = (now, t.received);
            }
        }
    }

    /// Messages per second over the last [`RATE_WINDOW`].
    pub fn rate(&self) -> f64 {
        match (self.rate_marks.front(), self.rate_marks.back()) {
            (Some(a), Some(b)) if b.0 > a.0 => (b.1 - a.1) as f64 / (b.0 - a.0).as_secs_f64(),
            _ => 0.0,
        }
    }

    pub fn restarts(&self) -> u64 {
        self.gaps.total_restarts()
    }
}

/// One publisher being watched.
pub struct FeedWatch {
    pub name: String,
    pub cfg: PublisherConfig,
    state: Arc<Mutex<FeedState>>,
}

impl FeedWatch {
    /// Starts watching; the task ends when `stop` fires.
    pub fn start(name: &str, cfg: &PublisherConfig, stop: CancellationToken) -> Arc<FeedWatch> {
        let w = Arc::new(FeedWatch {
            name: name.to_string(),
            cfg: cfg.clone(),
            state: Arc::new(Mutex::new(FeedState::new())),
        });
        let task = w.clone();
        tokio::spawn(async move { task.watch(stop).await });
        w
    }

    pub fn state(&self) -> MutexGuard<'_, FeedState> {
        // A poisoned lock only means a panic elsewhere mid-update; the
        // counters are still the best we have.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn watch(&self, stop: CancellationToken) {
        let endpoint = self.cfg.reach();
        loop {
            let tap = tokio::select! {
                _ = stop.cancelled() => return,
                t = Tap::connect(&endpoint, RECONNECT_EVERY * 4) => t,
            };
            let mut tap = match tap {
                Ok(t) => t,
                Err(e) => {
                    self.state().set_connected(false, Some(e));
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(RECONNECT_EVERY) => continue,
                    }
                }
            };
            self.state().set_connected(true, None);
            tracing::info!("health: connected to publisher {} at {endpoint}", self.name);
            loop {
                let ev = tokio::select! {
                    _ = stop.cancelled() => return,
                    ev = tap.next() => ev,
                };
                match ev {
                    TapEvent::Message(m) => {
                        let mut st = self.state();
                        st.observe(&self.name, &m);
                    }
                    TapEvent::Disconnected(why) => {
                        tracing::warn!("health: publisher {} at {endpoint}: {why}", self.name);
                        self.state().set_connected(false, Some(why));
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feeds::synthetic::Generator;

    fn frame(env: &crate::wire::Envelope<'_>) -> ZmqMessage {
        let mut body = Vec::new();
        crate::wire::encode_v1(env, &mut body).unwrap();
        let mut m = ZmqMessage::from(env.topic());
        m.push_back(body.into());
        m
    }

    /// `nbpy status` without the health daemon probes for a second or two:
    /// each topic must have a rate by then, as its publisher does.
    #[test]
    fn a_topic_has_a_rate_by_the_first_tick_after_its_first_message() {
        let mut st = FeedState::new();
        // The monitor's interval ticks at once, before any message.
        st.tick();
        let mut gen = Generator::new(1, &[]);
        for seq in 1..=40 {
            let mut e = gen.next_message();
            (e.seq, e.epoch) = (seq, 1);
            st.observe("synth", &frame(&e));
        }
        std::thread::sleep(FIRST_RATE_AFTER);
        st.tick();
        assert_eq!(st.topics.len(), 20, "five channels × four instruments");
        for (name, t) in &st.topics {
            // Two messages each, over at least FIRST_RATE_AFTER.
            assert!(t.rate > 0.0 && t.rate <= 4.0, "{name}: {}", t.rate);
        }
    }
}
