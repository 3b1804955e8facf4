//! Timelines: the archive's histories across promotions (FORMAT.md §9.4).
//!
//! The first writer ships to the archive's root; a follower promoted to lease epoch n
//! ships under `epoch-<n>/` (§9.3). Its history continues its parent's up to the LSN
//! before the one where its own epoch began, shard by shard; the parent's objects past
//! that point (frames the old writer logged after the follower's last one) are a dead
//! branch. At its promotion the new writer records that branch point in
//! `epoch-<n>/timeline.json`, before it ships anything there.
//!
//! A restore of the archive follows the current timeline, the one of the lease's epoch:
//! from it when it reaches back to the target, else from its parent capped at the
//! branch point, and so on up the chain. A target after the promotion that the current
//! timeline cannot reach is refused: its parent lacks what the new writer wrote.

use std::sync::Arc;

use oc_engine::json_file::JsonFile;
use oc_engine::FileProblem;
use oc_io::Lsn;
use serde::{Deserialize, Serialize};

use crate::archive::{Archive, ArchiveError, Condition, Prefixed};
use crate::catalog::read_archive_manifest;
use crate::layout::MANIFEST_KEY;
use crate::lease;

/// The record's key inside a timeline's prefix.
pub const TIMELINE_KEY: &str = "timeline.json";
/// The record's format version.
pub const TIMELINE_FORMAT_VERSION: u64 = 1;
/// Lease epochs that left nothing (failed promotions) a chain steps over before it
/// calls the lease record wrong: each costs two reads.
const MAX_EMPTY_EPOCHS: u64 = 100;

/// `epoch-<n>/timeline.json`: where a promoted writer's history leaves its parent's.
/// Fields in alphabetical order (the order of the bytes written); do not reorder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimelineRecord {
    /// Per shard, the first LSN written in the new epoch: LSNs below it are the
    /// parent's history, shared; the parent's frames from it on are a dead branch.
    pub first_lsn: Vec<u64>,
    pub format_version: u64,
    /// The frame epoch (FORMAT.md §2) the new writer's frames carry.
    pub frame_epoch: u64,
    /// The lease epoch of this timeline (its prefix is `epoch-<n>/`).
    pub lease_epoch: u64,
    /// The lease epoch of the history it continues (1: the archive's root).
    pub parent_lease_epoch: u64,
    /// When the promotion took the lease (µs since the Unix epoch). Nothing of this
    /// timeline's own was committed before it.
    pub promoted_at_us: u64,
}

impl JsonFile for TimelineRecord {
    const VERSIONS: &'static [u64] = &[TIMELINE_FORMAT_VERSION];
    const REQUIRED_FIELDS: &'static [&'static str] = &[
        "first_lsn",
        "format_version",
        "frame_epoch",
        "lease_epoch",
        "parent_lease_epoch",
        "promoted_at_us",
    ];
}

impl TimelineRecord {
    fn decode_checked(bytes: &[u8]) -> Result<TimelineRecord, FileProblem> {
        let record = <TimelineRecord as JsonFile>::decode(bytes)?;
        if record.parent_lease_epoch == 0 || record.parent_lease_epoch >= record.lease_epoch {
            return Err(FileProblem::BadField {
                field: "parent_lease_epoch",
                why: format!(
                    "{} is not between 1 and the lease epoch {}",
                    record.parent_lease_epoch, record.lease_epoch
                ),
            });
        }
        if record.first_lsn.contains(&0) {
            return Err(FileProblem::BadField {
                field: "first_lsn",
                why: "an LSN is 0 (LSNs start at 1)".into(),
            });
        }
        Ok(record)
    }
}

/// The archive as lease epoch `epoch`'s writer ships to it: the root for epoch 1,
/// `epoch-<n>/` after.
pub fn namespaced(root: &Arc<dyn Archive>, epoch: u64) -> Result<Arc<dyn Archive>, ArchiveError> {
    Ok(match lease::namespace(epoch) {
        Some(prefix) => Arc::new(Prefixed::new(root.clone(), prefix)?),
        None => root.clone(),
    })
}

