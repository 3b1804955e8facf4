//! `oc-ctl`: read-only inspection of what oc writes: log segments, checkpoints (a
//! shard directory's, without opening the shard) and archive objects. For an operator
//! deciding what to do about a damaged file, before anything is changed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use oc_engine::checkpoint::{decode_checkpoint, manifest_name, parse_manifest_name, snapshot_name};
use oc_io::fail_stop::LineFormat;
use oc_io::wal::inspect::describe_segment;
use oc_ship::archive::open_existing_archive;
use oc_ship::layout::{SegmentKey, TailPieceKey};
use oc_ship::timestamp::format_rfc3339;

#[derive(Parser)]
#[command(
    name = "oc-ctl",
    version,
    about = "Inspect oc's files and archive objects (read only)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print write-ahead log segment files frame by frame: header, each frame's offset,
    /// LSN, commit time, epoch, group index, kind, tenant and payload size, and how the
    /// valid part ends (sealed, clean, full, torn, or corrupt at an offset).
    Wal {
        /// Segment files (`wal-*.seg`).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Load every checkpoint of a shard directory (`<data-dir>/shard-<n>`), checking
    /// the manifest, the snapshot's CRC and every frame, and every table's rows and
    /// indexes; prints what each holds. Exits 1 if one is unusable.
    Checkpoints {
        /// The shard directory.
        dir: PathBuf,
    },
    /// List the keys of an archive, under a prefix (`shard-0/`, `shard-0/wal/`, ...).
    ArchiveLs {
        #[arg(long, env = "OC_ARCHIVE")]
        archive: String,
        #[arg(long, default_value = "")]
        prefix: String,
    },
    /// Fetch one archive object (its checksum is verified) and describe it: a sealed
    /// segment or a tail piece frame by frame, a manifest as its JSON.
    ArchiveShow {
        #[arg(long, env = "OC_ARCHIVE")]
        archive: String,
        key: String,
    },
}

fn main() -> ExitCode {
    oc_io::fail_stop::end_quietly_on_closed_pipe();
    oc_io::fail_stop::install_panic_hook("oc-ctl", LineFormat::Text);
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("oc-ctl: {}", oc_ship::error_line(&e));
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Wal { files } => {
            for file in files {
                let bytes =
                    std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
                print!("{}", describe_segment(&file.display().to_string(), &bytes));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Checkpoints { dir } => checkpoints(&dir),
        Command::ArchiveLs { archive, prefix } => {
            let archive = open_existing_archive(&archive)?;
            for key in archive.list(&prefix)? {
                println!("{key}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::ArchiveShow { archive, key } => {
            let archive = open_existing_archive(&archive)?;
            let (bytes, _) = archive
                .get(&key)?
                .with_context(|| format!("no object {key} in the archive"))?;
            let sealed = SegmentKey::parse(&key).is_some();
            if sealed || TailPieceKey::parse(&key).is_some_and(|p| p.start == 0) {
                let (file, _) = oc_io::wal::image::expand_image(&bytes, sealed)
                    .map_err(|why| anyhow::anyhow!("{key}: {why}"))?;
                print!("{}", describe_segment(&key, &file));
            } else if key.ends_with(".json") {
                println!("{}", String::from_utf8_lossy(&bytes));
            } else {
                println!("{key}: {} bytes (checksum verified)", bytes.len());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Loads and checks every checkpoint in `dir`, newest first.
fn checkpoints(dir: &Path) -> anyhow::Result<ExitCode> {
    let mut lsns: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|entry| parse_manifest_name(&entry.ok()?.file_name().to_string_lossy()))
        .collect();
    lsns.sort_by(|a, b| b.cmp(a));
    if lsns.is_empty() {
        // A data directory (or any other) given for a shard's: say which to give.
        if dir.join(oc_engine::placement::LAYOUT_FILE).exists() {
            anyhow::bail!(
                "{} is a data directory: give one of its shard directories ({}/shard-<n>)",
                dir.display(),
                dir.display()
            );
        }
        // A restored shard has no marker until the server's first start: its log, or
        // its place in a data directory, tells it.
        let holds_log = std::fs::read_dir(dir)?.filter_map(Result::ok).any(|entry| {
            oc_io::wal::segment::parse_segment_name(&entry.file_name().to_string_lossy()).is_some()
        });
        let in_data_dir = dir
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("shard-"))
            && dir
                .parent()
                .is_some_and(|p| p.join(oc_engine::placement::LAYOUT_FILE).exists());
        let marked = dir.join(oc_engine::placement::SHARD_MARKER_FILE).exists();
        if !holds_log && !in_data_dir && !marked {
            anyhow::bail!(
                "{} holds no checkpoint and is not a shard directory (no {}): give \
                 <data-dir>/shard-<n>",
                dir.display(),
                oc_engine::placement::SHARD_MARKER_FILE
            );
        }
        println!("{}: no checkpoint", dir.display());
    }
    let mut bad = false;
    for lsn in lsns {
        let read = |name: String| std::fs::read(dir.join(&name)).with_context(|| name);
        let loaded = read(manifest_name(lsn)).and_then(|manifest| {
            let snapshot = read(snapshot_name(lsn))?;
            Ok(decode_checkpoint(&manifest, &snapshot, lsn)?)
        });
        match loaded {
            Ok((state, info)) => {
                println!(
                    "checkpoint LSN {}: created {}, {} data bytes, CRC {:08x}: usable",
                    lsn.0,
                    format_rfc3339(info.created.0),
                    info.data_bytes,
                    info.crc
                );
                for (id, tenant) in &state.tenants {
                    for table in tenant.tables() {
                        let checked = table.check_integrity();
                        bad |= checked.is_err();
                        println!(
                            "  tenant {id} table {}: {}",
                            table.schema().name,
                            match checked {
                                Ok(rows) => format!("{rows} rows, indexes agree"),
                                Err(why) => format!("PROBLEM {why}"),
                            }
                        );
                    }
                }
            }
            Err(e) => {
                bad = true;
                println!(
                    "checkpoint LSN {}: UNUSABLE: {}",
                    lsn.0,
                    oc_ship::error_line(&e)
                );
            }
        }
    }
    Ok(if bad {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
