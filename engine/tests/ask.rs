//! The query engine on a tenant built in memory: plans chosen, results, NULL
//! semantics, limits, errors, EXPLAIN, and kNN against a brute-force reference.

use oc_engine::query::{
    ask_now, AskAnswer, AskLimits, Metric, QueryError, QueryErrorKind, MAX_IN_LIST_COMPARISONS,
    MAX_LIKE_PER_QUERY, MAX_QUERY_OPERATORS,
};
use oc_engine::{ColumnType, TableSchema, Tenant, TenantId, Value, WriteOp};
use serde_json::{json, Value as Json};

fn tenant() -> Tenant {
    let mut t = Tenant::new(TenantId::parse("acme").expect("valid"));
    let schema = TableSchema::new(
        "people",
        &[
            ("id", ColumnType::Int, false),
            ("name", ColumnType::Text, true),
            ("age", ColumnType::Int, true),
            ("city", ColumnType::Text, true),
            ("score", ColumnType::Float, true),
        ],
        &["id"],
        &[("by_age", &["age"]), ("by_city_age", &["city", "age"])],
    )
    .expect("valid");
    t.create_table(schema, 10).expect("created");
    let rows = [
        json!({"id": 1, "name": "ann", "age": 30, "city": "oslo", "score": 1.5}),
        json!({"id": 2, "name": "bob", "age": 25, "city": "rome", "score": 2.5}),
        json!({"id": 3, "name": "cid", "age": null, "city": "oslo", "score": null}),
        json!({"id": 4, "name": "dan", "age": 41, "city": "rome", "score": 0.5}),
        json!({"id": 5, "name": "eve", "age": 30, "city": null, "score": 4.0}),
        json!({"id": 6, "name": "fay", "age": 19, "city": "oslo", "score": 3.0}),
    ];
    write(&mut t, "people", &rows);
    t
}

fn write(t: &mut Tenant, table: &str, rows: &[Json]) {
    let ops: Vec<WriteOp> = rows
        .iter()
        .map(|r| WriteOp::Upsert(r.as_object().expect("object").clone()))
        .collect();
    for chunk in ops.chunks(1000) {
        t.write(table, chunk).expect("written");
    }
}

fn run(t: &Tenant, sql: &str, params: Vec<Value>) -> AskAnswer {
    ask_now(t, sql, params, AskLimits::default()).unwrap_or_else(|e| panic!("{sql}: {e}"))
}

fn rows(t: &Tenant, sql: &str) -> Vec<Vec<Value>> {
    run(t, sql, vec![]).rows
}

fn ints(t: &Tenant, sql: &str) -> Vec<i64> {
    rows(t, sql)
        .into_iter()
        .map(|r| match r[0] {
            Value::Int(i) => i,
            ref other => panic!("{sql}: expected an int, got {other:?}"),
        })
        .collect()
}

fn err(t: &Tenant, sql: &str, params: Vec<Value>) -> QueryError {
    ask_now(t, sql, params, AskLimits::default()).expect_err(sql)
}

/// The access stage of an EXPLAIN ANALYZE plan.
fn access(t: &Tenant, sql: &str) -> Json {
    let plan = run(t, &format!("EXPLAIN ANALYZE {sql}"), vec![])
        .plan
        .expect("a plan");
    let mut node = &plan["root"];
    while node.get("input").is_some() {
        node = &node["input"];
    }
    node.clone()
}

#[test]
fn the_planner_picks_the_path_the_predicates_allow() {
    let t = tenant();
    for (sql, wanted, scanned) in [
        (
            "SELECT id FROM people WHERE id = 4",
            "primary key point lookup",
            1,
        ),
        (
            "SELECT id FROM people WHERE id IN (4, 2, 4, 99)",
            "primary key point lookup",
            2,
        ),
        (
            "SELECT id FROM people WHERE id > 2 AND id <= 4",
            "primary key range scan",
            2,
        ),
        (
            "SELECT id FROM people WHERE age = 30",
            "index by_age point scan",
            2,
        ),
        (
            "SELECT id FROM people WHERE age BETWEEN 20 AND 30",
            "index by_age range scan",
            3,
        ),
        (
            "SELECT id FROM people WHERE city = 'oslo' AND age > 20",
            "index by_city_age range scan",
            1,
        ),
        (
            "SELECT id FROM people WHERE city = 'oslo'",
            "index by_city_age range scan",
            3,
        ),
        ("SELECT id FROM people WHERE name = 'ann'", "full scan", 6),
        (
            "SELECT id FROM people WHERE age = 30 OR id = 1",
            "full scan",
            6,
        ),
        (
            "SELECT id FROM people ORDER BY age LIMIT 2",
            "full walk of index by_age",
            2,
        ),
    ] {
        let node = access(&t, sql);
        let detail = node["detail"].as_str().expect("detail");
        assert!(detail.starts_with(wanted), "{sql}: {detail}");
        assert_eq!(node["rows_out"], json!(scanned), "{sql}: {node}");
    }
    assert_eq!(
        ints(&t, "SELECT id FROM people WHERE id IN (4, 2, 4, 99)"),
        vec![2, 4]
    );
    assert_eq!(
        ints(
            &t,
            "SELECT id FROM people WHERE age BETWEEN 20 AND 30 ORDER BY id"
        ),
        vec![1, 2, 5]
    );
    assert_eq!(
        ints(&t, "SELECT id FROM people WHERE city = 'oslo' AND age > 20"),
        vec![1]
    );
    // ORDER BY age with NULL first (the smallest value), stopped by LIMIT.
    assert_eq!(
        ints(&t, "SELECT id FROM people ORDER BY age LIMIT 2"),
        vec![3, 6]
    );
}

#[test]
fn bounds_of_the_wrong_type_or_null_never_lose_rows() {
    let t = tenant();
    // A float bound on an int key is converted when exact and widened otherwise.
    assert_eq!(ints(&t, "SELECT id FROM people WHERE id = 4.0"), vec![4]);
    assert_eq!(
        ints(&t, "SELECT id FROM people WHERE id > 4.5 ORDER BY id"),
        vec![5, 6]
    );
    assert_eq!(
        ints(&t, "SELECT id FROM people WHERE age < 25.5 ORDER BY id"),
        vec![2, 6]
    );
    assert!(ints(&t, "SELECT id FROM people WHERE id = NULL").is_empty());
    assert!(ints(&t, "SELECT id FROM people WHERE age > NULL").is_empty());
    let e = err(&t, "SELECT id FROM people WHERE id = 'x'", vec![]);
    assert_eq!(e.kind, QueryErrorKind::Evaluation);
    assert!(e.message.contains("cannot compare int with text"), "{e}");
}

