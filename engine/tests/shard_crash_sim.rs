//! Crash simulation of a shard over `SimStorage`: concurrent writers commit random
//! batches (and now and then drop and recreate the table) while the machine crashes
//! at a random storage operation. After each crash:
//! - every acknowledged command is in the log at its LSN, byte for byte;
//! - the recovered shard equals an independent reference model replaying that log
//!   (so no batch is half applied, and recovery = live apply);
//! - the live shard just before the crash equals the model at its applied LSN.
//!
//! Replay one run with `OC_SIM_SEED=<seed>`; `OC_SIM_SEEDS=<n>` sets how many run.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use oc_engine::command::Command;
use oc_engine::record;
use oc_engine::table::RowWrite;
use oc_engine::{ColumnType, EngineError, Shard, TableSchema, TenantId, Value, WriteOp};
use oc_io::executor::run_local;
use oc_io::{Lsn, RecordKind, SimFaults, SimRng, SimStorage, Wal, WalConfig};
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

/// An acknowledged command: LSN, record kind, and payload (empty when not compared).
type Acked = (u64, RecordKind, Vec<u8>);

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
                            let Value::Int(id) = row[0] else {
                                panic!("int id")
                            };
                            rows.insert(id, row);
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
                .map(|table| table.rows().cloned().collect())
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

/// Returns how many writes were acknowledged before the crash.
async fn run_seed(seed: u64) -> usize {
    let mut rng = SimRng::new(seed);
    let faults = SimFaults {
        crash_after_ops: Some(1 + rng.below(500)),
        sync_error_per_mille: if rng.chance(200) { 30 } else { 0 },
        capacity_bytes: u64::MAX,
        yield_per_mille: 300,
    };
    let storage = SimStorage::new(seed, faults);
    let acked: Rc<RefCell<Vec<Acked>>> = Rc::default();
    let mut live = None;
    if let Ok((shard, _)) = Shard::open(storage.clone(), config()).await {
        let shard = Rc::new(shard);
        let setup = async {
            let lsn = shard.create_tenant(&acme()).await?;
            acked.borrow_mut().push((
                lsn.0,
                record::KIND_CREATE_TENANT,
                record::encode(&Command::CreateTenant).1,
            ));
            let lsn = shard.create_table(&acme(), schema()).await?;
            let (kind, payload) = record::encode(&Command::CreateTable(schema()));
            acked.borrow_mut().push((lsn.0, kind, payload));
            Ok::<(), EngineError>(())
        };
        if setup.await.is_ok() {
            let mut tasks = Vec::new();
            for writer in 0..1 + rng.below(5) {
                let (shard, acked) = (shard.clone(), acked.clone());
                let mut rng = SimRng::new(seed ^ (writer + 1).wrapping_mul(0x9E37_79B9));
                tasks.push(glommio::spawn_local(async move {
                    for _ in 0..25 {
                        if writer == 0 && rng.chance(60) {
                            // Recreate the table: in-flight writes to the old one must be refused.
                            if shard.drop_table(&acme(), "items").await.is_err() {
                                break;
                            }
                            let _ = shard.create_table(&acme(), schema()).await;
                            continue;
                        }
                        let ops = random_batch(&mut rng);
                        match shard.write(&acme(), "items", &ops, None).await {
                            // An LSN names one frame: its kind is checked here, its bytes
                            // are CRC-protected, and the model comparison checks its effect.
                            Ok((lsn, _)) => {
                                acked
                                    .borrow_mut()
                                    .push((lsn.0, record::KIND_WRITE, Vec::new()));
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
    // Read the log on its own first.
    let mut log = Vec::new();
    let (wal, _) = Wal::open(storage.clone(), config(), Lsn(1), |f| {
        log.push((f.lsn.0, f.kind, f.payload.to_vec()));
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("seed {seed}: log recovery failed: {e}"));
    wal.close().await.expect("close");
    drop(wal);
    let by_lsn: BTreeMap<u64, (RecordKind, Vec<u8>)> =
        log.iter().map(|(l, k, p)| (*l, (*k, p.clone()))).collect();
    for (lsn, kind, payload) in acked.borrow().iter() {
        let (got_kind, got) = by_lsn
            .get(lsn)
            .unwrap_or_else(|| panic!("seed {seed}: acknowledged LSN {lsn} lost"));
        assert_eq!(got_kind, kind, "seed {seed}: LSN {lsn} holds another kind");
        if !payload.is_empty() {
            assert_eq!(got, payload, "seed {seed}: LSN {lsn} holds other bytes");
        }
    }
    // Replay the log into the model, checking the live state at its applied LSN.
    let mut model = Model::default();
    let live_lsn = live.as_ref().map_or(0, |(l, _)| *l);
    let mut checked_live = live_lsn == 0;
    for (lsn, kind, payload) in &log {
        if *lsn > live_lsn && !checked_live {
            let (_, rows) = live.as_ref().expect("live state");
            assert_eq!(
                rows,
                &model.rows(),
                "seed {seed}: live state differs from the log at LSN {live_lsn}"
            );
            checked_live = true;
        }
        model.apply(
            *lsn,
            record::decode(*kind, payload).expect("a logged record decodes"),
        );
    }
    if !checked_live {
        let (_, rows) = live.as_ref().expect("live state");
        assert_eq!(
            rows,
            &model.rows(),
            "seed {seed}: live state differs from the log at LSN {live_lsn}"
        );
    }
    assert!(
        log.last().map_or(0, |l| l.0) >= live_lsn,
        "seed {seed}: the log lost applied commands"
    );
    // The recovered shard equals the model.
    let (shard, _) = Shard::open(storage.clone(), config())
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: shard recovery failed: {e}"));
    assert_eq!(
        shard_rows(&shard),
        model.rows(),
        "seed {seed}: recovered state differs from the log"
    );
    assert_eq!(shard.applied_lsn().0, log.last().map_or(0, |l| l.0));
    let writes = acked
        .borrow()
        .iter()
        .filter(|a| a.1 == record::KIND_WRITE)
        .count();
    writes
}

#[test]
fn crashes_never_lose_acknowledged_commands_or_half_apply_a_batch() {
    let seeds: Vec<u64> = match std::env::var("OC_SIM_SEED") {
        Ok(one) => vec![one.parse().expect("OC_SIM_SEED is a number")],
        Err(_) => {
            let n = std::env::var("OC_SIM_SEEDS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(400);
            (0..n).collect()
        }
    };
    let count = seeds.len();
    let mut with_writes = 0;
    run_local(async {
        for seed in seeds {
            let mut guard = SeedGuard(Some(seed));
            with_writes += usize::from(run_seed(seed).await > 0);
            guard.0 = None;
        }
    });
    eprintln!("{count} seeds: {with_writes} acknowledged writes before crashing");
    if count >= 100 {
        assert!(
            with_writes * 2 > count,
            "too few runs got as far as writing"
        );
    }
}

struct SeedGuard(Option<u64>);

impl Drop for SeedGuard {
    fn drop(&mut self) {
        if let Some(seed) = self.0 {
            eprintln!("FAILED SEED: {seed} (replay with OC_SIM_SEED={seed})");
        }
    }
}
