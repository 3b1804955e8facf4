//! The data API on every shard: `/v1/tenants/...` (docs/API.md). A request is parsed
//! and checked where it landed, its work runs on the tenant's owner shard, and every
//! response — success or error — carries `x-request-id` and is counted by route and
//! status.
//!
//! One file, about 780 lines of code: routing, method checks, audit wrapping and body
//! reading, the request path every route shares.

pub mod body;
pub mod error;
pub mod fuzz;
pub mod handlers;
pub mod watch;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::convert::Infallible;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_lite::future;
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use oc_engine::query::AskLimits;
use oc_engine::stages::{Laps, Side, Stage};
use oc_engine::{ShardRouter, TenantId};
use tracing::Instrument;

use oc_ship::audit::{self, Auditor};

use crate::auth::{self, AuthConfig, Caller, KeyClaim};
use crate::metrics;
use crate::rate_limit::RateLimit;
use error::ApiError;
use handlers::{self as h, Answer};

/// Limits and deadlines of the data API.
#[derive(Debug, Clone, Copy)]
pub struct ApiLimits {
    pub max_body_bytes: usize,
    /// Bytes of request bodies a shard holds while receiving them, in all; a caller
    /// (a tenant's keys, the admin, or anyone) holds at most half.
    pub body_pool_bytes: usize,
    /// Request bodies one caller may be sending to a shard at once.
    pub bodies_per_caller: usize,
    /// The least average rate of a body after [`BODY_RATE_GRACE`] (0: none).
    pub min_body_bytes_per_s: u64,
    pub body_read_timeout: Duration,
    pub request_deadline: Duration,
    /// The longest a read waits for its `min_lsn`.
    pub min_lsn_wait: Duration,
    pub max_in_flight_per_tenant: usize,
    pub ask: AskLimits,
    pub rate_limit: RateLimit,
    pub watch: watch::WatchLimits,
}

/// API keys this shard saw the owner accept lately, so that a caller whose key does
/// not exist is refused before its body is read: secret digest → (tenant, key id, when
/// it was accepted).
type KnownKeys = RefCell<HashMap<[u8; 32], (TenantId, String, Instant)>>;
/// How long an accepted key is trusted before the next body without asking again...
const KNOWN_KEY_TTL: Duration = Duration::from_secs(5);
/// ...and how many are remembered (the map is cleared when full).
const KNOWN_KEYS_MAX: usize = 4096;

/// How long `GET /v1/admin/digest` may take.
const DIGEST_DEADLINE: Duration = Duration::from_secs(600);

/// What a shard's request handler needs.
pub struct ApiContext {
    pub router: Rc<ShardRouter>,
    pub limits: ApiLimits,
    pub auth: AuthConfig,
    pub shard: usize,
    /// The archive, for `/watch` resumes older than the local log.
    pub archive: Option<std::sync::Arc<dyn oc_ship::archive::Archive>>,
    /// The data directory's layout: its epochs tell `/watch` ids of this history from
    /// ids of a branch it does not have.
    pub layout: oc_engine::placement::LiveLayout,
    pub auditor: Auditor,
    /// Set on a follower: while it is one, writes are refused with `421 not_leader`
    /// naming its writer.
    pub role: Option<std::sync::Arc<crate::replication::ApiRole>>,
    next_request: Cell<u64>,
    known_keys: KnownKeys,
}

impl ApiContext {
    pub fn new(
        router: Rc<ShardRouter>,
        limits: ApiLimits,
        auth: AuthConfig,
        shard: usize,
        archive: Option<std::sync::Arc<dyn oc_ship::archive::Archive>>,
        layout: oc_engine::placement::LiveLayout,
        auditor: Auditor,
    ) -> Self {
        ApiContext {
            router,
            limits,
            auth,
            shard,
            archive,
            layout,
            auditor,
            role: None,
            next_request: Cell::new(0),
            known_keys: RefCell::new(HashMap::new()),
        }
    }

    /// Whether this server is a follower now.
    fn is_follower(&self) -> bool {
        self.role.as_ref().is_some_and(|r| r.is_follower())
    }

    fn freshness(&self, min_lsn: u64) -> h::Freshness {
        h::Freshness {
            min_lsn,
            wait: self.limits.min_lsn_wait,
            follower: self.is_follower(),
            role: self.role.clone(),
        }
    }

    /// Refuses an API key its tenant does not hold (never did, revoked, or forged: 401),
    /// before anything else is done for its caller. An unknown key with a huge, slow
    /// body then costs one header read, not a body read and a connection held.
    async fn verify_key(&self, claim: &KeyClaim) -> Result<(), ApiError> {
        let fresh = self
            .known_keys
            .borrow()
            .get(&claim.secret_sha256)
            .is_some_and(|(tenant, key_id, seen)| {
                *tenant == claim.tenant && *key_id == claim.key_id && seen.elapsed() < KNOWN_KEY_TTL
            });
        if fresh {
            return Ok(());
        }
        if !h::key_is_known(&self.router, claim).await? {
            return Err(auth::unknown_key());
        }
        let mut known = self.known_keys.borrow_mut();
        if known.len() >= KNOWN_KEYS_MAX {
            known.clear();
        }
        known.insert(
            claim.secret_sha256,
            (claim.tenant.clone(), claim.key_id.clone(), Instant::now()),
        );
        Ok(())
    }

