//! `oc-bench peers`: the same durable-write workload on oc and on the engines people
//! would pick instead, in one run, on the same file system.
//!
//! Workload: single-row upserts with a random 16-byte key and a 200-byte value, each
//! acknowledged only once durable, from `c` concurrent writers (closed loop), for
//! `--seconds` after a warm-up. Every peer is configured the way its documentation
//! recommends for durable writes:
//! - oc: the in-process shard pool (one shard per CPU), writers on the shards, every
//!   commit waits for its group's fdatasync (`durability = sync`, the only mode);
//! - SQLite (rusqlite, bundled): WAL journal mode, `synchronous=FULL` (an fsync of the
//!   WAL at every commit), one connection per writer thread, `INSERT OR REPLACE` in
//!   autocommit mode, a 10 s busy timeout;
//! - RocksDB (cargo feature `peers-rocksdb`): `WriteOptions::set_sync(true)` on every
//!   put, concurrent writer threads (RocksDB groups concurrent writers into one WAL
//!   write and sync itself), default options otherwise;
//! - the raw disk: one 4 KiB O_DIRECT write + fdatasync per operation, one at a time.
//!
//! At one writer every engine's writer runs on the same CPU: the one oc's pool pins its
//! shard 0 (and so the writer) to, the first this process may use. Where a lone writer
//! runs decides its rate on a machine whose disk interrupts one CPU (BENCHMARKS.md,
//! "One writer on the disk's CPU"); unpinned, the peers ran where the scheduler put
//! them and oc did not. More writers run unpinned, as oc's shards use every CPU.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use oc_io::SimRng;
use serde::{Deserialize, Serialize};

use crate::latency::histogram;
use crate::pool::{pool_phase, PoolSetup, Routing, RowShape};

/// Bytes of each value.
pub const VALUE_BYTES: usize = 200;

#[derive(clap::Args)]
pub struct PeersArgs {
    #[command(flatten)]
    pub common: crate::RunArgs,
    /// Writer concurrencies.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub concurrency: Vec<usize>,
}

/// The 200-byte value every peer writes, as oc's JSON text column value.
pub fn value_200() -> &'static serde_json::Value {
    static VALUE: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    VALUE.get_or_init(|| serde_json::Value::String("v".repeat(VALUE_BYTES)))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerResult {
    pub engine: String,
    pub concurrency: usize,
    pub writes_per_s: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeersReport {
    pub machine: crate::wal::Machine,
    pub seconds_per_run: f64,
    pub shards: usize,
    pub results: Vec<PeerResult>,
    /// Engines compiled out of this build (e.g. RocksDB without the feature).
    pub skipped: Vec<String>,
    /// The CPU every engine's lone writer ran on (the raw disk's loop too). None when
    /// oc-bench did not pin them: runs before 2026-12-05, or this thread's CPU mask
    /// could not be read (oc's pool then runs unpinned too).
    #[serde(default)]
    pub one_writer_cpu: Option<usize>,
}

fn result(
    engine: &str,
    concurrency: usize,
    writes: u64,
    elapsed: Duration,
    h: &Histogram<u64>,
) -> PeerResult {
    PeerResult {
        engine: engine.to_string(),
        concurrency,
        writes_per_s: writes as f64 / elapsed.as_secs_f64(),
        p50_us: h.value_at_quantile(0.5),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
    }
}

fn fresh_dir(dir: &Path) -> Result<PathBuf> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir.to_path_buf())
}

/// The CPU a lone writer runs on: the one the pool pins its shard 0 to (see the
/// module's doc); None for more writers.
fn writer_cpu(concurrency: usize) -> Option<usize> {
    if concurrency == 1 {
        oc_engine::pool::allowed_cpus().first().copied()
    } else {
        None
    }
}

