//! Wire format v1 and the legacy text codec.
//!
//! v1 is two ZeroMQ frames: the topic `{src}.{ch}.{sym}` (so a SUB filters by
//! venue, channel or instrument by prefix) and a JSON object
//! `{"v":1,"src","ch","sym","pub","seq","epoch","ts","rx","data":{…}}`.
//! JSON keeps pyzmq and other foreign clients able to read the bus; `seq` and
//! `epoch` (per publisher) make loss visible, because a ZeroMQ PUB drops
//! silently. `pub` names the publisher so gaps are counted per publisher even
//! when one SUB socket is connected to several.
//!
//! `data` is flat: numbers, strings and booleans only. The [`crate::schema`]
//! decides which keys are tags and which are fields.
//!
//! The legacy codec is the predecessor's single frame
//! `"<measurement> <values joined by \x01>"`, with the values in schema
//! order: instrument, exchange time (ns), source, the measurement's tags,
//! then its fields without `seq`/`epoch`. It carries no sequence numbers, so
//! gaps cannot be counted for it.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::schema::{self, Kind, Measurement};

/// Frames larger than this are refused before parsing.
pub const MAX_FRAME: usize = 1 << 20;
pub const VERSION: u32 = 1;
pub const LEGACY_SEP: char = '\x01';

#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Float(f64),
    Int(i64),
    Bool(bool),
    Str(Cow<'a, str>),
    /// A non-integer JSON number as it was received, kept as text: the
    /// subscriber writes it to line protocol unchanged, so a price is never
    /// parsed to f64 and formatted back (exact, and a third of the hot path).
    Num(Cow<'a, str>),
}

impl Value<'_> {
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            Value::Num(t) => t.parse().ok(),
            _ => None,
        }
    }
    pub fn into_owned(self) -> Value<'static> {
        match self {
            Value::Float(f) => Value::Float(f),
            Value::Int(i) => Value::Int(i),
            Value::Bool(b) => Value::Bool(b),
            Value::Str(s) => Value::Str(Cow::Owned(s.into_owned())),
            Value::Num(t) => Value::Num(Cow::Owned(t.into_owned())),
        }
    }
}

/// The message's payload: flat key → scalar pairs, in the publisher's order.
pub type Fields<'a> = Vec<(Cow<'a, str>, Value<'a>)>;

/// One message. Feeds build it with `seq`/`epoch`/`publisher` empty; the
/// publisher stamps them just before it goes on the bus.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope<'a> {
    pub src: Cow<'a, str>,
    pub ch: Cow<'a, str>,
    pub sym: Cow<'a, str>,
    pub publisher: Cow<'a, str>,
    /// 1-based per publisher and epoch; 0 = unsequenced (legacy codec).
    pub seq: u64,
    pub epoch: u64,
    /// Exchange time, ns since the Unix epoch; 0 when the venue gives none.
    pub ts: i64,
    /// Receive time at the publisher, ns since the Unix epoch.
    pub rx: i64,
    pub data: Fields<'a>,
}

impl<'a> Envelope<'a> {
    pub fn new(
        src: impl Into<Cow<'a, str>>,
        ch: impl Into<Cow<'a, str>>,
        sym: impl Into<Cow<'a, str>>,
        ts: i64,
        data: Fields<'a>,
    ) -> Self {
        Envelope {
            src: src.into(),
            ch: ch.into(),
            sym: sym.into(),
            publisher: Cow::Borrowed(""),
            seq: 0,
            epoch: 0,
            ts,
            rx: now_ns(),
            data,
        }
    }

    /// The time a point is stored at: exchange time, else receive time.
    pub fn time(&self) -> i64 {
        point_time(self.ts, self.rx)
    }

    pub fn get(&self, key: &str) -> Option<&Value<'a>> {
        self.data.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// An envelope that owns its strings, for queues.
    pub fn into_owned(self) -> Envelope<'static> {
        Envelope {
            src: Cow::Owned(self.src.into_owned()),
            ch: Cow::Owned(self.ch.into_owned()),
            sym: Cow::Owned(self.sym.into_owned()),
            publisher: Cow::Owned(self.publisher.into_owned()),
            seq: self.seq,
            epoch: self.epoch,
            ts: self.ts,
            rx: self.rx,
            data: self
                .data
                .into_iter()
                .map(|(k, v)| (Cow::Owned(k.into_owned()), v.into_owned()))
                .collect(),
        }
    }

    pub fn topic(&self) -> String {
        let mut t = Vec::new();
        self.write_topic(&mut t);
        String::from_utf8(t).unwrap_or_default()
    }

    /// Appends `src.ch.sym`, the topic frame, without allocating.
    pub fn write_topic(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.src.as_bytes());
        out.push(b'.');
        out.extend_from_slice(self.ch.as_bytes());
        out.push(b'.');
        out.extend_from_slice(self.sym.as_bytes());
    }
}

