//! Exit codes follow sysexits(3) so systemd's `RestartPreventExitStatus=` and
//! shell scripts can tell a configuration mistake (don't restart, fix it) from
//! a temporary failure (restart later).

use std::fmt;

pub const OK: i32 = 0;
pub const USAGE: i32 = 64;
pub const DATAERR: i32 = 65;
pub const NOINPUT: i32 = 66;
pub const UNAVAILABLE: i32 = 69;
pub const SOFTWARE: i32 = 70;
pub const CANTCREAT: i32 = 73;
pub const TEMPFAIL: i32 = 75;
pub const NOPERM: i32 = 77;
pub const CONFIG: i32 = 78;

/// An error that knows which exit code it deserves.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub error: anyhow::Error,
}

impl Failure {
    pub fn new(code: i32, error: impl Into<anyhow::Error>) -> Self {
        Failure {
            code,
            error: error.into(),
        }
    }
    pub fn config(error: impl Into<anyhow::Error>) -> Self {
        Self::new(CONFIG, error)
    }
    pub fn unavailable(error: impl Into<anyhow::Error>) -> Self {
        Self::new(UNAVAILABLE, error)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure {
            code: SOFTWARE,
            error,
        }
    }
}

/// Runs a fallible main body and turns its failure into a message on stderr
/// and the matching exit code. Binaries stay one line long.
pub fn run_main(body: impl FnOnce() -> Result<(), Failure>) -> ! {
    match body() {
        Ok(()) => std::process::exit(OK),
        Err(failure) => {
            // stderr reaches the journal under systemd too, so once is enough.
            // Not `eprintln!`: with stderr gone (`nbpy validate 2>&1 | head`)
            // it panics, and the exit code scripts act on becomes 101.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "error: {failure}");
            std::process::exit(failure.code)
        }
    }
}
