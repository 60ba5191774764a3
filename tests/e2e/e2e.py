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
one; within a shard, first successful processings follow sequence order. A summary line gives the
duplicate deliveries.

Then the same stream is consumed again with tumbling windows (`consume_windows`), in the
concurrent mode (first successes in order within each partition key), with the same faults:
the state is carried from invocation to invocation, each window ends with a final invocation
(with or without records), and a window in the function counts each user record. Asserted
besides: each window's result counts every user record of the window exactly once, except
those in on-failure batches, which it never counts; a retried final invocation emits the same
result again; no response lacks the state.

    .venv/bin/python tests/e2e/e2e.py   (make e2e; needs `cargo build --release --example e2e_faults`)
"""
import base64
import calendar
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
WINDOW_RECORDS = 120  # Kinesis records per tumbling window (about 350 per shard)
WINDOW_SECONDS = 60
WINDOW_EPOCH = calendar.timegm((2026, 12, 4, 6, 0, 0))


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

    def __init__(self, api, success_log, extra_env=None):
        self.api, self.success_log, self.proc, self.starts = api, success_log, None, 0
        self.extra_env = extra_env or {}
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
        }, **self.extra_env)
        self.starts += 1
        name = "function-window" if self.extra_env else "function"
        err = open(os.path.join(WORK, f"{name}-{self.starts}.log"), "w")
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
    invocations = kills = timeouts = errors = partial = no_state = 0

    def __init__(self):
        self.error_types = {}


def invoke(api, function, stats, event):
    """One invocation, killed mid-batch at the KILL_AT invocations, restarted after a timeout."""
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
    kind, payload = api.invoke(json.dumps(event).encode(), TIMEOUT_MS, kill)
    if os.environ.get("E2E_DEBUG"):
        print(event.get("window"), len(event["Records"]), kind, str(payload)[-90:], file=sys.stderr)
    if kind == "timeout":
        stats.timeouts += 1
        function.restart()
    elif kind == "error":
        stats.errors += 1
        try:
            error_type = json.loads(payload).get("errorType")
        except ValueError:
            error_type = None
        stats.error_types[error_type] = stats.error_types.get(error_type, 0) + 1
    return kind, payload


def reported(payload, seqs):
    """The sequence number to read again from after a response: None when all succeeded,
    "all" when the response fails the whole batch (an empty, null or unknown identifier)."""
    failures = payload.get("batchItemFailures") or []
    ids = [f.get("itemIdentifier") for f in failures]
    if not failures:
        return None
    return min(ids, key=int) if all(i in seqs for i in ids) else "all"


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
        kind, payload = invoke(api, function, stats, {"Records": batch})
        again = reported(payload, seqs) if kind == "response" and isinstance(payload, dict) else "all"
        if again is None:
            position, limit = ("AFTER_SEQUENCE_NUMBER", last), BATCH_SIZE
            continue
        if again != "all":
            stats.partial += 1
            tries[again] = tries.get(again, 0) + 1 if again == first else 1
            position, limit = ("AT_SEQUENCE_NUMBER", again), BATCH_SIZE
            continue
        tries[first] = tries.get(first, 0) + 1
        position = ("AT_SEQUENCE_NUMBER", first)
        limit = max(1, len(batch) // 2) if BISECT else BATCH_SIZE


def window_bounds(k):
    start = WINDOW_EPOCH + k * WINDOW_SECONDS
    iso = lambda t: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
    return iso(start), iso(start + WINDOW_SECONDS)


def consume_windows(client, api, function, shard, order, on_failure, stats, discarded):
    """The mapping with tumbling windows: each WINDOW_RECORDS Kinesis records of the shard are
    one window (kinesalite stamps every record within a second or two, so the model cuts
    windows by position, not by arrival time). A batch never crosses a window's end; the
    state answered is passed to the next invocation of the window (a response without one
    fails); a failed invocation is retried with the state it had. Even windows end with a
    final invocation without records; in odd ones the batch that reaches the window's end is
    the final invocation, so its failures fail the final invocation. The final invocation is
    retried like any batch; after MAX_RETRIES its batch goes to on-failure and the window's
    result is discarded."""
    position = ("TRIM_HORIZON", None)
    tries = {}
    limit = BATCH_SIZE
    for k in range(0, (len(order) + WINDOW_RECORDS - 1) // WINDOW_RECORDS):
        end_seq = order[min(len(order), (k + 1) * WINDOW_RECORDS) - 1]
        start, end = window_bounds(k)
        state = {}
        while True:
            records = [r for r in read(client, shard, *position, limit=limit)
                       if int(r["SequenceNumber"]) <= int(end_seq)]
            batch = event_of(shard, records)
            seqs = [r["kinesis"]["sequenceNumber"] for r in batch]
            final = not batch or (k % 2 == 1 and seqs[-1] == end_seq)
            first = seqs[0] if batch else ("final", k)
            if tries.get(first, 0) > MAX_RETRIES:
                if batch:
                    on_failure.append({"shard": shard, "startSequenceNumber": first,
                                       "endSequenceNumber": seqs[-1], "batchSize": len(batch)})
                    position, limit = ("AFTER_SEQUENCE_NUMBER", seqs[-1]), BATCH_SIZE
                if final:
                    discarded.add((shard, start))
                    break
                continue
            event = {"Records": batch, "window": {"start": start, "end": end}, "state": state,
                     "shardId": shard, "eventSourceARN": f"arn:aws:kinesis:us-east-1:000000000000:stream/{STREAM}",
                     "isFinalInvokeForWindow": final, "isWindowTerminatedEarly": False}
            kind, payload = invoke(api, function, stats, event)
            again = "all"
            if kind == "response" and isinstance(payload, dict):
                if isinstance(payload.get("state"), dict):
                    again = reported(payload, seqs)
                else:
                    stats.no_state += 1
            if again != "all":
                state = payload["state"]
            if again is None:
                if batch:
                    position, limit = ("AFTER_SEQUENCE_NUMBER", seqs[-1]), BATCH_SIZE
                if final:
                    break
                continue
            if again != "all":
                stats.partial += 1
                tries[again] = tries.get(again, 0) + 1 if again == first else 1
                position, limit = ("AT_SEQUENCE_NUMBER", again), BATCH_SIZE
                continue
            tries[first] = tries.get(first, 0) + 1
            if batch:
                position = ("AT_SEQUENCE_NUMBER", first)
                limit = max(1, len(batch) // 2) if BISECT else BATCH_SIZE


def placements(client, shards):
    """Where each user record landed: i -> (shard, sequence number), read back from the
    stream and deaggregated with the official Python module; and each shard's sequence
    numbers in order."""
    where, order = {}, {}
    for shard in shards:
        order[shard] = []
        position = ("TRIM_HORIZON", None)
        while True:
            records = read(client, shard, *position, limit=10000)
            if not records:
                break
            order[shard] += [r["SequenceNumber"] for r in records]
            for user in iter_deaggregate_records([lambda_record(shard, r) for r in records]):
                data = base64.b64decode(user["kinesis"]["data"])
                where[json.loads(data)["i"]] = (shard, user["kinesis"]["sequenceNumber"])
            position = ("AFTER_SEQUENCE_NUMBER", records[-1]["SequenceNumber"])
    return where, order


def check(name, where, shards, success_log, on_failure, stats, kinesis_records, started, per_key=False):
    """Asserts the per-user-record guarantees of one pass; returns the summary line. First
    successes follow sequence order within a shard, or with `per_key` (the concurrent mode)
    within each partition key of a shard."""
    lines = [json.loads(l) for l in open(success_log)] if os.path.exists(success_log) else []
    succeeded = {json.loads(l["data"])["i"] for l in lines}

    lost = [i for i in range(USER_RECORDS) if i not in succeeded and not in_on_failure(where, on_failure, i)]
    assert not lost, f"{name}: user records neither processed nor in an on-failure batch: {lost[:20]}"
    for i in POISON:
        assert i not in succeeded and in_on_failure(where, on_failure, i), f"{name}: poison record {i}"
    # Transient failures can exhaust retries too: every failing user record of an aggregate
    # costs the whole aggregate a retry, and a killed process forgets the attempts it counted.
    transient = [f for f in on_failure
                 if not any(where[p][0] == f["shard"] and int(f["startSequenceNumber"]) <= int(where[p][1])
                            <= int(f["endSequenceNumber"]) for p in POISON)]
    exhausted = {i for i in range(USER_RECORDS) if i not in succeeded}
    seen, orders = set(), {}
    for l in lines:
        key = (l["seq"], l["sub"])
        if key not in seen:
            seen.add(key)
            group = (l["shard"], json.loads(l["data"])["user"] if per_key else None)
            orders.setdefault(group, []).append((int(l["seq"]), -1 if l["sub"] is None else l["sub"]))
    for group, order in orders.items():
        assert order == sorted(order), f"{name}: {group}: first successes out of sequence order"
    types = "".join(f" ({n} {t})" for t, n in stats.error_types.items())
    return (f"{name}: {USER_RECORDS} user records in {kinesis_records} Kinesis records over {SHARDS} shards; "
            f"{len(succeeded)} processed successfully, {len(lines) - len(succeeded)} duplicate deliveries, "
            f"{len(exhausted)} never processed, all in {len(on_failure)} on-failure batches "
            f"({len(POISON)} poison records, {len(transient)} batches exhausted by transient failures); "
            f"{stats.invocations} invocations, {stats.partial} partial failures, {stats.errors} function errors{types}, "
            f"{stats.timeouts} timeouts, {stats.kills} kills; {time.time() - started:.1f} s")


def in_on_failure(where, on_failure, i):
    shard, seq = where[i]
    return any(f["shard"] == shard and int(f["startSequenceNumber"]) <= int(seq) <= int(f["endSequenceNumber"])
               for f in on_failure)


def check_windows(where, order, window_log, on_failure, discarded, stats):
    """Each window's result counts every user record of the window exactly once, except those
    of on-failure batches, which it does not count; a retried final invocation emits the same
    result again; a discarded window emits none."""
    assert stats.no_state == 0, f"{stats.no_state} responses without a state"
    results = {}
    for l in (json.loads(l) for l in open(window_log)) if os.path.exists(window_log) else []:
        assert not l["cutBySize"] and not l["terminatedEarly"], l
        results.setdefault((l["shard"], l["start"]), []).append(l["counts"])
    windows = {}
    for shard, seqs in order.items():
        for k in range(0, (len(seqs) + WINDOW_RECORDS - 1) // WINDOW_RECORDS):
            window = set(seqs[k * WINDOW_RECORDS:(k + 1) * WINDOW_RECORDS])
            expected = {str(i): 1 for i, (s, seq) in where.items()
                        if s == shard and seq in window and not in_on_failure(where, on_failure, i)}
            windows[(shard, window_bounds(k)[0])] = expected
    assert set(results) <= set(windows), f"results of unknown windows: {set(results) - set(windows)}"
    emitted_again = 0
    for key, expected in windows.items():
        if key in discarded:
            assert key not in results, f"{key}: a discarded window emitted a result"
            continue
        assert key in results, f"{key}: the window emitted no result"
        first, *again = results[key]
        assert all(r == first for r in again), f"{key}: its results differ"
        emitted_again += len(again)
        missing = sorted(set(expected) - set(first), key=int)
        extra = {i: n for i, n in first.items() if expected.get(i) != n}
        assert not missing and not extra, f"{key}: not counted: {missing[:20]}; miscounted: {dict(list(extra.items())[:20])}"
    return (f"{len(windows)} windows, each counting its user records exactly once "
            f"(but those of on-failure batches, never); {emitted_again} results emitted again by retried "
            f"final invocations, {len(discarded)} windows discarded")


def main():
    os.makedirs(WORK, exist_ok=True)
    for f in os.listdir(WORK):
        os.remove(os.path.join(WORK, f))
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
        where, order = placements(client, shards)
        assert sorted(where) == list(range(USER_RECORDS)), "a user record did not reach the stream"

        api = RuntimeApi()
        success_log = os.path.join(WORK, "successes.ndjson")
        function = Function(api, success_log)
        on_failure, stats = [], Stats()
        for shard in shards:
            consume(client, api, function, shard, on_failure, stats)
        function.proc.kill()
        print(check("e2e", where, shards, success_log, on_failure, stats, kinesis_records, started))

        # The same stream again through tumbling windows, in the concurrent mode.
        started = time.time()
        success_log = os.path.join(WORK, "window-successes.ndjson")
        window_log = os.path.join(WORK, "windows.ndjson")
        function = Function(api, success_log, {"E2E_WINDOW_LOG": window_log, "DEAGG_MODE": "concurrent"})
        on_failure, stats, discarded = [], Stats(), set()
        for shard in shards:
            consume_windows(client, api, function, shard, order[shard], on_failure, stats, discarded)
        function.proc.kill()
        summary = check("e2e windows", where, shards, success_log, on_failure, stats, kinesis_records, started,
                        per_key=True)
        print(f"{summary}; {check_windows(where, order, window_log, on_failure, discarded, stats)}")
    finally:
        if function:
            function.proc.kill()
        server.send_signal(signal.SIGTERM)


if __name__ == "__main__":
    main()
