//! What the benches share: a message as a publisher puts it on the wire.

use nbpy::v1_encoder::V1Encoder;
use nbpy::wire::Envelope;

/// A publisher's encoding state: its v1 encoder, as `BusPublisher` keeps
/// one, and scratch buffers.
#[derive(Default)]
pub struct Publish {
    encoder: V1Encoder,
    body: Vec<u8>,
    topic: Vec<u8>,
}

impl Publish {
    /// Stamps `env` as publisher "bench" would (number `seq`) and appends
    /// it to `out` as ZMTP frames, topic and v1 body.
    pub fn frame(&mut self, mut env: Envelope<'_>, seq: u64, out: &mut Vec<u8>) {
        env.seq = seq;
        env.epoch = 1;
        env.publisher = "bench".into();
        self.body.clear();
        self.encoder.encode(&env, &mut self.body).unwrap();
        self.topic.clear();
        env.write_topic(&mut self.topic);
        nbpy::zmtp::encode_message(&[&self.topic, &self.body], out);
    }
}
