//! A shard on the real disk: concurrent durable writes, then a restart that rebuilds
//! the same state from the log.

use std::ops::Bound;
use std::rc::Rc;

use oc_engine::{ColumnType, EngineError, Shard, TableSchema, TenantId, Value, WriteOp};
use oc_io::executor::run_local;
use oc_io::{DmaStorage, WalConfig};
use serde_json::json;

fn rows_of(shard: &Shard<DmaStorage>, tenant: &TenantId) -> Vec<Vec<Value>> {
    shard
        .read(tenant, |t| {
            t.table("events")
                .expect("table")
                .rows()
                .map(oc_engine::Row::to_values)
                .collect()
        })
        .expect("tenant")
}

#[test]
fn durable_writes_survive_a_restart_and_reads_see_only_applied_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let acme = TenantId::parse("acme").expect("valid");
        let storage = DmaStorage::open(dir.path()).await.expect("storage");
        let (shard, report) = Shard::open(storage, WalConfig::default())
            .await
            .expect("open");
        assert_eq!(report.wal.frames_scanned, 0);
        let shard = Rc::new(shard);
        shard.create_tenant(&acme).await.expect("tenant");
        let schema = TableSchema::new(
            "events",
            &[
                ("id", ColumnType::Int, false),
                ("kind", ColumnType::Text, true),
                ("body", ColumnType::Json, true),
            ],
            &["id"],
            &[("by_kind", &["kind"])],
        )
        .expect("schema");
        shard
            .create_table(&acme, schema.clone())
            .await
            .expect("table");
        assert!(matches!(
            shard.create_table(&acme, schema).await,
            Err(EngineError::AlreadyExists { .. })
        ));

        let mut tasks = Vec::new();
        for w in 0..16i64 {
            let (shard, acme) = (shard.clone(), acme.clone());
            tasks.push(glommio::spawn_local(async move {
                for i in 0..20i64 {
                    let id = w * 100 + i;
                    let kind = if id % 3 == 0 { "click" } else { "view" };
                    let row = json!({"id": id, "kind": kind, "body": {"n": id}});
                    let ops = [WriteOp::Upsert(object(row))];
                    let (lsn, outcome) = shard
                        .write(&acme, "events", &ops, None)
                        .await
                        .expect("write");
                    assert_eq!(outcome.inserted, 1);
                    // Applied before the call returned: the row is readable now.
                    assert!(shard.applied_lsn() >= lsn);
                    let found = shard.read(&acme, |t| {
                        t.table("events")
                            .expect("t")
                            .get(&[Value::Int(id)])
                            .is_some()
                    });
                    assert!(matches!(found, Ok(true)));
                }
            }));
        }
        for t in tasks {
            t.await;
        }
        let bad = [WriteOp::Upsert(object(json!({"id": "x"})))];
        assert!(matches!(
            shard.write(&acme, "events", &bad, None).await,
            Err(EngineError::InvalidRow { row: 0, .. })
        ));
        let before = rows_of(&shard, &acme);
        assert_eq!(before.len(), 320);
        let applied = shard.applied_lsn();
        shard.close().await.expect("close");
        drop(shard);

        let storage = DmaStorage::open(dir.path()).await.expect("storage");
        let (shard, report) = Shard::open(storage, WalConfig::default())
            .await
            .expect("reopen");
        assert_eq!(report.wal.last_lsn, applied);
        assert_eq!(rows_of(&shard, &acme), before);
        let clicks = shard
            .read(&acme, |t| {
                let key = [Value::Text("click".into())];
                t.table("events")
                    .expect("t")
                    .scan_index("by_kind", Bound::Included(&key), Bound::Included(&key))
                    .expect("index")
                    .count()
            })
            .expect("tenant");
        assert_eq!(
            clicks,
            before
                .iter()
                .filter(|r| r[1] == Value::Text("click".into()))
                .count()
        );
    });
}

