"""moto's S3, for the Firehose sink tests: `create PORT BUCKET` makes a bucket; `read PORT BUCKET`
prints every object's body as one JSON list of base64 strings, by key."""
import base64
import json
import sys

import boto3

command, port, bucket = sys.argv[1:4]
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
if command == "create":
    s3.create_bucket(Bucket=bucket)
else:
    keys = sorted(o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                  for o in page.get("Contents", []))
    print(json.dumps([base64.b64encode(s3.get_object(Bucket=bucket, Key=k)["Body"].read()).decode()
                      for k in keys]))
