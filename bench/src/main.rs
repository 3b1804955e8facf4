//! `oc-bench`: measures oc against baselines run in the same process, on the same
//! file system, in the same minute. Each subcommand writes JSON and prints a Markdown
//! table; numbers are quoted as ratios to the baseline because this machine is shared.

mod archive;
mod ask;
mod audit;
mod engine;
mod http;
mod latency;
mod lease;
mod memory;
mod migration;
mod pacer;
mod peers;
mod pinning;
mod pool;
mod raw_disk;
mod recovery;
mod report;
mod server;
mod wal;
mod watch;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "oc-bench",
    version,
    about = "Benchmarks for oc against raw-disk baselines"
)]
struct Cli {
    /// CPUs the `oc-server` processes oc-bench starts may use (`1`, `0,2`, `2-3`); such
    /// a server takes one shard per CPU. Recorded in the results.
    #[arg(long, global = true)]
    server_cpus: Option<String>,
    /// CPUs oc-bench itself runs on (the load generator and every thread it starts).
    /// Recorded in the results.
    #[arg(long, global = true)]
    client_cpus: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The write-ahead log against raw O_DIRECT writes and write+fdatasync.
    Wal(wal::WalArgs),
    /// Durable row writes through a shard, latency during checkpoints, recovery speed.
    Engine(engine::EngineArgs),
    /// Recovery speed: one log reopened with no checkpoint (replay) and from a
    /// checkpoint, several times each, alternated; medians with the range.
    Recovery(recovery::RecoveryArgs),
    /// Open-loop HTTP load (fixed arrival rate) against a running oc-server.
    Http(http::HttpArgs),
    /// The same durable-write workload on oc, SQLite, RocksDB (feature) and the raw disk.
    Peers(peers::PeersArgs),
    /// Archive shipping: its cost on write throughput, RPO after kill -9 and restore,
    /// restore speed (needs oc-server and oc-pitr next to oc-bench).
    Archive(archive::ArchiveArgs),
    /// `/ask` queries (point, index range, aggregate, exact kNN) at a fixed rate through
    /// an oc-server it starts, with the REST read and an in-process scan as baselines.
    Ask(ask::AskArgs),
    /// `/watch`: delivery latency at 1, 100 and 1,000 streams, and the cost of 1,000
    /// idle streams to writers (through an oc-server it starts).
    Watch(watch::WatchArgs),
    /// What recording operator actions in the audit log costs: table creation and drop
    /// against a one-row write, and reading the log back (through an oc-server it starts).
    Audit(audit::AuditArgs),
    /// Online schema migrations: writers' throughput and p99 during a backfill against
    /// without, the backfill's share of their bytes, the cutover, aborts, an idle
    /// backfill (through an oc-server it starts).
    Migration(migration::MigrationArgs),
    /// One lease renewal (a conditional put) on an archive: its latency percentiles
    /// against the drift margin a writer keeps before its lease could run out.
    Lease(lease::LeaseArgs),
    /// Resident memory per stored row byte: the server's resident growth over the
    /// tenant's stored bytes after loading rows (through an oc-server it starts).
    Memory(memory::MemoryArgs),
    /// Re-render Markdown tables and SVG charts from a directory of JSON results.
    Report(report::ReportArgs),
    /// Run wal, engine, recovery, peers, http, ask and archive (the last three against oc-servers
    /// it starts), then render the report (`--quick`: small sizes, a few minutes).
    All(AllArgs),
}

#[derive(clap::Args)]
struct AllArgs {
    /// Directory on the file system to measure (not tmpfs).
    #[arg(long)]
    dir: std::path::PathBuf,
    /// Where the JSON, Markdown and SVG results go.
    #[arg(long, default_value = "docs/bench")]
    out: std::path::PathBuf,
    /// One second per phase and fewer concurrencies: the whole run in a few minutes.
    #[arg(long)]
    quick: bool,
}