    /// `<shard>-<counter>-<process nonce>`: unique without coordination between shards.
    fn new_request_id(&self) -> String {
        let n = self.next_request.get();
        self.next_request.set(n + 1);
        format!("{:x}-{n:x}-{:08x}", self.shard, process_nonce())
    }
}

pub(crate) fn process_nonce() -> u32 {
    static NONCE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *NONCE.get_or_init(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        now.subsec_nanos() ^ std::process::id().rotate_left(16)
    })
}

/// A client's `x-request-id`, if it is one we can echo safely.
fn client_request_id<B>(req: &Request<B>) -> Option<String> {
    let raw = req.headers().get("x-request-id")?.to_str().ok()?;
    let ok = !raw.is_empty()
        && raw.len() <= 128
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    ok.then(|| raw.to_string())
}

/// A response body: a whole JSON answer, or a `/watch` event stream.
pub type ApiBody = Either<SlicedBody, watch::WatchBody>;

/// The most of a whole answer handed to hyper at once.
const SLICE_BYTES: usize = 64 << 10;

/// A whole answer handed to hyper a slice at a time. hyper copies each data frame into
/// its write buffer (these streams do not write vectored) and asks for the next only
/// once that buffer has room, so the part a client has not read yet stays here, in the
/// answer's own `Bytes`, rather than copied whole into hyper's buffer: whatever is
/// charged to the answer until it is sent (an `/ask` answer's share of the queries'
/// memory) is let go only then, or when the connection closes.
pub struct SlicedBody {
    rest: Bytes,
    /// Counts a large answer against its caller while it is sent.
    _held: Option<body::AnswerHold>,
}

impl SlicedBody {
    pub fn new(whole: Bytes) -> SlicedBody {
        SlicedBody {
            rest: whole,
            _held: None,
        }
    }

    /// An answer, which keeps its request's hold while it is sent when it is larger
    /// than hyper's buffer.
    fn answer(whole: Bytes, hold: Option<body::AnswerHold>) -> SlicedBody {
        SlicedBody {
            _held: hold.and_then(|hold| hold.answering(whole.len())),
            rest: whole,
        }
    }
}

impl hyper::body::Body for SlicedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        if self.rest.is_empty() {
            return std::task::Poll::Ready(None);
        }
        let slice = self.rest.len().min(SLICE_BYTES);
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(
            self.rest.split_to(slice),
        ))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.rest.len() as u64)
    }
}

