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
    /// Phase 4: Grafana datasource and dashboards, from the same schema.
    Grafana {
        #[command(subcommand)]
        action: GrafanaAction,
    },
    /// Phase 1 gate: wait until a backend answers (the readiness oneshot runs this).
    Wait {
        #[command(subcommand)]
        what: WaitFor,
    },
    /// The systemd units: install them and wire the configured instances.
    Units {
        #[command(subcommand)]
        action: UnitsAction,
    },
    /// Phase 5: listen to every publisher, reconcile with InfluxDB, judge
    /// against [validate]; exit 65 when a threshold breaks, 69 when a
    /// publisher or InfluxDB cannot be reached, 77 when InfluxDB refuses
    /// the credentials.
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
    /// The whole appliance without systemd: backends, schema, feeds,
    /// dashboards, validation; Ctrl-C or `nbpy down` stops it in order.
    Up {
        /// Kraken's public feeds (no credentials) instead of the synthetic demo.
        #[arg(long)]
        live: bool,
        /// How long phase 5 listens to the bus before reconciling it with InfluxDB.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        validate_within: std::time::Duration,
    },
    /// Stop a running `nbpy up` (subscribers drain first) and wait for it.
    Down {
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Run one configured publisher (what `nbpy-publisher NAME` runs).
    Publisher { name: String },
    /// Run one configured subscriber (what `nbpy-subscriber NAME` runs).
    Subscriber { name: String },
    /// Check what the appliance needs (backends, ports, credentials, venues)
    /// and print each problem with its fix.
    Doctor,
    /// Print a child's log from a running or past `nbpy up`.
    Logs {
        /// publisher/subscriber name, or `influxd`
        name: String,
        /// Keep printing as the log grows.
        #[arg(long, short = 'f')]
        follow: bool,
    },
}