fn run_all(args: AllArgs) -> anyhow::Result<()> {
    let seconds = if args.quick { 1.0 } else { 5.0 };
    std::fs::create_dir_all(&args.out)?;
    let common = |name: &str| RunArgs {
        dir: args.dir.join(name),
        seconds,
        json: Some(args.out.join(format!("{name}.json"))),
    };
    let started = std::time::Instant::now();
    eprintln!("== oc-bench wal");
    wal::run(wal::WalArgs {
        common: common("wal"),
        concurrency: if args.quick {
            vec![1, 64]
        } else {
            vec![1, 16, 64, 256]
        },
    })?;
    eprintln!(
        "== oc-bench engine ({:.0} s so far)",
        started.elapsed().as_secs_f64()
    );
    engine::run(engine::EngineArgs {
        common: common("engine"),
        concurrency: if args.quick {
            vec![1, 64]
        } else {
            vec![1, 64, 256]
        },
        shards: None,
        no_pin: false,
        checkpoint_only: false,
    })?;
    eprintln!(
        "== oc-bench recovery ({:.0} s so far)",
        started.elapsed().as_secs_f64()
    );
    recovery::run(recovery::RecoveryArgs {
        dir: args.dir.join("recovery"),
        rows: if args.quick { 100_000 } else { 1_000_000 },
        runs: 3,
        reuse: false,
        json: Some(args.out.join("recovery.json")),
    })?;
    // Its log and checkpoint (most of a gigabyte at full size) are not needed again.
    std::fs::remove_dir_all(args.dir.join("recovery"))?;
    eprintln!(
        "== oc-bench peers ({:.0} s so far)",
        started.elapsed().as_secs_f64()
    );
    peers::run(peers::PeersArgs {
        common: common("peers"),
        concurrency: vec![1, 16, 64],
    })?;
    eprintln!(
        "== oc-bench http ({:.0} s so far)",
        started.elapsed().as_secs_f64()
    );
    let http_data = args.dir.join("http-data");
    if http_data.exists() {
        std::fs::remove_dir_all(&http_data)?;
    }
    match server::Spawned::start(&http_data, &["--archive", "none"])? {
        Some(server) => {
            let outcome = http::run(http::HttpArgs {
                url: server.url.clone(),
                rate: if args.quick { 2_000 } else { 10_000 },
                seconds: if args.quick { 3.0 } else { 10.0 },
                mix: "90:10".into(),
                connections: 64,
                rows: if args.quick { 10_000 } else { 100_000 },
                tenant: http::TENANT.into(),
                json: Some(args.out.join("http.json")),
                admin_token_file: None,
                ca_cert: None,
                no_floor: false,
                metrics_url: Some(server.ops_url.clone()),
                sweep: Vec::new(),
            });
            server.stop()?;
            outcome?;
        }
        None => eprintln!("no oc-server next to oc-bench: skipping http (build it with `cargo build --release --bin oc-server`)"),
    }
    let next_to_us = |bin: &str| {
        std::env::current_exe()
            .map(|exe| exe.with_file_name(bin).exists())
            .unwrap_or(false)
    };
    if !next_to_us("oc-server") {
        eprintln!("no oc-server next to oc-bench: skipping ask and archive");
    } else {
        eprintln!(
            "== oc-bench ask ({:.0} s so far)",
            started.elapsed().as_secs_f64()
        );
        ask::run(ask::AskArgs {
            dir: args.dir.join("ask"),
            rows: if args.quick { 10_000 } else { 100_000 },
            dim: 128,
            rate: if args.quick { 1_000 } else { 5_000 },
            seconds: if args.quick { 3.0 } else { 10.0 },
            connections: 32,
            knn_rate: if args.quick { 10 } else { 40 },
            knn_seconds: if args.quick { 3.0 } else { 10.0 },
            json: Some(args.out.join("ask.json")),
        })?;
        if next_to_us("oc-pitr") {
            eprintln!(
                "== oc-bench archive ({:.0} s so far)",
                started.elapsed().as_secs_f64()
            );
            archive::run(archive::ArchiveArgs {
                common: common("archive"),
                kills: if args.quick { 1 } else { 5 },
                writers: 32,
                pairs: if args.quick { 2 } else { 6 },
            })?;
        } else {
            eprintln!("no oc-pitr next to oc-bench: skipping archive");
        }
    }
    let rendered = report::render_dir(&args.out, &args.out)?;
    eprintln!(
        "== done in {:.0} s: {} rendered into {}",
        started.elapsed().as_secs_f64(),
        rendered.join(", "),
        args.out.display()
    );
    Ok(())
}

/// Flags every subcommand takes.
#[derive(clap::Args)]
pub struct RunArgs {
    /// Directory on the file system to measure (not tmpfs: it ignores O_DIRECT).
    #[arg(long)]
    dir: std::path::PathBuf,
    /// Seconds per measured phase.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Where to write the JSON results (the Markdown table and SVG charts go beside it).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The shards it runs in-process allocate as the server's do.
    if let Err(why) = oc_io::malloc_tuning::reexec_with_larger_thread_cache() {
        eprintln!("oc-bench: {why}");
    }
    pinning::apply(pinning::Pinning {
        server_cpus: cli.server_cpus,
        client_cpus: cli.client_cpus,
    })?;
    match cli.command {
        Command::Wal(args) => wal::run(args),
        Command::Engine(args) => engine::run(args),
        Command::Recovery(args) => recovery::run(args),
        Command::Http(args) => http::run(args),
        Command::Peers(args) => peers::run(args),
        Command::Archive(args) => archive::run(args),
        Command::Ask(args) => ask::run(args),
        Command::Watch(args) => watch::run(args),
        Command::Audit(args) => audit::run(args),
        Command::Migration(args) => migration::run(args),
        Command::Lease(args) => lease::run(args),
        Command::Memory(args) => memory::run(args),
        Command::Report(args) => report::run(args),
        Command::All(args) => run_all(args),
    }
}
