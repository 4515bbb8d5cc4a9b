//! nbpy: a market-data appliance.
//!
//! Publishers pull prices from venues (or the built-in synthetic feed) and put
//! them on ZeroMQ as [`wire`] envelopes carrying per-publisher sequence numbers.
//! Subscribers decode them, account for every message (gaps are counted, not
//! guessed), map them through the one [`schema`] to InfluxDB line protocol and
//! write them in batches through the [`sink`]. Every long-running binary uses
//! [`service`] for systemd readiness, watchdog, signals and logging, so a stop
//! drains instead of dropping.
//!
//! Modules:
//! - [`config`]: figment layering (defaults < file < `NBPY_*`), validation.
//! - [`wire`]: envelope v1 and the legacy single-frame text codec;
//!   [`v1_encoder`]: the publisher's v1 encoder, from learned layouts.
//! - [`schema`]: the measurements, their tags, fields and retention policy.
//! - [`feeds`]: one module per upstream; [`feeds::synthetic`] is the default.
//! - [`bus`]: ZeroMQ publisher and subscriber sockets, gap accounting;
//!   [`zmtp`]: the bus's own ZMTP 3.0, publishing end (batched writes)
//!   and subscribing end (buffers parsed in place).
//! - [`publisher`] / [`subscriber`]: the two long-running roles.
//! - [`sink`]: line protocol, batching, InfluxDB client.
//! - [`service`]: sd_notify, watchdog, signals, logging.
//! - [`probe`]: `nbpy health-check`, the container image's HEALTHCHECK.
//! - [`exit`]: sysexits-style exit codes and the error type that carries them.
//! - [`units`]: the systemd units (embedded from `systemd/`) and their installer.
//! - [`validate`]: phase 5, reconciling what was published with what was stored.
//! - [`health`]: the health daemon (`/healthz`, `/readyz`, `/status`,
//!   `/metrics`); [`status`]: the same picture in the terminal.

pub mod admin;
pub mod backend;
pub mod bus;
pub mod canonical;
pub mod cli;
pub mod commands;
pub mod config;
pub mod doctor;
pub mod exit;
pub mod feeds;
pub mod health;
pub mod probe;
pub mod publisher;
pub mod schema;
pub mod service;
pub mod sink;
pub mod status;
pub mod subscriber;
pub mod supervisor;
pub mod units;
pub mod v1_encoder;
pub mod validate;
pub mod wire;
pub mod zmtp;
