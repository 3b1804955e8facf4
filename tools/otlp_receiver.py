#!/usr/bin/env python3
"""An OTLP/HTTP traces receiver for tests: decodes each POST to /v1/traces with the
official OpenTelemetry protos (the `opentelemetry-proto` package) and prints one JSON
line per span (with --quiet, nothing: for benchmarks). Prints `listening <port>` first. Answers 400 to a body the protos cannot
decode, and 415 to another content type, so an encoding mistake fails the test."""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2


def any_value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path != "/v1/traces":
            return self.answer(404)
        if self.headers.get("content-type") != "application/x-protobuf":
            return self.answer(415)
        request = trace_service_pb2.ExportTraceServiceRequest()
        try:
            request.ParseFromString(body)
        except DecodeError as e:
            print(json.dumps({"decode_error": str(e)}), flush=True)
            return self.answer(400)
        if QUIET:
            return self.answer(200, trace_service_pb2.ExportTraceServiceResponse().SerializeToString())
        for rs in request.resource_spans:
            resource = {kv.key: any_value(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for span in ss.spans:
                    print(json.dumps({
                        "resource": resource,
                        "scope": ss.scope.name,
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "name": span.name,
                        "kind": span.kind,
                        "start": span.start_time_unix_nano,
                        "end": span.end_time_unix_nano,
                        "attributes": {kv.key: any_value(kv.value) for kv in span.attributes},
                        "status_code": span.status.code,
                    }), flush=True)
        self.answer(200, trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

    def answer(self, status, body=b""):
        self.send_response(status)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


QUIET = "--quiet" in sys.argv[1:]
server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(f"listening {server.server_address[1]}", flush=True)
server.serve_forever()
