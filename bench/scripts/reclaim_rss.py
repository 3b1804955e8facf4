#!/usr/bin/env python3
"""The server's resident size while one tenant pages deep into an ordered answer.

usage: reclaim_rss.py OC_SERVER PORT SECONDS

Loads 150,000 rows (id int, f float) into a fresh server (2 shards, no archive), then
runs 4 threads looping `SELECT id, f FROM big ORDER BY f LIMIT 100 OFFSET 100000` for
SECONDS, printing the resident size every 2 s: the rows each query's cut drops are what
the reclaim thread frees. Run it with the cores kept busy (`yes > /dev/null` once per
core) to see what a starved reclaim thread holds.
"""
import http.client, json, random, shutil, subprocess, sys, tempfile, threading, time
from concurrent.futures import ThreadPoolExecutor

BIN, PORT, SECS = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
D = tempfile.mkdtemp(prefix='reclaim-rss-')
p = subprocess.Popen([BIN, '--data-dir', D + '/data', '--listen', '127.0.0.1:%d' % PORT,
                      '--ops-listen', '127.0.0.1:%d' % (PORT + 1), '--archive', 'none',
                      '--no-pin', '--shards', '2'],
                     stdout=subprocess.PIPE, stderr=open(D + '/server.log', 'w'))
for line in p.stdout:
    if b'api listening' in line:
        break


def req(method, path, body=None, timeout=120):
    c = http.client.HTTPConnection('127.0.0.1', PORT, timeout=timeout)
    c.request(method, path, body=json.dumps(body) if body is not None else None,
              headers={'content-type': 'application/json'})
    r = c.getresponse()
    b = r.read()
    c.close()
    return r.status, b


req('POST', '/v1/tenants', {'tenant': 'a0'})
req('POST', '/v1/tenants/a0/tables', {'name': 'big', 'columns': [
    {'name': 'id', 'type': 'int'}, {'name': 'f', 'type': 'float'}], 'primary_key': ['id']})
N = 150000


def batch(b):
    ops = [{'upsert': {'id': i, 'f': random.random()}} for i in range(b * 1000, (b + 1) * 1000)]
    assert req('POST', '/v1/tenants/a0/tables/big/rows', {'ops': ops})[0] == 200


with ThreadPoolExecutor(4) as ex:
    list(ex.map(batch, range(N // 1000)))


def rss_mb():
    for line in open('/proc/%d/status' % p.pid):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) // 1024


print('resident MB after the load', rss_mb())
stop = time.time() + SECS
codes = {}


def query():
    while time.time() < stop:
        s, _ = req('POST', '/v1/tenants/a0/ask',
                   {'sql': 'SELECT id, f FROM big ORDER BY f LIMIT 100 OFFSET 100000'})
        codes[s] = codes.get(s, 0) + 1


threads = [threading.Thread(target=query) for _ in range(4)]
[t.start() for t in threads]
peak = 0
while time.time() < stop:
    time.sleep(2)
    r = rss_mb()
    peak = max(peak, r)
    print('t=%.0f s resident MB %d' % (SECS - (stop - time.time()), r), flush=True)
[t.join() for t in threads]
time.sleep(3)
print('answers', codes, 'peak MB', peak, 'after 3 s idle MB', rss_mb())
p.kill()
p.wait()
shutil.rmtree(D, ignore_errors=True)
