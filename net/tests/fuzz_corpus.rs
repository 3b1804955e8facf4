//! Replays the `http_request` fuzz corpus (`fuzz/corpus/http_request`) through the
//! fuzz target's entry point, so `cargo test` on stable covers what the fuzzer keeps.
//!
//! `OC_WRITE_CORPUS=1 cargo test -p oc-net --test fuzz_corpus` (re)writes the seed
//! requests (see `write_seed_corpus`).

use std::path::{Path, PathBuf};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/http_request")
}

#[test]
fn http_request_corpus_replays_without_panics() {
    let dir = corpus_dir();
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("corpus entry").path();
        let bytes = std::fs::read(&path).expect("corpus file");
        let outcome = std::panic::catch_unwind(|| oc_net::api::fuzz::fuzz_entry(&bytes));
        assert!(
            outcome.is_ok(),
            "http_request panicked on {}",
            path.display()
        );
        count += 1;
    }
    assert!(count >= 10, "the corpus is committed ({count} files)");
}

const ADMIN: &str = "Bearer fuzz-admin-token-0123456789";

/// A request as a client sends it: head, `content-length` when there is a body.
fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:7070\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        out.push_str("content-type: application/json\r\n");
        out.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    out.push_str(body);
    out.into_bytes()
}

/// Seeds: one real request per endpoint, plus the header and path cases the API
/// answers specially. Run with `OC_WRITE_CORPUS=1`; the fuzzer grows the corpus.
#[test]
fn write_seed_corpus() {
    if std::env::var_os("OC_WRITE_CORPUS").is_none() {
        return;
    }
    let key = format!("Bearer oc.fuzz.k1.{}", "ab".repeat(32));
    let admin = [("authorization", ADMIN)];
    let create_table = r#"{"name":"items","columns":[{"name":"id","type":"int","nullable":false},{"name":"title","type":"text"},{"name":"emb","type":"vector(3)"},{"name":"meta","type":"json"},{"name":"score","type":"float"},{"name":"ok","type":"bool"}],"primary_key":["id"],"indexes":[{"name":"by_title","columns":["title","ok"]}]}"#;
    let write = r#"{"ops":[{"upsert":{"id":3,"name":"c","score":2.5,"ok":false,"doc":{"a":[1,null]},"emb":[0.5,1,-2]}},{"delete":{"id":1,"name":"a"}}],"idempotency_key":"req-42"}"#;
    let ask = r#"{"sql":"SELECT id, name, emb <-> $1 AS d FROM t WHERE score > $2 ORDER BY emb <-> $1 LIMIT 2","params":[[1,0,0],1.0]}"#;
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("list-tenants", request("GET", "/v1/tenants", &admin, "")),
        (
            "create-tenant",
            request("POST", "/v1/tenants", &admin, r#"{"tenant":"acme"}"#),
        ),
        (
            "usage",
            request(
                "GET",
                "/v1/tenants/fuzz/usage",
                &[("authorization", &key), ("x-request-id", "req-1.a:b")],
                "",
            ),
        ),
        (
            "create-table",
            request("POST", "/v1/tenants/fuzz/tables", &admin, create_table),
        ),
        (
            "write-rows",
            request("POST", "/v1/tenants/fuzz/tables/t/rows", &[], write),
        ),
        (
            "get-row",
            request("GET", "/v1/tenants/fuzz/tables/t/rows/2/b", &[], ""),
        ),
        (
            "get-row-escaped",
            request("GET", "/v1/tenants/fuzz/tables/t/rows/1/a%2Fb%20c", &[], ""),
        ),
        (
            "ask-explain",
            request("POST", "/v1/tenants/fuzz/ask?explain=true", &[], ask),
        ),
        (
            "create-key",
            request("POST", "/v1/tenants/fuzz/keys", &admin, r#"{"name":"ci"}"#),
        ),
        (
            "revoke-key",
            request("DELETE", "/v1/tenants/fuzz/keys/k1", &admin, ""),
        ),
        (
            "drop-table",
            request("DELETE", "/v1/tenants/fuzz/tables/t", &[], ""),
        ),
        (
            "chunked",
            b"POST /v1/tenants/fuzz/tables/t/rows HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ncontent-type: Application/JSON; charset=utf-8\r\n\r\n{\"ops\":[]}".to_vec(),
        ),
        (
            "method-not-allowed",
            request("PUT", "/v1/tenants/fuzz/usage", &[], ""),
        ),
        (
            "unknown-route",
            request("GET", "/v2/anything?x=1", &[("authorization", "Basic abc")], ""),
        ),
    ];
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).expect("corpus dir");
    for (name, bytes) in seeds {
        std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write");
    }
}