/// The time a point is stored at: exchange time `ts` when the venue gave
/// one, else receive time `rx`.
pub fn point_time(ts: i64, rx: i64) -> i64 {
    if ts > 0 {
        ts
    } else {
        rx
    }
}

pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("empty message")]
    Empty,
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("expected 2 frames (topic, body), got {0}")]
    FrameCount(usize),
    #[error("body is not a v1 envelope: {0}")]
    Json(String),
    #[error("unknown envelope version {0} (this build reads v{VERSION})")]
    Version(u32),
    #[error("legacy frame: {0}")]
    Legacy(String),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EncodeError {
    #[error("{key}: {value} is not a finite number")]
    NonFinite { key: String, value: f64 },
    #[error("channel {0:?} has no measurement, the legacy codec cannot carry it")]
    UnknownChannel(String),
    #[error("{0} contains \\x01, the legacy frame's separator, which the legacy codec cannot carry (it has no escape; codec = \"v1\" can)")]
    LegacySeparator(String),
    #[error("tag {key} is a {got}, not a string or an integer: the legacy codec would leave it out (v1 storage refuses it too)")]
    LegacyTagType { key: String, got: &'static str },
    /// Subscribers drop a frame over [`MAX_FRAME`] as malformed: sent, it
    /// would be counted delivered and never stored.
    #[error(
        "its encoded frame of {0} bytes exceeds the {MAX_FRAME}-byte limit subscribers accept"
    )]
    TooLarge(usize),
}

/// Appends the v1 JSON body of `env` to `out`.
///
/// This is the reference form: [`crate::canonical`] reads exactly it, and
/// [`crate::v1_encoder::V1Encoder`], the publisher's encoder, writes the
/// same bytes faster.
pub fn encode_v1(env: &Envelope<'_>, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    put_head(out, &env.src, &env.ch);
    json_str(out, &env.sym);
    put_publisher(out, &env.publisher);
    put_counters(out, env);
    for (n, (k, v)) in env.data.iter().enumerate() {
        put_key(out, n, k);
        put_data_value(out, k, v)?;
    }
    out.extend_from_slice(b"}}");
    Ok(())
}

/// The pieces of a v1 body, in order; [`crate::v1_encoder`] keeps what
/// the first three write for reuse.
///
/// `{"v":1,"src":…,"ch":…,"sym":`
pub(crate) fn put_head(out: &mut Vec<u8>, src: &str, ch: &str) {
    out.extend_from_slice(b"{\"v\":1,\"src\":");
    json_str(out, src);
    out.extend_from_slice(b",\"ch\":");
    json_str(out, ch);
    out.extend_from_slice(b",\"sym\":");
}

/// `,"pub":…` (nothing for an empty publisher), then `,"seq":`.
pub(crate) fn put_publisher(out: &mut Vec<u8>, publisher: &str) {
    if !publisher.is_empty() {
        out.extend_from_slice(b",\"pub\":");
        json_str(out, publisher);
    }
    out.extend_from_slice(b",\"seq\":");
}

/// The `n`th data key: `"key":`, with a comma before all but the first.
pub(crate) fn put_key(out: &mut Vec<u8>, n: usize, k: &str) {
    if n > 0 {
        out.push(b',');
    }
    json_str(out, k);
    out.push(b':');
}

/// Appends the envelope's numbers after `"seq":`, up to and including
/// `,"data":{`.
pub(crate) fn put_counters(out: &mut Vec<u8>, env: &Envelope<'_>) {
    let mut ibuf = itoa::Buffer::new();
    out.extend_from_slice(ibuf.format(env.seq).as_bytes());
    out.extend_from_slice(b",\"epoch\":");
    out.extend_from_slice(ibuf.format(env.epoch).as_bytes());
    out.extend_from_slice(b",\"ts\":");
    out.extend_from_slice(ibuf.format(env.ts).as_bytes());
    out.extend_from_slice(b",\"rx\":");
    out.extend_from_slice(ibuf.format(env.rx).as_bytes());
    out.extend_from_slice(b",\"data\":{");
}

/// Appends one data value as JSON; `k` names it in the error.
pub(crate) fn put_data_value(out: &mut Vec<u8>, k: &str, v: &Value<'_>) -> Result<(), EncodeError> {
    match v {
        Value::Float(f) => {
            if !f.is_finite() {
                return Err(EncodeError::NonFinite {
                    key: k.to_string(),
                    value: *f,
                });
            }
            push_f64(out, *f);
        }
        Value::Int(i) => out.extend_from_slice(itoa::Buffer::new().format(*i).as_bytes()),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Str(s) => json_str(out, s),
        Value::Num(t) => out.extend_from_slice(t.as_bytes()),
    }
    Ok(())
}