/// Answers one request; never fails (errors become JSON responses).
pub async fn handle(
    ctx: Rc<ApiContext>,
    mut req: Request<Incoming>,
) -> Result<Response<ApiBody>, Infallible> {
    let started = Instant::now();
    // HEAD is answered as GET; hyper, which read the request as HEAD, sends the head
    // (Content-Length included) without the body.
    if req.method() == Method::HEAD {
        *req.method_mut() = Method::GET;
    }
    let request_id = client_request_id(&req).unwrap_or_else(|| ctx.new_request_id());
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let route = route_name(&method, &path);
    let trace_parent = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(crate::otlp::TraceParent::parse);
    let mut error_code = None;
    // The request's span: every log line below (and in the handlers) carries the
    // request id, the shard it landed on and the tenant. Never the Authorization header.
    let tenant = match segments(&path).as_slice() {
        ["v1", "tenants", t, ..] => *t,
        _ => "",
    };
    let span = tracing::info_span!("request", %request_id, shard = ctx.shard, tenant, route);
    // The drill's digest reads every row of the server, a slice at a time: it gets
    // longer than an ordinary request (and only the admin can ask for it).
    let deadline = if route == "admin_digest" {
        DIGEST_DEADLINE.max(ctx.limits.request_deadline)
    } else {
        ctx.limits.request_deadline
    };
    let deadline_exceeded = async {
        glommio::timer::sleep(deadline).await;
        let reads = !changes_state(&path, &method);
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "deadline_exceeded",
            format!(
                "the request did not finish within {} ms; {}",
                deadline.as_millis(),
                if reads {
                    "a read changes nothing: retry it"
                } else {
                    "a write may or may not have been applied: retry it with the same \
                     idempotency_key"
                }
            ),
        ))
    };
    // The caller's hold on the request and its answer, once the dispatcher knows it.
    let answered_to = Cell::new(None);
    let answer = if let Err(e) = check_framing_headers(&req) {
        Err(e)
    } else if route == "watch" && method == Method::GET {
        // Only the opening runs under the deadline; the stream lives on its own terms.
        let opening = async { open_watch(&ctx, req).await.map(Reply::Stream) };
        future::or(opening, deadline_exceeded)
            .instrument(span.clone())
            .await
    } else {
        let answering = async {
            dispatch(&ctx, req, &request_id, &answered_to)
                .await
                .map(Reply::Json)
        };
        future::or(answering, deadline_exceeded)
            .instrument(span.clone())
            .await
    };
    let _entered = span.enter();
    let mut response = match answer {
        Ok(Reply::Json((status, body))) => {
            let body = match body {
                h::Body::Json(json) => Bytes::from(json.to_string()),
                h::Body::Encoded(bytes) => bytes,
            };
            let body = SlicedBody::answer(body, answered_to.take());
            let mut response = Response::new(Either::Left(body));
            *response.status_mut() = status;
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Ok(Reply::Stream(stream)) => {
            let mut response = Response::new(Either::Right(stream));
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            // Proxies that buffer responses would hold events back.
            headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
            // A browser's EventSource on another origin (a watch token in its URL) may
            // read the stream: the token is the credential, and no cookie is ever one.
            headers.insert(
                hyper::header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
            response
        }
        Err(e) => {
            error_code = Some(e.code);
            if e.status.is_server_error() {
                tracing::warn!(%method, %path, code = e.code, message = %e.message, "request failed");
            }
            let allow = (e.status == StatusCode::METHOD_NOT_ALLOWED)
                .then(|| allowed_methods(&path))
                .flatten();
            let mut response = e
                .into_response(&request_id)
                .map(|body| Either::Left(SlicedBody::new(body)));
            if let Some(allow) = allow {
                response
                    .headers_mut()
                    .insert(ALLOW, HeaderValue::from_static(allow));
            }
            response
        }
    };
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    metrics::record_request(route, status, elapsed);
    crate::otlp::record(crate::otlp::Finished {
        route,
        method: method.as_str(),
        status,
        error_code,
        elapsed,
        shard: ctx.shard,
        tenant,
        request_id: &request_id,
        parent: trace_parent,
    });
    tracing::debug!(%method, %path, status, "request");
    Ok(response)
}

enum Reply {
    Json((StatusCode, h::Body)),
    Stream(watch::WatchBody),
}

/// Checks a `/watch` request and opens its stream. A tenant key is checked like for a
/// read; a browser's `EventSource`, which cannot send headers, passes a watch token
/// (`?token=`) instead.
async fn open_watch(
    ctx: &ApiContext,
    req: Request<Incoming>,
) -> Result<watch::WatchBody, ApiError> {
    let path = req.uri().path().to_string();
    let parts = segments(&path);
    let ["v1", "tenants", t, "watch"] = parts.as_slice() else {
        return Err(ApiError::not_found("no endpoint here; see docs/API.md"));
    };
    let tenant = h::tenant_id(t)?;
    let last_event_id = req
        .headers()
        .get("last-event-id")
        .map(|v| v.to_str().unwrap_or("\u{fffd}"));
    let request = watch::parse_request(
        req.uri().query(),
        last_event_id,
        ctx.layout.current().epoch(),
    )?;
    let mut key_id = None;
    match &request.token {
        Some(token) => key_id = crate::auth::check_watch_token(token, &tenant, &ctx.auth)?,
        None => {
            if let Caller::Key(claim) = auth::identify(req.headers(), &ctx.auth)? {
                ctx.verify_key(&claim).await?;
                if claim.tenant != tenant {
                    return Err(auth::key_of_another_tenant(&claim, tenant.as_str()));
                }
                key_id = Some(claim.key_id);
            }
        }
    }
    watch::open(ctx, tenant, request, key_id).await
}

/// The path split into segments (`/v1/tenants/a` → `["v1", "tenants", "a"]`). A
/// trailing or doubled `/` leaves an empty segment, which no route has: `DELETE
/// /v1/tenants/a/tables/` must not read as `DELETE /v1/tenants/a`.
fn segments(path: &str) -> Vec<&str> {
    path.strip_prefix('/').unwrap_or(path).split('/').collect()
}

/// The metrics label of a request: its route pattern, never a tenant or key.
fn route_name(method: &Method, path: &str) -> &'static str {
    let s = segments(path);
    match (s.as_slice(), method) {
        (["v1", "tenants"], _) => "tenants",
        (["v1", "tenants", _], _) => "tenant",
        (["v1", "tenants", _, "usage"], _) => "usage",
        (["v1", "tenants", _, "watch"], _) => "watch",
        (["v1", "tenants", _, "watch-tokens"], _) => "watch_tokens",
        (["v1", "tenants", _, "ask"], _) => "ask",
        (["v1", "tenants", _, "keys"], _) => "keys",
        (["v1", "tenants", _, "keys", _], _) => "key",
        (["v1", "tenants", _, "migrations"], _) => "migrations",
        (["v1", "tenants", _, "migrations", _], _) => "migration",
        (["v1", "tenants", _, "migrations", _, "abort"], _) => "migration_abort",
        (["v1", "tenants", _, "tables"], _) => "tables",
        (["v1", "tenants", _, "tables", _], _) => "table",
        (["v1", "tenants", _, "tables", _, "rows"], _) => "rows_write",
        (["v1", "tenants", _, "tables", _, "rows", ..], _) => "row_get",
        (["v1", "audit", "logs"], _) => "audit_logs",
        (["v1", "admin", "digest"], _) => "admin_digest",
        (["v1", "openapi.json"], _) => "openapi",
        (["v1", "ping"], _) => "ping",
        _ => "unknown",
    }
}

/// The `Allow` header for a known route.
fn allowed_methods(path: &str) -> Option<&'static str> {
    Some(match route_name(&Method::GET, path) {
        "tenants" | "tables" | "keys" | "migrations" => "GET, HEAD, POST",
        "key" => "DELETE",
        "tenant" | "table" => "GET, HEAD, DELETE",
        "usage" | "row_get" | "watch" | "audit_logs" | "admin_digest" | "openapi" | "migration"
        | "ping" => "GET, HEAD",
        "rows_write" | "ask" | "watch_tokens" | "migration_abort" => "POST",
        _ => return None,
    })
}

fn method_not_allowed(method: &Method, path: &str) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{method} is not allowed on {path}; allowed: {}",
            allowed_methods(path).unwrap_or("none")
        ),
    )
}

