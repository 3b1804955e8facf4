//! Checkpoints: a shard's state written to a file, so recovery replays only the log
//! after it (FORMAT.md §6).
//!
//! A checkpoint is *fuzzy*: it records the applied LSN `S` when it starts, then copies
//! tables in chunks, yielding between them, while writes keep being applied. Rows it
//! copies may reflect commands after `S`. Recovery loads it and replays the log from
//! `S + 1`; whole-row upserts and deletes replayed in order converge on the live state
//! whatever mix of before/after values a chunk caught, and a table dropped or created
//! again during the copy stops being copied (the replay rebuilds it).
//!
//! Files: `checkpoint-<S>.snap` (frames in the WAL frame format, every one CRC-checked,
//! zero-padded to a block) and `checkpoint-<S>.json` (the manifest: LSN, size, CRC of
//! the data, tenants, format version). Both are written under `.tmp` names and synced;
//! the manifest is renamed into place last, so a checkpoint without its manifest does
//! not exist. The newest [`KEEP_CHECKPOINTS`] are kept.
//!
//! Every frame is bounded by bytes as well as by entries ([`FRAME_PAYLOAD_BUDGET_BYTES`]):
//! rows may be up to `MAX_ROW_BYTES` each, so a count alone would let a few hundred
//! legal rows build a frame over the format's limit, and the checkpoint would stop the
//! shard instead of covering it. A failed checkpoint removes its temporary files;
//! [`remove_stale_files`] clears what a crash left at open.
//!
//! One file, about 880 lines: the writer and the decoder of one format sit together so
//! every field is encoded and checked in one place (FORMAT.md §6); splitting them is
//! the next step if a format version 2 comes.

mod manifest;
mod pace;

use std::future::Future;
use std::task::Poll;
use std::time::{Duration, Instant};

use oc_io::wal::frame::{
    self, frame_len, Epoch, Frame, Lsn, RecordKind, TimestampMicros, MAX_FRAME_BYTES,
    MAX_TENANT_BYTES,
};
use oc_io::{align_up, IoBuffer, Storage, StorageFile, BLOCK_SIZE};

use crate::api_key::{ApiKey, MAX_API_KEYS_PER_TENANT, MAX_KEY_ID_BYTES, MAX_KEY_NAME_BYTES};
use crate::error::{EngineError, FileProblem, SnapshotProblem, UnreadableFile};
use crate::idempotency::{self, Remembered};
use crate::json_file::JsonFile;
use crate::limits::{MAX_COLUMNS_PER_TABLE, MAX_NAME_BYTES, MAX_ROW_BYTES};
use crate::migration::{self, ActiveMigration, MigrationInfo, MigrationState};
use crate::record::{self, Reader, Writer, SCHEMA_MAX_BYTES};
use crate::shard::ShardState;
use crate::table::{BatchOutcome, RowWrite, Table};
use crate::tenant::Tenant;
use crate::tenant_id::TenantId;

pub use manifest::CheckpointManifest;

/// Version of the snapshot's frame payloads and of the manifest.
pub const CHECKPOINT_FORMAT_VERSION: u8 = 1;
/// Checkpoints kept on disk (the newest, and one to fall back to).
pub const KEEP_CHECKPOINTS: usize = 2;
/// Rows copied per frame at most, and per turn before yielding to the executor.
const ROWS_PER_CHUNK: usize = 256;
/// A rows or idempotency-keys frame takes entries until the next one would carry its
/// payload past this many bytes (FORMAT.md §6). A frame holds at least one entry, so a
/// row larger than the budget still gets a frame of its own. It also bounds what one
/// turn of the copy holds the shard for.
pub const FRAME_PAYLOAD_BUDGET_BYTES: usize = 1 << 20;
/// Payload bytes of a rows frame before its rows: version, table, table version, count.
const ROWS_HEAD_MAX_BYTES: usize = 1 + (2 + MAX_NAME_BYTES) + 8 + 4;
/// Payload bytes of one idempotency entry at most.
const KEY_ENTRY_MAX_BYTES: usize = (2 + idempotency::MAX_KEY_BYTES) + 8 + 8 + 8 + 4 * 4;
/// Payload bytes of one API key entry at most.
const API_KEY_ENTRY_MAX_BYTES: usize = (2 + MAX_KEY_ID_BYTES) + (2 + MAX_KEY_NAME_BYTES) + 32 + 8;
// The largest frame each kind can build stays inside the format's frame limit: a full
// budget, or a lone largest row over it. A row in memory came through a log frame of
// at most MAX_FRAME_BYTES, so even a row from an older, larger limit fits; a row a
// migration converted holds its old values (at most the limit) and its new ones (at
// most the limit again), and NULL in each other slot.
const _: () = assert!(frame_len(MAX_TENANT_BYTES, FRAME_PAYLOAD_BUDGET_BYTES) <= MAX_FRAME_BYTES);
const _: () = assert!(
    frame_len(
        MAX_TENANT_BYTES,
        ROWS_HEAD_MAX_BYTES + 2 + 2 * MAX_ROW_BYTES + 2 * MAX_COLUMNS_PER_TABLE
    ) <= MAX_FRAME_BYTES
);
// The table and API key frames are single frames whose size the limits bound.
const _: () = assert!(1 + 8 + SCHEMA_MAX_BYTES <= FRAME_PAYLOAD_BUDGET_BYTES);
const _: () = assert!(
    1 + 2 + MAX_API_KEYS_PER_TENANT * API_KEY_ENTRY_MAX_BYTES <= FRAME_PAYLOAD_BUDGET_BYTES
);
/// The snapshot is written in aligned chunks of this size... Small, because on a device
/// without FUA every durable log write ends in a cache flush, and the flush carries
/// whatever the checkpoint wrote since the last one: in 256 KiB chunks 1 in 40 to 70 of
/// the log's flushes carried a whole chunk, which is where the log's p99 sat (64
/// writers' p99 with checkpoints ÷ without: 1.41 with 256 KiB, 1.18 with 16 KiB, by the
/// medians of 6 alternated pairs; BENCHMARKS.md "Checkpoint writes in 16 KiB chunks").
const WRITE_CHUNK_BYTES: usize = 16 << 10;
/// A checkpoint is read in reads of this size, this many at a time. One 256 KiB read at
/// a time, a 160 MB snapshot took 200–214 ms of a 0.51–0.57 s restart, 0.8 GB/s from a
/// disk that reads 3 GB/s (BENCHMARKS.md "Checkpoint load: reads in flight").
const READ_CHUNK_BYTES: usize = 1 << 20;
const READS_IN_FLIGHT: usize = 8;
/// ...synced every this many bytes, at the pace [`pace`] sets.
const SYNC_EVERY_BYTES: u64 = 1 << 20;

