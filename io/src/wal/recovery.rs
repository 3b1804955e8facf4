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
//!   offset, unless the operator asked to truncate there. The one exception is a
//!   single group marked overlapped right after the damage, which was on its way with
//!   the damaged group (`scan`, FORMAT.md §4): that is a torn tail of two groups.
//! - A last segment whose header never became durable holds no acknowledged frame (the
//!   header is synced before any frame is written) and is removed, even when it holds
//!   older frames from a recycled file.
//! - The next segment is made before the active one is sealed, and the seal says so:
//!   an unsealed segment followed by an empty last one is a crash between the two, and
//!   the empty one is removed; a last segment sealed with that flag means the newest
//!   segment was lost, and opening fails unless the operator asked to truncate.

use std::rc::Rc;

use super::frame::{self, Epoch, Frame, Lsn, TimestampMicros};
use super::history::{History, Position};
use super::scan::{scan_segment, ScanEnd, GROUPS_IN_FLIGHT};
use super::segment::{
    footer_version, footer_without_successor, header_version, parse_segment_name, segment_name,
    SegmentFooter, SegmentHeader, DATA_START, MIN_SEGMENT_BYTES, RECYCLED_NAME,
    SEGMENT_FORMAT_VERSION, SPARE_PARTIAL_NAME, SPARE_READY_NAME,
};
use super::WalConfig;
use crate::buffer::{align_down, align_up, IoBuffer, BLOCK_SIZE};
use crate::error::{Error, Result};
use crate::storage::{Storage, StorageFile};

/// Segments are read in chunks of this size.
const READ_CHUNK_BYTES: usize = 1 << 20;
/// A segment's cut copy before it replaces the segment (removed at open if left).
const CUT_SUFFIX: &str = ".cut.tmp";
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
    /// Sealed segments wholly before the replay point, checked by their header and
    /// footer alone: their frames are checked after the open
    /// (`Wal::check_unread_segments`) and by every read that passes them.
    pub segments_not_read: u64,
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
    /// A segment a crash left empty (and the one before it unsealed) while the log was
    /// rotating into it: removed, and the one before stays the active segment.
    pub unfinished_rotation: Option<String>,
    /// Where the log left the writer's history and was cut (a returning ex-writer).
    pub history_cut: Option<HistoryCut>,
}

/// Frames cut because they are not on the writer's history (`WalConfig::history`):
/// never acknowledged under synchronous replication that refuses on timeout (though
/// readable on the old writer), possibly acknowledged otherwise. They are kept, not
/// destroyed: every segment holding one is set aside whole as
/// `diverged-at-<lsn>-<segment name>` beside the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryCut {
    /// The first frame cut.
    pub lsn: Lsn,
    pub epoch: Epoch,
    /// The files set aside, oldest first.
    pub set_aside: Vec<String>,
}

/// The name `segment`, holding frames off the writer's history from `lsn` on, is set
/// aside under.
pub fn set_aside_name(lsn: Lsn, segment: &str) -> String {
    format!("diverged-at-{}-{segment}", lsn.0)
}

/// A segment the log keeps, with its first LSN (for releasing old segments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SegmentInfo {
    pub name: String,
    pub first_lsn: Lsn,
    /// Where each of its groups starts (first LSN, offset), oldest first: a read starts
    /// at the last one at or before the LSN it wants, not at the segment's first frame
    /// (which made every round of a follower's stream re-read the segment so far). At
    /// most one per block of the segment.
    pub group_starts: Vec<(Lsn, u64)>,
    /// Recovery did not read the segment, so `group_starts` holds only the starts
    /// reads have passed since (readers add them, in order).
    pub starts_from_reads: bool,
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
    /// Shared with the durable writes on their way (`group_commit`).
    pub file: Rc<F>,
    pub header: SegmentHeader,
    /// Where the next group goes (block-aligned).
    pub write_offset: u64,
    /// CRC32C of `[DATA_START, write_offset)`.
    pub data_crc: u32,
    pub last_lsn: Lsn,
    pub last_commit_ts: TimestampMicros,
    pub sealed: bool,
    /// The segment's format version (its footer is written with the same).
    pub version: u32,
    /// Every byte past `write_offset` is zero (a zero-filled spare, this process):
    /// groups need no zero block after them to end the log, and one may be written
    /// while the previous one is still on its way (FORMAT.md §3).
    pub zeroed: bool,
}

