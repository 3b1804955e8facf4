//! `oc-server`'s configuration: every flag has an `OC_*` environment variable and a
//! default that works on a laptop (docs/OPERATIONS.md lists them all).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::Args;
use oc_engine::limits::MAX_ROW_BYTES;
use oc_engine::record::MAX_ONE_ROW_RECORD_BYTES;
use oc_io::wal::DEFAULT_MAX_GROUP_BYTES;
use oc_io::{align_up, WalConfig, BLOCK_SIZE};

use crate::api::watch::WatchLimits;
use crate::api::ApiLimits;
use crate::auth::{AuthConfig, MIN_ADMIN_TOKEN_BYTES};
use crate::rate_limit::RateLimit;
use oc_engine::query::AskLimits;
use oc_engine::TenantQuotas;

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
    #[arg(long, env = "OC_NO_PIN", value_parser = BoolishValueParser::new())]
    pub no_pin: bool,
    /// Microseconds an idle shard spins before parking (0: park at once). Lowers
    /// latency when shards have cores to themselves; wastes CPU when they do not.
    #[arg(long, env = "OC_SPIN_BEFORE_PARK_US", default_value_t = 0)]
    pub spin_before_park_us: u64,
    /// Cut the write-ahead log at the first corrupt frame (or go on without a lost
    /// newest segment) instead of refusing to start. Frames after the cut are lost: use
    /// only after reading the error and the runbook.
    #[arg(long, env = "OC_TRUNCATE_CORRUPT_WAL", value_parser = BoolishValueParser::new())]
    pub truncate_corrupt_wal: bool,
    /// File holding the admin token (at least 16 bytes; surrounding whitespace is
    /// trimmed), or set the token itself in OC_ADMIN_TOKEN. With a token, every API
    /// request must authenticate.
    #[arg(long, env = "OC_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// The admin token itself (prefer the file: command lines are visible to others).
    #[arg(
        long = "admin-token",
        env = "OC_ADMIN_TOKEN",
        hide_env_values = true,
        hide = true
    )]
    pub admin_token: Option<String>,
    /// Start even when --data-dir is on tmpfs, ramfs or overlay (a container's writable
    /// layer), where writes are not durable: for throwaway servers only.
    #[arg(long, env = "OC_ALLOW_UNSAFE_FS", value_parser = BoolishValueParser::new())]
    pub allow_unsafe_fs: bool,
    /// Serve on a non-loopback address without authentication (no admin token).
    #[arg(long, env = "OC_INSECURE_NO_AUTH", value_parser = BoolishValueParser::new())]
    pub insecure_no_auth: bool,
    /// Export each request's span to this OTLP/HTTP traces endpoint
    /// (`http://collector:4318/v1/traces`; `/v1/traces` is added to a bare
    /// `http://host:port`). Off when absent.
    #[arg(long, env = "OC_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// The `service.name` of exported spans.
    #[arg(long, env = "OC_OTLP_SERVICE_NAME", default_value = "oc-server")]
    pub otlp_service_name: String,
    /// More resource attributes of exported spans, `key=value,key=value`
    /// (`cloud.region=eu-west-1`); `host.name` is added unless given.
    #[arg(long, env = "OC_OTLP_RESOURCE_ATTRIBUTES", default_value = "")]
    pub otlp_resource_attributes: String,
    /// Share of the requests that are neither failed (5xx) nor slow whose span is
    /// exported, 0 to 1. Failed and slow ones always are.
    #[arg(long, env = "OC_OTLP_SAMPLE_RATIO", default_value_t = 0.01)]
    pub otlp_sample_ratio: f64,
    /// A request at least this slow (ms) always has its span exported.
    #[arg(long, env = "OC_OTLP_SLOW_MS", default_value_t = 100)]
    pub otlp_slow_ms: u64,
    /// Requests per second one API key may sustain; more get 429.
    #[arg(long, env = "OC_RATE_LIMIT_RPS", default_value_t = 1000.0)]
    pub rate_limit_rps: f64,
    /// Requests one API key may send at once above its sustained rate.
    #[arg(long, env = "OC_RATE_LIMIT_BURST", default_value_t = 2000.0)]
    pub rate_limit_burst: f64,
    /// Largest request body accepted (bytes); larger gets 413.
    #[arg(long, env = "OC_MAX_BODY_BYTES", default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Open client connections across all shards; at the limit the connection idle the
    /// longest makes room, and with none idle a new one is answered 503 and closed.
    #[arg(long, env = "OC_MAX_CONNECTIONS", default_value_t = 1024)]
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
    /// The least a client must send of a request body, in bytes a second on average
    /// after its first 5 s; slower gets 408 (0: no minimum).
    #[arg(long, env = "OC_MIN_BODY_BYTES_PER_S", default_value_t = 1024)]
    pub min_body_bytes_per_s: u64,
    /// A connection with no request in flight and no byte moved for this long is closed
    /// (an idle keep-alive connection goes at the header-read timeout first: hyper
    /// counts that from the end of the last answer).
    #[arg(long, env = "OC_IDLE_TIMEOUT_MS", default_value_t = 60_000)]
    pub idle_timeout_ms: u64,
    /// The least a client must take of an answer or a `/watch` stream, in bytes a
    /// second, while the server waits on it: slower for 10 s and it is disconnected
    /// (0: no minimum).
    #[arg(long, env = "OC_MIN_SEND_BYTES_PER_S", default_value_t = 65_536)]
    pub min_send_bytes_per_s: u64,
    /// A request not answered within this long gets 503 `deadline_exceeded`.
    #[arg(long, env = "OC_REQUEST_DEADLINE_MS", default_value_t = 30_000)]
    pub request_deadline_ms: u64,
    /// How long a read with `min_lsn` waits for this server to apply that LSN (capped
    /// by the request deadline).
    #[arg(long, env = "OC_MIN_LSN_WAIT_MS", default_value_t = 2_000)]
    pub min_lsn_wait_ms: u64,
    /// Rows one /ask query may return.
    #[arg(long, env = "OC_ASK_MAX_ROWS", default_value_t = 10_000)]
    pub ask_max_rows: usize,
    /// Rows (or vectors) one /ask query may read.
    #[arg(long, env = "OC_ASK_MAX_SCAN_ROWS", default_value_t = 5_000_000)]
    pub ask_max_scan_rows: usize,
    /// Wall-clock limit of one /ask query, in milliseconds (at most the request deadline).
    #[arg(long, env = "OC_ASK_TIMEOUT_MS", default_value_t = 5_000)]
    pub ask_timeout_ms: u64,
    /// Bytes one /ask query may hold while it runs (rows it buffers to sort or
    /// return, sort keys, groups); more gets 413 `query_memory_exceeded`.
    #[arg(long, env = "OC_ASK_MAX_MEMORY_BYTES", default_value_t = 64 << 20)]
    pub ask_max_memory_bytes: usize,
    /// Bytes all running `/ask` queries may hold together, on top of the memory budget
    /// (0: an eighth of it); a query that would pass it gets 429 `query_memory_busy`, one
    /// that alone needs more 413 `query_memory_exceeded`.
    #[arg(long, env = "OC_ASK_SHARED_MEMORY_BYTES", default_value_t = 0)]
    pub ask_shared_memory_bytes: u64,
    /// Bytes one tenant's running `/ask` queries and unread answers may hold of
    /// `--ask-shared-memory-bytes` (0: half of it), so one tenant cannot take it all;
    /// past it 429 `query_memory_busy`.
    #[arg(long, env = "OC_ASK_TENANT_MEMORY_BYTES", default_value_t = 0)]
    pub ask_tenant_memory_bytes: u64,
    /// Rows one tenant may store; a write past it gets 403 `quota_exceeded`.
    #[arg(long, env = "OC_TENANT_MAX_ROWS", default_value_t = 50_000_000)]
    pub tenant_max_rows: usize,
    /// Bytes of rows (as stored) one tenant may hold.
    #[arg(long, env = "OC_TENANT_MAX_BYTES", default_value_t = 4 << 30)]
    pub tenant_max_bytes: usize,
    /// Vectors one tenant may store.
    #[arg(long, env = "OC_TENANT_MAX_VECTORS", default_value_t = 5_000_000)]
    pub tenant_max_vectors: usize,
    /// Resident memory, less what running `/ask` queries hold, past which writes that add
    /// data are refused (507 `memory_full`); 0: 80% of the machine's or the cgroup's
    /// memory.
    #[arg(long, env = "OC_MEMORY_BUDGET_BYTES", default_value_t = 0)]
    pub memory_budget_bytes: u64,
    /// `/watch` streams the whole server may serve at once, at most three quarters of
    /// `--max-connections`; more get 503 `watch_server_limit`.
    #[arg(long, env = "OC_WATCH_MAX_STREAMS", default_value_t = 2_000)]
    pub watch_max_streams: usize,
    /// `/watch` streams one tenant may hold open; more get 429 `watch_tenant_limit`.
    #[arg(long, env = "OC_WATCH_MAX_STREAMS_PER_TENANT", default_value_t = 200)]
    pub watch_max_streams_per_tenant: usize,
    /// Bytes of events a `/watch` stream may have waiting for its reader before it gets
    /// `overflow` and is closed.
    #[arg(long, env = "OC_WATCH_BUFFER_BYTES", default_value_t = 1 << 20)]
    pub watch_buffer_bytes: usize,
    /// A `/watch` stream with nothing else to send writes a comment this often (keeps
    /// proxies and the idle timeout from cutting it).
    #[arg(long, env = "OC_WATCH_HEARTBEAT_MS", default_value_t = 15_000)]
    pub watch_heartbeat_ms: u64,
    /// On SIGTERM/SIGINT, how long in-flight requests get to finish.
    #[arg(long, env = "OC_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,
    /// Checkpoint every this many seconds...
    #[arg(long, env = "OC_CHECKPOINT_INTERVAL_S", default_value_t = 3600)]
    pub checkpoint_interval_s: u64,
    /// ...or sooner, once a shard's log has grown by this many bytes. A checkpoint
    /// writes at 16 MB/s while its shard's log writes (32 MB/s while it is quiet), faster
    /// (up to 32 MB/s) when it needs to, to end before the log grows by this much since
    /// it started, or within 4 minutes.
    #[arg(long, env = "OC_CHECKPOINT_WAL_BYTES", default_value_t = 1 << 30)]
    pub checkpoint_wal_bytes: u64,
    /// Bytes per write-ahead log segment (a multiple of 4096, at least 274432 so that a
    /// row of the largest legal size fits one log record, at most 4 GiB). Sealed
    /// segments are what the archive receives whole.
    #[arg(long, env = "OC_WAL_SEGMENT_BYTES", default_value_t = 64 << 20)]
    pub wal_segment_bytes: u64,
    /// Where sealed segments, checkpoints and tails are shipped: `file://<dir>`,
    /// `s3://bucket/prefix`, or `none`. Default: the directory `<data-dir>-archive`
    /// next to the data directory (same machine: point it elsewhere in production).
    #[arg(long, env = "OC_ARCHIVE")]
    pub archive: Option<String>,
    /// How often the durable tail of the active segment is shipped (the bound on
    /// what losing the machine can lose, plus the upload time).
    #[arg(long, env = "OC_TAIL_WINDOW_MS", default_value_t = 500)]
    pub tail_window_ms: u64,
    /// How long archived checkpoints and segments are kept: `90s`, `30m`, `12h`, `7d`.
    /// The newest checkpoint older than this, and the log after it, are always kept.
    #[arg(long, env = "OC_ARCHIVE_RETENTION", default_value = "7d", value_parser = parse_duration)]
    pub archive_retention: Duration,
    /// How long the audit log of operator actions is kept, here and in the archive:
    /// `400d`, `90d`, … Whole files go (8 MiB each), so a little more may stay.
    #[arg(long, env = "OC_AUDIT_RETENTION", default_value = "400d", value_parser = parse_duration)]
    pub audit_retention: Duration,
    /// How long the archive's circuit breaker stays open after 5 failed rounds in a
    /// row before one trial upload.
    #[arg(long, env = "OC_ARCHIVE_BREAKER_OPEN_MS", default_value_t = 30_000)]
    pub archive_breaker_open_ms: u64,
    /// For tests only: how often the archive's owner record (`lease.json`) is renewed.
    /// A copy of this data directory is refused while the record is less than 3 times
    /// this old. Every server on one archive must use the same value; production keeps
    /// the default (10 s). Hidden from `--help`.
    #[arg(long, env = "OC_LEASE_RENEW_MS", default_value_t = 10_000, hide = true)]
    pub lease_renew_ms: u64,
    /// `writer` takes writes and serves followers (with --replication-listen);
    /// `follower` replicates the writer at --leader-addr and serves reads only.
    #[arg(long, env = "OC_MODE", default_value = "writer", value_parser = ["writer", "follower"])]
    pub mode: String,
    /// The writer's replication listener, `host:port` (follower mode).
    #[arg(long, env = "OC_LEADER_ADDR")]
    pub leader_addr: Option<String>,
    /// PEM certificates the writer's certificate must chain to (follower mode): the
    /// follower then speaks TLS to the writer, whose replication listener serves TLS
    /// when it has --tls-cert (the API's certificate; a promoted follower's too).
    #[arg(long, env = "OC_LEADER_CA")]
    pub leader_ca: Option<PathBuf>,
    /// Where a writer listens for followers (off when absent).
    #[arg(long, env = "OC_REPLICATION_LISTEN")]
    pub replication_listen: Option<SocketAddr>,
    /// File holding the token followers present to the writer (at least 16
    /// characters); without it, the admin token is the replication token.
    #[arg(long, env = "OC_REPLICATION_TOKEN_FILE")]
    pub replication_token_file: Option<PathBuf>,
    /// Acknowledge a write only once --sync-replicas followers hold it durable.
    #[arg(long, env = "OC_SYNC_REPLICATION", value_parser = BoolishValueParser::new())]
    pub sync_replication: bool,
    /// How many followers must hold a write with --sync-replication.
    #[arg(long, env = "OC_SYNC_REPLICAS", default_value_t = 1)]
    pub sync_replicas: usize,
    /// How long a write waits for the followers with --sync-replication.
    #[arg(long, env = "OC_SYNC_TIMEOUT_MS", default_value_t = 2_000)]
    pub sync_timeout_ms: u64,
    /// When the followers do not confirm in time: `refuse` (503
    /// replication_unavailable: nothing acknowledged that a follower lacks) or
    /// `degrade` (acknowledge without them until they catch up).
    #[arg(long, env = "OC_SYNC_ON_TIMEOUT", default_value = "refuse", value_parser = ["refuse", "degrade"])]
    pub sync_on_timeout: String,
    /// A replicating server's lease in the archive: how long it holds without a
    /// renewal. The writer renews every fifth of it and stops acknowledging writes
    /// --lease-max-drift-ms before it could run out; an asynchronous follower's
    /// promotion waits it out (plus the drift) since the last renewal.
    #[arg(long, env = "OC_LEASE_TTL_MS", default_value_t = 10_000)]
    pub lease_ttl_ms: u64,
    /// The most two hosts' clocks may disagree, plus a lease write's worst latency.
    #[arg(long, env = "OC_LEASE_MAX_DRIFT_MS", default_value_t = 1_000)]
    pub lease_max_drift_ms: u64,
    /// A promotion is refused (without force) when a shard's applied LSN is further
    /// behind what the writer last reported than this many frames.
    #[arg(long, env = "OC_PROMOTE_MAX_LAG_LSN", default_value_t = 1000)]
    pub promote_max_lag_lsn: u64,
    /// A follower promotes itself once it has lost every stream from the writer and
    /// the writer's lease has lapsed (its TTL plus the drift margin), when it is within
    /// --promote-max-lag-lsn and no migration runs. Off by default: a failover is an
    /// operator's decision unless this is set.
    #[arg(long, env = "OC_AUTO_PROMOTE", value_parser = BoolishValueParser::new())]
    pub auto_promote: bool,
    /// For one start of a follower's data directory in writer mode, when it cannot be
    /// promoted (its writer ran without an archive) and its writer is stopped for good:
    /// the start begins a new epoch, as a promotion does, and the directory follows no
    /// writer from then on. Without it such a start is refused. Remove it afterwards.
    #[arg(long, env = "OC_PROMOTE_AT_START", value_parser = BoolishValueParser::new())]
    pub promote_at_start: bool,
    /// A follower further behind the writer than this many frames (on any shard)
    /// answers `/ready` with 503.
    #[arg(long, env = "OC_MAX_READY_LAG_LSN", default_value_t = 1000)]
    pub max_ready_lag_lsn: u64,
    /// PEM certificate chain: serve the data API over TLS (with --tls-key).
    #[arg(long, env = "OC_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "OC_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Log format: `text` or `json`.
    #[arg(long, env = "OC_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// Most followers a synchronous writer may wait for.
