"""The lake's starting point and its stream-free source, measured.

    python -m benchmarks.bootstrap [--items 1000000] [--exports 5] [--changes 20000]

1. **Bootstrap**: a full export of ``--items`` items (8 gzip data files, laid
   out as DynamoDB writes them) in moto's S3, loaded by ``worker lake
   bootstrap`` in a child process into a local Delta table: items per second,
   CPU seconds, and the child's peak RSS (VmHWM).
2. **Incremental exports**: ``--exports`` incremental exports of ``--changes``
   changes each (updates, new keys, 10% deletes), applied on top by ``worker
   lake apply --source-format incremental-export`` in one child: changes per
   second and peak RSS.

moto stands in for S3 (one process on loopback); the Delta table is local.
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import boto3
import orjson

from benchmarks.servers import ROOT, local_aws_env, moto_process

BUCKET = "bootstrap-bench"
FILES = 8
MEASURED = """
import sys
from worker.entry.cli import main
code = main(sys.argv[1:])
with open("/proc/self/status") as status:
    sys.stderr.write("".join(line for line in status if line.startswith("VmHWM:")))
raise SystemExit(code)
"""


def item(key: int, rng: random.Random) -> dict[str, Any]:
    return {"id": {"S": f"k{key}"}, "amount": {"N": f"{rng.uniform(0, 1e4):.2f}"},
            "qty": {"N": str(rng.randint(1, 500))}, "status": {"S": rng.choice(["new", "paid"])},
            "tags": {"SS": ["a", "b"]}, "note": {"S": "x" * rng.randint(0, 40)}}  # fmt: skip


def stamp(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def put_export(s3: Any, export_id: str, lines: list[bytes], summary: dict[str, Any]) -> str:
    base = f"exports/AWSDynamoDB/{export_id}"
    listing = []
    for n in range(FILES):
        key = f"{base}/data/{n}.json.gz"
        chunk = lines[n::FILES]
        s3.put_object(Bucket=BUCKET, Key=key, Body=gzip.compress(b"\n".join(chunk), 1))
        listing.append(orjson.dumps({"itemCount": len(chunk), "dataFileS3Key": key}))
    s3.put_object(Bucket=BUCKET, Key=f"{base}/manifest-files.json", Body=b"\n".join(listing))
    summary = {**summary, "manifestFilesS3Key": f"{base}/manifest-files.json",
               "itemCount": len(lines), "outputFormat": "DYNAMODB_JSON",
               "exportArn": f"arn:aws:dynamodb:us-east-1:1:table/t/export/{export_id}",
               "tableArn": "arn:aws:dynamodb:us-east-1:1:table/t"}  # fmt: skip
    s3.put_object(Bucket=BUCKET, Key=f"{base}/manifest-summary.json", Body=orjson.dumps(summary))
    return f"s3://{BUCKET}/{base}"


def measured(*args: str) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (MB) of ``worker ARGS`` in a child."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", MEASURED, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=7200)  # fmt: skip
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    kb = next(int(x.split()[1]) for x in done.stderr.splitlines() if x.startswith("VmHWM:"))
    return wall, cpu, kb / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--exports", type=int, default=5)
    parser.add_argument("--changes", type=int, default=20_000)
    args = parser.parse_args()
    rng = random.Random(1)
    now_ms = int(time.time() * 1000) - 3_600_000
    with tempfile.TemporaryDirectory() as work, moto_process() as moto, local_aws_env(moto):
        os.environ["LOG_LEVEL"] = "WARNING"
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        lines = [orjson.dumps({"Item": item(k, rng)}) for k in range(args.items)]
        full = put_export(s3, "full", lines, {"exportTime": stamp(now_ms)})
        del lines
        target = str(Path(work) / "delta")
        wall, cpu, peak = measured("lake", "bootstrap", "--export", full, "--target", target,
                                   "--keys", "id")  # fmt: skip
        print(f"bootstrap: {args.items:,} items in {wall:.1f} s ({args.items / wall:,.0f} items/s),"
              f" {cpu:.1f} CPU s ({cpu / args.items * 1e6:.1f} µs/item), peak RSS {peak:.0f} MB",
              flush=True)  # fmt: skip
        micros = (now_ms + 1) * 1000
        for n in range(args.exports):
            changes = []
            for _ in range(args.changes):
                micros += rng.randint(1, 500)
                key = rng.randrange(int(args.items * 1.1))
                line: dict[str, Any] = {
                    "Metadata": {"WriteTimestampMicros": {"N": str(micros)}},
                    "Keys": {"id": {"S": f"k{key}"}},
                }
                if rng.random() > 0.1:
                    line["NewImage"] = item(key, rng)
                changes.append(orjson.dumps(line))
            window = {
                "exportType": "INCREMENTAL_EXPORT",
                "exportFromTime": stamp(now_ms + n),
                "exportToTime": stamp(now_ms + n + 1),
            }
            put_export(s3, f"inc-{n}", changes, window)
        total = args.exports * args.changes
        source = f"s3://{BUCKET}/exports"
        wall, cpu, peak = measured(
            "lake", "apply", "--source-format", "incremental-export", "--source", source,
            "--target", target,
        )  # fmt: skip
        print(
            f"incremental exports: {args.exports} x {args.changes:,} changes in {wall:.1f} s "
            f"({total / wall:,.0f} changes/s), {cpu:.1f} CPU s, peak RSS {peak:.0f} MB"
        )


if __name__ == "__main__":
    main()
