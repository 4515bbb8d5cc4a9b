//! Phase 2 (InfluxDB schema and retention) and phase 4 (Grafana).

pub mod schema;
