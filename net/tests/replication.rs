//! Replication between real `oc-server` processes on loopback: a writer with a
//! replication listener, followers that replicate it, a reference model of every
//! acknowledged write, and the refusals (writes on a follower, a wrong token, settings
//! that cannot work).

mod common;
#[path = "../../ship/tests/common_s3.rs"]
mod common_s3;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{promtool_check, scrape_value, Server};
use serde_json::{json, Value};

const TENANTS: [&str; 4] = ["alpha", "bravo", "charlie", "delta"];

fn writer(dir: &std::path::Path) -> Server {
    Server::start(
        dir,
        &["--shards", "2", "--replication-listen", "127.0.0.1:0"],
    )
}

fn follower(dir: &std::path::Path, leader: &str) -> Server {
    Server::start(dir, &["--mode", "follower", "--leader-addr", leader])
}

/// Acknowledged rows: (tenant, id) → name.
type Model = Arc<Mutex<BTreeMap<(String, i64), String>>>;

/// Writes `count` rows per tenant from one thread per tenant, recording each one the
/// writer acknowledged (200) in `model`.
fn write_rows(server: &Server, model: &Model, first_id: i64, count: i64) {
    std::thread::scope(|scope| {
        for tenant in TENANTS {
            let api = server.api.clone();
            let model = model.clone();
            scope.spawn(move || {
                for id in first_id..first_id + count {
                    let name = format!("{tenant}-{id}-{}", id * 7 % 13);
                    let reply = common::request(
                        "POST",
                        &format!("{api}/v1/tenants/{tenant}/tables/items/rows"),
                        Some(
                            &json!({"ops": [{"upsert": {"id": id, "name": name, "batch": id % 5}}]})
                                .to_string(),
                        ),
                    );
                    assert_eq!(reply.status, 200, "{reply:?}");
                    model
                        .lock()
                        .expect("model")
                        .insert((tenant.to_string(), id), name);
                }
            });
        }
    });
}

