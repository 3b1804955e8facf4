//! Starting and stopping `oc-server`: the data directory's lock first (one writer
//! per directory, before anything in it is read and before the `SO_REUSEPORT` sockets
//! that a second server could otherwise share), then sockets, the archive's owner
//! claim, the control executor (ops endpoints answer "recovering" right away), every
//! shard's recovery, then serving; on SIGTERM/SIGINT a drain within the grace period,
//! every log made durable, and exit 0.
//!
//! Fail-stop (`oc_io::fail_stop`): the process is fully up or gone. A panic on any
//! thread exits at once (the binary's panic hook); a failed write-ahead log makes the
//! control executor answer what is in flight (`503 log_failed`) and exit; a shutdown
//! that overruns its grace period is ended by a watchdog thread that needs nothing
//! from the executors.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use glommio::net::TcpListener;
use glommio::Placement;
use oc_engine::mesh::MeshEndpoints;
use oc_engine::{
    stop_all, CheckpointPolicy, PoolConfig, ShardNode, ShardOpenReport, ShardPool, ShardRouter,
};
use oc_io::executor::executor_builder;
use oc_io::WalConfig;

use oc_io::dir_lock::{DirLock, LockWatch};
use oc_io::fail_stop::{self, LineFormat};
use oc_io::failpoint;
use oc_ship::archive::open_archive;
use oc_ship::breaker::BreakerPolicy;
use oc_ship::lease;
use oc_ship::shipper::{self, ShipStatus, ShipperConfig};

use crate::config::ServerConfig;
use crate::listener::{self, ConnectionSettings};
use crate::ops::{self, ControlState, Phase};
use crate::replication::{bootstrap, gate, node, receiver, ApiRole, Role};
use std::os::fd::{FromRawFd, IntoRawFd};

/// How often the control executor looks for a shutdown request.
const SHUTDOWN_POLL: Duration = Duration::from_millis(20);
/// How often the control executor asks every shard whether its log failed.
const LOG_CHECK_EVERY: Duration = Duration::from_millis(100);
/// How long a shard has to answer that question before the next round asks again.
const LOG_CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// After a log failed: how long in-flight requests get to be answered before the exit
/// (at most the shutdown grace).
const LOG_FAILED_DRAIN: Duration = Duration::from_secs(2);
/// What an orderly shutdown may take beyond the grace period (closing the logs: one
/// durable write each) before the watchdog ends the process.
pub const SHUTDOWN_MARGIN: Duration = Duration::from_secs(2);
/// The program name in lock files, owner records and fatal lines.
const PROGRAM: &str = "oc-server";
/// What `--version` prints after the program name: the version and the git commit.
pub const VERSION_LINE: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("OC_GIT_COMMIT"),
    ", built ",
    env!("OC_BUILD_TIME"),
    ")"
);

/// The format of fatal lines, matching `--log-format`.
pub fn line_format(log_format: &str) -> LineFormat {
    if log_format == "json" {
        LineFormat::Json
    } else {
        LineFormat::Text
    }
}

