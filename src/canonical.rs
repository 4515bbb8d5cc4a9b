//! A fast path for decoding envelopes in exactly the form [`crate::wire::encode_v1`]
//! writes them: fixed key order, no whitespace, no escapes. It is a third of
//! the cost of a general JSON parse, and the subscriber decodes every message.
//!
//! It accepts only what it fully understands and returns `None` for anything
//! else — other key orders, whitespace, escapes, unknown fields, odd numbers —
//! and the caller then runs the general parser (serde_json), which decides.
//! So it can be fast without being a second, laxer JSON parser: a
//! differential test checks it agrees with serde_json wherever it answers.

use std::borrow::Cow;

use crate::wire::{Envelope, Fields, Value};

struct Cur<'a> {
    /// The whole body, checked as UTF-8 once; every slice taken ends at an
    /// ASCII delimiter, so it is a char boundary.
    text: &'a str,
    b: &'a [u8],
    i: usize,
}

impl<'a> Cur<'a> {
    fn lit(&mut self, s: &[u8]) -> Option<()> {
        if same(self.b.get(self.i..self.i + s.len())?, s) {
            self.i += s.len();
            Some(())
        } else {
            None
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    /// A string without escapes or control characters, as its byte range.
    fn span(&mut self) -> Option<(usize, usize)> {
        self.lit(b"\"")?;
        let start = self.i;
        loop {
            match *self.b.get(self.i)? {
                b'"' => break,
                b'\\' => return None,
                c if c < 0x20 => return None,
                _ => self.i += 1,
            }
        }
        let end = self.i;
        self.i += 1;
        Some((start, end))
    }

    /// A string without escapes or control characters.
    fn string(&mut self) -> Option<&'a str> {
        let (s, e) = self.span()?;
        self.text.get(s..e)
    }

    /// Skips a run of ASCII digits, eight bytes at a time where there are
    /// eight (a byte at a time was the largest part of the subscriber's
    /// per-message cost), and returns its length.
    fn digits(&mut self) -> usize {
        let start = self.i;
        while let Some(w) = word(self.b, self.i) {
            let n = digit_run(w);
            self.i += n;
            if n < 8 {
                return self.i - start;
            }
        }
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
        self.i - start
    }

    /// A JSON number's text: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?
    /// and whether it is an integer.
    fn number(&mut self) -> Option<(&'a str, bool)> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        let first = self.peek()?;
        let n = self.digits();
        if n == 0 || (first == b'0' && n > 1) {
            return None;
        }
        let mut integer = true;
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return None;
            }
            integer = false;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            // Huge exponents are left to the general parser.
            if !(1..=3).contains(&self.digits()) {
                return None;
            }
            integer = false;
        }
        Some((self.text.get(start..self.i)?, integer))
    }

    /// An unsigned JSON integer. The header's four integers (two of them
    /// 19 digits long) are read for every message, so the run is found and
    /// valued eight digits at a time rather than digit by digit.
    /// `None` for a fraction, an exponent, a sign or more than `u64` holds.
    fn uint(&mut self) -> Option<u64> {
        let start = self.i;
        let n = self.digits();
        if n == 0 || (self.b[start] == b'0' && n > 1) || n > 20 {
            return None;
        }
        if matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        // The leading digits one by one, the rest eight at a time.
        let digits = &self.b[start..self.i];
        let (head, eights) = digits.split_at(n % 8);
        let mut v = head.iter().fold(0u64, |v, d| v * 10 + u64::from(d - b'0'));
        for chunk in eights.chunks_exact(8) {
            let w = u64::from_le_bytes(chunk.try_into().ok()?);
            v = v.checked_mul(100_000_000)?.checked_add(eight_digits(w))?;
        }
        Some(v)
    }

    fn int(&mut self) -> Option<i64> {
        if self.peek() == Some(b'-') {
            self.i += 1;
            let v = self.uint()?;
            return 0i64.checked_sub_unsigned(v);
        }
        i64::try_from(self.uint()?).ok()
    }

    fn raw(&mut self) -> Option<Raw<'a>> {
        match self.peek()? {
            b'"' => self.string().map(Raw::Str),
            b't' => self.lit(b"true").map(|_| Raw::Bool(true)),
            b'f' => self.lit(b"false").map(|_| Raw::Bool(false)),
            _ => self.number().map(|(t, int)| Raw::Num(t, int)),
        }
    }
}

/// The eight bytes at `i`, as a little-endian word (the first byte lowest).
#[inline]
fn word(b: &[u8], i: usize) -> Option<u64> {
    b.get(i..)?
        .first_chunk::<8>()
        .map(|w| u64::from_le_bytes(*w))
}

