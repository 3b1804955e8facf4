//! The shard pool on the real disk: tenants land on their owner shard through the
//! mesh, survive a restart, a different shard count is refused, forwarded calls are
//! bounded, and start-up is all or nothing.

use std::rc::Rc;
use std::sync::mpsc;
use std::time::Duration;

use oc_engine::{
    owner_of, owner_shard, stop_all, ColumnType, EngineError, MeshError, PoolConfig, ShardNode,
    ShardPool, TableSchema, TenantId, WriteOp,
};
use oc_io::executor::run_local;
use serde_json::json;

fn config(dir: &std::path::Path, shards: usize) -> PoolConfig {
    PoolConfig {
        shards,
        pin_to_cores: false,
        checkpoint: None,
        ..PoolConfig::new(dir)
    }
}

fn schema() -> TableSchema {
    TableSchema::new(
        "items",
        &[
            ("id", ColumnType::Int, false),
            ("name", ColumnType::Text, true),
        ],
        &["id"],
        &[],
    )
    .expect("schema")
}

fn tenant(i: usize) -> TenantId {
    TenantId::parse(&format!("tenant-{i}")).expect("valid")
}

/// Starts a pool whose shards only serve calls.
fn start(config: PoolConfig) -> Result<ShardPool, EngineError> {
    ShardPool::start(config, |_node, _router| async {}).map(|(pool, _)| pool)
}

#[test]
fn tenants_live_on_their_owner_shard_and_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut pool = start(config(dir.path(), 3)).expect("start");
    let client = pool.take_client().expect("a client");
    run_local(async move {
        let router = client.connect(None).await;
        assert_eq!(router.local_shard(), None);
        for i in 0..12 {
            let t = tenant(i);
            let owner = owner_of(&router, &t);
            let (landed, lsn) = router
                .call(owner, move |node: Rc<ShardNode>| async move {
                    let shard = node.shard();
                    shard.create_tenant(&t).await.expect("tenant");
                    shard.create_table(&t, schema()).await.expect("table");
                    let ops: Vec<WriteOp> = (0..5)
                        .map(|id| {
                            let row = json!({"id": id, "name": format!("row {id}")});
                            WriteOp::Upsert(row.as_object().expect("object").clone())
                        })
                        .collect();
                    let (lsn, _) = shard.write(&t, "items", &ops, None).await.expect("write");
                    (node.id(), lsn)
                })
                .await
                .expect("owner runs the call");
            assert_eq!(landed, owner);
            assert!(lsn.0 >= 3, "three records were logged on the owner");
        }
        stop_all(&router).await.expect("stop");
    });
    pool.join().expect("clean stop");

    let mut pool = start(config(dir.path(), 3)).expect("restart");
    let client = pool.take_client().expect("a client");
    run_local(async move {
        let router = client.connect(None).await;
        for i in 0..12 {
            let t = tenant(i);
            let owner = owner_shard(&t, 3);
            for shard in 0..3 {
                let t = t.clone();
                let rows = router
                    .call(shard, move |node: Rc<ShardNode>| async move {
                        node.shard()
                            .read(&t, |t| t.table("items").map(|table| table.rows().count()))
                            .ok()
                            .and_then(Result::ok)
                    })
                    .await
                    .expect("call");
                let expected = (shard == owner).then_some(5);
                assert_eq!(rows, expected, "tenant {i} on shard {shard}");
            }
        }
        stop_all(&router).await.expect("stop");
    });
    pool.join().expect("clean stop");

    let refused = start(config(dir.path(), 2))
        .err()
        .expect("other count refused");
    assert!(matches!(refused, EngineError::Layout(_)), "{refused}");
    assert!(refused.to_string().contains("--shards 3"), "{refused}");
}

#[test]
fn shards_call_each_other_through_the_mesh() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (seen_tx, seen_rx) = mpsc::channel();
    let (mut pool, _) = ShardPool::start(config(dir.path(), 2), move |node, router| {
        let seen = seen_tx.clone();
        async move {
            let peer = 1 - node.id();
            let answer = router
                .call(peer, |n: Rc<ShardNode>| async move { n.id() })
                .await;
            let _ = seen.send((node.id(), answer));
        }
    })
    .expect("start");
    let mut seen: Vec<_> = (0..2)
        .map(|_| {
            seen_rx
                .recv_timeout(Duration::from_secs(10))
                .expect("answer")
        })
        .collect();
    seen.sort_by_key(|(id, _)| *id);
    assert_eq!(seen, vec![(0, Ok(1)), (1, Ok(0))]);
    let client = pool.take_client().expect("a client");
    run_local(async move { stop_all(&client.connect(None).await).await }).expect("stop");
    pool.join().expect("clean stop");
}

