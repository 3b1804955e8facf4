//! Frames read back from the archive's sealed segments: what a `/watch` resume replays
//! once the local log no longer reaches back far enough (its segments are released
//! after checkpoints; the archive keeps them for the retention period).
//!
//! Blocking, like every archive call: run it on a thread of its own, never on a
//! shard's executor.

use oc_engine::io::wal::scan::scan_segment;
use oc_engine::io::{Lsn, OwnedFrame};

use crate::archive::{Archive, ArchiveError};
use crate::layout::{self, SegmentKey};

/// What [`frames_after`] found.
#[derive(Debug)]
pub enum ArchiveRead {
    /// Frames with LSN above `after`, in order, up to `upto` and at most to the end of
    /// one archived segment: call again after the last one for more.
    Frames(Vec<OwnedFrame>),
    /// No archived sealed segment holds the frame after `after`; `oldest` is the first
    /// LSN the archive holds sealed, if any.
    NotHeld { oldest: Option<Lsn> },
}

/// Why frames could not be read from the archive.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error("archived segment {key} is damaged: {why}")]
    Damaged { key: String, why: String },
}

/// The frames of `shard` with LSN in `(after, upto]` from the archived sealed segment
/// that holds `after + 1`.
pub fn frames_after(
    archive: &dyn Archive,
    shard: usize,
    after: Lsn,
    upto: Lsn,
) -> Result<ArchiveRead, ReplayError> {
    let wanted = after.next();
    let mut segments: Vec<SegmentKey> = archive
        .list(&layout::segment_prefix(shard))?
        .iter()
        .filter_map(|key| SegmentKey::parse(key))
        .filter(|s| s.shard == shard)
        .collect();
    segments.sort();
    let oldest = segments.first().map(|s| s.first_lsn);
    let Some(segment) = segments
        .iter()
        .find(|s| s.first_lsn <= wanted && wanted <= s.last_lsn)
    else {
        return Ok(ArchiveRead::NotHeld { oldest });
    };
    let key = segment.key();
    let damaged = |why: String| ReplayError::Damaged {
        key: key.clone(),
        why,
    };
    let Some((image, _)) = archive.get(&key)? else {
        // Deleted by retention since the list.
        return Ok(ArchiveRead::NotHeld { oldest });
    };
    let (file, header) = layout::expand_image(&image, true).map_err(damaged)?;
    if header.first_lsn != segment.first_lsn {
        return Err(damaged(format!(
            "its header starts at LSN {}, its key at {}",
            header.first_lsn.0, segment.first_lsn.0
        )));
    }
    let mut frames = Vec::new();
    let mut expected = wanted;
    let scanned = scan_segment(&file, &header, |frame, _| {
        if frame.lsn > upto {
            return Err(None);
        }
        if frame.lsn >= wanted {
            if frame.lsn != expected {
                return Err(Some(format!(
                    "LSN {} follows {}",
                    frame.lsn.0,
                    expected.0 - 1
                )));
            }
            expected = frame.lsn.next();
            frames.push(OwnedFrame::from(frame));
        }
        Ok(())
    });
    if let Err(Some(why)) = scanned {
        return Err(damaged(why));
    }
    if frames.is_empty() {
        return Err(damaged(format!(
            "its key says it holds LSN {} but no valid frame has it",
            wanted.0
        )));
    }
    Ok(ArchiveRead::Frames(frames))
}