/// Runs `write` from `concurrency` threads for warm-up + `duration`; each thread gets
/// its own state from `open` (a connection, a handle). Returns (writes, elapsed, µs).
fn threaded<S, O, W>(
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    open: O,
    write: W,
) -> Result<(u64, Duration, Histogram<u64>)>
where
    O: Fn() -> Result<S> + Sync,
    W: Fn(&mut S, &[u8; 16], &[u8]) -> Result<()> + Sync,
{
    let stop = AtomicBool::new(false);
    let measuring = AtomicBool::new(false);
    let progress = AtomicU64::new(0);
    let value = vec![b'v'; VALUE_BYTES];
    let cpu = writer_cpu(concurrency);
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..concurrency)
            .map(|t| {
                let (stop, measuring, open, write, value, progress) =
                    (&stop, &measuring, &open, &write, &value, &progress);
                scope.spawn(move || -> Result<(u64, Histogram<u64>)> {
                    if let Some(cpu) = cpu {
                        crate::pinning::pin_this_thread(cpu)?;
                    }
                    let mut state = open()?;
                    let mut rng = SimRng::new(t as u64 + 1);
                    let mut h = histogram();
                    let mut writes = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let mut key = [0u8; 16];
                        key[..8].copy_from_slice(&rng.below(u64::MAX).to_le_bytes());
                        key[8..].copy_from_slice(&rng.below(u64::MAX).to_le_bytes());
                        let began = Instant::now();
                        write(&mut state, &key, value)?;
                        if measuring.load(Ordering::Relaxed) {
                            h.saturating_record(began.elapsed().as_micros() as u64);
                            writes += 1;
                            progress.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok((writes, h))
                })
            })
            .collect();
        std::thread::sleep(warmup);
        measuring.store(true, Ordering::SeqCst);
        let started = Instant::now();
        let mut last = (started, 0u64);
        while started.elapsed() < duration {
            std::thread::sleep((duration - started.elapsed()).min(Duration::from_secs(1)));
            let now = (Instant::now(), progress.load(Ordering::Relaxed));
            let rate = (now.1 - last.1) as f64 / now.0.duration_since(last.0).as_secs_f64();
            eprintln!("  [{concurrency:>4} writers] {rate:>9.0} writes/s");
            last = now;
        }
        measuring.store(false, Ordering::SeqCst);
        let elapsed = started.elapsed();
        stop.store(true, Ordering::SeqCst);
        let mut total = 0;
        let mut all = histogram();
        for t in threads {
            let (writes, h) = t
                .join()
                .map_err(|_| anyhow::anyhow!("a writer panicked"))??;
            total += writes;
            all.add(&h)?;
        }
        Ok((total, elapsed, all))
    })
}

