//! Envelope → InfluxDB line protocol, through the schema.
//!
//! Escaping follows the line-protocol reference: measurement names escape
//! commas and spaces; tag keys, tag values and field keys escape commas,
//! equals signs and spaces; string field values escape `"` and `\`.
//! What InfluxDB would misread is refused instead of escaped: a newline
//! anywhere, NaN and infinities, an empty instrument, and a tag value that
//! ends in a backslash. InfluxDB 1.x takes any character after a backslash
//! as escaped (`\\` is not an escaped backslash), so the comma or space
//! after such a value would be read as part of it and the line refused;
//! a backslash anywhere else is stored as it is.
//!
//! Two messages of one series with the same timestamp would overwrite each
//! other in InfluxDB (trades in the same microsecond do happen), so the
//! encoder remembers each series' last time and moves a colliding point one
//! nanosecond later: every accepted message stays a point.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

use crate::schema::{self, Field, Kind, Measurement};
use crate::wire::{Envelope, Value};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MapError {
    #[error("channel {0:?} has no measurement")]
    UnknownChannel(String),
    #[error("{measurement}.{key}: expected {expected:?}, got {got}")]
    FieldType {
        measurement: &'static str,
        key: String,
        expected: Kind,
        got: &'static str,
    },
    #[error("{0}: not a finite number")]
    NonFinite(String),
    #[error("{0}: newlines cannot be stored")]
    Newline(String),
    #[error("tag {0} ends in a backslash, which line protocol cannot carry")]
    TrailingBackslash(&'static str),
    #[error("{0}: no field of the measurement present")]
    NoFields(&'static str),
    #[error("empty instrument")]
    EmptyInstrument,
    #[error("no timestamp")]
    NoTime,
    #[error("time {0} ns is past InfluxDB's last storable instant ({MAX_NANO_TIME})")]
    TimeOutOfRange(i64),
}

/// InfluxDB 1.x's last storable time (`models.MaxNanoTime`, 2262-04-11):
/// it keeps `i64::MAX` for itself. Its first one (`MinNanoTime`) is far
/// below what we store: times at or before the Unix epoch are refused as
/// no time at all.
pub const MAX_NANO_TIME: i64 = i64::MAX - 1;

/// Encodes points, remembering series times to keep colliding points apart.
/// Series are hashed with foldhash, seeded per process: SipHash's DoS
/// resistance bought nothing here that a random seed does not, at a few
/// percent of the subscriber's CPU (two hashes per point).
#[derive(Default)]
pub struct LineEncoder {
    last: HashMap<u64, i64, foldhash::fast::RandomState>,
    hasher: foldhash::fast::RandomState,
    tags: Tags,
    fields: Vec<u8>,
    shapes: Shapes,
    /// Lines written by a learned shape (for the tests).
    shape_hits: u64,
}

/// What the encoder learned of the bodies it wrote: for each header prefix
/// (publisher, channel and instrument, as bytes up to `,"seq":`), the data
/// keys in the order they came and what each becomes. A publisher sends
/// one layout per channel, so the next body with that prefix is read
/// against it: its header strings are not scanned again, its keys are
/// compared as bytes instead of looked up in the schema, and, without
/// tags in the data, its series key and hash are reused as they are.
/// Anything that does not fit is read the ordinary way and learned anew.
#[derive(Default)]
struct Shapes {
    index: HashMap<Box<[u8]>, usize, foldhash::fast::RandomState>,
    list: Vec<Shape>,
}

/// Bound on the shapes kept (one to two KiB each, so ~25 MiB at the
/// bound): instrument churn starts the table over rather than grow it. A
/// feed with more live prefixes than this cycling through them would find
/// none and pay a learning pass per body on top of the ordinary path:
/// slower, still correct.
const MAX_SHAPES: usize = 16_384;

struct Shape {
    m: &'static Measurement,
    prefix: crate::canonical::Prefix,
    /// The series key as written and its hash, where no tag comes from the
    /// data.
    series: Option<(Box<[u8]>, u64)>,
    members: Box<[Member]>,
    /// Where tags come from the data: their sorted order (see
    /// [`Tags::write_in`]).
    tag_order: Box<[u8]>,
}

/// One data member: its key as written (`"bid":`), the tag it sets, if
/// any, and the field it writes with the bytes before its value (`bid=`
/// or `,bid=`), if any.
struct Member {
    key: Box<[u8]>,
    tag: Option<&'static str>,
    field: Option<(Kind, crate::wire::Snippet)>,
}

/// `,"seq":` ends the header's strings in a canonical body.
static SEQ: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b",\"seq\":"));

/// A body read as far as its data, for [`LineEncoder::encode_prepared`].
pub struct Prepared<'b> {
    pub body: crate::canonical::Body<'b>,
    pub m: &'static Measurement,
    shape: Option<usize>,
    raw: &'b [u8],
}

