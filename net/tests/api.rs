//! The data API through the real binary: a user's first session, restart, bad input of
//! every kind (each with its documented error while the server keeps serving), slow
//! clients, the connection limit, a shard-count mismatch, and numbers (doubles and
//! vectors' f32s) that come back bit for bit.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{items_table, Server};
use serde_json::json;

fn assert_error(reply: &common::Reply, status: u16, code: &str) {
    assert_eq!(reply.status, status, "{reply:?}");
    let error = &reply.body["error"];
    assert_eq!(error["code"], code, "{reply:?}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{reply:?}"
    );
    assert_eq!(
        error["request_id"].as_str(),
        reply.request_id.as_deref(),
        "the body and the header carry the same request id"
    );
}

/// A GET sent byte for byte as written; returns the whole answer.
fn raw_get(addr: &str, path: &str) -> String {
    let mut raw = TcpStream::connect(addr).expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    raw.write_all(request.as_bytes()).expect("send");
    let mut answer = String::new();
    raw.read_to_string(&mut answer).expect("answer");
    answer
}

#[test]
fn first_session_writes_reads_and_survives_a_clean_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = Server::start(&data, &["--shards", "2"]);
    let created = server.post("/v1/tenants", &json!({"tenant": "acme"}));
    assert_eq!(created.status, 201, "{created:?}");
    assert!(created.body["lsn"].as_u64().is_some());
    assert!(created.request_id.is_some());
    assert_eq!(
        server
            .post("/v1/tenants/acme/tables", &items_table())
            .status,
        201
    );
    let written = server.post(
        "/v1/tenants/acme/tables/items/rows",
        &json!({"ops": [
            {"upsert": {"id": 1, "name": "one", "batch": 7}},
            {"upsert": {"id": 2, "name": "two / ü", "batch": 7}},
            {"delete": {"id": 3}}
        ]}),
    );
    assert_eq!(written.status, 200, "{written:?}");
    assert_eq!(written.body["inserted"], 2);
    assert_eq!(written.body["missing"], 1);
    let lsn = written.body["lsn"].as_u64().expect("lsn");

    let got = server.get("/v1/tenants/acme/tables/items/rows/2");
    assert_eq!(
        got.body["row"],
        json!({"id": 2, "name": "two / ü", "batch": 7})
    );
    let usage = server.get("/v1/tenants/acme/usage");
    assert_eq!(usage.body["rows"], 2);
    assert_eq!(usage.body["tables"]["items"]["rows"], 2);
    assert!(usage.body["applied_lsn"].as_u64().expect("applied") >= lsn);
    assert_eq!(server.get("/v1/tenants").body["tenants"], json!(["acme"]));
    let status = server.terminate();
    assert!(status.success(), "SIGTERM exits 0, got {status:?}");

    let server = Server::start(&data, &["--shards", "2"]);
    let got = server.get("/v1/tenants/acme/tables/items/rows/1");
    assert_eq!(got.body["row"]["name"], "one", "{got:?}");
    let tables = server.get("/v1/tenants/acme/tables");
    assert_eq!(tables.body["tables"][0]["schema"], {
        let mut t = items_table();
        t["columns"][0]["nullable"] = json!(false);
        t["columns"][1]["nullable"] = json!(true);
        t["columns"][2]["nullable"] = json!(true);
        t
    });
    // Dropping works and is durable too.
    assert_eq!(server.delete("/v1/tenants/acme/tables/items").status, 200);
    assert_error(
        &server.get("/v1/tenants/acme/tables/items"),
        404,
        "not_found",
    );
    assert_eq!(server.delete("/v1/tenants/acme").status, 200);
    assert_error(&server.get("/v1/tenants/acme/usage"), 404, "not_found");
}

