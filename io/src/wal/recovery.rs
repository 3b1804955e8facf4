//! Opening a log after a stop or a crash: read the segments in LSN order, validate
//! every CRC, hand each frame to the caller, repair a torn tail and refuse corruption.
//!
//! Rules (ARCHITECTURE.md, FORMAT.md §4):
//! - Segments must chain: each starts at the LSN after the previous one's last frame,
//!   and every segment but the last must be sealed.
//! - A torn tail in the last segment is cut off: the bytes after the last valid frame
//!   are zeroed on disk (so stale frames can never reappear after new writes), and the
//!   cut is reported.
//! - Damage followed by valid data is corruption: opening fails naming the file and the
//!   offset, unless the operator asked to truncate there.
//! - A last segment whose header never became durable holds no acknowledged frame (the
//!   header is synced before any frame is written) and is removed, even when it holds
//!   older frames from a recycled file.

use super::frame::{self, Epoch, Frame, Lsn, TimestampMicros};
use super::scan::{scan_segment, ScanEnd};
use super::segment::{
    parse_segment_name, SegmentHeader, DATA_START, RECYCLED_NAME, SPARE_PARTIAL_NAME,
    SPARE_READY_NAME,
};
use super::WalConfig;
use crate::buffer::{align_down, align_up, IoBuffer, BLOCK_SIZE};
use crate::error::{Error, Result};
use crate::storage::{Storage, StorageFile};

/// Segments are read in chunks of this size.
const READ_CHUNK_BYTES: usize = 1 << 20;
/// Repairs write zeroes in chunks of this size.
const ZERO_CHUNK_BYTES: usize = 1 << 20;

/// Bytes cut from the end of the log during recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailCut {
    pub file: String,
    /// Offset of the first byte that was not a valid frame.
    pub offset: u64,
    pub reason: String,
    /// Bytes zeroed on disk after `offset`.
    pub bytes_zeroed: u64,
}

/// What recovery found and did; the server logs it at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segments kept, oldest first.
    pub segments: Vec<String>,
    pub bytes_scanned: u64,
    pub frames_scanned: u64,
    /// Frames handed to the caller (those at or after the requested LSN).
    pub frames_replayed: u64,
    pub first_lsn: Option<Lsn>,
    /// LSN of the last valid frame (0 for an empty log).
    pub last_lsn: Lsn,
    pub last_commit_ts: TimestampMicros,
    /// Epoch of the newest segment (0 for an empty log).
    pub last_epoch: Epoch,
    /// A torn tail that was cut (normal after a crash).
    pub torn_tail: Option<TailCut>,
    /// Corruption that was cut because the operator asked for it.
    pub truncated_corruption: Option<TailCut>,
    /// Files removed: a half-made spare, an empty last segment, segments after a cut.
    pub removed: Vec<String>,
}

/// A segment the log keeps, with its first LSN (for releasing old segments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SegmentInfo {
    pub name: String,
    pub first_lsn: Lsn,
}

/// Where the writer continues.
pub(crate) struct Resume<F> {
    pub segments: Vec<SegmentInfo>,
    pub active: Option<ActiveSegment<F>>,
    pub next_lsn: Lsn,
    pub last_commit_ts: TimestampMicros,
    /// A zero-filled spare segment left by the previous run.
    pub spare: Option<F>,
    /// A released segment left by the previous run, ready to be recycled.
    pub recycled: bool,
}

/// The segment the writer appends to.
pub(crate) struct ActiveSegment<F> {
    pub file: F,
    pub header: SegmentHeader,
    /// Where the next group goes (block-aligned).
    pub write_offset: u64,
    /// CRC32C of `[DATA_START, write_offset)`.
    pub data_crc: u32,
    pub last_lsn: Lsn,
    pub last_commit_ts: TimestampMicros,
    pub sealed: bool,
}

async fn read_whole<F: StorageFile>(file: &F, out: &mut Vec<u8>) -> Result<()> {
    let len = file.len().await?;
    if len % BLOCK_SIZE as u64 != 0 {
        return Err(Error::Corrupt {
            file: file.name().to_string(),
            offset: len,
            reason: "segment length is not a whole number of blocks".into(),
        });
    }
    out.clear();
    out.resize(len as usize, 0);
    let mut at = 0;
    while at < out.len() {
        let chunk = (out.len() - at).min(READ_CHUNK_BYTES);
        file.read_at(at as u64, &mut out[at..at + chunk]).await?;
        at += chunk;
    }
    Ok(())
}