/// The tags of the line being written, as keys and ranges of escaped bytes:
/// a message's tags can come after its first field, and line protocol wants
/// them all before (sorted by key, as InfluxDB prefers).
#[derive(Default)]
struct Tags {
    list: Vec<(&'static str, usize, usize)>,
    buf: Vec<u8>,
}

impl Tags {
    fn clear(&mut self) {
        self.list.clear();
        self.buf.clear();
    }

    /// Starts a line's tags with the three every measurement carries,
    /// from the envelope's header.
    fn header(&mut self, sym: &str, src: &str, publisher: &str) -> Result<(), MapError> {
        self.clear();
        for (key, val) in HEADER_TAGS.into_iter().zip([sym, src, publisher]) {
            self.add(key, val)?;
        }
        Ok(())
    }

    /// An empty value is no tag. It still takes its place in the list, so
    /// a shape's tags are always at the same places (see [`Self::write_in`]).
    fn add(&mut self, key: &'static str, val: &str) -> Result<(), MapError> {
        if val.contains('\n') {
            return Err(MapError::Newline(key.into()));
        }
        if val.ends_with('\\') {
            return Err(MapError::TrailingBackslash(key));
        }
        let s = self.buf.len();
        escape(&mut self.buf, val.as_bytes(), b",= ");
        self.list.push((key, s, self.buf.len()));
        Ok(())
    }

    /// Sorted by key, as InfluxDB keeps them. The sort is stable, so tags
    /// with the same key keep their order, as [`tag_order`] does.
    fn write(&mut self, out: &mut Vec<u8>) {
        self.list.sort_by_key(|t| t.0);
        for i in 0..self.list.len() {
            self.put(i, out);
        }
    }

    /// Writes the tags in `order`, a shape's sorted order of the places
    /// its tags are added at: the sort that [`Self::write`] does per line
    /// (a `memcmp` per comparison, ~430 instructions for a line with five
    /// tags) is done once, when the shape is learnt.
    fn write_in(&self, order: &[u8], out: &mut Vec<u8>) -> Option<()> {
        if order.len() != self.list.len() {
            return None;
        }
        for &i in order {
            self.put(usize::from(i), out);
        }
        Some(())
    }

    fn put(&self, i: usize, out: &mut Vec<u8>) {
        let (key, s, e) = self.list[i];
        if s < e {
            out.push(b',');
            out.extend_from_slice(key.as_bytes());
            out.push(b'=');
            out.extend_from_slice(&self.buf[s..e]);
        }
    }
}

/// The tags every line starts with ([`Tags::header`]), in the order they
/// are added: [`tag_order`] counts on it.
const HEADER_TAGS: [&str; 3] = [
    schema::TAG_INSTRUMENT,
    schema::TAG_SOURCE,
    schema::TAG_PUBLISHER,
];

/// The sorted order of a line's tag places: the header tags, then the
/// data members' tags as they come.
fn tag_order(data_tags: &[&'static str]) -> Option<Box<[u8]>> {
    let keys: Vec<&str> = HEADER_TAGS
        .into_iter()
        .chain(data_tags.iter().copied())
        .collect();
    let mut order = (0..keys.len())
        .map(u8::try_from)
        .collect::<Result<Vec<u8>, _>>()
        .ok()?;
    order.sort_by_key(|&i| keys[usize::from(i)]);
    Some(order.into_boxed_slice())
}

/// Collisions further apart than this are real out-of-order data, not
/// same-instant duplicates, and are stored as they come.
const COLLISION_WINDOW_NS: i64 = 1_000_000;

/// The schema field a data member is, if any. Publishers send fields in
/// schema order, so `hint` (the one after the last found) is tried first.
#[inline]
fn field_of(m: &'static Measurement, key: &str, hint: &mut usize) -> Option<&'static Field> {
    let i = match m.fields.get(*hint) {
        Some(f) if f.name == key => *hint,
        _ => m.fields.iter().position(|f| f.name == key)?,
    };
    *hint = i + 1;
    Some(&m.fields[i])
}

/// Starts data member `key` as a field of `m` in `out` (`name=`, after a
/// comma unless `n`, the fields so far, is 0), or says to skip it: not in
/// the schema, or one the envelope carries outside `data` (`seq`, `epoch`,
/// written once at the end of the line).
#[inline]
fn start_field(
    m: &'static Measurement,
    key: &str,
    hint: &mut usize,
    n: &mut usize,
    out: &mut Vec<u8>,
) -> Option<&'static Field> {
    let field = field_of(m, key, hint)?;
    if field.name == "seq" || field.name == "epoch" {
        return None;
    }
    if *n > 0 {
        out.push(b',');
    }
    *n += 1;
    out.extend_from_slice(field.name.as_bytes());
    out.push(b'=');
    Some(field)
}

impl LineEncoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one line (with `\n`) for `env` to `out`. On error `out` is
    /// left as it was.
    pub fn encode(
        &mut self,
        env: &Envelope<'_>,
        out: &mut Vec<u8>,
    ) -> Result<&'static Measurement, MapError> {
        let start = out.len();
        let r = self.encode_inner(env, out);
        if r.is_err() {
            out.truncate(start);
        }
        r
    }

