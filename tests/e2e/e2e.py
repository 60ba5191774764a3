"""End to end: nothing is lost under failures.

Starts kinesalite on 127.0.0.1, creates a stream with several shards, puts user records as
plain records, as aggregates of the official Python aggregator and as aggregates of our own
(`kinesis-deagg aggregate --put-records`), then consumes every shard with a model of Lambda's
Kinesis event source mapping (ESM) that invokes the real release binary of
examples/e2e_faults.rs through a Lambda Runtime API served here. The transform fails, panics
and sleeps past the deadline on purpose, poison records fail forever, and the process is
killed mid-batch a few times.

The ESM model follows the documented behaviour (README, "Failure semantics"): batches of up to
BATCH_SIZE records and 6 MB, one shard per event, in sequence order; on a partial batch
response, checkpoint at the lowest reported sequence number and read again from there; on a
function error or timeout, retry the whole batch, bisected when BisectBatchOnFunctionError is
on; after MAX_RETRIES failed retries from the same record, write an on-failure record (shard,
start and end sequence numbers of the batch) and move past the batch.

Asserted: every user record is processed successfully at least once, unless it lies in a
batch named by an on-failure record (nothing is lost silently); every poison record lies in
one; within a shard, first successful processings follow sequence order. The last line is a
summary with the duplicate deliveries.

    .venv/bin/python tests/e2e/e2e.py   (make e2e; needs `cargo build --release --example e2e_faults`)
"""
import base64
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
from aws_kinesis_agg.aggregator import RecordAggregator
from aws_kinesis_agg.deaggregator import iter_deaggregate_records

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORK = os.path.join(ROOT, "target", "e2e")
FUNCTION = os.path.join(ROOT, "target", "release", "examples", "e2e_faults")
DEAGG = os.path.join(ROOT, "target", "release", "kinesis-deagg")

STREAM = "e2e"
SHARDS = 3
USER_RECORDS = 3000
POISON = {777, 2222}
BATCH_SIZE = 100
MAX_PAYLOAD = 6 * 1024 * 1024
# Lambda's default is -1 (until the record expires). Each failing user record of an aggregate
# costs the whole aggregate a retry, so an aggregate of 40 user records with a few transient
# failures can need several: 4 here made transient failures exhaust retries.
MAX_RETRIES = 10
BISECT = True
TIMEOUT_MS = 2000
KILL_AT = {5, 23, 41}  # invocation numbers at which the process is killed mid-batch
AGGREGATE_SIZE = 8 * 1024


class RuntimeApi:
    """A Lambda Runtime API on 127.0.0.1 serving one invocation at a time."""

    def __init__(self):
        self.cond = threading.Condition()
        self.pending = None  # (request id, body, deadline ms)
        self.results = {}
        self.generation = 0  # bumped when the function is restarted
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def reply(self, status, body=b"{}", headers=()):
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the function was killed

            def do_GET(self):
                if not self.path.endswith("/runtime/invocation/next"):
                    return self.reply(404)
                generation = api.generation
                with api.cond:
                    while api.pending is None or api.generation != generation:
                        if api.generation != generation:
                            return self.reply(500)  # a killed process's request
                        api.cond.wait(0.05)
                    request_id, body, deadline = api.pending
                    api.pending = None
                self.reply(200, body, [
                    ("Lambda-Runtime-Aws-Request-Id", request_id),
                    ("Lambda-Runtime-Deadline-Ms", str(deadline)),
                    ("Lambda-Runtime-Invoked-Function-Arn", "arn:aws:lambda:us-east-1:000000000000:function:e2e"),
                    ("Lambda-Runtime-Trace-Id", "Root=1-00000000-000000000000000000000000"),
                ])

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                parts = self.path.split("/")
                if self.path.endswith("/response") or self.path.endswith("/error"):
                    with api.cond:
                        api.results[parts[-2]] = (parts[-1], body)
                        api.cond.notify_all()
                self.reply(202)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def invoke(self, body, timeout_ms, kill=None):
        """Returns ("response", dict), ("error", text) or ("timeout", None)."""
        request_id = str(uuid.uuid4())
        deadline = int(time.time() * 1000) + timeout_ms
        with self.cond:
            self.pending = (request_id, body, deadline)
            self.cond.notify_all()
        if kill:
            kill()
        end = time.time() + timeout_ms / 1000 + 1.0
        with self.cond:
            while request_id not in self.results and time.time() < end:
                self.cond.wait(0.05)
            self.pending = None
            result = self.results.pop(request_id, None)
        if result is None:
            return ("timeout", None)
        kind, payload = result
        return ("response", json.loads(payload)) if kind == "response" else ("error", payload.decode())


