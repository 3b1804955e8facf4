//! The `oc` CLI (built next to `oc-server` by `cargo test --workspace`, because the
//! client crate has an integration test of its own) against a real
//! server with auth: an exit code per error class, as docs/API.md lists them, and the
//! server's own message on stderr.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::Server;

const ADMIN: &str = "admin-token-for-cli-0123456789";

fn oc(server: &Server, token: Option<&str>, args: &[&str]) -> Output {
    let bin = Path::new(env!("CARGO_BIN_EXE_oc-server")).with_file_name("oc");
    let mut command = Command::new(bin);
    command
        .args(args)
        .env("OC_URL", &server.api)
        .env("OC_OPS_URL", &server.ops)
        .env_remove("OC_TOKEN")
        .env_remove("OC_CA_CERT");
    if let Some(token) = token {
        command.env("OC_TOKEN", token);
    }
    command.output().expect("oc runs")
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn exit_codes_follow_the_error_class() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("admin-token");
    std::fs::write(&token, ADMIN).expect("write");
    let server = Server::start(
        &dir.path().join("data"),
        &["--admin-token-file", token.to_str().expect("utf-8")],
    );
    let admin = Some(ADMIN);
    assert_eq!(code(&oc(&server, admin, &["tenants", "create", "acme"])), 0);
    let items = r#"{"name":"items","columns":[{"name":"id","type":"int"}],"primary_key":["id"]}"#;
    assert_eq!(
        code(&oc(&server, admin, &["tables", "create", "acme", items])),
        0
    );

    // 3: the request is wrong, and the server says why (an unknown field is named,
    // not dropped by the client).
    let typo =
        r#"{"name":"t2","columns":[{"name":"id","type":"int"}],"primary_key":["id"],"indexs":[]}"#;
    let refused = oc(&server, admin, &["tables", "create", "acme", typo]);
    assert_eq!(code(&refused), 3, "{}", stderr(&refused));
    assert!(stderr(&refused).contains("indexs"), "{}", stderr(&refused));
    let sql = oc(&server, admin, &["ask", "acme", "SELEC 1"]);
    assert_eq!(code(&sql), 3, "{}", stderr(&sql));
    assert!(stderr(&sql).contains("sql_syntax"), "{}", stderr(&sql));
    // A program reading `-o json` gets the LSN its reads of its own writes need.
    let asked = oc(
        &server,
        admin,
        &["-o", "json", "ask", "acme", "SELECT id FROM items"],
    );
    assert_eq!(code(&asked), 0, "{}", stderr(&asked));
    let answer: serde_json::Value = serde_json::from_slice(&asked.stdout).expect("JSON");
    assert!(answer["applied_lsn"].as_u64() >= Some(2), "{answer}");
    // So does a row read by its key, at least the LSN of the write it follows.
    let upserted = oc(
        &server,
        admin,
        &[
            "-o",
            "json",
            "rows",
            "upsert",
            "acme",
            "items",
            r#"{"id":7}"#,
        ],
    );
    assert_eq!(code(&upserted), 0, "{}", stderr(&upserted));
    let written: serde_json::Value = serde_json::from_slice(&upserted.stdout).expect("JSON");
    let lsn = written["lsn"].as_u64().expect("the write's lsn");
    let read = oc(
        &server,
        admin,
        &["-o", "json", "rows", "get", "acme", "items", "7"],
    );
    assert_eq!(code(&read), 0, "{}", stderr(&read));
    let read: serde_json::Value = serde_json::from_slice(&read.stdout).expect("JSON");
    assert_eq!(read["row"]["id"], 7, "{read}");
    assert!(read["applied_lsn"].as_u64() >= Some(lsn), "{read}");
    // 4: credentials.
    let anonymous = oc(&server, None, &["tenants", "list"]);
    assert_eq!(code(&anonymous), 4, "{}", stderr(&anonymous));
    // 5: not found.
    let missing = oc(&server, admin, &["rows", "get", "acme", "items", "9"]);
    assert_eq!(code(&missing), 5, "{}", stderr(&missing));
    // Named like every other error from the server: status and code.
    assert!(
        stderr(&missing).contains("404 row_not_found"),
        "{}",
        stderr(&missing)
    );
    assert_eq!(code(&oc(&server, admin, &["usage", "nobody"])), 5);
    // 2: usage, before anything is sent: a dot segment, bad JSON, a bad URL, a token
    // no header can carry.
    let not_ops = oc(
        &server,
        admin,
        &["--ops-url", &server.api.clone(), "status"],
    );
    assert_eq!(code(&not_ops), 2, "{}", stderr(&not_ops));
    assert!(
        stderr(&not_ops).contains("not an ops listener"),
        "{}",
        stderr(&not_ops)
    );
    let queried = oc(
        &server,
        admin,
        &["--url", &format!("{}?x=1", server.api), "tenants", "list"],
    );
    assert_eq!(code(&queried), 2, "{}", stderr(&queried));
    assert!(stderr(&queried).contains("?query"), "{}", stderr(&queried));
    let newline = oc(&server, Some("x\ny"), &["tenants", "list"]);
    assert_eq!(code(&newline), 2, "{}", stderr(&newline));
    assert!(stderr(&newline).contains("--token"), "{}", stderr(&newline));
    let dots = oc(&server, admin, &["tables", "drop", "acme", ".."]);
    assert_eq!(code(&dots), 2, "{}", stderr(&dots));
    assert_eq!(
        code(&oc(
            &server,
            admin,
            &["rows", "upsert", "acme", "items", "{"]
        )),
        2
    );
    let bad_url = oc(
        &server,
        admin,
        &["--url", "localhost:7070", "tenants", "list"],
    );
    assert_eq!(code(&bad_url), 2, "{}", stderr(&bad_url));
    // …and the tenant is still there: `tables drop acme ..` never reached it.
    let listed = oc(&server, admin, &["-o", "json", "tenants", "list"]);
    assert_eq!(code(&listed), 0);
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout).trim(),
        r#"{"tenants":["acme"]}"#
    );
    // The audit log pages with --after: oldest first from 0, each page naming the next.
    let page = |after: &str| {
        let out = oc(
            &server,
            admin,
            &["-o", "json", "audit", "--after", after, "--limit", "1"],
        );
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")
    };
    let first = page("0");
    assert_eq!(first["entries"][0]["action"], "tenant.create", "{first}");
    let next = first["next_after"].as_u64().expect("next_after");
    assert_eq!(first["entries"][0]["seq"], next, "{first}");
    let second = page(&next.to_string());
    assert_eq!(second["entries"][0]["action"], "table.create", "{second}");
    assert!(
        second["entries"][0]["seq"].as_u64() > Some(next),
        "{second}"
    );
    let table = oc(&server, admin, &["audit", "--after", "0", "--limit", "1"]);
    assert!(
        stderr(&table).contains(&format!("next page: --after {next}")),
        "{}",
        stderr(&table)
    );
    // status reads the ops listener; 0 when ready.
    let status = oc(&server, admin, &["status"]);
    assert_eq!(code(&status), 0, "{}", stderr(&status));
    assert!(String::from_utf8_lossy(&status.stdout).starts_with("ok "));
    drop(server);
    // 6: nothing answers.
    let dir2 = tempfile::tempdir().expect("tempdir");
    let gone = Server::start(&dir2.path().join("data"), &[]);
    let api = gone.api.clone();
    drop(gone);
    let out = Command::new(Path::new(env!("CARGO_BIN_EXE_oc-server")).with_file_name("oc"))
        .args(["--url", &api, "tenants", "list"])
        .output()
        .expect("oc runs");
    assert_eq!(code(&out), 6, "{}", stderr(&out));
}

