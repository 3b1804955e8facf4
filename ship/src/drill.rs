//! The restore rehearsal (`oc-pitr drill`): restores the archive's latest restore
//! point into a scratch directory, opens every shard the way `oc-server` does (the
//! checkpoint and every frame CRC-checked, the log replayed), checks every table
//! against itself (rows under their keys, each index one entry per row, usage
//! counters), and reports what was restored, how old it is and how long it took. The
//! scratch directory is removed afterwards unless asked to keep it.
//!
//! With the live server (`--live`), it also measures the RPO achieved (how far the
//! live log was ahead of the restore point just before the restore) and compares every
//! table the live server has not written since the restore point: same rows, same
//! content digest (`oc_engine::digest`), or the drill fails.
//!
//! Blocking: the archive calls block, and each shard is opened on an executor of its
//! own, one after another.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use oc_engine::digest::TableSummary;
use oc_engine::placement::shard_dir;
use oc_engine::Shard;
use oc_io::{DmaStorage, WalConfig};
use serde::{Deserialize, Serialize};

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
    /// Against the live server, when one was given.
    pub live: Option<LiveComparison>,
    /// What disagreed, if anything.
    pub problems: Vec<String>,
}

/// One shard of the restore against the same shard of the live server.
#[derive(Debug, Serialize)]
pub struct LiveComparison {
    /// The live shard's applied LSN and last commit just before the restore.
    pub live_lsn: u64,
    pub live_last_commit: Option<String>,
    /// How far the restore point was behind it (0 when the archive had caught up).
    pub lsns_behind: u64,
    pub seconds_behind: Option<f64>,
    /// Tables not written since the restore point, compared row for row by digest.
    pub tables_compared: usize,
    /// Tables written (or created) since the restore point: not comparable.
    pub tables_changed_since: usize,
}

/// The live server a drill compares with: its API address and admin token.
#[derive(Debug, Clone)]
pub struct LiveServer {
    pub url: String,
    pub admin_token: Option<String>,
}

/// `GET /v1/admin/digest`, as the live server answers it.
#[derive(Debug, Deserialize)]
struct LiveDigest {
    data_dir_id: String,
    shards: Vec<LiveShard>,
}

#[derive(Debug, Deserialize)]
struct LiveShard {
    applied_lsn: u64,
    last_commit_us: Option<u64>,
    tables: Vec<TableSummary>,
}

impl LiveServer {
    fn digest(&self, tables: bool) -> Result<LiveDigest, PitrError> {
        let url = format!(
            "{}/v1/admin/digest?tables={tables}",
            self.url.trim_end_matches('/')
        );
        let refused =
            |why: String| PitrError::Refused(format!("asking the live server {url}: {why}"));
        let mut request = ureq::get(&url).timeout(std::time::Duration::from_secs(600));
        if let Some(token) = &self.admin_token {
            request = request.set("authorization", &format!("Bearer {token}"));
        }
        let response = request.call().map_err(|e| match e {
            ureq::Error::Status(status, r) => {
                refused(format!("{status}: {}", r.into_string().unwrap_or_default()))
            }
            other => refused(other.to_string()),
        })?;
        response
            .into_json()
            .map_err(|e| refused(format!("an answer this drill cannot read: {e}")))
    }
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
    /// With `--live`: the largest `seconds_behind` of any shard, the RPO achieved.
    pub rpo_seconds: Option<f64>,
    pub shards: Vec<ShardDrill>,
    /// Where the restore was written, when kept.
    pub kept: Option<PathBuf>,
    pub ok: bool,
}