const KIND_HEADER: RecordKind = RecordKind(16);
const KIND_TENANT: RecordKind = RecordKind(17);
const KIND_TABLE: RecordKind = RecordKind(18);
const KIND_ROWS: RecordKind = RecordKind(19);
const KIND_END: RecordKind = RecordKind(20);
const KIND_KEYS: RecordKind = RecordKind(21);
const KIND_API_KEYS: RecordKind = RecordKind(22);
/// An active migration of the table copied just before it (after its rows), one an
/// earlier build started (it cuts over to the compact layout, `Layout::Compact`).
const KIND_ACTIVE_MIGRATION: RecordKind = RecordKind(23);
/// The same for a migration whose columns keep their slots (`Layout::InPlace`).
const KIND_ACTIVE_MIGRATION_IN_PLACE: RecordKind = RecordKind(25);
/// A tenant's finished migrations.
const KIND_FINISHED_MIGRATIONS: RecordKind = RecordKind(24);
/// Payload bytes of one migration's description at most.
const MIGRATION_INFO_MAX_BYTES: usize = 8
    + (2 + MAX_NAME_BYTES)
    + 4
    + crate::migration::MAX_STEPS_JSON_BYTES
    + 1
    + 1
    + 4
    + 1024
    + 4 * 8;
const _: () = assert!(
    1 + 2 + crate::migration::MIGRATION_HISTORY * MIGRATION_INFO_MAX_BYTES
        <= FRAME_PAYLOAD_BUDGET_BYTES
);
const _: () = assert!(
    1 + 8 + MIGRATION_INFO_MAX_BYTES + 2 * (1 + 4 + crate::limits::MAX_KEY_BYTES)
        <= FRAME_PAYLOAD_BUDGET_BYTES
);
/// Times one table's copy starts again because the table changed incarnation (a
/// cutover) meanwhile, before the checkpoint gives up and is retried later.
const MAX_TABLE_COPY_RESTARTS: usize = 3;
/// Idempotency entries per frame at most.
const KEYS_PER_FRAME: usize = 1000;
const _: () = assert!(1 + 4 + KEY_ENTRY_MAX_BYTES <= FRAME_PAYLOAD_BUDGET_BYTES);

/// What a checkpoint holds and what writing it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointInfo {
    pub lsn: Lsn,
    /// The epoch its shard's log was writing when it was taken.
    pub epoch: Epoch,
    pub data_bytes: u64,
    pub crc: u32,
    pub tenants: usize,
    pub rows: u64,
    pub created: TimestampMicros,
    pub duration: Duration,
}

pub fn snapshot_name(lsn: Lsn) -> String {
    format!("checkpoint-{:016x}.snap", lsn.0)
}

pub fn manifest_name(lsn: Lsn) -> String {
    format!("checkpoint-{:016x}.json", lsn.0)
}

/// The name a file is written under before it is renamed into place.
fn temporary_name(name: &str) -> String {
    format!("{name}.tmp")
}

pub fn parse_manifest_name(name: &str) -> Option<Lsn> {
    let hex = name.strip_prefix("checkpoint-")?.strip_suffix(".json")?;
    (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok().map(Lsn))?
}

/// Frames of a snapshot, streamed to its file in aligned chunks.
struct SnapshotWriter<'a, S: Storage> {
    storage: S,
    file: S::File,
    lsn: Lsn,
    epoch: Epoch,
    pending: Vec<u8>,
    flushed: u64,
    synced: u64,
    crc: u32,
    frames: u32,
    pacer: pace::Pacer<'a>,
}

impl<S: Storage> SnapshotWriter<'_, S> {
    /// Appends one frame. The constants above keep every frame this module builds in
    /// bounds; should one ever not be, the checkpoint fails (and backs off) and the shard
    /// keeps running on its log, rather than `frame::encode` stopping the shard.
    fn push(&mut self, kind: RecordKind, tenant: &[u8], payload: &[u8]) -> Result<(), EngineError> {
        let len = frame_len(tenant.len(), payload.len());
        if len > MAX_FRAME_BYTES {
            return Err(EngineError::LimitExceeded {
                what: "bytes of a checkpoint frame",
                actual: len,
                limit: MAX_FRAME_BYTES,
            });
        }
        let bytes = frame::encode(&Frame {
            lsn: self.lsn,
            commit_ts: TimestampMicros(0),
            epoch: self.epoch,
            group_index: self.frames,
            kind,
            tenant,
            payload,
        });
        self.frames += 1;
        self.crc = crc32c::crc32c_append(self.crc, &bytes);
        self.pending.extend_from_slice(&bytes);
        Ok(())
    }

    /// Writes `len` bytes of `pending` from `from` (zero-padded past its end); the caller
    /// drains what was written.
    async fn write_out(&mut self, from: usize, len: usize) -> Result<(), EngineError> {
        let mut buf = self.storage.alloc_buffer(len);
        let bytes = buf.as_bytes_mut();
        let take = len.min(self.pending.len() - from);
        bytes[..take].copy_from_slice(&self.pending[from..from + take]);
        bytes[take..].fill(0);
        let started = Instant::now();
        self.file.write_at(buf, self.flushed).await?;
        self.flushed += len as u64;
        if self.flushed - self.synced >= SYNC_EVERY_BYTES {
            self.file.sync().await?;
            self.synced = self.flushed;
        }
        let wait = self.pacer.wait_after(len, started, Instant::now());
        if !wait.is_zero() {
            glommio::timer::sleep(wait).await;
        }
        Ok(())
    }

    /// Writes whole chunks once enough frames are pending. Drained once at the end: a
    /// frame of up to a MiB is many chunks, and draining each would move the rest every
    /// time.
    async fn write_full_chunks(&mut self) -> Result<(), EngineError> {
        let mut written = 0;
        while self.pending.len() - written >= WRITE_CHUNK_BYTES {
            self.write_out(written, WRITE_CHUNK_BYTES).await?;
            written += WRITE_CHUNK_BYTES;
        }
        self.pending.drain(..written);
        Ok(())
    }

    /// Writes the rest (zero-padded to a block) and syncs; returns (data bytes, CRC).
    async fn finish(mut self) -> Result<(u64, u32, S::File), EngineError> {
        self.write_full_chunks().await?;
        let data_bytes = self.flushed + self.pending.len() as u64;
        if !self.pending.is_empty() {
            let len = align_up(self.pending.len() as u64) as usize;
            self.write_out(0, len).await?;
        }
        self.file.sync().await?;
        Ok((data_bytes, self.crc, self.file))
    }
}

