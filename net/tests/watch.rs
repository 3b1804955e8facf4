//! `/watch` on the real server: every acknowledged change arrives once and in LSN
//! order, resumes are exact, a reader that stops is cut off without slowing writers,
//! kill -9 loses no event, SIGTERM ends streams at once, limits and tokens hold.
//!
//! The SSE client here is the test's own (ureq for HTTP and chunked bodies, a small
//! line parser per the SSE spec); `watch_python.rs` checks the same stream with a
//! third-party Python client.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{request_as, Server};
use serde_json::{json, Value};

/// One server-sent event.
#[derive(Debug, Clone, PartialEq)]
struct Event {
    event: String,
    data: Value,
    id: Option<String>,
}

/// A stream being read.
struct Sse {
    lines: BufReader<Box<dyn Read + Send + Sync>>,
}

impl Sse {
    fn open(url: &str, headers: &[(&str, &str)]) -> Result<Sse, (u16, Value)> {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .timeout_read(Duration::from_secs(10))
            .build();
        let mut req = agent.get(url).set("accept", "text/event-stream");
        for (name, value) in headers {
            req = req.set(name, value);
        }
        match req.call() {
            Ok(response) => {
                assert_eq!(
                    response.header("content-type"),
                    Some("text/event-stream"),
                    "content type"
                );
                Ok(Sse {
                    lines: BufReader::new(response.into_reader()),
                })
            }
            Err(ureq::Error::Status(status, response)) => {
                let body = response.into_string().unwrap_or_default();
                Err((status, serde_json::from_str(&body).unwrap_or(Value::Null)))
            }
            Err(e) => panic!("GET {url}: {e}"),
        }
    }

    /// The next event, skipping comments; `None` at the end of the stream or when
    /// nothing arrives for the read timeout.
    fn next(&mut self) -> Option<Event> {
        let (mut event, mut data, mut id) = (String::new(), String::new(), None);
        loop {
            let mut line = String::new();
            match self.lines.read_line(&mut line) {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if event.is_empty() && data.is_empty() {
                    continue; // after a comment
                }
                let data = serde_json::from_str(&data).expect("event data is JSON");
                return Some(Event { event, data, id });
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => event = value.to_string(),
                "data" => data.push_str(value),
                "id" => id = Some(value.to_string()),
                _ => {}
            }
        }
    }

    /// Events until `done` says stop, the stream ends, or `within` passes.
    fn read_until(&mut self, within: Duration, mut done: impl FnMut(&Event) -> bool) -> Vec<Event> {
        let deadline = Instant::now() + within;
        let mut events = Vec::new();
        while Instant::now() < deadline {
            let Some(event) = self.next() else {
                if events
                    .last()
                    .is_some_and(|e: &Event| e.event == "overflow" || e.event == "shutdown")
                {
                    break;
                }
                continue;
            };
            let stop = done(&event);
            events.push(event);
            if stop {
                break;
            }
        }
        events
    }
}

/// One shard, the smallest segments and a checkpoint every ~1 MB of log: the local log
/// soon releases its first segments.
const SMALL_LOG: [&str; 6] = [
    "--shards",
    "1",
    "--wal-segment-bytes",
    "274432",
    "--checkpoint-wal-bytes",
    "1048576",
];

/// A server with an admin token (and `extra` flags), and that token.
fn start_with_admin(dir: &std::path::Path, extra: &[&str]) -> (Server, &'static str) {
    let admin = "watch-test-admin-token-0123456789";
    let data = dir.join("data");
    let token_file = data.with_extension("token");
    std::fs::write(&token_file, format!("{admin}\n")).expect("token file");
    let token_arg = token_file.to_str().expect("utf-8").to_string();
    let mut args = vec!["--archive", "none", "--admin-token-file", &token_arg];
    args.extend_from_slice(extra);
    (Server::start(&data, &args), admin)
}

fn watch_url(server: &Server, tenant: &str, query: &str) -> String {
    format!("{}/v1/tenants/{tenant}/watch{query}", server.api)
}