/// Writes a promoted writer's record into its namespace (`archive` is already
/// prefixed). A record already there is kept if it is the same (a promotion retried);
/// another one is an error: one namespace, one branch point.
pub fn record(archive: &dyn Archive, record: &TimelineRecord) -> Result<(), ArchiveError> {
    let bytes = JsonFile::encode(record);
    match archive.put(TIMELINE_KEY, &bytes, &Condition::IfAbsent) {
        Ok(_) => Ok(()),
        Err(ArchiveError::PreconditionFailed { .. }) => match read(archive)? {
            Some(found) if found == *record => Ok(()),
            found => Err(ArchiveError::PreconditionFailed {
                key: TIMELINE_KEY.into(),
                why: format!("the namespace already records another branch point: {found:?}"),
            }),
        },
        Err(e) => Err(e),
    }
}

/// [`record`] into the namespace of `branch`'s lease epoch in `root`, tried again a
/// few times after an archive error (not after a lock that stayed held: each attempt
/// waited 10 s for it). Blocks.
pub fn record_branch_point(
    root: &Arc<dyn Archive>,
    branch: &TimelineRecord,
) -> Result<(), ArchiveError> {
    let mut attempt = 0;
    loop {
        let done = namespaced(root, branch.lease_epoch).and_then(|ns| record(ns.as_ref(), branch));
        attempt += 1;
        match done {
            Err(ArchiveError::Io { source, .. })
                if attempt < 5 && source.kind() != std::io::ErrorKind::TimedOut =>
            {
                std::thread::sleep(std::time::Duration::from_millis(100 << attempt));
            }
            done => return done,
        }
    }
}

/// A namespace's record, if it has one.
pub fn read(archive: &dyn Archive) -> Result<Option<TimelineRecord>, ArchiveError> {
    let Some((bytes, _)) = archive.get(TIMELINE_KEY)? else {
        return Ok(None);
    };
    TimelineRecord::decode_checked(&bytes)
        .map(Some)
        .map_err(|problem| ArchiveError::Unreadable {
            key: TIMELINE_KEY.into(),
            problem,
        })
}

/// How far the promotion that gave a data directory its archive lease got, as its
/// start as a writer finds it. A promotion takes the lease, starts its epoch (the
/// layout file), then records its branch point (the namespace's record); one killed
/// or failing in between leaves a writer whose log would continue the old writer's
/// epoch, so that an old writer rejoining as its follower keeps frames this one wrote
/// other writes under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromotionEnd {
    /// The archive's root history (lease epoch 1), or a promotion that got to its end.
    Finished,
    /// The epoch was started here, and its branch point is not in the archive: this
    /// record is it.
    BranchPointMissing(TimelineRecord),
    /// The lease was taken, and no epoch was started here: the start must start one
    /// where each shard's log ends, then record the branch point.
    EpochMissing {
        lease_epoch: u64,
        promoted_at_us: u64,
    },
}

