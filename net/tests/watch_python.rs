//! `/watch` read by a third-party SSE client (Python `sseclient-py` over `urllib3`,
//! installed by `.ci/run`): under 8 concurrent writers it sees every acknowledged change
//! once, in LSN order, and resumes from an id it was given. Skipped outside CI when the
//! client is not installed.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::Server;
use serde_json::{json, Value};

fn python_client_available() -> bool {
    let found = Command::new("python3")
        .args(["-c", "import sseclient, urllib3"])
        .status()
        .is_ok_and(|s| s.success());
    if !found && std::env::var_os("CI").is_some() {
        panic!("CI must install the Python SSE client (sseclient-py): see .ci/run");
    }
    found
}

/// The client's events as they arrive, one JSON value per line.
fn spawn_client(
    url: &str,
    changes: usize,
    last_event_id: Option<&str>,
) -> (Child, mpsc::Receiver<Value>) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tools/watch_client.py");
    let mut command = Command::new("python3");
    command.args([
        script,
        url,
        "--changes",
        &changes.to_string(),
        "--timeout-s",
        "30",
    ]);
    if let Some(id) = last_event_id {
        command.args(["--last-event-id", id]);
    }
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let value: Value = serde_json::from_str(&line).expect("the client prints JSON");
            if tx.send(value).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// (LSN, id) of each change event the client printed.
fn changes(events: &[Value]) -> Vec<(u64, i64)> {
    events
        .iter()
        .filter(|e| e["event"] == "change")
        .map(|e| {
            (
                e["data"]["lsn"].as_u64().expect("lsn"),
                e["data"]["key"]["id"].as_i64().expect("id"),
            )
        })
        .collect()
}

fn collect(rx: &mpsc::Receiver<Value>) -> Vec<Value> {
    let mut events = Vec::new();
    while let Ok(event) = rx.recv_timeout(Duration::from_secs(40)) {
        events.push(event);
    }
    events
}

#[test]
fn a_python_sse_client_sees_every_acknowledged_change_in_order_and_resumes() {
    if !python_client_available() {
        eprintln!("skipped: python3 with sseclient-py is not installed");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &["--archive", "none"]);
    server.create_tenant_with_items("acme");
    let url = format!("{}/v1/tenants/acme/watch", server.api);
    let (mut child, rx) = spawn_client(&url, 160, None);
    let hello = rx.recv_timeout(Duration::from_secs(30)).expect("hello");
    assert_eq!(hello["event"], "hello", "{hello}");

    let mut acked = BTreeSet::new();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8i64)
            .map(|writer| {
                let server = &server;
                scope.spawn(move || {
                    let mut mine = Vec::new();
                    for batch in 0..10i64 {
                        let ids = [writer * 100 + batch * 2, writer * 100 + batch * 2 + 1];
                        let ops: Vec<Value> = ids
                            .iter()
                            .map(|id| json!({"upsert": {"id": id, "name": "x", "batch": 0}}))
                            .collect();
                        let reply = server
                            .post("/v1/tenants/acme/tables/items/rows", &json!({ "ops": ops }));
                        assert_eq!(reply.status, 200, "{reply:?}");
                        let lsn = reply.body["lsn"].as_u64().expect("lsn");
                        mine.extend(ids.map(|id| (lsn, id)));
                    }
                    mine
                })
            })
            .collect();
        for handle in handles {
            acked.extend(handle.join().expect("writer"));
        }
    });
    let events = collect(&rx);
    let _ = child.wait();
    let got = changes(&events);
    assert!(got.windows(2).all(|w| w[0].0 <= w[1].0), "LSN order");
    let set: BTreeSet<_> = got.iter().copied().collect();
    assert_eq!(set.len(), got.len(), "no change twice");
    assert_eq!(set, acked, "exactly the acknowledged changes");

    // The client's own resume: from the id of the 80th change, the rest arrives.
    let resume_at = events
        .iter()
        .filter(|e| e["event"] == "change" && e["id"].is_string())
        .nth(39)
        .expect("a batch-ending change")
        .clone();
    let id = resume_at["id"].as_str().expect("id");
    let from: u64 = id
        .split_once('-')
        .expect("epoch-lsn")
        .1
        .parse()
        .expect("lsn");
    let rest: Vec<_> = acked
        .iter()
        .filter(|(lsn, _)| *lsn > from)
        .copied()
        .collect();
    let (mut child, rx) = spawn_client(&url, rest.len(), Some(id));
    let events = collect(&rx);
    let _ = child.wait();
    let replayed = changes(&events);
    assert_eq!(
        replayed.iter().copied().collect::<BTreeSet<_>>(),
        rest.into_iter().collect()
    );
}
