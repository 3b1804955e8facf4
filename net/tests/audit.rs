//! The audit log against the real server: every operator action a scripted session
//! performs is read back from `GET /v1/audit/logs` with who, what, the request id and
//! the result; entries survive kill -9, travel through the archive into a restore
//! (which records itself), and an action the log cannot record is refused.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{request_as, restore_latest, scrape_value, wait_until_archived, Reply, Server};
use serde_json::{json, Value};

const ADMIN: &str = "audit-test-admin-token-0123456789";

fn start(data: &Path, archive: &str, env: &[(&str, &str)]) -> Server {
    let token_file = data.with_extension("token");
    std::fs::write(&token_file, format!("{ADMIN}\n")).expect("token file");
    let token = token_file.to_str().expect("utf-8");
    let args = [
        "--shards",
        "2",
        "--archive",
        archive,
        "--admin-token-file",
        token,
        "--tail-window-ms",
        "100",
    ];
    Server::try_start_with_env(None, data, &args, env)
        .unwrap_or_else(|e| panic!("server did not start: {e}"))
}

fn call(server: &Server, method: &str, path: &str, body: Option<Value>, token: &str) -> Reply {
    let body = body.map(|b| b.to_string());
    request_as(
        method,
        &format!("{}{path}", server.api),
        body.as_deref(),
        token,
    )
}

fn audit(server: &Server, query: &str) -> Reply {
    call(
        server,
        "GET",
        &format!("/v1/audit/logs{query}"),
        None,
        ADMIN,
    )
}

/// (action, actor, tenant, target, status, code) of each entry.
fn summary(entries: &Value) -> Vec<(String, String, String, String, u64, String)> {
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    entries
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            (
                s(&e["action"]),
                s(&e["actor"]),
                s(&e["tenant"]),
                s(&e["target"]),
                e["result"]["status"].as_u64().unwrap_or(0),
                s(&e["result"]["code"]),
            )
        })
        .collect()
}

fn row(
    action: &str,
    actor: &str,
    tenant: &str,
    target: &str,
    status: u64,
    code: &str,
) -> (String, String, String, String, u64, String) {
    (
        action.into(),
        actor.into(),
        tenant.into(),
        target.into(),
        status,
        code.into(),
    )
}

