//! `oc-net` owns the HTTP/1.1 API on glommio (hyper), the ops endpoints, Prometheus
//! exposition, configuration and the `oc-server` binary. It contains no storage logic:
//! every request's work runs in `oc-engine` on the tenant's owner shard.
//!
//! Built: the data API (tenants, tables, rows, usage, `/ask`), `/watch` change streams,
//! authentication (admin token, per-tenant API keys, watch tokens) and per-key rate
//! limits, `/health`, `/ready`, `/metrics`, limits and timeouts, TLS (rustls), graceful
//! shutdown, the audit log's API, OTLP export of request spans, and asynchronous
//! replication to read-only followers. Not built yet: synchronous replication, the
//! lease's TTL, promotion and fencing.
#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod announce;
pub mod api;
pub mod auth;
pub mod config;
pub mod fd_limit;
pub mod hyper_glommio;
pub mod listener;
pub mod metrics;
pub mod ops;
pub mod otlp;
pub mod preflight;
pub mod process_stats;
pub mod rate_limit;
pub mod replication;
pub mod server;

pub use config::ServerConfig;
pub use server::run;
