//! The ops listener on the control executor: `/health`, `/ready`, `/metrics`. It runs
//! on its own thread from before recovery starts, so a probe or a scrape is never
//! queued behind data traffic and `/ready` can say "recovering" while shards open.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_lite::future;
use glommio::net::TcpListener;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use oc_engine::{ShardNode, ShardRouter};
use oc_io::UringProbe;
use serde_json::json;

use crate::hyper_glommio::{GlommioTimer, PlainStream};
use crate::{metrics, process_stats};

/// How long `/ready` and `/metrics` wait for a shard to answer.
const SHARD_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the server is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Recovering,
    Serving,
    Draining,
    /// A write-ahead log failed: the process answers what is in flight and exits.
    Failed,
}

/// What the control executor knows.
pub struct ControlState {
    pub started: Instant,
    pub phase: Cell<Phase>,
    pub router: RefCell<Option<Rc<ShardRouter>>>,
    pub probe: UringProbe,
    pub shards: usize,
    /// Shipping counters, when an archive is configured.
    pub ship_status: Option<oc_ship::shipper::ShipStatus>,
    /// Why the process is failing (set with [`Phase::Failed`]).
    pub failure: RefCell<Option<String>>,
    /// The data directory, whose file system `oc_data_disk_free_bytes` reports.
    pub data_dir: PathBuf,
    /// Replication: a writer's followers or a follower's streams, the lease, promotion.
    pub replication: Rc<crate::replication::node::Node>,
    /// The admin token, which `POST /v1/admin/promote` requires (when one is set).
    pub admin_token: Option<String>,
}

/// Open connections the ops listener serves at once. A new connection past the cap
/// closes the oldest one whose request is not being answered instead of being refused:
/// an idle scraper or a stalled client gives way, and a health probe, which sends its
/// request at once and is read before the next accept, is answered long before 256
/// newer connections make it the oldest. A flood cannot take the control executor's
/// descriptors, and cannot make a healthy server fail its probes either. (Ranking by
/// what a connection had sent when accepted let a flood that sends one byte each push
/// probes, accepted before their bytes arrived, to the front.)
pub const MAX_OPS_CONNECTIONS: usize = 256;
/// The ops listener's connections, oldest first: (id, whether a request of it is being
/// answered, its stream's state (an answer not all sent yet), the task serving it).
type OpenConnections = Rc<RefCell<VecDeque<OpenConnection>>>;
type OpenConnection = (
    u64,
    Rc<Cell<bool>>,
    Rc<crate::hyper_glommio::StreamWatch>,
    glommio::task::JoinHandle<()>,
);

