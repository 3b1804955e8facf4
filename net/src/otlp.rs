//! Optional export of each request's span over OTLP/HTTP (`--otlp-endpoint`), with
//! tail-based sampling: every error (5xx) and every slow request (`--otlp-slow-ms`) is
//! kept, and a ratio of the rest (`--otlp-sample-ratio`); a request whose incoming W3C
//! `traceparent` is marked sampled is kept too, under the caller's trace id.
//!
//! Why not the OpenTelemetry SDK: its samplers decide when a span *starts* (head
//! sampling), before anyone knows whether the request will be slow or fail; its
//! exporters and processors bring their own runtime and locks onto the shard threads;
//! and the subset of the protocol a server span needs is a few protobuf messages. The
//! encoder below writes those messages by their field numbers in the official
//! `opentelemetry-proto` definitions; the integration test decodes what the server
//! sends with those official definitions (Python `opentelemetry-proto`).
//!
//! Never blocking a shard: the shard decides, builds the span and `try_send`s it into a
//! bounded queue; a full queue drops the span and counts it. One exporter thread
//! batches spans (up to 512, or what arrived within a second) and posts them.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

/// Spans waiting for the exporter thread; more are dropped. Sampled spans (by ratio or
/// by an upstream `traceparent`, which any client can set) use only the first half,
/// so errors and slow requests always find room.
const QUEUE: usize = 8192;
const SAMPLED_SHARE: usize = QUEUE / 2;
/// Spans in the queue now.
static QUEUED: AtomicUsize = AtomicUsize::new(0);
const BATCH: usize = 512;
const BATCH_WAIT: Duration = Duration::from_secs(1);
const POST_TIMEOUT: Duration = Duration::from_secs(10);

/// What `--otlp-*` configure.
#[derive(Debug, Clone)]
pub struct OtlpConfig {
    /// The OTLP/HTTP traces URL (`…/v1/traces`).
    pub endpoint: String,
    pub service_name: String,
    /// Resource attributes (`host.name`, `cloud.region`, …).
    pub resource: Vec<(String, String)>,
    /// Share of the requests that are neither slow nor failed to keep, 0 to 1.
    pub sample_ratio: f64,
    /// A request at least this slow is always kept.
    pub slow: Duration,
}

/// Counters for `/metrics`.
pub static EXPORTED: AtomicU64 = AtomicU64::new(0);
pub static DROPPED_QUEUE_FULL: AtomicU64 = AtomicU64::new(0);
pub static DROPPED_EXPORT_FAILED: AtomicU64 = AtomicU64::new(0);

struct Exporter {
    spans: SyncSender<Span>,
    sample_ratio: f64,
    slow: Duration,
}

static EXPORTER: OnceLock<Exporter> = OnceLock::new();

/// Starts the exporter thread; requests are traced from then on.
pub fn start(config: OtlpConfig) -> Result<(), String> {
    let (spans, queue) = mpsc::sync_channel(QUEUE);
    let request = encode_resource(&config);
    let endpoint = config.endpoint.clone();
    std::thread::Builder::new()
        .name("oc-otlp".into())
        .spawn(move || export_loop(&endpoint, &request, queue))
        .map_err(|e| format!("no thread for the OTLP exporter: {e}"))?;
    EXPORTER
        .set(Exporter {
            spans,
            sample_ratio: config.sample_ratio,
            slow: config.slow,
        })
        .map_err(|_| "the OTLP exporter is already running".to_string())
}

/// A W3C `traceparent`: version 00, trace id, parent span id, flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub sampled: bool,
}

impl TraceParent {
    /// `00-<32 hex>-<16 hex>-<2 hex>`; anything else (or all-zero ids) is ignored, as
    /// the W3C spec asks.
    pub fn parse(header: &str) -> Option<TraceParent> {
        let mut parts = header.trim().split('-');
        let (version, trace, parent, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version != "00" || parts.next().is_some() {
            return None;
        }
        let trace_id: [u8; 16] = hex_bytes(trace)?;
        let parent_id: [u8; 8] = hex_bytes(parent)?;
        let flags: [u8; 1] = hex_bytes(flags)?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            parent_id,
            sampled: flags[0] & 1 == 1,
        })
    }
}

fn hex_bytes<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Why a finished request's span is kept, if it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// A 5xx or a slow request: always.
    Always,
    /// Sampled upstream or by the ratio: while the queue is not half full.
    Sampled,
}

/// Errors and slow requests always, an upstream-sampled trace and `ratio` of the rest
/// (`draw` in [0, 1)) as [`Kept::Sampled`].
pub fn keep(
    status: u16,
    elapsed: Duration,
    slow: Duration,
    upstream_sampled: bool,
    ratio: f64,
    draw: f64,
) -> Option<Kept> {
    if status >= 500 || elapsed >= slow {
        Some(Kept::Always)
    } else if upstream_sampled || draw < ratio {
        Some(Kept::Sampled)
    } else {
        None
    }
}