#[test]
fn null_semantics_follow_sql() {
    let t = tenant();
    assert_eq!(ints(&t, "SELECT id FROM people WHERE age IS NULL"), vec![3]);
    assert_eq!(
        ints(
            &t,
            "SELECT id FROM people WHERE city IS NOT NULL AND age != 30 ORDER BY id"
        ),
        vec![2, 3, 4, 6]
            .into_iter()
            .filter(|&i| i != 3)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        ints(&t, "SELECT id FROM people WHERE NOT (age > 26) ORDER BY id"),
        vec![2, 6]
    );
    assert_eq!(
        ints(&t, "SELECT id FROM people WHERE age NOT IN (30, NULL)"),
        Vec::<i64>::new()
    );
    assert_eq!(
        ints(
            &t,
            "SELECT id FROM people WHERE age IN (30, NULL) ORDER BY id"
        ),
        vec![1, 5]
    );
    // ORDER BY puts NULL first ascending and last descending, unless told.
    assert_eq!(
        ints(&t, "SELECT id FROM people ORDER BY score DESC, id"),
        vec![5, 6, 2, 1, 4, 3]
    );
    assert_eq!(
        ints(
            &t,
            "SELECT id FROM people ORDER BY score NULLS LAST, id LIMIT 2"
        ),
        vec![4, 1]
    );
    assert_eq!(
        ints(
            &t,
            "SELECT id FROM people ORDER BY score DESC NULLS FIRST LIMIT 1"
        ),
        vec![3]
    );
}

#[test]
fn projection_arithmetic_aliases_and_like() {
    let t = tenant();
    let a = run(&t, "SELECT id * 10 + 1 AS x, name, age / 2 AS half FROM people WHERE name LIKE 'a%' OR name LIKE '_o_'", vec![]);
    assert_eq!(a.columns, vec!["x", "name", "half"]);
    assert_eq!(
        a.rows,
        vec![
            vec![Value::Int(11), Value::Text("ann".into()), Value::Int(15)],
            vec![Value::Int(21), Value::Text("bob".into()), Value::Int(12)],
        ]
    );
    assert_eq!(
        ints(&t, "SELECT id FROM people ORDER BY -id LIMIT 2 OFFSET 1"),
        vec![5, 4]
    );
    assert_eq!(
        ints(
            &t,
            "SELECT p.id AS k FROM people p WHERE p.age >= 30 ORDER BY k DESC"
        ),
        vec![5, 4, 1]
    );
    let all = run(&t, "SELECT * FROM people WHERE id = 1", vec![]);
    assert_eq!(all.columns, vec!["id", "name", "age", "city", "score"]);
}

#[test]
fn aggregates_group_by_and_having() {
    let t = tenant();
    let a = run(
        &t,
        "SELECT city, COUNT(*) AS n, COUNT(age), SUM(age), AVG(score), MIN(name), MAX(age) \
         FROM people GROUP BY city ORDER BY city",
        vec![],
    );
    assert_eq!(
        a.columns,
        vec!["city", "n", "count", "sum", "avg", "min", "max"]
    );
    assert_eq!(
        a.rows,
        vec![
            vec![
                Value::Null,
                Value::Int(1),
                Value::Int(1),
                Value::Int(30),
                Value::Float(4.0),
                Value::Text("eve".into()),
                Value::Int(30)
            ],
            vec![
                Value::Text("oslo".into()),
                Value::Int(3),
                Value::Int(2),
                Value::Int(49),
                Value::Float(2.25),
                Value::Text("ann".into()),
                Value::Int(30)
            ],
            vec![
                Value::Text("rome".into()),
                Value::Int(2),
                Value::Int(2),
                Value::Int(66),
                Value::Float(1.5),
                Value::Text("bob".into()),
                Value::Int(41)
            ],
        ]
    );
    assert_eq!(
        rows(
            &t,
            "SELECT city FROM people GROUP BY city HAVING COUNT(*) > 1 ORDER BY COUNT(*) DESC"
        ),
        vec![
            vec![Value::Text("oslo".into())],
            vec![Value::Text("rome".into())]
        ]
    );
    // A grouped expression with a literal in it can be selected.
    assert_eq!(
        rows(
            &t,
            "SELECT age % 2, COUNT(*) FROM people WHERE age > 0 GROUP BY age % 2 ORDER BY age % 2"
        ),
        vec![
            vec![Value::Int(0), Value::Int(2)],
            vec![Value::Int(1), Value::Int(3)]
        ]
    );
    // No GROUP BY: one row, even over nothing.
    assert_eq!(
        rows(
            &t,
            "SELECT COUNT(*), SUM(age), MAX(name) FROM people WHERE id > 100"
        ),
        vec![vec![Value::Int(0), Value::Null, Value::Null]]
    );
    assert!(rows(
        &t,
        "SELECT city, COUNT(*) FROM people WHERE id > 100 GROUP BY city"
    )
    .is_empty());
    // OFFSET and LIMIT apply to aggregated rows, ordered or not.
    assert_eq!(
        rows(&t, "SELECT city FROM people GROUP BY city LIMIT 5 OFFSET 1").len(),
        2
    );
    assert!(rows(&t, "SELECT COUNT(*) FROM people LIMIT 1 OFFSET 1").is_empty());
    assert_eq!(
        rows(
            &t,
            "SELECT city FROM people GROUP BY city ORDER BY city DESC LIMIT 1 OFFSET 1"
        ),
        vec![vec![Value::Text("oslo".into())]]
    );
    assert_eq!(
        rows(&t, "SELECT SUM(score) + 1 FROM people"),
        vec![vec![Value::Float(12.5)]]
    );
}

/// A float SUM or AVG past `f64`'s range is refused as `1e308 * 10` is, not answered
/// with an infinity that JSON cannot carry.
#[test]
fn float_sums_that_overflow_are_refused() {
    let mut t = tenant();
    write(
        &mut t,
        "people",
        &[
            json!({"id": 7, "name": "big", "score": 1.5e308}),
            json!({"id": 8, "name": "bigger", "score": 1.7e308}),
        ],
    );
    for sql in [
        "SELECT SUM(score) FROM people",
        "SELECT AVG(score) FROM people",
    ] {
        let e = err(&t, sql, vec![]);
        assert_eq!(e.kind, QueryErrorKind::Evaluation, "{sql}: {e}");
        assert!(e.message.contains("float overflow"), "{sql}: {e}");
    }
    // Below the range both still answer.
    assert_eq!(
        rows(&t, "SELECT SUM(score) FROM people WHERE id < 7"),
        vec![vec![Value::Float(11.5)]]
    );
}

#[test]
fn parameters_bind_positionally_and_are_checked() {
    let t = tenant();
    let a = run(
        &t,
        "SELECT name FROM people WHERE age > $1 AND city = $2",
        vec![Value::Int(20), Value::Text("rome".into())],
    );
    assert_eq!(a.rows.len(), 2);
    let e = err(
        &t,
        "SELECT name FROM people WHERE age > $1 AND city = $2",
        vec![Value::Int(20)],
    );
    assert_eq!(e.kind, QueryErrorKind::Params);
    assert!(
        e.message.contains("$1..$2") && e.message.contains("1 value"),
        "{e}"
    );
    let e = err(&t, "SELECT name FROM people LIMIT $1", vec![Value::Int(-1)]);
    assert!(
        e.message.contains("LIMIT must be a non-negative integer"),
        "{e}"
    );
}