class Function:
    """The e2e_faults binary as Lambda runs it: restarted after a kill or a timeout."""

    def __init__(self, api, success_log):
        self.api, self.success_log, self.proc, self.starts = api, success_log, None, 0
        self.start()

    def start(self):
        env = dict(os.environ)
        env.update({
            "AWS_LAMBDA_RUNTIME_API": f"127.0.0.1:{self.api.port}",
            "AWS_LAMBDA_FUNCTION_NAME": "e2e", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "128",
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST", "RUST_LOG": "warn",
            "DEAGG_DEADLINE_MARGIN_MS": "300", "DEAGG_METRICS": "off",
            "E2E_LOG": self.success_log, "E2E_FAIL_PER_MILLE": "15", "E2E_PANIC_PER_MILLE": "3",
            "E2E_SLEEP_PER_MILLE": "2", "E2E_SLEEP_MS": "3000", "E2E_WORK_US": "200",
        })
        self.starts += 1
        err = open(os.path.join(WORK, f"function-{self.starts}.log"), "w")
        self.proc = subprocess.Popen([FUNCTION], env=env, stdout=subprocess.DEVNULL, stderr=err)

    def restart(self):
        self.proc.kill()
        self.proc.wait()
        with self.api.cond:
            self.api.generation += 1
            self.api.cond.notify_all()
        self.start()


