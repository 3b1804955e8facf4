//! Reading durable frames back out of a live log: the frames after an LSN, from the
//! segment files the log still holds. `/watch` resumes from here; it is the same read a
//! follower's catch-up needs.
//!
//! A reader never pins a segment: the log may release the segment being read (after a
//! checkpoint). The segment list is checked again after the read, and a segment that
//! left it meanwhile is reported as no longer held rather than trusted (a released file
//! can be recycled and overwritten while it is read).

use super::frame::{Epoch, Lsn, RecordKind, TimestampMicros};
use super::scan::scan_segment;
use super::segment::{SegmentHeader, DATA_START};
use super::Wal;
use crate::buffer::{align_up, BLOCK_SIZE};
use crate::error::{Error, Result};
use crate::storage::{Storage, StorageFile};

/// Segments are read in chunks of this size.
const READ_CHUNK_BYTES: usize = 1 << 20;

/// A durable frame, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedFrame {
    pub lsn: Lsn,
    pub commit_ts: TimestampMicros,
    pub epoch: Epoch,
    pub kind: RecordKind,
    pub tenant: Vec<u8>,
    pub payload: Vec<u8>,
}

/// What [`Wal::read_after`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogRead {
    /// Frames with LSN above `after`, in order, up to `upto` and at most to the end of
    /// one segment: call again after the last one for more. Empty when nothing durable
    /// lies after `after`.
    Frames(Vec<OwnedFrame>),
    /// The log no longer holds the frame after `after` (released after a checkpoint);
    /// `oldest` is the first LSN it does hold.
    NotHeld { oldest: Option<Lsn> },
}

impl<S: Storage> Wal<S> {
    /// The durable frames with LSN in `(after, upto]` from the segment that holds
    /// `after + 1`, read from disk. Frames of other tenants are included: the caller
    /// filters.
    pub async fn read_after(&self, after: Lsn, upto: Lsn) -> Result<LogRead> {
        let wanted = after.next();
        let (name, first_lsn, end) = {
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
            let is_last = index + 1 == state.segments.len();
            // Every byte of the newest segment before the durable end is final.
            let end = is_last.then_some(state.durable_end);
            (segment.name.clone(), segment.first_lsn, end)
        };
        // A release removes files before it updates the list, so a segment that is
        // gone (or recycled) but still listed is one being released. Releases never
        // touch the newest segment.
        let file = match self.shared.storage.open(&name).await {
            Ok(file) => file,
            Err(_) if end.is_none() || !self.segment_listed(&name) => return Ok(self.not_held()),
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
        let mut bytes = vec![0u8; align_up(end.max(DATA_START)) as usize];
        let mut at = DATA_START as usize;
        while at < bytes.len() {
            let chunk = (bytes.len() - at).min(READ_CHUNK_BYTES);
            file.read_at(at as u64, &mut bytes[at..at + chunk]).await?;
            at += chunk;
        }
        let mut frames = Vec::new();
        let mut expected = wanted;
        let _ = scan_segment(&bytes, &header, |frame, _| {
            if frame.lsn > upto {
                return Err(());
            }
            if frame.lsn >= wanted {
                if frame.lsn != expected {
                    return Err(());
                }
                expected = frame.lsn.next();
                frames.push(OwnedFrame {
                    lsn: frame.lsn,
                    commit_ts: frame.commit_ts,
                    epoch: frame.epoch,
                    kind: frame.kind,
                    tenant: frame.tenant.to_vec(),
                    payload: frame.payload.to_vec(),
                });
            }
            Ok(())
        });
        // Nothing read can be trusted if the segment was released meanwhile.
        if !self.segment_listed(&name) {
            return Ok(self.not_held());
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