/// Every row of `tenant` the server has, by id.
fn rows_of(server: &Server, tenant: &str) -> BTreeMap<i64, String> {
    let reply = server.post(
        &format!("/v1/tenants/{tenant}/ask"),
        &json!({"sql": "SELECT id, name FROM items ORDER BY id LIMIT 10000"}),
    );
    if reply.status != 200 {
        return BTreeMap::new();
    }
    reply.body["rows"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .filter_map(|r| Some((r[0].as_i64()?, r[1].as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn model_of(model: &Model, tenant: &str) -> BTreeMap<i64, String> {
    model
        .lock()
        .expect("model")
        .iter()
        .filter(|((t, _), _)| t == tenant)
        .map(|((_, id), name)| (*id, name.clone()))
        .collect()
}

/// Waits until the follower's rows equal the model for every tenant.
fn wait_until_matches(follower: &Server, model: &Model) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mismatched: Vec<&str> = TENANTS
            .into_iter()
            .filter(|t| rows_of(follower, t) != model_of(model, t))
            .collect();
        if mismatched.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the follower still differs from the acknowledged writes for {mismatched:?} after \
             30 s:\n{}",
            follower.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (up to 10 s) until the follower holds every row of the model (it may hold
/// more: writes it has that were never acknowledged).
fn wait_until_holds(follower: &Server, model: &Model) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !TENANTS.into_iter().all(|t| {
        let held = rows_of(follower, t);
        model_of(model, t)
            .iter()
            .all(|(id, name)| held.get(id) == Some(name))
    }) {
        if Instant::now() > deadline {
            return; // the caller's assertions name what is missing
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts that `server` holds every acknowledged row of the model, naming the first
/// one `event` lost.
fn assert_holds_every_acknowledged(server: &Server, model: &Model, event: &str) {
    for tenant in TENANTS {
        let held = rows_of(server, tenant);
        for (id, name) in model_of(model, tenant) {
            assert_eq!(
                held.get(&id),
                Some(&name),
                "{tenant}/{id} lost in the {event}"
            );
        }
    }
}

/// The sum over shards of a per-shard series, e.g. `oc_replication_frames_total` with
/// `direction="received"`.
fn sum_over_shards(scrape: &str, name: &str, label: &str, shards: usize) -> f64 {
    (0..shards)
        .map(|shard| {
            scrape_value(scrape, &format!("{name}{{{label},shard=\"{shard}\"}}")).unwrap_or(0.0)
        })
        .sum()
}

fn applied_total(server: &Server) -> u64 {
    let (status, body) = server.ops_get("/ready");
    assert_eq!(status, 200, "{body}");
    let ready: Value = serde_json::from_str(&body).expect("json");
    ready["shards"]
        .as_array()
        .expect("shards")
        .iter()
        .map(|s| s["applied_lsn"].as_u64().expect("applied"))
        .sum()
}

fn setup_tenants(server: &Server) {
    for tenant in TENANTS {
        server.create_tenant_with_items(tenant);
    }
}

#[test]
fn a_follower_holds_every_acknowledged_write_and_serves_reads_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let writer = writer(&dir.path().join("writer"));
    let leader = writer.replication.clone().expect("replication address");
    setup_tenants(&writer);
    let model: Model = Arc::default();
    // Half the writes before the follower exists: it catches up from the writer's log.
    write_rows(&writer, &model, 0, 60);
    let follower = follower(&dir.path().join("follower"), &leader);
    // ...and half while it follows.
    write_rows(&writer, &model, 60, 60);
    wait_until_matches(&follower, &model);

    // Reads only: every write is refused with 421, naming the writer.
    let refused = follower.post(
        "/v1/tenants/alpha/tables/items/rows",
        &json!({"ops": [{"upsert": {"id": 1, "name": "x", "batch": 1}}]}),
    );
    assert_eq!(refused.status, 421, "{refused:?}");
    assert_eq!(refused.body["error"]["code"], "not_leader");
    assert_eq!(refused.body["error"]["taken"], false, "{refused:?}");
    assert!(
        refused.body["error"]["message"]
            .as_str()
            .expect("message")
            .contains(&leader),
        "{refused:?}"
    );
    for (method, path) in [
        ("POST", "/v1/tenants"),
        ("DELETE", "/v1/tenants/alpha"),
        ("POST", "/v1/tenants/alpha/tables"),
        ("DELETE", "/v1/tenants/alpha/tables/items"),
        ("POST", "/v1/tenants/alpha/keys"),
    ] {
        let reply = common::request(method, &format!("{}{path}", follower.api), Some("{}"));
        assert_eq!(reply.status, 421, "{method} {path}: {reply:?}");
    }
    // A row read and the tenant's usage answer from the applied state.
    let row = follower.get("/v1/tenants/bravo/tables/items/rows/7");
    assert_eq!(row.status, 200, "{row:?}");
    assert_eq!(
        row.body["row"]["name"],
        json!(model_of(&model, "bravo")[&7])
    );
    assert_eq!(applied_total(&follower), applied_total(&writer));

    // /ready says which end it is; the metrics say it is connected, caught up, and
    // how much it received; the writer's say what it sent.
    let (status, body) = follower.ops_get("/ready");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""role":"follower""#), "{body}");
    let (_, scrape) = follower.ops_get("/metrics");
    promtool_check(&scrape);
    for shard in 0..2 {
        let connected = format!("oc_replication_connected{{role=\"follower\",shard=\"{shard}\"}}");
        assert_eq!(scrape_value(&scrape, &connected), Some(1.0), "{scrape}");
    }
    let received = sum_over_shards(
        &scrape,
        "oc_replication_frames_total",
        "direction=\"received\"",
        2,
    );
    assert_eq!(received as u64, applied_total(&writer), "{scrape}");
    let (_, writer_scrape) = writer.ops_get("/metrics");
    promtool_check(&writer_scrape);
    let sent = sum_over_shards(
        &writer_scrape,
        "oc_replication_frames_total",
        "direction=\"sent\"",
        2,
    );
    assert_eq!(sent as u64, applied_total(&writer), "{writer_scrape}");
}

/// A writer in `dir/writer` with the tenants, and its follower in `dir/follower`
/// holding the `rows` rows per tenant written to it (recorded in the model).
fn writer_and_caught_up_follower(dir: &std::path::Path, rows: i64) -> (Server, Server, Model) {
    let writer = writer(&dir.join("writer"));
    setup_tenants(&writer);
    let model: Model = Arc::default();
    let leader = writer.replication.clone().expect("replication address");
    let follower = follower(&dir.join("follower"), &leader);
    write_rows(&writer, &model, 0, rows);
    wait_until_matches(&follower, &model);
    (writer, follower, model)
}

#[test]
fn a_follower_killed_and_restarted_resumes_from_its_own_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (writer, first, model) = writer_and_caught_up_follower(dir.path(), 50);
    let leader = writer.replication.clone().expect("replication address");
    let follower_dir = dir.path().join("follower");
    let held_at_kill = applied_total(&first);
    first.kill9();

    // The writer goes on without it.
    write_rows(&writer, &model, 50, 50);
    let second = follower(&follower_dir, &leader);
    wait_until_matches(&second, &model);
    // It asked only for what its own log did not hold.
    let (_, scrape) = second.ops_get("/metrics");
    let received = sum_over_shards(
        &scrape,
        "oc_replication_frames_total",
        "direction=\"received\"",
        2,
    ) as u64;
    let writer_total = applied_total(&writer);
    assert_eq!(received, writer_total - held_at_kill, "{scrape}");
}

/// A follower restarted while its writer is down has not had its log checked against
/// the writer's history (an old writer restarted as a follower still holds frames the
/// new writer never acknowledged under those LSNs): a read with `min_lsn` is refused
/// after its bounded wait, while a plain read is served.
#[test]
fn a_follower_that_has_not_reached_its_writer_vouches_for_no_lsn() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (writer, first, _) = writer_and_caught_up_follower(dir.path(), 20);
    let leader = writer.replication.clone().expect("replication address");
    let follower_dir = dir.path().join("follower");
    first.kill9();
    writer.kill9();

    let alone = Server::start(
        &follower_dir,
        &[
            "--mode",
            "follower",
            "--leader-addr",
            &leader,
            "--min-lsn-wait-ms",
            "300",
        ],
    );
    let plain = alone.get("/v1/tenants/alpha/tables/items/rows/1");
    assert_eq!(plain.status, 200, "a plain read is served: {plain:?}");
    let vouched = alone.get("/v1/tenants/alpha/tables/items/rows/1?min_lsn=1");
    assert_eq!(vouched.status, 503, "{vouched:?}");
    assert_eq!(
        vouched.body["error"]["code"], "lsn_not_applied",
        "{vouched:?}"
    );
    assert!(
        vouched.body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("has not reached its writer")),
        "{vouched:?}"
    );
    // It is not ready, and its `oc_ready` (what the alert reads) says the same.
    let (status, body) = alone.ops_get("/ready");
    assert_eq!(status, 503, "{body}");
    let (_, scrape) = alone.ops_get("/metrics");
    assert_eq!(scrape_value(&scrape, "oc_ready"), Some(0.0), "{scrape}");
}

/// With two followers, the writer's lag is the one furthest behind: a follower that
/// stopped answering shows while the other keeps up (it read the last acknowledgement's,
/// which the live follower kept at 0).
#[test]
fn the_writers_lag_is_its_furthest_behind_followers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let writer = writer(&dir.path().join("writer"));
    let leader = writer.replication.clone().expect("replication address");
    setup_tenants(&writer);
    let model: Model = Arc::default();
    write_rows(&writer, &model, 0, 5);
    let live = follower(&dir.path().join("live"), &leader);
    let stalled = follower(&dir.path().join("stalled"), &leader);
    wait_until_matches(&live, &model);
    wait_until_matches(&stalled, &model);
    let writer_lag = || {
        let (_, scrape) = writer.ops_get("/metrics");
        sum_over_shards(
            &scrape,
            "oc_replication_applied_lag_lsn",
            "role=\"writer\"",
            2,
        )
    };
    let paused = common::Paused::stop(stalled.pid());
    // Fewer writes than take the writer's silence limit (5 s) to give up on it.
    write_rows(&writer, &model, 100, 3);
    wait_until_matches(&live, &model);
    let lag = writer_lag();
    assert!(
        paused.stopped_at().elapsed() < Duration::from_secs(5),
        "too slow to tell: the writer may have dropped the stalled follower"
    );
    assert!(
        lag >= 12.0,
        "4 tenants × 3 rows unapplied by one follower: {lag}"
    );
    drop(paused);
    wait_until_matches(&stalled, &model);
    let deadline = Instant::now() + Duration::from_secs(10);
    while writer_lag() > 0.0 {
        assert!(Instant::now() < deadline, "the lag stays {}", writer_lag());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_follower_with_the_wrong_token_is_refused_at_start_saying_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "writer-admin-token-0123456789").expect("token");
    let wrong_file = dir.path().join("wrong-token");
    std::fs::write(&wrong_file, "not-the-writers-token-98765").expect("token");
    let writer = Server::start(
        &dir.path().join("writer"),
        &[
            "--replication-listen",
            "127.0.0.1:0",
            "--admin-token-file",
            token_file.to_str().expect("utf-8"),
        ],
    );
    let leader = writer.replication.clone().expect("replication address");
    // Even with a directory of its own (which it could serve from while the writer
    // does not answer), a follower the writer refuses does not start: waiting would
    // not change the answer.
    let follower_dir = dir.path().join("follower");
    let good = Server::start(
        &follower_dir,
        &[
            "--mode",
            "follower",
            "--leader-addr",
            &leader,
            "--replication-token-file",
            token_file.to_str().expect("utf-8"),
            "--admin-token-file",
            token_file.to_str().expect("utf-8"),
        ],
    );
    // Its API: only a caller with credentials learns that it is a follower (and where
    // its writer is); a route that takes no such method is a 405 as on any server.
    let tenants = format!("{}/v1/tenants", good.api);
    let anonymous = common::request("POST", &tenants, Some("{}"));
    assert_eq!(anonymous.status, 401, "{anonymous:?}");
    assert!(
        !anonymous.body.to_string().contains(&leader),
        "{anonymous:?}"
    );
    let token = "writer-admin-token-0123456789";
    let admin = common::request_as("POST", &tenants, Some("{}"), token);
    assert_eq!(admin.status, 421, "{admin:?}");
    let usage = common::request_as("POST", &format!("{tenants}/alpha/usage"), Some("{}"), token);
    assert_eq!(usage.status, 405, "{usage:?}");
    drop(good);
    let refused = Server::try_start(
        &follower_dir,
        &[
            "--mode",
            "follower",
            "--leader-addr",
            &leader,
            "--replication-token-file",
            wrong_file.to_str().expect("utf-8"),
        ],
    )
    .err()
    .expect("a follower with the wrong token must not start");
    assert!(
        refused.contains("the replication token is missing or wrong"),
        "{refused}"
    );
}

#[test]
fn settings_that_cannot_replicate_are_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8");
    for (args, says) in [
        (vec!["--mode", "follower"], "--leader-addr"),
        (
            vec!["--leader-addr", "127.0.0.1:9"],
            "--leader-addr is for --mode follower",
        ),
        (
            vec!["--replication-listen", "127.0.0.1:0", "--archive", "none"],
            "replication needs an archive",
        ),
        (
            vec!["--sync-replication"],
            "--sync-replication needs --replication-listen",
        ),
        (
            vec![
                "--replication-listen",
                "127.0.0.1:0",
                "--lease-ttl-ms",
                "1000",
            ],
            "--lease-ttl-ms 1000 must be at least 500 and 3 times",
        ),
        (
            vec![
                "--mode",
                "follower",
                "--leader-addr",
                "127.0.0.1:17071",
                "--replication-listen",
                "0.0.0.0:17071",
                "--insecure-no-auth",
            ],
            "is this server's own --replication-listen",
        ),
        (
            vec![
                "--mode",
                "follower",
                "--leader-addr",
                "127.0.0.1:17072",
                "--ops-listen",
                "127.0.0.1:17072",
            ],
            "is this server's own --ops-listen",
        ),
    ] {
        let mut full = vec!["--data-dir", data, "--listen", "127.0.0.1:0"];
        full.extend(&args);
        let run = common::run_expecting_exit(&full, &[], Duration::from_secs(30));
        assert!(
            run.status.is_some_and(|s| !s.success()),
            "{args:?} should be refused: {run:?}"
        );
        assert!(run.stderr.contains(says), "{args:?}: {}", run.stderr);
    }
}

/// Writes from `threads` threads (two per tenant, disjoint ids) until a request fails,
/// recording every write the writer acknowledged.
fn write_until_failure(
    api: &str,
    model: &Model,
    threads: usize,
    stop: &std::sync::atomic::AtomicBool,
) {
    std::thread::scope(|scope| {
        for t in 0..threads {
            let tenant = TENANTS[t % TENANTS.len()];
            let model = model.clone();
            scope.spawn(move || {
                for n in 0.. {
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        return;
                    }
                    let id = (t as i64) * 1_000_000 + n;
                    let name = format!("{tenant}-{id}");
                    let url = format!("{api}/v1/tenants/{tenant}/tables/items/rows");
                    let body = json!({"ops": [{"upsert": {"id": id, "name": name, "batch": 1}}]});
                    match common::try_request("POST", &url, Some(&body.to_string())) {
                        Ok(reply) if reply.status == 200 => {
                            model
                                .lock()
                                .expect("model")
                                .insert((tenant.to_string(), id), name);
                        }
                        _ => return, // the writer is gone (or refused): stop this writer
                    }
                }
            });
        }
    });
}

#[test]
fn with_synchronous_replication_a_killed_writer_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let writer = Server::start(
        &dir.path().join("writer"),
        &[
            "--shards",
            "2",
            "--replication-listen",
            "127.0.0.1:0",
            "--sync-replication",
        ],
    );
    let leader = writer.replication.clone().expect("replication address");
    // With synchronous replication nothing is acknowledged before a follower holds it.
    let follower = follower(&dir.path().join("follower"), &leader);
    setup_tenants(&writer);
    let model: Model = Arc::default();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let api = writer.api.clone();
    std::thread::scope(|scope| {
        scope.spawn(|| write_until_failure(&api, &model, 8, &stop));
        std::thread::sleep(Duration::from_millis(1500));
        writer.kill9();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let acknowledged = model.lock().expect("model").len();
    assert!(
        acknowledged > 50,
        "only {acknowledged} writes were acknowledged"
    );
    // The follower still serves what it holds: every acknowledged write is there (an
    // acknowledgement means durable on the follower; applying follows at once).
    wait_until_holds(&follower, &model);
    for tenant in TENANTS {
        let held = rows_of(&follower, tenant);
        for (id, name) in model_of(&model, tenant) {
            assert_eq!(
                held.get(&id),
                Some(&name),
                "{tenant}/{id} was acknowledged by the writer but the follower lacks it \
                 ({acknowledged} acknowledged in all)"
            );
        }
    }
}

#[test]
fn without_a_follower_synchronous_writes_are_refused_or_degraded_as_configured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let refusing = Server::start(
        &dir.path().join("refusing"),
        &[
            // One shard: the circuit is per shard, and both tenants below land on it.
            "--shards",
            "1",
            "--replication-listen",
            "127.0.0.1:0",
            "--sync-replication",
            "--sync-timeout-ms",
            "2000",
        ],
    );
    // Creating a tenant is a write like any other: it waits for a follower too.
    let refused = refusing.post("/v1/tenants", &json!({"tenant": "acme"}));
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(refused.body["error"]["code"], "replication_unavailable");
    assert!(refused.retry_after.is_some(), "{refused:?}");
    // The timeout opened the circuit: the next write is refused at once, not after
    // another 2 s.
    let started = Instant::now();
    let again = refusing.post("/v1/tenants", &json!({"tenant": "other"}));
    assert_eq!(again.status, 503, "{again:?}");
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "refused after {:?}: {again:?}",
        started.elapsed()
    );
    let (_, scrape) = refusing.ops_get("/metrics");
    promtool_check(&scrape);
    let circuit = |scrape: &str, name: &str| {
        scrape_value(scrape, &format!("{name}{{downstream=\"replication\"}}"))
    };
    assert_eq!(
        circuit(&scrape, "oc_circuit_breaker_open"),
        Some(1.0),
        "{scrape}"
    );
    assert_eq!(
        circuit(&scrape, "oc_circuit_open_total"),
        Some(1.0),
        "{scrape}"
    );
    // A follower arrives: a write is acknowledged again (the tenant refused above was
    // applied on the writer nevertheless: a retry of it would get 409 already_exists).
    let leader = refusing.replication.clone().expect("replication address");
    let _follower = follower(&dir.path().join("follower"), &leader);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // An attempt refused for a slow follower was applied: a retry finds it.
        let table = refusing.post("/v1/tenants/acme/tables", &common::items_table());
        if table.status == 201 || table.body["error"]["code"] == "already_exists" {
            break;
        }
        assert!(Instant::now() < deadline, "{table:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A row write retried with its idempotency key is acknowledged once the follower
    // holds it.
    loop {
        let write = refusing.post(
            "/v1/tenants/acme/tables/items/rows",
            &json!({"ops": [{"upsert": {"id": 1, "name": "one", "batch": 1}}], "idempotency_key": "first-row"}),
        );
        if write.status == 200 {
            break;
        }
        assert_eq!(
            write.body["error"]["code"], "replication_unavailable",
            "{write:?}"
        );
        assert!(Instant::now() < deadline, "{write:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, scrape) = refusing.ops_get("/metrics");
    promtool_check(&scrape);
    // The follower caught up: the circuit closed.
    assert_eq!(
        circuit(&scrape, "oc_circuit_breaker_open"),
        Some(0.0),
        "{scrape}"
    );
    let timeouts: f64 = (0..4)
        .filter_map(|s| {
            scrape_value(
                &scrape,
                &format!("oc_replication_sync_timeouts_total{{shard=\"{s}\"}}"),
            )
        })
        .sum();
    assert!(timeouts >= 1.0, "{scrape}");

    let degrading = Server::start(
        &dir.path().join("degrading"),
        &[
            "--replication-listen",
            "127.0.0.1:0",
            "--sync-replication",
            "--sync-timeout-ms",
            "300",
            "--sync-on-timeout",
            "degrade",
        ],
    );
    let created = degrading.post("/v1/tenants", &json!({"tenant": "acme"}));
    assert_eq!(created.status, 201, "{created:?}");
    let (_, scrape) = degrading.ops_get("/metrics");
    let degraded: f64 = (0..4)
        .filter_map(|s| {
            scrape_value(
                &scrape,
                &format!("oc_replication_degraded{{shard=\"{s}\"}}"),
            )
        })
        .sum();
    assert_eq!(degraded, 1.0, "{scrape}");
    assert!(
        degrading.stderr().contains("without them"),
        "{}",
        degrading.stderr()
    );
}

/// A `file://` archive under `dir`.
fn archive_in(dir: &std::path::Path) -> String {
    format!("file://{}", dir.join("archive").display())
}

/// A 2-shard writer with a replication listener on `archive`, and `extra` flags.
fn writer_on(dir: &std::path::Path, archive: &str, extra: &[&str]) -> Server {
    let mut flags = vec![
        "--shards",
        "2",
        "--replication-listen",
        "127.0.0.1:0",
        "--archive",
        archive,
        "--tail-window-ms",
        "100",
    ];
    flags.extend(extra);
    Server::start(dir, &flags)
}

/// A follower of `leader` on `archive`, with `extra` flags.
fn follower_on(dir: &std::path::Path, leader: &str, archive: &str, extra: &[&str]) -> Server {
    follower_with_env(dir, leader, archive, extra, &[])
}

/// [`follower_on`] with `env` set for the server process (failpoints).
fn follower_with_env(
    dir: &std::path::Path,
    leader: &str,
    archive: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Server {
    let mut flags = vec![
        "--mode",
        "follower",
        "--leader-addr",
        leader,
        "--archive",
        archive,
        "--tail-window-ms",
        "100",
    ];
    flags.extend(extra);
    Server::try_start_with_env(None, dir, &flags, env)
        .unwrap_or_else(|e| panic!("follower did not start: {e}"))
}

/// A writer and a follower on one archive (the lease lives there).
fn pair(dir: &std::path::Path, writer_flags: &[&str]) -> (Server, Server, String) {
    let archive = archive_in(dir);
    let writer = writer_on(&dir.join("writer"), &archive, writer_flags);
    let leader = writer.replication.clone().expect("replication address");
    // Its replication listener serves once it is promoted: the old writer can follow it.
    let follower = follower_on(
        &dir.join("follower"),
        &leader,
        &archive,
        &["--replication-listen", "127.0.0.1:0"],
    );
    (writer, follower, archive)
}

fn promote(server: &Server, force: bool) -> common::Reply {
    let query = if force { "?force=true" } else { "" };
    common::request(
        "POST",
        &format!("{}/v1/admin/promote{query}", server.ops),
        None,
    )
}

/// A promotion that took the lease and then could not record its epoch (the layout
/// file could not be replaced) answers 500 and says to restart in writer mode. That
/// start finishes it: the epoch starts where the logs end (recorded with its lease
/// epoch) and the branch point goes to the archive, so the new writer never writes
/// under the old writer's epoch (an old writer rejoining would keep its own frames
/// under those LSNs), and the archive restores.
#[test]
fn a_writer_start_finishes_a_promotion_that_stopped_after_taking_the_lease() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (writer, follower, archive) = pair(dir.path(), &[]);
    setup_tenants(&writer);
    let model: Model = Arc::default();
    write_rows(&writer, &model, 0, 20);
    wait_until_matches(&follower, &model);
    writer.kill9();
    let follower_dir = dir.path().join("follower");
    let blocker = follower_dir.join("oc-layout.json.tmp");
    std::fs::create_dir(&blocker).expect("mkdir");
    let promoted = promote(&follower, true);
    assert_eq!(promoted.status, 500, "{promoted:?}");
    assert!(
        promoted
            .body
            .to_string()
            .contains("restart this server in writer mode"),
        "{promoted:?}"
    );
    follower.kill9();
    std::fs::remove_dir(&blocker).expect("rmdir");
    let layout_of = || -> Value {
        let text = std::fs::read_to_string(follower_dir.join("oc-layout.json")).expect("layout");
        serde_json::from_str(&text).expect("JSON")
    };
    assert!(
        layout_of()["epochs"]
            .as_array()
            .is_none_or(|e| e.iter().all(|e| e.get("lease_epoch").is_none())),
        "the failed promotion recorded no epoch: {}",
        layout_of()
    );
    assert!(
        layout_of()["follows"].is_string(),
        "still a follower's directory: {}",
        layout_of()
    );

    let restarted = writer_on(&follower_dir, &archive, &[]);
    let write = restarted.post(
        "/v1/tenants/alpha/tables/items/rows",
        &json!({"ops": [{"upsert": {"id": -1, "name": "after", "batch": 1}}]}),
    );
    assert_eq!(write.status, 200, "{write:?}\n{}", restarted.stderr());
    let layout = layout_of();
    let newest = layout["epochs"]
        .as_array()
        .and_then(|e| e.last().cloned())
        .expect("an epoch");
    assert_eq!(newest["lease_epoch"], 2, "{layout}");
    assert!(layout.get("follows").is_none(), "promoted: {layout}");
    assert!(
        dir.path().join("archive/epoch-2/timeline.json").exists(),
        "no branch point recorded"
    );
    assert_holds_every_acknowledged(&restarted, &model, "the finished promotion");
    common::wait_until_archived(&restarted, 2);
    let restored_dir = dir.path().join("restored");
    let restored = common::restore_latest(&archive, &restored_dir);
    assert!(restored.success, "{restored:?}");
    let restored = Server::start(&restored_dir, &["--archive", "none"]);
    assert_eq!(rows_of(&restored, "alpha"), rows_of(&restarted, "alpha"));
}

/// A follower's directory names its writer in its layout, and a writer's start on it
/// (a unit that lost `--mode follower`) is refused, with an archive of its own or none,
/// instead of starting a second writer of the same tenants. `--promote-at-start` makes it
/// a writer on purpose, in an epoch of its own.
#[test]
fn a_followers_directory_is_not_started_as_a_second_writer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (writer, follower, model) = writer_and_caught_up_follower(dir.path(), 10);
    let follower_dir = dir.path().join("follower");
    let layout_of = |dir: &std::path::Path| -> Value {
        let text = std::fs::read_to_string(dir.join("oc-layout.json")).expect("layout");
        serde_json::from_str(&text).expect("JSON")
    };
    let writer_id = layout_of(&dir.path().join("writer"))["data_dir_id"].clone();
    assert_eq!(layout_of(&follower_dir)["follows"], writer_id);
    follower.terminate();
    for extra in [
        &["--shards", "2"][..],
        &["--shards", "2", "--archive", "none"][..],
    ] {
        let why = Server::try_start(&follower_dir, extra)
            .err()
            .expect("a follower's directory refused as a writer");
        assert!(
            why.contains("is a follower's data directory")
                && why.contains(writer_id.as_str().expect("id"))
                && why.contains("--mode follower"),
            "{extra:?}: {why}"
        );
    }
    assert!(
        !dir.path().join("follower-archive/lease.json").exists(),
        "the refused start claimed an archive"
    );
    let why = Server::try_start(
        &follower_dir,
        &[
            "--mode",
            "follower",
            "--leader-addr",
            "127.0.0.1:9",
            "--promote-at-start",
        ],
    )
    .err()
    .expect("--promote-at-start on a follower");
    assert!(why.contains("--promote-at-start"), "{why}");
    // Still a follower of its writer.
    let leader = writer.replication.clone().expect("replication address");
    let follower = self::follower(&follower_dir, &leader);
    write_rows(&writer, &model, 10, 5);
    wait_until_matches(&follower, &model);
    let writer_epoch = epoch_in_layout(&layout_of(&follower_dir));
    follower.terminate();
    writer.kill9();

    // A start that cannot record the new epoch ends having written nothing; it claimed
    // its new archive, which does not let the next start through without the option.
    let blocker = follower_dir.join("oc-layout.json.tmp");
    std::fs::create_dir(&blocker).expect("mkdir");
    let why = Server::try_start(&follower_dir, &["--shards", "2", "--promote-at-start"])
        .err()
        .expect("the epoch could not be recorded");
    assert!(why.contains("nothing was written"), "{why}");
    std::fs::remove_dir(&blocker).expect("rmdir");
    assert_eq!(layout_of(&follower_dir)["follows"], writer_id);
    let why = Server::try_start(&follower_dir, &["--shards", "2"])
        .err()
        .expect("still a follower's directory");
    assert!(why.contains("is a follower's data directory"), "{why}");
    let promoted = Server::start(&follower_dir, &["--shards", "2", "--promote-at-start"]);
    assert_holds_every_acknowledged(&promoted, &model, "the start that promoted it");
    let write = promoted.post(
        "/v1/tenants/alpha/tables/items/rows",
        &json!({"ops": [{"upsert": {"id": -1, "name": "after", "batch": 1}}]}),
    );
    assert_eq!(write.status, 200, "{write:?}\n{}", promoted.stderr());
    let layout = layout_of(&follower_dir);
    assert!(layout.get("follows").is_none(), "{layout}");
    assert!(
        epoch_in_layout(&layout) > writer_epoch,
        "a new epoch: {layout}"
    );
    promoted.terminate();
    // The mark is gone for good: a plain writer start now serves.
    let again = Server::start(&follower_dir, &["--shards", "2"]);
    assert_eq!(
        rows_of(&again, "alpha").get(&-1).map(String::as_str),
        Some("after")
    );
}

/// The epoch a layout file's server writes (1 without recorded epochs).
fn epoch_in_layout(layout: &Value) -> u64 {
    layout["epochs"]
        .as_array()
        .and_then(|e| e.last())
        .map_or(1, |e| e["epoch"].as_u64().expect("epoch"))
}

#[test]
fn a_synchronous_follower_promoted_after_the_writer_dies_has_every_acknowledged_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (writer, follower, archive) = pair(dir.path(), &["--sync-replication"]);
    setup_tenants(&writer);
    let model: Model = Arc::default();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let api = writer.api.clone();
    let writes_began = std::time::SystemTime::now();
    let killed_at = std::thread::scope(|scope| {
        scope.spawn(|| write_until_failure(&api, &model, 8, &stop));
        std::thread::sleep(Duration::from_millis(1000));
        writer.kill9();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        Instant::now()
    });
    // Until promoted, the follower refuses writes.
    let refused = follower.post("/v1/tenants", &json!({"tenant": "early"}));
    assert_eq!(refused.status, 421, "{refused:?}");
    let promoted = promote(&follower, false);
    assert_eq!(promoted.status, 200, "{promoted:?}\n{}", follower.stderr());
    assert_eq!(promoted.body["lease_epoch"], 2, "{promoted:?}");
    let write = follower.post(
        "/v1/tenants/alpha/tables/items/rows",
        &json!({"ops": [{"upsert": {"id": -1, "name": "after", "batch": 1}}]}),
    );
    assert_eq!(write.status, 200, "{write:?}");
    let rto = killed_at.elapsed();
    assert!(
        rto < Duration::from_secs(2),
        "from the kill to the first write on the promoted follower took {rto:?}: {promoted:?}"
    );
    assert_holds_every_acknowledged(&follower, &model, "failover");
    // The new writer ships under its epoch's prefix, and that prefix alone restores
    // everything it holds; the old writer's keys stay its own.
    common::wait_until_archived(&follower, 2);
    // Its log groups the old writer's commits its own way, so a group may hold commits
    // from both sides of a target: every target in the write window still restores.
    let began_us = writes_began
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_micros() as u64;
    for step in 0..24u64 {
        let target = oc_ship::timestamp::format_rfc3339(began_us + step * 45_000);
        let at = dir.path().join(format!("pitr-{step}"));
        let restored = common::restore_at(&archive, &target, &at);
        assert!(restored.success, "target {target}: {restored:?}");
        std::fs::remove_dir_all(&at).expect("rm");
    }
    let restored_dir = dir.path().join("restored");
    let restored = common::restore_latest(&format!("{archive}/epoch-2"), &restored_dir);
    assert!(restored.success, "{restored:?}");
    let restored = Server::start(&restored_dir, &["--archive", "none"]);
    for tenant in TENANTS {
        assert_eq!(
            rows_of(&restored, tenant),
            rows_of(&follower, tenant),
            "{tenant}: the restore of epoch-2/ differs from the new writer"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let prefix = dir.path().join("archive").join("epoch-2");
    let shipped = |prefix: &std::path::Path| {
        std::fs::read_dir(prefix).is_ok_and(|entries| {
            entries
                .filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().starts_with("shard-"))
        })
    };
    while !shipped(&prefix) {
        assert!(
            Instant::now() < deadline,
            "nothing shipped under {prefix:?}:\n{}",
            follower.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The old writer comes back: the archive is no longer its own, so it refuses to
    // start (it can neither ship nor acknowledge anything).
    let old = Server::try_start(
        &dir.path().join("writer"),
        &[
            "--shards",
            "2",
            "--replication-listen",
            "127.0.0.1:0",
            "--archive",
            &archive,
        ],
    );
    let why = old
        .err()
        .expect("the old writer must not start on the taken archive");
    assert!(why.contains("owned by another data directory"), "{why}");
    // ...and is told to come back as a follower, not on an archive of its own.
    assert!(why.contains("--mode follower"), "{why}");
}

/// A follower started with `--sync-replication` stays synchronous once promoted: with
/// no follower of its own it refuses writes (it would be their only copy), and
/// acknowledges them again once the old writer follows it.
#[test]
fn a_promoted_synchronous_follower_waits_for_its_own_followers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = archive_in(dir.path());
    let sync = ["--sync-replication", "--sync-timeout-ms", "1000"];
    let writer = writer_on(&dir.path().join("writer"), &archive, &sync);
    let leader = writer.replication.clone().expect("replication address");
    let mut follower_flags = vec!["--replication-listen", "127.0.0.1:0"];
    follower_flags.extend(sync);
    let follower = follower_on(
        &dir.path().join("follower"),
        &leader,
        &archive,
        &follower_flags,
    );
    writer.create_tenant_with_items("alpha");
    writer.kill9();
    let promoted = promote(&follower, false);
    assert_eq!(promoted.status, 200, "{promoted:?}\n{}", follower.stderr());
    let row = |id: i64| json!({"ops": [{"upsert": {"id": id, "name": "after", "batch": 1}}]});
    let alone = follower.post("/v1/tenants/alpha/tables/items/rows", &row(1));
    assert_eq!(
        alone.status, 503,
        "acknowledged with no follower: {alone:?}"
    );
    assert_eq!(alone.body["error"]["code"], "replication_unavailable");
    let new_leader = follower.replication.clone().expect("replication address");
    let _old = follower_on(&dir.path().join("writer"), &new_leader, &archive, &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let write = follower.post("/v1/tenants/alpha/tables/items/rows", &row(2));
        if write.status == 200 {
            break;
        }
        assert_eq!(
            write.body["error"]["code"], "replication_unavailable",
            "{write:?}"
        );
        assert!(Instant::now() < deadline, "never acknowledged: {write:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A follower started with another `--archive` than its writer's finds no lease record
/// there: an operator's promotion without force is refused (it would have nothing to
/// fence the live writer with, and two writers would acknowledge), and the follower
/// stays a follower.
#[test]
fn a_follower_on_another_archive_than_its_writers_is_not_promoted_without_force() {
    let dir = tempfile::tempdir().expect("tempdir");
    let writer = writer_on(&dir.path().join("writer"), &archive_in(dir.path()), &[]);
    let leader = writer.replication.clone().expect("replication address");
    let elsewhere = format!("file://{}", dir.path().join("typo-archive").display());
    let follower = follower_on(&dir.path().join("follower"), &leader, &elsewhere, &[]);
    let refused = promote(&follower, false);
    assert_eq!(refused.status, 409, "{refused:?}");
    assert_eq!(
        refused.body["error"]["code"], "lease_missing",
        "{refused:?}"
    );
    let message = refused.body["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("--archive is the writer's"), "{message}");
    let write = follower.post("/v1/tenants", &json!({"tenant": "late"}));
    assert_eq!(write.status, 421, "still a follower: {write:?}");
    let written = writer.post("/v1/tenants", &json!({"tenant": "live"}));
    assert_eq!(written.status, 201, "{written:?}");
}

/// A follower whose `--archive` is owned by another server than its writer is refused
/// at start: promoted, it would take over that server's archive and fence nothing.
#[test]
fn a_follower_on_another_servers_archive_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let owner_archive = format!("file://{}", dir.path().join("owner-archive").display());
    let owner = writer_on(&dir.path().join("owner"), &owner_archive, &[]);
    let writer = writer_on(&dir.path().join("writer"), &archive_in(dir.path()), &[]);
    let leader = writer.replication.clone().expect("replication address");
    let refused = Server::try_start(
        &dir.path().join("follower"),
        &[
            "--mode",
            "follower",
            "--leader-addr",
            &leader,
            "--archive",
            &owner_archive,
        ],
    );
    let why = refused.err().expect("refused");
    assert!(
        why.contains("is owned by data directory") && why.contains("must be its writer's"),
        "{why}"
    );
    drop(owner);
}

#[test]
fn promoting_a_synchronous_follower_fences_a_live_writer() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 2 s, not less: under a full test run's load a follower's confirmation of the
    // setup's first writes has taken over 500 ms.
    let (mut writer, follower, _) = pair(
        dir.path(),
        &["--sync-replication", "--sync-timeout-ms", "2000"],
    );
    setup_tenants(&writer);
    let model: Model = Arc::default();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let api = writer.api.clone();
    let promoted = std::thread::scope(|scope| {
        scope.spawn(|| write_until_failure(&api, &model, 8, &stop));
        std::thread::sleep(Duration::from_millis(500));
        let promoted = promote(&follower, false);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        promoted
    });
    assert_eq!(promoted.status, 200, "{promoted:?}");
    assert!(
        !model.lock().expect("model").is_empty(),
        "the writer acknowledged nothing before the promotion"
    );
    // Every write the old writer acknowledged, the new one has: the old writer could
    // acknowledge nothing once the follower stopped confirming.
    for tenant in TENANTS {
        let held = rows_of(&follower, tenant);
        for (id, name) in model_of(&model, tenant) {
            assert_eq!(
                held.get(&id),
                Some(&name),
                "{tenant}/{id} acknowledged by the fenced writer"
            );
        }
    }
    // Its next lease renewal fails: it exits with status 5.
    let status = writer
        .wait_exit(Duration::from_secs(10))
        .expect("the fenced writer exits");
    assert_eq!(status.code(), Some(5), "{}", writer.stderr());
}

/// Connections that never send a hello (no token shown) do not take the places
/// followers need: with more of them open than the writer serves followers, a new
/// follower still starts and catches up, and the oldest idle ones are closed.
#[test]
fn idle_connections_on_the_replication_port_do_not_lock_followers_out() {
    use std::io::Read;
    let dir = tempfile::tempdir().expect("tempdir");
    let writer = writer(&dir.path().join("writer"));
    let leader = writer.replication.clone().expect("replication address");
    setup_tenants(&writer);
    let model: Model = Arc::default();
    write_rows(&writer, &model, 0, 20);
    // 2 shards serve 32 followers' connections; 300 idle ones are well past that and
    // past the bound on connections before their hello.
    let idle: Vec<std::net::TcpStream> = (0..300)
        .map(|_| std::net::TcpStream::connect(&leader).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let follower = follower(&dir.path().join("follower"), &leader);
    write_rows(&writer, &model, 20, 20);
    wait_until_matches(&follower, &model);
    // The oldest idle connections were closed to make room: they read the end at once,
    // not the refusal their 5 s hello timeout would send.
    let mut first = idle.into_iter().next().expect("one");
    first
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    let read = first.read(&mut buf);
    assert!(
        matches!(&read, Ok(0))
            || matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the oldest idle connection was not closed to make room: {read:?}"
    );
}

#[test]
fn hostile_bytes_on_the_replication_port_are_refused_and_the_writer_serves_on() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "replication-token-0123456789").expect("token");
    let writer = Server::start(
        &dir.path().join("writer"),
        &[
            "--replication-listen",
            "127.0.0.1:0",
            "--replication-token-file",
            token_file.to_str().expect("utf-8"),
        ],
    );
    let addr = writer.replication.clone().expect("replication address");
    let huge_length = [0xffu8, 0xff, 0xff, 0x7f, 1, 2, 3];
    let mut bad_crc = vec![5u8, 0, 0, 0, 1, b'O', b'C', b'R', b'P'];
    bad_crc.extend_from_slice(&[0, 0, 0, 0]);
    let wrong_token = {
        // A well-formed hello with the wrong token: refused with a reason.
        let mut body = vec![1u8];
        body.extend_from_slice(b"OCRP");
        body.extend_from_slice(&1u16.to_le_bytes());
        body.extend_from_slice(&5u16.to_le_bytes());
        body.extend_from_slice(b"wrong");
        body.extend_from_slice(&4u16.to_le_bytes());
        body.extend_from_slice(b"f-id");
        body.extend_from_slice(&0u64.to_le_bytes());
        body.push(1);
        let mut message = (body.len() as u32).to_le_bytes().to_vec();
        message.extend_from_slice(&body);
        message.extend_from_slice(&crc32c_of(&body).to_le_bytes());
        message
    };
    for (what, bytes) in [
        (
            "an HTTP request",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        ("a huge length", huge_length.to_vec()),
        ("a bad checksum", bad_crc),
        ("the wrong token", wrong_token),
    ] {
        let mut stream = std::net::TcpStream::connect(&addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        stream.write_all(&bytes).expect("send");
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer); // the writer answers (or not) and closes
        if what == "the wrong token" {
            let text = String::from_utf8_lossy(&answer);
            assert!(text.contains("token"), "{what}: {text:?}");
        }
    }
    // A client that connects and dribbles a byte at a time is cut off when the whole
    // hello has not arrived 5 s after it connected, and the server answers requests
    // meanwhile.
    let mut dribbler = std::net::TcpStream::connect(&addr).expect("connect");
    let connected = Instant::now();
    dribbler.write_all(&100u32.to_le_bytes()).expect("a length");
    let (status, _) = writer.ops_get("/ready");
    assert_eq!(status, 200);
    let cut_off = loop {
        if dribbler.write_all(&[0x10]).is_err() {
            break connected.elapsed();
        }
        let mut byte = [0u8; 1];
        dribbler
            .set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        match dribbler.read(&mut byte) {
            Ok(_) => break connected.elapsed(), // the refusal, or the close
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break connected.elapsed(),
        }
        assert!(
            connected.elapsed() < Duration::from_secs(15),
            "a dribbling hello was never cut off"
        );
    };
    assert!(
        cut_off >= Duration::from_secs(4),
        "cut off after {cut_off:?}"
    );
    let created = writer.post("/v1/tenants", &json!({"tenant": "still"}));
    assert_eq!(created.status, 201, "the API still answers: {created:?}");
}

/// CRC-32C (Castagnoli), bit by bit: the test's own, independent of the server's.
fn crc32c_of(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// One protocol message as the wire carries it: length, body, CRC-32C.
fn envelope(body: &[u8]) -> Vec<u8> {
    let mut message = (body.len() as u32).to_le_bytes().to_vec();
    message.extend_from_slice(body);
    message.extend_from_slice(&crc32c_of(body).to_le_bytes());
    message
}

/// A fake writer: answers each hello on `listener` with its layout (1 shard) or with a
/// checkpoint whose snapshot does not match its manifest's CRC.
fn serve_a_corrupt_checkpoint(listener: std::net::TcpListener) {
    use std::io::{Read, Write};
    let data = vec![7u8; 4096];
    let manifest = json!({
        "crc32c": crc32c_of(&data) ^ 1, "created_us": 1, "data_bytes": 4096, "epoch": 1,
        "format_version": 1, "lsn": 9, "rows": 1, "shard": 0,
        "snapshot": "checkpoint-0000000000000009.snap", "tenants": ["acme"]
    })
    .to_string();
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { return };
        let mut len = [0u8; 4];
        if stream.read_exact(&mut len).is_err() {
            continue;
        }
        let mut hello = vec![0u8; u32::from_le_bytes(len) as usize + 4];
        if stream.read_exact(&mut hello).is_err() {
            continue;
        }
        // type, magic, version, token, follower id, epoch: then what it wants.
        let token_len = usize::from(u16::from_le_bytes([hello[7], hello[8]]));
        let id_at = 9 + token_len;
        let id_len = usize::from(u16::from_le_bytes([hello[id_at], hello[id_at + 1]]));
        let want = hello[id_at + 2 + id_len + 8];
        let mut answer = Vec::new();
        if want == 1 {
            let mut body = vec![2u8];
            body.extend_from_slice(&1u16.to_le_bytes());
            let writer_id = b"0123456789abcdef0123456789abcdef";
            body.extend_from_slice(&(writer_id.len() as u16).to_le_bytes());
            body.extend_from_slice(writer_id);
            body.extend_from_slice(&0u16.to_le_bytes());
            answer.extend(envelope(&body));
        } else {
            let mut body = vec![7u8];
            body.extend_from_slice(&9u64.to_le_bytes());
            body.extend_from_slice(&(data.len() as u64).to_le_bytes());
            body.extend_from_slice(&(manifest.len() as u32).to_le_bytes());
            body.extend_from_slice(manifest.as_bytes());
            answer.extend(envelope(&body));
            let mut part = vec![8u8];
            part.extend_from_slice(&(data.len() as u32).to_le_bytes());
            part.extend_from_slice(&data);
            answer.extend(envelope(&part));
        }
        let _ = stream.write_all(&answer);
    }
}

#[test]
fn a_new_follower_refuses_a_checkpoint_that_does_not_match_its_manifest_and_keeps_no_layout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let leader = listener.local_addr().expect("addr").to_string();
    std::thread::spawn(move || serve_a_corrupt_checkpoint(listener));
    let data_dir = dir.path().join("follower");
    let refused = Server::try_start(&data_dir, &["--mode", "follower", "--leader-addr", &leader])
        .err()
        .expect("a corrupt checkpoint stops the start");
    assert!(
        refused.contains("copying shard 0's checkpoint") && refused.contains("CRC-32C"),
        "{refused}"
    );
    // No layout: the next start is a new follower's again, and begins the copy anew.
    assert!(!data_dir.join("oc-layout.json").exists());
    assert!(data_dir.join("bootstrap.partial").exists());
}

/// A writer (2 shards, local archive) with small segments and frequent checkpoints, so
/// it soon releases the start of its log.
fn releasing_writer(dir: &std::path::Path, archive: &str) -> Server {
    writer_on(
        &dir.join("writer"),
        archive,
        &[
            "--wal-segment-bytes",
            "274432",
            "--checkpoint-wal-bytes",
            "300000",
        ],
    )
}

/// Upserts 100 rows of ~900 bytes per tenant from `first` on, recording them.
fn write_padded(writer: &Server, model: &Model, first: i64) {
    let padding = "p".repeat(900);
    for tenant in TENANTS {
        let ops: Vec<Value> = (first..first + 100)
            .map(|id| json!({"upsert": {"id": id, "name": format!("{tenant}-{id}-{padding}"), "batch": 1}}))
            .collect();
        for chunk in ops.chunks(10) {
            let reply = writer.post(
                &format!("/v1/tenants/{tenant}/tables/items/rows"),
                &json!({"ops": chunk}),
            );
            assert_eq!(reply.status, 200, "{reply:?}");
        }
        let mut model = model.lock().expect("model");
        for id in first..first + 100 {
            model.insert((tenant.to_string(), id), format!("{tenant}-{id}-{padding}"));
        }
    }
}

/// The first LSN each shard's log in `data_dir` still holds (`u64::MAX`: no segment
/// yet, as on a shard that owns no tenant).
fn oldest_held(data_dir: &std::path::Path, shards: usize) -> Vec<u64> {
    (0..shards)
        .map(|shard| {
            std::fs::read_dir(data_dir.join(format!("shard-{shard}")))
                .expect("shard dir")
                .flatten()
                .filter_map(|e| {
                    oc_io::wal::segment::parse_segment_name(&e.file_name().to_string_lossy())
                })
                .map(|(_, _, first)| first.0)
                .min()
                .unwrap_or(u64::MAX)
        })
        .collect()
}

/// Writes (ids from `first` on) until every shard of the writer has released the LSN
/// after `held[shard]`; returns the next id.
fn write_until_released(
    writer: &Server,
    model: &Model,
    data_dir: &std::path::Path,
    (held, mut first): ([u64; 2], i64),
) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    while oldest_held(data_dir, 2)
        .iter()
        .zip(held)
        .any(|(&oldest, held)| oldest <= held + 1)
    {
        assert!(
            Instant::now() < deadline,
            "the writer never released the start of its log: {:?}",
            oldest_held(data_dir, 2)
        );
        write_padded(writer, model, first);
        first += 100;
    }
    first
}

#[test]
fn a_new_follower_copies_the_writers_checkpoints_when_the_log_no_longer_starts_at_lsn_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = archive_in(dir.path());
    let writer = releasing_writer(dir.path(), &archive);
    let leader = writer.replication.clone().expect("replication address");
    setup_tenants(&writer);
    let model: Model = Arc::default();
    let next = write_until_released(&writer, &model, &dir.path().join("writer"), ([0, 0], 0));

    // Streaming from LSN 1 is impossible now: the follower starts from the writer's
    // newest checkpoints and streams the log after them, while the writer goes on.
    let follower_dir = dir.path().join("follower");
    let follower = follower_on(&follower_dir, &leader, &archive, &[]);
    wait_until_matches(&follower, &model);
    write_padded(&writer, &model, next);
    wait_until_matches(&follower, &model);
    let log = follower.stderr();
    assert_eq!(
        log.matches("copied the writer's newest checkpoint").count(),
        2,
        "one copy per shard:\n{log}"
    );
    assert!(!follower_dir.join("bootstrap.partial").exists());

    // A restart resumes from its own directory: nothing is copied again.
    drop(follower);
    let follower = follower_on(&follower_dir, &leader, &archive, &[]);
    write_padded(&writer, &model, next + 100);
    wait_until_matches(&follower, &model);
    assert!(
        !follower
            .stderr()
            .contains("copied the writer's newest checkpoint"),
        "{}",
        follower.stderr()
    );
}

#[test]
fn a_follower_left_far_behind_is_told_its_way_back_and_bootstraps_from_the_archive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = archive_in(dir.path());
    let writer = releasing_writer(dir.path(), &archive);
    let leader = writer.replication.clone().expect("replication address");
    setup_tenants(&writer);
    let model: Model = Arc::default();
    // A follower that holds the start of the log, then is gone while the writer
    // releases it.
    let stale_dir = dir.path().join("stale");
    let stale = follower(&stale_dir, &leader);
    write_padded(&writer, &model, 0);
    wait_until_matches(&stale, &model);
    let (_, ready) = stale.ops_get("/ready");
    let ready: Value = serde_json::from_str(&ready).expect("json");
    let position = |shard: usize| ready["shards"][shard]["applied_lsn"].as_u64().expect("lsn");
    stale.kill9();
    let first = write_until_released(
        &writer,
        &model,
        &dir.path().join("writer"),
        ([position(0), position(1)], 100),
    );
    let stale = follower(&stale_dir, &leader);
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused_reason = loop {
        let (status, body) = stale.ops_get("/ready");
        assert_ne!(
            status, 200,
            "a follower the writer cannot serve is not ready"
        );
        if body.contains("no longer holds") {
            break body;
        }
        assert!(Instant::now() < deadline, "not refused: {body}");
        std::thread::sleep(Duration::from_millis(50));
    };
    for fix in ["empty one", "oc-pitr restore --for-follower"] {
        assert!(refused_reason.contains(fix), "{refused_reason}");
    }

    // Bootstrap from the archive, then stream the rest while the writer goes on.
    common::wait_until_archived(&writer, 2);
    let follower_dir = dir.path().join("follower");
    let restored = common::oc_pitr(&[
        "restore",
        "--archive",
        &archive,
        "--target",
        "latest",
        "--data-dir",
        follower_dir.to_str().expect("utf-8"),
        "--for-follower",
    ]);
    assert!(restored.success, "{restored:?}");
    // It is a follower's directory from the start: the archive's owner is its writer.
    let layout_text = |dir: &std::path::Path| {
        std::fs::read_to_string(dir.join("oc-layout.json")).expect("layout")
    };
    let writer_layout: Value =
        serde_json::from_str(&layout_text(&dir.path().join("writer"))).expect("JSON");
    let restored_layout: Value = serde_json::from_str(&layout_text(&follower_dir)).expect("JSON");
    assert_eq!(
        restored_layout["follows"], writer_layout["data_dir_id"],
        "{restored_layout}"
    );
    // ...and its history is the writer's (the archive's manifest carries it).
    assert_eq!(
        restored_layout["lineage"], writer_layout["data_dir_id"],
        "{restored_layout}"
    );
    write_padded(&writer, &model, first);
    let follower = follower_on(&follower_dir, &leader, &archive, &[]);
    write_padded(&writer, &model, first + 100);
    wait_until_matches(&follower, &model);
    assert!(
        !follower
            .stderr()
            .contains("copied the writer's newest checkpoint"),
        "a restored directory is not new: nothing is copied from the writer"
    );
}

#[test]
fn two_synchronous_followers_both_hold_every_acknowledged_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = archive_in(dir.path());
    let writer = writer_on(
        &dir.path().join("writer"),
        &archive,
        &["--sync-replication", "--sync-replicas", "2"],
    );
    let leader = writer.replication.clone().expect("replication address");
    let followers: Vec<Server> = ["one", "two"]
        .iter()
        .map(|name| follower_on(&dir.path().join(name), &leader, &archive, &[]))
        .collect();
    setup_tenants(&writer);
    let model: Model = Arc::default();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let api = writer.api.clone();
    std::thread::scope(|scope| {
        scope.spawn(|| write_until_failure(&api, &model, 8, &stop));
        std::thread::sleep(Duration::from_millis(1000));
        writer.kill9();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    assert!(model.lock().expect("model").len() > 50);
    for follower in &followers {
        wait_until_holds(follower, &model);
        for tenant in TENANTS {
            let held = rows_of(follower, tenant);
            for (id, name) in model_of(&model, tenant) {
                assert_eq!(
                    held.get(&id),
                    Some(&name),
                    "{tenant}/{id} missing on a follower"
                );
            }
        }
    }
}

#[test]
fn with_asynchronous_replication_a_failover_loses_at_most_the_lag_and_says_how_much() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (writer, follower, _) = pair(
        dir.path(),
        &["--lease-ttl-ms", "1500", "--lease-max-drift-ms", "200"],
    );
    setup_tenants(&writer);
    let model: Model = Arc::default();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let api = writer.api.clone();
    let killed_at = std::thread::scope(|scope| {
        scope.spawn(|| write_until_failure(&api, &model, 8, &stop));
        std::thread::sleep(Duration::from_millis(1000));
        writer.kill9();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        Instant::now()
    });
    // Without force, the promotion waits for the dead writer's lease to lapse.
    let promoted = promote(&follower, false);
    assert_eq!(promoted.status, 200, "{promoted:?}");
    let waited = killed_at.elapsed();
    assert!(
        waited >= Duration::from_millis(1000),
        "an asynchronous promotion must wait out the lease (1.5 s TTL + 0.2 s drift since the \
         last renewal), it took {waited:?}"
    );
    // What is lost is what the follower lagged by at the kill: for every writing thread
    // (whose writes are acknowledged one after another, each tenant's on one shard), the
    // follower holds a prefix of its acknowledged writes, and loses only their tail.
    // How long that tail is depends on how far the follower lagged, which a shared CI
    // machine can stretch to hundreds of milliseconds: the count is reported, not bound.
    let acknowledged = model.lock().expect("model").len();
    let mut lost = 0;
    let mut by_thread: BTreeMap<i64, Vec<(i64, bool)>> = BTreeMap::new();
    for tenant in TENANTS {
        let held = rows_of(&follower, tenant);
        for (id, name) in model_of(&model, tenant) {
            let kept = held.get(&id) == Some(&name);
            lost += usize::from(!kept);
            by_thread
                .entry(id / 1_000_000)
                .or_default()
                .push((id % 1_000_000, kept));
        }
    }
    eprintln!(
        "asynchronous failover: {lost} of {acknowledged} acknowledged writes lost, \
         promoted {waited:?} after the kill"
    );
    for (thread, writes) in &by_thread {
        // BTreeMap order: the thread's writes in the order it made them.
        let first_lost = writes.iter().position(|(_, kept)| !kept);
        if let Some(first_lost) = first_lost {
            let held_after: Vec<i64> = writes[first_lost..]
                .iter()
                .filter(|(_, kept)| *kept)
                .map(|(n, _)| *n)
                .collect();
            assert!(
                held_after.is_empty(),
                "thread {thread}: write {} was lost but later ones {held_after:?} are held: \
                 a failover must lose only the tail the follower had not received",
                writes[first_lost].0
            );
        }
    }
    assert!(
        lost < acknowledged,
        "the follower held none of the {acknowledged} writes acknowledged in a second"
    );
}

#[test]
fn the_old_writer_rejoins_as_a_follower_of_the_promoted_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (writer, follower, archive) = pair(dir.path(), &["--sync-replication"]);
    setup_tenants(&writer);
    let model: Model = Arc::default();
    write_rows(&writer, &model, 0, 20);
    writer.kill9();
    let promoted = promote(&follower, false);
    assert_eq!(promoted.status, 200, "{promoted:?}");
    write_rows(&follower, &model, 20, 20);
    // The old writer's directory is set aside; it starts again, empty, as a follower.
    let new_leader = follower.replication.clone().expect("replication address");
    std::fs::rename(
        dir.path().join("writer"),
        dir.path().join("writer-set-aside"),
    )
    .expect("set aside");
    let rejoined = follower_on(&dir.path().join("writer"), &new_leader, &archive, &[]);
    wait_until_matches(&rejoined, &model);
    let refused = rejoined.post("/v1/tenants", &json!({"tenant": "nope"}));
    assert_eq!(refused.status, 421, "{refused:?}");
}

