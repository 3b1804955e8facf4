//! The disk seen as one directory of files. Two implementations: [`DmaStorage`] (real
//! O_DIRECT files through glommio) and [`SimStorage`] (memory, with seeded crashes, torn
//! writes, fsync errors and a full disk). The WAL is generic over [`Storage`], so the
//! same code runs in production and in the crash simulator.
//!
//! The contract every implementation keeps, and the WAL relies on:
//! - a write is visible to reads at once, but durable only after `sync` returns Ok, or
//!   when it was made with `write_durable_at` and returned Ok;
//! - a crash may lose, keep or tear (at 512-byte sector granularity) any write not yet
//!   synced, and never touches synced bytes;
//! - a name (create, rename, remove) is durable only after `sync_dir` returns Ok;
//! - `create` reserves a file's whole length (reads return zeroes); it is the caller
//!   who writes real zeroes over it, so that later writes need no metadata update.
//!
//! Futures are `!Send` by design: a shard's storage never leaves its executor.

mod dma;
mod sim;

pub use dma::DmaStorage;
pub use sim::{seeds_from_env, SeedGuard, SimFaults, SimRng, SimStorage};

use crate::buffer::IoBuffer;
use crate::error::Result;

/// A directory of files owned by one shard.
#[allow(
    async_fn_in_trait,
    reason = "single-threaded executors: futures never cross threads"
)]
pub trait Storage: Clone + 'static {
    type File: StorageFile<Buffer = Self::Buffer>;
    type Buffer: IoBuffer + 'static;

    /// An aligned buffer for writes of up to `len` bytes (`len` a block multiple).
    /// The contents are unspecified: callers fill every byte they write.
    fn alloc_buffer(&self, len: usize) -> Self::Buffer;
    /// Creates `name` (which must not exist) with `len` bytes reserved that read as
    /// zero; a full disk fails here. Its size is durable after the file's next `sync`,
    /// its name after [`Storage::sync_dir`].
    async fn create(&self, name: &str, len: u64) -> Result<Self::File>;
    /// Opens an existing file for reading and writing.
    async fn open(&self, name: &str) -> Result<Self::File>;
    /// [`Storage::open`], for a file written with [`StorageFile::write_durable_at`]
    /// (a log segment): storage that can make a write durable as part of the write
    /// itself opens it so.
    async fn open_durable(&self, name: &str) -> Result<Self::File> {
        self.open(name).await
    }
    /// Renames a file; durable after [`Storage::sync_dir`].
    async fn rename(&self, from: &str, to: &str) -> Result<()>;
    /// Removes a file; durable after [`Storage::sync_dir`].
    async fn remove(&self, name: &str) -> Result<()>;
    /// The names of the files in the directory, sorted.
    async fn list(&self) -> Result<Vec<String>>;
    /// Makes creations, renames and removals durable.
    async fn sync_dir(&self) -> Result<()>;
}

/// One open file. Offsets and lengths of writes and reads are block-aligned.
#[allow(
    async_fn_in_trait,
    reason = "single-threaded executors: futures never cross threads"
)]
pub trait StorageFile: 'static {
    type Buffer: IoBuffer;

    /// The file's name inside its storage directory (for error messages).
    fn name(&self) -> &str;
    /// Writes the whole buffer at `offset`; a short write is an error.
    async fn write_at(&self, buf: Self::Buffer, offset: u64) -> Result<()>;
    /// Fills `out` from `offset`; reading past the end of the file is an error.
    async fn read_at(&self, offset: u64, out: &mut [u8]) -> Result<()>;
    /// `fdatasync`: makes every completed write durable.
    async fn sync(&self) -> Result<()>;
    /// Writes the whole buffer at `offset` and makes it durable, as [`write_at`] then
    /// [`sync`] do; a file from [`Storage::open_durable`] may do both in one operation.
    ///
    /// [`write_at`]: StorageFile::write_at
    /// [`sync`]: StorageFile::sync
    async fn write_durable_at(&self, buf: Self::Buffer, offset: u64) -> Result<()> {
        self.write_at(buf, offset).await?;
        self.sync().await
    }
    /// Whether each [`write_durable_at`] is durable on its own completion, whatever the
    /// file's other writes on their way do (one `O_DSYNC` write, not a write and then a
    /// file-wide `fdatasync`, whose error one caller could see and another miss), so
    /// two may be on their way at once.
    ///
    /// [`write_durable_at`]: StorageFile::write_durable_at
    fn durable_writes_independent(&self) -> bool {
        false
    }
    /// The file's length in bytes.
    async fn len(&self) -> Result<u64>;
    /// True when the file has no bytes.
    async fn is_empty(&self) -> Result<bool> {
        Ok(self.len().await? == 0)
    }
}
