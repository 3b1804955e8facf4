#!/usr/bin/env python3
"""Reads a /watch stream with a third-party SSE client (sseclient-py over urllib3) and
prints one JSON line per event: {"event", "id", "data"}. Stops after `--changes` change
events, at the end of the stream, or after `--timeout-s` seconds. Used by
net/tests/watch_python.rs; handy by hand too:

    python3 tools/watch_client.py http://127.0.0.1:7070/v1/tenants/acme/watch --changes 10
"""
import argparse
import json
import sys

import sseclient
import urllib3


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--changes", type=int, default=0, help="stop after this many change events (0: never)")
    parser.add_argument("--timeout-s", type=float, default=60.0)
    parser.add_argument("--last-event-id")
    args = parser.parse_args()

    headers = {"Accept": "text/event-stream"}
    if args.last_event_id:
        headers["Last-Event-ID"] = args.last_event_id
    http = urllib3.PoolManager()
    response = http.request(
        "GET",
        args.url,
        headers=headers,
        preload_content=False,
        timeout=urllib3.Timeout(connect=10, read=args.timeout_s),
    )
    if response.status != 200:
        print(json.dumps({"event": "http_error", "id": None, "data": response.status}), flush=True)
        return 1
    changes = 0
    try:
        for event in sseclient.SSEClient(response).events():
            data = json.loads(event.data) if event.data else None
            print(json.dumps({"event": event.event, "id": event.id, "data": data}), flush=True)
            if event.event == "change":
                changes += 1
                if args.changes and changes >= args.changes:
                    break
    except urllib3.exceptions.ReadTimeoutError:
        print(json.dumps({"event": "timeout", "id": None, "data": None}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
