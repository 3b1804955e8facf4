//! Point-in-time restore, and the walk that verifies an archive.
//!
//! Restore, per shard: take the newest archived checkpoint that was *complete* at or
//! before the target (its rows were all committed by then; FORMAT.md §6 `completed_us`),
//! or the start of the log if the archive reaches back to LSN 1; then the sealed
//! segments from the checkpoint's LSN + 1 on, in LSN order and without gaps, and the
//! pieces of the newest active segment; cut the log before the first group committed
//! after the target (commit times are per group, so a cut always falls on a group's
//! first block). The result is ordinary files in a new data directory, which
//! `oc-server` then opens through its own CRC-validating loaders and replays.
//!
//! The new directory is locked (`oc.lock`) for the whole restore, so a server cannot
//! start on it halfway. A marker file is made before the first shard file and removed
//! after the layout file (with a new data directory id), which is written last: a
//! restore that stopped early, even before its first shard, leaves a directory
//! `oc-server` refuses. The new
//! id is not the archive's owner, so the restored server ships to a new archive.
//!
//! One file, about 690 lines: restore and verify walk the same chain of objects, so
//! they share the planning code.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use oc_engine::placement::{
    create_layout_with_epochs, shard_dir, DataDirId, EpochStart, Layout, Lineage, RESTORE_MARKER,
};
use oc_io::dir_lock::{DirLock, DirLockError, LOCK_FILE};
use oc_io::wal::image::{self, FrameAt};
use oc_io::Lsn;

use crate::archive::{Archive, ArchiveError};
use crate::audit;
use crate::catalog::{read_archive_manifest, CheckpointManifest, ShardCatalog};
use crate::layout::{self, SegmentKey, TailPieceKey};
use crate::timeline::{self, Timeline};
use crate::timestamp::format_rfc3339;

/// Restore everything the archive has.
pub const LATEST: u64 = u64::MAX;

/// The most shards a restore writes at once: each holds a segment in memory.
const RESTORE_JOBS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum PitrError {
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error("{0}")]
    Refused(String),
    /// Listed a moment ago, gone when read: a live writer deleted it meanwhile (its
    /// retention, or the tail pieces a sealed segment replaced), or it is lost.
    #[error("{key} was listed but is gone when read (a live writer's retention or sealing deleted it meanwhile?)")]
    Vanished { key: String },
    #[error(transparent)]
    Locked(#[from] DirLockError),
    #[error("writing {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> PitrError + '_ {
    move |source| PitrError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// One shard's restore plan.
#[derive(Debug, Clone)]
pub struct ShardPlan {
    pub shard: usize,
    pub checkpoint: Option<CheckpointManifest>,
    pub segments: Vec<SegmentKey>,
    pub tail: Option<Vec<TailPieceKey>>,
    /// Why the plan stops short of what the archive lists (a gap), if it does.
    pub stops_early: Option<String>,
    /// Plans from older restore points, tried in turn when this one's checkpoint
    /// snapshot turns out damaged (`oc-pitr verify` names it).
    pub older: Vec<ShardPlan>,
}

/// The log an archive holds from `need` on, up to `target` (a plan without its base).
fn chain_from(
    catalog: &ShardCatalog,
    need: Lsn,
    target: u64,
    cap: Lsn,
) -> Result<ShardPlan, String> {
    let plan = |segments, tail, stops_early| ShardPlan {
        shard: catalog.shard,
        checkpoint: None,
        segments,
        tail,
        stops_early,
        older: Vec::new(),
    };
    let mut next = need;
    let mut segments = Vec::new();
    let mut last_commit = 0;
    // Stopping early at a gap still restores something when there is a checkpoint
    // below `need` or segments before the gap; the latest point is then the best one.
    let something = |segments: &[SegmentKey]| need > Lsn(1) || !segments.is_empty();
    let gap = |next: Lsn, found: Lsn, what: String| {
        if next == Lsn(1) {
            // Nothing before the oldest object: retention's doing as a rule.
            return format!(
                "the archive's log begins at LSN {} ({what}), so the target is before the \
                 earliest point a restore can reach (`oc-pitr verify` prints the window): \
                 --archive-retention deletes the history past the oldest checkpoint it keeps \
                 (if no retention ran, the oldest objects are missing)",
                found.0
            );
        }
        format!(
            "LSNs {}..={} are missing from the archive (the next object is {what})",
            next.0,
            found.0 - 1
        )
    };
    for segment in &catalog.segments {
        if segment.last_lsn < next || segment.last_lsn.0 + 1 == segment.first_lsn.0 {
            continue; // before what is needed, or empty
        }
        if last_commit > target || segment.first_lsn > cap {
            break;
        }
        if segment.first_lsn > next {
            let why = gap(next, segment.first_lsn, segment.key());
            return if target == LATEST && something(&segments) {
                Ok(plan(segments, None, Some(why)))
            } else {
                Err(why)
            };
        }
        segments.push(*segment);
        next = segment.last_lsn.next();
        last_commit = segment.last_commit_us;
    }
    let mut tail = None;
    if last_commit <= target && next <= cap {
        if let Some((&(_, first), pieces)) =
            catalog.live_tail().filter(|((_, first), _)| *first <= cap)
        {
            if first > next {
                let why = gap(
                    next,
                    first,
                    format!("the tail of segment {}", pieces[0].file_name()),
                );
                if target != LATEST || !something(&segments) {
                    return Err(why);
                }
                return Ok(plan(segments, None, Some(why)));
            }
            // The live segment may have started before the LSN needed (a checkpoint
            // taken while it was live): its frames past that LSN are still needed.
            // After sealed segments only the one that continues them is the live
            // one; an older folder is left over from a segment archived sealed since.
            if first == next || segments.is_empty() {
                tail = Some(pieces.clone());
            }
        }
    }
    Ok(plan(segments, tail, None))
}

/// Chooses what to restore for one shard (see the module comment).
pub fn plan_shard(catalog: &ShardCatalog, target: u64) -> Result<ShardPlan, String> {
    plan_shard_capped(catalog, target, Lsn(u64::MAX))
}

/// [`plan_shard`], restoring no LSN above `cap` (a timeline's branch point).
pub fn plan_shard_capped(
    catalog: &ShardCatalog,
    target: u64,
    cap: Lsn,
) -> Result<ShardPlan, String> {
    let mut reasons = Vec::new();
    let mut feasible = Vec::new();
    // A checkpoint is fuzzy: its rows may hold commands logged while it was copied,
    // after its LSN. Below a branch point only one completed before a commit at or
    // below the cap is sure to hold nothing past it.
    let before_cap = |c: &CheckpointManifest| {
        cap == Lsn(u64::MAX)
            || c.completed_us.is_some_and(|done| {
                catalog
                    .segments
                    .iter()
                    .any(|s| s.last_lsn <= cap && s.last_commit_us >= done)
            })
    };
    let bases = catalog
        .checkpoints
        .iter()
        .rev()
        .filter(|c| c.restorable_from_us() <= target && c.lsn <= cap && before_cap(c))
        .map(Some)
        .chain([None]);
    for base in bases {
        let need = base.map_or(Lsn(1), |c| c.lsn.next());
        // A checkpoint left out (its manifest damaged or gone) or a snapshot without
        // its manifest is not "nothing": the shard had data, and a restore without it
        // must be refused, not planned empty.
        let nothing_at_all = catalog.checkpoints.is_empty()
            && catalog.segments.is_empty()
            && catalog.live_tail().is_none()
            && catalog.damaged_manifests.is_empty()
            && catalog.unreadable_manifests.is_empty()
            && catalog.orphan_snapshots.is_empty();
        if nothing_at_all {
            // No frame of this shard was ever archived: it never had a durable write
            // (shipping keeps every segment until the archive has it).
            return Ok(ShardPlan {
                shard: catalog.shard,
                checkpoint: None,
                segments: Vec::new(),
                tail: None,
                stops_early: None,
                older: Vec::new(),
            });
        }
        match chain_from(catalog, need, target, cap) {
            Ok(plan) => feasible.push(ShardPlan {
                checkpoint: base.cloned(),
                ..plan
            }),
            Err(why) => reasons.push(match base {
                Some(c) => format!("from checkpoint {}: {why}", c.lsn.0),
                None => format!("from the start of the log: {why}"),
            }),
        }
    }
    let mut feasible = feasible.into_iter();
    if let Some(mut plan) = feasible.next() {
        plan.older = feasible.collect();
        return Ok(plan);
    }
    Err(format!(
        "shard {}: no restore point at or before the target: {}",
        catalog.shard,
        reasons.join("; ")
    ))
}

/// A segment file rebuilt from the archive, validated, and cut at the target.
struct Rebuilt {
    file: Vec<u8>,
    name: String,
    last: Option<FrameAt>,
    /// The target cut this segment: later segments are not wanted.
    cut: bool,
    /// Why it ends before the cap it was cut at, if it does.
    short: Option<String>,
}

fn fetch(archive: &dyn Archive, key: &str) -> Result<Vec<u8>, PitrError> {
    match archive.get(key)? {
        Some((bytes, _)) => Ok(bytes),
        None => Err(PitrError::Vanished {
            key: key.to_string(),
        }),
    }
}

/// Joins tail pieces from offset 0; they must be contiguous.
fn join_pieces(archive: &dyn Archive, pieces: &[TailPieceKey]) -> Result<Vec<u8>, PitrError> {
    crate::replay::join_tail(archive, pieces)?.map_err(|key| PitrError::Vanished { key })
}

/// The log's objects in LSN order: sealed segments by key, then the live tail (its
/// first piece's key, with the pieces to join).
fn log_objects<'a>(
    segments: &[SegmentKey],
    tail: Option<&'a [TailPieceKey]>,
) -> Vec<(String, Option<&'a [TailPieceKey]>)> {
    let mut objects: Vec<_> = segments.iter().map(|s| (s.key(), None)).collect();
    if let Some(pieces) = tail.filter(|p| !p.is_empty()) {
        objects.push((pieces[0].key(), Some(pieces)));
    }
    objects
}

