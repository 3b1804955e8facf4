//! `oc-bench archive`: what archive shipping costs and what it saves.
//!
//! - Overhead: closed-loop durable single-row writes through the real `oc-server`, with
//!   `--archive none` and with a local-directory archive, alternated in `--pairs`
//!   pairs (none, archive, none, archive, …) so drift on a shared machine hits both;
//!   the cost is the median of the pairs' `1 - with / without`, with its range.
//! - RPO: writers run, the server is killed with SIGKILL at a random moment, the data
//!   directory is wiped, `oc-pitr restore --target latest` rebuilds it and a fresh
//!   server reads back every acknowledged write. RPO = kill time minus the ack time of
//!   the oldest acknowledged write that is missing (0 when none is).
//! - Restore speed: bytes `oc-pitr` read from the local archive per second.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::json;

use crate::http::{parse_url, prepare, Connection, TABLE, TENANT};
use crate::server::Spawned;

#[derive(clap::Args)]
pub struct ArchiveArgs {
    #[command(flatten)]
    pub(crate) common: crate::RunArgs,
    /// Kill-and-restore cycles for the RPO figures.
    #[arg(long, default_value_t = 5)]
    pub(crate) kills: usize,
    /// Concurrent writers (one keep-alive connection each).
    #[arg(long, default_value_t = 32)]
    pub(crate) writers: usize,
    /// Runs without and with shipping, alternated: the cost is the median of the
    /// pairs' costs (a few percent needs several pairs on a noisy host).
    #[arg(long, default_value_t = 6)]
    pub(crate) pairs: usize,
}

#[derive(Serialize)]
struct ArchiveReport {
    machine: crate::wal::Machine,
    writers: usize,
    seconds: f64,
    commits_per_s_without: Vec<f64>,
    commits_per_s_with: Vec<f64>,
    /// Each pair's cost, `1 - with / without`, in %, in run order.
    #[serde(default)]
    pair_costs_pct: Vec<f64>,
    /// The median of `pair_costs_pct`.
    overhead_pct: f64,
    tail_window_ms: u64,
    rpo_ms: Vec<u64>,
    lost_writes: Vec<u64>,
    acked_writes: Vec<u64>,
    restore_bytes: u64,
    restore_seconds: f64,
    restore_mb_per_s: f64,
}

const TAIL_WINDOW_MS: u64 = 500;

