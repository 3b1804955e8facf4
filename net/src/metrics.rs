//! Metrics: counted shard-locally (plain integers in a thread-local, no atomics or locks
//! on the request path), gathered from every shard at scrape time by the control
//! executor and rendered in the Prometheus text format with the `prometheus` crate's
//! encoder. No tenant label on any histogram.
//!
//! One file, about 730 lines of code: most of it is the table of metric families
//! (names, help, labels), kept in one place so the names match docs/OPERATIONS.md at a
//! glance.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Duration;

use oc_engine::query::PlanCacheStats;
use oc_engine::stages::{self, Stage, StageHistogram, StageHistograms};
use oc_engine::{CheckpointMetrics, ShardNode};
use oc_ship::shipper::ShipMetrics;

use crate::process_stats::{DiskStats, ProcessStats};
use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};
use prometheus::{Encoder, TextEncoder};

/// Upper bounds (ms) of the latency histograms: HTTP requests and WAL fsync lag.
const LATENCY_BUCKETS_MS: [f64; 16] = [
    0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
    10000.0,
];

/// A fixed-bucket latency histogram in Prometheus' shape (non-cumulative while counting).
#[derive(Debug, Clone, Default)]
pub struct LatencyHistogram {
    buckets: [u64; LATENCY_BUCKETS_MS.len()],
    count: u64,
    sum_ms: f64,
}

impl LatencyHistogram {
    pub fn record(&mut self, elapsed: Duration) {
        let ms = elapsed.as_secs_f64() * 1e3;
        if let Some(i) = LATENCY_BUCKETS_MS.iter().position(|&le| ms <= le) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum_ms += ms;
    }

    fn merge(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.sum_ms += other.sum_ms;
    }

    /// Buckets from an hdrhistogram of microseconds (the WAL's fsync lag).
    fn from_hdr_us(h: &hdrhistogram::Histogram<u64>) -> Self {
        let mut out = LatencyHistogram::default();
        let mut below = 0;
        for (i, le) in LATENCY_BUCKETS_MS.iter().enumerate() {
            let upto = h.count_between(0, (le * 1e3) as u64);
            out.buckets[i] = upto - below;
            below = upto;
        }
        out.count = h.len();
        out.sum_ms = h.mean() * h.len() as f64 / 1e3;
        out
    }

    /// In milliseconds, or in seconds with `unit_ms = 1000`.
    fn to_proto(&self, unit_ms: f64) -> Histogram {
        let mut cumulative = 0;
        let buckets = LATENCY_BUCKETS_MS
            .iter()
            .zip(self.buckets)
            .map(|(&le, n)| {
                cumulative += n;
                let mut b = Bucket::default();
                b.set_upper_bound(le / unit_ms);
                b.set_cumulative_count(cumulative);
                b
            })
            .collect();
        let mut h = Histogram::default();
        h.set_bucket(buckets);
        h.set_sample_count(self.count);
        h.set_sample_sum(self.sum_ms / unit_ms);
        h
    }
}

