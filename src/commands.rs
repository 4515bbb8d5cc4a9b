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
    /// Probe the health endpoint once: exit 0 on a 2xx, 69 (EX_UNAVAILABLE)
    /// otherwise. The container image's HEALTHCHECK (it has no curl).
    HealthCheck {
        /// URL to probe; default: `/healthz` on `[health] listen`.
        #[arg(long)]
        url: Option<String>,
        /// Give up after this long.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
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
        Command::HealthCheck { url, timeout } => {
            let url = match url {
                Some(u) => u,
                None => {
                    let loaded = crate::config::load(cli.common.config.as_deref())
                        .map_err(Failure::config)?;
                    crate::probe::default_url(&loaded.config.health.listen)
                }
            };
            let status = crate::probe::check(&url, timeout).map_err(Failure::unavailable)?;
            println!("{url}: {status}");
            Ok(())
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
