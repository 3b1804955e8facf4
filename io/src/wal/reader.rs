//! Reading durable frames back out of a live log: the frames after an LSN, from the
//! segment files the log still holds. `/watch` resumes from here; it is the same read a
//! follower's catch-up needs.
//!
//! A reader marks the segment it reads, and a release keeps a marked segment for its
//! next round; a reader does not open a segment a release is taking. This is not only
//! about trust: glommio's open `unwrap`s a `statfs` of the path after its `openat`, so a
//! file removed or renamed in between panicked the shard (a `/watch` resume from an old
//! LSN while checkpoints released segments, found in CI). The segment list is still
//! checked again after the read, and a segment that left it meanwhile is reported as no
//! longer held rather than trusted.

use super::frame::{
    decode, frame_len, peek_len, Epoch, Frame, Lsn, RecordKind, TimestampMicros, MAX_FRAME_BYTES,
};
use super::segment::{SegmentHeader, DATA_START};
use super::Wal;
use crate::buffer::{align_down, align_up, BLOCK_SIZE};
use crate::error::{Error, Result};
use crate::executor::Turns;
use crate::storage::{Storage, StorageFile};

/// Segments are read in chunks of this size...
const READ_CHUNK_BYTES: usize = 1 << 20;
/// ...and one read returns about this many bytes of frames at most.
pub const PAGE_BYTES: usize = 1 << 20;
/// Decoding a page of small frames takes a millisecond or more: a read gives the shard
/// a turn after this much of it (checked every [`FRAMES_PER_TURN_CHECK`] frames), so
/// requests on the shard do not wait behind a `/watch` resume, a follower's catch-up or
/// the check after an open.
const DECODE_SLICE: std::time::Duration = std::time::Duration::from_micros(250);
const FRAMES_PER_TURN_CHECK: usize = 64;

/// A durable frame, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedFrame {
    pub lsn: Lsn,
    pub commit_ts: TimestampMicros,
    pub epoch: Epoch,
    /// Position in the group commit that wrote it (0 starts a group). Groups are each
    /// log's own: a follower's log re-stamps it ([`Wal::submit_stamped`]).
    pub group_index: u32,
    pub kind: RecordKind,
    pub tenant: Vec<u8>,
    pub payload: Vec<u8>,
}

impl OwnedFrame {
    /// The frame, borrowing this one's bytes.
    pub fn as_frame(&self) -> Frame<'_> {
        Frame {
            lsn: self.lsn,
            commit_ts: self.commit_ts,
            epoch: self.epoch,
            group_index: self.group_index,
            kind: self.kind,
            tenant: &self.tenant,
            payload: &self.payload,
        }
    }
}

impl From<&super::frame::Frame<'_>> for OwnedFrame {
    fn from(frame: &super::frame::Frame<'_>) -> Self {
        OwnedFrame {
            lsn: frame.lsn,
            commit_ts: frame.commit_ts,
            epoch: frame.epoch,
            group_index: frame.group_index,
            kind: frame.kind,
            tenant: frame.tenant.to_vec(),
            payload: frame.payload.to_vec(),
        }
    }
}

/// What [`Wal::read_after`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogRead {
    /// Frames with LSN above `after`, in order, up to `upto`, at most to the end of one
    /// segment and about [`PAGE_BYTES`]: call again after the last one for more. Empty
    /// when nothing durable lies after `after`.
    Frames(Vec<OwnedFrame>),
    /// The log no longer holds the frame after `after` (released after a checkpoint);
    /// `oldest` is the first LSN it does hold.
    NotHeld { oldest: Option<Lsn> },
}

/// A segment marked as being read, for as long as this lives.
struct Reading<'a, S: Storage> {
    wal: &'a Wal<S>,
    name: String,
}

impl<'a, S: Storage> Reading<'a, S> {
    fn start(wal: &'a Wal<S>, name: &str) -> Reading<'a, S> {
        wal.shared.state.borrow_mut().reading.push(name.to_string());
        Reading {
            wal,
            name: name.to_string(),
        }
    }
}

impl<S: Storage> Drop for Reading<'_, S> {
    fn drop(&mut self) {
        let mut state = self.wal.shared.state.borrow_mut();
        if let Some(at) = state.reading.iter().position(|n| *n == self.name) {
            state.reading.swap_remove(at);
        }
    }
}

