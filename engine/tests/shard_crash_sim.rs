//! Crash simulation of a shard over `SimStorage`: concurrent writers commit random
//! batches (and now and then drop and recreate the table) while the machine crashes
//! at a random storage operation. After each crash:
//! - recovery reaches at least the last acknowledged LSN;
//! - the recovered shard equals an independent reference model built from the
//!   acknowledged commands and the log after the checkpoint recovery used (so no batch
//!   is half applied, and checkpoint + replay = live apply);
//! - the live shard just before the crash equals the model at its applied LSN.
//!
//! A checkpointer writes checkpoints and releases covered segments throughout.
//!
//! Replay one run with `OC_SIM_SEED=<seed>`; `OC_SIM_SEEDS=<n>` sets how many run and
//! `OC_SIM_SEED_START=<first>` where they start.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use oc_engine::command::Command;
use oc_engine::record;
use oc_engine::table::RowWrite;
use oc_engine::{ColumnType, EngineError, Shard, TableSchema, TenantId, Value, WriteOp};
use oc_io::executor::run_local;
use oc_io::{Lsn, SimFaults, SimRng, SimStorage, Wal, WalConfig};
use serde_json::json;

fn config() -> WalConfig {
    WalConfig {
        segment_bytes: 32 * 1024,
        max_group_bytes: 8 * 1024,
        ..WalConfig::default()
    }
}

fn schema() -> TableSchema {
    TableSchema::new(
        "items",
        &[
            ("id", ColumnType::Int, false),
            ("grp", ColumnType::Text, true),
            ("n", ColumnType::Int, true),
        ],
        &["id"],
        &[("by_grp", &["grp"])],
    )
    .expect("valid schema")
}

fn acme() -> TenantId {
    TenantId::parse("acme").expect("valid")
}

type Rows = Vec<Vec<Value>>;

/// The reference model: the table's rows by id and its version, or no table.
#[derive(Debug, Default, Clone, PartialEq)]
struct Model {
    tenant: bool,
    table: Option<(u64, BTreeMap<i64, Vec<Value>>)>,
}

fn key_to_id(key: &[u8]) -> i64 {
    assert_eq!(key[0], 0x02, "int key tag");
    (u64::from_be_bytes(key[1..9].try_into().expect("8 bytes")) ^ (1 << 63)) as i64
}