#[test]
fn every_operator_action_is_read_back_survives_kill_9_and_travels_through_restore() {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive_dir = dir.path().join("archive");
    let archive = format!("file://{}", archive_dir.display());
    let server = start(&dir.path().join("data"), &archive, &[]);

    // The scripted session.
    let mut request_ids = Vec::new();
    let mut did = |reply: Reply, status: u16| -> Reply {
        assert_eq!(reply.status, status, "{reply:?}");
        request_ids.push(reply.request_id.clone().expect("x-request-id"));
        reply
    };
    did(
        call(
            &server,
            "POST",
            "/v1/tenants",
            Some(json!({"tenant": "acme"})),
            ADMIN,
        ),
        201,
    );
    let key = did(
        call(
            &server,
            "POST",
            "/v1/tenants/acme/keys",
            Some(json!({"name": "ci"})),
            ADMIN,
        ),
        201,
    );
    let key_id = key.body["key_id"].as_str().expect("key_id").to_string();
    let secret = key.body["key"].as_str().expect("key").to_string();
    let items = common::items_table();
    did(
        call(
            &server,
            "POST",
            "/v1/tenants/acme/tables",
            Some(items.clone()),
            ADMIN,
        ),
        201,
    );
    did(
        call(
            &server,
            "POST",
            "/v1/tenants/acme/tables",
            Some(items),
            ADMIN,
        ),
        409,
    );
    let mut notes = common::items_table();
    notes["name"] = json!("notes");
    did(
        call(
            &server,
            "POST",
            "/v1/tenants/acme/tables",
            Some(notes),
            &secret,
        ),
        201,
    );
    did(
        call(
            &server,
            "DELETE",
            "/v1/tenants/acme/tables/notes",
            None,
            &secret,
        ),
        200,
    );
    did(
        call(
            &server,
            "POST",
            "/v1/tenants/acme/watch-tokens",
            None,
            &secret,
        ),
        201,
    );
    // A key may not drop its tenant: refused, and recorded as refused.
    did(
        call(&server, "DELETE", "/v1/tenants/acme", None, &secret),
        403,
    );
    did(
        call(
            &server,
            "DELETE",
            &format!("/v1/tenants/acme/keys/{key_id}"),
            None,
            ADMIN,
        ),
        200,
    );
    // Not recorded: a forged key never gets past authentication.
    let forged = format!("oc.acme.{key_id}.{}", "0".repeat(64));
    let refused = call(
        &server,
        "DELETE",
        "/v1/tenants/acme/tables/items",
        None,
        &forged,
    );
    assert_eq!(refused.status, 401, "{refused:?}");
    // Reads are not operator actions.
    assert_eq!(call(&server, "GET", "/v1/tenants", None, ADMIN).status, 200);

    let expected = vec![
        row("tenant.create", "admin", "acme", "", 201, ""),
        row("key.create", "admin", "acme", "ci", 201, ""),
        row("table.create", "admin", "acme", "items", 201, ""),
        row(
            "table.create",
            "admin",
            "acme",
            "items",
            409,
            "already_exists",
        ),
        row(
            "table.create",
            &format!("key:{key_id}"),
            "acme",
            "notes",
            201,
            "",
        ),
        row(
            "table.drop",
            &format!("key:{key_id}"),
            "acme",
            "notes",
            200,
            "",
        ),
        row(
            "watch_token.create",
            &format!("key:{key_id}"),
            "acme",
            "",
            201,
            "",
        ),
        row(
            "tenant.drop",
            &format!("key:{key_id}"),
            "acme",
            "",
            403,
            "forbidden",
        ),
        row("key.revoke", "admin", "acme", &key_id, 200, ""),
    ];
    let all = audit(&server, "");
    assert_eq!(all.status, 200, "{all:?}");
    assert_eq!(summary(&all.body["entries"]), expected, "{:#}", all.body);
    let entries = all.body["entries"].as_array().expect("entries");
    let ids: Vec<&str> = entries
        .iter()
        .map(|e| e["request_id"].as_str().expect("request_id"))
        .collect();
    assert_eq!(
        ids, request_ids,
        "each entry carries its request's x-request-id"
    );
    // The new key's id and each change's LSN are part of the result.
    assert_eq!(entries[1]["result"]["created"], json!(key_id));
    assert!(entries[2]["result"]["lsn"].as_u64().is_some_and(|l| l > 0));
    assert!(entries
        .iter()
        .all(|e| e["time"].as_str().is_some_and(|t| t.ends_with('Z'))));

    // Filters, the newest-first default window, and paging.
    let tables = audit(&server, "?tenant=acme&action=table.create");
    assert_eq!(summary(&tables.body["entries"]), expected[2..5].to_vec());
    let newest = audit(&server, "?limit=2");
    assert_eq!(summary(&newest.body["entries"]), expected[7..].to_vec());
    let first = audit(&server, "?after=0&limit=4");
    assert_eq!(summary(&first.body["entries"]), expected[..4].to_vec());
    let next = first.body["next_after"].as_u64().expect("next_after");
    let rest = audit(&server, &format!("?after={next}&limit=100"));
    assert_eq!(summary(&rest.body["entries"]), expected[4..].to_vec());
    let since_future = audit(&server, "?since=2999-01-01T00:00:00Z");
    assert_eq!(since_future.body["entries"], json!([]));

    // Bad parameters and callers.
    for (query, names) in [
        ("?limit=0", "limit"),
        ("?limit=5000", "limit"),
        ("?after=x", "after"),
        ("?since=yesterday", "RFC 3339"),
        ("?colour=red", "colour"),
    ] {
        let bad = audit(&server, query);
        assert_eq!(bad.status, 400, "{query}: {bad:?}");
        assert!(
            bad.body["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains(names),
            "{query}: {bad:?}"
        );
    }
    let other = call(
        &server,
        "POST",
        "/v1/tenants",
        Some(json!({"tenant": "beta"})),
        ADMIN,
    );
    assert_eq!(other.status, 201);
    let beta_key = call(&server, "POST", "/v1/tenants/beta/keys", None, ADMIN);
    let beta_key = beta_key.body["key"].as_str().expect("key").to_string();
    let as_key = call(&server, "GET", "/v1/audit/logs", None, &beta_key);
    assert_eq!(as_key.status, 403, "{as_key:?}");
    // The drill's digest endpoint: admin only, its one parameter checked.
    let digest = call(&server, "GET", "/v1/admin/digest?tables=false", None, ADMIN);
    assert_eq!(digest.status, 200, "{digest:?}");
    assert_eq!(digest.body["shards"].as_array().map(Vec::len), Some(2));
    let bad = call(&server, "GET", "/v1/admin/digest?tables=maybe", None, ADMIN);
    assert_eq!(bad.status, 400, "{bad:?}");
    assert_eq!(bad.body["error"]["code"], "invalid_query_string");
    let digest_as_key = call(&server, "GET", "/v1/admin/digest", None, &beta_key);
    assert_eq!(digest_as_key.status, 403, "{digest_as_key:?}");

    // Durable before the answer: kill -9 loses none of it.
    server.kill9();
    let server = start(&dir.path().join("data"), &archive, &[]);
    let after_crash = audit(&server, "?after=0&limit=9");
    assert_eq!(summary(&after_crash.body["entries"]), expected);

    // Shipped with the archive, brought back by restore, which records itself.
    wait_until_archived(&server, 2);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let restored_dir = dir.path().join("restored");
    loop {
        // The audit file is copied on the round after it grew: wait for the copy.
        let copied = std::fs::read_dir(archive_dir.join("audit"))
            .map(|d| d.count())
            .unwrap_or(0);
        if copied > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no audit file in the archive"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Let the round after the last action finish copying it.
    wait_until_archived(&server, 2);
    let run = restore_latest(&archive, &restored_dir);
    assert!(run.success, "{run:?}");
    let restored = start(&restored_dir, "none", &[]);
    let back = audit(&restored, "?after=0&limit=100");
    let summaries = summary(&back.body["entries"]);
    assert_eq!(summaries[..9].to_vec(), expected);
    let last = summaries.last().expect("the restore's entry");
    assert_eq!(
        (last.0.as_str(), last.1.as_str(), last.3.as_str(), last.4),
        ("restore", "oc-pitr", "latest", 200),
        "{:#}",
        back.body
    );
}

#[test]
fn an_action_the_audit_log_cannot_record_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let trigger = dir.path().join("fail-audit-sync");
    let failpoint = format!("audit.sync.err={}", trigger.display());
    let data = dir.path().join("data");
    let server = start(&data, "none", &[("OC_FAILPOINTS", &failpoint)]);
    let made = call(
        &server,
        "POST",
        "/v1/tenants",
        Some(json!({"tenant": "kept"})),
        ADMIN,
    );
    assert_eq!(made.status, 201, "{made:?}");

    std::fs::write(&trigger, b"").expect("arm");
    let refused = call(
        &server,
        "POST",
        "/v1/tenants",
        Some(json!({"tenant": "lost"})),
        ADMIN,
    );
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(refused.body["error"]["code"], "audit_unavailable");
    assert!(
        refused.body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("nothing was changed"),
        "{refused:?}"
    );
    // After a failed sync the log writes nothing more until a restart, even once the
    // disk is fine again: what reached it is unknown.
    std::fs::remove_file(&trigger).expect("disarm");
    let still = call(&server, "DELETE", "/v1/tenants/kept", None, ADMIN);
    assert_eq!(still.status, 503, "{still:?}");
    let tenants = call(&server, "GET", "/v1/tenants", None, ADMIN);
    assert_eq!(tenants.body["tenants"], json!(["kept"]), "{tenants:?}");
    let (_, scrape) = server.ops_get("/metrics");
    assert_eq!(scrape_value(&scrape, "oc_audit_failures_total"), Some(2.0));
    assert_eq!(scrape_value(&scrape, "oc_audit_log_failed"), Some(1.0));

    let _ = server.terminate();
    let server = start(&data, "none", &[("OC_FAILPOINTS", &failpoint)]);
    let log = audit(&server, "");
    assert_eq!(
        summary(&log.body["entries"]),
        vec![row("tenant.create", "admin", "kept", "", 201, "")],
        "the refused actions left no entry: {:#}",
        log.body
    );
    // A name of 1 MiB is refused, and recorded cut to 256 bytes, not whole.
    let mut huge = common::items_table();
    huge["name"] = json!("x".repeat(1 << 20));
    let refused = call(
        &server,
        "POST",
        "/v1/tenants/kept/tables",
        Some(huge),
        ADMIN,
    );
    assert_eq!(refused.status, 400, "{refused:?}");
    let log = audit(&server, "?action=table.create");
    let target = log.body["entries"][0]["target"].as_str().expect("target");
    assert!(
        target.len() <= 256 && target.ends_with('…'),
        "{}",
        target.len()
    );
    let dropped = call(&server, "DELETE", "/v1/tenants/kept", None, ADMIN);
    assert_eq!(dropped.status, 200, "{dropped:?}");
}

/// A key takes at most 60 operator actions at once (here, watch token mints): the next
/// is refused before the audit log records anything, so a loop of them, refused ones
/// included, cannot grow the log without bound.
#[test]
fn operator_actions_past_a_keys_limit_are_refused_unrecorded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = start(&data, "none", &[]);
    let created = call(
        &server,
        "POST",
        "/v1/tenants",
        Some(json!({"tenant": "acme"})),
        ADMIN,
    );
    assert_eq!(created.status, 201, "{created:?}");
    let key = call(&server, "POST", "/v1/tenants/acme/keys", None, ADMIN);
    assert_eq!(key.status, 201, "{key:?}");
    let secret = key.body["key"].as_str().expect("key").to_string();
    let mint = || {
        call(
            &server,
            "POST",
            "/v1/tenants/acme/watch-tokens",
            None,
            &secret,
        )
    };
    let mut minted = 0;
    let refused = loop {
        let reply = mint();
        if reply.status != 201 {
            break reply;
        }
        minted += 1;
        assert!(minted <= 61, "no limit after {minted} mints");
    };
    assert!((60..=61).contains(&minted), "{minted} minted");
    assert_eq!(refused.status, 429, "{refused:?}");
    assert_eq!(refused.body["error"]["code"], "rate_limited", "{refused:?}");
    let message = refused.body["error"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains("operator actions") && message.contains("watch token"),
        "{message}"
    );
    let recorded = |action: &str| {
        let reply = audit(&server, &format!("?action={action}&limit=1000"));
        assert_eq!(reply.status, 200, "{reply:?}");
        reply.body["entries"].as_array().expect("entries").len()
    };
    assert_eq!(recorded("watch_token.create"), minted);
    // Every operator action of the key shares that limit, its refused attempts at the
    // admin's actions too (each would be an entry synced to disk).
    let keys_before = recorded("key.create");
    for _ in 0..20 {
        let refused = call(&server, "POST", "/v1/tenants/acme/keys", None, &secret);
        assert_eq!(refused.status, 429, "{refused:?}");
    }
    assert_eq!(recorded("key.create"), keys_before);
    // The admin mints without a key's limit; the key's other requests go on.
    let admin = call(
        &server,
        "POST",
        "/v1/tenants/acme/watch-tokens",
        None,
        ADMIN,
    );
    assert_eq!(admin.status, 201, "{admin:?}");
    let usage = call(&server, "GET", "/v1/tenants/acme/usage", None, &secret);
    assert_eq!(usage.status, 200, "{usage:?}");
}
