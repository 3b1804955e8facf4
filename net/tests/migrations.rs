//! Online schema migrations through the real server: a migration under 8 concurrent
//! writers reaches every acknowledged row exactly once in the new shape; an abort in
//! the middle of a backfill leaves the table exactly as it was; an abort after the
//! cutover is refused; a kill -9 in the middle of a backfill resumes after restart;
//! `/ask` over the migrated table answers as over a table created in that shape; a
//! planned failover waits for a migration, a forced one carries it over; a restore to
//! an instant in the middle of a backfill has the migration and the rows agree; reads
//! during a backfill see the new shape (dual read) until an abort; dropped and retyped
//! columns stay hidden across restarts; kill -9 again and again during an in-place
//! migration with checkpoints every second loses no acknowledged write.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{request, scrape_value, Server};
use serde_json::{json, Value};

/// How long a migration may take on a loaded 2-core machine.
const PATIENCE: Duration = Duration::from_secs(120);

/// Adds `double` = batch * 2, renames `name` to `title`, indexes `double`.
fn steps() -> Value {
    json!([
        {"op": "add_column", "name": "double", "type": "int", "default": "batch * 2"},
        {"op": "rename_column", "from": "name", "to": "title"},
        {"op": "add_index", "name": "by_double", "columns": ["double"]}
    ])
}

fn fill(server: &Server, tenant: &str, ids: std::ops::Range<i64>) {
    let ids: Vec<i64> = ids.collect();
    for chunk in ids.chunks(500) {
        let ops: Vec<Value> = chunk
            .iter()
            .map(|id| json!({"upsert": {"id": id, "name": format!("item {id}"), "batch": id % 97}}))
            .collect();
        let r = server.post(
            &format!("/v1/tenants/{tenant}/tables/items/rows"),
            &json!({"ops": ops}),
        );
        assert_eq!(r.status, 200, "{r:?}");
    }
}

fn start(server: &Server, tenant: &str) -> u64 {
    let r = server.post(
        &format!("/v1/tenants/{tenant}/migrations"),
        &json!({"table": "items", "steps": steps()}),
    );
    assert_eq!(r.status, 202, "{r:?}");
    r.body["id"].as_u64().expect("an id")
}

fn state(server: &Server, tenant: &str, id: u64) -> Value {
    let r = server.get(&format!("/v1/tenants/{tenant}/migrations/{id}"));
    assert_eq!(r.status, 200, "{r:?}");
    r.body
}