/// Runs the drill into a new directory under `work_dir`.
pub fn drill(
    archive: &Arc<dyn Archive>,
    work_dir: &Path,
    keep: bool,
    live: Option<&LiveServer>,
    progress: &mut dyn FnMut(&str),
) -> Result<DrillReport, PitrError> {
    // The live positions come first: what the archive held was then at least this.
    let live_before = match live {
        Some(server) => {
            let before = server.digest(false)?;
            let owner = crate::lease::read(archive.as_ref())
                .map_err(|e| PitrError::Refused(format!("reading the archive's owner: {e}")))?
                .map(|(lease, _)| lease.owner_id);
            if owner.as_deref() != Some(before.data_dir_id.as_str()) {
                return Err(PitrError::Refused(format!(
                    "the live server's data directory {} does not own this archive (its owner \
                     is {}): compare a drill with the server that ships to the archive",
                    before.data_dir_id,
                    owner.as_deref().unwrap_or("nobody")
                )));
            }
            Some(before)
        }
        None => None,
    };
    let started_us = oc_io::TimestampMicros::now().0;
    let dir = work_dir.join(format!("oc-drill-{}-{}", std::process::id(), started_us));
    let restore_started = Instant::now();
    let restored = restore::restore(archive, LATEST, &dir, progress);
    let outcome = restored.map(|restored| {
        let restore_seconds = restore_started.elapsed().as_secs_f64();
        let open_started = Instant::now();
        let mut summaries = Vec::new();
        let mut shards: Vec<ShardDrill> = restored
            .shards
            .iter()
            .map(|s| {
                progress(&format!("shard {}: opening and checking", s.shard));
                let (mut drilled, summary) = open_and_check(&dir, s.shard, restored.epoch);
                summaries.push(summary);
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
        let mut rpo_seconds = None;
        if let (Some(server), Some(before)) = (live, &live_before) {
            progress("comparing with the live server");
            match server.digest(true) {
                Ok(after) => {
                    for (i, drilled) in shards.iter_mut().enumerate() {
                        let restored_commit = restored.shards[i].last_commit_us;
                        let compared = compare_with_live(
                            drilled,
                            restored_commit,
                            before.shards.get(i),
                            after.shards.get(i),
                            &summaries[i],
                        );
                        if let Some(s) = compared.as_ref().and_then(|c| c.seconds_behind) {
                            rpo_seconds = Some(rpo_seconds.map_or(s, |r: f64| r.max(s)));
                        }
                        drilled.live = compared;
                    }
                }
                Err(e) => {
                    for drilled in &mut shards {
                        drilled.problems.push(e.to_string());
                    }
                }
            }
        }
        DrillReport {
            rpo_seconds,
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

/// Compares one restored shard with the live one: the positions (the RPO) from
/// `before`, the tables from `after`. A live table last written at or before the
/// restore point must be in the restore with the same rows.
fn compare_with_live(
    drilled: &mut ShardDrill,
    restored_commit_us: u64,
    before: Option<&LiveShard>,
    after: Option<&LiveShard>,
    restored: &[TableSummary],
) -> Option<LiveComparison> {
    let (Some(before), Some(after)) = (before, after) else {
        drilled
            .problems
            .push("the live server has no such shard: another shard count".into());
        return None;
    };
    let mut comparison = LiveComparison {
        live_lsn: before.applied_lsn,
        live_last_commit: before.last_commit_us.map(format_rfc3339),
        lsns_behind: before.applied_lsn.saturating_sub(drilled.restored_lsn),
        seconds_behind: before.last_commit_us.map(|live| {
            if before.applied_lsn <= drilled.restored_lsn {
                0.0
            } else {
                live.saturating_sub(restored_commit_us) as f64 / 1e6
            }
        }),
        tables_compared: 0,
        tables_changed_since: 0,
    };
    for live in &after.tables {
        if live.written_lsn > drilled.restored_lsn || live.digest.is_none() {
            comparison.tables_changed_since += 1;
            continue;
        }
        comparison.tables_compared += 1;
        let name = format!("tenant {}, table {}", live.tenant, live.table);
        match restored
            .iter()
            .find(|r| r.tenant == live.tenant && r.table == live.table)
        {
            None => drilled.problems.push(format!(
                "{name}: live and unchanged since LSN {}, missing from the restore",
                live.written_lsn
            )),
            Some(r) if (r.rows, &r.digest) != (live.rows, &live.digest) => {
                drilled.problems.push(format!(
                    "{name}: live has {} rows (digest {}), the restore {} rows (digest {}), \
                     though no write reached it after LSN {}",
                    live.rows,
                    live.digest.as_deref().unwrap_or("-"),
                    r.rows,
                    r.digest.as_deref().unwrap_or("-"),
                    live.written_lsn
                ))
            }
            Some(_) => {}
        }
    }
    Some(comparison)
}

/// Opens one restored shard as the server would and checks every table; also sums up
/// its tables for a comparison with the live server.
fn open_and_check(data_dir: &Path, shard: usize, epoch: u64) -> (ShardDrill, Vec<TableSummary>) {
    let mut report = ShardDrill {
        shard,
        restored_lsn: 0,
        last_commit: None,
        tenants: 0,
        tables: 0,
        rows: 0,
        live: None,
        problems: Vec::new(),
    };
    let dir = shard_dir(data_dir, shard);
    let opened = oc_io::executor::run_local(async {
        let storage = DmaStorage::open(&dir).await?;
        // The epoch the restored directory writes: its log may hold newer epochs than 1.
        let config = WalConfig {
            epoch: oc_io::Epoch(epoch),
            ..WalConfig::default()
        };
        let (shard, _) = Shard::open(storage, config).await?;
        let checked = shard.check();
        shard.close().await?;
        Ok::<_, oc_engine::EngineError>(checked)
    });
    match opened {
        Ok(checked) => {
            report.tenants = checked.tenants;
            report.tables = checked.tables;
            report.rows = checked.rows;
            report.problems = checked.problems;
            (report, checked.summaries)
        }
        Err(e) => {
            report
                .problems
                .push(format!("the shard does not open: {e}"));
            (report, Vec::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(table: &str, written_lsn: u64, rows: u64, digest: &str) -> TableSummary {
        TableSummary {
            tenant: "acme".into(),
            table: table.into(),
            version: 1,
            written_lsn,
            rows,
            digest: Some(digest.into()),
        }
    }

    fn drilled(restored_lsn: u64) -> ShardDrill {
        ShardDrill {
            shard: 0,
            restored_lsn,
            last_commit: None,
            tenants: 1,
            tables: 3,
            rows: 0,
            live: None,
            problems: Vec::new(),
        }
    }

    #[test]
    fn unchanged_tables_must_match_and_later_ones_are_skipped() {
        let live = LiveShard {
            applied_lsn: 20,
            last_commit_us: Some(5_000_000),
            tables: vec![
                summary("same", 8, 3, "0000abcd"),
                summary("differs", 9, 3, "0000abcd"),
                summary("gone", 9, 1, "00000001"),
                summary("later", 15, 9, "00000009"),
            ],
        };
        let restored = vec![
            summary("same", 8, 3, "0000abcd"),
            summary("differs", 9, 3, "0000ffff"),
            summary("later", 9, 2, "00000002"),
        ];
        let mut shard = drilled(10);
        let c = compare_with_live(&mut shard, 4_000_000, Some(&live), Some(&live), &restored)
            .expect("compared");
        assert_eq!((c.tables_compared, c.tables_changed_since), (3, 1));
        assert_eq!((c.lsns_behind, c.seconds_behind), (10, Some(1.0)));
        assert_eq!(shard.problems.len(), 2, "{:?}", shard.problems);
        assert!(
            shard.problems[0].contains("table differs") && shard.problems[0].contains("0000ffff")
        );
        assert!(shard.problems[1].contains("table gone") && shard.problems[1].contains("missing"));

        // Caught up: nothing behind.
        let mut shard = drilled(20);
        let c = compare_with_live(
            &mut shard,
            5_000_000,
            Some(&live),
            Some(&live),
            &restored[..1],
        )
        .expect("compared");
        assert_eq!((c.lsns_behind, c.seconds_behind), (0, Some(0.0)));
        // Another shard count.
        let mut shard = drilled(20);
        assert!(compare_with_live(&mut shard, 0, None, None, &[]).is_none());
        assert!(shard.problems[0].contains("shard count"));
    }
}
