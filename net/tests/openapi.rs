//! The API contract, docs/openapi.yaml: valid OpenAPI 3.1 by a real validator
//! (`openapi-spec-validator`), served at `/v1/openapi.json`, naming only routes the
//! server has, and held against a running server by a property-based tester no one
//! here wrote (`schemathesis`: no 5xx, statuses, content types, headers and bodies as
//! documented, bad input refused, good input accepted). Both tools are installed by
//! `.ci/run`; outside CI the tests that need them are skipped when they are missing.

mod common;

use std::path::Path;
use std::process::Command;

use common::{request_as, Server};
use serde_json::Value;

const ADMIN: &str = "admin-token-for-openapi-0123456789";

fn tool_available(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--help")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found && std::env::var_os("CI").is_some() {
        panic!("CI must install {tool}: see .ci/run");
    }
    found
}

fn start(dir: &Path) -> Server {
    let token_file = dir.join("admin-token");
    std::fs::write(&token_file, ADMIN).expect("write token");
    Server::start(
        &dir.join("data"),
        &[
            "--admin-token-file",
            token_file.to_str().expect("utf-8"),
            "--shards",
            "2",
            // Bounds any wait for a generated min_lsn (a writer refuses one it has not
            // applied at once; this keeps the run short should that change).
            "--min-lsn-wait-ms",
            "50",
        ],
    )
}

fn served_contract(server: &Server) -> Value {
    let reply = common::request("GET", &format!("{}/v1/openapi.json", server.api), None);
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.body
}

#[test]
fn the_contract_and_the_ping_are_served_without_credentials_and_match_the_build() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path());
    let spec = served_contract(&server);
    assert_eq!(spec["openapi"], "3.1.0");
    assert_eq!(
        spec["info"]["version"],
        env!("CARGO_PKG_VERSION"),
        "docs/openapi.yaml's info.version must follow the crate version"
    );
    let paths = spec["paths"].as_object().expect("paths");
    for route in ["/v1/tenants", "/v1/tenants/{tenant}/ask", "/health"] {
        assert!(paths.contains_key(route), "{route} is missing");
    }
    // So is the data port's ping, which touches no engine state.
    let ping = common::request("GET", &format!("{}/v1/ping", server.api), None);
    assert_eq!(ping.status, 200, "{ping:?}");
    assert_eq!(ping.body, serde_json::json!({"pong": true}));
    let post = common::request_as(
        "POST",
        &format!("{}/v1/ping", server.api),
        Some("{}"),
        ADMIN,
    );
    assert_eq!(post.status, 405, "{post:?}");
    assert_eq!(post.allow.as_deref(), Some("GET, HEAD"), "{post:?}");
    // A body it never reads (2 MiB): it answers and closes the connection (the client
    // may see only the close, mid-send), and the server serves on.
    let padded = "x".repeat(2 << 20);
    let with_body = common::try_request("GET", &format!("{}/v1/ping", server.api), Some(&padded));
    if let Ok(reply) = &with_body {
        assert_eq!(reply.status, 200, "{reply:?}");
    }
    let again = common::request("GET", &format!("{}/v1/ping", server.api), None);
    assert_eq!(again.status, 200, "{again:?}");
    // Anything else under /v1 still needs credentials.
    let other = common::request("GET", &format!("{}/v1/tenants", server.api), None);
    assert_eq!(other.status, 401, "{other:?}");
}