    fn encode_inner(
        &mut self,
        env: &Envelope<'_>,
        out: &mut Vec<u8>,
    ) -> Result<&'static Measurement, MapError> {
        let m = schema::by_channel(&env.ch)
            .ok_or_else(|| MapError::UnknownChannel(env.ch.to_string()))?;
        if env.sym.is_empty() {
            return Err(MapError::EmptyInstrument);
        }
        let start = out.len();
        // Schema names are plain (schema test `names_need_no_escaping…`).
        out.extend_from_slice(m.name.as_bytes());
        self.tags.header(&env.sym, &env.src, &env.publisher)?;
        for (k, v) in &env.data {
            if let Some(key) = m.tags.iter().find(|t| **t == k.as_ref()) {
                match v {
                    Value::Str(s) => self.tags.add(key, s)?,
                    Value::Int(i) => self.tags.add(key, itoa::Buffer::new().format(*i))?,
                    other => {
                        return Err(MapError::FieldType {
                            measurement: m.name,
                            key: k.to_string(),
                            expected: Kind::Str,
                            got: kind_name(other),
                        })
                    }
                }
            }
        }
        self.tags.write(out);
        let series_end = out.len();
        out.push(b' ');
        let mut n = 0usize;
        let mut ib = itoa::Buffer::new();
        let mut hint = 0usize;
        for (k, v) in &env.data {
            let Some(field) = start_field(m, k, &mut hint, &mut n, out) else {
                continue;
            };
            match (field.kind, v) {
                (Kind::Float, Value::Num(t)) => out.extend_from_slice(t.as_bytes()),
                (Kind::Float, Value::Float(_) | Value::Int(_)) => {
                    let f = v.as_f64().unwrap_or(f64::NAN);
                    if !f.is_finite() {
                        return Err(MapError::NonFinite(field.name.into()));
                    }
                    crate::wire::push_f64(out, f);
                }
                (Kind::Int, Value::Int(i)) => {
                    out.extend_from_slice(ib.format(*i).as_bytes());
                    out.push(b'i');
                }
                (Kind::Bool, Value::Bool(b)) => {
                    out.extend_from_slice(if *b { b"true" } else { b"false" })
                }
                (Kind::Str, Value::Str(s)) => {
                    if s.contains('\n') {
                        return Err(MapError::Newline(field.name.into()));
                    }
                    out.push(b'"');
                    escape(out, s.as_bytes(), b"\"\\");
                    out.push(b'"');
                }
                (expected, other) => {
                    return Err(MapError::FieldType {
                        measurement: m.name,
                        key: field.name.into(),
                        expected,
                        got: kind_name(other),
                    })
                }
            }
        }
        if n == 0 {
            return Err(MapError::NoFields(m.name));
        }
        self.finish(out, start, series_end, env.seq, env.epoch, env.time())?;
        Ok(m)
    }

    /// A canonical v1 body (see [`crate::canonical`]) of measurement `m`
    /// straight to its line (what [`Self::encode_prepared`] does for a
    /// body without a shape that fits), with no [`Envelope`] in between
    /// (no field vector to fill and drop, each value copied once). It
    /// writes exactly the bytes [`Self::encode`] writes for the decoded
    /// envelope (a differential test holds it to that), and only where
    /// `encode` would succeed: for anything else (a type error, a number
    /// out of range, no fields) it returns false with `out` unchanged, and
    /// the caller decodes the message and calls `encode`, which stores it
    /// or says why not.
    fn encode_canonical(
        &mut self,
        body: &mut crate::canonical::Body<'_>,
        m: &'static Measurement,
        out: &mut Vec<u8>,
    ) -> bool {
        let start = out.len();
        let ok = self.canonical_inner(body, m, out).is_some();
        if !ok {
            out.truncate(start);
        }
        ok
    }

    fn canonical_inner(
        &mut self,
        body: &mut crate::canonical::Body<'_>,
        m: &'static Measurement,
        out: &mut Vec<u8>,
    ) -> Option<()> {
        let h = body.head.clone();
        if h.sym.is_empty() {
            return None;
        }
        let start = out.len();
        out.extend_from_slice(m.name.as_bytes());
        self.tags.header(h.sym, h.src, h.publisher).ok()?;
        let series_end;
        if m.tags.is_empty() {
            // Every tag is known: fields go straight after them.
            self.tags.write(out);
            series_end = out.len();
            out.push(b' ');
            canonical_fields(&mut self.tags, body, m, out)?;
        } else {
            // Tags may still come with the data: fields wait in a buffer.
            let mut fields = std::mem::take(&mut self.fields);
            fields.clear();
            let r = canonical_fields(&mut self.tags, body, m, &mut fields);
            if r.is_some() {
                self.tags.write(out);
            }
            series_end = out.len();
            if r.is_some() {
                out.push(b' ');
                out.extend_from_slice(&fields);
            }
            self.fields = fields;
            r?;
        }
        self.finish(out, start, series_end, h.seq, h.epoch, h.time())
            .ok()
    }

    /// The subscriber's hot path, first step: reads a canonical v1 body
    /// (see [`crate::canonical`]) of a known channel as far as its data,
    /// the header strings from a learned shape where the body starts with
    /// its bytes. `None`: not canonical or no measurement (the general path
    /// decides).
    pub fn prepare<'b>(&self, body: &'b [u8]) -> Option<Prepared<'b>> {
        if let Some(at) = SEQ.find(body) {
            if let Some(&i) = self.shapes.index.get(&body[..at]) {
                let shape = &self.shapes.list[i];
                // Past the same prefix, `parse` reads what this reads.
                let b = crate::canonical::parse_known(body, &shape.prefix)?;
                return Some(Prepared {
                    body: b,
                    m: shape.m,
                    shape: Some(i),
                    raw: body,
                });
            }
        }
        let b = crate::canonical::parse(body)?;
        let m = schema::by_channel(b.head.ch)?;
        Some(Prepared {
            body: b,
            m,
            shape: None,
            raw: body,
        })
    }

    /// Second step: the line for a prepared body, as
    /// [`Self::encode_canonical`] writes it (and declines it), by its shape
    /// where it has one that fits. A body written without one teaches its
    /// shape for the next.
    pub fn encode_prepared(&mut self, p: &mut Prepared<'_>, out: &mut Vec<u8>) -> bool {
        if let Some(i) = p.shape.take() {
            let start = out.len();
            if self.shape_inner(i, &mut p.body, out).is_some() {
                self.shape_hits += 1;
                return true;
            }
            out.truncate(start);
            // Another layout, a value it cannot take, or damage: from the
            // start, the ordinary way.
            match crate::canonical::parse(p.raw) {
                Some(b) => p.body = b,
                None => return false,
            }
        }
        if !self.encode_canonical(&mut p.body, p.m, out) {
            return false;
        }
        self.learn(p.raw, p.m);
        true
    }

    /// Writes `body`'s line by shape `i`; `None` (with `out` to be cut
    /// back) when the body does not fit it or `encode` would refuse it.
    fn shape_inner(
        &mut self,
        i: usize,
        body: &mut crate::canonical::Body<'_>,
        out: &mut Vec<u8>,
    ) -> Option<()> {
        let LineEncoder {
            last,
            hasher,
            tags,
            fields,
            shapes,
            ..
        } = self;
        let shape = &shapes.list[i];
        let h = body.head.clone();
        let start = out.len();
        let mut ib = itoa::Buffer::new();
        let hash = match &shape.series {
            Some((series, hash)) => {
                out.extend_from_slice(series);
                out.push(b' ');
                for mb in shape.members.iter() {
                    let (v, window) = body.member_is(&mb.key)?;
                    if let Some((kind, pre)) = &mb.field {
                        pre.put(out);
                        put_value(*kind, v, window, out, &mut ib)?;
                    }
                }
                *hash
            }
            None => {
                tags.header(h.sym, h.src, h.publisher).ok()?;
                fields.clear();
                for mb in shape.members.iter() {
                    let (v, window) = body.member_is(&mb.key)?;
                    if let Some(t) = mb.tag {
                        put_tag(tags, t, v, &mut ib)?;
                    }
                    if let Some((kind, pre)) = &mb.field {
                        pre.put(fields);
                        put_value(*kind, v, window, fields, &mut ib)?;
                    }
                }
                out.extend_from_slice(shape.m.name.as_bytes());
                tags.write_in(&shape.tag_order, out)?;
                let end = out.len();
                out.push(b' ');
                out.extend_from_slice(fields);
                series_hash(hasher, &out[start..end])
            }
        };
        body.end()?;
        end_line(last, out, hash, h.seq, h.epoch, h.time()).ok()
    }

    /// Records the shape of `raw`, a body the canonical path just wrote.
    fn learn(&mut self, raw: &[u8], m: &'static Measurement) {
        let Some(mut b) = crate::canonical::parse(raw) else {
            return;
        };
        let (mut hint, mut n) = (0usize, 0usize);
        let mut members = Vec::new();
        loop {
            let (k, _) = match b.member() {
                Ok(Some(kv)) => kv,
                Ok(None) => break,
                Err(_) => return,
            };
            let mut pre = Vec::new();
            let field = start_field(m, k, &mut hint, &mut n, &mut pre)
                .map(|f| (f.kind, crate::wire::Snippet::new(&pre)));
            let comma: &[u8] = if members.is_empty() { b"" } else { b"," };
            members.push(Member {
                key: [comma, b"\"", k.as_bytes(), b"\":"]
                    .concat()
                    .into_boxed_slice(),
                tag: m.tags.iter().find(|t| **t == k).copied(),
                field,
            });
        }
        let series = if m.tags.is_empty() {
            let h = &b.head;
            if self.tags.header(h.sym, h.src, h.publisher).is_err() {
                return;
            }
            let mut series = m.name.as_bytes().to_vec();
            self.tags.write(&mut series);
            let hash = series_hash(&self.hasher, &series);
            Some((series.into_boxed_slice(), hash))
        } else {
            None
        };
        let data_tags: Vec<&'static str> = members.iter().filter_map(|mb| mb.tag).collect();
        let Some(tag_order) = tag_order(&data_tags) else {
            return;
        };
        let shapes = &mut self.shapes;
        if shapes.list.len() >= MAX_SHAPES {
            shapes.index.clear();
            shapes.list.clear();
        }
        let shape = Shape {
            m,
            prefix: b.prefix.clone(),
            series,
            members: members.into_boxed_slice(),
            tag_order,
        };
        let key = &raw[..b.prefix.len];
        match shapes.index.get(key) {
            Some(&i) => shapes.list[i] = shape,
            None => {
                shapes.index.insert(key.into(), shapes.list.len());
                shapes.list.push(shape);
            }
        }
    }

    /// [`end_line`] for the series `out[start..series_end]`.
    fn finish(
        &mut self,
        out: &mut Vec<u8>,
        start: usize,
        series_end: usize,
        seq: u64,
        epoch: u64,
        time: i64,
    ) -> Result<(), MapError> {
        let hash = series_hash(&self.hasher, &out[start..series_end]);
        end_line(&mut self.last, out, hash, seq, epoch, time)
    }
}

