//! The Exchange Stream's market change messages and the market cache they
//! update.
//!
//! A market change (`mc[]` of an `mcm`) is either an image (`img: true`:
//! forget what was known about the market, this is all of it) or a delta.
//! Best-offer ladders arrive as `[level, price, size]` triples keyed by
//! level (0 = best); a size of 0 empties that level. `ltp` and `tv` replace
//! the runner's last traded price and traded volume when present. The market
//! definition carries the market status (OPEN, SUSPENDED, CLOSED, …).
//!
//! After each change the cache yields the runners whose published view
//! (status, ladder up to the configured depth, ltp, tv) differs from what
//! was last published for them. An unchanged runner is never published
//! again, which is what keeps a resubscription's image or a replayed delta
//! from storing duplicates.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use crate::wire::{Envelope, Fields, Value};

pub const SOURCE: &str = "betfair";
pub const CHANNEL: &str = "odds";
/// Ladder levels the `betfair_stream` measurement has fields for.
pub const MAX_LEVELS: usize = 3;
/// Levels beyond this are ignored (Betfair sends at most 10).
const LADDER_CAP: u32 = 10;
/// The odds Betfair's ladders and traded prices can show: 1.01 to 1000.
/// Anything else (a negative price, a zero) is not a price Betfair sends,
/// so it is malformed rather than something to publish.
pub const MIN_PRICE: f64 = 1.01;
pub const MAX_PRICE: f64 = 1000.0;

