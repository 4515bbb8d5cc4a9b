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
                tracing::warn!("{}: skipping line: {e}", path.display());
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
        pacer.tick().await;
    }
    tracing::info!(
        "{}: replayed {sent} messages from {}",
        ctx.name,
        path.display()
    );
    Ok(())
}