/// One finished request, as the handler saw it.
pub struct Finished<'a> {
    pub route: &'static str,
    pub method: &'a str,
    pub status: u16,
    pub error_code: Option<&'static str>,
    pub elapsed: Duration,
    pub shard: usize,
    pub tenant: &'a str,
    pub request_id: &'a str,
    pub parent: Option<TraceParent>,
}

/// Called once per request: decides, and hands a kept span to the exporter without
/// waiting. Costs a comparison and a random draw when tracing is on, nothing when off.
pub fn record(request: Finished<'_>) {
    let Some(exporter) = EXPORTER.get() else {
        return;
    };
    let upstream = request.parent.is_some_and(|p| p.sampled);
    let Some(kept) = keep(
        request.status,
        request.elapsed,
        exporter.slow,
        upstream,
        exporter.sample_ratio,
        fastrand::f64(),
    ) else {
        return;
    };
    if kept == Kept::Sampled && QUEUED.load(Ordering::Relaxed) >= SAMPLED_SHARE {
        DROPPED_QUEUE_FULL.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let end = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let start = end.saturating_sub(request.elapsed.as_nanos() as u64);
    let mut trace_id = [0u8; 16];
    let mut span_id = [0u8; 8];
    match request.parent {
        Some(p) => trace_id = p.trace_id,
        None => fastrand::fill(&mut trace_id),
    }
    fastrand::fill(&mut span_id);
    let mut attributes = vec![
        ("http.request.method", Attr::Str(request.method.to_string())),
        ("http.route", Attr::Str(request.route.to_string())),
        (
            "http.response.status_code",
            Attr::Int(i64::from(request.status)),
        ),
        ("oc.shard", Attr::Int(request.shard as i64)),
        ("oc.request_id", Attr::Str(request.request_id.to_string())),
    ];
    if !request.tenant.is_empty() {
        // The path segment as sent (before validation): cut like an audit field.
        let tenant = oc_ship::audit::bounded(request.tenant);
        attributes.push(("oc.tenant", Attr::Str(tenant)));
    }
    if let Some(code) = request.error_code {
        attributes.push(("error.type", Attr::Str(code.to_string())));
    }
    let span = Span {
        trace_id,
        span_id,
        parent_id: request.parent.map(|p| p.parent_id),
        name: request.route,
        start_ns: start,
        end_ns: end,
        attributes,
        error: request.status >= 500,
    };
    // Counted before the send: the exporter may take it off before this line returns.
    QUEUED.fetch_add(1, Ordering::Relaxed);
    match exporter.spans.try_send(span) {
        Ok(()) => {}
        Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
            QUEUED.fetch_sub(1, Ordering::Relaxed);
            DROPPED_QUEUE_FULL.fetch_add(1, Ordering::Relaxed);
        }
    }
}

enum Attr {
    Str(String),
    Int(i64),
}

