//! Scanning one segment's bytes: which frames are valid, and how the valid part ends.
//! Pure (no I/O), so the fuzz target feeds it arbitrary bytes.
//!
//! How a tear is told from corruption: only the last group commits can be torn. At
//! most [`GROUPS_IN_FLIGHT`] groups' writes are on their way at once, and a group
//! written while the one before it was still on its way carries
//! [`frame::FLAG_OVERLAPPED`] on its first frame; any other group was written only
//! after every earlier one's durable write returned. Every group starts on a block
//! boundary with a frame whose `group_index` is 0. So after the first bad frame, a
//! valid group-start frame at a later block boundary proves that a *newer* group was
//! written, and so that the bad frame was durable once and is now damaged, unless it
//! is the only one, is marked overlapped, and starts within one group's extent of the
//! damaged group: then the two were on their way together, and neither was
//! acknowledged (a group is acknowledged only after every earlier one). Frames with
//! LSNs at or below the last valid one are leftovers of a recycled file and prove
//! nothing.

use super::frame::{self, Epoch, Frame, FrameError, Lsn, TimestampMicros};
use super::segment::{header_version, BlockError, SegmentFooter, SegmentHeader, DATA_START};
use crate::buffer::{align_up, BLOCK_SIZE};

/// At most this many groups' durable writes are on their way at once, so a crash can
/// tear at most this many groups at the end of the log (FORMAT.md §3.3).
pub const GROUPS_IN_FLIGHT: usize = 2;
/// The largest group written while another is on its way, and so the largest group
/// on its way before an overlapped one (FORMAT.md §3.3): recovery's window for a torn
/// pair rests on it.
pub const OVERLAPPED_GROUP_MAX_BYTES: usize = 128 << 10;

/// How the valid frames of a segment end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanEnd {
    /// Sealed: footer valid and matching the frames.
    Sealed(SegmentFooter),
    /// Zeroes at a block boundary: the clean end of an active segment.
    Clean,
    /// The data area is full up to the footer block (not yet sealed).
    Full,
    /// Damage after the last good frame with nothing valid after it, or only a group
    /// that was on its way together with the damaged one: a torn write.
    Torn { offset: u64, reason: String },
    /// Damage that a crash cannot explain.
    Corrupt { offset: u64, reason: String },
}

/// The result of scanning a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentScan {
    pub frames: u64,
    /// LSN of the last valid frame (`first_lsn - 1` when there is none).
    pub last_lsn: Lsn,
    pub last_commit_ts: TimestampMicros,
    pub last_epoch: Epoch,
    /// Byte offset just past the last valid frame.
    pub valid_end: u64,
    pub end: ScanEnd,
}