/// Reads a whole file (its length is a block multiple), [`READS_IN_FLIGHT`] reads at a
/// time.
pub(crate) async fn read_file<S: Storage>(storage: &S, name: &str) -> oc_io::Result<Vec<u8>> {
    let file = storage.open(name).await?;
    let len = file.len().await? as usize;
    if !len.is_multiple_of(oc_io::BLOCK_SIZE) {
        // Direct reads of it would fail with a bare EINVAL.
        return Err(oc_io::Error::Corrupt {
            file: name.to_string(),
            offset: len as u64,
            reason: format!(
                "its length ({len} bytes) is not a whole number of {}-byte blocks: it was cut \
                 short, or written by something other than oc",
                oc_io::BLOCK_SIZE
            ),
        });
    }
    let mut bytes = vec![0u8; len];
    let file = &file;
    let mut reads = bytes
        .chunks_mut(READ_CHUNK_BYTES)
        .enumerate()
        .map(|(i, out)| async move { file.read_at((i * READ_CHUNK_BYTES) as u64, out).await });
    let mut in_flight = Vec::with_capacity(READS_IN_FLIGHT);
    loop {
        while in_flight.len() < READS_IN_FLIGHT {
            let Some(read) = reads.next() else { break };
            in_flight.push(Box::pin(read));
        }
        if in_flight.is_empty() {
            break;
        }
        // Until at least one read completes; a failed read fails the whole file.
        std::future::poll_fn(|cx| {
            let before = in_flight.len();
            let mut i = 0;
            while i < in_flight.len() {
                match in_flight[i].as_mut().poll(cx) {
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => drop(in_flight.swap_remove(i)),
                    Poll::Pending => i += 1,
                }
            }
            if in_flight.len() < before {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        })
        .await?;
    }
    drop((in_flight, reads));
    Ok(bytes)
}

/// Writes a small file (padded with spaces to a block), synced, under `name`.
async fn write_small_file<S: Storage>(
    storage: &S,
    name: &str,
    text: &[u8],
) -> Result<(), EngineError> {
    let len = align_up(text.len() as u64).max(BLOCK_SIZE as u64);
    let file = storage.create(name, len).await?;
    let mut buf = storage.alloc_buffer(len as usize);
    let bytes = buf.as_bytes_mut();
    bytes[..text.len()].copy_from_slice(text);
    bytes[text.len()..].fill(b' ');
    file.write_at(buf, 0).await?;
    file.sync().await?;
    Ok(())
}

async fn remove_if_present<S: Storage>(
    storage: &S,
    names: &[String],
    name: &str,
) -> Result<(), EngineError> {
    if names.iter().any(|n| n == name) {
        storage.remove(name).await?;
    }
    Ok(())
}

/// A frame payload of counted entries: a head, a `u32` count, then the entries; at most
/// `max_entries` of them and, past the first, at most [`FRAME_PAYLOAD_BUDGET_BYTES`].
struct CountedPayload {
    w: Writer,
    count_at: usize,
    count: usize,
    max_entries: usize,
}

impl CountedPayload {
    fn new(head: Writer, max_entries: usize) -> Self {
        let mut w = head;
        let count_at = w.0.len();
        w.u32(0);
        CountedPayload {
            w,
            count_at,
            count: 0,
            max_entries,
        }
    }

    /// Whether an entry of `bytes` more belongs in this payload (the first always does).
    fn has_room(&self, bytes: usize) -> bool {
        self.count == 0
            || (self.count < self.max_entries
                && self.w.0.len() + bytes <= FRAME_PAYLOAD_BUDGET_BYTES)
    }

    /// Adds the entry `write` encodes, which is at most `bytes` long.
    fn add(&mut self, bytes: usize, write: impl FnOnce(&mut Writer)) {
        debug_assert!(self.has_room(bytes));
        let before = self.w.0.len();
        write(&mut self.w);
        debug_assert!(self.w.0.len() - before <= bytes, "entry size miscounted");
        self.count += 1;
    }

    #[expect(
        clippy::expect_used,
        reason = "the frame count is bounded far below u32::MAX"
    )]
    fn finish(mut self) -> Vec<u8> {
        let count = u32::try_from(self.count).expect("max_entries is far below u32::MAX");
        self.w.0[self.count_at..self.count_at + 4].copy_from_slice(&count.to_le_bytes());
        self.w.0
    }
}

/// The next rows frame of `table` after the key `after`: its payload, its row count and
/// the key of its last row; `None` when no row follows `after`.
fn next_rows_frame(
    table: &Table,
    name: &str,
    after: Option<&[u8]>,
    migrating: bool,
) -> Option<(Vec<u8>, usize, Vec<u8>)> {
    let mut head = Writer(vec![CHECKPOINT_FORMAT_VERSION]);
    head.str16(name);
    head.u64(table.version());
    let mut payload = CountedPayload::new(head, ROWS_PER_CHUNK);
    let mut last = None;
    // What no shape reads is left out: a dropped column's values (NULL in their
    // slot), and values a migration appended to a row when none runs on the table
    // any more (it ended without a cutover).
    let slots = if migrating {
        usize::MAX
    } else {
        table.schema().columns.len()
    };
    let dead = table.schema().dead_slots();
    for (key, row) in table.rows_after(after) {
        let bytes = record::row_entry_bytes(row);
        if !payload.has_room(bytes) {
            break;
        }
        payload.add(bytes, |w| w.row_values(row, slots, &dead));
        last = Some(key);
    }
    let last = last?.to_vec();
    let rows = payload.count;
    Some((payload.finish(), rows, last))
}

/// A tenant's idempotency entries, oldest first, as keys-frame payloads.
fn key_payloads(keys: &[(String, Remembered)]) -> Vec<Vec<u8>> {
    let fresh = || CountedPayload::new(Writer(vec![CHECKPOINT_FORMAT_VERSION]), KEYS_PER_FRAME);
    let mut payloads = Vec::new();
    let mut payload = fresh();
    for (key, r) in keys {
        let bytes = (2 + key.len()) + 8 + 8 + 8 + 4 * 4;
        if !payload.has_room(bytes) {
            payloads.push(std::mem::replace(&mut payload, fresh()).finish());
        }
        payload.add(bytes, |w| {
            w.str16(key);
            w.u64(r.request_hash);
            w.u64(r.lsn.0);
            w.u64(r.committed.0);
            for n in [
                r.outcome.inserted,
                r.outcome.updated,
                r.outcome.deleted,
                r.outcome.missing,
            ] {
                w.u32(n as u32);
            }
        });
    }
    if payload.count > 0 {
        payloads.push(payload.finish());
    }
    payloads
}