/// A TCP proxy in front of a writer's replication listener that can cut the link (a
/// network partition): every connection through it is shut down, and new ones are
/// closed as soon as they are accepted.
/// A TCP proxy can also hold one direction back (an asymmetric partition: what is sent
/// that way waits in the proxy, as TCP retransmits would wait, and flows on heal).
struct Proxy {
    addr: String,
    cut: Arc<std::sync::atomic::AtomicBool>,
    /// Holds back bytes from the writer to the follower, and from the follower back.
    held: [Arc<std::sync::atomic::AtomicBool>; 2],
    links: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    fn start(upstream: &str) -> Proxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let held = [
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        ];
        let links: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
        let (upstream, thread_cut, thread_links, thread_held) = (
            upstream.to_string(),
            cut.clone(),
            links.clone(),
            held.clone(),
        );
        std::thread::spawn(move || {
            for down in listener.incoming().filter_map(Result::ok) {
                if thread_cut.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let Ok(up) = std::net::TcpStream::connect(&upstream) else {
                    continue;
                };
                let pipe = |mut from: std::net::TcpStream,
                            mut to: std::net::TcpStream,
                            held: Arc<AtomicBool>| {
                    use std::io::{Read, Write};
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 << 10];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            while held.load(Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(2));
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                };
                let clones = (down.try_clone(), up.try_clone());
                if let (Ok(down2), Ok(up2)) = clones {
                    thread_links.lock().expect("links").extend([
                        down2.try_clone().expect("clone"),
                        up2.try_clone().expect("clone"),
                    ]);
                    pipe(down, up2, thread_held[1].clone());
                    pipe(up, down2, thread_held[0].clone());
                }
            }
        });
        Proxy {
            addr,
            cut,
            held,
            links,
        }
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for link in self.links.lock().expect("links").drain(..) {
            let _ = link.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Holds back one direction: 0 from the writer, 1 from the follower.
    fn hold(&self, direction: usize) {
        self.held[direction].store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Ends every cut and hold.
    fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
        for held in &self.held {
            held.store(false, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// The files a log set aside when it was cut where it left its writer's history.
fn set_aside_files(data_dir: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut dirs = vec![data_dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if entry.path().is_dir() {
                dirs.push(entry.path());
            } else if name.starts_with("diverged-at-") {
                found.push(name);
            }
        }
    }
    found
}

/// Waits (up to 30 s) until a follower's `/ready` says it is connected and caught up.
fn wait_until_follower_ready(follower: &Server) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = follower.ops_get("/ready");
        if status == 200 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the follower never got ready: {body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_partitioned_old_writer_cuts_its_divergent_tail_and_rejoins_on_its_own_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = archive_in(dir.path());
    let writer = writer_on(
        &dir.path().join("writer"),
        &archive,
        // Long enough for a follower on a loaded CI machine to confirm (300 ms once was
        // not); the cut's refusals cost it once per shard, then the circuit is open.
        &["--sync-replication", "--sync-timeout-ms", "2000"],
    );
    let proxy = Proxy::start(&writer.replication.clone().expect("replication address"));
    let follower = follower_on(
        &dir.path().join("follower"),
        &proxy.addr,
        &archive,
        &["--replication-listen", "127.0.0.1:0"],
    );
    // The first writes must not race the follower's connection.
    wait_until_follower_ready(&follower);
    setup_tenants(&writer);
    let model: Model = Arc::default();
    write_rows(&writer, &model, 0, 10);
    // The partition: the writer logs these writes but no follower confirms them, so
    // none is acknowledged; they are the old writer's divergent tail.
    proxy.cut();
    let mut unacknowledged = Vec::new();
    for tenant in TENANTS {
        for id in 1000..1003 {
            let reply = writer.post(
                &format!("/v1/tenants/{tenant}/tables/items/rows"),
                &json!({"ops": [{"upsert": {"id": id, "name": "never acknowledged", "batch": 1}}]}),
            );
            assert_eq!(reply.status, 503, "{reply:?}");
            unacknowledged.push((tenant, id));
        }
    }
    writer.kill9();
    let promoted = promote(&follower, false);
    assert_eq!(promoted.status, 200, "{promoted:?}\n{}", follower.stderr());
    let at_promotion = applied_total(&follower);
    write_rows(&follower, &model, 10, 10);

    // Started while the new writer does not answer (stopped), the old writer starts
    // from its own layout; once the new writer refuses it as diverged, it exits with
    // status 6 so that its restart can cut its log.
    let new_leader = follower.replication.clone().expect("replication address");
    let paused = follower.pause_outside_archive_lock(&dir.path().join("archive"));
    let mut early = follower_on(&dir.path().join("writer"), &new_leader, &archive, &[]);
    drop(paused);
    let status = early.wait_exit(Duration::from_secs(30));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(6),
        "{status:?}\n{}",
        early.stderr()
    );
    assert!(
        early.stderr().contains("Restart this follower"),
        "{}",
        early.stderr()
    );
    drop(early);

    // Restarted, it follows the new writer on its own directory: its log is cut where
    // the new epoch began, the cut frames kept aside, and nothing is copied again.
    let rejoined = follower_on(&dir.path().join("writer"), &new_leader, &archive, &[]);
    wait_until_matches(&rejoined, &model);
    for (tenant, id) in &unacknowledged {
        assert!(
            !rows_of(&rejoined, tenant).contains_key(id),
            "{tenant}/{id}, never acknowledged and not on the new writer, survived the rejoin"
        );
    }
    let set_aside = set_aside_files(&dir.path().join("writer"));
    assert!(
        !set_aside.is_empty(),
        "no divergent segment was set aside:\n{}",
        rejoined.stderr()
    );
    assert!(
        rejoined
            .stderr()
            .contains("cut the log where it left the writer's history"),
        "{}",
        rejoined.stderr()
    );
    let received = sum_over_shards(
        &rejoined.ops_get("/metrics").1,
        "oc_replication_frames_total",
        "direction=\"received\"",
        2,
    );
    let written_since = applied_total(&follower) - at_promotion;
    assert!(
        received <= written_since as f64,
        "the rejoined follower received {received} frames, {written_since} were written since \
         the promotion: it was copied again\n{}",
        rejoined.stderr()
    );
    // It goes on following, and a restart cuts nothing more.
    write_rows(&follower, &model, 20, 5);
    wait_until_matches(&rejoined, &model);
    drop(rejoined);
    let restarted = follower_on(&dir.path().join("writer"), &new_leader, &archive, &[]);
    wait_until_matches(&restarted, &model);
    assert!(
        !restarted.stderr().contains("cut the log"),
        "{}",
        restarted.stderr()
    );
}

/// Every id of `tenant`'s items on `server`, read page by page.
fn ids_of(server: &Server, tenant: &str) -> std::collections::BTreeSet<i64> {
    let mut ids = std::collections::BTreeSet::new();
    loop {
        let after = ids.last().copied().unwrap_or(i64::MIN);
        let reply = server.post(
            &format!("/v1/tenants/{tenant}/ask"),
            &json!({"sql": format!("SELECT id FROM items WHERE id > {after} ORDER BY id LIMIT 10000")}),
        );
        assert_eq!(reply.status, 200, "{reply:?}");
        let page: Vec<i64> = reply.body["rows"]
            .as_array()
            .expect("rows")
            .iter()
            .filter_map(|r| r[0].as_i64())
            .collect();
        if page.is_empty() {
            return ids;
        }
        ids.extend(page);
    }
}

/// One seeded run: a synchronous writer and its follower through a proxy whose link
/// flaps between healthy, cut, and held back one way or the other, every 100–600 ms
/// for 5 s, under 8 writing clients. The link heals and writes must be acknowledged
/// again; it flaps for 2 s more, and the writer is killed while the link is down
/// (cut or held) and the follower promoted. Returns (acknowledged writes, link
/// changes) after checking that the promoted follower holds every write the writer
/// acknowledged.
fn flapping_partition_run(seed: u64) -> (usize, usize) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = archive_in(dir.path());
    let writer = writer_on(
        &dir.path().join("writer"),
        &archive,
        &["--sync-replication", "--sync-timeout-ms", "1000"],
    );
    let proxy = Proxy::start(&writer.replication.clone().expect("replication address"));
    let follower = follower_on(&dir.path().join("follower"), &proxy.addr, &archive, &[]);
    wait_until_follower_ready(&follower);
    writer.create_tenant_with_items("alpha");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut changes = 0;
    let mut flap = |rng: &mut fastrand::Rng, seconds: u64, healthy_allowed: bool| {
        let until = Instant::now() + Duration::from_secs(seconds);
        while Instant::now() < until {
            proxy.heal();
            match rng.usize(usize::from(!healthy_allowed)..4) {
                0 => {}
                1 => proxy.cut(),
                direction => proxy.hold(direction - 2),
            }
            changes += 1;
            std::thread::sleep(Duration::from_millis(rng.u64(100..600)));
        }
    };
    let api = writer.api.clone();
    let answers = std::thread::scope(|scope| {
        let clients = scope.spawn(|| record_answers(&api, 8, &stop));
        flap(&mut rng, 5, true);
        proxy.heal();
        let healed = Instant::now();
        loop {
            let reply = writer.post(
                "/v1/tenants/alpha/tables/items/rows",
                &json!({"ops": [{"upsert": {"id": -1, "name": "healed", "batch": 1}}]}),
            );
            if reply.status == 200 {
                break;
            }
            assert!(
                healed.elapsed() < Duration::from_secs(30),
                "seed {seed}: no write acknowledged 30 s after the link healed: {reply:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // Down again, and the writer dies while it is.
        flap(&mut rng, 2, false);
        // SAFETY: kill(2) on a child process this test started.
        unsafe { libc::kill(writer.pid() as i32, libc::SIGKILL) };
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        clients.join().expect("clients")
    });
    let unexpected: Vec<(Option<u16>, &String)> = answers
        .iter()
        .filter(|a| !matches!(a.status, None | Some(200) | Some(503)))
        .map(|a| (a.status, &a.body))
        .collect();
    assert!(
        unexpected.is_empty(),
        "seed {seed}: writes answered other than 200 or 503: {:?}",
        &unexpected[..unexpected.len().min(3)]
    );
    drop(writer);
    let promoted = promote(&follower, false);
    assert_eq!(promoted.status, 200, "seed {seed}: {promoted:?}");
    let held = ids_of(&follower, "alpha");
    let acknowledged: Vec<i64> = answers
        .iter()
        .filter(|a| a.status == Some(200))
        .map(|a| a.id)
        .collect();
    let lost: Vec<&i64> = acknowledged
        .iter()
        .filter(|id| !held.contains(id))
        .collect();
    assert!(
        lost.is_empty(),
        "seed {seed}: the promoted follower lacks {} of {} acknowledged writes, e.g. {:?}",
        lost.len(),
        acknowledged.len(),
        &lost[..lost.len().min(5)]
    );
    (acknowledged.len(), changes)
}

#[test]
fn a_flapping_and_asymmetric_partition_loses_no_acknowledged_write_with_synchronous_replication() {
    let mut total = (0, 0);
    for seed in [7, 1009] {
        let (acknowledged, faults) = flapping_partition_run(seed);
        assert!(acknowledged > 0, "seed {seed}: nothing was acknowledged");
        total = (total.0 + acknowledged, total.1 + faults);
    }
    eprintln!(
        "{} acknowledged writes across {} link changes, none lost",
        total.0, total.1
    );
}

/// The issue's network cut, with the archive behind the cut too: an asynchronous writer
/// reaches S3 (moto) and its follower through proxies the test controls, the follower
/// reaches S3 directly. Once both of the writer's links are cut it cannot renew its
/// lease, so it stops acknowledging (421, not ready) before the lease could run out; the
/// follower's promotion waits the lease out, and no write the old writer acknowledged
/// is answered after the moment the new writer took the lease.
#[test]
fn a_writer_cut_off_from_its_archive_fences_itself_before_its_follower_takes_over() {
    let Some(moto) = common_s3::Moto::start() else {
        return;
    };
    moto.create_bucket("oc-cut");
    let s3_proxy = Proxy::start(moto.endpoint.trim_start_matches("http://"));
    let direct = moto.uri("oc-cut", "prod");
    let through_proxy = direct.replace(&moto.endpoint, &format!("http://{}", s3_proxy.addr));
    let dir = tempfile::tempdir().expect("tempdir");
    let lease = ["--lease-ttl-ms", "3000", "--lease-max-drift-ms", "500"];
    let start = |data: &str, archive: &str, flags: &[&str]| {
        let mut all = vec![
            "--shards",
            "1",
            "--archive",
            archive,
            "--replication-listen",
            "127.0.0.1:0",
            "--tail-window-ms",
            "100",
        ];
        all.extend(lease);
        all.extend(flags);
        Server::try_start_with_env(None, &dir.path().join(data), &all, &common_s3::Moto::ENV)
            .unwrap_or_else(|e| panic!("{data}: {e}"))
    };
    let mut writer = start("writer", &through_proxy, &[]);
    let link = Proxy::start(&writer.replication.clone().expect("replication address"));
    let follower = start(
        "follower",
        &direct,
        &["--mode", "follower", "--leader-addr", &link.addr],
    );
    wait_until_follower_ready(&follower);
    writer.create_tenant_with_items("alpha");

    let stop = std::sync::atomic::AtomicBool::new(false);
    let api = writer.api.clone();
    let (answers, cut_at) = std::thread::scope(|scope| {
        let clients = scope.spawn(|| record_answers(&api, 4, &stop));
        std::thread::sleep(Duration::from_millis(500));
        s3_proxy.cut();
        link.cut();
        let cut_at = Instant::now();
        // Fenced within the lease: refusing writes, and not ready, saying why.
        let fenced = loop {
            let (status, body) = writer.ops_get("/ready");
            if status == 503 && body.contains("lease") {
                break cut_at.elapsed();
            }
            assert!(
                cut_at.elapsed() < Duration::from_secs(10),
                "the cut writer still says it is ready: {body}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        // The fence comes at most TTL - drift after the last renewal was sent; this
        // allows the drift again for polling on a loaded machine.
        assert!(
            fenced < Duration::from_millis(3500),
            "fenced {fenced:?} after the cut: later than its lease could last"
        );
        let refused = writer.post(
            "/v1/tenants/alpha/tables/items/rows",
            &json!({"ops": [{"upsert": {"id": -2, "name": "cut", "batch": 1}}]}),
        );
        assert_eq!(refused.status, 421, "{refused:?}");
        assert_eq!(refused.body["error"]["code"], "not_leader", "{refused:?}");
        // The follower waits the old lease out, then takes over.
        let promoted = promote(&follower, false);
        assert_eq!(promoted.status, 200, "{promoted:?}\n{}", follower.stderr());
        let write = follower.post(
            "/v1/tenants/alpha/tables/items/rows",
            &json!({"ops": [{"upsert": {"id": -1, "name": "new writer", "batch": 1}}]}),
        );
        assert_eq!(write.status, 200, "{write:?}");
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        (clients.join().expect("clients"), cut_at)
    });
    let acknowledged: Vec<&Answer> = answers.iter().filter(|a| a.status == Some(200)).collect();
    assert!(
        !acknowledged.is_empty(),
        "nothing was written before the cut"
    );
    // The promoted follower could take the lease no sooner than the TTL plus the drift
    // after the cut (it waits that long after the last change it read): every old
    // acknowledgement must come before.
    let last = acknowledged.iter().map(|a| a.answered).max().expect("some");
    assert!(
        last < cut_at + Duration::from_millis(3500),
        "the old writer acknowledged a write {:?} after the cut, past its lease",
        last - cut_at
    );
    // Healed, the old writer finds the lease taken and never acknowledges again.
    s3_proxy.heal();
    link.heal();
    std::thread::sleep(Duration::from_millis(1000));
    let after_heal = common::try_request(
        "POST",
        &format!("{}/v1/tenants/alpha/tables/items/rows", writer.api),
        Some(&json!({"ops": [{"upsert": {"id": -3, "name": "healed", "batch": 1}}]}).to_string()),
    );
    assert!(
        !matches!(&after_heal, Ok(reply) if reply.status == 200),
        "the old writer acknowledged after the heal: {after_heal:?}"
    );
    // Its next renewal finds the lease taken: it exits (status 5) for a supervisor.
    let status = writer.wait_exit(Duration::from_secs(15));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(5),
        "{status:?}\n{}",
        writer.stderr()
    );
}

#[test]
fn a_synchronous_writer_serves_no_more_followers_than_it_waits_for() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (writer, _first, archive) = pair(dir.path(), &["--sync-replication"]);
    let leader = writer.replication.clone().expect("replication address");
    let second = follower_on(&dir.path().join("second"), &leader, &archive, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = second.ops_get("/ready");
        if status == 503 && body.contains("--sync-replicas") {
            break;
        }
        assert!(Instant::now() < deadline, "{status} {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_degrading_writer_is_waited_out_before_its_follower_is_promoted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (writer, follower, _) = pair(
        dir.path(),
        &[
            "--sync-replication",
            "--sync-on-timeout",
            "degrade",
            "--lease-ttl-ms",
            "1500",
            "--lease-max-drift-ms",
            "200",
        ],
    );
    setup_tenants(&writer);
    writer.kill9();
    let killed_at = Instant::now();
    // It may acknowledge without its follower, so stopping the stream does not fence
    // it: the promotion waits for its lease to lapse.
    let promoted = promote(&follower, false);
    assert_eq!(promoted.status, 200, "{promoted:?}");
    let waited = killed_at.elapsed();
    assert!(
        waited >= Duration::from_millis(1000),
        "promoted {waited:?} after the kill of a writer that could acknowledge alone"
    );
}

/// Sets the flag when dropped, on success or in a panic's unwinding.
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// What one client request to the old writer got, and when it was sent.
struct Answer {
    /// The row the request upserted.
    id: i64,
    status: Option<u16>,
    sent: Instant,
    answered: Instant,
    /// The answer's body (or the client's error), kept to diagnose a failure.
    body: String,
}

/// Writes to `api` from `threads` threads until `stop`, keeping every answer (a refused
/// connection counts as no status; the writer may be paused or gone).
fn record_answers(api: &str, threads: usize, stop: &std::sync::atomic::AtomicBool) -> Vec<Answer> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    let mut answers = Vec::new();
                    for n in 0.. {
                        if stop.load(std::sync::atomic::Ordering::SeqCst) {
                            break;
                        }
                        let id = (t as i64) * 1_000_000 + n;
                        let body =
                            json!({"ops": [{"upsert": {"id": id, "name": "x", "batch": 1}}]});
                        let sent = Instant::now();
                        let reply = common::try_request(
                            "POST",
                            &format!("{api}/v1/tenants/alpha/tables/items/rows"),
                            Some(&body.to_string()),
                        );
                        let status = reply.as_ref().ok().map(|r| r.status);
                        let body = match &reply {
                            Ok(r) => r.body.to_string(),
                            Err(e) => e.clone(),
                        };
                        answers.push(Answer {
                            id,
                            status,
                            sent,
                            answered: Instant::now(),
                            body,
                        });
                        // Refused or unanswered: no spinning on instant refusals.
                        if status != Some(200) {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                    answers
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("client thread"))
            .collect()
    })
}

/// One seeded run of the pause-and-clock schedule: an asynchronous writer (1.5 s lease)
/// and its follower, each with a wall clock offset by -10, 0 or +10 s, the writer under
/// writes. A promotion while the writer runs is refused; the writer is paused
/// (SIGSTOP), the follower promoted, the writer resumed at a seeded moment. Returns the
/// old writer's acknowledgements received after it resumed while the new writer held
/// the lease (dual-writer acknowledgements: must be none).
fn pause_and_clock_run(seed: u64) -> usize {
    let mut rng = fastrand::Rng::with_seed(seed);
    let offsets = ["-10000", "0", "10000"];
    let (writer_offset, follower_offset) = (offsets[rng.usize(..3)], offsets[rng.usize(..3)]);
    let extra_pause = Duration::from_millis(rng.u64(0..1000));
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = archive_in(dir.path());
    let archive_dir = dir.path().join("archive");
    let lease = ["--lease-ttl-ms", "1500", "--lease-max-drift-ms", "300"];
    let start = |data: &str, flags: &[&str], offset: &str| {
        let mut all = vec![
            "--shards",
            "1",
            "--archive",
            &archive,
            "--replication-listen",
            "127.0.0.1:0",
        ];
        all.extend(lease);
        all.extend(flags);
        Server::try_start_with_env(
            None,
            &dir.path().join(data),
            &all,
            &[("OC_TEST_CLOCK_OFFSET_MS", offset)],
        )
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"))
    };
    let mut writer = start("writer", &[], writer_offset);
    let leader = writer.replication.clone().expect("replication address");
    let follower = start(
        "follower",
        &["--mode", "follower", "--leader-addr", &leader],
        follower_offset,
    );
    writer.create_tenant_with_items("alpha");
    let context = format!(
        "seed {seed}: writer clock {writer_offset} ms, follower clock {follower_offset} ms, \
         resumed {extra_pause:?} after the promotion"
    );

    let stop = std::sync::atomic::AtomicBool::new(false);
    let resumed_at = std::sync::Mutex::new(None::<Instant>);
    let api = writer.api.clone();
    let (answers, stopped_at) = std::thread::scope(|scope| {
        let clients = scope.spawn(|| record_answers(&api, 4, &stop));
        std::thread::sleep(Duration::from_millis(300));
        // Alive and renewing: whatever the clocks say, no promotion without force.
        let refused = promote(&follower, false);
        assert_eq!(refused.status, 409, "{context}: {refused:?}");
        assert_eq!(refused.body["error"]["code"], "lease_held", "{context}");
        // Paused past its lease while the follower is promoted. If anything below
        // panics, the guard resumes the writer and `stop` ends the clients: a failure
        // shows its message instead of hanging on a stopped writer.
        let stop_clients = StopOnDrop(&stop);
        let paused = writer.pause_outside_archive_lock(&archive_dir);
        let stopped_at = paused.stopped_at();
        let promoted = promote(&follower, false);
        std::thread::sleep(extra_pause);
        drop(paused);
        *resumed_at.lock().expect("resumed_at") = Some(Instant::now());
        assert_eq!(
            promoted.status,
            200,
            "{context}: {promoted:?}\n{}",
            follower.stderr()
        );
        let write = follower.post(
            "/v1/tenants/alpha/tables/items/rows",
            &json!({"ops": [{"upsert": {"id": -1, "name": "new", "batch": 1}}]}),
        );
        assert_eq!(write.status, 200, "{context}: {write:?}");
        std::thread::sleep(Duration::from_millis(500));
        drop(stop_clients);
        (clients.join().expect("clients"), stopped_at)
    });
    let acknowledged = answers.iter().filter(|a| a.status == Some(200)).count();
    assert!(
        acknowledged > 0,
        "{context}: the writer acknowledged nothing before the pause"
    );
    let status = writer.wait_exit(Duration::from_secs(10));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(5),
        "{context}: the old writer must exit once its renewal fails:\n{}",
        writer.stderr()
    );
    // A request sent while the writer was stopped is handled after it resumed, that is
    // after the promotion: its lease check must refuse it. (One sent before may have
    // passed its check before the pause and be answered after it: a legitimate ack.)
    let mut after: BTreeMap<String, usize> = BTreeMap::new();
    let paused = stopped_at + Duration::from_millis(10);
    for answer in answers.iter().filter(|a| a.sent > paused) {
        let status = answer.status.map_or("no answer".into(), |s| s.to_string());
        *after.entry(status).or_default() += 1;
    }
    eprintln!(
        "{context}: the old writer's answers to requests sent while it was paused: {after:?}"
    );
    let dual: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.sent > paused && a.status == Some(200))
        .collect();
    if !dual.is_empty() {
        // Evidence for the failure: when each was sent and answered, relative to the
        // pause and the resume, what it said, and both servers' logs.
        let resumed_at = resumed_at.lock().expect("resumed_at").unwrap_or(stopped_at);
        let ms = |at: Instant, from: Instant| {
            at.checked_duration_since(from).map_or_else(
                || -(from.duration_since(at).as_millis() as i64),
                |d| d.as_millis() as i64,
            )
        };
        for a in &dual {
            eprintln!(
                "{context}: acknowledged: sent {} ms after the pause, answered {} ms after the                  resume: {}",
                ms(a.sent, stopped_at),
                ms(a.answered, resumed_at),
                a.body
            );
        }
        eprintln!(
            "--- old writer (pid {}):\n{}\n--- promoted follower:\n{}",
            writer.pid(),
            writer.stderr(),
            follower.stderr()
        );
    }
    dual.len()
}