const MAX_SYNC_REPLICAS: usize = 8;

// The default log takes the largest legal row: only a small segment can refuse it.
const _: () = assert!(DEFAULT_MAX_GROUP_BYTES >= MAX_ONE_ROW_RECORD_BYTES);

/// The smallest `--wal-segment-bytes` whose log takes a write of one row of the largest
/// legal size: a record must fit one group, and a group the segment's data area (the
/// segment less its header and footer blocks).
pub fn min_wal_segment_bytes() -> u64 {
    align_up(MAX_ONE_ROW_RECORD_BYTES as u64) + 2 * BLOCK_SIZE as u64
}

/// `90s`, `30m`, `12h` or `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 30m, 12h or 7d"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    Ok(Duration::from_secs(n.saturating_mul(seconds)))
}

impl ServerConfig {
    /// The archive URI, with the default filled in; `None` when shipping is off.
    pub fn archive_uri(&self) -> Option<String> {
        match self.archive.as_deref() {
            Some("none") => None,
            Some(uri) => Some(uri.to_string()),
            None => {
                let mut dir = std::path::absolute(&self.data_dir)
                    .unwrap_or_else(|_| self.data_dir.clone())
                    .into_os_string();
                dir.push("-archive");
                Some(format!("file://{}", PathBuf::from(dir).display()))
            }
        }
    }