/// What a checkpoint takes in one step at its LSN, before the copy starts.
struct Capture {
    lsn: Lsn,
    created: TimestampMicros,
    tenants: Vec<TenantId>,
    /// Each tenant's idempotency entries: they must be exactly those applied up to
    /// `lsn`, or replay would skip (as repeats) writes whose rows the copy missed.
    keys: Vec<Vec<(String, Remembered)>>,
    /// Bytes of the tenants' data, to size the snapshot file.
    data_bytes: usize,
}

impl Capture {
    fn take(state: &ShardState) -> Self {
        Capture {
            lsn: state.applied_lsn,
            created: TimestampMicros::now(),
            tenants: state.tenants.keys().cloned().collect(),
            keys: state
                .tenants
                .values()
                .map(|t| {
                    t.idempotency()
                        .entries()
                        .map(|(k, r)| (k.to_string(), *r))
                        .collect()
                })
                .collect(),
            data_bytes: state.tenants.values().map(|t| t.usage().bytes).sum(),
        }
    }
}

/// The log a checkpoint paces itself by ([`pace`]).
pub(crate) struct PaceBy<'a> {
    /// The log's bytes written so far.
    pub log_bytes: &'a dyn Fn() -> u64,
    /// Log bytes between two checkpoints (the scheduler's `wal_bytes`).
    pub log_budget: u64,
}

/// Writes a checkpoint of `state` (read afresh between chunks) at its applied LSN. On
/// failure it removes what the attempt left, so a failing disk does not fill up with
/// partial snapshots, and returns the error.
pub(crate) async fn write_checkpoint<S: Storage>(
    storage: &S,
    state: &std::cell::RefCell<ShardState>,
    shard: u32,
    epoch: Epoch,
    pace_by: PaceBy<'_>,
) -> Result<CheckpointInfo, EngineError> {
    let started = Instant::now();
    let capture = Capture::take(&state.borrow());
    let lsn = capture.lsn;
    let written = write_files(storage, state, shard, epoch, capture, started, pace_by).await;
    if written.is_err() {
        discard_attempt(storage, lsn).await;
    }
    written
}

/// Writes the snapshot and the manifest of `capture`, renames them into place and
/// prunes older checkpoints.
async fn write_files<S: Storage>(
    storage: &S,
    state: &std::cell::RefCell<ShardState>,
    shard: u32,
    epoch: Epoch,
    capture: Capture,
    started: Instant,
    pace_by: PaceBy<'_>,
) -> Result<CheckpointInfo, EngineError> {
    let (lsn, created) = (capture.lsn, capture.created);
    let snap_tmp = temporary_name(&snapshot_name(lsn));
    let manifest_tmp = temporary_name(&manifest_name(lsn));
    let names = storage.list().await?;
    remove_if_present(storage, &names, &snap_tmp).await?;
    remove_if_present(storage, &names, &manifest_tmp).await?;
    let estimate = align_up(capture.data_bytes as u64 + (1 << 20));
    let file = storage.create(&snap_tmp, estimate).await?;
    let mut out = SnapshotWriter {
        storage: storage.clone(),
        file,
        lsn,
        epoch,
        pending: Vec::with_capacity(2 * WRITE_CHUNK_BYTES),
        flushed: 0,
        synced: 0,
        crc: 0,
        frames: 0,
        pacer: pace::Pacer::new(
            pace_by.log_bytes,
            capture.data_bytes as u64,
            pace_by.log_budget,
            Instant::now(),
        ),
    };
    let mut header = Writer(vec![CHECKPOINT_FORMAT_VERSION]);
    header.u32(shard);
    header.u64(created.0);
    out.push(KIND_HEADER, b"", &header.0)?;
    let mut rows_total = 0u64;
    for (tenant, keys) in capture.tenants.iter().zip(&capture.keys) {
        rows_total += copy_tenant(&mut out, state, tenant, keys).await?;
    }
    let mut end = Writer(vec![CHECKPOINT_FORMAT_VERSION]);
    end.u32(out.frames + 1);
    out.push(KIND_END, b"", &end.0)?;
    let (data_bytes, crc, file) = out.finish().await?;
    drop(file);
    // Every row copied was committed before now: point-in-time restore may use this
    // checkpoint for any target at or after it.
    let completed = TimestampMicros::now();

    let manifest = CheckpointManifest {
        completed_us: Some(completed.0),
        crc32c: crc,
        created_us: created.0,
        data_bytes,
        epoch: epoch.0,
        format_version: u64::from(CHECKPOINT_FORMAT_VERSION),
        lsn,
        rows: rows_total,
        shard,
        snapshot: snapshot_name(lsn),
        tenants: capture
            .tenants
            .iter()
            .map(|t| t.as_str().to_string())
            .collect(),
    };
    write_small_file(storage, &manifest_tmp, &manifest.encode()).await?;
    storage.rename(&snap_tmp, &snapshot_name(lsn)).await?;
    storage.rename(&manifest_tmp, &manifest_name(lsn)).await?;
    storage.sync_dir().await?;
    prune_old_checkpoints(storage).await?;
    Ok(CheckpointInfo {
        lsn,
        epoch,
        data_bytes,
        crc,
        tenants: capture.tenants.len(),
        rows: rows_total,
        created,
        duration: started.elapsed(),
    })
}

/// Copies one tenant: its tenant, API key and idempotency frames, then its tables in
/// turns, yielding between them. Returns the rows copied.
async fn copy_tenant<S: Storage>(
    out: &mut SnapshotWriter<'_, S>,
    state: &std::cell::RefCell<ShardState>,
    tenant: &TenantId,
    keys: &[(String, Remembered)],
) -> Result<u64, EngineError> {
    let tag = tenant.as_str().as_bytes();
    // API keys, like rows, are taken as they are now: replaying the log from the
    // checkpoint's LSN re-applies or refuses each key command, converging either way.
    let (tables, api_keys, created): (Vec<(String, u64)>, Vec<u8>, u64) =
        match state.borrow().tenants.get(tenant) {
            Some(t) => (
                t.tables()
                    .map(|t| (t.schema().name.clone(), t.version()))
                    .collect(),
                encode_api_keys(t),
                t.created_lsn(),
            ),
            None => return Ok(0), // dropped meanwhile: the replay drops it too
        };
    let mut head = vec![CHECKPOINT_FORMAT_VERSION];
    head.extend_from_slice(&created.to_le_bytes());
    out.push(KIND_TENANT, tag, &head)?;
    out.push(KIND_API_KEYS, tag, &api_keys)?;
    for payload in key_payloads(keys) {
        out.push(KIND_KEYS, tag, &payload)?;
    }
    let mut rows = 0;
    for (table, version) in tables {
        rows += copy_table(out, state, tenant, &table, version).await?;
    }
    // Finished migrations as they are now, after the tables: a migration that ended
    // during the copy is listed, and the replay's records for it change nothing.
    let finished = match state.borrow().tenants.get(tenant) {
        Some(t) => encode_finished_migrations(t),
        None => return Ok(rows),
    };
    out.push(KIND_FINISHED_MIGRATIONS, tag, &finished)?;
    Ok(rows)
}

