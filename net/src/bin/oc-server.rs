//! `oc-server`: parses flags and calls library code.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "oc-server", version, about = "The oc storage engine server")]
struct Args {
    /// Data directory (created if missing).
    #[arg(long, env = "OC_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    /// Cut the write-ahead log at the first corrupt frame instead of refusing to start.
    /// Frames after the cut are lost: use only after reading the error and the runbook.
    #[arg(long, env = "OC_TRUNCATE_CORRUPT_WAL")]
    truncate_corrupt_wal: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print write-ahead log segment files frame by frame (read only).
    InspectWal {
        /// Segment files (`wal-*.seg`).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Command::InspectWal { files }) = args.command {
        for file in files {
            print!("{}", oc_net::inspect_wal_file(&file)?);
        }
        return Ok(());
    }
    let (report, probe) = oc_net::recover_wal(&args.data_dir, args.truncate_corrupt_wal)?;
    println!("io_uring: {probe:?}");
    println!(
        "write-ahead log recovered: {} segment(s), {} frame(s), last LSN {}, torn tail: {:?}",
        report.segments.len(),
        report.frames_scanned,
        report.last_lsn,
        report.torn_tail
    );
    println!(
        "oc-server: the HTTP API is not built yet; recovery ran and the log is closed cleanly."
    );
    Ok(())
}
