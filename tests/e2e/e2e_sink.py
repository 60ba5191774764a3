"""End to end through the Kinesis sink: nothing is lost between two streams.

Starts kinesalite on 127.0.0.1 with a source stream and a destination stream, puts user
records into the source (plain, aggregated by the official Python aggregator and by ours, as
tests/e2e/e2e.py does), and consumes every source shard with the model of Lambda's event
source mapping of e2e.py, invoking the real release binary `kinesis-deagg` with
`DEAGG_SINK=kinesis`. The function reaches the destination through the fault proxy
(tests/e2e/fault_proxy.py): throttled entries and requests, 500s, reset connections and late
answers; the process is also killed mid-batch a few times.

Then the destination is read back and deaggregated with the official Python module. Asserted:
every source user record is at the destination, unless it lies in a batch named by an
on-failure record; every aggregate at the destination holds only user records that hash into
the shard it is on (what a KCL consumer keeps); per partition key, first arrivals at the
destination follow the source's order (an inversion is a user record first seen after a later
one of its key). Printed: records lost, duplicates, inversions.

    .venv/bin/python tests/e2e/e2e_sink.py [USER_RECORDS]   (make e2e-sink: 100,000; make e2e: 6,000)
"""
import base64
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402
from aws_kinesis_agg.deaggregator import iter_deaggregate_records  # noqa: E402

SOURCE, DESTINATION = "source", "destination"
SOURCE_SHARDS, DESTINATION_SHARDS = 3, 4
TIMEOUT_MS = 6000
# Late answers come after the sink's timeout (DEAGG_SINK_TIMEOUT_MS), so their records are
# written and sent again.
FAULTS = {"seed": 11, "entry_throttle": 0.15, "request_throttle": 0.05, "server_error": 0.03,
          "reset": 0.03, "delay": 0.02, "delay_ms": 1500}


class SinkFunction(e2e.Function):
    """kinesis-deagg itself, delivering to the destination through the fault proxy."""

    def __init__(self, api, proxy_port):
        self.proxy_port = proxy_port
        super().__init__(api, None)

    def start(self):
        env = dict(os.environ)
        env.update({
            "AWS_LAMBDA_RUNTIME_API": f"127.0.0.1:{self.api.port}",
            "AWS_LAMBDA_FUNCTION_NAME": "e2e-sink", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "256",
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST", "RUST_LOG": "warn",
            "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_ENDPOINT_URL_KINESIS": f"http://127.0.0.1:{self.proxy_port}",
            "DEAGG_TRANSFORM": "discard", "DEAGG_METRICS": "off", "DEAGG_DEADLINE_MARGIN_MS": "500",
            "DEAGG_SINK": "kinesis", "DEAGG_SINK_TARGET": DESTINATION, "DEAGG_SINK_TIMEOUT_MS": "1000",
            # Small aggregates: more entries per request, for the faults to hit.
            "DEAGG_SINK_AGGREGATE_MAX_BYTES": "4096",
        })
        self.starts += 1
        err = open(os.path.join(e2e.WORK, f"sink-function-{self.starts}.log"), "w")
        self.proc = subprocess.Popen([e2e.DEAGG], env=env, stdout=subprocess.DEVNULL, stderr=err)


def proxy(kinesalite_port):
    script = os.path.join(e2e.ROOT, "tests", "e2e", "fault_proxy.py")
    proc = subprocess.Popen([sys.executable, script, f"http://127.0.0.1:{kinesalite_port}", json.dumps(FAULTS)],
                            stdout=subprocess.PIPE, stderr=open(os.path.join(e2e.WORK, "proxy.log"), "w"), text=True)
    line = proc.stdout.readline().split()
    if line[:1] != ["listening"]:
        sys.exit("the fault proxy did not start")
    return proc, int(line[1])


def create(client, name, shards):
    client.create_stream(StreamName=name, ShardCount=shards)
    while client.describe_stream(StreamName=name)["StreamDescription"]["StreamStatus"] != "ACTIVE":
        time.sleep(0.05)
    return [(s["ShardId"], int(s["HashKeyRange"]["StartingHashKey"]), int(s["HashKeyRange"]["EndingHashKey"]))
            for s in client.describe_stream(StreamName=name)["StreamDescription"]["Shards"]]