fn encode_migration_info(w: &mut Writer, info: &MigrationInfo) {
    w.u64(info.id);
    w.str16(&info.table);
    w.bytes32(crate::migration::steps_json(&info.steps).as_bytes());
    w.u8(info.state.code());
    match &info.reason {
        Some(why) => {
            w.u8(1);
            w.bytes32(why.as_bytes());
        }
        None => w.u8(0),
    }
    w.u64(info.started.0);
    w.u64(info.finished.0);
    w.u64(info.rows_total);
    w.u64(info.rows_done);
}

fn decode_migration_info(r: &mut Reader<'_>) -> Result<MigrationInfo, SnapshotProblem> {
    let id = r.u64()?;
    let table = r.str16()?;
    let json = r.bytes32()?;
    let steps = crate::migration::parse_steps(json)
        .map_err(|why| r.error(format!("bad migration steps: {why}")))?;
    let code = r.u8()?;
    let state = MigrationState::from_code(code)
        .ok_or_else(|| r.error(format!("bad migration state {code}")))?;
    let reason = match r.u8()? {
        0 => None,
        1 => {
            let b = r.bytes32()?;
            Some(r.utf8(b)?)
        }
        other => return Err(r.error(format!("bad reason flag {other}")).into()),
    };
    Ok(MigrationInfo {
        id,
        table,
        steps,
        state,
        reason,
        started: TimestampMicros(r.u64()?),
        finished: TimestampMicros(r.u64()?),
        rows_total: r.u64()?,
        rows_done: r.u64()?,
    })
}

fn optional_key(w: &mut Writer, key: Option<&[u8]>) {
    match key {
        Some(k) => {
            w.u8(1);
            w.bytes32(k);
        }
        None => w.u8(0),
    }
}

fn read_optional_key(r: &mut Reader<'_>) -> Result<Option<Vec<u8>>, SnapshotProblem> {
    match r.u8()? {
        0 => Ok(None),
        1 => Ok(Some(r.bytes32()?.to_vec())),
        other => Err(r.error(format!("bad key flag {other}")).into()),
    }
}

/// A tenant's finished migrations as a checkpoint record (FORMAT.md §6).
fn encode_finished_migrations(tenant: &Tenant) -> Vec<u8> {
    let mut w = Writer(vec![CHECKPOINT_FORMAT_VERSION]);
    let finished: Vec<&MigrationInfo> = tenant.migrations().finished().collect();
    w.count16(finished.len());
    for info in finished {
        encode_migration_info(&mut w, info);
    }
    w.0
}

/// The active migration of a table as a checkpoint record: its description, the
/// table incarnation it migrates, its cursor and end key (FORMAT.md §6).
fn encode_active_migration(m: &ActiveMigration) -> (RecordKind, Vec<u8>) {
    let mut w = Writer(vec![CHECKPOINT_FORMAT_VERSION]);
    w.u64(m.table_version);
    encode_migration_info(&mut w, &m.info);
    optional_key(&mut w, m.cursor());
    optional_key(&mut w, m.end_key());
    let kind = match m.layout() {
        migration::Layout::InPlace => KIND_ACTIVE_MIGRATION_IN_PLACE,
        migration::Layout::Compact => KIND_ACTIVE_MIGRATION,
    };
    (kind, w.0)
}

/// Copies one table: its schema frame, one rows frame per turn, then the migration
/// active on it when the copy began, if it still is. Stops early when the table is dropped (the replay
/// drops it too). When the table becomes another incarnation meanwhile (created again,
/// or a migration cut over), the copy starts again with a new table frame, which
/// replaces the first when loaded: a cutover replayed over a half-copied base would
/// otherwise lose the rows the copy had not reached.
async fn copy_table<S: Storage>(
    out: &mut SnapshotWriter<'_, S>,
    state: &std::cell::RefCell<ShardState>,
    tenant: &TenantId,
    table: &str,
    mut version: u64,
) -> Result<u64, EngineError> {
    let tag = tenant.as_str().as_bytes();
    let mut after: Option<Vec<u8>> = None;
    let mut first = true;
    let mut rows_total = 0u64;
    let mut restarts = 0;
    // The migration active on the table when its copy began: its id and record.
    let mut active: Option<(u64, (RecordKind, Vec<u8>))> = None;
    loop {
        let frame = {
            let s = state.borrow();
            let Some(t) = s.tenants.get(tenant) else {
                break;
            };
            let Ok(base) = t.table(table) else {
                break;
            };
            if base.version() != version {
                restarts += 1;
                if restarts > MAX_TABLE_COPY_RESTARTS {
                    return Err(EngineError::Replay {
                        lsn: 0,
                        why: format!(
                            "table {table:?} changed incarnation {restarts} times during the \
                             checkpoint; the checkpoint is retried later"
                        ),
                    });
                }
                version = base.version();
                first = true;
                after = None;
                rows_total = 0;
            }
            if first {
                let mut w = Writer(vec![CHECKPOINT_FORMAT_VERSION]);
                w.u64(version);
                w.schema(base.schema());
                out.push(KIND_TABLE, tag, &w.0)?;
                active = t
                    .migrations()
                    .active(table)
                    .map(|m| (m.info.id, encode_active_migration(m)));
                first = false;
            }
            let migrating = t.migrations().active(table).is_some();
            next_rows_frame(base, table, after.as_deref(), migrating)
        };
        let Some((payload, rows, last)) = frame else {
            // Only a migration still active now: one that ended during the copy is in
            // the tenant's finished list, and rows written after its end may not be
            // in its shape.
            let still_active = |id: u64| {
                state.borrow().tenants.get(tenant).is_some_and(|t| {
                    t.migrations()
                        .active(table)
                        .is_some_and(|m| m.info.id == id)
                })
            };
            if let Some((id, (kind, record))) = &active {
                if still_active(*id) {
                    out.push(*kind, tag, record)?;
                }
            }
            break;
        };
        out.push(KIND_ROWS, tag, &payload)?;
        after = Some(last);
        rows_total += rows as u64;
        out.write_full_chunks().await?;
        // Let writes and reads run between chunks.
        futures_lite::future::yield_now().await;
    }
    Ok(rows_total)
}

