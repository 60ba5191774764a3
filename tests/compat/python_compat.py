"""Drives the official Python aggregation module for tests/cross_compat.rs.

  python_compat.py aggregate    JSON lines of user records on stdin -> JSON lines of Kinesis records
  python_compat.py deaggregate  a Lambda Kinesis event on stdin     -> JSON lines of user records

User records: {"partitionKey", "explicitHashKey" (or null), "data" (base64)}.
"""
import base64
import json
import sys

from aws_kinesis_agg.aggregator import RecordAggregator
from aws_kinesis_agg.deaggregator import deaggregate_records


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")


def kinesis_record(agg_record):
    pk, ehk, data = agg_record.get_contents()
    emit({"partitionKey": pk, "explicitHashKey": ehk, "data": base64.b64encode(data).decode()})


def aggregate():
    agg = RecordAggregator()
    for line in sys.stdin:
        if not line.strip():
            continue
        u = json.loads(line)
        data = base64.b64decode(u["data"])
        full = agg.add_user_record(u["partitionKey"], data, u.get("explicitHashKey"))
        if full is not None:
            kinesis_record(full)
    if agg.get_num_user_records():
        kinesis_record(agg.clear_and_get())


def deaggregate():
    event = json.load(sys.stdin)
    for r in deaggregate_records(event["Records"]):
        k = r["kinesis"]
        data = k["data"]
        emit({
            "sequenceNumber": k["sequenceNumber"],
            "subSequenceNumber": k.get("subSequenceNumber"),
            "partitionKey": k["partitionKey"],
            "explicitHashKey": k.get("explicitHashKey"),
            "data": data.decode() if isinstance(data, bytes) else data,
        })


{"aggregate": aggregate, "deaggregate": deaggregate}[sys.argv[1]]()
