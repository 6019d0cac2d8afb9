"""The Streams buffer's encoding against the seed-style one, on 1,000-record batches.

    python -m benchmarks.stream_buffer [--batches 20]

Both turn the same Lambda DynamoDB Streams batch into gzipped NDJSON bytes:
- **worker**: ``envelope`` (our own image converter) + ``plan_parts`` (orjson,
  gzip, grouping by hour, content-derived names);
- **seed-style**: boto3's ``TypeDeserializer`` on every image, ``json.dumps``
  (``Decimal`` via ``default=str``), ``gzip.compress``.
S3 is left out: the same PUTs follow either way.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import time
from typing import Any

from boto3.dynamodb.types import TypeDeserializer

from worker.cdc.buffer import envelope, plan_parts
from worker.core.config import StreamSettings

ARN = "arn:aws:dynamodb:us-east-1:123456789012:table/orders/stream/2026-01-01T00:00:00.000"


def make_batch(size: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    records = []
    for i in range(size):
        image = {
            "id": {"S": f"order-{seed}-{i}"},
            "amount": {"N": f"{rng.uniform(0, 10_000):.2f}"},
            "quantity": {"N": str(rng.randint(1, 500))},
            "customer": {"S": rng.choice(["Ann", "Bob", "Zoë", "José"])},
            "status": {"S": rng.choice(["new", "paid", "shipped"])},
            "created_at": {"N": str(1_763_700_000_000 + i)},
            "paid": {"BOOL": rng.random() < 0.5},
            "tags": {"SS": rng.sample(["a", "b", "c", "d", "e"], 3)},
            "address": {"M": {"city": {"S": "Lisbon"}, "zip": {"S": "1000-001"}}},
            "lines": {"L": [{"M": {"sku": {"S": "x"}, "n": {"N": "2"}}}]},
        }
        records.append(
            {
                "eventID": f"ev-{seed}-{i}",
                "eventName": "MODIFY",
                "eventSource": "aws:dynamodb",
                "eventSourceARN": ARN,
                "dynamodb": {
                    "ApproximateCreationDateTime": 1_763_700_000 + i // 100,
                    "Keys": {"id": image["id"]},
                    "NewImage": image,
                    "OldImage": image,
                    "SequenceNumber": str(1_100_000_000_000_000_000_000 + seed * size + i),
                    "SizeBytes": 400,
                },
            }
        )
    return records


def worker_encode(records: list[dict[str, Any]]) -> int:
    now = int(time.time() * 1000)
    parts = plan_parts([envelope(r, now) for r in records], StreamSettings(bucket="b"))
    return sum(len(p.body()) for p in parts)


def seed_encode(records: list[dict[str, Any]]) -> int:
    deserializer = TypeDeserializer()
    lines = []
    for record in records:
        change = record["dynamodb"]
        doc = {
            "eventName": record["eventName"],
            "eventID": record["eventID"],
            "keys": {k: deserializer.deserialize(v) for k, v in change["Keys"].items()},
            "new": {k: deserializer.deserialize(v) for k, v in change.get("NewImage", {}).items()},
            "old": {k: deserializer.deserialize(v) for k, v in change.get("OldImage", {}).items()},
            "sequence_number": change["SequenceNumber"],
        }
        lines.append(json.dumps(doc, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    return len(gzip.compress("\n".join(lines).encode()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--size", type=int, default=1000)
    args = parser.parse_args()
    batches = [make_batch(args.size, seed) for seed in range(args.batches)]
    timings: dict[str, float] = {}
    for name, encode in (("worker", worker_encode), ("seed-style", seed_encode)):
        encode(batches[0])  # warm up
        start = time.perf_counter()
        for batch in batches:
            encode(batch)
        timings[name] = time.perf_counter() - start
    records = args.batches * args.size
    for name, seconds in timings.items():
        print(f"{name:<11} {records / seconds:>10,.0f} records/s")
    print(f"ratio       {timings['seed-style'] / timings['worker']:>10.1f}x")


if __name__ == "__main__":
    main()
