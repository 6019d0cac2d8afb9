"""Firehose dedupe throughput on one 500-record batch, against moto's server
(in its own process, so server and client do not share a GIL).

    python -m benchmarks.firehose_dedupe [--records 500] [--rounds 3]

Side by side, on the same server and the same records:
- **worker**: ``worker.firehose.transform.Transformer`` (one conditional PutItem per
  distinct key, ``DEDUPE_CONCURRENCY`` at once);
- **seed-style**: for each record in turn, ``get_item`` then ``put_item`` with
  boto3 (the read-then-write that races, as the original sketch did it).
"""

from __future__ import annotations

import argparse
import base64
import statistics
import time
from typing import Any

import boto3
import orjson
import uvloop

from benchmarks.servers import local_aws_env, moto_process
from worker.core import log
from worker.core.aws import Clients
from worker.core.config import FirehoseSettings, Settings
from worker.firehose.transform import Transformer, setup_cache_table

ARN = "arn:aws:firehose:us-east-1:123456789012:deliverystream/bench"


def make_event(count: int, round_: int) -> dict[str, Any]:
    records = []
    for i in range(count):
        doc = {"event_uuid": f"{round_}-{i}", "event_name": "order.created", "created_at": 1.7e9}
        records.append({"recordId": f"r{i}", "data": base64.b64encode(orjson.dumps(doc)).decode()})
    return {"deliveryStreamArn": ARN, "records": records}


async def worker_round(event: dict[str, Any], table: str) -> float:
    settings = Settings.from_env()
    async with Clients.from_settings(settings) as clients:
        await setup_cache_table(clients.dynamodb, table)
        transformer = Transformer(clients.dynamodb_writes, FirehoseSettings(cache_table=table))
        start = time.perf_counter()
        response = await transformer.transform(event)
        seconds = time.perf_counter() - start
    assert all(r["result"] == "Ok" for r in response["records"])
    return seconds


def seed_round(event: dict[str, Any], table: str) -> float:
    client = boto3.client("dynamodb")
    client.create_table(
        TableName=table,
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
    )
    start = time.perf_counter()
    for record in event["records"]:
        doc = orjson.loads(base64.b64decode(record["data"]))
        key = f"{doc['event_uuid']}|{doc['event_name']}|{doc['created_at']}"
        if "Item" not in client.get_item(TableName=table, Key={"pk": {"S": key}}):
            client.put_item(TableName=table, Item={"pk": {"S": key}})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    log.configure("WARNING")
    with moto_process() as endpoint, local_aws_env(endpoint):
        ours, seed = [], []
        for round_ in range(args.rounds):
            event = make_event(args.records, round_)
            ours.append(uvloop.run(worker_round(event, f"w{round_}")))
            seed.append(seed_round(event, f"s{round_}"))
    worker_rate = args.records / statistics.median(ours)
    seed_rate = args.records / statistics.median(seed)
    print(f"worker     {worker_rate:8,.0f} records/s (median of {args.rounds})")
    print(f"seed-style {seed_rate:8,.0f} records/s")
    print(f"ratio      {worker_rate / seed_rate:8.1f}x")


if __name__ == "__main__":
    main()