/// Writes rows `ids` in one batch and returns the LSN it was acknowledged at.
fn upsert(server: &Server, tenant: &str, ids: &[i64]) -> u64 {
    let ops: Vec<Value> = ids
        .iter()
        .map(|id| json!({"upsert": {"id": id, "name": format!("n{id}"), "batch": 1}}))
        .collect();
    let reply = server.post(
        &format!("/v1/tenants/{tenant}/tables/items/rows"),
        &json!({ "ops": ops }),
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.body["lsn"].as_u64().expect("lsn")
}

/// (lsn, id) of each change event.
fn changes(events: &[Event]) -> Vec<(u64, i64)> {
    events
        .iter()
        .filter(|e| e.event == "change")
        .map(|e| {
            (
                e.data["lsn"].as_u64().expect("lsn"),
                e.data["key"]["id"].as_i64().expect("key id"),
            )
        })
        .collect()
}

fn last_id(events: &[Event]) -> String {
    events
        .iter()
        .rev()
        .find_map(|e| e.id.clone())
        .expect("an event with an id")
}

#[test]
fn every_acknowledged_change_arrives_once_in_lsn_order_under_8_writers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &["--archive", "none"]);
    server.create_tenant_with_items("acme");
    let mut sse = Sse::open(&watch_url(&server, "acme", ""), &[]).expect("stream opens");
    let hello = sse.next().expect("hello");
    assert_eq!(hello.event, "hello");
    let start = hello.data["lsn"].as_u64().expect("lsn");

    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    // Streams opened while the writers run (filtered and not): each gets exactly the
    // changes after the LSN its hello names, whatever was in flight when it joined.
    let late = std::thread::scope(|scope| {
        for writer in 0..8i64 {
            let (server, acked) = (&server, acked.clone());
            scope.spawn(move || {
                for batch in 0..25i64 {
                    let ids = [writer * 1000 + batch * 2, writer * 1000 + batch * 2 + 1];
                    let lsn = upsert(server, "acme", &ids);
                    let mut acked = acked.lock().expect("lock");
                    acked.extend(ids.iter().map(|&id| (lsn, id)));
                }
            });
        }
        let mut late = Vec::new();
        for query in ["", "?tables=items", "", "?tables=items"] {
            std::thread::sleep(Duration::from_millis(5));
            let mut sse = Sse::open(&watch_url(&server, "acme", query), &[]).expect("opens");
            let hello = sse.next().expect("hello");
            late.push((sse, hello.data["lsn"].as_u64().expect("lsn")));
        }
        late
    });
    let acked = acked.lock().expect("lock").clone();
    for (mut sse, from) in late {
        let expected: BTreeSet<(u64, i64)> = acked
            .iter()
            .filter(|(lsn, _)| *lsn > from)
            .copied()
            .collect();
        let mut seen = 0;
        let events = sse.read_until(Duration::from_secs(30), |e| {
            seen += usize::from(e.event == "change");
            seen >= expected.len()
        });
        let got: BTreeSet<(u64, i64)> = changes(&events).into_iter().collect();
        assert_eq!(got, expected, "a stream that joined at LSN {from}");
    }
    let events = sse.read_until(Duration::from_secs(30), {
        let mut seen = 0;
        move |e| {
            seen += usize::from(e.event == "change");
            seen >= 400
        }
    });
    let got = changes(&events);
    assert!(
        got.windows(2).all(|w| w[0].0 <= w[1].0),
        "events in LSN order"
    );
    assert!(got.iter().all(|(lsn, _)| *lsn > start));
    let got_set: BTreeSet<(u64, i64)> = got.iter().copied().collect();
    assert_eq!(got.len(), got_set.len(), "no event twice");
    assert_eq!(got_set, acked, "exactly the acknowledged changes");
    // Every batch's last event carries its id; ids never go backwards.
    let ids: Vec<u64> = events
        .iter()
        .filter_map(|e| e.id.as_ref())
        .map(|id| {
            id.split_once('-')
                .expect("epoch-lsn")
                .1
                .parse()
                .expect("lsn")
        })
        .collect();
    assert!(ids.windows(2).all(|w| w[0] <= w[1]), "{ids:?}");
}

#[test]
fn resume_replays_exactly_what_was_missed_and_reports_what_cannot_be_replayed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &["--archive", "none"]);
    server.create_tenant_with_items("acme");
    let mut lsns = BTreeMap::new();
    let mut sse = Sse::open(&watch_url(&server, "acme", ""), &[]).expect("opens");
    for id in 0..5 {
        lsns.insert(upsert(&server, "acme", &[id]), id);
    }
    let first = sse.read_until(Duration::from_secs(10), |e| e.data["key"]["id"] == 2);
    let resume_at = last_id(&first);
    drop(sse);
    for id in 5..10 {
        lsns.insert(upsert(&server, "acme", &[id]), id);
    }
    let resume_lsn: u64 = resume_at
        .split_once('-')
        .expect("id")
        .1
        .parse()
        .expect("lsn");
    let missed: Vec<(u64, i64)> = lsns
        .range(resume_lsn + 1..)
        .map(|(&lsn, &id)| (lsn, id))
        .collect();
    assert_eq!(missed.len(), 7, "ids 3..10 were not read");

    // Last-Event-ID and ?from_lsn= both resume, and replay exactly the missed changes.
    for headers in [vec![("last-event-id", resume_at.as_str())], vec![]] {
        let query = if headers.is_empty() {
            format!("?from_lsn={resume_lsn}")
        } else {
            String::new()
        };
        let mut sse = Sse::open(&watch_url(&server, "acme", &query), &headers).expect("opens");
        let hello = sse.next().expect("hello");
        assert_eq!(hello.event, "hello");
        assert_eq!(hello.data["lsn"], resume_lsn);
        let events = sse.read_until(Duration::from_secs(10), |e| e.data["key"]["id"] == 9);
        assert!(events.iter().all(|e| e.event != "reset"), "{events:?}");
        assert_eq!(changes(&events), missed);
    }

    // A table filter hides other tables' changes but progress still moves the id on.
    let mut sse = Sse::open(&watch_url(&server, "acme", "?tables=other"), &[]).expect("opens");
    assert_eq!(sse.next().expect("hello").event, "hello");
    let lsn = upsert(&server, "acme", &[100]);
    // (A progress event may come before the write is applied: wait for one past it.)
    let events = sse.read_until(Duration::from_secs(10), |e| {
        e.event == "progress" && e.data["lsn"].as_u64().is_some_and(|l| l >= lsn)
    });
    assert!(changes(&events).is_empty(), "{events:?}");
    let progress = events.last().expect("progress");
    assert_eq!(progress.event, "progress");
    assert!(
        progress.data["lsn"].as_u64().expect("lsn") >= lsn,
        "write at {lsn}: {events:?}"
    );
    assert_eq!(
        progress.id.as_deref(),
        Some(format!("1-{}", progress.data["lsn"]).as_str())
    );

    // A position this log never had (ahead of it, or of another epoch) gets reset.
    for id in ["1-999999", "7-3"] {
        let mut sse =
            Sse::open(&watch_url(&server, "acme", ""), &[("last-event-id", id)]).expect("opens");
        assert_eq!(sse.next().expect("hello").event, "hello");
        assert_eq!(sse.next().expect("reset").event, "reset", "{id}");
    }
}