impl Model {
    fn apply(&mut self, lsn: u64, command: Command) {
        match command {
            Command::CreateTenant => self.tenant = true,
            Command::DropTenant => *self = Model::default(),
            Command::CreateTable(_) if self.tenant && self.table.is_none() => {
                self.table = Some((lsn, BTreeMap::new()))
            }
            Command::DropTable { .. } => self.table = None,
            Command::Write {
                table_version,
                writes,
                ..
            } => {
                let Some((version, rows)) = self.table.as_mut() else {
                    return;
                };
                if *version != table_version {
                    return;
                }
                for w in writes {
                    match w {
                        RowWrite::Upsert(row) => {
                            let oc_engine::ValueRef::Int(id) = row.get(0) else {
                                panic!("int id")
                            };
                            rows.insert(id, row.to_values());
                        }
                        RowWrite::Delete(key) => {
                            rows.remove(&key_to_id(&key));
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn rows(&self) -> Option<Rows> {
        self.table
            .as_ref()
            .map(|(_, rows)| rows.values().cloned().collect())
    }
}

fn shard_rows<S: oc_io::Storage>(shard: &Shard<S>) -> Option<Rows> {
    shard
        .read(&acme(), |t| {
            t.table("items")
                .ok()
                .map(|table| table.rows().map(oc_engine::Row::to_values).collect())
        })
        .ok()
        .flatten()
}

fn random_batch(rng: &mut SimRng) -> Vec<WriteOp> {
    (0..1 + rng.below(5))
        .map(|_| {
            let id = rng.below(30) as i64;
            if rng.chance(250) {
                WriteOp::Delete(json!({ "id": id }).as_object().expect("object").clone())
            } else {
                let grp = ["a", "b", "c"][rng.below(3) as usize];
                let n = rng.below(100) as i64;
                WriteOp::Upsert(
                    json!({"id": id, "grp": grp, "n": n})
                        .as_object()
                        .expect("object")
                        .clone(),
                )
            }
        })
        .collect()
}

/// Returns (writes acknowledged before the crash, whether recovery used a checkpoint).
/// A command whose effect the model knows: acknowledged ones (writes by their ops,
/// applied unconditionally since they were applied live) or ones read from the log.
#[derive(Debug, Clone)]
enum Event {
    AckedWrite(Vec<WriteOp>),
    Logged(Command),
}

fn apply_event(model: &mut Model, lsn: u64, event: Event) {
    match event {
        Event::Logged(command) => model.apply(lsn, command),
        Event::AckedWrite(ops) => {
            let (_, rows) = model
                .table
                .as_mut()
                .expect("an acknowledged write had its table");
            for op in ops {
                match op {
                    WriteOp::Upsert(o) => {
                        let id = o["id"].as_i64().expect("id");
                        let grp = Value::Text(o["grp"].as_str().expect("grp").to_string());
                        rows.insert(
                            id,
                            vec![Value::Int(id), grp, Value::Int(o["n"].as_i64().expect("n"))],
                        );
                    }
                    WriteOp::Delete(o) => {
                        rows.remove(&o["id"].as_i64().expect("id"));
                    }
                }
            }
        }
    }
}

/// Returns (writes acknowledged before the crash, whether recovery used a checkpoint).
async fn run_seed(seed: u64) -> (usize, bool) {
    let mut rng = SimRng::new(seed);
    let faults = SimFaults {
        crash_after_ops: Some(1 + rng.below(700)),
        sync_error_per_mille: if rng.chance(200) { 30 } else { 0 },
        capacity_bytes: u64::MAX,
        max_files: usize::MAX,
        yield_per_mille: 300,
    };
    let storage = SimStorage::new(seed, faults);
    let acked: Rc<RefCell<BTreeMap<u64, Event>>> = Rc::default();
    let mut live = None;
    if let Ok((shard, _)) = Shard::open(storage.clone(), config()).await {
        let shard = Rc::new(shard);
        let setup = async {
            let lsn = shard.create_tenant(&acme()).await?;
            acked
                .borrow_mut()
                .insert(lsn.0, Event::Logged(Command::CreateTenant));
            let lsn = shard.create_table(&acme(), schema()).await?;
            acked
                .borrow_mut()
                .insert(lsn.0, Event::Logged(Command::CreateTable(schema())));
            Ok::<(), EngineError>(())
        };
        if setup.await.is_ok() {
            let writers_done = Rc::new(std::cell::Cell::new(false));
            let checkpointer = {
                let (shard, done) = (shard.clone(), writers_done.clone());
                let pause = 20 + rng.below(200);
                glommio::spawn_local(async move {
                    while !done.get() {
                        for _ in 0..pause {
                            futures_lite::future::yield_now().await;
                        }
                        if shard.checkpoint().await.is_err()
                            || shard.release_covered_wal().await.is_err()
                        {
                            break;
                        }
                    }
                })
            };
            let mut tasks = Vec::new();
            for writer in 0..1 + rng.below(5) {
                let (shard, acked) = (shard.clone(), acked.clone());
                let mut rng = SimRng::new(seed ^ (writer + 1).wrapping_mul(0x9E37_79B9));
                tasks.push(glommio::spawn_local(async move {
                    for _ in 0..25 {
                        if writer == 0 && rng.chance(60) {
                            // Recreate the table: in-flight writes to the old one must be refused.
                            match shard.drop_table(&acme(), "items").await {
                                Ok(lsn) => {
                                    let drop = Command::DropTable {
                                        table: "items".into(),
                                    };
                                    acked.borrow_mut().insert(lsn.0, Event::Logged(drop));
                                }
                                Err(_) => break,
                            }
                            if let Ok(lsn) = shard.create_table(&acme(), schema()).await {
                                acked
                                    .borrow_mut()
                                    .insert(lsn.0, Event::Logged(Command::CreateTable(schema())));
                            }
                            continue;
                        }
                        let ops = random_batch(&mut rng);
                        // Some batches carry an idempotency key and are sent twice.
                        let key = rng
                            .chance(200)
                            .then(|| format!("w{writer}-{}", rng.next_u64()));
                        match shard.write(&acme(), "items", &ops, key.clone()).await {
                            Ok((lsn, outcome)) => {
                                acked
                                    .borrow_mut()
                                    .insert(lsn.0, Event::AckedWrite(ops.clone()));
                                if key.is_some() {
                                    if let Ok(again) =
                                        shard.write(&acme(), "items", &ops, key).await
                                    {
                                        assert_eq!(
                                            again,
                                            (lsn, outcome),
                                            "seed {seed}: a repeat got another result"
                                        );
                                    }
                                }
                            }
                            Err(
                                EngineError::NotFound { .. } | EngineError::TableChanged { .. },
                            ) => {}
                            Err(_) => break,
                        }
                    }
                }));
            }
            let all = async {
                for t in tasks {
                    t.await;
                }
                writers_done.set(true);
                checkpointer.await;
            };
            let deadline = async {
                glommio::timer::sleep(Duration::from_secs(20)).await;
                panic!("seed {seed}: the run hung");
            };
            futures_lite::future::or(all, deadline).await;
        }
        live = Some((shard.applied_lsn().0, shard_rows(&shard)));
    }

    storage.restart(SimFaults::default());
    let (shard, report) = Shard::open(storage.clone(), config())
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: shard recovery failed: {e}"));
    let recovered_rows = shard_rows(&shard);
    let recovered_lsn = shard.applied_lsn().0;
    shard.close().await.expect("close");
    drop(shard);
    // Read the log after the checkpoint on its own.
    let from = report.checkpoint.map_or(Lsn(1), Lsn::next);
    let mut events: BTreeMap<u64, Event> = acked.borrow().clone();
    let (wal, _) = Wal::open(storage.clone(), config(), from, |f| {
        let command = record::decode(f.kind, f.payload).map_err(|e| e.to_string())?;
        events.entry(f.lsn.0).or_insert(Event::Logged(command));
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("seed {seed}: log recovery failed: {e}"));
    wal.close().await.expect("close");
    drop(wal);

    let last_acked = acked.borrow().keys().last().copied().unwrap_or(0);
    assert!(
        recovered_lsn >= last_acked,
        "seed {seed}: acknowledged LSN {last_acked} lost (recovered {recovered_lsn})"
    );
    // Replay the model, checking the live state at its applied LSN on the way.
    let mut model = Model::default();
    let live_lsn = live.as_ref().map_or(0, |(l, _)| *l);
    let mut live_to_check = live.filter(|(l, _)| *l > 0);
    for (lsn, event) in events {
        if lsn > recovered_lsn {
            break;
        }
        if let Some((_, rows)) = live_to_check.take_if(|(l, _)| lsn > *l) {
            assert_eq!(
                rows,
                model.rows(),
                "seed {seed}: live state differs from the model at LSN {live_lsn}"
            );
        }
        apply_event(&mut model, lsn, event);
    }
    if let Some((_, rows)) = live_to_check {
        assert_eq!(
            rows,
            model.rows(),
            "seed {seed}: live state differs from the model at LSN {live_lsn}"
        );
    }
    assert_eq!(
        recovered_rows,
        model.rows(),
        "seed {seed}: recovered state differs from the model"
    );
    let writes = acked
        .borrow()
        .values()
        .filter(|e| matches!(e, Event::AckedWrite(_)))
        .count();
    (writes, report.checkpoint.is_some())
}

#[test]
fn crashes_never_lose_acknowledged_commands_or_half_apply_a_batch() {
    let seeds = oc_io::seeds_from_env(400);
    let count = seeds.len();
    let (mut with_writes, mut from_checkpoint) = (0, 0);
    run_local(async {
        for seed in seeds {
            let guard = oc_io::SeedGuard::new(seed);
            let (writes, checkpointed) = run_seed(seed).await;
            with_writes += usize::from(writes > 0);
            from_checkpoint += usize::from(checkpointed);
            guard.passed();
        }
    });
    eprintln!(
        "{count} seeds: {with_writes} acknowledged writes before crashing, \
         {from_checkpoint} recovered from a checkpoint"
    );
    if count >= 100 {
        assert!(
            with_writes * 2 > count,
            "too few runs got as far as writing"
        );
        assert!(
            from_checkpoint * 5 > count,
            "too few runs recovered from a checkpoint"
        );
    }
}

#[test]
fn a_switchover_from_a_failed_log_is_refused_at_once() {
    run_local(async {
        let faults = SimFaults {
            sync_error_per_mille: 1000,
            ..SimFaults::default()
        };
        let (shard, _) = Shard::open(SimStorage::new(9, faults), config())
            .await
            .expect("opening writes nothing durable");
        let failed = shard.create_tenant(&acme()).await;
        assert!(failed.is_err(), "every durable write fails: {failed:?}");
        let began = std::time::Instant::now();
        let stopped = shard.stop_writes(Duration::from_secs(30)).await;
        // Not a hand-over at the durable LSN: frames of the failed write may be on disk.
        assert!(
            matches!(
                stopped,
                Err(EngineError::Wal(oc_io::Error::WalFailed { .. }))
            ),
            "{stopped:?}"
        );
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "refused, not timed out"
        );
    });
}
