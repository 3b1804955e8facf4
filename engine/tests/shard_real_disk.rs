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
                    let ops = [WriteOp::Upsert(row.as_object().expect("object").clone())];
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
        let bad = [WriteOp::Upsert(
            json!({"id": "x"}).as_object().expect("object").clone(),
        )];
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