/// A self-signed certificate for `names`, marked as a CA (as `openssl req -x509` makes
/// them by default) or not, written as PEM files in `dir`: (certificate, key).
fn self_signed(dir: &Path, stem: &str, names: &[&str], ca: bool) -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("params");
    if ca {
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    }
    let cert = params.self_signed(&key).expect("certificate");
    let (cert_path, key_path) = (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    );
    std::fs::write(&cert_path, cert.pem()).expect("write");
    std::fs::write(&key_path, key.serialize_pem()).expect("write");
    let path = |p: std::path::PathBuf| p.to_str().expect("utf-8").to_string();
    (path(cert_path), path(key_path))
}

/// `--ca-cert` takes the server's own self-signed certificate whether or not it is
/// marked as a CA (curl does too), and still checks its name; a certificate the server
/// does not present is refused as a usage error (2), not an outage to retry (6).
#[test]
fn the_ca_cert_option_trusts_a_self_signed_ca_certificate_for_the_right_name_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed(dir.path(), "server", &["127.0.0.1", "localhost"], true);
    let server = Server::start(
        &dir.path().join("data"),
        &["--tls-cert", &cert, "--tls-key", &key],
    );
    assert!(server.api.starts_with("https://"), "{}", server.api);
    let trusted = oc(&server, None, &["--ca-cert", &cert, "tenants", "list"]);
    assert_eq!(code(&trusted), 0, "{}", stderr(&trusted));

    // The same kind of certificate, for another name, presented by the server: refused.
    let (other_name, other_key) = self_signed(dir.path(), "other", &["example.com"], true);
    drop(server);
    let server = Server::start(
        &dir.path().join("data2"),
        &["--tls-cert", &other_name, "--tls-key", &other_key],
    );
    let wrong_name = oc(
        &server,
        None,
        &["--ca-cert", &other_name, "tenants", "list"],
    );
    assert_eq!(code(&wrong_name), 2, "{}", stderr(&wrong_name));
    assert!(
        stderr(&wrong_name).contains("certificate"),
        "{}",
        stderr(&wrong_name)
    );
    // A file holding some other certificate: the server's is not trusted.
    let unrelated = oc(&server, None, &["--ca-cert", &cert, "tenants", "list"]);
    assert_eq!(code(&unrelated), 2, "{}", stderr(&unrelated));
}

