//! One pair's local order book, kept in Kraken's own decimal text.
//!
//! Kraken's CRC32 checksum is computed over the price and quantity strings
//! exactly as they went on the wire ("45283.5", "0.10000000"), so a level
//! keeps its text; a number parsed into `f64` and printed back could differ
//! (trailing zeros, shortest round-trip form) and the checksum would fail on
//! a book that is in fact right. Ordering uses an exact fixed-point key
//! parsed from the same text, never a float.
//!
//! Each side is a vector sorted best first, so the top ten that the checksum
//! and the published levels need are a slice, an insert near the touch moves
//! only what lies behind it, and keeping the subscribed depth is a truncate.

use std::cmp::Ordering;
use std::fmt;

/// Longest decimal text a level may carry. Kraken sends at most a few dozen
/// significant digits; anything longer is refused as malformed.
pub const MAX_TEXT: usize = 31;
/// Decimal places of the ordering key. Kraken prices have far fewer.
const KEY_SCALE: u32 = 18;
/// Integer digits the key has room for next to `KEY_SCALE` decimals in a u128.
const KEY_INT_DIGITS: usize = 20;
/// Kraken's checksum covers the top ten levels of each side, whatever the depth.
pub const CHECKSUM_LEVELS: usize = 10;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecError {
    #[error("{0:?} is not a plain non-negative decimal")]
    Syntax(String),
    #[error("{0:?} has more digits than a price level may carry")]
    TooLong(String),
}

/// A non-negative decimal exactly as Kraken sent it.
#[derive(Clone, Copy)]
pub struct Dec {
    len: u8,
    buf: [u8; MAX_TEXT],
}

impl Dec {
    /// Accepts `digits[.digits]` only: no sign, no exponent, no blanks.
    /// Returns the text and its exact fixed-point value (18 decimals).
    pub fn parse(text: &str) -> Result<(Dec, u128), DecError> {
        let b = text.as_bytes();
        if b.len() > MAX_TEXT {
            return Err(DecError::TooLong(text.into()));
        }
        let mut int: u128 = 0;
        let mut frac: u128 = 0;
        let mut int_digits = 0usize;
        let mut frac_digits = 0u32;
        let mut dot = false;
        for &c in b {
            match c {
                b'0'..=b'9' => {
                    let d = (c - b'0') as u128;
                    if dot {
                        frac_digits += 1;
                        if frac_digits > KEY_SCALE {
                            return Err(DecError::TooLong(text.into()));
                        }
                        frac = frac * 10 + d;
                    } else {
                        int_digits += 1;
                        if int_digits > KEY_INT_DIGITS {
                            return Err(DecError::TooLong(text.into()));
                        }
                        int = int * 10 + d;
                    }
                }
                b'.' if !dot && int_digits > 0 => dot = true,
                _ => return Err(DecError::Syntax(text.into())),
            }
        }
        if int_digits == 0 || (dot && frac_digits == 0) {
            return Err(DecError::Syntax(text.into()));
        }
        let key = int * 10u128.pow(KEY_SCALE) + frac * 10u128.pow(KEY_SCALE - frac_digits);
        let mut buf = [0u8; MAX_TEXT];
        buf[..b.len()].copy_from_slice(b);
        Ok((
            Dec {
                len: b.len() as u8,
                buf,
            },
            key,
        ))
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII digits and '.' were ever stored.
        std::str::from_utf8(&self.buf[..self.len as usize]).unwrap_or("")
    }

    /// The nearest `f64` (correctly rounded from the text), for publishing.
    pub fn to_f64(&self) -> f64 {
        self.as_str().parse().unwrap_or(f64::NAN)
    }

    /// Kraken's checksum form: the text without its '.' and leading zeros
    /// ("0.00100000" → "100000").
    #[inline]
    fn push_checksum_form(&self, out: &mut [u8], n: &mut usize) {
        let text = &self.buf[..self.len as usize];
        let mut i = 0;
        while i < text.len() && (text[i] == b'0' || text[i] == b'.') {
            i += 1;
        }
        for &c in &text[i..] {
            if c != b'.' {
                out[*n] = c;
                *n += 1;
            }
        }
    }
}

impl fmt::Debug for Dec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_str())
    }
}

impl PartialEq for Dec {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

/// One price level: its exact ordering key and the two texts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Level {
    pub key: u128,
    pub price: Dec,
    pub qty: Dec,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Bid,
    Ask,
}

#[derive(Clone, Debug)]
pub struct Book {
    depth: usize,
    /// Highest price first.
    bids: Vec<Level>,
    /// Lowest price first.
    asks: Vec<Level>,
}

impl Book {
    pub fn new(depth: usize) -> Book {
        Book {
            depth: depth.max(1),
            bids: Vec::with_capacity(depth + 16),
            asks: Vec::with_capacity(depth + 16),
        }
    }

    pub fn depth(&self) -> usize {
        self.depth
    }

    pub fn clear(&mut self) {
        self.bids.clear();
        self.asks.clear();
    }

