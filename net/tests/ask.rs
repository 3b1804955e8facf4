//! `/ask` through the real binary: queries of every plan kind, EXPLAIN through the
//! plan cache, the metrics the alerts watch (checked by promtool), a restart, and
//! bad input of every kind answered with its documented error.

mod common;

use common::{promtool_check, scrape_value, Server};
use serde_json::{json, Value};

fn assert_error(reply: &common::Reply, status: u16, code: &str, says: &str) {
    assert_eq!(reply.status, status, "{reply:?}");
    assert_eq!(reply.body["error"]["code"], code, "{reply:?}");
    let message = reply.body["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains(says), "{message:?} should say {says:?}");
}

fn setup(server: &Server) {
    assert_eq!(
        server
            .post("/v1/tenants", &json!({"tenant": "shop"}))
            .status,
        201
    );
    let table = json!({
        "name": "products",
        "columns": [
            {"name": "id", "type": "int"},
            {"name": "category", "type": "text"},
            {"name": "price", "type": "float"},
            {"name": "stock", "type": "int"},
            {"name": "embedding", "type": "vector(4)"}
        ],
        "primary_key": ["id"],
        "indexes": [{"name": "by_category_price", "columns": ["category", "price"]}]
    });
    assert_eq!(server.post("/v1/tenants/shop/tables", &table).status, 201);
    let ops: Vec<Value> = (0..200)
        .map(|i| {
            let category = ["books", "games", "tools", "music"][i % 4];
            json!({"upsert": {
                "id": i,
                "category": category,
                "price": (i % 50) as f64 + 0.5,
                "stock": if i % 10 == 0 { Value::Null } else { json!(i % 7) },
                "embedding": [i as f64, (i % 3) as f64, 1.0, -(i as f64) / 10.0]
            }})
        })
        .collect();
    let written = server.post(
        "/v1/tenants/shop/tables/products/rows",
        &json!({"ops": ops}),
    );
    assert_eq!(written.status, 200, "{written:?}");
}

fn ask(server: &Server, sql: &str, params: Value) -> common::Reply {
    server.post(
        "/v1/tenants/shop/ask",
        &json!({"sql": sql, "params": params}),
    )
}

fn explain(server: &Server, sql: &str, params: Value) -> Value {
    let reply = server.post(
        "/v1/tenants/shop/ask?explain=true",
        &json!({"sql": sql, "params": params}),
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.body
}

#[test]
fn queries_plans_cache_and_metrics_through_the_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = Server::start(&data, &["--shards", "2"]);
    setup(&server);

    let point = ask(
        &server,
        "SELECT id, category, price FROM products WHERE id = $1",
        json!([42]),
    );
    assert_eq!(point.status, 200, "{point:?}");
    assert_eq!(point.body["columns"], json!(["id", "category", "price"]));
    assert_eq!(point.body["rows"], json!([[42, "tools", 42.5]]));
    assert_eq!(point.body["rows_scanned"], 1);

    let range = ask(
        &server,
        "SELECT id FROM products WHERE category = 'games' AND price BETWEEN 10 AND 12 ORDER BY id",
        json!([]),
    );
    assert_eq!(range.body["rows"], json!([[61], [161]]), "{range:?}");

    let grouped = ask(
        &server,
        "SELECT category, COUNT(*) AS n, SUM(stock), MAX(price) FROM products WHERE stock IS NOT NULL GROUP BY category ORDER BY category",
        json!([]),
    );
    assert_eq!(grouped.status, 200, "{grouped:?}");
    assert_eq!(grouped.body["row_count"], 4);
    assert_eq!(grouped.body["rows"][0][0], "books");
    assert_eq!(
        grouped.body["rows"][0][1], 40,
        "50 books minus the 10 with NULL stock"
    );

    let knn = ask(
        &server,
        "SELECT id, embedding <-> $1 AS distance FROM products WHERE category = $2 ORDER BY embedding <-> $1 LIMIT 3",
        json!([[100.0, 1.0, 1.0, -10.0], "books"]),
    );
    assert_eq!(knn.status, 200, "{knn:?}");
    let ids: Vec<i64> = knn.body["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r[0].as_i64().expect("id"))
        .collect();
    assert_eq!(ids, vec![100, 96, 104]);
    assert_eq!(knn.body["rows"][0][1], 0.0);

    // EXPLAIN goes through the cache: the first run of a shape misses, the next hits,
    // and a different literal is the same shape.
    let sql = "SELECT id FROM products WHERE category = 'music' AND price > 40 LIMIT 5";
    let first = explain(&server, sql, json!([]));
    assert_eq!(first["plan"]["cached"], false, "{first}");
    let again = explain(
        &server,
        "select id from products where category = 'books' and price > 45.5 limit 5",
        json!([]),
    );
    assert_eq!(again["plan"]["cached"], true, "{again}");
    let mut node = &again["plan"]["root"];
    let mut stages = vec![];
    loop {
        stages.push(node["stage"].as_str().expect("stage").to_string());
        assert!(
            node["elapsed_us"].is_u64() && node["rows_in"].is_u64() && node["rows_out"].is_u64(),
            "{node}"
        );
        match node.get("input") {
            Some(n) => node = n,
            None => break,
        }
    }
    assert_eq!(stages, vec!["project", "limit", "filter", "scan"]);
    assert!(
        node["detail"]
            .as_str()
            .expect("detail")
            .starts_with("index by_category_price range scan"),
        "{node}"
    );
    let plan_only = ask(
        &server,
        "EXPLAIN SELECT id FROM products WHERE id = 1",
        json!([]),
    );
    assert_eq!(plan_only.body["row_count"], 0);
    assert!(
        plan_only.body["plan"]["root"]["detail"].is_string(),
        "{plan_only:?}"
    );

    for _ in 0..50 {
        assert_eq!(
            ask(&server, "SELECT id FROM products WHERE id = $1", json!([7])).status,
            200
        );
    }
    let (status, scrape) = server.ops_get("/metrics");
    assert_eq!(status, 200);
    promtool_check(&scrape);
    let hits: f64 = (0..2)
        .filter_map(|s| {
            scrape_value(
                &scrape,
                &format!("oc_plan_cache_hits_total{{shard=\"{s}\"}}"),
            )
        })
        .sum();
    let misses: f64 = (0..2)
        .filter_map(|s| {
            scrape_value(
                &scrape,
                &format!("oc_plan_cache_misses_total{{shard=\"{s}\"}}"),
            )
        })
        .sum();
    assert!(
        hits >= 50.0 && misses >= 6.0,
        "hits {hits}, misses {misses}"
    );
    let ratio = scrape_value(&scrape, "oc_plan_cache_hit_ratio").expect("ratio");
    assert!((ratio - hits / (hits + misses)).abs() < 1e-9, "{ratio}");
    let asks = scrape_value(&scrape, "oc_ask_latency_ms_count").expect("histogram");
    assert!(asks >= 57.0, "{asks}");
    assert!(
        scrape.contains("oc_ask_latency_ms_bucket{le=\"2\"}"),
        "buckets in ms"
    );

    // A literal and the caller's own `$1` in the same place normalize to the same text
    // but bind differently: each gets its plan, whichever came first.
    let literal = ask(&server, "SELECT id FROM products WHERE id > 197", json!([]));
    let placeholder = ask(
        &server,
        "SELECT id FROM products WHERE id > $1",
        json!([197]),
    );
    for reply in [&literal, &placeholder] {
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.body["rows"], json!([[198], [199]]), "{reply:?}");
    }
    let nearest = |sql: &str, params: Value| {
        let reply = ask(&server, sql, params);
        assert_eq!(reply.status, 200, "{reply:?}");
        reply.body["rows"].clone()
    };
    let by_param = nearest(
        "SELECT id FROM products ORDER BY embedding <-> $1 LIMIT 2",
        json!([[7.0, 1.0, 1.0, -0.7]]),
    );
    let by_text = nearest(
        "SELECT id FROM products ORDER BY embedding <-> '[7, 1, 1, -0.7]' LIMIT 2",
        json!([]),
    );
    assert_eq!(by_param, by_text);
    assert_eq!(by_text[0], json!([7]));

    // After a restart the same queries answer the same from recovered state.
    server.terminate();
    let server = Server::start(&data, &["--shards", "2"]);
    let after = ask(
        &server,
        "SELECT id, category, price FROM products WHERE id = $1",
        json!([42]),
    );
    assert_eq!(after.body["rows"], point.body["rows"]);
    let first = explain(
        &server,
        "SELECT id FROM products WHERE id = $1",
        json!([42]),
    );
    assert_eq!(
        first["plan"]["cached"], false,
        "a new process starts with an empty cache"
    );
}

#[test]
fn bad_requests_get_clear_errors_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        &dir.path().join("data"),
        &[
            "--shards",
            "2",
            "--ask-max-scan-rows",
            "100",
            "--ask-max-rows",
            "50",
            "--max-body-bytes",
            "65536",
        ],
    );
    setup(&server);
    let path = "/v1/tenants/shop/ask";
    assert_error(
        &server.post_raw(path, "{\"sql\": "),
        400,
        "invalid_json",
        "invalid request body",
    );
    assert_error(
        &server.post(path, &json!({"sql": "SELECT 1", "parms": []})),
        400,
        "invalid_json",
        "unknown field",
    );
    assert_error(
        &server.post(path, &json!({"params": []})),
        400,
        "invalid_json",
        "missing field `sql`",
    );
    assert_error(
        &ask(&server, "SELEKT id FROM products", json!([])),
        400,
        "sql_syntax",
        "Line: 1, Column",
    );
    assert_error(
        &ask(&server, "SELECT nope FROM products", json!([])),
        400,
        "sql_invalid",
        "column \"nope\" (at line 1, column 8) does not exist",
    );
    assert_error(
        &ask(&server, "SELECT id FROM nope", json!([])),
        404,
        "table_not_found",
        "this tenant has: products",
    );
    assert_error(
        &server.post("/v1/tenants/ghost/ask", &json!({"sql": "SELECT id FROM t"})),
        404,
        "tenant_not_found",
        "ghost",
    );
    assert_error(
        &ask(&server, "SELECT id FROM products WHERE id = $1", json!([])),
        400,
        "invalid_params",
        "uses $1 but params holds 0",
    );
    assert_error(
        &ask(
            &server,
            "SELECT id FROM products WHERE id = $1",
            json!(["x"]),
        ),
        400,
        "query_evaluation",
        "cannot compare int with text",
    );
    assert_error(
        &ask(&server, "UPDATE products SET stock = 1", json!([])),
        400,
        "sql_unsupported",
        "UPDATE is not supported",
    );
    assert_error(
        &ask(
            &server,
            "SELECT id FROM products ORDER BY embedding <-> $1 LIMIT 1",
            json!([[1, 2]]),
        ),
        400,
        "query_evaluation",
        "4 and 2 dimensions",
    );
    assert_error(
        &ask(&server, "SELECT COUNT(*) FROM products", json!([])),
        413,
        "scan_limit_exceeded",
        "scan limit",
    );
    assert_error(
        &ask(&server, "SELECT id FROM products WHERE id < 60", json!([])),
        413,
        "result_too_large",
        "add a LIMIT",
    );
    let bad_explain = server.post(
        "/v1/tenants/shop/ask?explain=yes",
        &json!({"sql": "SELECT id FROM products"}),
    );
    assert_error(
        &bad_explain,
        400,
        "invalid_query_string",
        "explain=true|false",
    );
    let get = server.get(path);
    assert_error(&get, 405, "method_not_allowed", "POST");
    let huge = format!("{{\"sql\": \"{}\"}}", "x".repeat(70_000));
    assert_error(
        &server.post_raw(path, &huge),
        413,
        "body_too_large",
        "limit",
    );
    // Nothing above changed the data, and the server still answers.
    let count = ask(
        &server,
        "SELECT id FROM products WHERE id IN (1, 2, 3)",
        json!([]),
    );
    assert_eq!(count.body["row_count"], 3, "{count:?}");
}

#[test]
fn a_query_past_its_deadline_is_a_413() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        &dir.path().join("data"),
        &["--shards", "1", "--ask-timeout-ms", "0"],
    );
    setup(&server);
    let reply = ask(&server, "SELECT COUNT(*) FROM products", json!([]));
    assert_error(&reply, 413, "query_timeout", "deadline of 0 ms");
    assert!(
        reply.retry_after.is_none(),
        "not retried as it is: {reply:?}"
    );
}