/// Whether a request changes state (a follower refuses it): every POST and DELETE
/// but the reads and in-memory tokens that use POST.
fn changes_state(path: &str, method: &Method) -> bool {
    let reads = matches!(
        segments(path).as_slice(),
        ["v1", "tenants", _, "ask"] | ["v1", "tenants", _, "watch-tokens"]
    );
    // A route that does not take the method is a 404 or 405 wherever it is sent.
    let exists = allowed_methods(path).is_some_and(|m| m.split(", ").any(|m| m == method));
    (*method == Method::POST || *method == Method::DELETE) && !reads && exists
}

/// docs/openapi.yaml as JSON, converted by build.rs.
const OPENAPI_JSON: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/openapi.json"));

async fn dispatch(
    ctx: &ApiContext,
    mut req: Request<Incoming>,
    request_id: &str,
    answered_to: &Cell<Option<body::AnswerHold>>,
) -> Answer {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let s = segments(&path);
    if s == ["v1", "openapi.json"] && method == Method::GET {
        // The contract is public: a client reads it before it has credentials.
        drop_body(ctx, &mut req).await?;
        return Ok((
            StatusCode::OK,
            h::Body::Encoded(Bytes::from_static(OPENAPI_JSON)),
        ));
    }
    if s == ["v1", "ping"] && method == Method::GET {
        // The data port's own liveness, and the floor `oc-bench http` measures the
        // engine's requests against: the whole HTTP path (accept, parse, route, the
        // request's metrics and log line, respond) and no engine state.
        drop_body(ctx, &mut req).await?;
        return Ok((
            StatusCode::OK,
            h::Body::Encoded(Bytes::from_static(b"{\"pong\":true}")),
        ));
    }
    let router = &*ctx.router;
    let access = &h::Access {
        caller: auth::identify(req.headers(), &ctx.auth)?,
        in_flight_limit: ctx.limits.max_in_flight_per_tenant,
        rate_limit: ctx.limits.rate_limit,
    };
    if let Caller::Key(claim) = &access.caller {
        // A key its tenant does not hold is 401 whatever it asks for; only then does
        // the tenant it names decide 403.
        ctx.verify_key(claim).await?;
        // Operator actions (DELETE among them) are recorded before they run: only a
        // key allowed to ask gets that far. A body is refused before it is read.
        if has_body(&req) || method == Method::POST || method == Method::DELETE {
            match s.as_slice() {
                ["v1", "tenants", t, ..] if claim.tenant.as_str() != *t => {
                    return Err(auth::key_of_another_tenant(claim, t));
                }
                ["v1", "tenants"] | ["v1", "audit" | "admin", ..] => {
                    auth::require_admin(&access.caller)?
                }
                _ => {} // its own tenant's route, or no such route
            }
        }
    }
    // Only a caller who may ask learns that this is a follower, and where its writer is.
    if let Some(role) = ctx.role.as_ref().filter(|r| r.is_follower()) {
        if changes_state(&path, &method) {
            let leader = &role.leader;
            return Err(ApiError::not_leader(
                false,
                format!(
                    "this server is a follower and serves reads only; send {method} {path} to \
                 the writer (its replication address is {leader})"
                ),
            ));
        }
    }
    let caller = body::BodyCaller::of(&access.caller);
    // The routes whose answers a tenant's key can make large (rows as JSON, a listing
    // of wide tables); the admin and callers without credentials (authentication off)
    // are trusted.
    let large_answer = match route_name(&method, &path) {
        "ask" | "row_get" => true,
        "tables" => method == Method::GET,
        _ => false,
    };
    if matches!(access.caller, Caller::Key(_)) && large_answer {
        answered_to.set(Some(body::AnswerHold::take(&caller, &ctx.limits)?));
    }
    if has_body(&req) {
        req.extensions_mut().insert(caller);
        if method == Method::GET || method == Method::HEAD {
            // No read route takes a body: drained, so the connection stays usable.
            drop_body(ctx, &mut req).await?;
        }
    }
    match (s.as_slice(), &method) {
        (["v1", "tenants"], &Method::GET) => h::list_tenants(router, access).await,
        (["v1", "tenants"], &Method::POST) => {
            let body: h::CreateTenant = read_json(ctx, req).await?;
            let did = Did::new("tenant.create", Some(&body.tenant), None);
            let run = h::create_tenant(router, body, access);
            audited(ctx, access, request_id, did, run).await
        }
        (["v1", "tenants", t], &Method::GET) => h::usage(router, h::tenant_id(t)?, access).await,
        (["v1", "tenants", t], &Method::DELETE) => {
            drop_body(ctx, &mut req).await?;
            let tenant = h::tenant_id(t)?;
            let did = Did::new("tenant.drop", Some(t), None);
            let run = h::drop_tenant(router, tenant, access);
            audited(ctx, access, request_id, did, run).await
        }
        (["v1", "tenants", t, "usage"], &Method::GET) => {
            h::usage(router, h::tenant_id(t)?, access).await
        }
        (["v1", "tenants", t, "ask"], &Method::POST) => {
            let tenant = h::tenant_id(t)?;
            let (explain, min_lsn) = ask_query(req.uri().query())?;
            let body = read_json(ctx, req).await?;
            let freshness = ctx.freshness(min_lsn);
            h::ask(
                router,
                tenant,
                body,
                explain,
                ctx.limits.ask,
                freshness,
                access,
            )
            .await
        }
        (["v1", "tenants", t, "watch-tokens"], &Method::POST) => {
            let tenant = h::tenant_id(t)?;
            let body = if has_body(&req) {
                read_json(ctx, req).await?
            } else {
                h::CreateWatchToken::default()
            };
            let ttl_s = h::watch_token_ttl(&body)?;
            let did = Did::new("watch_token.create", Some(t), None);
            let run = h::create_watch_token(router, tenant, ttl_s, (access, &ctx.auth));
            audited(ctx, access, request_id, did, run).await
        }
        (["v1", "tenants", t, "keys"], &Method::GET) => {
            h::list_keys(router, h::tenant_id(t)?, access).await
        }
        (["v1", "tenants", t, "keys"], &Method::POST) => {
            let tenant = h::tenant_id(t)?;
            let body = if has_body(&req) {
                read_json(ctx, req).await?
            } else {
                h::CreateKey::default()
            };
            let did = Did::new("key.create", Some(t), Some(&body.name));
            let run = h::create_key(router, tenant, body, access);
            audited(ctx, access, request_id, did, run).await
        }
        (["v1", "tenants", t, "keys", key_id], &Method::DELETE) => {
            drop_body(ctx, &mut req).await?;
            let tenant = h::tenant_id(t)?;
            let did = Did::new("key.revoke", Some(t), Some(key_id));
            let run = h::revoke_key(router, tenant, key_id.to_string(), access);
            audited(ctx, access, request_id, did, run).await
        }
        (["v1", "tenants", t, "tables"], &Method::GET) => {
            let after = listing_query(req.uri().query())?;
            h::list_tables(router, h::tenant_id(t)?, after, access).await
        }
        (["v1", "tenants", t, "tables"], &Method::POST) => {
            let tenant = h::tenant_id(t)?;
            let body: h::CreateTable = read_json(ctx, req).await?;
            let did = Did::new("table.create", Some(t), Some(body.name()));
            let run = h::create_table(router, tenant, body, access);
            audited(ctx, access, request_id, did, run).await
        }
        (["v1", "tenants", t, "migrations"], &Method::GET) => {
            h::list_migrations(router, h::tenant_id(t)?, access).await
        }
        (["v1", "tenants", t, "migrations"], &Method::POST) => {
            let tenant = h::tenant_id(t)?;
            let body: h::StartMigration = read_json(ctx, req).await?;
            let did = Did::new("migration.start", Some(t), Some(body.table()));
            let run = h::start_migration(router, tenant, body, access);
            audited(ctx, access, request_id, did, run).await
        }
        (["v1", "tenants", t, "migrations", id], &Method::GET) => {
            h::get_migration(router, h::tenant_id(t)?, id, access).await
        }
        (["v1", "tenants", t, "migrations", id, "abort"], &Method::POST) => {
            drop_body(ctx, &mut req).await?;
            let tenant = h::tenant_id(t)?;
            let did = Did::new("migration.abort", Some(t), Some(id));
            let run = h::abort_migration(router, tenant, id, access);
            audited(ctx, access, request_id, did, run).await
        }
        (["v1", "tenants", t, "tables", table], &Method::GET) => {
            h::describe_table(router, h::tenant_id(t)?, table.to_string(), access).await
        }
        (["v1", "tenants", t, "tables", table], &Method::DELETE) => {
            drop_body(ctx, &mut req).await?;
            let tenant = h::tenant_id(t)?;
            let did = Did::new("table.drop", Some(t), Some(table));
            let run = h::drop_table(router, tenant, table.to_string(), access);
            audited(ctx, access, request_id, did, run).await
        }
        (["v1", "admin", "digest"], &Method::GET) => {
            let with_tables = match req.uri().query().unwrap_or("") {
                "" | "tables=true" => true,
                "tables=false" => false,
                other => {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_query_string",
                        format!("unknown parameters {other:?}; the only one is tables=true|false"),
                    ))
                }
            };
            h::digest(router, with_tables, &ctx.layout.current(), access).await
        }
        (["v1", "audit", "logs"], &Method::GET) => {
            auth::require_admin(&access.caller)?;
            let query = audit_query(req.uri().query())?;
            let answer = ctx.auditor.read(query).await.map_err(audit_unavailable)?;
            Ok((
                StatusCode::OK,
                h::Body::from(serde_json::to_value(answer).unwrap_or_default()),
            ))
        }
        (["v1", "tenants", t, "tables", table, "rows"], &Method::POST) => {
            let tenant = h::tenant_id(t)?;
            let table = table.to_string();
            let mut laps = Laps::start(Side::Http);
            let body = read_json(ctx, req).await?;
            laps.lap(Stage::Parse);
            h::write_rows(router, tenant, table, body, access, laps).await
        }
        (["v1", "tenants", t, "tables", table, "rows", key @ ..], &Method::GET)
            if !key.is_empty() =>
        {
            let key = key
                .iter()
                .map(|k| percent_decode(k))
                .collect::<Result<Vec<_>, _>>()?;
            let freshness = ctx.freshness(min_lsn_only(req.uri().query())?);
            h::get_row(
                router,
                h::tenant_id(t)?,
                table.to_string(),
                key,
                freshness,
                access,
            )
            .await
        }
        _ if route_name(&method, &path) != "unknown" => Err(method_not_allowed(&method, &path)),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "route_not_found",
            format!("no endpoint at {path}; see docs/API.md"),
        )),
    }
}

