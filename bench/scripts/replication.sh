#!/usr/bin/env bash
# What replication costs a writer, and how long a failover takes, in one run.
#
# Part 1: oc-bench http against a writer alone, with an asynchronous follower, and with
# a synchronous one, in rounds of A B C, C B A, … so drift on a shared machine falls on
# every configuration alike. Writes <out>/repl-<config>-<round>.json, counts the writes
# the writer refused with 421 (a healthy writer fencing itself) and prints the medians.
# Part 2: RTO. A synchronous pair under load; kill -9 the writer, promote the follower,
# and time the first acknowledged write on it; TRIALS times (default 5).
# Part 3: planned switchover (below).
# Part 4: how long an acknowledged write takes to be readable on the follower (below).
# Part 5: write throughput at 64 concurrent writers, alone / async / sync (below).
# Part 6: a new follower's bootstrap, from the writer and from the archive (below).
# PARTS (default 123456) picks the parts to run, e.g. PARTS=3.
#
#   bench/scripts/replication.sh <dir on ext4/xfs> <out dir> [rate] [seconds]
set -euo pipefail
dir=${1:?a scratch directory on the data disk}
out=${2:?where the JSON results go}
rate=${3:-2000}
seconds=${4:-10}
bin=${OC_BIN:-target/release}
mkdir -p "$dir" "$out"

pids=()
trap 'for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done' EXIT

wait_ready() { # ops address
  for _ in $(seq 200); do curl -sf "$1/ready" >/dev/null && return 0; sleep 0.05; done
  echo "not ready: $1" >&2; return 1
}

start_pair() { # config data-prefix; sets writer_pid follower_pid
  local config=$1 data=$2
  local common=(--archive "file://$data/archive" --shards 1 --rate-limit-rps $((rate * 4))
                --rate-limit-burst $((rate * 4)))
  local writer_args=(--data-dir "$data/writer" --listen 127.0.0.1:17080
                     --ops-listen 127.0.0.1:17081 "${common[@]}")
  [ "$config" != alone ] && writer_args+=(--replication-listen 127.0.0.1:17082)
  [ "$config" = sync ] && writer_args+=(--sync-replication)
  "$bin/oc-server" "${writer_args[@]}" >"$data-writer.log" 2>&1 &
  writer_pid=$!; pids+=("$writer_pid")
  wait_ready http://127.0.0.1:17081
  follower_pid=
  if [ "$config" != alone ]; then
    "$bin/oc-server" --data-dir "$data/follower" --listen 127.0.0.1:17090 \
      --ops-listen 127.0.0.1:17091 --mode follower --leader-addr 127.0.0.1:17082 \
      "${common[@]}" >"$data-follower.log" 2>&1 &
    follower_pid=$!; pids+=("$follower_pid")
    wait_ready http://127.0.0.1:17091
  fi
}

stop_pair() {
  for p in $writer_pid $follower_pid; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
}

refused_421() { # ops address
  curl -s "$1/metrics" | awk '/^oc_http_requests_total\{.*status="421"/ { n += $2 } END { print n + 0 }'
}

parts=${PARTS:-123456}
rounds=${ROUNDS:-3}
[[ $parts == *1* ]] || rounds=0
for round in $(seq "$rounds"); do
  order="alone async sync"
  [ $((round % 2)) = 0 ] && order="sync async alone"
  for config in $order; do
    echo "== $config (round $round)"
    data="$dir/$config-$round"; rm -rf "$data"; mkdir -p "$data"
    start_pair "$config" "$data"
    "$bin/oc-bench" http --url http://127.0.0.1:17080 --rate "$rate" --seconds "$seconds" \
      --mix 50:50 --rows 20000 --json "$out/repl-$config-$round.json" >/dev/null
    refused_421 http://127.0.0.1:17081 > "$out/fenced-$config-$round.count"
    stop_pair
    rm -rf "$data"
  done
done

