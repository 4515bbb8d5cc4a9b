//! `nbpy`: the appliance's command line.

fn main() {
    let cli: nbpy::commands::Cli = nbpy::cli::parse();
    nbpy::exit::run_main(|| nbpy::commands::run(cli))
}