fn wait_for(server: &Server, tenant: &str, id: u64, wanted: &str) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let m = state(server, tenant, id);
        if m["state"] == wanted {
            return m;
        }
        assert!(
            Instant::now() < deadline
                && ["pending", "backfilling", "cutover_ready"]
                    .contains(&m["state"].as_str().unwrap_or("")),
            "migration never reached {wanted}: {m}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every row of the table, by id, through `/ask` (in pages under the answer limit).
fn dump(server: &Server, tenant: &str, columns: &str) -> BTreeMap<i64, Value> {
    let mut all = BTreeMap::new();
    let mut after = -1i64;
    loop {
        let r = server.post(
            &format!("/v1/tenants/{tenant}/ask"),
            &json!({"sql": format!("SELECT {columns} FROM items WHERE id > $1 ORDER BY id LIMIT 5000"),
                    "params": [after]}),
        );
        assert_eq!(r.status, 200, "{r:?}");
        let rows = r.body["rows"].as_array().expect("rows").clone();
        let Some(last) = rows.last() else {
            return all;
        };
        after = last[0].as_i64().expect("id");
        for row in rows {
            all.insert(row[0].as_i64().expect("id"), row);
        }
    }
}

#[test]
fn a_migration_under_eight_writers_reaches_every_acknowledged_row_once_in_the_new_shape() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    server.create_tenant_with_items("shop");
    fill(&server, "shop", 0..20_000);
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<BTreeMap<i64, i64>>> = Arc::default();
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (stop, acked, api) = (stop.clone(), acked.clone(), server.api.clone());
            std::thread::spawn(move || {
                let mut n = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    // Updates of old rows and inserts of new ones, interleaved.
                    let id = if n % 2 == 0 { (n * 8 + w) % 20_000 } else { 100_000 + n * 8 + w };
                    let batch = 1000 + n;
                    let body = json!({"ops": [{"upsert": {"id": id, "name": format!("w{w}"), "batch": batch}}]});
                    let r = request(
                        "POST",
                        &format!("{api}/v1/tenants/shop/tables/items/rows"),
                        Some(&body.to_string()),
                    );
                    match r.status {
                        200 => {
                            acked.lock().expect("lock").insert(id, batch);
                        }
                        // No 409 table_changed: a write validated against v0 whose
                        // apply comes after the cutover is carried into v1.
                        // After the cutover the v0 body is no longer the table's shape.
                        400 if r.body["error"]["code"] == "invalid_row" => break,
                        other => panic!("write {id}: {other} {r:?}"),
                    }
                    n += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let id = start(&server, "shop");
    let done = wait_for(&server, "shop", id, "done");
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().expect("writer");
    }
    assert!(
        done["progress"]["rows_total"].as_u64() >= Some(20_000),
        "{done}"
    );
    assert_eq!(
        done["progress"]["rows_done"], done["progress"]["rows_total"],
        "{done}"
    );
    let rows = dump(&server, "shop", "id, title, batch, double");
    let acked = acked.lock().expect("lock").clone();
    for id in 0..20_000 {
        let row = &rows[&id];
        let batch = acked.get(&id).copied().unwrap_or(id % 97);
        assert_eq!(row[2], batch, "row {id}: the last acknowledged write");
        assert_eq!(
            row[3],
            batch * 2,
            "row {id}: transformed exactly once, from its last value"
        );
    }
    for (id, batch) in acked.iter().filter(|(id, _)| **id >= 100_000) {
        let row = rows
            .get(id)
            .unwrap_or_else(|| panic!("acknowledged row {id} is missing"));
        assert_eq!(
            (row[2].clone(), row[3].clone()),
            (json!(batch), json!(batch * 2))
        );
    }
    assert_eq!(
        rows.len(),
        20_000 + acked.keys().filter(|id| **id >= 100_000).count()
    );
    // A finished migration's figures are those of its end: writes since change none.
    let ended = state(&server, "shop", id)["progress"].clone();
    let later = server.post(
        "/v1/tenants/shop/tables/items/rows",
        &json!({"ops": [{"upsert": {"id": 900_000, "title": "later", "batch": 1}}]}),
    );
    assert_eq!(later.status, 200, "{later:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(state(&server, "shop", id)["progress"], ended);
    // The new index serves queries; the old column name is gone.
    let r = server.post(
        "/v1/tenants/shop/ask",
        &json!({"sql": "SELECT count(*) FROM items WHERE double = 10"}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let old = server.post(
        "/v1/tenants/shop/ask",
        &json!({"sql": "SELECT name FROM items"}),
    );
    assert_eq!(old.status, 400, "{old:?}");
    // An abort after the cutover is refused, pointing to an inverse migration.
    let abort = server.post(
        &format!("/v1/tenants/shop/migrations/{id}/abort"),
        &json!({}),
    );
    assert_eq!(abort.status, 409, "{abort:?}");
    assert!(abort.body["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("inverse migration"));
    let (_, scrape) = server.ops_get("/metrics");
    assert_eq!(
        scrape_value(&scrape, "oc_migrations{shard=\"0\",state=\"done\"}").unwrap_or(0.0)
            + scrape_value(&scrape, "oc_migrations{shard=\"1\",state=\"done\"}").unwrap_or(0.0),
        1.0
    );
    assert!(scrape.contains("oc_backfill_rows_total"));
}

/// Keeps the tenant's shard busy with writes to another table, so the backfill runs
/// at its share of them (slowly) instead of at the idle floor: 2 KiB rows, so that even
/// a few hundred writes a second are well above where the floor fades out.
/// Writers to stop (set the flag, join the threads).
type Noise = (Arc<AtomicBool>, Vec<std::thread::JoinHandle<()>>);

fn busy(server: &Server, tenant: &str) -> Noise {
    let other = json!({"name": "noise",
        "columns": [{"name": "k", "type": "int"}, {"name": "pad", "type": "text"}],
        "primary_key": ["k"]});
    let r = server.post(&format!("/v1/tenants/{tenant}/tables"), &other);
    assert_eq!(r.status, 201, "{r:?}");
    let stop = Arc::new(AtomicBool::new(false));
    let threads = (0..4)
        .map(|w| {
            let (stop, url) = (
                stop.clone(),
                format!("{}/v1/tenants/{tenant}/tables/noise/rows", server.api),
            );
            std::thread::spawn(move || {
                let mut k = w;
                let pad = "x".repeat(2048);
                while !stop.load(Ordering::Relaxed) {
                    let body =
                        json!({"ops": [{"upsert": {"k": k % 1000, "pad": pad}}]}).to_string();
                    let _ = common::try_request("POST", &url, Some(&body));
                    k += 4;
                }
            })
        })
        .collect();
    (stop, threads)
}

/// A server whose `shop.items` (20,000 rows) is in the middle of a migration's
/// backfill, slowed by writes to another table: the server, the migration's id, and
/// the writers to stop.
fn in_the_middle_of_a_backfill(dir: &std::path::Path) -> (Server, u64, Noise) {
    let server = Server::start(dir, &[]);
    server.create_tenant_with_items("shop");
    fill(&server, "shop", 0..20_000);
    let noise = busy(&server, "shop");
    let id = start(&server, "shop");
    wait_backfilling(&server, "shop", id);
    (server, id, noise)
}

fn wait_backfilling(server: &Server, tenant: &str, id: u64) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let m = state(server, tenant, id);
        if m["state"] == "backfilling" && m["progress"]["rows_done"].as_u64() > Some(0) {
            return;
        }
        assert!(Instant::now() < deadline && m["state"] != "done", "{m}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn abort_in_the_middle_of_a_backfill_leaves_the_table_exactly_as_it_was() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    server.create_tenant_with_items("shop");
    fill(&server, "shop", 0..20_000);
    let before = dump(&server, "shop", "id, name, batch");
    let (stop, noise) = busy(&server, "shop");
    let id = start(&server, "shop");
    wait_backfilling(&server, "shop", id);
    let asked = Instant::now();
    let abort = server.post(
        &format!("/v1/tenants/shop/migrations/{id}/abort"),
        &json!({}),
    );
    let took = asked.elapsed();
    assert_eq!(abort.status, 200, "{abort:?}");
    assert_eq!(abort.body["state"], "aborted");
    eprintln!("abort answered in {took:?}");
    stop.store(true, Ordering::Relaxed);
    for t in noise {
        t.join().expect("noise");
    }
    assert_eq!(
        dump(&server, "shop", "id, name, batch"),
        before,
        "v0 exactly as it was"
    );
    let again = server.post(
        &format!("/v1/tenants/shop/migrations/{id}/abort"),
        &json!({}),
    );
    assert_eq!(again.status, 409, "{again:?}");
    // The table can be migrated again, and a second migration of it meanwhile is refused.
    let second = start(&server, "shop");
    let third = server.post(
        "/v1/tenants/shop/migrations",
        &json!({"table": "items", "steps": steps()}),
    );
    assert!(third.status == 409 || third.status == 400, "{third:?}");
    wait_for(&server, "shop", second, "done");
}

#[test]
fn a_kill_9_in_the_middle_of_a_backfill_resumes_after_restart_and_finishes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, id, (stop, noise)) = in_the_middle_of_a_backfill(dir.path());
    server.kill9();
    stop.store(true, Ordering::Relaxed);
    for t in noise {
        t.join().expect("noise");
    }
    let server = Server::start(dir.path(), &[]);
    let resumed = state(&server, "shop", id);
    assert!(
        ["backfilling", "cutover_ready", "done"].contains(&resumed["state"].as_str().unwrap_or("")),
        "{resumed}"
    );
    wait_for(&server, "shop", id, "done");
    let rows = dump(&server, "shop", "id, title, batch, double");
    assert_eq!(rows.len(), 20_000);
    for (id, row) in &rows {
        assert_eq!(row[2], id % 97);
        assert_eq!(row[3], (id % 97) * 2, "row {id}");
        assert_eq!(row[1], format!("item {id}"));
    }
    // The migrated table survives another restart (its new shape is in the log and
    // in checkpoints).
    drop(server);
    let server = Server::start(dir.path(), &[]);
    assert_eq!(dump(&server, "shop", "id, title, batch, double"), rows);
}

#[test]
fn ask_over_a_migrated_table_equals_ask_over_a_table_created_in_that_shape() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    server.create_tenant_with_items("a");
    fill(&server, "a", 0..3000);
    let id = start(&server, "a");
    wait_for(&server, "a", id, "done");
    let created = server.post("/v1/tenants", &json!({"tenant": "b"}));
    assert_eq!(created.status, 201, "{created:?}");
    let v1 = json!({
        "name": "items",
        "columns": [
            {"name": "id", "type": "int"},
            {"name": "title", "type": "text"},
            {"name": "batch", "type": "int"},
            {"name": "double", "type": "int"}
        ],
        "primary_key": ["id"],
        "indexes": [{"name": "by_batch", "columns": ["batch"]}, {"name": "by_double", "columns": ["double"]}]
    });
    assert_eq!(server.post("/v1/tenants/b/tables", &v1).status, 201);
    let ids: Vec<i64> = (0..3000).collect();
    for chunk in ids.chunks(500) {
        let ops: Vec<Value> = chunk
            .iter()
            .map(|id| json!({"upsert": {"id": id, "title": format!("item {id}"), "batch": id % 97, "double": (id % 97) * 2}}))
            .collect();
        assert_eq!(
            server
                .post("/v1/tenants/b/tables/items/rows", &json!({"ops": ops}))
                .status,
            200
        );
    }
    for sql in [
        "SELECT id, title, double FROM items WHERE double BETWEEN 20 AND 40 ORDER BY id LIMIT 50",
        "SELECT double, count(*) FROM items GROUP BY double ORDER BY double",
        "SELECT sum(double), min(title), max(batch) FROM items WHERE id < 1000",
        "SELECT id FROM items WHERE title LIKE 'item 12%' AND double > 100 ORDER BY id",
    ] {
        let a = server.post("/v1/tenants/a/ask", &json!({"sql": sql}));
        let b = server.post("/v1/tenants/b/ask", &json!({"sql": sql}));
        assert_eq!(
            (a.status, &a.body["rows"]),
            (200, &b.body["rows"]),
            "{sql}: {a:?} vs {b:?}"
        );
    }
}

#[test]
fn bad_migrations_are_refused_whole_naming_the_step() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    server.create_tenant_with_items("shop");
    fill(&server, "shop", 0..10); // row 0 has batch 0
    let cases = [
        (
            json!({"table": "items", "steps": [{"op": "add_column", "name": "inverse", "type": "int", "default": "10 / batch"}]}),
            400,
            "row id = 0 does not migrate",
        ),
        (
            json!({"table": "items", "steps": [{"op": "drop_column", "name": "id"}]}),
            400,
            "primary key",
        ),
        (
            json!({"table": "items", "steps": [{"op": "rename_column", "from": "name", "to": "title"}, {"op": "drop_column", "name": "nope"}]}),
            400,
            "step 1",
        ),
        (
            json!({"table": "items", "steps": []}),
            400,
            "at least one step",
        ),
        (
            json!({"table": "items", "steps": [{"op": "teleport"}]}),
            400,
            "teleport",
        ),
        (
            json!({"table": "items", "steps": [{"op": "add_column", "name": "x", "type": "int", "default": "1; DROP TABLE items"}]}),
            400,
            "step 0",
        ),
        (json!({"table": "ghost", "steps": steps()}), 400, "ghost"),
        (json!({"table": "items"}), 400, "steps"),
    ];
    for (body, status, needle) in cases {
        let r = server.post("/v1/tenants/shop/migrations", &body);
        assert_eq!(r.status, status, "{body}: {r:?}");
        let message = r.body["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains(needle), "{body}: {message}");
    }
    assert_eq!(server.get("/v1/tenants/shop/migrations/12345").status, 404);
    assert_eq!(server.get("/v1/tenants/shop/migrations/x").status, 404);
    assert_eq!(
        server.get("/v1/tenants/shop/migrations").body["migrations"],
        json!([])
    );
}

#[test]
fn a_planned_failover_waits_for_a_migration_and_a_forced_one_carries_it_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = format!("file://{}", dir.path().join("archive").display());
    let writer = Server::start(
        &dir.path().join("writer"),
        &[
            "--replication-listen",
            "127.0.0.1:0",
            "--sync-replication",
            "--archive",
            &archive,
            "--tail-window-ms",
            "100",
        ],
    );
    let leader = writer.replication.clone().expect("replication address");
    let follower = Server::start(
        &dir.path().join("follower"),
        &[
            "--mode",
            "follower",
            "--leader-addr",
            &leader,
            "--archive",
            &archive,
            "--tail-window-ms",
            "100",
        ],
    );
    writer.create_tenant_with_items("shop");
    fill(&writer, "shop", 0..20_000);
    let (stop, noise) = busy(&writer, "shop");
    let id = start(&writer, "shop");
    wait_backfilling(&writer, "shop", id);
    // The follower applies the writer's migration records: it knows it is running.
    wait_backfilling(&follower, "shop", id);

    let promote = |force: bool| {
        request(
            "POST",
            &format!(
                "{}/v1/admin/promote{}",
                follower.ops,
                if force { "?force=true" } else { "" }
            ),
            None,
        )
    };
    let refused = promote(false);
    assert_eq!(refused.status, 409, "{refused:?}");
    assert_eq!(
        refused.body["error"]["code"], "migration_running",
        "{refused:?}"
    );
    let why = refused.body["error"]["message"].as_str().unwrap_or("");
    assert!(
        why.contains(&format!("migration {id}")) && why.contains("abort"),
        "{why}"
    );
    let step_down = request("POST", &format!("{}/v1/admin/step-down", writer.ops), None);
    assert_eq!(step_down.status, 409, "{step_down:?}");
    assert_eq!(step_down.body["error"]["code"], "migration_running");
    // Neither refusal changed anything: the writer still takes writes.
    let write = writer.post(
        "/v1/tenants/shop/tables/items/rows",
        &json!({"ops": [{"upsert": {"id": 19_999, "name": "after the refusals", "batch": 5}}]}),
    );
    assert_eq!(write.status, 200, "{write:?}");

    // The writer is lost mid-backfill; a forced promotion carries the migration over.
    writer.kill9();
    stop.store(true, Ordering::Relaxed);
    for t in noise {
        t.join().expect("noise");
    }
    let promoted = promote(true);
    assert_eq!(promoted.status, 200, "{promoted:?}\n{}", follower.stderr());
    let done = wait_for(&follower, "shop", id, "done");
    assert_eq!(
        done["progress"]["rows_done"], done["progress"]["rows_total"],
        "{done}"
    );
    let rows = dump(&follower, "shop", "id, title, batch, double");
    assert_eq!(rows.len(), 20_000);
    for (id, row) in &rows {
        let batch = row[2].as_i64().expect("batch");
        assert_eq!(row[3], batch * 2, "row {id}: transformed once");
    }
    assert_eq!(rows[&19_999][1], "after the refusals");
}

/// A follower restarted while its writer runs a migration logs none of the migration's
/// records itself, even when its writer is out of reach at its start (paused here) and
/// its log has not yet taken a frame of the writer's: it catches up from the writer
/// when it is back, and ends with the writer's rows in the new shape.
#[test]
fn a_follower_restarted_during_a_migration_logs_none_of_its_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let writer = Server::start(
        &dir.path().join("writer"),
        &["--replication-listen", "127.0.0.1:0"],
    );
    let leader = writer.replication.clone().expect("replication address");
    let follower_flags = ["--mode", "follower", "--leader-addr", leader.as_str()];
    let follower_dir = dir.path().join("follower");
    let follower = Server::start(&follower_dir, &follower_flags);
    writer.create_tenant_with_items("shop");
    fill(&writer, "shop", 0..20_000);
    let id = start(&writer, "shop");
    wait_backfilling(&writer, "shop", id);
    // The follower applied the migration's start, and knows it is running.
    let deadline = Instant::now() + PATIENCE;
    while follower
        .get(&format!("/v1/tenants/shop/migrations/{id}"))
        .status
        != 200
    {
        assert!(
            Instant::now() < deadline,
            "the follower never saw the migration"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pause = |signal| {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(writer.pid() as i32, signal) }, 0);
    };
    pause(libc::SIGSTOP);
    follower.kill9();
    let follower = Server::start(&follower_dir, &follower_flags);
    // Several ticks of a backfill driver, had the follower run one.
    std::thread::sleep(Duration::from_millis(1500));
    pause(libc::SIGCONT);
    wait_for(&writer, "shop", id, "done");
    wait_for(&follower, "shop", id, "done");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, body) = follower.ops_get("/ready");
        if status == 200 && dump(&follower, "shop", "id, title, batch, double").len() == 20_000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the follower never caught up: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let columns = "id, title, batch, double";
    assert_eq!(
        dump(&follower, "shop", columns),
        dump(&writer, "shop", columns)
    );
    assert!(
        !follower.stderr().contains("stamps its own frames"),
        "{}",
        follower.stderr()
    );
}