#[test]
fn a_resume_older_than_the_log_gets_reset_never_a_silent_gap() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Small segments and checkpoints every ~1 MB: the log soon no longer holds LSN 1.
    let server = Server::start(
        &dir.path().join("data"),
        &[SMALL_LOG.as_slice(), &["--archive", "none"]].concat(),
    );
    server.create_tenant_with_items("acme");
    let name = "x".repeat(8000);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut next_id = 0;
    loop {
        assert!(
            Instant::now() < deadline,
            "the log never released its first segment"
        );
        let ops: Vec<Value> = (0..20)
            .map(|i| json!({"upsert": {"id": next_id + i, "name": name, "batch": 1}}))
            .collect();
        next_id += 20;
        let reply = server.post("/v1/tenants/acme/tables/items/rows", &json!({ "ops": ops }));
        assert_eq!(reply.status, 200, "{reply:?}");
        let mut sse = Sse::open(&watch_url(&server, "acme", "?from_lsn=1"), &[]).expect("opens");
        assert_eq!(sse.next().expect("hello").event, "hello");
        let second = sse
            .next()
            .unwrap_or_else(|| panic!("no event after hello:\n{}", server.stderr()));
        if second.event == "reset" {
            assert!(
                second.data["reason"]
                    .as_str()
                    .expect("reason")
                    .contains("holds the resume point"),
                "{second:?}\n{}",
                server.stderr()
            );
            // After the reset the stream goes on live.
            let lsn = upsert(&server, "acme", &[1_000_000]);
            let events = sse.read_until(Duration::from_secs(10), |e| e.event == "change");
            assert_eq!(changes(&events), vec![(lsn, 1_000_000)]);
            return;
        }
        assert!(
            ["schema", "change"].contains(&second.event.as_str()),
            "replayed from the log while it holds it: {second:?}"
        );
    }
}

#[test]
fn a_resume_older_than_the_local_log_is_replayed_from_the_archive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    // The default archive (a directory next to the data directory); small segments
    // and frequent checkpoints, so the local log soon releases its first segments.
    let server = Server::start(&data, &SMALL_LOG);
    server.create_tenant_with_items("acme");
    let first_segment = data.join("shard-0/wal-0000-0000000000000001-0000000000000001.seg");
    let name = "y".repeat(8000);
    let mut acked = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut id = 0i64;
    while first_segment.exists() {
        assert!(
            Instant::now() < deadline,
            "the first segment was never released"
        );
        let ids: Vec<i64> = (id..id + 20).collect();
        id += 20;
        let ops: Vec<Value> = ids
            .iter()
            .map(|i| json!({"upsert": {"id": i, "name": name, "batch": 1}}))
            .collect();
        let reply = server.post("/v1/tenants/acme/tables/items/rows", &json!({ "ops": ops }));
        assert_eq!(reply.status, 200, "{reply:?}");
        let lsn = reply.body["lsn"].as_u64().expect("lsn");
        acked.extend(ids.into_iter().map(|i| (lsn, i)));
    }
    let mut sse = Sse::open(&watch_url(&server, "acme", "?from_lsn=0"), &[]).expect("opens");
    assert_eq!(sse.next().expect("hello").event, "hello");
    let last = acked.last().expect("writes").1;
    let events = sse.read_until(Duration::from_secs(60), |e| e.data["key"]["id"] == last);
    assert!(
        events.iter().all(|e| e.event != "reset"),
        "{:?}",
        events.iter().find(|e| e.event == "reset")
    );
    assert_eq!(
        events[0].event, "schema",
        "the table's creation comes first"
    );
    assert_eq!(
        changes(&events),
        acked,
        "every change, from the archive and then the log"
    );
}

#[test]
fn a_long_resume_under_busy_writes_catches_up_without_overflow() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        &dir.path().join("data"),
        &["--archive", "none", "--watch-buffer-bytes", "65536"],
    );
    server.create_tenant_with_items("acme");
    // A history of many batches to replay (several pages of the log)...
    let mut acked = Vec::new();
    for batch in 0..60i64 {
        let ids: Vec<i64> = (0..500).map(|i| batch * 500 + i).collect();
        let lsn = upsert(&server, "acme", &ids);
        acked.extend(ids.into_iter().map(|id| (lsn, id)));
    }
    // ...and writers that keep the live queue overflowing while it is replayed.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let live = Mutex::new(Vec::new());
    let events = std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut id = 1_000_000i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let ids: Vec<i64> = (id..id + 200).collect();
                id += 200;
                let lsn = upsert(&server, "acme", &ids);
                live.lock()
                    .expect("lock")
                    .extend(ids.into_iter().map(|i| (lsn, i)));
            }
        });
        let mut sse = Sse::open(&watch_url(&server, "acme", "?from_lsn=0"), &[]).expect("opens");
        assert_eq!(sse.next().expect("hello").event, "hello");
        let history_end = acked.last().expect("history").1;
        let mut events = sse.read_until(Duration::from_secs(60), |e| {
            e.data["key"]["id"] == history_end
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(200));
        let last_live = live.lock().expect("lock").last().expect("live writes").1;
        events.extend(sse.read_until(Duration::from_secs(60), |e| {
            e.data["key"]["id"] == last_live
        }));
        events
    });
    assert!(
        events
            .iter()
            .all(|e| e.event != "overflow" && e.event != "reset" && e.event != "error"),
        "{:?}",
        events
            .iter()
            .find(|e| e.event != "change" && e.event != "schema")
    );
    let mut expected = acked;
    expected.extend(live.into_inner().expect("lock"));
    assert_eq!(
        changes(&events),
        expected,
        "history, then live, each change once, in order"
    );
}

