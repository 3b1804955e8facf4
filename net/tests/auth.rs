//! Authentication and rate limits through the real binary: the admin token guards
//! tenant and key management, a tenant's API key reaches only that tenant, keys are
//! stored as hashes that survive restarts, revocation takes effect, and a key over its
//! rate limit gets 429 and is counted.

mod common;

use common::{items_table, request_as, Reply, Server};
use serde_json::json;

const ADMIN: &str = "admin-token-for-tests-0123456789";

struct Api<'a> {
    server: &'a Server,
}

impl Api<'_> {
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
        token: &str,
    ) -> Reply {
        let url = format!("{}{path}", self.server.api);
        request_as(method, &url, body.map(|b| b.to_string()).as_deref(), token)
    }
}

fn start(data: &std::path::Path, extra: &[&str]) -> Server {
    let token_file = data.with_extension("token");
    std::fs::write(&token_file, format!("{ADMIN}\n")).expect("token file");
    let mut args = vec![
        "--admin-token-file",
        token_file.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    Server::start(data, &args)
}

#[test]
fn keys_reach_only_their_tenant_survive_restarts_and_can_be_revoked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = start(&data, &["--shards", "2"]);
    let api = Api { server: &server };

    let anonymous = server.get("/v1/tenants");
    assert_eq!(anonymous.status, 401, "{anonymous:?}");
    assert_eq!(anonymous.body["error"]["code"], "unauthorized");
    // RFC 9110: a 401 names the scheme it takes.
    match ureq::get(&format!("{}/v1/tenants", server.api)).call() {
        Err(ureq::Error::Status(401, r)) => {
            assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        }
        other => panic!("expected 401, got {other:?}"),
    }
    assert_eq!(
        api.call("GET", "/v1/tenants", None, "wrong-token-wrong-token")
            .status,
        401
    );

    for t in ["acme", "beta"] {
        assert_eq!(
            api.call("POST", "/v1/tenants", Some(json!({"tenant": t})), ADMIN)
                .status,
            201
        );
        assert_eq!(
            api.call(
                "POST",
                &format!("/v1/tenants/{t}/tables"),
                Some(items_table()),
                ADMIN
            )
            .status,
            201
        );
    }
    let made = api.call(
        "POST",
        "/v1/tenants/acme/keys",
        Some(json!({"name": "app"})),
        ADMIN,
    );
    assert_eq!(made.status, 201, "{made:?}");
    let key = made.body["key"]
        .as_str()
        .expect("key shown once")
        .to_string();
    let key_id = made.body["key_id"].as_str().expect("id").to_string();
    let listed = api.call("GET", "/v1/tenants/acme/keys", None, ADMIN);
    assert_eq!(listed.body["keys"][0]["key_id"], key_id.as_str());
    assert!(
        !listed.body.to_string().contains(&key),
        "the secret is never listed"
    );

    let write = json!({"ops": [{"upsert": {"id": 1, "name": "by key"}}]});
    assert_eq!(
        api.call(
            "POST",
            "/v1/tenants/acme/tables/items/rows",
            Some(write.clone()),
            &key
        )
        .status,
        200
    );
    let got = api.call("GET", "/v1/tenants/acme/tables/items/rows/1", None, &key);
    assert_eq!(got.body["row"]["name"], "by key");

    let other = api.call(
        "POST",
        "/v1/tenants/beta/tables/items/rows",
        Some(write.clone()),
        &key,
    );
    assert_eq!(other.status, 403, "{other:?}");
    assert_eq!(other.body["error"]["code"], "forbidden");
    let admin_only = api.call("POST", "/v1/tenants", Some(json!({"tenant": "mine"})), &key);
    assert_eq!(admin_only.status, 403, "{admin_only:?}");
    assert_eq!(
        api.call("GET", "/v1/tenants/acme/keys", None, &key).status,
        403
    );
    let forged = format!(
        "{}{}",
        &key[..key.len() - 1],
        if key.ends_with('0') { '1' } else { '0' }
    );
    // A key that is not its tenant's (a changed secret, or a real key's tenant part
    // changed) is 401 wherever it is used: never 403, which says the key is good.
    let retargeted = key.replacen(".acme.", ".beta.", 1);
    assert_ne!(retargeted, key);
    for bad in [&forged, &retargeted] {
        for (method, path, body) in [
            ("GET", "/v1/tenants/acme/usage", None),
            ("GET", "/v1/tenants/beta/usage", None),
            (
                "POST",
                "/v1/tenants/acme/tables/items/rows",
                Some(write.clone()),
            ),
            (
                "POST",
                "/v1/tenants/beta/tables/items/rows",
                Some(write.clone()),
            ),
            ("GET", "/v1/tenants", None),
            ("POST", "/v1/tenants", Some(json!({"tenant": "mine"}))),
            ("GET", "/v1/tenants/beta/watch", None),
        ] {
            let answer = api.call(method, path, body, bad);
            assert_eq!(answer.status, 401, "{method} {path}: {answer:?}");
            assert_eq!(answer.body["error"]["code"], "unauthorized");
        }
    }

    let second = api.call("POST", "/v1/tenants/acme/keys", None, ADMIN);
    assert_eq!(second.status, 201, "{second:?}");
    let second_key = second.body["key"].as_str().expect("key").to_string();
    let revoked = api.call(
        "DELETE",
        &format!("/v1/tenants/acme/keys/{key_id}"),
        None,
        ADMIN,
    );
    assert_eq!(revoked.status, 200, "{revoked:?}");
    assert_eq!(
        api.call("GET", "/v1/tenants/acme/usage", None, &key).status,
        401
    );
    assert!(server.terminate().success());

    let server = start(&data, &["--shards", "2"]);
    let api = Api { server: &server };
    assert_eq!(
        api.call("GET", "/v1/tenants/acme/usage", None, &second_key)
            .status,
        200
    );
    assert_eq!(
        api.call("GET", "/v1/tenants/acme/usage", None, &key).status,
        401,
        "still revoked"
    );
    let stored = std::fs::read_dir(data.join("shard-0"))
        .expect("shard dir")
        .chain(std::fs::read_dir(data.join("shard-1")).expect("shard dir"))
        .map(|e| std::fs::read(e.expect("entry").path()).expect("read"))
        .any(|bytes| {
            bytes
                .windows(second_key.len())
                .any(|w| w == second_key.as_bytes())
        });
    assert!(!stored, "a key's secret must never reach the disk");
}