#[test]
fn bad_input_gets_the_documented_error_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &["--max-body-bytes", "4096"]);
    server.create_tenant_with_items("acme");
    let rows = "/v1/tenants/acme/tables/items/rows";

    assert_error(&server.post_raw(rows, "{\"ops\": [ {"), 400, "invalid_json");
    assert_error(&server.post_raw(rows, ""), 400, "invalid_json");
    assert_error(&server.post(rows, &json!({"opz": []})), 400, "invalid_json");
    // serde reads a struct from an array of its fields too; the API takes objects only.
    assert_error(&server.post_raw(rows, "[[]]"), 400, "invalid_json");
    assert_error(
        &server.post_raw("/v1/tenants", r#"["bcme"]"#),
        400,
        "invalid_json",
    );
    assert_error(
        &server.post(
            rows,
            &json!({"ops": [{"delete": {"id": 1}}], "idempotency_key": ""}),
        ),
        400,
        "invalid_json",
    );
    assert_error(&server.post(rows, &json!({"ops": []})), 400, "invalid_row");
    // A column named twice in one row is refused, not read as its last value.
    let twice = server.post_raw(
        rows,
        r#"{"ops": [{"upsert": {"id": 12, "name": "first", "name": "second"}}]}"#,
    );
    assert_error(&twice, 400, "invalid_json");
    assert!(
        twice.body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("column \"name\" is given twice")),
        "{twice:?}"
    );
    assert_error(&server.get(&format!("{rows}/12")), 404, "row_not_found");
    assert_error(
        &server.post(
            rows,
            &json!({"ops": [{"upsert": {"id": "x", "name": "a"}}]}),
        ),
        400,
        "invalid_row",
    );
    assert_error(
        &server.post(rows, &json!({"ops": [{"upsert": {"name": "no key"}}]})),
        400,
        "invalid_row",
    );
    // A batch with one bad row applies nothing.
    let mixed = json!({"ops": [{"upsert": {"id": 10, "name": "ok"}}, {"upsert": {"id": 11, "batch": "bad"}}]});
    assert_error(&server.post(rows, &mixed), 400, "invalid_row");
    assert_error(&server.get(&format!("{rows}/10")), 404, "row_not_found");

    assert_error(&server.get("/v1/tenants/nobody/usage"), 404, "not_found");
    assert_error(
        &server.get("/v1/tenants/acme/tables/nope"),
        404,
        "not_found",
    );
    assert_error(
        &server.post(
            "/v1/tenants/acme/tables/nope/rows",
            &json!({"ops": [{"upsert": {"id": 1}}]}),
        ),
        404,
        "not_found",
    );
    // Sent raw: HTTP clients would decode and normalise `..` away before sending.
    let addr = server.api.trim_start_matches("http://").to_string();
    for bad in ["..", "%2e%2e", "Acme", "a%2F..", "-x", &"a".repeat(64)] {
        let answer = raw_get(&addr, &format!("/v1/tenants/{bad}/usage"));
        assert!(answer.starts_with("HTTP/1.1 400"), "{bad}: {answer}");
        assert!(answer.contains("invalid_name"), "{bad}: {answer}");
    }
    assert_error(
        &server.post("/v1/tenants", &json!({"tenant": "../etc"})),
        400,
        "invalid_name",
    );
    assert_error(
        &server.post("/v1/tenants", &json!({"tenant": "acme"})),
        409,
        "already_exists",
    );
    assert_error(
        &server.post(
            "/v1/tenants/acme/tables",
            &json!({"name": "t", "columns": [{"name": "v", "type": "vector(0)"}], "primary_key": ["v"]}),
        ),
        400,
        "invalid_schema",
    );
    assert_error(
        &server.post(
            "/v1/tenants/acme/tables",
            &json!({"name": "t", "columns": [{"name": "id", "type": "integer"}], "primary_key": ["id"]}),
        ),
        400,
        "invalid_schema",
    );
    let huge = json!({"ops": [{"upsert": {"id": 1, "name": "x".repeat(5000)}}]});
    assert_error(&server.post(rows, &huge), 413, "body_too_large");
    assert_error(&server.get(&format!("{rows}/1/2")), 400, "invalid_key");
    assert_error(&server.get(&format!("{rows}/abc")), 400, "invalid_key");
    assert_error(&server.get("/v2/nothing"), 404, "route_not_found");
    let wrong = common::request("PUT", &format!("{}{rows}", server.api), Some("{}"));
    assert_error(&wrong, 405, "method_not_allowed");
    assert_eq!(wrong.allow.as_deref(), Some("POST"));

    // Not JSON at all.
    let agent = ureq::agent();
    let form = agent
        .post(&format!("{}{rows}", server.api))
        .set("content-type", "application/x-www-form-urlencoded")
        .send_string("a=b");
    match form {
        Err(ureq::Error::Status(415, _)) => {}
        other => panic!("expected 415, got {other:?}"),
    }
    // The media type is matched whole; of its parameters, a charset must be UTF-8.
    for (content_type, refused) in [
        ("application/json-seq", true),
        ("application/jsonx", true),
        ("APPLICATION/JSON; charset=utf-8", false),
        ("application/json; charset=\"UTF-8\"", false),
        ("application/json; charset=latin1", true),
        ("application/json;charset=utf-16", true),
    ] {
        let sent = agent
            .post(&format!("{}/v1/tenants/nobody/tables/t/rows", server.api))
            .set("content-type", content_type)
            .send_string(r#"{"ops":[]}"#);
        let got = match sent {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(code, _)) => code,
            Err(e) => panic!("{content_type}: {e}"),
        };
        assert_eq!(got == 415, refused, "{content_type}: {got}");
    }
    // Framing headers a proxy could read otherwise: refused, naming what is wrong.
    let addr = server.api.trim_start_matches("http://");
    let body = r#"{"ops":[]}"#;
    for (head, status, code) in [
        ("host: x\r\nhost: y\r\n", 400, "invalid_headers"),
        ("", 400, "invalid_headers"),
        ("host: x\r\nexpect: 200-ok\r\n", 417, "expectation_failed"),
        (
            "host: x\r\ncontent-type: application/json\r\ncontent-type: text/plain\r\n",
            400,
            "invalid_headers",
        ),
        ("host: a b\r\n", 400, "invalid_headers"),
        ("host: a, b\r\n", 400, "invalid_headers"),
        ("host: user@x\r\n", 400, "invalid_headers"),
        // A valid host reaches the route (which refuses the empty batch).
        ("host: [::1]:7070\r\n", 400, "invalid_row"),
    ] {
        let mut raw = TcpStream::connect(addr).expect("connect");
        let request = format!(
            "POST {rows} HTTP/1.1\r\n{head}content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        raw.write_all(request.as_bytes()).expect("send");
        let mut answer = String::new();
        raw.read_to_string(&mut answer).expect("answer");
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")) && answer.contains(code),
            "{head:?}: {answer}"
        );
    }
    // The ops listener checks the same (a probe's request, as a proxy would pass it on).
    let ops = server.ops.trim_start_matches("http://");
    for (head, status) in [
        ("host: x\r\nexpect: 200-ok\r\n", 417),
        ("host: x\r\nhost: y\r\n", 400),
        ("host: a b\r\n", 400),
        ("host: x\r\n", 200),
    ] {
        let mut raw = TcpStream::connect(ops).expect("connect");
        let request = format!("GET /health HTTP/1.1\r\n{head}connection: close\r\n\r\n");
        raw.write_all(request.as_bytes()).expect("send");
        let mut answer = String::new();
        raw.read_to_string(&mut answer).expect("answer");
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "ops {head:?}: {answer}"
        );
    }
    // A body sent after its head to a route that takes none (an abort, GETs public and
    // of a tenant) is read and dropped: the connection serves the next request (hyper
    // closed it, unannounced, when the body was left unread).
    for (request, status) in [
        ("POST /v1/tenants/acme/migrations/99/abort", "404"),
        ("GET /v1/ping", "200"),
        ("GET /v1/openapi.json", "200"),
        ("GET /v1/tenants/acme/tables", "200"),
    ] {
        let mut raw = TcpStream::connect(addr).expect("connect");
        raw.write_all(
            format!(
                "{request} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                 content-length: 2\r\n\r\n"
            )
            .as_bytes(),
        )
        .expect("head");
        std::thread::sleep(Duration::from_millis(50));
        raw.write_all(b"{}").expect("body");
        std::thread::sleep(Duration::from_millis(50));
        raw.write_all(b"GET /v1/ping HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .expect("the connection is still open");
        let mut answers = String::new();
        raw.read_to_string(&mut answers).expect("answers");
        assert!(
            answers.starts_with(&format!("HTTP/1.1 {status} ")),
            "{request}: {answers}"
        );
        assert_eq!(
            answers.matches("HTTP/1.1 ").count(),
            2,
            "{request}: {answers}"
        );
        assert!(answers.contains("{\"pong\":true}"), "{request}: {answers}");
    }
    // A client's request id is echoed.
    let echoed = agent
        .get(&format!("{}/v1/tenants/nobody/usage", server.api))
        .set("x-request-id", "client-abc.1")
        .call();
    match echoed {
        Err(ureq::Error::Status(404, r)) => {
            assert_eq!(r.header("x-request-id"), Some("client-abc.1"));
        }
        other => panic!("expected 404, got {other:?}"),
    }

    // Still serving, nothing was half applied.
    let ok = server.post(
        rows,
        &json!({"ops": [{"upsert": {"id": 1, "name": "fine"}}]}),
    );
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(server.get("/v1/tenants/acme/usage").body["rows"], 1);
}

