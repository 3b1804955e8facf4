//! `oc-bench watch`: `/watch` through a real `oc-server` it starts.
//!
//! 1. Delivery latency: for each subscriber count (`--subscribers`, e.g. 1,100,1000)
//!    that many streams watch the table while single-row writes are offered at a fixed
//!    rate; each event's arrival is matched with its write's acknowledgement (by LSN).
//!    Reported: acknowledgement → event at every subscriber, p50/p99/max, events
//!    missing (must be 0), and the writes' own latency for scale.
//! 2. Cost to writers: closed-loop write throughput with no stream, then with
//!    `--idle-subscribers` streams that watch the tenant but filter every change away
//!    (each change still reaches every stream's queue), alternated `--rounds` times.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use glommio::Task;
use serde::Serialize;
use serde_json::{json, Value};

use crate::http::{create_tenant_and_table, parse_url, Connection, Target};
use crate::latency::histogram;
use crate::server::Spawned;

#[derive(clap::Args)]
pub struct WatchArgs {
    /// Data directory for the server it starts (wiped first).
    #[arg(long, default_value = "/tmp/oc-bench-watch")]
    dir: std::path::PathBuf,
    /// Subscriber counts for the latency phase, comma-separated.
    #[arg(long, default_value = "1,100,1000")]
    subscribers: String,
    /// Offered single-row writes per second in the latency phase.
    #[arg(long, default_value_t = 200)]
    rate: u64,
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Streams in the cost phase (watching the tenant, filtering every change away).
    #[arg(long, default_value_t = 1000)]
    idle_subscribers: usize,
    /// Closed-loop writer connections in the cost phase.
    #[arg(long, default_value_t = 32)]
    writers: usize,
    #[arg(long, default_value_t = 5.0)]
    throughput_seconds: f64,
    /// Alternations of (no streams, idle streams) in the cost phase.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

const TENANT: &str = "bench-watch";
const WRITE_CONNECTIONS: usize = 8;

#[derive(Serialize)]
struct LatencyRun {
    subscribers: usize,
    offered_rate: u64,
    writes_acked: u64,
    write_errors: u64,
    write_p50_us: u64,
    write_p99_us: u64,
    /// Acknowledgement → event, over every (write, subscriber) pair.
    events: u64,
    events_missing: u64,
    /// Events that arrived before their write's answer was read (counted as 0 µs).
    events_before_ack: u64,
    delivery_p50_us: u64,
    delivery_p99_us: u64,
    delivery_max_us: u64,
}

#[derive(Serialize)]
struct CostRound {
    writes_per_s_without: f64,
    writes_per_s_with_idle_streams: f64,
}

#[derive(Serialize)]
struct WatchReport {
    /// `--server-cpus` and `--client-cpus`, as given.
    #[serde(default)]
    pinning: crate::pinning::Pinning,
    latency: Vec<LatencyRun>,
    idle_subscribers: usize,
    writers: usize,
    rounds: Vec<CostRound>,
    /// Median over rounds of (with streams / without).
    throughput_ratio_median: f64,
}

pub fn run(args: WatchArgs) -> Result<()> {
    let counts: Vec<usize> = args
        .subscribers
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()
        .context("--subscribers is a comma-separated list of counts")?;
    if args.rate == 0 || args.writers == 0 || args.rounds == 0 {
        bail!("--rate, --writers and --rounds must be above 0");
    }
    raise_open_files();
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir)?;
    let server = Spawned::start(
        &args.dir.join("data"),
        &[
            "--archive",
            "none",
            "--max-connections",
            "4096",
            "--watch-max-streams",
            "10000",
            "--watch-max-streams-per-tenant",
            "10000",
        ],
    )?
    .context("no oc-server next to oc-bench (cargo build --release --bin oc-server)")?;
    let target = Rc::new(parse_url(&server.url)?);
    let report = oc_io::executor::run_local(async {
        prepare(&target).await?;
        let mut latency = Vec::new();
        for &n in &counts {
            eprintln!(
                "{n} subscribers, writes at {}/s for {} s...",
                args.rate, args.seconds
            );
            latency.push(latency_run(&target, n, args.rate, args.seconds).await?);
        }
        let mut rounds = Vec::new();
        for round in 0..args.rounds {
            eprintln!(
                "cost round {}: no streams, then {} idle streams...",
                round + 1,
                args.idle_subscribers
            );
            let without = closed_loop(&target, args.writers, args.throughput_seconds).await?;
            let streams = subscribe(&target, args.idle_subscribers, "?tables=not_written").await?;
            let with = closed_loop(&target, args.writers, args.throughput_seconds).await?;
            drop(streams);
            rounds.push(CostRound {
                writes_per_s_without: without,
                writes_per_s_with_idle_streams: with,
            });
        }
        Ok::<_, anyhow::Error>((latency, rounds))
    })?;
    server.stop()?;
    let (latency, rounds) = report;
    let mut ratios: Vec<f64> = rounds
        .iter()
        .map(|r| r.writes_per_s_with_idle_streams / r.writes_per_s_without)
        .collect();
    ratios.sort_by(f64::total_cmp);
    let report = WatchReport {
        pinning: crate::pinning::current(),
        latency,
        idle_subscribers: args.idle_subscribers,
        writers: args.writers,
        rounds,
        throughput_ratio_median: ratios[ratios.len() / 2],
    };
    print_markdown(&report);
    if let Some(path) = &args.json {
        crate::report::write_output(path, &serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

/// Many streams need many descriptors: raise the soft limit to the hard one.
fn raise_open_files() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a stack value this function owns.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

async fn prepare(target: &Target) -> Result<()> {
    let mut conn = Connection::open(target).await?;
    let table = json!({"name": "items", "columns": [{"name": "id", "type": "int"}, {"name": "v", "type": "text"}], "primary_key": ["id"]});
    create_tenant_and_table(&mut conn, TENANT, &table).await
}

fn write_body(id: u64) -> String {
    json!({"ops": [{"upsert": {"id": id, "v": "value"}}]}).to_string()
}

/// The LSN in a write's answer.
fn answered_lsn(body: &[u8]) -> Option<u64> {
    serde_json::from_slice::<Value>(body).ok()?["lsn"].as_u64()
}

/// (LSN, arrival) of every change one stream read.
type Arrivals = Rc<RefCell<Vec<(u64, Instant)>>>;

/// Open streams, each recording its arrivals.
struct Streams {
    arrivals: Vec<Arrivals>,
    _readers: Vec<Task<()>>,
}

/// Opens `n` streams and waits until each has its `hello`.
async fn subscribe(target: &Rc<Target>, n: usize, query: &str) -> Result<Streams> {
    let ready = Rc::new(Cell::new(0usize));
    let mut arrivals = Vec::new();
    let mut readers = Vec::new();
    for _ in 0..n {
        let mut conn = Connection::open(target).await?;
        let status = conn
            .open_stream(&format!("/v1/tenants/{TENANT}/watch{query}"))
            .await?;
        if status != 200 {
            bail!("opening a stream: status {status}");
        }
        let seen = Rc::new(RefCell::new(Vec::new()));
        let (ready, record) = (ready.clone(), seen.clone());
        readers.push(glommio::spawn_local(async move {
            let mut said_hello = false;
            while let Ok(Some(chunk)) = conn.next_chunk().await {
                let now = Instant::now();
                for line in chunk.split(|&b| b == b'\n') {
                    if line.starts_with(b"event: hello") && !said_hello {
                        said_hello = true;
                        ready.set(ready.get() + 1);
                    }
                    if let Some(data) = line.strip_prefix(b"data: {\"table\"") {
                        if let Some(lsn) = lsn_in(data) {
                            record.borrow_mut().push((lsn, now));
                        }
                    }
                }
            }
        }));
        arrivals.push(seen);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while ready.get() < n {
        if Instant::now() > deadline {
            bail!("only {} of {n} streams said hello within 60 s", ready.get());
        }
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    Ok(Streams {
        arrivals,
        _readers: readers,
    })
}

/// The number after `"lsn":` in an event's data.
fn lsn_in(data: &[u8]) -> Option<u64> {
    let at = data.windows(6).position(|w| w == b"\"lsn\":")? + 6;
    let digits: Vec<u8> = data[at..]
        .iter()
        .copied()
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

async fn latency_run(target: &Rc<Target>, n: usize, rate: u64, seconds: f64) -> Result<LatencyRun> {
    let streams = subscribe(target, n, "").await?;
    let acks: Rc<RefCell<HashMap<u64, Instant>>> = Rc::default();
    let write_latency = Rc::new(RefCell::new(histogram()));
    let errors = Rc::new(Cell::new(0u64));
    let total = (rate as f64 * seconds) as u64;
    let next = Rc::new(Cell::new(0u64));
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now() + Duration::from_millis(100);
    let mut writers = Vec::new();
    for _ in 0..WRITE_CONNECTIONS {
        let mut conn = Connection::open(target).await?;
        let (acks, write_latency, errors, next) = (
            acks.clone(),
            write_latency.clone(),
            errors.clone(),
            next.clone(),
        );
        writers.push(glommio::spawn_local(async move {
            loop {
                let i = next.get();
                if i >= total {
                    return Ok::<_, anyhow::Error>(());
                }
                next.set(i + 1);
                let due = start + interval * i as u32;
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    glommio::timer::sleep(wait).await;
                }
                let body = write_body(1_000_000 + i);
                let status = conn
                    .request(
                        "POST",
                        &format!("/v1/tenants/{TENANT}/tables/items/rows"),
                        Some(&body),
                    )
                    .await?;
                let now = Instant::now();
                match answered_lsn(conn.body()).filter(|_| status == 200) {
                    Some(lsn) => {
                        acks.borrow_mut().insert(lsn, now);
                        write_latency.borrow_mut().saturating_record(
                            now.saturating_duration_since(due).as_micros() as u64,
                        );
                    }
                    None => errors.set(errors.get() + 1),
                }
            }
        }));
    }
    for writer in writers {
        writer.await?;
    }
    // Events still in flight get a moment to arrive.
    glommio::timer::sleep(Duration::from_millis(500)).await;
    let acks = acks.borrow();
    let mut delivery = histogram();
    let (mut matched, mut early) = (0u64, 0u64);
    for seen in &streams.arrivals {
        for (lsn, at) in seen.borrow().iter() {
            if let Some(ack) = acks.get(lsn) {
                matched += 1;
                if at < ack {
                    early += 1;
                }
                delivery.saturating_record(at.saturating_duration_since(*ack).as_micros() as u64);
            }
        }
    }
    let expected = acks.len() as u64 * n as u64;
    let write_latency = write_latency.borrow();
    Ok(LatencyRun {
        subscribers: n,
        offered_rate: rate,
        writes_acked: acks.len() as u64,
        write_errors: errors.get(),
        write_p50_us: write_latency.value_at_quantile(0.5),
        write_p99_us: write_latency.value_at_quantile(0.99),
        events: matched,
        events_missing: expected.saturating_sub(matched),
        events_before_ack: early,
        delivery_p50_us: delivery.value_at_quantile(0.5),
        delivery_p99_us: delivery.value_at_quantile(0.99),
        delivery_max_us: delivery.max(),
    })
}

/// Acknowledged single-row writes per second from `connections` closed loops.
async fn closed_loop(target: &Rc<Target>, connections: usize, seconds: f64) -> Result<f64> {
    let done = Rc::new(Cell::new(0u64));
    let next_id = Rc::new(Cell::new(10_000_000u64));
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let mut conn = Connection::open(target).await?;
        let (done, next_id) = (done.clone(), next_id.clone());
        tasks.push(glommio::spawn_local(async move {
            while Instant::now() < end {
                let id = next_id.get();
                next_id.set(id + 1);
                let status = conn
                    .request(
                        "POST",
                        &format!("/v1/tenants/{TENANT}/tables/items/rows"),
                        Some(&write_body(id)),
                    )
                    .await?;
                if status == 200 {
                    done.set(done.get() + 1);
                }
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    let started = Instant::now();
    for task in tasks {
        task.await?;
    }
    Ok(done.get() as f64 / started.elapsed().as_secs_f64())
}

fn print_markdown(report: &WatchReport) {
    println!("| subscribers | writes/s offered | writes acked | events | missing | ack → event p50 | p99 | max | write p50 | write p99 |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &report.latency {
        println!(
            "| {} | {} | {} | {} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
            r.subscribers,
            r.offered_rate,
            r.writes_acked,
            r.events,
            r.events_missing,
            r.delivery_p50_us as f64 / 1e3,
            r.delivery_p99_us as f64 / 1e3,
            r.delivery_max_us as f64 / 1e3,
            r.write_p50_us as f64 / 1e3,
            r.write_p99_us as f64 / 1e3,
        );
    }
    println!();
    println!(
        "| round | writes/s, no streams | writes/s, {} idle streams | ratio |",
        report.idle_subscribers
    );
    println!("|---|---|---|---|");
    for (i, r) in report.rounds.iter().enumerate() {
        println!(
            "| {} | {:.0} | {:.0} | {:.2} |",
            i + 1,
            r.writes_per_s_without,
            r.writes_per_s_with_idle_streams,
            r.writes_per_s_with_idle_streams / r.writes_per_s_without
        );
    }
    println!("\nmedian ratio: {:.2}", report.throughput_ratio_median);
}