#[test]
fn a_dropped_tenant_ends_its_streams_with_tenant_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &["--archive", "none"]);
    server.create_tenant_with_items("acme");
    let mut sse = Sse::open(&watch_url(&server, "acme", ""), &[]).expect("opens");
    assert_eq!(sse.next().expect("hello").event, "hello");
    let lsn = upsert(&server, "acme", &[1]);
    let dropped = server.delete("/v1/tenants/acme");
    assert_eq!(dropped.status, 200, "{dropped:?}");
    let events = sse.read_until(Duration::from_secs(10), |e| e.event == "tenant_dropped");
    assert_eq!(changes(&events), vec![(lsn, 1)]);
    let last = events.last().expect("events");
    assert_eq!(last.event, "tenant_dropped");
    assert!(last.data["lsn"].as_u64().expect("lsn") > lsn);
    assert!(sse.next().is_none(), "the stream ends");
    // The tenant is gone: a new stream is refused.
    let (status, _) = Sse::open(&watch_url(&server, "acme", ""), &[])
        .err()
        .expect("refused");
    assert_eq!(status, 404);
}

/// A tenant created again under a dropped one's name is another tenant: a resume from
/// the start of the log never shows it the earlier one's changes or its drop, before a
/// restart or after one (the checkpoint keeps where the tenant began).
#[test]
fn a_tenant_created_again_never_sees_the_earlier_ones_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = Server::start(&data, &["--archive", "none", "--shards", "1"]);
    server.create_tenant_with_items("acme");
    upsert(&server, "acme", &[1, 2, 3]);
    assert_eq!(server.delete("/v1/tenants/acme").status, 200);
    server.create_tenant_with_items("acme");
    let lsn = upsert(&server, "acme", &[7]);
    let from_start = |server: &Server| {
        let mut sse = Sse::open(&watch_url(server, "acme", "?from_lsn=0"), &[]).expect("opens");
        sse.read_until(Duration::from_secs(10), |e| {
            e.event == "change" && e.data["lsn"] == json!(lsn) || e.event == "tenant_dropped"
        })
    };
    let events = from_start(&server);
    assert_eq!(changes(&events), vec![(lsn, 7)], "{events:?}");
    assert!(
        events.iter().all(|e| e.event != "tenant_dropped"),
        "{events:?}"
    );
    assert!(server.terminate().success());
    let server = Server::start(&data, &["--archive", "none", "--shards", "1"]);
    let events = from_start(&server);
    assert_eq!(
        changes(&events),
        vec![(lsn, 7)],
        "after a restart: {events:?}"
    );
}

/// Starts a server with 64 KiB stream buffers, opens one reader that stops reading and
/// `stalled` more that never read a byte, writes 120 batches of 1,000 rows, and returns
/// the server, the reader, the acknowledged (LSN, id) and how much its resident memory
/// grew during the writes.
fn stalled_readers_run(
    dir: &std::path::Path,
    stalled: usize,
) -> (Server, Sse, Vec<(u64, i64)>, f64) {
    // Stalled readers stay connected however long the writes take (no minimum send
    // rate): what they hold is what is measured.
    let server = Server::start(
        dir,
        &[
            "--archive",
            "none",
            "--watch-buffer-bytes",
            "65536",
            "--min-send-bytes-per-s",
            "0",
        ],
    );
    server.create_tenant_with_items("acme");
    let mut sse = Sse::open(&watch_url(&server, "acme", ""), &[]).expect("opens");
    assert_eq!(sse.next().expect("hello").event, "hello");
    let addr = server.api.trim_start_matches("http://").to_string();
    let never_read: Vec<std::net::TcpStream> = (0..stalled)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(&addr).expect("connect");
            std::io::Write::write_all(
                &mut s,
                b"GET /v1/tenants/acme/watch HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\n\r\n",
            )
            .expect("request");
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let resident = || {
        let (_, scrape) = server.ops_get("/metrics");
        common::scrape_value(&scrape, "process_resident_memory_bytes").expect("rss")
    };
    let before = resident();
    let mut acked = Vec::new();
    for batch in 0..120i64 {
        let ids: Vec<i64> = (0..1000).map(|i| batch * 1000 + i).collect();
        let lsn = upsert(&server, "acme", &ids);
        acked.extend(ids.into_iter().map(|id| (lsn, id)));
    }
    let grown = resident() - before;
    drop(never_read);
    (server, sse, acked, grown)
}

#[test]
fn a_reader_that_stops_gets_overflow_and_the_writers_never_wait() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The same writes with no stalled reader, for the memory baseline...
    let (baseline, _, _, grown_alone) = stalled_readers_run(&dir.path().join("alone"), 0);
    drop(baseline);
    // ...and with 200 readers that never read: each may hold its 64 KiB buffer and
    // hyper's 64 KiB, never what it misses (about 10 MiB each here, 2 GiB for 200).
    let (server, mut sse, acked, grown) = stalled_readers_run(&dir.path().join("data"), 200);
    let per_reader = (grown - grown_alone) / 200.0;
    eprintln!(
        "resident memory grew by {:.1} MiB alone, {:.1} MiB with 200 stalled readers ({:.0} KiB each)",
        grown_alone / 1048576.0,
        grown / 1048576.0,
        per_reader / 1024.0
    );
    assert!(
        per_reader < 512.0 * 1024.0,
        "{per_reader} bytes per stalled reader"
    );

    // Reading again: a prefix of the changes without a gap, then `overflow`, then the end.
    let events = sse.read_until(Duration::from_secs(60), |e| e.event == "overflow");
    let overflow = events.last().expect("events");
    assert_eq!(
        overflow.event,
        "overflow",
        "{:?}",
        &events[events.len().saturating_sub(3)..]
    );
    assert_eq!(overflow.data["limit_bytes"], 65536);
    let got = changes(&events);
    assert!(got.len() < acked.len(), "the reader fell behind");
    assert_eq!(
        got,
        acked[..got.len()].to_vec(),
        "no gap before the overflow"
    );
    assert!(sse.next().is_none(), "the stream ends after overflow");
    // The last id resumes the rest from the log.
    let resume = last_id(&events);
    let mut sse = Sse::open(
        &watch_url(&server, "acme", ""),
        &[("last-event-id", &resume)],
    )
    .expect("opens");
    let rest = sse.read_until(Duration::from_secs(60), |e| {
        e.data["key"]["id"] == acked.last().expect("acked").1
    });
    let resumed_from = resume
        .split_once('-')
        .expect("id")
        .1
        .parse::<u64>()
        .expect("lsn");
    let expected: Vec<(u64, i64)> = acked
        .iter()
        .copied()
        .filter(|(lsn, _)| *lsn > resumed_from)
        .collect();
    assert_eq!(changes(&rest), expected);
    let (_, scrape) = server.ops_get("/metrics");
    assert!(common::scrape_value(&scrape, "oc_watch_overflows_total").expect("counter") >= 200.0);
}

