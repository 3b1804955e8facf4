//! The pool phase of `oc-bench engine`: single-row upserts across every shard of a
//! `ShardPool`, with writers running on the shards themselves (as connections do in
//! the server), either writing to a tenant their own shard owns ("local") or to one
//! owned by the next shard, so every commit crosses the mesh ("forwarded").

use std::cell::{Cell, RefCell};
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use oc_engine::{
    owner_shard, stop_all, ColumnType, EngineError, PoolConfig, ShardNode, ShardPool, ShardRouter,
    TableSchema, TenantId, WriteOp,
};
use oc_io::SimRng;
use serde::{Deserialize, Serialize};

use crate::latency::{histogram, Percentiles};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Routing {
    Local,
    Forwarded,
}

/// The rows a phase writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowShape {
    /// `oc-bench engine`'s rows: a random int key and a 180-byte text body.
    IntKey,
    /// `oc-bench peers`' rows: 16 random bytes as the key (32 hex characters) and a
    /// 200-byte value, as every peer writes them.
    RandomKey16,
}

impl RowShape {
    fn schema(self) -> Result<TableSchema, EngineError> {
        match self {
            RowShape::IntKey => crate::engine::rows_schema(),
            RowShape::RandomKey16 => TableSchema::new(
                "rows",
                &[
                    ("k", ColumnType::Text, false),
                    ("v", ColumnType::Text, true),
                ],
                &["k"],
                &[],
            ),
        }
    }

    fn row(self, rng: &mut SimRng) -> WriteOp {
        match self {
            RowShape::IntKey => crate::engine::row(rng.below(1 << 40)),
            RowShape::RandomKey16 => {
                let key = format!("{:016x}{:016x}", rng.below(u64::MAX), rng.below(u64::MAX));
                let mut object = serde_json::Map::with_capacity(2);
                object.insert("k".into(), serde_json::Value::String(key));
                object.insert("v".into(), crate::peers::value_200().clone());
                WriteOp::Upsert(object)
            }
        }
    }
}

#[derive(Serialize, Deserialize)]
pub struct PoolResult {
    pub shards: usize,
    pub routing: Routing,
    pub concurrency: usize,
    pub commits_per_s: f64,
    pub commit_p50_us: u64,
    pub commit_p99_us: u64,
    pub commit_p999_us: u64,
    pub overloaded: u64,
}

/// A tenant id whose owner is `shard` among `shards`.
fn tenant_on(shard: usize, shards: usize) -> TenantId {
    (0..)
        .map(|k| TenantId::parse(&format!("bench-{k}")).expect("a valid tenant id"))
        .find(|t| owner_shard(t, shards) == shard)
        .expect("some name hashes to every shard")
}

struct ShardLoad {
    commits: u64,
    overloaded: u64,
    latency: Histogram<u64>,
}

/// The pool a phase runs on.
#[derive(Debug, Clone, Copy)]
pub struct PoolSetup {
    pub shards: usize,
    /// Pin shard `i` to CPU `i` (the server's default).
    pub pin_to_cores: bool,
    pub shape: RowShape,
}