    /// The log's settings; a group commit never exceeds a small segment's data area.
    pub fn wal_config(&self) -> WalConfig {
        let default = WalConfig::default();
        let data_area = self.wal_segment_bytes.saturating_sub(2 * BLOCK_SIZE as u64);
        WalConfig {
            truncate_corrupt: self.truncate_corrupt_wal,
            segment_bytes: self.wal_segment_bytes,
            max_group_bytes: default.max_group_bytes.min(data_area as usize),
            ..default
        }
    }

    pub fn tenant_quotas(&self) -> TenantQuotas {
        TenantQuotas {
            max_rows: self.tenant_max_rows,
            max_bytes: self.tenant_max_bytes,
            max_vectors: self.tenant_max_vectors,
        }
    }

    /// The API's limits on a server of `shards` shards.
    /// The data API's limits on `shards` shards, with `memory_budget` bytes in all.
    pub fn api_limits(&self, shards: usize, memory_budget: u64) -> ApiLimits {
        let shard_connections = self.max_connections.div_ceil(shards.max(1));
        // Bodies being received take an eighth of the budget, and always room for two
        // of the largest on each shard.
        let body_pool =
            (memory_budget / 8 / shards.max(1) as u64).max(2 * self.max_body_bytes as u64) as usize;
        ApiLimits {
            max_body_bytes: self.max_body_bytes,
            body_pool_bytes: body_pool,
            bodies_per_caller: (shard_connections / 4).max(1),
            min_body_bytes_per_s: self.min_body_bytes_per_s,
            body_read_timeout: Duration::from_millis(self.body_read_timeout_ms),
            request_deadline: Duration::from_millis(self.request_deadline_ms),
            min_lsn_wait: Duration::from_millis(self.min_lsn_wait_ms.min(self.request_deadline_ms)),
            max_in_flight_per_tenant: self.max_in_flight_per_tenant,
            ask: AskLimits {
                max_rows_returned: self.ask_max_rows,
                max_rows_scanned: self.ask_max_scan_rows,
                deadline: Duration::from_millis(self.ask_timeout_ms.min(self.request_deadline_ms)),
                max_memory_bytes: self.ask_max_memory_bytes,
            },
            rate_limit: RateLimit {
                per_second: self.rate_limit_rps,
                burst: self.rate_limit_burst,
            },
            watch: WatchLimits {
                per_tenant: self.watch_max_streams_per_tenant,
                // Streams hold their connections for as long as they run, and are never
                // the ones closed to make room: a quarter is kept for requests.
                per_server: self
                    .watch_max_streams
                    .min(self.max_connections - self.max_connections / 4),
                per_shard: shard_connections - shard_connections / 4,
                buffer_bytes: self.watch_buffer_bytes,
                heartbeat: Duration::from_millis(self.watch_heartbeat_ms),
            },
        }
    }

