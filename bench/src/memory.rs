//! `oc-bench memory`: what the server's resident memory grows by per byte of row data
//! it stores, through a real `oc-server` it starts. The denominator is the tenant's
//! usage as the server reports it (`GET /v1/tenants/:t/usage`, bytes as stored: the
//! figure quotas count), the numerator the growth of the process's resident set
//! (`VmRSS`) from just before the first row to after the last.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::json;

use crate::http::{create_tenant_and_table, parse_url, Connection};
use crate::server::Spawned;

#[derive(clap::Args)]
pub struct MemoryArgs {
    /// Data directory for the server it starts (wiped first).
    #[arg(long, default_value = "/tmp/oc-bench-memory")]
    dir: std::path::PathBuf,
    /// Rows to store (int key, `--text-bytes` of text each).
    #[arg(long, default_value_t = 200_000)]
    rows: usize,
    #[arg(long, default_value_t = 200)]
    text_bytes: usize,
    /// Give each row a `vector(DIM)` column too (0: none).
    #[arg(long, default_value_t = 0)]
    dim: usize,
    /// Write the keys in a scattered order (each id a fixed stride after the last,
    /// modulo `--rows`) instead of ascending: the row tree's nodes then fill as they do
    /// under random keys, not as under in-order ones.
    #[arg(long)]
    shuffled: bool,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

const TENANT: &str = "bench-memory";
/// Upserts per request: well under the server's batch limit.
const BATCH_ROWS: usize = 500;
/// Request bytes per batch, about: well under the server's body limit.
const BATCH_BYTES: usize = 256 * 1024;

#[derive(Serialize)]
struct MemoryReport {
    #[serde(default)]
    pinning: crate::pinning::Pinning,
    rows: usize,
    text_bytes: usize,
    /// The vector column's dimension (0: the table has none).
    #[serde(default)]
    dim: usize,
    /// "ascending" or "shuffled" (`--shuffled`).
    key_order: &'static str,
    /// The tenant's stored bytes as the server counts them.
    stored_bytes: u64,
    resident_before_bytes: u64,
    resident_after_bytes: u64,
    /// Resident growth per stored byte.
    resident_per_stored_byte: f64,
}

/// The resident set of process `pid` (`VmRSS` in `/proc/<pid>/status`).
pub(crate) fn resident_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("no VmRSS line")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib * 1024)
}

/// A stride through `0..rows` that visits every id once (coprime with `rows`) and puts
/// consecutive writes far apart (near the golden ratio of `rows`).
fn scattering_stride(rows: usize) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let mut stride = (rows as f64 * 0.618_034) as usize;
    while gcd(stride.max(1), rows) != 1 {
        stride += 1;
    }
    stride.max(1)
}

/// The `i`-th id written: `i × stride` modulo `rows`, without overflow.
fn scattered(i: usize, stride: usize, rows: usize) -> usize {
    (i as u128 * stride as u128 % rows as u128) as usize
}

pub fn run(args: MemoryArgs) -> Result<()> {
    if args.rows == 0 {
        bail!("--rows must be above 0");
    }
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir)?;
    let server = Spawned::start(&args.dir.join("data"), &["--archive", "none"])?
        .context("no oc-server next to oc-bench (cargo build --release --bin oc-server)")?;
    let target = parse_url(&server.url)?;
    let pid = server.pid();
    let text = "x".repeat(args.text_bytes);
    let stride = if args.shuffled {
        scattering_stride(args.rows)
    } else {
        1
    };
    let (before, stored) = oc_io::executor::run_local(async {
        let mut conn = Connection::open(&target).await?;
        let mut columns = vec![
            json!({"name": "id", "type": "int"}),
            json!({"name": "body", "type": "text"}),
        ];
        if args.dim > 0 {
            columns.push(json!({"name": "emb", "type": format!("vector({})", args.dim)}));
        }
        let table = json!({"name": "rows", "columns": columns, "primary_key": ["id"]});
        // A float is written in at most 8 characters below.
        let batch = (BATCH_BYTES / (args.text_bytes + 9 * args.dim + 32)).clamp(1, BATCH_ROWS);
        create_tenant_and_table(&mut conn, TENANT, &table).await?;
        // Let the server settle (its first requests allocate buffers of their own).
        glommio::timer::sleep(Duration::from_millis(500)).await;
        let before = resident_bytes(pid)?;
        let path = format!("/v1/tenants/{TENANT}/tables/rows/rows");
        for start in (0..args.rows).step_by(batch) {
            let ops: Vec<_> = (start..(start + batch).min(args.rows))
                .map(|i| {
                    let id = scattered(i, stride, args.rows);
                    let mut row = json!({"id": id, "body": text});
                    if args.dim > 0 {
                        let emb: Vec<f64> = (0..args.dim)
                            .map(|j| ((id * 31 + j * 17) % 1000) as f64 / 1000.0)
                            .collect();
                        row["emb"] = json!(emb);
                    }
                    json!({ "upsert": row })
                })
                .collect();
            let status = conn
                .request("POST", &path, Some(&json!({ "ops": ops }).to_string()))
                .await?;
            if status != 200 {
                bail!(
                    "writing rows answered {status}: {}",
                    String::from_utf8_lossy(conn.body())
                );
            }
        }
        let status = conn
            .request("GET", &format!("/v1/tenants/{TENANT}/usage"), None)
            .await?;
        if status != 200 {
            bail!("reading usage answered {status}");
        }
        let usage: serde_json::Value = serde_json::from_slice(conn.body())?;
        let stored = usage["bytes"].as_u64().context("usage has no bytes")?;
        Ok::<_, anyhow::Error>((before, stored))
    })?;
    // The memory sampler and the allocator settle too.
    std::thread::sleep(Duration::from_millis(500));
    let after = resident_bytes(pid)?;
    server.stop()?;
    let report = MemoryReport {
        pinning: crate::pinning::current(),
        rows: args.rows,
        text_bytes: args.text_bytes,
        dim: args.dim,
        key_order: if args.shuffled {
            "shuffled"
        } else {
            "ascending"
        },
        stored_bytes: stored,
        resident_before_bytes: before,
        resident_after_bytes: after,
        resident_per_stored_byte: after.saturating_sub(before) as f64 / stored.max(1) as f64,
    };
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(path) = &args.json {
        crate::report::write_output(path, &text)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{scattered, scattering_stride};

    #[test]
    fn the_scattered_order_writes_every_id_once() {
        for rows in [1, 2, 10, 500, 200_000, 1_000_003] {
            let stride = scattering_stride(rows);
            let mut seen = vec![false; rows];
            for i in 0..rows {
                seen[scattered(i, stride, rows)] = true;
            }
            assert!(seen.iter().all(|&s| s), "rows {rows}, stride {stride}");
        }
    }
}