fn sqlite(
    dir: &Path,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> Result<PeerResult> {
    let path = fresh_dir(dir)?.join("peer.sqlite");
    {
        let db = rusqlite::Connection::open(&path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.execute_batch("CREATE TABLE kv (k BLOB PRIMARY KEY, v BLOB NOT NULL)")?;
    }
    let open = || -> Result<rusqlite::Connection> {
        let db = rusqlite::Connection::open(&path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.busy_timeout(Duration::from_secs(10))?;
        Ok(db)
    };
    let write = |db: &mut rusqlite::Connection, key: &[u8; 16], value: &[u8]| -> Result<()> {
        db.prepare_cached("INSERT OR REPLACE INTO kv (k, v) VALUES (?1, ?2)")?
            .execute(rusqlite::params![&key[..], value])?;
        Ok(())
    };
    let (writes, elapsed, h) = threaded(concurrency, warmup, duration, open, write)?;
    Ok(result("sqlite", concurrency, writes, elapsed, &h))
}

#[cfg(feature = "peers-rocksdb")]
fn rocksdb(
    dir: &Path,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> Result<PeerResult> {
    use std::sync::Arc;
    let path = fresh_dir(dir)?;
    let mut options = rocksdb::Options::default();
    options.create_if_missing(true);
    let db = Arc::new(rocksdb::DB::open(&options, &path)?);
    let open = || -> Result<(Arc<rocksdb::DB>, rocksdb::WriteOptions)> {
        let mut sync = rocksdb::WriteOptions::default();
        sync.set_sync(true);
        Ok((db.clone(), sync))
    };
    let write = |(db, sync): &mut (Arc<rocksdb::DB>, rocksdb::WriteOptions),
                 key: &[u8; 16],
                 value: &[u8]|
     -> Result<()> {
        db.put_opt(key, value, sync)?;
        Ok(())
    };
    let (writes, elapsed, h) = threaded(concurrency, warmup, duration, open, write)?;
    Ok(result("rocksdb", concurrency, writes, elapsed, &h))
}

fn raw_disk(dir: &Path, duration: Duration) -> Result<PeerResult> {
    let dir = fresh_dir(dir)?;
    let bytes = 64 << 20;
    let file = crate::raw_disk::zero_filled_file(&dir.join("raw.dat"), bytes)?;
    let cpu = writer_cpu(1);
    // On a thread of its own: pinning the main thread would pin the pools it starts.
    let (per_s, h) = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                if let Some(cpu) = cpu {
                    crate::pinning::pin_this_thread(cpu)?;
                }
                crate::raw_disk::write_fdatasync(&file, bytes, 4096, duration)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the raw disk's writer panicked"))?
    })?;
    Ok(PeerResult {
        engine: "raw disk".into(),
        concurrency: 1,
        writes_per_s: per_s,
        p50_us: h.value_at_quantile(0.5),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
    })
}

/// Runs every peer at every concurrency; returns the report.
pub fn measure(args: &PeersArgs) -> Result<PeersReport> {
    let base = &args.common.dir;
    let duration = Duration::from_secs_f64(args.common.seconds);
    let warmup = Duration::from_millis(500);
    let shards = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut results = vec![raw_disk(&base.join("raw"), duration)?];
    eprintln!("raw disk: {:.0} writes/s", results[0].writes_per_s);
    let skipped = if cfg!(feature = "peers-rocksdb") {
        Vec::new()
    } else {
        vec!["rocksdb (build with --features peers-rocksdb)".to_string()]
    };
    for &c in &args.concurrency {
        let oc = pool_phase(
            &base.join("oc"),
            PoolSetup {
                shards,
                pin_to_cores: true,
                shape: RowShape::RandomKey16,
            },
            Routing::Local,
            c,
            warmup,
            duration,
        )?;
        results.push(PeerResult {
            engine: "oc".into(),
            concurrency: c,
            writes_per_s: oc.commits_per_s,
            p50_us: oc.commit_p50_us,
            p99_us: oc.commit_p99_us,
            p999_us: oc.commit_p999_us,
        });
        #[cfg(feature = "peers-rocksdb")]
        results.push(rocksdb(&base.join("rocksdb"), c, warmup, duration)?);
        results.push(sqlite(&base.join("sqlite"), c, warmup, duration)?);
        for r in results
            .iter()
            .filter(|r| r.concurrency == c && !r.engine.starts_with("raw"))
        {
            eprintln!(
                "{:>8} at {c:>3} writers: {:>9.0} writes/s, p99 {} µs",
                r.engine, r.writes_per_s, r.p99_us
            );
        }
    }
    Ok(PeersReport {
        machine: crate::wal::machine(base),
        seconds_per_run: duration.as_secs_f64(),
        shards,
        results,
        skipped,
        one_writer_cpu: writer_cpu(1),
    })
}

pub fn run(args: PeersArgs) -> Result<()> {
    let report = measure(&args)?;
    crate::report::write_outputs(
        &report,
        args.common.json.as_deref(),
        markdown(&report),
        svgs(&report),
    )
}

/// Charts: writes/s and p99 per engine and writer count.
pub fn svgs(r: &PeersReport) -> Vec<(String, String)> {
    use crate::report::{bar_chart, Bars};
    let mut concurrencies: Vec<usize> = r.results.iter().map(|x| x.concurrency).collect();
    concurrencies.sort_unstable();
    concurrencies.dedup();
    let mut engines: Vec<&str> = Vec::new();
    for x in &r.results {
        if !engines.contains(&x.engine.as_str()) {
            engines.push(&x.engine);
        }
    }
    let groups: Vec<String> = concurrencies
        .iter()
        .map(|c| format!("{c} writers"))
        .collect();
    let series = |f: &dyn Fn(&PeerResult) -> f64| -> Vec<(String, Vec<Option<f64>>)> {
        engines
            .iter()
            .map(|e| {
                let values = concurrencies
                    .iter()
                    .map(|&c| find(r, e, c).map(f))
                    .collect();
                (e.to_string(), values)
            })
            .collect()
    };
    vec![
        (
            "writes".to_string(),
            bar_chart(&Bars {
                title: "Durable single-row writes per second".into(),
                y_label: "writes/s".into(),
                groups: groups.clone(),
                series: series(&|x| x.writes_per_s),
            }),
        ),
        (
            "p99".to_string(),
            bar_chart(&Bars {
                title: "Write latency p99".into(),
                y_label: "µs".into(),
                groups,
                series: series(&|x| x.p99_us as f64),
            }),
        ),
    ]
}

fn find<'a>(r: &'a PeersReport, engine: &str, c: usize) -> Option<&'a PeerResult> {
    r.results
        .iter()
        .find(|x| x.engine == engine && x.concurrency == c)
}

