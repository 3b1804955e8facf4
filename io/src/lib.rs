//! `oc-io` owns the disk: block-aligned buffers, the [`Storage`] abstraction (real
//! O_DIRECT files through glommio, and a simulator with seeded crashes and faults),
//! the write-ahead log with group commit and recovery, and an io_uring probe.
//! It knows nothing of tenants or rows: a frame's tenant tag and payload are bytes.
//!
//! Byte layouts are specified in `docs/FORMAT.md`; the constants here cite it.
#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod buffer;
pub mod dir_lock;
pub mod error;
pub mod executor;
pub mod fail_stop;
pub mod failpoint;
pub mod fuzz_entry;
pub mod malloc_tuning;
pub mod probe;
pub mod storage;
pub mod wal;

pub use buffer::{align_down, align_up, AlignedBuf, IoBuffer, BLOCK_SIZE};
pub use error::{Error, Result};
pub use probe::{probe_io_uring, UringProbe};
pub use storage::{
    seeds_from_env, DmaStorage, SeedGuard, SimFaults, SimRng, SimStorage, Storage, StorageFile,
};
pub use wal::{
    DurableTail, Epoch, Frame, History, LogRead, Lsn, OwnedFrame, Pending, Position, RecordKind,
    RecoveryReport, TimestampMicros, Wal, WalConfig, WalStats,
};