/// Keeps the newest checkpoints; older ones go, manifest first.
async fn prune_old_checkpoints<S: Storage>(storage: &S) -> Result<(), EngineError> {
    let mut kept = list_checkpoints(storage).await?;
    if kept.len() > KEEP_CHECKPOINTS {
        for old in kept.split_off(KEEP_CHECKPOINTS) {
            storage.remove(&manifest_name(old)).await?;
            let names = storage.list().await?;
            remove_if_present(storage, &names, &snapshot_name(old)).await?;
        }
        storage.sync_dir().await?;
    }
    Ok(())
}

/// Whether `name` is what an interrupted checkpoint leaves: a temporary file, or a
/// snapshot without its manifest (a checkpoint exists only once its manifest does).
fn is_stale(name: &str, names: &[String]) -> bool {
    let Some(rest) = name.strip_prefix("checkpoint-") else {
        return false;
    };
    if rest.ends_with(".tmp") {
        return true;
    }
    rest.strip_suffix(".snap")
        .is_some_and(|hex| !names.iter().any(|n| *n == format!("checkpoint-{hex}.json")))
}

/// Removes what interrupted checkpoints left behind (see [`is_stale`]); run at open,
/// before any checkpoint starts. Returns the names removed.
pub(crate) async fn remove_stale_files<S: Storage>(
    storage: &S,
) -> Result<Vec<String>, EngineError> {
    let names = storage.list().await?;
    let stale: Vec<String> = names
        .iter()
        .filter(|n| is_stale(n, &names))
        .cloned()
        .collect();
    for name in &stale {
        storage.remove(name).await?;
    }
    if !stale.is_empty() {
        storage.sync_dir().await?;
    }
    Ok(stale)
}

/// Removes what a failed attempt at `lsn` left: its temporary files, and its snapshot
/// if it was renamed into place without its manifest. Best effort: the storage may be
/// what failed, and whatever stays is removed at the next open.
async fn discard_attempt<S: Storage>(storage: &S, lsn: Lsn) {
    let outcome = async {
        let names = storage.list().await?;
        let mut doomed = vec![
            temporary_name(&snapshot_name(lsn)),
            temporary_name(&manifest_name(lsn)),
        ];
        if !names.contains(&manifest_name(lsn)) {
            doomed.push(snapshot_name(lsn));
        }
        for name in &doomed {
            remove_if_present(storage, &names, name).await?;
        }
        storage.sync_dir().await?;
        Ok::<(), EngineError>(())
    };
    if let Err(e) = outcome.await {
        tracing::warn!(error = %e, lsn = lsn.0, "could not remove a failed checkpoint's files; the next open will");
    }
}

/// LSNs of the checkpoints whose manifest exists, newest first.
pub(crate) async fn list_checkpoints<S: Storage>(storage: &S) -> Result<Vec<Lsn>, EngineError> {
    let mut lsns: Vec<Lsn> = storage
        .list()
        .await?
        .iter()
        .filter_map(|n| parse_manifest_name(n))
        .collect();
    lsns.sort_by(|a, b| b.cmp(a));
    Ok(lsns)
}

/// Loads the checkpoint at `lsn`, checking the manifest, the data CRC and every frame;
/// returns the state and what the manifest says of the checkpoint. The error names
/// the file that is wrong and what in it.
/// Sets the checkpoint at `lsn` aside as `diverged-<name>` (a returning ex-writer's
/// checkpoint past where its history left the writer's): nothing lists, loads, prunes
/// or ships it again. The manifest goes first: a crash before the snapshot follows
/// leaves a snapshot without a manifest, which the next open removes.
pub(crate) async fn set_aside<S: Storage>(storage: &S, lsn: Lsn) -> Result<(), EngineError> {
    for name in [manifest_name(lsn), snapshot_name(lsn)] {
        storage.rename(&name, &format!("diverged-{name}")).await?;
    }
    storage.sync_dir().await?;
    Ok(())
}

pub(crate) async fn load_checkpoint<S: Storage>(
    storage: &S,
    lsn: Lsn,
) -> Result<(ShardState, CheckpointInfo), UnreadableFile> {
    let read = |name: String| async move {
        read_file(storage, &name).await.map_err(|e| UnreadableFile {
            file: name.clone(),
            problem: FileProblem::Io(e),
        })
    };
    let manifest = read(manifest_name(lsn)).await?;
    let snapshot = read(snapshot_name(lsn)).await?;
    decode_checkpoint(&manifest, &snapshot, lsn)
}

/// A checkpoint from the bytes of its manifest and snapshot files (what
/// [`load_checkpoint`] reads; `oc-ctl` reads them without opening a shard).
pub fn decode_checkpoint(
    manifest: &[u8],
    snapshot: &[u8],
    lsn: Lsn,
) -> Result<(ShardState, CheckpointInfo), UnreadableFile> {
    let unreadable = |file: String, problem: FileProblem| UnreadableFile { file, problem };
    let manifest = CheckpointManifest::decode_for(manifest, lsn)
        .map_err(|problem| unreadable(manifest_name(lsn), problem))?;
    let data = manifest
        .check_snapshot(snapshot)
        .map_err(|problem| unreadable(snapshot_name(lsn), problem))?;
    let state =
        decode_snapshot(data, lsn).map_err(|problem| unreadable(snapshot_name(lsn), problem))?;
    // Descriptive fields only: the data checked above decides whether the checkpoint is
    // usable. `completed_us` is optional (FORMAT.md §6).
    let created = manifest.created_us;
    let completed = manifest.completed_us.unwrap_or(created);
    let info = CheckpointInfo {
        lsn,
        epoch: Epoch(manifest.epoch),
        data_bytes: manifest.data_bytes,
        crc: manifest.crc32c,
        tenants: state.tenants.len(),
        rows: manifest.rows,
        created: TimestampMicros(created),
        duration: Duration::from_micros(completed.saturating_sub(created)),
    };
    Ok((state, info))
}

