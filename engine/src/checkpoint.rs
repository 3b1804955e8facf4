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

use std::time::{Duration, Instant};

use oc_io::wal::frame::{self, Epoch, Frame, Lsn, RecordKind, TimestampMicros};
use oc_io::{align_up, IoBuffer, Storage, StorageFile, BLOCK_SIZE};

use crate::api_key::ApiKey;
use crate::error::EngineError;
use crate::idempotency::Remembered;
use crate::record::{Reader, Writer};
use crate::shard::ShardState;
use crate::table::{BatchOutcome, RowWrite};
use crate::tenant::Tenant;
use crate::tenant_id::TenantId;

/// Version of the snapshot's frame payloads and of the manifest.
pub const CHECKPOINT_FORMAT_VERSION: u8 = 1;
/// Checkpoints kept on disk (the newest, and one to fall back to).
pub const KEEP_CHECKPOINTS: usize = 2;
/// Rows copied per frame, and per turn before yielding to the executor.
const ROWS_PER_CHUNK: usize = 256;
/// The snapshot is written in aligned chunks of this size...
const WRITE_CHUNK_BYTES: usize = 256 << 10;
/// ...synced every this many bytes...
const SYNC_EVERY_BYTES: u64 = 1 << 20;
/// ...at no more than this rate (bytes per second). Every group commit's fdatasync
/// also flushes whatever the checkpoint wrote since the last flush: written flat out,
/// a 40 MB checkpoint raised the log's p99 from 1.4 ms to 35 ms (`oc-bench engine`).
const WRITE_BYTES_PER_S: f64 = 32e6;

const KIND_HEADER: RecordKind = RecordKind(16);
const KIND_TENANT: RecordKind = RecordKind(17);
const KIND_TABLE: RecordKind = RecordKind(18);
const KIND_ROWS: RecordKind = RecordKind(19);
const KIND_END: RecordKind = RecordKind(20);
const KIND_KEYS: RecordKind = RecordKind(21);
const KIND_API_KEYS: RecordKind = RecordKind(22);
/// Idempotency entries per frame.
const KEYS_PER_FRAME: usize = 1000;

/// What a checkpoint holds and what writing it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointInfo {
    pub lsn: Lsn,
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

fn parse_manifest_name(name: &str) -> Option<Lsn> {
    let hex = name.strip_prefix("checkpoint-")?.strip_suffix(".json")?;
    (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok().map(Lsn))?
}

/// Frames of a snapshot, streamed to its file in aligned chunks.
struct SnapshotWriter<S: Storage> {
    storage: S,
    file: S::File,
    lsn: Lsn,
    epoch: Epoch,
    pending: Vec<u8>,
    flushed: u64,
    synced: u64,
    crc: u32,
    frames: u32,
    started: Instant,
}

impl<S: Storage> SnapshotWriter<S> {
    fn push(&mut self, kind: RecordKind, tenant: &[u8], payload: &[u8]) {
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
    }

    async fn write_out(&mut self, len: usize) -> Result<(), EngineError> {
        let mut buf = self.storage.alloc_buffer(len);
        let bytes = buf.as_bytes_mut();
        let take = len.min(self.pending.len());
        bytes[..take].copy_from_slice(&self.pending[..take]);
        bytes[take..].fill(0);
        self.file.write_at(buf, self.flushed).await?;
        self.pending.drain(..take);
        self.flushed += len as u64;
        if self.flushed - self.synced >= SYNC_EVERY_BYTES {
            self.file.sync().await?;
            self.synced = self.flushed;
        }
        let due = self.flushed as f64 / WRITE_BYTES_PER_S;
        let elapsed = self.started.elapsed().as_secs_f64();
        if due > elapsed {
            glommio::timer::sleep(Duration::from_secs_f64(due - elapsed)).await;
        }
        Ok(())
    }

    /// Writes whole chunks once enough frames are pending.
    async fn write_full_chunks(&mut self) -> Result<(), EngineError> {
        while self.pending.len() >= WRITE_CHUNK_BYTES {
            self.write_out(WRITE_CHUNK_BYTES).await?;
        }
        Ok(())
    }

    /// Writes the rest (zero-padded to a block) and syncs; returns (data bytes, CRC).
    async fn finish(mut self) -> Result<(u64, u32, S::File), EngineError> {
        self.write_full_chunks().await?;
        let data_bytes = self.flushed + self.pending.len() as u64;
        if !self.pending.is_empty() {
            let len = align_up(self.pending.len() as u64) as usize;
            self.write_out(len).await?;
        }
        self.file.sync().await?;
        Ok((data_bytes, self.crc, self.file))
    }
}

