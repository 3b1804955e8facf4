//! TLS on the data API with rustls, through the real binary and a real TLS client
//! (ureq over rustls) that trusts only the test's own certificate.

mod common;

use std::io::{Read, Write};
use std::sync::Arc;

use common::Server;
use serde_json::json;

fn config_trusting(cert_der: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(cert_der.to_vec()))
        .expect("trust the test certificate");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    Arc::new(config)
}

fn client_trusting(cert_der: &[u8]) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .tls_config(config_trusting(cert_der))
        .build()
}

/// A server in `dir` serving the data API over TLS with a fresh self-signed certificate.
fn tls_server(dir: &std::path::Path) -> (Server, rcgen::CertifiedKey) {
    tls_server_with(dir, &[])
}

/// [`tls_server`] with more flags.
fn tls_server_with(dir: &std::path::Path, more: &[&str]) -> (Server, rcgen::CertifiedKey) {
    let (cert, key, certified) = common::self_signed_cert(dir);
    let mut args = vec![
        "--tls-cert",
        cert.to_str().expect("path"),
        "--tls-key",
        key.to_str().expect("path"),
    ];
    args.extend_from_slice(more);
    let server = Server::start(&dir.join("data"), &args);
    (server, certified)
}

/// At the connection limit over TLS, a handshake not finished after a second makes room
/// for a new connection; with nothing to make room, the new one is closed without an
/// answer (a plaintext 503 would read as garbage to a TLS client).
#[test]
fn stalled_tls_handshakes_make_room_and_a_refusal_over_tls_sends_no_plaintext() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, certified) =
        tls_server_with(dir.path(), &["--shards", "1", "--max-connections", "2"]);
    let addr = server.api.trim_start_matches("https://").to_string();
    let open = || {
        let (_, scrape) = server.ops_get("/metrics");
        common::scrape_value(&scrape, "oc_http_connections_open{shard=\"0\"}").expect("open")
    };
    let wait_for_open = |wanted: f64| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while open() != wanted {
            assert!(std::time::Instant::now() < deadline, "{} open", open());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    wait_for_open(0.0);
    // Two connections that never start their handshake hold both places...
    let stalled: Vec<std::net::TcpStream> = (0..2)
        .map(|_| std::net::TcpStream::connect(&addr).expect("connect"))
        .collect();
    wait_for_open(2.0);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // ...until a real client needs one.
    let agent = client_trusting(certified.cert.der());
    let ping = agent
        .get(&format!("{}/v1/ping", server.api))
        .call()
        .expect("served at the limit");
    assert_eq!(ping.status(), 200);
    let (_, scrape) = server.ops_get("/metrics");
    assert_eq!(
        common::scrape_value(&scrape, "oc_http_connections_evicted_total{shard=\"0\"}"),
        Some(1.0),
        "{scrape}"
    );
    drop((agent, stalled));
    wait_for_open(0.0);
    // Both places taken just now: the third connection is closed with no bytes.
    let _taken: Vec<std::net::TcpStream> = (0..2)
        .map(|_| std::net::TcpStream::connect(&addr).expect("connect"))
        .collect();
    wait_for_open(2.0);
    let mut refused = std::net::TcpStream::connect(&addr).expect("connect");
    refused
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    let mut answer = Vec::new();
    let _ = refused.read_to_end(&mut answer);
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    let (_, scrape) = server.ops_get("/metrics");
    assert_eq!(
        common::scrape_value(&scrape, "oc_http_connections_refused_total{shard=\"0\"}"),
        Some(1.0),
        "{scrape}"
    );
}

#[test]
fn the_api_serves_tls_to_a_client_that_trusts_the_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, certified) = tls_server(dir.path());
    assert!(server.api.starts_with("https://"), "{}", server.api);
    let agent = client_trusting(certified.cert.der());
    let created = agent
        .post(&format!("{}/v1/tenants", server.api))
        .set("content-type", "application/json")
        .send_string(&json!({"tenant": "acme"}).to_string())
        .expect("created over TLS");
    assert_eq!(created.status(), 201);
    let listed: serde_json::Value = agent
        .get(&format!("{}/v1/tenants", server.api))
        .call()
        .expect("listed over TLS")
        .into_json()
        .expect("json");
    assert_eq!(listed["tenants"], json!(["acme"]));

    // A client that does not trust the certificate is refused by its own TLS check.
    let untrusting = ureq::AgentBuilder::new().build();
    assert!(untrusting
        .get(&format!("{}/v1/tenants", server.api))
        .call()
        .is_err());
    // Plain HTTP on the TLS port gets no HTTP answer.
    let addr = server.api.trim_start_matches("https://").to_string();
    let mut plain = std::net::TcpStream::connect(&addr).expect("connect");
    plain
        .set_read_timeout(Some(std::time::Duration::from_secs(15)))
        .expect("timeout");
    plain
        .write_all(b"GET /v1/tenants HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(!String::from_utf8_lossy(&answer).contains("200 OK"));
    // The server still serves TLS clients.
    assert!(agent
        .get(&format!("{}/v1/tenants", server.api))
        .call()
        .is_ok());
}