/// Appends a finite `f` so that it reads back as exactly `f`, always with a
/// `.` or exponent (an integral float written as `100` would come back as an
/// integer and change the field's type in InfluxDB).
///
/// Prices and sizes are short decimals. For those, integers `r` and `10^k`
/// below 10^15 (both exact) with `r / 10^k == |f|` (a correctly rounded
/// division) mean the decimal `r·10^-k` parses back to `|f|` as well; it
/// prints with integer formatting, several times faster than ryu's general
/// algorithm, which was a quarter of the publisher's CPU in the e2e bench.
/// Decimals of at most 15 significant digits are distinct doubles
/// (DBL_DIG), so the one found, its trailing zeros stripped, is the
/// shortest: the text ryu prints. `r` comes from a scaling by 10^6, which
/// is what feeds round to; failing that, below 10^6, by 10^9; should that
/// be off by one unit (the check fails), the decimals are searched one by
/// one, and anything that is not a short decimal goes to ryu.
pub fn push_f64(out: &mut Vec<u8>, f: f64) {
    let a = f.abs();
    // Feeds round prices and sizes to at most six decimals, so that
    // scaling is tried first and alone. Below 10^9 the scaled value is
    // under 10^15, so the argument below holds for it too.
    if a < 1e9 {
        let r = (a * 1e6 + 0.5) as i64 as u64;
        if r as f64 / 1e6 == a {
            put_micros(out, f.is_sign_negative(), r);
            return;
        }
    }
    const POW10: [f64; 10] = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];
    // At most 15 significant digits: such decimals are distinct doubles
    // (DBL_DIG), so the one found is the shortest, the one ryu prints.
    const DIGITS15: f64 = 1e15;
    let shortest = |k: usize| -> Option<(u64, usize)> {
        let m = a * POW10[k];
        if m >= DIGITS15 {
            return None;
        }
        // Rounds half up without a libm call (f64::round is one on
        // baseline x86-64); the check below makes any rounding safe.
        // `as i64` is one instruction; `as u64` of a double is a dozen
        // (m < 10^15 fits either).
        let mut r = (m + 0.5) as i64 as u64;
        let mut k = k;
        // Prices carry at most 6 decimals of the 9: three zeros at once.
        while k >= 3 && r % 1000 == 0 {
            r /= 1000;
            k -= 3;
        }
        while k > 0 && r % 10 == 0 {
            r /= 10;
            k -= 1;
        }
        (r as f64 / POW10[k] == a).then_some((r, k))
    };
    // Below 10^9, the scaling by 10^6 above already failed; below 10^6,
    // one by 10^9 finds up to nine decimals.
    let found = if a < 1e6 { shortest(9) } else { None }
        .or_else(|| (0..POW10.len()).find_map(|k| shortest(k).filter(|&(_, kk)| kk == k)));
    // NaN, infinities and anything of 10^15 or more fail `shortest` for
    // every `k`.
    let Some((r, k)) = found else {
        out.extend_from_slice(ryu::Buffer::new().format_finite(f).as_bytes());
        return;
    };
    // Built in a fixed-size buffer and appended by `append_cut`, instead
    // of appending the pieces (sign, integer part, point, decimals).
    let mut buf = [0u8; 40];
    let scale = POW10_U64[k];
    let mut n = put_int_point(&mut buf, f.is_sign_negative(), r / scale);
    if k == 0 {
        buf[n] = b'0';
        n += 1;
    } else {
        put_digits(&mut buf[n..n + k], r % scale);
        n += k;
    }
    append_cut(out, &buf, n);
}

/// Writes a decimal's sign, integer part and point at the start of `buf`
/// (room for 22 bytes); returns their length.
#[inline]
fn put_int_point(buf: &mut [u8], negative: bool, int: u64) -> usize {
    buf[0] = b'-';
    let n = usize::from(negative);
    let n = n + put_uint(&mut buf[n..], int);
    buf[n] = b'.';
    n + 1
}

/// Appends `r` millionths (`r < 10^15`) as a decimal with the fewest
/// decimals, at least one. The six decimals are written as one word and
/// cut after the last non-zero digit: stripping zeros digit by digit was a
/// loop of divisions with a branch per digit on random data.
#[inline]
fn put_micros(out: &mut Vec<u8>, negative: bool, r: u64) {
    let int = r / 1_000_000;
    let frac = (r - int * 1_000_000) as usize;
    let mut buf = [0u8; 24];
    let mut n = put_int_point(&mut buf, negative, int);
    if frac == 0 {
        buf[n] = b'0';
        n += 1;
    } else {
        let pair = |i: usize| u64::from(u16::from_le_bytes(DIGIT_PAIRS[i]));
        let digits = pair(frac / 10_000) | pair(frac / 100 % 100) << 16 | pair(frac % 100) << 32;
        buf[n..n + 8].copy_from_slice(&digits.to_le_bytes());
        // A '0' digit becomes a zero byte; the word's two top bytes are
        // zero already. `frac != 0`, so some digit byte is not.
        let zeros = digits ^ 0x0000_3030_3030_3030;
        n += 8 - (zeros.leading_zeros() / 8) as usize;
    }
    append_cut(out, &buf, n);
}

