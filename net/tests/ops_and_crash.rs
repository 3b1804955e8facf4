//! Operations and crash safety through the real binary: /health, /ready, a /metrics
//! scrape that `promtool check metrics` accepts, and kill -9 at random moments under
//! concurrent writers with every acknowledged batch found whole after restart.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{promtool_check, Server};
use serde_json::{json, Value};

#[test]
fn health_ready_and_a_scrape_promtool_accepts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &["--shards", "2"]);
    let (status, health) = server.ops_get("/health");
    assert_eq!(status, 200);
    let health: Value = serde_json::from_str(&health).expect("json");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["version"], env!("CARGO_PKG_VERSION"));
    assert!(health["git_commit"].as_str().is_some_and(|c| !c.is_empty()));
    assert!(health["io_uring"]["available"].is_boolean());
    let (status, ready) = server.ops_get("/ready");
    assert_eq!(status, 200, "{ready}");
    let ready: Value = serde_json::from_str(&ready).expect("json");
    assert_eq!(ready["shards"].as_array().map(Vec::len), Some(2));
    let (status, body) = server.ops_get("/nope");
    assert_eq!(status, 404);
    let error: serde_json::Value = serde_json::from_str(&body).expect("a JSON error");
    let id = error["error"]["request_id"].as_str().expect("a request id");
    assert!(
        id.starts_with("ops-"),
        "an ops error names its request: {body}"
    );

    server.create_tenant_with_items("acme");
    for id in 0..20 {
        let row = json!({"ops": [{"upsert": {"id": id, "name": "x"}}]});
        assert_eq!(
            server
                .post("/v1/tenants/acme/tables/items/rows", &row)
                .status,
            200
        );
    }
    assert_eq!(server.get("/v1/tenants/nobody/usage").status, 404);
    let (status, scrape) = server.ops_get("/metrics");
    assert_eq!(status, 200);
    for expected in [
        "oc_wal_fsync_lag_ms_count 22", // tenant + table + 20 rows
        "oc_checkpoint_age_s{shard=\"0\"}",
        "oc_wal_spare_waits_total{shard=\"1\"}",
        "oc_http_requests_total{route=\"rows_write\",status=\"200\"} 20",
        "oc_http_requests_total{route=\"usage\",status=\"404\"} 1",
        "oc_rows{shard=",
        "oc_ready 1",
        "oc_http_requests_total{route=\"health\",status=\"200\"} 1",
        "oc_http_requests_total{route=\"ops_unknown\",status=\"404\"} 1",
    ] {
        assert!(
            scrape.contains(expected),
            "missing {expected:?} in\n{scrape}"
        );
    }
    assert!(!scrape.contains("acme"), "no tenant label anywhere");
    promtool_check(&scrape);
}

#[test]
fn sampled_row_writes_are_timed_once_per_stage() {
    let dir = tempfile::tempdir().expect("tempdir");
    // One shard: the HTTP side and the owner count the same writes in the same order,
    // so they sample the same ones.
    let server = Server::start(&dir.path().join("data"), &["--shards", "1"]);
    server.create_tenant_with_items("acme");
    let writes: usize = 64;
    for id in 0..writes {
        let row = json!({"ops": [{"upsert": {"id": id, "name": "x"}}]});
        let reply = server.post("/v1/tenants/acme/tables/items/rows", &row);
        assert_eq!(reply.status, 200, "{reply:?}");
    }
    // The 65th write is sampled too, and refused by validation on its owner: timed up
    // to there (parse and forward), never past.
    let refused = server.post(
        "/v1/tenants/acme/tables/items/rows",
        &json!({"ops": [{"upsert": {"id": "not a number"}}]}),
    );
    assert_eq!(refused.status, 400, "{refused:?}");
    let (_, scrape) = server.ops_get("/metrics");
    promtool_check(&scrape);
    let value = |series: &str| {
        common::scrape_value(&scrape, series).unwrap_or_else(|| panic!("no {series}\n{scrape}"))
    };
    let mut timed = 0.0;
    for stage in [
        "parse",
        "forward",
        "admit",
        "log_submit",
        "durable",
        "apply",
        "wake",
        "ack",
        "respond",
    ] {
        let count = value(&format!(
            "oc_write_stage_seconds_count{{stage=\"{stage}\"}}"
        ));
        // Writes 0, 8, …, 56, and the refused one where it got.
        let reached = usize::from(matches!(stage, "parse" | "forward"));
        assert_eq!(count, (writes / 8 + reached) as f64, "stage {stage}");
        let inf = value(&format!(
            "oc_write_stage_seconds_bucket{{stage=\"{stage}\",le=\"+Inf\"}}"
        ));
        assert_eq!(inf, count, "stage {stage}");
        timed += value(&format!("oc_write_stage_seconds_sum{{stage=\"{stage}\"}}"));
    }
    // The stages lie inside their requests, and a write's log wait is one of them.
    let requests = value("oc_http_request_duration_seconds_sum{route=\"rows_write\"}");
    assert!(
        timed > 0.0 && timed <= requests,
        "stages {timed} s, requests {requests} s"
    );
    assert!(value("oc_write_stage_seconds_sum{stage=\"durable\"}") > 0.0);
}

