//! Fuzzing entry (and its corpus replay) for the data API's request handling, without
//! a server or shards: raw bytes are parsed as an HTTP/1.1 request head with
//! `httparse` (the parser hyper uses) and turned into the `Request` hyper would hand
//! [`super::handle`]; then the request goes through what `dispatch` does where it lands
//! (routing, the `Authorization` header, `x-request-id`, the declared body, percent-
//! decoded row keys, the query string) and the body through every handler's request
//! type, converted as its handler converts it and applied to a fixture tenant as the
//! owner shard would apply it (`oc_engine::fuzz_entry::fixture`).
//!
//! Every refusal must be a 4xx: a request can be wrong, but it cannot make the server
//! fail. Not reached here: hyper's own body framing (the bytes after the head are the
//! body), the content-type test inside `read_json`, and everything past the mesh call.
#![allow(
    clippy::expect_used,
    reason = "a fuzz harness: its fixtures are valid by construction, and a failed expectation on fuzzed input is the finding"
)]

use hyper::header::{HeaderName, HeaderValue};
use hyper::{HeaderMap, Method, Request, Uri};
use oc_engine::apply::{apply, ShardState};
use oc_engine::command::Command;
use oc_engine::fuzz_entry::{fixture, FIXTURE_TABLE};
use oc_engine::query::{ask_now, param_from_json, AskLimits};
use oc_engine::{record, EngineError, TenantId, WriteOp};
use oc_io::TimestampMicros;

use super::error::ApiError;
use super::handlers::{self as h, AskBody, CreateKey, CreateTable, CreateTenant, WriteRows};
use super::{
    allowed_methods, ask_query, client_request_id, has_body, method_not_allowed, min_lsn_only,
    percent_decode, route_name, segments,
};
use crate::auth::{self, AuthConfig, Caller};

/// Headers hyper's HTTP/1 server parses before it refuses a request (its default).
const MAX_HEADERS: usize = 100;
/// The admin token of the authenticated configuration (long enough to be accepted).
const ADMIN_TOKEN: &str = "fuzz-admin-token-0123456789";
/// Limits for `/ask` bodies: small, so one input never runs for long.
const ASK_LIMITS: AskLimits = AskLimits {
    max_rows_returned: 100,
    max_rows_scanned: 10_000,
    deadline: std::time::Duration::from_secs(1),
    max_memory_bytes: 1 << 20,
};

/// Runs one raw request through the API's parsing, routing and body handling.
pub fn fuzz_entry(bytes: &[u8]) {
    let Some(req) = parse_request(bytes) else {
        return;
    };
    let (tenant, mut state) = fixture();
    route(&req, &tenant, &mut state);
    let body = *req.body();
    if !body.is_empty() {
        bodies(body, &tenant, &mut state);
    }
}

/// The request hyper would build from `bytes`, or `None` where hyper answers 400
/// itself (an incomplete or malformed head, a bad header name or value, a bad URI).
fn parse_request(bytes: &[u8]) -> Option<Request<&[u8]>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(head_len) = parsed.parse(bytes).ok()? else {
        return None;
    };
    let method = Method::from_bytes(parsed.method?.as_bytes()).ok()?;
    let uri: Uri = parsed.path?.parse().ok()?;
    let mut map = HeaderMap::new();
    for header in parsed.headers.iter() {
        map.append(
            HeaderName::from_bytes(header.name.as_bytes()).ok()?,
            HeaderValue::from_bytes(header.value).ok()?,
        );
    }
    let mut req = Request::new(bytes.get(head_len..).unwrap_or_default());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = map;
    Some(req)
}

/// A refusal of client input: never a server error.
fn refused(outcome: Result<(), ApiError>) {
    if let Err(e) = outcome {
        assert!(
            e.status.is_client_error(),
            "client input answered {} {}: {}",
            e.status,
            e.code,
            e.message
        );
    }
}

fn refused_engine<T>(outcome: Result<T, EngineError>) {
    refused(outcome.map(|_| ()).map_err(ApiError::from));
}

/// Applies `command` to the fixture tenant as the owner shard does: through the
/// record codec (the log) and [`apply`].
fn commit(state: &mut ShardState, tenant: &TenantId, command: Command) {
    let (kind, payload) = record::encode(&command);
    let logged = record::decode(kind, &payload).expect("a command the API built decodes");
    assert!(
        logged == command,
        "the record codec round-trips API commands"
    );
    let lsn = state.applied_lsn.next();
    refused_engine(apply(state, tenant, lsn, TimestampMicros(lsn.0), logged));
}

