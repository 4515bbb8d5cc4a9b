//! X API v2 filtered stream → `twitter_sentiment` (optional feed).
//!
//! At start the configured rules are made the stream's rule set
//! (`GET`/`POST /2/tweets/search/stream/rules`: missing ones added, others
//! deleted), then `GET /2/tweets/search/stream?tweet.fields=created_at` with
//! the app's bearer token streams matching posts as JSON lines, with an empty
//! line (`\r\n`) as keep-alive every 20 s. Each post becomes one message per
//! rule it matched: the rule's tag (tag and instrument), a lexicon sentiment
//! score, the number of words and the post id, at the post's creation time.
//! The text itself is not published.
//!
//! A stream silent past `heartbeat_timeout` is reconnected with backoff; HTTP
//! 429 (too many connections, or rate limited) backs off from a minute up,
//! as X asks; a rejected bearer token exits 77.

pub mod sentiment;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::upstream::{self, Backoff, Ended, Line, LineSplitter, Outlet, MAX_LINE};
use super::FeedContext;
use crate::config::PublisherConfig;
use crate::exit::Failure;
use crate::sink::RateLimitedLog;
use crate::wire::{now_ns, Envelope, Fields, Value};

pub const SOURCE: &str = "social";
pub const CHANNEL: &str = "post";
pub const DEFAULT_URL: &str = "https://api.x.com";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// X filter-rule syntax, e.g. `bitcoin lang:en -is:retweet`.
    pub value: String,
    /// Names the rule in the data (the `rule` tag); defaults to the value.
    pub tag: Option<String>,
}

impl Rule {
    pub fn label(&self) -> &str {
        self.tag.as_deref().unwrap_or(&self.value)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SocialConfig {
    /// File (or systemd credential) holding the app's bearer token.
    pub bearer_token_file: Option<PathBuf>,
    pub rules: Vec<Rule>,
    /// Nothing, not even a keep-alive, for this long: reconnect. X sends a
    /// keep-alive every 20 s.
    #[serde(with = "humantime_serde")]
    pub heartbeat_timeout: Duration,
}

impl Default for SocialConfig {
    fn default() -> Self {
        SocialConfig {
            bearer_token_file: None,
            rules: Vec::new(),
            heartbeat_timeout: Duration::from_secs(30),
        }
    }
}

pub fn check(cfg: &PublisherConfig) -> Vec<String> {
    let s = &cfg.social;
    let mut p = Vec::new();
    if s.bearer_token_file.is_none() {
        p.push("feed = \"social\" needs social.bearer_token_file = \"<file or systemd credential with the X API bearer token>\"".to_string());
    }
    if s.rules.is_empty() {
        p.push("feed = \"social\" needs social.rules = [{ value = \"bitcoin lang:en\", tag = \"btc\" }, …]".into());
    }
    let mut labels = std::collections::BTreeSet::new();
    for (i, r) in s.rules.iter().enumerate() {
        if r.value.trim().is_empty() {
            p.push(format!("social.rules[{i}].value is empty"));
        }
        if r.label().contains('\n') {
            p.push(format!("social.rules[{i}]: tags cannot contain newlines"));
        }
        if !labels.insert(r.label()) {
            p.push(format!(
                "social.rules[{i}]: tag {:?} is used twice",
                r.label()
            ));
        }
    }
    if s.heartbeat_timeout.is_zero() {
        p.push("social.heartbeat_timeout must be more than 0".into());
    }
    p
}

#[derive(Deserialize)]
struct StreamLine {
    data: Option<Post>,
    #[serde(default)]
    matching_rules: Vec<Matched>,
    errors: Option<Vec<ApiError>>,
}

#[derive(Deserialize)]
struct Post {
    id: String,
    text: String,
    created_at: Option<String>,
}

#[derive(Deserialize)]
struct Matched {
    id: Option<String>,
    tag: Option<String>,
}

#[derive(Deserialize, Debug)]
struct ApiError {
    title: Option<String>,
    detail: Option<String>,
}

/// What one stream line means.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    Posts(Vec<Envelope<'static>>),
    /// X ended the stream (e.g. `operational-disconnect`).
    Disconnect(String),
    /// Errors reported in-stream that do not end it.
    Notice(String),
}

/// Decodes one line of the filtered stream. `rules` maps rule ids to tags
/// for rules that matched without a tag.
pub fn decode(line: &[u8], rules: &[(String, String)]) -> Result<Decoded, String> {
    let l: StreamLine = serde_json::from_slice(line).map_err(|e| format!("not JSON: {e}"))?;
    let Some(post) = l.data else {
        let errors = l.errors.ok_or("neither data nor errors")?;
        let text: Vec<String> = errors
            .iter()
            .map(|e| {
                format!(
                    "{}: {}",
                    e.title.as_deref().unwrap_or("error"),
                    e.detail.as_deref().unwrap_or("")
                )
            })
            .collect();
        let text = text.join("; ");
        let ends = errors.iter().any(|e| {
            e.title
                .as_deref()
                .is_some_and(|t| t.contains("disconnect") || t == "ConnectionException")
        });
        return Ok(if ends {
            Decoded::Disconnect(text)
        } else {
            Decoded::Notice(text)
        });
    };
    if post.id.is_empty() {
        return Err("post without id".into());
    }
    let ts = match &post.created_at {
        Some(t) => upstream::parse_time_ns(t).ok_or_else(|| format!("bad created_at {t:?}"))?,
        None => now_ns(),
    };
    let s = sentiment::score(&post.text);
    let mut out = Vec::new();
    for m in &l.matching_rules {
        let label = match (&m.tag, &m.id) {
            (Some(t), _) if !t.is_empty() => t.clone(),
            (_, Some(id)) => rules
                .iter()
                .find(|(rid, _)| rid == id)
                .map_or_else(|| id.clone(), |(_, v)| v.clone()),
            _ => continue,
        };
        if label.contains('\n') {
            continue;
        }
        let data: Fields<'static> = vec![
            ("rule".into(), Value::Str(label.clone().into())),
            ("score".into(), Value::Float(s.score)),
            ("words".into(), Value::Int(s.words)),
            ("id".into(), Value::Str(post.id.clone().into())),
        ];
        out.push(Envelope::new(SOURCE, CHANNEL, label, ts, data));
    }
    if out.is_empty() {
        return Err(format!("post {} matched no rule", post.id));
    }
    Ok(Decoded::Posts(out))
}

