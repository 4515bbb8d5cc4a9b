//! What the benches share: a message as a publisher puts it on the wire.

use nbpy::wire::Envelope;

/// Stamps `env` as publisher "bench" would (number `seq`) and appends it
/// to `out` as ZMTP frames, topic and v1 body; `buf` and `topic` are scratch.
pub fn publish(
    mut env: Envelope<'_>,
    seq: u64,
    (buf, topic): (&mut Vec<u8>, &mut Vec<u8>),
    out: &mut Vec<u8>,
) {
    env.seq = seq;
    env.epoch = 1;
    env.publisher = "bench".into();
    buf.clear();
    nbpy::wire::encode_v1(&env, buf).unwrap();
    topic.clear();
    env.write_topic(topic);
    nbpy::zmtp::encode_message(&[topic, buf], out);
}
