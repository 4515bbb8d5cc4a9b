//! Replays a file of v1 envelopes (one JSON body per line), re-stamped with
//! this publisher's sequence numbers; exchange times and data are kept.
//! Lines that are not envelopes (not JSON, not UTF-8, longer than the
//! largest envelope) are counted as malformed and skipped, and the summary
//! says how many.

use std::sync::atomic::Ordering;

use tokio::io::AsyncReadExt;

use super::synthetic::Pacer;
use super::upstream::{Line, LineSplitter};
use super::FeedContext;
use crate::exit::{Failure, NOINPUT};
use crate::wire::{decode_v1, MAX_FRAME};

/// Bytes read from the file at a time.
const CHUNK: usize = 16 * 1024;

pub async fn run(ctx: FeedContext) -> Result<(), Failure> {
    let Some(path) = ctx.cfg.file.clone() else {
        return Err(Failure::config(anyhow::anyhow!("replay needs `file`")));
    };
    let mut file = tokio::fs::File::open(&path).await.map_err(|e| {
        Failure::new(
            NOINPUT,
            anyhow::anyhow!("cannot open {}: {e}", path.display()),
        )
    })?;
    // Lines as bytes, each bounded: a line that is not UTF-8 is one more
    // line that is not an envelope (skipped, not the end of the replay),
    // and a line longer than the largest envelope is dropped as it is
    // read, never held whole (a file with no newlines would otherwise
    // take the publisher's memory with it).
    let mut lines = LineSplitter::new(MAX_FRAME);
    let mut chunk = vec![0u8; CHUNK];
    let mut at_end = false;
    let mut pacer = Pacer::new(ctx.cfg.rate);
    let (mut sent, mut skipped) = (0u64, 0u64);
    // A file of bad lines would otherwise log one WARN per line; the
    // malformed counter still counts every one, and the summary says how
    // many were skipped.
    let mut bad_log = crate::sink::RateLimitedLog::new(std::time::Duration::from_secs(5));
    'file: loop {
        while let Some(line) = lines.next_line() {
            if ctx.shutdown.is_cancelled() {
                break 'file;
            }
            let env = match line {
                Line::Text(l) if l.iter().all(u8::is_ascii_whitespace) => continue,
                Line::Text(l) => decode_v1(&l)
                    .map(|e| e.into_owned())
                    .map_err(|e| format!("skipping line: {e}")),
                Line::TooLong => Err(format!(
                    "skipping a line over {MAX_FRAME} bytes, the largest envelope"
                )),
            };
            let env = match env {
                Ok(env) => env,
                Err(why) => {
                    skipped += 1;
                    ctx.out.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    crate::warn_limited!(bad_log, || format!("{}: {why}", path.display()));
                    continue;
                }
            };
            if !ctx.out.send_unless(env, &ctx.shutdown).await {
                break 'file;
            }
            sent += 1;
            if ctx.cfg.count > 0 && sent >= ctx.cfg.count {
                break 'file;
            }
            if !pacer.tick_unless(&ctx.shutdown).await {
                break 'file;
            }
        }
        if at_end {
            break;
        }
        let n = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            n = file.read(&mut chunk) => n.map_err(|e| {
                Failure::new(
                    NOINPUT,
                    anyhow::anyhow!("reading {}: {e}", path.display()),
                )
            })?,
        };
        if n == 0 {
            // The last line may have no newline: end it.
            at_end = true;
            lines.push(b"\n");
        } else {
            lines.push(&chunk[..n]);
        }
    }
    crate::warn_suppressed!(bad_log, |n| format!(
        "{}: {n} more lines skipped (not logged one by one)",
        path.display()
    ));
    tracing::info!(
        "{}: replayed {sent} messages, skipped {skipped} lines from {}",
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
