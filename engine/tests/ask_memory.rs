//! The per-query memory budget holds before values are copied: a projection that
//! would copy one large parameter, or one large stored column, hundreds of times is
//! refused without the process ever holding those copies. Alone in its binary: it reads the process's peak RSS.

use oc_engine::query::{ask_now, AskLimits, QueryErrorKind};
use oc_engine::{ColumnType, TableSchema, Tenant, TenantId, Value, WriteOp};
use serde_json::json;

fn peak_rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[test]
fn a_projection_is_refused_before_it_copies_past_the_budget() {
    let mut t = Tenant::new(TenantId::parse("acme").expect("valid"));
    let schema = TableSchema::new(
        "t",
        &[
            ("id", ColumnType::Int, false),
            ("emb", ColumnType::Vector(2), true),
        ],
        &["id"],
        &[],
    )
    .expect("valid");
    t.create_table(schema, 1).expect("created");
    let row = json!({"id": 1, "emb": [1, 2]});
    t.write(
        "t",
        &[WriteOp::Upsert(row.as_object().expect("object").clone())],
    )
    .expect("written");
    // A stored column of 200 KiB: a stored row's columns are copied when read.
    let wide = TableSchema::new(
        "w",
        &[
            ("id", ColumnType::Int, false),
            ("big", ColumnType::Text, true),
        ],
        &["id"],
        &[],
    )
    .expect("valid");
    t.create_table(wide, 2).expect("created");
    let row = json!({"id": 1, "big": "y".repeat(200 << 10)});
    t.write(
        "w",
        &[WriteOp::Upsert(row.as_object().expect("object").clone())],
    )
    .expect("written");
    let limits = AskLimits {
        max_memory_bytes: 1 << 20,
        ..AskLimits::default()
    };
    let param = Value::Text("x".repeat(1 << 20));
    let before = peak_rss_kib();
    let many = vec!["$1"; 300].join(", ");
    for sql in [
        format!("SELECT {many} FROM t"),
        format!("SELECT {many} FROM t ORDER BY id DESC"),
        format!("SELECT {many} FROM t ORDER BY emb <-> $2 LIMIT 5"),
    ] {
        let params = vec![param.clone(), Value::Vector(vec![1.0, 1.0])];
        let params = if sql.contains("$2") {
            params
        } else {
            params[..1].to_vec()
        };
        let e = ask_now(&t, &sql, params, limits).expect_err("over the budget");
        assert_eq!(e.kind, QueryErrorKind::MemoryLimit, "{e}");
    }
    let bigs = vec!["big"; 500].join(", ");
    for sql in [
        format!("SELECT {bigs} FROM w"),
        format!("SELECT {bigs} FROM w ORDER BY id DESC"),
    ] {
        let e = ask_now(&t, &sql, vec![], limits).expect_err("over the budget");
        assert_eq!(e.kind, QueryErrorKind::MemoryLimit, "{e}");
    }
    let grown_mib = (peak_rss_kib() - before) / 1024;
    // The copies would have been 300 MiB per query with a parameter, 100 MiB with
    // the column (500 items: SELECT lists at most 512).
    assert!(
        grown_mib < 64,
        "queries with a 1 MiB budget grew the process by {grown_mib} MiB"
    );
}
