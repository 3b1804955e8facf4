# A neighbour tenant's point reads while another tenant of the same shard runs costly
# /ask work. usage: neighbour_stalls.py BINDIR PORT SCENARIO... -> one JSON line each
#   scans64  64 concurrent scans of 300k rows (40 additions a row)
#   groups   one GROUP BY over 300k groups, ORDER BY ... LIMIT 5 OFFSET 1000, in a loop
#   vectors  one SELECT of 1,000 rows of vector(1024) (about 20 MB of JSON), in a loop
#   offset4  4 concurrent ORDER BY f LIMIT 100 OFFSET 150000 over 300k rows
#   in4096   4 concurrent COUNT(*) WHERE g IN (4,096 values) over 300k rows
# BINDIR holds oc-server (a release build); PORT and PORT+1 must be free. The probe
# runs in its own process (a thread would share the load generator's interpreter lock).
import json, http.client, multiprocessing, os, random, shutil, subprocess, sys, tempfile, threading, time

B, P, SCENARIOS = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
ROWS, WINDOW_S = 300_000, 6


def req(method, path, body=None, timeout=120):
    c = http.client.HTTPConnection("127.0.0.1", P, timeout=timeout)
    c.request(method, path, body=json.dumps(body) if body is not None else None,
              headers={"content-type": "application/json"})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data


def probe(seconds, out):
    lat, errors = [], 0
    c = http.client.HTTPConnection("127.0.0.1", P, timeout=60)
    end = time.time() + seconds
    while time.time() < end:
        t = time.time()
        try:
            c.request("GET", "/v1/tenants/victim/tables/t/rows/5")
            r = c.getresponse()
            r.read()
            errors += r.status != 200
        except OSError:
            errors += 1
            c = http.client.HTTPConnection("127.0.0.1", P, timeout=60)
        lat.append(time.time() - t)
        time.sleep(0.002)
    out.put((lat, errors))


def load():
    for t in ("hog", "victim"):
        req("POST", "/v1/tenants", {"tenant": t})
    req("POST", "/v1/tenants/victim/tables",
        {"name": "t", "columns": [{"name": "id", "type": "int"}], "primary_key": ["id"]})
    req("POST", "/v1/tenants/victim/tables/t/rows", {"ops": [{"upsert": {"id": 5}}]})
    req("POST", "/v1/tenants/hog/tables",
        {"name": "big", "columns": [{"name": "id", "type": "int"}, {"name": "g", "type": "int"},
                                    {"name": "f", "type": "float"}], "primary_key": ["id"]})
    for first in range(0, ROWS, 1000):
        ops = [{"upsert": {"id": i, "g": i, "f": random.random()}} for i in range(first, first + 1000)]
        assert req("POST", "/v1/tenants/hog/tables/big/rows", {"ops": ops})[0] == 200
    req("POST", "/v1/tenants/hog/tables",
        {"name": "vv", "columns": [{"name": "id", "type": "int"}, {"name": "v", "type": "vector(1024)"}],
         "primary_key": ["id"]})
    for first in range(0, 1000, 50):
        ops = [{"upsert": {"id": i, "v": [random.random() for _ in range(1024)]}} for i in range(first, first + 50)]
        assert req("POST", "/v1/tenants/hog/tables/vv/rows", {"ops": ops})[0] == 200


QUERIES = {
    "scans64": (64, "SELECT COUNT(*) FROM big WHERE " + " + ".join(["f"] * 40) + " > 1000"),
    "groups": (1, "SELECT g, COUNT(*) FROM big GROUP BY g ORDER BY g DESC LIMIT 5 OFFSET 1000"),
    "vectors": (1, "SELECT v FROM vv LIMIT 1000"),
    "offset4": (4, "SELECT id, f FROM big ORDER BY f LIMIT 100 OFFSET 150000"),
    "in4096": (4, "SELECT COUNT(*) FROM big WHERE g IN (%s)"
               % ", ".join(str(v) for v in random.Random(7).sample(range(2 * ROWS), 4096))),
}


def run(scenario):
    threads, sql = QUERIES[scenario]
    stop, statuses, qtimes = False, [], []

    def hog():
        while not stop:
            t = time.time()
            s, _ = req("POST", "/v1/tenants/hog/ask", {"sql": sql})
            statuses.append(s)
            qtimes.append(time.time() - t)

    hogs = [threading.Thread(target=hog) for _ in range(threads)]
    for h in hogs:
        h.start()
    time.sleep(0.5)
    out = multiprocessing.Queue()
    p = multiprocessing.Process(target=probe, args=(WINDOW_S, out))
    p.start()
    lat, errors = out.get()
    p.join()
    stop = True
    for h in hogs:
        h.join()
    lat.sort()
    q = sorted(qtimes)
    pct = lambda a, f: a[min(len(a) - 1, int(len(a) * f))] * 1e3
    return {"bin": B, "scenario": scenario, "reads": len(lat), "errors": errors,
            "p50_ms": round(pct(lat, .5), 2), "p99_ms": round(pct(lat, .99), 2),
            "max_ms": round(lat[-1] * 1e3, 1), "queries": len(q),
            "query_p50_ms": round(pct(q, .5), 1) if q else None, "statuses": sorted(set(statuses))}


d = tempfile.mkdtemp(prefix="neighbour-stalls-")
srv = subprocess.Popen([B + "/oc-server", "--data-dir", d + "/data", "--listen", "127.0.0.1:%d" % P,
                        "--ops-listen", "127.0.0.1:%d" % (P + 1), "--archive", "none", "--shards", "1"],
                       stdout=subprocess.DEVNULL, stderr=open(d + "/stderr", "w"))
try:
    for _ in range(100):
        try:
            if req("GET", "/v1/ping")[0] in (200, 404):
                break
        except OSError:
            time.sleep(0.1)
    load()
    for scenario in SCENARIOS:
        print(json.dumps(run(scenario)), flush=True)
finally:
    srv.terminate()
    srv.wait()
    shutil.rmtree(d)