#[test]
fn after_kill_9_a_resume_with_the_last_id_sees_no_gap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = Server::start(&data, &["--archive", "none"]);
    server.create_tenant_with_items("acme");
    let mut sse = Sse::open(&watch_url(&server, "acme", ""), &[]).expect("opens");
    let mut lsns = BTreeMap::new();
    for id in 0..6 {
        lsns.insert(upsert(&server, "acme", &[id]), id);
    }
    let seen = sse.read_until(Duration::from_secs(10), |e| e.data["key"]["id"] == 3);
    let resume = last_id(&seen);
    server.kill9();
    drop(sse);
    let server = Server::start(&data, &["--archive", "none"]);
    for id in 6..9 {
        lsns.insert(upsert(&server, "acme", &[id]), id);
    }
    let mut sse = Sse::open(
        &watch_url(&server, "acme", ""),
        &[("last-event-id", &resume)],
    )
    .expect("opens");
    let events = sse.read_until(Duration::from_secs(10), |e| e.data["key"]["id"] == 8);
    assert!(events.iter().all(|e| e.event != "reset"), "{events:?}");
    let from: u64 = resume.split_once('-').expect("id").1.parse().expect("lsn");
    let expected: Vec<(u64, i64)> = lsns.range(from + 1..).map(|(&l, &i)| (l, i)).collect();
    assert_eq!(changes(&events), expected);
}

#[test]
fn sigterm_ends_every_stream_with_shutdown_without_waiting_out_the_grace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(
        &dir.path().join("data"),
        &["--archive", "none", "--shutdown-grace-ms", "60000"],
    );
    server.create_tenant_with_items("acme");
    let mut streams: Vec<Sse> = (0..4)
        .map(|_| Sse::open(&watch_url(&server, "acme", ""), &[]).expect("opens"))
        .collect();
    for sse in &mut streams {
        assert_eq!(sse.next().expect("hello").event, "hello");
    }
    let asked = Instant::now();
    server.send_sigterm();
    for sse in &mut streams {
        let events = sse.read_until(Duration::from_secs(20), |e| e.event == "shutdown");
        assert_eq!(events.last().map(|e| e.event.as_str()), Some("shutdown"));
        assert!(sse.next().is_none(), "the stream ends after shutdown");
    }
    let status = server.wait_exit(Duration::from_secs(30)).expect("exited");
    assert!(status.success(), "{status:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(30),
        "the streams did not hold the shutdown for the 60 s grace"
    );
}

#[test]
fn limits_tokens_and_keys_guard_streams() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, admin) = start_with_admin(dir.path(), &["--watch-max-streams-per-tenant", "2"]);
    let call = |method: &str, path: &str, body: Option<Value>, token: &str| {
        let url = format!("{}{path}", server.api);
        request_as(method, &url, body.map(|b| b.to_string()).as_deref(), token)
    };
    for tenant in ["acme", "other"] {
        let created = call(
            "POST",
            "/v1/tenants",
            Some(json!({ "tenant": tenant })),
            admin,
        );
        assert_eq!(created.status, 201, "{created:?}");
    }
    let key = call("POST", "/v1/tenants/acme/keys", Some(json!({})), admin);
    assert_eq!(key.status, 201, "{key:?}");
    let key = key.body["key"].as_str().expect("key").to_string();
    let bearer = |t: &str| format!("Bearer {t}");

    // No credentials, a key of another tenant, a garbage token: refused before a stream.
    let url = watch_url(&server, "acme", "");
    assert_eq!(Sse::open(&url, &[]).err().map(|e| e.0), Some(401));
    let other = watch_url(&server, "other", "");
    let (status, body) = Sse::open(&other, &[("authorization", &bearer(&key))])
        .err()
        .expect("refused");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    let garbage = watch_url(&server, "acme", "?token=ocw.acme.99999999999.00");
    assert_eq!(Sse::open(&garbage, &[]).err().map(|e| e.0), Some(401));

    // A tenant key opens its tenant's stream; a token minted with it opens one from a
    // client that cannot send headers, for that tenant only.
    let mut by_key = Sse::open(&url, &[("authorization", &bearer(&key))]).expect("key opens");
    assert_eq!(by_key.next().expect("hello").event, "hello");
    let minted = call(
        "POST",
        "/v1/tenants/acme/watch-tokens",
        Some(json!({"ttl_s": 60})),
        &key,
    );
    assert_eq!(minted.status, 201, "{minted:?}");
    let token = minted.body["token"].as_str().expect("token").to_string();
    assert!(!token.contains(&key), "the token does not carry the key");
    let too_long = call(
        "POST",
        "/v1/tenants/acme/watch-tokens",
        Some(json!({"ttl_s": 999999})),
        &key,
    );
    assert_eq!(too_long.body["error"]["code"], "invalid_ttl");
    let with_token = watch_url(&server, "acme", &format!("?token={token}"));
    let mut by_token = Sse::open(&with_token, &[]).expect("token opens");
    assert_eq!(by_token.next().expect("hello").event, "hello");
    let wrong_tenant = watch_url(&server, "other", &format!("?token={token}"));
    assert_eq!(Sse::open(&wrong_tenant, &[]).err().map(|e| e.0), Some(403));

    // Two streams is this tenant's limit; /usage counts them; another tenant is not
    // affected.
    let (status, body) = Sse::open(&url, &[("authorization", &bearer(admin))])
        .err()
        .expect("limit");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("watch_tenant_limit"))
    );
    assert!(body["error"]["message"]
        .as_str()
        .expect("message")
        .contains("--watch-max-streams-per-tenant"));
    let usage = call("GET", "/v1/tenants/acme/usage", None, admin);
    assert_eq!(usage.body["watch_streams"], 2, "{usage:?}");
    let mut other_stream = Sse::open(&other, &[("authorization", &bearer(admin))]).expect("opens");
    assert_eq!(other_stream.next().expect("hello").event, "hello");
    // Closing a stream gives its place back.
    drop(by_token);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Sse::open(&url, &[("authorization", &bearer(admin))]) {
            Ok(_) => break,
            Err((429, _)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e) => panic!("the closed stream's place was not given back: {e:?}"),
        }
    }
    drop(by_key);
}

