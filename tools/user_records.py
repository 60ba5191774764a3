"""Prints deterministic JSON lines of user records for `kinesis-deagg aggregate`.

  user_records.py --bytes N --size S   about N bytes of JSON user records of about S bytes each
"""
import argparse
import json
import random

p = argparse.ArgumentParser()
p.add_argument("--bytes", type=int, required=True)
p.add_argument("--size", type=int, default=200)
p.add_argument("--seed", type=int, default=7)
args = p.parse_args()

rng = random.Random(args.seed)
total = 0
i = 0
while total < args.bytes:
    body = {"id": i, "user": f"user-{rng.randrange(10_000)}", "event": rng.choice(["view", "click", "buy"])}
    pad = max(0, args.size - len(json.dumps(body)) - 12)
    body["pad"] = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(pad))
    text = json.dumps(body, separators=(",", ":"))
    print(json.dumps({"partitionKey": body["user"], "text": text}))
    total += len(text)
    i += 1
