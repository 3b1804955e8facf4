//! Random SQL of random shape, up to the size limit, through the whole query path
//! (normalize, parse, bind, plan, run) on a thread with a shard's stack: every input
//! gets an answer or a clean error. A stack overflow aborts the test process, and a
//! panic fails the property.

use oc_engine::query::{ask_now, normalize, AskLimits};
use oc_engine::{ColumnType, TableSchema, Tenant, TenantId, Value, WriteOp};
use proptest::prelude::*;
use serde_json::json;

/// The stack a shard's thread gets (Rust's default for spawned threads).
const SHARD_STACK_BYTES: usize = 2 << 20;
const MAX_SQL_BYTES: usize = 64 * 1024;

fn tenant() -> Tenant {
    let mut t = Tenant::new(TenantId::parse("acme").expect("valid"));
    let schema = TableSchema::new(
        "t",
        &[
            ("id", ColumnType::Int, false),
            ("name", ColumnType::Text, true),
            ("score", ColumnType::Float, true),
            ("emb", ColumnType::Vector(2), true),
        ],
        &["id"],
        &[("by_name", &["name"])],
    )
    .expect("valid");
    t.create_table(schema, 1).expect("created");
    let ops: Vec<WriteOp> = (0..50)
        .map(|i| {
            let row = json!({"id": i, "name": format!("n{}", i % 7), "score": i as f64 / 3.0, "emb": [i, 1]});
            WriteOp::Upsert(row.as_object().expect("object").clone())
        })
        .collect();
    t.write("t", &ops).expect("written");
    t
}

const WORDS: &[&str] = &[
    "SELECT", "FROM", "WHERE", "t", "id", "name", "score", "emb", "AND", "OR", "NOT", "IN", "IS",
    "NULL", "LIKE", "BETWEEN", "ORDER", "BY", "LIMIT", "OFFSET", "GROUP", "HAVING", "COUNT(*)",
    "SUM", "MIN", "(", ")", ",", "+", "-", "*", "/", "%", "=", "<", ">=", "<>", "<->", "<=>", "||",
    "::", "1", "-1", "2.5", "'a%'", "'x'", "$1", "TRUE", "CASE", "WHEN", "THEN", "END", "[", "]",
    ".", ";",
];

const BINARY: &[&str] = &[
    " + ", " - ", " * ", " / ", " % ", " AND ", " OR ", " = ", " < ", " <> ", " <-> ", " || ",
    " LIKE ",
];
const PREFIX: &[&str] = &["NOT ", "-", "+", "(", "count(", "abs("];

/// One SQL text: token soup, a flat chain, or a nest, cut at the size limit.
fn sql() -> impl Strategy<Value = String> {
    let soup = prop::collection::vec(prop::sample::select(WORDS), 0..20_000)
        .prop_map(|words| words.join(" "));
    let chain = (
        prop::sample::select(BINARY),
        1usize..20_000,
        0usize..50,
        prop::sample::select(&["id", "1", "name", "$1", "(id)"][..]),
    )
        .prop_map(|(op, n, paren_every, operand)| {
            let mut s = String::from("SELECT id FROM t WHERE ");
            for i in 0..n {
                if paren_every > 0 && i % paren_every == 0 {
                    s.push('(');
                }
                s.push_str(operand);
                s.push_str(op);
            }
            s.push_str(operand);
            s
        });
    let nest = (prop::sample::select(PREFIX), 1usize..20_000, any::<bool>()).prop_map(
        |(prefix, depth, closed)| {
            let mut s = format!("SELECT id FROM t WHERE {}id", prefix.repeat(depth));
            if closed {
                s.push_str(&")".repeat(depth));
            }
            s
        },
    );
    prop_oneof![soup, chain, nest].prop_map(|mut s| {
        let mut cut = s.len().min(MAX_SQL_BYTES);
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s
    })
}

