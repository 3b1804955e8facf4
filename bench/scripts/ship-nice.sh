#!/usr/bin/env bash
# Shipping's cost on the pinned server's tails, two server builds alternated
# (BENCHMARKS.md, "Shipping at nice 19"): OLD and NEW are oc-server binaries; each
# round runs both with a local archive (the order flipped every round) and NEW with
# `--archive none`. 1 shard on CPU 0, the generator on CPU 1, 10,000 req/s 90:10.
set -euo pipefail
BIN=${BIN:-target/release}
OLD=${OLD:?path of the oc-server built before the change}
NEW=${NEW:-$BIN/oc-server}
DIR=${DIR:-/tmp/oc-ship-nice}
OUT=${OUT:-docs/bench/ship-nice}
ROUNDS=${ROUNDS:-6}
mkdir -p "$OUT"
run() { # name round server args...
    local name=$1 round=$2 server=$3
    shift 3
    rm -rf "$DIR" "$DIR-archive"
    mkdir -p "$DIR"
    taskset -c 0 "$server" --data-dir "$DIR/data" --listen 127.0.0.1:7070 \
        --ops-listen 127.0.0.1:7071 --shards 1 "$@" >"$DIR.log" 2>&1 &
    local pid=$!
    for _ in $(seq 100); do
        curl -sf http://127.0.0.1:7071/ready >/dev/null && break
        sleep 0.1
    done
    "$BIN/oc-bench" http --client-cpus 1 --url http://127.0.0.1:7070 --rate 10000 \
        --seconds 10 --mix 90:10 --metrics-url http://127.0.0.1:7071 \
        --json "$OUT/$name-$round.json" >/dev/null 2>&1
    kill -TERM "$pid"
    wait "$pid" || true
    echo "$name $round $(date +%T)" >&2
}
for round in $(seq "$ROUNDS"); do
    if [ $((round % 2)) = 1 ]; then order="old new"; else order="new old"; fi
    for which in $order; do
        if [ "$which" = old ]; then server=$OLD; else server=$NEW; fi
        run "$which" "$round" "$server" --archive "file://$DIR-archive"
    done
    run none "$round" "$NEW" --archive none
done
