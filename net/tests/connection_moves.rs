//! A plain connection whose requests keep going to one other shard's tenants is moved
//! to that shard between two requests, and keeps answering as one connection: over
//! one real socket to a 2-shard server, with requests sent whole, split around a move
//! and pipelined.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{scrape_value, Server};
use oc_engine::{owner_shard, TenantId};
use serde_json::{json, Value};

const SHARDS: usize = 2;
/// Requests in a row for one tenant: more than the fourth move needs (32).
const STREAK: u64 = 40;

/// One keep-alive HTTP/1.1 connection, written and read by hand so that the test knows
/// every request went over the same socket.
struct Connection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    host: String,
}

struct Answer {
    status: u16,
    body: Value,
    /// The shard that answered: the request id starts with it (hex).
    shard: usize,
}

impl Connection {
    fn open(api: &str) -> Connection {
        let host = api.trim_start_matches("http://").to_string();
        let stream = TcpStream::connect(&host).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        Connection {
            reader: BufReader::new(stream.try_clone().expect("clone")),
            writer: stream,
            host,
        }
    }

    fn request_bytes(&self, method: &str, path: &str, body: Option<&Value>) -> Vec<u8> {
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut bytes = format!("{method} {path} HTTP/1.1\r\nhost: {}\r\n", self.host);
        if !body.is_empty() {
            bytes += &format!(
                "content-type: application/json\r\ncontent-length: {}\r\n",
                body.len()
            );
        }
        bytes += "\r\n";
        bytes += &body;
        bytes.into_bytes()
    }

    fn send(&mut self, bytes: &[u8]) {
        self.writer
            .write_all(bytes)
            .expect("the connection takes the request");
    }

    fn answer(&mut self) -> Answer {
        let mut status_line = String::new();
        self.reader
            .read_line(&mut status_line)
            .expect("a status line");
        assert!(
            status_line.starts_with("HTTP/1.1 "),
            "the connection was closed or answered garbage: {status_line:?}"
        );
        let status = status_line[9..12].parse().expect("a status code");
        let (mut length, mut shard) = (0, None);
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).expect("a header line");
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').expect("a header");
            let value = value.trim();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.parse().expect("a length"),
                "x-request-id" => {
                    let prefix = value.split('-').next().expect("an id");
                    shard = Some(usize::from_str_radix(prefix, 16).expect("a shard"));
                }
                "connection" => assert_ne!(value, "close", "the server closed the connection"),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).expect("the body");
        Answer {
            status,
            body: serde_json::from_slice(&body).expect("a JSON body"),
            shard: shard.expect("every answer carries its request id"),
        }
    }

    fn call(&mut self, method: &str, path: &str, body: Option<&Value>) -> Answer {
        let bytes = self.request_bytes(method, path, body);
        self.send(&bytes);
        self.answer()
    }
}

/// A tenant name owned by each shard.
fn tenants_of_each_shard() -> Vec<String> {
    (0..SHARDS)
        .map(|shard| {
            (0..)
                .map(|i| format!("moves{i}"))
                .find(|name| {
                    owner_shard(&TenantId::parse(name).expect("a tenant id"), SHARDS) == shard
                })
                .expect("some name lands on every shard")
        })
        .collect()
}

/// `metric`'s value on `shard`, scraped from `/metrics`.
fn shard_value(server: &Server, metric: &str, shard: usize) -> f64 {
    let (_, scrape) = server.ops_get("/metrics");
    scrape_value(&scrape, &format!("{metric}{{shard=\"{shard}\"}}"))
        .unwrap_or_else(|| panic!("{metric} is reported per shard"))
}

/// `metric` summed over the shards.
fn all_shards(server: &Server, metric: &str) -> f64 {
    (0..SHARDS)
        .map(|shard| shard_value(server, metric, shard))
        .sum()
}

fn moved_total(server: &Server) -> f64 {
    all_shards(server, "oc_http_connections_moved_total")
}

fn row_path(tenant: &str, id: u64) -> String {
    format!("/v1/tenants/{tenant}/tables/items/rows/{id}")
}

/// The row `id` of `tenant` as the items table stores it.
fn expected_name(tenant: &str, id: u64) -> String {
    format!("{tenant}-item-{id}")
}

