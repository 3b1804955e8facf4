//! Which shard owns a tenant, and the data directory's record of the shard count.
//!
//! Placement is a contract with the data on disk: a tenant's rows live in its owner's
//! log and checkpoints, so the hash and its seed never change (FORMAT.md §7). The
//! count is recorded in `oc-layout.json` when the directory is first used; starting
//! with another count is refused, since every tenant would look for its data on the
//! wrong shard. Re-sharding goes through a checkpoint and a restore.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::error::EngineError;
use crate::tenant_id::TenantId;

/// FNV-1a 64-bit offset basis and prime: the fixed seed of tenant placement.
const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The layout file's name in the data directory.
pub const LAYOUT_FILE: &str = "oc-layout.json";
/// The version of the layout file and of the placement rule.
pub const LAYOUT_FORMAT_VERSION: u64 = 1;
/// Most shards a data directory can have.
pub const MAX_SHARDS: usize = 256;

/// The shard that owns `tenant` among `shards`: FNV-1a 64 of the id's bytes, mod count.
pub fn owner_shard(tenant: &TenantId, shards: usize) -> usize {
    assert!(shards > 0, "a pool has at least one shard");
    let hash = tenant.as_str().bytes().fold(FNV_OFFSET_BASIS, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    });
    (hash % shards as u64) as usize
}

/// The directory of shard `shard` under `data_dir`.
pub fn shard_dir(data_dir: &Path, shard: usize) -> PathBuf {
    data_dir.join(format!("shard-{shard}"))
}

/// Checks that `data_dir` was laid out for `shards` shards, or records that it is when
/// the directory is new. Called once at start, before any shard opens.
pub fn ensure_layout(data_dir: &Path, shards: usize) -> Result<(), EngineError> {
    if shards == 0 || shards > MAX_SHARDS {
        return Err(EngineError::Layout(format!(
            "the shard count must be between 1 and {MAX_SHARDS}, not {shards}"
        )));
    }
    let io_error = |what: &str, e: std::io::Error| {
        EngineError::Layout(format!("{what} {}: {e}", data_dir.display()))
    };
    std::fs::create_dir_all(data_dir).map_err(|e| io_error("cannot create", e))?;
    let path = data_dir.join(LAYOUT_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let recorded = parse_layout(&bytes).map_err(|why| {
                EngineError::Layout(format!("{} is unreadable: {why}", path.display()))
            })?;
            if recorded != shards {
                return Err(EngineError::Layout(format!(
                    "the data directory {} was created with {recorded} shard(s) and this server \
                     was started with {shards}: start with --shards {recorded} (re-sharding goes \
                     through a checkpoint and a restore)",
                    data_dir.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if shard_dir(data_dir, 0).exists() {
                return Err(EngineError::Layout(format!(
                    "{} holds shard data but no {LAYOUT_FILE}: it was not written by this \
                     version of oc, or the file was removed; restore it with the original \
                     shard count",
                    data_dir.display()
                )));
            }
            write_layout(data_dir, shards).map_err(|e| io_error("cannot record the layout in", e))
        }
        Err(e) => Err(io_error("cannot read the layout of", e)),
    }
}

fn parse_layout(bytes: &[u8]) -> Result<usize, String> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let version = value["format_version"]
        .as_u64()
        .ok_or("no format_version")?;
    if version != LAYOUT_FORMAT_VERSION {
        return Err(format!(
            "format_version {version} is not supported (this build reads {LAYOUT_FORMAT_VERSION})"
        ));
    }
    let placement = value["placement"].as_str().ok_or("no placement")?;
    if placement != "fnv1a64-mod" {
        return Err(format!("placement {placement:?} is not supported"));
    }
    let shards = value["shards"].as_u64().ok_or("no shards")?;
    match usize::try_from(shards) {
        Ok(n) if (1..=MAX_SHARDS).contains(&n) => Ok(n),
        _ => Err(format!("shards {shards} is out of range")),
    }
}

/// Written to a temporary name, synced, renamed, and the directory synced, so a crash
/// leaves either no layout or a whole one.
fn write_layout(data_dir: &Path, shards: usize) -> std::io::Result<()> {
    let body = json!({
        "format_version": LAYOUT_FORMAT_VERSION,
        "shards": shards,
        "placement": "fnv1a64-mod",
    });
    let tmp = data_dir.join(format!("{LAYOUT_FILE}.tmp"));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(format!("{body:#}\n").as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, data_dir.join(LAYOUT_FILE))?;
    std::fs::File::open(data_dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(id: &str) -> TenantId {
        TenantId::parse(id).expect("valid id")
    }

    #[test]
    fn placement_is_the_documented_fnv1a_hash() {
        // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c (the published test vector).
        assert_eq!(
            owner_shard(&tenant("a"), 1 << 20),
            0xaf63dc4c8601ec8c % (1 << 20)
        );
        assert_eq!(
            owner_shard(&tenant("a"), 7),
            (0xaf63dc4c8601ec8c_u64 % 7) as usize
        );
    }

    #[test]
    fn placement_spreads_tenants_over_shards() {
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            counts[owner_shard(&tenant(&format!("tenant-{i}")), 4)] += 1;
        }
        for count in counts {
            assert!((800..1200).contains(&count), "uneven placement: {counts:?}");
        }
    }

    #[test]
    fn a_different_shard_count_is_refused_with_the_recorded_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        ensure_layout(dir.path(), 2).expect("new directory");
        ensure_layout(dir.path(), 2).expect("same count");
        let err = ensure_layout(dir.path(), 3).expect_err("other count");
        assert!(err.to_string().contains("--shards 2"), "{err}");
    }

    #[test]
    fn shard_data_without_a_layout_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(shard_dir(dir.path(), 0)).expect("mkdir");
        let err = ensure_layout(dir.path(), 1).expect_err("no layout file");
        assert!(err.to_string().contains(LAYOUT_FILE), "{err}");
    }

    #[test]
    fn a_damaged_layout_file_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join(LAYOUT_FILE), b"{\"format_version\":1,").expect("write");
        let err = ensure_layout(dir.path(), 1).expect_err("damaged");
        assert!(err.to_string().contains("unreadable"), "{err}");
        std::fs::write(
            dir.path().join(LAYOUT_FILE),
            br#"{"format_version":9,"shards":1,"placement":"fnv1a64-mod"}"#,
        )
        .expect("write");
        let err = ensure_layout(dir.path(), 1).expect_err("future version");
        assert!(err.to_string().contains("not supported"), "{err}");
    }
}
