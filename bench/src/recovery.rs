//! `oc-bench recovery`: how fast a shard comes back. One log is written once (the
//! engine benchmark's rows: single-row commits from 64 writers over random keys, so
//! updates and inserts in random order, then 100-row batches of new keys), then
//! reopened `--runs` times with no checkpoint (log replay) and, from a copy that was
//! checkpointed, `--runs` times from the checkpoint (checkpoint load), interleaved
//! with the order rotated each run so a drift of the host's disk or CPU reaches both.
//! Each figure is the median of its runs with the range, against the goal (300 MB/s
//! each, issue 21).

use std::path::Path;
use std::rc::Rc;
use std::time::Instant;

use anyhow::{Context, Result};
use oc_engine::{Shard, ShardOpenReport, WriteOp};
use oc_io::{DmaStorage, Lsn, SimRng, Wal, WalConfig};
use serde::{Deserialize, Serialize};

use crate::engine::{acme, fresh_shard, row};

#[derive(clap::Args)]
pub struct RecoveryArgs {
    /// Directory on the file system to measure (not tmpfs: it ignores O_DIRECT).
    #[arg(long)]
    pub(crate) dir: std::path::PathBuf,
    /// Row writes (half as single-row commits over random keys, half in batches of 100
    /// new keys).
    #[arg(long, default_value_t = 1_000_000)]
    pub(crate) rows: u64,
    /// Reopenings of each kind.
    #[arg(long, default_value_t = 3)]
    pub(crate) runs: usize,
    /// Keep the log and checkpoint a previous run with the same `--rows` left in
    /// `--dir` instead of writing them again (for profiling the reopening alone).
    #[arg(long)]
    pub(crate) reuse: bool,
    /// Where to write the JSON results (the Markdown table goes beside it).
    #[arg(long)]
    pub(crate) json: Option<std::path::PathBuf>,
}

/// Median and range of one kind of reopening.
#[derive(Serialize, Deserialize)]
pub(crate) struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    pub(crate) fn of(mut values: Vec<f64>) -> Spread {
        values.sort_by(f64::total_cmp);
        Spread {
            median: crate::archive::median(&values),
            min: values.first().copied().unwrap_or(f64::NAN),
            max: values.last().copied().unwrap_or(f64::NAN),
        }
    }
}

#[derive(Serialize, Deserialize)]
pub(crate) struct RecoveryReport {
    #[serde(default)]
    pinning: crate::pinning::Pinning,
    /// Row writes in the log.
    rows: u64,
    runs: usize,
    /// Bytes of segment files recovery reads (the last one's unused end included).
    log_mb: f64,
    frames: u64,
    /// The newest checkpoint's snapshot file.
    checkpoint_mb: f64,
    /// The log a reopening from the checkpoint still reads (the active segment): its
    /// time is part of the checkpoint load's.
    checkpoint_tail_mb: f64,
    /// The log read and checked alone (no apply): replay's ceiling.
    scan_mb_s: Spread,
    replay_mb_s: Spread,
    replay_rows_per_s: Spread,
    checkpoint_load_mb_s: Spread,
}

/// Single-row commits from 64 writers over random keys in `[0, rows/2)` for the first
/// half of `rows` (about 40 % of them update a row, the rest insert in random order),
/// then 100-row batches of new keys: both kinds of frame, as a server's log holds them.
async fn write_rows(shard: &Rc<Shard<DmaStorage>>, rows: u64) -> Result<()> {
    let single = rows / 2;
    let writers = 64u64;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let shard = shard.clone();
        tasks.push(glommio::spawn_local(async move {
            let mut rng = SimRng::new(w + 1);
            for _ in (w..single).step_by(writers as usize) {
                let id = rng.below(single.max(1));
                shard.write(&acme(), "rows", &[row(id)], None).await?;
            }
            Ok::<(), oc_engine::EngineError>(())
        }));
    }
    for t in tasks {
        t.await?;
    }
    let mut id = single;
    while id < rows {
        let ops: Vec<WriteOp> = (id..(id + 100).min(rows)).map(row).collect();
        shard.write(&acme(), "rows", &ops, None).await?;
        id += 100;
    }
    Ok(())
}