/// Rebuilds a shard state from snapshot frames; an error names the frame's offset.
pub(crate) fn decode_snapshot(data: &[u8], lsn: Lsn) -> Result<ShardState, FileProblem> {
    let mut state = ShardState {
        applied_lsn: lsn,
        ..ShardState::default()
    };
    let mut pos = 0;
    let mut index = 0u32;
    let mut ended = false;
    while pos < data.len() {
        let at = |problem: SnapshotProblem| FileProblem::Frame {
            offset: pos,
            problem,
        };
        let f = frame::decode(&data[pos..]).map_err(|e| at(SnapshotProblem::Frame(e)))?;
        // The overlapped flag belongs to log segments only (FORMAT.md §2).
        if frame::is_overlapped(&data[pos..]) {
            return Err(at(SnapshotProblem::Frame(frame::FrameError::BadFlags(
                frame::FLAG_OVERLAPPED,
            ))));
        }
        if f.lsn != lsn || f.group_index != index {
            return Err(at(SnapshotProblem::OutOfPlace {
                lsn: f.lsn,
                index: f.group_index,
                expected_lsn: lsn,
                expected_index: index,
            }));
        }
        if ended {
            return Err(at(SnapshotProblem::AfterEnd));
        }
        if decode_frame(&mut state, &f, index).map_err(at)? {
            ended = true;
        }
        pos += f.len();
        index += 1;
    }
    if !ended {
        return Err(FileProblem::NoEndRecord);
    }
    Ok(state)
}

/// Applies one snapshot frame (the `index`th) to `state`; true for the end record.
fn decode_frame(
    state: &mut ShardState,
    f: &Frame<'_>,
    index: u32,
) -> Result<bool, SnapshotProblem> {
    let refused = |e: EngineError| SnapshotProblem::Refused(Box::new(e));
    let mut r = Reader::new(f.kind, f.payload);
    let version = r.u8()?;
    if version != CHECKPOINT_FORMAT_VERSION {
        return Err(SnapshotProblem::UnknownVersion(version));
    }
    let tenant = || {
        std::str::from_utf8(f.tenant)
            .ok()
            .and_then(|t| TenantId::parse(t).ok())
            .ok_or(SnapshotProblem::BadTenant)
    };
    let mut ended = false;
    match f.kind {
        KIND_HEADER if index == 0 => {
            r.u32()?;
            r.u64()?;
        }
        KIND_TENANT => {
            let id = tenant()?;
            // The creating LSN follows the version in checkpoints that record it.
            let created = if r.remaining() > 0 { r.u64()? } else { 0 };
            state
                .tenants
                .insert(id.clone(), Tenant::created_at(id, created));
        }
        KIND_TABLE => {
            let version = r.u64()?;
            let schema = r.schema()?;
            let upto = state.applied_lsn;
            let t = state
                .tenants
                .get_mut(&tenant()?)
                .ok_or(SnapshotProblem::BeforeTenant("table"))?;
            let name = schema.name.clone();
            // A table copied again after a cutover during the copy: the later copy wins.
            t.forget_table_for_reload(&name);
            t.create_table(schema, version).map_err(refused)?;
            // Its last write is not recorded, only that it came at or before the
            // checkpoint (an emptied table has no rows frame to say so).
            t.table_loaded_at(&name, upto).map_err(refused)?;
        }
        KIND_ROWS => {
            let table = r.str16()?;
            let version = r.u64()?;
            let count = r.u32()? as usize;
            // Loaded rows were last written at or before the checkpoint's LSN.
            let upto = state.applied_lsn;
            let t = state
                .tenants
                .get_mut(&tenant()?)
                .ok_or(SnapshotProblem::BeforeTenant("rows"))?;
            // A table's active migration comes after all its rows: it is attached to
            // them as they are.
            if t.migrations().active(&table).is_some() {
                return Err(r
                    .error(format!(
                        "rows of table {table:?} after its active migration"
                    ))
                    .into());
            }
            // Reserve by the bytes left in this frame (a row takes at least its
            // two-byte value count), never by the claimed count or the snapshot.
            let mut rows = Vec::with_capacity(count.min(r.remaining() / 2));
            for _ in 0..count {
                rows.push(RowWrite::Upsert(r.row()?));
            }
            // Each row's width and values are checked there.
            t.load_rows(&table, version, rows, upto).map_err(refused)?;
        }
        KIND_KEYS => {
            let count = r.u32()? as usize;
            let t = state
                .tenants
                .get_mut(&tenant()?)
                .ok_or(SnapshotProblem::BeforeTenant("keys"))?;
            for _ in 0..count {
                let key = r.str16()?;
                let request_hash = r.u64()?;
                let lsn = Lsn(r.u64()?);
                let committed = TimestampMicros(r.u64()?);
                let mut n = [0usize; 4];
                for x in &mut n {
                    *x = r.u32()? as usize;
                }
                let outcome = BatchOutcome {
                    inserted: n[0],
                    updated: n[1],
                    deleted: n[2],
                    missing: n[3],
                };
                let entry = Remembered {
                    request_hash,
                    lsn,
                    outcome,
                    committed,
                };
                t.idempotency_mut().remember(key, entry);
            }
        }
        KIND_API_KEYS => {
            let count = r.u16()? as usize;
            let t = state
                .tenants
                .get_mut(&tenant()?)
                .ok_or(SnapshotProblem::BeforeTenant("API keys"))?;
            for _ in 0..count {
                let key_id = r.str16()?;
                let key = ApiKey {
                    name: r.str16()?,
                    secret_sha256: r.array()?,
                    created: TimestampMicros(r.u64()?),
                };
                t.api_keys_mut().insert(key_id, key).map_err(refused)?;
            }
        }
        KIND_ACTIVE_MIGRATION | KIND_ACTIVE_MIGRATION_IN_PLACE => {
            let layout = if f.kind == KIND_ACTIVE_MIGRATION {
                migration::Layout::Compact
            } else {
                migration::Layout::InPlace
            };
            let table_version = r.u64()?;
            let info = decode_migration_info(&mut r)?;
            let cursor = read_optional_key(&mut r)?;
            let end_key = read_optional_key(&mut r)?;
            if !info.state.is_active() {
                return Err(r
                    .error("an active migration in a finished state".into())
                    .into());
            }
            let upto = state.applied_lsn;
            let t = state
                .tenants
                .get_mut(&tenant()?)
                .ok_or(SnapshotProblem::BeforeTenant("migration"))?;
            if t.migrations().active(&info.table).is_some() {
                return Err(r
                    .error(format!(
                        "a second active migration of table {:?}",
                        info.table
                    ))
                    .into());
            }
            migration::restore_active(t, info, table_version, cursor, end_key, layout, upto)
                .map_err(refused)?;
        }
        KIND_FINISHED_MIGRATIONS => {
            let count = r.u16()? as usize;
            let t = state
                .tenants
                .get_mut(&tenant()?)
                .ok_or(SnapshotProblem::BeforeTenant("migrations"))?;
            for _ in 0..count {
                let info = decode_migration_info(&mut r)?;
                if info.state.is_active() {
                    return Err(r
                        .error("a finished migration in an active state".into())
                        .into());
                }
                t.migrations_mut().remember(info);
            }
        }
        KIND_END => {
            let counted = r.u32()?;
            if counted != index + 1 {
                return Err(SnapshotProblem::EndCount {
                    counted,
                    frames: index + 1,
                });
            }
            ended = true;
        }
        other => return Err(SnapshotProblem::UnknownKind(other.0)),
    }
    r.finish()?;
    Ok(ended)
}

