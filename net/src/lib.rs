//! `oc-net` will own the HTTP/1.1 API on glommio (hyper), TLS, auth and rate limits,
//! Prometheus exposition, SSE, the replication protocol, configuration, and the
//! `oc-server` binary. It contains no storage logic.
//!
//! Built so far: the `oc-server` entry point runs write-ahead-log recovery on the data
//! directory and reports it; the HTTP API arrives with the server issue.
#![deny(clippy::unwrap_used)]

use std::path::Path;

use oc_ship::engine::io::{self, DmaStorage, Lsn, RecoveryReport, UringProbe, Wal, WalConfig};

/// Recovers shard 0's write-ahead log under `data_dir` and closes it cleanly.
pub fn recover_wal(
    data_dir: &Path,
    truncate_corrupt: bool,
) -> io::Result<(RecoveryReport, UringProbe)> {
    let probe = io::probe_io_uring();
    let wal_dir = data_dir.join("shard-0").join("wal");
    let report = io::executor::run_local(async move {
        let storage = DmaStorage::open(&wal_dir).await?;
        let config = WalConfig {
            truncate_corrupt,
            ..WalConfig::default()
        };
        let (wal, report) = Wal::open(storage, config, Lsn(1), |_| Ok(())).await?;
        wal.close().await?;
        Ok::<_, io::Error>(report)
    })?;
    Ok((report, probe))
}

/// Describes one segment file frame by frame (see `oc_io::wal::inspect`).
pub fn inspect_wal_file(path: &Path) -> anyhow::Result<String> {
    use anyhow::Context;
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(io::wal::inspect::describe_segment(
        &path.display().to_string(),
        &bytes,
    ))
}
