//! `oc-client` against a real server over TLS with auth: every call, typed errors,
//! percent-encoded composite keys, retries that honour `Retry-After`, and `/watch`
//! read as a stream. (Which failures are retried, and that a retried write keeps its
//! idempotency key, is unit-tested in client/src/lib.rs.)

mod common;

use std::time::{Duration, Instant};

use common::Server;
use oc_client::{
    Client, ErrorClass, ErrorCode, RetryPolicy, TableSchema, WatchOptions, WriteBatch,
};
use serde_json::{json, Map, Value};

const ADMIN: &str = "admin-token-for-client-0123456789";

fn row(value: Value) -> Map<String, Value> {
    value.as_object().cloned().expect("an object")
}

struct Tls {
    _dir: tempfile::TempDir,
    server: Server,
    ca_pem: String,
}

fn start_tls(extra: &[&str]) -> Tls {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key, certified) = common::self_signed_cert(dir.path());
    let token = dir.path().join("admin-token");
    std::fs::write(&token, ADMIN).expect("write token");
    let mut args = vec![
        "--tls-cert",
        cert.to_str().expect("utf-8"),
        "--tls-key",
        key.to_str().expect("utf-8"),
        "--admin-token-file",
        token.to_str().expect("utf-8"),
    ];
    args.extend_from_slice(extra);
    let server = Server::start(&dir.path().join("data"), &args);
    assert!(server.api.starts_with("https://"), "{}", server.api);
    Tls {
        ca_pem: certified.cert.pem(),
        server,
        _dir: dir,
    }
}

