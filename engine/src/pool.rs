//! The pool of data shards: one glommio executor per shard, pinned to a core, each
//! owning its tenants' log, checkpoints and state, wired together by the mesh.
//!
//! Start-up is all or nothing. Every shard recovers in parallel and reports; only when
//! all have recovered are they told to go (connect the mesh, start the checkpointer,
//! run the caller's `serve`). If any fails, the others close their logs and the first
//! error is returned, so a server never runs with part of its tenants missing.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::mpsc;
use std::task::{Poll, Waker};
use std::time::Duration;

use glommio::{ExecutorJoinHandle, Placement};
use oc_io::{executor::executor_builder, DmaStorage, Lsn, WalConfig};

use crate::error::EngineError;
use crate::mesh::{build_mesh, MeshEndpoints, Router};
use crate::placement::{
    check_shard_dirs, ensure_layout, mark_shard_dirs, owner_shard, shard_dir, Layout,
};
use crate::quota::TenantQuotas;
use crate::scheduler::{spawn_checkpointer, CheckpointPolicy};
use crate::shard::{Shard, ShardOpenReport};
use crate::tenant_id::TenantId;

/// Calls in flight from one participant to one shard before callers get `Overloaded`.
pub const DEFAULT_FORWARD_CAPACITY: usize = 1024;

/// How a pool is started.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub data_dir: PathBuf,
    pub shards: usize,
    /// Pin shard `i` to CPU `i` (modulo the CPU count). Off in tests that share cores.
    pub pin_to_cores: bool,
    pub wal: WalConfig,
    /// `None` runs no checkpointer (checkpoints only when asked).
    pub checkpoint: Option<CheckpointPolicy>,
    pub forward_capacity: usize,
    /// Mesh participants that call shards but serve none (the control executor, tools).
    pub clients: usize,
    /// How long an idle shard spins before it parks in the kernel (`None`: parks at
    /// once). Spinning trades CPU for the wake-up latency of the next request.
    pub spin_before_park: Option<Duration>,
    /// Start every shard with its log held (release barrier at LSN 1) until an archive
    /// shipper lifts it segment by segment, so nothing leaves the disk unarchived.
    pub hold_wal_for_archive: bool,
    /// Start every shard with its own writes stopped (`Wal::stop_own_writes`) until
    /// the server resumes them: a writer that finishes a promotion at its start
    /// writes nothing before its new epoch begins.
    pub hold_own_writes: bool,
    /// What each tenant may store.
    pub quotas: TenantQuotas,
    /// A follower's writer's layout: each shard's log keeps to its history
    /// (`WalConfig::history`), so a returning ex-writer's divergent tail is cut.
    pub writer_history: Option<Layout>,
    /// How far the archive holds each shard's log (a shipping writer's, by shard):
    /// recovery refuses a log that ends before it.
    pub archived_logs: Vec<oc_io::wal::ArchivedLog>,
}

impl PoolConfig {
    /// One shard per available CPU, pinned, hourly checkpoints, one client.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        PoolConfig {
            data_dir: data_dir.into(),
            shards: std::thread::available_parallelism().map_or(1, |n| n.get()),
            pin_to_cores: true,
            wal: WalConfig::default(),
            checkpoint: Some(CheckpointPolicy::default()),
            forward_capacity: DEFAULT_FORWARD_CAPACITY,
            clients: 1,
            spin_before_park: None,
            hold_wal_for_archive: false,
            hold_own_writes: false,
            quotas: TenantQuotas::default(),
            writer_history: None,
            archived_logs: Vec::new(),
        }
    }
}

/// What a call forwarded to a data shard runs with.
pub struct ShardNode {
    id: usize,
    shard: Rc<Shard<DmaStorage>>,
    stop: Cell<bool>,
    stop_waker: RefCell<Option<Waker>>,
}

impl ShardNode {
    pub fn id(&self) -> usize {
        self.id
    }

    pub fn shard(&self) -> &Rc<Shard<DmaStorage>> {
        &self.shard
    }

    /// Asks the shard to stop: it stops serving, makes its log durable and exits.
    pub fn request_stop(&self) {
        self.stop.set(true);
        if let Some(waker) = self.stop_waker.borrow_mut().take() {
            waker.wake();
        }
    }

