//! Oanda feed: not built yet. Selecting it fails clearly at start-up.

use serde::{Deserialize, Serialize};

use crate::config::PublisherConfig;
use crate::exit::Failure;

use super::FeedContext;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct OandaConfig {}

pub fn check(_cfg: &PublisherConfig) -> Vec<String> {
    Vec::new()
}

pub async fn run(ctx: FeedContext) -> Result<(), Failure> {
    Err(Failure::config(anyhow::anyhow!(
        "publisher {}: the {} feed is not available in this build",
        ctx.name,
        ctx.cfg.feed.name()
    )))
}