impl Tls {
    /// A client of this server trusting its certificate, with `token`.
    fn client(&self, token: &str) -> Client {
        Client::builder(&self.server.api)
            .token(token)
            .ca_cert_pem(self.ca_pem.clone())
            .build()
            .expect("client")
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn every_call_works_over_tls_with_typed_answers_and_errors() {
    let tls = start_tls(&[]);
    let admin = tls.client(ADMIN);
    runtime().block_on(async {
        let created = admin.create_tenant("acme").await.expect("tenant");
        assert_eq!(created.tenant, "acme");
        assert_eq!(admin.list_tenants().await.expect("list"), vec!["acme"]);

        let events = TableSchema::new(
            "events",
            &[("who", "text"), ("seq", "int"), ("kind", "text")],
            &["who", "seq"],
        )
        .index("by_kind", &["kind"]);
        let table = admin.create_table("acme", &events).await.expect("table");
        assert_eq!(table.table.primary_key, vec!["who", "seq"]);
        let described = admin
            .describe_table("acme", "events")
            .await
            .expect("describe");
        assert_eq!(described.schema.indexes[0].name, "by_kind");
        assert_eq!(admin.list_tables("acme").await.expect("tables").len(), 1);

        // A composite key whose text holds a space, a slash and a percent sign.
        let batch = WriteBatch::default()
            .upsert(row(
                json!({"who": "ann smith/7%", "seq": 1, "kind": "click"}),
            ))
            .upsert(row(json!({"who": "bob", "seq": 2, "kind": "view"})));
        let written = admin
            .write_rows("acme", "events", batch)
            .await
            .expect("write");
        assert_eq!((written.inserted, written.updated), (2, 0));
        let found = admin
            .get_row("acme", "events", &[json!("ann smith/7%"), json!(1)])
            .await
            .expect("get");
        assert_eq!(found.expect("the row")["kind"], "click");
        let missing = admin
            .get_row("acme", "events", &[json!("nobody"), json!(9)])
            .await
            .expect("get");
        assert!(missing.is_none());

        let answer = admin
            .ask(
                "acme",
                "SELECT who, seq FROM events WHERE kind = $1",
                &[json!("view")],
            )
            .await
            .expect("ask");
        assert_eq!(answer.columns, vec!["who", "seq"]);
        assert_eq!(answer.rows, vec![vec![json!("bob"), json!(2)]]);
        let explained = admin
            .ask_explain("acme", "SELECT seq FROM events WHERE kind = 'view'", &[])
            .await
            .expect("explain");
        let plan = explained.plan.expect("a plan");
        assert_eq!(plan.root.expect("a root").stage, "project");

        let usage = admin.usage("acme").await.expect("usage");
        assert_eq!(usage.rows, 2);
        assert_eq!(usage.tables["events"].rows, 2);

        // Keys: a tenant key reaches its tenant only, and a revoked one nothing.
        let key = admin.create_key("acme", Some("app")).await.expect("key");
        assert_eq!(admin.list_keys("acme").await.expect("keys").len(), 1);
        let app = tls.client(&key.key);
        app.usage("acme").await.expect("a key reads its tenant");
        let refused = app.list_tenants().await.expect_err("admin only");
        assert_eq!(refused.code(), Some(&ErrorCode::Forbidden));
        assert_eq!(refused.class(), ErrorClass::Auth);
        admin.revoke_key("acme", &key.key_id).await.expect("revoke");
        let revoked = app.usage("acme").await.expect_err("revoked");
        assert_eq!(revoked.code(), Some(&ErrorCode::Unauthorized));

        // Typed errors carry the server's code, message and request id.
        let bad = admin
            .write_rows(
                "acme",
                "events",
                WriteBatch::default().upsert(row(json!({"who": "x", "seq": "one"}))),
            )
            .await
            .expect_err("wrong type");
        assert_eq!(bad.code(), Some(&ErrorCode::InvalidRow));
        assert_eq!(bad.class(), ErrorClass::Invalid);
        assert!(bad.to_string().contains("expected int"), "{bad}");
        let unknown = admin.usage("nobody").await.expect_err("no tenant");
        assert_eq!(unknown.class(), ErrorClass::NotFound);
        let sql = admin.ask("acme", "SELEC 1", &[]).await.expect_err("syntax");
        assert_eq!(sql.code(), Some(&ErrorCode::SqlSyntax));

        let spec = admin.openapi().await.expect("contract");
        assert_eq!(spec["openapi"], "3.1.0");
        let audit = admin
            .audit_logs(&oc_client::AuditQuery {
                tenant: Some("acme".into()),
                action: Some("key.revoke".into()),
                ..Default::default()
            })
            .await
            .expect("audit");
        assert_eq!(audit.entries.len(), 1, "{:?}", audit.entries);

        admin
            .drop_table("acme", "events")
            .await
            .expect("drop table");
        admin.drop_tenant("acme").await.expect("drop tenant");
        assert!(admin.list_tenants().await.expect("list").is_empty());
    });
}

#[test]
fn a_client_that_does_not_trust_the_certificate_is_refused() {
    let tls = start_tls(&[]);
    let untrusting = Client::builder(&tls.server.api)
        .token(ADMIN)
        .retry(RetryPolicy {
            attempts: 1,
            ..RetryPolicy::default()
        })
        .build()
        .expect("client");
    let err = runtime()
        .block_on(untrusting.list_tenants())
        .expect_err("untrusted certificate");
    assert!(matches!(err, oc_client::Error::Transport(_)), "{err}");
}

/// A key over its rate limit gets 429 with `Retry-After: 1`: the client waits that
/// long and tries again; without retries the caller sees the 429 and its wait.
#[test]
fn rate_limited_calls_wait_for_retry_after_and_succeed() {
    let tls = start_tls(&["--rate-limit-rps", "1", "--rate-limit-burst", "1"]);
    let admin = tls.client(ADMIN);
    let rt = runtime();
    let key = rt.block_on(async {
        admin.create_tenant("acme").await.expect("tenant");
        let items = TableSchema::new("items", &[("id", "int"), ("n", "int")], &["id"]);
        admin.create_table("acme", &items).await.expect("table");
        admin.create_key("acme", None).await.expect("key").key
    });
    let app = tls.client(&key);
    rt.block_on(async {
        let started = Instant::now();
        for id in 0..3 {
            let batch = WriteBatch::default().upsert(row(json!({"id": id, "n": 1})));
            let outcome = app
                .write_rows("acme", "items", batch)
                .await
                .expect("retried");
            assert_eq!(outcome.inserted, 1);
        }
        // The burst allows one; each later write waited for a Retry-After second.
        assert!(
            started.elapsed() >= Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
        let second_key = admin.create_key("acme", None).await.expect("key").key;
        let none = Client::builder(&tls.server.api)
            .token(second_key)
            .ca_cert_pem(tls.ca_pem.clone())
            .retry(RetryPolicy {
                attempts: 1,
                ..RetryPolicy::default()
            })
            .build()
            .expect("client");
        // Without retries, the 429 reaches the caller with its Retry-After.
        let mut limited = None;
        for _ in 0..5 {
            if let Err(e) = none.usage("acme").await {
                limited = Some(e);
                break;
            }
        }
        let limited = limited.expect("a 429 within 5 quick calls");
        assert_eq!(limited.code(), Some(&ErrorCode::RateLimited));
        match limited {
            oc_client::Error::Api { retry_after, .. } => {
                assert_eq!(retry_after, Some(Duration::from_secs(1)))
            }
            other => panic!("{other}"),
        }
        let usage = admin.usage("acme").await.expect("usage");
        assert_eq!(usage.rows, 3);
    });
}

#[test]
fn watch_streams_changes_as_typed_events() {
    let tls = start_tls(&[]);
    let admin = tls.client(ADMIN);
    runtime().block_on(async {
        admin.create_tenant("acme").await.expect("tenant");
        let items = TableSchema::new("items", &[("id", "int"), ("n", "int")], &["id"]);
        admin.create_table("acme", &items).await.expect("table");
        let mut stream = admin
            .watch("acme", &WatchOptions::default())
            .await
            .expect("watch");
        let hello = stream.next().await.expect("an event").expect("hello");
        assert_eq!(hello.event, "hello");
        let batch = WriteBatch::default()
            .upsert(row(json!({"id": 1, "n": 1})))
            .upsert(row(json!({"id": 2, "n": 2})));
        let written = admin
            .write_rows("acme", "items", batch)
            .await
            .expect("write");
        let mut keys = Vec::new();
        while keys.len() < 2 {
            let event = tokio::time::timeout(Duration::from_secs(10), stream.next())
                .await
                .expect("an event within 10 s")
                .expect("open")
                .expect("an event");
            if event.event == "change" {
                assert_eq!(event.data["lsn"], json!(written.lsn));
                keys.push(event.data["key"]["id"].clone());
            }
        }
        assert_eq!(keys, vec![json!(1), json!(2)]);
        assert_eq!(
            stream.last_event_id(),
            Some(format!("1-{}", written.lsn).as_str()),
            "the batch's last event carries its id"
        );
        // Given a server that is gone first, the stream opens on the next one.
        let gone = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let gone_url = format!("https://{}", gone.local_addr().expect("addr"));
        drop(gone);
        let both = Client::builder(format!("{gone_url},{}", tls.server.api))
            .token(ADMIN)
            .ca_cert_pem(tls.ca_pem.clone())
            .build()
            .expect("client");
        let options = WatchOptions {
            last_event_id: stream.last_event_id().map(str::to_string),
            ..WatchOptions::default()
        };
        let mut resumed = both.watch("acme", &options).await.expect("watch");
        let hello = resumed.next().await.expect("an event").expect("hello");
        assert_eq!(hello.event, "hello");
        assert_eq!(
            both.base_url(),
            tls.server.api,
            "it stays on the one that answered"
        );
    });
}
