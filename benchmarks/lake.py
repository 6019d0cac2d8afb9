"""The CDC lake apply: throughput, and how a run's time grows with the table.

    python -m benchmarks.lake [--sizes 100000,1000000] [--keys 10000] [--runs 10]

1. **Throughput**: ``--sizes`` changes over ``--keys`` keys (70% updates, 20%
   inserts, 10% deletes, every key's history in sequence order), written as
   parts of 10,000 changes to moto's S3, applied in one ``lake apply`` into a
   fresh local Delta table. Changes per second, whole apply (list, read, check,
   dedupe, tombstones, MERGE, progress).
2. **Growth**: ``--runs`` applies of 20,000 changes each (half new keys, half
   updates), into one table, once without and once with ``lake maintain``
   (retention 0) after every run: seconds per run and files in the table.

moto stands in for S3 (one process on loopback); the Delta tables are local.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import boto3
import orjson

from benchmarks.servers import local_aws_env, moto_process
from worker.cdc.lake import apply_changes
from worker.cdc.maintain import maintain
from worker.core import log
from worker.core.aws import Clients

BUCKET = "lake-bench"
PART = 10_000
NOW_MS = int(time.time() * 1000) - 3_600_000  # recent: tombstones stay within retention


def change(key: int, sequence: int, kind: str, rng: random.Random) -> dict[str, Any]:
    image = None
    if kind != "REMOVE":
        image = {"id": f"k{key}", "amount": round(rng.uniform(0, 1e4), 2),
                 "qty": rng.randint(1, 500), "status": rng.choice(["new", "paid", "shipped"]),
                 "tags": ["a", "b"], "note": "x" * rng.randint(0, 40)}  # fmt: skip
    return {
        "event_name": kind, "event_id": f"ev-{sequence}", "sequence_number": str(sequence),
        "approx_creation_time_ms": NOW_MS + sequence % 1_000_000, "size_bytes": 200,
        "source_table": "orders", "keys": {"id": f"k{key}"}, "new_image": image,
        "old_image": None, "is_deleted": kind == "REMOVE", "ttl_expired": False,
        "ingest_ts_ms": 1_763_700_000_000,
    }  # fmt: skip


def changes(count: int, keys: range, start: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    live: set[int] = set()
    out = []
    for i in range(count):
        key = rng.choice(keys)
        roll = rng.random()
        kind = "REMOVE" if key in live and roll < 0.1 else ("MODIFY" if key in live else "INSERT")
        (live.discard if kind == "REMOVE" else live.add)(key)
        out.append(change(key, start + i, kind, rng))
    return out


def put_parts(s3: Any, prefix: str, batch: list[dict[str, Any]]) -> None:
    for first in range(0, len(batch), PART):
        chunk = batch[first : first + PART]
        body = gzip.compress(b"".join(orjson.dumps(c) + b"\n" for c in chunk), compresslevel=1)
        name = f"{prefix}/dt=2026-11-22/hour=00/part-{chunk[0]['sequence_number']}.json.gz"
        s3.put_object(Bucket=BUCKET, Key=name, Body=body)


def apply(source: str, target: str) -> tuple[float, int]:
    async def run() -> tuple[float, int]:
        async with Clients(max_in_flight=8) as clients:
            start = time.perf_counter()
            result = await apply_changes(clients.s3, source, target)
            return time.perf_counter() - start, result.changes

    return asyncio.run(run())


def throughput(s3: Any, sizes: list[int], keys: int, work: Path) -> None:
    print("throughput: one apply into a fresh table")
    for size in sizes:
        prefix = f"cdc/throughput-{size}"
        put_parts(s3, prefix, changes(size, range(keys), 1_000_000, seed=size))
        seconds, applied = apply(f"s3://{BUCKET}/{prefix}", str(work / f"t{size}"))
        assert applied == size
        print(f"  {size:>9,} changes over {keys:,} keys: {seconds:7.2f} s "
              f"= {size / seconds:>9,.0f} changes/s", flush=True)  # fmt: skip


def growth(s3: Any, runs: int, work: Path) -> None:
    print(f"growth: {runs} runs of 20,000 changes into one table")
    for maintained in (False, True):
        prefix = f"cdc/growth-{maintained}"
        target = work / f"g{maintained}"
        times, files = [], []
        for run in range(runs):
            keys = range(run * 10_000, (run + 1) * 10_000 + 10_000)  # half old, half new
            put_parts(s3, prefix, changes(20_000, keys, 10_000_000 + run * 20_000, seed=run))
            seconds, _ = apply(f"s3://{BUCKET}/{prefix}", str(target))
            if maintained:
                maintain(str(target), retention_hours=0, tombstone_retention_hours=168)
            times.append(seconds)
            files.append(len(list(target.glob("*.parquet"))))
        label = "with maintain" if maintained else "without      "
        print(f"  {label}: s/run " + " ".join(f"{t:.2f}" for t in times)
              + f"; parquet files after: {files[-1]}", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    log.configure("WARNING")
    work = Path(tempfile.mkdtemp(prefix="lake-bench-"))
    try:
        with moto_process() as moto, local_aws_env(moto):
            s3 = boto3.client("s3")
            s3.create_bucket(Bucket=BUCKET)
            throughput(s3, [int(s) for s in args.sizes.split(",")], args.keys, work)
            growth(s3, args.runs, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