/// Runs the server until SIGTERM or SIGINT. Prints one line per listener once serving
/// (`oc-server: api listening on <addr>`), which scripts and tests wait for.
pub fn run(config: ServerConfig) -> Result<()> {
    config.validate().map_err(|e| anyhow!(e))?;
    let auth = config.auth().map_err(|e| anyhow!(e))?;
    if let Ok(offset) = std::env::var(oc_io::wal::frame::CLOCK_OFFSET_ENV) {
        tracing::warn!(
            offset_ms = %offset,
            "{} is set: this process's wall clock is shifted (test-only fault injection; \
             never in production)",
            oc_io::wal::frame::CLOCK_OFFSET_ENV
        );
    }
    if auth.admin_token.is_none() {
        tracing::warn!("authentication is OFF (no admin token): anyone who can reach the listeners can read and write every tenant");
    }
    let format = line_format(&config.log_format);
    if let Some(otlp) = config.otlp().map_err(|e| anyhow!(e))? {
        tracing::info!(endpoint = %otlp.endpoint, sample_ratio = otlp.sample_ratio, slow_ms = otlp.slow.as_millis() as u64, "exporting request spans over OTLP");
        crate::otlp::start(otlp).map_err(|e| anyhow!(e))?;
    }
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    // SIGTERM from here on ends the process within the grace period, whatever state
    // start-up is in.
    let shutdown = watch_signals(grace + SHUTDOWN_MARGIN, format)?;
    if failpoint::COMPILED_IN {
        tracing::warn!(
            env = failpoint::ENV,
            "this build has test failpoints compiled in: never run it in production"
        );
    }
    oc_io::executor::check_memlock_floor().map_err(|e| anyhow!("refusing to start: {e}"))?;
    if !config.allow_unsafe_fs {
        if let Some(fs) = crate::preflight::unsafe_file_system(&config.data_dir) {
            bail!(
                "refusing to start: {}",
                crate::preflight::unsafe_file_system_refusal(&config.data_dir, fs)
            );
        }
    }
    if let Some(refused) = oc_engine::placement::archive_as_data_dir(&config.data_dir) {
        bail!("refusing to start: {refused}");
    }
    // One writer per data directory, before anything in it is touched.
    let lock = DirLock::acquire(
        &config.data_dir,
        &format!("{PROGRAM} {}", env!("CARGO_PKG_VERSION")),
    )
    .context("refusing to start")?;
    let lock_watch = lock
        .watch()
        .context("refusing to start: looking at the data directory's lock")?;
    let role = config.role();
    let mut fresh_start = FreshStart::note(&config.data_dir, &role);
    bootstrap::settle_marker(&config.data_dir, role == Role::Writer)
        .map_err(|e| anyhow!("refusing to start: {e}"))?;
    let replication_token = config.replication_token().map_err(|e| anyhow!(e))?;
    let leader_tls = config.leader_tls().map_err(|e| anyhow!(e))?;
    // A follower's writer is looked up once, here: no blocking lookups later.
    let leader_addr = match &role {
        Role::Follower { leader } => {
            let addr = receiver::resolve(leader).map_err(|e| anyhow!(e))?;
            if let Some((flag, own)) = own_listener_at(&config, addr) {
                bail!(
                    "refusing to start: --leader-addr {leader} is this server's own {flag} \
                     {own}: a follower follows another server, its writer. Give the \
                     writer's --replication-listen address"
                );
            }
            Some(addr)
        }
        Role::Writer => None,
    };
    // The data directory's own layout speaks first: its error names the fix. A
    // follower's is the writer's (its shard count and epochs).
    // A follower also learns its writer's data directory id, when the writer answers.
    let (layout, writer_id) = match (&role, leader_addr) {
        (Role::Writer, _) | (_, None) => {
            let shards = config
                .shards
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let layout = oc_engine::placement::ensure_layout(&config.data_dir, shards)
                .context("checking the data directory")?;
            let layout = if role == Role::Writer {
                oc_engine::placement::record_own_lineage(&config.data_dir, layout)
                    .context("checking the data directory")?
            } else {
                layout
            };
            (layout, None)
        }
        (Role::Follower { leader }, Some(addr)) => follower_layout(
            &config,
            (leader, addr),
            (replication_token.as_deref(), leader_tls.as_ref()),
            &shutdown,
        )?,
    };
    let shards = layout.shards;
    // What `/watch` and the replication node go by: a promotion replaces it.
    let live_layout = oc_engine::placement::LiveLayout::new(layout.clone());
    crate::fd_limit::raise_and_check(crate::fd_limit::needed(config.max_connections, shards))
        .map_err(|e| anyhow!(e))?;
    let memory_budget = oc_engine::quota::start_memory_budget(config.memory_budget_bytes)
        .map_err(|e| anyhow!(e))?;
    let query_memory = match config.ask_shared_memory_bytes {
        0 => memory_budget / oc_engine::quota::DEFAULT_QUERY_MEMORY_DIVISOR,
        n => n,
    };
    // A tenant's part as large as the whole is no part of its own (0 for the engine).
    let tenant_query_memory = match config.ask_tenant_memory_bytes {
        0 => query_memory / 2,
        n if n >= query_memory => 0,
        n => n,
    };
    oc_engine::quota::set_query_memory_limits(query_memory, tenant_query_memory);
    tracing::info!(
        memory_budget,
        query_memory,
        tenant_query_memory,
        "memory budget set"
    );
    tracing::info!(data_dir_id = %layout.id, data_dir = %config.data_dir.display(), "data directory locked");
    let auditor = oc_ship::audit::start(&config.data_dir, config.audit_retention)
        .context("opening the audit log")?;
    let (api_fds, api_addr) = listener::bind_shared(config.listen, shards)
        .with_context(|| format!("binding the API on {}", config.listen))?;
    let replication_listener = match config.replication_listen {
        Some(addr) => {
            let bound = listener::wait_while_in_use(addr, || std::net::TcpListener::bind(addr))
                .with_context(|| format!("binding the replication listener on {addr}"))?;
            bound.set_nonblocking(true)?;
            Some(bound)
        }
        None => None,
    };
    let replication_addr = match &replication_listener {
        Some(bound) => Some(bound.local_addr()?),
        None => None,
    };

    if config.promote_at_start && role != Role::Writer {
        bail!(
            "refusing to start: --promote-at-start makes a follower's data directory a writer \
             at its start, so it goes with --mode writer; a follower is promoted with \
             `oc-server promote` (RUNBOOK.md, \"Failover: promote the follower\")"
        );
    }
    // The archive is claimed and listed before any shard opens: a wrong, unreachable or
    // foreign archive is a start-up error, not a surprise later.
    if config.auto_promote && role == Role::Writer {
        // Not refused: a promoted follower restarted in writer mode keeps its settings.
        tracing::warn!("--auto-promote has no effect on a writer");
    }
    let ship_status = ShipStatus::default();
    let mut replay_archive = None;
    let mut lease_hold = None;
    let mut promotion = None;
    let mut finish_promotion = None;
    let mut archived_logs = Vec::new();
    if let Some(uri) = config.archive_uri() {
        check_archive_apart(&uri, &config.data_dir)?;
    }
    let shipper = match config.archive_uri() {
        // Only the writer ships: a follower reads the archive (`/watch` resumes) and
        // claims it only once promoted (after probing it here: its lease would fence
        // the old writer only through conditional puts).
        Some(uri) if role != Role::Writer => {
            let archive =
                open_archive(&uri).with_context(|| format!("opening the archive {uri}"))?;
            if let Some(writer_id) = &writer_id {
                check_follower_archive(archive.as_ref(), &uri, writer_id)?;
            }
            match oc_ship::lease::check_conditions(archive.as_ref()) {
                Err(e @ oc_ship::lease::LeaseError::ConditionsIgnored { .. }) => {
                    bail!("refusing to start: the archive {uri}: {e}")
                }
                // Unreachable now: a follower still starts (it reads the archive only
                // for `/watch` resumes); its promotion will need it.
                Err(e) => {
                    tracing::warn!(archive = %uri, error = %e, "could not check that the archive honours conditional writes (it will be needed to promote this follower)")
                }
                Ok(()) => {}
            }
            replay_archive = Some(archive.clone());
            tracing::info!(archive = %uri, "follower: not shipping (the writer does)");
            promotion = Some(node::PromotionKit {
                archive,
                ship_config: ship_config(&config, &layout),
                ship_status: ship_status.clone(),
                on_displaced: on_displaced(format),
                data_dir: config.data_dir.clone(),
                lease_ttl: config.lease_ttl().unwrap_or(oc_ship::shipper::LeaseTtl {
                    ttl: Duration::from_millis(config.lease_ttl_ms),
                    max_drift: Duration::from_millis(config.lease_max_drift_ms),
                }),
                sync_policy: config.sync_policy(),
                max_lag_lsn: config.promote_max_lag_lsn,
                automatic: config.auto_promote,
            });
            None
        }
        Some(uri) => {
            let archive =
                open_archive(&uri).with_context(|| format!("opening the archive {uri}"))?;
            // Checked before the log is opened, so a refusal cuts nothing.
            if config.truncate_corrupt_wal
                && shipper::shipped_to(archive.as_ref())
                    .with_context(|| format!("reading the archive {uri}"))?
            {
                bail!(
                    "refusing to start: --truncate-corrupt-wal may cut frames the archive {uri} \
                     already holds, and the log would then write other frames under their LSNs \
                     and object names there. For the start that cuts, point --archive at a new, \
                     empty location (or use --archive none); leave the option out afterwards \
                     (RUNBOOK.md, \"The server refuses to start with \"corruption in <file> at \
                     offset <n>\"\")"
                );
            }
            if config.lease_ttl().is_some() {
                // A replicating writer's lease fences only if the store honours
                // conditional puts.
                oc_ship::lease::check_conditions(archive.as_ref())
                    .with_context(|| format!("checking the archive {uri}"))?;
            }
            replay_archive = Some(archive.clone());
            let promote_at_start = followers_directory_as_writer(&config, &layout, Some(&archive))?;
            let started = shipper::start(
                archive.clone(),
                ship_config(&config, &layout),
                ship_status.clone(),
                on_displaced(format),
            );
            if started.is_err() && !archive_names_another_owner(archive.as_ref(), &layout) {
                // Failed after its claim (or cannot tell): the archive names this
                // directory's id, which only its layout holds.
                fresh_start.keep();
            }
            let start =
                started.with_context(|| format!("starting to ship to the archive {uri}"))?;
            tracing::info!(archive = %uri, lease_epoch = start.lease_epoch, "shipping to the archive");
            finish_promotion = unfinished_promotion(&archive, &layout, &config.data_dir)
                .with_context(|| format!("checking the promotion behind the archive {uri}"))?;
            if promote_at_start && finish_promotion.is_none() {
                finish_promotion = Some(promoted_at_start(&config));
            }
            if config.lease_ttl().is_some() {
                lease_hold = Some(start.hold.clone());
            }
            archived_logs = start.archived;
            Some(start.run)
        }
        None => {
            if role == Role::Writer && followers_directory_as_writer(&config, &layout, None)? {
                finish_promotion = Some(promoted_at_start(&config));
            }
            tracing::warn!("no archive (--archive none): losing this machine loses the data");
            None
        }
    };
    // From here on the directory is this server's: the shards make their logs next.
    fresh_start.keep();
    let shipping = shipper.is_some();
    // A follower's logs take its writer's frames only: a shard that logged its own (a
    // migration's backfill or cutover, before the first replicated frame decided the
    // log's kind) would hold frames its writer never wrote, under its writer's epoch.
    // Its promotion takes them up; a writer finishing a promotion, once that is done.
    let hold_own_writes = finish_promotion.is_some() || matches!(role, Role::Follower { .. });
    let (client_tx, client_rx) = mpsc::channel::<MeshEndpoints<ShardNode>>();
    let (ops_addr_tx, ops_addr_rx) = mpsc::channel::<std::io::Result<SocketAddr>>();
    let (serving_tx, serving_rx) = mpsc::channel::<()>();
    let api_role = match &role {
        Role::Follower { leader } => Some(Arc::new(ApiRole::follower(leader.clone(), shards))),
        Role::Writer => None,
    };
    let control = {
        let shutdown = shutdown.clone();
        let ship_status_for_ops = shipper.as_ref().map(|_| ship_status.clone());
        let ops_listen = config.ops_listen;
        let data_dir = config.data_dir.clone();
        let lock_watch = lock_watch.clone();
        let admin_token = auth.admin_token.clone();
        let replication = node::Setup {
            role: role.clone(),
            listener: replication_listener.map(|l| l.into_raw_fd()),
            token: replication_token,
            tls: config.tls().map_err(|e| anyhow!(e))?,
            leader_tls,
            on_diverged: on_diverged(format),
            layout: live_layout.clone(),
            max_ready_lag_lsn: config.max_ready_lag_lsn,
            sync: config.sync_policy(),
            leader_addr,
            lease_hold: lease_hold.clone(),
            api_role: api_role.clone(),
            promotion,
            finish_promotion,
        };
        executor_builder(Placement::Unbound)
            .name("oc-control")
            .spawn(move || {
                let channels = ControlChannels {
                    client_rx,
                    ops_addr_tx,
                    serving_tx,
                    shipper,
                    ship_status: ship_status_for_ops,
                    data_dir,
                    lock_watch,
                    replication,
                    admin_token,
                };
                control_main(ops_listen, shards, channels, shutdown, grace, format)
            })
            .map_err(|e| anyhow!("starting the control executor: {e}"))?
    };
    let ops_addr = ops_addr_rx
        .recv()
        .context("the control executor stopped")?
        .with_context(|| format!("binding the ops listener on {}", config.ops_listen))?;
    tracing::info!(%ops_addr, "ops listening; recovering shards");

    let settings = ConnectionSettings {
        header_read_timeout: Duration::from_millis(config.header_read_timeout_ms),
        idle_timeout: Duration::from_millis(config.idle_timeout_ms),
        min_send_bytes_per_s: config.min_send_bytes_per_s,
        max_connections: config.max_connections.div_ceil(shards),
        limits: config.api_limits(shards, memory_budget),
        auth,
        tls: config.tls().map_err(|e| anyhow!(e))?,
        archive: replay_archive,
        layout: live_layout,
        auditor,
        role: api_role,
    };
    let pool_config = PoolConfig {
        shards,
        pin_to_cores: !config.no_pin,
        spin_before_park: (config.spin_before_park_us > 0)
            .then(|| Duration::from_micros(config.spin_before_park_us)),
        wal: WalConfig {
            // A restored directory writes the epoch its restore started.
            epoch: oc_io::Epoch(layout.epoch()),
            ..config.wal_config()
        },
        hold_wal_for_archive: shipping,
        hold_own_writes,
        quotas: config.tenant_quotas(),
        // A follower's logs keep to its writer's history: a returning ex-writer's
        // divergent tail is cut (and kept aside) before anything is replayed.
        writer_history: matches!(role, Role::Follower { .. }).then(|| layout.clone()),
        archived_logs,
        checkpoint: Some(CheckpointPolicy {
            interval: Duration::from_secs(config.checkpoint_interval_s),
            wal_bytes: config.checkpoint_wal_bytes,
        }),
        ..PoolConfig::new(&config.data_dir)
    };
    let settings_tls = settings.tls.is_some();
    let started = Instant::now();
    // A writer's acknowledgements wait for its followers (synchronous replication) and
    // check its lease (replicating); a follower's gate is installed at its promotion.
    let sync_policy = config.sync_policy().filter(|_| role == Role::Writer);
    let serve = move |node: Rc<ShardNode>, router| {
        if sync_policy.is_some() || lease_hold.is_some() {
            let gate = gate::Gate::install(sync_policy, lease_hold.clone());
            node.shard().set_ack_gate(Some(gate));
        }
        let fd = api_fds[node.id()];
        listener::serve_shard(node, router, fd, settings.clone())
    };
    let (mut pool, reports) = match ShardPool::start(pool_config, serve) {
        Ok(started) => started,
        Err(e) => {
            drop(client_tx); // tells the control executor there will be no shards
            let _ = control.join();
            return Err(e).context("starting the shards");
        }
    };
    report_recovery(&reports, started.elapsed());
    let client = pool
        .take_client()
        .ok_or_else(|| anyhow!("the pool has no client ends for the control executor"))?;
    client_tx
        .send(client)
        .map_err(|_| anyhow!("the control executor stopped"))?;
    // Announced only once /ready would say so.
    serving_rx
        .recv()
        .map_err(|_| anyhow!("the control executor stopped"))?;
    crate::announce::print(api_addr, settings_tls, ops_addr, replication_addr);
    tracing::info!(%api_addr, %ops_addr, shards, "serving");

    let control_outcome = control
        .join()
        .map_err(|e| anyhow!("the control executor failed: {e}"))?;
    let pool_outcome = pool.join();
    control_outcome?;
    pool_outcome.context("stopping the shards")?;
    tracing::info!("stopped cleanly; every acknowledged write is durable");
    Ok(())
}