/// Runs `concurrency` writers split over the shards of a fresh pool under `dir`.
pub fn pool_phase(
    dir: &Path,
    setup: PoolSetup,
    routing: Routing,
    concurrency: usize,
    warmup: Duration,
    phase: Duration,
) -> Result<PoolResult> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let (done_tx, done_rx) = mpsc::channel();
    let PoolSetup {
        shards,
        pin_to_cores,
        shape,
    } = setup;
    let config = PoolConfig {
        shards,
        pin_to_cores,
        checkpoint: None,
        ..PoolConfig::new(dir)
    };
    // Every shard starts measuring at the same instant, after set-up and warm-up.
    let start_at = Instant::now() + Duration::from_secs(1) + warmup;
    // Commits so far, for the progress line (the bench's own counter, not the engine's).
    let progress = Arc::new(AtomicU64::new(0));
    let counted = progress.clone();
    let (mut pool, _) = ShardPool::start(config, move |node, router| {
        let done = done_tx.clone();
        let counted = counted.clone();
        async move {
            let outcome = drive_shard(
                node,
                router,
                shape,
                routing,
                concurrency,
                (start_at, phase),
                counted,
            )
            .await;
            let _ = done.send(outcome);
        }
    })?;
    let mut commits = 0;
    let mut overloaded = 0;
    let mut latency = histogram();
    // The client connects at once, as the server's control executor does, and waits
    // on its own thread for the end of the phase to stop the shards.
    let client = pool.take_client().context("the pool has a client")?;
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let stopper = std::thread::spawn(move || {
        oc_io::executor::run_local(async move {
            let router = client.connect(None).await;
            while let Err(mpsc::TryRecvError::Empty) = stop_rx.try_recv() {
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
            stop_all(&router).await
        })
    });
    let deadline = Instant::now() + phase + warmup + Duration::from_secs(60);
    let mut reported = 0;
    let mut last = (Instant::now(), 0u64);
    while reported < shards {
        let load = match done_rx.recv_timeout(Duration::from_secs(1)) {
            Ok(load) => load?,
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                let now = (Instant::now(), progress.load(Ordering::Relaxed));
                let rate = (now.1 - last.1) as f64 / now.0.duration_since(last.0).as_secs_f64();
                eprintln!("  [{concurrency:>4} writers, {routing:?}] {rate:>9.0} commits/s");
                last = now;
                continue;
            }
            Err(_) => anyhow::bail!("a shard never reported its load"),
        };
        reported += 1;
        commits += load.commits;
        overloaded += load.overloaded;
        latency.add(&load.latency)?;
    }
    stop_tx.send(()).context("the stopper thread is gone")?;
    stopper
        .join()
        .map_err(|_| anyhow::anyhow!("the stopper thread panicked"))??;
    pool.join()?;
    let p = Percentiles::of(&latency);
    Ok(PoolResult {
        shards,
        routing,
        concurrency,
        commits_per_s: commits as f64 / phase.as_secs_f64(),
        commit_p50_us: p.p50_us,
        commit_p99_us: p.p99_us,
        commit_p999_us: p.p999_us,
        overloaded,
    })
}

async fn drive_shard(
    node: Rc<ShardNode>,
    router: Rc<ShardRouter>,
    shape: RowShape,
    routing: Routing,
    concurrency: usize,
    (start_at, phase): (Instant, Duration),
    counted: Arc<AtomicU64>,
) -> Result<ShardLoad, EngineError> {
    let shards = router.shards();
    let target_shard = match routing {
        Routing::Local => node.id(),
        Routing::Forwarded => (node.id() + 1) % shards,
    };
    let tenant = tenant_on(target_shard, shards);
    {
        let tenant = tenant.clone();
        router
            .call(target_shard, move |owner: Rc<ShardNode>| async move {
                owner.shard().create_tenant(&tenant).await?;
                owner.shard().create_table(&tenant, shape.schema()?).await
            })
            .await??;
    }
    let writers = concurrency / shards + usize::from(node.id() < concurrency % shards);
    let measuring = Rc::new(Cell::new(false));
    let stop = Rc::new(Cell::new(false));
    let load = Rc::new(RefCell::new(ShardLoad {
        commits: 0,
        overloaded: 0,
        latency: histogram(),
    }));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let counted = counted.clone();
        let (router, tenant, measuring, stop, load) = (
            router.clone(),
            tenant.clone(),
            measuring.clone(),
            stop.clone(),
            load.clone(),
        );
        let seed = (node.id() * 10_000 + w + 1) as u64;
        tasks.push(glommio::spawn_local(async move {
            let mut rng = SimRng::new(seed);
            while !stop.get() {
                let ops = vec![shape.row(&mut rng)];
                let tenant = tenant.clone();
                let began = Instant::now();
                let outcome = router
                    .call(target_shard, move |owner: Rc<ShardNode>| async move {
                        let written = owner.shard().write(&tenant, "rows", &ops, None).await;
                        // Freed where they were allocated, as the server does.
                        (written, ops)
                    })
                    .await
                    .map(|(written, _ops)| written);
                if !measuring.get() {
                    continue;
                }
                let mut load = load.borrow_mut();
                match outcome {
                    Ok(written) => {
                        written?;
                        load.commits += 1;
                        counted.fetch_add(1, Ordering::Relaxed);
                        load.latency
                            .saturating_record(began.elapsed().as_micros() as u64);
                    }
                    Err(_) => load.overloaded += 1,
                }
            }
            Ok::<(), EngineError>(())
        }));
    }
    glommio::timer::sleep(start_at.saturating_duration_since(Instant::now())).await;
    measuring.set(true);
    glommio::timer::sleep(phase).await;
    measuring.set(false);
    stop.set(true);
    for task in tasks {
        task.await?;
    }
    let finished = load.replace(ShardLoad {
        commits: 0,
        overloaded: 0,
        latency: histogram(),
    });
    Ok(finished)
}