/// How long, at least, the ops listener's accept loop pauses between accepts past half
/// its cap (timer granularity made it about 0.8 ms in the measurements).
const FLOOD_PAUSE: Duration = Duration::from_micros(100);
/// Time for an ops client to send its request headers (probes send them at once).
const OPS_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves the ops endpoints until the process exits.
pub async fn serve_ops(listener: TcpListener, state: Rc<ControlState>) {
    let open: OpenConnections = Rc::default();
    let mut next_id = 0u64;
    let mut accept_failures = crate::listener::AcceptFailures::new("ops", None);
    loop {
        let stream = match listener.accept().await {
            Ok(stream) => {
                accept_failures.accepted();
                stream
            }
            Err(e) => {
                accept_failures.note(&e);
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if open.borrow().len() >= MAX_OPS_CONNECTIONS {
            let mut open = open.borrow_mut();
            // A flood must not close one whose request is being answered (a probe's,
            // usually) or whose answer is still being sent; with every one busy, the
            // oldest goes.
            let victim = open
                .iter()
                .position(|(_, answering, watch, _)| !answering.get() && !watch.write_blocked.get())
                .unwrap_or(0);
            if let Some((.., oldest)) = open.remove(victim) {
                oldest.cancel(); // drops its connection
            }
        }
        let id = next_id;
        next_id += 1;
        let (state, registry) = (state.clone(), open.clone());
        let answering = Rc::new(Cell::new(false));
        let marker = answering.clone();
        let (io, watch) = PlainStream::new(stream);
        let handle = glommio::spawn_local(async move {
            let service = service_fn(move |req| {
                let (state, marker) = (state.clone(), marker.clone());
                async move {
                    marker.set(true);
                    let answer = handle(state, req).await;
                    marker.set(false);
                    answer
                }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(GlommioTimer)
                .header_read_timeout(OPS_HEADER_TIMEOUT);
            let _ = builder.serve_connection(io, service).await;
            registry.borrow_mut().retain(|(other, ..)| *other != id);
        })
        .detach();
        open.borrow_mut().push_back((id, answering, watch, handle));
        // The new connection's task reads its request before the next accept: under a
        // flood of accepts a probe's would otherwise wait behind dozens more, and be the
        // oldest one before its request was seen. Past half the cap the loop also lets
        // the reactor run (a pause, not a turn), or the bytes of a probe accepted before
        // they arrived are never reaped while accepts keep succeeding.
        if open.borrow().len() >= MAX_OPS_CONNECTIONS / 2 {
            glommio::timer::sleep(FLOOD_PAUSE).await;
        } else {
            futures_lite::future::yield_now().await;
        }
    }
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

async fn handle(
    state: Rc<ControlState>,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let started = Instant::now();
    // HEAD is answered as GET (a probe that only looks at the status); hyper sends no body.
    if req.method() == Method::HEAD {
        *req.method_mut() = Method::GET;
    }
    // As on the data API (RFC 9110 §10.1.1, RFC 9112 §3.2).
    let framing = crate::api::check_framing_headers(&req).err();
    let (route, response) = match (framing, req.method(), req.uri().path()) {
        (Some(refused), ..) => (
            "ops_unknown",
            ops_error(refused.status, refused.code, refused.message),
        ),
        (None, &Method::GET, "/health") => ("health", health(&state)),
        (None, &Method::GET, "/ready") => ("ready", ready(&state).await),
        (None, &Method::GET, "/metrics") => ("metrics", metrics_page(&state).await),
        (None, &Method::POST, "/v1/admin/promote") => ("promote", promote(&state, req).await),
        (None, &Method::POST, "/v1/admin/step-down") => ("step_down", step_down(&state, req).await),
        (
            None,
            _,
            path
            @ ("/health" | "/ready" | "/metrics" | "/v1/admin/promote" | "/v1/admin/step-down"),
        ) => {
            let allowed = if path.starts_with("/v1/admin/") {
                "POST"
            } else {
                "GET, HEAD"
            };
            let mut response = ops_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("only {allowed} is allowed here"),
            );
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allowed));
            ("ops_unknown", response)
        }
        (None, _, path) => (
            "ops_unknown",
            ops_error(
                StatusCode::NOT_FOUND,
                "route_not_found",
                format!(
                    "no ops endpoint at {}; try /health, /ready or /metrics",
                    crate::api::error::quoted_short(path)
                ),
            ),
        ),
    };
    metrics::record_request(route, response.status().as_u16(), started.elapsed());
    let mut response = response;
    if !response.headers().contains_key("x-request-id") {
        if let Ok(value) = HeaderValue::from_str(&next_ops_request_id()) {
            response.headers_mut().insert("x-request-id", value);
        }
    }
    Ok(response)
}

/// `ops-<counter>-<process nonce>`: every ops answer's `x-request-id`.
fn next_ops_request_id() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("ops-{n:x}-{:08x}", crate::api::process_nonce())
}

fn admin_error(status: u16, code: &str, message: String) -> Response<Full<Bytes>> {
    ops_error(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        code,
        message,
    )
}

/// An error in the API's shape, with a request id (`ops-<counter>-<process nonce>`) in
/// its body and its `x-request-id` header, for a report to name.
fn ops_error(status: StatusCode, code: &str, message: String) -> Response<Full<Bytes>> {
    let id = next_ops_request_id();
    let mut response = json_response(
        status,
        json!({"error": {"code": code, "message": message, "request_id": id}}),
    );
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

/// The 401 for an admin action without the admin token (when one is set).
fn admin_refusal(state: &ControlState, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    let token = state.admin_token.as_ref()?;
    let mut given = req.headers().get_all(hyper::header::AUTHORIZATION).iter();
    // Several headers are refused, as on the API listener: a proxy in front may read
    // another of them than this server would.
    let presented = match (given.next(), given.next()) {
        (Some(value), None) => value
            .to_str()
            .ok()
            .and_then(crate::auth::bearer_token)
            .unwrap_or_default(),
        _ => "",
    };
    (!crate::replication::token_matches(Some(token), presented.as_bytes())).then(|| {
        let mut refused = admin_error(
            401,
            "unauthorized",
            "this action needs the admin token (Authorization: Bearer <token>)".into(),
        );
        refused.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
        refused
    })
}

/// Whether the query string sets `name` (its only parameter) to true: `true` or `1`,
/// against `false`, `0` or nothing; anything else is a 400 naming what it takes.
#[allow(clippy::result_large_err)] // the refusal is the response itself
fn flag(req: &Request<Incoming>, name: &str) -> Result<bool, Response<Full<Bytes>>> {
    let mut set = None;
    for pair in req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        if set.is_some() {
            return Err(admin_error(
                400,
                "invalid_query_string",
                format!("{name} is given more than once; give it once"),
            ));
        }
        set = Some(match pair.split_once('=') {
            Some((key, "true" | "1")) if key == name => true,
            Some((key, "false" | "0")) if key == name => false,
            other => {
                let key = other.map_or(pair, |(key, _)| key);
                let what = if key == name {
                    format!(
                        "{name}={} is not a flag",
                        crate::api::error::quoted_short(other.map_or("", |(_, v)| v))
                    )
                } else {
                    format!(
                        "unknown query parameter {}",
                        crate::api::error::quoted_short(key)
                    )
                };
                return Err(admin_error(
                    400,
                    "invalid_query_string",
                    format!("{what}: this endpoint takes {name}=true|false"),
                ));
            }
        });
    }
    Ok(set.unwrap_or(false))
}

/// `POST /v1/admin/promote[?force=true]` (admin token): this follower becomes the
/// writer in place (`replication::node`). Answers the steps taken and their times.
async fn promote(state: &Rc<ControlState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if let Some(refused) = admin_refusal(state, &req) {
        return refused;
    }
    let force = match flag(&req, "force") {
        Ok(force) => force,
        Err(refused) => return refused,
    };
    match state.replication.promote(force).await {
        Ok(answer) => json_response(StatusCode::OK, answer),
        Err(refused) => admin_error(refused.status, refused.code, refused.message),
    }
}

/// `POST /v1/admin/step-down[?cancel=true]` (admin token): a switchover's first half on
/// the writer (`replication::node`): writes stop, a follower catches up, and the answer
/// says where each shard's log ends.
async fn step_down(state: &Rc<ControlState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if let Some(refused) = admin_refusal(state, &req) {
        return refused;
    }
    let cancel = match flag(&req, "cancel") {
        Ok(cancel) => cancel,
        Err(refused) => return refused,
    };
    match state.replication.step_down(cancel).await {
        Ok(answer) => json_response(StatusCode::OK, answer),
        Err(refused) => admin_error(refused.status, refused.code, refused.message),
    }
}

/// Liveness: `200 ok` while the process can do its job; `503 failed` with the reason
/// once a write-ahead log failed (the seed's "the WAL is mountable" no longer holds;
/// the process exits right after answering what is in flight).
fn health(state: &ControlState) -> Response<Full<Bytes>> {
    let p = &state.probe;
    let failure = state.failure.borrow().clone();
    let status = if failure.is_some() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let mut body = json!({
            "status": if failure.is_some() { "failed" } else { "ok" },
            "version": env!("CARGO_PKG_VERSION"),
            "git_commit": env!("OC_GIT_COMMIT"),
            "build_time": env!("OC_BUILD_TIME"),
            "uptime_s": state.started.elapsed().as_secs_f64(),
            "phase": format!("{:?}", state.phase.get()).to_lowercase(),
            "shards": state.shards,
            "io_uring": {
                "available": p.available,
                "error": p.error,
                "read": p.read,
                "write": p.write,
                "fsync": p.fsync,
                "fixed_buffers": p.fixed_buffers,
                "sync_file_range": p.sync_file_range,
            },
    });
    if let (Some(reason), Some(object)) = (failure, body.as_object_mut()) {
        object.insert("reason".into(), reason.into());
    }
    json_response(status, body)
}

/// Asks every shard for `f`'s answer, each within the probe timeout.
async fn ask_shards<R: Send + 'static>(
    router: &ShardRouter,
    f: fn(&ShardNode) -> R,
) -> Vec<Result<R, String>> {
    let mut answers = Vec::with_capacity(router.shards());
    for shard in 0..router.shards() {
        let call = async {
            router
                .call(shard, move |node: Rc<ShardNode>| async move { f(&node) })
                .await
                .map_err(|e| e.to_string())
        };
        let timeout = async {
            glommio::timer::sleep(SHARD_PROBE_TIMEOUT).await;
            Err(format!(
                "did not answer within {} ms",
                SHARD_PROBE_TIMEOUT.as_millis()
            ))
        };
        answers.push(future::or(call, timeout).await);
    }
    answers
}

