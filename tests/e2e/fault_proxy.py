"""A fault-injecting HTTP proxy in front of a local AWS service (kinesalite), on 127.0.0.1.

    python tests/e2e/fault_proxy.py UPSTREAM_URL [PLAN_JSON]

Prints "listening PORT" once it accepts connections. Only `PutRecords` requests are faulted;
the rest pass through. The plan (JSON, every key optional) says how often each fault happens,
drawn from a generator seeded with `seed`, so that a run can be repeated:

- `entry_throttle`: share of a request's entries answered `ProvisionedThroughputExceededException`,
  per entry, as Kinesis does: those entries are taken out of the request before it is forwarded,
  so they are truly not written, and the answer has them failed in their places.
- `request_throttle`: share of requests answered 400 `ProvisionedThroughputExceededException`.
- `server_error`: share answered 500 `InternalFailure`.
- `reset`: share whose connection is closed without an answer (nothing forwarded).
- `delay`: share forwarded, then answered `delay_ms` late (the records were written).
- `permanent_after`: from this request on (0-based), every one is answered 400
  `ResourceNotFoundException`.

`tally` on stderr at exit (SIGTERM): counts of each fault.
"""
import json
import random
import signal
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

UPSTREAM = sys.argv[1].rstrip("/")
PLAN = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
RANDOM = random.Random(PLAN.get("seed", 0))
LOCK = threading.Lock()
TALLY = {"requests": 0, "put_records": 0}


def count(what, n=1):
    TALLY[what] = TALLY.get(what, 0) + n


def draw(name):
    share = PLAN.get(name, 0)
    return share > 0 and RANDOM.random() < share


def forward(handler, body):
    headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("host", "content-length", "connection")}
    request = urllib.request.Request(UPSTREAM + handler.path, data=body, headers=headers, method=handler.command)
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body, headers=None):
        self.send_response(status)
        headers = headers or {"Content-Type": "application/x-amz-json-1.1"}
        for k, v in headers.items():
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def error(self, status, kind, message):
        self.answer(status, json.dumps({"__type": kind, "message": message}).encode())

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        target = self.headers.get("X-Amz-Target", "")
        with LOCK:
            count("requests")
            if not target.endswith(".PutRecords"):
                fault = None
            else:
                n = TALLY["put_records"]
                count("put_records")
                after = PLAN.get("permanent_after")
                if after is not None and n >= after:
                    fault = "permanent"
                else:
                    fault = next((f for f in ("request_throttle", "server_error", "reset", "delay") if draw(f)), None)
                if fault:
                    count(fault)
                # Per entry, drawn only when the request goes through.
                throttled = []
                if fault in (None, "delay") and PLAN.get("entry_throttle"):
                    request = json.loads(body)
                    throttled = [draw("entry_throttle") for _ in request["Records"]]
                    count("entries_throttled", sum(throttled))
        if fault == "permanent":
            return self.error(400, "ResourceNotFoundException", "Stream not found (fault proxy)")
        if fault == "request_throttle":
            return self.error(400, "ProvisionedThroughputExceededException", "Rate exceeded (fault proxy)")
        if fault == "server_error":
            return self.error(500, "InternalFailure", "fault proxy")
        if fault == "reset":
            self.close_connection = True
            self.connection.close()
            return
        if target.endswith(".PutRecords") and any(throttled):
            return self.put_some(body, throttled, fault == "delay")
        status, headers, reply = forward(self, body)
        if fault == "delay":
            time.sleep(PLAN.get("delay_ms", 1000) / 1000)
        self.answer(status, reply, headers)

    def put_some(self, body, throttled, delay):
        request = json.loads(body)
        kept = [r for r, t in zip(request["Records"], throttled) if not t]
        results = []
        if kept:
            request["Records"] = kept
            status, headers, reply = forward(self, json.dumps(request).encode())
            if status != 200:
                return self.answer(status, reply, headers)
            results = json.loads(reply)["Records"]
        out, it = [], iter(results)
        for t in throttled:
            out.append({"ErrorCode": "ProvisionedThroughputExceededException",
                        "ErrorMessage": "Rate exceeded for shard (fault proxy)"} if t else next(it))
        failed = sum(1 for r in out if "ErrorCode" in r)
        if delay:
            time.sleep(PLAN.get("delay_ms", 1000) / 1000)
        self.answer(200, json.dumps({"FailedRecordCount": failed, "Records": out}).encode())


def main():
    # SIGTERM ends it (printing the tally) even where SIGINT is ignored, as it is for a
    # background job of a non-interactive shell.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"listening {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    finally:
        print("tally " + json.dumps(TALLY), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