/// What a writer's start that fails before its shards open leaves of a data directory
/// that had no layout: nothing but the lock file. (A new follower's layout records a
/// finished bootstrap: it stays.) The layout it wrote would otherwise pin the
/// shard count and the id (which an archive is owned by) of a start that never served,
/// and the next start, its mistake fixed (another archive, a free port), would inherit
/// them.
struct FreshStart {
    /// What this start is to remove if it fails: the layout file and the audit log's
    /// directory, when neither existed before it.
    made: Vec<std::path::PathBuf>,
}

impl FreshStart {
    fn note(data_dir: &std::path::Path, role: &Role) -> FreshStart {
        let layout = data_dir.join(oc_engine::placement::LAYOUT_FILE);
        let audit = data_dir.join(oc_ship::audit::AUDIT_DIR);
        let made = if *role != Role::Writer || layout.exists() || audit.exists() {
            Vec::new()
        } else {
            vec![layout, audit]
        };
        FreshStart { made }
    }

    fn keep(&mut self) {
        self.made.clear();
    }
}

impl Drop for FreshStart {
    fn drop(&mut self) {
        for path in &self.made {
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(path)
            } else {
                std::fs::remove_file(path)
            };
            match removed {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "removed what the failed start made")
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove what the failed start made")
                }
            }
        }
    }
}