#[test]
fn a_paused_or_skewed_writer_never_acknowledges_beside_a_promoted_one() {
    let runs: u64 = std::env::var("OC_FAULT_RUNS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20);
    let first: u64 = std::env::var("OC_FAULT_SEED")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    let dual: Vec<(u64, usize)> = (first..first + runs)
        .map(|seed| (seed, pause_and_clock_run(seed)))
        .filter(|(_, n)| *n > 0)
        .collect();
    assert!(
        dual.is_empty(),
        "dual-writer acknowledgements (seed, count): {dual:?}"
    );
}

#[test]
fn a_read_with_min_lsn_on_a_follower_sees_the_write_it_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let writer = writer(&dir.path().join("writer"));
    let leader = writer.replication.clone().expect("replication address");
    writer.create_tenant_with_items("alpha");
    // Enough log that a new follower takes a moment to catch up.
    let mut last_lsn = 0;
    for batch in 0..40 {
        let ops: Vec<Value> = (0..50)
            .map(|i| json!({"upsert": {"id": batch * 50 + i, "name": format!("n{batch}-{i}"), "batch": batch}}))
            .collect();
        let reply = writer.post(
            "/v1/tenants/alpha/tables/items/rows",
            &json!({ "ops": ops }),
        );
        assert_eq!(reply.status, 200, "{reply:?}");
        last_lsn = reply.body["lsn"].as_u64().expect("lsn");
    }
    // The writer: an acknowledged LSN is applied, and says so.
    let on_writer = writer.get(&format!(
        "/v1/tenants/alpha/tables/items/rows/1999?min_lsn={last_lsn}"
    ));
    assert_eq!(on_writer.status, 200, "{on_writer:?}");
    assert!(
        on_writer.body["applied_lsn"].as_u64() >= Some(last_lsn),
        "{on_writer:?}"
    );
    // An LSN the writer never acknowledged: nothing to wait for there.
    let ahead = last_lsn + 1_000_000;
    let never = writer.get(&format!(
        "/v1/tenants/alpha/tables/items/rows/1?min_lsn={ahead}"
    ));
    assert_eq!(never.status, 400, "{never:?}");
    assert_eq!(never.body["error"]["code"], "invalid_min_lsn", "{never:?}");

    let follower = Server::start(
        &dir.path().join("follower"),
        &[
            "--mode",
            "follower",
            "--leader-addr",
            &leader,
            "--min-lsn-wait-ms",
            "10000",
        ],
    );
    // Right after it started: the read waits until the follower holds the last write.
    let row = follower.get(&format!(
        "/v1/tenants/alpha/tables/items/rows/1999?min_lsn={last_lsn}"
    ));
    assert_eq!(row.status, 200, "{row:?}");
    assert_eq!(row.body["row"]["name"], "n39-49", "{row:?}");
    let applied = row.body["applied_lsn"].as_u64().expect("applied_lsn");
    assert!(applied >= last_lsn, "{row:?}");
    let ask = follower.post(
        &format!("/v1/tenants/alpha/ask?min_lsn={last_lsn}"),
        &json!({"sql": "SELECT COUNT(*) FROM items"}),
    );
    assert_eq!(ask.status, 200, "{ask:?}");
    assert_eq!(ask.body["rows"][0][0], 2000, "{ask:?}");
    assert!(
        ask.body["applied_lsn"].as_u64() >= Some(last_lsn),
        "{ask:?}"
    );

    // An LSN no write has reached: a bounded wait, then a 503 that says how far it got.
    let short = Server::start(
        &dir.path().join("follower-2"),
        &[
            "--mode",
            "follower",
            "--leader-addr",
            &leader,
            "--min-lsn-wait-ms",
            "300",
        ],
    );
    let started = Instant::now();
    let waited = short.get(&format!(
        "/v1/tenants/alpha/tables/items/rows/1?min_lsn={ahead}"
    ));
    assert_eq!(waited.status, 503, "{waited:?}");
    assert_eq!(
        waited.body["error"]["code"], "lsn_not_applied",
        "{waited:?}"
    );
    assert_eq!(waited.retry_after.as_deref(), Some("1"), "{waited:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    assert!(
        waited.body["error"]["message"]
            .as_str()
            .expect("message")
            .contains(&format!("not min_lsn {ahead}")),
        "{waited:?}"
    );
    for bad in [
        "min_lsn=-1",
        "min_lsn=abc",
        "min_lsn=18446744073709551616",
        "other=1",
    ] {
        let reply = short.get(&format!("/v1/tenants/alpha/tables/items/rows/1?{bad}"));
        assert_eq!(reply.status, 400, "{bad}: {reply:?}");
        assert_eq!(
            reply.body["error"]["code"], "invalid_query_string",
            "{bad}: {reply:?}"
        );
        let reply = short.post(
            &format!("/v1/tenants/alpha/ask?{bad}"),
            &json!({"sql": "SELECT id FROM items"}),
        );
        assert_eq!(reply.status, 400, "{bad}: {reply:?}");
    }
}

