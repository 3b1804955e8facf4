//! `oc-bench lease`: what one lease renewal costs on an archive — the conditional put
//! ("only if the version I wrote last is still there") a replicating writer makes every
//! fifth of its TTL. A slow renewal cannot let two writers acknowledge at once (the
//! writer counts its lease from when it sent the renewal), but one slow enough makes a
//! healthy writer fence itself; the report puts the p99.9 beside the drift margin to
//! show the scale. The conditions probe (FORMAT.md §9) runs first and is timed with
//! the claim.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use oc_ship::lease::{self, LeaseHold, Renewal, Renewed};
use serde::Serialize;

use crate::latency::{histogram, Percentiles};

#[derive(clap::Args)]
pub struct LeaseArgs {
    /// The archive: `file://<dir>` or `s3://bucket/prefix?endpoint=…` (a fresh
    /// location: the benchmark claims it for a data directory of its own).
    #[arg(long)]
    archive: String,
    /// Renewals to time.
    #[arg(long, default_value_t = 2000)]
    renewals: usize,
    /// Pause between renewals (a writer renews every fifth of its TTL: 2 s by default;
    /// shorter here to collect a p99.9 in minutes).
    #[arg(long, default_value_t = 20)]
    interval_ms: u64,
    /// The drift margin to judge the p99.9 against (oc-server's default).
    #[arg(long, default_value_t = 1000)]
    max_drift_ms: u64,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Serialize)]
struct LeaseReport {
    archive: String,
    renewals: usize,
    interval_ms: u64,
    claim_with_probe_us: u64,
    renewal: Percentiles,
    failed: usize,
    max_drift_ms: u64,
    /// The renewal p99.9 over the drift margin.
    p999_share_of_margin: f64,
}

pub fn run(args: LeaseArgs) -> Result<()> {
    if args.renewals == 0 {
        bail!("--renewals must be above 0");
    }
    let archive: Arc<dyn oc_ship::archive::Archive> = oc_ship::archive::open_archive(&args.archive)
        .with_context(|| format!("opening {}", args.archive))?;
    let owner = format!("bench-{}", std::process::id());
    let holder = lease::this_process("oc-bench", std::path::Path::new("/oc-bench/lease"));
    let started = Instant::now();
    lease::check_conditions(archive.as_ref()).context("the conditions probe")?;
    let claim = lease::claim_with_ttl(
        archive.as_ref(),
        &owner,
        holder,
        oc_io::TimestampMicros::now().0,
        lease::LEASE_STALE,
        Some(Duration::from_secs(10)),
    )
    .context("claiming the archive (use a fresh location)")?;
    let claim_with_probe_us = started.elapsed().as_micros() as u64;
    let hold = Arc::new(LeaseHold::new(Instant::now(), Duration::from_secs(3600)));
    let mut renewal = Renewal::new(archive.clone(), claim, hold);
    let mut times = histogram();
    let mut failed = 0;
    for _ in 0..args.renewals {
        std::thread::sleep(Duration::from_millis(args.interval_ms));
        let sent = Instant::now();
        match renewal.renew(oc_io::TimestampMicros::now().0) {
            Renewed::Yes => {
                times.record(sent.elapsed().as_micros().max(1) as u64)?;
            }
            Renewed::Failed(e) => {
                failed += 1;
                eprintln!("renewal failed: {e}");
            }
            Renewed::Displaced(_) => bail!("displaced: another process wrote the lease"),
        }
    }
    let renewal = Percentiles::of(&times);
    let report = LeaseReport {
        archive: args
            .archive
            .split('?')
            .next()
            .unwrap_or_default()
            .to_string(),
        renewals: args.renewals,
        interval_ms: args.interval_ms,
        claim_with_probe_us,
        renewal,
        failed,
        max_drift_ms: args.max_drift_ms,
        p999_share_of_margin: renewal.p999_us as f64 / (args.max_drift_ms as f64 * 1000.0),
    };
    // The record stays: the location is the benchmark's, as the flag says.
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(path) = &args.json {
        crate::report::write_output(path, &text)?;
    }
    Ok(())
}
