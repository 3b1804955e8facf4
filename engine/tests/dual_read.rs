//! Reads during a schema migration (dual read), through a shard with no backfill
//! driver: the migration stays active, so what reads see is its transform over the
//! rows as stored.

use oc_engine::migration::parse_steps;
use oc_engine::query::{param_from_json, AskLimits, QueryErrorKind};
use oc_engine::{ColumnType, Shard, TableSchema, TenantId, Value, WriteOp};
use oc_io::executor::run_local;
use oc_io::{DmaStorage, WalConfig};
use serde_json::json;

#[test]
fn a_vector_search_during_a_migration_finds_what_knn_finds_and_no_plan_outlives_its_shape() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let storage = DmaStorage::open(dir.path()).await.expect("storage");
        let (shard, _) = Shard::open(storage, WalConfig::default())
            .await
            .expect("open");
        let acme = TenantId::parse("acme").expect("valid");
        shard.create_tenant(&acme).await.expect("tenant");
        let schema = TableSchema::new(
            "kv",
            &[
                ("k", ColumnType::Int, false),
                ("v", ColumnType::Text, true),
                ("e", ColumnType::Vector(2), true),
            ],
            &["k"],
            &[("by_v", &["v"])],
        )
        .expect("schema");
        shard.create_table(&acme, schema).await.expect("table");
        // Even keys have a vector on the x axis; odd keys have none.
        let ops: Vec<WriteOp> = (0..20)
            .map(|k| {
                let e = if k % 2 == 0 {
                    json!([k, 0])
                } else {
                    json!(null)
                };
                WriteOp::Upsert(
                    json!({"k": k, "v": format!("v{k}"), "e": e})
                        .as_object()
                        .expect("object")
                        .clone(),
                )
            })
            .collect();
        shard.write(&acme, "kv", &ops, None).await.expect("rows");
        let ask = |sql: &'static str| {
            let (shard, acme) = (&shard, &acme);
            async move {
                let params = if sql.contains("$1") {
                    vec![param_from_json(&json!([3.1, 0.0]))]
                } else {
                    Vec::new()
                };
                shard
                    .ask(acme, sql, params, false, AskLimits::default())
                    .await
            }
        };
        let ints = |rows: Vec<Vec<Value>>| -> Vec<i64> {
            rows.into_iter()
                .map(|r| match r[0] {
                    Value::Int(i) => i,
                    ref other => panic!("not an int: {other:?}"),
                })
                .collect()
        };
        let knn = "SELECT k FROM kv ORDER BY e <-> $1 LIMIT 4";
        let nearest = ints(ask(knn).await.expect("knn").rows);
        assert_eq!(nearest, vec![4, 2, 6, 0]);

        let steps = parse_steps(
            br#"[{"op":"rename_column","from":"v","to":"label"},
                 {"op":"add_column","name":"w","type":"int","default":"k * 2"}]"#,
        )
        .expect("steps");
        let m = shard
            .start_migration(&acme, "kv", steps)
            .await
            .expect("start");
        // The new shape, read from the old rows; the same query (cached before) is
        // planned again for it, and sorts without the rows that have no vector.
        let during = ask(knn).await.expect("knn during the migration");
        assert_eq!(ints(during.rows), nearest);
        let explained = ask("EXPLAIN SELECT k FROM kv ORDER BY e <-> $1 LIMIT 4")
            .await
            .expect("explain");
        let plan = serde_json::to_string(&explained.plan).expect("json");
        assert!(
            plan.contains(&format!("dual read: migration {}", m.id)),
            "{plan}"
        );
        let shaped = ask("SELECT label, w FROM kv WHERE k = 4")
            .await
            .expect("new shape");
        assert_eq!(
            shaped.rows,
            vec![vec![Value::Text("v4".into()), Value::Int(8)]]
        );
        // An index over a column the migration only renames still serves.
        let by_label = ask("EXPLAIN SELECT k FROM kv WHERE label = 'v6'")
            .await
            .expect("by label");
        let plan = serde_json::to_string(&by_label.plan).expect("json");
        assert!(plan.contains("by_v"), "{plan}");
        assert_eq!(
            ints(
                ask("SELECT k FROM kv WHERE label = 'v6'")
                    .await
                    .expect("v6")
                    .rows
            ),
            vec![6]
        );

        shard.abort_migration(&acme, m.id).await.expect("abort");
        // Back to the old shape at once: no plan of the new one is used again.
        let gone = ask("SELECT label, w FROM kv WHERE k = 4")
            .await
            .expect_err("the new shape is gone");
        assert_eq!(gone.kind, QueryErrorKind::Invalid, "{gone}");
        assert_eq!(ints(ask(knn).await.expect("knn after").rows), nearest);
        assert_eq!(
            ints(
                ask("SELECT k FROM kv WHERE v = 'v6'")
                    .await
                    .expect("v")
                    .rows
            ),
            vec![6]
        );
    });
}
