#!/usr/bin/env bash
# diskio.sh TAG ARCHIVE: one oc-server ($SERVER, --archive ARCHIVE) under 8,000 single-row
# writes/s for 15 s; prints the block device's /proc/diskstats deltas ($DEV) with the
# run's write p99 and the log's fsync-lag p99.
tag=$1; arch=$2; D=/var/tmp/oc-diskio
rm -rf $D; mkdir -p $D
${SERVER:?the oc-server binary} --data-dir $D/data --listen 127.0.0.1:7070 --ops-listen 127.0.0.1:7071 --archive "$arch" > $D.log 2>&1 &
pid=$!
for i in $(seq 100); do curl -sf http://127.0.0.1:7071/ready >/dev/null && break; sleep 0.1; done
a=$(awk -v dev="${DEV:?the block device, e.g. nvme0n1}" '$3==dev' /proc/diskstats)
${BENCH:-oc-bench} http --url http://127.0.0.1:7070 --mix 0:100 --rate 8000 --seconds 15 --no-floor --metrics-url http://127.0.0.1:7071 --json ${OUT:-.}/diskio-$tag.json > /dev/null 2>&1
b=$(awk -v dev="${DEV:?the block device, e.g. nvme0n1}" '$3==dev' /proc/diskstats)
kill $pid; wait $pid
python3 - "$tag" "$a" "$b" "${OUT:-.}/diskio-$tag.json" <<'PY'
import sys,json
tag=sys.argv[1]; a=list(map(int,sys.argv[2].split()[3:])); b=list(map(int,sys.argv[3].split()[3:]))
d=[y-x for x,y in zip(a,b)]
# fields: reads, rmerged, rsect, rms, writes, wmerged, wsect, wms, inflight, ioms, weighted, discards, dmerged, dsect, dms, flushes, flushms
j=json.load(open(sys.argv[4]))
print(f"{tag}: reads={d[0]} read_MB={d[2]*512/1e6:.1f} writes={d[4]} write_MB={d[6]*512/1e6:.1f} flushes={d[15] if len(d)>15 else '?'} flush_ms={d[16] if len(d)>16 else '?'} write_p99_ms={j['writes']['p99_us']/1000:.2f} fsync_p99={j['fsync_lag_p99_ms']:.2f}")
PY