fn run_on_a_shard_stack(sql: String) -> Result<(), String> {
    std::thread::Builder::new()
        .stack_size(SHARD_STACK_BYTES)
        .spawn(move || {
            let t = tenant();
            let users = normalize(&sql).map_or(0, |n| n.user_params);
            let params = (0..users).map(|i| Value::Int(i as i64)).collect();
            let limits = AskLimits {
                deadline: std::time::Duration::from_secs(2),
                ..AskLimits::default()
            };
            // An answer or an error: both are fine; only a panic or an abort is not.
            let _ = ask_now(&t, &sql, params, limits);
        })
        .map_err(|e| e.to_string())?
        .join()
        .map_err(|_| "the query panicked".to_string())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn any_sql_up_to_the_size_limit_answers_or_fails_cleanly(sql in sql()) {
        let shown: String = sql.chars().take(200).collect();
        prop_assert!(run_on_a_shard_stack(sql).is_ok(), "{}…", shown);
    }
}

fn texts(rows: usize, text: &str) -> Tenant {
    let mut t = Tenant::new(TenantId::parse("acme").expect("valid"));
    let schema = TableSchema::new(
        "t",
        &[
            ("id", ColumnType::Int, false),
            ("name", ColumnType::Text, true),
        ],
        &["id"],
        &[],
    )
    .expect("valid");
    t.create_table(schema, 1).expect("created");
    for i in 0..rows {
        let row = json!({"id": i, "name": text});
        t.write(
            "t",
            &[WriteOp::Upsert(row.as_object().expect("object").clone())],
        )
        .expect("written");
    }
    t
}

/// Far outside any noise, far inside what these queries cost before (161 s and 40 s
/// against a 200 ms deadline): the deadline is looked at on every row once rows are
/// expensive.
const DEADLINE_SLACK: std::time::Duration = std::time::Duration::from_secs(10);

#[test]
fn a_text_vector_parameter_is_decoded_once_not_per_row_and_node() {
    let t = texts(64, "x");
    let floats = vec!["0.5"; 100_000].join(",");
    let param = Value::Text(format!("[{floats}]"));
    let sql = format!("SELECT {} FROM t", vec!["($1 <-> $1)"; 200].join(" + "));
    let deadline = std::time::Duration::from_millis(200);
    let limits = AskLimits {
        deadline,
        ..AskLimits::default()
    };
    let started = std::time::Instant::now();
    let outcome = ask_now(&t, &sql, vec![param], limits);
    assert!(
        started.elapsed() < deadline + DEADLINE_SLACK,
        "held {:?}: {outcome:?}",
        started.elapsed()
    );
    // Used as a vector and as text at once, a parameter is refused.
    let e = ask_now(
        &t,
        "SELECT id FROM t WHERE name = $1 ORDER BY id LIMIT ($1 <-> $1)",
        vec![Value::Text("[1]".into())],
        AskLimits::default(),
    );
    assert!(e.is_err());
    // A distance over a text column is refused at bind time.
    let e = ask_now(
        &t,
        "SELECT name <-> '[1]' FROM t",
        vec![],
        AskLimits::default(),
    )
    .expect_err("text is not a vector");
    assert!(e.message.contains("needs vectors"), "{e}");
}

#[test]
fn many_likes_over_long_non_ascii_texts_stop_at_the_deadline() {
    let t = texts(64, &"é".repeat(64 * 1024));
    let likes = vec!["name LIKE $1"; 20].join(" OR ");
    let sql = format!("SELECT id FROM t WHERE {likes}");
    let pattern: String = std::iter::once('%')
        .chain((0x100u32..0x100 + 200).filter_map(char::from_u32))
        .collect();
    let deadline = std::time::Duration::from_millis(200);
    let limits = AskLimits {
        deadline,
        ..AskLimits::default()
    };
    let started = std::time::Instant::now();
    let outcome = ask_now(&t, &sql, vec![Value::Text(pattern)], limits);
    assert!(
        started.elapsed() < deadline + DEADLINE_SLACK,
        "held {:?}: {outcome:?}",
        started.elapsed()
    );
}