trials=${TRIALS:-5}
[[ $parts == *2* ]] || trials=0
: > "$out/rto.ms"
for trial in $(seq "$trials"); do
  echo "== failover (trial $trial)"
  data="$dir/rto-$trial"; rm -rf "$data"; mkdir -p "$data"
  start_pair sync "$data"
  "$bin/oc-bench" http --url http://127.0.0.1:17080 --rate "$rate" --seconds 30 \
    --mix 50:50 --rows 2000 >/dev/null 2>&1 &
  load=$!; pids+=("$load")
  sleep 5
  kill -9 "$writer_pid"
  killed=$(date +%s%N)
  curl -sf -X POST http://127.0.0.1:17091/v1/admin/promote > "$out/promote-$trial.json"
  # The first acknowledged write on the promoted follower (a new tenant: any write).
  until curl -sf -X POST -H 'content-type: application/json' \
      -d "{\"tenant\":\"rto$trial\"}" http://127.0.0.1:17090/v1/tenants >/dev/null; do
    sleep 0.001
  done
  written=$(date +%s%N)
  echo $(( (written - killed) / 1000000 )) >> "$out/rto.ms"
  kill -9 "$load" 2>/dev/null || true; wait "$load" 2>/dev/null || true
  kill "$follower_pid"; wait "$follower_pid" 2>/dev/null || true
  rm -rf "$data"
done

# Part 3: planned switchover. An asynchronous pair; a client writes one row at a time
# to the writer and, once refused (421) or cut off, to the follower; `oc-server
# switchover` runs meanwhile. The longest gap between two acknowledged writes is the
# write unavailability; SWITCHES times (default 10).
switches=${SWITCHES:-10}
[[ $parts == *3* ]] || switches=0
: > "$out/switchover.ms"
for trial in $(seq "$switches"); do
  echo "== switchover (trial $trial)"
  data="$dir/switch-$trial"; rm -rf "$data"; mkdir -p "$data"
  start_pair async "$data"
  curl -sf -X POST -H 'content-type: application/json' -d '{"tenant":"sw"}' \
    http://127.0.0.1:17080/v1/tenants >/dev/null
  curl -sf -X POST -H 'content-type: application/json' \
    -d '{"name":"items","columns":[{"name":"id","type":"int"}],"primary_key":["id"]}' \
    http://127.0.0.1:17080/v1/tenants/sw/tables >/dev/null
  python3 - "$out/switchover-$trial.gaps" <<'PY' &
import http.client, json, sys, time
targets = [("127.0.0.1", 17080), ("127.0.0.1", 17090)]
target, acks, deadline, i = 0, [], time.monotonic() + 3.0, 0
conn = http.client.HTTPConnection(*targets[target], timeout=5)
while time.monotonic() < deadline:
    i += 1
    body = json.dumps({"ops": [{"upsert": {"id": i}}]})
    try:
        conn.request("POST", "/v1/tenants/sw/tables/items/rows", body, {"content-type": "application/json"})
        r = conn.getresponse(); r.read()
        if r.status == 200:
            acks.append(time.monotonic())
            continue
        if r.status != 421:
            raise RuntimeError(f"status {r.status}")
    except (OSError, http.client.HTTPException):
        pass
    target = 1
    conn = http.client.HTTPConnection(*targets[target], timeout=5)
gaps = [b - a for a, b in zip(acks, acks[1:])]
open(sys.argv[1], "w").write(f"{max(gaps) * 1000:.1f} {len(acks)}\n")
PY
  client=$!
  sleep 1
  "$bin/oc-server" switchover --from 127.0.0.1:17081 --to 127.0.0.1:17091 \
    > "$out/switchover-$trial.txt"
  wait "$client"
  cut -d' ' -f1 "$out/switchover-$trial.gaps" >> "$out/switchover.ms"
  kill "$follower_pid"; wait "$follower_pid" 2>/dev/null || true
  kill -9 "$writer_pid" 2>/dev/null || true; wait "$writer_pid" 2>/dev/null || true
  rm -rf "$data"
done

