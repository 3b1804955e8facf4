# Victim point reads on the shard of a tenant whose /ask rows are costly (LIKE over 250 KB text).
# usage: like_neighbour.py BINDIR PORT K NLIKES PATTERN  -> one JSON line
# BINDIR holds oc-server (a release build); PORT and PORT+1 must be free.
import sys, json, http.client, time, threading, subprocess, tempfile, os, shutil
B, P, K, N, PAT = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
d = tempfile.mkdtemp(prefix="like-neighbour-")
srv = subprocess.Popen([B + "/oc-server", "--data-dir", d + "/data", "--listen", "127.0.0.1:%d" % P,
                        "--ops-listen", "127.0.0.1:%d" % (P + 1), "--archive", "none", "--shards", "1"],
                       stdout=subprocess.DEVNULL, stderr=open(d + "/stderr", "w"))
def req(m, path, body=None):
    c = http.client.HTTPConnection("127.0.0.1", P, timeout=60)
    c.request(m, path, body=json.dumps(body) if body is not None else None, headers={"content-type": "application/json"})
    r = c.getresponse(); data = r.read(); return r.status, data
for _ in range(100):
    try:
        if req("GET", "/v1/ping")[0] in (200, 404): break
    except OSError: time.sleep(0.1)
for t in ("hog", "victim"): req("POST", "/v1/tenants", {"tenant": t})
req("POST", "/v1/tenants/hog/tables", {"name": "t", "columns": [{"name": "id", "type": "int"}, {"name": "s", "type": "text"}], "primary_key": ["id"]})
req("POST", "/v1/tenants/victim/tables", {"name": "t", "columns": [{"name": "id", "type": "int"}], "primary_key": ["id"]})
req("POST", "/v1/tenants/victim/tables/t/rows", {"ops": [{"upsert": {"id": 5}}]})
txt = "ab" * 124999 + "zz"
for i in range(100): req("POST", "/v1/tenants/hog/tables/t/rows", {"ops": [{"upsert": {"id": i, "s": txt}}]})
Q = "SELECT COUNT(*) FROM t WHERE " + " AND ".join(["s LIKE '%s'" % PAT] * N)
stop = False; statuses = []; qtimes = []
def hog():
    while not stop:
        t = time.time(); s, _ = req("POST", "/v1/tenants/hog/ask", {"sql": Q}); statuses.append(s); qtimes.append(time.time() - t)
ths = [threading.Thread(target=hog) for _ in range(K)]
for t in ths: t.start()
time.sleep(0.5)
lat = []; end = time.time() + 6; c = http.client.HTTPConnection("127.0.0.1", P, timeout=60)
while time.time() < end:
    t = time.time(); c.request("GET", "/v1/tenants/victim/tables/t/rows/5"); r = c.getresponse(); r.read(); lat.append(time.time() - t); time.sleep(0.005)
stop = True
for t in ths: t.join()
srv.terminate(); srv.wait(); shutil.rmtree(d)
lat.sort(); q = sorted(qtimes)
pct = lambda a, p: a[min(len(a) - 1, int(len(a) * p))] * 1e3
print(json.dumps({"bin": B, "k": K, "likes": N, "pattern": PAT, "reads": len(lat), "p50_ms": round(pct(lat, .5), 2),
                  "p99_ms": round(pct(lat, .99), 2), "max_ms": round(lat[-1] * 1e3, 1), "queries": len(q),
                  "query_p50_ms": round(pct(q, .5), 1), "statuses": sorted(set(statuses))}))