/// Reads a whole file (its length is a block multiple).
async fn read_file<S: Storage>(storage: &S, name: &str) -> Result<Vec<u8>, EngineError> {
    let file = storage.open(name).await?;
    let len = file.len().await? as usize;
    let mut bytes = vec![0u8; len];
    let mut at = 0;
    while at < len {
        let chunk = (len - at).min(WRITE_CHUNK_BYTES);
        file.read_at(at as u64, &mut bytes[at..at + chunk]).await?;
        at += chunk;
    }
    Ok(bytes)
}

/// Writes a small file (padded with spaces to a block), synced, under `name`.
async fn write_small_file<S: Storage>(
    storage: &S,
    name: &str,
    text: &str,
) -> Result<(), EngineError> {
    let len = align_up(text.len() as u64).max(BLOCK_SIZE as u64);
    let file = storage.create(name, len).await?;
    let mut buf = storage.alloc_buffer(len as usize);
    let bytes = buf.as_bytes_mut();
    bytes[..text.len()].copy_from_slice(text.as_bytes());
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

/// Writes a checkpoint of `state` (read afresh between chunks) at its applied LSN.
pub(crate) async fn write_checkpoint<S: Storage>(
    storage: &S,
    state: &std::cell::RefCell<ShardState>,
    shard: u32,
    epoch: Epoch,
) -> Result<CheckpointInfo, EngineError> {
    let started = Instant::now();
    let created = TimestampMicros::now();
    // Taken in one step at `lsn`: the idempotency keys must be exactly those applied up
    // to `lsn`, or replay would skip (as repeats) writes whose rows the copy missed.
    let (lsn, tenants, keys, estimate) = {
        let s = state.borrow();
        let bytes: usize = s.tenants.values().map(|t| t.usage().bytes).sum();
        let keys: Vec<Vec<(String, Remembered)>> = s
            .tenants
            .values()
            .map(|t| {
                t.idempotency()
                    .entries()
                    .map(|(k, r)| (k.to_string(), *r))
                    .collect()
            })
            .collect();
        (
            s.applied_lsn,
            s.tenants.keys().cloned().collect::<Vec<_>>(),
            keys,
            bytes,
        )
    };
    let snap_tmp = format!("{}.tmp", snapshot_name(lsn));
    let manifest_tmp = format!("{}.tmp", manifest_name(lsn));
    let names = storage.list().await?;
    remove_if_present(storage, &names, &snap_tmp).await?;
    remove_if_present(storage, &names, &manifest_tmp).await?;
    let estimate = align_up(estimate as u64 + (1 << 20));
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
        started: Instant::now(),
    };
    let mut header = Writer(vec![CHECKPOINT_FORMAT_VERSION]);
    header.u32(shard);
    header.u64(created.0);
    out.push(KIND_HEADER, b"", &header.0);

    let mut rows_total = 0u64;
    for (tenant, keys) in tenants.iter().zip(&keys) {
        // API keys, like rows, are taken as they are now: replaying the log from the
        // checkpoint's LSN re-applies or refuses each key command, converging either way.
        let (tables, api_keys): (Vec<(String, u64)>, Vec<u8>) =
            match state.borrow().tenants.get(tenant) {
                Some(t) => (
                    t.tables()
                        .map(|t| (t.schema().name.clone(), t.version()))
                        .collect(),
                    encode_api_keys(t),
                ),
                None => continue, // dropped meanwhile: the replay drops it too
            };
        out.push(
            KIND_TENANT,
            tenant.as_str().as_bytes(),
            &[CHECKPOINT_FORMAT_VERSION],
        );
        out.push(KIND_API_KEYS, tenant.as_str().as_bytes(), &api_keys);
        for chunk in keys.chunks(KEYS_PER_FRAME) {
            let mut w = Writer(vec![CHECKPOINT_FORMAT_VERSION]);
            w.u32(chunk.len() as u32);
            for (key, r) in chunk {
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
            }
            out.push(KIND_KEYS, tenant.as_str().as_bytes(), &w.0);
        }
        for (table, version) in tables {
            let mut after: Option<Vec<u8>> = None;
            let mut first = true;
            loop {
                let chunk = {
                    let s = state.borrow();
                    let Some(t) = s.tenants.get(tenant).and_then(|t| t.table(&table).ok()) else {
                        break;
                    };
                    if t.version() != version {
                        break; // created again meanwhile: the replay rebuilds it
                    }
                    if first {
                        let mut w = Writer(vec![CHECKPOINT_FORMAT_VERSION]);
                        w.u64(version);
                        w.schema(t.schema());
                        out.push(KIND_TABLE, tenant.as_str().as_bytes(), &w.0);
                        first = false;
                    }
                    t.chunk_after(after.as_deref(), ROWS_PER_CHUNK)
                };
                let Some((last, _)) = chunk.last() else {
                    break;
                };
                after = Some(last.clone());
                let mut w = Writer(vec![CHECKPOINT_FORMAT_VERSION]);
                w.str16(&table);
                w.u64(version);
                w.u32(chunk.len() as u32);
                for (_, row) in &chunk {
                    w.u16(row.len() as u16);
                    for v in row {
                        w.value(v);
                    }
                }
                out.push(KIND_ROWS, tenant.as_str().as_bytes(), &w.0);
                rows_total += chunk.len() as u64;
                out.write_full_chunks().await?;
                // Let writes and reads run between chunks.
                futures_lite::future::yield_now().await;
            }
        }
    }
    let mut end = Writer(vec![CHECKPOINT_FORMAT_VERSION]);
    end.u32(out.frames + 1);
    out.push(KIND_END, b"", &end.0);
    let (data_bytes, crc, file) = out.finish().await?;
    drop(file);
    // Every row copied was committed before now: point-in-time restore may use this
    // checkpoint for any target at or after it.
    let completed = TimestampMicros::now();

    let manifest = serde_json::json!({
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "shard": shard,
        "lsn": lsn.0,
        "epoch": epoch.0,
        "created_us": created.0,
        "completed_us": completed.0,
        "snapshot": snapshot_name(lsn),
        "data_bytes": data_bytes,
        "crc32c": crc,
        "rows": rows_total,
        "tenants": tenants.iter().map(TenantId::as_str).collect::<Vec<_>>(),
    });
    write_small_file(storage, &manifest_tmp, &manifest.to_string()).await?;
    storage.rename(&snap_tmp, &snapshot_name(lsn)).await?;
    storage.rename(&manifest_tmp, &manifest_name(lsn)).await?;
    storage.sync_dir().await?;

    // Keep the newest checkpoints; older ones go, manifest first.
    let mut kept = list_checkpoints(storage).await?;
    if kept.len() > KEEP_CHECKPOINTS {
        for old in kept.split_off(KEEP_CHECKPOINTS) {
            storage.remove(&manifest_name(old)).await?;
            let names = storage.list().await?;
            remove_if_present(storage, &names, &snapshot_name(old)).await?;
        }
        storage.sync_dir().await?;
    }
    Ok(CheckpointInfo {
        lsn,
        data_bytes,
        crc,
        tenants: tenants.len(),
        rows: rows_total,
        created,
        duration: started.elapsed(),
    })
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

/// Loads the checkpoint at `lsn`, checking the manifest, the data CRC and every frame.
pub(crate) async fn load_checkpoint<S: Storage>(
    storage: &S,
    lsn: Lsn,
) -> Result<ShardState, String> {
    let manifest = read_file(storage, &manifest_name(lsn))
        .await
        .map_err(|e| e.to_string())?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&manifest).map_err(|e| format!("manifest is not JSON: {e}"))?;
    let field = |name: &str| {
        manifest
            .get(name)
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| format!("manifest lacks {name}"))
    };
    if field("format_version")? != u64::from(CHECKPOINT_FORMAT_VERSION) {
        return Err(format!(
            "unsupported checkpoint version {}",
            field("format_version")?
        ));
    }
    if field("lsn")? != lsn.0 {
        return Err("manifest LSN does not match its name".into());
    }
    let data_bytes = field("data_bytes")? as usize;
    let bytes = read_file(storage, &snapshot_name(lsn))
        .await
        .map_err(|e| e.to_string())?;
    let data = bytes.get(..data_bytes).ok_or_else(|| {
        format!(
            "snapshot has {} bytes, manifest says {data_bytes}",
            bytes.len()
        )
    })?;
    let crc = crc32c::crc32c(data);
    if u64::from(crc) != field("crc32c")? {
        return Err(format!(
            "snapshot crc {crc:#010x} does not match the manifest"
        ));
    }
    decode_snapshot(data, lsn)
}

