"""A fault-injecting HTTP proxy in front of a local AWS service (kinesalite, moto), on 127.0.0.1.

    python tests/e2e/fault_proxy.py UPSTREAM_URL [PLAN_JSON]

Prints "listening PORT" once it accepts connections. Only the batch writes are faulted
(Kinesis `PutRecords`, Firehose `PutRecordBatch`, SQS `SendMessageBatch`, DynamoDB
`BatchWriteItem`), each with its own
service's error shapes; the rest pass through. The plan (JSON, every key optional) says how
often each fault happens, drawn from a generator seeded with `seed`, so that a run can be
repeated:

- `entry_throttle`: share of a request's entries refused per entry, as the service does
  (Kinesis `ProvisionedThroughputExceededException`, Firehose `ServiceUnavailableException`,
  SQS an `InternalError` in `Failed`, DynamoDB `UnprocessedItems`): those entries are taken out of the request before it is
  forwarded, so they are truly not written, and the answer has them failed in their places.
- `request_throttle`: share of requests answered 400 with the service's throttling error.
- `server_error`: share answered 500 `InternalFailure`.
- `reset`: share whose connection is closed without an answer (nothing forwarded).
- `delay`: share forwarded, then answered `delay_ms` late (the records were written).
- `permanent_after`: from this request on (0-based), every one is answered 400 with the
  service's not-found error.

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


def kinesis_merge(reply, refused):
    out, it = [], iter(reply["Records"] if reply else [])
    for r in refused:
        out.append({"ErrorCode": "ProvisionedThroughputExceededException",
                    "ErrorMessage": "Rate exceeded for shard (fault proxy)"} if r else next(it))
    return {"FailedRecordCount": sum(1 for r in out if "ErrorCode" in r), "Records": out}


def firehose_merge(reply, refused):
    out, it = [], iter(reply["RequestResponses"] if reply else [])
    for r in refused:
        out.append({"ErrorCode": "ServiceUnavailableException",
                    "ErrorMessage": "Slow down (fault proxy)"} if r else next(it))
    return {"FailedPutCount": sum(1 for r in out if "ErrorCode" in r), "Encrypted": False,
            "RequestResponses": out}


def sqs_merge(reply, refused, entries):
    reply = dict(reply or {"Successful": []})
    reply["Failed"] = list(reply.get("Failed", [])) + [
        {"Id": e["Id"], "SenderFault": False, "Code": "InternalError", "Message": "fault proxy"}
        for e, r in zip(entries, refused) if r]
    return reply


def dynamodb_merge(reply, refused, entries, table):
    reply = dict(reply or {})
    unprocessed = dict(reply.get("UnprocessedItems") or {})
    unprocessed[table] = list(unprocessed.get(table, [])) + [e for e, r in zip(entries, refused) if r]
    reply["UnprocessedItems"] = unprocessed
    return reply


# Per operation: the request's list of entries (a DynamoDB request's one table's), how an answer is rebuilt, the content type,
# the throttling error, the not-found error.
SERVICES = {
    "PutRecords": ("Records", kinesis_merge, "application/x-amz-json-1.1",
                   "ProvisionedThroughputExceededException", "ResourceNotFoundException"),
    "PutRecordBatch": ("Records", firehose_merge, "application/x-amz-json-1.1",
                       "ServiceUnavailableException", "ResourceNotFoundException"),
    "SendMessageBatch": ("Entries", None, "application/x-amz-json-1.0",
                         "RequestThrottled", "QueueDoesNotExist"),
    "BatchWriteItem": ("RequestItems", None, "application/x-amz-json-1.0",
                       "ProvisionedThroughputExceededException", "ResourceNotFoundException"),
}


def entries_of(request, key):
    """The entries of a request, and a function that puts others in their place."""
    if key == "RequestItems":
        (table, entries), = request[key].items()
        return entries, lambda kept: request[key].update({table: kept}), table
    return request[key], lambda kept: request.update({key: kept}), None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body, headers=None):
        self.send_response(status)
        headers = headers or {"Content-Type": self.content_type}
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
        operation = self.headers.get("X-Amz-Target", "").rpartition(".")[2]
        service = SERVICES.get(operation)
        self.content_type = service[2] if service else "application/x-amz-json-1.1"
        with LOCK:
            count("requests")
            refused = []
            if not service:
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
                if fault in (None, "delay") and PLAN.get("entry_throttle"):
                    refused = [draw("entry_throttle") for _ in entries_of(json.loads(body), service[0])[0]]
                    count("entries_throttled", sum(refused))
        if fault == "permanent":
            return self.error(400, service[4], "Not found (fault proxy)")
        if fault == "request_throttle":
            return self.error(400, service[3], "Rate exceeded (fault proxy)")
        if fault == "server_error":
            return self.error(500, "InternalFailure", "fault proxy")
        if fault == "reset":
            self.close_connection = True
            self.connection.close()
            return
        if any(refused):
            return self.put_some(service, body, refused, fault == "delay")
        status, headers, reply = forward(self, body)
        if fault == "delay":
            time.sleep(PLAN.get("delay_ms", 1000) / 1000)
        self.answer(status, reply, headers)

    def put_some(self, service, body, refused, delay):
        merge = service[1]
        request = json.loads(body)
        entries, put, table = entries_of(request, service[0])
        kept = [e for e, r in zip(entries, refused) if not r]
        reply = None
        if kept:
            put(kept)
            status, headers, raw = forward(self, json.dumps(request).encode())
            if status != 200:
                return self.answer(status, raw, headers)
            reply = json.loads(raw)
        if merge:
            merged = merge(reply, refused)
        elif table:
            merged = dynamodb_merge(reply, refused, entries, table)
        else:
            merged = sqs_merge(reply, refused, entries)
        if delay:
            time.sleep(PLAN.get("delay_ms", 1000) / 1000)
        self.answer(200, json.dumps(merged).encode())


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