#[test]
fn slow_headers_are_cut_off_while_other_clients_are_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        &dir.path().join("data"),
        &["--shards", "1", "--header-read-timeout-ms", "500"],
    );
    let addr = server.api.trim_start_matches("http://").to_string();
    let mut slow = TcpStream::connect(&addr).expect("connect");
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let started = Instant::now();
    slow.write_all(b"GET /v1/tenants HTTP/1.1\r\nHost: x\r\n")
        .expect("partial headers");
    // Meanwhile a normal client is served on the same shard.
    assert_eq!(server.get("/v1/tenants").status, 200);
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(200));
        if slow.write_all(b"X-Slow: 1\r\n").is_err() {
            break;
        }
    }
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest); // ends when the server closes
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "the slow client was cut off after {waited:?}"
    );
    assert!(!String::from_utf8_lossy(&rest).contains("200 OK"));
    assert_eq!(server.get("/v1/tenants").status, 200);
}

/// Waits until the one-shard `server` has no client connection open (the set-up's
/// have closed).
fn until_no_connections(server: &Server) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server
        .ops_get("/metrics")
        .1
        .contains("oc_http_connections_open{shard=\"0\"} 0")
    {
        assert!(
            Instant::now() < deadline,
            "the set-up's connections stay open"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One `GET /v1/ping` on a kept-alive connection: its status, or `None` when the
/// server closed the connection instead.
fn ping_on(stream: &mut TcpStream) -> Option<u16> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    if stream
        .write_all(b"GET /v1/ping HTTP/1.1\r\nhost: x\r\n\r\n")
        .is_err()
    {
        return None;
    }
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).unwrap_or(0);
        if n == 0 {
            return None;
        }
        answer.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&answer).to_string();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(str::to_string)
            })
            .and_then(|n| n.trim().parse().ok())
            .expect("content-length");
        if body.len() >= length {
            return head.get(9..12).and_then(|s| s.parse().ok());
        }
    }
}