fn series_hash(hasher: &foldhash::fast::RandomState, series: &[u8]) -> u64 {
    let mut h = hasher.build_hasher();
    h.write(series);
    h.finish()
}

/// Appends the sequence fields and the time, moved past a collision in
/// the series of hash `hash`, and ends the line.
fn end_line(
    last: &mut HashMap<u64, i64, foldhash::fast::RandomState>,
    out: &mut Vec<u8>,
    hash: u64,
    seq: u64,
    epoch: u64,
    time: i64,
) -> Result<(), MapError> {
    let mut t = time;
    if t <= 0 {
        return Err(MapError::NoTime);
    }
    if t > MAX_NANO_TIME {
        return Err(MapError::TimeOutOfRange(t));
    }
    let mut ib = itoa::Buffer::new();
    if seq > 0 {
        out.extend_from_slice(b",seq=");
        out.extend_from_slice(ib.format(seq).as_bytes());
        out.extend_from_slice(b"i,epoch=");
        out.extend_from_slice(ib.format(epoch).as_bytes());
        out.push(b'i');
    }
    let slot = last.entry(hash).or_insert(i64::MIN);
    if t <= *slot && *slot - t < COLLISION_WINDOW_NS {
        // Past the last storable instant there is nowhere to move it.
        t = match slot.checked_add(1) {
            Some(next) if next <= MAX_NANO_TIME => next,
            _ => return Err(MapError::TimeOutOfRange(*slot)),
        };
    }
    *slot = (*slot).max(t);
    if last.len() > 1_000_000 {
        // Bounded memory under instrument churn; collisions only matter
        // between neighbours in time, which a fresh map still sees.
        last.clear();
    }
    out.push(b' ');
    out.extend_from_slice(ib.format(t).as_bytes());
    out.push(b'\n');
    Ok(())
}