/// Rows `0..rows` of `tenant`'s items table.
fn write_items(server: &Server, tenant: &str, rows: u64) {
    let ops: Vec<Value> = (0..rows)
        .map(|id| json!({"upsert": {"id": id, "name": expected_name(tenant, id), "batch": id}}))
        .collect();
    let written = server.post(
        &format!("/v1/tenants/{tenant}/tables/items/rows"),
        &json!({ "ops": ops }),
    );
    assert_eq!(written.status, 200, "{written:?}");
}

fn assert_row(answer: &Answer, tenant: &str, id: u64) {
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.body["row"]["name"],
        json!(expected_name(tenant, id)),
        "{}",
        answer.body
    );
}

#[test]
fn a_connection_moves_to_the_shard_its_requests_are_for_and_stays_one_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &["--shards", "2"]);
    let tenants = tenants_of_each_shard();
    for tenant in &tenants {
        server.create_tenant_with_items(tenant);
        write_items(&server, tenant, STREAK);
    }
    assert_eq!(moved_total(&server), 0.0);
    until_setup_connections_closed(&server);

    let mut connection = Connection::open(&server.api);
    let mut moves_seen = 0;
    // Each tenant in turn, twice: whichever shard accepted the connection, a streak
    // for the other shard's tenant moves it (after 4 requests in a row, then 8, 16, 32).
    for round in 0..2 {
        for (owner, tenant) in tenants.iter().enumerate() {
            let mut answered_by = Vec::new();
            for id in 0..STREAK {
                let answer = connection.call("GET", &row_path(tenant, id), None);
                assert_row(&answer, tenant, id);
                answered_by.push(answer.shard);
            }
            // Once the owner answers, it keeps answering: the connection moved once.
            let first_at_owner = answered_by
                .iter()
                .position(|&s| s == owner)
                .unwrap_or_else(|| {
                    panic!("round {round}: {tenant}'s requests never reached shard {owner}: {answered_by:?}")
                });
            assert!(
                answered_by[first_at_owner..].iter().all(|&s| s == owner),
                "round {round}: {tenant}'s requests left their owner again: {answered_by:?}"
            );
            moves_seen += usize::from(first_at_owner > 0);
        }
    }
    // 3 or 4 moves: the first streak needs none when the connection landed on its owner.
    assert!(moves_seen >= 3, "the connection moved {moves_seen} times");
    assert_eq!(moved_total(&server), moves_seen as f64);

    // A write (a request with a body) in the middle of a streak: answered wherever the
    // connection is, and the row reads back through the same socket.
    let tenant = &tenants[0];
    let write =
        json!({"ops": [{"upsert": {"id": 100, "name": expected_name(tenant, 100), "batch": 1}}]});
    let written = connection.call(
        "POST",
        &format!("/v1/tenants/{tenant}/tables/items/rows"),
        Some(&write),
    );
    assert_eq!(written.status, 200, "{}", written.body);
    assert_row(
        &connection.call("GET", &row_path(tenant, 100), None),
        tenant,
        100,
    );
    server.terminate();
}

/// A 2-shard server with the items table for a tenant of each shard.
fn server_with_both_tenants(dir: &std::path::Path, rows: u64) -> (Server, Vec<String>) {
    let server = Server::start(&dir.join("data"), &["--shards", "2"]);
    let tenants = tenants_of_each_shard();
    for tenant in &tenants {
        server.create_tenant_with_items(tenant);
        write_items(&server, tenant, rows);
    }
    (server, tenants)
}

/// A new connection, the shard that accepted it, and the tenant of the other shard.
fn connection_away_from_its_tenant(
    server: &Server,
    tenants: &[String],
) -> (Connection, usize, String) {
    until_setup_connections_closed(server);
    let mut connection = Connection::open(&server.api);
    let pong = connection.call("GET", "/v1/ping", None);
    assert_eq!(pong.status, 200);
    let here = pong.shard;
    (connection, here, tenants[1 - here].clone())
}

fn ping_bytes(connection: &Connection) -> Vec<u8> {
    // Padded so that a few dozen fill more than one 8 KiB read.
    let mut bytes = connection.request_bytes("GET", "/v1/ping", None);
    let pad = format!("x-pad: {}\r\n\r\n", "p".repeat(200));
    bytes.truncate(bytes.len() - 2);
    bytes.extend_from_slice(pad.as_bytes());
    bytes
}