impl<S: Storage> Wal<S> {
    /// The durable frames with LSN in `(after, upto]` from the segment that holds
    /// `after + 1`, read from disk. Frames of other tenants are included: the caller
    /// filters.
    pub async fn read_after(&self, after: Lsn, upto: Lsn) -> Result<LogRead> {
        let wanted = after.next();
        let (name, first_lsn, start, end, learn) = {
            let state = self.shared.state.borrow();
            let upto_durable = upto.min(state.durable_lsn);
            if wanted > upto_durable {
                return Ok(LogRead::Frames(Vec::new()));
            }
            let oldest = state.segments.first().map(|s| s.first_lsn);
            let Some(index) = state.segments.iter().rposition(|s| s.first_lsn <= wanted) else {
                return Ok(LogRead::NotHeld { oldest });
            };
            let segment = &state.segments[index];
            if state.releasing.contains(&segment.name) {
                return Ok(LogRead::NotHeld { oldest });
            }
            let is_last = index + 1 == state.segments.len();
            // Every byte of the newest segment before the durable end is final.
            let end = is_last.then_some(state.durable_end);
            // Where to start reading: the segment's last group start at or before
            // `wanted`, else its first frame.
            let starts = &segment.group_starts;
            let at = starts.partition_point(|(lsn, _)| *lsn <= wanted);
            let start = at.checked_sub(1).map_or(DATA_START, |i| starts[i].1);
            let learn = segment.starts_from_reads;
            (segment.name.clone(), segment.first_lsn, start, end, learn)
        };
        // Held until this read is done (or dropped): a release leaves the file alone.
        let _reading = Reading::start(self, &name);
        // A release removes files before it updates the list, so a segment that is
        // gone (or recycled) but still listed is one being released. Releases never
        // touch the newest segment.
        let file = match self.shared.storage.open(&name).await {
            Ok(file) => file,
            Err(e) if !self.segment_listed(&name) || (end.is_none() && e.is_not_found()) => {
                return Ok(self.not_held())
            }
            Err(e) => return Err(e),
        };
        let mut head = vec![0u8; BLOCK_SIZE];
        file.read_at(0, &mut head).await?;
        let header = match SegmentHeader::decode(&head) {
            Ok(header) if header.first_lsn == first_lsn => header,
            // Released and recycled since the list was read.
            _ if end.is_none() || !self.segment_listed(&name) => return Ok(self.not_held()),
            _ => {
                return Err(Error::Corrupt {
                    file: name,
                    offset: 0,
                    reason: "the segment header does not match the log's list".into(),
                })
            }
        };
        let end = match end {
            Some(end) => end,
            None => sealed_end(&file, &header).await?,
        };
        let mut passed = Vec::new();
        let frames = match read_frames(&file, start, end, wanted, upto, &mut passed).await {
            Ok(frames) => frames,
            // Nothing read can be trusted if the segment was released meanwhile.
            Err(_) if !self.segment_listed(&name) => return Ok(self.not_held()),
            Err(e) => return Err(e),
        };
        if !self.segment_listed(&name) {
            return Ok(self.not_held());
        }
        if learn {
            self.learn_group_starts(&name, passed);
        }
        if frames.is_empty() {
            return Err(Error::Corrupt {
                file: name,
                offset: DATA_START,
                reason: format!(
                    "the log holds LSN {} but its segment has no valid frame with it",
                    wanted.0
                ),
            });
        }
        Ok(LogRead::Frames(frames))
    }

