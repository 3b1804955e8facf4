//! `oc-ship` will own the archive (local directory and S3), segment, checkpoint and
//! tail shipping, the lease and epoch store, and point-in-time restore (`oc-pitr`).
//! It holds no tenant state.
//!
//! Not built yet: this crate is a placeholder until the archive issue lands.
#![deny(clippy::unwrap_used)]

pub use oc_engine as engine;