/// A server of `shards` shards and `max_connections` connections (`--watch-max-streams`
/// far above) with tenant `acme`: the server, its admin token, the tenants URL and
/// acme's watch URL.
fn acme_to_watch(
    dir: &std::path::Path,
    shards: &str,
    max_connections: &str,
) -> (Server, &'static str, String, String) {
    let (server, admin) = start_with_admin(
        dir,
        &[
            "--shards",
            shards,
            "--max-connections",
            max_connections,
            "--watch-max-streams",
            "100",
        ],
    );
    let tenants = format!("{}/v1/tenants", server.api);
    let body = json!({"tenant": "acme"}).to_string();
    let created = request_as("POST", &tenants, Some(&body), admin);
    assert_eq!(created.status, 201, "{created:?}");
    let url = watch_url(&server, "acme", "");
    (server, admin, tenants, url)
}

/// Streams may hold at most three quarters of `--max-connections`, whatever
/// `--watch-max-streams` says: past that a stream is refused, and requests still find
/// a connection.
#[test]
fn streams_hold_at_most_three_quarters_of_the_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, admin, tenants, url) = acme_to_watch(dir.path(), "1", "8");
    let auth = format!("Bearer {admin}");
    let mut streams = Vec::new();
    for _ in 0..6 {
        let mut stream = Sse::open(&url, &[("authorization", &auth)]).expect("opens");
        assert_eq!(stream.next().expect("hello").event, "hello");
        streams.push(stream);
    }
    let (status, body) = Sse::open(&url, &[("authorization", &auth)])
        .err()
        .expect("a seventh stream is refused");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("watch_server_limit")),
        "{body}"
    );
    let message = body["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("--max-connections"), "{message}");
    let usage = request_as("GET", &format!("{tenants}/acme/usage"), None, admin);
    assert_eq!(usage.status, 200, "requests still find room: {usage:?}");
    assert_eq!(usage.body["watch_streams"], 6, "{usage:?}");
}

/// Each shard keeps a quarter of its own connections from streams: the kernel hands
/// new connections to every shard, and one shard full of streams would refuse its
/// share of the requests while the server-wide count still had room.
#[test]
fn streams_hold_at_most_three_quarters_of_each_shards_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, admin, tenants, url) = acme_to_watch(dir.path(), "2", "16");
    let auth = format!("Bearer {admin}");
    let mut streams = Vec::new();
    let refusal = loop {
        assert!(streams.len() <= 12, "thirteen streams and no refusal");
        match Sse::open(&url, &[("authorization", &auth)]) {
            Ok(mut stream) => {
                assert_eq!(stream.next().expect("hello").event, "hello");
                streams.push(stream);
            }
            Err(refused) => break refused,
        }
    };
    let (status, body) = refusal;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("watch_server_limit")),
        "after {} streams: {body}",
        streams.len()
    );
    assert!(
        streams.len() >= 6,
        "refused after {} streams",
        streams.len()
    );
    // New connections land on both shards: every one is served.
    for _ in 0..20 {
        let usage = request_as("GET", &format!("{tenants}/acme/usage"), None, admin);
        assert_eq!(usage.status, 200, "{usage:?}");
    }
}

#[test]
fn a_keys_stream_opens_count_against_its_rate_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, admin) = start_with_admin(
        dir.path(),
        &["--rate-limit-rps", "0.1", "--rate-limit-burst", "3"],
    );
    let call = |method: &str, path: &str, body: Option<Value>| {
        let url = format!("{}{path}", server.api);
        request_as(method, &url, body.map(|b| b.to_string()).as_deref(), admin)
    };
    assert_eq!(
        call("POST", "/v1/tenants", Some(json!({"tenant": "acme"}))).status,
        201
    );
    let key = call("POST", "/v1/tenants/acme/keys", Some(json!({})));
    let key = format!("Bearer {}", key.body["key"].as_str().expect("key"));
    let url = watch_url(&server, "acme", "");
    // A reconnect storm: each open spends a token, closed streams give none back.
    for _ in 0..3 {
        let sse = Sse::open(&url, &[("authorization", &key)]).expect("within the burst");
        drop(sse);
    }
    let (status, body) = Sse::open(&url, &[("authorization", &key)])
        .err()
        .expect("limited");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("rate_limited")),
        "{body}"
    );
}