/// A sealed segment's image, or the tail pieces joined.
fn fetch_image(
    archive: &dyn Archive,
    key: &str,
    pieces: Option<&[TailPieceKey]>,
) -> Result<Vec<u8>, PitrError> {
    match pieces {
        None => fetch(archive, key),
        Some(pieces) => join_pieces(archive, pieces),
    }
}

/// Expands and validates an image, checking it continues at `expected`, and cuts it
/// before the first group committed after `target` or past `cap`.
fn rebuild(
    key: &str,
    image: Vec<u8>,
    sealed: bool,
    expected: Lsn,
    (target, cap): (u64, Lsn),
) -> Result<Rebuilt, PitrError> {
    let corrupt = |why: String| {
        PitrError::Archive(ArchiveError::Corrupt {
            key: key.to_string(),
            why,
        })
    };
    let (mut file, header) = image::expand_image_owned(image, sealed).map_err(corrupt)?;
    if header.first_lsn > expected {
        return Err(corrupt(format!(
            "starts at LSN {} where LSN {} was expected",
            header.first_lsn.0, expected.0
        )));
    }
    let mut last: Option<FrameAt> = None;
    let mut cut_at = None;
    // The current group's first frame, and the frame before it: a branch point may
    // fall inside one of the old writer's groups (the follower's groups are its own),
    // and a log can only end where a group ends.
    let mut group_first: Option<(FrameAt, Option<FrameAt>)> = None;
    image::scan_file(&file, &header, sealed, |frame| {
        if cut_at.is_some() {
            return;
        }
        if frame.group_index == 0 {
            group_first = Some((*frame, last));
        }
        if frame.commit_us > target || frame.lsn > cap {
            cut_at = Some(*frame);
        } else {
            last = Some(*frame);
        }
    })
    .map_err(corrupt)?;
    let name = oc_io::wal::segment::segment_name(header.shard, header.epoch, header.first_lsn);
    let mut short = None;
    if let Some(mut frame) = cut_at {
        let inside_group =
            frame.group_index != 0 || !frame.start.is_multiple_of(oc_io::BLOCK_SIZE as u64);
        if inside_group && frame.lsn > cap && frame.commit_us <= target {
            // Cut at the start of the group instead: its frames up to the cap are
            // shared with the newer history, but half a group is not a log.
            match group_first {
                Some((first, before)) if first.lsn >= expected => {
                    short = Some(format!(
                        "the branch point (LSN {}) falls inside a group commit of the old \
                         history that starts at LSN {}: LSNs {}..={} are restored only from \
                         the newer history",
                        cap.0, first.lsn.0, first.lsn.0, cap.0
                    ));
                    last = before;
                    frame = first;
                }
                _ => {
                    return Err(corrupt(format!(
                        "the branch point (LSN {}) falls inside a group commit that begins \
                         before what this restore reads",
                        cap.0
                    )))
                }
            }
        } else if inside_group {
            // A follower groups the frames it receives its own way, so after a failover
            // one group may hold commits from both sides of the target. A log can only
            // end where a group ends: the restore ends before this one, at a state the
            // writer had a few commits before the target.
            match group_first {
                Some((first, before)) if first.lsn >= expected => {
                    short = Some(format!(
                        "the target falls inside a group commit (LSNs {}..) whose frames were \
                         committed on both sides of it (a promoted follower's log groups its \
                         old writer's commits its own way): the restore ends before that \
                         group, at the commits before LSN {}",
                        first.lsn.0, first.lsn.0
                    ));
                    last = before;
                    frame = first;
                }
                _ => {
                    return Err(corrupt(format!(
                        "the target falls inside a group commit at LSN {} that begins before \
                         what this restore reads (commit times differ within it)",
                        frame.lsn.0
                    )))
                }
            }
        }
        file[frame.start as usize..].fill(0);
    }
    Ok(Rebuilt {
        file,
        name,
        last,
        cut: cut_at.is_some(),
        short,
    })
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), PitrError> {
    let mut f = File::create(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

fn sync_dir(path: &Path) -> Result<(), PitrError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io_err(path))
}