    /// Reads every segment recovery left unread (`RecoveryReport::segments_not_read`)
    /// as [`Wal::read_after`] does, every frame checked, at most `bytes_per_s` of
    /// frames (the disk reads up to twice that: each read starts at a group start and
    /// reads whole chunks): damage there is found soon after a start, not first when a
    /// follower, a `/watch` resume or the shipper needs the segment, or when the older
    /// checkpoint needs its log. A damaged segment is logged and kept in
    /// [`Wal::damaged_segments`] while the log holds it; one released meanwhile is
    /// left, and one that cannot be read for another reason (an I/O error) is logged
    /// and left unchecked. Returns the damaged ones' names.
    pub async fn check_unread_segments(&self, bytes_per_s: u64) -> Vec<String> {
        let unread: Vec<(String, Lsn, Lsn)> = {
            let state = self.shared.state.borrow();
            let segments = &state.segments;
            segments
                .iter()
                .enumerate()
                .filter(|(_, s)| s.starts_from_reads)
                .map(|(i, s)| {
                    // The last one only after a cut made it so; it ends where the log does.
                    let last = segments
                        .get(i + 1)
                        .map_or(state.durable_lsn, |next| Lsn(next.first_lsn.0 - 1));
                    (s.name.clone(), s.first_lsn, last)
                })
                .collect()
        };
        let mut damaged = Vec::new();
        for (name, first_lsn, last) in unread {
            let mut after = Lsn(first_lsn.0 - 1);
            while after < last {
                let started = std::time::Instant::now();
                let why = match self.read_after(after, last).await {
                    Ok(LogRead::Frames(page)) if !page.is_empty() => {
                        let bytes: usize = page
                            .iter()
                            .map(|f| frame_len(f.tenant.len(), f.payload.len()))
                            .sum();
                        after = page.last().map_or(last, |f| f.lsn);
                        let due = bytes as f64 / bytes_per_s.max(1) as f64;
                        let due = std::time::Duration::from_secs_f64(due);
                        glommio::timer::sleep(due.saturating_sub(started.elapsed())).await;
                        continue;
                    }
                    // Still listed and not being released, yet not readable as held:
                    // its header no longer matches, or its file is gone.
                    Ok(_) if self.held_and_kept(&name) => {
                        format!("LSN {} is not readable in it", after.0 + 1)
                    }
                    // Released since.
                    Ok(_) => break,
                    Err(e @ Error::Corrupt { .. }) => e.to_string(),
                    Err(e) => {
                        tracing::warn!(segment = %name, after = after.0, error = %e, "could not check a log segment the open did not read; it stays unchecked");
                        break;
                    }
                };
                tracing::error!(segment = %name, after = after.0, error = %why, "a log segment the open did not read is damaged: the checkpoint the shard opened from holds its writes, but a follower's catch-up, a /watch resume from them, shipping it (if the archive does not have it) and a fallback to the older checkpoint cannot use it (RUNBOOK.md, OcWalSegmentDamaged)");
                self.shared.state.borrow_mut().damaged.push(name.clone());
                damaged.push(name.clone());
                break;
            }
            if after == last {
                let mut state = self.shared.state.borrow_mut();
                if let Some(segment) = state.segments.iter_mut().find(|s| s.name == name) {
                    // Every start is known now.
                    segment.starts_from_reads = false;
                }
            }
        }
        damaged
    }

    /// The segments [`Wal::check_unread_segments`] found damaged that the log still
    /// holds (a release drops them from this list).
    pub fn damaged_segments(&self) -> Vec<String> {
        let state = self.shared.state.borrow();
        state
            .damaged
            .iter()
            .filter(|name| state.segments.iter().any(|s| s.name == **name))
            .cloned()
            .collect()
    }

    /// Whether segment `name` is listed and no release is taking it.
    fn held_and_kept(&self, name: &str) -> bool {
        let state = self.shared.state.borrow();
        state.segments.iter().any(|s| s.name == name) && !state.releasing.iter().any(|r| r == name)
    }

    /// Adds the group starts a read of segment `name` passed (in order, every one from
    /// where it began) past the last one known: the list stays every start up to the
    /// furthest any read went, so the next read begins near what it wants.
    fn learn_group_starts(&self, name: &str, passed: Vec<(Lsn, u64)>) {
        let mut state = self.shared.state.borrow_mut();
        let Some(segment) = state.segments.iter_mut().find(|s| s.name == name) else {
            return;
        };
        for (lsn, offset) in passed {
            // In order, each a block boundary: anything else (a misplaced block that
            // checks out) is left for the read that meets it again to report.
            let after_known = segment
                .group_starts
                .last()
                .is_none_or(|&(known, at)| lsn > known && offset > at);
            if after_known && offset.is_multiple_of(BLOCK_SIZE as u64) {
                segment.group_starts.push((lsn, offset));
            }
        }
    }

    fn segment_listed(&self, name: &str) -> bool {
        let state = self.shared.state.borrow();
        state.segments.iter().any(|s| s.name == name)
    }

    fn not_held(&self) -> LogRead {
        let oldest = self
            .shared
            .state
            .borrow()
            .segments
            .first()
            .map(|s| s.first_lsn);
        LogRead::NotHeld { oldest }
    }
}

