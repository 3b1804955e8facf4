//! `oc-bench wal`: the write-ahead log against the raw disk, in one run.
//!
//! Phases (each `--seconds` long, after a short warm-up that is not counted):
//! 1. raw sequential 1 MiB O_DIRECT writes, queue depth 1 and 8;
//! 2. raw 1 MiB and 4 KiB write + fdatasync, one at a time (linked in one submission);
//! 3. WAL large-record appends (256 KiB records, 8 appenders: every group ~1 MiB);
//! 4. WAL durable 256-byte appends at each concurrency.

use std::cell::{Cell, RefCell};
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use oc_io::{DmaStorage, Lsn, RecordKind, Wal, WalConfig};
use serde::{Deserialize, Serialize};

use crate::latency::{histogram, Percentiles};
use crate::raw_disk;

const KIND: RecordKind = RecordKind(1);
const RAW_FILE_BYTES: u64 = 512 << 20;
const SMALL_RECORD_BYTES: usize = 256;
const LARGE_RECORD_BYTES: usize = 256 * 1024 - 64;
const LARGE_RECORD_WRITERS: usize = 8;

#[derive(clap::Args)]
pub struct WalArgs {
    #[command(flatten)]
    pub(crate) common: crate::RunArgs,
    /// Appender concurrencies for the small-record phase.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    pub(crate) concurrency: Vec<usize>,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct ConcurrencyResult {
    concurrency: usize,
    appends_per_s: f64,
    lag_p50_us: u64,
    lag_p99_us: u64,
    lag_p999_us: u64,
    lag_max_us: u64,
    frames_per_group: f64,
    /// appends/s divided by the raw disk's write+fdatasync/s.
    ratio_to_raw_fsync: f64,
    /// One appender only: the raw 4 KiB write + fdatasync/s measured around and between
    /// the phase's slices, in order ([`BASELINE_SLICES`]; right before and right after
    /// the whole phase until the night of 2026-12-06; absent before 2026-12-06, and at
    /// other concurrencies).
    #[serde(default)]
    raw_fsync_around_per_s: Option<Vec<f64>>,
    /// appends/s divided by the mean of `raw_fsync_around_per_s`.
    #[serde(default)]
    ratio_to_raw_fsync_around: Option<f64>,
    /// New segments prepared during the measured phase, and how.
    spares: SpareCounts,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct WalReport {
    machine: Machine,
    seconds_per_phase: f64,
    raw_seq_mb_s: f64,
    raw_seq_qd1_mb_s: f64,
    /// 1 MiB O_DIRECT write + fdatasync, one at a time: the ceiling for durable
    /// sequential appends on this disk.
    raw_durable_seq_mb_s: f64,
    raw_fsync_per_s: f64,
    raw_fsync_p50_us: u64,
    raw_fsync_p99_us: u64,
    raw_fsync_p999_us: u64,
    /// Fresh log: 256 KiB records, 8 appenders.
    wal_seq_mb_s: f64,
    /// Raw durable MB/s measured again around and between the slices of the fresh log's
    /// 256 KiB-record phase, in order ([`BASELINE_SLICES`]); their mean is that phase's
    /// baseline. Before the night of 2026-12-06 two figures, right before and right
    /// after the whole phase; absent before 2026-12-05.
    #[serde(default)]
    raw_durable_around_fresh_mb_s: Option<Vec<f64>>,
    /// Fresh log: nothing released, new segments zero-filled during the run.
    small_appends: Vec<ConcurrencyResult>,
    fresh_wal_seq_spares: SpareCounts,
    /// Segments released as soon as possible and recycled.
    steady_state: SteadyReport,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct SteadyReport {
    wal_seq_mb_s: f64,
    /// As `raw_durable_around_fresh_mb_s`, around and between this phase's slices.
    #[serde(default)]
    raw_durable_around_mb_s: Option<Vec<f64>>,
    wal_seq_spares: SpareCounts,
    small_appends: Vec<ConcurrencyResult>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Machine {
    pub(crate) cores: usize,
    pub(crate) kernel: String,
    pub(crate) file_system: String,
    /// `--server-cpus` and `--client-cpus`, as given.
    #[serde(default)]
    pub(crate) pinning: crate::pinning::Pinning,
}

pub(crate) fn machine(dir: &Path) -> Machine {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    Machine {
        // The machine's, not this process's (`--client-cpus` narrows that).
        // SAFETY: sysconf only reads a system value.
        cores: usize::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) })
            .unwrap_or(1)
            .max(1),
        kernel,
        file_system: file_system_of(dir),
        pinning: crate::pinning::current(),
    }
}