/// How many of a word's bytes, first byte first, are ASCII digits (0 to 8).
#[inline]
fn digit_run(w: u64) -> usize {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Per byte, on its low seven bits (so no sum carries into the next
    // byte): the high bit of `low + 0x50` says >= b'0', of `low + 0x46`
    // says > b'9'; a byte with its own high bit set is no digit.
    let low = w & !HIGH;
    let from_0 = low.wrapping_add(0x5050_5050_5050_5050);
    let past_9 = low.wrapping_add(0x4646_4646_4646_4646);
    let digit = from_0 & !past_9 & !w & HIGH;
    ((!digit & HIGH).trailing_zeros() / 8) as usize
}

/// The value of eight ASCII digits in a little-endian word: pairs, then
/// quads, then the eight, by three multiplications (simdjson's method).
#[inline]
fn eight_digits(w: u64) -> u64 {
    let w = (w & 0x0F0F_0F0F_0F0F_0F0F).wrapping_mul(2561) >> 8;
    let w = (w & 0x00FF_00FF_00FF_00FF).wrapping_mul(6_553_601) >> 16;
    (w & 0x0000_FFFF_0000_FFFF).wrapping_mul(42_949_672_960_001) >> 32
}

/// `a == b` for slices of the same length, without a `memcmp` call for
/// the short ones (keys such as `,"bid_qty":`, compared for every member
/// of every message): two overlapping word loads each.
#[inline]
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    fn words<const N: usize>(a: &[u8], b: &[u8]) -> Option<bool> {
        Some(
            a.first_chunk::<N>()? == b.first_chunk::<N>()?
                && a.last_chunk::<N>()? == b.last_chunk::<N>()?,
        )
    }
    if a.len() != b.len() {
        return false;
    }
    match a.len() {
        8..=16 => words::<8>(a, b),
        4..=7 => words::<4>(a, b),
        _ => None,
    }
    .unwrap_or_else(|| a == b)
}

/// The envelope's members before `data`, borrowed from the body.
#[derive(Debug, Clone, PartialEq)]
pub struct Header<'a> {
    pub src: &'a str,
    pub ch: &'a str,
    pub sym: &'a str,
    pub publisher: &'a str,
    pub seq: u64,
    pub epoch: u64,
    pub ts: i64,
    pub rx: i64,
}

impl Header<'_> {
    /// The time a point is stored at (as [`Envelope::time`]).
    pub fn time(&self) -> i64 {
        crate::wire::point_time(self.ts, self.rx)
    }
}

/// One `data` value as written: a string (it has no escapes), a boolean,
/// or a number's text and whether it is an integer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Raw<'a> {
    Str(&'a str),
    Bool(bool),
    Num(&'a str, bool),
}

/// Where the header's strings lie in a body, and where they end (at
/// `,"seq":`). Bodies from one publisher, channel and instrument share
/// these bytes, so the subscriber learns them once
/// (`LineEncoder`'s shapes) and reads only the rest with [`parse_known`].
#[derive(Debug, Clone, PartialEq)]
pub struct Prefix {
    pub len: usize,
    src: (usize, usize),
    ch: (usize, usize),
    sym: (usize, usize),
    publisher: Option<(usize, usize)>,
}

/// A canonical body, read as far as the first `data` member; the members
/// follow from [`Body::member`]. The subscriber writes line protocol from
/// them directly (`LineEncoder::encode_canonical`), without an
/// [`Envelope`] in between.
pub struct Body<'a> {
    pub head: Header<'a>,
    pub prefix: Prefix,
    cur: Cur<'a>,
    first: bool,
}

/// The body as text. Checked whole, once per message, with SIMD: std's
/// check was 4% of the subscriber's instructions per message.
#[inline]
fn utf8(body: &[u8]) -> Option<&str> {
    simdutf8::basic::from_utf8(body).ok()
}

/// Not in canonical form (ask serde_json).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NotCanonical;

/// Reads the header of `body` if it is in canonical form.
pub fn parse(body: &[u8]) -> Option<Body<'_>> {
    let text = utf8(body)?;
    let mut c = Cur {
        text,
        b: body,
        i: 0,
    };
    c.lit(b"{\"v\":1,\"src\":")?;
    let src = c.span()?;
    c.lit(b",\"ch\":")?;
    let ch = c.span()?;
    c.lit(b",\"sym\":")?;
    let sym = c.span()?;
    let publisher = if c.lit(b",\"pub\":").is_some() {
        Some(c.span()?)
    } else {
        None
    };
    let prefix = Prefix {
        len: c.i,
        src,
        ch,
        sym,
        publisher,
    };
    rest(c, prefix)
}

