"""The run ledger's costs, against moto in its own process.

    python -m benchmarks.ledger [--files 10000] [--tracked 200]

1. **Registration and dispatch**: a run of ``--files`` files. ``POST /runs``
   with 5 s left (as through a Lambda function at its deadline) answers within
   them; the sweep then resumes the dispatch until the run is sealed (list the
   prefix, register every file, send every message): files per second.
2. **The ledger's overhead on the loader path**: the same ``--tracked`` small
   files loaded twice by one loader, once as plain messages and once as a
   run's messages (begin, fetched, the exactly-once transaction, the
   completion check); the difference per file, in milliseconds. Both passes
   write the same rows, so the difference is the ledger alone.

moto is not DynamoDB: its per-call latency (a few ms, one CPU) is the unit
here, so read the figures as calls' worth, not as production latency.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import os
import threading
import time
from typing import Any

import boto3
import orjson

from benchmarks.servers import local_aws_env, moto_process
from worker.core import log
from worker.core.aws import Clients
from worker.core.config import LedgerSettings, Settings
from worker.entry.runtime import make_api, make_loader
from worker.entry.sample import sample_file
from worker.ledger.api import Request
from worker.ledger.store import setup_tables
from worker.loader.batch import handle_batch

BUCKET = "ledger-bench"


def _records(sqs: Any, queue_url: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    while True:
        got = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages", [])
        if not got:
            return records
        for message in got:
            records.append(
                {
                    "messageId": message["MessageId"],
                    "body": message["Body"],
                    "eventSource": "aws:sqs",
                    "eventSourceARN": "arn:aws:sqs:::q",
                }
            )
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])


def _drain(queue_url: str, stop: threading.Event, bodies: list[dict[str, Any]]) -> None:
    sqs = boto3.client("sqs")
    while True:
        got = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages", [])
        if got:
            entries = [
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(got)
            ]
            sqs.delete_message_batch(QueueUrl=queue_url, Entries=entries)
            bodies += [orjson.loads(m["Body"]) for m in got]
        elif stop.is_set():
            return


async def _load(settings: Settings, records: list[dict[str, Any]]) -> float:
    async with Clients.from_settings(settings) as clients:
        loader = make_loader(settings, clients)
        start = time.perf_counter()
        report = await handle_batch(loader, records, deadline=time.monotonic() + 3600)
        seconds = time.perf_counter() - start
    assert not report.failures, report.failures
    return seconds


def _http(method: str, path: str, body: Any = None) -> dict[str, Any]:
    return {"version": "2.0", "rawPath": path, "requestContext": {"http": {"method": method}},
            "body": None if body is None else orjson.dumps(body).decode()}  # fmt: skip


def _dispatch(settings: Settings, files: int, queue: str, sweep_s: float) -> None:
    """Part 1 through ``lambda_entry.handler``: the answer with 5 s left, then the
    scheduled sweep (30 s an invocation) until the run is sealed or ``sweep_s`` is
    over: the rate, and every file counted once and sent once."""
    import lambda_entry
    from worker.entry.runtime import Runtime

    runtime = lambda_entry._runtime = Runtime(settings)
    handler = lambda_entry.handler
    location = {"location": f"s3://{BUCKET}/big/{{businessDate}}/"}
    assert handler(_http("PUT", "/datasets/big", location), _Context(5000))["statusCode"] == 200
    # moto's SQS walks every message of a queue on each send: keep the queue short
    # (as the loaders would), or the figure is moto's quadratic cost, not ours
    draining = threading.Event()
    drained: list[dict[str, Any]] = []
    drainer = threading.Thread(target=_drain, args=(queue, draining, drained))
    drainer.start()
    start = time.perf_counter()
    body = {"datasetName": "big", "businessDate": "2026-11-21"}
    answer = handler(_http("POST", "/runs", body), _Context(5000))
    answered = time.perf_counter() - start
    created = orjson.loads(answer["body"])
    sweeps = 0
    while True:
        run = orjson.loads(
            handler(_http("GET", f"/runs/{created['runId']}"), _Context(5000))["body"]
        )
        if run["status"] != "pending" or time.perf_counter() - start > sweep_s:
            break
        handler(_SCHEDULED, _Context(30_000))  # the sweep, as EventBridge calls it
        sweeps += 1
    seconds = time.perf_counter() - start
    draining.set()
    drainer.join()
    runtime.close()
    done = run["resolvedFiles"]
    assert answer["statusCode"] == 201 and answered < 5, (answer, answered)
    assert run["status"] == "pending" or done == files, run
    # every counted file was sent once (a paused step's files may be sent again: none here)
    assert len({b["file_id"] for b in drained}) == len(drained) >= done, (len(drained), done)
    print(f"POST /runs of {files:,} files through lambda_entry.handler with 5 s left: answered "
          f"in {answered:.2f} s ({created['status']}, {created['resolvedFiles']:,} files so far);"
          f" then {sweeps} scheduled sweeps (30 s each): {done:,} files registered and sent in "
          f"{seconds:.1f} s = {done / seconds:,.0f} files/s; run {run['status']}")  # fmt: skip


async def run(files: int, tracked: int, settings: Settings, queue: str) -> None:
    s3, sqs = boto3.client("s3"), boto3.client("sqs")
    ledger = settings.ledger
    data = sample_file(rows=20, tables=1, names=["t"]).SerializeToString()
    for index in range(tracked):
        s3.put_object(Bucket=BUCKET, Key=f"small/2026-11-21/f{index:05d}.pb", Body=data)
    plain = [{"messageId": f"p{i}", "body": orjson.dumps({"bucket": BUCKET,
              "key": f"small/2026-11-21/f{i:05d}.pb"}).decode(), "eventSource": "aws:sqs",
              "eventSourceARN": "arn:aws:sqs:::q"} for i in range(tracked)]  # fmt: skip
    untracked = dataclasses.replace(settings, ledger=LedgerSettings())
    await _load(untracked, plain)  # tables created, caches warm: both passes start equal
    without = await _load(untracked, plain)
    # fresh ledger tables: moto copies every table on each transaction, so the
    # big run's rows would weigh on it (DynamoDB's cost does not grow with size)
    small = dataclasses.replace(
        ledger, run_table="s-runs", file_table="s-files", dataset_table="s-datasets"
    )
    settings = dataclasses.replace(settings, ledger=small)
    async with Clients.from_settings(settings) as clients:
        await setup_tables(clients.dynamodb, small)
        api = make_api(settings, clients)
        body = orjson.dumps({"location": f"s3://{BUCKET}/small/{{businessDate}}/"})
        await api.handle(Request("PUT", "/datasets/small", body=body))
        body = orjson.dumps({"datasetName": "small", "businessDate": "2026-11-21"})
        await api.handle(Request("POST", "/runs", body=body))
    with_ledger = await _load(settings, _records(sqs, queue))
    per_file = (with_ledger - without) * 1000 / tracked
    print(f"loader path, {tracked} files of 20 rows: {without * 1000 / tracked:.1f} ms/file "
          f"without the ledger, {with_ledger * 1000 / tracked:.1f} ms/file with it: "
          f"ledger overhead {per_file:.1f} ms/file ({with_ledger / without:.2f}x)")  # fmt: skip


def main() -> None:
    log.configure(os.environ.get("BENCH_LOG", "WARNING"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--tracked", type=int, default=200)
    parser.add_argument("--sweep-s", type=float, default=120, help="sweep for at most this")
    args = parser.parse_args()
    with moto_process() as moto, local_aws_env(moto):
        s3, sqs = boto3.client("s3"), boto3.client("sqs")
        s3.create_bucket(Bucket=BUCKET)
        queue = sqs.create_queue(QueueName="ledger-bench")["QueueUrl"]
        ledger = LedgerSettings(run_table="b-runs", file_table="b-files",
                                dataset_table="b-datasets", loader_queue_url=queue)  # fmt: skip
        settings = dataclasses.replace(Settings.from_env(), schema_prefix="bench", ledger=ledger)
        print(f"putting {args.files:,} objects into moto...", flush=True)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            keys = [f"big/2026-11-21/f{index:05d}.pb" for index in range(args.files)]
            list(pool.map(lambda key: s3.put_object(Bucket=BUCKET, Key=key, Body=b"x"), keys))
        asyncio.run(_setup(ledger))
        _dispatch(settings, args.files, queue, args.sweep_s)
        asyncio.run(run(args.files, args.tracked, settings, queue))


async def _setup(ledger: LedgerSettings) -> None:
    async with Clients(max_in_flight=4) as clients:
        await setup_tables(clients.dynamodb, ledger)


class _Context:
    def __init__(self, remaining_ms: int) -> None:
        self._until = time.monotonic() + remaining_ms / 1000
        self.aws_request_id = "bench"

    def get_remaining_time_in_millis(self) -> int:
        return int((self._until - time.monotonic()) * 1000)


_SCHEDULED = {"version": "0", "detail-type": "Scheduled Event", "source": "aws.events",
              "detail": {}}  # fmt: skip


if __name__ == "__main__":
    main()
