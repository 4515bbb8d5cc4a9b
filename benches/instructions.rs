//! A fixed amount of hot-path work, for counting instructions where timing
//! is too noisy to compare two builds (a shared two-core machine swings
//! criterion's figures by ±20% between runs; an instruction count does not
//! move). Build it, then run it under callgrind:
//!
//! ```text
//! cargo bench --bench instructions --no-run
//! B=$(ls -t target/release/deps/instructions-* | grep -v '\.d$' | head -1)
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null $B gen 100000
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null $B sub 100000
//! ```
//!
//! `gen` generates, encodes and frames N synthetic messages (all five
//! channels in turn, as `common::Publish` does for the pipeline bench):
//! the publisher's own work per
//! message. `sub` does the same and then feeds the frames through the
//! subscriber's intake (`zmtp::sub::messages` + `Intake::accept`: ZMTP in,
//! line-protocol batches out), so `sub − gen` is the intake's count. Run
//! plainly (as `cargo bench` does) it just does the work once and prints
//! its size.

use std::sync::Arc;

use nbpy::config::InfluxConfig;
use nbpy::feeds::synthetic::Generator;
use nbpy::subscriber::{Intake, IntakeStats};

mod common;
use common::Publish;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("instructions: bench");
        return;
    }
    let words: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let mode = words.first().copied().unwrap_or("sub");
    let n: u64 = words.get(1).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let mut gen = Generator::new(1, &[]);
    let (mut frames, mut publish) = (Vec::new(), Publish::default());
    for seq in 1..=n {
        publish.frame(gen.next_message(), seq, &mut frames);
    }
    let mut batches = 0;
    if mode == "sub" {
        let cfg = InfluxConfig::default();
        let mut intake = Intake::new("bench", &cfg, Arc::new(IntakeStats::default()));
        for m in nbpy::zmtp::sub::messages(&frames) {
            if intake.accept(&m).is_some() {
                batches += 1;
            }
        }
    }
    println!(
        "{mode}: {n} messages, {} bytes of frames, {batches} full batches",
        frames.len()
    );
}
