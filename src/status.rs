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

/// The daemon's `/status`, or why it gave none: nothing listening, no
/// answer in time (a hung daemon), an error status, or not its JSON
/// (another service on the port). Any of these means "probe directly": a
/// wedged daemon is exactly when an operator asks for the status.
pub async fn fetch(listen: &str) -> Result<Status, String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .map_err(|e| e.to_string())?;
    let url = format!("http://{listen}/status");
    let r = http.get(&url).send().await.map_err(|e| {
        if e.is_connect() {
            "is not answering".to_string()
        } else if e.is_timeout() {
            "did not answer within 3 s".to_string()
        } else {
            format!("failed: {e}")
        }
    })?;
    let r = r.error_for_status().map_err(|e| {
        format!(
            "answered {}",
            e.status().map(|s| s.to_string()).unwrap_or_default()
        )
    })?;
    r.json::<Status>().await.map_err(|_| {
        "answered, but not with nbpy-health's status (another service on that port?)".to_string()
    })
}

/// Prints the table (or JSON); exits `UNAVAILABLE` when not ready.
pub async fn command(cfg: &Config, json: bool) -> Result<(), Failure> {
    let (status, note) = match fetch(&cfg.health.listen).await {
        Ok(s) => (s, format!("from nbpy-health at {}", cfg.health.listen)),
        Err(why) => (
            crate::health::Monitor::probe(cfg, PROBE_FOR).await?,
            format!(
                "nbpy-health at {} {why}; probed directly for up to {} s",
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
