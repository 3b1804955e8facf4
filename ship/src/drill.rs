//! The restore rehearsal (`oc-pitr drill`): restores the archive's latest restore
//! point into a scratch directory, opens every shard the way `oc-server` does (the
//! checkpoint and every frame CRC-checked, the log replayed), checks every table
//! against itself (rows under their keys, each index one entry per row, usage
//! counters), and reports what was restored, how old it is and how long it took. The
//! scratch directory is removed afterwards unless asked to keep it.
//!
//! Blocking: the archive calls block, and each shard is opened on an executor of its
//! own, one after another.

use std::path::{Path, PathBuf};
use std::time::Instant;

use oc_engine::io::{DmaStorage, WalConfig};
use oc_engine::placement::shard_dir;
use oc_engine::Shard;
use serde::Serialize;

use crate::archive::Archive;
use crate::restore::{self, PitrError, LATEST};
use crate::timestamp::format_rfc3339;

/// What the drill found for one shard.
#[derive(Debug, Serialize)]
pub struct ShardDrill {
    pub shard: usize,
    /// The last LSN restored, and when it was committed (RFC 3339; `null` when the
    /// shard's log holds no commit after its checkpoint).
    pub restored_lsn: u64,
    pub last_commit: Option<String>,
    pub tenants: usize,
    pub tables: usize,
    pub rows: usize,
    /// What disagreed, if anything.
    pub problems: Vec<String>,
}

/// What the drill found.
#[derive(Debug, Serialize)]
pub struct DrillReport {
    pub restore_seconds: f64,
    pub open_seconds: f64,
    pub restored_bytes: u64,
    /// Seconds between the newest restored commit and the drill's start: with a live
    /// server writing all along, what losing it now would lose (at most).
    pub restore_point_age_seconds: Option<f64>,
    pub shards: Vec<ShardDrill>,
    /// Where the restore was written, when kept.
    pub kept: Option<PathBuf>,
    pub ok: bool,
}

/// Runs the drill into a new directory under `work_dir`.
pub fn drill(
    archive: &dyn Archive,
    work_dir: &Path,
    keep: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<DrillReport, PitrError> {
    let started_us = oc_engine::io::TimestampMicros::now().0;
    let dir = work_dir.join(format!("oc-drill-{}-{}", std::process::id(), started_us));
    let restore_started = Instant::now();
    let restored = restore::restore(archive, LATEST, &dir, progress);
    let outcome = restored.map(|restored| {
        let restore_seconds = restore_started.elapsed().as_secs_f64();
        let open_started = Instant::now();
        let shards: Vec<ShardDrill> = restored
            .shards
            .iter()
            .map(|s| {
                progress(&format!("shard {}: opening and checking", s.shard));
                let mut drilled = open_and_check(&dir, s.shard, restored.epoch);
                if let Some(why) = &s.stops_early {
                    drilled.problems.push(format!(
                        "the restore stopped short of the archive's end: {why}"
                    ));
                }
                drilled.restored_lsn = s.last_lsn.0;
                drilled.last_commit =
                    (s.last_commit_us > 0).then(|| format_rfc3339(s.last_commit_us));
                drilled
            })
            .collect();
        let newest = restored
            .shards
            .iter()
            .map(|s| s.last_commit_us)
            .max()
            .filter(|&us| us > 0);
        DrillReport {
            restore_seconds,
            open_seconds: open_started.elapsed().as_secs_f64(),
            restored_bytes: restored.shards.iter().map(|s| s.bytes).sum(),
            restore_point_age_seconds: newest.map(|us| started_us.saturating_sub(us) as f64 / 1e6),
            ok: shards.iter().all(|s| s.problems.is_empty()),
            shards,
            kept: keep.then(|| dir.clone()),
        }
    });
    if !keep {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if dir.exists() {
                progress(&format!("WARNING: could not remove {}: {e}", dir.display()));
            }
        }
    }
    outcome
}

/// Opens one restored shard as the server would and checks every table.
fn open_and_check(data_dir: &Path, shard: usize, epoch: u64) -> ShardDrill {
    let mut report = ShardDrill {
        shard,
        restored_lsn: 0,
        last_commit: None,
        tenants: 0,
        tables: 0,
        rows: 0,
        problems: Vec::new(),
    };
    let dir = shard_dir(data_dir, shard);
    let opened = oc_engine::io::executor::run_local(async {
        let storage = DmaStorage::open(&dir).await?;
        // The epoch the restored directory writes: its log may hold newer epochs than 1.
        let config = WalConfig {
            epoch: oc_engine::io::Epoch(epoch),
            ..WalConfig::default()
        };
        let (shard, _) = Shard::open(storage, config).await?;
        let checked = shard.with_state(|state| {
            let mut found = (0, 0, 0, Vec::new());
            for (id, tenant) in &state.tenants {
                found.0 += 1;
                for table in tenant.tables() {
                    found.1 += 1;
                    match table.check_integrity() {
                        Ok(rows) => found.2 += rows,
                        Err(why) => found
                            .3
                            .push(format!("tenant {id}, table {}: {why}", table.schema().name)),
                    }
                }
            }
            found
        });
        shard.close().await?;
        Ok::<_, oc_engine::EngineError>(checked)
    });
    match opened {
        Ok((tenants, tables, rows, problems)) => {
            report.tenants = tenants;
            report.tables = tables;
            report.rows = rows;
            report.problems = problems;
        }
        Err(e) => report
            .problems
            .push(format!("the shard does not open: {e}")),
    }
    report
}
