#!/bin/bash
# Alternated pairs of `oc-bench http --rate 10000 --seconds 10 --mix 90:10` against two
# builds of oc-server on their defaults (2 shards, a local archive), server and
# generator on CPUs 0,1, the order flipped each pair.
# usage: [FIRST=n] http_pairs.sh OLD_BIN_DIR NEW_BIN_DIR OUT_DIR PAIRS
set -u
OLD=$1; NEW=$2; OUT=$3; PAIRS=$4
mkdir -p "$OUT"
run() { # name bin_dir
  local name=$1 bin=$2 dir
  dir=$(mktemp -d)
  taskset -c 0,1 "$bin/oc-server" --data-dir "$dir/data" --listen 127.0.0.1:23000 \
    --ops-listen 127.0.0.1:23001 > "$dir/server.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 100); do curl -sf 127.0.0.1:23001/ready > /dev/null && break; sleep 0.2; done
  "$NEW/oc-bench" http --url http://127.0.0.1:23000 --rate 10000 --seconds 10 --mix 90:10 \
    --client-cpus 0,1 --metrics-url http://127.0.0.1:23001 --json "$OUT/$name.json" \
    > "$OUT/$name.out" 2>&1
  kill "$pid"; wait "$pid" 2> /dev/null
  rm -rf "$dir"
}
for p in $(seq "${FIRST:-1}" "$PAIRS"); do
  if [ $((p % 2)) -eq 1 ]; then run "old-$p" "$OLD"; run "new-$p" "$NEW"
  else run "new-$p" "$NEW"; run "old-$p" "$OLD"; fi
done
