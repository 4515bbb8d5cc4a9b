//! The `nbpy` subcommands. Each is a thin call into the library.

use clap::{Parser, Subcommand};

use crate::cli::Common;
use crate::exit::Failure;

#[derive(Parser)]
#[command(version, about = "nbpy market-data appliance")]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Show or check the effective configuration.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Phase 2: InfluxDB database and retention policies.
    Schema {
        #[command(subcommand)]
        action: SchemaAction,
    },
    /// Phase 5: listen to every publisher, reconcile with InfluxDB, judge
    /// against [validate]; exit 65 when a threshold breaks, 69 when a
    /// publisher or InfluxDB cannot be reached.
    Validate {
        /// How long to listen (default: validate.duration).
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<std::time::Duration>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The health picture (from nbpy-health, else probed directly) as a
    /// table; exit 69 when the appliance is not ready.
    Status {
        /// Print the picture as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum SchemaAction {
    /// Create the database and retention policies that are missing.
    Apply,
}

#[derive(Subcommand)]
pub enum ConfigAction {
    /// Print the effective configuration (defaults < file < NBPY_* env), secrets redacted.
    Show,
    /// Validate the configuration; exit 78 (EX_CONFIG) with every problem if it is wrong.
    Check,
}

pub fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Validate { duration, json } => {
            let loaded = cli.common.boot()?;
            crate::cli::runtime()?.block_on(crate::validate::command(
                &loaded.config,
                duration,
                json,
            ))
        }
        Command::Status { json } => {
            let loaded = cli.common.boot()?;
            crate::cli::runtime()?.block_on(crate::status::command(&loaded.config, json))
        }
        Command::Schema {
            action: SchemaAction::Apply,
        } => {
            let loaded = cli.common.boot()?;
            let client = crate::sink::influx::InfluxClient::new(&loaded.config.influxdb)?;
            crate::cli::runtime()?
                .block_on(crate::admin::schema::ensure(&client))
                .map_err(|e| {
                    Failure::unavailable(anyhow::anyhow!("schema apply on {}: {e}", client.url()))
                })?;
            println!(
                "schema: database {:?} and retention policies in place",
                client.database()
            );
            Ok(())
        }
        Command::Config { action } => {
            let loaded =
                crate::config::load(cli.common.config.as_deref()).map_err(Failure::config)?;
            match action {
                ConfigAction::Show => {
                    if let Some(f) = &loaded.file {
                        println!("# from {} (+ NBPY_* environment)", f.display());
                    } else {
                        println!("# built-in defaults (+ NBPY_* environment); no config file");
                    }
                    print!("{}", loaded.config.to_redacted_toml());
                }
                ConfigAction::Check => {
                    println!(
                        "ok: {} publisher(s), {} subscriber(s){}",
                        loaded.config.publishers.len(),
                        loaded.config.subscribers.len(),
                        loaded
                            .file
                            .map(|f| format!(" in {}", f.display()))
                            .unwrap_or_default()
                    );
                }
            }
            Ok(())
        }
    }
}
