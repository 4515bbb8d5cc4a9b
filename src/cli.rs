//! What every binary's command line shares: `--config`, `--log-format`,
//! and the start-up sequence (load config, then logging, then the runtime).

use std::path::PathBuf;

use clap::{Args, Parser};

use crate::config::{self, Loaded, LogFormat};
use crate::exit::Failure;

#[derive(Debug, Args, Clone)]
pub struct Common {
    /// Configuration file (else $NBPY_CONFIG, else /etc/nbpy/nbpy.toml if present).
    #[arg(long, short = 'c', global = true)]
    pub config: Option<PathBuf>,
    /// Log format: auto (journald when stderr is the journal), text, json, journald.
    #[arg(long, global = true, value_parser = parse_format)]
    pub log_format: Option<LogFormat>,
}

/// `P::parse()`, but a usage error exits 64 (EX_USAGE), as every other
/// failure follows sysexits, instead of clap's 2: the units'
/// `RestartPreventExitStatus=64 78` then do not restart a unit whose
/// command line is wrong. `--help` and `--version` still print and exit 0.
pub fn parse<P: Parser>() -> P {
    P::try_parse().unwrap_or_else(|e| {
        let code = if e.use_stderr() {
            crate::exit::USAGE
        } else {
            crate::exit::OK
        };
        // Nothing left to tell if stdout or stderr is gone.
        let _ = e.print();
        std::process::exit(code)
    })
}

fn parse_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "auto" => Ok(LogFormat::Auto),
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        "journald" => Ok(LogFormat::Journald),
        _ => Err("expected auto, text, json or journald".into()),
    }
}

impl Common {
    /// Loads the configuration and starts logging as it says.
    pub fn boot(&self) -> Result<Loaded, Failure> {
        let loaded = config::load(self.config.as_deref()).map_err(Failure::config)?;
        let format = self.log_format.unwrap_or(loaded.config.log.format);
        crate::service::init_logging(format, &loaded.config.log.level);
        Ok(loaded)
    }
}

/// A multi-threaded runtime, for the commands and services that are not
/// one pipeline.
pub fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(crate::exit::SOFTWARE, e))
}

/// A runtime on the calling thread alone, for a process that is one
/// pipeline: its tasks hand messages to each other without cross-thread
/// wake-ups (see `publisher::serve` and `subscriber::serve`). Blocking work
/// (fsync, gzip) must go to `spawn_blocking`: `block_in_place` panics here.
pub fn runtime_current_thread() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(crate::exit::SOFTWARE, e))
}

/// Runs `fut` to completion on a fresh runtime, then leaves without waiting
/// for blocking reads still parked in the pool (a FIFO or stdin with no
/// writer would otherwise hold the exit forever).
pub fn block_on<T>(
    fut: impl std::future::Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    finish(runtime()?, fut)
}

/// [`block_on`] on [`runtime_current_thread`].
pub fn block_on_current_thread<T>(
    fut: impl std::future::Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    finish(runtime_current_thread()?, fut)
}

fn finish<T>(
    rt: tokio::runtime::Runtime,
    fut: impl std::future::Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    let r = rt.block_on(fut);
    rt.shutdown_background();
    r
}

/// Command output to stdout. A reader that went away (`nbpy config show |
/// head -1`) is not worth the panic and backtrace `print!` makes of it: the
/// rest is dropped and the command ends with its own exit code. False once
/// stdout cannot take more (`nbpy logs -f` stops there).
pub fn emit(text: &str) -> bool {
    emit_bytes(text.as_bytes())
}

/// [`emit`] for bytes (a log file as it is).
pub fn emit_bytes(bytes: &[u8]) -> bool {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(bytes).and_then(|_| out.flush()).is_ok()
}

/// `println!` through [`emit`].
#[macro_export]
macro_rules! outln {
    ($($t:tt)*) => {
        $crate::cli::emit(&format!("{}\n", format_args!($($t)*)))
    };
}