/// A cancellable call whose caller stops waiting is dropped on the shard it was
/// forwarded to the next time its job runs, and answered there, so the caller's count
/// of calls in flight goes back down; a plain call runs on to its end.
#[test]
fn a_forwarded_call_its_caller_abandons_stops_on_the_shard() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    struct Flag(Arc<AtomicBool>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let mut pool = start(config(dir.path(), 2)).expect("start");
    let client = pool.take_client().expect("a client");
    run_local(async move {
        let router = Rc::new(client.connect(None).await);
        for cancellable in [true, false] {
            let (steps, dropped) = (
                Arc::new(AtomicUsize::new(0)),
                Arc::new(AtomicBool::new(false)),
            );
            let (count, flag) = (steps.clone(), Flag(dropped.clone()));
            // 200 steps of 2 ms: 400 ms run to its end.
            let job = move |_n: Rc<ShardNode>| async move {
                let _flag = flag;
                for _ in 0..200 {
                    count.fetch_add(1, Ordering::SeqCst);
                    glommio::timer::sleep(Duration::from_millis(2)).await;
                }
            };
            let call = async {
                if cancellable {
                    router.call_cancellable(1, job).await
                } else {
                    router.call(1, job).await
                }
            };
            let gave_up = async {
                glommio::timer::sleep(Duration::from_millis(40)).await;
                Err(MeshError::Unavailable { shard: 9 })
            };
            let answered = futures_lite::future::or(call, gave_up).await;
            assert!(answered.is_err(), "the caller stopped waiting first");
            glommio::timer::sleep(Duration::from_millis(100)).await;
            let stopped_at = steps.load(Ordering::SeqCst);
            glommio::timer::sleep(Duration::from_millis(100)).await;
            if cancellable {
                assert!(dropped.load(Ordering::SeqCst), "the job was dropped");
                assert_eq!(steps.load(Ordering::SeqCst), stopped_at, "and ran no more");
                assert!(stopped_at < 200, "before its end ({stopped_at} steps)");
                assert_eq!(router.in_flight(1), 0, "its answer came back");
            } else {
                assert!(steps.load(Ordering::SeqCst) > stopped_at, "still running");
            }
        }
        stop_all(&router).await.expect("stop");
    });
    pool.join().expect("clean stop");
}

/// A query's turn is a glommio semaphore permit. A waiter woken for a permit whose task
/// is dropped before it polls again (a request cancelled just then, or an abandoned
/// forwarded call) must not strand the waiters behind it until another release (the
/// vendored glommio is patched for this; its upstream left them waiting).
#[test]
fn a_woken_turn_waiter_dropped_before_it_polls_wakes_the_next() {
    use std::cell::Cell;
    use std::future::Future;
    use std::task::Poll;
    run_local(async {
        let turns = Rc::new(glommio::sync::Semaphore::new(1));
        let held = turns.acquire_permit(1).await.expect("open");
        let woken = Rc::new(Cell::new(false));
        let first = {
            let (turns, woken) = (turns.clone(), woken.clone());
            glommio::spawn_local(async move {
                let mut acquire = Box::pin(turns.acquire_permit(1));
                // Polled once (it waits), then, once woken, gone without polling it.
                futures_lite::future::poll_fn(|cx| {
                    if woken.get() {
                        return Poll::Ready(());
                    }
                    assert!(
                        acquire.as_mut().poll(cx).is_pending(),
                        "acquired while held"
                    );
                    woken.set(true);
                    Poll::Pending
                })
                .await;
            })
        };
        let second = {
            let turns = turns.clone();
            glommio::spawn_local(async move {
                let _turn = turns.acquire_permit(1).await.expect("open");
            })
        };
        glommio::timer::sleep(Duration::from_millis(10)).await;
        drop(held);
        first.await;
        let took_its_turn = futures_lite::future::or(
            async {
                second.await;
                true
            },
            async {
                glommio::timer::sleep(Duration::from_secs(2)).await;
                false
            },
        )
        .await;
        assert!(took_its_turn, "the second waiter was stranded");
    });
}

