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

/// A failed HTTP request as a log line can say it: reqwest's own text
/// (`error sending request`) and then each cause below it, so a refused
/// connection, a name that does not resolve and a certificate that is not
/// trusted read differently (`… (os error 111)`, `dns error: …`,
/// `invalid peer certificate: …`). The URL is left out, as it may carry
/// credentials in a query; the causes below reqwest (hyper, the resolver,
/// io, rustls) do not name it. A cause whose text the line already holds
/// is left out too: some errors repeat their source in their own text.
pub fn http_error(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut line = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}