/// Microseconds since the epoch, as `oc-pitr --target` takes them (RFC 3339).
fn rfc3339_now() -> (u64, String) {
    let us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_micros() as u64;
    (us, oc_ship::timestamp::format_rfc3339(us))
}

#[test]
fn a_restore_to_an_instant_in_the_middle_of_a_backfill_has_the_migration_and_rows_agree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = format!("file://{}", dir.path().join("archive").display());
    let server = Server::start(
        &dir.path().join("data"),
        &[
            "--archive",
            &archive,
            "--tail-window-ms",
            "100",
            "--checkpoint-interval-s",
            "1",
        ],
    );
    server.create_tenant_with_items("shop");
    // Enough rows for the backfill, at a tenth of the noise, to outlast the steps below.
    fill(&server, "shop", 0..60_000);
    let (stop, noise) = busy(&server, "shop");
    let id = start(&server, "shop");
    wait_backfilling(&server, "shop", id);
    // One writer, so the order is the commit order: (id, batch) before the target and
    // after it, with a quiet gap around the target.
    let write = |n: i64| {
        let id = (n * 37) % 20_000;
        let r = server.post(
            "/v1/tenants/shop/tables/items/rows",
            &json!({"ops": [{"upsert": {"id": id, "name": format!("p{n}"), "batch": 5_000 + n}}]}),
        );
        assert_eq!(r.status, 200, "{r:?}");
        (id, 5_000 + n)
    };
    let before: BTreeMap<i64, i64> = (0..200).map(write).collect();
    std::thread::sleep(Duration::from_millis(1500)); // a checkpoint in the middle of it
    std::thread::sleep(Duration::from_millis(300));
    let (target_us, target) = rfc3339_now();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        state(&server, "shop", id)["state"],
        "backfilling",
        "the target must fall in the middle of the backfill"
    );
    for n in 200..400 {
        write(n);
    }
    stop.store(true, Ordering::Relaxed);
    for t in noise {
        t.join().expect("noise");
    }
    wait_for(&server, "shop", id, "done");
    std::thread::sleep(Duration::from_millis(1000)); // the tails are shipped
    assert!(server.terminate().success());

    let restored_dir = dir.path().join("restored");
    let restored = common::restore_at(&archive, &target, &restored_dir);
    assert!(restored.success, "restore to {target}: {restored:?}");
    let (restarted_us, _) = rfc3339_now();
    let server = Server::start(&restored_dir, &["--archive", "none"]);
    // The cutover logged after the target is not restored: the migration was active
    // at the target, and this server resumes its backfill and cuts it over itself.
    let m = wait_for(&server, "shop", id, "done");
    let finished = m["finished"].as_str().expect("finished");
    assert!(
        oc_ship::timestamp::parse_rfc3339(finished).expect("RFC 3339") >= restarted_us,
        "{m}: cut over before this server started (target {target}, {target_us} µs)"
    );
    // Every row in the new shape, transformed once from its value at the target.
    let rows = dump(&server, "shop", "id, title, batch, double");
    assert_eq!(rows.len(), 60_000);
    for (id, row) in &rows {
        let (name, batch) = match before.get(id) {
            Some(batch) => (format!("p{}", batch - 5_000), *batch),
            None => (format!("item {id}"), id % 97),
        };
        assert_eq!(
            (row[1].clone(), row[2].clone()),
            (json!(name), json!(batch)),
            "row {id}"
        );
        assert_eq!(row[3], batch * 2, "row {id}");
    }
}

