//! Phase 2 (InfluxDB schema and retention) and phase 4 (Grafana), both
//! derived from [`crate::schema::MEASUREMENTS`].

pub mod cli;
pub mod grafana;
pub mod influxql;
pub mod schema;
