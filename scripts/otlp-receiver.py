#!/usr/bin/env python3
"""An OTLP/HTTP trace receiver outside Rust, on the official Python classes of the
OpenTelemetry protocol (PyPI `opentelemetry-proto`): it decodes every
ExportTraceServiceRequest POSTed to /v1/traces and writes one JSON line per span to
the file given. The tracing tests point `orderflow` at it to check the export with an
implementation that shares no code with the one that wrote it.

    scripts/otlp-receiver.py PORT OUTPUT.jsonl
"""
import http.server
import json
import sys

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

port, output = int(sys.argv[1]), sys.argv[2]


class Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path != "/v1/traces":
            self.send_error(404)
            return
        request = ExportTraceServiceRequest()
        try:
            request.ParseFromString(body)
        except Exception as error:  # a malformed export is the finding
            self.send_error(400, str(error))
            return
        with open(output, "a", encoding="utf-8") as out:
            for resource in request.resource_spans:
                attributes = {a.key: a.value.string_value for a in resource.resource.attributes}
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        out.write(json.dumps({
                            "service": attributes.get("service.name"),
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(),
                            "name": span.name,
                            "kind": span.kind,
                        }) + "\n")
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


server = http.server.HTTPServer(("127.0.0.1", port), Receiver)
print("listening", flush=True)
server.serve_forever()