def kinesalite():
    port = random.randint(20000, 40000)
    proc = subprocess.Popen(["node", os.path.join(ROOT, "tests", "e2e", "kinesalite.js"), str(port)],
                            stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        sys.exit("kinesalite did not start")
    client = boto3.client("kinesis", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                          aws_access_key_id="local", aws_secret_access_key="local")
    return proc, client


def user_record(i):
    body = {"i": i, "user": f"user-{i % 53}", "pad": "x" * (i % 300)}
    if i in POISON:
        body["poison"] = True
    return f"user-{i % 53}", json.dumps(body, separators=(",", ":"))


def produce(client):
    """Puts every user record: a third plain, a third aggregated by the official Python
    aggregator, a third by ours. Returns the number of Kinesis records put."""
    plain, python_agg, ours = [], RecordAggregator(max_size=AGGREGATE_SIZE), []
    entries = []
    for i in range(USER_RECORDS):
        pk, text = user_record(i)
        if i % 3 == 0:
            plain.append({"Data": text.encode(), "PartitionKey": pk})
        elif i % 3 == 1:
            full = python_agg.add_user_record(pk, text.encode())
            if full is not None:
                entries.append(full.get_contents())
        else:
            ours.append(json.dumps({"partitionKey": pk, "text": text}))
    if python_agg.get_num_user_records():
        entries.append(python_agg.clear_and_get().get_contents())
    python_entries = [{"Data": d, "PartitionKey": pk, "ExplicitHashKey": ehk}
                      if ehk else {"Data": d, "PartitionKey": pk} for pk, ehk, d in entries]
    out = subprocess.run([DEAGG, "aggregate", "--put-records", "--max-size", str(AGGREGATE_SIZE)],
                         input="\n".join(ours), capture_output=True, text=True, check=True)
    our_entries = [dict(e, Data=base64.b64decode(e["Data"])) for e in json.loads(out.stdout)["Records"]]
    everything = plain + python_entries + our_entries
    for start in range(0, len(everything), 500):
        resp = client.put_records(StreamName=STREAM, Records=everything[start:start + 500])
        assert resp["FailedRecordCount"] == 0, resp
    return len(everything)


def read(client, shard, kind, seq=None, limit=BATCH_SIZE):
    args = {"StreamName": STREAM, "ShardId": shard, "ShardIteratorType": kind}
    if seq:
        args["StartingSequenceNumber"] = seq
    iterator = client.get_shard_iterator(**args)["ShardIterator"]
    return client.get_records(ShardIterator=iterator, Limit=limit)["Records"]


def lambda_record(shard, r):
    return {
        "kinesis": {"kinesisSchemaVersion": "1.0", "partitionKey": r["PartitionKey"],
                    "sequenceNumber": r["SequenceNumber"], "data": base64.b64encode(r["Data"]).decode(),
                    "approximateArrivalTimestamp": r["ApproximateArrivalTimestamp"].timestamp()},
        "eventSource": "aws:kinesis", "eventVersion": "1.0", "eventID": f"{shard}:{r['SequenceNumber']}",
        "eventName": "aws:kinesis:record", "invokeIdentityArn": "arn:aws:iam::000000000000:role/e2e",
        "awsRegion": "us-east-1", "eventSourceARN": f"arn:aws:kinesis:us-east-1:000000000000:stream/{STREAM}",
    }


def event_of(shard, records):
    """The Lambda event for a batch, cut at 6 MB as the mapping does."""
    out, size = [], 20
    for r in records:
        rec = lambda_record(shard, r)
        size += len(json.dumps(rec)) + 1
        if out and size > MAX_PAYLOAD:
            break
        out.append(rec)
    return out


class Stats:
    invocations = kills = timeouts = errors = partial = 0


def consume(client, api, function, shard, on_failure, stats):
    position = ("TRIM_HORIZON", None)
    tries = {}  # sequence number -> failed invocations that started there
    limit = BATCH_SIZE
    while True:
        records = read(client, shard, *position, limit=limit)
        if not records:
            return
        batch = event_of(shard, records)
        seqs = [r["kinesis"]["sequenceNumber"] for r in batch]
        first, last = seqs[0], seqs[-1]
        if tries.get(first, 0) > MAX_RETRIES:
            on_failure.append({"shard": shard, "startSequenceNumber": first, "endSequenceNumber": last,
                               "batchSize": len(batch)})
            position, limit = ("AFTER_SEQUENCE_NUMBER", last), BATCH_SIZE
            continue
        stats.invocations += 1
        kill = None
        if stats.invocations in KILL_AT:
            def kill():
                # Once the function has taken the event, let it work a little, then kill it.
                while api.pending is not None:
                    time.sleep(0.001)
                time.sleep(random.uniform(0.005, 0.03))
                stats.kills += 1
                function.restart()
        kind, payload = api.invoke(json.dumps({"Records": batch}).encode(), TIMEOUT_MS, kill)
        if os.environ.get("E2E_DEBUG"):
            print(shard[-3:], first[-6:], len(batch), kind, str(payload)[-90:], file=sys.stderr)
        if kind == "timeout":
            stats.timeouts += 1
            function.restart()
        if kind == "response" and isinstance(payload, dict):
            failures = payload.get("batchItemFailures") or []
            ids = [f.get("itemIdentifier") for f in failures]
            if not failures:
                position, limit = ("AFTER_SEQUENCE_NUMBER", last), BATCH_SIZE
                continue
            if all(i in seqs for i in ids):
                stats.partial += 1
                lowest = min(ids, key=int)
                tries[lowest] = tries.get(lowest, 0) + 1 if lowest == first else 1
                position, limit = ("AT_SEQUENCE_NUMBER", lowest), BATCH_SIZE
                continue
            # An empty, null or unknown identifier fails the whole batch.
        elif kind == "error":
            stats.errors += 1
        tries[first] = tries.get(first, 0) + 1
        position = ("AT_SEQUENCE_NUMBER", first)
        limit = max(1, len(batch) // 2) if BISECT else BATCH_SIZE


def placements(client, shards):
    """Where each user record landed: i -> (shard, sequence number), read back from the
    stream and deaggregated with the official Python module."""
    where = {}
    for shard in shards:
        position = ("TRIM_HORIZON", None)
        while True:
            records = read(client, shard, *position, limit=10000)
            if not records:
                break
            for user in iter_deaggregate_records([lambda_record(shard, r) for r in records]):
                data = base64.b64decode(user["kinesis"]["data"])
                where[json.loads(data)["i"]] = (shard, user["kinesis"]["sequenceNumber"])
            position = ("AFTER_SEQUENCE_NUMBER", records[-1]["SequenceNumber"])
    return where


def main():
    os.makedirs(WORK, exist_ok=True)
    for f in os.listdir(WORK):
        os.remove(os.path.join(WORK, f))
    success_log = os.path.join(WORK, "successes.ndjson")
    random.seed(7)
    started = time.time()
    server, client = kinesalite()
    api = function = None
    try:
        client.create_stream(StreamName=STREAM, ShardCount=SHARDS)
        while client.describe_stream(StreamName=STREAM)["StreamDescription"]["StreamStatus"] != "ACTIVE":
            time.sleep(0.05)
        shards = [s["ShardId"] for s in client.describe_stream(StreamName=STREAM)["StreamDescription"]["Shards"]]
        kinesis_records = produce(client)
        where = placements(client, shards)
        assert sorted(where) == list(range(USER_RECORDS)), "a user record did not reach the stream"

        api = RuntimeApi()
        function = Function(api, success_log)
        on_failure, stats = [], Stats()
        for shard in shards:
            consume(client, api, function, shard, on_failure, stats)
    finally:
        if function:
            function.proc.kill()
        server.send_signal(signal.SIGTERM)

    lines = [json.loads(l) for l in open(success_log)] if os.path.exists(success_log) else []
    succeeded = {json.loads(l["data"])["i"] for l in lines}

    def in_on_failure(i):
        shard, seq = where[i]
        return any(f["shard"] == shard and int(f["startSequenceNumber"]) <= int(seq) <= int(f["endSequenceNumber"])
                   for f in on_failure)

    lost = [i for i in range(USER_RECORDS) if i not in succeeded and not in_on_failure(i)]
    assert not lost, f"user records neither processed nor in an on-failure batch: {lost[:20]}"
    for i in POISON:
        assert i not in succeeded and in_on_failure(i), f"poison record {i}"
    # Transient failures can exhaust retries too: every failing user record of an aggregate
    # costs the whole aggregate a retry, and a killed process forgets the attempts it counted.
    transient = [f for f in on_failure
                 if not any(where[p][0] == f["shard"] and int(f["startSequenceNumber"]) <= int(where[p][1])
                            <= int(f["endSequenceNumber"]) for p in POISON)]
    exhausted = {i for i in range(USER_RECORDS) if i not in succeeded}
    for shard in shards:
        seen, order = set(), []
        for l in lines:
            key = (l["seq"], l["sub"])
            if l["shard"] == shard and key not in seen:
                seen.add(key)
                order.append((int(l["seq"]), -1 if l["sub"] is None else l["sub"]))
        assert order == sorted(order), f"{shard}: first successes out of sequence order"

    print(f"e2e: {USER_RECORDS} user records in {kinesis_records} Kinesis records over {SHARDS} shards; "
          f"{len(succeeded)} processed successfully, {len(lines) - len(succeeded)} duplicate deliveries, "
          f"{len(exhausted)} never processed, all in {len(on_failure)} on-failure batches "
          f"({len(POISON)} poison records, {len(transient)} batches exhausted by transient failures); "
          f"{stats.invocations} invocations, {stats.partial} partial failures, {stats.errors} function errors, "
          f"{stats.timeouts} timeouts, {stats.kills} kills; {time.time() - started:.1f} s")


if __name__ == "__main__":
    main()
