"""The official Python deaggregator doing the handler's work on each event file: parse the
JSON, deaggregate (base64 + MD5 + protobuf), read every user record's bytes, build the
response. Prints one JSON line per file with the median of 30 runs (after 3 warm-ups)."""
import base64
import json
import sys
import time

from aws_kinesis_agg.deaggregator import iter_deaggregate_records

for path in sys.argv[1:]:
    body = open(path, "rb").read()
    times = []
    for run in range(33):
        start = time.perf_counter()
        event = json.loads(body)
        n = 0
        for user in iter_deaggregate_records(event["Records"]):
            base64.b64decode(user["kinesis"]["data"])
            n += 1
        json.dumps({"batchItemFailures": []})
        if run >= 3:
            times.append((time.perf_counter() - start) * 1000)
    times.sort()
    print(json.dumps({"file": path, "median_ms": times[len(times) // 2], "user_records": n}))