#[test]
fn a_write_retried_with_its_idempotency_key_after_a_failover_gets_the_first_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (writer, follower, _) = pair(dir.path(), &["--sync-replication"]);
    writer.create_tenant_with_items("alpha");
    let body = json!({
        "idempotency_key": "order-7",
        "ops": [{"upsert": {"id": 7, "name": "first", "batch": 1}}, {"upsert": {"id": 8, "name": "first", "batch": 1}}],
    });
    let first = writer.post("/v1/tenants/alpha/tables/items/rows", &body);
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.body["inserted"], 2, "{first:?}");
    // The client never saw that answer (say), the writer dies, the follower takes over.
    writer.kill9();
    let promoted = promote(&follower, false);
    assert_eq!(promoted.status, 200, "{promoted:?}");
    let retried = follower.post("/v1/tenants/alpha/tables/items/rows", &body);
    assert_eq!(retried.status, 200, "{retried:?}");
    assert_eq!(
        retried.body, first.body,
        "the retry must get the first answer"
    );
    let count = follower.post(
        "/v1/tenants/alpha/ask",
        &json!({"sql": "SELECT COUNT(*) FROM items"}),
    );
    assert_eq!(count.body["rows"][0][0], 2, "{count:?}");
    // The same key with another body is still a conflict on the new writer.
    let other = follower.post(
        "/v1/tenants/alpha/tables/items/rows",
        &json!({"idempotency_key": "order-7", "ops": [{"upsert": {"id": 9, "name": "x", "batch": 1}}]}),
    );
    assert_eq!(other.status, 409, "{other:?}");
    assert_eq!(
        other.body["error"]["code"], "idempotency_conflict",
        "{other:?}"
    );
}