#[test]
fn the_contract_and_the_served_copy_pass_openapi_spec_validator() {
    if !tool_available("openapi-spec-validator") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path());
    let served = dir.path().join("served.json");
    std::fs::write(&served, served_contract(&server).to_string()).expect("write");
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.yaml");
    for file in [Path::new(source), served.as_path()] {
        let out = Command::new("openapi-spec-validator")
            .arg(file)
            .output()
            .expect("openapi-spec-validator runs");
        assert!(
            out.status.success(),
            "{}: {}{}",
            file.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Every documented operation reaches a handler: none answers `route_not_found` or
/// `method_not_allowed` (the converse, that every route is documented, is what
/// schemathesis' `unsupported_method` and status checks lean on).
#[test]
fn every_documented_operation_is_routed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path());
    let spec = served_contract(&server);
    let mut seen = 0;
    for (path, item) in spec["paths"].as_object().expect("paths") {
        let concrete = path
            .replace("{tenant}", "acme")
            .replace("{table}", "items")
            .replace("{key_id}", "k0")
            .replace("{key}", "1")
            .replace("{id}", "1");
        if item.get("servers").is_some() {
            // The ops listener's routes (/metrics is not JSON). This server is a writer
            // without followers: promote and step-down refuse, with their own codes.
            seen += 1;
            if item.get("get").is_some() {
                let (status, body) = server.ops_get(&concrete);
                assert!(status == 200 || status == 503, "{path}: {status} {body}");
            } else {
                let url = format!("{}{concrete}", server.ops);
                let reply = request_as("POST", &url, None, ADMIN);
                let code = reply.body["error"]["code"].as_str().unwrap_or("");
                assert!(
                    ["not_follower", "not_replicating"].contains(&code),
                    "POST {path}: {reply:?}"
                );
            }
            continue;
        }
        for method in ["get", "post", "delete"] {
            if item.get(method).is_none() {
                continue;
            }
            seen += 1;
            let body = (method == "post").then_some("{}");
            let url = format!("{}{concrete}", server.api);
            let reply = request_as(&method.to_uppercase(), &url, body, ADMIN);
            let code = reply.body["error"]["code"].as_str().unwrap_or("");
            assert!(
                code != "route_not_found" && code != "method_not_allowed" && reply.status != 405,
                "{method} {path}: {reply:?}"
            );
        }
    }
    assert!(seen >= 20, "only {seen} operations documented");
}

fn schemathesis(spec: &Path, url: &str, paths: &str, extra: &[&str]) {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../tools/schemathesis.toml");
    let out = Command::new("schemathesis")
        .args(["--config-file", config, "run"])
        .arg(spec)
        .args(["--url", url, "--include-path-regex", paths])
        .args(["--header", &format!("Authorization: Bearer {ADMIN}")])
        .args([
            "--checks",
            "all",
            "--max-examples",
            "40",
            "--seed",
            "20261202",
        ])
        .args(["--workers", "1", "--request-timeout", "20", "--no-color"])
        .args(extra)
        .env("SCHEMATHESIS_HOOKS", "")
        .output()
        .expect("schemathesis runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found problems on {paths}:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("passed"),
        "schemathesis tested nothing:\n{stdout}"
    );
}

#[test]
fn schemathesis_finds_no_contract_violation() {
    if !tool_available("schemathesis") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path());
    // Something real for the generated requests to find (the contract's examples name
    // this tenant and table).
    let created = request_as(
        "POST",
        &format!("{}/v1/tenants", server.api),
        Some(r#"{"tenant":"acme"}"#),
        ADMIN,
    );
    assert_eq!(created.status, 201, "{created:?}");
    let table = request_as(
        "POST",
        &format!("{}/v1/tenants/acme/tables", server.api),
        Some(&common::items_table().to_string()),
        ADMIN,
    );
    assert_eq!(table.status, 201, "{table:?}");
    let spec = dir.path().join("openapi.json");
    std::fs::write(&spec, served_contract(&server).to_string()).expect("write");
    let ops_paths = "^/(health|ready|metrics|v1/admin/(promote|step-down))$";
    schemathesis(
        &spec,
        &server.api,
        "^/v1/(?!admin/(promote|step-down)$)",
        &[],
    );
    schemathesis(&spec, &server.ops, ops_paths, &[]);
    assert!(!server.stderr().contains("panicked"), "{}", server.stderr());
}