fn assert_pong(answer: &Answer) {
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body, json!({"pong": true}));
}

#[test]
fn a_request_partly_read_when_the_connection_moves_is_answered_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, tenants) = server_with_both_tenants(dir.path(), 64);
    for _ in 0..4 {
        let (mut connection, here, tenant) = connection_away_from_its_tenant(&server, &tenants);
        let owner = 1 - here;
        for id in 0..3 {
            let answer = connection.call("GET", &row_path(&tenant, id), None);
            assert_row(&answer, &tenant, id);
            assert_eq!(answer.shard, here);
        }
        // The fourth request and the first half of the fifth in one write: hyper holds
        // that half when the fourth's answer makes the connection move.
        let mut bytes = connection.request_bytes("GET", &row_path(&tenant, 3), None);
        let fifth = connection.request_bytes("GET", &row_path(&tenant, 4), None);
        let (head, tail) = fifth.split_at(fifth.len() / 2);
        bytes.extend_from_slice(head);
        connection.send(&bytes);
        let fourth = connection.answer();
        assert_row(&fourth, &tenant, 3);
        assert_eq!(fourth.shard, here, "forwarded, before the move");
        std::thread::sleep(Duration::from_millis(20));
        connection.send(tail);
        let answer = connection.answer();
        assert_row(&answer, &tenant, 4);
        assert_eq!(
            answer.shard, owner,
            "the owner answers once it has the connection"
        );
    }
    assert_eq!(moved_total(&server), 4.0);
    server.terminate();
}

#[test]
fn pipelined_requests_move_with_the_connection_twice_and_are_answered_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, tenants) = server_with_both_tenants(dir.path(), 64);
    let (mut connection, here, away) = connection_away_from_its_tenant(&server, &tenants);
    let home = tenants[here].clone();
    // One write: 4 rows of the other shard's tenant (forwarded), then pings hyper
    // answers at once, 16 at a time between yields: at the first yield the connection
    // moves with the rest of the write it read (hyper's buffer and glommio's, 8 KiB
    // each) unread. There, 4 more pings and 8 rows of this shard's tenant (a second
    // move needs 8 in a row), then pings: at the next yield it moves back, while the
    // bytes it brought are still partly unread, partly in hyper's buffer.
    enum Expect {
        Row(String, u64),
        Pong,
    }
    let plan = [
        (Some(&away), 0..4),
        (None, 0..20),
        (Some(&home), 0..8),
        (None, 0..80),
        (Some(&home), 8..40),
    ];
    let ping = ping_bytes(&connection);
    let (mut bytes, mut expected) = (Vec::new(), Vec::new());
    for (tenant, ids) in plan {
        for id in ids {
            match tenant {
                Some(tenant) => {
                    bytes.extend(connection.request_bytes("GET", &row_path(tenant, id), None));
                    expected.push(Expect::Row(tenant.clone(), id));
                }
                None => {
                    bytes.extend_from_slice(&ping);
                    expected.push(Expect::Pong);
                }
            }
        }
    }
    assert!(bytes.len() > 24 << 10, "{} bytes", bytes.len());
    connection.send(&bytes);
    let mut answered_by = Vec::new();
    for expect in &expected {
        let answer = connection.answer();
        match expect {
            Expect::Row(tenant, id) => assert_row(&answer, tenant, *id),
            Expect::Pong => assert_pong(&answer),
        }
        answered_by.push(answer.shard);
    }
    // Answered by this shard, then the other, then this one again.
    let mut runs = answered_by.clone();
    runs.dedup();
    assert_eq!(runs, vec![here, 1 - here, here], "{answered_by:?}");
    assert_eq!(moved_total(&server), 2.0);
    server.terminate();
}

fn open_connections(server: &Server, shard: usize) -> f64 {
    shard_value(server, "oc_http_connections_open", shard)
}