#[derive(Deserialize)]
struct RuleList {
    data: Option<Vec<ActiveRule>>,
}

#[derive(Deserialize)]
struct ActiveRule {
    id: String,
    value: String,
    tag: Option<String>,
}

#[derive(Deserialize)]
struct RuleChange {
    errors: Option<Vec<serde_json::Value>>,
    meta: Option<serde_json::Value>,
}

/// A JSON answer, read within 30 s.
async fn json_body<T: serde::de::DeserializeOwned>(resp: reqwest::Response) -> Result<T, String> {
    match tokio::time::timeout(Duration::from_secs(30), resp.json::<T>()).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(upstream::http_error(e)),
        Err(_) => Err("timed out".into()),
    }
}

pub async fn run(ctx: FeedContext) -> Result<(), Failure> {
    upstream::config_ok(&ctx.name, check(&ctx.cfg))?;
    let Some(token_file) = ctx.cfg.social.bearer_token_file.as_deref() else {
        return Err(Failure::config(anyhow::anyhow!("social: unreachable")));
    };
    let token = upstream::secret(&ctx.name, "social.bearer_token_file", token_file)?;
    let client = upstream::stream_client(&ctx.name)?;
    let mut x = Stream {
        ctx: &ctx,
        base: upstream::base_url(ctx.cfg.url.as_deref(), DEFAULT_URL),
        client,
        token,
        rule_ids: None,
        throttled: false,
        log: RateLimitedLog::new(Duration::from_secs(5)),
    };
    let mut out = Outlet::new(&ctx);
    let mut backoff = Backoff::venue();
    // X asks for a backoff starting at a minute after HTTP 429.
    let mut throttle = Backoff::new(Duration::from_secs(60), Duration::from_secs(15 * 60));
    loop {
        let t0 = std::time::Instant::now();
        let ended = tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => Ended::Stop,
            r = x.session(&mut out) => r?,
        };
        match ended {
            Ended::Stop => break,
            Ended::Lost { why, productive } => {
                let lived = t0.elapsed();
                let d = if std::mem::take(&mut x.throttled) {
                    throttle.after(productive, lived)
                } else {
                    if productive && lived >= upstream::HEALTHY {
                        throttle.reset();
                    }
                    backoff.after(productive, lived)
                };
                tracing::warn!(
                    "publisher {}: X filtered stream {why}; reconnecting in {} ms",
                    ctx.name,
                    d.as_millis()
                );
                if !upstream::pause(&ctx.shutdown, d).await {
                    break;
                }
            }
        }
    }
    tracing::info!(
        "publisher {}: social feed published {} posts",
        ctx.name,
        out.sent
    );
    Ok(())
}

struct Stream<'a> {
    ctx: &'a FeedContext,
    base: String,
    client: reqwest::Client,
    token: String,
    /// Active rule ids → labels, once the rules are in place.
    rule_ids: Option<Vec<(String, String)>>,
    throttled: bool,
    log: RateLimitedLog,
}

