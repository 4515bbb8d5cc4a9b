//! Phase 2: the database and its retention policies, from the schema.

use crate::schema::rp;
use crate::sink::influx::{InfluxClient, WriteError};

/// A retention policy as declared.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub name: &'static str,
    pub duration: &'static str,
    pub shard: &'static str,
    pub default: bool,
}

/// The declared policies (DESIGN.md: default 30d/1d, high_frequency 7d/1h,
/// long_term 365d/7d).
pub fn policies() -> Vec<Policy> {
    vec![
        Policy {
            name: rp::DEFAULT,
            duration: "30d",
            shard: "1d",
            default: true,
        },
        Policy {
            name: rp::HIGH_FREQUENCY,
            duration: "7d",
            shard: "1h",
            default: false,
        },
        Policy {
            name: rp::LONG_TERM,
            duration: "365d",
            shard: "7d",
            default: false,
        },
    ]
}

/// Creates the database and any missing retention policy. Idempotent.
pub async fn ensure(client: &InfluxClient) -> Result<(), WriteError> {
    let db = client.database().replace('"', "\\\"");
    client.query(&format!("CREATE DATABASE \"{db}\"")).await?;
    for p in policies() {
        let q = format!(
            "CREATE RETENTION POLICY \"{}\" ON \"{db}\" DURATION {} REPLICATION 1 SHARD DURATION {}{}",
            p.name,
            p.duration,
            p.shard,
            if p.default { " DEFAULT" } else { "" }
        );
        client.query(&q).await?;
    }
    Ok(())
}
