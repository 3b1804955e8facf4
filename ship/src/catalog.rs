//! What an archive holds, read from its listing (plus the small checkpoint manifests):
//! enough to plan a restore or check continuity without downloading segments.

use std::collections::BTreeMap;

use oc_io::Lsn;

use crate::archive::{Archive, ArchiveError};
use crate::layout::{self, SegmentKey, TailPieceKey};

/// The archive's `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveManifest {
    pub shards: usize,
    pub created_us: u64,
}

pub fn read_archive_manifest(archive: &dyn Archive) -> Result<ArchiveManifest, ArchiveError> {
    let corrupt = |why: String| ArchiveError::Corrupt {
        key: layout::MANIFEST_KEY.into(),
        why,
    };
    let Some((bytes, _)) = archive.get(layout::MANIFEST_KEY)? else {
        return Err(ArchiveError::Uri {
            uri: layout::MANIFEST_KEY.into(),
            why: "this archive has no manifest.json: nothing was ever shipped to it".into(),
        });
    };
    let json: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| corrupt(format!("not JSON: {e}")))?;
    let field = |name: &str| {
        json.get(name)
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| corrupt(format!("lacks {name}")))
    };
    let version = field("format_version")?;
    if version != layout::ARCHIVE_FORMAT_VERSION {
        return Err(corrupt(format!(
            "unsupported archive format version {version}"
        )));
    }
    if json.get("placement").and_then(|p| p.as_str()) != Some("fnv1a64-mod") {
        return Err(corrupt("unknown placement rule".into()));
    }
    let shards = field("shards")? as usize;
    if !(1..=256).contains(&shards) {
        return Err(corrupt(format!("{shards} shards is out of range")));
    }
    Ok(ArchiveManifest {
        shards,
        created_us: field("created_us")?,
    })
}

/// A checkpoint manifest (FORMAT.md §6), the fields restore needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointManifest {
    pub lsn: Lsn,
    pub created_us: u64,
    /// When the copy finished; `u64::MAX` for manifests written before the field
    /// existed (usable only to restore the latest state).
    pub completed_us: u64,
    pub data_bytes: u64,
    pub crc32c: u32,
    pub rows: u64,
}

impl CheckpointManifest {
    pub fn parse(bytes: &[u8]) -> Result<CheckpointManifest, String> {
        let json: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| format!("manifest is not JSON: {e}"))?;
        let field = |name: &str| {
            json.get(name)
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| format!("manifest lacks {name}"))
        };
        if field("format_version")? != u64::from(oc_engine::checkpoint::CHECKPOINT_FORMAT_VERSION) {
            return Err("unsupported checkpoint manifest version".into());
        }
        Ok(CheckpointManifest {
            lsn: Lsn(field("lsn")?),
            created_us: field("created_us")?,
            completed_us: field("completed_us").unwrap_or(u64::MAX),
            data_bytes: field("data_bytes")?,
            crc32c: u32::try_from(field("crc32c")?).map_err(|_| "crc32c out of range")?,
            rows: field("rows")?,
        })
    }

    /// Checks a snapshot's size and checksum against this manifest.
    pub fn check_snapshot(&self, snapshot: &[u8]) -> Result<(), String> {
        let data = snapshot.get(..self.data_bytes as usize).ok_or_else(|| {
            format!(
                "snapshot has {} bytes, manifest says {}",
                snapshot.len(),
                self.data_bytes
            )
        })?;
        if crc32c::crc32c(data) != self.crc32c {
            return Err("snapshot checksum does not match its manifest".into());
        }
        Ok(())
    }
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
                let Some((bytes, _)) = archive.get(&key)? else {
                    continue; // deleted by retention meanwhile
                };
                let manifest =
                    CheckpointManifest::parse(&bytes).map_err(|why| ArchiveError::Corrupt {
                        key: key.clone(),
                        why,
                    })?;
                if manifest.lsn != lsn {
                    return Err(ArchiveError::Corrupt {
                        key,
                        why: format!("manifest names LSN {}", manifest.lsn.0),
                    });
                }
                catalog.checkpoints.push(manifest);
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
        catalog.orphan_snapshots = snapshots
            .into_iter()
            .filter(|k| {
                !catalog
                    .checkpoints
                    .iter()
                    .any(|c| layout::checkpoint_snapshot_key(shard, c.lsn) == *k)
            })
            .collect();
        Ok(catalog)
    }

    /// The newest active-segment folder that was not archived sealed since.
    pub fn live_tail(&self) -> Option<(&(u64, Lsn), &Vec<TailPieceKey>)> {
        self.tails
            .iter()
            .rev()
            .find(|((_, first), _)| !self.segments.iter().any(|s| s.first_lsn == *first))
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