/// Refuses a `file://` archive that is the data directory, inside it, or holds it:
/// the archive's files (its `audit/` copy, its `shard-<i>/` folders) would land on the
/// directory's own, and losing the directory would lose its backup with it.
fn check_archive_apart(uri: &str, data_dir: &std::path::Path) -> Result<()> {
    let Some(archive) = uri.strip_prefix("file://") else {
        return Ok(());
    };
    // The path as it will be once made: its nearest existing ancestor, resolved.
    let resolved = |path: &std::path::Path| -> Option<std::path::PathBuf> {
        let absolute = std::path::absolute(path).ok()?;
        let mut rest = Vec::new();
        let mut at = absolute.as_path();
        loop {
            if let Ok(real) = at.canonicalize() {
                return Some(rest.iter().rev().fold(real, |p, part| p.join(part)));
            }
            rest.push(at.file_name()?.to_os_string());
            at = at.parent()?;
        }
    };
    let (Some(archive), Some(data)) = (resolved(std::path::Path::new(archive)), resolved(data_dir))
    else {
        return Ok(());
    };
    // A bind mount shows one directory under two paths: compare what the paths are
    // (device and inode), each against the other's existing ancestors.
    let identity = |path: &std::path::Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
    };
    let inside = |path: &std::path::Path, dir: &std::path::Path| {
        identity(dir).is_some_and(|dir| path.ancestors().any(|a| identity(a) == Some(dir)))
    };
    if archive.starts_with(&data)
        || data.starts_with(&archive)
        || inside(&archive, &data)
        || inside(&data, &archive)
    {
        bail!(
            "refusing to start: the archive {uri} and the data directory {} overlap (one is, \
             or is inside, the other): the archive's files would overwrite the directory's, \
             and one lost disk would lose both. Give --archive a directory apart, on \
             another disk or host",
            data_dir.display()
        );
    }
    // Another server's data directory (live or not): its files and the archive's would
    // mix (two audit logs in one folder, each server reading the other's entries). Its
    // layout file says what it is; a lock file alone does not (a start refused on an
    // archive given as its data directory leaves one there).
    let layout_file = oc_engine::placement::LAYOUT_FILE;
    if let Some(other) = archive
        .ancestors()
        .find(|dir| dir.join(layout_file).exists())
    {
        bail!(
            "refusing to start: the archive {uri} is, or is inside, the data directory {} \
             (it holds {layout_file}): an archive and a data directory must not share files. \
             Give --archive a directory of its own, on another disk or host",
            other.display()
        );
    }
    Ok(())
}

/// The listener of this server's that `addr` reaches, if it is one of them: the same
/// port, on the listener's address or, for a listener on every address, on loopback.
fn own_listener_at(config: &ServerConfig, addr: SocketAddr) -> Option<(&'static str, SocketAddr)> {
    let listeners = [
        ("--listen", Some(config.listen)),
        ("--ops-listen", Some(config.ops_listen)),
        ("--replication-listen", config.replication_listen),
    ];
    listeners.into_iter().find_map(|(flag, own)| {
        let own = own?;
        let same_host =
            own.ip() == addr.ip() || (own.ip().is_unspecified() && addr.ip().is_loopback());
        (own.port() != 0 && own.port() == addr.port() && same_host).then_some((flag, own))
    })
}

