#!/usr/bin/env python3
"""A TLS handshake flood against an oc-server, with keep-alive probes reading a row.

usage: tls_flood.py PORT TOKEN_FILE PROCS THREADS SECONDS
PROCS processes x THREADS threads do full handshakes and close, for SECONDS; two probe
processes read row 1 of table p of tenants tp0 and tp1 over one TLS connection each,
every 5 ms, and print their latency percentiles.
"""
import signal
import subprocess
import sys
import time

PROBE = r'''
import sys, ssl, time, signal, http.client
port, tenant, token = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
stop = False
def halt(*_):
    global stop; stop = True
signal.signal(signal.SIGTERM, halt)
conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
lat, errs = [], 0
while not stop:
    began = time.time()
    try:
        conn.request("GET", f"/v1/tenants/{tenant}/tables/p/rows/1", headers={"authorization": "Bearer " + token})
        conn.getresponse().read()
    except Exception:
        errs += 1; conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    lat.append(time.time() - began); time.sleep(0.005)
lat.sort()
print(f"{tenant} probe n={len(lat)} p50={lat[len(lat)//2]*1000:.1f}ms p99={lat[int(len(lat)*.99)-1]*1000:.1f}ms max={lat[-1]*1000:.1f}ms errs={errs}", flush=True)
'''

FLOOD = r'''
import ssl, socket, threading, time, sys
port, threads, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
done = [0]
def run():
    end = time.time() + seconds
    while time.time() < end:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            ctx.wrap_socket(s, server_hostname="localhost").close(); done[0] += 1
        except Exception:
            time.sleep(0.01)
ts = [threading.Thread(target=run) for _ in range(threads)]
[t.start() for t in ts]; [t.join() for t in ts]; print(done[0])
'''


def main():
    port, token_file, procs, threads, seconds = sys.argv[1:6]
    token = open(token_file).read().strip()
    probes = [
        subprocess.Popen([sys.executable, "-c", PROBE, port, t, token], stdout=subprocess.PIPE, text=True)
        for t in ("tp0", "tp1")
    ]
    time.sleep(1)
    floods = [
        subprocess.Popen([sys.executable, "-c", FLOOD, port, threads, seconds], stdout=subprocess.PIPE, text=True)
        for _ in range(int(procs))
    ]
    handshakes = sum(int(p.communicate()[0] or 0) for p in floods)
    time.sleep(0.5)
    print(f"handshakes={handshakes} ({handshakes / float(seconds):.0f}/s) with {procs}x{threads} threads")
    for p in probes:
        p.send_signal(signal.SIGTERM)
        print(" ", p.communicate()[0].strip())


main()
