//! `oc-bench audit`: what recording operator actions costs, through a real `oc-server`
//! it starts. One connection runs rounds of (create a table, write one row, drop the
//! table), so the three share the same minutes: a table's creation and drop each make
//! two audit appends (each one write and one fdatasync) around one log append, the row
//! write one log append only, so the row write is the baseline. Then `GET
//! /v1/audit/logs` (the newest 100 entries) over the log those rounds left.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::json;

use crate::http::{create_tenant_and_table, parse_url, Connection};
use crate::latency::{histogram, Percentiles};
use crate::server::Spawned;

#[derive(clap::Args)]
pub struct AuditArgs {
    /// Data directory for the server it starts (wiped first; on the disk to measure).
    #[arg(long, default_value = "/tmp/oc-bench-audit")]
    dir: std::path::PathBuf,
    /// Rounds of (create table, write a row, drop table).
    #[arg(long, default_value_t = 500)]
    rounds: usize,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

const TENANT: &str = "bench-audit";

#[derive(Serialize)]
struct AuditReport {
    /// `--server-cpus` and `--client-cpus`, as given.
    #[serde(default)]
    pinning: crate::pinning::Pinning,
    rounds: usize,
    row_write: Percentiles,
    table_create: Percentiles,
    table_drop: Percentiles,
    /// Median of an action over the median row write.
    create_over_write_p50: f64,
    drop_over_write_p50: f64,
    audit_entries: usize,
    read_newest_100: Percentiles,
}

fn table(name: &str) -> serde_json::Value {
    json!({
        "name": name,
        "columns": [{"name": "id", "type": "int"}, {"name": "v", "type": "text", "nullable": true}],
        "primary_key": ["id"],
    })
}

pub fn run(args: AuditArgs) -> Result<()> {
    if args.rounds == 0 {
        bail!("--rounds must be above 0");
    }
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir)?;
    let server = Spawned::start(&args.dir.join("data"), &["--archive", "none"])?
        .context("no oc-server next to oc-bench (cargo build --release --bin oc-server)")?;
    let target = parse_url(&server.url)?;
    let report = oc_io::executor::run_local(async {
        let mut conn = Connection::open(&target).await?;
        create_tenant_and_table(&mut conn, TENANT, &table("rows")).await?;
        let (mut write, mut create, mut drop) = (histogram(), histogram(), histogram());
        let tables = format!("/v1/tenants/{TENANT}/tables");
        let rows = format!("/v1/tenants/{TENANT}/tables/rows/rows");
        for round in 0..args.rounds {
            let name = format!("t{round}");
            let started = Instant::now();
            let status = conn
                .request("POST", &tables, Some(&table(&name).to_string()))
                .await?;
            create.record(started.elapsed().as_micros() as u64)?;
            if status != 201 {
                bail!("creating table {name} answered {status}");
            }
            let row = json!({"ops": [{"upsert": {"id": round, "v": "x"}}]}).to_string();
            let started = Instant::now();
            let status = conn.request("POST", &rows, Some(&row)).await?;
            write.record(started.elapsed().as_micros() as u64)?;
            if status != 200 {
                bail!("writing a row answered {status}");
            }
            let started = Instant::now();
            let status = conn
                .request("DELETE", &format!("{tables}/{name}"), None)
                .await?;
            drop.record(started.elapsed().as_micros() as u64)?;
            if status != 200 {
                bail!("dropping table {name} answered {status}");
            }
        }
        let mut read = histogram();
        let mut entries = 0;
        for _ in 0..50 {
            let started = Instant::now();
            let status = conn
                .request("GET", "/v1/audit/logs?limit=100", None)
                .await?;
            read.record(started.elapsed().as_micros() as u64)?;
            if status != 200 {
                bail!("reading the audit log answered {status}");
            }
            let body: serde_json::Value = serde_json::from_slice(conn.body())?;
            entries = body["entries"].as_array().map_or(0, Vec::len);
        }
        let ratio = |h: &hdrhistogram::Histogram<u64>| {
            h.value_at_quantile(0.5) as f64 / write.value_at_quantile(0.5).max(1) as f64
        };
        Ok::<_, anyhow::Error>(AuditReport {
            pinning: crate::pinning::current(),
            rounds: args.rounds,
            row_write: Percentiles::of(&write),
            table_create: Percentiles::of(&create),
            table_drop: Percentiles::of(&drop),
            create_over_write_p50: ratio(&create),
            drop_over_write_p50: ratio(&drop),
            audit_entries: entries,
            read_newest_100: Percentiles::of(&read),
        })
    })?;
    server.stop()?;
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(path) = &args.json {
        crate::report::write_output(path, &text)?;
    }
    Ok(())
}
