//! `oc-bench recovery`: how fast a shard comes back. One log is written once (single-row
//! commits from 64 writers and 100-row batches, the engine benchmark's rows), then
//! reopened `--runs` times with no checkpoint (log replay) and, from a copy that was
//! checkpointed, `--runs` times from the checkpoint (checkpoint load), the two
//! alternated so a drift of the host's disk or CPU reaches both. Each figure is the
//! median of its runs with the range, against the goal (300 MB/s each, issue 21).

use std::path::Path;
use std::rc::Rc;
use std::time::Instant;

use anyhow::{Context, Result};
use oc_engine::{Shard, WriteOp};
use oc_io::{DmaStorage, Lsn, Wal, WalConfig};
use serde::{Deserialize, Serialize};

use crate::engine::{acme, fresh_shard, row};

#[derive(clap::Args)]
pub struct RecoveryArgs {
    /// Directory on the file system to measure (not tmpfs: it ignores O_DIRECT).
    #[arg(long)]
    pub(crate) dir: std::path::PathBuf,
    /// Rows written (half as single-row commits, half in batches of 100).
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
    rows: u64,
    runs: usize,
    log_mb: f64,
    frames: u64,
    checkpoint_mb: f64,
    /// The log read and checked alone (no apply): replay's ceiling.
    scan_mb_s: Spread,
    replay_mb_s: Spread,
    replay_rows_per_s: Spread,
    checkpoint_load_mb_s: Spread,
}

/// Single-row commits from 64 writers for the first half of `rows`, then 100-row
/// batches: both kinds of frame, as a server's log holds them.
async fn write_rows(shard: &Rc<Shard<DmaStorage>>, rows: u64) -> Result<()> {
    let single = rows / 2;
    let writers = 64u64;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let shard = shard.clone();
        tasks.push(glommio::spawn_local(async move {
            let mut id = w;
            while id < single {
                shard.write(&acme(), "rows", &[row(id)], None).await?;
                id += writers;
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

pub fn run(args: RecoveryArgs) -> Result<()> {
    let log_dir = args.dir.join("log");
    let checkpointed = args.dir.join("checkpointed");
    let stamp = args.dir.join("rows");
    let reusable = args.reuse
        && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&args.rows.to_string());
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
            std::fs::write(&stamp, rows.to_string())?;
            eprintln!(
                "wrote {rows} rows and checkpointed a copy in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        let checkpoint_bytes = crate::engine::dir_bytes(&checkpointed, ".snap") as f64;
        let (mut scan, mut replay, mut replay_rows, mut load) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut log_mb, mut frames) = (0.0, 0);
        for run in 0..runs {
            // The baseline: the same log read and checked with nothing applied.
            let started = Instant::now();
            let (wal, scanned) = Wal::open(
                DmaStorage::open(&log_dir).await?,
                WalConfig::default(),
                Lsn(1),
                |_| Ok(()),
            )
            .await?;
            let scan_s = started.elapsed().as_secs_f64();
            wal.close().await?;
            scan.push(scanned.bytes_scanned as f64 / 1e6 / scan_s);

            let started = Instant::now();
            let (shard, report) =
                Shard::open(DmaStorage::open(&log_dir).await?, WalConfig::default()).await?;
            let seconds = started.elapsed().as_secs_f64();
            shard.close().await?;
            log_mb = report.wal.bytes_scanned as f64 / 1e6;
            frames = report.wal.frames_replayed;
            replay.push(log_mb / seconds);
            replay_rows.push(rows as f64 / seconds);

            let started = Instant::now();
            let (shard, _) =
                Shard::open(DmaStorage::open(&checkpointed).await?, WalConfig::default()).await?;
            let load_s = started.elapsed().as_secs_f64();
            shard.close().await?;
            // Two checkpoints may be kept: the newest is the one read.
            let newest_mb = checkpoint_bytes / 1e6 / checkpoint_count(&checkpointed) as f64;
            load.push(newest_mb / load_s);
            eprintln!(
                "run {}: scanned the log in {scan_s:.2} s, replayed {log_mb:.0} MB ({frames} frames) in {seconds:.2} s, loaded {newest_mb:.0} MB of checkpoint in {load_s:.2} s",
                run + 1
            );
        }
        Ok::<_, anyhow::Error>(RecoveryReport {
            pinning: crate::pinning::current(),
            rows,
            runs,
            log_mb,
            frames,
            checkpoint_mb: checkpoint_bytes / 1e6 / checkpoint_count(&checkpointed) as f64,
            scan_mb_s: Spread::of(scan),
            replay_mb_s: Spread::of(replay),
            replay_rows_per_s: Spread::of(replay_rows),
            checkpoint_load_mb_s: Spread::of(load),
        })
    })?;
    crate::report::write_outputs(&report, args.json.as_deref(), markdown(&report), Vec::new())
}

fn checkpoint_count(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".snap"))
                .count()
        })
        .unwrap_or(0)
        .max(1)
}

pub(crate) fn markdown(r: &RecoveryReport) -> String {
    let verdict = |s: &Spread| {
        if s.median >= 300.0 {
            "met"
        } else {
            "**not met**"
        }
    };
    format!(
        "\n| recovery, {} rows ({} runs each, alternated) | median | min | max | goal |\n|---|---:|---:|---:|---|\n\
         | log read and checked alone, MB/s (baseline) | {:.0} | {:.0} | {:.0} | |\n\
         | log replay, MB/s ({:.0} MB, {} frames) | {:.0} | {:.0} | {:.0} | ≥ 300: {} |\n\
         | log replay, rows/s | {:.0} | {:.0} | {:.0} | |\n\
         | checkpoint load, MB/s ({:.0} MB) | {:.0} | {:.0} | {:.0} | ≥ 300: {} |\n",
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
        r.checkpoint_load_mb_s.median,
        r.checkpoint_load_mb_s.min,
        r.checkpoint_load_mb_s.max,
        verdict(&r.checkpoint_load_mb_s),
    )
}
