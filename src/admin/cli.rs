//! `nbpy schema …` and `nbpy grafana …`: print what the library did.

use std::io::Write;

use crate::commands::{GrafanaAction, SchemaAction};
use crate::config::Config;
use crate::exit::Failure;
use crate::sink::influx::InfluxClient;

/// `nbpy schema diff` exits with this when there is drift (like diff(1)).
pub const DRIFT: i32 = 1;

pub fn schema(cfg: &Config, action: SchemaAction) -> Result<(), Failure> {
    let client = InfluxClient::new(&cfg.influxdb)?;
    let rt = crate::cli::runtime()?;
    match action {
        SchemaAction::Apply { prune } => {
            // Each change is printed as soon as it is made: a run that
            // fails part-way has still changed the server, and says how.
            let mut made = 0usize;
            let r = rt.block_on(super::schema::apply(&client, cfg, prune, &mut |c| {
                made += 1;
                crate::outln!("{c}");
            }));
            let r = match r {
                Ok(r) => r,
                Err(e) => {
                    if made > 0 {
                        crate::outln!(
                            "schema: {made} change(s) applied to database {:?} at {} before the error",
                            client.database(),
                            client.shown_url()
                        );
                    }
                    return Err(e);
                }
            };
            for k in &r.kept {
                crate::outln!("  kept, not declared (--prune removes it): {k}");
            }
            crate::outln!(
                "schema: {} change(s) applied to database {:?} at {}",
                r.changes.len(),
                client.database(),
                client.shown_url()
            );
            Ok(())
        }
        SchemaAction::Diff { prune } => {
            let r = rt.block_on(super::schema::diff(&client, cfg, prune))?;
            for c in &r.changes {
                crate::outln!("{c}");
            }
            for k in &r.kept {
                crate::outln!("  not declared (only --prune counts it): {k}");
            }
            if let Some(n) = &r.note {
                crate::outln!("schema: {n}");
            }
            if r.changes.is_empty() {
                crate::outln!("schema: no drift");
                Ok(())
            } else {
                crate::outln!("schema: {} difference(s)", r.changes.len());
                let _ = std::io::stdout().flush();
                drop(rt);
                std::process::exit(DRIFT)
            }
        }
        SchemaAction::Stats { json } => {
            let s = rt.block_on(super::schema::stats(&client))?;
            if json {
                crate::outln!(
                    "{}",
                    serde_json::to_string_pretty(&s)
                        .map_err(|e| Failure::new(crate::exit::SOFTWARE, e))?
                );
            } else {
                crate::cli::emit(&s.render());
            }
            Ok(())
        }
    }
}

pub fn grafana(cfg: &Config, action: GrafanaAction) -> Result<(), Failure> {
    match action {
        GrafanaAction::Render { dir } => {
            let dir = dir
                .or_else(|| cfg.grafana.provisioning_dir.clone())
                .ok_or_else(|| {
                    Failure::new(
                        crate::exit::USAGE,
                        anyhow::anyhow!("give a directory or set grafana.provisioning_dir"),
                    )
                })?;
            let files = super::grafana::render_to(cfg, &dir)?;
            for f in &files {
                crate::outln!("{}", f.display());
            }
            crate::outln!(
                "grafana: {} file(s) written under {}",
                files.len(),
                dir.display()
            );
            Ok(())
        }
        GrafanaAction::Provision { dir } => {
            let line = crate::cli::block_on(super::grafana::provision(cfg, dir.as_deref()))?;
            crate::outln!("grafana: {line}");
            Ok(())
        }
        GrafanaAction::Apply => {
            let rt = crate::cli::runtime()?;
            let r = rt.block_on(super::grafana::apply(cfg))?;
            for line in &r.lines {
                crate::outln!("{line}");
            }
            crate::outln!(
                "grafana: {} created, {} updated, {} unchanged",
                r.created,
                r.updated,
                r.unchanged
            );
            Ok(())
        }
    }
}