/// What restoring one shard produced.
#[derive(Debug, Clone)]
pub struct ShardRestored {
    pub shard: usize,
    pub checkpoint: Option<Lsn>,
    pub segments: usize,
    pub last_lsn: Lsn,
    pub last_commit_us: u64,
    pub bytes: u64,
    pub stops_early: Option<String>,
    /// The archive lists more of this shard's log than the restore could chain up (a
    /// missing object or a timeline its writer never finished shipping): writes past
    /// where it stopped, acknowledged ones among them, are not restored.
    pub gap: bool,
}

/// What a restore wrote.
#[derive(Debug, Clone)]
pub struct Restored {
    /// The epoch the restored directory writes.
    pub epoch: u64,
    pub shards: Vec<ShardRestored>,
    /// The new directory's id (never the archive owner's).
    pub data_dir_id: DataDirId,
}

/// Restores the archive as of `target` (µs since the epoch, or [`LATEST`]) into
/// `data_dir`, which must be empty or absent (or hold only a lock file nobody holds).
/// `progress` gets one line per object. The archive's current timeline is followed
/// (see [`crate::timeline`]).
pub fn restore(
    archive: &Arc<dyn Archive>,
    target: u64,
    data_dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Restored, PitrError> {
    restore_as(archive, target, data_dir, RestoreAs::Writer, progress)
}

/// What a restore of `root` at `target` reads: the timeline, each shard's plan, and
/// the LSN each shard stops at (its branch point, or none).
pub struct TimelinePlan {
    pub timeline: Timeline,
    pub plans: Vec<ShardPlan>,
    pub caps: Vec<Lsn>,
    /// The newest frame epoch in the chosen timeline's objects.
    pub timeline_epoch: u64,
    /// The newest frame epoch in any history the archive holds.
    pub newest_epoch: u64,
}

/// The highest LSN a plan restores at least (its tail may hold more).
fn plan_end(plan: &ShardPlan) -> Lsn {
    let checkpoint = plan.checkpoint.as_ref().map_or(Lsn(0), |c| c.lsn);
    let segments = plan.segments.last().map_or(Lsn(0), |s| s.last_lsn);
    let tail = plan
        .tail
        .as_ref()
        .and_then(|pieces| pieces.first())
        .map_or(Lsn(0), |p| Lsn(p.first_lsn.0.saturating_sub(1)));
    checkpoint.max(segments).max(tail)
}

/// Whether a plan is cut by the target (it holds a commit after it).
fn passes_target(plan: &ShardPlan, target: u64) -> bool {
    plan.segments
        .last()
        .is_some_and(|s| s.last_commit_us > target)
}

/// Chooses the timeline that restores `target`: the current one if it reaches back to
/// it, else its parent capped at the branch point, and so on; a target after a
/// promotion is only restored from the timelines that promotion started. A history
/// still receiving what its writer inherited (just promoted) does not count as
/// reaching back past what it holds.
pub fn plan_timeline(root: &Arc<dyn Archive>, target: u64) -> Result<TimelinePlan, PitrError> {
    let chain = timeline::chain(root)?;
    let mut shards = None;
    let mut newest_epoch = 1;
    let mut reasons = Vec::new();
    for i in 0..chain.len() {
        let t = &chain[i];
        if i > 0 {
            // Only a target before the newer timeline began is in its parent's history.
            let newer = &chain[i - 1];
            if let Some(record) = newer.record.as_ref().filter(|r| target >= r.promoted_at_us) {
                reasons.push(format!(
                    "{} began at {} (a promotion), so {} holds nothing of the target's",
                    newer.name(),
                    format_rfc3339(record.promoted_at_us),
                    t.name()
                ));
                break;
            }
        }
        let n = t.shards()?;
        if *shards.get_or_insert(n) != n {
            return Err(PitrError::Refused(format!(
                "{} has {n} shard(s) where {} has {}: not one archive's histories",
                t.name(),
                chain[0].name(),
                shards.unwrap_or_default()
            )));
        }
        let caps = match timeline::caps(&chain, i, n) {
            Ok(caps) => caps,
            Err(why) => {
                reasons.push(why);
                break;
            }
        };
        let catalogs = (0..n)
            .map(|shard| match t.shipped {
                true => ShardCatalog::load(t.archive.as_ref(), shard),
                false => Ok(ShardCatalog {
                    shard,
                    ..ShardCatalog::default()
                }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let timeline_epoch = catalogs
            .iter()
            .map(ShardCatalog::newest_epoch)
            .chain(t.record.as_ref().map(|r| r.frame_epoch))
            .fold(1, u64::max);
        newest_epoch = newest_epoch.max(timeline_epoch);
        let planned: Result<Vec<ShardPlan>, String> = catalogs
            .iter()
            .zip(&caps)
            .map(|(catalog, cap)| plan_shard_capped(catalog, target, *cap))
            .collect();
        let mut plans = match planned {
            Ok(plans) => plans,
            Err(why) => {
                reasons.push(format!("{}: {why}", t.name()));
                continue;
            }
        };
        // A promoted writer ships what it inherited first: until that is there, its
        // history does not reach back past what it holds.
        if let Some(record) = &t.record {
            let short: Vec<String> = plans
                .iter()
                .zip(&record.first_lsn)
                .filter(|(p, first)| !passes_target(p, target) && plan_end(p) < Lsn(**first - 1))
                .map(|(p, first)| {
                    format!(
                        "shard {} up to LSN {} of {}",
                        p.shard,
                        plan_end(p).0,
                        first - 1
                    )
                })
                .collect();
            if !short.is_empty() {
                reasons.push(format!(
                    "{} does not yet hold the history it continues ({}): its writer is \
                     still shipping it, or stopped first",
                    t.name(),
                    short.join(", ")
                ));
                continue;
            }
        }
        // Below a branch point, an old history that ends before it restores less than
        // the newer one holds there: say so.
        for (plan, cap) in plans.iter_mut().zip(&caps) {
            if *cap < Lsn(u64::MAX)
                && plan.stops_early.is_none()
                && plan.tail.is_none()
                && !passes_target(plan, target)
                && plan_end(plan) < *cap
            {
                plan.stops_early = Some(format!(
                    "{}'s archive ends at LSN {}, below the branch point {}: its writer \
                     never shipped the rest",
                    t.name(),
                    plan_end(plan).0,
                    cap.0
                ));
            }
        }
        let timeline = chain.into_iter().nth(i).ok_or_else(|| {
            PitrError::Refused("the timeline chain changed while planning".into())
        })?;
        return Ok(TimelinePlan {
            timeline,
            plans,
            caps,
            timeline_epoch,
            newest_epoch,
        });
    }
    Err(PitrError::Refused(reasons.join("; ")))
}

/// What a restored directory is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreAs {
    /// A server of its own: it starts a new epoch (below) and ships to a new archive.
    Writer,
    /// The start of a follower of the writer that ships to this archive: it keeps the
    /// archive's history as it is (no new epoch), and takes the writer's epochs from
    /// the writer when it starts (`--mode follower`), then streams the rest of its log.
    Follower,
}

/// [`restore`], for a writer or for a follower's bootstrap.
pub fn restore_as(
    root: &Arc<dyn Archive>,
    target: u64,
    data_dir: &Path,
    purpose: RestoreAs,
    progress: &mut dyn FnMut(&str),
) -> Result<Restored, PitrError> {
    // Made here only if this call creates it (not a dangling symlink, nor a directory
    // another process made in the meantime).
    let made_here = fs::symlink_metadata(data_dir).is_err()
        && data_dir
            .parent()
            .is_none_or(|parent| fs::create_dir_all(parent).is_ok())
        && fs::create_dir(data_dir).is_ok();
    let restored = restore_into(root, target, data_dir, purpose, progress);
    if restored.is_err() && made_here {
        // A refused or failed restore leaves no directory it made (a half-written
        // one, or one holding only its lock file, would be mistaken for data).
        let _ = fs::remove_dir_all(data_dir);
    }
    restored
}

fn restore_into(
    root: &Arc<dyn Archive>,
    target: u64,
    data_dir: &Path,
    purpose: RestoreAs,
    progress: &mut dyn FnMut(&str),
) -> Result<Restored, PitrError> {
    // A directory with other files and no lock file is refused without touching it;
    // otherwise the lock comes first, so a server using it names itself.
    if !data_dir.join(LOCK_FILE).exists() {
        refuse_unless_empty(data_dir)?;
    }
    let _lock = DirLock::acquire(data_dir, "oc-pitr restore")?;
    refuse_unless_empty(data_dir)?;
    // From here until the layout file, the marker tells `oc-server` (and a second
    // restore) that this directory is partial: a restore killed while it plans would
    // otherwise leave a directory holding only the lock file, which starts as an empty
    // database.
    let marker = data_dir.join(RESTORE_MARKER);
    write_synced(&marker, b"")?;
    sync_dir(data_dir)?;
    let planned = plan_timeline(root, target).and_then(|plan| {
        let manifest = read_archive_manifest(plan.timeline.archive.as_ref())?;
        Ok((plan, manifest))
    });
    let (
        TimelinePlan {
            timeline,
            plans,
            caps,
            timeline_epoch,
            newest_epoch,
        },
        manifest,
    ) = match planned {
        Ok(planned) => planned,
        Err(e) => {
            // Refused before writing anything: the directory is left as it was.
            let _ = fs::remove_file(&marker);
            let _ = sync_dir(data_dir);
            return Err(e);
        }
    };
    let archive = timeline.archive.as_ref();
    if timeline.lease_epoch > 1 || caps.iter().any(|c| *c < Lsn(u64::MAX)) {
        progress(&format!(
            "restoring from {} (lease epoch {}){}",
            timeline.name(),
            timeline.lease_epoch,
            if caps.iter().any(|c| *c < Lsn(u64::MAX)) {
                format!(
                    ", up to the branch point of the newer timeline: LSNs {:?}",
                    caps.iter().map(|c| c.0).collect::<Vec<_>>()
                )
            } else {
                String::new()
            }
        ));
    }
    let restored = restore_shards(archive, &plans, &caps, target, data_dir, progress).map_err(
        |e| match e {
            PitrError::Vanished { .. } => PitrError::Refused(format!(
                "{e}; {}run the restore again. If the same object is missing again it is \
                 lost, not moved: `oc-pitr verify` says what the archive still restores, \
                 and to which times",
                if data_dir.exists() {
                    format!(
                        "{} holds a partial restore: remove it and ",
                        data_dir.display()
                    )
                } else {
                    String::new()
                }
            )),
            e => e,
        },
    )?;
    let archived_frames = plans
        .iter()
        .any(|p| !p.segments.is_empty() || p.tail.is_some());
    let nothing_restored = restored
        .iter()
        .all(|s| s.checkpoint.is_none() && s.last_lsn == Lsn(0));
    if target != LATEST && archived_frames && nothing_restored {
        // An empty directory reported as a restore looks like data loss (a mistyped
        // year): refused, and what this restore made is removed.
        remove_restore_output(data_dir)?;
        return Err(PitrError::Refused(format!(
            "the target {} is before the first commit the archive holds: the restore would \
             be empty. Nothing was written. Pick a later target (`oc-pitr list` shows each \
             segment's last commit), or --target latest. Commits stamped later than the \
             current time mean the writer's clock ran ahead: only a target after them, or \
             latest, reaches them",
            format_rfc3339(target)
        )));
    }
    if target != LATEST && target > oc_io::TimestampMicros::now().0 {
        progress(&format!(
            "the target {} is in the future: everything archived is restored, as --target \
             latest does",
            format_rfc3339(target)
        ));
    }
    sync_dir(data_dir)?;
    // The restored directory writes a new epoch from the LSN after the restore point:
    // the old history past it (a dead branch) is never confused with what it writes
    // again under the same LSNs (a `/watch` id from it gets `reset`). The epoch is
    // above every epoch in the archive (in every timeline) and at least the restore's time in seconds
    // times 256 (the scale promotions' epochs take, FORMAT.md §7), so
    // two restores from one archive (each shipping to a new archive) never share one.
    let restored_at_s = oc_io::TimestampMicros::now().0 / 1_000_000;
    let mut epochs = Vec::new();
    if purpose == RestoreAs::Follower {
        // Nothing is written here but the writer's frames: its epochs come from it. The
        // archive's owner is the writer it follows (its first start as a follower
        // records it too, should the record be unreadable now).
        restore_audit_log(archive, data_dir, target, timeline_epoch, progress);
        let writer = match crate::lease::read(root.as_ref()) {
            Ok(Some((lease, _))) => DataDirId::parse(&lease.owner_id),
            Ok(None) | Err(_) => None,
        };
        let layout = finish_layout(
            data_dir,
            (manifest.shards, &manifest.lineage),
            epochs,
            writer,
        )?;
        return Ok(Restored {
            epoch: timeline_epoch,
            shards: restored,
            data_dir_id: layout.id,
        });
    }
    if timeline_epoch > 1 {
        // Where the timeline's own epochs began is not recorded here: ids of its newest
        // epoch count from 0 (none lies below where it began), older ones get `reset`.
        epochs.push(EpochStart {
            epoch: timeline_epoch,
            first_lsn: vec![0; manifest.shards],
            lease_epoch: None,
        });
    }
    epochs.push(EpochStart {
        epoch: (newest_epoch + 1).max(restored_at_s << 8),
        first_lsn: restored.iter().map(|s| s.last_lsn.0 + 1).collect(),
        lease_epoch: None,
    });
    let new_epoch = epochs.last().map_or(1, |e| e.epoch);
    restore_audit_log(archive, data_dir, target, new_epoch, progress);
    let layout = finish_layout(data_dir, (manifest.shards, &manifest.lineage), epochs, None)?;
    Ok(Restored {
        epoch: layout.epoch(),
        shards: restored,
        data_dir_id: layout.id,
    })
}

/// Writes the layout file, the last step of a restore, and then removes the marker
/// that stood for it until now (a kill between the two leaves a whole restore).
fn finish_layout(
    data_dir: &Path,
    (shards, lineage): (usize, &Option<String>),
    epochs: Vec<EpochStart>,
    follows: Option<DataDirId>,
) -> Result<Layout, PitrError> {
    // The restored history continues the archive's (an archive from before lineages
    // were recorded leaves it unknown).
    let lineage = lineage
        .as_deref()
        .and_then(DataDirId::parse)
        .map_or(Lineage::Unknown, Lineage::Of);
    let layout = create_layout_with_epochs(data_dir, shards, epochs, follows, lineage)
        .map_err(|e| PitrError::Refused(e.to_string()))?;
    let marker = data_dir.join(RESTORE_MARKER);
    fs::remove_file(&marker).map_err(io_err(&marker))?;
    sync_dir(data_dir)?;
    Ok(layout)
}

/// Restores every shard, as many at once as the machine has CPUs (at most
/// [`RESTORE_JOBS`]): a shard's objects are fetched, checked and written by one
/// thread, in LSN order, and shards share nothing. Each thread holds one segment
/// (its whole capacity, 64 MiB by default) at a time. Progress lines come back here,
/// so `progress` need not be `Send`. Once a shard fails no other shard is started;
/// the first failing shard (in shard order) is the error.
fn restore_shards(
    archive: &dyn Archive,
    plans: &[ShardPlan],
    caps: &[Lsn],
    target: u64,
    data_dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<ShardRestored>, PitrError> {
    let jobs = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(RESTORE_JOBS)
        .min(plans.len())
        .max(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::atomic::AtomicBool::new(false);
    let results: Vec<std::sync::Mutex<Option<Result<ShardRestored, PitrError>>>> =
        plans.iter().map(|_| std::sync::Mutex::new(None)).collect();
    let (lines, printed) = std::sync::mpsc::channel::<String>();
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            let lines = lines.clone();
            let (next, results, failed) = (&next, &results, &failed);
            scope.spawn(move || loop {
                if failed.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(plan) = plans.get(i) else { break };
                let mut report = |line: &str| {
                    let _ = lines.send(line.to_string());
                };
                let outcome =
                    restore_shard(archive, plan, (target, caps[i]), data_dir, &mut report);
                if outcome.is_err() {
                    failed.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                if let Ok(mut slot) = results[i].lock() {
                    *slot = Some(outcome);
                }
            });
        }
        drop(lines);
        // Ends once every thread is done and has dropped its sender.
        for line in printed {
            progress(&line);
        }
    });
    results
        .into_iter()
        .map(|slot| {
            slot.into_inner().ok().flatten().unwrap_or_else(|| {
                // Never started: a shard before it failed (its error comes first).
                Err(PitrError::Refused(
                    "not restored: another shard's restore failed first".into(),
                ))
            })
        })
        .collect()
}

/// Brings the archive's copy of the audit log into the new directory and records the
/// restore in it. Nothing here fails the restore (the data is what was asked for): a
/// problem is reported through `progress` as a warning.
fn restore_audit_log(
    archive: &dyn Archive,
    data_dir: &Path,
    target: u64,
    epoch: u64,
    progress: &mut dyn FnMut(&str),
) {
    // Copied whole or not at all: a partial copy would reuse sequence numbers the
    // archive's later files hold.
    let dir = data_dir.join(format!("{}.partial", audit::AUDIT_DIR));
    let copied = (|| -> Result<usize, String> {
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut copied = 0;
        for key in archive
            .list(layout::AUDIT_PREFIX)
            .map_err(|e| e.to_string())?
        {
            let Some(name) = key
                .strip_prefix(layout::AUDIT_PREFIX)
                .filter(|n| audit::AuditFile::parse(n).is_some())
            else {
                continue;
            };
            let bytes = fetch(archive, &key).map_err(|e| e.to_string())?;
            write_synced(&dir.join(name), &bytes).map_err(|e| e.to_string())?;
            copied += 1;
        }
        sync_dir(&dir).map_err(|e| e.to_string())?;
        let whole = data_dir.join(audit::AUDIT_DIR);
        fs::rename(&dir, &whole).map_err(|e| format!("{}: {e}", whole.display()))?;
        sync_dir(data_dir).map_err(|e| e.to_string())?;
        Ok(copied)
    })();
    match copied {
        Ok(n) => progress(&format!("audit log: {n} file(s) copied from the archive")),
        Err(why) => {
            let _ = fs::remove_dir_all(&dir);
            progress(&format!(
                "WARNING: the archive's audit log was not copied ({why}); the restored \
                 directory starts a new one (the archive keeps the old history)"
            ))
        }
    }
    // A damaged newest file (the archive holds what the disk held) would stop the
    // restored server from starting: it is set aside under a name the log ignores.
    let opened = match audit::AuditLog::open(data_dir) {
        Err(audit::AuditError::Damaged { file, offset, why }) => {
            let aside = format!("{file}.damaged");
            progress(&format!(
                "WARNING: the archived audit file {file} is damaged at byte {offset} ({why}); \
                 kept as {aside}, readable with grep"
            ));
            fs::rename(&file, &aside)
                .map_err(|e| audit::AuditError::Io {
                    file: file.clone(),
                    why: e.to_string(),
                })
                .and_then(|()| audit::AuditLog::open(data_dir))
        }
        other => other,
    };
    let marker = opened.and_then(|mut log| {
        let target = if target == LATEST {
            "latest".to_string()
        } else {
            format_rfc3339(target)
        };
        let seqs = log.append(vec![audit::Pending::Begin(audit::Action {
            request_id: format!("oc-pitr-{}-epoch-{epoch}", std::process::id()),
            actor: "oc-pitr".into(),
            action: "restore".into(),
            tenant: None,
            target: Some(target),
        })])?;
        log.append(vec![audit::Pending::End {
            of: seqs[0],
            status: 200,
            code: None,
            effect: audit::Effect::default(),
        }])
    });
    if let Err(e) = marker {
        progress(&format!(
            "WARNING: the restore could not be recorded in the audit log: {e}"
        ));
    }
}

/// Removes what a refused restore wrote into `data_dir` (empty before it, but for the
/// lock file this process holds).
fn remove_restore_output(data_dir: &Path) -> Result<(), PitrError> {
    for entry in fs::read_dir(data_dir).map_err(io_err(data_dir))?.flatten() {
        if entry.file_name() == std::ffi::OsStr::new(LOCK_FILE) {
            continue;
        }
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
            _ => fs::remove_file(&path),
        }
        .map_err(io_err(&path))?;
    }
    Ok(())
}

/// Refuses a directory holding anything but the lock file.
fn refuse_unless_empty(data_dir: &Path) -> Result<(), PitrError> {
    let occupied = fs::read_dir(data_dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|entry| entry.file_name() != std::ffi::OsStr::new(LOCK_FILE))
    });
    if data_dir.join(RESTORE_MARKER).exists() {
        return Err(PitrError::Refused(format!(
            "{} holds a restore that did not finish ({RESTORE_MARKER}): remove the directory \
             and run the restore again",
            data_dir.display()
        )));
    }
    if occupied {
        return Err(PitrError::Refused(format!(
            "{} is not empty: restore writes a new data directory; give an empty or absent one",
            data_dir.display()
        )));
    }
    Ok(())
}