#[test]
fn a_key_over_its_rate_limit_gets_429_and_is_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(
        &dir.path().join("data"),
        &[
            "--shards",
            "1",
            "--rate-limit-rps",
            "2",
            "--rate-limit-burst",
            "5",
        ],
    );
    let api = Api { server: &server };
    assert_eq!(
        api.call(
            "POST",
            "/v1/tenants",
            Some(json!({"tenant": "acme"})),
            ADMIN
        )
        .status,
        201
    );
    let key = api.call("POST", "/v1/tenants/acme/keys", None, ADMIN).body["key"]
        .as_str()
        .expect("key")
        .to_string();
    let replies: Vec<Reply> = (0..20)
        .map(|_| api.call("GET", "/v1/tenants/acme/usage", None, &key))
        .collect();
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let limited: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    assert!(
        (5..=7).contains(&ok),
        "burst of 5 plus refill at 2/s, got {ok} OK"
    );
    assert_eq!(ok + limited.len(), 20);
    assert_eq!(limited[0].body["error"]["code"], "rate_limited");
    assert_eq!(limited[0].retry_after.as_deref(), Some("1"));
    // The admin token is not rate limited.
    assert!((0..10).all(|_| api
        .call("GET", "/v1/tenants/acme/usage", None, ADMIN)
        .status
        == 200));
    let (_, metrics) = server.ops_get("/metrics");
    let expected = format!(
        "oc_rate_limit_rejections_total{{shard=\"0\"}} {}",
        limited.len()
    );
    assert!(
        metrics.contains(&expected),
        "missing {expected} in\n{metrics}"
    );
}