/// At the connection limit a new connection takes the place of the one idle the
/// longest (nothing owed either way for a second): held idle keep-alive connections
/// cannot lock new clients out. Connections that went quiet only just now keep theirs.
#[test]
fn at_the_limit_a_new_connection_takes_the_place_of_the_idlest_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        &dir.path().join("data"),
        &["--shards", "1", "--max-connections", "2"],
    );
    until_no_connections(&server);
    let addr = server.api.trim_start_matches("http://").to_string();
    let mut oldest = TcpStream::connect(&addr).expect("connect");
    assert_eq!(ping_on(&mut oldest), Some(200));
    std::thread::sleep(Duration::from_millis(300));
    let mut younger = TcpStream::connect(&addr).expect("connect");
    assert_eq!(ping_on(&mut younger), Some(200));
    std::thread::sleep(Duration::from_millis(1500));
    let mut new = TcpStream::connect(&addr).expect("connect");
    assert_eq!(ping_on(&mut new), Some(200), "the new connection is served");
    assert_eq!(ping_on(&mut oldest), None, "the idlest one made room");
    assert_eq!(
        ping_on(&mut younger),
        Some(200),
        "the other keeps its place"
    );
    let (_, metrics) = server.ops_get("/metrics");
    assert!(
        metrics.contains("oc_http_connections_evicted_total{shard=\"0\"} 1"),
        "{metrics}"
    );
    // Both in use just now: no room is made, and the next one is refused.
    assert_eq!(ping_on(&mut new), Some(200));
    assert_eq!(ping_on(&mut younger), Some(200));
    let mut refused = TcpStream::connect(&addr).expect("connect");
    let mut answer = String::new();
    refused
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    refused.read_to_string(&mut answer).expect("the refusal");
    assert!(answer.contains("too_many_connections"), "{answer}");
    assert_eq!(ping_on(&mut new), Some(200));
    assert_eq!(ping_on(&mut younger), Some(200));
}