/// Frames the log of `rows` row writes holds: the tenant and the table, one per
/// single-row commit, one per batch.
fn frames_of(rows: u64) -> u64 {
    2 + rows / 2 + (rows - rows / 2).div_ceil(100)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    if to.exists() {
        std::fs::remove_dir_all(to)?;
    }
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// What one reopening took and read.
struct Reopened {
    seconds: f64,
    report: ShardOpenReport,
}

async fn reopen(dir: &Path) -> Result<Reopened> {
    let started = Instant::now();
    let (shard, report) = Shard::open(DmaStorage::open(dir).await?, WalConfig::default()).await?;
    let seconds = started.elapsed().as_secs_f64();
    shard.close().await?;
    Ok(Reopened { seconds, report })
}

/// The baseline: the log read and checked by the WAL alone, nothing applied (MB/s).
async fn scan(dir: &Path) -> Result<f64> {
    let started = Instant::now();
    let (wal, scanned) = Wal::open(
        DmaStorage::open(dir).await?,
        WalConfig::default(),
        Lsn(1),
        |_| Ok(()),
    )
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    wal.close().await?;
    Ok(scanned.bytes_scanned as f64 / 1e6 / seconds)
}

/// What the stamp file says about a directory this version wrote for `rows`.
fn stamp_of(rows: u64) -> String {
    format!("oc-bench recovery, workload 2, {rows} row writes")
}

pub fn run(args: RecoveryArgs) -> Result<()> {
    let log_dir = args.dir.join("log");
    let checkpointed = args.dir.join("checkpointed");
    let stamp = args.dir.join("stamp");
    let reusable = args.reuse && std::fs::read_to_string(&stamp).ok() == Some(stamp_of(args.rows));
    let runs = args.runs.max(1);
    let rows = args.rows;
    let report = oc_io::executor::run_local(async move {
        if !reusable {
            let _ = std::fs::remove_file(&stamp);
            let started = Instant::now();
            let shard = fresh_shard(&log_dir).await?;
            write_rows(&shard, rows).await?;
            shard.close().await?;
            copy_dir(&log_dir, &checkpointed)?;
            let (shard, _) =
                Shard::open(DmaStorage::open(&checkpointed).await?, WalConfig::default()).await?;
            shard.checkpoint().await?;
            shard.release_covered_wal().await?;
            shard.close().await?;
            std::fs::write(&stamp, stamp_of(rows))?;
            eprintln!(
                "wrote {rows} row writes and checkpointed a copy in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        let (mut scans, mut replay, mut replay_rows, mut load) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut log_mb, mut frames, mut checkpoint_mb, mut tail_mb) = (0.0, 0, 0.0, 0.0);
        for run in 0..runs {
            // Rotated, so neither kind always runs right after the other.
            let load_first = run % 2 == 1;
            let mut loaded = None;
            if load_first {
                loaded = Some(reopen(&checkpointed).await?);
            }
            let scan_mb_s = scan(&log_dir).await?;
            let replayed = reopen(&log_dir).await?;
            let loaded = match loaded {
                Some(l) => l,
                None => reopen(&checkpointed).await?,
            };
            anyhow::ensure!(
                replayed.report.checkpoint.is_none()
                    && replayed.report.wal.frames_replayed == frames_of(rows),
                "{} is not this workload's log ({} frames replayed, {} expected, checkpoint {:?}): run without --reuse",
                log_dir.display(),
                replayed.report.wal.frames_replayed,
                frames_of(rows),
                replayed.report.checkpoint
            );
            let Some(lsn) = loaded.report.checkpoint else {
                anyhow::bail!(
                    "{} reopened without a checkpoint: run without --reuse",
                    checkpointed.display()
                );
            };
            let snapshot = checkpointed.join(oc_engine::checkpoint::snapshot_name(lsn));
            checkpoint_mb = std::fs::metadata(&snapshot)
                .with_context(|| format!("reading {}", snapshot.display()))?
                .len() as f64
                / 1e6;
            tail_mb = loaded.report.wal.bytes_scanned as f64 / 1e6;
            log_mb = replayed.report.wal.bytes_scanned as f64 / 1e6;
            frames = replayed.report.wal.frames_replayed;
            scans.push(scan_mb_s);
            replay.push(log_mb / replayed.seconds);
            replay_rows.push(rows as f64 / replayed.seconds);
            load.push(checkpoint_mb / loaded.seconds);
            eprintln!(
                "run {}: log read alone at {scan_mb_s:.0} MB/s, replayed {log_mb:.0} MB ({frames} frames) in {:.2} s, loaded {checkpoint_mb:.0} MB of checkpoint (and {tail_mb:.0} MB of log) in {:.2} s",
                run + 1,
                replayed.seconds,
                loaded.seconds
            );
        }
        Ok::<_, anyhow::Error>(RecoveryReport {
            pinning: crate::pinning::current(),
            rows,
            runs,
            log_mb,
            frames,
            checkpoint_mb,
            checkpoint_tail_mb: tail_mb,
            scan_mb_s: Spread::of(scans),
            replay_mb_s: Spread::of(replay),
            replay_rows_per_s: Spread::of(replay_rows),
            checkpoint_load_mb_s: Spread::of(load),
        })
    })?;
    crate::report::write_outputs(&report, args.json.as_deref(), markdown(&report), Vec::new())
}

pub(crate) fn markdown(r: &RecoveryReport) -> String {
    let verdict = |s: &Spread| {
        if s.min >= 300.0 {
            "met"
        } else if s.median >= 300.0 {
            "borderline (the median, not every run)"
        } else {
            "**not met**"
        }
    };
    format!(
        "\n| recovery, {} row writes ({} runs each, interleaved) | median | min | max | goal |\n|---|---:|---:|---:|---|\n\
         | log read and checked alone, MB/s (baseline) | {:.0} | {:.0} | {:.0} | |\n\
         | log replay, MB/s ({:.0} MB, {} frames) | {:.0} | {:.0} | {:.0} | ≥ 300: {} |\n\
         | log replay, row writes/s | {:.0} | {:.0} | {:.0} | |\n\
         | checkpoint load, MB/s of snapshot ({:.0} MB; the time includes reading {:.0} MB of log after it) | {:.0} | {:.0} | {:.0} | ≥ 300: {} |\n",
        r.rows,
        r.runs,
        r.scan_mb_s.median,
        r.scan_mb_s.min,
        r.scan_mb_s.max,
        r.log_mb,
        r.frames,
        r.replay_mb_s.median,
        r.replay_mb_s.min,
        r.replay_mb_s.max,
        verdict(&r.replay_mb_s),
        r.replay_rows_per_s.median,
        r.replay_rows_per_s.min,
        r.replay_rows_per_s.max,
        r.checkpoint_mb,
        r.checkpoint_tail_mb,
        r.checkpoint_load_mb_s.median,
        r.checkpoint_load_mb_s.min,
        r.checkpoint_load_mb_s.max,
        verdict(&r.checkpoint_load_mb_s),
    )
}
