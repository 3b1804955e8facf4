//! What an archive holds, read from its listing (plus the small checkpoint manifests):
//! enough to plan a restore or check continuity without downloading segments.

use std::collections::BTreeMap;

use oc_engine::json_file::JsonFile;
use oc_engine::placement::{MAX_SHARDS, PLACEMENT_RULE};
use oc_engine::FileProblem;
use oc_io::Lsn;
use serde::{Deserialize, Serialize};

use crate::archive::{Archive, ArchiveError, Version};
use crate::layout::{self, SegmentKey, TailPieceKey};

/// A checkpoint's manifest (FORMAT.md §6): the archive stores the server's byte for byte.
pub use oc_engine::checkpoint::CheckpointManifest;

/// The archive's `manifest.json` (FORMAT.md §9), field for field. Fields are in the
/// order the file has always had them (alphabetical); do not reorder. Unknown fields
/// are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveManifest {
    /// When the first server shipped to the archive (µs since the Unix epoch).
    pub created_us: u64,
    pub format_version: u64,
    /// The data directory whose first start began the history shipped here (its
    /// `data_dir_id`), when its writer knew it: restores carry it on, and a follower
    /// restored from here refuses a writer of another history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<String>,
    /// The tenant placement rule, [`PLACEMENT_RULE`].
    pub placement: String,
    pub shards: usize,
}

impl JsonFile for ArchiveManifest {
    /// 1: every object stored as is; 2: objects may be LZ4-encoded (FORMAT.md §8).
    const VERSIONS: &'static [u64] = &[1, layout::ARCHIVE_FORMAT_VERSION];
    const REQUIRED_FIELDS: &'static [&'static str] =
        &["created_us", "format_version", "placement", "shards"];
}

impl ArchiveManifest {
    /// The manifest of a new archive of `shards` shards.
    pub fn new(shards: usize, created_us: u64) -> ArchiveManifest {
        ArchiveManifest {
            created_us,
            format_version: layout::ARCHIVE_FORMAT_VERSION,
            lineage: None,
            placement: PLACEMENT_RULE.to_string(),
            shards,
        }
    }

    /// Decodes a stored manifest, refusing another placement rule or shard count.
    pub fn decode_checked(bytes: &[u8]) -> Result<ArchiveManifest, FileProblem> {
        let manifest = ArchiveManifest::decode(bytes)?;
        if manifest.placement != PLACEMENT_RULE {
            return Err(FileProblem::BadField {
                field: "placement",
                why: format!("{:?} is not a placement rule oc knows", manifest.placement),
            });
        }
        if !(1..=MAX_SHARDS).contains(&manifest.shards) {
            return Err(FileProblem::BadField {
                field: "shards",
                why: format!("{} is out of range", manifest.shards),
            });
        }
        Ok(manifest)
    }
}

pub fn read_archive_manifest(archive: &dyn Archive) -> Result<ArchiveManifest, ArchiveError> {
    read_archive_manifest_versioned(archive).map(|(manifest, _)| manifest)
}

/// The archive's manifest and the version of the object holding it.
pub fn read_archive_manifest_versioned(
    archive: &dyn Archive,
) -> Result<(ArchiveManifest, Version), ArchiveError> {
    let Some((bytes, version)) = archive.get(layout::MANIFEST_KEY)? else {
        return Err(ArchiveError::NotAnArchive);
    };
    let manifest =
        ArchiveManifest::decode_checked(&bytes).map_err(|problem| ArchiveError::Unreadable {
            key: layout::MANIFEST_KEY.into(),
            problem,
        })?;
    Ok((manifest, version))
}

/// One shard's part of the archive.
#[derive(Debug, Clone, Default)]
pub struct ShardCatalog {
    pub shard: usize,
    /// Oldest first.
    pub checkpoints: Vec<CheckpointManifest>,
    /// Sealed segments, in LSN order.
    pub segments: Vec<SegmentKey>,
    /// Active-segment folders (epoch, first LSN) → their pieces, in offset order.
    pub tails: BTreeMap<(u64, Lsn), Vec<TailPieceKey>>,
    /// Keys under the shard's prefix that fit no pattern (reported by verify).
    pub unknown: Vec<String>,
    /// Checkpoint snapshots without a manifest (an interrupted upload).
    pub orphan_snapshots: Vec<String>,
    /// Checkpoint manifests listed but gone when read: deleted by retention meanwhile,
    /// or lost (verify tells the two apart by listing again).
    pub unreadable_manifests: Vec<String>,
    /// Checkpoint manifests that do not decode, with why: left out (a restore uses the
    /// other checkpoints and the log; verify reports them), so that one damaged object
    /// does not refuse every restore. A server refuses to ship to such an archive
    /// (`Shipper::open`): it could not archive that checkpoint again over it.
    pub damaged_manifests: Vec<String>,
    /// Their keys, whose snapshots are not orphans.
    pub(crate) damaged_manifest_keys: Vec<String>,
}

