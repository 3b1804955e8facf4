//! `oc-ship` owns the archive (local directory and S3), segment, checkpoint and tail
//! shipping, and point-in-time restore (`oc-pitr`). It holds no tenant state.
//!
//! The archive's owner record ([`lease`]) is the replication lease: it names the one
//! data directory that writes an archive and the process holding it, which renews it
//! while it runs and stops writing when another copy takes it; a promotion takes it
//! with the next epoch and ships under that epoch's prefix, a new history
//! ([`timeline`]) that restores follow. A restore starts a new epoch in the data
//! directory it writes (FORMAT.md §7).
#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod archive;
pub mod audit;
pub mod breaker;
pub mod catalog;
pub mod drill;
pub mod layout;
pub mod lease;
pub mod replay;
pub mod restore;
pub mod shipper;
pub mod timeline;
pub mod timestamp;
