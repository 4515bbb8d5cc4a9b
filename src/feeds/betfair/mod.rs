//! Betfair Exchange Stream API → `betfair_stream`.
//!
//! A session token comes from a certificate login (`cert_file`/`key_file` +
//! `username`/`password_file`) or from `session_token_file` (kept fresh by
//! something else). The stream is a TLS socket to `stream-api.betfair.com:443`
//! carrying CRLF-delimited JSON: the server greets with `connection`, the
//! client sends `authentication` and a `marketSubscription` (market filter
//! from the config, `EX_BEST_OFFERS` + `EX_MARKET_DEF` + `EX_LTP` +
//! `EX_TRADED_VOL`, ladder depth, conflation, heartbeat), and the server
//! pushes `mcm` market changes: an image, then deltas, and heartbeats when
//! nothing changes. A [`cache::MarketCache`] applies them; each runner whose
//! published view changed becomes one message tagged with market id,
//! selection id and market status, stamped with Betfair's publish time.
//!
//! The clocks of the last change (`initialClk`, `clk`) are kept across
//! reconnects and sent with the next subscription, so Betfair resumes with
//! the changes missed (`RESUB_DELTA`) instead of a full image, and runners
//! whose view did not change are not published again.
//!
//! Status errors are sorted by what can fix them: credentials (`NO_APP_KEY`,
//! `INVALID_APP_KEY`, `NOT_AUTHORIZED`, a session token that never worked)
//! end the feed with exit 77; filters Betfair refuses (`INVALID_INPUT`,
//! `SUBSCRIPTION_LIMIT_EXCEEDED`, …) with 78; `MAX_CONNECTION_LIMIT_EXCEEDED`
//! with 75 (temporary: other connections hold the app key's quota, so the
//! service manager retries later instead of this process piling on); an
//! expired session is renewed once; a login refused with
//! `TEMPORARY_BAN_TOO_MANY_REQUESTS` (the credentials are fine, Betfair
//! lifts the ban by itself, after 20 minutes) is tried again after
//! `login_ban_wait`, and everything else reconnects with backoff.

pub mod cache;
mod stream;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::FeedContext;
use crate::config::PublisherConfig;
use crate::exit::Failure;

pub const DEFAULT_STREAM: &str = "stream-api.betfair.com:443";
pub const DEFAULT_LOGIN_URL: &str = "https://identitysso-cert.betfair.com/api/certlogin";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BetfairConfig {
    /// File (or systemd credential) holding the application key.
    pub app_key_file: Option<PathBuf>,
    /// File holding a session token, when something else logs in.
    pub session_token_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for the non-interactive login.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// Certificate login endpoint (jurisdictions other than .com differ).
    pub login_url: Option<String>,
    /// Extra trust root (PEM) besides the public ones, for private test servers.
    pub ca_file: Option<PathBuf>,
    /// Market filter: event type ids ("7" = horse racing), ISO country
    /// codes, market types ("WIN", "MATCH_ODDS"), explicit market ids.
    pub event_types: Vec<String>,
    pub countries: Vec<String>,
    pub market_types: Vec<String>,
    pub market_ids: Vec<String>,
    /// Best-offer ladder depth, 1..=3 (the measurement stores three).
    pub ladder_levels: u32,
    /// Conflation Betfair applies, 0..=120000 ms; unset = Betfair's default.
    pub conflate_ms: Option<u64>,
    /// Heartbeat Betfair sends when idle, 500..=30000 ms. Three missed
    /// heartbeats mean the connection is dead.
    pub heartbeat_ms: u64,
    /// How long to leave the certificate login alone after Betfair
    /// answered `TEMPORARY_BAN_TOO_MANY_REQUESTS`: it bans new logins for
    /// 20 minutes, so trying again every 30 s only adds attempts.
    #[serde(with = "humantime_serde")]
    pub login_ban_wait: Duration,
}

impl Default for BetfairConfig {
    fn default() -> Self {
        BetfairConfig {
            app_key_file: None,
            session_token_file: None,
            cert_file: None,
            key_file: None,
            username: None,
            password_file: None,
            login_url: None,
            ca_file: None,
            event_types: Vec::new(),
            countries: Vec::new(),
            market_types: Vec::new(),
            market_ids: Vec::new(),
            ladder_levels: 3,
            conflate_ms: None,
            heartbeat_ms: 5000,
            login_ban_wait: Duration::from_secs(20 * 60),
        }
    }
}