/// Many writers keep the applier's queue full of single-row and multi-row commands to
/// several tables of several tenants, inserts, rewrites and deletes, interleaved:
/// every table must end exactly as its writes say, live and after a restart.
#[test]
fn single_row_writes_queued_across_tables_and_tenants_apply_as_written() {
    use std::collections::BTreeMap;
    const WRITERS: i64 = 96;
    const STEPS: i64 = 40;
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let tenants = [
            TenantId::parse("acme").expect("valid"),
            TenantId::parse("globex").expect("valid"),
        ];
        let tables = ["left", "right"];
        let storage = DmaStorage::open(dir.path()).await.expect("storage");
        let (shard, _) = Shard::open(storage, WalConfig::default())
            .await
            .expect("open");
        let shard = Rc::new(shard);
        for tenant in &tenants {
            shard.create_tenant(tenant).await.expect("tenant");
            for table in tables {
                let schema = TableSchema::new(
                    table,
                    &[
                        ("id", ColumnType::Int, false),
                        ("n", ColumnType::Int, false),
                    ],
                    &["id"],
                    &[],
                )
                .expect("schema");
                shard.create_table(tenant, schema).await.expect("table");
            }
        }
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let (shard, tenant) = (shard.clone(), tenants[(w % 2) as usize].clone());
            let table = tables[(w / 2 % 2) as usize];
            tasks.push(glommio::spawn_local(async move {
                // This writer's ids only, scattered over the table's key space.
                let id = |i: i64| (i * 7_919 + 13) % 1_000 * WRITERS + w;
                let mut expected = BTreeMap::new();
                for step in 0..STEPS {
                    let ops: Vec<WriteOp> = if step % 5 == 3 {
                        // A rewrite of an earlier row.
                        expected.insert(id(step - 3), step);
                        vec![WriteOp::Upsert(object(
                            json!({"id": id(step - 3), "n": step}),
                        ))]
                    } else if step % 5 == 4 {
                        // A delete of another.
                        expected.remove(&id(step - 3));
                        vec![WriteOp::Delete(object(json!({"id": id(step - 3)})))]
                    } else if w % 8 == 7 {
                        // Some writers send batches of three new rows.
                        (0..3)
                            .map(|k| {
                                let row = id(1_000 + step * 3 + k);
                                expected.insert(row, step);
                                WriteOp::Upsert(object(json!({"id": row, "n": step})))
                            })
                            .collect()
                    } else {
                        expected.insert(id(step), step);
                        vec![WriteOp::Upsert(object(json!({"id": id(step), "n": step})))]
                    };
                    shard
                        .write(&tenant, table, &ops, None)
                        .await
                        .expect("write");
                }
                (w, expected)
            }));
        }
        let mut expected: BTreeMap<(usize, &str), BTreeMap<i64, i64>> = BTreeMap::new();
        for task in tasks {
            let (w, rows) = task.await;
            expected
                .entry(((w % 2) as usize, tables[(w / 2 % 2) as usize]))
                .or_default()
                .extend(rows);
        }
        let contents = |shard: &Shard<DmaStorage>| {
            let mut found = BTreeMap::new();
            for (t, tenant) in tenants.iter().enumerate() {
                for table in tables {
                    let rows = shard
                        .read(tenant, |tenant| {
                            tenant
                                .table(table)
                                .expect("table")
                                .rows()
                                .map(|row| match row.to_values()[..] {
                                    [Value::Int(id), Value::Int(n)] => (id, n),
                                    ref other => panic!("unexpected row {other:?}"),
                                })
                                .collect::<BTreeMap<i64, i64>>()
                        })
                        .expect("tenant");
                    found.insert((t, table), rows);
                }
            }
            found
        };
        assert_eq!(contents(&shard), expected);
        shard.close().await.expect("close");
        drop(shard);

        let storage = DmaStorage::open(dir.path()).await.expect("storage");
        let (shard, _) = Shard::open(storage, WalConfig::default())
            .await
            .expect("reopen");
        assert_eq!(contents(&shard), expected);
    });
}

fn object(value: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    value.as_object().expect("an object").clone()
}
