//! `oc-bench engine`: durable row writes through one shard, against `oc-bench wal`'s
//! figures for the same concurrency, plus latency during a checkpoint and recovery speed.
//!
//! Phases (each `--seconds` after a warm-up):
//! 1. upserts of ~200-byte rows with random keys, batches of 1 and 100 rows, at each
//!    concurrency (closed loop: each writer waits for its commit);
//! 2. single-row upserts at 64 writers over a preloaded table, in alternating windows
//!    with checkpoints running back to back and without (about twice `--seconds`: the
//!    windows without add up to it);
//! 3. recovery: the log replayed with no checkpoint (MB/s of log), and a checkpoint
//!    loaded (MB/s of checkpoint).

use std::cell::{Cell, RefCell};
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use oc_engine::{ColumnType, Shard, TableSchema, TenantId, WriteOp};
use oc_io::{DmaStorage, SimRng, WalConfig};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::latency::{histogram, Percentiles};

/// Bytes of the text column, making rows of about 200 bytes as stored.
const BODY_BYTES: usize = 180;
/// Rows in the table the checkpoint phase writes over.
const PRELOAD_ROWS: u64 = 200_000;

#[derive(clap::Args)]
pub struct EngineArgs {
    #[command(flatten)]
    pub(crate) common: crate::RunArgs,
    /// Writer concurrencies.
    #[arg(long, value_delimiter = ',', default_value = "1,64,256")]
    pub(crate) concurrency: Vec<usize>,
    /// Shards of the pool phase (default: one per CPU).
    #[arg(long)]
    pub(crate) shards: Option<usize>,
    /// Do not pin the pool's shards to CPUs.
    #[arg(long)]
    pub(crate) no_pin: bool,
    /// Only the checkpoint phase and its checkpoint's load (no pool, WAL baseline, write
    /// phases or log replay): the checkpoint tail's ratio in about a quarter of the time.
    #[arg(long)]
    pub(crate) checkpoint_only: bool,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct WriteResult {
    concurrency: usize,
    rows_per_batch: usize,
    commits_per_s: f64,
    /// Plain WAL appends/s of a record of the same size at the same concurrency,
    /// measured in this run (fresh log, like the shard's).
    wal_appends_per_s: f64,
    /// commits/s ÷ WAL appends/s.
    ratio_to_wal: f64,
    rows_per_s: f64,
    commit_p50_us: u64,
    commit_p99_us: u64,
    commit_p999_us: u64,
    #[serde(flatten)]
    times: PhaseTimes,
}

/// Where a phase's writes spent their time.
#[derive(Serialize, Deserialize, Default)]
pub(crate) struct PhaseTimes {
    /// Where one write in 8 spent its time on the shard (`oc_engine::stages`).
    #[serde(default)]
    stages: Vec<crate::http::StageTime>,
    /// The log's own figures over the phase: append → durable per frame, and one
    /// group's durable write.
    /// None in results written before these were recorded.
    #[serde(default)]
    wal_fsync_lag_p99_us: Option<u64>,
    #[serde(default)]
    wal_group_write_p99_us: Option<u64>,
    /// The log's mean group over the phase, in bytes (padding included)...
    #[serde(default)]
    wal_mean_group_bytes: Option<u64>,
    /// ...and the spares it made meanwhile: zero-filled, preallocated, recycled.
    #[serde(default)]
    wal_spares: Option<[u64; 3]>,
    /// The log's frames per group and its mean durable write over the phase, in µs:
    /// with the shard's busy share below, what a closed loop of writers waits on
    /// (each writer's turn is its group's write plus the shard's work for its cohort).
    #[serde(default)]
    wal_frames_per_group: Option<f64>,
    #[serde(default)]
    wal_group_write_mean_us: Option<f64>,
    /// The share of the phase the shard's thread was on a CPU (its user and system
    /// time over the phase's wall time; the writers run on that thread too). Below 1
    /// the shard waited for the disk with nothing to do.
    #[serde(default)]
    shard_cpu_busy: Option<f64>,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct EngineReport {
    /// `--server-cpus` and `--client-cpus`, as given.
    #[serde(default)]
    pinning: crate::pinning::Pinning,
    shards: usize,
    seconds_per_phase: f64,
    writes: Vec<WriteResult>,
    pool: Vec<crate::pool::PoolResult>,
    no_checkpoint_p99_us: u64,
    during_checkpoint_p99_us: u64,
    /// The log's timings in the same two kinds of window; absent in older results.
    #[serde(default)]
    no_checkpoint_times: PhaseTimes,
    #[serde(default)]
    during_checkpoint_times: PhaseTimes,
    /// Windows of each kind, alternated; 0 in results from before they were (one
    /// phase without checkpoints, then one with).
    #[serde(default)]
    checkpoint_windows: u64,
    checkpoints_during_phase: u64,
    checkpoint_bytes: u64,
    checkpoint_seconds: f64,
    /// The write phases' log replayed; None with `--checkpoint-only`.
    wal_replay_mb_s: Option<f64>,
    wal_replayed_mb: Option<f64>,
    checkpoint_load_mb_s: f64,
    /// 64 single-row writers for [`AFTER_REOPEN`] right after that reopening, while the
    /// shard checks the log segments its open did not read (`segments_not_read`); absent
    /// in older results.
    #[serde(default)]
    after_reopen: Option<AfterReopen>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct AfterReopen {
    segments_not_read: u64,
    commits_per_s: f64,
    commit_p99_us: u64,
}

/// How long the writers run after the checkpoint's reopening: well inside the check of
/// the segments the open skipped (a few 64 MiB segments at 4 MB/s).
const AFTER_REOPEN: Duration = Duration::from_secs(2);

pub(crate) fn acme() -> TenantId {
    TenantId::parse("bench").expect("a valid tenant id")
}

/// The row body, built once: the benchmark should spend its time in the engine.
fn body_text() -> &'static str {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| "x".repeat(BODY_BYTES))
}

pub(crate) fn row(id: u64) -> WriteOp {
    let mut object = serde_json::Map::with_capacity(2);
    object.insert("id".into(), json!(id as i64));
    object.insert("body".into(), json!(body_text()));
    WriteOp::Upsert(object)
}

/// Makes a row built by [`row`] the next one to write: another id, and the body
/// written again, so that the row is in cache as a request's rows are when they have
/// just been parsed, without the allocator's work of building it anew.
fn refill(op: &mut WriteOp, id: u64) {
    if let WriteOp::Upsert(object) = op {
        for (column, value) in object.iter_mut() {
            match (column.as_str(), value) {
                ("id", value) => *value = json!(id as i64),
                (_, serde_json::Value::String(text)) => {
                    text.clear();
                    text.push_str(body_text());
                }
                _ => {}
            }
        }
    }
}

/// The benchmark's table: an int key and a text body.
pub(crate) fn rows_schema() -> Result<TableSchema, oc_engine::EngineError> {
    TableSchema::new(
        "rows",
        &[
            ("id", ColumnType::Int, false),
            ("body", ColumnType::Text, true),
        ],
        &["id"],
        &[],
    )
}

pub(crate) async fn fresh_shard(dir: &Path) -> Result<Rc<Shard<DmaStorage>>> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let (shard, _) = Shard::open(DmaStorage::open(dir).await?, WalConfig::default()).await?;
    shard.create_tenant(&acme()).await?;
    shard.create_table(&acme(), rows_schema()?).await?;
    Ok(Rc::new(shard))
}

/// Closed-loop writers for `duration`: (commits, elapsed, commit latency µs).
async fn write_load(
    shard: &Rc<Shard<DmaStorage>>,
    writers: usize,
    rows_per_batch: usize,
    key_space: u64,
    duration: Duration,
) -> Result<(u64, Duration, Histogram<u64>)> {
    let started = Instant::now();
    let window = Rc::new(Cell::new(QUIET));
    let (commits, elapsed, [latency, _]) =
        windowed_load(shard, writers, rows_per_batch, key_space, window, || {
            started.elapsed() >= duration
        })
        .await?;
    Ok((commits, elapsed, latency))
}

/// The windows of the checkpoint phase: a commit counts in the one it started in.
const QUIET: usize = 0;
const CHECKPOINTING: usize = 1;

/// Closed-loop writers until `done()` (checked every 100 ms): (commits, elapsed, commit
/// latency µs in each window `window` named while the commit started).
async fn windowed_load(
    shard: &Rc<Shard<DmaStorage>>,
    writers: usize,
    rows_per_batch: usize,
    key_space: u64,
    window: Rc<Cell<usize>>,
    done: impl Fn() -> bool,
) -> Result<(u64, Duration, [Histogram<u64>; 2])> {
    let stop = Rc::new(Cell::new(false));
    let latency = Rc::new(RefCell::new([histogram(), histogram()]));
    let commits = Rc::new(Cell::new(0u64));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (shard, stop, latency, commits, window) = (
            shard.clone(),
            stop.clone(),
            latency.clone(),
            commits.clone(),
            window.clone(),
        );
        tasks.push(glommio::spawn_local(async move {
            let mut rng = SimRng::new(w as u64 + 1);
            // Built once and refilled before each commit: building and freeing a JSON
            // map and a copy of the body per row took 16 % of the shard's thread in the
            // 100-row phase, time of the benchmark's and not the engine's.
            let mut ops: Vec<WriteOp> = (0..rows_per_batch).map(|_| row(0)).collect();
            while !stop.get() {
                for op in &mut ops {
                    refill(op, rng.below(key_space));
                }
                let (began, in_window) = (Instant::now(), window.get());
                shard.write(&acme(), "rows", &ops, None).await?;
                latency.borrow_mut()[in_window]
                    .saturating_record(began.elapsed().as_micros() as u64);
                commits.set(commits.get() + 1);
            }
            Ok::<(), oc_engine::EngineError>(())
        }));
    }
    // A progress line per second, so a long phase shows it is alive.
    let mut last = (Instant::now(), commits.get());
    while !done() {
        glommio::timer::sleep(Duration::from_millis(100)).await;
        if last.0.elapsed() < Duration::from_secs(1) {
            continue;
        }
        let now = (Instant::now(), commits.get());
        let rate = (now.1 - last.1) as f64 / now.0.duration_since(last.0).as_secs_f64();
        eprintln!(
            "  [{writers:>4} writers x {rows_per_batch} rows] {rate:>9.0} commits/s, p99 so far {} µs",
            latency.borrow()[window.get()].value_at_quantile(0.99)
        );
        last = now;
    }
    stop.set(true);
    for t in tasks {
        t.await?;
    }
    let latency = latency.borrow().clone();
    Ok((commits.get(), started.elapsed(), latency))
}