/// A follower's `--archive` must be its writer's: its promotion takes that archive's
/// lease over, which fences the old writer only if the old writer holds it. One whose
/// owner record names another data directory than the writer's is refused (a promotion
/// would take over a third server's archive and fence nothing); one with no record, or
/// that cannot be read now, is let through with a warning (a promotion without force
/// refuses it then).
fn check_follower_archive(
    archive: &dyn oc_ship::archive::Archive,
    uri: &str,
    writer_id: &str,
) -> Result<()> {
    match lease::read(archive) {
        Ok(Some((lease, _))) if lease.owner_id != writer_id => bail!(
            "refusing to start: the archive {uri} is owned by data directory {} ({}), but \
             this follower's writer is data directory {writer_id}: a follower's --archive \
             must be its writer's, whose lease its promotion takes over. Give it the \
             writer's --archive",
            lease.owner_id,
            lease.holder
        ),
        Ok(Some(_)) => Ok(()),
        Ok(None) => {
            tracing::warn!(archive = %uri, "the archive holds no owner record: is it this follower's writer's --archive? A promotion without force will be refused");
            Ok(())
        }
        Err(e) => {
            tracing::warn!(archive = %uri, error = %e, "could not read the archive's owner record to check it is the writer's");
            Ok(())
        }
    }
}

/// The promotion a writer's start must finish, if the one that gave this data
/// directory the archive's lease stopped part way (killed, or failing to record its
/// epoch). One that started its epoch here but left no branch point gets it now.
fn unfinished_promotion(
    archive: &Arc<dyn oc_ship::archive::Archive>,
    layout: &oc_engine::placement::Layout,
    data_dir: &std::path::Path,
) -> anyhow::Result<Option<node::FinishPromotion>> {
    use oc_ship::timeline::{self, PromotionEnd};
    let Some((lease, _)) = oc_ship::lease::read(archive.as_ref())? else {
        return Ok(None);
    };
    if lease.owner_id != layout.id.to_string() {
        return Ok(None);
    }
    Ok(match timeline::promotion_end(archive, layout, &lease)? {
        PromotionEnd::Finished => None,
        PromotionEnd::BranchPointMissing(branch) => {
            // As in a promotion, not worth refusing the start over: only restores to
            // before the promotion cannot fall back through it.
            match timeline::record_branch_point(archive, &branch) {
                Ok(()) => {
                    tracing::warn!(lease_epoch = branch.lease_epoch, frame_epoch = branch.frame_epoch, first_lsn = ?branch.first_lsn, "recorded the branch point the promotion that took the archive's lease did not")
                }
                Err(e) => {
                    tracing::error!(error = %e, lease_epoch = branch.lease_epoch, "could not record the branch point the promotion that took the archive's lease did not: restores of this archive to before that promotion are refused (FORMAT.md §9.4); the next start tries again")
                }
            }
            None
        }
        PromotionEnd::EpochMissing {
            lease_epoch,
            promoted_at_us,
        } => {
            tracing::warn!(lease_epoch, "the promotion that took the archive's lease started no epoch here: starting it before taking writes");
            Some(node::FinishPromotion {
                data_dir: data_dir.to_path_buf(),
                lease: Some(node::PromotionLease {
                    archive: archive.clone(),
                    lease_epoch,
                    promoted_at_us,
                }),
            })
        }
    })
}

/// Whether a writer's start on `layout` promotes a follower's data directory: refused
/// for a directory that follows a writer unless the promotion that made it the writer
/// took the archive's lease (the start then finishes that promotion) or the start asks
/// for it (`--promote-at-start`). Without this, a follower's unit that lost `--mode
/// follower` would start a second writer of the same tenants beside the real one (on
/// an archive of its own, or none), continuing its epoch.
fn followers_directory_as_writer(
    config: &ServerConfig,
    layout: &oc_engine::placement::Layout,
    archive: Option<&Arc<dyn oc_ship::archive::Archive>>,
) -> Result<bool> {
    let Some(writer) = layout.follows else {
        if config.promote_at_start {
            tracing::warn!("--promote-at-start has no effect: this data directory follows no writer (remove the option)");
        }
        return Ok(false);
    };
    if let Some(archive) = archive {
        let record = lease::read(archive.as_ref())
            .context("refusing to start: reading the archive's owner record")?;
        // Taken by a promotion (past lease epoch 1), not by an earlier writer start of
        // this directory: one with --promote-at-start that stopped before its epoch
        // began must be given the option again.
        if record
            .is_some_and(|(lease, _)| lease.epoch >= 2 && lease.owner_id == layout.id.to_string())
        {
            return Ok(false);
        }
    }
    if config.promote_at_start {
        tracing::warn!(writer_data_dir_id = %writer, "--promote-at-start: this follower's data directory becomes a writer; its writer must be stopped for good (remove the option after this start)");
        return Ok(true);
    }
    bail!(
        "refusing to start: {} is a follower's data directory (it follows the writer whose \
         data directory is {writer}), and this start is a writer's (no --mode follower). \
         Started as a writer it would take writes beside its writer for the same tenants. \
         Start it with --mode follower --leader-addr <the writer's replication address>; to \
         make it the writer, promote it with `oc-server promote` (RUNBOOK.md, \"Failover: \
         promote the follower\"). Only when it cannot be promoted (its writer ran without an \
         archive) and its writer is stopped for good, start it once with --promote-at-start \
         (RUNBOOK.md, \"A follower's data directory started as a writer\")",
        config.data_dir.display()
    )
}

/// The promotion a `--promote-at-start` start finishes: a new epoch, no lease.
fn promoted_at_start(config: &ServerConfig) -> node::FinishPromotion {
    node::FinishPromotion {
        data_dir: config.data_dir.clone(),
        lease: None,
    }
}

/// Whether the archive's owner record names another data directory than `layout`'s, or
/// no owner at all; false when it names this one or cannot be read.
fn archive_names_another_owner(
    archive: &dyn oc_ship::archive::Archive,
    layout: &oc_engine::placement::Layout,
) -> bool {
    match lease::read(archive) {
        Ok(Some((lease, _))) => lease.owner_id != layout.id.to_string(),
        Ok(None) => true,
        Err(_) => false,
    }
}

/// The shipper's settings for this server (a writer's at start, a follower's when it
/// is promoted).
fn ship_config(config: &ServerConfig, layout: &oc_engine::placement::Layout) -> ShipperConfig {
    ShipperConfig {
        data_dir: config.data_dir.clone(),
        owner_id: layout.id.to_string(),
        lineage: layout.lineage.map(|id| id.to_string()),
        holder: lease::this_process(
            &format!("{PROGRAM} {}", env!("CARGO_PKG_VERSION")),
            &config.data_dir,
        ),
        lease_renew: config.lease_renew(),
        shards: layout.shards,
        tail_window: Duration::from_millis(config.tail_window_ms),
        retention: config.archive_retention,
        audit_retention: config.audit_retention,
        breaker: BreakerPolicy {
            open_for: Duration::from_millis(config.archive_breaker_open_ms),
            ..BreakerPolicy::default()
        },
        lease_ttl: config.lease_ttl(),
        held: None,
    }
}