/// Reads the header of `body`, whose first `prefix.len` bytes are those of
/// a body [`parse`] read before and gave `prefix` for; the caller has
/// compared them. Only the rest is read: the sequence, times and the start
/// of `data`.
pub fn parse_known<'a>(body: &'a [u8], prefix: &Prefix) -> Option<Body<'a>> {
    let text = utf8(body)?;
    let c = Cur {
        text,
        b: body,
        i: prefix.len,
    };
    rest(c, prefix.clone())
}

/// The header after its strings, from `,"seq":` to the start of `data`.
fn rest(mut c: Cur<'_>, prefix: Prefix) -> Option<Body<'_>> {
    c.lit(b",\"seq\":")?;
    let seq = crate::wire::sequence_number(c.uint()?)?;
    c.lit(b",\"epoch\":")?;
    let epoch = crate::wire::sequence_number(c.uint()?)?;
    c.lit(b",\"ts\":")?;
    let ts = c.int()?;
    c.lit(b",\"rx\":")?;
    let rx = c.int()?;
    c.lit(b",\"data\":{")?;
    let text = c.text;
    let at = |(s, e): (usize, usize)| text.get(s..e);
    Some(Body {
        head: Header {
            src: at(prefix.src)?,
            ch: at(prefix.ch)?,
            sym: at(prefix.sym)?,
            publisher: match prefix.publisher {
                Some(r) => at(r)?,
                None => "",
            },
            seq,
            epoch,
            ts,
            rx,
        },
        prefix,
        cur: c,
        first: true,
    })
}

impl<'a> Body<'a> {
    /// The next `data` member; `Ok(None)` once the body has ended exactly
    /// where it should.
    pub fn member(&mut self) -> Result<Option<(&'a str, Raw<'a>)>, NotCanonical> {
        let c = &mut self.cur;
        let more = match c.peek() {
            Some(b'}') => false,
            Some(b',') if !self.first => {
                c.i += 1;
                true
            }
            Some(_) if self.first => true,
            _ => return Err(NotCanonical),
        };
        self.first = false;
        if !more {
            c.lit(b"}}").ok_or(NotCanonical)?;
            return if c.i == c.b.len() {
                Ok(None)
            } else {
                Err(NotCanonical)
            };
        }
        let k = c.string().ok_or(NotCanonical)?;
        c.lit(b":").ok_or(NotCanonical)?;
        let v = c.raw().ok_or(NotCanonical)?;
        Ok(Some((k, v)))
    }

    /// The next `data` member, if it is written as `key` (`"bid":` first,
    /// `,"bid":` after): for a body whose members are expected in a known
    /// order. With the value, the body from the value on, so that a short
    /// value can be copied as a fixed-size window (see `put_value`).
    #[inline]
    pub fn member_is(&mut self, key: &[u8]) -> Option<(Raw<'a>, &'a [u8])> {
        let c = &mut self.cur;
        if (key.first() == Some(&b',')) == self.first {
            return None;
        }
        self.first = false;
        c.lit(key)?;
        let rest = c.b.get(c.i..)?;
        Some((c.raw()?, rest))
    }

    /// The body ends here, exactly.
    pub fn end(&mut self) -> Option<()> {
        let c = &mut self.cur;
        c.lit(b"}}")?;
        (c.i == c.b.len()).then_some(())
    }
}

/// Decodes `body` if it is in canonical form; `None` means "ask serde_json".
pub fn decode(body: &[u8]) -> Option<Envelope<'_>> {
    let mut b = parse(body)?;
    let mut data: Fields<'_> = Vec::with_capacity(16);
    while let Some((k, v)) = b.member().ok()? {
        let v = match v {
            Raw::Str(s) => Value::Str(Cow::Borrowed(s)),
            Raw::Bool(b) => Value::Bool(b),
            Raw::Num(t, true) => Value::Int(t.parse().ok()?),
            Raw::Num(t, false) => Value::Num(Cow::Borrowed(t)),
        };
        data.push((Cow::Borrowed(k), v));
    }
    let h = b.head;
    Some(Envelope {
        src: Cow::Borrowed(h.src),
        ch: Cow::Borrowed(h.ch),
        sym: Cow::Borrowed(h.sym),
        publisher: Cow::Borrowed(h.publisher),
        seq: h.seq,
        epoch: h.epoch,
        ts: h.ts,
        rx: h.rx,
        data,
    })
}

/// Random damage for the differential tests (here and in the line
/// encoder's): a changed byte, a cut or an inserted space, from a seeded
/// xorshift so a failure reproduces.
#[cfg(test)]
pub(crate) struct Damage(u64);

