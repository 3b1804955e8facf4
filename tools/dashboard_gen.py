#!/usr/bin/env python3
"""Writes docs/observability/dashboard.json (the Grafana dashboard) to stdout:

    python3 tools/dashboard_gen.py > docs/observability/dashboard.json

Edit the rows below, not the JSON. net/tests/dashboard.rs checks the result: its
structure, that every metric it reads is documented in OPERATIONS.md, and (with
promtool) that every query returns data from a real oc-server's scrape.
"""
import json
import re

rows = [
 ("Overview", [
   ("Requests/s by route", "sum by (route) (rate(oc_http_requests_total[5m]))", "reqps", "{{route}}"),
   ("5xx ratio", "(sum(rate(oc_http_requests_total{status=~\"5..\"}[5m])) or vector(0)) / clamp_min(sum(rate(oc_http_requests_total[5m])), 1e-9)", "percentunit", "5xx"),
   ("Latency p99 by route", "histogram_quantile(0.99, sum by (route, le) (rate(oc_http_request_duration_seconds_bucket[5m])))", "s", "{{route}}"),
   ("Ready", "oc_ready", "short", "ready"),
 ]),
 ("SLOs (burn rate: 1 spends the 30-day budget in exactly 30 days)", [
   ("Availability 99.9%: 5xx burn rate, 1 h and 6 h", [
     "(sum(rate(oc_http_requests_total{route!~\"health|ready|metrics|ops_unknown\",status=~\"5..\"}[1h])) or vector(0)) / clamp_min(sum(rate(oc_http_requests_total{route!~\"health|ready|metrics|ops_unknown\"}[1h])), 1e-9) / 0.001",
     "(sum(rate(oc_http_requests_total{route!~\"health|ready|metrics|ops_unknown\",status=~\"5..\"}[6h])) or vector(0)) / clamp_min(sum(rate(oc_http_requests_total{route!~\"health|ready|metrics|ops_unknown\"}[6h])), 1e-9) / 0.001"],
     "short", ["1 h", "6 h"]),
   ("/ask p95 < 100 ms: slow-query burn rate, 1 h and 6 h", [
     "(sum(rate(oc_ask_latency_ms_count[1h])) - sum(rate(oc_ask_latency_ms_bucket{le=\"100\"}[1h]))) / clamp_min(sum(rate(oc_ask_latency_ms_count[1h])), 1e-9) / 0.05",
     "(sum(rate(oc_ask_latency_ms_count[6h])) - sum(rate(oc_ask_latency_ms_bucket{le=\"100\"}[6h]))) / clamp_min(sum(rate(oc_ask_latency_ms_count[6h])), 1e-9) / 0.05"],
     "short", ["1 h", "6 h"]),
 ]),
 ("/ask", [
   ("/ask latency p50 / p95 / p99", ["histogram_quantile(0.5, sum by (le) (rate(oc_ask_latency_ms_bucket[5m])))", "histogram_quantile(0.95, sum by (le) (rate(oc_ask_latency_ms_bucket[5m])))", "histogram_quantile(0.99, sum by (le) (rate(oc_ask_latency_ms_bucket[5m])))"], "ms", ["p50","p95","p99"]),
   ("Plan-cache hit ratio (5 min)", "sum(rate(oc_plan_cache_hits_total[5m])) / clamp_min(sum(rate(oc_plan_cache_hits_total[5m])) + sum(rate(oc_plan_cache_misses_total[5m])), 1e-9)", "percentunit", "hit ratio"),
   ("Plan-cache bytes by shard", "oc_plan_cache_bytes", "bytes", "shard {{shard}}"),
 ]),
 ("Storage", [
   ("WAL fsync lag p99", "histogram_quantile(0.99, sum by (le) (rate(oc_wal_fsync_lag_ms_bucket[5m])))", "ms", "p99"),
   ("WAL bytes/s by shard", "rate(oc_wal_bytes_written_total[5m])", "Bps", "shard {{shard}}"),
   ("WAL segments held by shard", "oc_wal_segments", "short", "shard {{shard}}"),
   ("Checkpoint age by shard", "oc_checkpoint_age_s", "s", "shard {{shard}}"),
   ("Data disk free", "oc_data_disk_free_bytes", "bytes", "free"),
   ("Failed logs, damaged segments", ["sum(oc_wal_failed)", "sum(oc_wal_segments_damaged)"], "short", ["failed logs", "damaged segments"]),
 ]),
 ("Archive", [
   ("Archive lag (RPO)", "oc_archive_lag_seconds", "s", "shard {{shard}}"),
   ("Archive failures/s by kind", "sum by (kind) (rate(oc_archive_failures_total[5m]))", "short", "{{kind}}"),
   ("Circuit open", "oc_circuit_breaker_open", "short", "{{downstream}}"),
 ]),
 ("/watch", [
   ("Open streams", "oc_watch_streams", "short", "streams"),
   ("Events/s", "rate(oc_watch_events_sent_total[5m])", "short", "events"),
   ("Overflows/s", "rate(oc_watch_overflows_total[5m])", "short", "overflows"),
   ("Delivery latency p99", "histogram_quantile(0.99, sum by (le) (rate(oc_watch_delivery_latency_seconds_bucket[5m])))", "s", "p99"),
 ]),
 ("Limits and process", [
   ("429 and 503 answers/s by route", "sum by (route, status) (rate(oc_http_requests_total{status=~\"429|503\"}[5m])) or vector(0)", "reqps", "{{route}} {{status}}"),
   ("Rate-limit rejections/s", "sum(rate(oc_rate_limit_rejections_total[5m]))", "reqps", "rejections"),
   ("Connections open by shard", "oc_http_connections_open", "short", "shard {{shard}}"),
   ("Resident memory vs budget", ["process_resident_memory_bytes", "oc_memory_budget_bytes"], "bytes", ["resident", "budget"]),
   ("CPU", "rate(process_cpu_seconds_total[5m])", "short", "cores"),
   ("Open files", ["process_open_fds", "process_max_fds"], "short", ["open", "limit"]),
 ]),
 ("Replication", [
   ("Frames not yet applied (writer: its furthest-behind follower)", "max by (instance, role, shard) (oc_replication_applied_lag_lsn)", "short", "{{instance}} {{role}} shard {{shard}}"),
   ("Replication streams connected", "sum by (instance, role) (oc_replication_connected)", "short", "{{instance}} {{role}}"),
 ]),
 ("Audit and tracing", [
   ("Audit log failures (10 min)", "sum(increase(oc_audit_failures_total[10m]))", "short", "failures"),
   ("OTLP spans exported/s", "sum(rate(oc_otlp_spans_exported_total[5m]))", "short", "exported"),
   ("OTLP spans dropped/s by reason", "sum by (reason) (rate(oc_otlp_spans_dropped_total[5m]))", "short", "{{reason}}"),
 ]),
]
# Every metric selector gets the dashboard's server choice (the `instance` variable;
# "All" is `.*`), so a writer's and its followers' series are not mixed unasked.
SELECTOR = re.compile(r'\b((?:oc|process)_[A-Za-z0-9_]+)(\{([^}]*)\})?')


