//! `oc-bench`: measures oc against baselines run in the same process, on the same
//! file system, in the same minute. Each subcommand writes JSON and prints a Markdown
//! table; numbers are quoted as ratios to the baseline because this machine is shared.

mod engine;
mod http;
mod latency;
mod pool;
mod raw_disk;
mod wal;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "oc-bench",
    version,
    about = "Benchmarks for oc against raw-disk baselines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The write-ahead log against raw O_DIRECT writes and write+fdatasync.
    Wal(wal::WalArgs),
    /// Durable row writes through a shard, latency during checkpoints, recovery speed.
    Engine(engine::EngineArgs),
    /// Open-loop HTTP load (fixed arrival rate) against a running oc-server.
    Http(http::HttpArgs),
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
    /// Where to write the JSON results.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Wal(args) => wal::run(args),
        Command::Engine(args) => engine::run(args),
        Command::Http(args) => http::run(args),
    }
}