impl Stream<'_> {
    /// Fails the feed for credentials and refused rules; `Err(Ok(ended))`
    /// for a failure worth retrying.
    async fn request(
        &mut self,
        what: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<Result<reqwest::Response, Ended>, Failure> {
        let name = &self.ctx.name;
        let resp = tokio::select! {
            biased;
            _ = self.ctx.shutdown.cancelled() => return Ok(Err(Ended::Stop)),
            r = tokio::time::timeout(Duration::from_secs(30), req.bearer_auth(&self.token).send()) => r,
        };
        let mut resp = match resp {
            Err(_) => {
                return Ok(Err(Ended::Lost {
                    why: format!("{what}: no answer"),
                    productive: false,
                }))
            }
            Ok(Err(e)) => {
                return Ok(Err(Ended::Lost {
                    why: format!("{what}: {}", upstream::http_error(e)),
                    productive: false,
                }))
            }
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if status.is_success() {
            return Ok(Ok(resp));
        }
        let body = super::oanda::error_body(&mut resp).await;
        match status.as_u16() {
            401 | 403 => Err(upstream::rejected(
                name,
                format!("X refused the bearer token from social.bearer_token_file ({what}: HTTP {status}: {body})"),
            )),
            429 => {
                self.throttled = true;
                Ok(Err(Ended::Lost {
                    why: format!("{what}: HTTP 429 ({body})"),
                    productive: false,
                }))
            }
            400 => Err(Failure::config(anyhow::anyhow!(
                "publisher {name}: X refused {what} (HTTP 400: {body}); check social.rules"
            ))),
            _ => Ok(Err(Ended::Lost {
                why: format!("{what}: HTTP {status}: {body}"),
                productive: false,
            })),
        }
    }

    /// Makes the stream's rule set the configured one.
    async fn sync_rules(&mut self) -> Result<Option<Ended>, Failure> {
        let url = format!("{}/2/tweets/search/stream/rules", self.base);
        let resp = match self.request("listing rules", self.client.get(&url)).await? {
            Ok(r) => r,
            Err(e) => return Ok(Some(e)),
        };
        let list: RuleList = match json_body(resp).await {
            Ok(l) => l,
            Err(e) => {
                return Ok(Some(Ended::Lost {
                    why: format!("rule list unreadable: {e}"),
                    productive: false,
                }))
            }
        };
        let active = list.data.unwrap_or_default();
        let wanted = &self.ctx.cfg.social.rules;
        let stale: Vec<&str> = active
            .iter()
            .filter(|a| !wanted.iter().any(|w| w.value == a.value && w.tag == a.tag))
            .map(|a| a.id.as_str())
            .collect();
        let missing: Vec<&Rule> = wanted
            .iter()
            .filter(|w| !active.iter().any(|a| w.value == a.value && w.tag == a.tag))
            .collect();
        if !stale.is_empty() {
            let body = json!({ "delete": { "ids": stale } });
            if let Err(e) = self.change_rules("deleting old rules", body).await? {
                return Ok(Some(e));
            }
        }
        if !missing.is_empty() {
            let add: Vec<serde_json::Value> = missing
                .iter()
                .map(|r| match &r.tag {
                    Some(t) => json!({ "value": r.value, "tag": t }),
                    None => json!({ "value": r.value }),
                })
                .collect();
            if let Err(e) = self
                .change_rules("adding rules", json!({ "add": add }))
                .await?
            {
                return Ok(Some(e));
            }
        }
        tracing::info!(
            "publisher {}: X stream rules in place ({} kept, {} added, {} removed)",
            self.ctx.name,
            wanted.len() - missing.len(),
            missing.len(),
            stale.len()
        );
        // Ids are needed only for matches without a tag; list them again.
        let resp = match self.request("listing rules", self.client.get(&url)).await? {
            Ok(r) => r,
            Err(e) => return Ok(Some(e)),
        };
        let ids = json_body::<RuleList>(resp)
            .await
            .ok()
            .and_then(|l| l.data)
            .unwrap_or_default()
            .into_iter()
            .map(|a| {
                let label = a.tag.unwrap_or(a.value);
                (a.id, label)
            })
            .collect();
        self.rule_ids = Some(ids);
        Ok(None)
    }

    async fn change_rules(
        &mut self,
        what: &str,
        body: serde_json::Value,
    ) -> Result<Result<(), Ended>, Failure> {
        let url = format!("{}/2/tweets/search/stream/rules", self.base);
        let resp = match self
            .request(what, self.client.post(&url).json(&body))
            .await?
        {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let change: RuleChange = match json_body(resp).await {
            Ok(c) => c,
            Err(e) => {
                return Ok(Err(Ended::Lost {
                    why: format!("{what}: answer unreadable: {e}"),
                    productive: false,
                }))
            }
        };
        let invalid = change
            .meta
            .as_ref()
            .and_then(|m| m.pointer("/summary/invalid"))
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        if invalid > 0 {
            let errors = change
                .errors
                .map(|e| serde_json::Value::Array(e).to_string())
                .unwrap_or_default();
            return Err(Failure::config(anyhow::anyhow!(
                "publisher {}: X refused {invalid} of social.rules: {}",
                self.ctx.name,
                errors.chars().take(500).collect::<String>()
            )));
        }
        Ok(Ok(()))
    }

    async fn session(&mut self, out: &mut Outlet<'_>) -> Result<Ended, Failure> {
        let ctx = self.ctx;
        let name = &ctx.name;
        if self.rule_ids.is_none() {
            if let Some(e) = self.sync_rules().await? {
                return Ok(e);
            }
        }
        let url = format!(
            "{}/2/tweets/search/stream?tweet.fields=created_at",
            self.base
        );
        let mut resp = match self.request("connecting", self.client.get(&url)).await? {
            Ok(r) => r,
            Err(e) => return Ok(e),
        };
        out.connected();
        tracing::info!("publisher {name}: connected to the X filtered stream");
        let silent = ctx.cfg.social.heartbeat_timeout;
        let mut lines = LineSplitter::new(MAX_LINE);
        let mut productive = false;
        loop {
            let bytes =
                match upstream::next_chunk(ctx, &mut resp, silent, "no keep-alive", productive)
                    .await
                {
                    Ok(b) => b,
                    Err(end) => return Ok(end),
                };
            lines.push(&bytes);
            while let Some(line) = lines.next_line() {
                let line = match line {
                    Line::TooLong => {
                        out.malformed();
                        continue;
                    }
                    Line::Text(t) => t,
                };
                if line.iter().all(u8::is_ascii_whitespace) {
                    productive = true;
                    out.alive();
                    continue;
                }
                match decode(&line, self.rule_ids.as_deref().unwrap_or(&[])) {
                    Ok(Decoded::Posts(envs)) => {
                        productive = true;
                        for env in envs {
                            if !out.offer(env) {
                                return Ok(Ended::Stop);
                            }
                        }
                    }
                    Ok(Decoded::Disconnect(why)) => {
                        return Ok(Ended::Lost {
                            why: format!("was ended by X: {why}"),
                            productive,
                        })
                    }
                    Ok(Decoded::Notice(what)) => {
                        crate::warn_limited!(self.log, || format!(
                            "publisher {name}: X stream reports: {what}"
                        ));
                    }
                    Err(e) => {
                        out.malformed();
                        crate::warn_limited!(self.log, || format!(
                            "publisher {name}: skipping X stream line: {e}"
                        ));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_documented_post_shape() {
        // The shape of the filtered-stream examples in X's documentation.
        let line = br#"{"data":{"created_at":"2022-09-14T18:44:40.000Z","edit_history_tweet_ids":["1570129049470599170"],"id":"1570129049470599170","text":"Bitcoin rally looks strong today"},"matching_rules":[{"id":"1570123385548087297","tag":"btc"}]}"#;
        let Decoded::Posts(envs) = decode(line, &[]).unwrap() else {
            panic!()
        };
        assert_eq!(envs.len(), 1);
        let e = &envs[0];
        assert_eq!(e.topic(), "social.post.btc");
        assert_eq!(e.ts, 1_663_181_080_000_000_000);
        assert_eq!(e.get("rule"), Some(&Value::Str("btc".into())));
        assert_eq!(e.get("words"), Some(&Value::Int(5)));
        assert_eq!(e.get("id"), Some(&Value::Str("1570129049470599170".into())));
        assert!(e.get("score").and_then(Value::as_f64).unwrap() > 0.5);
        // Untagged rules are named by their value through the id.
        let line = br#"{"data":{"id":"1","text":"crash"},"matching_rules":[{"id":"9"}]}"#;
        let Decoded::Posts(envs) = decode(line, &[("9".into(), "eth".into())]).unwrap() else {
            panic!()
        };
        assert_eq!(envs[0].sym, "eth");
        let line = br#"{"errors":[{"title":"operational-disconnect","disconnect_type":"UpstreamOperationalDisconnect","detail":"This stream has been disconnected upstream for operational reasons.","type":"https://api.twitter.com/2/problems/operational-disconnect"}]}"#;
        assert!(matches!(decode(line, &[]), Ok(Decoded::Disconnect(_))));
        assert!(decode(b"{}", &[]).is_err());
        assert!(decode(
            br#"{"data":{"id":"1","text":"x"},"matching_rules":[]}"#,
            &[]
        )
        .is_err());
    }

    #[test]
    fn check_names_missing_keys() {
        let cfg = PublisherConfig {
            feed: super::super::FeedKind::Social,
            ..Default::default()
        };
        let p = check(&cfg).join("\n");
        assert!(
            p.contains("social.bearer_token_file") && p.contains("social.rules"),
            "{p}"
        );
    }
}