/// HTTP counters of one shard's listener.
#[derive(Debug, Clone, Default)]
pub struct HttpMetrics {
    pub requests: BTreeMap<(&'static str, u16), u64>,
    pub latency: BTreeMap<&'static str, LatencyHistogram>,
    /// `/ask` requests, end to end (the `ask` route), in milliseconds.
    pub ask_latency: LatencyHistogram,
    pub connections_open: u64,
    pub connections_accepted: u64,
    pub connections_refused: u64,
    /// Idle connections closed at the connection limit to make room for a new one.
    pub connections_evicted: u64,
    pub connections_moved: u64,
    pub connection_moves_refused: u64,
    /// Connections closed because their client took answers slower than
    /// `--min-send-bytes-per-s`.
    pub slow_readers_closed: u64,
    pub rate_limit_rejections: u64,
    /// `/watch` streams opened, events written to them, streams ended by overflow.
    pub watch_streams_opened: u64,
    pub watch_events_sent: u64,
    pub watch_overflows: u64,
    /// From a change's apply on its owner shard to its event handed to the connection.
    pub watch_delivery_latency: LatencyHistogram,
    /// Audit log writes that failed (the action refused, or its outcome unrecorded).
    pub audit_failures: u64,
}

thread_local! {
    static HTTP: RefCell<HttpMetrics> = RefCell::new(HttpMetrics::default());
}

/// Counts one finished request on this shard.
pub fn record_request(route: &'static str, status: u16, elapsed: Duration) {
    HTTP.with(|m| {
        let mut m = m.borrow_mut();
        *m.requests.entry((route, status)).or_default() += 1;
        m.latency.entry(route).or_default().record(elapsed);
        if route == "ask" {
            m.ask_latency.record(elapsed);
        }
    })
}

/// Updates this shard's connection counters.
pub fn with_http(f: impl FnOnce(&mut HttpMetrics)) {
    HTTP.with(|m| f(&mut m.borrow_mut()))
}

/// Everything one shard reports at a scrape (taken on the shard, sent to control).
#[derive(Debug, Clone)]
pub struct ShardSnapshot {
    pub shard: usize,
    pub http: HttpMetrics,
    pub wal_bytes_written: u64,
    pub wal_appends: u64,
    pub wal_syncs: u64,
    pub wal_spare_waits: u64,
    pub wal_segments: usize,
    pub wal_failed: bool,
    pub wal_segments_damaged: usize,
    pub fsync_lag: LatencyHistogram,
    pub checkpoint: CheckpointMetrics,
    pub plan_cache: PlanCacheStats,
    pub ask_turn_waits: u64,
    pub tenants: usize,
    pub rows: usize,
    pub bytes: usize,
    pub migrations: oc_engine::MigrationMetrics,
    /// The synchronous-replication gate's counters, when the shard has one.
    pub sync_gate: Option<crate::replication::gate::GateCounters>,
    /// Sampled row writes' time per stage, timed on this shard.
    pub write_stages: StageHistograms,
}

/// Takes this shard's snapshot; runs on the shard.
pub fn snapshot(node: &ShardNode) -> ShardSnapshot {
    let shard = node.shard();
    let wal = shard.wal().stats();
    let (tenants, rows, bytes) = shard.totals();
    ShardSnapshot {
        shard: node.id(),
        http: HTTP.with(|m| m.borrow().clone()),
        wal_bytes_written: wal.bytes_written,
        wal_appends: wal.appends,
        wal_syncs: wal.syncs,
        wal_spare_waits: wal.spare_waits,
        wal_segments: shard.wal().segments().len(),
        wal_failed: shard.wal().failure().is_some(),
        wal_segments_damaged: shard.wal().damaged_segments().len(),
        fsync_lag: LatencyHistogram::from_hdr_us(&wal.fsync_lag_us),
        checkpoint: shard.checkpoint_metrics(),
        plan_cache: shard.plan_cache_stats(),
        ask_turn_waits: shard.ask_turn_waits(),
        tenants,
        rows,
        bytes,
        migrations: shard.migration_metrics(),
        sync_gate: crate::replication::gate::local_counters(),
        write_stages: stages::snapshot(),
    }
}

/// What the control executor adds to a scrape: its own state and the requests its
/// ops listener answered.
#[derive(Debug, Clone, Default)]
pub struct ControlMetrics {
    pub uptime_s: f64,
    pub ready: bool,
    pub ops_http: HttpMetrics,
    pub shipping: Option<ShipMetrics>,
    pub replication: Option<crate::replication::ReplicationMetrics>,
    /// CPU, memory and descriptors of the process (read on the control executor).
    pub process: ProcessStats,
    /// The data directory's file system, when `statvfs` answered.
    pub data_disk: Option<DiskStats>,
}

/// This thread's HTTP counters (the control executor's, for its ops listener).
pub fn local_http() -> HttpMetrics {
    HTTP.with(|m| m.borrow().clone())
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.to_string());
    l.set_value(value.to_string());
    l
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

fn gauge(labels: Vec<LabelPair>, value: f64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(value);
    let mut m = Metric::from_label(labels);
    m.set_gauge(g);
    m
}

fn counter(labels: Vec<LabelPair>, value: f64) -> Metric {
    let mut c = Counter::default();
    c.set_value(value);
    let mut m = Metric::from_label(labels);
    m.set_counter(c);
    m
}

/// A stage histogram (microsecond buckets) in seconds.
fn stage_histogram(stage: Stage, h: &StageHistogram) -> Metric {
    let mut cumulative = 0;
    let buckets = stages::BUCKETS_US
        .iter()
        .zip(h.buckets)
        .map(|(&le, n)| {
            cumulative += n;
            let mut b = Bucket::default();
            b.set_upper_bound(le as f64 / 1e6);
            b.set_cumulative_count(cumulative);
            b
        })
        .collect();
    let mut proto = Histogram::default();
    proto.set_bucket(buckets);
    proto.set_sample_count(h.count);
    proto.set_sample_sum(h.sum_us as f64 / 1e6);
    let mut m = Metric::from_label(vec![label("stage", stage.name())]);
    m.set_histogram(proto);
    m
}

fn histogram(labels: Vec<LabelPair>, h: &LatencyHistogram, unit_ms: f64) -> Metric {
    let mut m = Metric::from_label(labels);
    m.set_histogram(h.to_proto(unit_ms));
    m
}

/// A per-shard metric family.
fn per_shard(
    shards: &[ShardSnapshot],
    name: &str,
    help: &str,
    kind: MetricType,
    value: impl Fn(&ShardSnapshot) -> f64,
) -> MetricFamily {
    let make = match kind {
        MetricType::COUNTER => counter,
        _ => gauge,
    };
    let metrics = shards
        .iter()
        .map(|s| make(vec![label("shard", &s.shard.to_string())], value(s)))
        .collect();
    family(name, help, kind, metrics)
}

/// The families the control executor knows by itself: uptime, readiness, the build,
/// the process and the data disk. A reading the kernel refused is left out.
fn control_families(control: &ControlMetrics) -> Vec<MetricFamily> {
    use MetricType::{COUNTER, GAUGE};
    let one = |value: Option<f64>| value.map(|v| vec![gauge(vec![], v)]).unwrap_or_default();
    let p = &control.process;
    vec![
        family(
            "oc_up_seconds",
            "Seconds since the server started.",
            GAUGE,
            vec![gauge(vec![], control.uptime_s)],
        ),
        family(
            "oc_ready",
            "1 when /ready would answer 200: every shard recovered and serving (a writer \
             holding its lease, a follower connected and caught up).",
            GAUGE,
            vec![gauge(vec![], f64::from(u8::from(control.ready)))],
        ),
        family(
            "oc_build_info",
            "Always 1; the labels name the running build (the same as /health).",
            GAUGE,
            vec![gauge(
                vec![
                    label("version", env!("CARGO_PKG_VERSION")),
                    label("git_commit", env!("OC_GIT_COMMIT")),
                ],
                1.0,
            )],
        ),
        family(
            "process_cpu_seconds_total",
            "User and system CPU time spent by the process, in seconds.",
            COUNTER,
            p.cpu_seconds
                .map(|v| vec![counter(vec![], v)])
                .unwrap_or_default(),
        ),
        family(
            "process_resident_memory_bytes",
            "Resident memory of the process, from /proc/self/stat.",
            GAUGE,
            one(p.resident_bytes.map(|b| b as f64)),
        ),
        family(
            "process_open_fds",
            "Open file descriptors of the process.",
            GAUGE,
            one(p.open_fds.map(|n| n as f64)),
        ),
        family(
            "process_max_fds",
            "The process's open-files limit (soft RLIMIT_NOFILE).",
            GAUGE,
            one(p.max_fds.map(|n| n as f64)),
        ),
        family(
            "oc_data_disk_free_bytes",
            "Bytes still available to oc on the data directory's file system.",
            GAUGE,
            one(control.data_disk.map(|d| d.free_bytes as f64)),
        ),
        family(
            "oc_data_disk_size_bytes",
            "Size of the data directory's file system in bytes.",
            GAUGE,
            one(control.data_disk.map(|d| d.size_bytes as f64)),
        ),
    ]
}

/// The replication families, per shard (`role` says which end this server is).
fn replication_families(r: &crate::replication::ReplicationMetrics) -> Vec<MetricFamily> {
    use MetricType::{COUNTER, GAUGE};
    let role = if r.follower { "follower" } else { "writer" };
    let direction = if r.follower { "received" } else { "sent" };
    let each = |make: fn(Vec<LabelPair>, f64) -> Metric,
                value: &dyn Fn(&crate::replication::ShardLink) -> f64| {
        r.links
            .iter()
            .enumerate()
            .map(|(shard, link)| {
                make(
                    vec![label("role", role), label("shard", &shard.to_string())],
                    value(link),
                )
            })
            .collect::<Vec<_>>()
    };
    let each_direction = |value: &dyn Fn(&crate::replication::ShardLink) -> f64| {
        r.links
            .iter()
            .enumerate()
            .map(|(shard, link)| {
                counter(
                    vec![
                        label("direction", direction),
                        label("shard", &shard.to_string()),
                    ],
                    value(link),
                )
            })
            .collect::<Vec<_>>()
    };
    let mut families = vec![
        family(
            "oc_replication_connected",
            "Follower: 1 while the shard's stream from the writer is up. Writer: follower \
             streams of the shard open now.",
            GAUGE,
            each(gauge, &|l| f64::from(l.connected)),
        ),
        family(
            "oc_replication_frames_total",
            "Log frames replicated, received by a follower or sent by a writer.",
            COUNTER,
            each_direction(&|l| l.frames as f64),
        ),
        family(
            "oc_replication_bytes_total",
            "Bytes of log frames replicated, received by a follower or sent by a writer.",
            COUNTER,
            each_direction(&|l| l.bytes as f64),
        ),
    ];
    // A writer with no follower connected reports 0 (it is behind nobody).
    let lag = r
        .links
        .iter()
        .enumerate()
        .map(|(shard, l)| {
            gauge(
                vec![label("role", role), label("shard", &shard.to_string())],
                if r.follower || l.connected > 0 {
                    l.applied_lag_lsn() as f64
                } else {
                    0.0
                },
            )
        })
        .collect();
    families.push(family(
        "oc_replication_applied_lag_lsn",
        "Frames the writer holds durable that the follower has not applied yet (a \
         follower's view from the writer's last message; a writer's from the connected \
         follower furthest behind).",
        GAUGE,
        lag,
    ));
    if r.follower {
        let now = std::time::Instant::now();
        families.push(family(
            "oc_replication_lag_seconds",
            "Seconds since the follower last had applied everything the writer had told \
             it of (0 while caught up; NaN before it ever was).",
            GAUGE,
            each(gauge, &|l| match l.caught_up_at {
                _ if l.applied_lag_lsn() == 0 && l.connected > 0 => 0.0,
                Some(at) => now.duration_since(at).as_secs_f64(),
                None => f64::NAN,
            }),
        ));
        families.push(family(
            "oc_replication_reconnects_total",
            "Times the follower's stream from the writer ended and was made again.",
            COUNTER,
            each(counter, &|l| l.reconnects as f64),
        ));
    }
    families
}

/// The Prometheus text exposition of every shard's snapshot. A family with no sample
/// (every per-shard family while the shards are still recovering) is left out: the
/// exposition format has no way to say "no samples", and the encoder refuses it.
pub fn render(shards: &[ShardSnapshot], control: &ControlMetrics) -> Result<String, String> {
    use std::sync::atomic::Ordering::Relaxed;
    use MetricType::{COUNTER, GAUGE, HISTOGRAM};
    let mut families = control_families(control);
    if let Some(replication) = &control.replication {
        families.extend(replication_families(replication));
    }
    let gated: Vec<ShardSnapshot> = shards
        .iter()
        .filter(|s| s.sync_gate.is_some())
        .cloned()
        .collect();
    if !gated.is_empty() {
        let gate = |s: &ShardSnapshot| s.sync_gate.unwrap_or_default();
        families.push(per_shard(
            &gated,
            "oc_replication_sync_waits_total",
            "Writes that waited for the followers to confirm them (--sync-replication).",
            COUNTER,
            |s| gate(s).waits as f64,
        ));
        families.push(per_shard(
            &gated,
            "oc_replication_sync_timeouts_total",
            "Writes whose followers did not confirm them within --sync-timeout-ms.",
            COUNTER,
            |s| gate(s).timeouts as f64,
        ));
        families.push(per_shard(
            &gated,
            "oc_replication_degraded",
            "1 while the shard acknowledges writes without its followers \
             (--sync-on-timeout degrade, after a timeout).",
            GAUGE,
            |s| f64::from(u8::from(gate(s).degraded)),
        ));
        let open = gated.iter().any(|s| gate(s).circuit_open);
        let opened: u64 = gated.iter().map(|s| gate(s).circuit_opened_total).sum();
        add_circuit(&mut families, "replication", open, opened);
    }
    let mut requests = BTreeMap::new();
    let mut latency: BTreeMap<&str, LatencyHistogram> = BTreeMap::new();
    let mut fsync_lag = LatencyHistogram::default();
    let mut ask_latency = LatencyHistogram::default();
    let mut watch_latency = LatencyHistogram::default();
    let (mut watch_opened, mut watch_events, mut watch_overflows) = (0, 0, 0);
    let mut audit_failures = 0;
    for http in shards.iter().map(|s| &s.http).chain([&control.ops_http]) {
        audit_failures += http.audit_failures;
        ask_latency.merge(&http.ask_latency);
        watch_latency.merge(&http.watch_delivery_latency);
        watch_opened += http.watch_streams_opened;
        watch_events += http.watch_events_sent;
        watch_overflows += http.watch_overflows;
        for (key, n) in &http.requests {
            *requests.entry(*key).or_insert(0u64) += n;
        }
        for (route, h) in &http.latency {
            latency.entry(route).or_default().merge(h);
        }
    }
    let mut write_stages = StageHistograms::default();
    for s in shards {
        fsync_lag.merge(&s.fsync_lag);
        for (all, one) in write_stages.iter_mut().zip(&s.write_stages) {
            all.merge(one);
        }
    }
    families.push(family(
        "oc_write_stage_seconds",
        "Row writes' time per stage, one write in 8 per shard sampled, all shards.",
        HISTOGRAM,
        Stage::ALL
            .iter()
            .map(|&stage| stage_histogram(stage, &write_stages[stage as usize]))
            .collect(),
    ));
    families.push(family(
        "oc_http_requests_total",
        "HTTP requests answered, by route and status.",
        COUNTER,
        requests
            .iter()
            .map(|((route, status), n)| {
                counter(
                    vec![label("route", route), label("status", &status.to_string())],
                    *n as f64,
                )
            })
            .collect(),
    ));
    families.push(family(
        "oc_http_request_duration_seconds",
        "HTTP request latency from headers read to response ready, by route.",
        HISTOGRAM,
        latency
            .iter()
            .map(|(route, h)| histogram(vec![label("route", route)], h, 1000.0))
            .collect(),
    ));
    families.push(family(
        "oc_ask_latency_ms",
        "End-to-end /ask latency (request read to response ready), all shards, in milliseconds.",
        HISTOGRAM,
        vec![histogram(vec![], &ask_latency, 1.0)],
    ));
    families.extend([
        family(
            "oc_watch_streams",
            "/watch streams open now, all tenants.",
            GAUGE,
            vec![gauge(vec![], crate::api::watch::open_streams_total() as f64)],
        ),
        family(
            "oc_watch_streams_opened_total",
            "/watch streams opened since start.",
            COUNTER,
            vec![counter(vec![], watch_opened as f64)],
        ),
        family(
            "oc_watch_events_sent_total",
            "Change events written to /watch streams (progress, hello and heartbeats not counted).",
            COUNTER,
            vec![counter(vec![], watch_events as f64)],
        ),
        family(
            "oc_watch_overflows_total",
            "/watch streams closed with `overflow` because their reader fell behind.",
            COUNTER,
            vec![counter(vec![], watch_overflows as f64)],
        ),
        family(
            "oc_watch_delivery_latency_seconds",
            "From a change's apply on its owner shard to its event handed to the stream's connection.",
            HISTOGRAM,
            vec![histogram(vec![], &watch_latency, 1000.0)],
        ),
        family(
            "oc_otlp_spans_exported_total",
            "Request spans sent to the OTLP endpoint (--otlp-endpoint).",
            COUNTER,
            vec![counter(vec![], crate::otlp::EXPORTED.load(Relaxed) as f64)],
        ),
        family(
            "oc_otlp_spans_dropped_total",
            "Request spans kept by sampling but not sent: the exporter's queue was full, or the endpoint refused or did not answer.",
            COUNTER,
            vec![
                counter(
                    vec![label("reason", "queue_full")],
                    crate::otlp::DROPPED_QUEUE_FULL.load(Relaxed) as f64,
                ),
                counter(
                    vec![label("reason", "export_failed")],
                    crate::otlp::DROPPED_EXPORT_FAILED.load(Relaxed) as f64,
                ),
            ],
        ),
        family(
            "oc_audit_log_failed",
            "1 once the audit log failed a write or sync: operator actions are refused until a restart.",
            GAUGE,
            vec![gauge(
                vec![],
                f64::from(u8::from(oc_ship::audit::FAILED.load(Relaxed))),
            )],
        ),
        family(
            "oc_audit_failures_total",
            "Audit log writes that failed: the operator action refused (503 audit_unavailable) or its outcome left unrecorded.",
            COUNTER,
            vec![counter(vec![], audit_failures as f64)],
        ),
    ]);
    let (hits, misses) = shards.iter().fold((0, 0), |(h, m), s| {
        (h + s.plan_cache.hits, m + s.plan_cache.misses)
    });
    families.push(family(
        "oc_plan_cache_hit_ratio",
        "Plan-cache hits over lookups since start, all shards (NaN before the first query); EXPLAIN reads count too.",
        GAUGE,
        vec![gauge(vec![], hits as f64 / (hits + misses) as f64)],
    ));
    families.extend([
        per_shard(
            shards,
            "oc_ask_turn_waits_total",
            "/ask queries that waited for a turn: their tenant already ran 4 queries on the shard.",
            COUNTER,
            |s| s.ask_turn_waits as f64,
        ),
        per_shard(
            shards,
            "oc_plan_cache_hits_total",
            "/ask queries whose plan came from the shard's plan cache.",
            COUNTER,
            |s| s.plan_cache.hits as f64,
        ),
        per_shard(
            shards,
            "oc_plan_cache_misses_total",
            "/ask queries planned afresh (new normalized text or schema).",
            COUNTER,
            |s| s.plan_cache.misses as f64,
        ),
        per_shard(
            shards,
            "oc_plan_cache_entries",
            "Plans held in the shard's plan cache.",
            GAUGE,
            |s| s.plan_cache.entries as f64,
        ),
        per_shard(
            shards,
            "oc_plan_cache_bytes",
            "Estimated bytes of the plans in the shard's plan cache (bounded by its byte budget).",
            GAUGE,
            |s| s.plan_cache.bytes as f64,
        ),
        per_shard(
            shards,
            "oc_plan_cache_evictions_total",
            "Plans evicted from the shard's plan cache to make room (least recently used first).",
            COUNTER,
            |s| s.plan_cache.evictions as f64,
        ),
    ]);
    families.push(family(
        "oc_wal_fsync_lag_ms",
        "Time from a write's append to its group's durable write (O_DSYNC) returning, all shards.",
        HISTOGRAM,
        vec![histogram(vec![], &fsync_lag, 1.0)],
    ));
    families.extend([
        per_shard(
            shards,
            "oc_http_connections_open",
            "Open client connections.",
            GAUGE,
            |s| s.http.connections_open as f64,
        ),
        per_shard(
            shards,
            "oc_http_connections_accepted_total",
            "Client connections accepted.",
            COUNTER,
            |s| s.http.connections_accepted as f64,
        ),
        per_shard(
            shards,
            "oc_http_connections_refused_total",
            "Client connections refused at the connection limit.",
            COUNTER,
            |s| s.http.connections_refused as f64,
        ),
        per_shard(
            shards,
            "oc_http_connections_evicted_total",
            "Idle client connections closed at the connection limit to make room for a new one.",
            COUNTER,
            |s| s.http.connections_evicted as f64,
        ),
        per_shard(
            shards,
            "oc_http_connections_moved_total",
            "Client connections this shard moved to the shard that owns their requests' tenant.",
            COUNTER,
            |s| s.http.connections_moved as f64,
        ),
        per_shard(
            shards,
            "oc_http_connection_moves_refused_total",
            "Moves of a connection to its tenant's shard that the shard refused (busier than this one, near its connection limit, or draining); the connection stays here.",
            COUNTER,
            |s| s.http.connection_moves_refused as f64,
        ),
        per_shard(
            shards,
            "oc_http_slow_readers_closed_total",
            "Client connections closed because the client took what it was sent slower than --min-send-bytes-per-s.",
            COUNTER,
            |s| s.http.slow_readers_closed as f64,
        ),
        per_shard(
            shards,
            "oc_rate_limit_rejections_total",
            "Requests refused with 429 because their API key was over its rate limit.",
            COUNTER,
            |s| s.http.rate_limit_rejections as f64,
        ),
        per_shard(
            shards,
            "oc_wal_bytes_written_total",
            "Bytes written to the write-ahead log, padding included.",
            COUNTER,
            |s| s.wal_bytes_written as f64,
        ),
        per_shard(
            shards,
            "oc_wal_appends_total",
            "Records appended to the write-ahead log.",
            COUNTER,
            |s| s.wal_appends as f64,
        ),
        per_shard(
            shards,
            "oc_wal_syncs_total",
            "Group commits (one durable O_DSYNC write each).",
            COUNTER,
            |s| s.wal_syncs as f64,
        ),
        per_shard(
            shards,
            "oc_wal_spare_waits_total",
            "Segment rotations that waited for the next segment's file to be prepared (appends waited too).",
            COUNTER,
            |s| s.wal_spare_waits as f64,
        ),
        per_shard(
            shards,
            "oc_wal_segments",
            "Log segment files held locally.",
            GAUGE,
            |s| s.wal_segments as f64,
        ),
        per_shard(
            shards,
            "oc_wal_failed",
            "1 when the shard's log failed and the shard needs a restart.",
            GAUGE,
            |s| f64::from(u8::from(s.wal_failed)),
        ),
        per_shard(
            shards,
            "oc_wal_segments_damaged",
            "Log segments held that the check after the open found damaged (segments the open did not read: all before the replay point).",
            GAUGE,
            |s| s.wal_segments_damaged as f64,
        ),
        per_shard(
            shards,
            "oc_checkpoint_age_s",
            "Seconds the shard's state has differed from its newest checkpoint (0 while equal).",
            GAUGE,
            |s| s.checkpoint.age_s,
        ),
        per_shard(
            shards,
            "oc_checkpoint_duration_seconds",
            "Duration of the last checkpoint.",
            GAUGE,
            |s| s.checkpoint.last_duration_s,
        ),
        per_shard(
            shards,
            "oc_checkpoint_size_bytes",
            "Data bytes of the last checkpoint.",
            GAUGE,
            |s| s.checkpoint.last_bytes as f64,
        ),
        family(
            "oc_migrations",
            "Schema migrations by state: the active ones and those the tenants remember.",
            GAUGE,
            shards
                .iter()
                .flat_map(|s| {
                    oc_engine::migration::MigrationState::ALL
                        .iter()
                        .zip(s.migrations.by_state)
                        .map(|(state, n)| {
                            gauge(
                                vec![
                                    label("shard", &s.shard.to_string()),
                                    label("state", state.name()),
                                ],
                                n as f64,
                            )
                        })
                })
                .collect(),
        ),
        per_shard(
            shards,
            "oc_backfill_rows_total",
            "Rows migration backfills converted.",
            COUNTER,
            |s| s.migrations.backfill_rows as f64,
        ),
        per_shard(
            shards,
            "oc_backfill_share",
            "Backfill bytes per byte the shard's writers logged, over the last second.",
            GAUGE,
            |s| s.migrations.backfill_share,
        ),
        per_shard(
            shards,
            "oc_checkpoints_total",
            "Checkpoints written.",
            COUNTER,
            |s| s.checkpoint.checkpoints_total as f64,
        ),
        per_shard(
            shards,
            "oc_checkpoint_failures_total",
            "Checkpoints that failed (retried at the next check).",
            COUNTER,
            |s| s.checkpoint.failures_total as f64,
        ),
        per_shard(shards, "oc_tenants", "Tenants owned.", GAUGE, |s| {
            s.tenants as f64
        }),
        per_shard(shards, "oc_rows", "Rows stored, all tables.", GAUGE, |s| {
            s.rows as f64
        }),
        per_shard(
            shards,
            "oc_stored_bytes",
            "Bytes of rows as stored, all tables.",
            GAUGE,
            |s| s.bytes as f64,
        ),
    ]);
    let (budget, resident) = oc_engine::quota::memory_usage();
    let (query_held, query_limit) = oc_engine::quota::query_memory_usage();
    families.extend([
        family(
            "oc_ask_memory_bytes",
            "Bytes the running /ask queries hold together (their estimates, in whole MiB past each query's first); not counted against the memory budget for data.",
            GAUGE,
            vec![gauge(vec![], query_held as f64)],
        ),
        family(
            "oc_memory_trims_total",
            "Times freed memory was handed back to the kernel (malloc_trim) while writes were refused for memory.",
            COUNTER,
            vec![counter(vec![], oc_engine::quota::memory_trims() as f64)],
        ),
        family(
            "oc_ask_memory_limit_bytes",
            "Bytes the running /ask queries may hold together; past it a query gets 429 query_memory_busy.",
            GAUGE,
            vec![gauge(vec![], query_limit as f64)],
        ),
        family(
            "oc_memory_budget_bytes",
            "Resident memory, less what running /ask queries hold, past which writes that add data are refused.",
            GAUGE,
            vec![gauge(vec![], budget as f64)],
        ),
        family(
            "oc_memory_resident_bytes",
            "Resident memory of the process at the last sample (every 100 ms).",
            GAUGE,
            vec![gauge(vec![], resident as f64)],
        ),
    ]);
    if let Some(ship) = &control.shipping {
        add_shipping_families(&mut families, ship);
    }
    families.retain(|f| !f.get_metric().is_empty());
    let mut out = String::new();
    TextEncoder::new()
        .encode_utf8(&families, &mut out)
        .map_err(|e| format!("encoding the metrics failed: {e}"))?;
    Ok(out)
}

/// Archive shipping and its circuit breaker. Every label value is always present, so
/// `rate()` and `increase()` work from the first scrape.
fn add_shipping_families(families: &mut Vec<MetricFamily>, ship: &ShipMetrics) {
    use MetricType::{COUNTER, GAUGE};
    let by_shard = |values: Vec<f64>| {
        values
            .into_iter()
            .enumerate()
            .map(|(shard, v)| gauge(vec![label("shard", &shard.to_string())], v))
            .collect()
    };
    let by = |name: &str, keys: &[&'static str], counts: &BTreeMap<&'static str, u64>| {
        keys.iter()
            .map(|k| {
                counter(
                    vec![label(name, k)],
                    counts.get(k).copied().unwrap_or(0) as f64,
                )
            })
            .collect()
    };
    families.extend([
        family(
            "oc_archive_lag_bytes",
            "Durable log bytes not yet in the archive, by shard.",
            GAUGE,
            by_shard(ship.lag_bytes.iter().map(|&b| b as f64).collect()),
        ),
        family(
            "oc_archive_segments_skipped_total",
            "Damaged sealed log segments left out of the archive because a checkpoint covers them, by shard.",
            COUNTER,
            ship.segments_skipped
                .iter()
                .enumerate()
                .map(|(shard, &n)| counter(vec![label("shard", &shard.to_string())], n as f64))
                .collect(),
        ),
        family(
            "oc_archive_lag_seconds",
            "Seconds since the archive last held everything the shard had made durable.",
            GAUGE,
            by_shard(ship.lag_seconds.clone()),
        ),
        family(
            "oc_archive_last_success_timestamp_seconds",
            "Unix time of the last shipping round that uploaded everything it had to.",
            GAUGE,
            vec![gauge(vec![], ship.last_success_unix_s)],
        ),
        family(
            "oc_archive_uploads_total",
            "Objects uploaded, by kind (segment, checkpoint, tail piece).",
            COUNTER,
            by("object", &["segment", "checkpoint", "tail"], &ship.uploads),
        ),
        family(
            "oc_archive_uploaded_bytes_total",
            "Payload bytes handed to the archive, before its encoding.",
            COUNTER,
            vec![counter(vec![], ship.uploaded_bytes as f64)],
        ),
        family(
            "oc_archive_stored_bytes_total",
            "Bytes the archive stored for them: LZ4-encoded bodies and trailers.",
            COUNTER,
            vec![counter(vec![], ship.stored_bytes as f64)],
        ),
        family(
            "oc_archive_failures_total",
            "Shipping rounds that failed, by kind (io, corrupt, conflict, config, local).",
            COUNTER,
            by(
                "kind",
                &["io", "corrupt", "conflict", "config", "local"],
                &ship.failures,
            ),
        ),
        family(
            "oc_archive_retention_deleted_total",
            "Archive objects deleted by retention.",
            COUNTER,
            vec![counter(vec![], ship.deleted_by_retention as f64)],
        ),
    ]);
    add_circuit(
        families,
        "archive",
        ship.circuit_open,
        ship.circuit_opened_total,
    );
}

/// Adds one downstream's breaker to the `oc_circuit_*` families, which the first
/// downstream creates (one family per name in an exposition).
fn add_circuit(families: &mut Vec<MetricFamily>, downstream: &str, open: bool, opened: u64) {
    let labels = || vec![label("downstream", downstream)];
    let series = [
        (
            "oc_circuit_breaker_open",
            "1 while the breaker on a downstream is open (the archive: no attempts until it \
             half-opens; replication: writes refused at once until the followers catch up).",
            MetricType::GAUGE,
            gauge(labels(), f64::from(u8::from(open))),
        ),
        (
            "oc_circuit_open_total",
            "Times the breaker on a downstream opened.",
            MetricType::COUNTER,
            counter(labels(), opened as f64),
        ),
    ];
    for (name, help, kind, sample) in series {
        match families.iter_mut().find(|f| f.name() == name) {
            Some(existing) => existing.mut_metric().push(sample),
            None => families.push(family(name, help, kind, vec![sample])),
        }
    }
}

/// The content type of [`render`]'s output.
pub fn content_type() -> String {
    TextEncoder::new().format_type().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_before_any_shard_answers_is_well_formed() {
        let control = ControlMetrics {
            uptime_s: 0.0,
            ready: false,
            ops_http: HttpMetrics::default(),
            shipping: None,
            replication: None,
            process: ProcessStats::default(),
            data_disk: None,
        };
        let text = render(&[], &control).expect("renders without shards");
        assert!(text.contains("oc_ready 0"), "{text}");
        assert!(!text.contains("oc_wal_failed"), "{text}");
        // Readings the kernel did not give are left out, never reported as 0.
        assert!(!text.contains("process_open_fds"), "{text}");
        assert!(!text.contains("oc_data_disk_free_bytes"), "{text}");
        assert!(text.contains("oc_build_info{"), "{text}");
    }
}
