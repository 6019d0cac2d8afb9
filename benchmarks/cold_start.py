"""Cold start: ``import lambda_entry``, then the first and a warm SQS event, in a fresh process.

    python -m benchmarks.cold_start [--runs 3]

moto (its own process) stands in for S3 and DynamoDB; the event names a
100-row object, so the first event includes opening the clients and creating
the table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import boto3

from benchmarks.servers import ROOT, local_aws_env, moto_process
from worker.entry.sample import sample_file

CHILD = """
import time
t0 = time.perf_counter()
import lambda_entry
t1 = time.perf_counter()

class Context:
    aws_request_id = "cold-start"

    def get_remaining_time_in_millis(self):
        return 60_000

body = '{"bucket": "cold-start", "key": "k.pb"}'
event = {"Records": [{"messageId": "m1", "body": body, "eventSource": "aws:sqs",
                      "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:q"}]}
first = lambda_entry.handler(event, Context())
t2 = time.perf_counter()
lambda_entry.handler(event, Context())
t3 = time.perf_counter()
assert first == {"batchItemFailures": []}, first
print(f"RESULT import {1000 * (t1 - t0):.0f} ms, first event {1000 * (t2 - t1):.0f} ms, "
      f"import + first event {1000 * (t2 - t0):.0f} ms, warm event {1000 * (t3 - t2):.0f} ms")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with moto_process() as moto, local_aws_env(moto):
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="cold-start")
        data = sample_file(rows=100, tables=1).SerializeToString()
        s3.put_object(Bucket="cold-start", Key="k.pb", Body=data)
        env = {**os.environ, "LOG_LEVEL": "ERROR"}
        for _ in range(args.runs):
            done = subprocess.run(
                [sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True
            )
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT")]
            print(lines[0][7:] if lines else f"failed: {done.stderr.strip()[-300:]}")


if __name__ == "__main__":
    main()