/// What the checkpoint phase measured, per window ([`QUIET`], [`CHECKPOINTING`]).
struct CheckpointWindows {
    latency: [Histogram<u64>; 2],
    /// The log's append → durable and group-write histograms over each kind of window.
    wal_fsync_lag: [Option<Histogram<u64>>; 2],
    wal_group_write: [Option<Histogram<u64>>; 2],
    windows: u64,
    checkpoints: u64,
    last: Option<oc_engine::checkpoint::CheckpointInfo>,
}

/// Checkpoints run back to back for at least this long, then none for as long again.
const CHECKPOINT_WINDOW: Duration = Duration::from_secs(1);

/// The windows of [`checkpoint_windows`], all but the writers' latency.
async fn alternate_windows(
    shard: &Rc<Shard<DmaStorage>>,
    window: &Cell<usize>,
    phase: Duration,
) -> Result<CheckpointWindows, oc_engine::EngineError> {
    let mut lag: [Option<Histogram<u64>>; 2] = [None, None];
    let mut write: [Option<Histogram<u64>>; 2] = [None, None];
    let (mut windows, mut checkpoints, mut last, mut quiet_so_far) = (0, 0, None, Duration::ZERO);
    let mut record = |kind: usize, before: &oc_io::WalStats, after: oc_io::WalStats| {
        for (sum, after, before) in [
            (&mut lag[kind], after.fsync_lag_us, &before.fsync_lag_us),
            (
                &mut write[kind],
                after.group_write_us,
                &before.group_write_us,
            ),
        ] {
            let mut h = after;
            // The log's histograms only grow, and keep their bounds.
            h.subtract(before)
                .expect("a later copy of the same histogram");
            match sum {
                Some(sum) => sum.add(&h).expect("histograms of one log"),
                None => *sum = Some(h),
            }
        }
    };
    while quiet_so_far < phase {
        let before = shard.wal().stats();
        window.set(CHECKPOINTING);
        let began = Instant::now();
        while began.elapsed() < CHECKPOINT_WINDOW {
            last = Some(shard.checkpoint().await?);
            shard.release_covered_wal().await?;
            checkpoints += 1;
        }
        let busy = began.elapsed();
        record(CHECKPOINTING, &before, shard.wal().stats());
        let before = shard.wal().stats();
        window.set(QUIET);
        glommio::timer::sleep(busy).await;
        record(QUIET, &before, shard.wal().stats());
        quiet_so_far += busy;
        windows += 1;
    }
    Ok(CheckpointWindows {
        latency: [histogram(), histogram()],
        wal_fsync_lag: lag,
        wal_group_write: write,
        windows,
        checkpoints,
        last,
    })
}