    /// The OTLP exporter's settings, when `--otlp-endpoint` is set.
    pub fn otlp(&self) -> Result<Option<crate::otlp::OtlpConfig>, String> {
        // Checked with or without an endpoint: a bad value is a mistake either way.
        if !(0.0..=1.0).contains(&self.otlp_sample_ratio) {
            return Err(format!(
                "--otlp-sample-ratio {} must be from 0 to 1",
                self.otlp_sample_ratio
            ));
        }
        let mut resource = Vec::new();
        for pair in self
            .otlp_resource_attributes
            .split(',')
            .filter(|p| !p.trim().is_empty())
        {
            let Some((key, value)) = pair.split_once('=') else {
                return Err(format!(
                    "--otlp-resource-attributes: {pair:?} is not key=value"
                ));
            };
            let key = key.trim();
            if key == "service.name" || key == "service.version" {
                return Err(format!(
                    "--otlp-resource-attributes: {key} is set by oc-server (use --otlp-service-name)"
                ));
            }
            resource.push((key.to_string(), value.trim().to_string()));
        }
        let Some(endpoint) = &self.otlp_endpoint else {
            return Ok(None);
        };
        let Some(rest) = endpoint
            .strip_prefix("http://")
            .or_else(|| endpoint.strip_prefix("https://"))
        else {
            return Err(format!(
                "--otlp-endpoint {endpoint:?} must be an http:// or https:// URL of an OTLP/HTTP receiver"
            ));
        };
        let endpoint = match rest.split_once('/') {
            Some((_, path)) if !path.is_empty() => endpoint.clone(),
            _ => format!("{}/v1/traces", endpoint.trim_end_matches('/')),
        };
        if !resource.iter().any(|(k, _)| k == "host.name") {
            let host = oc_ship::lease::hostname();
            resource.push(("host.name".into(), host));
        }
        Ok(Some(crate::otlp::OtlpConfig {
            endpoint,
            service_name: self.otlp_service_name.clone(),
            resource,
            sample_ratio: self.otlp_sample_ratio,
            slow: Duration::from_millis(self.otlp_slow_ms),
        }))
    }