/// What may not hold a place at the limit: a request head begun and never finished
/// (closed at once when it makes room, not after the header timeout, so a flood of them
/// cannot run the shard past its limit), and a stream that ended at once (a HEAD of
/// `/watch`). A stream still being sent keeps its place.
#[test]
fn unfinished_heads_and_ended_streams_make_room_and_live_streams_keep_theirs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        &dir.path().join("data"),
        &["--shards", "1", "--max-connections", "3"],
    );
    server.create_tenant_with_items("acme");
    until_no_connections(&server);
    let addr = server.api.trim_start_matches("http://").to_string();
    let open = || {
        let (_, scrape) = server.ops_get("/metrics");
        common::scrape_value(&scrape, "oc_http_connections_open{shard=\"0\"}").expect("open")
    };
    // A live stream, a HEAD of the stream (answered, nothing more to send) and a head
    // never finished.
    let mut live = TcpStream::connect(&addr).expect("connect");
    live.write_all(b"GET /v1/tenants/acme/watch HTTP/1.1\r\nhost: x\r\n\r\n")
        .expect("watch");
    let mut head = [0u8; 12];
    live.read_exact(&mut head).expect("the stream's head");
    assert_eq!(&head, b"HTTP/1.1 200");
    let mut headed = TcpStream::connect(&addr).expect("connect");
    headed
        .write_all(b"HEAD /v1/tenants/acme/watch HTTP/1.1\r\nhost: x\r\n\r\n")
        .expect("head");
    headed
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // The whole answer: a head without a body.
    let mut answer = Vec::new();
    while !answer.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        headed.read_exact(&mut byte).expect("the HEAD's answer");
        answer.push(byte[0]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    std::thread::sleep(Duration::from_millis(300));
    let mut unfinished = TcpStream::connect(&addr).expect("connect");
    unfinished
        .write_all(b"GET /v1/ping HTTP/1.1\r\nhost: x\r\n")
        .expect("half a head");
    unfinished
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    std::thread::sleep(Duration::from_millis(1500));
    // The ended stream's connection is the idlest: it goes first.
    let mut first = TcpStream::connect(&addr).expect("connect");
    assert_eq!(ping_on(&mut first), Some(200));
    assert_eq!(
        ping_on(&mut headed),
        None,
        "the HEAD's connection made room"
    );
    // Then the unfinished head, closed at once rather than after the header timeout.
    std::thread::sleep(Duration::from_millis(1200));
    let asked = Instant::now();
    let mut second = TcpStream::connect(&addr).expect("connect");
    assert_eq!(ping_on(&mut second), Some(200));
    let mut rest = [0u8; 64];
    assert_eq!(
        unfinished.read(&mut rest).unwrap_or(0),
        0,
        "the unfinished head made room"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "it took {:?} to close",
        asked.elapsed()
    );
    assert!(open() <= 3.0, "{} open at a limit of 3", open());
    // The live stream, the idlest now, keeps its place: `first` makes room instead.
    std::thread::sleep(Duration::from_millis(1200));
    let mut third = TcpStream::connect(&addr).expect("connect");
    assert_eq!(ping_on(&mut third), Some(200));
    assert_eq!(
        ping_on(&mut first),
        None,
        "the idle one made room, not the stream"
    );
    live.set_nonblocking(true).expect("nonblocking");
    let still_open = !matches!(live.read(&mut rest), Ok(0));
    assert!(still_open, "the live stream was closed");
}

/// Connections that trickle a request head in (a header line every 300 ms) are owed
/// nothing: at the limit they make room for a new connection, as idle ones do, instead
/// of holding every place until the header timeout.
#[test]
fn a_trickled_request_head_does_not_hold_its_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        &dir.path().join("data"),
        &["--shards", "1", "--max-connections", "2"],
    );
    until_no_connections(&server);
    let addr = server.api.trim_start_matches("http://").to_string();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        for _ in 0..2 {
            let (addr, stop) = (&addr, &stop);
            scope.spawn(move || {
                let mut slow = TcpStream::connect(addr).expect("connect");
                let _ = slow.write_all(b"GET /v1/tenants HTTP/1.1\r\n");
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(300));
                    if slow.write_all(b"x-slow: 1\r\n").is_err() {
                        return; // closed to make room
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_millis(1500));
        let mut new = TcpStream::connect(&addr).expect("connect");
        let served = ping_on(&mut new);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(served, Some(200), "a trickling connection kept its place");
    });
}

