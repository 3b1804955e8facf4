#!/usr/bin/env python3
"""Restore speed from a large local archive, two builds alternated (BENCHMARKS.md,
"Restore from a large archive", "Archive objects compressed").

OLD and NEW are directories holding an oc-server and an oc-pitr. Each build's server
(2 shards, shipping to its own local archive) is loaded over HTTP with the same rows:
4 tenants x 1,200 POSTs of 100 rows {id int, body text of 1,000 bytes}, the text drawn
from a 512-word vocabulary with a fixed seed (so it compresses as prose does, about
2x, not as zeros or noise). It is stopped with SIGTERM once shipping has caught up.
Then, PAIRS times, each build restores its own archive into a fresh directory after
`sync` (the order flipped every pair), and NEW restores OLD's archive as well (an
archive written before the encoding existed). MB/s is the restored log's bytes
(the old archive's size) over the wall time of `oc-pitr restore`.

    OLD=dir NEW=dir DIR=/var/tmp/oc-restore-ab OUT=docs/bench/x.json PAIRS=5 \
        python3 bench/scripts/restore-ab.py
"""

import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

OLD = os.environ["OLD"]
NEW = os.environ["NEW"]
DIR = os.environ.get("DIR", "/var/tmp/oc-restore-ab")
OUT = os.environ["OUT"]
PAIRS = int(os.environ.get("PAIRS", "5"))
TENANTS, POSTS, ROWS, TEXT = 4, 1200, 100, 1000


def wait_ready(ops, proc):
    for _ in range(300):
        if proc.poll() is not None:
            sys.exit(f"oc-server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"http://{ops}/ready", timeout=1)
            return
        except OSError:
            time.sleep(0.1)
    sys.exit("oc-server never became ready")


def metric(ops, name):
    text = urllib.request.urlopen(f"http://{ops}/metrics", timeout=5).read().decode()
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def build_archive(build, where):
    shutil.rmtree(where, ignore_errors=True)
    os.makedirs(where)
    api, ops = "127.0.0.1:7070", "127.0.0.1:7071"
    proc = subprocess.Popen(
        [f"{build}/oc-server", "--data-dir", f"{where}/data", "--listen", api,
         "--ops-listen", ops, "--archive", f"file://{where}/archive"],
        stdout=subprocess.DEVNULL, stderr=open(f"{where}.log", "w"))
    wait_ready(ops, proc)
    words = [
        "".join(random.Random(w).choices("abcdefghijklmnopqrstuvwxyz", k=3 + w % 7))
        for w in range(512)
    ]
    rng = random.Random(21)
    conn = http.client.HTTPConnection(api, timeout=60)

    def post(path, body):
        conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
        reply = conn.getresponse()
        data = reply.read()
        if reply.status not in (200, 201):
            sys.exit(f"POST {path}: {reply.status} {data[:300]!r}")

    for t in range(TENANTS):
        tenant = f"t{t}"
        post("/v1/tenants", {"tenant": tenant})
        post(f"/v1/tenants/{tenant}/tables", {
            "name": "docs", "columns": [{"name": "id", "type": "int"},
                                        {"name": "body", "type": "text"}],
            "primary_key": ["id"]})
        for p in range(POSTS):
            ops_ = []
            for r in range(ROWS):
                text = ""
                while len(text) < TEXT:
                    text += rng.choice(words) + " "
                ops_.append({"upsert": {"id": p * ROWS + r, "body": text[:TEXT]}})
            post(f"/v1/tenants/{tenant}/tables/docs/rows", {"ops": ops_})
    for _ in range(600):
        if metric(ops, "oc_archive_lag_bytes") == 0:
            break
        time.sleep(0.5)
    else:
        sys.exit("shipping never caught up")
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    return sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, files in os.walk(f"{where}/archive")
        if "/." not in d
        for f in files
    )


def restore(build, archive, into):
    shutil.rmtree(into, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    start = time.monotonic()
    subprocess.run(
        [f"{build}/oc-pitr", "restore", "--archive", f"file://{archive}", "--target",
         "latest", "--data-dir", into],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - start


def main():
    sizes = {
        "old": build_archive(OLD, f"{DIR}/old"),
        "new": build_archive(NEW, f"{DIR}/new"),
    }
    print(f"archive bytes: {sizes}", flush=True)
    logical = sizes["old"]
    arms = {
        "old": (OLD, f"{DIR}/old/archive"),
        "new": (NEW, f"{DIR}/new/archive"),
        "new_reading_old": (NEW, f"{DIR}/old/archive"),
    }
    pairs = []
    for i in range(PAIRS):
        order = ["old", "new", "new_reading_old"]
        if i % 2:
            order.reverse()
        pair = {}
        for arm in order:
            build, archive = arms[arm]
            seconds = restore(build, archive, f"{DIR}/restored")
            pair[arm] = {"seconds": round(seconds, 3),
                         "mb_per_s": round(logical / seconds / 1e6, 1)}
        print(json.dumps(pair), flush=True)
        pairs.append(pair)
    shutil.rmtree(f"{DIR}/restored", ignore_errors=True)
    os.makedirs(os.path.dirname(OUT) or ".", exist_ok=True)
    with open(OUT, "w") as f:
        json.dump({
            "date": time.strftime("%Y-%m-%d"),
            "archive_bytes": sizes,
            "load": f"oc-server (2 shards, --archive file://A); {TENANTS} tenants x "
                    f"{POSTS} POSTs of {ROWS} rows {{id int, body text of {TEXT} "
                    "bytes, words of a 512-word vocabulary}; SIGTERM after the archive "
                    "caught up",
            "command": "oc-pitr restore --archive file://A --target latest --data-dir R "
                       "(fresh R, sync before each run); MB/s = the plain archive's "
                       "bytes / seconds",
            "pairs": pairs,
        }, f, indent=1)


main()