# Part 4: visibility lag. A pair (asynchronous, then synchronous) under the Part 1 load
# on the writer; one client writes a row, then reads it from the follower with
# `min_lsn` = the LSN the write answered (the follower waits until it has applied it);
# the time from the write's answer to the read's is how long the follower lagged, plus
# one read's round trip, measured alone on the same connection (a row already there).
lag_samples=${LAG_SAMPLES:-1000}
[[ $parts == *4* ]] || lag_samples=0
for config in async sync; do
  [ "$lag_samples" = 0 ] && break
  echo "== visibility lag ($config)"
  data="$dir/lag-$config"; rm -rf "$data"; mkdir -p "$data"
  start_pair "$config" "$data"
  curl -sf -X POST -H 'content-type: application/json' -d '{"tenant":"lag"}' \
    http://127.0.0.1:17080/v1/tenants >/dev/null
  curl -sf -X POST -H 'content-type: application/json' \
    -d '{"name":"items","columns":[{"name":"id","type":"int"}],"primary_key":["id"]}' \
    http://127.0.0.1:17080/v1/tenants/lag/tables >/dev/null
  "$bin/oc-bench" http --url http://127.0.0.1:17080 --rate "$rate" --seconds 60 \
    --mix 50:50 --rows 20000 >/dev/null 2>&1 &
  load=$!; pids+=("$load")
  sleep 3
  python3 - "$lag_samples" "$out/lag-$config.json" <<'PY'
import http.client, json, sys, time
n, out = int(sys.argv[1]), sys.argv[2]
writer = http.client.HTTPConnection("127.0.0.1", 17080, timeout=10)
follower = http.client.HTTPConnection("127.0.0.1", 17090, timeout=10)
def call(conn, method, path, body=None):
    conn.request(method, path, body, {"content-type": "application/json"})
    r = conn.getresponse()
    return r.status, r.read()
lags, trips = [], []
for i in range(n):
    status, body = call(writer, "POST", "/v1/tenants/lag/tables/items/rows",
                        json.dumps({"ops": [{"upsert": {"id": i}}]}))
    assert status == 200, (status, body)
    acked = time.monotonic()
    status, body = call(follower, "GET", f"/v1/tenants/lag/tables/items/rows/{i}?min_lsn={json.loads(body)['lsn']}")
    assert status == 200, (status, body)
    seen = time.monotonic()
    status, _ = call(follower, "GET", f"/v1/tenants/lag/tables/items/rows/{i}")
    trips.append(time.monotonic() - seen)
    lags.append(seen - acked)
def q(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(p * len(v)))] * 1000
json.dump({"samples": n, "lag_ms": {"p50": q(lags, .5), "p99": q(lags, .99), "max": q(lags, 1)},
           "read_ms": {"p50": q(trips, .5), "p99": q(trips, .99)}}, open(out, "w"))
PY
  kill -9 "$load" 2>/dev/null || true; wait "$load" 2>/dev/null || true
  stop_pair
  rm -rf "$data"
done

# Part 5: throughput. 64 keep-alive connections each keep one single-row write in
# flight, offered above what each configuration absorbs (TP_RATES; the generator
# sends its whole schedule, so an offer far above capacity only makes the run long),
# in rounds of A B C, C B A, ...; the writes answered per second. A rate answered
# below 95% of the offer is saturated (the summary says which are not).
rounds5=${ROUNDS5:-3}
[[ $parts == *5* ]] || rounds5=0
for round in $(seq "$rounds5"); do
  order="alone async sync"
  [ $((round % 2)) = 0 ] && order="sync async alone"
  for config in $order; do
    echo "== throughput $config (round $round)"
    data="$dir/tp-$config-$round"; rm -rf "$data"; mkdir -p "$data"
    start_pair "$config" "$data"
    offer=$(tr ' ' '\n' <<< "${TP_RATES:-alone:24000 async:24000 sync:12000}" | sed -n "s/^$config://p")
    "$bin/oc-bench" http --url http://127.0.0.1:17080 --rate "$offer" --seconds 5 \
      --mix 0:100 --connections 64 --rows 20000 --json "$out/tp-$config-$round.json" >/dev/null
    stop_pair
    rm -rf "$data"
  done