#[test]
fn connections_beyond_the_limit_get_503_and_are_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Two: the set-up's requests, one after the other, may overlap a closing one.
    let server = Server::start(
        &dir.path().join("data"),
        &["--shards", "1", "--max-connections", "2"],
    );
    server.create_tenant_with_items("acme");
    until_no_connections(&server);
    let addr = server.api.trim_start_matches("http://").to_string();
    // Both connections carry a stream: never idle, so they keep their places.
    let held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut held = TcpStream::connect(&addr).expect("a connection");
            held.write_all(b"GET /v1/tenants/acme/watch HTTP/1.1\r\nhost: x\r\n\r\n")
                .expect("watch");
            let mut head = [0u8; 12];
            held.read_exact(&mut head).expect("the stream's head");
            assert_eq!(&head, b"HTTP/1.1 200");
            held
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let mut third = TcpStream::connect(&addr).expect("third connection");
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut answer = String::new();
    third.read_to_string(&mut answer).expect("the refusal");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    assert!(answer.contains("too_many_connections"), "{answer}");
    drop(held);
    until_no_connections(&server);
    assert_eq!(server.get("/v1/tenants").status, 200);
    let (_, metrics) = server.ops_get("/metrics");
    assert!(
        metrics.contains("oc_http_connections_refused_total{shard=\"0\"} 1"),
        "{metrics}"
    );
}

#[test]
fn a_relative_data_dir_works_as_in_the_readme() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::try_start_in(Some(dir.path()), std::path::Path::new("./data"), &[])
        .unwrap_or_else(|e| panic!("README's command must start: {e}"));
    server.create_tenant_with_items("acme");
    let row = json!({"ops": [{"upsert": {"id": 1, "name": "one"}}]});
    assert_eq!(
        server
            .post("/v1/tenants/acme/tables/items/rows", &row)
            .status,
        200
    );
    assert!(dir.path().join("data").join("oc-layout.json").exists());
    assert!(server.terminate().success());
}

#[test]
fn a_different_shard_count_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = Server::start(&data, &["--shards", "2"]);
    assert!(server.terminate().success());
    let err = Server::try_start(&data, &["--shards", "3"])
        .err()
        .expect("start refused");
    assert!(err.contains("--shards 2"), "{err}");
}

/// Runs `oc-server` with `args` on a data directory never created, which it must refuse
/// before touching; returns its stderr.
fn refused_config(args: &[&str]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_oc-server"))
        .args(args)
        .args(["--data-dir", "/nonexistent-never-created"])
        .output()
        .expect("run");
    assert!(!output.status.success());
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn non_loopback_listeners_need_an_explicit_insecure_flag() {
    let stderr = refused_config(&["--listen", "0.0.0.0:0"]);
    assert!(stderr.contains("--insecure-no-auth"), "{stderr}");
}

#[test]
fn the_api_and_ops_endpoints_on_one_address_are_refused() {
    let stderr = refused_config(&[
        "--listen",
        "127.0.0.1:17999",
        "--ops-listen",
        "127.0.0.1:17999",
    ]);
    assert!(
        stderr.contains("--listen 127.0.0.1:17999 and --ops-listen 127.0.0.1:17999 share a port"),
        "{stderr}"
    );
}

/// Floats a JSON parser that rounds its last digit gets wrong (serde_json without
/// `float_roundtrip` read these one unit in the last place off), then pseudo-random
/// finite doubles of every magnitude.
fn hard_floats(n: usize) -> Vec<f64> {
    let mut floats = vec![
        1.0715660391465826e-75,
        -1.81996730402717e-179,
        -1.603964615428183e143,
        -9.643915712060552e-234,
        f64::MAX,
        f64::MIN_POSITIVE,
        5e-324,
        -0.0,
    ];
    let mut x: u64 = 0xD1B5_4A32_D192_ED03;
    while floats.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let f = f64::from_bits(x);
        if f.is_finite() {
            floats.push(f);
        }
    }
    floats
}

