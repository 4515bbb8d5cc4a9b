//! The publisher's v1 body encoder: [`crate::wire::encode_v1`]'s bytes,
//! with the parts that repeat written from what it learned.
//!
//! A publisher sends one layout per channel: the same source and channel,
//! the same data keys in the same order, message after message. Escaping
//! and framing those strings again for every message (a check per byte, a
//! quote, a colon, a comma, a copy each) was a third of the publisher's
//! instructions per message. Here each channel keeps a [`Layout`]:
//!
//! - `{"v":1,"src":…,"ch":…,"sym":` as one run of bytes;
//! - `,"pub":…,"seq":` for the publisher it last saw;
//! - per data position, the key it last saw there and its `,"key":`.
//!
//! What is reused is checked first: a key is compared as bytes (a pointer
//! cannot be trusted, a borrowed key's memory may hold another key later),
//! and a key that differs is written the general way and remembered in its
//! place, so a layout that changes costs what the general encoder costs,
//! never more, and the bytes are always `encode_v1`'s (see the tests).

use std::collections::HashMap;

use crate::canonical::same;
use crate::wire::{
    json_str, put_counters, put_data_value, put_head, put_key, put_publisher, EncodeError,
    Envelope, Snippet,
};

/// Channels remembered; a publisher has a handful. One that sends more
/// starts over rather than growing without bound.
const MAX_LAYOUTS: usize = 256;
/// Data positions remembered per channel; keys past this are written the
/// general way.
const MAX_KEYS: usize = 64;

#[derive(Default)]
pub struct V1Encoder {
    layouts: HashMap<Box<str>, Layout, foldhash::fast::RandomState>,
    /// Keys written from a layout, for tests and benches.
    pub reused_keys: u64,
}

struct Layout {
    src: Box<str>,
    /// `{"v":1,"src":"…","ch":"…","sym":`
    head: Vec<u8>,
    publisher: Box<str>,
    /// `,"pub":"…","seq":`, or `,"seq":` for no publisher.
    pub_seq: Vec<u8>,
    keys: Vec<Key>,
}

struct Key {
    name: Box<str>,
    /// `"name":` at position 0, `,"name":` after it ([`put_key`]), as a
    /// [`Snippet`]: a `memcpy` call of run-time length per key was about
    /// one in thirty of the publisher's instructions.
    frag: Snippet,
}

impl Layout {
    fn new(src: &str, ch: &str) -> Self {
        let (mut head, mut pub_seq) = (Vec::new(), Vec::new());
        put_head(&mut head, src, ch);
        put_publisher(&mut pub_seq, "");
        Layout {
            src: src.into(),
            head,
            publisher: "".into(),
            pub_seq,
            keys: Vec::new(),
        }
    }
}

fn key_frag(n: usize, k: &str) -> Snippet {
    let mut f = Vec::with_capacity(k.len() + 4);
    put_key(&mut f, n, k);
    Snippet::new(&f)
}

