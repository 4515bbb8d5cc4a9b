//! `nbpy status`: the health picture as a compact table.
//!
//! It asks the running `nbpy-health` (`health.listen`) for `/status`, so
//! the table shows the daemon's longer view (rates, uptime over its
//! window). When no daemon answers, it takes the picture itself: it
//! watches the bus for a moment and polls InfluxDB once, exactly as the
//! daemon would, and says so.

use std::time::Duration;

use crate::config::Config;
use crate::exit::{Failure, UNAVAILABLE};
use crate::health::report::{self, Status};

/// How long a direct probe watches the bus when no daemon answers.
pub const PROBE_FOR: Duration = Duration::from_secs(3);

/// The daemon's `/status`, or `None` when nothing listens there.
pub async fn fetch(listen: &str) -> Result<Option<Status>, Failure> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| Failure::new(crate::exit::SOFTWARE, e))?;
    let url = format!("http://{listen}/status");
    match http.get(&url).send().await {
        Ok(r) => {
            let r = r
                .error_for_status()
                .map_err(|e| Failure::unavailable(anyhow::anyhow!("{url}: {e}")))?;
            let s = r
                .json::<Status>()
                .await
                .map_err(|e| Failure::unavailable(anyhow::anyhow!("{url}: {e}")))?;
            Ok(Some(s))
        }
        Err(e) if e.is_connect() => Ok(None),
        Err(e) => Err(Failure::unavailable(anyhow::anyhow!("{url}: {e}"))),
    }
}

/// Prints the table (or JSON); exits `UNAVAILABLE` when not ready.
pub async fn command(cfg: &Config, json: bool) -> Result<(), Failure> {
    let (status, note) = match fetch(&cfg.health.listen).await? {
        Some(s) => (s, format!("from nbpy-health at {}", cfg.health.listen)),
        None => (
            crate::health::Monitor::probe(cfg, PROBE_FOR).await?,
            format!(
                "nbpy-health is not answering at {}; probed directly for up to {} s",
                cfg.health.listen,
                PROBE_FOR.as_secs()
            ),
        ),
    };
    if json {
        let text = serde_json::to_string_pretty(&status)
            .map_err(|e| Failure::from(anyhow::anyhow!("status as JSON: {e}")))?;
        crate::cli::emit(&format!("{text}\n"));
    } else {
        crate::cli::emit(&format!("# {note}\n{}", report::render(&status)));
    }
    if status.ready {
        Ok(())
    } else {
        Err(Failure::new(
            UNAVAILABLE,
            anyhow::anyhow!("not ready: {}", status.not_ready.join("; ")),
        ))
    }
}