/// Any message the stream sends. Fields of the other ops are absent.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    pub op: String,
    pub id: Option<i64>,
    pub connection_id: Option<String>,
    pub status_code: Option<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub connection_closed: Option<bool>,
    pub ct: Option<String>,
    pub clk: Option<String>,
    pub initial_clk: Option<String>,
    pub pt: Option<i64>,
    pub heartbeat_ms: Option<u64>,
    pub conflate_ms: Option<u64>,
    pub segment_type: Option<String>,
    pub mc: Option<Vec<MarketChange>>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MarketChange {
    pub id: String,
    #[serde(default)]
    pub img: bool,
    pub market_definition: Option<MarketDefinition>,
    pub rc: Option<Vec<RunnerChange>>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MarketDefinition {
    pub status: Option<String>,
    pub runners: Option<Vec<RunnerDefinition>>,
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct RunnerDefinition {
    pub id: i64,
    pub hc: Option<f64>,
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct RunnerChange {
    pub id: i64,
    pub hc: Option<f64>,
    pub batb: Option<Vec<Vec<f64>>>,
    pub batl: Option<Vec<Vec<f64>>>,
    pub ltp: Option<f64>,
    pub tv: Option<f64>,
}

impl MarketChange {
    /// Why this change cannot be applied as sent, if it cannot: a ladder
    /// entry that is not `[level, price, size]` with a whole level, an
    /// offered size below 0 or a price outside 1.01..=1000, a last traded
    /// price outside that range or a negative traded volume. Skipping such
    /// a value would keep the old one, and every later delta would build on
    /// a ladder Betfair no longer shows, so the caller must not apply the
    /// change at all but get a fresh image instead.
    pub fn problem(&self) -> Option<String> {
        for rc in self.rc.iter().flatten() {
            for (side, ladder) in [("batb", &rc.batb), ("batl", &rc.batl)] {
                for c in ladder.iter().flatten() {
                    if let Err(e) = ladder_entry(c) {
                        return Some(format!("runner {} {side} {e}", rc.id));
                    }
                }
            }
            if let Some(v) = rc.ltp.filter(|v| !is_price(*v)) {
                return Some(format!("runner {} ltp {v} is not a Betfair price", rc.id));
            }
            if let Some(v) = rc.tv.filter(|v| !is_size(*v)) {
                return Some(format!("runner {} tv {v} is not a traded volume", rc.id));
            }
        }
        None
    }
}

fn is_price(v: f64) -> bool {
    (MIN_PRICE..=MAX_PRICE).contains(&v)
}

fn is_size(v: f64) -> bool {
    v.is_finite() && v >= 0.0
}

/// One best-offer ladder entry as `(level, price, size)`; a size of 0
/// empties the level whatever the price says (Betfair sends `[n, 0, 0]`).
fn ladder_entry(c: &[f64]) -> Result<(u32, f64, f64), String> {
    let [level, price, size] = c[..] else {
        return Err(format!("entry {c:?} is not [level, price, size]"));
    };
    if !(level >= 0.0 && level.fract() == 0.0 && level <= f64::from(u32::MAX)) {
        return Err(format!("entry {c:?} has no valid level"));
    }
    if !is_size(size) || (size > 0.0 && !is_price(price)) || !price.is_finite() {
        return Err(format!(
            "entry {c:?}: price must be {MIN_PRICE}..={MAX_PRICE} and size at least 0"
        ));
    }
    Ok((level as u32, price, size))
}

/// A runner within a market: selection id and handicap (Asian handicap
/// markets list one selection once per line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct RunnerKey {
    id: i64,
    /// Handicap in thousandths, so the key can be hashed and ordered.
    hc_milli: i64,
}

impl RunnerKey {
    fn new(id: i64, hc: Option<f64>) -> Self {
        RunnerKey {
            id,
            hc_milli: hc
                .filter(|h| h.is_finite())
                .map_or(0, |h| (h * 1000.0).round() as i64),
        }
    }

    /// The `selection_id` tag: the id, with the handicap when there is one.
    fn label(&self) -> String {
        if self.hc_milli == 0 {
            self.id.to_string()
        } else {
            format!("{}_{}", self.id, self.hc_milli as f64 / 1000.0)
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Runner {
    back: BTreeMap<u32, (f64, f64)>,
    lay: BTreeMap<u32, (f64, f64)>,
    ltp: Option<f64>,
    tv: Option<f64>,
}

#[derive(Debug, Default)]
struct Market {
    status: Option<String>,
    runners: BTreeMap<RunnerKey, Runner>,
}

/// What is published for one runner; equal views are not published twice.
#[derive(Debug, Clone, PartialEq)]
pub struct RunnerView {
    pub market_id: String,
    pub selection_id: String,
    pub status: Option<String>,
    /// Best first; `None` where the level is empty.
    pub back: Vec<Option<(f64, f64)>>,
    pub lay: Vec<Option<(f64, f64)>>,
    pub ltp: Option<f64>,
    pub tv: Option<f64>,
}

impl RunnerView {
    fn has_data(&self) -> bool {
        self.back.iter().chain(&self.lay).any(Option::is_some)
            || self.ltp.is_some()
            || self.tv.is_some()
    }

    /// The `betfair_stream` message for this view at publish time `pt_ms`.
    pub fn envelope(&self, pt_ms: Option<i64>) -> Envelope<'static> {
        const BACK: [(&str, &str); MAX_LEVELS] = [
            ("back1", "back1_size"),
            ("back2", "back2_size"),
            ("back3", "back3_size"),
        ];
        const LAY: [(&str, &str); MAX_LEVELS] = [
            ("lay1", "lay1_size"),
            ("lay2", "lay2_size"),
            ("lay3", "lay3_size"),
        ];
        let mut data: Fields<'static> = Vec::with_capacity(18);
        data.push((
            "market_id".into(),
            Value::Str(self.market_id.clone().into()),
        ));
        data.push((
            "selection_id".into(),
            Value::Str(self.selection_id.clone().into()),
        ));
        if let Some(s) = &self.status {
            data.push(("status".into(), Value::Str(s.clone().into())));
        }
        for (side, names) in [(&self.back, &BACK), (&self.lay, &LAY)] {
            for (level, (price, size)) in side.iter().zip(names.iter()) {
                if let Some((p, s)) = level {
                    data.push(((*price).into(), Value::Float(*p)));
                    data.push(((*size).into(), Value::Float(*s)));
                }
            }
        }
        if let Some(v) = self.ltp {
            data.push(("ltp".into(), Value::Float(v)));
        }
        if let Some(v) = self.tv {
            data.push(("tv".into(), Value::Float(v)));
        }
        let ts = pt_ms.and_then(|ms| ms.checked_mul(1_000_000)).unwrap_or(0);
        Envelope::new(SOURCE, CHANNEL, self.market_id.clone(), ts, data)
    }
}

/// Problems in a change that was otherwise applied (what
/// [`MarketChange::problem`] reports, for callers that apply anyway).
#[derive(Debug, Default, PartialEq)]
pub struct Oddities {
    /// Ladder entries that were not `[level, price, size]` with a sane
    /// level, a size of at least 0 and a Betfair price.
    pub bad_levels: usize,
    /// `ltp` outside Betfair's prices or a negative or non-finite `tv`.
    pub bad_values: usize,
}

/// All subscribed markets, as images and deltas have built them.
#[derive(Debug)]
pub struct MarketCache {
    levels: usize,
    markets: HashMap<String, Market>,
    published: HashMap<(String, RunnerKey), RunnerView>,
}

impl MarketCache {
    /// `levels`: ladder depth to publish, 1..=3.
    pub fn new(levels: usize) -> Self {
        MarketCache {
            levels: levels.clamp(1, MAX_LEVELS),
            markets: HashMap::new(),
            published: HashMap::new(),
        }
    }

    pub fn markets(&self) -> usize {
        self.markets.len()
    }

    /// Forgets every market (a fresh subscription image follows) but keeps
    /// what was published, so an identical image publishes nothing.
    pub fn clear(&mut self) {
        self.markets.clear();
    }

    /// Applies one market change; returns the runner views that changed.
    pub fn apply(&mut self, mc: &MarketChange, odd: &mut Oddities) -> Vec<RunnerView> {
        let market = self.markets.entry(mc.id.clone()).or_default();
        let mut touched: Vec<RunnerKey> = Vec::new();
        let mut all = false;
        if mc.img {
            market.runners.clear();
            all = true;
        }
        if let Some(def) = &mc.market_definition {
            if def.status.is_some() && def.status != market.status {
                market.status = def.status.clone();
                all = true;
            }
            for r in def.runners.iter().flatten() {
                market
                    .runners
                    .entry(RunnerKey::new(r.id, r.hc))
                    .or_default();
            }
        }
        for rc in mc.rc.iter().flatten() {
            let key = RunnerKey::new(rc.id, rc.hc);
            let runner = market.runners.entry(key).or_default();
            apply_ladder(&mut runner.back, rc.batb.as_deref(), odd);
            apply_ladder(&mut runner.lay, rc.batl.as_deref(), odd);
            match rc.ltp {
                Some(v) if is_price(v) => runner.ltp = Some(v),
                Some(_) => odd.bad_values += 1,
                None => {}
            }
            match rc.tv {
                Some(v) if is_size(v) => runner.tv = Some(v),
                Some(_) => odd.bad_values += 1,
                None => {}
            }
            touched.push(key);
        }
        if all {
            touched = market.runners.keys().copied().collect();
        } else {
            touched.sort_unstable();
            touched.dedup();
        }
        let mut out = Vec::new();
        for key in touched {
            let Some(runner) = market.runners.get(&key) else {
                continue;
            };
            let view = view(&mc.id, key, market.status.clone(), runner, self.levels);
            if !view.has_data() {
                continue;
            }
            let slot = (mc.id.clone(), key);
            if self.published.get(&slot) == Some(&view) {
                continue;
            }
            self.published.insert(slot, view.clone());
            out.push(view);
        }
        if market.status.as_deref() == Some("CLOSED") {
            // Settled: nothing more will change; free it.
            self.markets.remove(&mc.id);
            self.published.retain(|(m, _), _| m != &mc.id);
        }
        out
    }

    /// The current view of every runner with data, ordered by market and
    /// runner: what a fresh image of the same state would show.
    pub fn snapshot(&self) -> Vec<RunnerView> {
        let mut ids: Vec<&String> = self.markets.keys().collect();
        ids.sort();
        let mut out = Vec::new();
        for id in ids {
            let m = &self.markets[id];
            for (key, r) in &m.runners {
                let v = view(id, *key, m.status.clone(), r, self.levels);
                if v.has_data() {
                    out.push(v);
                }
            }
        }
        out
    }
}

fn apply_ladder(
    ladder: &mut BTreeMap<u32, (f64, f64)>,
    changes: Option<&[Vec<f64>]>,
    odd: &mut Oddities,
) {
    for c in changes.into_iter().flatten() {
        let Ok((level, price, size)) = ladder_entry(c) else {
            odd.bad_levels += 1;
            continue;
        };
        if level >= LADDER_CAP {
            continue;
        }
        if size == 0.0 {
            ladder.remove(&level);
        } else {
            ladder.insert(level, (price, size));
        }
    }
}

fn view(
    market_id: &str,
    key: RunnerKey,
    status: Option<String>,
    r: &Runner,
    levels: usize,
) -> RunnerView {
    let side = |l: &BTreeMap<u32, (f64, f64)>| -> Vec<Option<(f64, f64)>> {
        (0..levels as u32).map(|n| l.get(&n).copied()).collect()
    };
    RunnerView {
        market_id: market_id.to_string(),
        selection_id: key.label(),
        status,
        back: side(&r.back),
        lay: side(&r.lay),
        ltp: r.ltp,
        tv: r.tv,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mc(json: &str) -> MarketChange {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn deltas_give_the_same_ladder_as_a_fresh_image() {
        let mut odd = Oddities::default();
        let mut live = MarketCache::new(3);
        live.apply(&mc(r#"{"id":"1.1","img":true,"marketDefinition":{"status":"OPEN","runners":[{"id":5},{"id":6}]},
            "rc":[{"id":5,"batb":[[0,2.0,10],[1,1.98,20],[2,1.96,30]],"batl":[[0,2.02,5],[1,2.04,6]],"ltp":2.0,"tv":100},
                  {"id":6,"batb":[[0,3.0,1]],"batl":[[0,3.1,2]]}]}"#), &mut odd);
        // Level 1 removed, level 0 moves, a new lay level, ltp/tv move.
        let changed = live.apply(
            &mc(r#"{"id":"1.1","rc":[{"id":5,"batb":[[1,1.98,0],[0,2.02,11]],"batl":[[2,2.06,7]],"ltp":2.02,"tv":150.5}]}"#),
            &mut odd,
        );
        assert_eq!(changed.len(), 1);
        assert_eq!(
            changed[0].back,
            vec![Some((2.02, 11.0)), None, Some((1.96, 30.0))]
        );
        let mut fresh = MarketCache::new(3);
        fresh.apply(&mc(r#"{"id":"1.1","img":true,"marketDefinition":{"status":"OPEN"},
            "rc":[{"id":5,"batb":[[0,2.02,11],[2,1.96,30]],"batl":[[0,2.02,5],[1,2.04,6],[2,2.06,7]],"ltp":2.02,"tv":150.5},
                  {"id":6,"batb":[[0,3.0,1]],"batl":[[0,3.1,2]]}]}"#), &mut odd);
        assert_eq!(live.snapshot(), fresh.snapshot());
        assert_eq!(odd, Oddities::default());
    }

    #[test]
    fn unchanged_runners_are_not_published_twice_and_status_republishes() {
        let mut odd = Oddities::default();
        let mut c = MarketCache::new(2);
        let image = mc(
            r#"{"id":"1.2","img":true,"marketDefinition":{"status":"OPEN"},"rc":[{"id":1,"batb":[[0,1.5,3]]},{"id":2,"batl":[[0,4.0,1]]}]}"#,
        );
        assert_eq!(c.apply(&image, &mut odd).len(), 2);
        assert!(c.apply(&image, &mut odd).is_empty(), "identical image");
        let suspended = c.apply(
            &mc(r#"{"id":"1.2","marketDefinition":{"status":"SUSPENDED"}}"#),
            &mut odd,
        );
        assert_eq!(suspended.len(), 2);
        assert!(suspended
            .iter()
            .all(|v| v.status.as_deref() == Some("SUSPENDED")));
        let closed = c.apply(
            &mc(r#"{"id":"1.2","marketDefinition":{"status":"CLOSED"}}"#),
            &mut odd,
        );
        assert_eq!(closed.len(), 2);
        assert_eq!(c.markets(), 0, "closed markets are dropped");
    }

    #[test]
    fn bad_ladder_entries_are_counted_not_applied() {
        let mut odd = Oddities::default();
        let mut c = MarketCache::new(3);
        let v = c.apply(
            &mc(r#"{"id":"1.3","rc":[{"id":1,"batb":[[0,1.5],[-1,2,3],[0.5,2,3],[0,1.7,4]]}]}"#),
            &mut odd,
        );
        assert_eq!(odd.bad_levels, 3);
        assert_eq!(v[0].back[0], Some((1.7, 4.0)));
    }

    #[test]
    fn envelope_carries_tags_levels_and_publish_time() {
        let mut odd = Oddities::default();
        let mut c = MarketCache::new(3);
        let v = c.apply(
            &mc(r#"{"id":"1.4","img":true,"marketDefinition":{"status":"OPEN"},"rc":[{"id":7,"hc":-1.5,"batb":[[0,2.5,9]],"batl":[[1,2.7,3]],"ltp":2.6,"tv":12}]}"#),
            &mut odd,
        );
        let env = v[0].envelope(Some(1_465_207_623_149));
        assert_eq!(env.topic(), "betfair.odds.1.4");
        assert_eq!(env.ts, 1_465_207_623_149_000_000);
        let get = |k| env.get(k).cloned();
        assert_eq!(get("market_id"), Some(Value::Str("1.4".into())));
        assert_eq!(get("selection_id"), Some(Value::Str("7_-1.5".into())));
        assert_eq!(get("status"), Some(Value::Str("OPEN".into())));
        assert_eq!(get("back1"), Some(Value::Float(2.5)));
        assert_eq!(get("back1_size"), Some(Value::Float(9.0)));
        assert_eq!(get("lay1"), None);
        assert_eq!(get("lay2"), Some(Value::Float(2.7)));
        assert_eq!(get("ltp"), Some(Value::Float(2.6)));
        assert_eq!(get("tv"), Some(Value::Float(12.0)));
    }

    #[test]
    fn prices_and_sizes_betfair_cannot_send_are_problems_and_never_applied() {
        let mut odd = Oddities::default();
        let mut c = MarketCache::new(3);
        let image =
            mc(r#"{"id":"1.5","img":true,"rc":[{"id":6,"batb":[[0,3.0,1]],"ltp":3.0,"tv":5}]}"#);
        assert_eq!(image.problem(), None);
        c.apply(&image, &mut odd);
        for bad in [
            r#"{"id":"1.5","rc":[{"id":6,"batb":[[0,-3.0,-1.0]]}]}"#,
            r#"{"id":"1.5","rc":[{"id":6,"batl":[[0,3.0,-1.0]]}]}"#,
            r#"{"id":"1.5","rc":[{"id":6,"batb":[[0,0.5,2.0]]}]}"#,
            r#"{"id":"1.5","rc":[{"id":6,"batb":[[0,1001,2.0]]}]}"#,
            r#"{"id":"1.5","rc":[{"id":6,"batb":[[0.5,3.2,2.0]]}]}"#,
            r#"{"id":"1.5","rc":[{"id":6,"ltp":-2.0}]}"#,
            r#"{"id":"1.5","rc":[{"id":6,"tv":-1}]}"#,
        ] {
            let change = mc(bad);
            assert!(change.problem().is_some(), "{bad}");
            // Applied anyway, the bad value is counted and left out.
            assert!(c.apply(&change, &mut odd).is_empty(), "{bad}");
        }
        assert_eq!((odd.bad_levels, odd.bad_values), (5, 2));
        let v = &c.snapshot()[0];
        assert_eq!(
            (v.back[0], v.lay[0], v.ltp, v.tv),
            (Some((3.0, 1.0)), None, Some(3.0), Some(5.0))
        );
        // An emptied level may carry any price; the edges of the range are prices.
        let ok = mc(r#"{"id":"1.5","rc":[{"id":6,"batb":[[0,0,0],[1,1.01,2],[2,1000,3]]}]}"#);
        assert_eq!(ok.problem(), None);
        assert_eq!(
            c.apply(&ok, &mut odd)[0].back,
            vec![None, Some((1.01, 2.0)), Some((1000.0, 3.0))]
        );
    }
}