/// An operator action about to run: what the audit log records of it.
struct Did {
    action: &'static str,
    tenant: Option<String>,
    target: Option<String>,
}

impl Did {
    fn new(action: &'static str, tenant: Option<&str>, target: Option<&str>) -> Self {
        Did {
            action,
            tenant: tenant.map(audit::bounded),
            target: target.map(audit::bounded),
        }
    }
}

/// Runs an operator action with its audit entries around it: the `begin` is durable
/// before the action runs (when it cannot be written, the action is refused with 503
/// and nothing changes); the `end` records the status, and the LSN or key id the
/// answer names. A failed `end` leaves the action's answer as it is (the outcome then
/// reads as unknown) and is counted and logged.
async fn audited(
    ctx: &ApiContext,
    access: &h::Access,
    request_id: &str,
    did: Did,
    run: impl std::future::Future<Output = Answer>,
) -> Answer {
    let actor = match &access.caller {
        Caller::Anyone => "anonymous".to_string(),
        Caller::Admin => "admin".to_string(),
        Caller::Key(claim) => format!("key:{}", audit::bounded(&claim.key_id)),
    };
    let action = audit::Action {
        request_id: audit::bounded(request_id),
        actor,
        action: did.action.to_string(),
        tenant: did.tenant,
        target: did.target,
    };
    // A key's actions are rate-limited before they reach the log: each entry is synced
    // to disk and kept, refused ones too.
    h::admit_operator_action(&ctx.router, access, did.action).await?;
    let begun = ctx.auditor.begin(action).await.map_err(|e| {
        metrics::with_http(|m| m.audit_failures += 1);
        audit_unavailable(e)
    })?;
    let answer = run.await;
    let (status, code, effect) = match &answer {
        Ok((status, body)) => {
            let field = |name: &str| match body {
                h::Body::Json(json) => json.get(name).cloned(),
                h::Body::Encoded(_) => None,
            };
            let effect = audit::Effect {
                lsn: field("lsn").and_then(|v| v.as_u64()),
                created: (did.action == "key.create")
                    .then(|| field("key_id"))
                    .flatten()
                    .and_then(|v| v.as_str().map(str::to_string)),
            };
            (status.as_u16(), None, effect)
        }
        Err(e) => (
            e.status.as_u16(),
            Some(e.code.to_string()),
            audit::Effect::default(),
        ),
    };
    if let Err(e) = ctx.auditor.end(begun, status, code, effect).await {
        metrics::with_http(|m| m.audit_failures += 1);
        tracing::error!(error = %e, seq = begun, "the audit log could not record an action's outcome");
    }
    answer
}