/// Where the promotion behind `lease` (this data directory's, per `layout`) ended.
pub fn promotion_end(
    root: &Arc<dyn Archive>,
    layout: &oc_engine::placement::Layout,
    lease: &lease::Lease,
) -> Result<PromotionEnd, ArchiveError> {
    let lease_epoch = lease.epoch;
    if lease_epoch < 2 || read(namespaced(root, lease_epoch)?.as_ref())?.is_some() {
        return Ok(PromotionEnd::Finished);
    }
    // The epoch this promotion started, recorded with its lease epoch. An epoch without
    // one is not taken for it, whatever its time: a follower's layout holds its
    // writer's epochs untagged, and mistaking one for this promotion's would leave the
    // writer writing under another's epoch. (A promotion by a build that did not tag
    // its epoch, whose branch point is missing too, gets a second epoch here: its
    // branch point is then recorded where that one starts.)
    let started = layout
        .epochs
        .iter()
        .rev()
        .find(|e| e.lease_epoch == Some(lease_epoch));
    Ok(match started {
        Some(e) => PromotionEnd::BranchPointMissing(TimelineRecord {
            first_lsn: e.first_lsn.clone(),
            format_version: TIMELINE_FORMAT_VERSION,
            frame_epoch: e.epoch,
            lease_epoch,
            parent_lease_epoch: lease_epoch - 1,
            promoted_at_us: lease.claimed_at_us,
        }),
        None => PromotionEnd::EpochMissing {
            lease_epoch,
            promoted_at_us: lease.claimed_at_us,
        },
    })
}

/// One history in an archive.
pub struct Timeline {
    /// Its lease epoch (1: the root).
    pub lease_epoch: u64,
    /// The archive seen from its prefix.
    pub archive: Arc<dyn Archive>,
    /// Where it leaves its parent (none for the root, or a namespace whose promotion
    /// did not get to write it: then nothing before it can be restored through it).
    pub record: Option<TimelineRecord>,
    /// Whether anything was shipped to it (its `manifest.json`).
    pub shipped: bool,
}

impl Timeline {
    /// `epoch-<n>/`, or the root.
    pub fn name(&self) -> String {
        lease::namespace(self.lease_epoch).unwrap_or_else(|| "the archive's root".into())
    }

    /// Its shard count: the manifest's, or the record's when nothing was shipped yet.
    pub fn shards(&self) -> Result<usize, ArchiveError> {
        match (&self.record, self.shipped) {
            (Some(record), false) => Ok(record.first_lsn.len()),
            _ => Ok(read_archive_manifest(self.archive.as_ref())?.shards),
        }
    }
}

/// The namespace of lease epoch `epoch`, if a writer of that epoch left anything there
/// (a manifest or a branch record): a promotion that took the lease and failed before
/// both leaves nothing, and the history it would have started does not exist.
fn timeline_at(root: &Arc<dyn Archive>, epoch: u64) -> Result<Option<Timeline>, ArchiveError> {
    let archive = namespaced(root, epoch)?;
    let shipped = archive.get(MANIFEST_KEY)?.is_some();
    let record = if epoch > 1 {
        read(archive.as_ref()).map_err(|e| match e {
            ArchiveError::Unreadable { problem, .. } => ArchiveError::Unreadable {
                key: format!(
                    "{}{TIMELINE_KEY}",
                    lease::namespace(epoch).unwrap_or_default()
                ),
                problem,
            },
            e => e,
        })?
    } else {
        None
    };
    if let Some(r) = &record {
        if r.lease_epoch != epoch {
            return Err(ArchiveError::Unreadable {
                key: format!(
                    "{}{TIMELINE_KEY}",
                    lease::namespace(epoch).unwrap_or_default()
                ),
                problem: FileProblem::BadField {
                    field: "lease_epoch",
                    why: format!("{} where its prefix says {epoch}", r.lease_epoch),
                },
            });
        }
    }
    Ok(
        (epoch == 1 || shipped || record.is_some()).then_some(Timeline {
            lease_epoch: epoch,
            archive,
            record,
            shipped,
        }),
    )
}

