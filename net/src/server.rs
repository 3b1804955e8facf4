//! Starting and stopping `oc-server`: sockets first, then the control executor (ops
//! endpoints answer "recovering" right away), then every shard's recovery, then
//! serving; on SIGTERM/SIGINT a drain within the grace period, every log made
//! durable, and exit 0.

use std::io::Write;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use glommio::net::TcpListener;
use glommio::Placement;
use oc_ship::engine::io::{self, executor::executor_builder};
use oc_ship::engine::mesh::MeshEndpoints;
use oc_ship::engine::{
    stop_all, CheckpointPolicy, PoolConfig, ShardNode, ShardOpenReport, ShardPool,
};

use oc_ship::archive::open_archive;
use oc_ship::breaker::BreakerPolicy;
use oc_ship::shipper::{self, ShipStatus, ShipperConfig};

use crate::config::ServerConfig;
use crate::listener::{self, ConnectionSettings};
use crate::ops::{self, ControlState, Phase};

/// How often the control executor looks for a shutdown request.
const SHUTDOWN_POLL: Duration = Duration::from_millis(20);

/// Runs the server until SIGTERM or SIGINT. Prints one line per listener once serving
/// (`oc-server: api listening on <addr>`), which scripts and tests wait for.
pub fn run(config: ServerConfig) -> Result<()> {
    config.validate().map_err(|e| anyhow!(e))?;
    let auth = config.auth().map_err(|e| anyhow!(e))?;
    if auth.admin_token.is_none() {
        tracing::warn!("authentication is OFF (no admin token): anyone who can reach the listeners can read and write every tenant");
    }
    let shards = config
        .shards
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    crate::fd_limit::raise_and_check(crate::fd_limit::needed(config.max_connections, shards))
        .map_err(|e| anyhow!(e))?;
    let memory_budget = oc_ship::engine::quota::start_memory_budget(config.memory_budget_bytes)
        .map_err(|e| anyhow!(e))?;
    tracing::info!(memory_budget, "memory budget set");
    let (api_fds, api_addr) = listener::bind_shared(config.listen, shards)
        .with_context(|| format!("binding the API on {}", config.listen))?;

    let shutdown = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, shutdown.clone())
            .context("installing the signal handlers")?;
    }

    // The data directory's own layout speaks first: its error names the fix.
    oc_ship::engine::placement::ensure_layout(&config.data_dir, shards)
        .context("checking the data directory")?;
    // The archive is claimed and listed before any shard opens: a wrong or unreachable
    // archive is a start-up error, not a surprise later.
    let ship_status = ShipStatus::default();
    let shipper = match config.archive_uri() {
        Some(uri) => {
            let archive =
                open_archive(&uri).with_context(|| format!("opening the archive {uri}"))?;
            let ship_config = ShipperConfig {
                data_dir: config.data_dir.clone(),
                shards,
                tail_window: Duration::from_millis(config.tail_window_ms),
                retention: config.archive_retention,
                breaker: BreakerPolicy {
                    open_for: Duration::from_millis(config.archive_breaker_open_ms),
                    ..BreakerPolicy::default()
                },
            };
            let start = shipper::start(archive, ship_config, ship_status.clone())
                .with_context(|| format!("starting to ship to the archive {uri}"))?;
            tracing::info!(archive = %uri, "shipping to the archive");
            Some(start)
        }
        None => {
            tracing::warn!("no archive (--archive none): losing this machine loses the data");
            None
        }
    };
    let shipping = shipper.is_some();
    let (client_tx, client_rx) = mpsc::channel::<MeshEndpoints<ShardNode>>();
    let (ops_addr_tx, ops_addr_rx) = mpsc::channel::<std::io::Result<SocketAddr>>();
    let (serving_tx, serving_rx) = mpsc::channel::<()>();
    let control = {
        let shutdown = shutdown.clone();
        let ship_status_for_ops = shipper.as_ref().map(|_| ship_status.clone());
        let ops_listen = config.ops_listen;
        let grace = Duration::from_millis(config.shutdown_grace_ms);
        executor_builder(Placement::Unbound)
            .name("oc-control")
            .spawn(move || {
                let channels = ControlChannels {
                    client_rx,
                    ops_addr_tx,
                    serving_tx,
                    shipper,
                    ship_status: ship_status_for_ops,
                };
                control_main(ops_listen, shards, channels, shutdown, grace)
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
        max_connections: config.max_connections.div_ceil(shards),
        limits: config.api_limits(),
        auth,
        tls: config.tls().map_err(|e| anyhow!(e))?,
    };
    let pool_config = PoolConfig {
        shards,
        pin_to_cores: !config.no_pin,
        spin_before_park: (config.spin_before_park_us > 0)
            .then(|| Duration::from_micros(config.spin_before_park_us)),
        wal: config.wal_config(),
        hold_wal_for_archive: shipping,
        quotas: config.tenant_quotas(),
        checkpoint: Some(CheckpointPolicy {
            interval: Duration::from_secs(config.checkpoint_interval_s),
            wal_bytes: config.checkpoint_wal_bytes,
        }),
        ..PoolConfig::new(&config.data_dir)
    };
    let settings_tls = settings.tls.is_some();
    let started = Instant::now();
    let serve = move |node: Rc<ShardNode>, router| {
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
    let scheme = if settings_tls { "https" } else { "http" };
    // A closed stdout (a script that read the first line and left) must not stop the
    // server: write errors are ignored.
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "oc-server: api listening on {api_addr} ({scheme})");
    let _ = writeln!(stdout, "oc-server: ops listening on {ops_addr}");
    let _ = stdout.flush();
    drop(stdout);
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

fn report_recovery(reports: &[ShardOpenReport], took: Duration) {
    for (shard, report) in reports.iter().enumerate() {
        tracing::info!(
            shard,
            checkpoint = ?report.checkpoint.map(|l| l.0),
            unusable_checkpoints = report.unusable_checkpoints.len(),
            segments = report.wal.segments.len(),
            frames_replayed = report.wal.frames_replayed,
            torn_tail = ?report.wal.torn_tail,
            "shard recovered"
        );
    }
    tracing::info!(
        shards = reports.len(),
        took_ms = took.as_millis() as u64,
        "recovery finished"
    );
}

/// The control executor: ops endpoints from the start, then, once the shards run, the
/// shutdown sequence when a signal arrives.
/// How the control executor hears from and answers the main thread during start-up.
struct ControlChannels {
    client_rx: mpsc::Receiver<MeshEndpoints<ShardNode>>,
    ops_addr_tx: mpsc::Sender<std::io::Result<SocketAddr>>,
    serving_tx: mpsc::Sender<()>,
    shipper: Option<shipper::ShipperLoop>,
    ship_status: Option<ShipStatus>,
}

async fn control_main(
    ops_listen: SocketAddr,
    shards: usize,
    channels: ControlChannels,
    shutdown: Arc<AtomicBool>,
    grace: Duration,
) -> Result<()> {
    let ControlChannels {
        client_rx,
        ops_addr_tx,
        serving_tx,
        shipper,
        ship_status,
    } = channels;
    let listener = match TcpListener::bind(ops_listen) {
        Ok(listener) => listener,
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
        probe: io::probe_io_uring(),
        shards,
        ship_status,
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
    let _shipping = shipper.map(|ship| glommio::spawn_local(ship(router.clone())));
    state.phase.set(Phase::Serving);
    let _ = serving_tx.send(());
    while !shutdown.load(Ordering::SeqCst) {
        glommio::timer::sleep(SHUTDOWN_POLL).await;
    }
    tracing::info!(
        grace_ms = grace.as_millis() as u64,
        "shutting down: draining connections"
    );
    state.phase.set(Phase::Draining);
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
    stop_all(&router).await?;
    Ok(())
}