/// Bytes written again and again (a field prefix, a remembered JSON key),
/// kept as a fixed-size block where they fit, for [`append_cut`].
pub(crate) enum Snippet {
    Short([u8; 24], u8),
    Long(Box<[u8]>),
}

impl Snippet {
    pub(crate) fn new(b: &[u8]) -> Self {
        let mut a = [0u8; 24];
        match a.get_mut(..b.len()) {
            Some(to) => {
                to.copy_from_slice(b);
                Snippet::Short(a, b.len() as u8)
            }
            None => Snippet::Long(b.into()),
        }
    }

    #[inline]
    pub(crate) fn put(&self, out: &mut Vec<u8>) {
        match self {
            Snippet::Short(a, n) => append_cut(out, a, usize::from(*n)),
            Snippet::Long(b) => out.extend_from_slice(b),
        }
    }
}

/// Appends the first `len` bytes of `block` (`len <= N`). The whole block
/// is appended, then cut to length: a fixed-size append is a few moves,
/// where appending a few bytes of run-time length is a `memcpy` call,
/// which for numbers and keys written per message was a visible part of
/// both hot paths.
#[inline]
pub(crate) fn append_cut<const N: usize>(out: &mut Vec<u8>, block: &[u8; N], len: usize) {
    debug_assert!(len <= N);
    let at = out.len();
    out.extend_from_slice(block);
    out.truncate(at + len);
}

const POW10_U64: [u64; 10] = [
    1,
    10,
    100,
    1_000,
    10_000,
    100_000,
    1_000_000,
    10_000_000,
    100_000_000,
    1_000_000_000,
];

/// "00" to "99".
const DIGIT_PAIRS: [[u8; 2]; 100] = {
    let mut t = [[0u8; 2]; 100];
    let mut i = 0;
    while i < 100 {
        t[i] = [b'0' + (i / 10) as u8, b'0' + (i % 10) as u8];
        i += 1;
    }
    t
};

/// Writes `v` at the start of `out` (which must have room: 20 bytes
/// holds any u64) and returns its length.
fn put_uint(out: &mut [u8], v: u64) -> usize {
    // Prices' integer parts are short: a few compares beat `ilog10`.
    let len = match v {
        0..10 => 1,
        10..100 => 2,
        100..1_000 => 3,
        1_000..10_000 => 4,
        _ => v.ilog10() as usize + 1,
    };
    put_digits(&mut out[..len], v);
    len
}

/// Fills `out` with the last `out.len()` decimal digits of `v`, zero-padded
/// on the left.
fn put_digits(out: &mut [u8], mut v: u64) {
    let mut i = out.len();
    while i >= 2 {
        out[i - 2..i].copy_from_slice(&DIGIT_PAIRS[(v % 100) as usize]);
        v /= 100;
        i -= 2;
    }
    if i == 1 {
        out[0] = b'0' + (v % 10) as u8;
    }
}

/// Bytes a JSON string must escape: control characters, `"` and `\`.
const JSON_ESCAPE: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = true;
        i += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

pub(crate) fn json_str(out: &mut Vec<u8>, s: &str) {
    if !s.bytes().any(|b| JSON_ESCAPE[b as usize]) {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // serde_json's escaping of a &str cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// What rules a v1 body out before anything in it is read: empty, or over
/// the frame limit.
pub fn check_v1_body(body: &[u8]) -> Result<(), DecodeError> {
    if body.is_empty() {
        return Err(DecodeError::Empty);
    }
    if body.len() > MAX_FRAME {
        return Err(DecodeError::TooLarge(body.len()));
    }
    Ok(())
}

/// Decodes a v1 body.
pub fn decode_v1(body: &[u8]) -> Result<Envelope<'_>, DecodeError> {
    check_v1_body(body)?;
    if let Some(env) = crate::canonical::decode(body) {
        return Ok(env);
    }
    decode_v1_general(body)
}

/// The general decoder: any valid JSON form of an envelope.
pub fn decode_v1_general(body: &[u8]) -> Result<Envelope<'_>, DecodeError> {
    let raw: RawEnvelope<'_> =
        serde_json::from_slice(body).map_err(|e| DecodeError::Json(e.to_string()))?;
    if raw.v != VERSION {
        return Err(DecodeError::Version(raw.v));
    }
    Ok(Envelope {
        src: raw.src,
        ch: raw.ch,
        sym: raw.sym,
        publisher: raw.publisher.unwrap_or(Cow::Borrowed("")),
        seq: raw.seq,
        epoch: raw.epoch,
        ts: raw.ts,
        rx: raw.rx,
        data: raw.data.0,
    })
}

