//! Frames read back from the archive: sealed segments, then the live segment's tail
//! pieces. A `/watch` resume replays them once the local log no longer reaches back
//! far enough (its segments are released after checkpoints; the archive keeps them
//! for the retention period); a follower's bootstrap reads the same way.
//!
//! Blocking, like every archive call: run it on a thread of its own, never on a
//! shard's executor.

use std::sync::Arc;

use oc_io::wal::image::frames_in_image;
use oc_io::{History, Lsn, OwnedFrame};

use crate::archive::{Archive, ArchiveError};
use crate::catalog::contiguous_end;
use crate::layout::{self, SegmentKey, TailPieceKey};
use crate::timeline;

/// What [`frames_after`] found.
#[derive(Debug)]
pub enum ArchiveRead {
    /// Frames with LSN above `after`, in order, up to `upto` and at most to the end of
    /// one archived segment: call again after the last one for more.
    Frames(Vec<OwnedFrame>),
    /// The archive holds no frame after `after`; `oldest` is the first LSN it holds
    /// sealed, if any.
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
/// that holds `after + 1`, or else from the newest archived tail of a live segment.
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
    let not_held = Ok(ArchiveRead::NotHeld { oldest });
    let (key, image, sealed) = match segments
        .iter()
        .find(|s| s.first_lsn <= wanted && wanted <= s.last_lsn)
    {
        Some(segment) => {
            let Some((image, _)) = archive.get(&segment.key())? else {
                return not_held; // deleted by retention since the list
            };
            (segment.key(), image, true)
        }
        None => {
            let Some((key, image)) = live_tail(archive, shard, wanted)? else {
                return not_held;
            };
            (key, image, false)
        }
    };
    let frames =
        frames_in_image(&image, sealed, after, upto).map_err(|why| ReplayError::Damaged {
            key: key.clone(),
            why,
        })?;
    match frames.first() {
        Some(first) if first.lsn == wanted => Ok(ArchiveRead::Frames(frames)),
        None if !sealed => not_held, // the tail ends before `wanted`
        _ => Err(ReplayError::Damaged {
            key,
            why: format!("no valid frame holds LSN {}, which it should", wanted.0),
        }),
    }
}

