//! `oc-server`'s configuration: every flag has an `OC_*` environment variable and a
//! default that works on a laptop (docs/OPERATIONS.md lists them all).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::api::ApiLimits;

/// Server settings (flattened into the binary's arguments).
#[derive(Args, Debug, Clone)]
pub struct ServerConfig {
    /// Data directory (created if missing).
    #[arg(long, env = "OC_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Address of the data API. Every shard listens on it (SO_REUSEPORT).
    #[arg(long, env = "OC_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Address of /health, /ready and /metrics, served off the data shards.
    #[arg(long, env = "OC_OPS_LISTEN", default_value = "127.0.0.1:7071")]
    pub ops_listen: SocketAddr,
    /// Data shards (default: one per CPU). Fixed for the life of a data directory.
    #[arg(long, env = "OC_SHARDS")]
    pub shards: Option<usize>,
    /// Do not pin shards to CPUs (for machines shared with other heavy processes).
    #[arg(long, env = "OC_NO_PIN")]
    pub no_pin: bool,
    /// Cut the write-ahead log at the first corrupt frame instead of refusing to start.
    /// Frames after the cut are lost: use only after reading the error and the runbook.
    #[arg(long, env = "OC_TRUNCATE_CORRUPT_WAL")]
    pub truncate_corrupt_wal: bool,
    /// Serve on a non-loopback address without authentication. The API has no auth
    /// yet, so any other address is refused unless this is given.
    #[arg(long, env = "OC_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    /// Largest request body accepted (bytes); larger gets 413.
    #[arg(long, env = "OC_MAX_BODY_BYTES", default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Open client connections across all shards; more are answered 503 and closed.
    #[arg(long, env = "OC_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// Requests one tenant may have running at once; more get 429.
    #[arg(long, env = "OC_MAX_IN_FLIGHT_PER_TENANT", default_value_t = 256)]
    pub max_in_flight_per_tenant: usize,
    /// Time for a client to send a request's headers (slow clients are cut off).
    #[arg(long, env = "OC_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_read_timeout_ms: u64,
    /// Time for a client to send a request's body; then 408.
    #[arg(long, env = "OC_BODY_READ_TIMEOUT_MS", default_value_t = 30_000)]
    pub body_read_timeout_ms: u64,
    /// Idle keep-alive connections are closed after this long.
    #[arg(long, env = "OC_IDLE_TIMEOUT_MS", default_value_t = 60_000)]
    pub idle_timeout_ms: u64,
    /// A request not answered within this long gets 503 `deadline_exceeded`.
    #[arg(long, env = "OC_REQUEST_DEADLINE_MS", default_value_t = 30_000)]
    pub request_deadline_ms: u64,
    /// On SIGTERM/SIGINT, how long in-flight requests get to finish.
    #[arg(long, env = "OC_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,
    /// Checkpoint every this many seconds...
    #[arg(long, env = "OC_CHECKPOINT_INTERVAL_S", default_value_t = 3600)]
    pub checkpoint_interval_s: u64,
    /// ...or sooner, once a shard's log has grown by this many bytes.
    #[arg(long, env = "OC_CHECKPOINT_WAL_BYTES", default_value_t = 1 << 30)]
    pub checkpoint_wal_bytes: u64,
    /// Log format: `text` or `json`.
    #[arg(long, env = "OC_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

impl ServerConfig {
    pub fn api_limits(&self) -> ApiLimits {
        ApiLimits {
            max_body_bytes: self.max_body_bytes,
            body_read_timeout: Duration::from_millis(self.body_read_timeout_ms),
            request_deadline: Duration::from_millis(self.request_deadline_ms),
            max_in_flight_per_tenant: self.max_in_flight_per_tenant,
        }
    }

    /// Refuses settings that cannot work, with what to change.
    pub fn validate(&self) -> Result<(), String> {
        let exposed = [self.listen, self.ops_listen]
            .into_iter()
            .find(|a| !a.ip().is_loopback());
        if let Some(addr) = exposed {
            if !self.insecure_no_auth {
                return Err(format!(
                    "refusing to listen on {addr}: the API has no authentication yet, so only \
                     loopback addresses are allowed; pass --insecure-no-auth to serve {addr} anyway"
                ));
            }
        }
        if self.max_body_bytes < 1024 {
            return Err("--max-body-bytes must be at least 1024".into());
        }
        for (name, value) in [
            ("--max-connections", self.max_connections as u64),
            (
                "--max-in-flight-per-tenant",
                self.max_in_flight_per_tenant as u64,
            ),
            ("--header-read-timeout-ms", self.header_read_timeout_ms),
            ("--body-read-timeout-ms", self.body_read_timeout_ms),
            ("--idle-timeout-ms", self.idle_timeout_ms),
            ("--request-deadline-ms", self.request_deadline_ms),
            ("--checkpoint-interval-s", self.checkpoint_interval_s),
        ] {
            if value == 0 {
                return Err(format!("{name} must be above 0"));
            }
        }
        Ok(())
    }
}