/// How long a log's writes may wait with none finishing before the server says it is
/// not ready: a disk that stopped answering takes no writes, and a load balancer should
/// send them elsewhere.
const LOG_STALL: Duration = Duration::from_secs(5);

/// Why the server is not ready (none: ready), as `/ready` and `oc_ready` both say;
/// with the role and each shard's applied LSN once it serves.
struct Readiness {
    reasons: Vec<String>,
    serving: Option<(&'static str, Vec<serde_json::Value>)>,
}

async fn readiness(state: &ControlState) -> Readiness {
    let not_serving = |why: String| Readiness {
        reasons: vec![why],
        serving: None,
    };
    match state.phase.get() {
        Phase::Recovering => return not_serving("shards are recovering their logs".into()),
        Phase::Draining => return not_serving("the server is shutting down".into()),
        Phase::Failed => {
            let why = state.failure.borrow().clone().unwrap_or_default();
            return not_serving(format!("the server is exiting: {why}"));
        }
        Phase::Serving => {}
    }
    let Some(router) = state.router.borrow().clone() else {
        return not_serving("shards are not connected yet".into());
    };
    let answers = ask_shards(&router, |node| {
        let wal = node.shard().wal();
        (
            wal.failure().map(|e| e.to_string()),
            wal.stalled_for().filter(|waited| *waited >= LOG_STALL),
            node.shard().applied_lsn().0,
        )
    })
    .await;
    let mut reasons = Vec::new();
    let mut shards = Vec::new();
    for (shard, answer) in answers.into_iter().enumerate() {
        match answer {
            Ok((Some(failure), ..)) => reasons.push(format!(
                "shard {shard}: the write-ahead log failed ({failure}); restart the server"
            )),
            Ok((None, Some(waited), _)) => reasons.push(format!(
                "shard {shard}: the write-ahead log's writes have waited {} s for the disk \
                 with none finished (a stalled or frozen disk: check dmesg and the device)",
                waited.as_secs()
            )),
            Ok((None, None, applied)) => {
                shards.push(json!({"shard": shard, "applied_lsn": applied}))
            }
            Err(why) => reasons.push(format!("shard {shard}: {why}")),
        }
    }
    let replication = &state.replication;
    reasons.extend(
        replication
            .status
            .follower_not_ready(replication.max_ready_lag_lsn),
    );
    reasons.extend(replication.lease_not_ready());
    let role = if replication.status.is_follower() {
        "follower"
    } else {
        "writer"
    };
    Readiness {
        reasons,
        serving: Some((role, shards)),
    }
}

async fn ready(state: &ControlState) -> Response<Full<Bytes>> {
    let Readiness { reasons, serving } = readiness(state).await;
    let status = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = match (serving, reasons.is_empty()) {
        (None, _) => json!({"ready": false, "reasons": reasons}),
        (Some((role, shards)), true) => json!({"ready": true, "role": role, "shards": shards}),
        (Some((role, shards)), false) => {
            json!({"ready": false, "role": role, "reasons": reasons, "shards": shards})
        }
    };
    json_response(status, body)
}

async fn metrics_page(state: &ControlState) -> Response<Full<Bytes>> {
    let router = state.router.borrow().clone();
    let mut snapshots = Vec::new();
    if let Some(router) = router {
        for answer in ask_shards(&router, metrics::snapshot).await {
            match answer {
                Ok(snapshot) => snapshots.push(snapshot),
                Err(why) => tracing::warn!(%why, "a shard missed the scrape"),
            }
        }
    }
    let control = metrics::ControlMetrics {
        uptime_s: state.started.elapsed().as_secs_f64(),
        // What `/ready` would answer, for the alert on it.
        ready: readiness(state).await.reasons.is_empty(),
        ops_http: metrics::local_http(),
        shipping: state
            .ship_status
            .as_ref()
            .or(state.replication.promoted_ship_status.borrow().as_ref())
            .map(|s| s.snapshot()),
        replication: Some(state.replication.status.snapshot()),
        // Blocking calls, cheap and on the control executor: never on a shard.
        process: process_stats::process(),
        data_disk: match process_stats::disk(&state.data_dir) {
            Ok(disk) => Some(disk),
            Err(e) => {
                tracing::warn!(error = %e, data_dir = %state.data_dir.display(), "statvfs of the data directory failed");
                None
            }
        },
    };
    let mut response = match metrics::render(&snapshots, &control) {
        Ok(text) => Response::new(Full::new(Bytes::from(text))),
        Err(why) => {
            tracing::error!(%why, "the metrics page could not be rendered");
            let mut r = Response::new(Full::new(Bytes::from(why)));
            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            return r;
        }
    };
    if let Ok(value) = HeaderValue::from_str(&metrics::content_type()) {
        response.headers_mut().insert(CONTENT_TYPE, value);
    }
    response
}