#[test]
fn bad_queries_say_what_and_where() {
    let t = tenant();
    for (sql, kind, wanted) in [
        (
            "SELEC id FROM people",
            QueryErrorKind::Syntax,
            "SQL syntax error",
        ),
        // The literal as written, not the placeholder normalizing put in its place.
        (
            "0",
            QueryErrorKind::Syntax,
            "found: 0 at Line: 1, Column: 1",
        ),
        (
            "SELECT id FROM people WHERE id = $1 'it''s'",
            QueryErrorKind::Syntax,
            "found: 'it''s' at Line: 1",
        ),
        (
            "SELECT id FROM nope",
            QueryErrorKind::UnknownTable,
            "table \"nope\" does not exist (at line 1, column 16); this tenant has: people",
        ),
        (
            "SELECT nope FROM people",
            QueryErrorKind::Invalid,
            "column \"nope\" (at line 1, column 8) does not exist",
        ),
        (
            "SELECT a.id FROM people",
            QueryErrorKind::Invalid,
            "is not the table of this query",
        ),
        (
            "SELECT id FROM people p JOIN people q ON p.id = q.id",
            QueryErrorKind::Unsupported,
            "JOIN is not supported",
        ),
        (
            "SELECT DISTINCT id FROM people",
            QueryErrorKind::Unsupported,
            "SELECT DISTINCT",
        ),
        (
            "SELECT id FROM people UNION SELECT id FROM people",
            QueryErrorKind::Unsupported,
            "UNION",
        ),
        (
            "SELECT upper(name) FROM people",
            QueryErrorKind::Unsupported,
            "function upper",
        ),
        (
            "SELECT id FROM people WHERE COUNT(*) > 1",
            QueryErrorKind::Invalid,
            "not allowed in WHERE",
        ),
        (
            "SELECT name, COUNT(*) FROM people",
            QueryErrorKind::Invalid,
            "must appear in GROUP BY",
        ),
        (
            "SELECT id FROM people ORDER BY 1",
            QueryErrorKind::Unsupported,
            "positions such as ORDER BY 1",
        ),
        (
            "DELETE FROM people",
            QueryErrorKind::Unsupported,
            "DELETE is not supported",
        ),
        (
            "SELECT id FROM people; SELECT 1 FROM people",
            QueryErrorKind::Unsupported,
            "one statement",
        ),
        (
            "SELECT id FROM people WHERE name ILIKE 'a'",
            QueryErrorKind::Unsupported,
            "is not supported",
        ),
        (
            "SELECT id FROM people WHERE id = E'x'",
            QueryErrorKind::Unsupported,
            "the literal",
        ),
        (
            "SELECT SUM(name) FROM people",
            QueryErrorKind::Evaluation,
            "sum needs numbers, got text",
        ),
        (
            "SELECT id FROM people WHERE age",
            QueryErrorKind::Evaluation,
            "a condition must be a boolean, got int",
        ),
        (
            "SELECT id / 0 FROM people",
            QueryErrorKind::Evaluation,
            "division by zero",
        ),
        (
            "SELECT id FROM people WHERE id = 0x10",
            QueryErrorKind::Syntax,
            "not a decimal number",
        ),
        (
            "SELECT id FROM people WHERE id = 1_000",
            QueryErrorKind::Syntax,
            "without a 0x prefix or _ separators",
        ),
        (
            "SELECT q.* FROM people p",
            QueryErrorKind::Invalid,
            "q.* names no table of this query",
        ),
        // Found by the fuzzer: the parser builds `:name` placeholders from two tokens.
        (
            "SELECT id FROM people WHERE id = :name",
            QueryErrorKind::Params,
            "write $1, $2",
        ),
    ] {
        let e = err(&t, sql, vec![]);
        assert_eq!(e.kind, kind, "{sql}: {e}");
        assert!(e.message.contains(wanted), "{sql}: {e}");
    }
    // A qualified wildcard names the table or its alias.
    let all = run(&t, "SELECT * FROM people", vec![]).rows;
    assert_eq!(run(&t, "SELECT p.* FROM people p", vec![]).rows, all);
    assert_eq!(run(&t, "SELECT people.* FROM people", vec![]).rows, all);
    let deep = format!(
        "SELECT id FROM people WHERE {}id = 1{}",
        "(".repeat(200),
        ")".repeat(200)
    );
    assert_eq!(err(&t, &deep, vec![]).kind, QueryErrorKind::TooComplex);
}

/// Trees as deep as the SQL size limit allows, built without a single parenthesis:
/// each is refused before parsing (or answered), never a stack overflow.
#[test]
fn flat_chains_of_every_operator_up_to_the_size_limit_are_refused_cleanly() {
    let t = tenant();
    let room = 64 * 1024 - 100;
    for op in [
        " + 1",
        " - 1",
        " * 1",
        " / 1",
        " % 1",
        " AND TRUE",
        " OR FALSE",
        " = 1",
        " < 1",
        " IS NULL",
        " IS NOT NULL",
        " LIKE 'a'",
        " <-> 1",
        " || 'a'",
        "::int",
    ] {
        let chain = op.repeat(room / op.len());
        let sql = format!("SELECT id FROM people WHERE id{chain}");
        let e = err(&t, &sql, vec![]);
        assert_eq!(e.kind, QueryErrorKind::TooComplex, "{op:?}: {e}");
        // LIKE has a limit of its own, met first.
        let limit = if op.contains("LIKE") {
            format!("{MAX_LIKE_PER_QUERY} LIKE")
        } else {
            MAX_QUERY_OPERATORS.to_string()
        };
        assert!(e.message.contains(&limit), "{e}");
    }
    for prefix in ["NOT ", "-", "+"] {
        let sql = format!(
            "SELECT id FROM people WHERE {}id = 1",
            prefix.repeat(room / prefix.len())
        );
        let e = err(&t, &sql, vec![]);
        assert!(
            matches!(e.kind, QueryErrorKind::TooComplex | QueryErrorKind::Syntax),
            "{prefix:?}: {e}"
        );
    }
    // Mixed: parentheses inside a chain, and a chain inside parentheses.
    let mixed = format!(
        "SELECT id FROM people WHERE {}",
        "(id + 1) * ".repeat(room / 11) + "1 = 1"
    );
    assert_eq!(err(&t, &mixed, vec![]).kind, QueryErrorKind::TooComplex);
}

/// `IN` lists compared item by item on every row are bounded, whatever their items (a
/// column, one parameter repeated, kinds mixed so no set is built, in SELECT); a list
/// in WHERE made a set is not.
#[test]
fn in_lists_compared_item_by_item_are_bounded() {
    let t = tenant();
    let list = |item: &str, n: usize| vec![item; n].join(", ");
    let at = format!(
        "SELECT id FROM people WHERE name IN ({})",
        list("name", MAX_IN_LIST_COMPARISONS)
    );
    run(&t, &at, vec![]);
    let text = || Value::Text("x".repeat(1000));
    for (sql, params) in [
        (
            format!(
                "SELECT id FROM people WHERE name IN ({}) OR id IN (id)",
                list("name", MAX_IN_LIST_COMPARISONS)
            ),
            vec![],
        ),
        (
            format!(
                "SELECT id FROM people WHERE name IN ({}, $2)",
                list("$1", MAX_IN_LIST_COMPARISONS)
            ),
            vec![text(), Value::Int(3)],
        ),
        (
            format!(
                "SELECT name IN ({}) FROM people",
                list("$1", MAX_IN_LIST_COMPARISONS + 1)
            ),
            vec![text()],
        ),
    ] {
        let e = err(&t, &sql, params);
        assert_eq!(e.kind, QueryErrorKind::TooComplex, "{e}");
        assert!(
            e.message
                .contains(&format!("limit of {MAX_IN_LIST_COMPARISONS}")),
            "{e}"
        );
    }
    // One kind: a set, any length.
    let sql = format!("SELECT id FROM people WHERE name IN ({})", list("$1", 5000));
    run(&t, &sql, vec![text()]);
    let constants: Vec<String> = (0..5000).map(|i| format!("'{i}'")).collect();
    let sql = format!(
        "SELECT id FROM people WHERE name IN ({})",
        constants.join(", ")
    );
    run(&t, &sql, vec![]);
}