#[test]
fn a_migration_the_memory_budget_has_no_room_for_is_refused_naming_the_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    server.create_tenant_with_items("shop");
    fill(&server, "shop", 0..2_000);
    assert!(server.terminate().success());
    // The process is over a 1 MB budget at once: no room for the rows to grow.
    let server = Server::start(dir.path(), &["--memory-budget-bytes", "1000000"]);
    let r = server.post(
        "/v1/tenants/shop/migrations",
        &json!({"table": "items", "steps": steps()}),
    );
    assert_eq!(r.status, 413, "{r:?}");
    assert_eq!(r.body["error"]["code"], "limit_exceeded", "{r:?}");
    let why = r.body["error"]["message"].as_str().unwrap_or("");
    assert!(
        why.contains("converted rows") && why.contains("--memory-budget-bytes"),
        "{why}"
    );
    let listed = server.get("/v1/tenants/shop/migrations");
    assert_eq!(
        listed.body["migrations"],
        json!([]),
        "nothing started: {listed:?}"
    );
}

#[test]
fn a_write_retried_with_its_idempotency_key_after_a_cutover_gets_the_first_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    server.create_tenant_with_items("shop");
    fill(&server, "shop", 0..100);
    let body = json!({"idempotency_key": "order-1",
        "ops": [{"upsert": {"id": 5_000, "name": "first", "batch": 3}}]});
    let first = server.post("/v1/tenants/shop/tables/items/rows", &body);
    assert_eq!(first.status, 200, "{first:?}");
    let id = start(&server, "shop");
    wait_for(&server, "shop", id, "done");
    // The same request again, in the old shape (`name` is `title` now): the first
    // answer, and nothing written twice.
    let again = server.post("/v1/tenants/shop/tables/items/rows", &body);
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.body["lsn"], first.body["lsn"], "{again:?}");
    // The key with another request is still refused.
    let other = server.post(
        "/v1/tenants/shop/tables/items/rows",
        &json!({"idempotency_key": "order-1",
            "ops": [{"upsert": {"id": 5_000, "title": "second", "batch": 4}}]}),
    );
    assert_eq!(other.status, 409, "{other:?}");
    assert_eq!(other.body["error"]["code"], "idempotency_conflict");
    let row = dump(&server, "shop", "id, title, batch, double");
    assert_eq!(row[&5_000], json!([5_000, "first", 3, 6]));
}

