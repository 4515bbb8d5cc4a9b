//! Replays a file of v1 envelopes (one JSON body per line), re-stamped with
//! this publisher's sequence numbers; exchange times and data are kept.
//! Lines that are not envelopes are counted as malformed and skipped.

use std::sync::atomic::Ordering;

use tokio::io::{AsyncBufReadExt, BufReader};

use super::synthetic::Pacer;
use super::FeedContext;
use crate::exit::{Failure, NOINPUT};
use crate::wire::decode_v1;

pub async fn run(ctx: FeedContext) -> Result<(), Failure> {
    let Some(path) = ctx.cfg.file.clone() else {
        return Err(Failure::config(anyhow::anyhow!("replay needs `file`")));
    };
    let file = tokio::fs::File::open(&path).await.map_err(|e| {
        Failure::new(
            NOINPUT,
            anyhow::anyhow!("cannot open {}: {e}", path.display()),
        )
    })?;
    let mut lines = BufReader::new(file).lines();
    let mut pacer = Pacer::new(ctx.cfg.rate);
    let mut sent = 0u64;
    // A file of bad lines would otherwise log one WARN per line; the
    // malformed counter still counts every one.
    let mut bad_log = crate::sink::RateLimitedLog::new(std::time::Duration::from_secs(5));
    loop {
        let line = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            l = lines.next_line() => l,
        };
        let line = match line {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(e) => {
                return Err(Failure::new(
                    NOINPUT,
                    anyhow::anyhow!("reading {}: {e}", path.display()),
                ))
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let env = match decode_v1(line.as_bytes()) {
            Ok(e) => e.into_owned(),
            Err(e) => {
                ctx.out.stats.malformed.fetch_add(1, Ordering::Relaxed);
                crate::warn_limited!(bad_log, || format!(
                    "{}: skipping line: {e}",
                    path.display()
                ));
                continue;
            }
        };
        if !ctx.out.send(env).await {
            break;
        }
        sent += 1;
        if ctx.cfg.count > 0 && sent >= ctx.cfg.count {
            break;
        }
        if !pacer.tick_unless(&ctx.shutdown).await {
            break;
        }
    }
    tracing::info!(
        "{}: replayed {sent} messages from {}",
        ctx.name,
        path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// `warn_limited!` logs under the caller's target (here this module,
    /// not `nbpy::sink` where the limiter lives, so `RUST_LOG` filters it
    /// with its caller's logs), once per interval, and says how many lines
    /// it held back.
    #[test]
    fn rate_limited_lines_carry_the_callers_target() {
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .with_ansi(false)
            .with_target(true)
            .finish();
        let mut log = crate::sink::RateLimitedLog::new(std::time::Duration::from_millis(200));
        tracing::subscriber::with_default(sub, || {
            for i in 0..5 {
                crate::warn_limited!(log, || format!("bad line {i}"));
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
            crate::warn_limited!(log, || "bad line 5".to_string());
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].contains("nbpy::feeds::replay::tests: bad line 0"),
            "{text}"
        );
        assert!(
            lines[1].contains("bad line 5 (4 similar messages suppressed)"),
            "{text}"
        );
    }
}