#[derive(Deserialize)]
struct RawEnvelope<'a> {
    v: u32,
    #[serde(borrow)]
    src: Cow<'a, str>,
    #[serde(borrow)]
    ch: Cow<'a, str>,
    #[serde(borrow)]
    sym: Cow<'a, str>,
    #[serde(borrow, rename = "pub", default)]
    publisher: Option<Cow<'a, str>>,
    #[serde(deserialize_with = "de_sequence_number")]
    seq: u64,
    #[serde(deserialize_with = "de_sequence_number")]
    epoch: u64,
    #[serde(default)]
    ts: i64,
    #[serde(default)]
    rx: i64,
    #[serde(borrow)]
    data: Data<'a>,
}

/// `seq` or `epoch` if it is one: InfluxDB stores them as signed 64-bit
/// integers (and refuses a larger one, sending the point to dead-letter),
/// and gap accounting on a number that cannot be stored is meaningless, so
/// a value above `i64::MAX` makes the message malformed.
pub fn sequence_number(v: u64) -> Option<u64> {
    (v <= i64::MAX as u64).then_some(v)
}

fn de_sequence_number<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = u64::deserialize(d)?;
    sequence_number(v).ok_or_else(|| {
        serde::de::Error::custom(format_args!(
            "{v} is above {}, the largest integer InfluxDB stores",
            i64::MAX
        ))
    })
}

struct Data<'a>(Fields<'a>);

impl<'de: 'a, 'a> Deserialize<'de> for Data<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Data<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a flat object of numbers, strings and booleans")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Data<'a>, M::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(12));
                while let Some(k) = map.next_key::<CowStr<'a>>()? {
                    let v = map.next_value::<Scalar<'a>>()?;
                    out.push((k.0, v.0));
                }
                Ok(Data(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

struct CowStr<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for CowStr<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = CowStr<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<CowStr<'a>, E> {
                Ok(CowStr(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<CowStr<'a>, E> {
                Ok(CowStr(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<CowStr<'a>, E> {
                Ok(CowStr(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V(std::marker::PhantomData))
    }
}

struct Scalar<'a>(Value<'a>);

impl<'de: 'a, 'a> Deserialize<'de> for Scalar<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // The raw text, so numbers keep their exact decimal form.
        let raw = <&'a serde_json::value::RawValue>::deserialize(d)?.get();
        scalar(raw).map(Scalar).map_err(de::Error::custom)
    }
}

fn scalar(raw: &str) -> Result<Value<'_>, String> {
    match raw.as_bytes().first() {
        Some(b'"') => {
            let inner = &raw[1..raw.len() - 1];
            if inner.contains('\\') {
                serde_json::from_str::<String>(raw)
                    .map(|s| Value::Str(Cow::Owned(s)))
                    .map_err(|e| e.to_string())
            } else {
                Ok(Value::Str(Cow::Borrowed(inner)))
            }
        }
        Some(b't') => Ok(Value::Bool(true)),
        Some(b'f') => Ok(Value::Bool(false)),
        Some(b'-' | b'0'..=b'9') => {
            if raw.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
                raw.parse::<i64>()
                    .map(Value::Int)
                    .map_err(|_| format!("integer {raw} out of range"))
            } else {
                Ok(Value::Num(Cow::Borrowed(raw)))
            }
        }
        _ => Err(format!(
            "invalid type: {raw:.20}, expected a number, string or boolean"
        )),
    }
}