#[test]
fn a_switchover_hands_writes_to_the_follower_with_a_short_gap_and_the_old_writer_rejoins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (writer, follower, archive) = pair(dir.path(), &[]);
    setup_tenants(&writer);
    let model: Model = Arc::default();
    write_rows(&writer, &model, 0, 20);
    let acked_at: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let switched = std::thread::scope(|scope| {
        for (t, tenant) in TENANTS.into_iter().enumerate() {
            let (model, acked_at, stop) = (model.clone(), acked_at.clone(), &stop);
            let targets = [writer.api.clone(), follower.api.clone()];
            scope.spawn(move || {
                let mut target = 0;
                let mut id = 1_000 + t as i64 * 100_000;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let name = format!("{tenant}-{id}");
                    let body = json!({"ops": [{"upsert": {"id": id, "name": name, "batch": 1}}]});
                    let url = format!("{}/v1/tenants/{tenant}/tables/items/rows", targets[target]);
                    match common::try_request("POST", &url, Some(&body.to_string())) {
                        Ok(reply) if reply.status == 200 => {
                            model
                                .lock()
                                .expect("model")
                                .insert((tenant.to_string(), id), name);
                            acked_at.lock().expect("acks").push(Instant::now());
                            id += 1;
                        }
                        // Refused before it was logged, or the writer is gone: the
                        // same write goes to the other server.
                        Ok(reply) if reply.status == 421 => target = 1,
                        Err(_) => target = 1,
                        Ok(reply) => panic!("{reply:?}"),
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_millis(500));
        let switched = switchover(&writer, &follower);
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        switched
    });
    let printed = String::from_utf8_lossy(&switched.stdout).to_string();
    assert!(
        switched.status.success(),
        "{printed}\n{}\n{}",
        String::from_utf8_lossy(&switched.stderr),
        writer.stderr()
    );
    assert!(
        printed.contains("stepped down") && printed.contains("switched over"),
        "{printed}"
    );
    // Every acknowledged write, from either writer, is on the new one.
    assert_holds_every_acknowledged(&follower, &model, "switchover");
    let mut acks = acked_at.lock().expect("acks").clone();
    acks.sort();
    let gap = acks
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    eprintln!("switchover: longest gap between acknowledged writes {gap:?}\n{printed}");
    assert!(
        gap < Duration::from_secs(2),
        "writes stopped for {gap:?}:\n{printed}"
    );

    // The old writer's next renewal finds the lease taken: it exits. Restarted as a
    // follower on its own directory, it continues from its log (no re-copy).
    let mut writer = writer;
    let status = writer
        .wait_exit(Duration::from_secs(10))
        .expect("the old writer exits");
    assert_eq!(status.code(), Some(5), "{}", writer.stderr());
    // Saying what to do with an old writer, not with a copy of a directory.
    assert!(
        writer.stderr().contains("re-add it as its follower"),
        "{}",
        writer.stderr()
    );
    let new_leader = follower.replication.clone().expect("replication address");
    write_rows(&follower, &model, 5_000, 10);
    let rejoined = follower_on(&dir.path().join("writer"), &new_leader, &archive, &[]);
    wait_until_matches(&rejoined, &model);
    // It asked only for what came after its own log's end.
    let ended_at: u64 = printed
        .split("its logs end at [")
        .nth(1)
        .and_then(|rest| rest.split(']').next())
        .expect("the step-down's LSNs")
        .split(',')
        .map(|lsn| lsn.trim().parse::<u64>().expect("an LSN"))
        .sum();
    let (_, scrape) = rejoined.ops_get("/metrics");
    let received = sum_over_shards(
        &scrape,
        "oc_replication_frames_total",
        "direction=\"received\"",
        2,
    ) as u64;
    assert_eq!(received, applied_total(&follower) - ended_at, "{scrape}");
}

/// Runs `oc-server switchover` from `writer` to `follower` (their ops listeners).
fn switchover(writer: &Server, follower: &Server) -> std::process::Output {
    let host = |url: &str| url.trim_start_matches("http://").to_string();
    std::process::Command::new(env!("CARGO_BIN_EXE_oc-server"))
        .args([
            "switchover",
            "--from",
            &host(&writer.ops),
            "--to",
            &host(&follower.ops),
        ])
        .output()
        .expect("oc-server switchover")
}

/// The ids of table `items` of tenant `alpha` in a directory `oc-pitr` restored.
fn restored_ids(data_dir: &std::path::Path) -> Vec<i64> {
    let server = Server::start(data_dir, &["--shards", "2", "--archive", "none"]);
    let ask = server.post(
        "/v1/tenants/alpha/ask",
        &json!({"sql": "SELECT id FROM items ORDER BY id"}),
    );
    assert_eq!(ask.status, 200, "{ask:?}");
    ask.body["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r[0].as_i64().expect("id"))
        .collect()
}

fn upsert_ids(server: &Server, ids: std::ops::Range<i64>, name: &str) {
    for id in ids {
        let reply = server.post(
            "/v1/tenants/alpha/tables/items/rows",
            &json!({"ops": [{"upsert": {"id": id, "name": name, "batch": 1}}]}),
        );
        assert_eq!(reply.status, 200, "{reply:?}");
    }
}

/// After a failover the archive holds two histories: the old writer's at its root,
/// with what it acknowledged after its follower's last frame (a dead branch), and the
/// promoted writer's under `epoch-2/`. A restore of the archive follows the new one; to
/// an instant its retention no longer reaches, it falls back to the old one cut at the
/// branch point, so the dead branch is never restored.
#[test]
fn a_restore_follows_the_promoted_timeline_and_never_restores_the_dead_branch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = archive_in(dir.path());
    let writer = writer_on(&dir.path().join("writer"), &archive, &[]);
    let proxy = Proxy::start(&writer.replication.clone().expect("replication address"));
    // Once promoted it checkpoints every second and keeps one second of archive, so its
    // own history soon stops reaching back before the promotion.
    let follower = follower_on(
        &dir.path().join("follower"),
        &proxy.addr,
        &archive,
        &["--checkpoint-interval-s", "1", "--archive-retention", "1s"],
    );
    writer.create_tenant_with_items("alpha");
    upsert_ids(&writer, 0..20, "shared");
    let deadline = Instant::now() + Duration::from_secs(30);
    while follower
        .get("/v1/tenants/alpha/tables/items/rows/19")
        .status
        != 200
    {
        assert!(Instant::now() < deadline, "the follower never caught up");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The dead branch: acknowledged by the writer and archived, never replicated.
    proxy.cut();
    upsert_ids(&writer, 100..110, "dead");
    common::wait_until_archived(&writer, 2);
    let before_promotion = oc_io::TimestampMicros::now().0;
    std::thread::sleep(Duration::from_millis(20));
    let one_history = dir.path().join("one-history");
    let run = common::restore_latest(&archive, &one_history);
    assert!(run.success, "{run:?}");
    let ids = restored_ids(&one_history);
    assert!(
        ids.contains(&0) && ids.contains(&105),
        "before the failover the archive restores everything the writer acknowledged: {ids:?}"
    );

    writer.kill9();
    let promoted = promote(&follower, true);
    assert_eq!(promoted.status, 200, "{promoted:?}");
    upsert_ids(&follower, 200..210, "new");

    // Latest: the promoted writer's history, without the dead branch.
    common::wait_until_archived(&follower, 2);
    let latest = dir.path().join("latest");
    let run = common::restore_latest(&archive, &latest);
    assert!(run.success, "{run:?}");
    assert!(
        run.stderr
            .contains("restoring from epoch-2/ (lease epoch 2)"),
        "{run:?}"
    );
    let expected: Vec<i64> = (0..20).chain(200..210).collect();
    assert_eq!(restored_ids(&latest), expected, "{run:?}");
    let list = common::oc_pitr(&["list", "--archive", &archive, "--output", "json"]);
    assert!(list.success, "{list:?}");
    let listing: Value = serde_json::from_str(&list.stdout).expect("list json");
    assert_eq!(listing["timelines"][0]["name"], "epoch-2/", "{listing}");
    assert_eq!(listing["timelines"][1]["lease_epoch"], 1, "{listing}");
    // The promoted writer's one-second retention deletes objects while verify runs;
    // verify lists a shard again when what it listed is gone.
    let verify = common::oc_pitr(&["verify", "--archive", &archive]);
    assert!(verify.success, "{verify:?}");

    // An instant before the promotion, once the new history no longer reaches it: the
    // old history, cut where the new one began.
    let root: Arc<dyn oc_ship::archive::Archive> =
        oc_ship::archive::open_archive(&archive).expect("archive");
    let waiting = Instant::now();
    let deadline = waiting + Duration::from_secs(120);
    let mut n = 300;
    loop {
        let plan = oc_ship::restore::plan_timeline(&root, before_promotion).expect("a plan");
        if plan.timeline.lease_epoch == 1 {
            eprintln!(
                "the new history stopped reaching back after {:?}",
                waiting.elapsed()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the promoted writer's retention (1 s) never dropped its start"
        );
        // Checkpoints need new writes.
        upsert_ids(&follower, n..n + 1, "later");
        n += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    let target = oc_ship::timestamp::format_rfc3339(before_promotion);
    let at_target = dir.path().join("at-target");
    let run = common::restore_at(&archive, &target, &at_target);
    assert!(run.success, "{run:?}");
    assert!(
        run.stderr
            .contains("restoring from the archive's root (lease epoch 1), up to the branch point"),
        "{run:?}"
    );
    assert_eq!(
        restored_ids(&at_target),
        (0..20).collect::<Vec<_>>(),
        "the dead branch (100..110) is not the archive's history: {run:?}"
    );
}

/// `oc-client` given both servers: a write sent to the follower reaches the writer, a
/// follower read with the write's LSN sees it, and writes without idempotency keys
/// keep landing through a switchover, every acknowledged one on the new writer.
#[test]
fn the_client_finds_the_writer_through_a_switchover_and_reads_its_writes_on_a_follower() {
    use oc_client::{Client, ReadOptions, RetryPolicy, WriteBatch};
    let dir = tempfile::tempdir().expect("tempdir");
    let (writer, follower, _) = pair(dir.path(), &[]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let retry = RetryPolicy {
        attempts: 30,
        backoff: Duration::from_millis(20),
        max_wait: Duration::from_secs(2),
    };
    let both = Client::builder(format!("{},{}", follower.api, writer.api))
        .retry(retry)
        .build()
        .expect("client");
    let only_follower = Client::builder(&follower.api)
        .retry(RetryPolicy {
            attempts: 1,
            ..retry
        })
        .build()
        .expect("client");
    let row = |id: i64| {
        json!({"id": id, "name": format!("n{id}"), "batch": 1})
            .as_object()
            .cloned()
            .expect("an object")
    };
    runtime.block_on(async {
        // Operator actions too: the follower wrote nothing, so they are sent on.
        both.create_tenant("alpha").await.expect("tenant");
        assert_eq!(
            both.base_url(),
            writer.api,
            "the client stays on the writer"
        );
        both.create_table_json("alpha", &common::items_table())
            .await
            .expect("table");
        let written = both
            .write_rows("alpha", "items", WriteBatch::default().upsert(row(1)))
            .await
            .expect("write");
        assert_eq!(written.inserted, 1);
        // Read-your-writes on the follower.
        let at_least = ReadOptions {
            min_lsn: Some(written.lsn),
            ..ReadOptions::default()
        };
        let found = only_follower
            .get_row_with("alpha", "items", &[json!(1)], &at_least)
            .await
            .expect("read on the follower");
        let found = found.expect("the row");
        assert_eq!(found.row["name"], "n1");
        assert!(found.applied_lsn >= written.lsn, "{found:?}");
        let counted = only_follower
            .ask_with("alpha", "SELECT COUNT(*) FROM items", &[], &at_least)
            .await
            .expect("ask on the follower");
        assert_eq!(counted.rows[0][0], 1);
        assert!(counted.applied_lsn >= written.lsn, "{counted:?}");
        // The follower's refusal says it wrote nothing.
        let refused = only_follower
            .write_rows("alpha", "items", WriteBatch::default().upsert(row(2)))
            .await
            .expect_err("a follower refuses writes");
        assert!(
            matches!(
                refused,
                oc_client::Error::Api {
                    status: 421,
                    taken: Some(false),
                    ..
                }
            ),
            "{refused:?}"
        );
    });

    // Writes through a switchover: one writer thread on the client, no keys.
    let acknowledged: Arc<Mutex<Vec<i64>>> = Arc::default();
    let failed: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let switched = std::thread::scope(|scope| {
        scope.spawn(|| {
            runtime.block_on(async {
                let mut id = 100;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    match both
                        .write_rows("alpha", "items", WriteBatch::default().upsert(row(id)))
                        .await
                    {
                        Ok(_) => acknowledged.lock().expect("acks").push(id),
                        // Logged just before the handover, its acknowledgement refused
                        // once the lease moved: legitimately not sent again (no key).
                        Err(oc_client::Error::Api {
                            status: 421,
                            taken: Some(true),
                            ..
                        }) => {}
                        Err(e) => failed.lock().expect("failures").push(e.to_string()),
                    }
                    id += 1;
                }
            })
        });
        std::thread::sleep(Duration::from_millis(300));
        let switched = switchover(&writer, &follower);
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        switched
    });
    assert!(
        switched.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&switched.stdout),
        String::from_utf8_lossy(&switched.stderr)
    );
    let failed = failed.lock().expect("failures").clone();
    assert!(
        failed.is_empty(),
        "writes failed across the switchover: {failed:?}"
    );
    assert_eq!(
        both.base_url(),
        follower.api,
        "the client moved to the new writer"
    );
    let acknowledged = acknowledged.lock().expect("acks").clone();
    let held = rows_of(&follower, "alpha");
    for id in &acknowledged {
        assert!(held.contains_key(id), "acknowledged row {id} is missing");
    }
    let after = runtime
        .block_on(both.write_rows("alpha", "items", WriteBatch::default().upsert(row(-1))))
        .expect("a write after the switchover");
    assert!(after.lsn > 0);
    eprintln!(
        "{} writes acknowledged across the switchover",
        acknowledged.len()
    );
}

/// `--auto-promote`: a follower cut off from a writer that lives (and renews its
/// lease) stays a follower; once the writer is killed, the follower promotes itself
/// after the lease lapses (never before its TTL), with every acknowledged write, and
/// takes writes.
#[test]
fn an_auto_promoting_follower_takes_over_only_once_the_writers_lease_lapsed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = archive_in(dir.path());
    let lease = ["--lease-ttl-ms", "1500", "--lease-max-drift-ms", "500"];
    let writer = writer_on(&dir.path().join("writer"), &archive, &lease);
    let proxy = Proxy::start(&writer.replication.clone().expect("replication address"));
    let mut follower_flags = vec!["--auto-promote", "--replication-listen", "127.0.0.1:0"];
    follower_flags.extend(lease);
    let follower = follower_on(
        &dir.path().join("follower"),
        &proxy.addr,
        &archive,
        &follower_flags,
    );
    setup_tenants(&writer);
    let model: Model = Arc::default();
    write_rows(&writer, &model, 0, 20);
    wait_until_matches(&follower, &model);
    // Cut off from a writer that lives: three lease TTLs, and it is still a follower.
    proxy.cut();
    std::thread::sleep(Duration::from_millis(4_500));
    let write = |server: &Server| {
        server.post(
            "/v1/tenants/alpha/tables/items/rows",
            &json!({"ops": [{"upsert": {"id": -1, "name": "after", "batch": 1}}]}),
        )
    };
    assert_eq!(write(&follower).status, 421, "{}", follower.stderr());
    assert!(
        follower
            .stderr()
            .contains("automatic promotion refused; watching the writer again"),
        "the follower should have tried and been refused:\n{}",
        follower.stderr()
    );
    assert_eq!(write(&writer).status, 200, "the writer still takes writes");

    writer.kill9();
    let took = first_write_taken(&follower, Duration::from_secs(20));
    eprintln!("automatic promotion: first write taken {took:?} after the kill");
    assert!(
        took >= Duration::from_millis(1_500),
        "promoted {took:?} after the kill, before the lease could have lapsed"
    );
    assert_holds_every_acknowledged(&follower, &model, "failover");
    let logs = follower.stderr();
    assert!(
        logs.contains("automatic promotion: this server is the writer"),
        "{logs}"
    );
}

/// Writes to `follower` until it takes one (it promoted itself), refused with 421
/// meanwhile; returns how long that took. Fails after `within`.
fn first_write_taken(follower: &Server, within: Duration) -> Duration {
    let since = Instant::now();
    loop {
        let reply = follower.post(
            "/v1/tenants/alpha/tables/items/rows",
            &json!({"ops": [{"upsert": {"id": -1, "name": "after", "batch": 1}}]}),
        );
        if reply.status == 200 {
            return since.elapsed();
        }
        assert_eq!(reply.status, 421, "{reply:?}");
        assert!(
            since.elapsed() < within,
            "no automatic promotion within {within:?}:\n{}",
            follower.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An automatic promotion whose write of the lease record landed but whose answer was
/// lost (failpoint: the archive "failed" after the write) finds, on its next attempt,
/// a record with this process's holder and the claim time it wrote: its own, so it
/// takes it over instead of refusing it for ever as a copy of the writer's directory.
#[test]
fn an_auto_promotion_whose_lease_answer_was_lost_takes_over_on_its_retry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = archive_in(dir.path());
    let lease = ["--lease-ttl-ms", "1500", "--lease-max-drift-ms", "500"];
    let writer = writer_on(&dir.path().join("writer"), &archive, &lease);
    let leader = writer.replication.clone().expect("replication address");
    let mut flags = vec!["--auto-promote", "--replication-listen", "127.0.0.1:0"];
    flags.extend(lease);
    let follower = follower_with_env(
        &dir.path().join("follower"),
        &leader,
        &archive,
        &flags,
        &[("OC_FAILPOINTS", "promote.lease_answer_lost=1")],
    );
    setup_tenants(&writer);
    let model: Model = Arc::default();
    write_rows(&writer, &model, 0, 20);
    wait_until_matches(&follower, &model);
    // An automatic promotion waits until the follower knew itself caught up: a message
    // from the writer (a heartbeat every 500 ms) found everything applied.
    wait_until_follower_ready(&follower);
    std::thread::sleep(Duration::from_millis(1_200));

    writer.kill9();
    first_write_taken(&follower, Duration::from_secs(30));
    let logs = follower.stderr();
    assert!(
        logs.contains("failpoint promote.lease_answer_lost")
            && logs.contains("automatic promotion refused; watching the writer again"),
        "the first attempt should have lost its answer:\n{logs}"
    );
    assert!(
        logs.contains("automatic promotion: this server is the writer"),
        "{logs}"
    );
    assert_holds_every_acknowledged(&follower, &model, "failover");
}

/// A follower on a file-level copy of the writer's directory (its id, so the lease
/// record names "its" directory) never promotes itself: not while the writer, cut off
/// only from it, renews the record, and not after the writer dies. Only a record this
/// very process wrote counts as its own; anything else with its id may be the writer.
#[test]
fn an_auto_promoting_follower_on_a_copy_of_the_writers_directory_never_takes_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = archive_in(dir.path());
    let lease = ["--lease-ttl-ms", "1500", "--lease-max-drift-ms", "500"];
    let writer_dir = dir.path().join("writer");
    let writer = writer_on(&writer_dir, &archive, &lease);
    setup_tenants(&writer);
    let model: Model = Arc::default();
    write_rows(&writer, &model, 0, 5);
    assert!(writer.terminate().success());
    let copy = dir.path().join("copy");
    common::copy_dir(&writer_dir, &copy);
    let writer = writer_on(&writer_dir, &archive, &lease);
    let proxy = Proxy::start(&writer.replication.clone().expect("replication address"));
    let mut flags = vec!["--auto-promote", "--replication-listen", "127.0.0.1:0"];
    flags.extend(lease);
    let follower = follower_on(&copy, &proxy.addr, &archive, &flags);
    write_rows(&writer, &model, 5, 5);
    wait_until_matches(&follower, &model);
    // An automatic promotion waits until the follower knew itself caught up: a message
    // from the writer (a heartbeat every 500 ms) found everything applied.
    wait_until_follower_ready(&follower);
    std::thread::sleep(Duration::from_millis(1_200));

    let write = |server: &Server| {
        server.post(
            "/v1/tenants/alpha/tables/items/rows",
            &json!({"ops": [{"upsert": {"id": -1, "name": "after", "batch": 1}}]}),
        )
    };
    let refusals = |server: &Server| {
        server
            .stderr()
            .matches("names this data directory (a copy of the writer's?)")
            .count()
    };
    proxy.cut();
    std::thread::sleep(Duration::from_millis(4_500));
    assert_eq!(write(&writer).status, 200, "the writer still takes writes");
    let while_alive = refusals(&follower);
    assert!(
        while_alive > 0,
        "the follower should have tried and been refused while the writer lived:\n{}",
        follower.stderr()
    );
    writer.kill9();
    // Once the dead writer's lease has lapsed (TTL plus drift: 2 s), the follower's
    // next attempt (they come less often after each refusal: about 0.8, 2.4, 5, 10 s
    // after the cut) must be refused too.
    std::thread::sleep(Duration::from_millis(2_500));
    let after_lapse = refusals(&follower);
    let deadline = Instant::now() + Duration::from_secs(15);
    while refusals(&follower) == after_lapse {
        assert!(
            Instant::now() < deadline,
            "no attempt after the writer's lease lapsed:\n{}",
            follower.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(write(&follower).status, 421, "{}", follower.stderr());
    let logs = follower.stderr();
    assert!(
        !logs.contains("automatic promotion: this server is the writer"),
        "{logs}"
    );
}

/// The events of a `/watch` stream of `tenant` resumed after `last_event_id`, read for
/// `within`: (event, data, id).
fn watch_events(
    server: &Server,
    tenant: &str,
    last_event_id: &str,
    within: Duration,
) -> Vec<(String, Value, String)> {
    use std::io::{BufRead, BufReader, Write};
    let address = server.api.trim_start_matches("http://").to_string();
    let mut stream = std::net::TcpStream::connect(&address).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    write!(
        stream,
        "GET /v1/tenants/{tenant}/watch HTTP/1.1\r\nhost: {address}\r\naccept: text/event-stream\r\n\
         last-event-id: {last_event_id}\r\n\r\n"
    )
    .expect("send");
    let mut lines = BufReader::new(stream);
    let deadline = Instant::now() + within;
    let (mut events, mut event, mut data, mut id) =
        (Vec::new(), String::new(), String::new(), String::new());
    while Instant::now() < deadline {
        let mut line = String::new();
        match lines.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => continue, // the read timeout: look at the deadline
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            if !event.is_empty() {
                let parsed = serde_json::from_str(&data).unwrap_or(Value::Null);
                events.push((std::mem::take(&mut event), parsed, std::mem::take(&mut id)));
            }
            data.clear();
            continue;
        }
        match line.split_once(": ") {
            Some(("event", value)) => event = value.to_string(),
            Some(("data", value)) => data.push_str(value),
            Some(("id", value)) => id = value.to_string(),
            _ => {}
        }
    }
    events
}

/// A `/watch` consumer that last saw a change of the old writer's lost branch, resuming
/// on the promoted follower, is told to start over (`reset`): it is never resumed as if
/// the promoted writer's change at that LSN were the one it saw. Resumed from a point
/// on both histories once the promoted writer's log no longer holds it, the archive
/// replays the promoted writer's history, never the dead writer's frames (the
/// archive's root holds them).
#[test]
fn a_watch_resume_on_a_promoted_follower_never_follows_the_dead_branch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = archive_in(dir.path());
    let small_log = [
        "--wal-segment-bytes",
        "274432",
        "--checkpoint-wal-bytes",
        "1048576",
    ];
    let writer = writer_on(&dir.path().join("writer"), &archive, &small_log);
    let leader = writer.replication.clone().expect("replication address");
    let follower_flags = [&["--replication-listen", "127.0.0.1:0"][..], &small_log].concat();
    let follower_dir = dir.path().join("follower");
    let follower = follower_on(&follower_dir, &leader, &archive, &follower_flags);
    writer.create_tenant_with_items("alpha");
    let upsert = |server: &Server, id: i64, name: &str| -> u64 {
        let written = server.post(
            "/v1/tenants/alpha/tables/items/rows",
            &json!({"ops": [{"upsert": {"id": id, "name": name, "batch": 0}}]}),
        );
        assert_eq!(written.status, 200, "{written:?}");
        written.body["lsn"].as_u64().expect("lsn")
    };
    let mut shared = 0;
    for id in 0..10 {
        shared = upsert(&writer, id, "both");
    }
    let model: Model = Arc::default();
    for id in 0..10 {
        model
            .lock()
            .expect("model")
            .insert(("alpha".to_string(), id), "both".to_string());
    }
    wait_until_matches(&follower, &model);
    follower.kill9();
    // The old writer's branch: acknowledged, archived, then lost with the writer.
    let lost = upsert(&writer, 500, "dead-branch");
    assert_eq!(lost, shared + 1);
    common::wait_until_archived(&writer, 2);
    writer.kill9();
    let follower = follower_on(&follower_dir, &leader, &archive, &follower_flags);
    let promoted = promote(&follower, true);
    assert_eq!(promoted.status, 200, "{promoted:?}\n{}", follower.stderr());
    let new = upsert(&follower, 600, "new-writer");
    assert_eq!(new, lost, "the promoted writer writes that LSN again");
    let events = watch_events(
        &follower,
        "alpha",
        &format!("1-{lost}"),
        Duration::from_secs(1),
    );
    assert!(
        events.iter().any(|(event, ..)| event == "reset"),
        "a resume point on the lost branch starts over: {events:?}"
    );
    // Push the promoted writer's log past LSN `shared` (checkpoints release it).
    let owner = follower.get("/v1/tenants/alpha/usage").body["shard"]
        .as_u64()
        .expect("shard");
    let shard_dir = follower_dir.join(format!("shard-{owner}"));
    let oldest_local = || {
        std::fs::read_dir(&shard_dir)
            .expect("shard dir")
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let lsn = name.strip_suffix(".seg")?.rsplit('-').next()?.to_string();
                u64::from_str_radix(&lsn, 16).ok()
            })
            .min()
            .unwrap_or(0)
    };
    let padding = "p".repeat(2000);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut id = 1000;
    while oldest_local() <= shared + 1 {
        assert!(Instant::now() < deadline, "the log was never released");
        let ops: Vec<Value> = (0..50)
            .map(|i| json!({"upsert": {"id": id + i, "name": padding, "batch": 1}}))
            .collect();
        id += 50;
        let written = follower.post("/v1/tenants/alpha/tables/items/rows", &json!({"ops": ops}));
        assert_eq!(written.status, 200, "{written:?}");
    }
    common::wait_until_archived(&follower, 2);
    // From the archive: the promoted writer's own history (its namespace), and below
    // the branch point the root's, never the dead writer's frames past it.
    for (after, earlier) in [(shared, None), (shared - 3, Some(shared - 1))] {
        let events = watch_events(
            &follower,
            "alpha",
            &format!("1-{after}"),
            Duration::from_secs(3),
        );
        let changed = |wanted: i64| {
            events
                .iter()
                .any(|(event, data, _)| event == "change" && data["key"]["id"] == wanted)
        };
        assert!(
            !changed(500),
            "the dead writer's change is never replayed: {events:?}"
        );
        assert!(
            changed(600),
            "the promoted writer's change is replayed: {events:?}"
        );
        assert!(
            !events.iter().any(|(event, ..)| event == "reset"),
            "{events:?}"
        );
        if let Some(lsn) = earlier {
            // Row ids 0..10 were written at LSNs shared-9..=shared.
            let id = 9 - (shared - lsn) as i64;
            assert!(
                changed(id),
                "the shared history is replayed too: {events:?}"
            );
        }
    }
}

/// A follower never takes up a writer of another database: two writers that each
/// began their own history share epoch 1 and LSNs, so nothing but where the history
/// began (the layout's lineage) tells them apart. A follower of one, restarted with the
/// other's address, or restored from one's archive and pointed at the other, is
/// refused at start, its data untouched.
#[test]
fn a_follower_refuses_a_writer_of_another_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive_x = format!("file://{}", dir.path().join("archive-x").display());
    let archive_y = format!("file://{}", dir.path().join("archive-y").display());
    let x = writer_on(&dir.path().join("x"), &archive_x, &[]);
    let y = writer_on(&dir.path().join("y"), &archive_y, &[]);
    let (x_leader, y_leader) = (
        x.replication.clone().expect("replication address"),
        y.replication.clone().expect("replication address"),
    );
    setup_tenants(&x);
    setup_tenants(&y);
    let model: Model = Arc::default();
    write_rows(&x, &model, 0, 5);
    write_rows(&y, &Model::default(), 100, 10);
    let follower_dir = dir.path().join("follower");
    let follower = follower_on(&follower_dir, &x_leader, &archive_x, &[]);
    wait_until_matches(&follower, &model);
    follower.terminate();
    let before = std::fs::read_to_string(follower_dir.join("oc-layout.json")).expect("layout");
    let refused = Server::try_start(
        &follower_dir,
        &[
            "--mode",
            "follower",
            "--leader-addr",
            &y_leader,
            "--archive",
            &archive_y,
        ],
    )
    .err()
    .expect("a writer of another database refused");
    assert!(refused.contains("another database"), "{refused}");
    let after = std::fs::read_to_string(follower_dir.join("oc-layout.json")).expect("layout");
    assert_eq!(before, after, "the refused start changed nothing");
    // Its writer again: it follows as before.
    let mut follower = follower_on(&follower_dir, &x_leader, &archive_x, &[]);
    wait_until_matches(&follower, &model);
    // A follower restored from X's archive knows X's history too.
    common::wait_until_archived(&x, 2);
    let restored_dir = dir.path().join("restored");
    let restored = common::oc_pitr(&[
        "restore",
        "--archive",
        &archive_x,
        "--target",
        "latest",
        "--data-dir",
        restored_dir.to_str().expect("utf-8"),
        "--for-follower",
    ]);
    assert!(restored.success, "{restored:?}");
    let refused = Server::try_start(
        &restored_dir,
        &[
            "--mode",
            "follower",
            "--leader-addr",
            &y_leader,
            "--archive",
            &archive_y,
        ],
    )
    .err()
    .expect("a writer of another database refused");
    assert!(refused.contains("another database"), "{refused}");
    // Then its writer's address reaches another database's writer (X gone, Z started
    // there): the streams ask the writer before they follow, and the follower ends
    // rather than place Z's frames after X's.
    x.terminate();
    let archive_z = format!("file://{}", dir.path().join("archive-z").display());
    let z = Server::start(
        &dir.path().join("z"),
        &[
            "--shards",
            "2",
            "--replication-listen",
            &x_leader,
            "--archive",
            &archive_z,
        ],
    );
    assert_eq!(z.replication.as_deref(), Some(x_leader.as_str()));
    setup_tenants(&z);
    write_rows(&z, &Model::default(), 200, 10);
    let status = follower
        .wait_exit(Duration::from_secs(30))
        .expect("the follower ends");
    assert_eq!(status.code(), Some(6), "{}", follower.stderr());
    assert!(
        follower.stderr().contains("another database"),
        "{}",
        follower.stderr()
    );
}