/// Batches of three rows sharing a batch number; each batch is all or nothing.
const ROWS_PER_BATCH: u64 = 3;

#[test]
fn kill_9_at_random_moments_loses_no_acknowledged_write_and_no_batch_is_half_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let args = ["--shards", "2"];
    let server = Server::start(&data, &args);
    let tenants = ["alpha", "beta", "gamma", "delta"];
    for t in tenants {
        server.create_tenant_with_items(t);
    }
    // tenant → batches acknowledged with 2xx.
    let acked: Arc<Mutex<BTreeMap<String, Vec<u64>>>> = Arc::default();
    let next_batch = Arc::new(AtomicU64::new(0));
    let mut server = Some(server);
    let mut rng = fastrand::Rng::with_seed(0x6f63);
    for round in 0..4 {
        let api = server.as_ref().expect("running").api.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..8)
            .map(|w| {
                let (api, stop, acked, next_batch) =
                    (api.clone(), stop.clone(), acked.clone(), next_batch.clone());
                let tenant = tenants[w % tenants.len()].to_string();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        let batch = next_batch.fetch_add(1, Ordering::SeqCst);
                        let ops: Vec<Value> = (0..ROWS_PER_BATCH)
                            .map(|i| json!({"upsert": {"id": batch * ROWS_PER_BATCH + i, "name": format!("b{batch}"), "batch": batch}}))
                            .collect();
                        let body = json!({"ops": ops}).to_string();
                        let url = format!("{api}/v1/tenants/{tenant}/tables/items/rows");
                        match common::try_request("POST", &url, Some(&body)) {
                            Ok(reply) if reply.status == 200 => acked
                                .lock()
                                .expect("lock")
                                .entry(tenant.clone())
                                .or_default()
                                .push(batch),
                            Ok(reply) => panic!("unexpected answer {reply:?}"),
                            Err(_) => break, // the server died under us
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.u64(150..900)));
        server.take().expect("running").kill9();
        stop.store(true, Ordering::SeqCst);
        for w in writers {
            w.join().expect("writer");
        }
        server = Some(Server::start(&data, &args));
        let total: usize = acked.lock().expect("lock").values().map(Vec::len).sum();
        eprintln!("round {round}: {total} batches acknowledged so far");
    }
    let server = server.expect("running");
    let acked = acked.lock().expect("lock").clone();
    assert!(
        acked.values().map(Vec::len).sum::<usize>() > 50,
        "the test wrote too little to mean anything"
    );
    for t in tenants {
        let acked: std::collections::BTreeSet<u64> = acked
            .get(t)
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let usage = server.get(&format!("/v1/tenants/{t}/usage"));
        let rows = usage.body["tables"]["items"]["rows"]
            .as_u64()
            .expect("rows");
        assert_eq!(
            rows % ROWS_PER_BATCH,
            0,
            "{t}: a batch was half applied ({rows} rows)"
        );
        assert!(
            rows >= acked.len() as u64 * ROWS_PER_BATCH,
            "{t}: {rows} rows for {} acked batches",
            acked.len()
        );
        for &batch in &acked {
            for i in 0..ROWS_PER_BATCH {
                let id = batch * ROWS_PER_BATCH + i;
                let got = server.get(&format!("/v1/tenants/{t}/tables/items/rows/{id}"));
                assert_eq!(
                    got.status, 200,
                    "{t}: acknowledged row {id} of batch {batch} is gone: {got:?}"
                );
                assert_eq!(got.body["row"]["batch"], batch);
            }
        }
    }
}