/// The `data` members of a canonical body as line-protocol fields into
/// `out` (tags among them into `tags`), as `encode_inner` writes the
/// decoded ones; `None` where `encode` would fail or the body is not
/// canonical after all.
fn canonical_fields(
    tags: &mut Tags,
    body: &mut crate::canonical::Body<'_>,
    m: &'static Measurement,
    out: &mut Vec<u8>,
) -> Option<()> {
    let mut n = 0usize;
    let mut ib = itoa::Buffer::new();
    let mut hint = 0usize;
    while let Some((k, v)) = body.member().ok()? {
        if let Some(key) = m.tags.iter().find(|t| **t == k) {
            put_tag(tags, key, v, &mut ib)?;
        }
        let Some(field) = start_field(m, k, &mut hint, &mut n, out) else {
            continue;
        };
        put_value(field.kind, v, &[], out, &mut ib)?;
    }
    (n > 0).then_some(())
}

/// A data member that is a tag, as `encode` takes it: a string, or an
/// integer written out.
#[inline]
fn put_tag(
    tags: &mut Tags,
    key: &'static str,
    v: crate::canonical::Raw<'_>,
    ib: &mut itoa::Buffer,
) -> Option<()> {
    use crate::canonical::Raw;
    match v {
        Raw::Str(s) => tags.add(key, s).ok(),
        Raw::Num(t, true) => tags.add(key, ib.format(t.parse::<i64>().ok()?)).ok(),
        _ => None,
    }
}