/// 64 single-row writers over the preloaded table, in alternating windows until the
/// quiet ones add up to `phase`: checkpoints back to back for at least
/// [`CHECKPOINT_WINDOW`] (whole checkpoints), then as long without, so that whatever
/// the host does over the run falls on both kinds of window alike.
async fn checkpoint_windows(
    shard: &Rc<Shard<DmaStorage>>,
    phase: Duration,
) -> Result<CheckpointWindows> {
    let window = Rc::new(Cell::new(QUIET));
    let finished = Rc::new(Cell::new(false));
    let controller = {
        let (shard, window, finished) = (shard.clone(), window.clone(), finished.clone());
        glommio::spawn_local(async move {
            let windows = alternate_windows(&shard, &window, phase).await;
            // Also when a checkpoint failed: the writers stop, and the error is reported.
            finished.set(true);
            windows
        })
    };
    let (_, _, latency) =
        windowed_load(shard, 64, 1, PRELOAD_ROWS, window, || finished.get()).await?;
    Ok(CheckpointWindows {
        latency,
        ..controller.await?
    })
}

/// [`write_load`], with where the phase's writes spent their time.
async fn timed_load(
    shard: &Rc<Shard<DmaStorage>>,
    writers: usize,
    rows_per_batch: usize,
    key_space: u64,
    duration: Duration,
) -> Result<(u64, Duration, Histogram<u64>, PhaseTimes)> {
    // The shard runs on this thread: its stage timings are this thread's.
    let stages_before = oc_engine::stages::snapshot();
    let wal_before = shard.wal().stats();
    let cpu_before = thread_cpu_time();
    let (commits, elapsed, latency) =
        write_load(shard, writers, rows_per_batch, key_space, duration).await?;
    let cpu = thread_cpu_time()
        .zip(cpu_before)
        .map(|(after, before)| after.saturating_sub(before));
    let stages =
        crate::http::stage_times_in_process(&stages_before, &oc_engine::stages::snapshot());
    let wal_after = shard.wal().stats();
    let in_phase = |after: &Histogram<u64>, before: &Histogram<u64>| {
        let mut h = after.clone();
        h.subtract(before).ok().map(|()| h)
    };
    let phase_p99 = |after: &Histogram<u64>, before: &Histogram<u64>| {
        in_phase(after, before).map(|h| h.value_at_quantile(0.99))
    };
    let groups = wal_after.groups.saturating_sub(wal_before.groups);
    let times = PhaseTimes {
        stages,
        wal_fsync_lag_p99_us: phase_p99(&wal_after.fsync_lag_us, &wal_before.fsync_lag_us),
        wal_group_write_p99_us: phase_p99(&wal_after.group_write_us, &wal_before.group_write_us),
        wal_mean_group_bytes: (wal_after
            .bytes_written
            .saturating_sub(wal_before.bytes_written))
        .checked_div(groups),
        wal_spares: Some([
            wal_after
                .spares_zero_filled
                .saturating_sub(wal_before.spares_zero_filled),
            wal_after
                .spares_preallocated
                .saturating_sub(wal_before.spares_preallocated),
            wal_after
                .spares_recycled
                .saturating_sub(wal_before.spares_recycled),
        ]),
        wal_frames_per_group: (groups > 0)
            .then(|| wal_after.appends.saturating_sub(wal_before.appends) as f64 / groups as f64),
        wal_group_write_mean_us: in_phase(&wal_after.group_write_us, &wal_before.group_write_us)
            .filter(|h| !h.is_empty())
            .map(|h| h.mean()),
        shard_cpu_busy: cpu.map(|cpu| cpu.as_secs_f64() / elapsed.as_secs_f64()),
    };
    Ok((commits, elapsed, latency, times))
}