/// Every `(id, x, j.x)` of table `f`, in id order, as bits.
fn floats_stored(server: &Server) -> Vec<(i64, u64, u64)> {
    let reply = server.post(
        "/v1/tenants/acme/ask",
        &json!({"sql": "SELECT id, x, j FROM f ORDER BY id"}),
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    let bits = |v: &serde_json::Value| v.as_f64().expect("a number").to_bits();
    reply.body["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| (r[0].as_i64().expect("id"), bits(&r[1]), bits(&r[2]["x"])))
        .collect()
}

#[test]
fn every_double_comes_back_bit_for_bit_through_writes_queries_a_checkpoint_and_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let args = ["--shards", "1", "--checkpoint-wal-bytes", "65536"];
    let server = Server::start(&data, &args);
    server.create_tenant_with(
        "acme",
        &json!({
            "name": "f",
            "columns": [
                {"name": "id", "type": "int", "nullable": false},
                {"name": "x", "type": "float"},
                {"name": "j", "type": "json"}
            ],
            "primary_key": ["id"]
        }),
    );
    let floats = hard_floats(2000);
    for (batch, chunk) in floats.chunks(200).enumerate() {
        let ops: Vec<_> = chunk
            .iter()
            .enumerate()
            .map(|(i, x)| json!({"upsert": {"id": batch * 200 + i, "x": x, "j": {"x": x}}}))
            .collect();
        let written = server.post("/v1/tenants/acme/tables/f/rows", &json!({"ops": ops}));
        assert_eq!(written.status, 200, "{written:?}");
    }
    let expected: Vec<(i64, u64, u64)> = floats
        .iter()
        .enumerate()
        .map(|(id, x)| (id as i64, x.to_bits(), x.to_bits()))
        .collect();
    assert_eq!(floats_stored(&server), expected, "as written");
    let found = server.post(
        "/v1/tenants/acme/ask",
        &json!({"sql": "SELECT id FROM f WHERE x = $1", "params": [floats[1]]}),
    );
    assert_eq!(
        found.body["rows"],
        json!([[1]]),
        "a float parameter: {found:?}"
    );

    let shard = data.join("shard-0");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_dir(&shard).expect("shard dir").any(|e| {
        let name = e.expect("entry").file_name();
        let name = name.to_string_lossy();
        // The manifest is written last: the checkpoint is whole.
        name.starts_with("checkpoint-") && name.ends_with(".json")
    }) {
        assert!(Instant::now() < deadline, "no checkpoint within 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(server.terminate().success());
    let server = Server::start(&data, &args);
    assert_eq!(
        floats_stored(&server),
        expected,
        "after a checkpoint and a restart"
    );
}

#[test]
fn a_vector_read_back_and_written_again_keeps_every_f32() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &[]);
    server.create_tenant_with(
        "acme",
        &json!({
            "name": "v",
            "columns": [
                {"name": "id", "type": "int", "nullable": false},
                {"name": "e", "type": "vector(4)"}
            ],
            "primary_key": ["id"]
        }),
    );
    // 0x15ae43fd's shortest decimal, 7.038531e-26, names another f32 once read as a
    // double: answering it would change the value on a client's read-modify-write.
    let stored: Vec<f32> = [0x15ae_43fd, 0x3dcc_cccd, 0x7f7f_ffff, 0x0000_0001]
        .into_iter()
        .map(f32::from_bits)
        .collect();
    let sent: Vec<f64> = stored.iter().map(|&x| f64::from(x)).collect();
    let rows = "/v1/tenants/acme/tables/v/rows";
    let write = |id: u64, e: &serde_json::Value| {
        let written = server.post(rows, &json!({"ops": [{"upsert": {"id": id, "e": e}}]}));
        assert_eq!(written.status, 200, "{written:?}");
    };
    let read = |id: u64| -> serde_json::Value {
        let got = server.get(&format!("{rows}/{id}"));
        assert_eq!(got.status, 200, "{got:?}");
        got.body["row"]["e"].clone()
    };
    write(1, &json!(sent));
    let first = read(1);
    write(2, &first);
    let second = read(2);
    let bits = |e: &serde_json::Value| -> Vec<u32> {
        e.as_array()
            .expect("an array")
            .iter()
            .map(|x| (x.as_f64().expect("a number") as f32).to_bits())
            .collect()
    };
    let want: Vec<u32> = stored.iter().map(|x| x.to_bits()).collect();
    assert_eq!(bits(&first), want, "as written: {first}");
    assert_eq!(bits(&second), want, "written back as read: {second}");
    assert_eq!(first, second);
}

/// Headers clients of HTTP rely on: every ops answer carries a request id; a 405
/// there allows HEAD with GET; a stream may be read by a page of another origin; a body
/// far over the limit is answered with `connection: close` before the connection goes.
#[test]
fn answers_carry_the_headers_http_clients_rely_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &["--shards", "1"]);
    let ops = server.ops.trim_start_matches("http://");
    let health = raw_get(ops, "/health");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(
        health.to_ascii_lowercase().contains("x-request-id: ops-"),
        "{health}"
    );
    let mut raw = TcpStream::connect(ops).expect("connect");
    raw.write_all(b"DELETE /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut refused = String::new();
    raw.read_to_string(&mut refused).expect("answer");
    assert!(refused.starts_with("HTTP/1.1 405"), "{refused}");
    assert!(
        refused.to_ascii_lowercase().contains("allow: get, head"),
        "{refused}"
    );

    assert_eq!(
        server
            .post("/v1/tenants", &json!({"tenant": "acme"}))
            .status,
        201
    );
    let api = server.api.trim_start_matches("http://");
    let mut stream = TcpStream::connect(api).expect("connect");
    stream
        .write_all(
            b"GET /v1/tenants/acme/watch HTTP/1.1\r\nHost: x\r\nOrigin: http://app.example\r\n\r\n",
        )
        .expect("send");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    let mut head = vec![0u8; 2048];
    let n = stream.read(&mut head).expect("head");
    let head = String::from_utf8_lossy(&head[..n]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("access-control-allow-origin: *"), "{head}");
    drop(stream);

    let mut big = TcpStream::connect(api).expect("connect");
    big.write_all(
        b"POST /v1/tenants/acme/tables/t/rows HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 999999999\r\n\r\n{",
    )
    .expect("send");
    big.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    let mut answer = String::new();
    let _ = big.read_to_string(&mut answer);
    let answer = answer.to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 413"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
}