    pub fn bids(&self) -> &[Level] {
        &self.bids
    }

    pub fn asks(&self) -> &[Level] {
        &self.asks
    }

    /// Sets one level; a zero quantity removes it. Levels beyond the depth
    /// stay until [`Book::truncate`], because a later entry of the same
    /// message may delete a better level and bring them back into scope.
    pub fn set(&mut self, side: Side, price: &str, qty: &str) -> Result<(), DecError> {
        let (price, key) = Dec::parse(price)?;
        let (qty, qty_key) = Dec::parse(qty)?;
        let levels = match side {
            Side::Bid => &mut self.bids,
            Side::Ask => &mut self.asks,
        };
        let found = match side {
            // Best first: bids descend, asks ascend.
            Side::Bid => levels.binary_search_by(|l| key.cmp(&l.key)),
            Side::Ask => levels.binary_search_by(|l| l.key.cmp(&key)),
        };
        match (found, qty_key == 0) {
            (Ok(i), true) => {
                levels.remove(i);
            }
            (Ok(i), false) => {
                levels[i].price = price;
                levels[i].qty = qty;
            }
            // Deleting a level this book does not hold (it fell out of
            // scope earlier) is a no-op, as Kraken's guide implies.
            (Err(_), true) => {}
            (Err(i), false) => levels.insert(i, Level { key, price, qty }),
        }
        Ok(())
    }

    /// Keeps the subscribed depth: Kraken sends no deletes for levels that
    /// fall out of scope.
    pub fn truncate(&mut self) {
        self.bids.truncate(self.depth);
        self.asks.truncate(self.depth);
    }

    /// Kraken's CRC32 over the top ten asks (low to high) then the top ten
    /// bids (high to low), each level as price then quantity in checksum form.
    pub fn checksum(&self) -> u32 {
        let mut buf = [0u8; 4 * CHECKSUM_LEVELS * MAX_TEXT];
        let mut n = 0;
        for l in self.asks.iter().take(CHECKSUM_LEVELS) {
            l.price.push_checksum_form(&mut buf, &mut n);
            l.qty.push_checksum_form(&mut buf, &mut n);
        }
        for l in self.bids.iter().take(CHECKSUM_LEVELS) {
            l.price.push_checksum_form(&mut buf, &mut n);
            l.qty.push_checksum_form(&mut buf, &mut n);
        }
        crc32fast::hash(&buf[..n])
    }

    /// Best ask minus best bid, exactly, then rounded once to f64.
    pub fn spread(&self) -> Option<f64> {
        let (b, a) = (self.bids.first()?, self.asks.first()?);
        Some(match a.key.cmp(&b.key) {
            Ordering::Less => -fixed_to_f64(b.key - a.key, KEY_SCALE),
            _ => fixed_to_f64(a.key - b.key, KEY_SCALE),
        })
    }

    /// Midpoint of best bid and ask, exactly, then rounded once to f64.
    pub fn mid(&self) -> Option<f64> {
        let (b, a) = (self.bids.first()?, self.asks.first()?);
        // (a + b) / 2 = (a + b) * 5 / 10: one more decimal keeps it exact.
        match b.key.checked_add(a.key).and_then(|s| s.checked_mul(5)) {
            Some(v) => Some(fixed_to_f64(v, KEY_SCALE + 1)),
            None => Some((b.price.to_f64() + a.price.to_f64()) / 2.0),
        }
    }
}