impl ShardCatalog {
    pub fn load(archive: &dyn Archive, shard: usize) -> Result<ShardCatalog, ArchiveError> {
        let mut catalog = ShardCatalog {
            shard,
            ..ShardCatalog::default()
        };
        let mut snapshots = Vec::new();
        for key in archive.list(&layout::shard_prefix(shard))? {
            if let Some(segment) = SegmentKey::parse(&key) {
                catalog.segments.push(segment);
            } else if let Some(piece) = TailPieceKey::parse(&key) {
                catalog
                    .tails
                    .entry((piece.epoch.0, piece.first_lsn))
                    .or_default()
                    .push(piece);
            } else if let Some((_, lsn)) = layout::parse_checkpoint_manifest_key(&key) {
                let bytes = match archive.get(&key) {
                    Ok(Some((bytes, _))) => bytes,
                    Ok(None) => {
                        catalog.unreadable_manifests.push(key);
                        continue;
                    }
                    // Its envelope fails its checksum: as damaged as a bad field.
                    Err(damaged @ ArchiveError::Corrupt { .. }) => {
                        catalog.damaged_manifests.push(damaged.to_string());
                        catalog.damaged_manifest_keys.push(key);
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                match CheckpointManifest::decode_for(&bytes, lsn) {
                    Ok(manifest) => catalog.checkpoints.push(manifest),
                    Err(problem) => {
                        catalog.damaged_manifests.push(
                            ArchiveError::Unreadable {
                                key: key.clone(),
                                problem,
                            }
                            .to_string(),
                        );
                        catalog.damaged_manifest_keys.push(key);
                    }
                }
            } else if key.ends_with(".snap") && key.starts_with(&layout::checkpoint_prefix(shard)) {
                snapshots.push(key);
            } else {
                catalog.unknown.push(key);
            }
        }
        catalog.segments.sort();
        catalog.checkpoints.sort_by_key(|c| c.lsn);
        for pieces in catalog.tails.values_mut() {
            pieces.sort();
        }
        let manifest_of = |snapshot: &str| snapshot.replace(".snap", ".json");
        catalog.orphan_snapshots = snapshots
            .into_iter()
            .filter(|k| {
                !catalog
                    .checkpoints
                    .iter()
                    .any(|c| layout::checkpoint_snapshot_key(shard, c.lsn) == *k)
                    && !catalog.damaged_manifest_keys.contains(&manifest_of(k))
            })
            .collect();
        Ok(catalog)
    }

    /// The newest epoch any of the shard's log objects was written in.
    pub fn newest_epoch(&self) -> u64 {
        let segments = self.segments.iter().map(|s| s.epoch.0);
        let tails = self.tails.keys().map(|(epoch, _)| *epoch);
        segments.chain(tails).max().unwrap_or(1)
    }

    /// The newest active-segment folder that was not archived sealed since.
    pub fn live_tail(&self) -> Option<(&(u64, Lsn), &Vec<TailPieceKey>)> {
        self.tail_from_at_most(Lsn(u64::MAX))
    }

    /// The newest active-segment folder not archived sealed since that starts at or
    /// below `cap` (a capped restore needs the one holding the cap).
    pub fn tail_from_at_most(&self, cap: Lsn) -> Option<(&(u64, Lsn), &Vec<TailPieceKey>)> {
        // By epoch and LSN: an empty segment sealed when a new epoch began starts at
        // the LSN the new epoch's first segment starts at.
        self.tails.iter().rev().find(|((epoch, first), _)| {
            *first <= cap
                && !self
                    .segments
                    .iter()
                    .any(|s| s.epoch.0 == *epoch && s.first_lsn == *first)
        })
    }
}

/// End of the pieces that join up from offset 0 (0 if there is no piece at 0).
pub fn contiguous_end(pieces: &[TailPieceKey]) -> u64 {
    let mut end = 0;
    for piece in pieces {
        if piece.start != end {
            break;
        }
        end = piece.end;
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::{Condition, LocalDirArchive};

    const GOLDEN: &str = r#"{"created_us":1764000000000000,"format_version":2,"placement":"fnv1a64-mod","shards":4}"#;

    /// The bytes are those of the writer before the struct: a `serde_json::json!` map.
    #[test]
    fn the_archive_manifest_writes_the_bytes_it_always_did() {
        let manifest = ArchiveManifest::new(4, 1_764_000_000_000_000);
        let legacy = serde_json::json!({
            "format_version": layout::ARCHIVE_FORMAT_VERSION,
            "shards": 4,
            "placement": "fnv1a64-mod",
            "created_us": 1_764_000_000_000_000u64,
        });
        let bytes = String::from_utf8(manifest.encode()).expect("utf-8");
        assert_eq!(bytes, GOLDEN);
        assert_eq!(bytes, legacy.to_string());
        assert_eq!(
            ArchiveManifest::decode_checked(GOLDEN.as_bytes()).expect("round trip"),
            manifest
        );
        // With its writer's lineage, the key in its alphabetical place.
        let with_lineage = ArchiveManifest {
            lineage: Some("5f0c9d7e2b8a41c6a3e1f0d2c4b6a8e0".into()),
            ..manifest
        };
        let bytes = String::from_utf8(with_lineage.encode()).expect("utf-8");
        assert_eq!(
            bytes,
            r#"{"created_us":1764000000000000,"format_version":2,"lineage":"5f0c9d7e2b8a41c6a3e1f0d2c4b6a8e0","placement":"fnv1a64-mod","shards":4}"#
        );
        assert_eq!(
            ArchiveManifest::decode_checked(bytes.as_bytes()).expect("round trip"),
            with_lineage
        );
    }

    #[test]
    fn every_archive_manifest_field_is_required_and_named_when_missing() {
        let serde_json::Value::Object(fields) =
            serde_json::from_str::<serde_json::Value>(GOLDEN).expect("json")
        else {
            panic!("an object");
        };
        assert_eq!(
            fields.keys().map(String::as_str).collect::<Vec<_>>(),
            ArchiveManifest::REQUIRED_FIELDS
        );
        for field in fields.keys() {
            let mut without = fields.clone();
            without.remove(field);
            let bytes = serde_json::to_vec(&without).expect("json");
            let err = ArchiveManifest::decode_checked(&bytes).expect_err(field);
            assert!(
                matches!(&err, FileProblem::MissingField(f) if f == field),
                "{field}: {err:?}"
            );
        }
    }

    #[test]
    fn an_unknown_version_or_a_missing_field_is_refused_naming_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let archive = LocalDirArchive::open(dir.path().join("a")).expect("archive");
        for (text, wanted) in [
            (
                GOLDEN.replace("\"format_version\":2", "\"format_version\":3"),
                "version",
            ),
            (GOLDEN.replace(",\"shards\":4", ""), "shards"),
            (GOLDEN.replace("fnv1a64-mod", "round-robin"), "placement"),
        ] {
            archive
                .put(layout::MANIFEST_KEY, text.as_bytes(), &Condition::Always)
                .expect("put");
            let err = read_archive_manifest(&archive).expect_err(&text);
            let ArchiveError::Unreadable { key, problem } = &err else {
                panic!("{text}: {err:?}");
            };
            assert_eq!(key, layout::MANIFEST_KEY);
            match (wanted, problem) {
                ("version", FileProblem::UnsupportedVersion { found: 3, .. }) => {}
                ("shards", FileProblem::MissingField("shards")) => {}
                (
                    "placement",
                    FileProblem::BadField {
                        field: "placement", ..
                    },
                ) => {}
                _ => panic!("{text}: {problem:?}"),
            }
            assert!(err.to_string().contains("manifest.json"), "{err}");
        }
    }

    #[test]
    fn a_checkpoint_manifest_naming_another_lsn_is_left_out_and_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let archive = LocalDirArchive::open(dir.path().join("a")).expect("archive");
        let manifest = CheckpointManifest {
            completed_us: Some(2),
            crc32c: 0,
            created_us: 1,
            data_bytes: 0,
            epoch: 1,
            format_version: 1,
            lsn: Lsn(5),
            rows: 0,
            shard: 0,
            snapshot: "x".into(),
            tenants: Vec::new(),
        };
        let key = layout::checkpoint_manifest_key(0, Lsn(6));
        archive
            .put(&key, &manifest.encode(), &Condition::Always)
            .expect("put");
        let catalog = ShardCatalog::load(&archive, 0).expect("listed");
        assert!(catalog.checkpoints.is_empty(), "{:?}", catalog.checkpoints);
        let [damaged] = catalog.damaged_manifests.as_slice() else {
            panic!("{:?}", catalog.damaged_manifests);
        };
        assert!(
            damaged.contains(&key) && damaged.contains("lsn"),
            "{damaged}"
        );
    }
}
