//! OTLP export of request spans against a real OTLP/HTTP receiver that decodes them with
//! the official OpenTelemetry protos (`tools/otlp_receiver.py`, Python
//! `opentelemetry-proto`, installed by `.ci/run`): failed requests and upstream-sampled
//! traces are exported in full, the rest by ratio; with an unreachable endpoint spans are
//! dropped and counted while requests go on. Skipped outside CI when the protos are
//! not installed.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{request_as, scrape_value, Server};
use serde_json::{json, Value};

const ADMIN: &str = "otlp-test-admin-token-0123456789";

fn protos_available() -> bool {
    let found = Command::new("python3")
        .args([
            "-c",
            "import opentelemetry.proto.collector.trace.v1.trace_service_pb2",
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !found && std::env::var_os("CI").is_some() {
        panic!("CI must install the OpenTelemetry protos (opentelemetry-proto): see .ci/run");
    }
    found
}

struct Receiver {
    child: Child,
    port: u16,
    spans: mpsc::Receiver<Value>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_receiver() -> Receiver {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tools/otlp_receiver.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the OTLP receiver");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a first line").expect("read");
    let port = first
        .strip_prefix("listening ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
    let (tx, spans) = mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let span: Value = serde_json::from_str(&line).expect("JSON line");
            if tx.send(span).is_err() {
                return;
            }
        }
    });
    Receiver { child, port, spans }
}