/// The chain of histories a restore of `root` follows, current first: the newest lease
/// epoch's namespace with anything in it, then its parent, and so on to the root.
/// An archive without a lease record, or whose lease is at epoch 1, is one timeline:
/// the root. So is an archive named by its namespace (`…/epoch-2`), which has no lease
/// record of its own. Only small records are read here; catalogs are listed when a
/// restore needs that history.
pub fn chain(root: &Arc<dyn Archive>) -> Result<Vec<Timeline>, ArchiveError> {
    let newest = match lease::read(root.as_ref()) {
        Ok(Some((lease, _))) => lease.epoch,
        Ok(None) => 1,
        Err(lease::LeaseError::Archive(e)) => return Err(e),
        Err(lease::LeaseError::Unreadable { problem }) => {
            return Err(ArchiveError::Unreadable {
                key: lease::LEASE_KEY.into(),
                problem,
            })
        }
        Err(e) => {
            return Err(ArchiveError::Unusable {
                key: lease::LEASE_KEY.into(),
                why: e.to_string(),
            })
        }
    };
    let mut chain = Vec::new();
    let mut epoch = newest;
    let mut skipped = 0;
    loop {
        // Epochs strictly decrease (a record's parent is below its epoch): this ends.
        let Some(timeline) = timeline_at(root, epoch)? else {
            skipped += 1;
            if skipped > MAX_EMPTY_EPOCHS {
                return Err(ArchiveError::Unusable {
                    key: lease::LEASE_KEY.into(),
                    why: format!(
                        "names lease epoch {newest}, but more than {MAX_EMPTY_EPOCHS} epochs \
                         up to it hold nothing: a failed promotion leaves one such epoch, \
                         not this many; check the record"
                    ),
                });
            }
            epoch -= 1; // never 0: epoch 1 (the root) is always a timeline
            continue;
        };
        let parent = timeline.record.as_ref().map(|r| r.parent_lease_epoch);
        chain.push(timeline);
        match parent {
            Some(p) => epoch = p,
            None => break,
        }
    }
    Ok(chain)
}

/// The highest LSN of each shard that timeline `i` of `chain` shares with the current
/// one (`u64::MAX` for the current one): below every branch point between them.
pub fn caps(chain: &[Timeline], i: usize, shards: usize) -> Result<Vec<Lsn>, String> {
    let mut caps = vec![Lsn(u64::MAX); shards];
    for newer in &chain[..i] {
        let Some(record) = &newer.record else {
            return Err(format!(
                "{} records no branch point (timeline.json), so what it shares with its \
                 parent is unknown",
                newer.name()
            ));
        };
        if record.first_lsn.len() != shards {
            return Err(format!(
                "{}'s timeline.json names {} shard(s), the archive has {shards}",
                newer.name(),
                record.first_lsn.len()
            ));
        }
        for (cap, first) in caps.iter_mut().zip(&record.first_lsn) {
            *cap = (*cap).min(Lsn(first - 1));
        }
    }
    Ok(caps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TimelineRecord {
        TimelineRecord {
            first_lsn: vec![120, 7],
            format_version: TIMELINE_FORMAT_VERSION,
            frame_epoch: 1_764_000_000,
            lease_epoch: 2,
            parent_lease_epoch: 1,
            promoted_at_us: 1_764_000_000_123_456,
        }
    }

    #[test]
    fn the_record_encodes_as_documented() {
        assert_eq!(
            String::from_utf8(JsonFile::encode(&sample())).expect("utf-8"),
            r#"{"first_lsn":[120,7],"format_version":1,"frame_epoch":1764000000,"lease_epoch":2,"parent_lease_epoch":1,"promoted_at_us":1764000000123456}"#
        );
    }

    #[test]
    fn a_record_that_cannot_be_a_branch_point_is_refused() {
        let bad = |edit: fn(&mut TimelineRecord)| {
            let mut r = sample();
            edit(&mut r);
            TimelineRecord::decode_checked(&JsonFile::encode(&r)).is_err()
        };
        assert!(!bad(|_| {}));
        assert!(bad(|r| r.parent_lease_epoch = 2));
        assert!(bad(|r| r.parent_lease_epoch = 0));
        assert!(bad(|r| r.first_lsn[1] = 0));
        assert!(TimelineRecord::decode_checked(b"{\"format_version\":1}").is_err());
        assert!(TimelineRecord::decode_checked(b"{\"format_version\":9}").is_err());
    }
}