/// The file system type of the mount holding `dir`, from /proc/self/mounts.
fn file_system_of(dir: &Path) -> String {
    let Ok(dir) = dir.canonicalize() else {
        return "unknown".into();
    };
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, point, fs) = (f.next()?, f.next()?, f.next()?);
            dir.starts_with(point)
                .then(|| (point.len(), fs.to_string()))
        })
        .max()
        .map_or_else(|| "unknown".into(), |(_, fs)| fs)
}

pub fn run(args: WalArgs) -> Result<()> {
    std::fs::create_dir_all(&args.common.dir)
        .with_context(|| format!("creating {}", args.common.dir.display()))?;
    let phase = Duration::from_secs_f64(args.common.seconds);
    let warmup = Duration::from_millis(500);

    eprintln!("raw disk: zero-filling a {} MiB file", RAW_FILE_BYTES >> 20);
    let raw_path = args.common.dir.join("raw-baseline.dat");
    // Kept until the last WAL phase's baseline, and removed however the run ends.
    let _remove_raw = RemovedOnDrop(raw_path.clone());
    let raw = raw_disk::zero_filled_file(&raw_path, RAW_FILE_BYTES)?;
    raw_disk::sequential_write_mb_s(&raw, RAW_FILE_BYTES, 1 << 20, 8, warmup)?;
    let raw_seq_mb_s = raw_disk::sequential_write_mb_s(&raw, RAW_FILE_BYTES, 1 << 20, 8, phase)?;
    eprintln!("raw sequential 1 MiB, depth 8: {raw_seq_mb_s:.0} MB/s");
    let raw_seq_qd1_mb_s =
        raw_disk::sequential_write_mb_s(&raw, RAW_FILE_BYTES, 1 << 20, 1, phase)?;
    eprintln!("raw sequential 1 MiB, depth 1: {raw_seq_qd1_mb_s:.0} MB/s");
    raw_disk::write_fdatasync(&raw, RAW_FILE_BYTES, 4096, warmup)?;
    let (raw_fsync_per_s, raw_hist) = raw_disk::write_fdatasync(&raw, RAW_FILE_BYTES, 4096, phase)?;
    let raw_fsync = Percentiles::of(&raw_hist);
    eprintln!(
        "raw 4 KiB write+fdatasync: {raw_fsync_per_s:.0}/s, p50 {} µs, p99 {} µs, p999 {} µs",
        raw_fsync.p50_us, raw_fsync.p99_us, raw_fsync.p999_us
    );
    // This disk's durable bandwidth drifts by a third between minutes, so the
    // 256 KiB-record phases are compared with it measured around and between their
    // slices (blocking the executor meanwhile: nothing else runs on it then).
    let raw_durable_mb_s = |length: Duration| -> Result<f64> {
        let (per_s, _) = raw_disk::write_fdatasync(&raw, RAW_FILE_BYTES, 1 << 20, length)?;
        Ok(per_s * (1 << 20) as f64 / 1e6)
    };
    let raw_durable_seq_mb_s = raw_durable_mb_s(phase)?;
    eprintln!("raw 1 MiB write+fdatasync: {raw_durable_seq_mb_s:.0} MB/s");
    // The one-appender phases' baseline, measured around each of them for the same reason.
    let raw_fsync_per_s_now = |length: Duration| -> Result<f64> {
        Ok(raw_disk::write_fdatasync(&raw, RAW_FILE_BYTES, 4096, length)?.0)
    };

    let dir = args.common.dir.clone();
    let concurrency = args.concurrency.clone();
    let modes = oc_io::executor::run_local(async {
        let mut modes = Vec::new();
        for mode in [Mode::Fresh, Mode::Steady] {
            eprintln!("WAL, {}:", mode.describe());
            let seq = wal_phase(
                &dir,
                mode,
                LARGE_RECORD_WRITERS,
                LARGE_RECORD_BYTES,
                warmup,
                phase,
                Some(&raw_durable_mb_s),
            )
            .await?;
            let raw_around = seq.baseline_around.expect("measured when asked for");
            eprintln!(
                "  raw 1 MiB write+fdatasync around and between its slices: {} MB/s",
                rates(&raw_around)
            );
            let wal_seq_mb_s =
                seq.appends as f64 * LARGE_RECORD_BYTES as f64 / seq.elapsed.as_secs_f64() / 1e6;
            // Where a group's period goes: the log's writing of it (stamping and the
            // durable write, `group_write_us`), or what happens between groups.
            let groups_per_s =
                seq.appends as f64 / seq.frames_per_group / seq.elapsed.as_secs_f64();
            eprintln!(
                "  {} KiB records: {wal_seq_mb_s:.0} MB/s; {:.1} frames/group, a group every {:.0} µs, its write {:.0} µs (mean); spares zero-filled / preallocated / recycled {} / {} / {}",
                LARGE_RECORD_BYTES >> 10,
                seq.frames_per_group,
                1e6 / groups_per_s,
                seq.group_write_mean_us,
                seq.spares.zero_filled,
                seq.spares.preallocated,
                seq.spares.recycled,
            );
            let mut small = Vec::new();
            for &c in &concurrency {
                let baseline =
                    (c == 1).then_some(&raw_fsync_per_s_now as &dyn Fn(Duration) -> Result<f64>);
                let r =
                    wal_phase(&dir, mode, c, SMALL_RECORD_BYTES, warmup, phase, baseline).await?;
                if let Some(around) = &r.baseline_around {
                    eprintln!(
                        "  raw 4 KiB write+fdatasync around and between its slices: {}/s",
                        rates(around)
                    );
                }
                small.push((c, r));
            }
            modes.push((mode, wal_seq_mb_s, raw_around, seq.spares, small));
        }
        Ok::<_, anyhow::Error>(modes)
    })?;
    drop(raw);

    let mut reports =
        modes.into_iter().map(
            |(_, wal_seq_mb_s, raw_around, seq_spares, small)| ModeReport {
                wal_seq_mb_s,
                raw_around,
                wal_seq_spares: seq_spares,
                small_appends: small
                    .into_iter()
                    .map(|(c, r)| {
                        let lag = Percentiles::of(&r.latency);
                        let appends_per_s = r.appends as f64 / r.elapsed.as_secs_f64();
                        let raw_around = r.baseline_around;
                        ConcurrencyResult {
                            concurrency: c,
                            appends_per_s,
                            lag_p50_us: lag.p50_us,
                            lag_p99_us: lag.p99_us,
                            lag_p999_us: lag.p999_us,
                            lag_max_us: lag.max_us,
                            frames_per_group: r.frames_per_group,
                            ratio_to_raw_fsync: appends_per_s / raw_fsync_per_s,
                            ratio_to_raw_fsync_around: raw_around
                                .as_deref()
                                .map(|around| appends_per_s / mean(around)),
                            raw_fsync_around_per_s: raw_around,
                            spares: r.spares,
                        }
                    })
                    .collect(),
            },
        );
    let fresh = reports.next().expect("fresh mode ran");
    let steady = reports.next().expect("steady mode ran");
    let report = WalReport {
        machine: machine(&args.common.dir),
        seconds_per_phase: args.common.seconds,
        raw_seq_mb_s,
        raw_seq_qd1_mb_s,
        raw_durable_seq_mb_s,
        raw_fsync_per_s,
        raw_fsync_p50_us: raw_fsync.p50_us,
        raw_fsync_p99_us: raw_fsync.p99_us,
        raw_fsync_p999_us: raw_fsync.p999_us,
        wal_seq_mb_s: fresh.wal_seq_mb_s,
        raw_durable_around_fresh_mb_s: Some(fresh.raw_around),
        small_appends: fresh.small_appends,
        steady_state: SteadyReport {
            wal_seq_mb_s: steady.wal_seq_mb_s,
            raw_durable_around_mb_s: Some(steady.raw_around),
            wal_seq_spares: steady.wal_seq_spares,
            small_appends: steady.small_appends,
        },
        fresh_wal_seq_spares: fresh.wal_seq_spares,
    };
    crate::report::write_outputs(
        &report,
        args.common.json.as_deref(),
        markdown(&report),
        svgs(&report),
    )
}

