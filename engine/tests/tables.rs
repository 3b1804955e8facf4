//! Tables against a simple reference model: random batches of upserts and deletes,
//! then every read path (get, primary-key scans, index scans, usage) must agree with
//! the model; a batch with one bad row must change nothing.

use std::collections::BTreeMap;
use std::ops::Bound;

use oc_engine::{
    ColumnType, EngineError, Row, Table, TableSchema, Tenant, TenantId, Value, ValueRef, WriteOp,
};
use proptest::prelude::*;
use serde_json::{json, Map};

fn tenant() -> Tenant {
    let mut t = Tenant::new(TenantId::parse("acme").expect("valid"));
    let schema = TableSchema::new(
        "items",
        &[
            ("id", ColumnType::Int, false),
            ("grp", ColumnType::Text, true),
            ("n", ColumnType::Int, true),
            ("emb", ColumnType::Vector(2), true),
        ],
        &["id"],
        &[("by_grp", &["grp"]), ("by_grp_n", &["grp", "n"])],
    )
    .expect("valid schema");
    t.create_table(schema, 1).expect("create");
    t
}

fn obj(v: serde_json::Value) -> Map<String, serde_json::Value> {
    v.as_object().expect("object").clone()
}

#[derive(Debug, Clone)]
enum Op {
    Upsert {
        id: i64,
        grp: Option<String>,
        n: Option<i64>,
        emb: bool,
    },
    Delete {
        id: i64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0i64..40, proptest::option::of("[ab]{0,2}"), proptest::option::of(-3i64..3), any::<bool>())
            .prop_map(|(id, grp, n, emb)| Op::Upsert { id, grp, n, emb }),
        1 => (0i64..40).prop_map(|id| Op::Delete { id }),
    ]
}

type Model = BTreeMap<i64, (Option<String>, Option<i64>, bool)>;

fn to_write(op: &Op) -> WriteOp {
    match op {
        Op::Upsert { id, grp, n, emb } => {
            let emb = if *emb { json!([1.0, 2.0]) } else { json!(null) };
            WriteOp::Upsert(obj(json!({"id": id, "grp": grp, "n": n, "emb": emb})))
        }
        Op::Delete { id } => WriteOp::Delete(obj(json!({ "id": id }))),
    }
}

fn ids<'a>(rows: impl Iterator<Item = &'a Row>) -> Vec<i64> {
    rows.map(|r| match r.get(0) {
        ValueRef::Int(i) => i,
        other => panic!("id is an int, got {other:?}"),
    })
    .collect()
}

proptest! {
    #[test]
    fn reads_agree_with_a_reference_model(batches in proptest::collection::vec(proptest::collection::vec(op(), 1..6), 1..20)) {
        let mut t = tenant();
        let mut model = Model::new();
        for batch in &batches {
            let writes: Vec<WriteOp> = batch.iter().map(to_write).collect();
            t.write("items", &writes).expect("valid batch");
            for op in batch {
                match op {
                    Op::Upsert { id, grp, n, emb } => { model.insert(*id, (grp.clone(), *n, *emb)); }
                    Op::Delete { id } => { model.remove(id); }
                }
            }
        }
        let table = t.table("items").expect("table");
        // Full scan in key order.
        prop_assert_eq!(ids(table.rows()), model.keys().copied().collect::<Vec<_>>());
        // Point gets.
        for id in 0..40 {
            prop_assert_eq!(table.get(&[Value::Int(id)]).is_some(), model.contains_key(&id));
        }
        // Primary-key range [10, 30).
        let got = ids(table.scan_primary(Bound::Included(&[Value::Int(10)]), Bound::Excluded(&[Value::Int(30)])));
        prop_assert_eq!(got, model.range(10..30).map(|(k, _)| *k).collect::<Vec<_>>());
        // Index equality on grp, including NULL, in (grp, id) order.
        for g in [None, Some(""), Some("a"), Some("ab"), Some("b")] {
            let key = [g.map_or(Value::Null, |s| Value::Text(s.into()))];
            let got = ids(table.scan_index("by_grp", Bound::Included(&key), Bound::Included(&key)).expect("index"));
            let want: Vec<i64> = model.iter().filter(|(_, v)| v.0.as_deref() == g).map(|(k, _)| *k).collect();
            prop_assert_eq!(got, want, "grp {:?}", g);
        }
        // Composite index prefix: grp = "a" and n > 0, ordered by n then id.
        let got = ids(table.scan_index("by_grp_n",
            Bound::Excluded(&[Value::Text("a".into()), Value::Int(0)]),
            Bound::Included(&[Value::Text("a".into())])).expect("index"));
        let mut want: Vec<(i64, i64)> = model.iter()
            .filter(|(_, v)| v.0.as_deref() == Some("a") && v.1.is_some_and(|n| n > 0))
            .map(|(k, v)| (v.1.unwrap_or_default(), *k)).collect();
        want.sort();
        prop_assert_eq!(got, want.into_iter().map(|(_, k)| k).collect::<Vec<_>>());
        // Usage counters.
        let usage = t.usage();
        prop_assert_eq!(usage.rows, model.len());
        prop_assert_eq!(usage.vectors, model.values().filter(|v| v.2).count());
    }

    #[test]
    fn admission_growth_is_exact_and_its_bound_never_below_it(
        before in proptest::collection::vec(op(), 0..30),
        batch in proptest::collection::vec(op(), 1..12),
    ) {
        let mut t = tenant();
        t.write("items", &before.iter().map(to_write).collect::<Vec<_>>()).expect("valid batch");
        let ops: Vec<WriteOp> = batch.iter().map(to_write).collect();
        let (growth, bound) = {
            let table = t.table("items").expect("table");
            let writes = table.validate_batch(&ops).expect("valid batch");
            (table.growth(&writes), Table::growth_bound(&writes))
        };
        let used = t.usage();
        t.write("items", &ops).expect("valid batch");
        let after = t.usage();
        // The exact figure is what the batch really changed, keys written twice and
        // deleted then written again included (the ops draw from 40 ids).
        prop_assert_eq!(after.rows as i64 - used.rows as i64, growth.rows);
        prop_assert_eq!(after.bytes as i64 - used.bytes as i64, growth.bytes);
        prop_assert_eq!(after.vectors as i64 - used.vectors as i64, growth.vectors);
        prop_assert!(bound.rows >= growth.rows, "{:?} {:?}", bound, growth);
        prop_assert!(bound.bytes >= growth.bytes, "{:?} {:?}", bound, growth);
        prop_assert!(bound.vectors >= growth.vectors, "{:?} {:?}", bound, growth);
        prop_assert_eq!(bound.grows(), batch.iter().any(|op| matches!(op, Op::Upsert { .. })));
    }

    #[test]
    fn a_batch_with_one_bad_row_changes_nothing(good in proptest::collection::vec(op(), 0..8), at in 0usize..8) {
        let mut t = tenant();
        t.write("items", &[WriteOp::Upsert(obj(json!({"id": 1000, "grp": "keep"})))]).expect("seed row");
        let before = t.usage();
        let mut writes: Vec<WriteOp> = good.iter().map(to_write).collect();
        let at = at.min(writes.len());
        writes.insert(at, WriteOp::Upsert(obj(json!({"id": "not a number"}))));
        let err = t.write("items", &writes).expect_err("refused");
        prop_assert!(matches!(err, EngineError::InvalidRow { row, .. } if row == at), "{:?}", err);
        prop_assert_eq!(t.usage(), before);
        prop_assert_eq!(t.table("items").expect("table").rows().count(), 1);
    }
}