fn audit_unavailable(e: audit::AuditError) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "audit_unavailable",
        format!("operator actions are refused while the audit log cannot record them, and nothing was changed: {e}"),
    )
}

/// `GET /v1/audit/logs` parameters: `since` (RFC 3339), `after` (a sequence number),
/// `tenant`, `action`, `limit` (1 to 1000, default 100).
fn audit_query(query: Option<&str>) -> Result<audit::Query, ApiError> {
    let bad =
        |message: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query_string", message);
    let mut out = audit::Query {
        limit: 100,
        ..audit::Query::default()
    };
    for (name, value) in query_pairs(query)? {
        let value = percent_decode(value).map_err(|e| bad(e.message))?;
        match name {
            "since" => {
                let since = oc_ship::timestamp::parse_rfc3339_lower_bound(&value);
                out.since_us = Some(since.map_err(bad)?);
            }
            "after" => {
                out.after_seq = Some(value.parse().map_err(|_| {
                    bad(format!(
                        "after={value:?} must be an entry's seq (a whole number)"
                    ))
                })?)
            }
            "tenant" => out.tenant = Some(value),
            "action" => out.action = Some(value),
            "limit" => {
                out.limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=audit::MAX_QUERY_LIMIT).contains(n))
                    .ok_or_else(|| {
                        bad(format!(
                            "limit={value:?} must be a whole number from 1 to {}",
                            audit::MAX_QUERY_LIMIT
                        ))
                    })?
            }
            _ => {
                return Err(bad(format!(
                    "unknown parameter {name:?}; use since, after, tenant, action or limit"
                )))
            }
        }
    }
    Ok(out)
}

/// A listing page's query: `after=<name>` continues after that name.
fn listing_query(query: Option<&str>) -> Result<Option<String>, ApiError> {
    let mut after = None;
    for (name, value) in query_pairs(query)? {
        match name {
            "after" => {
                after = Some(percent_decode(value).map_err(|e| {
                    ApiError::bad_request("invalid_query_string", format!("after: {}", e.message))
                })?)
            }
            other => {
                return Err(ApiError::bad_request(
                    "invalid_query_string",
                    format!(
                        "unknown parameter {}; a listing takes after=<the last name of the \
                         previous page> (its next_after)",
                        error::quoted_short(other)
                    ),
                ))
            }
        }
    }
    Ok(after)
}