/// Waits until the shards have seen the set-up's connections closed (the harness's
/// client closes each one after its request): a connection still counted on a shard
/// would turn a move away.
fn until_setup_connections_closed(server: &Server) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while (0..SHARDS)
        .map(|shard| open_connections(server, shard))
        .sum::<f64>()
        > 0.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the set-up's connections stay open"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn connections_move_only_to_a_shard_with_no_more_open_and_the_rest_stay_where_they_are() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        &dir.path().join("data"),
        &["--shards", "2", "--max-connections", "16"],
    );
    let tenant = &tenants_of_each_shard()[0];
    server.create_tenant_with_items(tenant);
    write_items(&server, tenant, 16);
    until_setup_connections_closed(&server);
    // 8 connections (the shards' shares are 8 each, however the kernel spreads them).
    let mut connections: Vec<Connection> = (0..8)
        .map(|_| {
            let mut connection = Connection::open(&server.api);
            assert_pong(&connection.call("GET", "/v1/ping", None));
            connection
        })
        .collect();
    let at_owner = open_connections(&server, 0) as usize;
    // One connection at a time: 5 requests for the tenant of shard 0. One away from it
    // moves while shard 0 has no more connections than shard 1; the rest are refused
    // and go on being served (forwarded) where they are.
    for connection in &mut connections {
        for id in 0..5 {
            assert_row(
                &connection.call("GET", &row_path(tenant, id), None),
                tenant,
                id,
            );
        }
    }
    let (mut owner, mut other, mut moved) = (at_owner, 8 - at_owner, 0);
    while other > 0 && owner <= other && owner < 6 {
        (owner, other, moved) = (owner + 1, other - 1, moved + 1);
    }
    assert_eq!(
        moved_total(&server),
        moved as f64,
        "{at_owner} were at the owner"
    );
    let refused = all_shards(&server, "oc_http_connection_moves_refused_total");
    assert_eq!(refused, (8 - at_owner - moved) as f64, "one attempt each");
    assert_eq!(open_connections(&server, 0), owner as f64);
    assert_eq!(open_connections(&server, 1), other as f64);
    // Every connection still answers, the refused ones from where they were.
    for connection in &mut connections {
        assert_row(
            &connection.call("GET", &row_path(tenant, 15), None),
            tenant,
            15,
        );
    }
    server.terminate();
}

#[test]
fn a_connection_moves_after_a_request_whose_body_was_read_and_not_after_one_whose_body_was_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, tenants) = server_with_both_tenants(dir.path(), 8);
    // Writes only: each body is read to its end, so the fourth write moves the
    // connection.
    let (mut connection, here, tenant) = connection_away_from_its_tenant(&server, &tenants);
    let rows = format!("/v1/tenants/{tenant}/tables/items/rows");
    let mut answered_by = Vec::new();
    for id in 100..106 {
        let write = json!({"ops": [{"upsert": {"id": id, "name": expected_name(&tenant, id), "batch": 0}}]});
        let answer = connection.call("POST", &rows, Some(&write));
        assert_eq!(answer.status, 200, "{}", answer.body);
        answered_by.push(answer.shard);
    }
    assert_eq!(answered_by, [here, here, here, here, 1 - here, 1 - here]);
    assert_row(
        &connection.call("GET", &row_path(&tenant, 105), None),
        &tenant,
        105,
    );

    drop(connection);
    // Bodies refused unread (not JSON: 415): hyper may still hold them, so the
    // connection waits for a request it has read whole (a GET) before it moves.
    let (mut connection, here, tenant) = connection_away_from_its_tenant(&server, &tenants);
    let body = "id,name\n7,seven\n";
    let not_json = format!(
        "POST /v1/tenants/{tenant}/tables/items/rows HTTP/1.1\r\nhost: {}\r\ncontent-type: text/csv\r\ncontent-length: {}\r\n\r\n{body}",
        connection.host,
        body.len()
    );
    for _ in 0..4 {
        connection.send(not_json.as_bytes());
        let answer = connection.answer();
        assert_eq!(answer.status, 415, "{}", answer.body);
        assert_eq!(answer.shard, here);
    }
    let answer = connection.call("GET", &row_path(&tenant, 1), None);
    assert_row(&answer, &tenant, 1);
    assert_eq!(
        answer.shard, here,
        "no move right after a body that was not read"
    );
    let answer = connection.call("GET", &row_path(&tenant, 2), None);
    assert_row(&answer, &tenant, 2);
    assert_eq!(answer.shard, 1 - here, "moved after the GET");
    server.terminate();
}
