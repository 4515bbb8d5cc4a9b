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
    /// Phase 2: InfluxDB database, retention policies, downsampling, users.
    Schema {
        #[command(subcommand)]
        action: SchemaAction,
    },
    /// Phase 4: Grafana datasource and dashboards, from the same schema.
    Grafana {
        #[command(subcommand)]
        action: GrafanaAction,
    },
}

#[derive(Subcommand)]
pub enum SchemaAction {
    /// Create what is missing and alter what drifted (idempotent).
    Apply {
        /// Also remove retention policies, continuous queries (and users,
        /// when [schema.users] declares any) that are not declared.
        #[arg(long)]
        prune: bool,
    },
    /// Show the drift without changing anything. Exit 0: none, 1: drift
    /// (what `apply` with the same flags would change).
    Diff {
        /// Count undeclared things as drift, as `apply --prune` would.
        #[arg(long)]
        prune: bool,
    },
    /// Per measurement and retention policy: series, points, newest point
    /// age, shards and disk size.
    Stats {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum GrafanaAction {
    /// Write provisioning files (datasource YAML, dashboard provider YAML,
    /// one dashboard JSON per measurement + pipeline health) into DIR
    /// (default: grafana.provisioning_dir).
    Render { dir: Option<std::path::PathBuf> },
    /// Upsert the folder, datasource and dashboards through Grafana's HTTP
    /// API (grafana.url, grafana.admin_user, grafana.admin_password_file).
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
        Command::Schema { action } => {
            let loaded = cli.common.boot()?;
            crate::admin::cli::schema(&loaded.config, action)
        }
        Command::Grafana { action } => {
            let loaded = cli.common.boot()?;
            crate::admin::cli::grafana(&loaded.config, action)
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