/// What happens when the writer refuses this follower as diverged: the process ends,
/// and its restart cuts the log where it left the writer's history.
fn on_diverged(format: LineFormat) -> receiver::OnDiverged {
    Arc::new(move |what| {
        let line = fail_stop::fatal_line(
            PROGRAM,
            format,
            &format!("{what}. Exiting with status {}", fail_stop::EXIT_DIVERGED),
        );
        fail_stop::exit_now(fail_stop::EXIT_DIVERGED, &line);
    })
}

/// What happens when another process took the archive's owner record: the shipper's
/// writes are already fenced; the process ends before anything else happens.
fn on_displaced(format: LineFormat) -> shipper::OnDisplaced {
    Box::new(move |what| {
        let line = fail_stop::fatal_line(
            PROGRAM,
            format,
            &format!(
                "{what}. Exiting with status {}; every acknowledged write is durable \
                 in this data directory. See RUNBOOK.md: \"the process exited with \
                 status 5\"",
                fail_stop::EXIT_ARCHIVE_TAKEN
            ),
        );
        fail_stop::exit_now(fail_stop::EXIT_ARCHIVE_TAKEN, &line);
    })
}

/// A follower's layout: a new data directory takes the writer's (its shard count and
/// epochs; the writer must answer, and is asked again every second until it does); an
/// existing one takes on the epochs the writer went through since (when the writer
/// answers at once; otherwise it starts on its own and the streams catch up later).
fn follower_layout(
    config: &ServerConfig,
    (leader, addr): (&str, std::net::SocketAddr),
    (token, tls): (Option<&str>, Option<&crate::replication::LeaderTls>),
    shutdown: &AtomicBool,
) -> Result<(oc_engine::placement::Layout, Option<String>)> {
    use oc_engine::placement;
    let local =
        placement::existing_layout(&config.data_dir).context("checking the data directory")?;
    let writer = loop {
        match receiver::fetch_layout(leader, addr, "new", token, tls) {
            Ok(writer) => break Some(writer),
            // Waiting would not change the answer (and starting from this directory's
            // own layout would skip the cut of a divergent log).
            Err(receiver::LayoutError::Refused(why)) => bail!("{why}"),
            Err(receiver::LayoutError::Unreachable(why)) if local.is_some() => {
                tracing::warn!(%why, "the writer did not answer; starting from this directory's own log");
                break None;
            }
            Err(receiver::LayoutError::Unreachable(why)) => {
                tracing::warn!(%why, "waiting for the writer to lay out this new follower");
                if shutdown.load(Ordering::SeqCst) {
                    bail!("stopped while waiting for the writer at {leader}");
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    let Some(writer) = writer else {
        return local.map(|l| (l, None)).ok_or_else(|| anyhow!("no layout"));
    };
    let as_id = |id: &str| {
        placement::DataDirId::parse(id).ok_or_else(|| {
            anyhow!(
                "the writer at {leader} named a data directory {}, which is not a data \
                 directory id",
                crate::api::error::quoted_short(id)
            )
        })
    };
    let writer_id = as_id(&writer.data_dir_id)?;
    let lineage = writer.lineage.as_deref().map(as_id).transpose()?;
    if let Some(wanted) = config.shards {
        if wanted != writer.shards {
            bail!(
                "--shards {wanted}, but the writer at {leader} has {} shards: a follower has the writer's shard count (drop --shards)",
                writer.shards
            );
        }
    }
    let layout = match local {
        None => {
            if let Some(entry) = bootstrap::blocker(&config.data_dir)
                .with_context(|| format!("listing {}", config.data_dir.display()))?
            {
                bail!(
                    "{} holds {entry} but no {}: a new follower starts on an empty data \
                     directory (it copies the writer's checkpoints) or on one restored with \
                     oc-pitr restore --for-follower; move what is there aside",
                    config.data_dir.display(),
                    placement::LAYOUT_FILE
                );
            }
            copy_writer_checkpoints(config, (leader, addr), (token, tls), writer.shards, shutdown)?;
            let layout = placement::create_layout_with_epochs(
                &config.data_dir,
                writer.shards,
                writer.epochs,
                Some(writer_id),
                lineage.map_or(placement::Lineage::Unknown, placement::Lineage::Of),
            )
            .context("laying out the follower like its writer")?;
            bootstrap::finish(&config.data_dir).context("ending the new follower's bootstrap")?;
            Ok(layout)
        }
        Some(local) if local.shards != writer.shards => bail!(
            "this data directory has {} shards and the writer at {leader} has {}: it was not made for this writer; start the follower on an empty data directory",
            local.shards,
            writer.shards
        ),
        Some(local) => {
            placement::follow_epochs(&config.data_dir, &local, (writer.epochs, lineage), writer_id)
        }
    }
    .context("laying out the follower like its writer")?;
    tracing::info!(%leader, writer_data_dir_id = %writer.data_dir_id, epoch = layout.epoch(), shards = layout.shards, "following the writer");
    Ok((layout, Some(writer.data_dir_id)))
}

/// A new follower copies each shard's newest checkpoint from its writer. A shard's
/// copy that finds the writer gone or busy starts that shard over a second later; a
/// refusal ends the start.
fn copy_writer_checkpoints(
    config: &ServerConfig,
    (leader, addr): (&str, std::net::SocketAddr),
    (token, tls): (Option<&str>, Option<&crate::replication::LeaderTls>),
    shards: usize,
    shutdown: &AtomicBool,
) -> Result<()> {
    let copied = bootstrap::copy_checkpoints(&config.data_dir, shards, |shard, dir| loop {
        match receiver::fetch_checkpoint((leader, addr), ("new", token, tls), shard, dir) {
            Err(receiver::LayoutError::Unreachable(why)) => {
                tracing::warn!(shard, %why, "copying the writer's checkpoint; trying again");
                if shutdown.load(Ordering::SeqCst) {
                    return Err(receiver::LayoutError::Refused(
                        "stopped while copying the writer's checkpoints".into(),
                    ));
                }
                std::thread::sleep(Duration::from_secs(1));
                bootstrap::empty_dir(dir).map_err(|e| {
                    receiver::LayoutError::Refused(format!("emptying {}: {e}", dir.display()))
                })?;
            }
            done => return done,
        }
    });
    copied
        .map(|_| ())
        .map_err(|e| anyhow!("bootstrapping this new follower from the writer: {e}"))
}

fn report_recovery(reports: &[ShardOpenReport], took: Duration) {
    for (shard, report) in reports.iter().enumerate() {
        tracing::info!(
            shard,
            checkpoint = ?report.checkpoint.map(|l| l.0),
            unusable_checkpoints = report.unusable_checkpoints.len(),
            segments = report.wal.segments.len(),
            segments_not_read = report.wal.segments_not_read,
            frames_replayed = report.wal.frames_replayed,
            torn_tail = ?report.wal.torn_tail,
            truncated = ?report.wal.truncated_corruption,
            removed = ?report.wal.removed,
            "shard recovered"
        );
    }
    tracing::info!(
        shards = reports.len(),
        took_ms = took.as_millis() as u64,
        "recovery finished"
    );
}

/// Starts the thread that turns SIGTERM/SIGINT into the returned shutdown flag and,
/// if the process is still alive `budget` after the first signal, ends it with
/// [`fail_stop::EXIT_SHUTDOWN_OVERRAN`]. It is a plain thread: it works even when an
/// executor is stuck.
fn watch_signals(budget: Duration, format: LineFormat) -> Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let shutdown = Arc::new(AtomicBool::new(false));
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .context("installing the signal handlers")?;
    let flag = shutdown.clone();
    std::thread::Builder::new()
        .name("oc-signals".into())
        .spawn(move || {
            let Some(signal) = signals.forever().next() else {
                return;
            };
            flag.store(true, Ordering::SeqCst);
            std::thread::sleep(budget);
            let line = fail_stop::fatal_line(
                PROGRAM,
                format,
                &format!(
                    "the orderly shutdown after signal {signal} did not finish within {} ms \
                     (grace period plus margin); exiting with status {}: every acknowledged \
                     write is durable, recovery replays the log at the next start",
                    budget.as_millis(),
                    fail_stop::EXIT_SHUTDOWN_OVERRAN
                ),
            );
            fail_stop::exit_now(fail_stop::EXIT_SHUTDOWN_OVERRAN, &line);
        })
        .context("starting the signal thread")?;
    Ok(shutdown)
}

/// How the control executor hears from and answers the main thread during start-up.
struct ControlChannels {
    client_rx: mpsc::Receiver<MeshEndpoints<ShardNode>>,
    ops_addr_tx: mpsc::Sender<std::io::Result<SocketAddr>>,
    serving_tx: mpsc::Sender<()>,
    shipper: Option<shipper::ShipperLoop>,
    ship_status: Option<ShipStatus>,
    data_dir: std::path::PathBuf,
    lock_watch: LockWatch,
    replication: node::Setup,
    admin_token: Option<String>,
}

/// The control executor: ops endpoints from the start, then, once the shards run, the
/// watch for a failed log and the shutdown sequence when a signal arrives.
async fn control_main(
    ops_listen: SocketAddr,
    shards: usize,
    channels: ControlChannels,
    shutdown: Arc<AtomicBool>,
    grace: Duration,
    format: LineFormat,
) -> Result<()> {
    let ControlChannels {
        client_rx,
        ops_addr_tx,
        serving_tx,
        shipper,
        ship_status,
        data_dir,
        lock_watch,
        replication,
        admin_token,
    } = channels;
    let replication = node::Node::new(replication, shards);
    let listener = match listener::bind_exclusive(ops_listen) {
        // SAFETY: the descriptor of a listening socket made just now, owned from here on
        // by the glommio listener alone.
        Ok(listener) => unsafe { TcpListener::from_raw_fd(listener.into_raw_fd()) },
        Err(e) => {
            let _ = ops_addr_tx.send(Err(std::io::Error::other(e.to_string())));
            return Ok(());
        }
    };
    let _ = ops_addr_tx.send(
        listener
            .local_addr()
            .map_err(|e| std::io::Error::other(e.to_string())),
    );
    let state = Rc::new(ControlState {
        started: Instant::now(),
        phase: std::cell::Cell::new(Phase::Recovering),
        router: std::cell::RefCell::new(None),
        probe: oc_io::probe_io_uring(),
        shards,
        ship_status,
        failure: std::cell::RefCell::new(None),
        data_dir,
        replication: replication.clone(),
        admin_token,
    });
    let _ops = glommio::spawn_local(ops::serve_ops(listener, state.clone()));
    // Wait for the shards (or for the start-up to fail, which sets `shutdown`).
    let client = loop {
        match client_rx.try_recv() {
            Ok(client) => break client,
            Err(mpsc::TryRecvError::Disconnected) => return Ok(()),
            Err(mpsc::TryRecvError::Empty) => glommio::timer::sleep(SHUTDOWN_POLL).await,
        }
    };
    let router = Rc::new(client.connect(None).await);
    *state.router.borrow_mut() = Some(router.clone());
    // A promotion finished here records its branch point before anything ships.
    replication.finish_promotion(&router).await;
    let _shipping = shipper.map(|ship| glommio::spawn_local(ship(router.clone())));
    replication.start(&router);
    state.phase.set(Phase::Serving);
    let _ = serving_tx.send(());
    let mut next_log_check = Instant::now();
    while !shutdown.load(Ordering::SeqCst) {
        if Instant::now() >= next_log_check {
            if let Err(gone) = lock_watch.check() {
                fail_on_data_dir_gone(&state, &router, &gone, grace, format).await;
            }
            if let Some((shard, failure)) = failed_log(&router).await {
                fail_on_log_failure(&state, &router, shard, &failure, grace, format).await;
            }
            next_log_check = Instant::now() + LOG_CHECK_EVERY;
        }
        glommio::timer::sleep(SHUTDOWN_POLL).await;
    }
    tracing::info!(
        grace_ms = grace.as_millis() as u64,
        "shutting down: draining connections"
    );
    let stopping_at = Instant::now();
    state.phase.set(Phase::Draining);
    drain_all(&router, grace).await?;
    // Within the grace: the watchdog's margin stays for closing the logs.
    ship_last_round(stopping_at + grace).await;
    if failpoint::armed("shutdown.hang").is_some() {
        futures_lite::future::pending::<()>().await; // only the watchdog ends this
    }
    stop_all(&router).await?;
    Ok(())
}

/// Once no request is in flight: ships what the archive lacks of every log (the
/// last tail window's writes, which the next window would have shipped), waiting until
/// `by` at most, so that the watchdog's deadline is kept. Logged either way.
async fn ship_last_round(by: Instant) {
    let budget = by.saturating_duration_since(Instant::now());
    let shipped = futures_lite::future::or(oc_ship::shipper::last_round(), async {
        glommio::timer::sleep(budget).await;
        Some(false)
    });
    match shipped.await {
        None => {} // no archive
        Some(true) => tracing::info!("shipped the logs' last writes to the archive"),
        Some(false) => tracing::warn!(
            budget_ms = budget.as_millis() as u64,
            "the last shipping round did not finish (or failed) within the shutdown grace: \
             the archive may lack the writes of the last tail window; they are durable in \
             this data directory and are shipped at the next start"
        ),
    }
}

/// Stops every shard's listener and waits up to `grace` for its connections to finish
/// their requests and close.
async fn drain_all(router: &Rc<ShardRouter>, grace: Duration) -> Result<()> {
    let drains: Vec<_> = (0..router.shards())
        .map(|shard| {
            let router = router.clone();
            glommio::spawn_local(async move {
                let call = move |_node: Rc<ShardNode>| listener::drain_local(grace);
                (shard, router.call(shard, call).await)
            })
        })
        .collect();
    for drain in drains {
        let (shard, left) = drain.await;
        let left = left?;
        if left > 0 {
            tracing::warn!(
                shard,
                connections = left,
                "connections still open after the grace period; closing them"
            );
        }
    }
    Ok(())
}

/// The first shard whose write-ahead log failed, and why. A shard that does not
/// answer in time is asked again next round (a panicked one has ended the process).
async fn failed_log(router: &ShardRouter) -> Option<(usize, String)> {
    for shard in 0..router.shards() {
        let call = async {
            router
                .call(shard, |node: Rc<ShardNode>| async move {
                    node.shard().wal().failure().map(|e| e.to_string())
                })
                .await
                .ok()
                .flatten()
        };
        let timeout = async {
            glommio::timer::sleep(LOG_CHECK_TIMEOUT).await;
            None
        };
        if let Some(failure) = futures_lite::future::or(call, timeout).await {
            return Some((shard, failure));
        }
    }
    None
}

/// A log failed (a write or `fdatasync` returned an error): the kernel may have
/// dropped pages the log believed written, so only a restart's recovery knows what is
/// durable (the Postgres answer to fsyncgate). The log has already failed every frame
/// in flight; this answers those requests (`503 log_failed`), says so on `/health`,
/// and ends the process with [`fail_stop::EXIT_LOG_FAILED`].
async fn fail_on_log_failure(
    state: &ControlState,
    router: &Rc<ShardRouter>,
    shard: usize,
    failure: &str,
    grace: Duration,
    format: LineFormat,
) -> ! {
    let reason = format!("the write-ahead log of shard {shard} failed: {failure}");
    tracing::error!(shard, %failure, "the write-ahead log failed: answering what is in flight, then exiting");
    let consequence = format!(
        "only a restart's recovery knows what is durable, so the process exits with status \
         {} (requests in flight were answered 503 log_failed; every acknowledged write is \
         durable)",
        fail_stop::EXIT_LOG_FAILED
    );
    answer_in_flight_then_exit(
        state,
        router,
        reason,
        grace,
        format,
        fail_stop::EXIT_LOG_FAILED,
        &consequence,
    )
    .await
}

/// The data directory, or its lock file, was removed, moved or replaced under the
/// running process (`gone` says which): the logs may be writing unlinked files, so every
/// shard's log is failed at once (what is in flight is answered `503 log_failed`) and
/// the process ends with [`fail_stop::EXIT_DATA_DIR_GONE`]. Writes acknowledged between
/// the removal and this check (made every [`LOG_CHECK_EVERY`]) went to the removed files.
async fn fail_on_data_dir_gone(
    state: &ControlState,
    router: &Rc<ShardRouter>,
    gone: &str,
    grace: Duration,
    format: LineFormat,
) -> ! {
    tracing::error!(%gone, "the data directory is gone: refusing writes, then exiting");
    for shard in 0..router.shards() {
        let cause = oc_io::Error::Io {
            op: "keeping the data directory",
            file: state.data_dir.display().to_string(),
            source: Arc::new(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                gone.to_string(),
            )),
        };
        let call = async {
            let failed = router.call(shard, move |node: Rc<ShardNode>| async move {
                node.shard().wal().fail_with(cause);
            });
            let _ = failed.await;
        };
        // A shard that does not answer in time is past helping; the exit ends it.
        futures_lite::future::or(call, glommio::timer::sleep(LOG_CHECK_TIMEOUT)).await;
    }
    let reason = format!("{gone}; its write-ahead logs may be writing removed files");
    let consequence = format!(
        "exiting with status {}: writes acknowledged since it went may be lost with the \
         removed files. Restore the directory (oc-pitr restore from the archive) before \
         restarting; a restart on an empty directory starts an empty server. See \
         RUNBOOK.md: \"the process exited with status 7\"",
        fail_stop::EXIT_DATA_DIR_GONE
    );
    answer_in_flight_then_exit(
        state,
        router,
        reason,
        grace,
        format,
        fail_stop::EXIT_DATA_DIR_GONE,
        &consequence,
    )
    .await
}

/// Says `reason` on `/health`, answers the requests in flight (within
/// [`LOG_FAILED_DRAIN`]), and ends the process with `status` and one fatal line.
async fn answer_in_flight_then_exit(
    state: &ControlState,
    router: &Rc<ShardRouter>,
    reason: String,
    grace: Duration,
    format: LineFormat,
    status: i32,
    consequence: &str,
) -> ! {
    *state.failure.borrow_mut() = Some(reason.clone());
    state.phase.set(Phase::Failed);
    if let Err(e) = drain_all(router, grace.min(LOG_FAILED_DRAIN)).await {
        tracing::warn!(error = %e, "draining before the exit");
    }
    let line = fail_stop::fatal_line(PROGRAM, format, &format!("{reason}; {consequence}"));
    fail_stop::exit_now(status, &line)
}