#[test]
fn a_migration_that_would_take_the_tenant_past_its_quota_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &["--tenant-max-bytes", "8000"]);
    server.create_tenant_with_items("shop");
    fill(&server, "shop", 0..100);
    let used = server.get("/v1/tenants/shop/usage").body["bytes"]
        .as_u64()
        .expect("bytes");
    assert!(used < 8000, "{used}");
    // 100 bytes more in every row: about 10 kB more in all.
    let wide = json!({"table": "items", "steps": [{"op": "add_column", "name": "note",
        "type": "text", "default": format!("'{}'", "n".repeat(100))}]});
    let r = server.post("/v1/tenants/shop/migrations", &wide);
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.body["error"]["code"], "quota_exceeded", "{r:?}");
    // One that keeps rows about as they are fits.
    let id = start(&server, "shop");
    wait_for(&server, "shop", id, "done");
}

/// A migration is admitted on an estimate from its first rows; one whose later rows
/// grow more (here a copy of a column its first rows leave empty) is aborted once its
/// backfill takes the tenant past its quota, before it cuts over.
#[test]
fn a_backfill_that_grows_past_the_quota_is_aborted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &["--tenant-max-bytes", "600000"]);
    assert_eq!(
        server.post("/v1/tenants", &json!({"tenant": "q"})).status,
        201
    );
    let table = json!({"name": "t", "columns": [{"name": "id", "type": "int"},
        {"name": "s", "type": "text"}, {"name": "c", "type": "text"}],
        "primary_key": ["id"]});
    assert_eq!(server.post("/v1/tenants/q/tables", &table).status, 201);
    let rows = |ids: std::ops::Range<i64>, s: usize, c: usize| {
        let ops: Vec<Value> = ids
            .map(|id| json!({"upsert": {"id": id, "s": "s".repeat(s), "c": "c".repeat(c)}}))
            .collect();
        let r = server.post("/v1/tenants/q/tables/t/rows", &json!({"ops": ops}));
        assert_eq!(r.status, 200, "{r:?}");
    };
    rows(0..100, 2000, 0); // what the start samples: nothing to copy
    rows(100..110, 0, 30_000); // 300 kB the copy doubles
    let used = server.get("/v1/tenants/q/usage").body["bytes"]
        .as_u64()
        .expect("bytes");
    assert!(used < 600_000 && used + 300_000 > 600_000, "{used}");
    let copy = json!({"table": "t", "steps": [{"op": "add_column", "name": "c2",
        "type": "text", "default": "c"}]});
    let r = server.post("/v1/tenants/q/migrations", &copy);
    assert_eq!(r.status, 202, "admitted on its first rows: {r:?}");
    let id = r.body["id"].as_u64().expect("id");
    let m = wait_for(&server, "q", id, "aborted");
    assert_eq!(m["state"], "aborted", "{m}");
    let columns = server.get("/v1/tenants/q/tables/t");
    assert_eq!(columns.status, 200, "{columns:?}");
    assert!(
        !columns.body.to_string().contains("c2"),
        "the table kept its shape: {columns:?}"
    );
}