/// A data member's value as a field of `kind`, as `encode` writes it;
/// `None` where `encode` would refuse it.
///
/// `window`: the body from the value on, or empty. Where it holds 32
/// bytes, a number is copied as that fixed-size block cut to length
/// ([`crate::wire::append_cut`]).
#[inline]
fn put_value(
    kind: Kind,
    v: crate::canonical::Raw<'_>,
    window: &[u8],
    out: &mut Vec<u8>,
    ib: &mut itoa::Buffer,
) -> Option<()> {
    use crate::canonical::Raw;
    match (kind, v) {
        (Kind::Float, Raw::Num(t, false)) => match window.first_chunk::<32>() {
            // The value is where the window starts (a pointer compare,
            // not a byte compare), and fits in it.
            Some(w) if t.len() <= w.len() && t.as_ptr() == window.as_ptr() => {
                crate::wire::append_cut(out, w, t.len())
            }
            _ => out.extend_from_slice(t.as_bytes()),
        },
        (Kind::Float, Raw::Num(t, true)) => {
            crate::wire::push_f64(out, t.parse::<i64>().ok()? as f64)
        }
        (Kind::Int, Raw::Num(t, true)) => {
            out.extend_from_slice(ib.format(t.parse::<i64>().ok()?).as_bytes());
            out.push(b'i');
        }
        (Kind::Bool, Raw::Bool(b)) => out.extend_from_slice(if b { b"true" } else { b"false" }),
        (Kind::Str, Raw::Str(s)) => {
            // Canonical strings have no control characters: no newline.
            out.push(b'"');
            escape(out, s.as_bytes(), b"\"\\");
            out.push(b'"');
        }
        _ => return None,
    }
    Some(())
}