/// `oc watch` resumes a stream the server ends (a restart's `shutdown`) from its last
/// id, as an EventSource does: changes written after the restart arrive, and none
/// before it is printed twice but for the batch the id was on.
#[test]
fn oc_watch_resumes_across_a_server_restart() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let (api, ops) = (common::free_addr(), common::free_addr());
    let args = common::fixed_addr_args(&api, &ops, "1");
    let server = Server::start(&data, &args);
    server.create_tenant_with_items("acme");
    let write = |server: &Server, id: u64| {
        let body = serde_json::json!({"ops": [{"upsert": {"id": id, "name": "n", "batch": 1}}]});
        let reply = server.post("/v1/tenants/acme/tables/items/rows", &body);
        assert_eq!(reply.status, 200, "{reply:?}");
    };
    write(&server, 1);
    let bin = Path::new(env!("CARGO_BIN_EXE_oc-server")).with_file_name("oc");
    let mut watch = Command::new(bin)
        .args(["watch", "acme", "--from-lsn", "0"])
        .env("OC_URL", &server.api)
        .env_remove("OC_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("oc watch runs");
    let (lines_tx, lines) = std::sync::mpsc::channel::<serde_json::Value>();
    let stdout = watch.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(serde_json::from_str(&line).expect("a JSON line"));
        }
    });
    let wait_for = |id: u64, events: &mut Vec<serde_json::Value>| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !events
            .iter()
            .any(|e| e["event"] == "change" && e["data"]["key"]["id"] == id)
        {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match lines.recv_timeout(left) {
                Ok(event) => events.push(event),
                Err(_) => panic!("no change for row {id}: {events:?}"),
            }
        }
    };
    let mut events = Vec::new();
    wait_for(1, &mut events);
    assert!(server.terminate().success());
    let server = Server::start(&data, &args);
    write(&server, 2);
    wait_for(2, &mut events);
    let _ = watch.kill();
    let out = watch.wait_with_output().expect("oc watch ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("resuming after"), "{stderr}");
    assert!(
        events.iter().any(|e| e["event"] == "shutdown"),
        "{events:?}"
    );
    let changes_of_1 = events
        .iter()
        .filter(|e| e["event"] == "change" && e["data"]["key"]["id"] == 1)
        .count();
    assert_eq!(
        changes_of_1, 1,
        "row 1 printed again after the resume: {events:?}"
    );
}

/// A server never reached is reported, not waited for: `oc watch` resumes only a stream
/// that was open.
#[test]
fn oc_watch_reports_a_server_it_never_reached() {
    let nobody = common::free_addr();
    let bin = Path::new(env!("CARGO_BIN_EXE_oc-server")).with_file_name("oc");
    let mut child = Command::new(bin)
        .args(["watch", "acme"])
        .env("OC_URL", format!("http://{nobody}"))
        .env_remove("OC_TOKEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("oc watch runs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("oc watch kept waiting for a server it never reached");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(6));
}
