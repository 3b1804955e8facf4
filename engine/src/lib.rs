//! `oc-engine` will own shards and routing, the tenant state machine (schemas, tables,
//! rows, indexes, vectors), commands ↔ WAL records, checkpoints, recovery, and the
//! query engine behind `/ask`. It speaks neither HTTP nor S3.
//!
//! Not built yet: this crate is a placeholder until the engine issue lands.
#![deny(clippy::unwrap_used)]

pub use oc_io as io;
