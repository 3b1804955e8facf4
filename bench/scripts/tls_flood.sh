#!/bin/bash
# One TLS handshake flood run against a fresh 2-shard oc-server (tls_flood.py: 2
# processes x 32 threads for 8 s, probes on tenants tp0 and tp1).
# usage: tls_flood.sh BIN_DIR RSA_BITS LABEL WORK_DIR
set -u
BIN=$1; BITS=$2; LABEL=$3; WORK=$4
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$WORK"
[ -f "$WORK/cert$BITS.pem" ] || openssl req -x509 -newkey "rsa:$BITS" -nodes \
  -keyout "$WORK/key$BITS.pem" -out "$WORK/cert$BITS.pem" -days 2 -subj /CN=localhost 2> /dev/null
[ -f "$WORK/token" ] || head -c 32 /dev/urandom | xxd -p -c 64 > "$WORK/token"
rm -rf "$WORK/data"
"$BIN/oc-server" --data-dir "$WORK/data" --listen 127.0.0.1:23100 --ops-listen 127.0.0.1:23101 \
  --archive none --admin-token-file "$WORK/token" --no-pin --shards 2 \
  --tls-cert "$WORK/cert$BITS.pem" --tls-key "$WORK/key$BITS.pem" > "$WORK/server.log" 2>&1 &
PID=$!
for _ in $(seq 1 100); do curl -sf -o /dev/null http://127.0.0.1:23101/ready && break; sleep 0.1; done
AUTH="authorization: Bearer $(cat "$WORK/token")"
for t in tp0 tp1; do
  curl -sk -H "$AUTH" -H 'content-type: application/json' https://127.0.0.1:23100/v1/tenants \
    -d "{\"tenant\":\"$t\"}" > /dev/null
  curl -sk -H "$AUTH" -H 'content-type: application/json' "https://127.0.0.1:23100/v1/tenants/$t/tables" \
    -d '{"name":"p","columns":[{"name":"id","type":"int"}],"primary_key":["id"]}' > /dev/null
  curl -sk -H "$AUTH" -H 'content-type: application/json' "https://127.0.0.1:23100/v1/tenants/$t/tables/p/rows" \
    -d '{"ops":[{"upsert":{"id":1}}]}' > /dev/null
done
echo "== $LABEL RSA-$BITS"
python3 "$HERE/tls_flood.py" 23100 "$WORK/token" 2 32 8
kill "$PID"; wait "$PID" 2> /dev/null