def destination(client, shards):
    """The destination's user records in the order a consumer reads them, per shard, and the
    number of records and of user records found outside their aggregate's shard."""
    found, records, outside = [], 0, 0
    e2e.STREAM = DESTINATION
    for shard, start, end in shards:
        position = ("TRIM_HORIZON", None)
        while True:
            batch = e2e.read(client, shard, *position, limit=10000)
            if not batch:
                break
            records += len(batch)
            for user in iter_deaggregate_records([e2e.lambda_record(shard, r) for r in batch]):
                pk = user["kinesis"]["partitionKey"]
                if not start <= int(hashlib.md5(pk.encode()).hexdigest(), 16) <= end:
                    outside += 1
                found.append((pk, json.loads(base64.b64decode(user["kinesis"]["data"]))["i"]))
            position = ("AFTER_SEQUENCE_NUMBER", batch[-1]["SequenceNumber"])
    e2e.STREAM = SOURCE
    return found, records, outside


def main():
    user_records = int(sys.argv[1]) if len(sys.argv) > 1 else 6000
    e2e.USER_RECORDS, e2e.STREAM, e2e.POISON, e2e.TIMEOUT_MS = user_records, SOURCE, set(), TIMEOUT_MS
    os.makedirs(e2e.WORK, exist_ok=True)
    random.seed(11)
    started = time.time()
    server, client = e2e.kinesalite()
    kinesalite_port = int(client.meta.endpoint_url.rsplit(":", 1)[1])
    faults = function = None
    try:
        source_shards = [s for s, _, _ in create(client, SOURCE, SOURCE_SHARDS)]
        destination_shards = create(client, DESTINATION, DESTINATION_SHARDS)
        kinesis_records = e2e.produce(client)
        where, _ = e2e.placements(client, source_shards)
        assert sorted(where) == list(range(user_records)), "a user record did not reach the source"
        faults, proxy_port = proxy(kinesalite_port)
        api = e2e.RuntimeApi()
        function = SinkFunction(api, proxy_port)
        on_failure, stats = [], e2e.Stats()
        for shard in source_shards:
            e2e.consume(client, api, function, shard, on_failure, stats)
        found, records, outside = destination(client, destination_shards)
    finally:
        if function:
            function.proc.kill()
        if faults:
            faults.terminate()
            try:
                faults.wait(timeout=10)
            except subprocess.TimeoutExpired:
                faults.kill()
        server.send_signal(signal.SIGTERM)

    delivered = {i for _, i in found}

    def in_on_failure(i):
        shard, seq = where[i]
        return any(f["shard"] == shard and int(f["startSequenceNumber"]) <= int(seq) <= int(f["endSequenceNumber"])
                   for f in on_failure)

    lost = [i for i in range(user_records) if i not in delivered and not in_on_failure(i)]
    # A key's user records are all on one source shard: their order there is by sequence number,
    # then by place in the aggregate (which follows i).
    def source_order(i):
        return int(where[i][1]), i

    seen, inversions, last = set(), 0, {}
    for pk, i in found:
        if i in seen:
            continue
        seen.add(i)
        if pk in last and last[pk] > source_order(i):
            inversions += 1
        last[pk] = max(last.get(pk, source_order(i)), source_order(i))
    tally = next((json.loads(l[6:]) for l in open(os.path.join(e2e.WORK, "proxy.log")) if l.startswith("tally ")), {})
    print(f"e2e-sink: {user_records} user records in {kinesis_records} source records over {SOURCE_SHARDS} shards -> "
          f"{records} destination records over {DESTINATION_SHARDS} shards; {len(lost)} lost, "
          f"{len(found) - len(delivered)} duplicates, {inversions} order inversions within a partition key, "
          f"{user_records - len(delivered)} undelivered in {len(on_failure)} on-failure batches, "
          f"{outside} user records outside their aggregate's shard; {stats.invocations} invocations, "
          f"{stats.partial} partial failures, {stats.errors} function errors, {stats.timeouts} timeouts, "
          f"{stats.kills} kills; proxy faults {json.dumps({k: v for k, v in tally.items() if k not in ('requests',)})}; "
          f"{time.time() - started:.1f} s")
    assert not lost, f"user records neither delivered nor in an on-failure batch: {lost[:20]}"
    assert outside == 0, "user records in aggregates a KCL consumer drops"
    assert inversions == 0, "a partition key's user records reached the destination out of order"


if __name__ == "__main__":
    main()