impl V1Encoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the v1 JSON body of `env` to `out`, byte for byte what
    /// [`crate::wire::encode_v1`] appends.
    pub fn encode(&mut self, env: &Envelope<'_>, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let layout = Self::layout(&mut self.layouts, &env.src, &env.ch);
        out.extend_from_slice(&layout.head);
        json_str(out, &env.sym);
        if *layout.publisher != *env.publisher {
            layout.publisher = (*env.publisher).into();
            layout.pub_seq.clear();
            put_publisher(&mut layout.pub_seq, &env.publisher);
        }
        out.extend_from_slice(&layout.pub_seq);
        put_counters(out, env);
        for (n, (k, v)) in env.data.iter().enumerate() {
            match layout.keys.get_mut(n) {
                Some(key) if same(key.name.as_bytes(), k.as_bytes()) => self.reused_keys += 1,
                Some(key) => {
                    *key = Key {
                        name: (**k).into(),
                        frag: key_frag(n, k),
                    }
                }
                None if n < MAX_KEYS => layout.keys.push(Key {
                    name: (**k).into(),
                    frag: key_frag(n, k),
                }),
                None => {
                    put_key(out, n, k);
                    put_data_value(out, k, v)?;
                    continue;
                }
            }
            layout.keys[n].frag.put(out);
            put_data_value(out, k, v)?;
        }
        out.extend_from_slice(b"}}");
        Ok(())
    }

    fn layout<'l>(
        layouts: &'l mut HashMap<Box<str>, Layout, foldhash::fast::RandomState>,
        src: &str,
        ch: &str,
    ) -> &'l mut Layout {
        let fresh = match layouts.get(ch) {
            Some(l) => *l.src != *src,
            None => {
                if layouts.len() >= MAX_LAYOUTS {
                    layouts.clear();
                }
                true
            }
        };
        if fresh {
            layouts.insert(ch.into(), Layout::new(src, ch));
        }
        // Present: found above or inserted just now.
        layouts
            .get_mut(ch)
            .unwrap_or_else(|| unreachable!("layout for {ch:?} was just ensured"))
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::feeds::synthetic::Generator;
    use crate::wire::{encode_v1, Value};

    fn both(enc: &mut V1Encoder, e: &Envelope<'_>) -> (Vec<u8>, Vec<u8>) {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let ra = encode_v1(e, &mut a);
        let rb = enc.encode(e, &mut b);
        assert_eq!(ra, rb, "same result for {e:?}");
        (a, b)
    }

    #[test]
    fn writes_what_the_reference_encoder_writes() {
        let mut enc = V1Encoder::new();
        let mut gen = Generator::new(3, &[]);
        for i in 0..2_000u64 {
            let mut e = gen.next_message();
            e.seq = i + 1;
            e.epoch = 42;
            // Publishers change (and vanish) mid-stream.
            e.publisher = match i % 7 {
                0 => Cow::Borrowed(""),
                1 => Cow::Borrowed("other \"one\""),
                _ => Cow::Borrowed("synth"),
            };
            // A layout that changes: a key renamed, one dropped, one
            // added past the end, one that needs escaping, a long one.
            match i % 11 {
                3 => e.data[0].0 = Cow::Borrowed("renamed"),
                4 => {
                    e.data.pop();
                }
                5 => e
                    .data
                    .push((Cow::Owned("extra\n\"key\"".into()), Value::Int(-7))),
                6 => e.src = Cow::Borrowed("elsewhere"),
                // Longer than a key's fixed block (a `Snippet`).
                7 => e.data[1].0 = Cow::Borrowed("a_key_that_is_longer_than_thirty_two_bytes"),
                _ => {}
            }
            let (a, b) = both(&mut enc, &e);
            assert_eq!(
                String::from_utf8_lossy(&a),
                String::from_utf8_lossy(&b),
                "message {i}"
            );
        }
        // Most keys came from a layout: the fast path was the one tested.
        let keys: usize = 2_000 * 11;
        assert!(
            enc.reused_keys as usize > keys / 2,
            "{} keys reused",
            enc.reused_keys
        );
        // More keys than a layout remembers, and more channels than it
        // keeps: still the same bytes.
        let wide: Vec<_> = (0..MAX_KEYS + 5)
            .map(|i| (Cow::Owned(format!("k{i}")), Value::Float(i as f64 + 0.5)))
            .collect();
        for ch in 0..MAX_LAYOUTS + 3 {
            let e = Envelope::new("x", format!("ch{ch}"), "S", 1, wide.clone());
            let (a, b) = both(&mut enc, &e);
            assert_eq!(a, b, "channel {ch}");
            assert!(enc.layouts.len() <= MAX_LAYOUTS);
        }
    }

    #[test]
    fn refuses_what_the_reference_encoder_refuses() {
        let mut enc = V1Encoder::new();
        for bad in [f64::NAN, f64::INFINITY] {
            let e = Envelope::new("s", "c", "y", 1, vec![("p".into(), Value::Float(bad))]);
            let (mut a, mut b) = (Vec::new(), Vec::new());
            assert!(encode_v1(&e, &mut a).is_err());
            assert!(enc.encode(&e, &mut b).is_err());
        }
    }
}
