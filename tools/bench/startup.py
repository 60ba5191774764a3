"""Start-up of the kinesis-deagg binary inside Lambda: from the spawn to its first
`GET /runtime/invocation/next`, without a sink and with the Kinesis sink configured (the AWS
SDK's configuration loaded; no request is made before the first invocation).

    python tools/bench/startup.py BINARY [BINARY...]

Prints one JSON line per binary and configuration: the median, lowest and highest of 30
spawns, each answered at once with a 500 (so that it exits). Used by compare.py.
"""
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SPAWNS = 30


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    first = None

    def log_message(self, *args):
        pass

    def do_POST(self):  # an init error
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        if Handler.first is None:
            Handler.first = time.perf_counter()
        # A 500 on /next ends the process at once.
        self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()


def start_up_ms(binary, env):
    Handler.first = None
    spawned = time.perf_counter()
    proc = subprocess.Popen([binary], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.wait(timeout=30)
    return None if Handler.first is None else (Handler.first - spawned) * 1000


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DEAGG_", "AWS_"))}
    base.update({"AWS_LAMBDA_RUNTIME_API": f"127.0.0.1:{server.server_address[1]}",
                 "AWS_LAMBDA_FUNCTION_NAME": "startup", "DEAGG_TRANSFORM": "discard", "DEAGG_METRICS": "off"})
    sink = dict(base, DEAGG_SINK="kinesis", DEAGG_SINK_TARGET="destination", AWS_REGION="us-east-1",
                AWS_ACCESS_KEY_ID="startup", AWS_SECRET_ACCESS_KEY="startup", AWS_EC2_METADATA_DISABLED="true",
                AWS_ENDPOINT_URL_KINESIS="http://127.0.0.1:9")
    for binary in sys.argv[1:]:
        for name, env in [("no sink", base), ("kinesis sink", sink)]:
            times = [start_up_ms(binary, env) for _ in range(SPAWNS)]
            if None in times:  # a build without the sink refuses DEAGG_SINK=kinesis
                continue
            times.sort()
            print(json.dumps({"binary": binary, "config": name, "median_ms": statistics.median(times),
                              "min_ms": times[0], "max_ms": times[-1]}))


if __name__ == "__main__":
    main()