#[test]
fn a_chain_just_under_the_operator_limit_runs() {
    let t = tenant();
    let sql = format!(
        "SELECT id FROM people WHERE id{} = 3 + 0",
        " + 0".repeat(MAX_QUERY_OPERATORS - 10)
    );
    assert_eq!(run(&t, &sql, vec![]).rows, vec![vec![Value::Int(3)]]);
    // Long IN lists are flat: thousands of values, negative ones included, cost one
    // operator, and `-1` is one literal.
    let list: Vec<String> = (-3000..3000).map(|i| i.to_string()).collect();
    let sql = format!("SELECT id FROM people WHERE id IN ({})", list.join(", "));
    assert_eq!(run(&t, &sql, vec![]).rows.len(), 6);
    let a = run(&t, "SELECT id - 1 AS x FROM people WHERE id = 2", vec![]);
    assert_eq!(a.rows, vec![vec![Value::Int(1)]]);
    let a = run(
        &t,
        "SELECT id FROM people WHERE id = -1 OR id > -2 - -5",
        vec![],
    );
    assert_eq!(
        a.rows,
        vec![
            vec![Value::Int(4)],
            vec![Value::Int(5)],
            vec![Value::Int(6)]
        ]
    );
}

#[test]
fn like_is_linear_and_its_pattern_is_capped() {
    let mut t = tenant();
    let texts: Vec<Json> = (0..200)
        .map(|i| json!({"id": 100 + i, "name": "a".repeat(10_000)}))
        .collect();
    write(&mut t, "people", &texts);
    // The worst case for a backtracking matcher: many `%` and a tail that never
    // matches. Linear matching answers at once.
    let pattern = format!("{}b", "%a".repeat(120));
    let a = run(
        &t,
        "SELECT COUNT(*) FROM people WHERE name LIKE $1",
        vec![Value::Text(pattern)],
    );
    assert_eq!(a.rows, vec![vec![Value::Int(0)]]);
    let long = "_%".repeat(200);
    let e = err(
        &t,
        "SELECT id FROM people WHERE name LIKE $1",
        vec![Value::Text(long)],
    );
    assert_eq!(e.kind, QueryErrorKind::Evaluation);
    assert!(e.message.contains("256"), "{e}");
}

#[test]
fn memory_budget_stops_big_sorts_and_group_explosions() {
    let mut t = tenant();
    let rows: Vec<Json> = (0..2000)
        .map(|i| json!({"id": 100 + i, "name": format!("{i}-{}", "x".repeat(1000))}))
        .collect();
    write(&mut t, "people", &rows);
    let small = AskLimits {
        max_memory_bytes: 256 * 1024,
        ..AskLimits::default()
    };
    for sql in [
        "SELECT name FROM people ORDER BY name",
        "SELECT name FROM people ORDER BY name OFFSET 1000000000000",
        "SELECT name FROM people ORDER BY name LIMIT 1000000000000",
        "SELECT name, COUNT(*) FROM people GROUP BY name",
        "SELECT name FROM people",
    ] {
        let e = ask_now(&t, sql, vec![], small).expect_err("over the budget");
        assert_eq!(e.kind, QueryErrorKind::MemoryLimit, "{sql}: {e}");
        assert!(e.message.contains("262144"), "{e}");
    }
    // A top-k keeps only what it returns, so a small LIMIT fits.
    let a = ask_now(
        &t,
        "SELECT name FROM people ORDER BY name LIMIT 5",
        vec![],
        small,
    )
    .expect("fits");
    assert_eq!(a.rows.len(), 5);
}

/// A top-k whose kept rows take more than half the query's memory (where it once sorted
/// everything again for every row) still returns exactly the right rows, in order.
#[test]
fn a_top_k_that_fills_half_the_memory_returns_the_exact_rows() {
    let mut t = tenant();
    let names: Vec<String> = (0..2000)
        .map(|i| format!("{:05}-{}", (i * 7919) % 2000, "x".repeat(1000)))
        .collect();
    let rows: Vec<Json> = names
        .iter()
        .enumerate()
        .map(|(i, name)| json!({"id": 100 + i, "name": name}))
        .collect();
    write(&mut t, "people", &rows);
    let small = AskLimits {
        max_memory_bytes: 256 * 1024,
        ..AskLimits::default()
    };
    let mut sorted = names.clone();
    sorted.sort();
    for (sql, expected) in [
        (
            "SELECT name FROM people WHERE id >= 100 ORDER BY name DESC LIMIT 70 OFFSET 10",
            sorted
                .iter()
                .rev()
                .skip(10)
                .take(70)
                .cloned()
                .collect::<Vec<_>>(),
        ),
        (
            "SELECT name FROM people WHERE id >= 100 ORDER BY name LIMIT 80",
            sorted.iter().take(80).cloned().collect(),
        ),
    ] {
        let a = ask_now(&t, sql, vec![], small).expect("fits");
        let got: Vec<String> = a
            .rows
            .iter()
            .map(|r| match &r[0] {
                Value::Text(s) => s.to_string(),
                other => panic!("{other:?}"),
            })
            .collect();
        // The rows written above (the fixture's own people sort apart).
        assert!(
            got == expected,
            "{sql}: {} rows, not the {} expected in order",
            got.len(),
            expected.len()
        );
    }
}

#[test]
fn limits_stop_big_queries() {
    let t = tenant();
    let small = AskLimits {
        max_rows_returned: 3,
        max_rows_scanned: 4,
        ..AskLimits::default()
    };
    let e = ask_now(&t, "SELECT id FROM people WHERE id < 5", vec![], small)
        .expect_err("too many rows");
    assert_eq!(e.kind, QueryErrorKind::ResultTooLarge);
    assert_eq!(
        ask_now(
            &t,
            "SELECT id FROM people WHERE id < 5 LIMIT 3",
            vec![],
            small
        )
        .expect("fits")
        .rows
        .len(),
        3
    );
    let e = ask_now(&t, "SELECT COUNT(*) FROM people", vec![], small).expect_err("scans 6");
    assert_eq!(e.kind, QueryErrorKind::ScanLimit);
    let zero = AskLimits {
        deadline: std::time::Duration::ZERO,
        ..AskLimits::default()
    };
    let e = ask_now(&t, "SELECT COUNT(*) FROM people", vec![], zero).expect_err("deadline");
    assert_eq!(e.kind, QueryErrorKind::Timeout);
}