/// User and system time of the calling thread so far (None if the kernel refuses).
fn thread_cpu_time() -> Option<Duration> {
    // SAFETY: `getrusage` fills the zeroed struct it is given and reads nothing else.
    let (rc, usage) = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        let rc = libc::getrusage(libc::RUSAGE_THREAD, &mut usage);
        (rc, usage)
    };
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    (rc == 0).then(|| time(usage.ru_utime) + time(usage.ru_stime))
}

pub(crate) fn dir_bytes(dir: &Path, suffix: &str) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(suffix))
                .filter_map(|e| e.metadata().ok().map(|m| m.len()))
                .sum()
        })
        .unwrap_or(0)
}

/// Bytes of the WAL record payload one single-row upsert produces.
fn record_bytes_of_one_row() -> Result<usize> {
    let table = oc_engine::Table::new(rows_schema()?, 1);
    let writes = table.validate_batch(&[row(1)])?;
    let command = oc_engine::command::Command::Write {
        table: "rows".into(),
        table_version: 1,
        writes,
        idempotency_key: None,
    };
    Ok(oc_engine::record::encode(&command).1.len())
}

pub fn run(args: EngineArgs) -> Result<()> {
    std::fs::create_dir_all(&args.common.dir)
        .with_context(|| format!("creating {}", args.common.dir.display()))?;
    let phase = Duration::from_secs_f64(args.common.seconds);
    let warmup = Duration::from_millis(500);
    let base = args.common.dir.clone();
    let concurrency = args.concurrency.clone();
    let pool_shards = args
        .shards
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // Every shard of a pool, writers on the shards, local and across the mesh.
    let mut pool = Vec::new();
    let routings = if args.checkpoint_only {
        &[][..]
    } else {
        &[crate::pool::Routing::Local, crate::pool::Routing::Forwarded][..]
    };
    for &routing in routings {
        for &c in &concurrency {
            let r = crate::pool::pool_phase(
                &base.join("pool"),
                crate::pool::PoolSetup {
                    shards: pool_shards,
                    pin_to_cores: !args.no_pin,
                    shape: crate::pool::RowShape::IntKey,
                },
                routing,
                c,
                warmup,
                phase,
            )?;
            eprintln!(
                "pool of {pool_shards} shards, {routing:?}, {c} writers: {:.0} commits/s, p99 {} µs",
                r.commits_per_s, r.commit_p99_us
            );
            pool.push(r);
        }
    }

    let report = oc_io::executor::run_local(async move {
        // The WAL alone, same record size and concurrency, same run: the baseline.
        let record_bytes = record_bytes_of_one_row()?;
        let mut wal_rates = Vec::new();
        let concurrency = if args.checkpoint_only {
            Vec::new()
        } else {
            concurrency
        };
        for &c in &concurrency {
            let r = crate::wal::wal_phase(
                &base,
                crate::wal::Mode::Fresh,
                c,
                record_bytes,
                warmup,
                phase,
                None,
            )
            .await?;
            let rate = r.appends as f64 / r.elapsed.as_secs_f64();
            eprintln!("WAL alone, {c} appenders of {record_bytes} B: {rate:.0} appends/s");
            wal_rates.push(rate);
        }
        let mut writes = Vec::new();
        for &rows_per_batch in &[1usize, 100] {
            for (&c, &wal_rate) in concurrency.iter().zip(&wal_rates) {
                let shard = fresh_shard(&base.join("writes")).await?;
                write_load(&shard, c, rows_per_batch, 1 << 40, warmup).await?;
                let (commits, elapsed, lat, times) =
                    timed_load(&shard, c, rows_per_batch, 1 << 40, phase).await?;
                shard.close().await?;
                let p = Percentiles::of(&lat);
                let commits_per_s = commits as f64 / elapsed.as_secs_f64();
                eprintln!(
                    "upserts, {c} writers x {rows_per_batch} rows: {commits_per_s:.0} commits/s, p99 {} µs",
                    p.p99_us
                );
                writes.push(WriteResult {
                    concurrency: c,
                    rows_per_batch,
                    commits_per_s,
                    wal_appends_per_s: wal_rate,
                    ratio_to_wal: commits_per_s / wal_rate,
                    rows_per_s: commits_per_s * rows_per_batch as f64,
                    commit_p50_us: p.p50_us,
                    commit_p99_us: p.p99_us,
                    commit_p999_us: p.p999_us,
                    times,
                });
            }
        }

        // Latency with and without checkpoints, over a preloaded table.
        let dir = base.join("checkpoint");
        let shard = fresh_shard(&dir).await?;
        let mut id = 0;
        while id < PRELOAD_ROWS {
            let ops: Vec<WriteOp> = (id..(id + 500).min(PRELOAD_ROWS)).map(row).collect();
            shard.write(&acme(), "rows", &ops, None).await?;
            id += 500;
        }
        write_load(&shard, 64, 1, PRELOAD_ROWS, warmup).await?;
        let windows = checkpoint_windows(&shard, phase).await?;
        // The phase ends without checkpoints: one more, so the load below replays a short
        // log after it, as it did when the phase ended with them.
        shard.checkpoint().await?;
        shard.release_covered_wal().await?;
        let [quiet, busy] = &windows.latency;
        let last = windows
            .last
            .as_ref()
            .context("at least one checkpoint ran")?;
        eprintln!(
            "64 writers: p99 {} µs without checkpoints, {} µs with {} checkpoints of {:.1} MB ({:.2} s each), in {} windows of each",
            quiet.value_at_quantile(0.99),
            busy.value_at_quantile(0.99),
            windows.checkpoints,
            last.data_bytes as f64 / 1e6,
            last.duration.as_secs_f64(),
            windows.windows
        );
        let p99 = |h: &Option<Histogram<u64>>| h.as_ref().map(|h| h.value_at_quantile(0.99));
        let times = |kind: usize| PhaseTimes {
            stages: Vec::new(),
            wal_fsync_lag_p99_us: p99(&windows.wal_fsync_lag[kind]),
            wal_group_write_p99_us: p99(&windows.wal_group_write[kind]),
            ..PhaseTimes::default()
        };
        shard.close().await?;
        drop(shard);

        // Checkpoint load: reopen with the checkpoint and a short log after it.
        let checkpoint_bytes = dir_bytes(&dir, ".snap") / 2; // two are kept: the newest is read
        let started = Instant::now();
        let (shard, opened) =
            Shard::open(DmaStorage::open(&dir).await?, WalConfig::default()).await?;
        let load_s = started.elapsed().as_secs_f64();
        let shard = Rc::new(shard);
        let (commits, elapsed, latency) =
            write_load(&shard, 64, 1, PRELOAD_ROWS, AFTER_REOPEN).await?;
        let after_reopen = AfterReopen {
            segments_not_read: opened.wal.segments_not_read,
            commits_per_s: commits as f64 / elapsed.as_secs_f64(),
            commit_p99_us: latency.value_at_quantile(0.99),
        };
        eprintln!(
            "64 writers after the reopening, while it checks the {} segments its open did not read: p99 {} µs",
            after_reopen.segments_not_read, after_reopen.commit_p99_us
        );
        shard.close().await?;
        drop(shard);

        eprintln!(
            "loaded a {:.1} MB checkpoint in {load_s:.2} s",
            checkpoint_bytes as f64 / 1e6
        );
        // Log replay without a checkpoint: the write phases' log.
        let mut replayed = None;
        if !writes.is_empty() {
            let wal_dir = base.join("writes");
            let started = Instant::now();
            let (shard, report) =
                Shard::open(DmaStorage::open(&wal_dir).await?, WalConfig::default()).await?;
            let replay_s = started.elapsed().as_secs_f64();
            shard.close().await?;
            let replayed_mb = report.wal.bytes_scanned as f64 / 1e6;
            eprintln!(
                "replayed {replayed_mb:.0} MB of log ({} frames) in {replay_s:.2} s",
                report.wal.frames_replayed
            );
            replayed = Some((replayed_mb, replay_s));
        }
        Ok::<_, anyhow::Error>(EngineReport {
            pinning: crate::pinning::current(),
            shards: 1,
            seconds_per_phase: phase.as_secs_f64(),
            writes,
            pool,
            no_checkpoint_p99_us: quiet.value_at_quantile(0.99),
            during_checkpoint_p99_us: busy.value_at_quantile(0.99),
            no_checkpoint_times: times(QUIET),
            during_checkpoint_times: times(CHECKPOINTING),
            checkpoint_windows: windows.windows,
            checkpoints_during_phase: windows.checkpoints,
            checkpoint_bytes: last.data_bytes,
            checkpoint_seconds: last.duration.as_secs_f64(),
            wal_replay_mb_s: replayed.map(|(mb, s)| mb / s),
            wal_replayed_mb: replayed.map(|(mb, _)| mb),
            checkpoint_load_mb_s: checkpoint_bytes as f64 / 1e6 / load_s,
            after_reopen: Some(after_reopen),
        })
    })?;
    crate::report::write_outputs(
        &report,
        args.common.json.as_deref(),
        markdown(&report),
        svgs(&report),
    )
}