/// A scratch file, removed when this is dropped.
struct RemovedOnDrop(std::path::PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("removing {}: {e}", self.0.display());
            }
        }
    }
}

/// How segments are provided during a WAL phase.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Nothing is released: every new segment is zero-filled while the log runs.
    Fresh,
    /// Segments are released as soon as the next one starts (as checkpoints that keep
    /// up would), so new segments are recycled; measured once one has been recycled.
    Steady,
}

impl Mode {
    fn describe(self) -> &'static str {
        match self {
            Mode::Fresh => "fresh log (new segments zero-filled)",
            Mode::Steady => "steady state (released segments recycled)",
        }
    }
}

/// Spares made during a measured phase.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub(crate) struct SpareCounts {
    zero_filled: u64,
    /// Left unwritten, after a segment of large groups (absent in older results).
    #[serde(default)]
    preallocated: u64,
    recycled: u64,
    /// Rotations that waited for the spare (absent in older results).
    #[serde(default)]
    waited: u64,
}

pub(crate) struct ModeReport {
    wal_seq_mb_s: f64,
    raw_around: Vec<f64>,
    wal_seq_spares: SpareCounts,
    small_appends: Vec<ConcurrencyResult>,
}

pub(crate) struct PhaseResult {
    pub(crate) appends: u64,
    pub(crate) elapsed: Duration,
    latency: Histogram<u64>,
    frames_per_group: f64,
    /// Mean time the log took to write a group: stamping and the durable write (its
    /// `group_write_us`).
    group_write_mean_us: f64,
    spares: SpareCounts,
    /// The baseline [`wal_phase`] was given, measured before each slice of the
    /// measured load and after the last, in order.
    baseline_around: Option<Vec<f64>>,
}