/// What `handle` and `dispatch` do with the head: labels, auth, ids, then the route.
fn route(req: &Request<&[u8]>, tenant: &TenantId, state: &mut ShardState) {
    let method = req.method();
    let path = req.uri().path();
    let label = route_name(method, path);
    assert_eq!(
        allowed_methods(path).is_some(),
        label != "unknown",
        "every known route has an Allow header"
    );
    if let Some(id) = client_request_id(req) {
        assert!(
            HeaderValue::from_str(&id).is_ok(),
            "an echoed x-request-id is a valid header value"
        );
    }
    let _ = has_body(req);
    assert!(matches!(
        auth::identify(req.headers(), &AuthConfig::default()),
        Ok(Caller::Anyone)
    ));
    let config = AuthConfig {
        admin_token: Some(ADMIN_TOKEN.into()),
    };
    refused(auth::identify(req.headers(), &config).map(|_| ()));
    refused(dispatch_head(
        method,
        path,
        req.uri().query(),
        tenant,
        state,
    ));
}

/// The checks `dispatch` makes before a handler's work is sent to the owner shard.
fn dispatch_head(
    method: &Method,
    path: &str,
    query: Option<&str>,
    tenant: &TenantId,
    state: &mut ShardState,
) -> Result<(), ApiError> {
    let s = segments(path);
    if let ["v1", "tenants", t, ..] = s.as_slice() {
        h::tenant_id(t)?;
    }
    match (s.as_slice(), method) {
        (["v1", "tenants", _, "ask"], &Method::POST) => {
            ask_query(query)?;
        }
        // The owner shard checks that what a DELETE names exists before it logs the
        // command (`Shard::revoke_api_key`, `Shard::drop_table`); so does this.
        (["v1", "tenants", _, "keys", key_id], &Method::DELETE)
            if state.tenants[tenant].api_keys().get(key_id).is_some() =>
        {
            let key_id = key_id.to_string();
            commit(state, tenant, Command::RevokeApiKey { key_id });
        }
        (["v1", "tenants", _, "tables", table], &Method::DELETE) => {
            state.tenants[tenant].table(table)?;
            let table = table.to_string();
            commit(state, tenant, Command::DropTable { table });
        }
        (["v1", "tenants", _, "tables", _, "rows", key @ ..], &Method::GET) if !key.is_empty() => {
            let key = key
                .iter()
                .map(|k| percent_decode(k))
                .collect::<Result<Vec<_>, _>>()?;
            min_lsn_only(query)?;
            // `get_row` on the owner, against the fixture's table whatever the path
            // names: its schema decides how the key segments parse.
            let t = &state.tenants[tenant];
            let target = t.table(FIXTURE_TABLE)?;
            let key = h::key_from_path(target.schema(), &key)?;
            let row = target
                .get_by_json_key(&key)
                .map_err(|why| ApiError::bad_request("invalid_key", why))?;
            if let Some(row) = row {
                let _ = target.row_to_json(row);
            }
        }
        _ if route_name(method, path) != "unknown" => {
            let _ = method_not_allowed(method, path);
        }
        _ => {}
    }
    Ok(())
}

/// The body as every handler's request type, each converted as its handler does.
fn bodies(body: &[u8], tenant: &TenantId, state: &mut ShardState) {
    match h::parse_body::<CreateTenant>(body) {
        Ok(b) => refused(h::tenant_id(&b.tenant).map(|_| ())),
        Err(e) => refused(Err(e)),
    }
    match h::parse_body::<CreateTable>(body) {
        Ok(b) => refused(b.schema().map(|schema| {
            commit(state, tenant, Command::CreateTable(schema));
        })),
        Err(e) => refused(Err(e)),
    }
    match h::parse_body::<WriteRows>(body) {
        Ok(b) => refused(write_rows(b, tenant, state)),
        Err(e) => refused(Err(e)),
    }
    match h::parse_body::<AskBody>(body) {
        Ok(b) => {
            let params = b.params.iter().map(param_from_json).collect();
            let _ = ask_now(&state.tenants[tenant], &b.sql, params, ASK_LIMITS);
        }
        Err(e) => refused(Err(e)),
    }
    match h::parse_body::<CreateKey>(body) {
        Ok(b) => refused_engine(state.tenants[tenant].api_keys().validate_new("k2", &b.name)),
        Err(e) => refused(Err(e)),
    }
}

/// `write_rows` and `Shard::write`: the ops validated against the fixture table, logged
/// as one write command and applied.
fn write_rows(body: WriteRows, tenant: &TenantId, state: &mut ShardState) -> Result<(), ApiError> {
    let ops: Vec<WriteOp> = body
        .ops
        .into_iter()
        .map(|op| match op {
            h::OpJson::Upsert(row) => WriteOp::Upsert(row),
            h::OpJson::Delete(key) => WriteOp::Delete(key),
        })
        .collect();
    h::check_idempotency_key(body.idempotency_key.as_deref())?;
    let target = state.tenants[tenant].table(FIXTURE_TABLE)?;
    let writes = target.validate_batch(&ops)?;
    let command = Command::Write {
        table: FIXTURE_TABLE.into(),
        table_version: target.version(),
        writes,
        idempotency_key: body.idempotency_key,
    };
    commit(state, tenant, command);
    Ok(())
}