    async fn stopped(&self) {
        poll_fn(|cx| {
            if self.stop.get() {
                Poll::Ready(())
            } else {
                *self.stop_waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

/// A participant's handle for running closures on shards.
pub type ShardRouter = Router<ShardNode>;

/// The shard that owns `tenant` in a pool routed by `router`.
pub fn owner_of(router: &ShardRouter, tenant: &TenantId) -> usize {
    owner_shard(tenant, router.shards())
}

/// Asks every shard to stop (each makes its log durable first).
pub async fn stop_all(router: &ShardRouter) -> Result<(), EngineError> {
    for shard in 0..router.shards() {
        router
            .call(
                shard,
                |node: Rc<ShardNode>| async move { node.request_stop() },
            )
            .await?;
    }
    Ok(())
}

/// Running data shards.
pub struct ShardPool {
    threads: Vec<ExecutorJoinHandle<Result<(), EngineError>>>,
    clients: Vec<MeshEndpoints<ShardNode>>,
}

impl ShardPool {
    /// Checks the directory's layout, recovers every shard and, once all have, runs
    /// `serve` on each. Returns what each shard's recovery did, in shard order.
    pub fn start<F, Fut>(
        config: PoolConfig,
        serve: F,
    ) -> Result<(ShardPool, Vec<ShardOpenReport>), EngineError>
    where
        F: Fn(Rc<ShardNode>, Rc<ShardRouter>) -> Fut + Send + Clone + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let layout = ensure_layout(&config.data_dir, config.shards)?;
        check_shard_dirs(&config.data_dir, &layout)?;
        let mut endpoints = build_mesh(config.shards, config.clients, config.forward_capacity);
        let clients = endpoints.split_off(config.shards);
        let cpus = allowed_cpus();
        let (opened_tx, opened_rx) = mpsc::channel();
        let mut go_senders = Vec::new();
        let mut threads = Vec::new();
        for (id, ends) in endpoints.into_iter().enumerate() {
            let (go_tx, go_rx) = mpsc::channel::<bool>();
            go_senders.push(go_tx);
            let placement = if config.pin_to_cores && !cpus.is_empty() {
                Placement::Fixed(cpus[id % cpus.len()])
            } else {
                Placement::Unbound
            };
            let run = ShardRun {
                id,
                dir: shard_dir(&config.data_dir, id),
                wal: WalConfig {
                    history: config.writer_history.as_ref().map(|l| l.history(id)),
                    archived: config.archived_logs.get(id).copied(),
                    ..config.wal.clone()
                },
                checkpoint: config.checkpoint,
                hold_wal_for_archive: config.hold_wal_for_archive,
                hold_own_writes: config.hold_own_writes,
                quotas: config.quotas,
                opened: opened_tx.clone(),
                go: go_rx,
                ends,
            };
            let serve = serve.clone();
            let mut builder = executor_builder(placement).name(&format!("oc-shard-{id}"));
            if let Some(spin) = config.spin_before_park {
                builder = builder.spin_before_park(spin);
            }
            let spawned = builder.spawn(move || run.run(serve));
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    let _ = abort(go_senders, threads); // the spawn failure is what to report
                    return Err(EngineError::Layout(format!(
                        "cannot start the executor of shard {id}: {e}"
                    )));
                }
            }
        }
        drop(opened_tx);
        let mut reports: Vec<Option<ShardOpenReport>> = (0..threads.len()).map(|_| None).collect();
        let mut first_error = None;
        for _ in 0..threads.len() {
            match opened_rx.recv() {
                Ok((id, Ok(report))) => reports[id] = Some(*report),
                Ok((id, Err(e))) => {
                    tracing::error!(shard = id, error = %e, "shard failed to open");
                    first_error.get_or_insert(e);
                }
                Err(_) => break, // a shard thread died; its join reports why
            }
        }
        let reports: Option<Vec<ShardOpenReport>> = reports.into_iter().collect();
        if first_error.is_none() && reports.is_some() {
            if let Err(e) = mark_shard_dirs(&config.data_dir, &layout) {
                first_error = Some(e);
            }
        }
        match (first_error, reports) {
            (None, Some(reports)) => {
                for go in go_senders {
                    let _ = go.send(true);
                }
                Ok((ShardPool { threads, clients }, reports))
            }
            (error, _) => {
                let joined = abort(go_senders, threads);
                Err(error.or(joined.err()).unwrap_or_else(|| {
                    EngineError::Layout("a shard stopped during start-up".to_string())
                }))
            }
        }
    }

    /// The mesh ends of a client participant, to connect on its own executor.
    pub fn take_client(&mut self) -> Option<MeshEndpoints<ShardNode>> {
        self.clients.pop()
    }

    /// Waits for every shard to exit (after [`stop_all`]); the first error wins.
    pub fn join(self) -> Result<(), EngineError> {
        join_all(self.threads)
    }
}

/// The CPUs this process may run on, in order: its affinity mask, which `taskset`,
/// systemd's `CPUAffinity=` and a container's cpuset set. Shard `i` is pinned to the
/// `i mod n`-th of them, never to a CPU the operator did not give the process. Empty
/// when the mask cannot be read (the shards then run unpinned).
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: sched_getaffinity writes at most the size given into a set we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

fn abort(
    go_senders: Vec<mpsc::Sender<bool>>,
    threads: Vec<ExecutorJoinHandle<Result<(), EngineError>>>,
) -> Result<(), EngineError> {
    for go in go_senders {
        let _ = go.send(false);
    }
    join_all(threads)
}

fn join_all(threads: Vec<ExecutorJoinHandle<Result<(), EngineError>>>) -> Result<(), EngineError> {
    let mut first = Ok(());
    for thread in threads {
        let outcome = match thread.join() {
            Ok(outcome) => outcome,
            Err(e) => Err(EngineError::Layout(format!("a shard executor failed: {e}"))),
        };
        if first.is_ok() {
            first = outcome;
        }
    }
    first
}

type OpenOutcome = (usize, Result<Box<ShardOpenReport>, EngineError>);

/// Everything one shard's thread needs, moved there at spawn.
struct ShardRun {
    id: usize,
    dir: PathBuf,
    wal: WalConfig,
    checkpoint: Option<CheckpointPolicy>,
    hold_wal_for_archive: bool,
    hold_own_writes: bool,
    quotas: TenantQuotas,
    opened: mpsc::Sender<OpenOutcome>,
    go: mpsc::Receiver<bool>,
    ends: MeshEndpoints<ShardNode>,
}

impl ShardRun {
    async fn run<F, Fut>(self, serve: F) -> Result<(), EngineError>
    where
        F: Fn(Rc<ShardNode>, Rc<ShardRouter>) -> Fut,
        Fut: Future<Output = ()> + 'static,
    {
        let opened = async {
            let storage = DmaStorage::open(&self.dir).await?;
            Shard::open(storage, self.wal.clone()).await
        }
        .await;
        // The sender is dropped right after use, so a shard that dies before
        // reporting cannot leave the starter waiting for it.
        let report_opened = self.opened;
        let shard = match opened {
            Ok((shard, report)) => {
                if self.hold_wal_for_archive {
                    shard.set_release_barrier(Some(Lsn(1)));
                }
                shard.set_quotas(self.quotas);
                let _ = report_opened.send((self.id, Ok(Box::new(report))));
                Rc::new(shard)
            }
            Err(e) => {
                let _ = report_opened.send((self.id, Err(e.clone())));
                return Err(e);
            }
        };
        if !wait_for_go(&self.go).await {
            return shard.close().await;
        }
        if self.hold_own_writes {
            shard.wal().stop_own_writes();
        }
        let node = Rc::new(ShardNode {
            id: self.id,
            shard: shard.clone(),
            stop: Cell::new(false),
            stop_waker: RefCell::new(None),
        });
        let router = Rc::new(self.ends.connect(Some(node.clone())).await);
        let checkpointer = self
            .checkpoint
            .map(|policy| spawn_checkpointer(shard.clone(), policy));
        let _backfill = crate::shard::spawn_backfill(shard.clone());
        let _serving = glommio::spawn_local(serve(node.clone(), router));
        tracing::info!(shard = self.id, "shard serving");
        node.stopped().await;
        if let Some(checkpointer) = checkpointer {
            checkpointer.stop().await;
        }
        shard.close().await
    }
}

/// Polls (without blocking the executor) until the starter says go or abort.
async fn wait_for_go(go: &mpsc::Receiver<bool>) -> bool {
    loop {
        match go.try_recv() {
            Ok(go) => return go,
            Err(mpsc::TryRecvError::Disconnected) => return false,
            Err(mpsc::TryRecvError::Empty) => glommio::timer::sleep(Duration::from_millis(1)).await,
        }
    }
}