/// A phase with a baseline runs its measured load in this many slices, the baseline
/// measured before each and after the last. This disk's durable rate moved by a third
/// between the two ends of a steady-state phase (BENCHMARKS.md, "The stamping's CRCs
/// moved to the appenders, tried"): slices measure the baseline in the seconds between
/// the load's own, not only at its two ends.
const BASELINE_SLICES: u32 = 5;

fn mean(rates: &[f64]) -> f64 {
    rates.iter().sum::<f64>() / rates.len().max(1) as f64
}

/// Rates for a log line: "a, b, c (mean m)".
fn rates(rates: &[f64]) -> String {
    let each: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
    format!("{} (mean {:.0})", each.join(", "), mean(rates))
}

/// Longest warm-up of the steady mode while waiting for a segment to be recycled.
const STEADY_WARMUP_LIMIT: Duration = Duration::from_secs(20);
/// How often the steady mode releases segments (as a checkpointer would).
const RELEASE_INTERVAL: Duration = Duration::from_millis(20);

/// Runs `writers` tasks appending `record_bytes` records to a fresh WAL under `base`.
pub(crate) async fn wal_phase(
    base: &Path,
    mode: Mode,
    writers: usize,
    record_bytes: usize,
    warmup: Duration,
    phase: Duration,
    baseline: Option<&dyn Fn(Duration) -> Result<f64>>,
) -> Result<PhaseResult> {
    let dir = base.join(format!("wal-{writers}-{record_bytes}"));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let storage = DmaStorage::open(&dir).await?;
    let (wal, _) = Wal::open(storage, WalConfig::default(), Lsn(1), |_| Ok(())).await?;
    let wal = Rc::new(wal);
    let releaser = (mode == Mode::Steady).then(|| {
        let wal = wal.clone();
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(RELEASE_INTERVAL).await;
                if let Err(e) = wal.release_before(wal.durable_lsn()).await {
                    eprintln!("  releasing segments failed: {e}");
                    return;
                }
            }
        })
    });
    let payload: Rc<[u8]> = vec![0xC3; record_bytes].into();
    let load = Load {
        wal: wal.clone(),
        payload,
        writers,
    };

    load.run(warmup, false).await?;
    if mode == Mode::Steady {
        let started = Instant::now();
        while wal.stats().spares_recycled == 0 && started.elapsed() < STEADY_WARMUP_LIMIT {
            load.run(warmup, false).await?;
        }
    }
    // A baseline blocks this executor: the log's own tasks (its zero-fill, the
    // releaser) wait meanwhile, and only the measured load's slices are timed.
    let before = wal.stats();
    let (appends, elapsed, latency, baseline_around) = match baseline {
        None => {
            let (appends, elapsed, latency) = load.run(phase, true).await?;
            (appends, elapsed, latency, None)
        }
        Some(measure) => {
            let slice = phase / BASELINE_SLICES;
            let mut around = vec![measure(slice)?];
            let (mut appends, mut elapsed, mut latency) = (0, Duration::ZERO, histogram());
            for _ in 0..BASELINE_SLICES {
                let (a, e, l) = load.run(slice, true).await?;
                appends += a;
                elapsed += e;
                latency.add(&l).context("merging the slices' latencies")?;
                around.push(measure(slice)?);
            }
            (appends, elapsed, latency, Some(around))
        }
    };
    let after = wal.stats();
    drop(releaser);
    wal.close().await?;
    drop(load);
    drop(wal);
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    let groups = (after.groups - before.groups).max(1);
    Ok(PhaseResult {
        appends,
        elapsed,
        latency,
        frames_per_group: (after.appends - before.appends) as f64 / groups as f64,
        group_write_mean_us: (after.group_write_us.mean() * after.group_write_us.len() as f64
            - before.group_write_us.mean() * before.group_write_us.len() as f64)
            / groups as f64,
        spares: SpareCounts {
            zero_filled: after.spares_zero_filled - before.spares_zero_filled,
            preallocated: after.spares_preallocated - before.spares_preallocated,
            recycled: after.spares_recycled - before.spares_recycled,
            waited: after.spare_waits - before.spare_waits,
        },
        baseline_around,
    })
}