#[test]
fn explain_reports_every_stage_and_plan_only_runs_nothing() {
    let t = tenant();
    let a = run(&t, "EXPLAIN ANALYZE SELECT city, COUNT(*) AS n FROM people WHERE score > 1 GROUP BY city HAVING COUNT(*) > 1 ORDER BY n DESC LIMIT 5", vec![]);
    let plan = a.plan.expect("plan");
    let mut stages = vec![];
    let mut node = &plan["root"];
    loop {
        stages.push((
            node["stage"].as_str().expect("stage").to_string(),
            node["rows_in"].clone(),
            node["rows_out"].clone(),
        ));
        assert!(node["elapsed_us"].is_u64(), "{node}");
        match node.get("input") {
            Some(n) => node = n,
            None => break,
        }
    }
    let names: Vec<&str> = stages.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "project",
            "limit",
            "top_k",
            "having",
            "aggregate",
            "filter",
            "scan"
        ]
    );
    assert_eq!(
        stages[5],
        ("filter".into(), json!(6), json!(4)),
        "score > 1 keeps 4 of 6"
    );
    assert_eq!(stages[4].2, json!(3), "three cities (one NULL)");
    assert_eq!(stages[3].2, json!(1), "one group has more than one row");
    assert_eq!(
        a.rows,
        vec![vec![Value::Text("oslo".into()), Value::Int(2)]]
    );
    let only = run(&t, "EXPLAIN SELECT id FROM people WHERE id = 1", vec![]);
    assert!(only.rows.is_empty());
    assert!(
        only.plan.expect("plan")["root"].get("rows_out").is_none(),
        "nothing ran"
    );
}

/// (id, vector, group) of each live row.
type VectorRows = Vec<(i64, Option<Vec<f32>>, i64)>;

fn vectors_tenant(n: usize, dim: usize, seed: u64) -> (Tenant, VectorRows) {
    let mut t = Tenant::new(TenantId::parse("vec").expect("valid"));
    let schema = TableSchema::new(
        "docs",
        &[
            ("id", ColumnType::Int, false),
            ("grp", ColumnType::Int, true),
            ("emb", ColumnType::Vector(dim as u32), true),
        ],
        &["id"],
        &[],
    )
    .expect("valid");
    t.create_table(schema, 1).expect("created");
    let mut state = seed;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let mut data = Vec::new();
    for id in 0..n as i64 {
        // Some NULL vectors, some exact duplicates (ties), a zero vector.
        let v = match id % 17 {
            0 => None,
            5 => Some(vec![0.25; dim]),
            9 if id == 9 => Some(vec![0.0; dim]),
            _ => Some((0..dim).map(|_| (next() * 4.0).round() / 4.0).collect()),
        };
        data.push((id, v, id % 5));
    }
    let rows: Vec<Json> = data
        .iter()
        .map(|(id, v, g)| json!({"id": id, "grp": g, "emb": v}))
        .collect();
    write(&mut t, "docs", &rows);
    // Delete some rows, then write some of them again.
    let deletes: Vec<WriteOp> = (0..n as i64)
        .filter(|i| i % 7 == 3)
        .map(|i| WriteOp::Delete(json!({"id": i}).as_object().expect("object").clone()))
        .collect();
    for chunk in deletes.chunks(1000) {
        t.write("docs", chunk).expect("deleted");
    }
    data.retain(|(i, _, _)| i % 7 != 3);
    (t, data)
}

fn brute_force(
    data: &[(i64, Option<Vec<f32>>, i64)],
    q: &[f32],
    metric: Metric,
    k: usize,
    grp: Option<i64>,
) -> Vec<i64> {
    let mut scored: Vec<(f64, i64)> = data
        .iter()
        .filter(|(_, _, g)| grp.is_none_or(|w| *g == w))
        .filter_map(|(id, v, _)| Some((metric.rank(v.as_ref()?, q)?, *id)))
        .collect();
    // Ties by primary key, ascending (int keys order like their values).
    scored.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    scored.into_iter().take(k).map(|(_, id)| id).collect()
}

/// Vectors whose distances overflow (or vanish in) `f32` still get their true
/// distances and order, computed here in `f64` from the definition.
#[test]
fn distances_beyond_f32_range_are_exact_and_ordered() {
    let mut t = Tenant::new(TenantId::parse("acme").expect("valid"));
    let schema = TableSchema::new(
        "docs",
        &[
            ("id", ColumnType::Int, false),
            ("emb", ColumnType::Vector(4), true),
        ],
        &["id"],
        &[],
    )
    .expect("valid");
    t.create_table(schema, 10).expect("created");
    let vectors: Vec<[f32; 4]> = vec![
        [3e38, -3e38, 1e30, 0.0],
        [1e20, 1e20, 1e20, 1e20],
        [2e20, 0.0, 0.0, 0.0],
        [1e-30, 2e-30, 0.0, 0.0],
        [3e-22, 0.0, 0.0, 1e-24],
        [1.0, 1.0, 1.0, 1.0],
        [1e4, 1e-21, 0.0, 0.0],
    ];
    let rows: Vec<Json> = vectors
        .iter()
        .enumerate()
        .map(|(id, v)| json!({"id": id, "emb": v.to_vec()}))
        .collect();
    write(&mut t, "docs", &rows);
    let dot = |x: &[f32], y: &[f32]| -> f64 {
        x.iter()
            .zip(y)
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum()
    };
    let l2 = |v: &[f32; 4], q: &[f32; 4]| -> f64 {
        v.iter()
            .zip(q)
            .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let cosine =
        |v: &[f32; 4], q: &[f32; 4]| -> f64 { 1.0 - dot(v, q) / (dot(v, v) * dot(q, q)).sqrt() };
    type Reference<'a> = &'a dyn Fn(&[f32; 4], &[f32; 4]) -> f64;
    let metrics: [(&str, Reference); 2] = [("<->", &l2), ("<=>", &cosine)];
    // A query far out of range, an ordinary one, a tiny one.
    let queries = [
        [-1e20f32, 5e19, 0.0, 1e-30],
        [1e4, 0.0, 0.0, 0.0],
        [2e-22, 0.0, 0.0, 0.0],
    ];
    for q in &queries {
        for (op, reference) in metrics {
            let answer = run(
                &t,
                &format!("SELECT id, emb {op} $1 AS d FROM docs ORDER BY emb {op} $1 LIMIT 10"),
                vec![Value::Vector(q.to_vec())],
            );
            let mut want: Vec<(f64, i64)> = vectors
                .iter()
                .enumerate()
                .map(|(id, v)| (reference(v, q), id as i64))
                .collect();
            want.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            assert_eq!(answer.rows.len(), want.len(), "{op} {q:?}");
            for (row, (distance, id)) in answer.rows.iter().zip(&want) {
                let Value::Float(got) = row[1] else {
                    panic!("{op} {q:?}: a distance, got {:?}", row[1]);
                };
                assert!(got.is_finite(), "{op} {q:?}: row {id}: {got}");
                // The f32 kernels serve the pairs in range: close, not bit-equal.
                assert!(
                    (got - distance).abs() <= distance.abs() * 1e-5 + 1e-6,
                    "{op} {q:?}: {:?} against {want:?}",
                    answer.rows
                );
            }
        }
    }
}

#[test]
fn knn_matches_brute_force_with_ties_filters_and_both_metrics() {
    let dim = 12;
    let (t, data) = vectors_tenant(3000, dim, 7);
    for (qi, q) in [
        vec![0.25f32; dim],
        vec![0.0; dim],
        (0..dim).map(|i| i as f32 / 10.0 - 0.5).collect(),
    ]
    .into_iter()
    .enumerate()
    {
        for (op, metric) in [("<->", Metric::L2), ("<=>", Metric::Cosine)] {
            for k in [1usize, 10, 50] {
                for grp in [None, Some(2)] {
                    let filter = grp.map_or(String::new(), |g| format!("WHERE grp = {g}"));
                    let sql =
                        format!("SELECT id FROM docs {filter} ORDER BY emb {op} $1 LIMIT {k}");
                    let got = ask_now(
                        &t,
                        &sql,
                        vec![Value::Vector(q.clone())],
                        AskLimits::default(),
                    );
                    if metric == Metric::Cosine && q.iter().all(|x| *x == 0.0) {
                        // Cosine distance to a zero vector is undefined: every row skipped.
                        assert_eq!(got.expect("runs").rows, Vec::<Vec<Value>>::new());
                        continue;
                    }
                    let got: Vec<i64> = got
                        .unwrap_or_else(|e| panic!("{sql}: {e}"))
                        .rows
                        .into_iter()
                        .map(|r| match r[0] {
                            Value::Int(i) => i,
                            _ => panic!("int id"),
                        })
                        .collect();
                    let want = brute_force(&data, &q, metric, k, grp);
                    assert_eq!(got, want, "query {qi}, {sql}");
                }
            }
        }
    }
    // The distance can be projected and used with OFFSET.
    let a = run(
        &t,
        "SELECT id, emb <-> $1 AS d FROM docs ORDER BY emb <-> $1 LIMIT 3 OFFSET 2",
        vec![Value::Vector(vec![0.25; dim])],
    );
    let want = brute_force(&data, &vec![0.25; dim], Metric::L2, 5, None);
    let ids: Vec<Value> = a.rows.iter().map(|r| r[0].clone()).collect();
    assert_eq!(
        ids,
        want[2..].iter().map(|&i| Value::Int(i)).collect::<Vec<_>>()
    );
    assert_eq!(
        a.rows[0][1],
        Value::Float(0.0),
        "a duplicate of the query vector is at distance 0"
    );
    // A query vector as text, and the wrong dimension.
    let text = format!("[{}]", vec!["0.25"; dim].join(","));
    assert_eq!(
        run(
            &t,
            "SELECT id FROM docs ORDER BY emb <-> $1 LIMIT 1",
            vec![Value::Text(text)]
        )
        .rows
        .len(),
        1
    );
    let e = err(
        &t,
        "SELECT id FROM docs ORDER BY emb <-> $1 LIMIT 1",
        vec![Value::Vector(vec![1.0; 3])],
    );
    assert!(e.message.contains("vectors of 12 and 3 dimensions"), "{e}");
    let plan = access(
        &t,
        "SELECT id FROM docs ORDER BY emb <-> '[0,0,0,0,0,0,0,0,0,0,0,0]' LIMIT 4",
    );
    assert!(
        plan["detail"]
            .as_str()
            .expect("detail")
            .starts_with("vector kNN"),
        "{plan}"
    );
    assert_eq!(plan["rows_out"], json!(4));
}

/// The int ids a finished scan returned, in its order and sorted; no id twice.
fn distinct_ids(run: oc_engine::query::Execution) -> (Vec<i64>, Vec<i64>) {
    let ids: Vec<i64> = run
        .finish(false)
        .expect("finishes")
        .rows
        .into_iter()
        .map(|r| match r[0] {
            Value::Int(i) => i,
            _ => panic!("int"),
        })
        .collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), ids.len(), "no row twice");
    (ids, sorted)
}

