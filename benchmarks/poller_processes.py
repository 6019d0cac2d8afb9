"""``worker poll --processes 1`` against ``--processes 2``: rows/s to drain one queue.

    python -m benchmarks.poller_processes [--rows 200000] [--messages 16]

SQS and S3 are moto (its own process; keep the queue shallow, moto's SQS slows
as it fills); DynamoDB is the fast sink, so the poller's CPU is the limit.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from typing import Any

import boto3
import orjson

from benchmarks.servers import ROOT, local_aws_env, moto_process, sink_process
from worker.entry.sample import sample_file


def drain(processes: int, queue_url: str, env: dict[str, str], messages: list[str]) -> float:
    sqs = boto3.client("sqs")
    for body in messages:
        sqs.send_message(QueueUrl=queue_url, MessageBody=body)
    command = [
        sys.executable,
        "-m",
        "worker",
        "poll",
        "--processes",
        str(processes),
        "--queue-url",
        queue_url,
    ]
    start = time.perf_counter()
    poller = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    while True:
        attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=names)
        if all(v == "0" for v in attributes["Attributes"].values()):
            break
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    poller.send_signal(signal.SIGTERM)
    poller.wait(60)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--messages", type=int, default=16)
    args = parser.parse_args()
    with moto_process() as moto, sink_process() as sink, local_aws_env(moto):
        env = {
            **os.environ,
            "AWS_ENDPOINT_URL_DYNAMODB": sink,
            "LOG_LEVEL": "ERROR",
            "POLL_WAIT_S": "1",
            "HEALTH_FILE": "/tmp/bench-health",
        }
        s3, sqs = boto3.client("s3"), boto3.client("sqs")
        s3.create_bucket(Bucket="bench")
        per_file = args.rows // args.messages
        bodies = []
        for index in range(args.messages):
            data = sample_file(
                rows=per_file, tables=4, seed=index, names=[f"p_{i}" for i in range(4)]
            )
            s3.put_object(Bucket="bench", Key=f"f{index}.pb", Body=data.SerializeToString())
            bodies.append(orjson.dumps({"bucket": "bench", "key": f"f{index}.pb"}).decode())
        queue_url = sqs.create_queue(QueueName="bench", Attributes={"VisibilityTimeout": "120"})[
            "QueueUrl"
        ]
        results: dict[int, Any] = {}
        for processes in (1, 2):
            seconds = drain(processes, queue_url, env, bodies)
            results[processes] = per_file * args.messages / seconds
            print(
                f"--processes {processes}: {results[processes]:,.0f} rows/s ({seconds:.1f} s)",
                flush=True,
            )
        print(f"ratio 2/1: {results[2] / results[1]:.2f}x")


if __name__ == "__main__":
    main()