/// `v / 10^scale` as the nearest f64, via its decimal text.
fn fixed_to_f64(v: u128, scale: u32) -> f64 {
    let mut ib = itoa::Buffer::new();
    let digits = ib.format(v).as_bytes();
    let scale = scale as usize;
    let mut text = [0u8; 64];
    let n;
    if digits.len() <= scale {
        text[..2].copy_from_slice(b"0.");
        let zeros = scale - digits.len();
        text[2..2 + zeros].fill(b'0');
        text[2 + zeros..2 + scale].copy_from_slice(digits);
        n = 2 + scale;
    } else {
        let int = digits.len() - scale;
        text[..int].copy_from_slice(&digits[..int]);
        text[int] = b'.';
        text[int + 1..digits.len() + 1].copy_from_slice(&digits[int..]);
        n = digits.len() + 1;
    }
    std::str::from_utf8(&text[..n])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kraken's "Book checksum (WebSocket v2)" guide, worked example: the
    /// BTC/USD snapshot whose checksum the guide gives as 3310070434.
    pub(crate) const GUIDE_BIDS: [(&str, &str); 10] = [
        ("45283.5", "0.10000000"),
        ("45283.4", "1.54582015"),
        ("45282.1", "0.10000000"),
        ("45281.0", "0.10000000"),
        ("45280.3", "1.54592586"),
        ("45279.0", "0.07990000"),
        ("45277.6", "0.03310103"),
        ("45277.5", "0.30000000"),
        ("45277.3", "1.54602737"),
        ("45276.6", "0.15445238"),
    ];
    pub(crate) const GUIDE_ASKS: [(&str, &str); 10] = [
        ("45285.2", "0.00100000"),
        ("45286.4", "1.54571953"),
        ("45286.6", "1.54571109"),
        ("45289.6", "1.54560911"),
        ("45290.2", "0.15890660"),
        ("45291.8", "1.54553491"),
        ("45294.7", "0.04454749"),
        ("45296.1", "0.35380000"),
        ("45297.5", "0.09945542"),
        ("45299.5", "0.18772827"),
    ];

    fn guide_book(depth: usize) -> Book {
        let mut b = Book::new(depth);
        for (p, q) in GUIDE_BIDS {
            b.set(Side::Bid, p, q).unwrap();
        }
        for (p, q) in GUIDE_ASKS {
            b.set(Side::Ask, p, q).unwrap();
        }
        b.truncate();
        b
    }

    #[test]
    fn guide_example_checksum() {
        assert_eq!(guide_book(10).checksum(), 3310070434);
    }

    #[test]
    fn insertion_order_does_not_matter() {
        let mut b = Book::new(10);
        for (p, q) in GUIDE_BIDS.iter().rev() {
            b.set(Side::Bid, p, q).unwrap();
        }
        for (p, q) in GUIDE_ASKS.iter().rev() {
            b.set(Side::Ask, p, q).unwrap();
        }
        assert_eq!(b.checksum(), 3310070434);
        assert_eq!(b.bids()[0].price.as_str(), "45283.5");
        assert_eq!(b.asks()[0].price.as_str(), "45285.2");
    }

    #[test]
    fn text_is_kept_not_reformatted() {
        // 0.10000000 as an f64 prints "0.1"; the checksum needs "10000000".
        let mut a = guide_book(10);
        a.set(Side::Bid, "45283.5", "0.1").unwrap();
        assert_ne!(a.checksum(), 3310070434);
        a.set(Side::Bid, "45283.5", "0.10000000").unwrap();
        assert_eq!(a.checksum(), 3310070434);
    }

    #[test]
    fn update_delete_and_truncate() {
        let mut b = guide_book(10);
        // A new best bid pushes the worst bid out of depth 10.
        b.set(Side::Bid, "45284.0", "2.00000000").unwrap();
        assert_eq!(b.bids().len(), 11);
        b.truncate();
        assert_eq!(b.bids().len(), 10);
        assert_eq!(b.bids()[0].price.as_str(), "45284.0");
        assert_eq!(b.bids()[9].price.as_str(), "45277.3");
        // Zero (in any spelling) deletes; deleting an absent level is a no-op.
        b.set(Side::Bid, "45284.0", "0.00000000").unwrap();
        b.set(Side::Ask, "1.0", "0").unwrap();
        assert_eq!(b.bids()[0].price.as_str(), "45283.5");
        assert_eq!(b.bids().len(), 9);
        assert_eq!(b.asks().len(), 10);
        // Same price in another spelling is the same level.
        b.set(Side::Ask, "45285.20", "0.5").unwrap();
        assert_eq!(b.asks().len(), 10);
        assert_eq!(b.asks()[0].qty.as_str(), "0.5");
        assert_eq!(b.asks()[0].price.as_str(), "45285.20");
    }

    #[test]
    fn a_level_beyond_depth_returns_when_a_better_one_goes_in_the_same_message() {
        let mut b = guide_book(10);
        b.set(Side::Ask, "45300.0", "1.00000000").unwrap(); // 11th ask
        b.set(Side::Ask, "45285.2", "0").unwrap(); // best ask removed
        b.truncate();
        assert_eq!(b.asks().len(), 10);
        assert_eq!(b.asks()[9].price.as_str(), "45300.0");
    }

    #[test]
    fn refuses_what_is_not_a_plain_decimal() {
        for bad in ["", ".5", "5.", "-1.0", "1e-8", "1.2.3", " 1", "NaN", "0x10"] {
            assert!(Dec::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Dec::parse(&"9".repeat(40)).is_err());
        assert!(Dec::parse("0.0000000000000000001").is_err());
        let mut b = Book::new(10);
        assert!(b.set(Side::Bid, "1.0", "abc").is_err());
        assert!(b.bids().is_empty());
    }

    #[test]
    fn exact_mid_and_spread() {
        let b = guide_book(10);
        assert_eq!(b.spread(), Some(1.7));
        assert_eq!(b.mid(), Some(45284.35));
        let mut c = Book::new(10);
        c.set(Side::Bid, "0.5666", "1").unwrap();
        c.set(Side::Ask, "0.5668", "1").unwrap();
        assert_eq!(c.spread(), Some(0.0002));
        assert_eq!(c.mid(), Some(0.5667));
        c.clear();
        assert_eq!(c.mid(), None);
    }

    #[test]
    fn fixed_point_to_float() {
        assert_eq!(fixed_to_f64(5, 1), 0.5);
        assert_eq!(fixed_to_f64(123, 5), 0.00123);
        assert_eq!(fixed_to_f64(1234500, 2), 12345.0);
    }
}