/// A listing of wide tables comes a page at a time: no answer holds much more than
/// 256 KiB (the owner shard builds one page per request), every table is on exactly one
/// page, and the pages follow one another by `next_after`.
#[test]
fn table_listings_are_paged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &["--shards", "1"]);
    server.create_tenant_with_items("acme");
    let wide = |n: usize| {
        let columns: Vec<_> = (0..200)
            .map(|c| json!({"name": format!("column_{c:03}_{}", "x".repeat(48)), "type": "int"}))
            .collect();
        json!({"name": format!("wide_{n:02}"), "columns": columns, "primary_key": ["column_000_".to_string() + &"x".repeat(48)]})
    };
    for n in 0..30 {
        let created = server.post("/v1/tenants/acme/tables", &wide(n));
        assert_eq!(created.status, 201, "{created:?}");
    }
    let mut seen = Vec::new();
    let mut path = "/v1/tenants/acme/tables".to_string();
    let mut pages = 0;
    loop {
        let agent = ureq::AgentBuilder::new().build();
        let text = agent
            .get(&format!("{}{path}", server.api))
            .call()
            .expect("a page")
            .into_string()
            .expect("text");
        assert!(text.len() < 320 * 1024, "a page of {} bytes", text.len());
        let page: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        pages += 1;
        for table in page["tables"].as_array().expect("tables") {
            seen.push(table["schema"]["name"].as_str().expect("name").to_string());
        }
        match page["next_after"].as_str() {
            Some(last) => {
                assert_eq!(seen.last().map(String::as_str), Some(last));
                path = format!("/v1/tenants/acme/tables?after={last}");
            }
            None => break,
        }
    }
    let mut expected: Vec<String> = (0..30).map(|n| format!("wide_{n:02}")).collect();
    expected.push("items".into());
    expected.sort();
    assert_eq!(seen, expected, "every table once, in name order");
    assert!(pages >= 2, "{pages} page(s)");
    let unknown = server.get("/v1/tenants/acme/tables?page=2");
    assert_eq!(unknown.status, 400, "{unknown:?}");
    assert_eq!(unknown.body["error"]["code"], "invalid_query_string");
}