pub(crate) fn markdown(r: &EngineReport) -> String {
    let mut out = format!(
        "{} shard, {} s per phase.\n\n",
        r.shards, r.seconds_per_phase
    );
    if !r.writes.is_empty() {
        out += "| upserts | commits/s | × WAL appends/s | rows/s | p50 µs | p99 µs | p999 µs |\n|---|---:|---:|---:|---:|---:|---:|\n";
    }
    for w in &r.writes {
        out += &format!(
            "| {} writers × {} row(s) | {:.0} | {} | {:.0} | {} | {} | {} |\n",
            w.concurrency,
            w.rows_per_batch,
            w.commits_per_s,
            // The baseline appends one row-sized record: only single-row commits compare.
            if w.rows_per_batch == 1 {
                format!("{:.2}", w.ratio_to_wal)
            } else {
                "—".to_string()
            },
            w.rows_per_s,
            w.commit_p50_us,
            w.commit_p99_us,
            w.commit_p999_us
        );
    }
    out += "\nWhere a write's time went on the shard (one in 8 timed; mean / p99 µs, the \
            p99 interpolated inside buckets of 10 µs to 10 s), and the log's own p99s over \
            the phase, its mean group and the spares it made (zero-filled / preallocated / \
            recycled), its frames per group and mean group write, and the share of the \
            phase the shard's thread was on a CPU:\n\n| upserts | admit | log_submit | durable | apply | wake | log: fsync lag p99 | log: group write p99 | log: mean group KiB | log: spares | log: frames per group | log: group write mean µs | shard busy |\n|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n";
    let stage_row = |label: String, t: &PhaseTimes| {
        let stage = |name: &str| {
            t.stages
                .iter()
                .find(|s| s.stage == name)
                .map_or("—".to_string(), |s| {
                    format!("{:.0} / {:.0}", s.mean_us, s.p99_us)
                })
        };
        let or_dash = |us: Option<u64>| us.map_or("—".to_string(), |us| us.to_string());
        let or_dash_f = |x: Option<f64>, digits: usize| {
            x.map_or("—".to_string(), |x| format!("{x:.digits$}"))
        };
        format!(
            "| {label} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            stage("admit"),
            stage("log_submit"),
            stage("durable"),
            stage("apply"),
            stage("wake"),
            or_dash(t.wal_fsync_lag_p99_us),
            or_dash(t.wal_group_write_p99_us),
            or_dash(t.wal_mean_group_bytes.map(|b| b >> 10)),
            t.wal_spares
                .map_or("—".to_string(), |[z, p, r]| format!("{z} / {p} / {r}")),
            or_dash_f(t.wal_frames_per_group, 1),
            or_dash_f(t.wal_group_write_mean_us, 0),
            or_dash_f(t.shard_cpu_busy, 2),
        )
    };
    for w in r.writes.iter().filter(|w| !w.times.stages.is_empty()) {
        out += &stage_row(
            format!("{} writers × {} row(s)", w.concurrency, w.rows_per_batch),
            &w.times,
        );
    }
    for (label, t) in [
        ("64 writers, no checkpoint", &r.no_checkpoint_times),
        (
            "64 writers, checkpoints back to back",
            &r.during_checkpoint_times,
        ),
    ] {
        if t.wal_fsync_lag_p99_us.is_some() {
            out += &stage_row(label.to_string(), t);
        }
    }
    if !r.pool.is_empty() {
        out += "\n| pool, single-row upserts | commits/s | × 1 shard | p50 µs | p99 µs | p999 µs | refused |\n|---|---:|---:|---:|---:|---:|---:|\n";
    }
    for p in &r.pool {
        let one_shard = r
            .writes
            .iter()
            .find(|w| w.rows_per_batch == 1 && w.concurrency == p.concurrency)
            .map_or(f64::NAN, |w| p.commits_per_s / w.commits_per_s);
        out += &format!(
            "| {} shards, {:?}, {} writers | {:.0} | {:.2} | {} | {} | {} | {} |\n",
            p.shards,
            p.routing,
            p.concurrency,
            p.commits_per_s,
            one_shard,
            p.commit_p50_us,
            p.commit_p99_us,
            p.commit_p999_us,
            p.overloaded
        );
    }
    out += &format!(
        "\n| 64 writers, single-row upserts | p99 µs |\n|---|---:|\n| no checkpoint | {} |\n| checkpoints back to back ({} × {:.1} MB, {:.2} s each) | {} |\n",
        r.no_checkpoint_p99_us,
        r.checkpoints_during_phase,
        r.checkpoint_bytes as f64 / 1e6,
        r.checkpoint_seconds,
        r.during_checkpoint_p99_us
    );
    out += "\n| recovery | MB/s |\n|---|---:|\n";
    if let (Some(mb), Some(mb_s)) = (r.wal_replayed_mb, r.wal_replay_mb_s) {
        out += &format!("| log replay ({mb:.0} MB) | {mb_s:.0} |\n");
    }
    out += &format!("| checkpoint load | {:.0} |\n", r.checkpoint_load_mb_s);
    if let Some(a) = &r.after_reopen {
        out += &format!(
            "\n64 writers right after that reopening, while the shard checks the {} log segments its open did not read: {:.0} commits/s, p99 {} µs.\n",
            a.segments_not_read, a.commits_per_s, a.commit_p99_us
        );
    }
    out
}