/// Groups without ORDER BY stream through LIMIT like rows: more groups than an
/// answer may hold is not an error when the LIMIT keeps few of them.
#[test]
fn a_limit_over_more_groups_than_an_answer_holds_returns_the_first_ones() {
    let groups = AskLimits::default().max_rows_returned + 10;
    let t = int_table("groups", groups, |i| i as i64);
    for sql in [
        "SELECT g, COUNT(*) FROM t GROUP BY g LIMIT 5",
        "SELECT g, COUNT(*) FROM t GROUP BY g LIMIT 5 OFFSET 2",
    ] {
        let first = rows(&t, sql);
        assert_eq!(first.len(), 5, "{sql}: {first:?}");
        assert!(first.iter().all(|r| r[1] == Value::Int(1)), "{first:?}");
    }
    // Without a LIMIT the answer is too large, as before.
    let all = err(&t, "SELECT g, COUNT(*) FROM t GROUP BY g", vec![]);
    assert!(all.message.contains("rows"), "{all}");
}

fn int_table(name: &str, rows: usize, g: impl Fn(usize) -> i64) -> Tenant {
    let mut t = Tenant::new(TenantId::parse(name).expect("valid"));
    let schema = TableSchema::new(
        "t",
        &[("id", ColumnType::Int, false), ("g", ColumnType::Int, true)],
        &["id"],
        &[],
    )
    .expect("valid");
    t.create_table(schema, 1).expect("created");
    let written: Vec<Json> = (0..rows).map(|i| json!({"id": i, "g": g(i)})).collect();
    write(&mut t, "t", &written);
    t
}

/// A tenant with table `t (id, v)` indexed on `v`.
fn tenant_indexed_on_v(name: &str) -> Tenant {
    let mut t = Tenant::new(TenantId::parse(name).expect("valid"));
    let schema = TableSchema::new(
        "t",
        &[("id", ColumnType::Int, false), ("v", ColumnType::Int, true)],
        &["id"],
        &[("by_v", &["v"])],
    )
    .expect("valid");
    t.create_table(schema, 1).expect("created");
    t
}

/// `sql` planned and bound over `t`, ready to step as a shard steps it.
fn execution(t: &Tenant, sql: &str) -> oc_engine::query::Execution {
    use oc_engine::query::{normalize, prepare, Execution};
    let q = normalize(sql).expect("valid");
    let plan = std::rc::Rc::new(prepare(t, &q).expect("plans"));
    let memory = t.query_memory().clone();
    Execution::new(plan, q.literals.clone(), AskLimits::default(), &memory).expect("binds")
}

/// Steps a query to its end the way a shard does; returns the steps and the answer.
fn stepped(t: &Tenant, sql: &str) -> (usize, AskAnswer) {
    let mut run = execution(t, sql);
    let mut steps = 1;
    while !run.step(t).expect("step") {
        steps += 1;
    }
    (steps, run.finish(false).expect("finishes"))
}

/// The groups become rows a slice at a time after the scan (the shard yields between
/// slices), not in one pass that would hold the shard for all of them.
#[test]
fn many_groups_are_turned_into_rows_a_slice_at_a_time() {
    use oc_engine::query::SLICE_ROWS;
    let groups = 20 * SLICE_ROWS;
    let t = int_table("groups", groups, |i| i as i64);
    let (scan_steps, one) = stepped(&t, "SELECT COUNT(*) FROM t");
    assert_eq!(one.rows, vec![vec![Value::Int(groups as i64)]]);
    let sql =
        "SELECT g, COUNT(*) FROM t GROUP BY g HAVING COUNT(*) = 1 ORDER BY g DESC LIMIT 3 OFFSET 2";
    let (steps, answer) = stepped(&t, sql);
    let top = groups as i64 - 1;
    assert_eq!(
        answer.rows,
        (2..5)
            .map(|k| vec![Value::Int(top - k), Value::Int(1)])
            .collect::<Vec<_>>()
    );
    assert!(
        steps >= scan_steps + groups / SLICE_ROWS,
        "{steps} steps for {groups} groups after a scan of {scan_steps}"
    );
}

