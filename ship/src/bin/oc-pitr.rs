//! `oc-pitr`: list, verify and restore an oc archive.
//!
//! ```text
//! oc-pitr list    --archive file:///backups/oc
//! oc-pitr verify  --archive file:///backups/oc
//! oc-pitr restore --archive file:///backups/oc --target 2026-11-23T10:15:30Z --data-dir /var/lib/oc-restored
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use oc_io::fail_stop::LineFormat;
use oc_ship::archive::open_existing_archive;
use oc_ship::catalog::{read_archive_manifest, ShardCatalog};
use oc_ship::drill;
use oc_ship::restore::{self, LATEST};

/// `restore`'s exit status when it wrote a usable directory that stops at a gap in the
/// archive (1: `verify` found problems; 2: the command failed).
const RESTORED_SHORT: u8 = 3;
use oc_ship::timeline::{self, Timeline};
use oc_ship::timestamp::{format_rfc3339, parse_rfc3339};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "oc-pitr",
    version,
    about = "List, verify and restore an oc archive"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How results are printed.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Text,
    /// One JSON document on stdout (progress stays on stderr).
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Checkpoints, segment ranges and tails per shard, from the archive's listing.
    List {
        /// The archive: file://<dir> or s3://bucket/prefix.
        #[arg(long, env = "OC_ARCHIVE")]
        archive: String,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Reads every object: checksums, frames, LSN continuity; prints the restorable
    /// window. Exits 1 if anything is wrong.
    Verify {
        #[arg(long, env = "OC_ARCHIVE")]
        archive: String,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// The restore rehearsal: restores the latest restore point into a scratch
    /// directory, opens every shard as the server does, checks every table (rows,
    /// indexes, usage), reports the restore point's age and the restore time, and
    /// removes the scratch directory. With --live, also measures the RPO achieved and
    /// compares every table the live server has not written since the restore point.
    /// Exits 1 if anything is wrong.
    Drill {
        #[arg(long, env = "OC_ARCHIVE")]
        archive: String,
        /// The live server's API (`http://host:port`; https for TLS) that ships to the
        /// archive: its tables are compared with the restored ones.
        #[arg(long)]
        live: Option<String>,
        /// File holding the live server's admin token (or set OC_ADMIN_TOKEN).
        #[arg(long, env = "OC_ADMIN_TOKEN_FILE", requires = "live")]
        admin_token_file: Option<PathBuf>,
        /// Where the scratch directory goes (on a disk with room for a full restore).
        #[arg(long, default_value_os_t = std::env::temp_dir())]
        work_dir: PathBuf,
        /// Keep the restored directory (its path is printed).
        #[arg(long)]
        keep: bool,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Writes a new data directory holding the state as of --target.
    Restore {
        #[arg(long, env = "OC_ARCHIVE")]
        archive: String,
        /// An RFC 3339 instant (2026-11-23T10:15:30Z, 2026-11-23T11:15:30+01:00) or
        /// `latest`. Writes committed at or before it are restored, later ones are not.
        #[arg(long)]
        target: String,
        /// Where to write it; must be empty or absent.
        #[arg(long)]
        data_dir: PathBuf,
        /// Bootstrap a follower of the writer that ships to this archive: keep the
        /// archive's history as it is (no new epoch); start `oc-server --mode follower`
        /// on the directory (while the writer is reachable) to stream the rest.
        #[arg(long)]
        for_follower: bool,
    },
}

fn main() -> ExitCode {
    oc_io::fail_stop::end_quietly_on_closed_pipe();
    oc_io::fail_stop::install_panic_hook("oc-pitr", LineFormat::Text);
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("oc-pitr: {}", oc_ship::error_line(&e));
            ExitCode::from(2)
        }
    }
}

/// A JSON string as printed text (without quotes).
fn text(value: &serde_json::Value) -> String {
    value
        .as_str()
        .map_or_else(|| value.to_string(), str::to_string)
}

fn when(us: u64) -> String {
    match us {
        0 => "the start of the log".into(),
        u64::MAX => "unknown (manifest predates completed_us)".into(),
        us => format_rfc3339(us),
    }
}

/// A timeline of the archive's chain (current first), for `list` and `verify`.
fn timeline_json(t: &Timeline) -> serde_json::Value {
    json!({
        "name": t.name(),
        "lease_epoch": t.lease_epoch,
        "shipped": t.shipped,
        "promoted_at": t.record.as_ref().map(|r| format_rfc3339(r.promoted_at_us)),
        "continues": t.record.as_ref().map(|r| json!({
            "lease_epoch": r.parent_lease_epoch,
            "below_lsn": r.first_lsn,
        })),
    })
}