fn start_server(
    dir: &std::path::Path,
    endpoint: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Server {
    let data = dir.join("data");
    let token_file = dir.join("admin.token");
    std::fs::write(&token_file, ADMIN).expect("token");
    let mut args = vec![
        "--shards",
        "1",
        "--archive",
        "none",
        "--admin-token-file",
        token_file.to_str().expect("utf-8"),
        "--otlp-endpoint",
        endpoint,
    ];
    args.extend_from_slice(extra);
    Server::try_start_with_env(None, &data, &args, env)
        .unwrap_or_else(|e| panic!("server did not start: {e}"))
}

/// A GET with a `traceparent` header.
fn get_traced(url: &str, traceparent: &str) -> (u16, Option<String>) {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build();
    let response = match agent
        .get(url)
        .set("authorization", &format!("Bearer {ADMIN}"))
        .set("traceparent", traceparent)
        .call()
    {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("GET {url}: {e}"),
    };
    (
        response.status(),
        response.header("x-request-id").map(str::to_string),
    )
}

#[test]
fn failed_and_upstream_sampled_requests_are_exported_in_full_and_the_rest_by_ratio() {
    if !protos_available() {
        eprintln!("skipped: python3 with opentelemetry-proto is not installed");
        return;
    }
    let receiver = start_receiver();
    let dir = tempfile::tempdir().expect("tempdir");
    let trigger = dir.path().join("fail-audit");
    let failpoint = format!("audit.sync.err={}", trigger.display());
    // A bare host:port: the server adds /v1/traces.
    let endpoint = format!("http://127.0.0.1:{}", receiver.port);
    let server = start_server(
        dir.path(),
        &endpoint,
        &[
            "--otlp-sample-ratio",
            "0",
            "--otlp-slow-ms",
            "60000",
            "--otlp-resource-attributes",
            "cloud.region=test-1, deployment.environment=ci",
        ],
        &[("OC_FAILPOINTS", &failpoint)],
    );
    let tenants = format!("{}/v1/tenants", server.api);
    // Fast, successful, not sampled upstream: a ratio of 0 exports none of them.
    for i in 0..20 {
        let unsampled = format!("00-{:032x}-{:016x}-00", i + 1, i + 1);
        assert_eq!(get_traced(&tenants, &unsampled).0, 200);
    }
    // Sampled upstream: exported under the caller's trace, as a child of its span.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let (status, sampled_id) = get_traced(&tenants, &format!("00-{trace}-{parent}-01"));
    assert_eq!(status, 200);
    // A failed request (503: the audit log cannot write) is always exported.
    std::fs::write(&trigger, b"").expect("arm");
    let failed = request_as(
        "POST",
        &tenants,
        Some(&json!({"tenant": "t"}).to_string()),
        ADMIN,
    );
    assert_eq!(failed.status, 503, "{failed:?}");

    let mut spans = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while spans.len() < 2 && Instant::now() < deadline {
        if let Ok(span) = receiver.spans.recv_timeout(Duration::from_millis(100)) {
            spans.push(span);
        }
    }
    // The exporter batches for up to a second: nothing else may follow.
    while let Ok(span) = receiver.spans.recv_timeout(Duration::from_millis(2500)) {
        spans.push(span);
    }
    assert_eq!(spans.len(), 2, "{spans:#?}");
    assert!(
        spans.iter().all(|s| s.get("decode_error").is_none()),
        "{spans:#?}"
    );
    let sampled = spans
        .iter()
        .find(|s| s["trace_id"] == trace)
        .unwrap_or_else(|| panic!("the sampled trace: {spans:#?}"));
    assert_eq!(sampled["parent_span_id"], parent);
    assert_eq!(sampled["name"], "tenants");
    assert_eq!(sampled["kind"], 2, "SPAN_KIND_SERVER");
    assert_eq!(sampled["status_code"], 0, "unset: not an error");
    assert_eq!(sampled["attributes"]["http.response.status_code"], 200);
    assert_eq!(sampled["attributes"]["http.request.method"], "GET");
    assert_eq!(sampled["attributes"]["oc.request_id"], json!(sampled_id));
    assert!(sampled["end"].as_u64() >= sampled["start"].as_u64());
    assert_eq!(sampled["span_id"].as_str().map(str::len), Some(16));

    let error = spans
        .iter()
        .find(|s| s["status_code"] == 2)
        .unwrap_or_else(|| panic!("the failed request: {spans:#?}"));
    assert_eq!(error["attributes"]["http.response.status_code"], 503);
    assert_eq!(error["attributes"]["error.type"], "audit_unavailable");
    assert_eq!(
        error["attributes"]["oc.request_id"],
        json!(failed.request_id)
    );
    assert_eq!(error["parent_span_id"], "", "a root span");
    assert_eq!(error["trace_id"].as_str().map(str::len), Some(32));
    for span in &spans {
        let resource = &span["resource"];
        assert_eq!(resource["service.name"], "oc-server");
        assert_eq!(resource["cloud.region"], "test-1");
        assert_eq!(resource["deployment.environment"], "ci");
        assert!(resource["host.name"]
            .as_str()
            .is_some_and(|h| !h.is_empty()));
        assert_eq!(span["scope"], "oc-server");
    }
    let (_, scrape) = server.ops_get("/metrics");
    assert_eq!(
        scrape_value(&scrape, "oc_otlp_spans_exported_total"),
        Some(2.0)
    );
}

#[test]
fn an_unreachable_endpoint_drops_and_counts_spans_while_requests_go_on() {
    // Nothing listens on a port the kernel just gave back.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let dir = tempfile::tempdir().expect("tempdir");
    let endpoint = format!("http://127.0.0.1:{port}/v1/traces");
    let server = start_server(dir.path(), &endpoint, &["--otlp-sample-ratio", "1"], &[]);
    let tenants = format!("{}/v1/tenants", server.api);
    for _ in 0..30 {
        let reply = request_as("GET", &tenants, None, ADMIN);
        assert_eq!(reply.status, 200, "{reply:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, scrape) = server.ops_get("/metrics");
        let dropped = scrape_value(
            &scrape,
            "oc_otlp_spans_dropped_total{reason=\"export_failed\"}",
        )
        .unwrap_or(0.0);
        if dropped >= 30.0 {
            assert_eq!(
                scrape_value(&scrape, "oc_otlp_spans_exported_total"),
                Some(0.0)
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "spans were not counted as dropped: {dropped}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A wrong endpoint is refused at start with the fix.
    let refused = common::run_expecting_exit(
        &[
            "--data-dir",
            dir.path().join("other").to_str().expect("utf-8"),
            "--archive",
            "none",
            "--otlp-endpoint",
            "collector:4318",
        ],
        &[],
        Duration::from_secs(20),
    );
    assert!(
        refused
            .stderr
            .contains("must be an http:// or https:// URL"),
        "{refused:?}"
    );
}
