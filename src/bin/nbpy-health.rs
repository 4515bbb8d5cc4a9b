//! `nbpy-health`: serves /healthz, /readyz, /status and /metrics until stopped.

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "Health and metrics of the nbpy appliance over HTTP")]
struct Args {
    #[command(flatten)]
    common: nbpy::cli::Common,
    /// Address to listen on (overrides health.listen).
    #[arg(long)]
    listen: Option<String>,
}

fn main() {
    let args: Args = nbpy::cli::parse();
    nbpy::exit::run_main(|| {
        let loaded = args.common.boot()?;
        nbpy::cli::runtime()?.block_on(nbpy::health::run(&loaded.config, args.listen.as_deref()))
    })
}
