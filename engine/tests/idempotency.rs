//! Idempotency keys on the real disk: a repeat is answered with the first result
//! without writing, across a restart replaying the log and across a checkpoint.

use std::rc::Rc;

use oc_engine::{ColumnType, EngineError, Shard, TableSchema, TenantId, WriteOp};
use oc_io::executor::run_local;
use oc_io::{DmaStorage, WalConfig};
use serde_json::json;

fn acme() -> TenantId {
    TenantId::parse("acme").expect("valid")
}

fn upsert(id: i64, v: &str) -> Vec<WriteOp> {
    vec![WriteOp::Upsert(
        json!({"id": id, "v": v})
            .as_object()
            .expect("object")
            .clone(),
    )]
}

async fn open(dir: &std::path::Path) -> Shard<DmaStorage> {
    let storage = DmaStorage::open(dir).await.expect("storage");
    Shard::open(storage, WalConfig::default())
        .await
        .expect("open")
        .0
}

/// Tenant `acme` with table `t` (id int, v text).
async fn with_table_t(shard: &Shard<DmaStorage>) {
    shard.create_tenant(&acme()).await.expect("tenant");
    let schema = TableSchema::new(
        "t",
        &[
            ("id", ColumnType::Int, false),
            ("v", ColumnType::Text, true),
        ],
        &["id"],
        &[],
    )
    .expect("schema");
    shard.create_table(&acme(), schema).await.expect("table");
}

#[test]
fn a_repeated_key_gets_the_first_result_across_restarts_and_checkpoints() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let shard = Rc::new(open(dir.path()).await);
        with_table_t(&shard).await;
        let key = Some("order-42".to_string());
        let (lsn, outcome) = shard
            .write(&acme(), "t", &upsert(1, "a"), key.clone())
            .await
            .expect("first");
        assert_eq!(outcome.inserted, 1);
        let applied = shard.applied_lsn();
        let (again, outcome2) = shard
            .write(&acme(), "t", &upsert(1, "a"), key.clone())
            .await
            .expect("repeat");
        assert_eq!(
            (again, outcome2),
            (lsn, outcome),
            "same LSN and outcome (inserted, not updated)"
        );
        assert_eq!(shard.applied_lsn(), applied, "a repeat writes nothing");
        let conflict = shard
            .write(&acme(), "t", &upsert(1, "b"), key.clone())
            .await;
        assert!(
            matches!(conflict, Err(EngineError::IdempotencyConflict { .. })),
            "{conflict:?}"
        );
        let too_long = shard
            .write(&acme(), "t", &upsert(2, "x"), Some("k".repeat(129)))
            .await;
        assert!(
            matches!(too_long, Err(EngineError::LimitExceeded { .. })),
            "{too_long:?}"
        );
        shard.close().await.expect("close");
        drop(shard);

        // After a restart that replays the log.
        let shard = open(dir.path()).await;
        assert_eq!(
            shard
                .write(&acme(), "t", &upsert(1, "a"), key.clone())
                .await
                .expect("repeat"),
            (lsn, outcome)
        );
        // After a checkpoint and a restart that loads it.
        shard.checkpoint().await.expect("checkpoint");
        shard.close().await.expect("close");
        drop(shard);
        let shard = open(dir.path()).await;
        assert_eq!(
            shard
                .write(&acme(), "t", &upsert(1, "a"), key.clone())
                .await
                .expect("repeat"),
            (lsn, outcome)
        );
        let conflict = shard.write(&acme(), "t", &upsert(1, "b"), key).await;
        assert!(matches!(
            conflict,
            Err(EngineError::IdempotencyConflict { .. })
        ));
    });
}

/// Repeats of a key sent while its first attempt is on its way wait for it: the batch
/// is logged once, and every repeat gets the first answer.
#[test]
fn concurrent_repeats_of_a_key_log_the_batch_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let shard = Rc::new(open(dir.path()).await);
        with_table_t(&shard).await;
        let before = shard.applied_lsn();
        let sends: Vec<_> = (0..16)
            .map(|_| {
                let shard = shard.clone();
                glommio::spawn_local(async move {
                    shard
                        .write(&acme(), "t", &upsert(1, "a"), Some("once".into()))
                        .await
                })
            })
            .collect();
        let mut answers = Vec::new();
        for send in sends {
            answers.push(send.await.expect("written"));
        }
        let first = answers[0];
        assert!(answers.iter().all(|a| *a == first), "{answers:?}");
        assert_eq!(first.1.inserted, 1);
        assert_eq!(
            shard.applied_lsn().0,
            before.0 + 1,
            "one frame logged for 16 sends"
        );
    });
}
