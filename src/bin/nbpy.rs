//! `nbpy`: the appliance's command line.

use clap::Parser;

fn main() {
    let cli = nbpy::commands::Cli::parse();
    nbpy::exit::run_main(|| nbpy::commands::run(cli))
}