/// Pages deep into a large ordered answer, whose cuts are made a slice at a time
/// (more rows held than one cut makes at once), partition it in order, ties included.
#[test]
fn deep_pages_of_a_large_ordered_answer_partition_it() {
    let n = 40_000;
    let t = int_table("deep", n, |i| ((i * 7919) % 1000) as i64);
    let mut expected: Vec<(i64, i64)> = (0..n as i64).map(|i| ((i * 7919) % 1000, i)).collect();
    expected.sort_unstable();
    let mut paged = Vec::new();
    for page in 0..8 {
        let sql = format!(
            "SELECT id FROM t ORDER BY g LIMIT 5000 OFFSET {}",
            page * 5000
        );
        let (_, answer) = stepped(&t, &sql);
        assert_eq!(answer.rows.len(), 5000, "{sql}");
        paged.extend(answer.rows.iter().map(|r| match r[0] {
            Value::Int(i) => i,
            _ => panic!("int"),
        }));
    }
    let ids: Vec<i64> = expected.iter().map(|(_, id)| *id).collect();
    assert!(
        paged == ids,
        "the pages do not partition the answer in order"
    );
}

/// Rows with equal sort keys come in the order they were read (primary key order
/// here), however the top-k cuts and OFFSET selections split them: consecutive pages
/// of one ordered answer neither repeat nor skip a row.
#[test]
fn pages_over_equal_sort_keys_agree() {
    let n = 3000;
    let t = int_table("ties", n, |i| (i % 3 == 0) as i64);
    let mut expected: Vec<i64> = (0..n as i64).filter(|i| i % 3 != 0).collect();
    expected.extend((0..n as i64).filter(|i| i % 3 == 0));
    let mut paged = Vec::new();
    for page in 0..(n / 250) {
        let sql = format!(
            "SELECT id FROM t ORDER BY g LIMIT 250 OFFSET {}",
            page * 250
        );
        paged.extend(ints(&t, &sql));
    }
    assert_eq!(paged, expected);
    assert_eq!(
        ints(&t, "SELECT id FROM t ORDER BY g DESC LIMIT 5 OFFSET 998"),
        vec![2994, 2997, 1, 2, 4]
    );
}

#[test]
fn a_scan_resumes_across_slices_while_rows_change() {
    let mut t = tenant_indexed_on_v("big");
    let rows: Vec<Json> = (0..5000).map(|i| json!({"id": i, "v": i % 100})).collect();
    write(&mut t, "t", &rows);
    for sql in ["SELECT id FROM t", "SELECT id FROM t WHERE v >= 0"] {
        let mut run = execution(&t, sql);
        let mut steps = 0;
        let mut next_new = 10_000;
        while !run.step(&t).expect("step") {
            steps += 1;
            // Between slices: delete rows not yet read, add new ones.
            let gone = WriteOp::Delete(json!({"id": 4999 - steps}).as_object().expect("o").clone());
            let fresh = WriteOp::Upsert(
                json!({"id": next_new, "v": 50})
                    .as_object()
                    .expect("o")
                    .clone(),
            );
            next_new += 1;
            t.write("t", &[gone, fresh]).expect("written");
        }
        assert!(steps >= 4, "{sql}: the scan took several slices");
        let (_, sorted) = distinct_ids(run);
        // Every row present throughout (not deleted, original) was seen.
        for id in 0..(4999 - steps as i64) {
            assert!(sorted.binary_search(&id).is_ok(), "{sql}: row {id} missed");
        }
        // Reset for the next query.
        let rows: Vec<Json> = (0..5000).map(|i| json!({"id": i, "v": i % 100})).collect();
        write(&mut t, "t", &rows);
    }
}

/// Rows whose indexed value changes between an index scan's slices (moving behind
/// where the scan is, or ahead of it) are returned exactly once: none of them is
/// inserted or deleted, so the answer holds every row once. A scan whose order is the
/// answer's stays in order.
#[test]
fn an_index_scan_returns_each_row_once_while_rows_move_in_the_index() {
    scan_while_rows_move("moving", |t, up, down| write(t, "t", &[up, down]));
}

/// A row deleted and written again by one batch has moved in the index, as far as a
/// scan can tell (it sees the batch as one step): the same holds.
#[test]
fn an_index_scan_returns_each_row_once_while_one_batch_deletes_and_rewrites_rows() {
    scan_while_rows_move("rewritten", |t, up, down| {
        let key = |row: &Json| json!({"id": row["id"]}).as_object().expect("o").clone();
        let row = |row: Json| row.as_object().expect("o").clone();
        let batch = [
            WriteOp::Delete(key(&up)),
            WriteOp::Delete(key(&down)),
            WriteOp::Upsert(row(up)),
            WriteOp::Upsert(row(down)),
        ];
        t.write("t", &batch).expect("written");
    });
}

/// Runs index scans over 6,000 rows while `move_rows` moves a row returned early to
/// the top of the index, and one not returned yet to the bottom, between slices.
fn scan_while_rows_move(name: &str, move_rows: impl Fn(&mut Tenant, Json, Json)) {
    let mut t = tenant_indexed_on_v(name);
    let n = 6000i64;
    for sql in [
        "SELECT id, v FROM t WHERE v >= 0",
        "SELECT id, v FROM t WHERE v IN (0, 1, 2, 50, 98, 99, 100, 101)",
        "SELECT id, v FROM t WHERE v >= 0 ORDER BY v LIMIT 100000",
    ] {
        let rows: Vec<Json> = (0..n).map(|i| json!({"id": i, "v": i % 100})).collect();
        write(&mut t, "t", &rows);
        let access = access(&t, sql);
        assert!(access.to_string().contains("by_v"), "{sql}: plans {access}");
        let mut run = execution(&t, sql);
        let mut steps = 0i64;
        while !run.step(&t).expect("step") {
            // Between slices: a row of the lowest values (returned early) moves to the
            // top, and one of the highest (not returned yet) to the bottom.
            let up = json!({"id": steps * 100, "v": 101});
            let down = json!({"id": steps * 100 + 99, "v": 0});
            move_rows(&mut t, up, down);
            steps += 1;
        }
        assert!(steps >= 4, "{sql}: the scan took several slices");
        let answer = run.finish(false).expect("finishes").rows;
        let mut ids: Vec<i64> = answer
            .iter()
            .map(|r| match r[0] {
                Value::Int(i) => i,
                _ => panic!("int"),
            })
            .collect();
        if sql.contains("ORDER BY") {
            let vs: Vec<&Value> = answer.iter().map(|r| &r[1]).collect();
            assert!(
                vs.windows(2).all(|w| sort_cmp_ints(w[0], w[1])),
                "{sql}: out of order"
            );
        }
        let returned = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), returned, "{sql}: a row returned twice");
        if sql.contains("IN (") {
            // The moves keep every row of those values among them (0 to 101, 99 to 0).
            let wanted: Vec<i64> = (0..n)
                .filter(|id| [0, 1, 2, 50, 98, 99].contains(&(id % 100)))
                .collect();
            assert_eq!(ids, wanted, "{sql}: rows missed or extra");
        } else if !sql.contains("ORDER BY") {
            assert_eq!(ids, (0..n).collect::<Vec<_>>(), "{sql}: rows missed");
        }
        for id in 0..n {
            let gone = WriteOp::Delete(json!({"id": id}).as_object().expect("o").clone());
            t.write("t", &[gone]).expect("written");
        }
    }
}