pub fn markdown(r: &PeersReport) -> String {
    let mut out = format!(
        "Durable single-row upserts (16-byte random keys, 200-byte values), {} s per run, oc with {} shard(s). Machine: {} cores, kernel {}, {}.\n\n",
        r.seconds_per_run, r.shards, r.machine.cores, r.machine.kernel, r.machine.file_system
    );
    out += "`raw disk` is one 4 KiB O_DIRECT write + fdatasync per operation, one at a time.";
    match r.one_writer_cpu {
        Some(cpu) => {
            out += &format!(" Every engine's lone writer (the raw disk's too) ran on CPU {cpu}, where oc's shard 0 runs.\n\n")
        }
        None => out += " oc-bench did not pin the lone writers.\n\n",
    }
    out += "| engine | writers | writes/s | p50 µs | p99 µs | p999 µs |\n|---|---:|---:|---:|---:|---:|\n";
    for x in &r.results {
        out += &format!(
            "| {} | {} | {:.0} | {} | {} | {} |\n",
            x.engine, x.concurrency, x.writes_per_s, x.p50_us, x.p99_us, x.p999_us
        );
    }
    if !r.skipped.is_empty() {
        out += &format!("\nNot in this run: {}.\n", r.skipped.join(", "));
    }
    out += "\n| target at 64 writers | measured | verdict |\n|---|---|---|\n";
    let oc = find(r, "oc", 64);
    for (peer, factor) in [("rocksdb", 2.0), ("sqlite", 10.0)] {
        match (oc, find(r, peer, 64)) {
            (Some(oc), Some(p)) => {
                let ratio = oc.writes_per_s / p.writes_per_s;
                let lower_p99 = oc.p99_us < p.p99_us;
                let met = ratio >= factor && (peer != "rocksdb" || lower_p99);
                out +=
                    &format!(
                    "| oc ≥ {factor}× {peer} writes/s{} | {ratio:.2}× (p99 {} vs {} µs) | {} |\n",
                    if peer == "rocksdb" { " with lower p99" } else { "" },
                    oc.p99_us,
                    p.p99_us,
                    if met { "met" } else { "**not met**" }
                );
            }
            _ => {
                out +=
                    &format!("| oc ≥ {factor}× {peer} writes/s | not measured in this run | — |\n")
            }
        }
    }
    out
}
