"""Pathological LIKE against a real oc-server: how long the query holds its shard, and
what a point read of another tenant on the same shard waits meanwhile.

Usage: python3 tools/hostile_like.py <path to oc-server> <pattern characters> [queries]
(docs/BENCHMARKS.md, "Hardening"); `queries` long queries run at once (default 1). Starts the server on a fresh temporary data
directory with one shard and no archive, and stops it at the end."""
import json, shutil, subprocess, sys, tempfile, threading, time, urllib.request, urllib.error

server_bin, pattern_len = sys.argv[1], int(sys.argv[2])
queries = int(sys.argv[3]) if len(sys.argv) > 3 else 1
workdir = tempfile.mkdtemp(prefix="oc-hostile-like-")
data = workdir + "/data"
proc = subprocess.Popen([server_bin, "--data-dir", data, "--listen", "127.0.0.1:0",
                         "--ops-listen", "127.0.0.1:0", "--shards", "1", "--archive", "none",
                         "--no-pin"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
api = None
for line in proc.stdout:
    if line.startswith("oc-server: api listening on "):
        api = "http://" + line.split()[4]
        break

def call(method, path, body=None):
    req = urllib.request.Request(api + path, method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            status = r.status; r.read()
    except urllib.error.HTTPError as e:
        status = e.code; e.read()
    return status, time.perf_counter() - t

for t in ["big", "small"]:
    call("POST", "/v1/tenants", {"tenant": t})
    call("POST", f"/v1/tenants/{t}/tables", {"name": "docs", "columns": [
        {"name": "id", "type": "int"}, {"name": "body", "type": "text"}], "primary_key": ["id"]})
for start in range(0, 1000, 50):
    ops = [{"upsert": {"id": i, "body": "a" * 10000}} for i in range(start, start + 50)]
    call("POST", "/v1/tenants/big/tables/docs/rows", {"ops": ops})
call("POST", "/v1/tenants/small/tables/docs/rows", {"ops": [{"upsert": {"id": 0, "body": "x"}}]})
pattern = "%" + ("a_" * ((pattern_len - 2) // 2)) + "b"
results = []
def slow():
    results.append(call("POST", "/v1/tenants/big/ask",
                        {"sql": "SELECT COUNT(*) FROM docs WHERE body LIKE $1", "params": [pattern]}))
threads = [threading.Thread(target=slow) for _ in range(queries)]
for th in threads:
    th.start()
time.sleep(0.05)
reads = []
while any(th.is_alive() for th in threads):
    reads.append(call("GET", "/v1/tenants/small/tables/docs/rows/0")[1])
    time.sleep(0.01)
for th in threads:
    th.join()
proc.terminate(); proc.wait()
shutil.rmtree(workdir, ignore_errors=True)
status, secs = max(results, key=lambda r: r[1])
reads.sort()
print(json.dumps({"pattern_chars": pattern_len, "queries": queries,
                  "query_status": sorted(r[0] for r in results), "query_s": round(secs, 3),
                  "neighbour_reads": len(reads),
                  "neighbour_read_max_ms": round(1e3 * reads[-1], 1) if reads else None,
                  "neighbour_read_p50_ms": round(1e3 * reads[len(reads)//2], 1) if reads else None}))
