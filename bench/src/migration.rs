//! `oc-bench migration`: what an online schema migration costs writers, through a real
//! `oc-server` it starts (`--archive none`, so shipping adds no noise of its own).
//!
//! Each round preloads a fresh table and runs `--writers` closed-loop connections of
//! single-row updates on it for the whole round: `--seconds` without a migration (the
//! baseline, after a one-second warm-up), then a migration (a column computed from
//! another, plus an index on it) until it has cut over, then 1.5 s more. Every write's
//! completion time and latency is kept, so the windows are cut afterwards:
//! - throughput and p99 during the backfill against the baseline, same round;
//! - the backfill's share of the writers' bytes in ~1 s windows, from the server's own
//!   counters (`progress.backfill_bytes` / `foreground_bytes`, sampled every 25 ms), and
//!   as rows converted per row written, counted by this client;
//! - write p99 in the second around the cutover (±0.5 s) against the second before, the
//!   slowest write in flight across it (a stall shows there, not in a p99), and the
//!   writes the cutover refused (`409 table_changed`).
//!
//! Then aborts under the same load, each half way through its backfill (request →
//! `aborted`, then the table's schema is checked to be the old one), and the backfill
//! of a larger table on an idle shard (rows/s and MB/s).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use glommio::Task;
use serde::Serialize;
use serde_json::{json, Value};

use crate::http::{create_tenant_and_table, parse_url, Connection, Target};
use crate::latency::{histogram, Percentiles};
use crate::server::Spawned;

