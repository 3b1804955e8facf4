#!/usr/bin/env bash
# Re-measures every row of issue 21's table with its documented command, in one
# sitting, so each ratio has its baseline from the same minutes (BENCHMARKS.md,
# "Issue 21, every row"). Needs a release build:
#   cargo build --release -p oc-net -p oc-bench -p oc-ship --bins
# DIR must be on the disk to measure (not tmpfs). Writes JSON (and .hlog) to OUT.
# ONLY=http runs the HTTP rounds alone.
set -euo pipefail
BIN=${BIN:-target/release}
DIR=${DIR:-/tmp/oc-issue21}
OUT=${OUT:-docs/bench/issue21}
ROUNDS=${ROUNDS:-3}
PORT=${PORT:-7070}
OPS_PORT=${OPS_PORT:-7071}
ONLY=${ONLY:-all}
mkdir -p "$OUT" "$DIR"
log() { echo "== $(date +%T) $*" >&2; }

# One HTTP round: oc-server (args after the setup's name) and the 10k req/s 90:10 mix
# with the floor and the log's fsync lag scraped from /metrics.
http_round() {
    local name=$1 round=$2 server_cpus=$3 client_cpus=$4
    shift 4
    rm -rf "$DIR/http" "$DIR/http-archive"
    taskset -c "$server_cpus" "$BIN/oc-server" --data-dir "$DIR/http" \
        --listen "127.0.0.1:$PORT" --ops-listen "127.0.0.1:$OPS_PORT" "$@" >"$DIR/server.log" 2>&1 &
    local pid=$!
    for _ in $(seq 100); do
        curl -sf "http://127.0.0.1:$OPS_PORT/ready" >/dev/null && break
        sleep 0.1
    done
    # --client-cpus pins the generator and records it in the JSON; the server's CPUs
    # (set here with taskset) are named by the setup, which the file name carries.
    "$BIN/oc-bench" http --client-cpus "$client_cpus" --url "http://127.0.0.1:$PORT" \
        --rate 10000 --seconds 10 --mix 90:10 --metrics-url "http://127.0.0.1:$OPS_PORT" \
        --json "$OUT/http-$name-$round.json" >/dev/null
    kill -TERM "$pid"
    wait "$pid" || true
}

for round in $(seq "$ROUNDS"); do
    log "http round $round"
    http_round default "$round" 0,1 0,1 --archive "file://$DIR/http-archive"
    http_round pinned "$round" 0 1 --shards 1 --archive "file://$DIR/http-archive"
    http_round pinned-no-archive "$round" 0 1 --shards 1 --archive none
done
[ "$ONLY" = http ] && exit 0

log "ask"
"$BIN/oc-bench" ask --dir "$DIR/ask" --rows 100000 --dim 128 --rate 5000 --json "$OUT/ask.json" >/dev/null

for round in $(seq "$ROUNDS"); do
    log "engine, peers at one writer, wal: round $round"
    rm -rf "$DIR/engine" "$DIR/peers" "$DIR/wal"
    "$BIN/oc-bench" engine --dir "$DIR/engine" --seconds 5 --json "$OUT/engine-$round.json" >/dev/null
    "$BIN/oc-bench" peers --dir "$DIR/peers" --seconds 5 --concurrency 1 --json "$OUT/peers-$round.json" >/dev/null
    "$BIN/oc-bench" wal --dir "$DIR/wal" --seconds 5 --json "$OUT/wal-$round.json" >/dev/null
done

log "recovery"
rm -rf "$DIR/recovery"
"$BIN/oc-bench" recovery --dir "$DIR/recovery" --rows 1000000 --runs 3 --json "$OUT/recovery.json" >/dev/null

log "archive"
rm -rf "$DIR/archive"
"$BIN/oc-bench" archive --dir "$DIR/archive" --seconds 5 --pairs 6 --json "$OUT/archive.json" >/dev/null

log "memory"
"$BIN/oc-bench" memory --dir "$DIR/memory" --rows 200000 --json "$OUT/memory.json" >/dev/null
rm -rf "$DIR"
log "done"