/// The frames with LSN in `[wanted, upto]` among the frames of a segment file that end
/// at `end`, at most about [`PAGE_BYTES`] of them. Reads the file in chunks and decodes
/// frame by frame (the layout rules of FORMAT.md §3.3), yielding between chunks, so a
/// resume costs a bounded amount of memory and never holds the shard for long. Every
/// group start it passes (first LSN, offset) goes to `passed`, in order.
async fn read_frames<F: StorageFile>(
    file: &F,
    start: u64,
    end: u64,
    wanted: Lsn,
    upto: Lsn,
    passed: &mut Vec<(Lsn, u64)>,
) -> Result<Vec<OwnedFrame>> {
    let end = align_up(end.max(DATA_START)) as usize;
    let corrupt = |offset: usize, reason: String| Error::Corrupt {
        file: file.name().to_string(),
        offset: offset as u64,
        reason,
    };
    // `buf` holds the file's bytes from offset `base` (a block boundary; a group starts
    // on one).
    let mut base = align_down(start.max(DATA_START)) as usize;
    let mut buf: Vec<u8> = Vec::new();
    let mut pos = base;
    let mut frames = Vec::new();
    let mut page_bytes = 0;
    let mut turns = Turns::new(DECODE_SLICE);
    let mut decoded = 0usize;
    // Makes the bytes `[pos, pos + n)` available; false when the segment ends first.
    async fn fill<F: StorageFile>(
        file: &F,
        buf: &mut Vec<u8>,
        base: &mut usize,
        pos: usize,
        n: usize,
        end: usize,
    ) -> Result<bool> {
        if pos + n > end {
            return Ok(false);
        }
        if pos - *base > READ_CHUNK_BYTES {
            let keep_from = align_down((pos - *base) as u64) as usize;
            buf.drain(..keep_from);
            *base += keep_from;
        }
        while *base + buf.len() < pos + n {
            let at = *base + buf.len();
            let chunk =
                (end - at).min(READ_CHUNK_BYTES.max(align_up((pos + n - at) as u64) as usize));
            let old = buf.len();
            buf.resize(old + chunk, 0);
            file.read_at(at as u64, &mut buf[old..]).await?;
            glommio::yield_if_needed().await;
        }
        Ok(true)
    }
    loop {
        let to_boundary = BLOCK_SIZE - pos % BLOCK_SIZE;
        if to_boundary < 4 {
            pos += to_boundary; // no frame starts in a block's last 3 bytes
            continue;
        }
        if !fill(file, &mut buf, &mut base, pos, 4, end).await? {
            return Ok(frames);
        }
        let len = peek_len(&buf[pos - base..]).unwrap_or(0) as usize;
        if len == 0 {
            if pos.is_multiple_of(BLOCK_SIZE) {
                return Ok(frames); // the zero block that ends the log
            }
            pos = align_up(pos as u64) as usize; // padding after a group
            continue;
        }
        if len > MAX_FRAME_BYTES || !fill(file, &mut buf, &mut base, pos, len, end).await? {
            return Err(corrupt(
                pos,
                format!("a frame of {len} bytes does not fit the durable log"),
            ));
        }
        decoded += 1;
        if decoded.is_multiple_of(FRAMES_PER_TURN_CHECK) {
            turns.between_slices().await;
        }
        let frame = decode(&buf[pos - base..]).map_err(|e| corrupt(pos, e.to_string()))?;
        if frame.lsn > upto {
            return Ok(frames);
        }
        if frame.group_index == 0 {
            passed.push((frame.lsn, pos as u64));
        }
        if frame.lsn >= wanted {
            let expected = frames.last().map_or(wanted, |f: &OwnedFrame| f.lsn.next());
            if frame.lsn != expected {
                return Err(corrupt(
                    pos,
                    format!("LSN {} where {} was expected", frame.lsn.0, expected.0),
                ));
            }
            page_bytes += len;
            frames.push(OwnedFrame::from(&frame));
            if page_bytes >= PAGE_BYTES {
                return Ok(frames);
            }
        }
        pos += len;
    }
}

/// Where a sealed segment's frames end, from its footer.
async fn sealed_end<F: StorageFile>(file: &F, header: &SegmentHeader) -> Result<u64> {
    let mut block = vec![0u8; BLOCK_SIZE];
    file.read_at(header.footer_offset(), &mut block).await?;
    let footer = super::segment::SegmentFooter::decode(&block).map_err(|e| Error::Corrupt {
        file: file.name().to_string(),
        offset: header.footer_offset(),
        reason: format!("the footer of a sealed segment: {e:?}"),
    })?;
    Ok(footer.data_end)
}
