#!/usr/bin/env bash
# The cost of an API key and of TLS on the HTTP path, in one run: oc-bench http against
# four fresh servers (plain; admin token with the load on an API key; TLS; TLS with an
# API key), in rounds of A B C D, D C B A, … so drift on a shared machine falls on
# every configuration alike. Writes <out>/http-<config>-<round>.json and prints the
# medians and their ratios to plain. ROUNDS (default 3) sets the number of rounds.
#
#   bench/scripts/http-auth-tls.sh <dir on ext4/xfs> <out dir> [rate] [seconds]
set -euo pipefail
dir=${1:?a scratch directory on the data disk}
out=${2:?where the JSON results go}
rate=${3:-5000}
seconds=${4:-10}
bin=${OC_BIN:-target/release}
mkdir -p "$dir" "$out"

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 -addext basicConstraints=critical,CA:FALSE \
  -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null
printf 'bench-admin-token-0123456789abcdef' > "$dir/admin-token"

server_pid=
trap '[ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null' EXIT

run() { # config round
  local config=$1 round=$2 data="$dir/data-$1-$2" scheme=http
  local server_args=(--data-dir "$data" --listen 127.0.0.1:17080 --ops-listen 127.0.0.1:17081
                     --archive none --rate-limit-rps $((rate * 4)) --rate-limit-burst $((rate * 4)))
  local bench_args=()
  case $config in
    auth|tls-auth) server_args+=(--admin-token-file "$dir/admin-token")
                   bench_args+=(--admin-token-file "$dir/admin-token") ;;
  esac
  case $config in
    tls|tls-auth) server_args+=(--tls-cert "$dir/cert.pem" --tls-key "$dir/key.pem")
                  bench_args+=(--ca-cert "$dir/cert.pem"); scheme=https ;;
  esac
  rm -rf "$data"
  "$bin/oc-server" "${server_args[@]}" >"$dir/server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 100); do curl -sf 127.0.0.1:17081/ready >/dev/null && break; sleep 0.1; done
  "$bin/oc-bench" http --url "$scheme://127.0.0.1:17080" --rate "$rate" --seconds "$seconds" \
    --rows 20000 "${bench_args[@]}" --json "$out/http-$config-$round.json" >/dev/null
  # The server's CPU time over the whole run (user + system clock ticks): steadier on a
  # shared machine than latency, which the neighbours' load moves.
  awk '{ print $14 + $15 }' "/proc/$server_pid/stat" > "$out/cpu-$config-$round.ticks"
  kill "$server_pid"; wait "$server_pid" || true
  server_pid=
  rm -rf "$data"
}

rounds=${ROUNDS:-3}
for round in $(seq "$rounds"); do
  order="plain auth tls tls-auth"
  [ $((round % 2)) = 0 ] && order="tls-auth tls auth plain"
  for config in $order; do
    echo "== $config (round $round)"
    run "$config" "$round"
  done
done

python3 - "$out" "$rounds" <<'PY'
import json, sys, statistics
out, rounds = sys.argv[1], int(sys.argv[2])
# The median over rounds: one disturbed round on a shared machine does not move it.
def p(config, op, q):
    return statistics.median(json.load(open(f"{out}/http-{config}-{r}.json"))[op][q] for r in range(1, rounds + 1))
import os
tick = os.sysconf("SC_CLK_TCK")
def cpu(config):
    return statistics.median(int(open(f"{out}/cpu-{config}-{r}.ticks").read()) / tick for r in range(1, rounds + 1))
def spread(config, op, q):
    v = [json.load(open(f"{out}/http-{config}-{r}.json"))[op][q] / 1000 for r in range(1, rounds + 1)]
    return f"{min(v):.1f}–{max(v):.1f}"
print("| config | server CPU s | vs plain | read p50 ms | read p99 ms (min–max) | vs plain | write p50 ms | write p99 ms (min–max) | vs plain |")
print("|---|---:|---:|---:|---|---:|---:|---|---:|")
for c in ["plain", "auth", "tls", "tls-auth"]:
    print(f"| {c} | {cpu(c):.2f} | {cpu(c)/cpu('plain'):.2f}× "
          f"| {p(c,'reads','p50_us')/1000:.2f} | {p(c,'reads','p99_us')/1000:.2f} ({spread(c,'reads','p99_us')}) | {p(c,'reads','p99_us')/p('plain','reads','p99_us'):.2f}× "
          f"| {p(c,'writes','p50_us')/1000:.2f} | {p(c,'writes','p99_us')/1000:.2f} ({spread(c,'writes','p99_us')}) | {p(c,'writes','p99_us')/p('plain','writes','p99_us'):.2f}× |")
PY