/// Encodes the legacy single frame for `env`.
pub fn encode_legacy(env: &Envelope<'_>) -> Result<String, EncodeError> {
    let m = schema::by_channel(&env.ch)
        .ok_or_else(|| EncodeError::UnknownChannel(env.ch.to_string()))?;
    // The format has no escape: a value holding the separator would shift
    // every value after it, and the decoder refuses the frame. It is
    // refused here instead, where it is counted as not encodable.
    let plain = |key: &str, s: &str| {
        if s.contains(LEGACY_SEP) {
            Err(EncodeError::LegacySeparator(key.to_string()))
        } else {
            Ok(())
        }
    };
    plain("the instrument", &env.sym)?;
    plain("the source", &env.src)?;
    let mut out = String::with_capacity(256);
    out.push_str(m.name);
    out.push(' ');
    out.push_str(&env.sym);
    out.push(LEGACY_SEP);
    out.push_str(itoa::Buffer::new().format(env.time()));
    out.push(LEGACY_SEP);
    out.push_str(&env.src);
    for tag in m.tags {
        out.push(LEGACY_SEP);
        // As v1 storage does (`sink::line`): an integer tag is stored as
        // its text, any other non-string is refused.
        match env.get(tag) {
            Some(Value::Str(s)) => {
                plain(tag, s)?;
                out.push_str(s);
            }
            Some(Value::Int(i)) => out.push_str(itoa::Buffer::new().format(*i)),
            Some(Value::Float(_) | Value::Num(_)) => {
                return Err(EncodeError::LegacyTagType {
                    key: tag.to_string(),
                    got: "float",
                })
            }
            Some(Value::Bool(_)) => {
                return Err(EncodeError::LegacyTagType {
                    key: tag.to_string(),
                    got: "boolean",
                })
            }
            None => {}
        }
    }
    for field in legacy_fields(m) {
        out.push(LEGACY_SEP);
        match env.get(field.name) {
            Some(Value::Float(f)) if !f.is_finite() => {
                return Err(EncodeError::NonFinite {
                    key: field.name.into(),
                    value: *f,
                })
            }
            Some(Value::Float(f)) => out.push_str(ryu::Buffer::new().format_finite(*f)),
            Some(Value::Int(i)) => out.push_str(itoa::Buffer::new().format(*i)),
            Some(Value::Bool(b)) => out.push_str(if *b { "true" } else { "false" }),
            Some(Value::Str(s)) | Some(Value::Num(s)) => {
                plain(field.name, s)?;
                out.push_str(s)
            }
            None => {}
        }
    }
    Ok(out)
}

fn legacy_fields(m: &Measurement) -> impl Iterator<Item = &'static schema::Field> {
    m.fields
        .iter()
        .filter(|f| f.name != "seq" && f.name != "epoch")
}