fn restore_shard(
    archive: &dyn Archive,
    plan: &ShardPlan,
    (target, cap): (u64, Lsn),
    data_dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<ShardRestored, PitrError> {
    let dir = shard_dir(data_dir, plan.shard);
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let mut out = ShardRestored {
        shard: plan.shard,
        checkpoint: plan.checkpoint.as_ref().map(|c| c.lsn),
        segments: 0,
        last_lsn: Lsn(0),
        last_commit_us: 0,
        bytes: 0,
        stops_early: plan.stops_early.clone(),
        gap: plan.stops_early.is_some(),
    };
    if let Some(checkpoint) = &plan.checkpoint {
        let snapshot_key = layout::checkpoint_snapshot_key(plan.shard, checkpoint.lsn);
        let fetched = fetch(archive, &snapshot_key);
        let damaged = match &fetched {
            Ok(snapshot) => checkpoint.check_snapshot(snapshot).err().map(|problem| {
                PitrError::from(ArchiveError::Unreadable {
                    key: snapshot_key.clone(),
                    problem,
                })
            }),
            Err(PitrError::Archive(e @ ArchiveError::Corrupt { .. })) => {
                Some(PitrError::Archive(e.clone()))
            }
            // Its manifest is listed and the snapshot is not there: lost (or deleted by
            // a live writer's retention, when the older points are gone too, and the
            // fallback below finds none). Either way an older point serves, as for a
            // damaged one; a restore that gave up would fail the same way every time.
            Err(PitrError::Vanished { key }) => Some(PitrError::Refused(format!(
                "the checkpoint snapshot {key} is missing, though its manifest is listed"
            ))),
            Err(_) => None,
        };
        if let Some(damaged) = damaged {
            // Nothing of this shard is written yet: an older restore point serves, one
            // that restores as far as this one would (not one stopping at a gap).
            let usable = (plan.older.iter())
                .position(|p| p.stops_early.is_none() || plan.stops_early.is_some());
            let Some(at) = usable else {
                // A snapshot gone with nothing older may have been deleted by a live
                // writer's retention meanwhile: the caller says to run the restore again.
                return Err(match fetched {
                    Err(vanished @ PitrError::Vanished { .. }) => vanished,
                    _ => damaged,
                });
            };
            drop(fetched);
            let (older, rest) = (&plan.older[at], &plan.older[at + 1..]);
            progress(&format!(
                "WARNING: shard {}: {damaged}; restoring from {} instead",
                plan.shard,
                older
                    .checkpoint
                    .as_ref()
                    .map_or("the start of the log".to_string(), |c| {
                        format!("the older checkpoint at LSN {}", c.lsn.0)
                    })
            ));
            let older = ShardPlan {
                older: rest.to_vec(),
                ..older.clone()
            };
            return restore_shard(archive, &older, (target, cap), data_dir, progress);
        }
        let snapshot = fetched?;
        let manifest = fetch(
            archive,
            &layout::checkpoint_manifest_key(plan.shard, checkpoint.lsn),
        )?;
        write_synced(
            &dir.join(oc_engine::checkpoint::snapshot_name(checkpoint.lsn)),
            &snapshot,
        )?;
        write_synced(
            &dir.join(oc_engine::checkpoint::manifest_name(checkpoint.lsn)),
            &manifest,
        )?;
        out.last_lsn = checkpoint.lsn;
        out.bytes += (snapshot.len() + manifest.len()) as u64;
        progress(&format!(
            "shard {}: checkpoint at LSN {} ({} rows, {} bytes)",
            plan.shard,
            checkpoint.lsn.0,
            checkpoint.rows,
            snapshot.len()
        ));
    }
    let mut expected = out.last_lsn.next();
    let objects = log_objects(&plan.segments, plan.tail.as_deref());
    // The last segment written, when it is sealed and was not cut at the target.
    let mut sealed_end = None;
    for (index, (key, pieces)) in objects.iter().enumerate() {
        let image = fetch_image(archive, key, *pieces)?;
        let image_bytes = image.len() as u64;
        let rebuilt = rebuild(key, image, pieces.is_none(), expected, (target, cap))?;
        if let Some(why) = &rebuilt.short {
            out.stops_early = Some(why.clone());
        }
        if rebuilt.last.is_none() {
            // No frame of it is restored. A log needs no empty segment, and one left
            // last would be sealed empty when the restored server begins its epoch,
            // at the same first LSN as the segment it writes next.
            progress(&format!(
                "shard {}: {} holds nothing up to the target; not written",
                plan.shard, rebuilt.name
            ));
            if rebuilt.cut {
                break;
            }
            continue;
        }
        if pieces.is_some() && rebuilt.last.is_some_and(|last| last.lsn.next() < expected) {
            // The archived tail ends before the checkpoint: nothing in it is needed,
            // and a log ending below the checkpoint would not open.
            progress(&format!(
                "shard {}: the archived tail of {} ends before LSN {}; not needed",
                plan.shard,
                rebuilt.name,
                expected.0.saturating_sub(1)
            ));
            continue;
        }
        let path = dir.join(&rebuilt.name);
        write_synced(&path, &rebuilt.file)?;
        sealed_end = (pieces.is_none() && !rebuilt.cut).then(|| path.clone());
        out.segments += 1;
        out.bytes += image_bytes;
        if let Some(last) = rebuilt.last {
            if last.lsn >= expected {
                out.last_lsn = last.lsn;
                out.last_commit_us = last.commit_us;
                expected = last.lsn.next();
            }
        }
        progress(&format!(
            "shard {}: segment {} of {}: {} ({} bytes{})",
            plan.shard,
            index + 1,
            objects.len(),
            rebuilt.name,
            image_bytes,
            if rebuilt.cut {
                ", cut at the target"
            } else {
                ""
            }
        ));
        if rebuilt.cut {
            break;
        }
    }
    if let Some(path) = sealed_end {
        end_log_here(&path)?;
    }
    sync_dir(&dir)?;
    Ok(out)
}

/// Clears the successor flag of the sealed segment at `path`, the last one restored:
/// a log that ends at a segment sealed with it has lost its newest segment (FORMAT.md
/// §4), and this one ends there on purpose.
fn end_log_here(path: &Path) -> Result<(), PitrError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    let mut block = [0u8; oc_io::BLOCK_SIZE];
    let at = file
        .seek(SeekFrom::End(-(oc_io::BLOCK_SIZE as i64)))
        .and_then(|at| file.read_exact(&mut block).map(|()| at))
        .map_err(io_err(path))?;
    if let Some(cleared) = oc_io::wal::segment::footer_without_successor(&block) {
        file.seek(SeekFrom::Start(at))
            .and_then(|_| file.write_all(&cleared))
            .and_then(|()| file.sync_all())
            .map_err(io_err(path))?;
    }
    Ok(())
}