/// A migration that adds a vector to every row counts against the vector quota too.
#[test]
fn a_migration_that_would_take_the_tenant_past_its_vector_quota_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &["--tenant-max-vectors", "150"]);
    assert_eq!(
        server.post("/v1/tenants", &json!({"tenant": "emb"})).status,
        201
    );
    let table = json!({"name": "items", "columns": [{"name": "id", "type": "int"},
        {"name": "v", "type": "vector(2)"}], "primary_key": ["id"]});
    assert_eq!(server.post("/v1/tenants/emb/tables", &table).status, 201);
    let ops: Vec<Value> = (0..80)
        .map(|id| json!({"upsert": {"id": id, "v": [id, 1]}}))
        .collect();
    let r = server.post("/v1/tenants/emb/tables/items/rows", &json!({"ops": ops}));
    assert_eq!(r.status, 200, "{r:?}");
    // A copy of every row's vector: 160 in all, past the 150 allowed.
    let copy = json!({"table": "items", "steps": [{"op": "add_column", "name": "w",
        "type": "vector(2)", "default": "v"}]});
    let r = server.post("/v1/tenants/emb/migrations", &copy);
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.body["error"]["code"], "quota_exceeded", "{r:?}");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("vector")),
        "{r:?}"
    );
    let usage = server.get("/v1/tenants/emb/usage");
    assert_eq!(usage.body["vectors"], 80, "{usage:?}");
}