/// One tenant's API keys as a checkpoint record (FORMAT.md §6).
fn encode_api_keys(tenant: &Tenant) -> Vec<u8> {
    let mut w = Writer(vec![CHECKPOINT_FORMAT_VERSION]);
    w.count16(tenant.api_keys().len());
    for (key_id, key) in tenant.api_keys().iter() {
        w.str16(key_id);
        w.str16(&key.name);
        w.0.extend_from_slice(&key.secret_sha256);
        w.u64(key.created.0);
    }
    w.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::{ColumnType, Value};

    const LSN: Lsn = Lsn(40);

    /// Frames `records` (kind, tenant, payload) as a snapshot at [`LSN`], between a
    /// header and an end frame.
    fn snapshot(records: &[(RecordKind, &[u8], Vec<u8>)]) -> Vec<u8> {
        let mut header = Writer(vec![CHECKPOINT_FORMAT_VERSION]);
        header.u32(0);
        header.u64(0);
        let mut end = Writer(vec![CHECKPOINT_FORMAT_VERSION]);
        end.u32(records.len() as u32 + 2);
        let all = std::iter::once((KIND_HEADER, &b""[..], header.0))
            .chain(records.iter().map(|(k, t, p)| (*k, *t, p.clone())))
            .chain(std::iter::once((KIND_END, &b""[..], end.0)));
        let mut out = Vec::new();
        for (index, (kind, tenant, payload)) in all.enumerate() {
            out.extend_from_slice(&frame::encode(&Frame {
                lsn: LSN,
                commit_ts: TimestampMicros(0),
                epoch: Epoch(1),
                group_index: index as u32,
                kind,
                tenant,
                payload: &payload,
            }));
        }
        out
    }

    fn table_frame() -> Vec<u8> {
        let schema = crate::schema::TableSchema::new(
            "kv",
            &[("k", ColumnType::Int, false), ("v", ColumnType::Int, true)],
            &["k"],
            &[],
        )
        .expect("valid");
        let mut w = Writer(vec![CHECKPOINT_FORMAT_VERSION]);
        w.u64(3);
        w.schema(&schema);
        w.0
    }

    fn rows_frame(keys: std::ops::Range<i64>) -> Vec<u8> {
        let mut w = Writer(vec![CHECKPOINT_FORMAT_VERSION]);
        w.str16("kv");
        w.u64(3);
        w.u32(keys.clone().count() as u32);
        for k in keys {
            w.row(&crate::row::Row::from_values(&[
                Value::Int(k),
                Value::Int(k),
            ]));
        }
        w.0
    }

    fn active_frame(id: u64) -> Vec<u8> {
        let mut w = Writer(vec![CHECKPOINT_FORMAT_VERSION]);
        w.u64(3);
        let steps = crate::migration::parse_steps(
            br#"[{"op":"add_column","name":"d","type":"int","default":"v * 2"}]"#,
        )
        .expect("steps");
        encode_migration_info(
            &mut w,
            &MigrationInfo {
                id,
                table: "kv".into(),
                steps,
                state: MigrationState::Pending,
                reason: None,
                started: TimestampMicros(1),
                finished: TimestampMicros(0),
                rows_total: 4,
                rows_done: 0,
            },
        );
        optional_key(&mut w, None);
        optional_key(&mut w, Some(&crate::value::encode_key([&Value::Int(3)])));
        w.0
    }

    fn load(records: &[(RecordKind, &[u8], Vec<u8>)]) -> Result<ShardState, FileProblem> {
        decode_snapshot(&snapshot(records), LSN)
    }

    /// A tenant record holds the tenant's creating LSN after the version byte; one
    /// written before that (the version byte alone) loads with it unknown (0).
    #[test]
    fn a_tenant_record_keeps_the_creating_lsn_and_loads_without_it() {
        let tenant = &b"acme"[..];
        let id = TenantId::parse("acme").expect("valid");
        let mut now = vec![CHECKPOINT_FORMAT_VERSION];
        now.extend_from_slice(&17u64.to_le_bytes());
        let state = load(&[(KIND_TENANT, tenant, now)]).expect("loads");
        assert_eq!(state.tenants[&id].created_lsn(), 17);
        let before = vec![CHECKPOINT_FORMAT_VERSION];
        let state = load(&[(KIND_TENANT, tenant, before)]).expect("loads");
        assert_eq!(state.tenants[&id].created_lsn(), 0);
        let mut torn = vec![CHECKPOINT_FORMAT_VERSION];
        torn.extend_from_slice(&[1, 2, 3]);
        assert!(
            load(&[(KIND_TENANT, tenant, torn)]).is_err(),
            "a part of a u64"
        );
    }

    /// What the writer writes loads; a second active migration of the table, or rows
    /// of it after its migration (which would be stored past the migration's say), do
    /// not.
    #[test]
    fn one_active_migration_per_table_after_all_its_rows() {
        let tenant = &b"acme"[..];
        let version = vec![CHECKPOINT_FORMAT_VERSION];
        let good = [
            (KIND_TENANT, tenant, version.clone()),
            (KIND_TABLE, tenant, table_frame()),
            (KIND_ROWS, tenant, rows_frame(0..4)),
            (KIND_ACTIVE_MIGRATION_IN_PLACE, tenant, active_frame(30)),
        ];
        let state = load(&good).expect("the writer's layout loads");
        let id = TenantId::parse("acme").expect("valid");
        assert!(state.tenants[&id].migrations().active("kv").is_some());

        let mut twice = good.to_vec();
        twice.push((KIND_ACTIVE_MIGRATION, tenant, active_frame(31)));
        let refused = load(&twice).expect_err("a second active migration");
        assert!(
            refused.to_string().contains("a second active migration"),
            "{refused}"
        );

        let mut late_rows = good.to_vec();
        late_rows.push((KIND_ROWS, tenant, rows_frame(4..6)));
        let refused = load(&late_rows).expect_err("rows after the migration");
        assert!(
            refused.to_string().contains("after its active migration"),
            "{refused}"
        );
    }
}