/// Rebuilds a shard state from snapshot frames.
pub(crate) fn decode_snapshot(data: &[u8], lsn: Lsn) -> Result<ShardState, String> {
    let mut state = ShardState {
        applied_lsn: lsn,
        ..ShardState::default()
    };
    let mut pos = 0;
    let mut index = 0u32;
    let mut ended = false;
    while pos < data.len() {
        let f = frame::decode(&data[pos..]).map_err(|e| format!("frame at {pos}: {e}"))?;
        if f.lsn != lsn || f.group_index != index {
            return Err(format!("frame at {pos} is out of place"));
        }
        if ended {
            return Err(format!("frame at {pos} follows the end record"));
        }
        let mut r = Reader::new(f.kind, f.payload);
        let bad = |e: crate::record::RecordError| e.to_string();
        if r.u8().map_err(bad)? != CHECKPOINT_FORMAT_VERSION {
            return Err(format!("frame at {pos} has an unknown version"));
        }
        let tenant = || {
            std::str::from_utf8(f.tenant)
                .ok()
                .and_then(|t| TenantId::parse(t).ok())
                .ok_or_else(|| format!("frame at {pos} has a bad tenant tag"))
        };
        match f.kind {
            KIND_HEADER if index == 0 => {
                r.u32().map_err(bad)?;
                r.u64().map_err(bad)?;
            }
            KIND_TENANT => {
                let id = tenant()?;
                state.tenants.insert(id.clone(), Tenant::new(id));
            }
            KIND_TABLE => {
                let version = r.u64().map_err(bad)?;
                let schema = r.schema().map_err(bad)?;
                let t = state
                    .tenants
                    .get_mut(&tenant()?)
                    .ok_or("table before its tenant")?;
                t.create_table(schema, version).map_err(|e| e.to_string())?;
            }
            KIND_ROWS => {
                let table = r.str16().map_err(bad)?;
                let version = r.u64().map_err(bad)?;
                let count = r.u32().map_err(bad)? as usize;
                let t = state
                    .tenants
                    .get_mut(&tenant()?)
                    .ok_or("rows before their tenant")?;
                let columns = t
                    .table(&table)
                    .map_err(|e| e.to_string())?
                    .schema()
                    .columns
                    .len();
                // Reserve by the bytes left in this frame (a row takes at least its
                // two-byte value count), never by the claimed count or the snapshot.
                let mut rows = Vec::with_capacity(count.min(r.remaining() / 2));
                for _ in 0..count {
                    let n = r.u16().map_err(bad)? as usize;
                    if n != columns {
                        return Err(format!(
                            "a row of {table:?} has {n} values, the table {columns} columns"
                        ));
                    }
                    let row = (0..n)
                        .map(|_| r.value())
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(bad)?;
                    rows.push(RowWrite::Upsert(row));
                }
                t.apply_writes(&table, version, rows)
                    .map_err(|e| e.to_string())?;
            }
            KIND_KEYS => {
                let count = r.u32().map_err(bad)? as usize;
                let t = state
                    .tenants
                    .get_mut(&tenant()?)
                    .ok_or("keys before their tenant")?;
                for _ in 0..count {
                    let key = r.str16().map_err(bad)?;
                    let request_hash = r.u64().map_err(bad)?;
                    let lsn = Lsn(r.u64().map_err(bad)?);
                    let committed = TimestampMicros(r.u64().map_err(bad)?);
                    let mut n = [0usize; 4];
                    for x in &mut n {
                        *x = r.u32().map_err(bad)? as usize;
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
                let count = r.u16().map_err(bad)? as usize;
                let t = state
                    .tenants
                    .get_mut(&tenant()?)
                    .ok_or("API keys before their tenant")?;
                for _ in 0..count {
                    let key_id = r.str16().map_err(bad)?;
                    let key = ApiKey {
                        name: r.str16().map_err(bad)?,
                        secret_sha256: r.array().map_err(bad)?,
                        created: TimestampMicros(r.u64().map_err(bad)?),
                    };
                    t.api_keys_mut()
                        .insert(key_id, key)
                        .map_err(|e| e.to_string())?;
                }
            }
            KIND_END => {
                if r.u32().map_err(bad)? != index + 1 {
                    return Err("end record counts a different number of frames".into());
                }
                ended = true;
            }
            other => return Err(format!("unexpected record kind {} at {pos}", other.0)),
        }
        r.finish().map_err(bad)?;
        pos += f.len();
        index += 1;
    }
    if !ended {
        return Err("snapshot has no end record".into());
    }
    Ok(state)
}

/// One tenant's API keys as a checkpoint record (FORMAT.md §6).
fn encode_api_keys(tenant: &Tenant) -> Vec<u8> {
    let mut w = Writer(vec![CHECKPOINT_FORMAT_VERSION]);
    w.u16(tenant.api_keys().len() as u16);
    for (key_id, key) in tenant.api_keys().iter() {
        w.str16(key_id);
        w.str16(&key.name);
        w.0.extend_from_slice(&key.secret_sha256);
        w.u64(key.created.0);
    }
    w.0
}