/// A row that moves into the range of an IN list value the scan has finished, past
/// the last row that range returned, is returned all the same (and once).
#[test]
fn an_in_list_scan_returns_a_row_moved_into_a_finished_range() {
    let mut t = tenant_indexed_on_v("inlist");
    // v = 0 for ids below 1000, 99 above: the range of 0 ends at (0, 999).
    let rows: Vec<Json> = (0..3000)
        .map(|i| json!({"id": i, "v": if i < 1000 { 0 } else { 99 }}))
        .collect();
    write(&mut t, "t", &rows);
    let mut run = execution(&t, "SELECT id FROM t WHERE v IN (0, 99)");
    let mut steps = 0i64;
    while !run.step(&t).expect("step") {
        // The highest ids, not returned yet, move to 0: behind the scan, past (0, 999).
        write(&mut t, "t", &[json!({"id": 2999 - steps, "v": 0})]);
        steps += 1;
    }
    assert!(steps >= 4, "the scan took several slices");
    let mut ids: Vec<i64> = run
        .finish(false)
        .expect("finishes")
        .rows
        .iter()
        .map(|r| match r[0] {
            Value::Int(i) => i,
            _ => panic!("int"),
        })
        .collect();
    let returned = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), returned, "a row returned twice");
    assert_eq!(ids, (0..3000).collect::<Vec<_>>(), "rows missed");
}

/// A job queue: a scan of the pending rows while workers mark the ones it returned
/// done. Rows that leave the scanned range behind the scan are nothing to remember,
/// however many (here more than the log keeps in all): the scan ends, each row once.
#[test]
fn rows_leaving_the_range_behind_the_scan_are_not_remembered() {
    let mut t = tenant_indexed_on_v("queue");
    let n = 200_000i64;
    let rows: Vec<Json> = (0..n).map(|i| json!({"id": i, "v": 0})).collect();
    write(&mut t, "t", &rows);
    let mut run = execution(&t, "SELECT COUNT(*) FROM t WHERE v = 0");
    let mut done = 0i64;
    while !run.step(&t).expect("step") {
        // Mark done up to 400 of the rows the scan has returned (by id order here).
        let upto = (done + 400).min(n);
        for id in done..upto {
            t.write(
                "t",
                &[WriteOp::Upsert(
                    json!({"id": id, "v": 1}).as_object().expect("o").clone(),
                )],
            )
            .expect("written");
        }
        done = upto;
    }
    assert!(
        done > oc_engine::table::MAX_INDEX_MOVES as i64,
        "{done} moves"
    );
    let answer = run.finish(false).expect("finishes").rows;
    // Rows marked done before the scan met them are counted in neither version.
    assert!(
        matches!(answer[0][0], Value::Int(c) if c > 0 && c <= n),
        "{answer:?}"
    );
}

/// More moves between two slices than the table keeps for its scans: the scan
/// cannot account for them and is refused as a table that changed (retry), rather than
/// answer with rows twice or missing.
#[test]
fn an_index_scan_that_falls_behind_the_kept_moves_is_refused() {
    use oc_engine::query::QueryErrorKind;
    let mut t = tenant_indexed_on_v("churn");
    let rows: Vec<Json> = (0..3000).map(|i| json!({"id": i, "v": i})).collect();
    write(&mut t, "t", &rows);
    let mut run = execution(&t, "SELECT id FROM t WHERE v >= 0");
    assert!(!run.step(&t).expect("first slice"));
    let moves = oc_engine::table::MAX_INDEX_MOVES + 10;
    for m in 0..moves {
        let id = (m % 3000) as i64;
        write(&mut t, "t", &[json!({"id": id, "v": 10_000 + m as i64})]);
    }
    let refused = loop {
        match run.step(&t) {
            Ok(false) => continue,
            Ok(true) => panic!("the scan ended without accounting for the moves"),
            Err(e) => break e,
        }
    };
    assert_eq!(refused.kind, QueryErrorKind::TableChanged, "{refused}");
    assert!(refused.message.contains("retry"), "{refused}");
}

fn sort_cmp_ints(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Int(x), Value::Int(y)) => x <= y,
        _ => false,
    }
}

#[test]
fn a_knn_scan_resumes_across_slices_while_rows_change() {
    use oc_engine::query::{normalize, prepare, Execution};
    let mut t = Tenant::new(TenantId::parse("near").expect("valid"));
    let schema = TableSchema::new(
        "t",
        &[
            ("id", ColumnType::Int, false),
            ("v", ColumnType::Vector(2), true),
        ],
        &["id"],
        &[],
    )
    .expect("valid");
    t.create_table(schema, 1).expect("created");
    // Row i lies at distance i from the query; every seventh row has no vector.
    let at = |i: i64| json!({"id": i, "v": (i % 7 != 0).then_some([i as f32, 0.0])});
    let rows: Vec<Json> = (0..5000).map(at).collect();
    write(&mut t, "t", &rows);
    let sql = "SELECT id FROM t ORDER BY v <-> $1 LIMIT 100000";
    let n = normalize(sql).expect("valid");
    let plan = std::rc::Rc::new(prepare(&t, &n).expect("plans"));
    let params = oc_engine::query::bind_params(
        &plan,
        vec![Value::Vector(vec![0.0, 0.0])],
        n.literals.clone(),
    )
    .expect("binds");
    let memory = t.query_memory().clone();
    let mut run = Execution::new(plan, params, AskLimits::default(), &memory).expect("binds");
    let mut steps = 0;
    let mut next_new = 10_000;
    while !run.step(&t).expect("step") {
        steps += 1;
        assert!(steps < 1000, "the scan ends");
        // Between slices: delete a row not yet read, add one after every key, and
        // move row 3000 (read in a later slice) nearest of all.
        let gone = WriteOp::Delete(json!({"id": 4999 - steps}).as_object().expect("o").clone());
        let fresh = WriteOp::Upsert(at(next_new).as_object().expect("o").clone());
        let moved = WriteOp::Upsert(
            json!({"id": 3000, "v": [0.5, 0.0]})
                .as_object()
                .expect("o")
                .clone(),
        );
        next_new += 1;
        t.write("t", &[gone, fresh, moved]).expect("written");
    }
    assert!(steps >= 4, "the scan took several slices");
    let (ids, sorted) = distinct_ids(run);
    // Every row with a vector present throughout was found, and none without one.
    for id in 0..(4999 - steps as i64) {
        assert_eq!(
            sorted.binary_search(&id).is_ok(),
            id % 7 != 0,
            "row {id} (a vector: {})",
            id % 7 != 0
        );
    }
    // Nearest first, by the distances the rows had when the scan read them: the
    // moved row's new vector, not the one it had when the scan began.
    assert_eq!(ids.first(), Some(&3000), "the moved row is nearest");
    assert!(
        ids[1..].windows(2).all(|w| w[0] < w[1]),
        "ordered by distance"
    );
}