/// As [`frames_after`], for a server whose log has gone through `history`: read from
/// the archive's timelines (FORMAT.md §9.4), the current one first, each older one only
/// below the branch points of the newer ones, and only frames on `history`. A frame of
/// another branch (a dead writer's, after the promotion that fenced it) ends the read:
/// `NotHeld` when it is the first, so a resume that would need it starts over rather
/// than replay writes this server never had.
pub fn frames_on_history(
    root: &Arc<dyn Archive>,
    shard: usize,
    (after, upto): (Lsn, Lsn),
    history: &History,
) -> Result<ArchiveRead, ReplayError> {
    let chain = timeline::chain(root)?;
    let wanted = after.next();
    let mut oldest = None;
    let mut cap = Lsn(u64::MAX);
    for (i, timeline) in chain.iter().enumerate() {
        if i > 0 {
            // Below where the newer timeline left this one, on this shard; unknown
            // without its record, and then nothing older can be read through it.
            let Some(first) = (chain[i - 1].record.as_ref())
                .and_then(|record| record.first_lsn.get(shard).copied())
            else {
                break;
            };
            cap = cap.min(Lsn(first.saturating_sub(1)));
        }
        if wanted > cap {
            break;
        }
        match frames_after(timeline.archive.as_ref(), shard, after, upto.min(cap))? {
            ArchiveRead::Frames(mut frames) => {
                let on = frames
                    .iter()
                    .take_while(|f| history.contains(f.epoch, f.lsn))
                    .count();
                frames.truncate(on);
                return Ok(if frames.is_empty() {
                    ArchiveRead::NotHeld { oldest }
                } else {
                    ArchiveRead::Frames(frames)
                });
            }
            // The lowest any timeline holds: what a reset says the archive reaches.
            ArchiveRead::NotHeld { oldest: held } => {
                oldest = match (oldest, held) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
        }
    }
    Ok(ArchiveRead::NotHeld { oldest })
}

/// The newest archived live segment that starts at or before `wanted`: its first
/// piece's key, and its pieces' bytes joined from offset 0 (as far as they are
/// contiguous).
fn live_tail(
    archive: &dyn Archive,
    shard: usize,
    wanted: Lsn,
) -> Result<Option<(String, Vec<u8>)>, ArchiveError> {
    let mut pieces: Vec<TailPieceKey> = archive
        .list(&layout::tails_prefix(shard))?
        .iter()
        .filter_map(|key| TailPieceKey::parse(key))
        .filter(|p| p.shard == shard && p.first_lsn <= wanted)
        .collect();
    pieces.sort();
    let Some(newest) = pieces.last().map(|p| (p.epoch, p.first_lsn)) else {
        return Ok(None);
    };
    pieces.retain(|p| (p.epoch, p.first_lsn) == newest);
    let end = contiguous_end(&pieces);
    pieces.retain(|p| p.end <= end);
    // No piece at offset 0 (deleted, or never archived): nothing to read.
    let Some(first) = pieces.first().map(TailPieceKey::key) else {
        return Ok(None);
    };
    Ok(join_tail(archive, &pieces)?
        .ok()
        .map(|image| (first, image)))
}

/// Tail pieces joined from offset 0, or the key of one that was gone when read.
/// A piece that does not continue the ones before it, or whose size differs from
/// what its key says, is damage.
pub fn join_tail(
    archive: &dyn Archive,
    pieces: &[TailPieceKey],
) -> Result<Result<Vec<u8>, String>, ArchiveError> {
    let mut image = Vec::new();
    for piece in pieces {
        let corrupt = |why: String| ArchiveError::Corrupt {
            key: piece.key(),
            why,
        };
        if piece.start != image.len() as u64 {
            return Err(corrupt(format!(
                "does not continue the tail pieces before it (they end at byte {})",
                image.len()
            )));
        }
        let Some((bytes, _)) = archive.get(&piece.key())? else {
            return Ok(Err(piece.key()));
        };
        if bytes.len() as u64 != piece.end - piece.start {
            return Err(corrupt(format!(
                "holds {} bytes, its key says {}",
                bytes.len(),
                piece.end - piece.start
            )));
        }
        image.extend_from_slice(&bytes);
    }
    Ok(Ok(image))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::{Condition, LocalDirArchive};
    use oc_io::executor::run_local;
    use oc_io::wal::image::sealed_image;
    use oc_io::wal::segment::{parse_segment_name, SegmentFooter};
    use oc_io::{RecordKind, SimFaults, SimStorage, Wal, WalConfig, BLOCK_SIZE};

    /// A log of two segments: the first sealed, the second live; returns the files'
    /// bytes (oldest first), where the live one's durable groups end, and the last LSN.
    fn two_segments() -> (Vec<(String, Vec<u8>)>, u64, Lsn) {
        run_local(async {
            let storage = SimStorage::new(7, SimFaults::default());
            let config = WalConfig {
                segment_bytes: 32 * 1024,
                max_group_bytes: 8 * 1024,
                ..WalConfig::default()
            };
            let (wal, _) = Wal::open(storage.clone(), config, Lsn(1), |_| Ok(()))
                .await
                .expect("open");
            // Until the live segment holds more than two blocks of frames.
            let live_bytes = |wal: &Wal<SimStorage>| {
                wal.durable_tail()
                    .filter(|_| wal.segments().len() == 2)
                    .map_or(0, |t| t.end)
            };
            let mut last = Lsn(0);
            while live_bytes(&wal) <= 3 * BLOCK_SIZE as u64 {
                last = wal
                    .append(RecordKind(1), b"t", &[last.0 as u8; 1000])
                    .await
                    .expect("append");
            }
            let tail = wal.durable_tail().expect("a live segment");
            let files = wal
                .segments()
                .into_iter()
                .map(|name| {
                    let bytes = storage.read_file(&name).expect("the file exists");
                    (name, bytes)
                })
                .collect();
            wal.close().await.expect("close");
            (files, tail.end, tail.lsn)
        })
    }

    #[test]
    fn frames_come_from_sealed_segments_then_the_live_tail() {
        let dir = tempfile::tempdir().expect("temp dir");
        let archive = LocalDirArchive::open(dir.path()).expect("archive");
        let (files, tail_end, last) = two_segments();
        let (sealed_name, sealed) = &files[0];
        let footer = &sealed[sealed.len() - BLOCK_SIZE..];
        let data_end = SegmentFooter::decode(footer).expect("sealed").data_end as usize;
        let (image, header, footer) = sealed_image(
            &sealed[..BLOCK_SIZE],
            &sealed[BLOCK_SIZE..data_end],
            &sealed[sealed.len() - BLOCK_SIZE..],
        )
        .expect("a sealed image");
        let (_, epoch, first) = parse_segment_name(sealed_name).expect("a segment name");
        let segment = SegmentKey {
            shard: 0,
            epoch,
            first_lsn: first,
            last_lsn: footer.last_lsn,
            last_commit_us: footer.last_commit_ts.0,
        };
        assert_eq!(header.first_lsn, first);
        archive
            .put(&segment.key(), &image, &Condition::IfAbsent)
            .expect("put");
        // The live segment in two pieces, as two shipping rounds leave it.
        let (live_name, live) = &files[1];
        let (_, epoch, first_live) = parse_segment_name(live_name).expect("a segment name");
        let mid = BLOCK_SIZE as u64 * 2;
        assert!(tail_end > mid, "the live segment holds more than one block");
        for (start, end) in [(0, mid), (mid, tail_end)] {
            let piece = TailPieceKey {
                shard: 0,
                epoch,
                first_lsn: first_live,
                start,
                end,
            };
            archive
                .put(
                    &piece.key(),
                    &live[start as usize..end as usize],
                    &Condition::IfAbsent,
                )
                .expect("put");
        }

        // Page by page from the start: the sealed segment, then the tail, gap-free.
        let mut after = Lsn(0);
        let mut pages = 0;
        while after < last {
            let ArchiveRead::Frames(frames) = frames_after(&archive, 0, after, last).expect("read")
            else {
                panic!("the archive holds LSN {}", after.next());
            };
            for (i, f) in frames.iter().enumerate() {
                assert_eq!(f.lsn.0, after.0 + 1 + i as u64);
                assert_eq!(f.payload, vec![(f.lsn.0 - 1) as u8; 1000]);
            }
            after = frames.last().expect("a page has frames").lsn;
            pages += 1;
        }
        assert_eq!(pages, 2, "one page per segment");
        assert_eq!(segment.last_lsn.next(), first_live);
        // Past the end of the tail: not held.
        assert!(matches!(
            frames_after(&archive, 0, last, Lsn(last.0 + 10)).expect("read"),
            ArchiveRead::NotHeld {
                oldest: Some(Lsn(1))
            }
        ));
        // Bounded by `upto`.
        let ArchiveRead::Frames(frames) =
            frames_after(&archive, 0, first_live, first_live.next()).expect("read")
        else {
            panic!("the tail holds it");
        };
        assert_eq!(frames.len(), 1);

        // A second piece whose size differs from its key is damage, named.
        let bad = TailPieceKey {
            shard: 0,
            epoch,
            first_lsn: first_live,
            start: tail_end,
            end: tail_end + BLOCK_SIZE as u64,
        };
        archive
            .put(&bad.key(), &[0; 100], &Condition::IfAbsent)
            .expect("put");
        let err = frames_after(&archive, 0, first_live, last).expect_err("damaged");
        assert!(err.to_string().contains("holds 100 bytes"), "{err}");

        // Without the piece at offset 0 the tail cannot be read: not held, no panic.
        let first_piece = TailPieceKey {
            shard: 0,
            epoch,
            first_lsn: first_live,
            start: 0,
            end: mid,
        };
        archive.delete(&first_piece.key()).expect("delete");
        assert!(matches!(
            frames_after(&archive, 0, first_live, last).expect("read"),
            ArchiveRead::NotHeld { .. }
        ));
    }
}