/// `/ask`'s `?explain=true|false` (absent: false) and `min_lsn=<n>` (absent: 0);
/// anything else is a 400 naming the value.
fn ask_query(query: Option<&str>) -> Result<(bool, u64), ApiError> {
    let (mut explain, mut min_lsn) = (false, 0);
    for (name, value) in query_pairs(query)? {
        match (name, value) {
            ("explain", "" | "true") => explain = true,
            ("explain", "false") => explain = false,
            ("min_lsn", value) => min_lsn = parse_min_lsn(value)?,
            ("explain", value) => {
                return Err(ApiError::bad_request(
                    "invalid_query_string",
                    format!(
                        "explain={} is not a flag: /ask takes explain=true|false",
                        error::quoted_short(value)
                    ),
                ))
            }
            // The value is not echoed: it may be a credential sent to the wrong place
            // (a watch token).
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_query_string",
                    format!(
                        "unknown query parameter {}; /ask takes explain=true|false and \
                         min_lsn=<LSN>",
                        error::quoted_short(name)
                    ),
                ))
            }
        }
    }
    Ok((explain, min_lsn))
}

/// A row read's only parameter, `?min_lsn=<n>` (absent: 0).
fn min_lsn_only(query: Option<&str>) -> Result<u64, ApiError> {
    let mut min_lsn = 0;
    for (name, value) in query_pairs(query)? {
        if name != "min_lsn" {
            return Err(ApiError::bad_request(
                "invalid_query_string",
                format!(
                    "unknown query parameter {}; a row read takes only min_lsn=<LSN>",
                    error::quoted_short(name)
                ),
            ));
        }
        min_lsn = parse_min_lsn(value)?;
    }
    Ok(min_lsn)
}

/// A query string's `name=value` pairs (a name alone has the value ""), each name at
/// most once: a repeated parameter is refused rather than one of its values picked.
pub(crate) fn query_pairs(query: Option<&str>) -> Result<Vec<(&str, &str)>, ApiError> {
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if pairs.iter().any(|(seen, _)| *seen == name) {
            return Err(ApiError::bad_request(
                "invalid_query_string",
                format!("query parameter {name:?} is given more than once; give it once"),
            ));
        }
        pairs.push((name, value));
    }
    Ok(pairs)
}

fn parse_min_lsn(value: &str) -> Result<u64, ApiError> {
    let digits = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
    value.parse().ok().filter(|_| digits).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_query_string",
            format!(
                "min_lsn={value:?} is not an LSN: a whole number from 0 to {} (the lsn of a \
                 write's answer)",
                u64::MAX
            ),
        )
    })
}

/// Whether the request declares a body (`content-length` above 0 or chunked).
fn has_body<B>(req: &Request<B>) -> bool {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    declared.map_or(
        req.headers().contains_key(hyper::header::TRANSFER_ENCODING),
        |n| n > 0,
    )
}

/// Bytes past the body limit still read (and dropped) before answering 413.
pub(crate) const OVER_LIMIT_DRAIN_BYTES: u64 = 1 << 20;

/// Set by the handler that reads a request's body to its end, when the listener put
/// one in the request's extensions: hyper then holds nothing of that request, and the
/// connection may move between shards after it (`listener.rs`, `Affinity`).
#[derive(Clone, Default)]
pub struct BodyReadToEnd(pub std::sync::Arc<std::sync::atomic::AtomicBool>);

impl BodyReadToEnd {
    pub fn get(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A body coded other than as plain JSON (gzip and the like) is refused by name: its
/// bytes would otherwise fail as JSON, with a message that does not say why.
fn refuse_unknown_encodings(headers: &hyper::HeaderMap) -> Result<(), ApiError> {
    // Chunked framing applies once (RFC 9112 §6.1); a proxy that reads it otherwise
    // would frame the next request differently from this server.
    let chunked = headers
        .get_all(hyper::header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .filter(|c| c.trim().eq_ignore_ascii_case("chunked"))
        .count();
    if chunked > 1 {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_encoding",
            "transfer-encoding names chunked more than once: chunked framing applies once",
        ));
    }
    for (header, accepted) in [
        (hyper::header::TRANSFER_ENCODING, "chunked"),
        (hyper::header::CONTENT_ENCODING, "identity"),
    ] {
        for value in headers.get_all(&header) {
            // Bytes that are not text name no coding this server knows either.
            let value = value.to_str().unwrap_or("\u{fffd}");
            let codings = value.split(',').map(str::trim).filter(|c| !c.is_empty());
            if codings
                .into_iter()
                .any(|c| !c.eq_ignore_ascii_case(accepted))
            {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_encoding",
                    format!("{header}: {value:?} is not taken; send the JSON body as it is ({header}: {accepted} or none)"),
                ));
            }
        }
    }
    Ok(())
}

/// What RFC 9110/9112 make a server refuse that hyper lets through: an HTTP/1.1 request
/// without exactly one `Host`, or a `Host` that is not a host and port (400), and an
/// `Expect` other than `100-continue` (417). A proxy in front may read such a request
/// otherwise than this server does. The ops listener checks the same.
pub(crate) fn check_framing_headers<B>(req: &Request<B>) -> Result<(), ApiError> {
    let hosts = req.headers().get_all(hyper::header::HOST);
    let count = hosts.iter().count();
    if (req.version() == hyper::Version::HTTP_11 && count != 1) || count > 1 {
        return Err(ApiError::bad_request(
            "invalid_headers",
            format!("a request has exactly one host header (HTTP/1.1: one, HTTP/1.0: at most one), this one has {count}"),
        ));
    }
    for host in hosts {
        // Empty is allowed: a target without an authority (RFC 9112 §3.2).
        let valid = host.to_str().is_ok_and(|h| {
            h.is_empty()
                || (!h.contains('@')
                    && h.parse::<hyper::http::uri::Authority>()
                        .is_ok_and(|a| a.as_str() == h))
        });
        if !valid {
            return Err(ApiError::bad_request(
                "invalid_headers",
                format!(
                    "the host header {} is not a host[:port]",
                    error::quoted_short(&String::from_utf8_lossy(host.as_bytes()))
                ),
            ));
        }
    }
    for expect in req.headers().get_all(hyper::header::EXPECT) {
        if !expect
            .to_str()
            .is_ok_and(|e| e.trim().eq_ignore_ascii_case("100-continue"))
        {
            return Err(ApiError::new(
                StatusCode::EXPECTATION_FAILED,
                "expectation_failed",
                format!(
                    "expect: {} is not met here; the only expectation taken is 100-continue",
                    error::quoted_short(expect.to_str().unwrap_or("?"))
                ),
            ));
        }
    }
    Ok(())
}