/// Scans `bytes` (a whole segment file) whose header has already been decoded, calling
/// `on_frame` for each valid frame in order with its offset. Stops early if `on_frame`
/// returns an error, and returns that error.
pub fn scan_segment<E>(
    bytes: &[u8],
    header: &SegmentHeader,
    mut on_frame: impl FnMut(&Frame<'_>, u64) -> Result<(), E>,
) -> Result<SegmentScan, E> {
    let footer_at = header.footer_offset().min(bytes.len() as u64) as usize;
    let footer = match bytes.get(footer_at..) {
        Some(block) if header.footer_offset() < bytes.len() as u64 => SegmentFooter::decode(block),
        _ => Err(BlockError::Blank),
    };
    let sealed = footer.as_ref().ok().copied();
    let limit = match sealed {
        Some(f) if f.data_end >= DATA_START && f.data_end <= footer_at as u64 => {
            f.data_end as usize
        }
        _ => footer_at,
    };

    let mut scan = SegmentScan {
        frames: 0,
        last_lsn: Lsn(header.first_lsn.0 - 1),
        last_commit_ts: TimestampMicros(0),
        last_epoch: header.epoch,
        valid_end: DATA_START,
        end: ScanEnd::Clean,
    };
    let mut pos = DATA_START as usize;
    // The LSN that started the group `pos` is in, or None at a group boundary.
    let mut group_first: Option<Lsn> = None;
    // Where the last group start read is.
    let mut group_at = pos;
    let bad = loop {
        if pos >= limit {
            break None;
        }
        if limit - pos < 4 && bytes[pos..limit].iter().all(|&b| b == 0) {
            pos = limit; // padding to the end of the data area
            break None;
        }
        let to_boundary = BLOCK_SIZE - pos % BLOCK_SIZE;
        if to_boundary < 4 {
            // No frame starts in the last 3 bytes of a block: they must be zero.
            let end = (pos + to_boundary).min(limit);
            if bytes[pos..end].iter().any(|&b| b != 0) {
                break Some("nonzero bytes where no frame can start".to_string());
            }
            pos = end;
            continue;
        }
        let expected = scan.last_lsn.next();
        match frame::decode(&bytes[pos..limit]) {
            Err(FrameError::Zero) if pos.is_multiple_of(BLOCK_SIZE) => {
                // Every group write into a recycled file ends with a zero block (a
                // zero-filled one is zero past its groups), so the log ends at an
                // all-zero block even in a recycled file full of older frames.
                let block_end = (pos + BLOCK_SIZE).min(limit);
                if bytes[pos..block_end].iter().all(|&b| b == 0) {
                    break None;
                }
                break Some("zeroes where a frame was expected".to_string());
            }
            Err(FrameError::Zero) => {
                pos = align_up(pos as u64) as usize;
                group_first = None;
            }
            Err(e) => break Some(e.to_string()),
            // Where a group would start, a frame older than the segment is a leftover
            // of a recycled file: the log ends here.
            Ok(f) if f.lsn < header.first_lsn && pos.is_multiple_of(BLOCK_SIZE) => break None,
            Ok(f) => {
                if let Some(reason) = check_position(&f, pos, expected, group_first, &scan) {
                    break Some(reason);
                }
                on_frame(&f, pos as u64)?;
                if f.group_index == 0 {
                    group_at = pos;
                }
                group_first = Some(f.group_first_lsn());
                scan.frames += 1;
                scan.last_lsn = f.lsn;
                scan.last_commit_ts = f.commit_ts;
                scan.last_epoch = f.epoch;
                pos += f.len();
                scan.valid_end = pos as u64;
            }
        }
    };

    scan.end = match (bad, sealed) {
        (Some(reason), Some(_)) => ScanEnd::Corrupt {
            offset: pos as u64,
            reason: format!("{reason} inside a sealed segment"),
        },
        (None, Some(f)) => check_footer(bytes, &scan, f),
        (None, None) if pos >= footer_at => ScanEnd::Full,
        (bad, None) => {
            let newer = later_group_start(bytes, pos, footer_at, scan.last_lsn);
            match (bad, newer) {
                (Some(reason), None) => ScanEnd::Torn {
                    offset: pos as u64,
                    reason,
                },
                (None, None) => ScanEnd::Clean,
                (bad, Some(at)) => {
                    let what = bad.unwrap_or_else(|| "zeroes where a frame was expected".into());
                    if written_together(bytes, pos, group_at, at, footer_at, header, &scan) {
                        ScanEnd::Torn {
                            offset: pos as u64,
                            reason: format!(
                                "{what}; the group at offset {at} is marked as written while \
                                 this one was on its way, so a crash can leave this, and \
                                 then neither was acknowledged: both cut"
                            ),
                        }
                    } else {
                        ScanEnd::Corrupt {
                            offset: pos as u64,
                            reason: format!("{what}; a later group starts at offset {at}"),
                        }
                    }
                }
            }
        }
    };
    Ok(scan)
}

/// Checks a decoded frame against where it sits in the log; returns why it is out of
/// place, if it is.
fn check_position(
    f: &Frame<'_>,
    pos: usize,
    expected: Lsn,
    group_first: Option<Lsn>,
    scan: &SegmentScan,
) -> Option<String> {
    if f.lsn != expected {
        return Some(format!("LSN {} where {} was expected", f.lsn, expected));
    }
    if f.group_index == 0 && !pos.is_multiple_of(BLOCK_SIZE) {
        return Some("a group starts off a block boundary".into());
    }
    if f.group_index != 0 && group_first != Some(f.group_first_lsn()) {
        return Some(format!(
            "frame {} of a group whose start is missing",
            f.group_index
        ));
    }
    if f.epoch < scan.last_epoch {
        return Some(format!(
            "epoch {} after epoch {}",
            f.epoch.0, scan.last_epoch.0
        ));
    }
    if f.commit_ts < scan.last_commit_ts {
        return Some("commit time went backwards".into());
    }
    None
}

fn check_footer(bytes: &[u8], scan: &SegmentScan, footer: SegmentFooter) -> ScanEnd {
    let corrupt = |reason: String| ScanEnd::Corrupt {
        offset: scan.valid_end,
        reason,
    };
    if footer.last_lsn != scan.last_lsn {
        return corrupt(format!(
            "footer says last LSN {} but frames end at {}",
            footer.last_lsn, scan.last_lsn
        ));
    }
    if footer.data_end != align_up(scan.valid_end) {
        return corrupt(format!(
            "footer says data ends at {} but frames end at {}",
            footer.data_end, scan.valid_end
        ));
    }
    let Some(data) = bytes.get(DATA_START as usize..footer.data_end as usize) else {
        return corrupt(format!(
            "footer data end {} lies outside the file",
            footer.data_end
        ));
    };
    let crc = crc32c::crc32c(data);
    if crc != footer.data_crc {
        return corrupt(format!(
            "segment data crc {crc:#010x} does not match footer {:#010x}",
            footer.data_crc
        ));
    }
    ScanEnd::Sealed(footer)
}

/// Whether the newer group at `at` was on its way together with the damaged group
/// that `pos` lies in, so that a crash may have kept it and torn the damaged one. Every
/// condition is one the writer guarantees for such a pair (FORMAT.md §3.3, §4):
/// - the segment is of version 2 (no earlier writer overlapped groups);
/// - the group is marked overlapped, of the segment's epoch, and is the only newer
///   group start (a third group is written only after the first's write returned);
/// - it starts within [`OVERLAPPED_GROUP_MAX_BYTES`] of the damaged group's start (the
///   group in flight before an overlapped one is at most that size): of `pos` when
///   the damage is at a block boundary (the damaged group starts there, or earlier),
///   else of the start of the group the scan was inside;
/// - the frames it skips fit between the last valid frame and it.
fn written_together(
    bytes: &[u8],
    pos: usize,
    group_at: usize,
    at: u64,
    limit: usize,
    header: &SegmentHeader,
    scan: &SegmentScan,
) -> bool {
    let at = at as usize;
    if header_version(bytes).is_none_or(|v| v < 2) {
        return false;
    }
    let Ok(f) = frame::decode(&bytes[at..limit]) else {
        return false;
    };
    let damaged_at = if pos.is_multiple_of(BLOCK_SIZE) {
        pos
    } else {
        group_at
    };
    let skipped = f.lsn.0.saturating_sub(scan.last_lsn.0.saturating_add(1));
    frame::is_overlapped(&bytes[at..])
        && f.epoch == header.epoch
        && at <= damaged_at + OVERLAPPED_GROUP_MAX_BYTES
        && skipped >= 1
        && skipped.saturating_mul(frame::FRAME_HEADER_BYTES as u64)
            <= (at as u64).saturating_sub(scan.valid_end)
        && later_group_start(bytes, at, limit, scan.last_lsn).is_none()
}

/// The offset of a valid group-start frame newer than `last_lsn` at a block boundary
/// after `pos`, if any. Older frames are leftovers of a recycled file.
fn later_group_start(bytes: &[u8], pos: usize, limit: usize, last_lsn: Lsn) -> Option<u64> {
    let mut at = align_up(pos as u64 + 1) as usize;
    while at < limit {
        if let Ok(f) = frame::decode(&bytes[at..limit]) {
            if f.group_index == 0 && f.lsn > last_lsn {
                return Some(at as u64);
            }
        }
        at += BLOCK_SIZE;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::frame::{encode, encode_overlapped, Frame, RecordKind};

    const SEGMENT: usize = 64 * BLOCK_SIZE;

    fn header() -> SegmentHeader {
        SegmentHeader {
            shard: 0,
            max_group_bytes: 2 * BLOCK_SIZE as u32,
            epoch: Epoch(1),
            first_lsn: Lsn(1),
            capacity_bytes: SEGMENT as u64,
            created: TimestampMicros(1),
        }
    }

    /// Writes a one-frame group with LSN `lsn` at block `block`, marked overlapped
    /// when asked.
    fn group(bytes: &mut [u8], block: usize, lsn: u64, overlapped: bool) {
        let frame = Frame {
            lsn: Lsn(lsn),
            commit_ts: TimestampMicros(lsn),
            epoch: Epoch(1),
            group_index: 0,
            kind: RecordKind(1),
            tenant: b"t",
            payload: &[7; 100],
        };
        let frame = if overlapped {
            encode_overlapped(&frame)
        } else {
            encode(&frame)
        };
        let at = block * BLOCK_SIZE;
        bytes[at..at + frame.len()].copy_from_slice(&frame);
    }

    /// A segment of `header()` with its header block written.
    fn segment() -> Vec<u8> {
        let mut bytes = vec![0; SEGMENT];
        bytes[..BLOCK_SIZE].copy_from_slice(&header().encode());
        bytes
    }

    fn scan(bytes: &[u8]) -> ScanEnd {
        scan_segment(bytes, &header(), |_, _| Ok::<(), ()>(()))
            .expect("no callback error")
            .end
    }

    #[test]
    fn a_lost_group_before_one_written_with_it_is_a_tear_and_anything_more_is_corruption() {
        // LSN 1 at block 1; LSN 2 (block 2) lost; LSN 3 at block 3.
        let mut bytes = segment();
        group(&mut bytes, 1, 1, false);
        group(&mut bytes, 3, 3, true);
        assert!(
            matches!(scan(&bytes), ScanEnd::Torn { offset, .. } if offset == 2 * BLOCK_SIZE as u64)
        );

        // The same newer group without the mark was written after LSN 2 was durable.
        let mut unmarked = segment();
        group(&mut unmarked, 1, 1, false);
        group(&mut unmarked, 3, 3, false);
        assert!(matches!(scan(&unmarked), ScanEnd::Corrupt { .. }));

        // A third group proves the damaged one's write had returned.
        group(&mut bytes, 4, 4, true);
        assert!(matches!(scan(&bytes), ScanEnd::Corrupt { .. }));

        // Only a version 2 segment can hold overlapped groups.
        let mut v1 = segment();
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        group(&mut v1, 1, 1, false);
        group(&mut v1, 3, 3, true);
        assert!(matches!(scan(&v1), ScanEnd::Corrupt { .. }));

        // Marked, but farther than one group's extent from the damage.
        let mut far = segment();
        group(&mut far, 1, 1, false);
        group(
            &mut far,
            2 + OVERLAPPED_GROUP_MAX_BYTES / BLOCK_SIZE + 1,
            3,
            true,
        );
        assert!(matches!(scan(&far), ScanEnd::Corrupt { .. }));
    }
}