/// What `oc-pitr verify` found in one shard.
#[derive(Debug, Clone, Default)]
pub struct ShardVerified {
    pub shard: usize,
    pub objects: usize,
    pub bytes: u64,
    pub problems: Vec<String>,
    /// What is worth knowing but harms no restore: checkpoint snapshots without a
    /// manifest (an interrupted upload, which nothing reads).
    pub notes: Vec<String>,
    /// The earliest and latest instants a restore of this shard can reach.
    pub window: Option<(u64, u64)>,
    /// The window ends at a gap: the archive lists later commits no restore reaches.
    pub window_ends_at_gap: bool,
}

/// How many listings of a shard `verify` reads at most while a live writer keeps
/// deleting what it listed: its retention deletes its oldest objects, and its sealing
/// the tail pieces a sealed segment replaces.
pub const VERIFY_LISTINGS: usize = 3;

/// Reads every object of the archive: every checksum, every frame, LSN continuity from
/// each checkpoint to the newest tail.
///
/// An object listed but gone when read is a problem only if a fresh listing still
/// names it. If every such object has left the listing, a live writer deleted them,
/// and the shard is verified again from that fresh listing (at most
/// [`VERIFY_LISTINGS`] listings per shard; after the last one, what stayed is what
/// was verified).
pub fn verify(
    archive: &dyn Archive,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<ShardVerified>, PitrError> {
    let manifest = read_archive_manifest(archive)?;
    let mut shards = Vec::new();
    for shard in 0..manifest.shards {
        let mut listing = 1;
        loop {
            let (mut verified, gone) = verify_shard(archive, shard, progress)?;
            if gone.is_empty() {
                shards.push(verified);
                break;
            }
            let listed: HashSet<String> = archive
                .list(&layout::shard_prefix(shard))?
                .into_iter()
                .collect();
            let (lost, deleted): (Vec<_>, Vec<_>) = gone
                .into_iter()
                .partition(|g| listed.contains(&g.listed_as));
            if !lost.is_empty() || listing == VERIFY_LISTINGS {
                if !deleted.is_empty() {
                    progress(&format!(
                        "shard {shard}: {} object(s) left the listing while it was read (a live writer deleted them); the rest is verified",
                        deleted.len()
                    ));
                }
                verified
                    .problems
                    .extend(lost.into_iter().map(|g| g.problem));
                shards.push(verified);
                break;
            }
            listing += 1;
            progress(&format!(
                "shard {shard}: {} object(s) left the listing while it was read (a live writer deleted them); listing {listing} of at most {VERIFY_LISTINGS}",
                deleted.len()
            ));
        }
    }
    Ok(shards)
}

/// A listed object that was gone when read.
struct Gone {
    /// The key whose presence in a fresh listing makes it a problem.
    listed_as: String,
    /// The problem it is then.
    problem: String,
}

/// One shard's [`verify`] from one listing, and the listed objects gone when read.
fn verify_shard(
    archive: &dyn Archive,
    shard: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<(ShardVerified, Vec<Gone>), PitrError> {
    let catalog = ShardCatalog::load(archive, shard)?;
    let mut v = ShardVerified {
        shard,
        ..ShardVerified::default()
    };
    let gone_when_read = |key: &str| Gone {
        listed_as: key.to_string(),
        problem: format!("{key}: listed, but missing when read"),
    };
    let mut vanished: Vec<Gone> = catalog
        .unreadable_manifests
        .iter()
        .map(|key| gone_when_read(key))
        .collect();
    for key in &catalog.unknown {
        v.problems.push(format!("{key}: not an object oc writes"));
    }
    v.problems.extend(catalog.damaged_manifests.iter().cloned());
    for key in &catalog.orphan_snapshots {
        v.notes.push(format!(
            "{key}: a checkpoint snapshot without its manifest (an upload that was cut \
             short); no restore reads it"
        ));
    }
    for checkpoint in &catalog.checkpoints {
        let key = layout::checkpoint_snapshot_key(shard, checkpoint.lsn);
        match archive.get(&key) {
            Ok(Some((bytes, _))) => {
                v.objects += 2;
                v.bytes += bytes.len() as u64;
                if let Err(why) = checkpoint.check_snapshot(&bytes) {
                    v.problems.push(format!("{key}: {why}"));
                }
            }
            Ok(None) => vanished.push(Gone {
                listed_as: layout::checkpoint_manifest_key(shard, checkpoint.lsn),
                problem: format!("{key}: missing (its manifest is there)"),
            }),
            Err(e) => v.problems.push(e.to_string()),
        }
    }
    // Every segment, and the live tail, in LSN order; `runs` are gap-free stretches.
    let mut runs: Vec<(Lsn, Lsn, u64)> = Vec::new(); // first, last, last commit
    let objects = log_objects(
        &catalog.segments,
        catalog.live_tail().map(|(_, p)| p.as_slice()),
    );
    for (key, pieces) in objects {
        let sealed = pieces.is_none();
        let image = fetch_image(archive, &key, pieces);
        let checked = image.and_then(|image| {
            v.objects += 1;
            v.bytes += image.len() as u64;
            rebuild(&key, image, sealed, Lsn(u64::MAX), (LATEST, Lsn(u64::MAX)))
        });
        let rebuilt = match checked {
            Ok(r) => r,
            Err(PitrError::Vanished { key }) => {
                vanished.push(gone_when_read(&key));
                continue;
            }
            Err(e) => {
                v.problems.push(e.to_string());
                continue;
            }
        };
        let header_first = oc_io::wal::segment::parse_segment_name(&rebuilt.name)
            .map_or(Lsn(0), |(_, _, first)| first);
        if let Some(segment) = SegmentKey::parse(&key) {
            let last = rebuilt.last.map_or(Lsn(segment.first_lsn.0 - 1), |f| f.lsn);
            if last != segment.last_lsn {
                v.problems.push(format!(
                    "{key}: its frames end at LSN {}, its key says {}",
                    last.0, segment.last_lsn.0
                ));
            }
        }
        let Some(last) = rebuilt.last else { continue };
        match runs.last_mut() {
            Some(run) if header_first.0 == run.1 .0 + 1 => {
                run.1 = last.lsn;
                run.2 = last.commit_us;
            }
            Some(run) if header_first <= run.1 => {}
            Some(run) => {
                v.problems.push(format!(
                    "gap: LSNs {}..={} are missing before {key}",
                    run.1 .0 + 1,
                    header_first.0 - 1
                ));
                runs.push((header_first, last.lsn, last.commit_us));
            }
            None => runs.push((header_first, last.lsn, last.commit_us)),
        }
        progress(&format!("shard {shard}: {key} ok"));
    }
    // A restore starts at a checkpoint (or the log's first LSN) and replays up to the
    // first gap, so the window is the newest run a restore can start in.
    let start_of = |&(first, last, _): &(Lsn, Lsn, u64)| {
        let earliest = catalog
            .checkpoints
            .iter()
            .filter(|c| c.lsn.next() >= first && c.lsn <= last)
            .filter_map(|c| c.completed_us)
            .min();
        if first == Lsn(1) {
            Some(0)
        } else {
            earliest
        }
    };
    let startable = runs
        .iter()
        .enumerate()
        .rev()
        .find_map(|(i, run)| start_of(run).map(|start| (i, start, run.2)));
    if let Some((i, start, last_commit)) = startable {
        // A checkpoint that completed after the run's last commit restores as of its
        // completion: the window is that instant, never one ending before it starts.
        v.window = Some((start, last_commit.max(start)));
        v.window_ends_at_gap = i + 1 < runs.len();
    } else if runs.is_empty() {
        if let Some(c) = catalog.checkpoints.last() {
            v.window = Some((c.restorable_from_us(), c.restorable_from_us()));
        }
    }
    Ok((v, vanished))
}

#[cfg(test)]
mod tests {
    use super::*;
    use oc_io::Epoch;

    fn checkpoint(lsn: u64) -> CheckpointManifest {
        CheckpointManifest {
            completed_us: Some(10),
            crc32c: 0,
            created_us: 10,
            data_bytes: 0,
            epoch: 1,
            format_version: 1,
            lsn: Lsn(lsn),
            rows: 0,
            shard: 0,
            snapshot: oc_engine::checkpoint::snapshot_name(Lsn(lsn)),
            tenants: Vec::new(),
        }
    }

    fn tail(first: u64) -> TailPieceKey {
        TailPieceKey {
            shard: 0,
            epoch: Epoch(1),
            first_lsn: Lsn(first),
            start: 0,
            end: 8192,
        }
    }

    /// A checkpoint taken while the live segment was live: the live segment started
    /// before the checkpoint's LSN, and the frames after that LSN are only in its
    /// tail. The plan once dropped that tail and restored the checkpoint alone,
    /// losing the archived writes after it (found by `ship_restore_sim`, seed 19).
    #[test]
    fn a_checkpoint_inside_the_live_segment_keeps_its_tail() {
        let segment = SegmentKey {
            shard: 0,
            epoch: Epoch(1),
            first_lsn: Lsn(1),
            last_lsn: Lsn(104),
            last_commit_us: 5,
        };
        let mut catalog = ShardCatalog {
            shard: 0,
            checkpoints: vec![checkpoint(113)],
            segments: vec![segment],
            ..ShardCatalog::default()
        };
        catalog.tails.insert((1, Lsn(105)), vec![tail(105)]);
        let plan = plan_shard(&catalog, LATEST).expect("a plan");
        assert_eq!(plan.checkpoint.map(|c| c.lsn), Some(Lsn(113)));
        assert!(
            plan.segments.is_empty(),
            "the sealed segment is all before it"
        );
        assert_eq!(plan.tail, Some(vec![tail(105)]));
        // A tail that starts after the checkpoint's next LSN is a gap: the latest
        // point is the checkpoint alone (not the log from the start, which ends at
        // 104), and the plan says where it stops.
        catalog.tails.clear();
        catalog.tails.insert((1, Lsn(120)), vec![tail(120)]);
        let plan = plan_shard(&catalog, LATEST).expect("a plan");
        assert_eq!(plan.checkpoint.map(|c| c.lsn), Some(Lsn(113)));
        assert_eq!(plan.tail, None);
        assert!(plan
            .stops_early
            .is_some_and(|why| why.contains("114..=119")));
        // A target before the gap still needs a complete chain.
        assert!(plan_shard(&catalog, 7).is_err());
    }

    /// A target before what retention kept is told the archive's log begins later,
    /// not that LSNs are missing as from damage.
    #[test]
    fn a_target_before_what_retention_kept_names_where_the_log_begins() {
        let segment = SegmentKey {
            shard: 0,
            epoch: Epoch(1),
            first_lsn: Lsn(275),
            last_lsn: Lsn(400),
            last_commit_us: 50,
        };
        let catalog = ShardCatalog {
            shard: 0,
            checkpoints: vec![checkpoint(300)],
            segments: vec![segment],
            ..ShardCatalog::default()
        };
        let refused = plan_shard(&catalog, 5).expect_err("before the window");
        assert!(
            refused.contains("the archive's log begins at LSN 275"),
            "{refused}"
        );
        assert!(!refused.contains("LSNs 1..="), "{refused}");
    }

    /// A promotion that recorded its branch point but shipped nothing yet (or stopped
    /// first): a restore to after it is refused, not answered from the old history
    /// (whose tail past the branch point is a dead branch); one to before it falls
    /// back to the old history, capped at the branch point.
    #[test]
    fn a_promoted_history_that_shipped_nothing_is_never_bypassed() {
        use crate::catalog::ArchiveManifest;
        use crate::lease::{Holder, Lease};
        use crate::timeline::{self, TimelineRecord};
        let dir = tempfile::tempdir().expect("tempdir");
        let root = crate::archive::open_archive(&format!("file://{}", dir.path().display()))
            .expect("archive");
        let put = |key: &str, bytes: Vec<u8>| {
            root.put(key, &bytes, &crate::archive::Condition::Always)
                .expect("put");
        };
        put(
            crate::layout::MANIFEST_KEY,
            oc_engine::json_file::JsonFile::encode(&ArchiveManifest::new(2, 1)),
        );
        let lease = Lease {
            format_version: crate::lease::LEASE_FORMAT_VERSION,
            owner_id: "follower".into(),
            epoch: 3,
            holder: Holder {
                host: "h".into(),
                pid: 1,
                program: "oc-server".into(),
                data_dir: "/d".into(),
            },
            claimed_at_us: 1_000,
            renewed_at_us: 1_000,
            lease_ttl_ms: Some(1500),
        };
        put(crate::lease::LEASE_KEY, lease.encode());
        // Epoch 2 took the lease and failed before writing anything; epoch 3 recorded
        // its branch point and shipped nothing.
        let record = TimelineRecord {
            first_lsn: vec![5, 1],
            format_version: timeline::TIMELINE_FORMAT_VERSION,
            frame_epoch: 9,
            lease_epoch: 3,
            parent_lease_epoch: 2,
            promoted_at_us: 1_000,
        };
        let ns = timeline::namespaced(&root, 3).expect("namespace");
        timeline::record(ns.as_ref(), &record).expect("record");
        timeline::record(ns.as_ref(), &record).expect("the same record again");
        let chain = timeline::chain(&root).expect("chain");
        let epochs: Vec<u64> = chain.iter().map(|t| t.lease_epoch).collect();
        assert_eq!(
            epochs,
            vec![3, 1],
            "epoch 2 left nothing: epoch 3 continues the root"
        );

        let refused = plan_timeline(&root, LATEST).err().expect("refused");
        let why = refused.to_string();
        assert!(why.contains("epoch-3/ does not yet hold"), "{why}");
        assert!(why.contains("holds nothing of the target's"), "{why}");

        let plan = plan_timeline(&root, 999).expect("a plan before the promotion");
        assert_eq!(plan.timeline.lease_epoch, 1);
        assert_eq!(plan.caps, vec![Lsn(4), Lsn(0)]);
        assert!(
            plan.plans[0]
                .stops_early
                .as_deref()
                .is_some_and(|w| w.contains("below the branch point 4")),
            "{:?}",
            plan.plans[0]
        );
        assert_eq!(
            plan.newest_epoch, 9,
            "the new epoch counts though nothing shipped"
        );
    }
}