/// Closed-loop appenders: each waits for its append to be durable, then appends again.
struct Load {
    wal: Rc<Wal<DmaStorage>>,
    payload: Rc<[u8]>,
    writers: usize,
}

impl Load {
    /// Runs the appenders for `duration`; returns (appends, elapsed, latency µs).
    async fn run(
        &self,
        duration: Duration,
        progress: bool,
    ) -> Result<(u64, Duration, Histogram<u64>)> {
        let stop = Rc::new(Cell::new(false));
        let latency = Rc::new(RefCell::new(histogram()));
        let count = Rc::new(Cell::new(0u64));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..self.writers {
            let (wal, payload, stop, latency, count) = (
                self.wal.clone(),
                self.payload.clone(),
                stop.clone(),
                latency.clone(),
                count.clone(),
            );
            tasks.push(glommio::spawn_local(async move {
                while !stop.get() {
                    let began = Instant::now();
                    wal.append(KIND, b"bench", &payload).await?;
                    latency
                        .borrow_mut()
                        .saturating_record(began.elapsed().as_micros() as u64);
                    count.set(count.get() + 1);
                }
                Ok::<(), oc_io::Error>(())
            }));
        }
        let mut last = 0;
        while let Some(left) = duration
            .checked_sub(started.elapsed())
            .filter(|d| !d.is_zero())
        {
            let ticked = Instant::now();
            glommio::timer::sleep(left.min(Duration::from_secs(1))).await;
            if progress {
                let now = count.get();
                let p99 = latency.borrow().value_at_quantile(0.99);
                eprintln!(
                    "  [{:>3} writers] {:>8.0} appends/s, p99 so far {p99} µs",
                    self.writers,
                    (now - last) as f64 / ticked.elapsed().as_secs_f64()
                );
                last = now;
            }
        }
        stop.set(true);
        for t in tasks {
            t.await?;
        }
        let elapsed = started.elapsed();
        let latency = latency.borrow().clone();
        Ok((count.get(), elapsed, latency))
    }
}

