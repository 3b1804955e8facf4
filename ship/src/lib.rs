//! `oc-ship` will own the archive (local directory and S3), segment, checkpoint and
//! tail shipping, the lease and epoch store, and point-in-time restore (`oc-pitr`).
//! It holds no tenant state.
//!
//! Built so far: the archive trait, its checksummed object envelope and the local
//! directory archive. Not built yet: S3, shipping, leases, restore (the archive issue
//! is open).
#![deny(clippy::unwrap_used)]

pub mod archive;

pub use oc_engine as engine;