/// Charts: single-row commits/s and p99 per writer count, one shard against the pool.
pub(crate) fn svgs(r: &EngineReport) -> Vec<(String, String)> {
    use crate::pool::Routing;
    use crate::report::{bar_chart, Bars};
    let single: Vec<&WriteResult> = r.writes.iter().filter(|w| w.rows_per_batch == 1).collect();
    if single.is_empty() {
        return Vec::new(); // `--checkpoint-only`: nothing to chart
    }
    let groups: Vec<String> = single
        .iter()
        .map(|w| format!("{} writers", w.concurrency))
        .collect();
    let pool =
        |routing: Routing, f: &dyn Fn(&crate::pool::PoolResult) -> f64| -> Vec<Option<f64>> {
            single
                .iter()
                .map(|w| {
                    r.pool
                        .iter()
                        .find(|p| p.routing == routing && p.concurrency == w.concurrency)
                        .map(f)
                })
                .collect()
        };
    let shards = r.pool.first().map_or(0, |p| p.shards);
    vec![
        (
            "commits".to_string(),
            bar_chart(&Bars {
                title: "Durable single-row upserts per second".into(),
                y_label: "commits/s".into(),
                groups: groups.clone(),
                series: vec![
                    (
                        "WAL alone (1 log)".into(),
                        single.iter().map(|w| Some(w.wal_appends_per_s)).collect(),
                    ),
                    (
                        "1 shard".into(),
                        single.iter().map(|w| Some(w.commits_per_s)).collect(),
                    ),
                    (
                        format!("{shards} shards, local"),
                        pool(Routing::Local, &|p| p.commits_per_s),
                    ),
                    (
                        format!("{shards} shards, forwarded"),
                        pool(Routing::Forwarded, &|p| p.commits_per_s),
                    ),
                ],
            }),
        ),
        (
            "p99".to_string(),
            bar_chart(&Bars {
                title: "Commit latency p99".into(),
                y_label: "µs".into(),
                groups,
                series: vec![
                    (
                        "1 shard".into(),
                        single
                            .iter()
                            .map(|w| Some(w.commit_p99_us as f64))
                            .collect(),
                    ),
                    (
                        format!("{shards} shards, local"),
                        pool(Routing::Local, &|p| p.commit_p99_us as f64),
                    ),
                    (
                        format!("{shards} shards, forwarded"),
                        pool(Routing::Forwarded, &|p| p.commit_p99_us as f64),
                    ),
                ],
            }),
        ),
    ]
}