def scoped(expr):
    def one(m):
        rest = "," + m.group(3) if m.group(3) else ""
        return m.group(1) + '{instance=~"$instance"' + rest + "}"
    return SELECTOR.sub(one, expr)


panels = []
pid = 1
y = 0
for title, items in rows:
    panels.append({"id": pid, "type": "row", "title": title, "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
    pid += 1; y += 1
    x = 0
    for (ptitle, exprs, unit, legends) in items:
        if isinstance(exprs, str):
            exprs = [exprs]; legends = [legends]
        targets = [{"refId": chr(ord('A')+i), "expr": scoped(e), "legendFormat": l, "datasource": {"type": "prometheus", "uid": "${datasource}"}} for i, (e, l) in enumerate(zip(exprs, legends))]
        panels.append({
            "id": pid, "type": "timeseries", "title": ptitle,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}, "tooltip": {"mode": "multi", "sort": "none"}},
            "targets": targets,
        })
        pid += 1
        x += 8
        if x >= 24:
            x = 0; y += 8
    if x != 0:
        y += 8
dash = {
  "title": "oc",
  "uid": "oc-overview",
  "description": "oc storage engine: requests, SLO burn rates, /ask, storage, archive, /watch, limits, replication, audit and tracing. Panels follow docs/OPERATIONS.md (metrics) and docs/RUNBOOK.md (alerts).",
  "tags": ["oc"],
  "timezone": "utc",
  "schemaVersion": 39,
  "version": 1,
  "editable": True,
  "refresh": "30s",
  "time": {"from": "now-6h", "to": "now"},
  "templating": {"list": [
    {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus", "hide": 0, "refresh": 1, "options": []},
    {"name": "instance", "label": "Server", "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
     "query": "label_values(oc_build_info, instance)", "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
     "sort": 1, "hide": 0, "options": [], "current": {"selected": True, "text": ["All"], "value": ["$__all"]}},
  ]},
  "annotations": {"list": []},
  "panels": panels,
}
print(json.dumps(dash, indent=2))