fn print_timelines(timelines: &[serde_json::Value]) {
    if timelines.len() == 1 && timelines[0]["lease_epoch"] == 1 {
        return;
    }
    for (i, t) in timelines.iter().enumerate() {
        println!(
            "timeline {} (lease epoch {}){}{}",
            text(&t["name"]),
            t["lease_epoch"],
            if i == 0 { ", current" } else { "" },
            match (t["promoted_at"].as_str(), t["continues"].as_object()) {
                (Some(at), Some(c)) => format!(
                    ": promoted {at}, continues lease epoch {} below LSNs {} (per shard)",
                    c["lease_epoch"], c["below_lsn"]
                ),
                _ if t["lease_epoch"] != 1 => {
                    ": records no branch point; nothing before it is restored through it".into()
                }
                _ => String::new(),
            }
        );
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::List { archive, output } => {
            let root = open_existing_archive(&archive)?;
            let chain = timeline::chain(&root)?;
            let timelines: Vec<_> = chain.iter().map(timeline_json).collect();
            // The newest history anything was shipped to (the root always counts).
            let listed = chain
                .iter()
                .find(|t| t.shipped)
                .unwrap_or(&chain[chain.len() - 1]);
            let archive = listed.archive.clone();
            let manifest = read_archive_manifest(archive.as_ref())?;
            let mut shards = Vec::new();
            for shard in 0..manifest.shards {
                let c = ShardCatalog::load(archive.as_ref(), shard)?;
                let checkpoints: Vec<_> = c
                    .checkpoints
                    .iter()
                    .map(|cp| json!({"lsn": cp.lsn.0, "completed": when(cp.restorable_from_us()), "rows": cp.rows, "bytes": cp.data_bytes}))
                    .collect();
                let segments: Vec<_> = c
                    .segments
                    .iter()
                    .map(|s| json!({"first_lsn": s.first_lsn.0, "last_lsn": s.last_lsn.0, "last_commit": when(s.last_commit_us)}))
                    .collect();
                let tail = c.live_tail().map(|((_, first), pieces)| {
                    json!({"first_lsn": first.0, "pieces": pieces.len(), "bytes": pieces.iter().map(|p| p.end - p.start).sum::<u64>()})
                });
                let restorable = match restore::plan_shard(&c, LATEST) {
                    Ok(plan) => json!({
                        "from_checkpoint": plan.checkpoint.as_ref().map(|c| c.lsn.0),
                        "segments": plan.segments.len(),
                        "tail": plan.tail.is_some(),
                        "stops_early": plan.stops_early,
                    }),
                    Err(why) => json!({"error": why}),
                };
                // Left out of every restore: `verify` reports them as problems.
                let damaged: Vec<_> = (c.damaged_manifests.iter())
                    .map(|why| json!({"problem": why}))
                    .collect();
                shards.push(json!({"shard": shard, "checkpoints": checkpoints, "damaged_checkpoints": damaged, "segments": segments, "tail": tail, "latest": restorable}));
            }
            if output == Output::Json {
                let listing = json!({"shards": manifest.shards, "created": format_rfc3339(manifest.created_us), "timelines": timelines, "per_shard": shards});
                println!("{}", serde_json::to_string_pretty(&listing)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "archive: {} shard(s), created {}",
                manifest.shards,
                format_rfc3339(manifest.created_us)
            );
            print_timelines(&timelines);
            for shard in &shards {
                println!("shard {}:", shard["shard"]);
                for cp in shard["checkpoints"].as_array().into_iter().flatten() {
                    println!(
                        "  checkpoint  LSN {:>12}  completed {}  {} rows, {} bytes",
                        cp["lsn"],
                        text(&cp["completed"]),
                        cp["rows"],
                        cp["bytes"]
                    );
                }
                for d in shard["damaged_checkpoints"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    println!(
                        "  checkpoint  DAMAGED, left out of restores: {}",
                        text(&d["problem"])
                    );
                }
                for s in shard["segments"].as_array().into_iter().flatten() {
                    println!(
                        "  segment     LSN {:>12} ..= {:<12} last commit {}",
                        s["first_lsn"],
                        s["last_lsn"],
                        text(&s["last_commit"])
                    );
                }
                if let Some(tail) = shard["tail"].as_object() {
                    println!(
                        // The pieces' keys give byte offsets only: where the tail
                        // ends is known once its frames are read (`verify`, restore).
                        "  tail        LSN {:>12} on   ({} piece(s), {} bytes of the active segment; \
                         `verify` reads where it ends)",
                        tail["first_lsn"], tail["pieces"], tail["bytes"]
                    );
                }
                let latest = &shard["latest"];
                match latest["error"].as_str() {
                    Some(why) => println!("  not restorable: {why}"),
                    None => println!(
                        "  restorable: latest from {} + {} segment(s){}{}",
                        latest["from_checkpoint"]
                            .as_u64()
                            .map_or("the start of the log".to_string(), |lsn| format!(
                                "checkpoint {lsn}"
                            )),
                        latest["segments"],
                        if latest["tail"] == true {
                            " + tail"
                        } else {
                            ""
                        },
                        latest["stops_early"]
                            .as_str()
                            .map(|w| format!(" (stops early: {w})"))
                            .unwrap_or_default()
                    ),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { archive, output } => {
            let root = open_existing_archive(&archive)?;
            let started = Instant::now();
            let chain = timeline::chain(&root)?;
            let timelines: Vec<_> = chain.iter().map(timeline_json).collect();
            // Every history the current one continues is checked; the current one's
            // window is the one reported per shard.
            let mut verified = Vec::with_capacity(chain.len());
            for t in &chain {
                if !t.shipped && t.lease_epoch > 1 {
                    eprintln!("{}: nothing shipped yet", t.name());
                    verified.push(Vec::new());
                    continue;
                }
                eprintln!("verifying {}", t.name());
                verified.push(restore::verify(t.archive.as_ref(), &mut |line| {
                    eprintln!("{line}")
                })?);
            }
            let bad = verified.iter().flatten().any(|s| !s.problems.is_empty());
            let (objects, bytes) = verified
                .iter()
                .flatten()
                .fold((0, 0), |(o, b), s| (o + s.objects, b + s.bytes));
            let current = chain
                .iter()
                .position(|t| t.shipped || t.lease_epoch == 1)
                .unwrap_or(0);
            let shards = &verified[current];
            let seconds = started.elapsed().as_secs_f64();
            if output == Output::Json {
                let per_shard: Vec<_> = shards
                    .iter()
                    .map(|s| {
                        json!({
                            "shard": s.shard,
                            "objects": s.objects,
                            "bytes": s.bytes,
                            "restorable_from": s.window.map(|(from, _)| when(from)),
                            "restorable_to": s.window.map(|(_, to)| when(to)),
                            "restorable_to_gap": s.window_ends_at_gap,
                            "problems": s.problems,
                            "notes": s.notes,
                        })
                    })
                    .collect();
                let older_problems: Vec<_> = chain
                    .iter()
                    .zip(&verified)
                    .skip(1)
                    .flat_map(|(t, shards)| {
                        shards.iter().flat_map(move |s| {
                            s.problems
                                .iter()
                                .map(move |p| format!("{}: shard {}: {p}", t.name(), s.shard))
                        })
                    })
                    .collect();
                let report = json!({"ok": !bad, "objects": objects, "bytes": bytes, "seconds": seconds, "timelines": timelines, "shards": per_shard, "older_timeline_problems": older_problems});
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_timelines(&timelines);
                for s in shards {
                    match s.window {
                        Some((from, to)) => println!(
                            "shard {}: restorable from {} to {}{}",
                            s.shard,
                            when(from),
                            when(to),
                            if s.window_ends_at_gap {
                                " (a gap follows: later commits are not restorable)"
                            } else {
                                ""
                            }
                        ),
                        None => println!("shard {}: nothing restorable", s.shard),
                    }
                    for p in &s.problems {
                        println!("shard {}: PROBLEM {p}", s.shard);
                    }
                    for n in &s.notes {
                        println!("shard {}: note: {n}", s.shard);
                    }
                }
                for (t, shards) in chain.iter().zip(&verified).skip(1) {
                    for s in shards {
                        for p in &s.problems {
                            println!("{}: shard {}: PROBLEM {p}", t.name(), s.shard);
                        }
                    }
                }
                println!(
                    "verified {objects} object(s), {bytes} bytes in {seconds:.1} s: {}",
                    if bad { "PROBLEMS FOUND" } else { "ok" }
                );
            }
            Ok(if bad {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Drill {
            archive,
            live,
            admin_token_file,
            work_dir,
            keep,
            output,
        } => {
            let archive = open_existing_archive(&archive)?;
            let live = match live {
                Some(url) => {
                    let admin_token = match admin_token_file {
                        Some(path) => Some(
                            std::fs::read_to_string(&path)
                                .with_context(|| format!("reading {}", path.display()))?
                                .trim()
                                .to_string(),
                        ),
                        None => std::env::var("OC_ADMIN_TOKEN").ok(),
                    };
                    Some(drill::LiveServer { url, admin_token })
                }
                None => None,
            };
            let report = drill::drill(&archive, &work_dir, keep, live.as_ref(), &mut |line| {
                eprintln!("{line}")
            })?;
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for s in &report.shards {
                    println!(
                        "shard {}: LSN {} committed {}; {} tenant(s), {} table(s), {} row(s) checked{}",
                        s.shard,
                        s.restored_lsn,
                        s.last_commit.as_deref().unwrap_or("(no commit after the checkpoint)"),
                        s.tenants,
                        s.tables,
                        s.rows,
                        if s.problems.is_empty() { "" } else { "; PROBLEMS:" }
                    );
                    if let Some(live) = &s.live {
                        println!(
                            "  live: LSN {} committed {}: the restore point was {} LSN(s){} behind; \
                             {} unchanged table(s) compared, {} changed since",
                            live.live_lsn,
                            live.live_last_commit.as_deref().unwrap_or("(unknown)"),
                            live.lsns_behind,
                            live.seconds_behind
                                .map_or(String::new(), |s| format!(", {s:.3} s")),
                            live.tables_compared,
                            live.tables_changed_since
                        );
                    }
                    for p in &s.problems {
                        println!("  {p}");
                    }
                }
                println!(
                    "restored {} bytes in {:.2} s, opened and checked in {:.2} s; the restore \
                     point is {}: {}",
                    report.restored_bytes,
                    report.restore_seconds,
                    report.open_seconds,
                    report
                        .restore_point_age_seconds
                        .map_or("of no commit".into(), |s| format!("{s:.1} s old")),
                    if report.ok { "ok" } else { "PROBLEMS FOUND" }
                );
                if let Some(rpo) = report.rpo_seconds {
                    println!("RPO achieved against the live server: {rpo:.3} s");
                }
                if let Some(dir) = &report.kept {
                    println!("kept the restored directory: {}", dir.display());
                }
            }
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Restore {
            archive,
            target,
            data_dir,
            for_follower,
        } => {
            let target_us = if target == "latest" {
                LATEST
            } else {
                parse_rfc3339(&target).map_err(anyhow::Error::msg)?
            };
            let archive = open_existing_archive(&archive)?;
            let started = Instant::now();
            let purpose = if for_follower {
                restore::RestoreAs::Follower
            } else {
                restore::RestoreAs::Writer
            };
            let restored =
                restore::restore_as(&archive, target_us, &data_dir, purpose, &mut |line| {
                    eprintln!("{line}")
                })?;
            let shards = restored.shards;
            let bytes: u64 = shards.iter().map(|s| s.bytes).sum();
            let secs = started.elapsed().as_secs_f64();
            for s in &shards {
                println!(
                    "shard {}: {} + {} segment(s), up to LSN {} committed {}{}",
                    s.shard,
                    s.checkpoint
                        .map_or("the start of the log".into(), |l| format!(
                            "checkpoint {}",
                            l.0
                        )),
                    s.segments,
                    s.last_lsn.0,
                    if s.last_commit_us == 0 {
                        "(none after the checkpoint)".into()
                    } else {
                        format_rfc3339(s.last_commit_us)
                    },
                    s.stops_early
                        .as_ref()
                        .map(|w| format!("; WARNING stopped early: {w}"))
                        .unwrap_or_default()
                );
            }
            let next = if for_follower {
                "Start `oc-server --mode follower --leader-addr <writer>` on it, with this \
                 --archive, while the writer is reachable: it streams the rest of the log."
            } else {
                "Start oc-server on it with a NEW --archive location: this archive holds the \
                 old history beyond the target and belongs to the old data directory."
            };
            println!(
                "restored {bytes} bytes into {} in {secs:.2} s ({:.1} MB/s) as data directory {}. \
                 {next}",
                data_dir.display(),
                bytes as f64 / 1e6 / secs.max(1e-9),
                restored.data_dir_id
            );
            // A usable directory, short of what the archive lists: a script must not
            // take it for the whole history.
            let gaps: Vec<usize> = shards.iter().filter(|s| s.gap).map(|s| s.shard).collect();
            if gaps.is_empty() {
                return Ok(ExitCode::SUCCESS);
            }
            eprintln!(
                "WARNING: shard(s) {gaps:?} stopped at a gap in the archive: writes the archive \
                 lists past it are not restored (exit status {RESTORED_SHORT}; `oc-pitr verify` \
                 names what is missing)"
            );
            Ok(ExitCode::from(RESTORED_SHORT))
        }
    }
}