#[test]
fn bad_rows_say_what_to_fix() {
    let mut t = tenant();
    let cases = [
        (json!({"grp": "a"}), "\"id\" is part of the primary key"),
        (json!({"id": 1, "nope": 2}), "unknown column \"nope\""),
        (json!({"id": 1.5}), "column \"id\": expected an integer"),
        (
            json!({"id": 1, "emb": [1]}),
            "column \"emb\": expected 2 numbers",
        ),
        (
            json!({"id": 1, "grp": 7}),
            "column \"grp\": expected text, got a number",
        ),
        (
            json!({"id": 1, "grp": "x".repeat(300 * 1024)}),
            "above the limit",
        ),
    ];
    for (row, wanted) in cases {
        let err = t
            .write("items", &[WriteOp::Upsert(obj(row.clone()))])
            .expect_err("refused")
            .to_string();
        assert!(err.contains(wanted), "{row}: {err}");
    }
    let err = t
        .write(
            "items",
            &[WriteOp::Delete(obj(json!({"id": 1, "grp": "a"})))],
        )
        .expect_err("refused");
    assert!(
        err.to_string().contains("not a primary key column"),
        "{err}"
    );
    assert!(matches!(
        t.write("nope", &[]),
        Err(EngineError::NotFound { what: "table", .. })
    ));
    let too_many: Vec<WriteOp> = (0..1001)
        .map(|i| WriteOp::Delete(obj(json!({ "id": i }))))
        .collect();
    assert!(matches!(
        t.write("items", &too_many),
        Err(EngineError::LimitExceeded {
            what: "rows in one batch",
            actual: 1001,
            ..
        })
    ));
}

#[test]
fn upserts_replace_and_deletes_report_missing_keys() {
    let mut t = tenant();
    let out = t
        .write(
            "items",
            &[
                WriteOp::Upsert(obj(json!({"id": 1, "grp": "a"}))),
                WriteOp::Upsert(obj(json!({"id": 1, "grp": "b"}))),
                WriteOp::Delete(obj(json!({"id": 2}))),
            ],
        )
        .expect("write");
    assert_eq!(
        (out.inserted, out.updated, out.deleted, out.missing),
        (1, 1, 0, 1)
    );
    let table = t.table("items").expect("table");
    assert_eq!(
        table.get(&[Value::Int(1)]).expect("row").get(1),
        ValueRef::Text("b")
    );
    let in_a = table.scan_index(
        "by_grp",
        Bound::Included(&[Value::Text("a".into())]),
        Bound::Included(&[Value::Text("a".into())]),
    );
    assert_eq!(
        in_a.expect("index").count(),
        0,
        "the old index entry is gone"
    );
    assert!(matches!(
        t.table("items")
            .expect("t")
            .scan_index("nope", Bound::Unbounded, Bound::Unbounded)
            .err(),
        Some(EngineError::NotFound { what: "index", .. })
    ));
    assert!(matches!(
        t.create_table(t.table("items").expect("t").schema().clone(), 2),
        Err(EngineError::AlreadyExists { .. })
    ));
    let version = t.schema_version();
    t.drop_table("items", version + 5).expect("drop");
    assert_eq!(
        t.schema_version(),
        version + 5,
        "the stamp is the dropping LSN"
    );
    assert!(t.usage().tables.is_empty());
}