async fn read_whole<F: StorageFile>(file: &F, out: &mut Vec<u8>) -> Result<()> {
    let len = file.len().await?;
    if len % BLOCK_SIZE as u64 != 0 {
        return Err(Error::Corrupt {
            file: file.name().to_string(),
            offset: len,
            reason: "segment length is not a whole number of blocks: the file was cut short \
                     or written by something other than oc; do not delete it (RUNBOOK.md, \
                     \"The server refuses to start with \"corruption in <file> at offset <n>\"\")"
                .into(),
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

/// The ends of a sealed segment recovery need not read: one whose frames all lie
/// before the replay point.
struct SealedEnds {
    header: SegmentHeader,
    footer: SegmentFooter,
    version: u32,
}

/// Reads only the header and footer of `file` when they say it is a sealed segment that
/// ends right before `next_first` (the next segment's first LSN), with every frame on
/// `history`. Its frames are not checked here but after the open
/// (`Wal::check_unread_segments`); readers check each one they pass, and the shipper the
/// whole image before archiving it. None when anything does not fit: the caller reads
/// the segment whole, which says what is wrong.
async fn sealed_ends<F: StorageFile>(
    file: &F,
    next_first: Lsn,
    history: Option<&History>,
) -> Result<Option<SealedEnds>> {
    let len = file.len().await?;
    if len % BLOCK_SIZE as u64 != 0 || len < MIN_SEGMENT_BYTES {
        return Ok(None);
    }
    let mut block = vec![0u8; BLOCK_SIZE];
    file.read_at(0, &mut block).await?;
    let (Ok(header), Some(version)) = (SegmentHeader::decode(&block), header_version(&block))
    else {
        return Ok(None);
    };
    if header.capacity_bytes != len {
        return Ok(None);
    }
    file.read_at(header.footer_offset(), &mut block).await?;
    let Ok(footer) = SegmentFooter::decode(&block) else {
        return Ok(None);
    };
    let empty = footer.last_lsn < header.first_lsn;
    let fits = footer_version(&block) == Some(version)
        && footer.first_lsn == header.first_lsn
        && footer.last_lsn.0 + 1 >= header.first_lsn.0
        && footer.last_lsn.next() == next_first
        && (DATA_START..=header.footer_offset()).contains(&footer.data_end)
        && footer.data_end % BLOCK_SIZE as u64 == 0
        && empty == (footer.data_end == DATA_START)
        // Every frame has the header's epoch, and a position of one epoch is off a
        // history only from some LSN on: the last frame decides for all.
        && history.is_none_or(|h| h.position(header.epoch, footer.last_lsn) != Position::Off);
    Ok(fits.then_some(SealedEnds {
        header,
        footer,
        version,
    }))
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

/// Why a segment's scan stopped early.
enum ScanStop {
    Failed(Error),
    /// The frame at this offset, LSN and epoch is the first off the writer's history.
    OffHistory(u64, Lsn, Epoch),
}

/// Sets aside the segments holding frames off the writer's history, the first cut at
/// `lsn`: `segments` (that one, then the later ones) are renamed, newest first, so an
/// interrupted cut leaves a chain that the next open cuts again; the first one is
/// copied instead (its whole `bytes`) when it keeps frames, and the caller replaces it.
async fn set_aside<S: Storage>(
    storage: &S,
    lsn: Lsn,
    segments: &[(String, Epoch, Lsn)],
    bytes: &[u8],
) -> Result<Vec<String>> {
    let aside = |name: &str| set_aside_name(lsn, name);
    // Each rename durable before the next: a file system may persist them out of order.
    for (later, _, _) in segments[1..].iter().rev() {
        storage.rename(later, &aside(later)).await?;
        storage.sync_dir().await?;
    }
    let (first, _, first_lsn) = &segments[0];
    if *first_lsn == lsn {
        storage.rename(first, &aside(first)).await?;
    } else {
        write_file(storage, &aside(first), bytes).await?;
    }
    storage.sync_dir().await?;
    Ok(segments.iter().map(|(name, _, _)| aside(name)).collect())
}

/// Writes `bytes` to a new durable file `name`, replacing what an interrupted attempt
/// left there.
async fn write_file<S: Storage>(storage: &S, name: &str, bytes: &[u8]) -> Result<S::File> {
    if storage.list().await?.iter().any(|n| n == name) {
        storage.remove(name).await?;
    }
    let file = storage.create(name, bytes.len() as u64).await?;
    let mut at = 0;
    while at < bytes.len() {
        let len = (bytes.len() - at).min(ZERO_CHUNK_BYTES);
        let mut buf = storage.alloc_buffer(len);
        buf.as_bytes_mut().copy_from_slice(&bytes[at..at + len]);
        file.write_at(buf, at as u64).await?;
        at += len;
    }
    file.sync().await?;
    Ok(file)
}

/// Replaces segment `name` with `bytes` in one rename, so a crash leaves the old one or
/// the new one, never a mix (zeroing in place could leave a damaged frame before older
/// ones, which reads as corruption).
async fn replace_segment<S: Storage>(storage: &S, name: &str, bytes: &[u8]) -> Result<S::File> {
    let temporary = format!("{name}{CUT_SUFFIX}");
    drop(write_file(storage, &temporary, bytes).await?);
    storage.rename(&temporary, name).await?;
    storage.sync_dir().await?;
    storage.open_durable(name).await
}

/// Clears the successor flag of sealed `segment` (file `name`) in one rename: the log
/// will end at it while its successor is still there, where a torn rewrite in place
/// would read as an unsealed segment followed by one holding frames.
async fn clear_successor_atomically<S: Storage>(
    storage: &S,
    name: &str,
    segment: &mut ActiveSegment<S::File>,
) -> Result<()> {
    let mut whole = Vec::new();
    read_whole(&*segment.file, &mut whole).await?;
    let at = segment.header.footer_offset() as usize;
    let Some(cleared) = whole.get(at..).and_then(footer_without_successor) else {
        return Ok(());
    };
    whole[at..at + BLOCK_SIZE].copy_from_slice(&cleared);
    segment.file = Rc::new(replace_segment(storage, name, &whole).await?);
    Ok(())
}

/// The error for an unsealed segment (`previous`, the active one so far, named
/// `name`) followed by segment `next`, which holds frames.
fn previous_unsealed<F>(name: &str, previous: Option<&ActiveSegment<F>>, next: &str) -> Error {
    Error::Corrupt {
        file: name.to_string(),
        offset: previous.map_or(0, |p| p.header.footer_offset()),
        reason: format!("segment is not sealed but the next one, {next}, holds frames"),
    }
}

/// Rewrites the footer of a sealed segment (`file`, its header `header`) without the
/// successor flag: the log ends there on purpose now. A torn rewrite reads as an
/// unsealed segment, which is as good.
async fn clear_successor<S: Storage>(
    storage: &S,
    file: &S::File,
    header: &SegmentHeader,
) -> Result<()> {
    let at = header.footer_offset();
    let mut block = [0u8; BLOCK_SIZE];
    file.read_at(at, &mut block).await?;
    if let Some(cleared) = footer_without_successor(&block) {
        let mut buf = storage.alloc_buffer(BLOCK_SIZE);
        buf.as_bytes_mut().copy_from_slice(&cleared);
        file.write_durable_at(buf, at).await?;
    }
    Ok(())
}

/// Checks segment `named`'s header (its file `len` bytes) against its name, the shard
/// and where the segments before it ended (`next_lsn`, `last_epoch`; none yet: the
/// first, which must start at or before `replay_from`).
fn check_header(
    header: &SegmentHeader,
    (name, name_epoch, name_lsn): &(String, Epoch, Lsn),
    shard: u32,
    len: u64,
    next_lsn: Option<Lsn>,
    replay_from: Lsn,
    last_epoch: Epoch,
) -> Result<()> {
    let corrupt = |reason: String| Error::Corrupt {
        file: name.clone(),
        offset: 0,
        reason,
    };
    if header.epoch != *name_epoch || header.first_lsn != *name_lsn || header.shard != shard {
        return Err(corrupt(
            "segment header does not match its file name".into(),
        ));
    }
    if header.capacity_bytes != len {
        return Err(corrupt(format!(
            "header says {} bytes, file has {len}",
            header.capacity_bytes
        )));
    }
    match next_lsn {
        None if header.first_lsn > replay_from.max(Lsn(1)) => Err(Error::MissingFrames {
            wanted: replay_from,
            first_available: header.first_lsn,
        }),
        // A gap between two segments is a file gone from the middle of the log, not
        // damage inside one: cutting the log there (--truncate-corrupt-wal) would drop
        // every segment from this one on.
        Some(expected) if header.first_lsn > expected => Err(corrupt(format!(
            "segment starts at LSN {} but the previous one ended before {expected}: LSNs \
             {expected}..={} are in no segment file, so one was deleted or moved from the \
             middle of the log. Put it back (its name ends with the LSN {:016x}), \
             or restore from the archive (RUNBOOK.md, \"A segment is missing from the \
             middle of the log\"); do not use --truncate-corrupt-wal, which would drop every \
             segment from this one on",
            header.first_lsn,
            header.first_lsn.0 - 1,
            expected.0
        ))),
        Some(expected) if header.first_lsn != expected => Err(corrupt(format!(
            "segment starts at LSN {} but the previous one ended before {}",
            header.first_lsn, expected
        ))),
        _ if header.epoch < last_epoch => Err(corrupt(format!(
            "epoch {} after epoch {}",
            header.epoch.0, last_epoch.0
        ))),
        _ => Ok(()),
    }
}

/// Refuses segment `name` when the archive holds it further than `end`, where its frames
/// end here: the shipper archives only durable groups, so the bytes past `end` were
/// durable (and may have been acknowledged). Neither a torn write nor a clean end: the
/// frames are damaged or missing here, and cutting them would lose them.
fn check_archived_tail(
    config: &WalConfig,
    header: &SegmentHeader,
    name: &str,
    end: u64,
) -> Result<()> {
    match config.archived.and_then(|a| a.tail) {
        Some(tail)
            if (tail.epoch, tail.first_lsn) == (header.epoch, header.first_lsn)
                && tail.end > end =>
        {
            Err(Error::Corrupt {
                file: name.to_string(),
                offset: end,
                reason: format!(
                    "the log ends here, but the archive holds this segment to offset {}, \
                     shipped once it was durable: durable (possibly acknowledged) frames are \
                     damaged or missing here. Not a torn write: the log is not cut. Restore \
                     from the archive (RUNBOOK.md, \"The archive holds frames the log lacks\")",
                    tail.end
                ),
            })
        }
        _ => Ok(()),
    }
}

/// Refuses a log that ends (before `next_lsn`, in segment `active`) before what the
/// archive holds of it: a newer segment's tail, or a sealed segment reaching further.
fn check_archived_log<F>(
    config: &WalConfig,
    active: &ActiveSegment<F>,
    next_lsn: Lsn,
) -> Result<()> {
    let Some(archived) = config.archived else {
        return Ok(());
    };
    let header = &active.header;
    let name = segment_name(config.shard, header.epoch, header.first_lsn);
    check_archived_tail(config, header, &name, active.write_offset)?;
    let newer_tail = archived
        .tail
        .filter(|t| (t.first_lsn, t.epoch) > (header.first_lsn, header.epoch));
    let missing = match newer_tail {
        Some(t) => Some(format!(
            "a segment from LSN {} (epoch {}) with frames",
            t.first_lsn, t.epoch.0
        )),
        None if archived.sealed_lsn >= next_lsn => {
            Some(format!("sealed segments to LSN {}", archived.sealed_lsn))
        }
        None => None,
    };
    match missing {
        Some(what) => Err(Error::Corrupt {
            file: name,
            offset: active.write_offset,
            reason: format!(
                "the log ends at LSN {} here, but the archive holds {what}, shipped once \
                 durable: durable (possibly acknowledged) frames are missing here. Restore \
                 from the archive (RUNBOOK.md, \"The archive holds frames the log lacks\")",
                next_lsn.0.saturating_sub(1)
            ),
        }),
        None => Ok(()),
    }
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
        } else if name == SPARE_PARTIAL_NAME || name.ends_with(CUT_SUFFIX) {
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
    // The previous segment is unsealed, so this one, the last, must hold no frame.
    let mut previous_open = false;
    // The previous segment's seal says this one's header was durable.
    let mut previous_promised = false;
    while index < count {
        let (name, _, name_lsn) = &names[index];
        let is_last = index + 1 == count;
        // The last one stays open as the active segment, which groups are written to.
        let mut file = storage.open_durable(name).await?;
        let wholly_before_replay = match names.get(index + 1) {
            Some(&(_, _, next_first)) if next_first <= replay_from => {
                sealed_ends(&file, next_first, config.history.as_ref()).await?
            }
            _ => None,
        };
        if let Some(SealedEnds {
            header,
            footer,
            version,
        }) = wholly_before_replay
        {
            // Its length was checked against the header's capacity while reading it.
            check_header(
                &header,
                &names[index],
                config.shard,
                header.capacity_bytes,
                next_lsn,
                replay_from,
                last_epoch,
            )?;
            report.segments_not_read += 1;
            report.bytes_scanned += 2 * BLOCK_SIZE as u64;
            report.first_lsn.get_or_insert(header.first_lsn);
            report.last_lsn = footer.last_lsn;
            if footer.last_lsn >= header.first_lsn {
                report.last_commit_ts = footer.last_commit_ts;
            }
            last_epoch = header.epoch;
            previous_promised = footer.successor;
            segments.push(SegmentInfo {
                name: name.clone(),
                first_lsn: header.first_lsn,
                group_starts: Vec::new(),
                starts_from_reads: true,
            });
            next_lsn = Some(footer.last_lsn.next());
            // The active segment only if every later one is cut; sealed, so never
            // written to.
            active = Some(ActiveSegment {
                file: Rc::new(file),
                header,
                write_offset: footer.data_end,
                data_crc: footer.data_crc,
                last_lsn: footer.last_lsn,
                last_commit_ts: footer.last_commit_ts,
                sealed: true,
                version,
                zeroed: false,
            });
            index += 1;
            continue;
        }
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
                if is_last && !real_frames && !previous_promised {
                    let (_, name_epoch, _) = &names[index];
                    let archived = config.archived.and_then(|a| a.tail);
                    if archived.is_some_and(|t| (t.epoch, t.first_lsn) == (*name_epoch, *name_lsn))
                    {
                        return Err(corrupt(
                            0,
                            format!(
                                "segment header unreadable ({err:?}), but the archive holds \
                                 frames of this segment, shipped once they were durable: it was \
                                 damaged after it was written, and is not removed. Restore from \
                                 the archive (RUNBOOK.md, \"The archive holds frames the log \
                                 lacks\")"
                            ),
                        ));
                    }
                    drop(file);
                    storage.remove(name).await?;
                    report.removed.push(name.clone());
                    break;
                }
                let reason = if real_frames || !previous_promised {
                    format!("segment header unreadable ({err:?}) but frames follow")
                } else {
                    format!(
                        "segment header unreadable ({err:?}), yet the previous segment's seal \
                         says it was written"
                    )
                };
                if !config.truncate_corrupt {
                    return Err(corrupt(
                        0,
                        format!(
                            "{reason} (start with the truncate option to cut the log before \
                             this segment, losing it and what follows)"
                        ),
                    ));
                }
                // Cut before this segment: it and every later one go, and the log ends
                // with the previous one (its flag cleared once its successors are gone).
                drop(file);
                for (later, _, _) in &names[index..] {
                    storage.remove(later).await?;
                    report.removed.push(later.clone());
                }
                storage.sync_dir().await?;
                if let Some(previous) = &active {
                    clear_successor(storage, &previous.file, &previous.header).await?;
                }
                tracing::warn!(file = %name, %reason, "cut the write-ahead log before a segment whose header is unreadable, as the truncate option asks");
                report.truncated_corruption = Some(TailCut {
                    file: name.clone(),
                    offset: 0,
                    reason,
                    bytes_zeroed: 0,
                });
                break;
            }
        };
        check_header(
            &header,
            &names[index],
            config.shard,
            bytes.len() as u64,
            next_lsn,
            replay_from,
            last_epoch,
        )?;

        let mut is_last = is_last;
        let mut starts = Vec::new();
        let scanned = scan_segment(&bytes, &header, |frame, offset| {
            if let Some(history) = &config.history {
                if history.position(frame.epoch, frame.lsn) == Position::Off {
                    return Err(ScanStop::OffHistory(offset, frame.lsn, frame.epoch));
                }
            }
            if frame.group_index == 0 {
                starts.push((frame.lsn, offset));
            }
            if frame.lsn >= replay_from {
                report.frames_replayed += 1;
                on_frame(frame).map_err(|reason| {
                    ScanStop::Failed(Error::Corrupt {
                        file: name.clone(),
                        offset: 0,
                        reason: format!("replay of LSN {} refused: {reason}", frame.lsn),
                    })
                })?;
            }
            Ok(())
        });
        let scan = match scanned {
            Ok(scan) => scan,
            Err(ScanStop::Failed(e)) => return Err(e),
            Err(ScanStop::OffHistory(..)) if previous_open => {
                return Err(previous_unsealed(
                    &names[index - 1].0,
                    active.as_ref(),
                    name,
                ));
            }
            Err(ScanStop::OffHistory(offset, lsn, epoch)) => {
                if lsn < replay_from {
                    // A checkpoint holds it: cutting the log cannot take it back.
                    return Err(Error::OffHistory { lsn, epoch });
                }
                if lsn == header.first_lsn {
                    // The log will end with the previous segment, on purpose: its
                    // flag goes first, in one rename (a torn rewrite in place would
                    // read as an unsealed segment before this one, which holds frames).
                    if let Some(previous) = active.as_mut() {
                        clear_successor_atomically(storage, &names[index - 1].0, previous).await?;
                    }
                }
                let set_aside = set_aside(storage, lsn, &names[index..], &bytes).await?;
                tracing::warn!(lsn = lsn.0, epoch = epoch.0, ?set_aside, "cut the log where it left the writer's history; the frames cut are kept in the files set aside");
                report.history_cut = Some(HistoryCut {
                    lsn,
                    epoch,
                    set_aside,
                });
                if lsn == header.first_lsn {
                    // The whole segment was off the history and is set aside: the log
                    // ends with the previous one.
                    break;
                }
                bytes[offset as usize..].fill(0);
                file = replace_segment(storage, name, &bytes).await?;
                is_last = true;
                index = count - 1;
                scan_segment(&bytes, &header, |_, _| Ok::<(), Error>(()))?
            }
        };
        if previous_open {
            // Made but never used: the rotation did not finish, and the previous
            // segment stays the active one, as if it had not begun.
            if scan.frames > 0 || !matches!(scan.end, ScanEnd::Clean | ScanEnd::Full) {
                return Err(previous_unsealed(
                    &names[index - 1].0,
                    active.as_ref(),
                    name,
                ));
            }
            drop(file);
            storage.remove(name).await?;
            tracing::warn!(segment = %name, "removed a segment a crash left empty while the log was rotating into it; the one before it stays the active one");
            report.removed.push(name.clone());
            report.unfinished_rotation = Some(name.clone());
            break;
        }
        report.frames_scanned += scan.frames;
        report.first_lsn.get_or_insert(header.first_lsn);
        report.last_lsn = scan.last_lsn;
        if scan.frames > 0 {
            report.last_commit_ts = scan.last_commit_ts;
        }
        last_epoch = scan.last_epoch.max(header.epoch);

        previous_promised = matches!(scan.end, ScanEnd::Sealed(f) if f.successor);
        let (sealed, cut) = match scan.end {
            ScanEnd::Sealed(footer) if is_last && footer.successor => {
                let reason = format!(
                    "sealed after the next segment (from LSN {}) was made, but no later \
                     segment exists: the log's newest segment was deleted or lost",
                    footer.last_lsn.next()
                );
                if !config.truncate_corrupt {
                    return Err(corrupt(
                        header.footer_offset(),
                        format!(
                            "{reason} (restore it, or start with the truncate option to \
                             continue the log from here without it)"
                        ),
                    ));
                }
                tracing::warn!(file = %name, %reason, "continuing the write-ahead log without its newest segment, as the truncate option asks");
                clear_successor(storage, &file, &header).await?;
                report.truncated_corruption = Some(TailCut {
                    file: name.clone(),
                    offset: header.footer_offset(),
                    reason,
                    bytes_zeroed: 0,
                });
                (true, None)
            }
            ScanEnd::Sealed(_) => (true, None),
            ScanEnd::Clean | ScanEnd::Full if is_last => (false, None),
            // A crash between making the last segment and sealing this one, if the
            // last holds no frame (checked when it is read).
            ScanEnd::Clean | ScanEnd::Full if index + 2 == count => {
                previous_open = true;
                (false, None)
            }
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
        // Before anything is cut: what the archive holds of this segment was durable.
        check_archived_tail(config, &header, name, write_offset)?;
        if let Some((offset, reason, is_corruption)) = cut {
            // Torn groups can only have touched their own extents: at most the writes
            // on their way at once, each at most the header's max group bytes, plus
            // the zero block after the last. A cut for corruption wipes the whole
            // rest of the file, footer included (valid newer frames lie there).
            let limit = if is_corruption {
                header.capacity_bytes
            } else {
                let extent =
                    GROUPS_IN_FLIGHT as u64 * u64::from(header.max_group_bytes) + BLOCK_SIZE as u64;
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
            group_starts: starts,
            starts_from_reads: false,
        });
        next_lsn = Some(scan.last_lsn.next());
        let data_crc = crc32c::crc32c(&bytes[DATA_START as usize..write_offset as usize]);
        active = Some(ActiveSegment {
            file: Rc::new(file),
            header,
            write_offset,
            data_crc,
            last_lsn: scan.last_lsn,
            last_commit_ts: scan.last_commit_ts,
            sealed,
            version: header_version(&bytes).unwrap_or(SEGMENT_FORMAT_VERSION),
            // Past a recovered segment's end may lie a recycled file's older frames.
            zeroed: false,
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
    match &active {
        Some(active) => check_archived_log(config, active, next_lsn)?,
        // The active segment is never released: a log without one that the archive
        // holds anything of has lost its files.
        None => match config.archived {
            Some(a) if a.sealed_lsn > Lsn(0) || a.tail.is_some() => {
                return Err(Error::Corrupt {
                    file: format!("the write-ahead log of shard {}", config.shard),
                    offset: 0,
                    reason: format!(
                        "it has no segment, but the archive holds {}, shipped once durable: \
                         the log's files were lost. Restore from the archive (RUNBOOK.md, \
                         \"The archive holds frames the log lacks\")",
                        match a.tail {
                            Some(t) => format!("a segment from LSN {} with frames", t.first_lsn),
                            None => format!("sealed segments to LSN {}", a.sealed_lsn),
                        }
                    ),
                })
            }
            _ => {}
        },
    }
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