/// While a migration runs, reads see its new shape: rows stay stored in the old one and
/// are transformed as they are read (dual read), writers keep writing the old shape,
/// and an abort puts reads back on the old shape at once.
#[test]
fn during_a_backfill_reads_see_the_new_shape_and_an_abort_takes_it_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, id, (stop, noise)) = in_the_middle_of_a_backfill(dir.path());

    let row = |id: i64| server.get(&format!("/v1/tenants/shop/tables/items/rows/{id}"));
    let r = row(1234);
    assert_eq!(r.status, 200, "{r:?}");
    let batch = 1234 % 97;
    assert_eq!(
        r.body["row"],
        json!({"id": 1234, "title": "item 1234", "batch": batch, "double": batch * 2}),
        "a row read during the backfill is in the new shape"
    );
    // Writers write the old shape; it reads back in the new one.
    let w = server.post(
        "/v1/tenants/shop/tables/items/rows",
        &json!({"ops": [{"upsert": {"id": 1234, "name": "renamed", "batch": 5}}]}),
    );
    assert_eq!(w.status, 200, "{w:?}");
    assert_eq!(
        row(1234).body["row"],
        json!({"id": 1234, "title": "renamed", "batch": 5, "double": 10})
    );
    let ask = |sql: &str| server.post("/v1/tenants/shop/ask", &json!({ "sql": sql }));
    let r = ask("SELECT id, title, double FROM items WHERE id BETWEEN 100 AND 102 ORDER BY id");
    assert_eq!(r.status, 200, "{r:?}");
    let expected: Vec<Value> = (100..=102)
        .map(|i| json!([i, format!("item {i}"), (i % 97) * 2]))
        .collect();
    assert_eq!(r.body["rows"], json!(expected), "{r:?}");
    let r = ask("SELECT COUNT(*) FROM items WHERE double = 10");
    assert_eq!(r.status, 200, "{r:?}");
    let tens = (0..20_000).filter(|i| i % 97 == 5).count() + 1;
    assert_eq!(r.body["rows"][0][0], tens, "{r:?}");
    let r = ask("EXPLAIN SELECT title FROM items WHERE double = 10");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.body
            .to_string()
            .contains(&format!("dual read: migration {id}")),
        "{r:?}"
    );
    let described = server.get("/v1/tenants/shop/tables/items");
    assert_eq!(described.body["migration"]["id"], id, "{described:?}");
    let columns = |schema: &Value| -> Vec<String> {
        schema["columns"]
            .as_array()
            .expect("columns")
            .iter()
            .map(|c| c["name"].as_str().expect("name").to_string())
            .collect()
    };
    assert_eq!(
        columns(&described.body["schema"]),
        ["id", "name", "batch"],
        "writes use the current shape"
    );
    assert_eq!(
        columns(&described.body["migration"]["read_schema"]),
        ["id", "title", "batch", "double"],
        "reads see the new one"
    );
    // An index over columns the migration keeps as they are still serves.
    let r = ask("EXPLAIN SELECT COUNT(*) FROM items WHERE batch = 5");
    assert!(r.body.to_string().contains("by_batch"), "{r:?}");
    let r = ask("SELECT COUNT(*) FROM items WHERE batch = 5");
    assert_eq!(r.body["rows"][0][0], tens, "{r:?}");
    let old_name = ask("SELECT name FROM items WHERE id = 1");
    assert_eq!(
        old_name.status, 400,
        "the old shape is not what reads see: {old_name:?}"
    );

    let abort = server.post(
        &format!("/v1/tenants/shop/migrations/{id}/abort"),
        &json!({}),
    );
    assert_eq!(abort.status, 200, "{abort:?}");
    stop.store(true, Ordering::Relaxed);
    for t in noise {
        t.join().expect("noise");
    }
    assert_eq!(
        row(1234).body["row"],
        json!({"id": 1234, "name": "renamed", "batch": 5}),
        "after the abort reads see the old shape again"
    );
    let r = ask("SELECT name FROM items WHERE id = 1234");
    assert_eq!(r.body["rows"], json!([["renamed"]]), "{r:?}");
    let r = ask("SELECT double FROM items WHERE id = 1234");
    assert_eq!(r.status, 400, "{r:?}");
    let described = server.get("/v1/tenants/shop/tables/items");
    assert!(described.body.get("migration").is_none(), "{described:?}");
}

/// Runs `steps` on `items` to its end; returns the migration's final state.
fn migrate(server: &Server, tenant: &str, steps: Value) -> Value {
    let r = server.post(
        &format!("/v1/tenants/{tenant}/migrations"),
        &json!({"table": "items", "steps": steps}),
    );
    assert_eq!(r.status, 202, "{r:?}");
    wait_for(
        server,
        tenant,
        r.body["id"].as_u64().expect("an id"),
        "done",
    )
}

#[test]
fn dropped_and_retyped_columns_stay_hidden_across_restarts_and_their_names_can_be_taken_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let checkpoints = ["--checkpoint-interval-s", "1"];
    let server = Server::start(dir.path(), &checkpoints);
    server.create_tenant_with_items("shop");
    fill(&server, "shop", 0..2_000);
    migrate(
        &server,
        "shop",
        json!([
            {"op": "drop_column", "name": "name"},
            {"op": "drop_index", "name": "by_batch"},
            {"op": "change_type", "column": "batch", "type": "float", "using": "batch * 1.5"}
        ]),
    );
    let shape = |server: &Server| {
        let r = server.get("/v1/tenants/shop/tables/items");
        assert_eq!(r.status, 200, "{r:?}");
        r.body["schema"]["columns"].clone()
    };
    let migrated = json!([
        {"name": "id", "type": "int", "nullable": false},
        {"name": "batch", "type": "float", "nullable": true}
    ]);
    assert_eq!(shape(&server), migrated);
    let star = server.post(
        "/v1/tenants/shop/ask",
        &json!({"sql": "SELECT * FROM items WHERE id = 10"}),
    );
    assert_eq!(star.body["columns"], json!(["id", "batch"]), "{star:?}");
    assert_eq!(star.body["rows"], json!([[10, 15.0]]), "{star:?}");
    // The dropped column cannot be written, read or filtered on.
    let write = |server: &Server, row: Value| {
        server.post(
            "/v1/tenants/shop/tables/items/rows",
            &json!({"ops": [{"upsert": row}]}),
        )
    };
    let r = write(&server, json!({"id": 1, "name": "back", "batch": 1.0}));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("\"name\""),
        "{r:?}"
    );
    let r = server.post(
        "/v1/tenants/shop/ask",
        &json!({"sql": "SELECT name FROM items"}),
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(
        write(&server, json!({"id": 5000, "batch": 0.25})).status,
        200
    );
    let before = dump(&server, "shop", "*");
    assert_eq!(before.len(), 2_001);
    // Restarted from a checkpoint and the log after it: the same shape and rows.
    std::thread::sleep(Duration::from_millis(2_500));
    server.kill9();
    let server = Server::start(dir.path(), &checkpoints);
    assert_eq!(shape(&server), migrated);
    assert_eq!(dump(&server, "shop", "*"), before);
    // A new column may take a dropped one's name: it holds its own values, never the
    // dropped column's, which its rows still hold in their old slot.
    migrate(
        &server,
        "shop",
        json!([{"op": "add_column", "name": "name", "type": "text", "default": "'fresh'"}]),
    );
    let named = dump(&server, "shop", "id, name, batch");
    assert_eq!(named.len(), 2_001);
    for (id, row) in &named {
        assert_eq!(row[1], "fresh", "row {id}");
        assert_eq!(row[2], before[id][1], "row {id}");
    }
    server.kill9();
    let server = Server::start(dir.path(), &checkpoints);
    assert_eq!(dump(&server, "shop", "id, name, batch"), named);
}