/// Closed-loop writers for `seconds`; returns (id, ack time) of each acknowledged write.
fn drive_writes(
    url: &str,
    writers: usize,
    seconds: f64,
    first_id: u64,
) -> Result<Vec<(u64, Instant)>> {
    let target = parse_url(url)?;
    oc_io::executor::run_local(async move {
        prepare(&target, TENANT, 0).await?;
        let acked = Rc::new(RefCell::new(Vec::new()));
        let until = Instant::now() + Duration::from_secs_f64(seconds);
        let target = Rc::new(target);
        let tasks: Vec<_> = (0..writers as u64)
            .map(|w| {
                let (acked, target) = (acked.clone(), target.clone());
                glommio::spawn_local(async move {
                    let Ok(mut conn) = Connection::open(&target).await else {
                        return;
                    };
                    let path = format!("/v1/tenants/{TENANT}/tables/{TABLE}/rows");
                    let mut id = first_id + w * 100_000_000;
                    while Instant::now() < until {
                        let body =
                            json!({"ops": [{"upsert": {"id": id, "body": format!("{id:0>180}")}}]})
                                .to_string();
                        match conn.request("POST", &path, Some(&body)).await {
                            Ok(200) => acked.borrow_mut().push((id, Instant::now())),
                            Ok(_) => {}
                            Err(_) => return, // the server is gone (killed)
                        }
                        id += 1;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await;
        }
        let acked = acked.borrow().clone();
        Ok(acked)
    })
}

/// Which of `ids` the server at `url` has.
fn present(url: &str, ids: &[u64]) -> Result<Vec<bool>> {
    let target = parse_url(url)?;
    let ids = ids.to_vec();
    oc_io::executor::run_local(async move {
        let mut conn = Connection::open(&target).await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let path = format!("/v1/tenants/{TENANT}/tables/{TABLE}/rows/{id}");
            match conn.request("GET", &path, None).await? {
                200 => out.push(true),
                404 => out.push(false),
                status => bail!("reading row {id} answered {status}"),
            }
        }
        Ok(out)
    })
}

fn pitr_restore(archive: &str, data: &Path) -> Result<(u64, f64)> {
    let exe = std::env::current_exe()?.with_file_name("oc-pitr");
    let started = Instant::now();
    let out = Command::new(&exe)
        .args([
            "restore",
            "--archive",
            archive,
            "--target",
            "latest",
            "--data-dir",
        ])
        .arg(data)
        .output()
        .with_context(|| {
            format!(
                "running {} (build it with --release next to oc-bench)",
                exe.display()
            )
        })?;
    let secs = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "oc-pitr restore failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let bytes = stdout
        .lines()
        .find_map(|l| l.strip_prefix("restored ")?.split(' ').next()?.parse().ok())
        .context("oc-pitr printed no byte count")?;
    Ok((bytes, secs))
}

fn fresh(dir: &Path) -> Result<PathBuf> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    Ok(dir.to_path_buf())
}

pub fn run(args: ArchiveArgs) -> Result<()> {
    let root = args.common.dir.clone();
    std::fs::create_dir_all(&root)?;
    let seconds = args.common.seconds;
    let window = TAIL_WINDOW_MS.to_string();
    let (mut without, mut with) = (Vec::new(), Vec::new());
    let mut restore = (0, 0.0);
    if args.pairs == 0 {
        anyhow::bail!("--pairs must be at least 1");
    }
    for round in 0..args.pairs {
        for shipping in [false, true] {
            let data = fresh(&root.join("data"))?;
            let archive_dir = fresh(&root.join("archive"))?;
            let uri = format!("file://{}", archive_dir.display());
            let extra = if shipping {
                vec![
                    "--archive",
                    uri.as_str(),
                    "--tail-window-ms",
                    window.as_str(),
                ]
            } else {
                vec!["--archive", "none"]
            };
            let server = Spawned::start(&data, &extra)?.context("no oc-server next to oc-bench")?;
            let acked = drive_writes(&server.url, args.writers, seconds, 0)?;
            server.stop()?;
            let rate = acked.len() as f64 / seconds;
            eprintln!(
                "round {round}: {} commits/s {}",
                rate.round(),
                if shipping {
                    "shipping"
                } else {
                    "without an archive"
                }
            );
            if shipping {
                with.push(rate);
                restore = pitr_restore(&uri, &fresh(&root.join("restored"))?)?;
            } else {
                without.push(rate);
            }
        }
    }
    let pair_costs_pct: Vec<f64> = without
        .iter()
        .zip(&with)
        .map(|(base, shipped)| (1.0 - shipped / base) * 100.0)
        .collect();
    let overhead_pct = median(&pair_costs_pct);

    let (mut rpo_ms, mut lost_writes, mut acked_writes) = (Vec::new(), Vec::new(), Vec::new());
    for kill in 0..args.kills {
        let data = fresh(&root.join("data"))?;
        let archive_dir = fresh(&root.join("archive"))?;
        let uri = format!("file://{}", archive_dir.display());
        let server = Spawned::start(&data, &["--archive", &uri, "--tail-window-ms", &window])?
            .context("no oc-server next to oc-bench")?;
        let url = server.url.clone();
        let run_for = 2.0 + fastrand_below(3000) as f64 / 1000.0;
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs_f64(run_for));
            let at = Instant::now();
            server.kill9().map(|()| at)
        });
        let acked = drive_writes(&url, args.writers, run_for + 1.0, 0)?;
        let killed_at = killer
            .join()
            .map_err(|_| anyhow::anyhow!("killer thread"))??;
        std::fs::remove_dir_all(&data)?;
        pitr_restore(&uri, &data)?;
        let server = Spawned::start(&data, &["--archive", "none"])?.context("restart")?;
        let ids: Vec<u64> = acked.iter().map(|(id, _)| *id).collect();
        let found = present(&server.url, &ids)?;
        server.stop()?;
        let oldest_lost = acked
            .iter()
            .zip(&found)
            .filter(|(_, found)| !**found)
            .map(|((_, at), _)| *at)
            .min();
        let rpo = oldest_lost.map_or(0, |at| {
            killed_at.saturating_duration_since(at).as_millis() as u64
        });
        let lost = found.iter().filter(|f| !**f).count() as u64;
        eprintln!(
            "kill {kill}: {} acked, {lost} lost, RPO {rpo} ms",
            acked.len()
        );
        rpo_ms.push(rpo);
        lost_writes.push(lost);
        acked_writes.push(acked.len() as u64);
    }
    let report = ArchiveReport {
        machine: crate::wal::machine(&root),
        writers: args.writers,
        seconds,
        commits_per_s_without: without,
        commits_per_s_with: with,
        pair_costs_pct,
        overhead_pct,
        tail_window_ms: TAIL_WINDOW_MS,
        rpo_ms,
        lost_writes,
        acked_writes,
        restore_bytes: restore.0,
        restore_seconds: restore.1,
        restore_mb_per_s: restore.0 as f64 / 1e6 / restore.1.max(1e-9),
    };
    let markdown = markdown(&report);
    println!("{markdown}");
    if let Some(json_path) = &args.common.json {
        crate::report::write_output(json_path, &serde_json::to_string_pretty(&report)?)?;
        crate::report::write_output(&json_path.with_extension("md"), &markdown)?;
    }
    Ok(())
}

/// The middle value (the mean of the two middle ones for an even count).
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn fastrand_below(n: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    oc_io::SimRng::new(nanos).below(n)
}

fn markdown(r: &ArchiveReport) -> String {
    let mut sorted = r.rpo_ms.clone();
    sorted.sort_unstable();
    let p50 = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
    let max = sorted.last().copied().unwrap_or(0);
    let (low, high) = r
        .pair_costs_pct
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &c| {
            (lo.min(c), hi.max(c))
        });
    format!(
        "| measure | value |\n|---|---|\n\
         | commits/s without an archive, median ({} writers, {} s per run, {} runs alternated with the next row) | {:.0} |\n\
         | commits/s shipping to a local archive | {:.0} |\n\
         | shipping's cost on throughput, median of the pairs (min–max) | {:.1} % ({:.1} to {:.1} %) |\n\
         | RPO over {} kill -9 cycles, tail window {} ms: p50 / max | {} ms / {} ms |\n\
         | acknowledged writes lost per cycle | {:?} of {:?} |\n\
         | restore from the local archive | {:.1} MB in {:.2} s = {:.0} MB/s |\n\n\
         Machine: {} cores, kernel {}, {}.\n",
        r.writers,
        r.seconds,
        r.commits_per_s_without.len(),
        median(&r.commits_per_s_without),
        median(&r.commits_per_s_with),
        r.overhead_pct,
        low,
        high,
        r.rpo_ms.len(),
        r.tail_window_ms,
        p50,
        max,
        r.lost_writes,
        r.acked_writes,
        r.restore_bytes as f64 / 1e6,
        r.restore_seconds,
        r.restore_mb_per_s,
        r.machine.cores,
        r.machine.kernel,
        r.machine.file_system
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_is_the_middle_value() {
        assert_eq!(median(&[3.0, -1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }
}