fn kind_name(v: &Value<'_>) -> &'static str {
    match v {
        Value::Float(_) => "a float",
        Value::Int(_) => "an integer",
        Value::Bool(_) => "a boolean",
        Value::Str(_) => "a string",
        Value::Num(_) => "a float",
    }
}

/// Inlined so that each call's `special` is a constant set.
#[inline(always)]
fn escape(out: &mut Vec<u8>, s: &[u8], special: &[u8]) {
    // Two or three specials: a byte scan with a small match beats a
    // slice search per byte on the hot path.
    let is_special = |b: u8| special.contains(&b);
    match s.iter().position(|&b| is_special(b)) {
        None => out.extend_from_slice(s),
        Some(first) => {
            out.extend_from_slice(&s[..first]);
            for &b in &s[first..] {
                if is_special(b) {
                    out.push(b'\\');
                }
                out.push(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    fn env(sym: &str, data: Vec<(&'static str, Value<'static>)>) -> Envelope<'static> {
        let mut e = Envelope::new(
            "kraken",
            "trade",
            sym.to_string(),
            1_000_000_000,
            data.into_iter()
                .map(|(k, v)| (Cow::Borrowed(k), v))
                .collect(),
        );
        e.publisher = "k-1".into();
        e.seq = 3;
        e.epoch = 9;
        e
    }

    #[test]
    fn encodes_escaped_sorted_typed_and_parses_back() {
        let mut enc = LineEncoder::new();
        let mut out = Vec::new();
        let e = env(
            "BTC/USD, x=y",
            vec![
                ("price", Value::Int(42)),
                ("qty", Value::Float(0.5)),
                ("trade_id", Value::Int(77)),
                ("side", Value::Str("buy".into())),
                ("ord_type", Value::Str("limit".into())),
                ("unknown", Value::Str("ignored".into())),
            ],
        );
        enc.encode(&e, &mut out).unwrap();
        let line = std::str::from_utf8(&out).unwrap();
        assert_eq!(
            line,
            "kraken_orders,instrument=BTC/USD\\,\\ x\\=y,ord_type=limit,publisher=k-1,side=buy,source=kraken price=42.0,qty=0.5,trade_id=77i,seq=3i,epoch=9i 1000000000\n"
        );
        // The reference parser agrees on every key and value.
        let parsed = influxdb_line_protocol::parse_lines(line)
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(parsed.series.measurement.to_string(), "kraken_orders");
        let tags = parsed.series.tag_set.unwrap();
        assert_eq!(tags[0].1.to_string(), "BTC/USD, x=y");
        assert_eq!(parsed.field_set.len(), 5);
        assert_eq!(parsed.timestamp, Some(1_000_000_000));
    }

    #[test]
    fn refuses_what_influx_would_misread() {
        let mut enc = LineEncoder::new();
        let mut out = b"keep".to_vec();
        let bad = [
            env("a\nb", vec![("price", Value::Float(1.0))]),
            env("x", vec![("price", Value::Float(f64::INFINITY))]),
            env("x", vec![("price", Value::Str("1".into()))]),
            env(
                "x",
                vec![("side", Value::Float(1.0)), ("price", Value::Float(1.0))],
            ),
            env("x", vec![("nothing", Value::Float(1.0))]),
            env("", vec![("price", Value::Float(1.0))]),
            env("BACK\\", vec![("price", Value::Float(1.0))]),
            env(
                "x",
                vec![
                    ("side", Value::Str("buy\\".into())),
                    ("price", Value::Float(1.0)),
                ],
            ),
            {
                let mut e = env("x", vec![("price", Value::Float(1.0))]);
                e.publisher = "p\\".into();
                e
            },
        ];
        for e in &bad {
            assert!(enc.encode(e, &mut out).is_err(), "{e:?}");
            assert_eq!(out, b"keep", "a refused point leaves nothing behind");
        }
    }

    /// InfluxDB 1.x reads the byte after any backslash as escaped, so a
    /// tag value ending in one would swallow the comma after it: refused,
    /// saying why. Backslashes elsewhere are written as they are.
    #[test]
    fn a_tag_ending_in_a_backslash_is_refused_and_others_kept() {
        let mut enc = LineEncoder::new();
        let mut out = Vec::new();
        let e = env("BACK\\", vec![("price", Value::Float(1.0))]);
        let err = enc.encode(&e, &mut out).err().unwrap();
        assert_eq!(
            err.to_string(),
            "tag instrument ends in a backslash, which line protocol cannot carry"
        );
        let mut e = env("x", vec![("price", Value::Float(1.0))]);
        e.publisher = "p\\".into();
        assert_eq!(
            enc.encode(&e, &mut out).err(),
            Some(MapError::TrailingBackslash("publisher"))
        );
        assert!(out.is_empty());
        let e = env("a\\,b\\c", vec![("price", Value::Float(1.0))]);
        enc.encode(&e, &mut out).unwrap();
        assert!(
            out.starts_with(b"kraken_orders,instrument=a\\\\,b\\c,publisher=k-1,"),
            "{}",
            String::from_utf8_lossy(&out)
        );
    }

    #[test]
    fn same_instant_points_of_one_series_get_distinct_times() {
        let mut enc = LineEncoder::new();
        let mut out = Vec::new();
        for _ in 0..3 {
            enc.encode(&env("x", vec![("price", Value::Float(1.0))]), &mut out)
                .unwrap();
        }
        enc.encode(&env("y", vec![("price", Value::Float(1.0))]), &mut out)
            .unwrap();
        let times: Vec<&str> = std::str::from_utf8(&out)
            .unwrap()
            .lines()
            .map(|l| l.rsplit(' ').next().unwrap())
            .collect();
        assert_eq!(
            times,
            ["1000000000", "1000000001", "1000000002", "1000000000"]
        );
    }

    /// Times InfluxDB cannot store are refused, and moving a colliding
    /// point never wraps: at the last storable instant a second point of
    /// the series has nowhere to go and is refused, not written at
    /// `i64::MIN`.
    #[test]
    fn times_past_influxdbs_range_are_refused_and_shifts_never_wrap() {
        let at = |ts: i64| {
            let mut e = env("x", vec![("price", Value::Float(1.0))]);
            e.ts = ts;
            e
        };
        let mut enc = LineEncoder::new();
        let mut out = Vec::new();
        assert_eq!(
            enc.encode(&at(i64::MAX), &mut out).err(),
            Some(MapError::TimeOutOfRange(i64::MAX))
        );
        assert!(out.is_empty());
        enc.encode(&at(MAX_NANO_TIME - 1), &mut out).unwrap();
        enc.encode(&at(MAX_NANO_TIME - 1), &mut out).unwrap();
        assert_eq!(
            enc.encode(&at(MAX_NANO_TIME - 1), &mut out).err(),
            Some(MapError::TimeOutOfRange(MAX_NANO_TIME))
        );
        let times: Vec<i64> = std::str::from_utf8(&out)
            .unwrap()
            .lines()
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(times, [MAX_NANO_TIME - 1, MAX_NANO_TIME]);
        // The canonical path refuses the same (and leaves it to `encode`).
        let mut body = Vec::new();
        crate::wire::encode_v1(&at(MAX_NANO_TIME), &mut body).unwrap();
        let mut p = enc.prepare(&body).unwrap();
        let mut o = Vec::new();
        assert!(!enc.encode_prepared(&mut p, &mut o));
        assert!(o.is_empty());
    }

    /// Shapes are per publisher, channel and instrument: more instruments
    /// than `MAX_SHAPES` start the table over instead of growing it, and
    /// the lines stay what the general path writes, first time and again.
    #[test]
    fn shapes_stay_bounded_under_instrument_churn() {
        use crate::wire::{decode_v1, encode_v1};
        let (mut plain, mut fused) = (LineEncoder::new(), LineEncoder::new());
        let mut gen = crate::feeds::synthetic::Generator::new(9, &[]);
        let mut check = |body: &[u8], fused: &mut LineEncoder| {
            let mut want = Vec::new();
            plain.encode(&decode_v1(body).unwrap(), &mut want).unwrap();
            let mut got = Vec::new();
            let mut p = fused.prepare(body).unwrap();
            assert!(fused.encode_prepared(&mut p, &mut got));
            assert_eq!(got, want, "{}", String::from_utf8_lossy(body));
        };
        let (n, tail) = (MAX_SHAPES + 100, 100);
        let mut bodies = Vec::new();
        let mut most = 0;
        for i in 0..n {
            let mut e = gen.next_message();
            e.sym = format!("I{i}/USD").into();
            e.publisher = "p".into();
            e.seq = i as u64 + 1;
            e.epoch = 1;
            let mut body = Vec::new();
            encode_v1(&e, &mut body).unwrap();
            check(&body, &mut fused);
            most = most.max(fused.shapes.list.len());
            assert_eq!(fused.shapes.index.len(), fused.shapes.list.len());
            bodies.push(body);
        }
        assert_eq!(most, MAX_SHAPES, "the table filled up to its bound");
        assert_eq!(fused.shapes.list.len(), tail, "and started over");
        assert_eq!(fused.shape_hits, 0);
        // What was learned since is used.
        for body in &bodies[n - tail..] {
            check(body, &mut fused);
        }
        assert_eq!(fused.shape_hits, tail as u64);
    }

    /// Holds `encode_canonical` to its promise: wherever it writes a line,
    /// decode + `encode` write the same bytes; where it declines, `out` is
    /// untouched; and it declines nothing that our publishers send and
    /// `encode` stores. Bodies: every synthetic channel, with tags that need
    /// escaping, integers for floats, integer tags, unknown keys, missing
    /// exchange times, same-instant points; then each with random damage.
    #[test]
    fn the_canonical_path_writes_what_decode_and_encode_write() {
        use crate::wire::{decode_v1, encode_v1};
        let mut gen = crate::feeds::synthetic::Generator::new(5, &[]);
        let (mut plain, mut fused) = (LineEncoder::new(), LineEncoder::new());
        let mut damage = crate::canonical::Damage::new(0x9E3779B97F4A7C15);
        let (mut same, mut declined, mut refused) = (0, 0, 0);
        let mut check = |body: &[u8], must_answer: bool| {
            let old = decode_v1(body).ok().and_then(|env| {
                let mut o = Vec::new();
                plain.encode(&env, &mut o).ok().map(|_| o)
            });
            let mut out = b"keep".to_vec();
            let wrote = fused
                .prepare(body)
                .is_some_and(|mut p| fused.encode_prepared(&mut p, &mut out));
            if wrote {
                assert_eq!(
                    String::from_utf8_lossy(&out[4..]),
                    String::from_utf8_lossy(old.as_deref().unwrap_or(b"<refused>")),
                    "{}",
                    String::from_utf8_lossy(body)
                );
                same += 1;
            } else {
                assert_eq!(out, b"keep", "a declined body leaves nothing behind");
                assert!(
                    !(must_answer && old.is_some()),
                    "declined: {}",
                    String::from_utf8_lossy(body)
                );
                // The subscriber's fallback, so both encoders keep the
                // same series times.
                if let Ok(env) = decode_v1(body) {
                    if fused.encode(&env, &mut Vec::new()).is_err() {
                        refused += 1;
                    }
                }
                declined += 1;
            }
        };
        let mut last_ts = 0;
        for i in 0..4000u64 {
            let mut e = gen.next_message();
            e.seq = i + 1;
            e.epoch = 3;
            e.publisher = if i % 4 == 0 { "" } else { "p,1 x=y" }.into();
            match i % 11 {
                0 => e
                    .data
                    .push(("note".into(), Value::Str("unknown key".into()))),
                1 => {
                    if let Some((_, v)) = e
                        .data
                        .iter_mut()
                        .find(|(_, v)| matches!(v, Value::Float(_)))
                    {
                        *v = Value::Int(100 + i as i64);
                    }
                }
                2 => {
                    for (k, v) in e.data.iter_mut() {
                        if k == "side" || k == "status" {
                            *v = Value::Str("a,b c=d".into());
                        }
                        if k == "selection_id" {
                            *v = Value::Int(-(i as i64));
                        }
                    }
                }
                3 => e.ts = 0,
                4 => e.ts = last_ts,
                5 => e.data.push(("seq".into(), Value::Int(9))),
                6 => e
                    .data
                    .insert(0, ("spread".into(), Value::Str("a type error".into()))),
                // An empty tag value (no tag) and a tag key given twice.
                7 => {
                    for (k, v) in e.data.iter_mut() {
                        if k == "side" || k == "market_id" {
                            *v = Value::Str("".into());
                        }
                    }
                }
                8 => {
                    if let Some(t) = e
                        .data
                        .iter()
                        .find(|(k, _)| k == "side" || k == "selection_id")
                        .cloned()
                    {
                        e.data.push((t.0, Value::Str("again".into())));
                    }
                }
                _ => {}
            }
            last_ts = e.ts;
            let mut body = Vec::new();
            encode_v1(&e, &mut body).unwrap();
            check(&body, true);
            for _ in 0..6 {
                check(&damage.apply(&body), false);
            }
        }
        let hits = fused.shape_hits;
        assert!(
            same > 4000 && declined > 4000 && refused > 100 && hits > 2000,
            "{same} same, {declined} declined, {refused} refused, {hits} by shape"
        );
    }
}
