#!/usr/bin/env bash
# The shipping thread's CPU per archived byte (BENCHMARKS.md, "Fewer copies of each
# archived byte", "Archive objects compressed"): OLD and NEW are directories holding an
# oc-server and an oc-bench; each round runs both (the order flipped every round)
# against a local archive under the same open-loop load of single-row writes
# (`oc-bench http --mix 0:100`), then reads the `oc-ship` thread's user + system time
# and the bytes it wrote (`wchar`) from /proc, the payload bytes it uploaded from
# /metrics, and the write p99 and the log's fsync-lag p99 from the run's JSON. With
# NONE=1 each round also runs NEW with `--archive none`, the baseline for the last two.
# DIR must be on a disk file system (not tmpfs).
set -euo pipefail
OLD=${OLD:?directory of the build before the change}
NEW=${NEW:?directory of the build after it}
DIR=${DIR:-/var/tmp/oc-ship-cpu}
OUT=${OUT:-docs/bench/ship-copies}
ROUNDS=${ROUNDS:-3}
NONE=${NONE:-0}
RATE=${RATE:-8000}
SECONDS_EACH=${SECONDS_EACH:-15}
mkdir -p "$OUT"
tick_ms=$((1000 / $(getconf CLK_TCK)))
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; true' EXIT
run() { # tag bin_dir [archive]
    local tag=$1 bin=$2 archive=${3:-file://$DIR/archive} tid= ticks=0 bytes=0 wchar=0
    rm -rf "$DIR"
    mkdir -p "$DIR"
    "$bin/oc-server" --data-dir "$DIR/data" --listen 127.0.0.1:7070 \
        --ops-listen 127.0.0.1:7071 --archive "$archive" >"$DIR.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do
        kill -0 "$pid" || { echo "oc-server exited: see $DIR.log" >&2; exit 1; }
        curl -sf http://127.0.0.1:7071/ready >/dev/null && break
        sleep 0.1
    done
    curl -sf http://127.0.0.1:7071/ready >/dev/null || { echo "oc-server never ready" >&2; exit 1; }
    "$bin/oc-bench" http --url http://127.0.0.1:7070 --mix 0:100 --rate "$RATE" \
        --seconds "$SECONDS_EACH" --no-floor --metrics-url http://127.0.0.1:7071 \
        --json "$OUT/http-$tag.json" >/dev/null 2>"$DIR.bench.log"
    sleep 1
    if [ "$archive" != none ]; then
        for t in /proc/$pid/task/*; do
            if [ "$(cat "$t/comm")" = oc-ship ]; then tid=${t##*/}; fi
        done
        [ -n "$tid" ] || { echo "no oc-ship thread in $pid" >&2; exit 1; }
        ticks=$(awk '{print $14 + $15}' "/proc/$pid/task/$tid/stat")
        wchar=$(awk '/^wchar/ {print $2}' "/proc/$pid/task/$tid/io")
        bytes=$(curl -s http://127.0.0.1:7071/metrics | awk '/^oc_archive_uploaded_bytes_total/ {print $2}')
    fi
    kill "$pid"
    wait "$pid" || true
    pid=
    python3 - "$tag" "$((ticks * tick_ms))" "$bytes" "$wchar" "$OUT/http-$tag.json" <<'PY' | tee -a "$OUT/ship-cpu.txt"
import json, sys
tag, ms, uploaded, written = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
run = json.load(open(sys.argv[5]))
per_gb = f"{ms / (uploaded / 1e9):.0f}" if uploaded else "-"
print(f"{tag} ship_cpu_ms={ms} uploaded_bytes={uploaded:.0f} written_bytes={written} "
      f"ms_per_GB={per_gb} write_p99_ms={run['writes']['p99_us'] / 1000:.2f} "
      f"fsync_lag_p99_ms={run['fsync_lag_p99_ms']:.2f}")
PY
}
for round in $(seq "$ROUNDS"); do
    if [ "$NONE" = 1 ]; then run "none-$round" "$NEW" none; fi
    if [ $((round % 2)) = 1 ]; then
        run "old-$round" "$OLD"
        run "new-$round" "$NEW"
    else
        run "new-$round" "$NEW"
        run "old-$round" "$OLD"
    fi
done