#[derive(clap::Args)]
pub struct MigrationArgs {
    /// Data directory for the server it starts (wiped first; on the disk to measure).
    #[arg(long, default_value = "/tmp/oc-bench-migration")]
    dir: std::path::PathBuf,
    /// Rows in each round's table (the backfill's work).
    #[arg(long, default_value_t = 20_000)]
    rows: u64,
    /// Bytes of each row's text value.
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Closed-loop writer connections.
    #[arg(long, default_value_t = 16)]
    writers: usize,
    /// Seconds of baseline (no migration) per round, after a one-second warm-up.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Rounds, each on a fresh table; ratios are quoted as the median over rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Aborts measured under load.
    #[arg(long, default_value_t = 5)]
    aborts: usize,
    /// Rows of the table migrated on an idle shard.
    #[arg(long, default_value_t = 200_000)]
    idle_rows: u64,
    /// Give up on a migration that has not cut over after this long.
    #[arg(long, default_value_t = 600.0)]
    max_seconds: f64,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

const TENANT: &str = "bench-migration";
/// Rows per preload request.
const PRELOAD_BATCH: u64 = 500;
const POLL: Duration = Duration::from_millis(25);

/// The migration every phase runs: a column computed from another, and an index on it.
fn steps() -> Value {
    json!([
        {"op": "add_column", "name": "score", "type": "int", "default": "n * 2"},
        {"op": "add_index", "name": "by_score", "columns": ["score"]},
    ])
}

/// One write as the client saw it.
#[derive(Clone, Copy)]
struct Sample {
    done: Instant,
    latency_us: u64,
    status: u16,
}

/// The server's view of a migration at one instant.
#[derive(Clone)]
struct Progress {
    at: Instant,
    state: String,
    rows_done: u64,
    backfill_bytes: Option<u64>,
    foreground_bytes: Option<u64>,
}

/// One ~1 s window of a backfill under load.
#[derive(Serialize, Clone, Copy)]
struct ShareWindow {
    seconds: f64,
    /// Backfill bytes per foreground byte, the server's counters.
    bytes_share: f64,
    /// Rows converted per row written, counted here.
    rows_share: f64,
}

#[derive(Serialize)]
struct Round {
    table: String,
    baseline_writes_per_s: f64,
    backfill_writes_per_s: f64,
    throughput_ratio: f64,
    baseline: Percentiles,
    backfill: Percentiles,
    p99_ratio: f64,
    backfill_seconds: f64,
    share_windows: Vec<ShareWindow>,
    share_median: f64,
    share_min: f64,
    share_max: f64,
    /// Write p99 in [cutover − 1.5 s, cutover − 0.5 s) and [cutover ± 0.5 s).
    cutover_before_p99_us: u64,
    cutover_around_p99_us: u64,
    /// Write p999 in the second around the cutover.
    cutover_around_p999_us: u64,
    /// Writes in flight at some point between the last poll that saw the migration
    /// active and the first that saw it done (the cutover applied in between), and the
    /// slowest of them: a stall at the cutover shows here, not in a p99.
    cutover_in_flight: u64,
    cutover_in_flight_max_us: u64,
    /// Writes refused in the second around the cutover (409 `table_changed`).
    cutover_refused: u64,
    write_errors: u64,
}

#[derive(Serialize)]
struct Idle {
    rows: u64,
    seconds: f64,
    rows_per_s: f64,
    mb_per_s: f64,
    /// The table's row bytes before the migration (its usage).
    table_bytes: u64,
    /// The server's resident set just before the start, and its peak until the
    /// cutover (sampled at every progress poll).
    resident_before: u64,
    resident_peak: u64,
}

#[derive(Serialize)]
struct MigrationReport {
    /// `--server-cpus` and `--client-cpus`, as given.
    #[serde(default)]
    pinning: crate::pinning::Pinning,
    rows: u64,
    value_bytes: usize,
    writers: usize,
    rounds: Vec<Round>,
    /// Medians over rounds, with (min, max).
    throughput_ratio: (f64, f64, f64),
    p99_ratio: (f64, f64, f64),
    share: (f64, f64, f64),
    cutover_p99_delta_us: (f64, f64, f64),
    /// Request → the migration `aborted` (the answer comes once the abort is applied).
    abort: Percentiles,
    idle: Idle,
}

pub fn run(args: MigrationArgs) -> Result<()> {
    if args.rows == 0 || args.writers == 0 || args.rounds == 0 || args.idle_rows == 0 {
        bail!("--rows, --writers, --rounds and --idle-rows must be above 0");
    }
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir)?;
    let server = Spawned::start(&args.dir.join("data"), &["--archive", "none"])?
        .context("no oc-server next to oc-bench (cargo build --release --bin oc-server)")?;
    let target = Rc::new(parse_url(&server.url)?);
    let report = oc_io::executor::run_local(async {
        let mut conn = Connection::open(&target).await?;
        let mut rounds = Vec::new();
        for round in 0..args.rounds {
            let table = format!("t{round}");
            eprintln!("round {}: {} rows in {table}...", round + 1, args.rows);
            preload(&mut conn, &table, args.rows, args.value_bytes).await?;
            rounds.push(measure_round(&target, &mut conn, &table, &args).await?);
        }
        eprintln!("{} aborts under load...", args.aborts);
        preload(&mut conn, "aborts", args.rows, args.value_bytes).await?;
        let abort = measure_aborts(&target, &mut conn, &args).await?;
        eprintln!("backfill of {} rows on an idle shard...", args.idle_rows);
        preload(&mut conn, "idle", args.idle_rows, args.value_bytes).await?;
        // The shard has been idle for a while (its limiter has seen it).
        glommio::timer::sleep(Duration::from_secs(2)).await;
        let idle = measure_idle(&mut conn, server.pid(), args.idle_rows, args.max_seconds).await?;
        let stats = |f: &dyn Fn(&Round) -> f64| median_min_max(rounds.iter().map(f).collect());
        Ok::<_, anyhow::Error>(MigrationReport {
            pinning: crate::pinning::current(),
            rows: args.rows,
            value_bytes: args.value_bytes,
            writers: args.writers,
            throughput_ratio: stats(&|r| r.throughput_ratio),
            p99_ratio: stats(&|r| r.p99_ratio),
            share: stats(&|r| r.share_median),
            cutover_p99_delta_us: stats(&|r| {
                r.cutover_around_p99_us as f64 - r.cutover_before_p99_us as f64
            }),
            rounds,
            abort,
            idle,
        })
    })?;
    server.stop()?;
    print_markdown(&report);
    if let Some(path) = &args.json {
        crate::report::write_output(path, &serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

fn median_min_max(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (
        values[values.len() / 2],
        values[0],
        values[values.len() - 1],
    )
}

fn row(id: u64, n: u64, value_bytes: usize) -> Value {
    json!({"id": id, "v": "x".repeat(value_bytes), "n": n})
}

fn rows_path(table: &str) -> String {
    format!("/v1/tenants/{TENANT}/tables/{table}/rows")
}

async fn preload(conn: &mut Connection, table: &str, rows: u64, value_bytes: usize) -> Result<()> {
    let schema = json!({
        "name": table,
        "columns": [
            {"name": "id", "type": "int"},
            {"name": "v", "type": "text"},
            {"name": "n", "type": "int"},
        ],
        "primary_key": ["id"],
    });
    create_tenant_and_table(conn, TENANT, &schema).await?;
    let mut start = 0;
    while start < rows {
        let ops: Vec<Value> = (start..rows.min(start + PRELOAD_BATCH))
            .map(|id| json!({"upsert": row(id, id, value_bytes)}))
            .collect();
        let body = json!({ "ops": ops }).to_string();
        let status = conn.request("POST", &rows_path(table), Some(&body)).await?;
        if status != 200 {
            bail!(
                "preloading {table} answered {status}: {}",
                String::from_utf8_lossy(conn.body())
            );
        }
        start += PRELOAD_BATCH;
    }
    Ok(())
}

/// Closed-loop writers updating random rows of `table` until dropped or stopped.
struct Load {
    samples: Rc<RefCell<Vec<Sample>>>,
    stop: Rc<Cell<bool>>,
    tasks: Vec<Task<Result<()>>>,
}

impl Load {
    async fn start(target: &Rc<Target>, table: &str, args: &MigrationArgs) -> Result<Load> {
        let samples: Rc<RefCell<Vec<Sample>>> = Rc::default();
        let stop = Rc::new(Cell::new(false));
        let mut tasks = Vec::new();
        for writer in 0..args.writers as u64 {
            let mut conn = Connection::open(target).await?;
            let (samples, stop, path) = (samples.clone(), stop.clone(), rows_path(table));
            let (rows, value_bytes) = (args.rows, args.value_bytes);
            tasks.push(glommio::spawn_local(async move {
                // A per-writer linear congruential sequence: the same keys every run.
                let mut x = writer.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                let mut n = 0u64;
                while !stop.get() {
                    x = x
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    n += 1;
                    let body = json!({"ops": [{"upsert": row((x >> 33) % rows, n, value_bytes)}]})
                        .to_string();
                    let sent = Instant::now();
                    let status = conn.request("POST", &path, Some(&body)).await?;
                    let done = Instant::now();
                    samples.borrow_mut().push(Sample {
                        done,
                        latency_us: (done - sent).as_micros() as u64,
                        status,
                    });
                }
                Ok(())
            }));
        }
        Ok(Load {
            samples,
            stop,
            tasks,
        })
    }

    async fn finish(self) -> Result<Vec<Sample>> {
        self.stop.set(true);
        for task in self.tasks {
            task.await?;
        }
        Ok(self.samples.take())
    }
}

/// Starts a migration of `table`; returns its id.
async fn start_migration(conn: &mut Connection, table: &str) -> Result<u64> {
    let body = json!({"table": table, "steps": steps()}).to_string();
    let status = conn
        .request(
            "POST",
            &format!("/v1/tenants/{TENANT}/migrations"),
            Some(&body),
        )
        .await?;
    let answer: Value = serde_json::from_slice(conn.body())?;
    if status != 202 {
        bail!("starting a migration of {table} answered {status}: {answer}");
    }
    answer["id"].as_u64().context("the migration has no id")
}

async fn progress(conn: &mut Connection, id: u64) -> Result<Progress> {
    let status = conn
        .request(
            "GET",
            &format!("/v1/tenants/{TENANT}/migrations/{id}"),
            None,
        )
        .await?;
    let at = Instant::now();
    let m: Value = serde_json::from_slice(conn.body())?;
    if status != 200 {
        bail!("reading migration {id} answered {status}: {m}");
    }
    Ok(Progress {
        at,
        state: m["state"].as_str().unwrap_or_default().to_string(),
        rows_done: m["progress"]["rows_done"].as_u64().unwrap_or(0),
        backfill_bytes: m["progress"]["backfill_bytes"].as_u64(),
        foreground_bytes: m["progress"]["foreground_bytes"].as_u64(),
    })
}

/// Polls migration `id` until it has cut over; returns every sample taken.
async fn until_done(conn: &mut Connection, id: u64, max_seconds: f64) -> Result<Vec<Progress>> {
    let deadline = Instant::now() + Duration::from_secs_f64(max_seconds);
    let mut seen = Vec::new();
    loop {
        let p = progress(conn, id).await?;
        let state = p.state.clone();
        seen.push(p);
        match state.as_str() {
            "done" => return Ok(seen),
            "failed" | "aborted" => bail!("migration {id} ended {state}"),
            _ if Instant::now() > deadline => {
                bail!("migration {id} had not cut over after {max_seconds} s ({state})")
            }
            _ => glommio::timer::sleep(POLL).await,
        }
    }
}

fn percentiles(samples: &[Sample], from: Instant, to: Instant) -> (u64, Percentiles) {
    let mut h = histogram();
    let mut count = 0;
    for s in samples
        .iter()
        .filter(|s| s.done >= from && s.done < to && s.status == 200)
    {
        h.saturating_record(s.latency_us);
        count += 1;
    }
    (count, Percentiles::of(&h))
}

async fn measure_round(
    target: &Rc<Target>,
    conn: &mut Connection,
    table: &str,
    args: &MigrationArgs,
) -> Result<Round> {
    let load = Load::start(target, table, args).await?;
    let warm = Instant::now() + Duration::from_secs(1);
    glommio::timer::sleep(Duration::from_secs_f64(1.0 + args.seconds)).await;
    let started = Instant::now();
    let id = start_migration(conn, table).await?;
    let polls = until_done(conn, id, args.max_seconds).await?;
    let last_pending = polls[polls.len().saturating_sub(2)].at;
    let first_done = polls[polls.len() - 1].at;
    let cutover = last_pending + (first_done - last_pending) / 2;
    glommio::timer::sleep(Duration::from_millis(1500)).await;
    let samples = load.finish().await?;

    let (baseline_n, baseline) = percentiles(&samples, warm, started);
    let (backfill_n, backfill) = percentiles(&samples, started, cutover);
    let baseline_writes_per_s = baseline_n as f64 / (started - warm).as_secs_f64();
    let backfill_seconds = (cutover - started).as_secs_f64();
    let backfill_writes_per_s = backfill_n as f64 / backfill_seconds;
    let half = Duration::from_millis(500);
    let (_, before) = percentiles(&samples, cutover - 3 * half, cutover - half);
    let (_, around) = percentiles(&samples, cutover - half, cutover + half);
    let in_flight: Vec<&Sample> = samples
        .iter()
        .filter(|s| {
            let sent = s.done - Duration::from_micros(s.latency_us);
            sent <= first_done && s.done >= last_pending
        })
        .collect();
    let cutover_refused = samples
        .iter()
        .filter(|s| s.done >= cutover - half && s.done < cutover + half && s.status == 409)
        .count() as u64;
    let share_windows = share_windows(&polls, &samples);
    let shares = share_windows
        .iter()
        .map(|w| w.bytes_share)
        .collect::<Vec<_>>();
    let (share_median, share_min, share_max) = if shares.is_empty() {
        (f64::NAN, f64::NAN, f64::NAN)
    } else {
        median_min_max(shares)
    };
    Ok(Round {
        table: table.to_string(),
        baseline_writes_per_s,
        backfill_writes_per_s,
        throughput_ratio: backfill_writes_per_s / baseline_writes_per_s,
        baseline,
        backfill,
        p99_ratio: backfill.p99_us as f64 / baseline.p99_us.max(1) as f64,
        backfill_seconds,
        share_windows,
        share_median,
        share_min,
        share_max,
        cutover_before_p99_us: before.p99_us,
        cutover_around_p99_us: around.p99_us,
        cutover_around_p999_us: around.p999_us,
        cutover_in_flight: in_flight.len() as u64,
        cutover_in_flight_max_us: in_flight.iter().map(|s| s.latency_us).max().unwrap_or(0),
        cutover_refused,
        write_errors: samples
            .iter()
            .filter(|s| s.status != 200 && s.status != 409)
            .count() as u64,
    })
}

/// Whole windows of at least a second between polls that carry the server's counters,
/// up to the last poll before the cutover.
fn share_windows(polls: &[Progress], samples: &[Sample]) -> Vec<ShareWindow> {
    let counted: Vec<&Progress> = polls
        .iter()
        .filter(|p| p.state == "backfilling" && p.backfill_bytes.is_some())
        .collect();
    let mut windows = Vec::new();
    let Some(mut from) = counted.first().copied() else {
        return windows;
    };
    for to in counted.iter().copied().skip(1) {
        if to.at - from.at < Duration::from_secs(1) {
            continue;
        }
        let bytes = |p: &Progress| {
            (
                p.backfill_bytes.unwrap_or(0),
                p.foreground_bytes.unwrap_or(0),
            )
        };
        let ((b0, f0), (b1, f1)) = (bytes(from), bytes(to));
        let written = samples
            .iter()
            .filter(|s| s.done >= from.at && s.done < to.at && s.status == 200)
            .count();
        windows.push(ShareWindow {
            seconds: (to.at - from.at).as_secs_f64(),
            bytes_share: (b1 - b0) as f64 / (f1 - f0).max(1) as f64,
            rows_share: (to.rows_done - from.rows_done) as f64 / written.max(1) as f64,
        });
        from = to;
    }
    windows
}

async fn measure_aborts(
    target: &Rc<Target>,
    conn: &mut Connection,
    args: &MigrationArgs,
) -> Result<Percentiles> {
    let load = Load::start(target, "aborts", args).await?;
    glommio::timer::sleep(Duration::from_secs(1)).await;
    let mut latency = histogram();
    for _ in 0..args.aborts {
        let id = start_migration(conn, "aborts").await?;
        // Abort half way through the backfill, when the new shape holds half the table.
        loop {
            let p = progress(conn, id).await?;
            if p.rows_done * 2 >= args.rows {
                break;
            }
            if p.state != "pending" && p.state != "backfilling" {
                bail!("migration {id} went {} before it could be aborted", p.state);
            }
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        let sent = Instant::now();
        let status = conn
            .request(
                "POST",
                &format!("/v1/tenants/{TENANT}/migrations/{id}/abort"),
                None,
            )
            .await?;
        latency.record(sent.elapsed().as_micros() as u64)?;
        let answer: Value = serde_json::from_slice(conn.body())?;
        if status != 200 || answer["state"] != "aborted" {
            bail!("aborting migration {id} answered {status}: {answer}");
        }
        // Nothing of the new shape is left: the table's schema is the old one.
        let status = conn
            .request("GET", &format!("/v1/tenants/{TENANT}/tables/aborts"), None)
            .await?;
        let table: Value = serde_json::from_slice(conn.body())?;
        let schema = table["schema"].to_string();
        if status != 200 || schema.contains("score") {
            bail!("after aborting migration {id} the table is {status}: {table}");
        }
    }
    let samples = load.finish().await?;
    if let Some(bad) = samples.iter().find(|s| s.status != 200) {
        bail!("a write during the aborts answered {}", bad.status);
    }
    Ok(Percentiles::of(&latency))
}

async fn measure_idle(
    conn: &mut Connection,
    server: u32,
    rows: u64,
    max_seconds: f64,
) -> Result<Idle> {
    let table_bytes = table_bytes(conn, "idle").await?;
    let resident_before = crate::memory::resident_bytes(server)?;
    let started = Instant::now();
    let id = start_migration(conn, "idle").await?;
    let mut resident_peak = resident_before;
    let deadline = Instant::now() + Duration::from_secs_f64(max_seconds);
    let mut polls = Vec::new();
    loop {
        resident_peak = resident_peak.max(crate::memory::resident_bytes(server)?);
        let p = progress(conn, id).await?;
        let state = p.state.clone();
        polls.push(p);
        match state.as_str() {
            "done" => break,
            "failed" | "aborted" => bail!("migration {id} ended {state}"),
            _ if Instant::now() > deadline => bail!("migration {id} did not cut over in time"),
            // Often enough to see a peak that lasts as long as the backfill.
            _ => glommio::timer::sleep(Duration::from_millis(10)).await,
        }
    }
    let seconds = (polls[polls.len() - 1].at - started).as_secs_f64();
    // The last counted sample: bytes converted before the cutover.
    let bytes = polls
        .iter()
        .rev()
        .find_map(|p| p.backfill_bytes)
        .unwrap_or(0);
    Ok(Idle {
        rows,
        seconds,
        rows_per_s: rows as f64 / seconds,
        mb_per_s: bytes as f64 / seconds / 1e6,
        table_bytes,
        resident_before,
        resident_peak,
    })
}

/// The row bytes table `table` holds (`GET …/tables/:table`).
async fn table_bytes(conn: &mut Connection, table: &str) -> Result<u64> {
    let status = conn
        .request("GET", &format!("/v1/tenants/{TENANT}/tables/{table}"), None)
        .await?;
    if status != 200 {
        bail!("describing {table} answered {status}");
    }
    let body: Value = serde_json::from_slice(conn.body())?;
    body["bytes"]
        .as_u64()
        .context("no bytes in the table's description")
}

fn print_markdown(r: &MigrationReport) {
    let ms = |us: u64| us as f64 / 1e3;
    println!(
        "{} rows of ~{} B, {} closed-loop writers\n",
        r.rows,
        r.value_bytes + 20,
        r.writers
    );
    println!("| round | writes/s base → backfill | ratio | p99 base → backfill | ratio | backfill s | share median (min–max), bytes | share median, rows | cutover p99 before → around | in flight at cutover: n, max | refused at cutover |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (i, round) in r.rounds.iter().enumerate() {
        let mut rows: Vec<f64> = round.share_windows.iter().map(|w| w.rows_share).collect();
        rows.sort_by(f64::total_cmp);
        println!(
            "| {} | {:.0} → {:.0} | {:.2} | {:.2} → {:.2} ms | {:.2} | {:.1} | {:.1} % ({:.1}–{:.1}) | {:.1} % | {:.2} → {:.2} ms | {}, {:.2} ms | {} |",
            i + 1,
            round.baseline_writes_per_s,
            round.backfill_writes_per_s,
            round.throughput_ratio,
            ms(round.baseline.p99_us),
            ms(round.backfill.p99_us),
            round.p99_ratio,
            round.backfill_seconds,
            round.share_median * 100.0,
            round.share_min * 100.0,
            round.share_max * 100.0,
            rows.get(rows.len() / 2).copied().unwrap_or(f64::NAN) * 100.0,
            ms(round.cutover_before_p99_us),
            ms(round.cutover_around_p99_us),
            round.cutover_in_flight,
            ms(round.cutover_in_flight_max_us),
            round.cutover_refused,
        );
    }
    let m = |t: (f64, f64, f64)| format!("{:.2} ({:.2}–{:.2})", t.0, t.1, t.2);
    println!(
        "\nmedian (min–max) over rounds: throughput {}, p99 {}, share {}, cutover p99 delta {} µs",
        m(r.throughput_ratio),
        m(r.p99_ratio),
        m(r.share),
        m(r.cutover_p99_delta_us)
    );
    println!(
        "abort: p50 {:.2} ms, max {:.2} ms; idle backfill of {} rows: {:.2} s, {:.0} rows/s, {:.1} MB/s",
        ms(r.abort.p50_us),
        ms(r.abort.max_us),
        r.idle.rows,
        r.idle.seconds,
        r.idle.rows_per_s,
        r.idle.mb_per_s
    );
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    println!(
        "resident during the idle migration: {:.1} → peak {:.1} MiB (+{:.1} MiB) for a table of {:.1} MiB of rows",
        mib(r.idle.resident_before),
        mib(r.idle.resident_peak),
        mib(r.idle.resident_peak.saturating_sub(r.idle.resident_before)),
        mib(r.idle.table_bytes)
    );
}