struct Span {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent_id: Option<[u8; 8]>,
    name: &'static str,
    start_ns: u64,
    end_ns: u64,
    attributes: Vec<(&'static str, Attr)>,
    error: bool,
}

fn export_loop(endpoint: &str, resource: &[u8], queue: Receiver<Span>) {
    let agent = ureq::AgentBuilder::new().timeout(POST_TIMEOUT).build();
    let mut failing_since: Option<Instant> = None;
    loop {
        let Ok(first) = queue.recv() else { return };
        QUEUED.fetch_sub(1, Ordering::Relaxed);
        let mut batch = vec![first];
        let deadline = Instant::now() + BATCH_WAIT;
        while batch.len() < BATCH {
            match queue.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(span) => {
                    QUEUED.fetch_sub(1, Ordering::Relaxed);
                    batch.push(span)
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let body = encode_request(resource, &batch);
        let posted = agent
            .post(endpoint)
            .set("content-type", "application/x-protobuf")
            .send_bytes(&body);
        match posted {
            Ok(_) => {
                EXPORTED.fetch_add(batch.len() as u64, Ordering::Relaxed);
                failing_since = None;
            }
            Err(e) => {
                DROPPED_EXPORT_FAILED.fetch_add(batch.len() as u64, Ordering::Relaxed);
                // One log line per minute of failures, not one per batch.
                if failing_since.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    failing_since = Some(Instant::now());
                    tracing::warn!(endpoint, error = %e, spans = batch.len(), "OTLP export failed; spans dropped");
                }
            }
        }
    }
}

// The protobuf wire format, for the messages of opentelemetry/proto/trace/v1/trace.proto,
// common/v1/common.proto, resource/v1/resource.proto and
// collector/trace/v1/trace_service.proto used here.

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;

fn tag(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, u64::from(field << 3 | u32::from(wire)));
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    tag(out, field, LEN);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// A nested message: written into a scratch buffer first (its length prefixes it).
fn message(out: &mut Vec<u8>, field: u32, write: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    write(&mut inner);
    bytes_field(out, field, &inner);
}

/// `KeyValue { string key = 1; AnyValue value = 2; }`, `AnyValue { string string_value
/// = 1; int64 int_value = 3; }`.
fn key_value(out: &mut Vec<u8>, field: u32, key: &str, value: &Attr) {
    message(out, field, |kv| {
        bytes_field(kv, 1, key.as_bytes());
        message(kv, 2, |any| match value {
            Attr::Str(s) => bytes_field(any, 1, s.as_bytes()),
            Attr::Int(i) => {
                tag(any, 3, VARINT);
                varint(any, *i as u64);
            }
        });
    });
}

/// `ResourceSpans.resource` (field 1) and `ResourceSpans.scope_spans[0].scope` (field 1
/// of `ScopeSpans`), made once: the same for every batch.
fn encode_resource(config: &OtlpConfig) -> Vec<u8> {
    let mut out = Vec::new();
    // Resource { repeated KeyValue attributes = 1; }
    message(&mut out, 1, |resource| {
        key_value(
            resource,
            1,
            "service.name",
            &Attr::Str(config.service_name.clone()),
        );
        key_value(
            resource,
            1,
            "service.version",
            &Attr::Str(env!("CARGO_PKG_VERSION").into()),
        );
        for (k, v) in &config.resource {
            key_value(resource, 1, k, &Attr::Str(v.clone()));
        }
    });
    out
}

/// `ExportTraceServiceRequest { repeated ResourceSpans resource_spans = 1; }` with one
/// `ResourceSpans { Resource resource = 1; repeated ScopeSpans scope_spans = 2; }` and
/// one `ScopeSpans { InstrumentationScope scope = 1; repeated Span spans = 2; }`.
fn encode_request(resource: &[u8], spans: &[Span]) -> Vec<u8> {
    let mut out = Vec::new();
    message(&mut out, 1, |resource_spans| {
        resource_spans.extend_from_slice(resource);
        message(resource_spans, 2, |scope_spans| {
            // InstrumentationScope { string name = 1; string version = 2; }
            message(scope_spans, 1, |scope| {
                bytes_field(scope, 1, b"oc-server");
                bytes_field(scope, 2, env!("CARGO_PKG_VERSION").as_bytes());
            });
            for span in spans {
                message(scope_spans, 2, |s| encode_span(s, span));
            }
        });
    });
    out
}

/// `Span { bytes trace_id = 1; bytes span_id = 2; bytes parent_span_id = 4; string name
/// = 5; SpanKind kind = 6; fixed64 start_time_unix_nano = 7; fixed64 end_time_unix_nano
/// = 8; repeated KeyValue attributes = 9; Status status = 15; }`, `Status { string
/// message = 2; StatusCode code = 3; }`.
fn encode_span(out: &mut Vec<u8>, span: &Span) {
    const SPAN_KIND_SERVER: u64 = 2;
    const STATUS_CODE_ERROR: u64 = 2;
    bytes_field(out, 1, &span.trace_id);
    bytes_field(out, 2, &span.span_id);
    if let Some(parent) = &span.parent_id {
        bytes_field(out, 4, parent);
    }
    bytes_field(out, 5, span.name.as_bytes());
    tag(out, 6, VARINT);
    varint(out, SPAN_KIND_SERVER);
    tag(out, 7, FIXED64);
    out.extend_from_slice(&span.start_ns.to_le_bytes());
    tag(out, 8, FIXED64);
    out.extend_from_slice(&span.end_ns.to_le_bytes());
    for (key, value) in &span.attributes {
        key_value(out, 9, key, value);
    }
    if span.error {
        message(out, 15, |status| {
            tag(status, 3, VARINT);
            varint(status, STATUS_CODE_ERROR);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_errors_slow_and_upstream_sampled_requests_and_a_ratio_of_the_rest() {
        let slow = Duration::from_millis(100);
        let fast = Duration::from_millis(1);
        let always = Some(Kept::Always);
        let sampled = Some(Kept::Sampled);
        assert_eq!(keep(503, fast, slow, false, 0.0, 0.5), always);
        assert_eq!(keep(200, slow, slow, false, 0.0, 0.5), always);
        assert_eq!(keep(503, fast, slow, true, 0.0, 0.5), always);
        assert_eq!(keep(200, fast, slow, true, 0.0, 0.5), sampled);
        assert_eq!(keep(200, fast, slow, false, 0.0, 0.0), None);
        assert_eq!(
            keep(404, fast, slow, false, 0.1, 0.5),
            None,
            "a 4xx is not an error"
        );
        assert_eq!(keep(200, fast, slow, false, 0.1, 0.05), sampled);
        assert_eq!(keep(200, fast, slow, false, 1.0, 0.999), sampled);
    }

    #[test]
    fn traceparent_follows_the_w3c_format() {
        let p = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("valid");
        assert_eq!(p.trace_id[0], 0x4b);
        assert_eq!(p.parent_id[7], 0xb7);
        assert!(p.sampled);
        for bad in [
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn varints_match_the_protobuf_encoding() {
        let mut out = Vec::new();
        varint(&mut out, 300);
        assert_eq!(out, [0xac, 0x02]);
        out.clear();
        // int64 -1 is ten bytes on the wire.
        varint(&mut out, -1i64 as u64);
        assert_eq!(out.len(), 10);
        out.clear();
        tag(&mut out, 15, LEN);
        assert_eq!(out, [0x7a]);
    }
}