#[test]
fn revoking_a_key_ends_its_streams_and_voids_its_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, admin) = start_with_admin(dir.path(), &[]);
    let call = |method: &str, path: &str, body: Option<Value>, token: &str| {
        let url = format!("{}{path}", server.api);
        request_as(method, &url, body.map(|b| b.to_string()).as_deref(), token)
    };
    assert_eq!(
        call(
            "POST",
            "/v1/tenants",
            Some(json!({"tenant": "acme"})),
            admin
        )
        .status,
        201
    );
    let made = call("POST", "/v1/tenants/acme/keys", Some(json!({})), admin);
    let (key, key_id) = (
        made.body["key"].as_str().expect("key").to_string(),
        made.body["key_id"].as_str().expect("key id").to_string(),
    );
    let other = call("POST", "/v1/tenants/acme/keys", Some(json!({})), admin);
    let other = other.body["key"].as_str().expect("key").to_string();
    let minted = call(
        "POST",
        "/v1/tenants/acme/watch-tokens",
        Some(json!({})),
        &key,
    );
    let token = minted.body["token"].as_str().expect("token").to_string();
    let url = watch_url(&server, "acme", "");
    let with_token = watch_url(&server, "acme", &format!("?token={token}"));
    let mut by_key =
        Sse::open(&url, &[("authorization", &format!("Bearer {key}"))]).expect("opens");
    let mut by_token = Sse::open(&with_token, &[]).expect("opens");
    let mut by_other =
        Sse::open(&url, &[("authorization", &format!("Bearer {other}"))]).expect("opens");
    for sse in [&mut by_key, &mut by_token, &mut by_other] {
        assert_eq!(sse.next().expect("hello").event, "hello");
    }
    let revoked = call(
        "DELETE",
        &format!("/v1/tenants/acme/keys/{key_id}"),
        None,
        admin,
    );
    assert_eq!(revoked.status, 200, "{revoked:?}");
    for sse in [&mut by_key, &mut by_token] {
        let events = sse.read_until(Duration::from_secs(10), |e| e.event == "revoked");
        assert_eq!(
            events.last().map(|e| e.event.as_str()),
            Some("revoked"),
            "{events:?}"
        );
        assert!(sse.next().is_none(), "the stream ends");
    }
    // The other key's stream goes on, and never hears of the revocation.
    let created = call(
        "POST",
        "/v1/tenants/acme/tables",
        Some(common::items_table()),
        admin,
    );
    assert_eq!(created.status, 201);
    let events = by_other.read_until(Duration::from_secs(10), |e| e.event == "schema");
    assert!(
        events
            .iter()
            .all(|e| e.event != "revoked" && e.event != "key_revoked"),
        "{events:?}"
    );
    assert_eq!(events.last().map(|e| e.event.as_str()), Some("schema"));
    // The token minted with the revoked key opens nothing any more.
    assert_eq!(Sse::open(&with_token, &[]).err().map(|e| e.0), Some(401));
}

#[test]
fn after_a_restore_old_ids_resume_on_the_shared_history_and_reset_past_the_fork() {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = format!("file://{}", dir.path().join("archive").display());
    let server = Server::start(
        &dir.path().join("data"),
        &[
            "--shards",
            "1",
            "--archive",
            &archive,
            "--tail-window-ms",
            "100",
        ],
    );
    server.create_tenant_with_items("acme");
    let before: Vec<u64> = (0..5).map(|id| upsert(&server, "acme", &[id])).collect();
    std::thread::sleep(Duration::from_millis(200));
    let cut_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_micros() as u64;
    std::thread::sleep(Duration::from_millis(200));
    let lost: Vec<u64> = (5..8).map(|id| upsert(&server, "acme", &[id])).collect();
    common::wait_until_archived(&server, 1);
    assert!(server.terminate().success());

    // Restore to the instant between the two groups of writes: a new epoch begins
    // right after the restore point, and LSNs of the lost writes are used again.
    let restored = dir.path().join("restored");
    let target = oc_ship::timestamp::format_rfc3339(cut_us);
    let run = common::restore_at(&archive, &target, &restored);
    assert!(run.success, "{run:?}");
    let archive2 = format!("file://{}", dir.path().join("archive2").display());
    let restored_args = [
        "--shards",
        "1",
        "--archive",
        &archive2,
        "--tail-window-ms",
        "100",
    ];
    let server = Server::start(&restored, &restored_args);
    let mut sse = Sse::open(&watch_url(&server, "acme", ""), &[]).expect("opens");
    let hello = sse.next().expect("hello");
    let epoch = hello.data["epoch"].as_u64().expect("epoch");
    assert!(epoch > 1, "a restore starts a new epoch: {hello:?}");
    let again: Vec<u64> = (100..103)
        .map(|id| upsert(&server, "acme", &[id]))
        .collect();
    assert_eq!(
        again[0], lost[0],
        "the restored server writes the lost writes' LSNs again"
    );
    let events = sse.read_until(Duration::from_secs(10), |e| e.data["key"]["id"] == 102);
    assert!(events
        .iter()
        .filter_map(|e| e.id.as_deref())
        .all(|id| id.starts_with(&format!("{epoch}-"))));

    // An id on the shared history resumes: the rest of it, then the new epoch.
    let shared = format!("1-{}", before[2]);
    let mut sse = Sse::open(
        &watch_url(&server, "acme", ""),
        &[("last-event-id", &shared)],
    )
    .expect("opens");
    assert_eq!(sse.next().expect("hello").event, "hello");
    let events = sse.read_until(Duration::from_secs(10), |e| e.data["key"]["id"] == 102);
    assert!(events.iter().all(|e| e.event != "reset"), "{events:?}");
    let expected: Vec<(u64, i64)> = vec![
        (before[3], 3),
        (before[4], 4),
        (again[0], 100),
        (again[1], 101),
        (again[2], 102),
    ];
    assert_eq!(changes(&events), expected);

    // The log now holds epoch 1 and epoch 2 segments: a restart (kill -9) recovers
    // both, and the new epoch goes on.
    drop(sse);
    server.kill9();
    let server = Server::start(&restored, &restored_args);
    let more = upsert(&server, "acme", &[103]);
    assert!(more > again[2]);
    let mut sse = Sse::open(
        &watch_url(&server, "acme", ""),
        &[("last-event-id", &shared)],
    )
    .expect("opens");
    assert_eq!(sse.next().expect("hello").data["epoch"], epoch);
    let events = sse.read_until(Duration::from_secs(10), |e| e.data["key"]["id"] == 103);
    let mut expected_after_restart = expected.clone();
    expected_after_restart.push((more, 103));
    assert_eq!(changes(&events), expected_after_restart);

    // An id from past the restore point is on a branch this server does not have,
    // although its LSN exists here too: reset, never the other history's events.
    let dead = format!("1-{}", lost[1]);
    let mut sse =
        Sse::open(&watch_url(&server, "acme", ""), &[("last-event-id", &dead)]).expect("opens");
    assert_eq!(sse.next().expect("hello").event, "hello");
    assert_eq!(sse.next().expect("reset").event, "reset");

    // A restore of the restored server's archive starts yet another epoch. Ids of the
    // epoch it continues resume; older ones get `reset` (this directory does not know
    // where they ended: when unsure, start over).
    common::wait_until_archived(&server, 1);
    assert!(server.terminate().success());
    let twice = dir.path().join("twice");
    let run = common::restore_latest(&archive2, &twice);
    assert!(run.success, "{run:?}");
    let server = Server::start(&twice, &["--shards", "1", "--archive", "none"]);
    let on_branch = format!("{epoch}-{}", again[0]);
    let mut sse = Sse::open(
        &watch_url(&server, "acme", ""),
        &[("last-event-id", &on_branch)],
    )
    .expect("opens");
    let hello = sse.next().expect("hello");
    assert!(
        hello.data["epoch"].as_u64().expect("epoch") > epoch,
        "{hello:?}"
    );
    let events = sse.read_until(Duration::from_secs(10), |e| e.data["key"]["id"] == 103);
    assert!(events.iter().all(|e| e.event != "reset"), "{events:?}");
    assert_eq!(
        changes(&events),
        vec![(again[1], 101), (again[2], 102), (more, 103)]
    );
    let old = format!("1-{}", before[2]);
    let mut sse =
        Sse::open(&watch_url(&server, "acme", ""), &[("last-event-id", &old)]).expect("opens");
    assert_eq!(sse.next().expect("hello").event, "hello");
    assert_eq!(sse.next().expect("reset").event, "reset");
}