impl BetfairConfig {
    /// All four keys of the certificate login are set.
    pub fn cert_login(&self) -> bool {
        self.cert_file.is_some()
            && self.key_file.is_some()
            && self.username.is_some()
            && self.password_file.is_some()
    }
}

pub fn check(cfg: &PublisherConfig) -> Vec<String> {
    let b = &cfg.betfair;
    let mut p = Vec::new();
    if b.app_key_file.is_none() {
        p.push("feed = \"betfair-stream\" needs betfair.app_key_file = \"<file or systemd credential with the application key>\"".to_string());
    }
    let cert_keys = [
        ("betfair.cert_file", b.cert_file.is_some()),
        ("betfair.key_file", b.key_file.is_some()),
        ("betfair.username", b.username.is_some()),
        ("betfair.password_file", b.password_file.is_some()),
    ];
    let missing: Vec<&str> = cert_keys.iter().filter(|k| !k.1).map(|k| k.0).collect();
    if b.session_token_file.is_none() {
        if missing.len() == cert_keys.len() {
            p.push("feed = \"betfair-stream\" needs betfair.session_token_file, or betfair.cert_file + betfair.key_file + betfair.username + betfair.password_file for the certificate login".into());
        } else if !missing.is_empty() {
            p.push(format!(
                "the Betfair certificate login also needs {}",
                missing.join(", ")
            ));
        }
    } else if !missing.is_empty() && missing.len() < cert_keys.len() {
        p.push(format!(
            "the Betfair certificate login is incomplete: missing {}",
            missing.join(", ")
        ));
    }
    if b.event_types.is_empty() && b.market_ids.is_empty() {
        p.push("feed = \"betfair-stream\" needs a market filter: betfair.event_types = [\"7\"] (optionally with countries, market_types) or betfair.market_ids = [\"1.23456789\"]".into());
    }
    if !(1..=cache::MAX_LEVELS as u32).contains(&b.ladder_levels) {
        p.push(format!(
            "betfair.ladder_levels = {}: allowed 1..={}",
            b.ladder_levels,
            cache::MAX_LEVELS
        ));
    }
    if !(500..=30_000).contains(&b.heartbeat_ms) {
        p.push(format!(
            "betfair.heartbeat_ms = {}: allowed 500..=30000",
            b.heartbeat_ms
        ));
    }
    if let Some(c) = b.conflate_ms.filter(|c| *c > 120_000) {
        p.push(format!("betfair.conflate_ms = {c}: allowed 0..=120000"));
    }
    if let Some(u) = &cfg.url {
        if let Err(e) = stream::parse_endpoint(u) {
            p.push(format!("url = {u:?}: {e}"));
        }
    }
    p
}

pub async fn run(ctx: FeedContext) -> Result<(), Failure> {
    super::upstream::config_ok(&ctx.name, check(&ctx.cfg))?;
    stream::run(ctx).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feeds::FeedKind;

    #[test]
    fn check_names_missing_keys() {
        let cfg = PublisherConfig {
            feed: FeedKind::BetfairStream,
            ..Default::default()
        };
        let p = check(&cfg).join("\n");
        for key in [
            "betfair.app_key_file",
            "betfair.session_token_file",
            "betfair.cert_file",
            "betfair.event_types",
        ] {
            assert!(p.contains(key), "{key} in {p}");
        }
        let cfg = PublisherConfig {
            feed: FeedKind::BetfairStream,
            url: Some("https://stream-api.betfair.com".into()),
            betfair: BetfairConfig {
                app_key_file: Some("k".into()),
                cert_file: Some("c".into()),
                market_ids: vec!["1.1".into()],
                ladder_levels: 4,
                heartbeat_ms: 100,
                ..Default::default()
            },
            ..Default::default()
        };
        let p = check(&cfg).join("\n");
        for key in [
            "betfair.key_file, betfair.username, betfair.password_file",
            "ladder_levels",
            "heartbeat_ms",
            "url",
        ] {
            assert!(p.contains(key), "{key} in {p}");
        }
    }
}