#[derive(Subcommand)]
pub enum WaitFor {
    /// Until the configured InfluxDB answers /ping; exit 69 (EX_UNAVAILABLE) at the timeout,
    /// 78 (EX_CONFIG) at once when what answers there is not InfluxDB.
    Influxdb {
        #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
}

#[derive(Subcommand)]
pub enum UnitsAction {
    /// Write the units to ROOT/etc/systemd/system and link every configured
    /// publisher and subscriber into nbpy.target.wants/ (stale ones are unlinked).
    Install {
        /// Install under this root instead of / (a staging or image tree).
        #[arg(long, default_value = "/")]
        root: std::path::PathBuf,
        /// Also start nbpy.target at boot (multi-user.target.wants/).
        #[arg(long)]
        enable: bool,
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
    /// Phase 4: render (always) and apply (when grafana.url is set).
    Provision { dir: Option<std::path::PathBuf> },
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
            crate::outln!("{url}: {status}");
            Ok(())
        }
        Command::Validate { duration, json } => {
            let loaded = cli.common.boot()?;
            // Against a running `nbpy up`, what it runs: on built-in
            // defaults the configuration has no publishers of its own.
            let cfg = match crate::supervisor::running_up(&loaded.config) {
                Some((_, Some(effective))) => effective,
                _ => loaded.config,
            };
            crate::cli::block_on(crate::validate::command(&cfg, duration, json))
        }
        Command::Status { json } => {
            let loaded = cli.common.boot()?;
            // Against a running `nbpy up`: its children, then the health
            // picture of the configuration it actually runs.
            let mut cfg = loaded.config;
            if let Some((up, effective)) = crate::supervisor::running_up(&cfg) {
                if !json {
                    crate::cli::emit(&crate::supervisor::render_status(&up, true));
                }
                if let Some(effective) = effective {
                    cfg = effective;
                }
            }
            crate::cli::block_on(crate::status::command(&cfg, json))
        }
        Command::Up {
            live,
            validate_within,
        } => {
            let loaded = cli.common.boot()?;
            crate::cli::block_on(crate::supervisor::up(
                loaded.config,
                crate::supervisor::UpOptions {
                    live,
                    validate_within,
                },
            ))
        }
        Command::Publisher { name } => {
            let loaded = cli.common.boot()?;
            crate::publisher::serve(&name, &loaded.config)
        }
        Command::Subscriber { name } => {
            let loaded = cli.common.boot()?;
            crate::subscriber::serve(&name, &loaded.config)
        }
        Command::Doctor => {
            crate::service::init_logging(crate::config::LogFormat::Text, "warn");
            crate::cli::block_on(crate::doctor::command(cli.common.config.as_deref()))
        }
        Command::Down { timeout } => {
            let loaded =
                crate::config::load(cli.common.config.as_deref()).map_err(Failure::config)?;
            crate::supervisor::down(&loaded.config, timeout)
        }
        Command::Logs { name, follow } => {
            let loaded =
                crate::config::load(cli.common.config.as_deref()).map_err(Failure::config)?;
            crate::supervisor::logs(&loaded.config, &name, follow)
        }
        Command::Schema { action } => {
            let loaded = cli.common.boot()?;
            crate::admin::cli::schema(&loaded.config, action)
        }
        Command::Grafana { action } => {
            let loaded = cli.common.boot()?;
            crate::admin::cli::grafana(&loaded.config, action)
        }
        Command::Wait {
            what: WaitFor::Influxdb { timeout },
        } => {
            let loaded = cli.common.boot()?;
            let client = crate::sink::influx::InfluxClient::new(&loaded.config.influxdb)?;
            let waited = crate::cli::runtime()?
                .block_on(crate::backend::wait_answering(&client, timeout))?;
            crate::outln!(
                "influxdb: {} answers /ping (waited {:.1}s)",
                client.shown_url(),
                waited.as_secs_f64()
            );
            Ok(())
        }
        Command::Units {
            action: UnitsAction::Install { root, enable },
        } => {
            // The units read the file inside the root, so that is the one
            // to wire from; another one chosen is a usage error (64).
            let env = std::env::var_os("NBPY_CONFIG").map(std::path::PathBuf::from);
            let chosen = match (&cli.common.config, &env) {
                (Some(f), _) => Some((f.as_path(), crate::units::Chosen::Flag)),
                (None, Some(f)) => Some((f.as_path(), crate::units::Chosen::Env)),
                (None, None) => None,
            };
            let file = crate::units::config_file(&root, chosen)
                .map_err(|e| Failure::new(crate::exit::USAGE, anyhow::anyhow!(e)))?;
            // The file alone: the units do not see this shell's NBPY_*
            // variables, so instances wired from them would not exist.
            let ignored: Vec<String> = std::env::vars_os()
                .filter_map(|(k, _)| k.into_string().ok())
                .filter(|k| k.starts_with("NBPY_") && k != "NBPY_CONFIG")
                .collect();
            if !ignored.is_empty() {
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "note: units install wires from the file only; ignoring {} (the units do not see this environment)",
                    ignored.join(", ")
                );
            }
            let loaded = crate::config::load_file_only(file.clone()).map_err(Failure::config)?;
            let report = crate::units::install(&root, &loaded.config, enable).map_err(|e| {
                let code = match e.kind() {
                    std::io::ErrorKind::PermissionDenied => crate::exit::NOPERM,
                    // Names the units cannot carry: a configuration mistake.
                    std::io::ErrorKind::InvalidInput => crate::exit::CONFIG,
                    _ => crate::exit::CANTCREAT,
                };
                Failure::new(
                    code,
                    anyhow::anyhow!("installing units under {}: {e}", root.display()),
                )
            })?;
            for (what, paths) in [
                ("wrote", &report.written),
                ("linked", &report.linked),
                ("unlinked", &report.unlinked),
                ("removed", &report.removed),
            ] {
                for p in paths {
                    crate::outln!("{what} {}", p.display());
                }
            }
            let instances = crate::units::instances(&loaded.config);
            crate::outln!(
                "{} unit file(s) up to date; instances (from {}): {}",
                report.unchanged.len(),
                file.as_ref()
                    .map(|f| f.display().to_string())
                    .unwrap_or_else(|| "built-in defaults".into()),
                if instances.is_empty() {
                    "none (the config has no [publishers.NAME] or [subscribers.NAME])".to_string()
                } else {
                    instances.join(" ")
                }
            );
            if root == std::path::Path::new("/") {
                crate::outln!("next: systemctl daemon-reload && systemctl start nbpy.target");
            }
            Ok(())
        }
        Command::Config { action } => {
            let loaded =
                crate::config::load(cli.common.config.as_deref()).map_err(Failure::config)?;
            match action {
                ConfigAction::Show => {
                    if let Some(f) = &loaded.file {
                        crate::outln!("# from {} (+ NBPY_* environment)", f.display());
                    } else {
                        crate::outln!("# built-in defaults (+ NBPY_* environment); no config file");
                    }
                    crate::cli::emit(&loaded.config.to_redacted_toml());
                }
                ConfigAction::Check => {
                    crate::outln!(
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
