//! `nbpy-publisher NAME`: runs `[publishers.NAME]` until stopped or its feed ends.

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "Publish one configured feed on ZeroMQ")]
struct Args {
    #[command(flatten)]
    common: nbpy::cli::Common,
    /// The publisher's name in the configuration.
    name: String,
}

fn main() {
    let args = Args::parse();
    nbpy::exit::run_main(|| {
        let loaded = args.common.boot()?;
        nbpy::cli::block_on(nbpy::publisher::run(&args.name, &loaded.config))
    })
}