/// Zeroes `[valid_end, end of the nonzero bytes)` on disk and in `bytes`, then syncs.
/// Returns the number of bytes zeroed.
async fn zero_tail<S: Storage>(
    storage: &S,
    file: &S::File,
    bytes: &mut [u8],
    valid_end: u64,
    limit: u64,
) -> Result<u64> {
    let tail = &bytes[valid_end as usize..limit as usize];
    let Some(last_nonzero) = tail.iter().rposition(|&b| b != 0) else {
        return Ok(0);
    };
    let zero_end = align_up(valid_end + last_nonzero as u64 + 1);
    bytes[valid_end as usize..zero_end as usize].fill(0);
    // Rewrite the block holding the cut with its valid prefix, then whole zero blocks.
    let mut at = align_down(valid_end);
    while at < zero_end {
        let len = ((zero_end - at) as usize).min(ZERO_CHUNK_BYTES);
        let mut buf = storage.alloc_buffer(len);
        buf.as_bytes_mut()
            .copy_from_slice(&bytes[at as usize..at as usize + len]);
        file.write_at(buf, at).await?;
        at += len as u64;
    }
    file.sync().await?;
    Ok(zero_end - valid_end)
}

/// Reads and repairs the log, calling `on_frame` for every frame with LSN ≥ `replay_from`.
pub(crate) async fn recover<S: Storage>(
    storage: &S,
    config: &WalConfig,
    replay_from: Lsn,
    mut on_frame: impl FnMut(&Frame<'_>) -> std::result::Result<(), String>,
) -> Result<(RecoveryReport, Resume<S::File>)> {
    let mut report = RecoveryReport::default();
    let mut names = Vec::new();
    let mut spare = None;
    let mut recycled = false;
    for name in storage.list().await? {
        if name == RECYCLED_NAME {
            recycled = true;
            continue;
        }
        if name == SPARE_READY_NAME {
            let file = storage.open(&name).await?;
            if file.len().await? == config.segment_bytes {
                spare = Some(file);
                continue;
            }
            drop(file);
            storage.remove(&name).await?;
            report.removed.push(name);
        } else if name == SPARE_PARTIAL_NAME {
            storage.remove(&name).await?;
            report.removed.push(name);
        } else if let Some((shard, epoch, first_lsn)) = parse_segment_name(&name) {
            if shard != config.shard {
                return Err(Error::Config(format!(
                    "segment {name} belongs to shard {shard}, not {}",
                    config.shard
                )));
            }
            names.push((name, epoch, first_lsn));
        }
    }

    let mut bytes = Vec::new();
    let mut segments = Vec::new();
    let mut active: Option<ActiveSegment<S::File>> = None;
    let mut next_lsn: Option<Lsn> = None;
    let mut last_epoch = Epoch(0);
    let count = names.len();
    let mut index = 0;
    while index < count {
        let (name, name_epoch, name_lsn) = &names[index];
        let is_last = index + 1 == count;
        let file = storage.open(name).await?;
        read_whole(&file, &mut bytes).await?;
        report.bytes_scanned += bytes.len() as u64;
        let corrupt = |offset: u64, reason: String| Error::Corrupt {
            file: name.clone(),
            offset,
            reason,
        };

        let header = match SegmentHeader::decode(&bytes) {
            Ok(h) => h,
            Err(err) => {
                // Headers are synced before any frame, so a file without one holds no
                // acknowledged frame — unless its first block is a real group start with
                // the LSN its name promises (then the header was damaged later). Older
                // frames of a recycled file do not count.
                let real_frames = bytes
                    .get(DATA_START as usize..)
                    .and_then(|data| frame::decode(data).ok())
                    .is_some_and(|f| f.lsn == *name_lsn && f.group_index == 0);
                if is_last && !real_frames {
                    drop(file);
                    storage.remove(name).await?;
                    report.removed.push(name.clone());
                    break;
                }
                return Err(corrupt(
                    0,
                    format!("segment header unreadable ({err:?}) but frames follow"),
                ));
            }
        };
        if header.epoch != *name_epoch
            || header.first_lsn != *name_lsn
            || header.shard != config.shard
        {
            return Err(corrupt(
                0,
                "segment header does not match its file name".into(),
            ));
        }
        if header.capacity_bytes != bytes.len() as u64 {
            return Err(corrupt(
                0,
                format!(
                    "header says {} bytes, file has {}",
                    header.capacity_bytes,
                    bytes.len()
                ),
            ));
        }
        match next_lsn {
            None if header.first_lsn > replay_from.max(Lsn(1)) => {
                return Err(Error::MissingFrames {
                    wanted: replay_from,
                    first_available: header.first_lsn,
                })
            }
            Some(expected) if header.first_lsn != expected => {
                return Err(corrupt(
                    0,
                    format!(
                        "segment starts at LSN {} but the previous one ended before {}",
                        header.first_lsn, expected
                    ),
                ))
            }
            _ => {}
        }
        if header.epoch < last_epoch {
            return Err(corrupt(
                0,
                format!("epoch {} after epoch {}", header.epoch.0, last_epoch.0),
            ));
        }

        let scan = scan_segment(&bytes, &header, |frame, _| {
            if frame.lsn >= replay_from {
                report.frames_replayed += 1;
                on_frame(frame).map_err(|reason| Error::Corrupt {
                    file: name.clone(),
                    offset: 0,
                    reason: format!("replay of LSN {} refused: {reason}", frame.lsn),
                })?;
            }
            Ok::<(), Error>(())
        })?;
        report.frames_scanned += scan.frames;
        report.first_lsn.get_or_insert(header.first_lsn);
        report.last_lsn = scan.last_lsn;
        if scan.frames > 0 {
            report.last_commit_ts = scan.last_commit_ts;
        }
        last_epoch = scan.last_epoch.max(header.epoch);

        let (sealed, cut) = match scan.end {
            ScanEnd::Sealed(_) => (true, None),
            ScanEnd::Clean | ScanEnd::Full if is_last => (false, None),
            ScanEnd::Clean | ScanEnd::Full => {
                return Err(corrupt(
                    header.footer_offset(),
                    "segment is not sealed but a later segment exists".into(),
                ));
            }
            ScanEnd::Torn { offset, reason } if is_last => (false, Some((offset, reason, false))),
            ScanEnd::Torn { offset, reason } | ScanEnd::Corrupt { offset, reason } => {
                if !config.truncate_corrupt {
                    return Err(corrupt(
                        offset,
                        format!(
                            "{reason}; valid data follows, so this is corruption, not a torn write \
                             (start with the truncate option to cut the log here, losing what follows)"
                        ),
                    ));
                }
                (false, Some((offset, reason, true)))
            }
        };

        let write_offset = align_up(scan.valid_end);
        if let Some((offset, reason, is_corruption)) = cut {
            // A torn group can only have touched its own extent: at most the header's
            // max group bytes plus the zero block after it. A cut for corruption wipes
            // the whole rest of the file, footer included (valid newer frames lie there).
            let limit = if is_corruption {
                header.capacity_bytes
            } else {
                let extent = u64::from(header.max_group_bytes) + BLOCK_SIZE as u64;
                (write_offset + extent).min(header.footer_offset())
            };
            let zeroed = zero_tail(storage, &file, &mut bytes, scan.valid_end, limit).await?;
            let cut = TailCut {
                file: name.clone(),
                offset,
                reason,
                bytes_zeroed: zeroed,
            };
            tracing::warn!(file = %cut.file, offset, bytes_zeroed = zeroed, reason = %cut.reason, "cut the end of the write-ahead log");
            if is_corruption {
                report.truncated_corruption = Some(cut);
                for (later, _, _) in &names[index + 1..] {
                    storage.remove(later).await?;
                    report.removed.push(later.clone());
                }
                storage.sync_dir().await?;
                index = count - 1;
            } else {
                report.torn_tail = Some(cut);
            }
        }

        segments.push(SegmentInfo {
            name: name.clone(),
            first_lsn: header.first_lsn,
        });
        next_lsn = Some(scan.last_lsn.next());
        let data_crc = crc32c::crc32c(&bytes[DATA_START as usize..write_offset as usize]);
        active = Some(ActiveSegment {
            file,
            header,
            write_offset,
            data_crc,
            last_lsn: scan.last_lsn,
            last_commit_ts: scan.last_commit_ts,
            sealed,
        });
        index += 1;
    }
    if !report.removed.is_empty() {
        storage.sync_dir().await?;
    }

    if last_epoch > config.epoch {
        return Err(Error::StaleEpoch {
            configured: config.epoch,
            in_log: last_epoch,
        });
    }
    let next_lsn = match next_lsn {
        Some(next) if next < replay_from => {
            return Err(Error::LogTooShort {
                wanted: replay_from,
                last_in_log: Lsn(next.0 - 1),
            })
        }
        Some(next) => next,
        None => replay_from.max(Lsn(1)),
    };
    report.segments = segments.iter().map(|s| s.name.clone()).collect();
    let last_commit_ts = report.last_commit_ts;
    report.last_epoch = last_epoch;
    Ok((
        report,
        Resume {
            segments,
            active,
            next_lsn,
            last_commit_ts,
            spare,
            recycled,
        },
    ))
}