#[test]
fn a_bad_certificate_file_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = dir.path().join("cert.pem");
    std::fs::write(&cert, "not a certificate").expect("write");
    let err = Server::try_start(
        &dir.path().join("data"),
        &[
            "--tls-cert",
            cert.to_str().expect("path"),
            "--tls-key",
            cert.to_str().expect("path"),
        ],
    )
    .err()
    .expect("refused");
    assert!(err.contains("cert.pem"), "{err}");
}

/// Starts `oc-server` with `args` and waits (up to 20 s) until its log says `wanted`;
/// returns the log. For servers that do not come up (they wait for a writer).
fn log_until(dir: &std::path::Path, args: &[&str], wanted: &str) -> String {
    let log = dir.with_extension("log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_oc-server"))
        .arg("--data-dir")
        .arg(dir)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--ops-listen",
            "127.0.0.1:0",
            "--no-pin",
        ])
        .args(common::unsafe_fs_allowance(dir.parent().expect("parent")))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(wanted) || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let _ = child.kill();
    let _ = child.wait();
    text
}

#[test]
fn replication_runs_over_tls_to_a_follower_that_trusts_the_writers_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key, certified) = common::self_signed_cert(dir.path());
    let cert = cert.to_str().expect("path");
    let writer = Server::start(
        &dir.path().join("writer"),
        &[
            "--shards",
            "2",
            "--tls-cert",
            cert,
            "--tls-key",
            key.to_str().expect("path"),
            "--replication-listen",
            "127.0.0.1:0",
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
            "--leader-ca",
            cert,
        ],
    );
    let agent = client_trusting(certified.cert.der());
    let post = |path: &str, body: serde_json::Value| {
        let reply = agent
            .post(&format!("{}{path}", writer.api))
            .set("content-type", "application/json")
            .send_string(&body.to_string())
            .expect("a write over TLS");
        assert!(reply.status() < 300, "{}", reply.status());
    };
    post("/v1/tenants", json!({"tenant": "acme"}));
    post("/v1/tenants/acme/tables", common::items_table());
    for id in 0..50 {
        post(
            "/v1/tenants/acme/tables/items/rows",
            json!({"ops": [{"upsert": {"id": id, "name": format!("n{id}"), "batch": id % 3}}]}),
        );
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let counted = follower.post(
            "/v1/tenants/acme/ask",
            &json!({"sql": "SELECT count(*) FROM items"}),
        );
        if counted.status == 200 && counted.body["rows"][0][0] == 50 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the follower has {counted:?} after 30 s:\n{}",
            follower.stderr()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    // A follower speaking plain TCP hears that the writer speaks TLS, and what to pass.
    let plain = log_until(
        &dir.path().join("plain"),
        &["--mode", "follower", "--leader-addr", &leader],
        "--leader-ca",
    );
    assert!(plain.contains("speaks TLS"), "{plain}");
    // One that trusts another certificate refuses the writer's.
    let other = tempfile::tempdir().expect("tempdir");
    let (other_cert, _, _) = common::self_signed_cert(other.path());
    let untrusting = log_until(
        &dir.path().join("untrusting"),
        &[
            "--mode",
            "follower",
            "--leader-addr",
            &leader,
            "--leader-ca",
            other_cert.to_str().expect("path"),
        ],
        "invalid peer certificate",
    );
    assert!(
        untrusting.contains("invalid peer certificate") && untrusting.contains("--leader-ca"),
        "{untrusting}"
    );
}