/// kill -9 again and again while writers write and a migration that drops, retypes
/// and adds columns converts the table in place, with a checkpoint every second (so
/// restarts load checkpoints copied while rows were being converted): every
/// acknowledged write is there once the migration is done, transformed exactly once.
#[test]
fn kill_9_again_and_again_during_an_in_place_migration_loses_no_acknowledged_write() {
    const KEYS: i64 = 100_000;
    const WRITERS: i64 = 4;
    let dir = tempfile::tempdir().expect("tempdir");
    let flags = ["--checkpoint-interval-s", "1"];
    let mut server = Server::start(dir.path(), &flags);
    server.create_tenant_with_items("shop");
    fill(&server, "shop", 0..KEYS);
    let api = Arc::new(Mutex::new(server.api.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    // Per key: the last batch acknowledged, and those sent since without an answer
    // (each may have been logged before a kill).
    let seen = Arc::new(Mutex::new(BTreeMap::<i64, (i64, Vec<i64>)>::new()));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (api, stop, seen) = (api.clone(), stop.clone(), seen.clone());
            std::thread::spawn(move || {
                let mut round = 1i64;
                while !stop.load(Ordering::Relaxed) {
                    for id in (w..KEYS).step_by(WRITERS as usize).take(50) {
                        let batch = 1000 * round + id % 97;
                        let body = json!({"ops": [{"upsert":
                            {"id": id, "name": format!("item {id}"), "batch": batch}}]});
                        let url = format!(
                            "{}/v1/tenants/shop/tables/items/rows",
                            api.lock().expect("api")
                        );
                        let ok = matches!(
                            common::try_request("POST", &url, Some(&body.to_string())),
                            Ok(r) if r.status == 200
                        );
                        let mut seen = seen.lock().expect("seen");
                        let entry = seen.entry(id).or_insert((id % 97, Vec::new()));
                        if ok {
                            *entry = (batch, Vec::new());
                        } else {
                            entry.1.push(batch);
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                    round += 1;
                }
            })
        })
        .collect();
    // Writes to another table keep the shard busy, so the backfill takes its tenth
    // and the kills land in the middle of it.
    let noise_table = json!({"name": "noise",
        "columns": [{"name": "k", "type": "int"}, {"name": "pad", "type": "text"}],
        "primary_key": ["k"]});
    assert_eq!(
        server.post("/v1/tenants/shop/tables", &noise_table).status,
        201
    );
    let noise: Vec<_> = (0..4)
        .map(|w| {
            let (api, stop) = (api.clone(), stop.clone());
            std::thread::spawn(move || {
                let body =
                    |k: i64| json!({"ops": [{"upsert": {"k": k % 1000, "pad": "x".repeat(2048)}}]});
                let mut k = w;
                while !stop.load(Ordering::Relaxed) {
                    let url = format!(
                        "{}/v1/tenants/shop/tables/noise/rows",
                        api.lock().expect("api")
                    );
                    if common::try_request("POST", &url, Some(&body(k).to_string())).is_err() {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    k += 4;
                }
            })
        })
        .collect();
    let r = server.post(
        "/v1/tenants/shop/migrations",
        &json!({"table": "items", "steps": [
            {"op": "drop_column", "name": "name"},
            {"op": "change_type", "column": "batch", "type": "float", "using": "batch * 2.5"},
            {"op": "add_column", "name": "plus", "type": "int", "default": "batch + 1"},
            {"op": "add_index", "name": "by_plus", "columns": ["plus"]}
        ]}),
    );
    assert_eq!(r.status, 202, "{r:?}");
    let id = r.body["id"].as_u64().expect("an id");
    let mut kills = 0;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let m = state(&server, "shop", id);
        if m["state"] == "done" || kills == 6 {
            break;
        }
        assert!(Instant::now() < deadline, "{m}");
        std::thread::sleep(Duration::from_millis(300 + 200 * kills));
        server.kill9();
        kills += 1;
        server = Server::start(dir.path(), &flags);
        *api.lock().expect("api") = server.api.clone();
    }
    let done = wait_for(&server, "shop", id, "done");
    stop.store(true, Ordering::Relaxed);
    for w in writers.into_iter().chain(noise) {
        w.join().expect("writer");
    }
    eprintln!("{kills} kills; {done}");
    let rows = dump(&server, "shop", "*");
    assert_eq!(rows.len(), KEYS as usize);
    let seen = seen.lock().expect("seen");
    for (key, row) in &rows {
        let (acked, unanswered) = seen.get(key).cloned().unwrap_or((key % 97, Vec::new()));
        let batch = row[1].as_f64().expect("batch is a float");
        let written = std::iter::once(acked)
            .chain(unanswered.iter().copied())
            .find(|b| *b as f64 * 2.5 == batch);
        let Some(b) = written else {
            panic!(
                "row {key}: {row} is neither the acknowledged batch {acked} nor one of \
                 {unanswered:?} sent since, transformed once"
            )
        };
        assert_eq!(row.as_array().map(Vec::len), Some(3), "row {key}: {row}");
        assert_eq!(row[2], b + 1, "row {key}: {row}");
    }
    // The new index holds every row.
    let counted = server.post(
        "/v1/tenants/shop/ask",
        &json!({"sql": "SELECT count(*) FROM items WHERE plus >= 0"}),
    );
    assert_eq!(counted.body["rows"], json!([[KEYS]]), "{counted:?}");
}
