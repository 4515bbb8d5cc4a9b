//! `nbpy-subscriber NAME`: runs `[subscribers.NAME]` until stopped.
//!
//! It keeps glibc's allocator, with 4 KiB pages. In a burst the subscriber
//! first-touches its queue of batches (~100 MiB for 300k points), and on
//! this kind of VM each new page costs about 2 µs of kernel time (100 MiB
//! in 49–67 ms): about half the subscriber's system time. Huge pages for
//! the batch buffers (2 MiB-aligned mappings advised `MADV_HUGEPAGE`, THP
//! in `madvise` mode) cut the faults from ~27k to 3–23k per 300k-point
//! run, but not the system time reliably (median 23 ticks against 12.5 in
//! four alternating pairs; 11 against 12.5 in two later sets of ten), and
//! peak RSS rose from 102–105 to 144–153 MiB, as with mimalloc's huge-page
//! arenas (see `nbpy-publisher`). Higher glibc mmap and trim thresholds
//! saved about 3k faults and no time. A long-running subscriber keeps most
//! of that memory after a burst: the next burst takes a fifth to a half as
//! many faults.

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "Write the bus to InfluxDB")]
struct Args {
    #[command(flatten)]
    common: nbpy::cli::Common,
    /// The subscriber's name in the configuration.
    name: String,
}

fn main() {
    let args: Args = nbpy::cli::parse();
    nbpy::exit::run_main(|| {
        let loaded = args.common.boot()?;
        nbpy::subscriber::serve(&args.name, &loaded.config)
    })
}