/// Reads and drops the body of a request whose route takes none: hyper closes a
/// keep-alive connection whose request body was left unread, without saying so, and
/// the client's next request on it fails.
async fn drop_body(ctx: &ApiContext, req: &mut Request<Incoming>) -> Result<(), ApiError> {
    if !has_body(req) {
        return Ok(());
    }
    let _hold = body::BodyHold::enter(body::BodyCaller::from(&*req), &ctx.limits)?;
    body::drain(req.body_mut(), ctx.limits.max_body_bytes, &ctx.limits).await
}

/// Reads a JSON body within the size limit, the body deadline and pace, and the
/// shard's pool of bodies being received (`body.rs`), and parses it.
async fn read_json<T: for<'de> serde::Deserialize<'de>>(
    ctx: &ApiContext,
    mut req: Request<Incoming>,
) -> Result<T, ApiError> {
    let types = req.headers().get_all(CONTENT_TYPE);
    if types.iter().count() > 1 {
        return Err(ApiError::bad_request(
            "invalid_headers",
            "the request has more than one content-type header; send one",
        ));
    }
    if let Some(ty) = req.headers().get(CONTENT_TYPE) {
        let ty = ty.to_str().unwrap_or("");
        let unsupported = || {
            ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "the body must be JSON in UTF-8 (content-type: application/json), not {}",
                    error::quoted_short(ty)
                ),
            )
        };
        // The media type itself, then its parameters: JSON is UTF-8 (RFC 8259), and a
        // body declared in another charset would be read as what it is not.
        let mut parts = ty.split(';');
        let media = parts.next().unwrap_or("").trim();
        if !media.eq_ignore_ascii_case("application/json") {
            return Err(unsupported());
        }
        for parameter in parts {
            let (name, value) = parameter.split_once('=').unwrap_or((parameter, ""));
            let value = value.trim().trim_matches('"');
            let utf8 = value.eq_ignore_ascii_case("utf-8") || value.eq_ignore_ascii_case("utf8");
            if name.trim().eq_ignore_ascii_case("charset") && !utf8 {
                return Err(unsupported());
            }
        }
    }
    refuse_unknown_encodings(req.headers())?;
    let max = ctx.limits.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body is larger than the limit of {max} bytes; split the batch"),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        // Read what is left of a body a little over the limit, so a client still
        // sending it reads the 413 instead of a reset; a far larger one is cut.
        if declared.is_some_and(|n| n <= max as u64 + OVER_LIMIT_DRAIN_BYTES) {
            // Counted among the caller's bodies and held to their pace; nothing kept.
            let _hold = body::BodyHold::enter(body::BodyCaller::from(&req), &ctx.limits)?;
            body::drain(req.body_mut(), max, &ctx.limits).await?;
            return Err(too_large());
        }
        return Err(ApiError {
            closes: true,
            ..too_large()
        });
    }
    let read_to_end = req.extensions().get::<BodyReadToEnd>().cloned();
    let mut hold = body::BodyHold::enter(body::BodyCaller::from(&req), &ctx.limits)?;
    if let Some(declared) = declared {
        hold.grow(declared as usize, &ctx.limits)?;
    }
    let body = body::read_paced(
        req.into_body(),
        max,
        &mut hold,
        declared.is_some(),
        &ctx.limits,
    )
    .await?;
    if let Some(BodyReadToEnd(flag)) = read_to_end {
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    handlers::parse_body(&body)
}

/// Decodes `%XX` escapes in a path segment (row keys may hold any text).
fn percent_decode(segment: &str) -> Result<String, ApiError> {
    let bad = || {
        ApiError::bad_request(
            "invalid_key",
            format!("{segment:?} is not valid percent-encoded UTF-8"),
        )
    };
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or_else(bad)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return Err(bad());
            }
            let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_labelled_by_pattern_not_by_tenant() {
        assert_eq!(route_name(&Method::GET, "/v1/tenants/acme/usage"), "usage");
        assert_eq!(
            route_name(&Method::GET, "/v1/tenants/acme/tables/t/rows/1/x"),
            "row_get"
        );
        assert_eq!(route_name(&Method::GET, "/v2/anything"), "unknown");
    }

    #[test]
    fn percent_decoding_accepts_escapes_and_refuses_broken_ones() {
        assert_eq!(percent_decode("a%20b%2Fc").expect("valid"), "a b/c");
        assert!(percent_decode("a%2").is_err());
        assert!(percent_decode("%zz").is_err());
        assert!(percent_decode("%ff").is_err());
    }
}
