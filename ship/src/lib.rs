//! `oc-ship` owns the archive (local directory and S3), segment, checkpoint and tail
//! shipping, and point-in-time restore (`oc-pitr`). It holds no tenant state.
//!
//! Not built yet: the lease and epoch store (the replication issue).
#![deny(clippy::unwrap_used)]

pub mod archive;
pub mod breaker;
pub mod catalog;
pub mod layout;
pub mod restore;
pub mod shipper;
pub mod timestamp;

pub use oc_engine as engine;