/// Sends `requests` over a new TLS connection to `addr`, then ends its sending side
/// (with the TLS close_notify first, or the bare TCP half-close) and reads until the
/// server closes: all it read. Read `slowly`, it pauses 100 ms every 256 KiB and has
/// a small receive buffer, so that a large answer fills the server's socket.
fn half_closing_tls_client(
    addr: &str,
    config: &Arc<rustls::ClientConfig>,
    requests: &[u8],
    close_notify: bool,
    slowly: bool,
) -> Vec<u8> {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    if slowly {
        socket
            .set_recv_buffer_size(16 << 10)
            .expect("receive buffer");
    }
    let addr: std::net::SocketAddr = addr.parse().expect("address");
    socket.connect(&addr.into()).expect("connect");
    let mut tcp: std::net::TcpStream = socket.into();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(15)))
        .expect("timeout");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut conn = rustls::ClientConnection::new(config.clone(), name).expect("client");
    rustls::Stream::new(&mut conn, &mut tcp)
        .write_all(requests)
        .expect("send over TLS");
    if close_notify {
        conn.send_close_notify();
    }
    while conn.wants_write() {
        conn.write_tls(&mut tcp).expect("flush TLS");
    }
    tcp.shutdown(std::net::Shutdown::Write).expect("half-close");
    let mut answers = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    let mut paused_at = 0;
    loop {
        if slowly && answers.len() >= paused_at {
            std::thread::sleep(std::time::Duration::from_millis(100));
            paused_at = answers.len() + (256 << 10);
        }
        // The read ends at the server's close, with or without its close_notify.
        match tls.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => answers.extend_from_slice(&chunk[..n]),
        }
    }
    answers
}

#[test]
fn a_tls_client_that_half_closes_after_its_requests_reads_their_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, certified) = tls_server(dir.path());
    let config = config_trusting(certified.cert.der());
    let addr = server.api.trim_start_matches("https://").to_string();
    let body = json!({"tenant": "acme"}).to_string();
    let requests = format!(
        "POST /v1/tenants HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}GET /v1/tenants HTTP/1.1\r\nhost: localhost\r\n\r\n",
        body.len()
    );
    // With the TLS close_notify before the TCP half-close, and with the bare half-close.
    for (round, close_notify) in [true, false].into_iter().enumerate() {
        let answers =
            half_closing_tls_client(&addr, &config, requests.as_bytes(), close_notify, false);
        let answers = String::from_utf8_lossy(&answers);
        let statuses: Vec<&str> = answers
            .match_indices("HTTP/1.1 ")
            .map(|(at, _)| &answers[at + 9..at + 12])
            .collect();
        let created = if round == 0 { "201" } else { "409" };
        assert_eq!(
            statuses,
            [created, "200"],
            "close_notify {close_notify}: {answers}"
        );
        assert!(answers.contains(r#"{"tenants":["acme"]}"#), "{answers}");
    }
}

#[test]
fn a_tls_client_that_half_closes_and_reads_slowly_gets_all_of_a_large_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, certified) = tls_server(dir.path());
    let config = config_trusting(certified.cert.der());
    let agent = client_trusting(certified.cert.der());
    let post = |path: &str, body: serde_json::Value| {
        agent
            .post(&format!("{}{path}", server.api))
            .set("content-type", "application/json")
            .send_string(&body.to_string())
            .expect("accepted over TLS")
            .status()
    };
    assert_eq!(post("/v1/tenants", json!({"tenant": "acme"})), 201);
    let table = json!({
        "name": "docs",
        "columns": [{"name": "id", "type": "int"}, {"name": "body", "type": "text"}],
        "primary_key": ["id"]
    });
    assert_eq!(post("/v1/tenants/acme/tables", table), 201);
    // 40 rows of 200 KB: an 8 MB answer, far more than the sockets and TLS buffer hold.
    let text = "x".repeat(200_000);
    for id in 0..40 {
        let row = json!({"ops": [{"upsert": {"id": id, "body": text}}]});
        assert_eq!(post("/v1/tenants/acme/tables/docs/rows", row), 200);
    }
    let ask = json!({"sql": "SELECT id, body FROM docs ORDER BY id"}).to_string();
    let request = format!(
        "POST /v1/tenants/acme/ask HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{ask}",
        ask.len()
    );
    let addr = server.api.trim_start_matches("https://").to_string();
    let started = std::time::Instant::now();
    let answer = half_closing_tls_client(&addr, &config, request.as_bytes(), false, true);
    let took = started.elapsed();
    let at = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an answer's head");
    let body: serde_json::Value = serde_json::from_slice(&answer[at + 4..])
        .unwrap_or_else(|e| panic!("the answer was cut short ({} bytes): {e}", answer.len()));
    assert_eq!(body["row_count"], 40, "{}", body["row_count"]);
    // Read over longer than the 2 s grace: the end was held while bytes moved.
    assert!(took > std::time::Duration::from_secs(2), "read in {took:?}");
}
