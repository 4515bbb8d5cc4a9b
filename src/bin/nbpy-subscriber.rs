//! `nbpy-subscriber NAME`: runs `[subscribers.NAME]` until stopped.

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
    let args = Args::parse();
    nbpy::exit::run_main(|| {
        let loaded = args.common.boot()?;
        nbpy::subscriber::serve(&args.name, &loaded.config)
    })
}