/// Decodes a legacy frame into an unsequenced envelope.
pub fn decode_legacy(frame: &[u8]) -> Result<Envelope<'_>, DecodeError> {
    if frame.is_empty() {
        return Err(DecodeError::Empty);
    }
    if frame.len() > MAX_FRAME {
        return Err(DecodeError::TooLarge(frame.len()));
    }
    let text = std::str::from_utf8(frame).map_err(|_| DecodeError::Legacy("not UTF-8".into()))?;
    let (name, rest) = text
        .split_once(' ')
        .ok_or_else(|| DecodeError::Legacy("no space after the measurement name".into()))?;
    let m = schema::by_name(name)
        .ok_or_else(|| DecodeError::Legacy(format!("unknown measurement {name:?}")))?;
    let mut parts = rest.split(LEGACY_SEP);
    let sym = parts.next().unwrap_or_default();
    let ts: i64 = parts
        .next()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| DecodeError::Legacy("second value must be the time in ns".into()))?;
    let src = parts.next().unwrap_or("legacy");
    let mut data: Fields<'_> = Vec::with_capacity(m.tags.len() + m.fields.len());
    for tag in m.tags {
        match parts.next() {
            Some("") | None => {}
            Some(v) => data.push((Cow::Borrowed(*tag), Value::Str(Cow::Borrowed(v)))),
        }
    }
    for field in legacy_fields(m) {
        let raw = match parts.next() {
            Some("") | None => continue,
            Some(v) => v,
        };
        let bad =
            || DecodeError::Legacy(format!("{}={raw:?} is not a {:?}", field.name, field.kind));
        let v = match field.kind {
            Kind::Float => Value::Float(raw.parse().map_err(|_| bad())?),
            Kind::Int => Value::Int(raw.parse().map_err(|_| bad())?),
            Kind::Bool => Value::Bool(raw.parse().map_err(|_| bad())?),
            Kind::Str => Value::Str(Cow::Borrowed(raw)),
        };
        data.push((Cow::Borrowed(field.name), v));
    }
    if parts.next().is_some() {
        return Err(DecodeError::Legacy(format!("more values than {name} has")));
    }
    Ok(Envelope {
        src: Cow::Borrowed(src),
        ch: Cow::Borrowed(m.channel),
        sym: Cow::Borrowed(sym),
        publisher: Cow::Borrowed(""),
        seq: 0,
        epoch: 0,
        ts,
        rx: now_ns(),
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f64_text(f: f64) -> String {
        let mut out = Vec::new();
        push_f64(&mut out, f);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn floats_are_short_exact_and_stay_floats() {
        for (f, text) in [
            (100.0, "100.0"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (42000.5, "42000.5"),
            (-1.25, "-1.25"),
            (0.1 + 0.2, "0.30000000000000004"),
            (1e-7, "0.0000001"),
            (123.456789, "123.456789"),
            (0.000001, "0.000001"),
            (-7.1, "-7.1"),
            (999_999_999.999999, "999999999.999999"),
            (123_456_789.5, "123456789.5"),
            (1e9, "1000000000.0"),
            (0.123456789, "0.123456789"),
            (1e300, "1e300"),
            (5e-324, "5e-324"),
        ] {
            assert_eq!(f64_text(f), text, "{f:e}");
        }
    }

    #[test]
    fn floats_read_back_exactly_as_json_numbers() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for i in 0..200_000 {
            let f = match i % 5 {
                // Prices and sizes as feeds round them.
                0 => (rng.gen_range(-1e6..1e6) * 1e6_f64).round() / 1e6,
                1 => (rng.gen_range(0.0..1e4) * 1e2_f64).round() / 1e2,
                // Large ones, up to where six decimals stop fitting in 15
                // digits.
                3 => (rng.gen_range(1e6..1e9) * 1e6_f64).round() / 1e6,
                // Anything at all.
                2 => f64::from_bits(rng.gen()),
                _ => rng.gen_range(-1e16..1e16),
            };
            if !f.is_finite() {
                continue;
            }
            let text = f64_text(f);
            let back: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert!(back.is_f64(), "{text} must read back as a float");
            // Exactness by a correctly rounded parser (serde_json's default
            // one is not, for some extreme values).
            assert_eq!(
                text.parse::<f64>().unwrap().to_bits(),
                f.to_bits(),
                "{text}"
            );
            // Where ryu writes a plain decimal, the same text.
            let mut r = ryu::Buffer::new();
            let ryu = r.format_finite(f);
            if !ryu.contains('e') {
                assert_eq!(text, ryu);
            }
        }
    }

    fn tick() -> Envelope<'static> {
        let mut e = Envelope::new(
            "kraken",
            "ticker",
            "BTC/USD",
            1_700_000_000_123_456_789,
            vec![
                ("bid".into(), Value::Float(42000.5)),
                ("ask".into(), Value::Float(42001.0)),
                ("last".into(), Value::Float(42000.9)),
            ],
        );
        e.seq = 7;
        e.epoch = 99;
        e.publisher = "kraken-tick".into();
        e
    }

    #[test]
    fn v1_round_trips_and_borrows() {
        let e = tick();
        let mut buf = Vec::new();
        encode_v1(&e, &mut buf).unwrap();
        let d = decode_v1(&buf).unwrap();
        assert_eq!(d.seq, 7);
        assert_eq!(d.publisher, "kraken-tick");
        // Floats come back as their exact text, and mean the same number.
        assert_eq!(d.get("bid"), Some(&Value::Num("42000.5".into())));
        for ((k1, v1), (k2, v2)) in d.data.iter().zip(&e.data) {
            assert_eq!((k1, v1.as_f64()), (k2, v2.as_f64()));
        }
        assert!(matches!(d.src, Cow::Borrowed(_)));
        assert_eq!(e.topic(), "kraken.ticker.BTC/USD");
    }

    #[test]
    fn scalars_keep_their_kind_and_text() {
        let body = br#"{"v":1,"src":"a","ch":"ticker","sym":"X","seq":1,"epoch":1,"data":{"i":-42,"f":1.50,"e":2E-7,"s":"q\"x","t":true,"b":false}}"#;
        let d = decode_v1(body).unwrap();
        assert_eq!(d.get("i"), Some(&Value::Int(-42)));
        assert_eq!(d.get("f"), Some(&Value::Num("1.50".into())));
        assert_eq!(d.get("e"), Some(&Value::Num("2E-7".into())));
        assert_eq!(d.get("s"), Some(&Value::Str("q\"x".into())));
        assert_eq!(
            (d.get("t"), d.get("b")),
            (Some(&Value::Bool(true)), Some(&Value::Bool(false)))
        );
        let big = br#"{"v":1,"src":"a","ch":"ticker","sym":"X","seq":1,"epoch":1,"data":{"i":99999999999999999999}}"#;
        assert!(decode_v1(big).is_err());
        let null =
            br#"{"v":1,"src":"a","ch":"ticker","sym":"X","seq":1,"epoch":1,"data":{"n":null}}"#;
        assert!(decode_v1(null).is_err());
    }

    #[test]
    fn v1_escapes_strings() {
        let mut e = tick();
        e.sym = "A\"B\\C\n".into();
        let mut buf = Vec::new();
        encode_v1(&e, &mut buf).unwrap();
        assert_eq!(decode_v1(&buf).unwrap().sym, "A\"B\\C\n");
    }

    #[test]
    fn v1_refuses_nan_and_bad_input() {
        let mut e = tick();
        e.data.push(("x".into(), Value::Float(f64::NAN)));
        assert!(encode_v1(&e, &mut Vec::new()).is_err());
        assert_eq!(decode_v1(b""), Err(DecodeError::Empty));
        assert!(matches!(decode_v1(b"{not json"), Err(DecodeError::Json(_))));
        let v2 = br#"{"v":2,"src":"a","ch":"b","sym":"c","seq":1,"epoch":1,"data":{}}"#;
        assert_eq!(decode_v1(v2), Err(DecodeError::Version(2)));
        let nested = br#"{"v":1,"src":"a","ch":"b","sym":"c","seq":1,"epoch":1,"data":{"x":[1]}}"#;
        assert!(matches!(decode_v1(nested), Err(DecodeError::Json(_))));
        let wrong = br#"{"v":1,"src":"a","ch":"b","sym":"c","seq":"1","epoch":1,"data":{}}"#;
        assert!(matches!(decode_v1(wrong), Err(DecodeError::Json(_))));
        assert!(matches!(
            decode_v1(&vec![b' '; MAX_FRAME + 1]),
            Err(DecodeError::TooLarge(_))
        ));
    }

    /// `seq` and `epoch` above `i64::MAX` are malformed in both decoders:
    /// InfluxDB cannot store them, and gap accounting would take the jump
    /// for 2^64 lost messages.
    #[test]
    fn sequence_numbers_above_i64_are_malformed() {
        let body = |seq: &str, epoch: &str| {
            format!(
                r#"{{"v":1,"src":"a","ch":"ticker","sym":"X","pub":"p","seq":{seq},"epoch":{epoch},"ts":1,"rx":2,"data":{{"bid":1.5}}}}"#
            )
        };
        let max = i64::MAX.to_string();
        let over = (i64::MAX as u64 + 1).to_string();
        let top = u64::MAX.to_string();
        let ok = body(&max, &max);
        assert_eq!(decode_v1(ok.as_bytes()).unwrap().seq, i64::MAX as u64);
        assert!(crate::canonical::decode(ok.as_bytes()).is_some());
        for b in [
            body(&over, "1"),
            body(&top, "1"),
            body("1", &over),
            body("1", &top),
        ] {
            assert!(crate::canonical::decode(b.as_bytes()).is_none(), "{b}");
            match decode_v1(b.as_bytes()) {
                Err(DecodeError::Json(e)) => assert!(e.contains("largest integer"), "{e}"),
                other => panic!("{b}: {other:?}"),
            }
        }
    }

    #[test]
    fn legacy_round_trips() {
        let e = tick();
        let text = encode_legacy(&e).unwrap();
        assert!(text.starts_with("kraken_tick BTC/USD\x01"));
        let d = decode_legacy(text.as_bytes()).unwrap();
        assert_eq!(d.ts, e.ts);
        assert_eq!(d.src, "kraken");
        assert_eq!(d.get("bid"), Some(&Value::Float(42000.5)));
        assert_eq!(d.seq, 0);
        assert!(decode_legacy(b"kraken_tick BTC\x01notanumber").is_err());
        assert!(decode_legacy(b"nosuch x\x011").is_err());
    }

    /// The legacy frame has no escape: a value holding its separator is
    /// refused (the decoder would refuse the frame), never sent.
    #[test]
    fn legacy_refuses_values_holding_its_separator() {
        let mut sym = tick();
        sym.sym = "BTC\x01USD".into();
        let mut src = tick();
        src.src = "kra\x01ken".into();
        let mut field = tick();
        field.data[0].1 = Value::Str("1\x012".into());
        let tag = Envelope::new(
            "kraken",
            "trade",
            "BTC/USD",
            1_700_000_000_000_000_000,
            vec![
                ("side".into(), Value::Str("buy\x01".into())),
                ("price".into(), Value::Float(1.5)),
            ],
        );
        for (e, key) in [
            (sym, "the instrument"),
            (src, "the source"),
            (field, "bid"),
            (tag, "side"),
        ] {
            assert_eq!(
                encode_legacy(&e),
                Err(EncodeError::LegacySeparator(key.into()))
            );
        }
    }

    /// Tags as v1 storage (`sink::line`) writes them: an integer as its
    /// text, which the decoder reads back as that string; a float or a
    /// boolean is refused, not silently left out.
    #[test]
    fn legacy_writes_an_integer_tag_as_its_text_and_refuses_other_numbers() {
        let odds = |id: Value<'static>| {
            Envelope::new(
                "betfair",
                "odds",
                "1.23",
                1_700_000_000_000_000_000,
                vec![
                    ("selection_id".into(), id),
                    ("back1".into(), Value::Float(2.5)),
                ],
            )
        };
        let text = encode_legacy(&odds(Value::Int(12345))).unwrap();
        let d = decode_legacy(text.as_bytes()).unwrap();
        assert_eq!(d.get("selection_id"), Some(&Value::Str("12345".into())));
        assert_eq!(d.get("back1"), Some(&Value::Float(2.5)));
        for (v, got) in [
            (Value::Float(1.5), "float"),
            (Value::Num("1.5".into()), "float"),
            (Value::Bool(true), "boolean"),
        ] {
            assert_eq!(
                encode_legacy(&odds(v)),
                Err(EncodeError::LegacyTagType {
                    key: "selection_id".into(),
                    got
                })
            );
        }
    }
}