done

# Part 6: a new follower's bootstrap. A writer (1 shard) is loaded with BOOT_ROWS rows
# and left idle until its newest checkpoint holds them all and the archive has it;
# then, in rounds alternating the order, a follower starts on an empty directory and
# copies the checkpoint from the writer ("writer"), or starts on a directory restored
# from the archive with `oc-pitr restore --for-follower` ("archive", the restore
# counted in). Each time is from the start (of the restore, or the server) to the
# follower's /ready answering 200. The raw copy of the same snapshot file (cp, then
# sync) is the floor, measured in the same round.
boot_rounds=${BOOT_ROUNDS:-3}
[[ $parts == *6* ]] || boot_rounds=0
if [ "$boot_rounds" != 0 ]; then
  echo "== bootstrap: loading ${BOOT_ROWS:-1000000} rows"
  data="$dir/boot"; rm -rf "$data"; mkdir -p "$data"
  "$bin/oc-server" --data-dir "$data/writer" --listen 127.0.0.1:17080 --ops-listen 127.0.0.1:17081 \
    --archive "file://$data/archive" --shards 1 --replication-listen 127.0.0.1:17082 \
    --checkpoint-interval-s 1 >"$data-writer.log" 2>&1 &
  writer_pid=$!; pids+=("$writer_pid")
  wait_ready http://127.0.0.1:17081
  "$bin/oc-bench" http --url http://127.0.0.1:17080 --rate 100 --seconds 1 --mix 100:0 \
    --rows "${BOOT_ROWS:-1000000}" >/dev/null
  until curl -s http://127.0.0.1:17081/metrics | grep -q '^oc_checkpoint_age_s{shard="0"} 0$' \
      && ls "$data"/archive/shard-0/checkpoint/*.snap >/dev/null 2>&1; do sleep 0.5; done
  sleep 2
  snap=$(ls -t "$data"/writer/shard-0/checkpoint-*.snap | head -1)
  : > "$out/bootstrap.txt"
  ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
  for round in $(seq "$boot_rounds"); do
    order="writer archive raw"
    [ $((round % 2)) = 0 ] && order="raw archive writer"
    for how in $order; do
      rm -rf "$data/f" "$data/raw"; sync
      echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
      started=$(date +%s%N)
      if [ "$how" = raw ]; then
        mkdir -p "$data/raw"; cp "$snap" "$data/raw/"; sync -f "$data/raw"
      else
        if [ "$how" = archive ]; then
          "$bin/oc-pitr" restore --archive "file://$data/archive" --target latest \
            --data-dir "$data/f" --for-follower >/dev/null
        fi
        "$bin/oc-server" --data-dir "$data/f" --listen 127.0.0.1:17090 --ops-listen 127.0.0.1:17091 \
          --mode follower --leader-addr 127.0.0.1:17082 --archive "file://$data/archive" \
          >"$data-follower.log" 2>&1 &
        follower_pid=$!; pids+=("$follower_pid")
        for _ in $(seq 6000); do curl -sf http://127.0.0.1:17091/ready >/dev/null && break; sleep 0.01; done
      fi
      took=$(ms "$started")
      copied=$(grep -o 'bytes=[0-9]* took_ms=[0-9]*' "$data-follower.log" 2>/dev/null | tail -1 || true)
      [ "$how" = raw ] && copied="bytes=$(stat -c %s "$snap")"
      echo "$round $how $took $copied" | tee -a "$out/bootstrap.txt"
      if [ "$how" != raw ]; then kill "$follower_pid"; wait "$follower_pid" 2>/dev/null || true; fi
    done
  done
  kill "$writer_pid"; wait "$writer_pid" 2>/dev/null || true
  rm -rf "$data"
fi

python3 - "$out" "$rounds" "$rounds5" <<'PY'
import json, sys, statistics
out, rounds, rounds5 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def runs(config, op, q):
    return [json.load(open(f"{out}/repl-{config}-{r}.json"))[op][q] / 1000 for r in range(1, rounds + 1)]
def med(config, op, q):
    return statistics.median(runs(config, op, q))
def spread(config, op, q):
    v = runs(config, op, q)
    return f"{min(v):.2f}–{max(v):.2f}"
if rounds:
  print("| config | write p50 ms | write p99 ms (min–max) | write p99 vs alone | read p99 ms | 421s (self-fencing) |")
  print("|---|---:|---|---:|---:|---:|")
  for c in ["alone", "async", "sync"]:
    fenced = sum(int(open(f"{out}/fenced-{c}-{r}.count").read()) for r in range(1, rounds + 1))
    print(f"| {c} | {med(c,'writes','p50_us'):.2f} | {med(c,'writes','p99_us'):.2f} ({spread(c,'writes','p99_us')}) "
          f"| {med(c,'writes','p99_us')/med('alone','writes','p99_us'):.2f}× | {med(c,'reads','p99_us'):.2f} | {fenced} |")
rto = [int(l) for l in open(f"{out}/rto.ms") if l.strip()]
if rto:
  print(f"\nRTO (kill -9 of the writer to the first write acknowledged by the promoted follower), "
        f"{len(rto)} trials: median {statistics.median(rto)} ms, min {min(rto)}, max {max(rto)}")
  for t in range(1, len(rto) + 1):
    p = json.load(open(f"{out}/promote-{t}.json"))
    print(f"  trial {t}: promotion {p['took_ms']} ms, RTO {rto[t-1]} ms")
import os
for c in ["async", "sync"]:
  if os.path.exists(f"{out}/lag-{c}.json"):
    l = json.load(open(f"{out}/lag-{c}.json"))
    print(f"\nVisibility lag, {c}, {l['samples']} writes: write answered → read with min_lsn answered "
          f"p50 {l['lag_ms']['p50']:.2f} ms, p99 {l['lag_ms']['p99']:.2f} ms, max {l['lag_ms']['max']:.2f} ms "
          f"(a read alone: p50 {l['read_ms']['p50']:.2f} ms, p99 {l['read_ms']['p99']:.2f} ms)")
if rounds5:
  tp = {c: [json.load(open(f"{out}/tp-{c}-{r}.json")) for r in range(1, rounds5 + 1)] for c in ["alone", "async", "sync"]}
  rate = {c: statistics.median(j["achieved_rate"] for j in tp[c]) for c in tp}
  print("\n| 64 writers | writes/s (median) | min–max | vs alone | offered | saturated | errors |")
  print("|---|---:|---|---:|---:|---|---:|")
  for c in tp:
    v = [j["achieved_rate"] for j in tp[c]]
    offered = tp[c][0]["offered_rate"]
    saturated = all(j["achieved_rate"] < 0.95 * j["offered_rate"] for j in tp[c])
    errors = sum(j["writes"]["errors"] for j in tp[c])
    print(f"| {c} | {rate[c]:.0f} | {min(v):.0f}–{max(v):.0f} | {rate[c]/rate['alone']:.2f}× | {offered} | {'yes' if saturated else 'NO'} | {errors} |")
sw = sorted(float(l) for l in open(f"{out}/switchover.ms") if l.strip())
if sw:
  print(f"\nSwitchover: longest gap between acknowledged writes, {len(sw)} trials: "
        f"median {statistics.median(sw):.1f} ms, max {max(sw):.1f} ms")
if os.path.exists(f"{out}/bootstrap.txt"):
  lines = [l.split() for l in open(f"{out}/bootstrap.txt") if l.strip()]
  print("\nA new follower's bootstrap, start to /ready (ms), median (min–max) of the rounds:")
  for how in ["writer", "archive", "raw"]:
    v = [int(l[2]) for l in lines if l[1] == how]
    if v:
      print(f"  {how}: {statistics.median(v)} ({min(v)}–{max(v)})")
PY