#[cfg(test)]
impl Damage {
    pub(crate) fn new(seed: u64) -> Self {
        Damage(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// `body` with one random change.
    pub(crate) fn apply(&mut self, body: &[u8]) -> Vec<u8> {
        let mut m = body.to_vec();
        let at = (self.next() as usize) % m.len();
        match self.next() % 3 {
            0 => m[at] = b" \"{}:,.-eE0123456789tfnx\\\x01\xff"[(self.next() % 24) as usize],
            1 => m.truncate(at),
            _ => m.insert(at, b' '),
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{decode_v1_general, encode_v1};

    #[test]
    fn same_is_slice_equality_at_every_length_and_position() {
        for len in 0..=40usize {
            let a: Vec<u8> = (0..len as u8).map(|i| b'a' + i % 26).collect();
            assert!(same(&a, &a.clone()), "len {len}");
            for at in 0..len {
                let mut b = a.clone();
                b[at] ^= 0x20;
                assert!(!same(&a, &b), "len {len}, byte {at} differs");
            }
            let mut longer = a.clone();
            longer.push(b'z');
            assert!(!same(&a, &longer) && !same(&longer, &a), "len {len}");
        }
    }

    #[test]
    fn digit_words_read_what_a_byte_loop_reads() {
        // Every byte value after every run length, and runs cut by the end.
        for len in 0..=8usize {
            for next in 0..=255u8 {
                let mut b = b"12345678".to_vec();
                b.truncate(len);
                b.push(next);
                b.resize(8, b'7');
                let w = word(&b, 0).unwrap();
                let want = b.iter().take_while(|c| c.is_ascii_digit()).count();
                assert_eq!(digit_run(w), want, "{b:?}");
            }
        }
        for v in [0u64, 7, 12_345_678, 98_765_432, 99_999_999] {
            let t = format!("{v:08}");
            assert_eq!(eight_digits(word(t.as_bytes(), 0).unwrap()), v);
        }
        let uint = |t: &str| {
            let mut c = Cur {
                text: t,
                b: t.as_bytes(),
                i: 0,
            };
            c.uint().map(|v| (v, c.i))
        };
        let max = u64::MAX.to_string();
        for n in 1..=20 {
            let t = &max[..n];
            assert_eq!(uint(t), Some((t.parse().unwrap(), n)), "{t}");
            let t = format!("{t},\"x\":1}}");
            assert_eq!(uint(&t), Some((max[..n].parse().unwrap(), n)), "{t}");
        }
        assert_eq!(uint("18446744073709551616"), None, "u64::MAX + 1");
        assert_eq!(uint("99999999999999999999"), None);
        assert_eq!(uint("184467440737095516150"), None, "21 digits");
        assert_eq!(uint("0"), Some((0, 1)));
        assert_eq!(uint("012"), None);
        assert_eq!(uint("12.5"), None);
        assert_eq!(uint("12e3"), None);
        assert_eq!(uint(""), None);
        assert_eq!(uint("x"), None);
    }

    /// Wherever the fast path answers, it answers what serde_json answers;
    /// and it answers for everything our own encoder writes.
    #[test]
    fn agrees_with_serde_json_on_encoded_and_mutated_input() {
        let mut gen = crate::feeds::synthetic::Generator::new(3, &[]);
        let mut damage = Damage::new(0x2545F4914F6CDD1D);
        let (mut answered, mut declined) = (0, 0);
        for i in 0..3000u64 {
            let mut e = gen.next_message();
            e.seq = i + 1;
            e.epoch = 77;
            e.publisher = if i % 3 == 0 { "".into() } else { "p-1".into() };
            if i % 7 == 0 {
                e.data
                    .push(("note".into(), Value::Str("a \"quoted\" \\ word\n".into())));
            }
            if i % 11 == 0 {
                e.data.push(("n".into(), Value::Int(-(i as i64))));
            }
            let mut buf = Vec::new();
            encode_v1(&e, &mut buf).unwrap();
            let general = decode_v1_general(&buf).unwrap();
            match decode(&buf) {
                Some(fast) => assert_eq!(fast, general),
                None => assert!(
                    i % 7 == 0,
                    "declined canonical input: {}",
                    String::from_utf8_lossy(&buf)
                ),
            }
            for _ in 0..8 {
                let m = damage.apply(&buf);
                match (decode(&m), decode_v1_general(&m)) {
                    (Some(fast), Ok(general)) => {
                        answered += 1;
                        assert_eq!(fast, general, "{}", String::from_utf8_lossy(&m));
                    }
                    (Some(fast), Err(e)) => panic!(
                        "fast path accepted what serde_json rejects ({e}): {} -> {fast:?}",
                        String::from_utf8_lossy(&m)
                    ),
                    (None, _) => declined += 1,
                }
            }
        }
        assert!(
            answered > 100 && declined > 100,
            "{answered} answered, {declined} declined"
        );
    }
}