pub(crate) fn markdown(r: &WalReport) -> String {
    let mut out = format!(
        "Machine: {} cores, kernel {}, {}; {} s per phase.\n\n",
        r.machine.cores, r.machine.kernel, r.machine.file_system, r.seconds_per_phase
    );
    out += "| sequential bandwidth | MB/s | × raw depth 8 | × raw durable | × raw durable around and between its slices |\n|---|---:|---:|---:|---:|\n";
    let row = |name: &str, v: f64, around: Option<&[f64]>| {
        let around = around.map_or("—".to_string(), |around| {
            format!("{:.2} ({} MB/s)", v / mean(around), rates(around))
        });
        format!(
            "| {name} | {v:.0} | {:.2} | {:.2} | {around} |\n",
            v / r.raw_seq_mb_s,
            v / r.raw_durable_seq_mb_s
        )
    };
    out += &row("raw O_DIRECT 1 MiB writes, depth 8", r.raw_seq_mb_s, None);
    out += &row(
        "raw O_DIRECT 1 MiB writes, depth 1",
        r.raw_seq_qd1_mb_s,
        None,
    );
    out += &row(
        "raw O_DIRECT 1 MiB write + fdatasync (raw durable)",
        r.raw_durable_seq_mb_s,
        None,
    );
    out += &row(
        "WAL 256 KiB records, fresh log",
        r.wal_seq_mb_s,
        r.raw_durable_around_fresh_mb_s.as_deref(),
    );
    out += &row(
        "WAL 256 KiB records, steady state",
        r.steady_state.wal_seq_mb_s,
        r.steady_state.raw_durable_around_mb_s.as_deref(),
    );
    out += "\n| durable small writes | ops/s | × raw fsync/s | × raw fsync/s around and between its slices | p50 µs | p99 µs | p999 µs | frames/group | spares filled / recycled |\n";
    out += "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    out += &format!(
        "| raw 4 KiB write + fdatasync | {:.0} | 1.0 | — | {} | {} | {} | 1 | |\n",
        r.raw_fsync_per_s, r.raw_fsync_p50_us, r.raw_fsync_p99_us, r.raw_fsync_p999_us
    );
    for (label, rows) in [
        ("fresh", &r.small_appends),
        ("steady", &r.steady_state.small_appends),
    ] {
        for c in rows {
            let around = match (c.ratio_to_raw_fsync_around, &c.raw_fsync_around_per_s) {
                (Some(ratio), Some(around)) => format!("{ratio:.2} ({}/s)", rates(around)),
                _ => "—".to_string(),
            };
            out += &format!(
                "| WAL 256 B, {} appenders, {label} | {:.0} | {:.2} | {around} | {} | {} | {} | {:.1} | {} / {} |\n",
                c.concurrency,
                c.appends_per_s,
                c.ratio_to_raw_fsync,
                c.lag_p50_us,
                c.lag_p99_us,
                c.lag_p999_us,
                c.frames_per_group,
                c.spares.zero_filled,
                c.spares.recycled
            );
        }
    }
    out
}

/// Charts: durable small appends/s and their p99, per appender count.
pub(crate) fn svgs(r: &WalReport) -> Vec<(String, String)> {
    use crate::report::{bar_chart, Bars};
    let groups: Vec<String> = r
        .small_appends
        .iter()
        .map(|c| format!("{} appenders", c.concurrency))
        .collect();
    let series = |f: &dyn Fn(&ConcurrencyResult) -> f64| {
        vec![
            (
                "WAL, fresh log".to_string(),
                r.small_appends.iter().map(|c| Some(f(c))).collect(),
            ),
            (
                "WAL, steady state".to_string(),
                r.steady_state
                    .small_appends
                    .iter()
                    .map(|c| Some(f(c)))
                    .collect(),
            ),
        ]
    };
    let mut throughput = series(&|c| c.appends_per_s);
    throughput.push((
        "raw 4 KiB write+fdatasync".to_string(),
        (0..groups.len())
            .map(|i| (i == 0).then_some(r.raw_fsync_per_s))
            .collect(),
    ));
    vec![
        (
            "appends".to_string(),
            bar_chart(&Bars {
                title: "Durable 256-byte appends per second".into(),
                y_label: "appends/s".into(),
                groups: groups.clone(),
                series: throughput,
            }),
        ),
        (
            "p99".to_string(),
            bar_chart(&Bars {
                title: "Append to durable, p99".into(),
                y_label: "µs".into(),
                groups,
                series: series(&|c| c.lag_p99_us as f64),
            }),
        ),
    ]
}