/// A replay of writes made before a migration names their keys: their schema is the
/// shape the cutover replaced, not an unknown one (which the stream reports as a `null`
/// key, telling the consumer to evict the whole table). More than a replay page of log
/// precedes the migration, so the table's creation is not in the pages that follow.
#[test]
fn a_replay_across_a_migration_names_every_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &["--archive", "none"]);
    server.create_tenant_with_items("acme");
    let rows = 3000;
    for chunk in (0..rows).collect::<Vec<i64>>().chunks(250) {
        let ops: Vec<Value> = chunk
            .iter()
            .map(|id| json!({"upsert": {"id": id, "name": "x".repeat(600), "batch": 1}}))
            .collect();
        let reply = server.post("/v1/tenants/acme/tables/items/rows", &json!({ "ops": ops }));
        assert_eq!(reply.status, 200, "{reply:?}");
    }
    let steps = json!([{"op": "add_column", "name": "extra", "type": "int"}]);
    let started = server.post(
        "/v1/tenants/acme/migrations",
        &json!({"table": "items", "steps": steps}),
    );
    assert_eq!(started.status, 202, "{started:?}");
    let id = started.body["id"].as_u64().expect("id");
    let deadline = Instant::now() + Duration::from_secs(30);
    while server
        .get(&format!("/v1/tenants/acme/migrations/{id}"))
        .body["state"]
        != "done"
    {
        assert!(Instant::now() < deadline, "the migration did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut sse = Sse::open(&watch_url(&server, "acme", "?from_lsn=0"), &[]).expect("opens");
    let events = sse.read_until(Duration::from_secs(30), |e| {
        e.event == "change" && e.data["key"]["id"] == rows - 1
    });
    let keys: Vec<i64> = events
        .iter()
        .filter(|e| e.event == "change")
        .map(|e| {
            e.data["key"]["id"]
                .as_i64()
                .unwrap_or_else(|| panic!("a change without its key: {}", e.data))
        })
        .collect();
    assert_eq!(keys, (0..rows).collect::<Vec<_>>());
}

/// A watch token outlives a restart of its server (an `EventSource` reconnects with
/// the URL it has), and is void on a server of another admin token.
#[test]
fn a_watch_token_outlives_a_restart_and_is_void_under_another_admin_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, admin) = start_with_admin(dir.path(), &[]);
    let created = request_as(
        "POST",
        &format!("{}/v1/tenants", server.api),
        Some(&json!({"tenant": "acme"}).to_string()),
        admin,
    );
    assert_eq!(created.status, 201, "{created:?}");
    let minted = request_as(
        "POST",
        &format!("{}/v1/tenants/acme/watch-tokens", server.api),
        None,
        admin,
    );
    assert_eq!(minted.status, 201, "{minted:?}");
    let token = minted.body["token"].as_str().expect("token").to_string();
    assert!(server.terminate().success());
    let (server, _) = start_with_admin(dir.path(), &[]);
    let url = watch_url(&server, "acme", &format!("?token={token}"));
    let mut stream = Sse::open(&url, &[]).expect("the token opens after a restart");
    assert_eq!(stream.next().expect("hello").event, "hello");
    drop(stream);
    assert!(server.terminate().success());
    let other_token = dir.path().join("other.token");
    std::fs::write(&other_token, "another-admin-token-0123456789\n").expect("token file");
    let server = Server::start(
        &dir.path().join("data"),
        &[
            "--archive",
            "none",
            "--admin-token-file",
            other_token.to_str().expect("utf-8"),
        ],
    );
    let url = watch_url(&server, "acme", &format!("?token={token}"));
    assert_eq!(Sse::open(&url, &[]).err().map(|e| e.0), Some(401));
}
