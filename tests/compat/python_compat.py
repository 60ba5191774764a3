"""Drives the official Python aggregation module for tests/cross_compat.rs.

  python_compat.py aggregate    JSON lines of user records on stdin -> JSON lines of Kinesis records
  python_compat.py deaggregate  a Lambda Kinesis event on stdin     -> JSON lines of user records
  python_compat.py hashkey      JSON lines of user records on stdin -> JSON lines {"hashKey"}

User records: {"partitionKey", "explicitHashKey" (or null), "data" (base64)}.
"""
import base64
import hashlib
import json
import sys

import aws_kinesis_agg.aggregator
from aws_kinesis_agg.aggregator import AggRecord, RecordAggregator
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


class _Py2Byte:
    """One byte of a digest as Python 2 indexed one: a string with `.encode('hex')`."""

    def __init__(self, value):
        self.value = value

    def encode(self, codec):
        assert codec == "hex"
        return "%02x" % self.value


class _Py2Md5:
    def __init__(self):
        self.inner = hashlib.md5()

    def update(self, data):
        self.inner.update(data)

    def digest(self):
        return [_Py2Byte(b) for b in self.inner.digest()]


class _Py2Hashlib:
    md5 = _Py2Md5


def hashkey():
    """The hash key Kinesis maps each user record to, as the module sends it: the explicit hash
    key it puts on the aggregate of that one record, else its KPL hash of the partition key.

    That hash (`AggRecord._create_explicit_hash_key`) was written for Python 2: indexing its
    digest gives ints on Python 3, which have no `.encode('hex')`. It runs here with a digest
    whose bytes index as Python 2's did; its arithmetic is the module's own."""
    for line in sys.stdin:
        if not line.strip():
            continue
        u = json.loads(line)
        agg = RecordAggregator()
        agg.add_user_record(u["partitionKey"], b"x", u.get("explicitHashKey"))
        pk, ehk, _ = agg.clear_and_get().get_contents()
        if not ehk:
            aws_kinesis_agg.aggregator.hashlib = _Py2Hashlib
            try:
                ehk = AggRecord._create_explicit_hash_key(pk.encode("utf-8")).decode()
            finally:
                aws_kinesis_agg.aggregator.hashlib = hashlib
        emit({"hashKey": ehk})


{"aggregate": aggregate, "deaggregate": deaggregate, "hashkey": hashkey}[sys.argv[1]]()
