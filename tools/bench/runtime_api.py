"""The kinesis-deagg binary as Lambda runs it, timed through a local Runtime API.

For each event file: start the release binary (discard transform, metrics off) pinned to one
core, with this server on another; note the time from the spawn to its first
`GET /runtime/invocation/next` (start-up); serve the event 33 times and time each invocation
from the moment the server starts sending the body to the moment the response arrives (so the
6 MB transfer over loopback is included); then read the process's peak RSS (VmHWM) and its
minor page faults per invocation after the warm-up.

Prints one JSON line per file: median_ms, startup_ms, peak_rss_mb, page_faults. Used by
compare.py.

With `--two-cores` the function may use both cores (the server too): the batch then splits
all aggregates at once while the MD5s run on the second core, which holds more memory.
"""
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RUNS, WARMUP = 33, 3


class Api:
    def __init__(self):
        self.cond = threading.Condition()
        self.event = None  # body waiting to be served
        self.sent_at = None
        self.first_next_at = None
        self.done_at = None
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                with api.cond:
                    if api.first_next_at is None:
                        api.first_next_at = time.perf_counter()
                        api.cond.notify_all()
                    while api.event is None:
                        api.cond.wait()
                    body, api.event = api.event, None
                    api.sent_at = time.perf_counter()
                self.send_response(200)
                for k, v in [
                    ("Lambda-Runtime-Aws-Request-Id", "bench"),
                    ("Lambda-Runtime-Deadline-Ms", str(int(time.time() * 1000) + 900_000)),
                    ("Lambda-Runtime-Invoked-Function-Arn", "arn:aws:lambda:us-east-1:000000000000:function:bench"),
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(body))),
                ]:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with api.cond:
                    api.done_at = time.perf_counter()
                    api.cond.notify_all()
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # The function closes its connection when it is killed: not worth a traceback.
        self.server.handle_error = lambda request, address: None
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def invoke(self, body):
        with self.cond:
            self.done_at = None
            self.event = body
            self.cond.notify_all()
            while self.done_at is None:
                self.cond.wait()
            return (self.done_at - self.sent_at) * 1000


def measure(binary, path, cores):
    body = open(path, "rb").read()
    api = Api()
    env = dict(os.environ, AWS_LAMBDA_RUNTIME_API=f"127.0.0.1:{api.server.server_address[1]}",
               AWS_LAMBDA_FUNCTION_NAME="bench", AWS_LAMBDA_FUNCTION_MEMORY_SIZE="1769",
               AWS_LAMBDA_FUNCTION_VERSION="$LATEST", DEAGG_TRANSFORM="discard", DEAGG_METRICS="off",
               RUST_LOG="warn")
    spawned = time.perf_counter()
    proc = subprocess.Popen(["taskset", "-c", cores, binary], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with api.cond:
            while api.first_next_at is None:
                api.cond.wait()
        startup_ms = (api.first_next_at - spawned) * 1000
        for _ in range(WARMUP):
            api.invoke(body)
        faults_before = minor_faults(proc.pid)
        times = sorted(api.invoke(body) for _ in range(RUNS - WARMUP))
        faults = (minor_faults(proc.pid) - faults_before) / (RUNS - WARMUP)
        status = open(f"/proc/{proc.pid}/status").read()
        hwm_kb = int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1])
    finally:
        proc.kill()
        proc.wait()
        api.server.shutdown()
    return {"file": path, "median_ms": times[len(times) // 2], "startup_ms": startup_ms,
            "peak_rss_mb": hwm_kb / 1024, "page_faults": faults}


def minor_faults(pid):
    """Minor page faults of the process so far (field 10 of /proc/PID/stat)."""
    stat = open(f"/proc/{pid}/stat").read()
    return int(stat[stat.rindex(")") + 2:].split()[7])


def main():
    args = sys.argv[1:]
    two_cores = "--two-cores" in args
    binary, *paths = [a for a in args if a != "--two-cores"]
    if not two_cores:
        # This server on the second core, the function alone on the first.
        os.sched_setaffinity(0, {1})
    for path in paths:
        print(json.dumps(measure(binary, path, "0,1" if two_cores else "0")), flush=True)


if __name__ == "__main__":
    main()
