#!/usr/bin/env bash
# The shipping thread's CPU per archived byte (BENCHMARKS.md, "Fewer copies of each
# archived byte"): OLD and NEW are directories holding an oc-server and an oc-bench;
# each round runs both (the order flipped every round) against a local archive under
# the same open-loop load of single-row writes (`oc-bench http --mix 0:100`), then
# reads the `oc-ship` thread's user + system time from /proc and the bytes it
# uploaded from /metrics. DIR must be on a disk file system (not tmpfs).
set -euo pipefail
OLD=${OLD:?directory of the build before the change}
NEW=${NEW:?directory of the build after it}
DIR=${DIR:-/var/tmp/oc-ship-cpu}
OUT=${OUT:-docs/bench/ship-copies}
ROUNDS=${ROUNDS:-3}
RATE=${RATE:-8000}
SECONDS_EACH=${SECONDS_EACH:-15}
mkdir -p "$OUT"
tick_ms=$((1000 / $(getconf CLK_TCK)))
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; true' EXIT
run() { # tag bin_dir
    local tag=$1 bin=$2 tid= ticks bytes
    rm -rf "$DIR"
    mkdir -p "$DIR"
    "$bin/oc-server" --data-dir "$DIR/data" --listen 127.0.0.1:7070 \
        --ops-listen 127.0.0.1:7071 --archive "file://$DIR/archive" >"$DIR.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do
        kill -0 "$pid" || { echo "oc-server exited: see $DIR.log" >&2; exit 1; }
        curl -sf http://127.0.0.1:7071/ready >/dev/null && break
        sleep 0.1
    done
    curl -sf http://127.0.0.1:7071/ready >/dev/null || { echo "oc-server never ready" >&2; exit 1; }
    "$bin/oc-bench" http --url http://127.0.0.1:7070 --mix 0:100 --rate "$RATE" \
        --seconds "$SECONDS_EACH" --no-floor --json "$OUT/http-$tag.json" >/dev/null 2>"$DIR.bench.log"
    sleep 1
    for t in /proc/$pid/task/*; do
        if [ "$(cat "$t/comm")" = oc-ship ]; then tid=${t##*/}; fi
    done
    [ -n "$tid" ] || { echo "no oc-ship thread in $pid" >&2; exit 1; }
    ticks=$(awk '{print $14 + $15}' "/proc/$pid/task/$tid/stat")
    bytes=$(curl -s http://127.0.0.1:7071/metrics | awk '/^oc_archive_uploaded_bytes_total/ {print $2}')
    kill "$pid"
    wait "$pid" || true
    pid=
    python3 - "$tag" "$((ticks * tick_ms))" "$bytes" <<'PY' | tee -a "$OUT/ship-cpu.txt"
import sys
tag, ms, uploaded = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
print(f"{tag} ship_cpu_ms={ms} uploaded_bytes={uploaded:.0f} ms_per_GB={ms / (uploaded / 1e9):.0f}")
PY
}
for round in $(seq "$ROUNDS"); do
    if [ $((round % 2)) = 1 ]; then
        run "old-$round" "$OLD"
        run "new-$round" "$NEW"
    else
        run "new-$round" "$NEW"
        run "old-$round" "$OLD"
    fi
done