    /// The admin token from the file or the environment; `None` turns auth off.
    pub fn auth(&self) -> Result<AuthConfig, String> {
        let token = match (&self.admin_token_file, &self.admin_token) {
            (Some(_), Some(_)) => {
                return Err(
                    "give the admin token by --admin-token-file or OC_ADMIN_TOKEN, not both".into(),
                )
            }
            (Some(path), None) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| format!("reading the admin token file {}: {e}", path.display()))?
                    .trim()
                    .to_string(),
            ),
            (None, token) => token.as_ref().map(|t| t.trim().to_string()),
        };
        if let Some(token) = &token {
            if token.len() < MIN_ADMIN_TOKEN_BYTES || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "the admin token must be at least {MIN_ADMIN_TOKEN_BYTES} printable ASCII characters without spaces"
                ));
            }
        }
        Ok(AuthConfig { admin_token: token })
    }

    /// This server's replication role.
    pub fn role(&self) -> crate::replication::Role {
        match (self.mode.as_str(), &self.leader_addr) {
            ("follower", Some(leader)) => crate::replication::Role::Follower {
                leader: leader.clone(),
            },
            _ => crate::replication::Role::Writer,
        }
    }

    /// The token a follower presents and a writer expects: the replication token's
    /// file, or else the admin token; `None` when neither is set.
    pub fn replication_token(&self) -> Result<Option<String>, String> {
        match &self.replication_token_file {
            Some(path) => {
                let token = std::fs::read_to_string(path)
                    .map_err(|e| {
                        format!("reading the replication token file {}: {e}", path.display())
                    })?
                    .trim()
                    .to_string();
                if token.len() < MIN_ADMIN_TOKEN_BYTES
                    || !token.bytes().all(|b| b.is_ascii_graphic())
                {
                    return Err(format!(
                        "the replication token must be at least {MIN_ADMIN_TOKEN_BYTES} printable                          ASCII characters without spaces"
                    ));
                }
                Ok(Some(token))
            }
            None => Ok(self.auth()?.admin_token),
        }
    }

    /// The lease timing of a replicating server (a writer with --replication-listen,
    /// or a follower, which holds the lease once promoted); `None` for a lone server.
    pub fn lease_ttl(&self) -> Option<oc_ship::shipper::LeaseTtl> {
        (self.mode == "follower" || self.replication_listen.is_some()).then(|| {
            oc_ship::shipper::LeaseTtl {
                ttl: Duration::from_millis(self.lease_ttl_ms),
                max_drift: Duration::from_millis(self.lease_max_drift_ms),
            }
        })
    }

    /// How often the archive's owner record is renewed: --lease-renew-ms, and at least
    /// five times per lease TTL when replicating.
    pub fn lease_renew(&self) -> Duration {
        let renew = Duration::from_millis(self.lease_renew_ms);
        match self.lease_ttl() {
            Some(lease) => renew.min(lease.ttl / 5),
            None => renew,
        }
    }

    /// Synchronous replication's policy, when --sync-replication is on.
    pub fn sync_policy(&self) -> Option<crate::replication::gate::SyncPolicy> {
        use crate::replication::gate::{OnTimeout, SyncPolicy};
        self.sync_replication.then(|| SyncPolicy {
            replicas: self.sync_replicas,
            timeout: Duration::from_millis(self.sync_timeout_ms),
            on_timeout: if self.sync_on_timeout == "degrade" {
                OnTimeout::Degrade
            } else {
                OnTimeout::Refuse
            },
        })
    }

    /// Refuses replication settings that cannot work.
    fn validate_replication(&self) -> Result<(), String> {
        let follower = self.mode == "follower";
        match (follower, &self.leader_addr) {
            (true, None) => {
                return Err(
                    "--mode follower needs --leader-addr (the writer's --replication-listen \
                     address)"
                        .into(),
                )
            }
            (false, Some(_)) => {
                return Err("--leader-addr is for --mode follower; a writer has no leader".into())
            }
            _ => {}
        }
        if self.sync_replication {
            if self.replication_listen.is_none() {
                return Err(
                    "--sync-replication needs --replication-listen (where followers \
                            connect; a follower's applies once it is promoted)"
                        .into(),
                );
            }
            if self.sync_replicas == 0 || self.sync_replicas > MAX_SYNC_REPLICAS {
                return Err(format!(
                    "--sync-replicas must be from 1 to {MAX_SYNC_REPLICAS}"
                ));
            }
            if self.sync_timeout_ms == 0 {
                return Err("--sync-timeout-ms must be above 0".into());
            }
        }
        if let Some(lease) = self.lease_ttl() {
            if lease.ttl < lease.max_drift * 3 || lease.ttl < Duration::from_millis(500) {
                return Err(format!(
                    "--lease-ttl-ms {} must be at least 500 and 3 times --lease-max-drift-ms {}",
                    self.lease_ttl_ms, self.lease_max_drift_ms
                ));
            }
        }
        let replicating = follower || self.replication_listen.is_some();
        if replicating && self.archive_uri().is_none() {
            return Err("replication needs an archive (its lease lives there, and a promoted follower ships to it): drop --archive none"
                .into());
        }
        let token = self.replication_token()?;
        if let Some(addr) = self.replication_listen {
            if token.is_none() && !addr.ip().is_loopback() && !self.insecure_no_auth {
                return Err(format!(
                    "refusing to serve replication on {addr} without a token: set an admin token or --replication-token-file, or pass --insecure-no-auth"
                ));
            }
        }
        Ok(())
    }

    /// The TLS acceptor for the data API, when --tls-cert and --tls-key are given.
    pub fn tls(&self) -> Result<Option<futures_rustls::TlsAcceptor>, String> {
        use futures_rustls::rustls;
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("reading certificates from {}: {e}", cert.display()))?;
        if chain.is_empty() {
            return Err(format!("{} holds no PEM certificate", cert.display()));
        }
        let private = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| format!("reading the private key from {}: {e}", key.display()))?;
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS protocol versions: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| format!("the certificate and key do not make a TLS identity: {e}"))?;
        Ok(Some(futures_rustls::TlsAcceptor::from(
            std::sync::Arc::new(config),
        )))
    }

    /// How this follower speaks TLS to its writer, when --leader-ca is given.
    pub fn leader_tls(&self) -> Result<Option<crate::replication::LeaderTls>, String> {
        use futures_rustls::rustls;
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, ServerName};
        let Some(ca) = &self.leader_ca else {
            return Ok(None);
        };
        let Some(leader) = self
            .leader_addr
            .as_deref()
            .filter(|_| self.mode == "follower")
        else {
            return Err("--leader-ca is for --mode follower with --leader-addr".into());
        };
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(ca)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| {
                format!(
                    "reading certificates from --leader-ca {}: {e}",
                    ca.display()
                )
            })?;
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("--leader-ca {}: {e}", ca.display()))?;
        }
        if roots.is_empty() {
            return Err(format!(
                "--leader-ca {} holds no PEM certificate",
                ca.display()
            ));
        }
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS protocol versions: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let host = leader.rsplit_once(':').map_or(leader, |(host, _)| host);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_string()).map_err(|e| {
            format!("the host of --leader-addr {leader} is not a name a certificate can carry: {e}")
        })?;
        Ok(Some(crate::replication::LeaderTls {
            config: std::sync::Arc::new(config),
            name,
        }))
    }

    /// Refuses settings that cannot work, with what to change.
    pub fn validate(&self) -> Result<(), String> {
        let auth = self.auth()?;
        self.tls()?;
        self.leader_tls()?;
        self.validate_replication()?;
        let (api, ops) = (self.listen, self.ops_listen);
        let overlap =
            api.ip() == ops.ip() || api.ip().is_unspecified() || ops.ip().is_unspecified();
        if api.port() == ops.port() && api.port() != 0 && overlap {
            return Err(format!(
                "--listen {api} and --ops-listen {ops} share a port: give the ops endpoints \
                 one of their own (default 7071)"
            ));
        }
        let exposed = [self.listen, self.ops_listen]
            .into_iter()
            .find(|a| !a.ip().is_loopback());
        if let Some(addr) = exposed {
            if auth.admin_token.is_none() && !self.insecure_no_auth {
                return Err(format!(
                    "refusing to listen on {addr} without authentication: set an admin token \
                     (--admin-token-file or OC_ADMIN_TOKEN), or pass --insecure-no-auth to \
                     serve {addr} to anyone"
                ));
            }
        }
        self.otlp()?;
        if let Some(shards) = self.shards {
            let most = oc_engine::placement::MAX_SHARDS;
            if shards == 0 || shards > most {
                // Before the data directory is made: a refused start leaves nothing.
                return Err(format!("--shards must be from 1 to {most}, not {shards}"));
            }
        }
        if !(self.rate_limit_rps > 0.0 && self.rate_limit_burst >= 1.0) {
            return Err(
                "--rate-limit-rps must be above 0 and --rate-limit-burst at least 1".into(),
            );
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
            ("--tail-window-ms", self.tail_window_ms),
            ("--lease-renew-ms", self.lease_renew_ms),
            ("--watch-max-streams", self.watch_max_streams as u64),
            (
                "--watch-max-streams-per-tenant",
                self.watch_max_streams_per_tenant as u64,
            ),
            ("--watch-heartbeat-ms", self.watch_heartbeat_ms),
        ] {
            if value == 0 {
                return Err(format!("{name} must be above 0"));
            }
        }
        if self.watch_heartbeat_ms >= self.idle_timeout_ms {
            return Err(format!(
                "--watch-heartbeat-ms {} must be below --idle-timeout-ms {}, or idle /watch \
                 streams are cut",
                self.watch_heartbeat_ms, self.idle_timeout_ms
            ));
        }
        if self.watch_buffer_bytes < 64 << 10 {
            return Err("--watch-buffer-bytes must be at least 65536".into());
        }
        let min_segment = min_wal_segment_bytes();
        if self.wal_segment_bytes < min_segment {
            return Err(format!(
                "--wal-segment-bytes {} is too small: a log record must hold a write of one \
                 row of the largest legal size ({MAX_ROW_BYTES} bytes; {MAX_ONE_ROW_RECORD_BYTES} \
                 bytes as a record), and a record must fit in one segment; use at least {min_segment}",
                self.wal_segment_bytes
            ));
        }
        let wal = self.wal_config();
        wal.validate().map_err(|e| {
            format!("--wal-segment-bytes: {e}, and here at least {min_segment} (the largest row)")
        })?;
        assert!(
            wal.max_frame_bytes() >= MAX_ONE_ROW_RECORD_BYTES,
            "a segment of at least {min_segment} bytes takes the largest row"
        );
        Ok(())
    }
}