#[test]
fn forwarded_calls_beyond_capacity_are_refused_not_queued() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut pool = start(PoolConfig {
        forward_capacity: 2,
        ..config(dir.path(), 2)
    })
    .expect("start");
    let client = pool.take_client().expect("a client");
    run_local(async move {
        let router = Rc::new(client.connect(None).await);
        let slow = |router: Rc<oc_engine::ShardRouter>| {
            glommio::spawn_local(async move {
                router
                    .call(1, |_n: Rc<ShardNode>| async {
                        glommio::timer::sleep(Duration::from_millis(300)).await;
                        7
                    })
                    .await
            })
        };
        let first = slow(router.clone());
        let second = slow(router.clone());
        glommio::yield_if_needed().await;
        glommio::timer::sleep(Duration::from_millis(20)).await;
        assert_eq!(router.in_flight(1), 2);
        let refused = router.call(1, |_n: Rc<ShardNode>| async { 0 }).await;
        assert_eq!(
            refused,
            Err(MeshError::Overloaded {
                shard: 1,
                in_flight: 2
            })
        );
        // Shard 0 has its own budget.
        assert_eq!(
            router
                .call(0, |n: Rc<ShardNode>| async move { n.id() })
                .await,
            Ok(0)
        );
        assert_eq!(first.await, Ok(7));
        assert_eq!(second.await, Ok(7));
        assert_eq!(router.in_flight(1), 0);
        assert_eq!(router.call(1, |_n: Rc<ShardNode>| async { 1 }).await, Ok(1));
        assert_eq!(
            router.call(5, |_n: Rc<ShardNode>| async { 1 }).await,
            Err(MeshError::NoSuchShard {
                shard: 5,
                shards: 2
            })
        );
        stop_all(&router).await.expect("stop");
    });
    pool.join().expect("clean stop");
}

#[test]
fn a_shard_that_cannot_open_fails_the_whole_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    start(config(dir.path(), 2))
        .and_then(|mut pool| {
            let client = pool.take_client().expect("a client");
            run_local(async move { stop_all(&client.connect(None).await).await })?;
            pool.join()
        })
        .expect("first start");
    // Shard 1's directory becomes a file: its storage cannot open. (Without the shard
    // markers, so that the start gets as far as opening the shards.)
    for shard in ["shard-0", "shard-1"] {
        std::fs::remove_file(dir.path().join(shard).join("oc-shard.json")).expect("unmarked");
    }
    let shard1 = dir.path().join("shard-1");
    std::fs::remove_dir_all(&shard1).expect("rm");
    std::fs::write(&shard1, b"not a directory").expect("write");
    let err = start(config(dir.path(), 2)).err().expect("start refused");
    assert!(matches!(err, EngineError::Wal(_)), "{err}");
}

/// The CPUs the calling thread may run on.
fn affinity() -> Vec<usize> {
    // SAFETY: sched_getaffinity writes at most the size given into a set we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set),
            0
        );
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

#[test]
fn shards_are_pinned_within_the_cpus_the_process_was_given() {
    let all = affinity();
    if all.len() < 2 {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs this on 2 CPUs or more"
        );
        eprintln!("skipped: one CPU, nothing to choose from");
        return;
    }
    // As `taskset -c <last>` (or a cpuset) would: this thread, and the shard threads it
    // starts, may only use the last CPU.
    let given = all[all.len() - 1];
    // SAFETY: sched_setaffinity on this thread with a set we built.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(given, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (seen_tx, seen_rx) = mpsc::channel();
    let pinned = PoolConfig {
        pin_to_cores: true,
        ..config(dir.path(), 2)
    };
    let (mut pool, _) = ShardPool::start(pinned, move |node, _router| {
        let seen = seen_tx.clone();
        async move {
            let _ = seen.send((node.id(), affinity()));
        }
    })
    .expect("start");
    let mut seen: Vec<_> = (0..2)
        .map(|_| {
            seen_rx
                .recv_timeout(Duration::from_secs(10))
                .expect("each shard reports")
        })
        .collect();
    seen.sort_by_key(|(id, _)| *id);
    // Both on the one CPU given, not on CPUs 0 and 1 of the machine.
    assert_eq!(seen, vec![(0, vec![given]), (1, vec![given])]);
    let client = pool.take_client().expect("a client");
    run_local(async move { stop_all(&client.connect(None).await).await }).expect("stop");
    pool.join().expect("clean stop");
}
