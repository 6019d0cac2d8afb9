"""``make bench``: every contender, side by side, on the same endpoint and the same data.

    python -m benchmarks [--rows 200000] [--quick] [--out benchmarks/results]

Runs (each contender in a fresh process, the sink in another):
1. un-throttled, against the fast sink;
2. 20% of items returned as UnprocessedItems: time to finish, rows lost;
3. the worker's write stage over MAX_IN_FLIGHT in {1, 4, 16, 64};
4. against moto's server, at a smaller size, for realism;
plus cold start (``import lambda_entry``), peak RSS per decoded file size,
and the memory model's constants on crafted files (``benchmarks.decode_memory``).
Writes ``results.json``, ``results.md`` and ``results.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import boto3
import orjson

from benchmarks.decode_memory import measure as decode_memory
from benchmarks.memory import memory
from benchmarks.servers import moto_process, sink_process
from worker.entry.sample import sample_file
from worker.loader.tables import OWNER_TAG

ROOT = Path(__file__).resolve().parent.parent
CONTENDERS = [
    "raw-limit",
    "worker-write",
    "worker-write-sdk",
    "worker-pipeline",
    "aiodynamo",
    "aioboto3",
    "awswrangler",
    "seed-style",
]
TABLES = 8


def sink_call(endpoint: str, path: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else orjson.dumps(body)
    request = urllib.request.Request(endpoint + path, data=data, method="POST" if data else "GET")
    with urllib.request.urlopen(request, timeout=30) as response:
        return orjson.loads(response.read())


def run_contender(
    name: str, endpoint: str, data: Path, concurrency: int, env: dict[str, str]
) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "benchmarks.contenders",
        name,
        "--endpoint",
        endpoint,
        "--data",
        str(data),
        "--concurrency",
        str(concurrency),
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        return {"contender": name, "error": done.stderr.strip().splitlines()[-1:] or ["failed"]}
    return dict(orjson.loads(done.stdout.strip().splitlines()[-1]))


def prepare(env: dict[str, str], endpoint: str, data: bytes, s3_endpoint: str) -> None:
    ddb = boto3.client("dynamodb", endpoint_url=endpoint)
    for index in range(TABLES):
        with contextlib.suppress(ddb.exceptions.ResourceInUseException):
            ddb.create_table(
                TableName=f"table_{index}",
                BillingMode="PAY_PER_REQUEST",
                AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "N"}],
                KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
                Tags=[OWNER_TAG],  # the loader writes only into tables it owns
            )
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket="bench")
    s3.put_object(Bucket="bench", Key="sample.pb", Body=data)


def series(
    contenders: list[str],
    endpoint: str,
    path: Path,
    env: dict[str, str],
    rows: int,
    *,
    unprocessed: float = 0.0,
    concurrency: int = 32,
    sink: bool = True,
) -> list[dict[str, Any]]:
    results = []
    for name in contenders:
        if sink:
            sink_call(endpoint, "/reset", {"unprocessed": unprocessed})
        result = run_contender(name, endpoint, path, concurrency, env)
        if sink and "error" not in result:
            stats = sink_call(endpoint, "/stats")
            result["rows_landed"] = sum(stats["distinct_keys"].values())
            result["rows_lost"] = rows - result["rows_landed"]
            result["sink_cpu_share"] = (
                stats["cpu_s"] / result["seconds"] if result["seconds"] else None
            )
            result["sink_rejected"] = stats["rejected_count"]
            result["resent_items"] = stats["items"] - rows
        if "error" not in result:
            result["rows_per_s"] = result["rows"] / result["seconds"]
            result["cpu_s_per_100k"] = result["cpu_s"] * 100_000 / max(1, result["rows"])
        results.append(result)
        print(
            f"  {name:<17} {result.get('rows_per_s', 0):>10,.0f} rows/s  {result.get('error', '')}",
            flush=True,
        )
    raw = next((r for r in results if r["contender"] == "raw-limit" and "rows_per_s" in r), None)
    for result in results:
        if raw and "rows_per_s" in result:
            result["vs_raw"] = result["rows_per_s"] / raw["rows_per_s"]
    return results


def cold_start(env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import lambda_entry"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    total_us = 0
    for line in done.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[2].strip() == "lambda_entry":
            total_us = int(parts[1].strip())
    script = (
        "import time; t = time.perf_counter(); import lambda_entry; "
        "print((time.perf_counter() - t) * 1000)"
    )
    wall = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return {
        "import_lambda_entry_ms": total_us / 1000,
        "import_wall_ms": float(wall.stdout.strip() or 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--moto-rows", type=int, default=20_000)
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: proves every contender runs"
    )
    parser.add_argument("--memory-mb", type=int, nargs="*", default=[70, 300, 1000])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.moto_rows, args.memory_mb = 2_000, 500, [1]
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "command": "make bench" if not args.quick else "python -m benchmarks --quick",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "rows": args.rows,
        "moto_rows": args.moto_rows,
        "tables": TABLES,
    }
    with tempfile.TemporaryDirectory() as scratch_dir, moto_process() as moto:
        scratch = Path(scratch_dir)
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_ENDPOINT_URL_S3": moto,
            "LOG_LEVEL": "ERROR",
        }
        os.environ.update(
            {k: v for k, v in env.items() if k.startswith("AWS_") and k != "AWS_ENDPOINT_URL_S3"}
        )
        data = sample_file(rows=args.rows, tables=TABLES).SerializeToString()
        path = scratch / "sample.pb"
        path.write_bytes(data)
        with sink_process() as sink:
            env_sink = {**env, "AWS_ENDPOINT_URL_DYNAMODB": sink}
            prepare(env, sink, data, moto)
            print(f"un-throttled, {args.rows:,} rows, sink at {sink}", flush=True)
            report["unthrottled"] = series(CONTENDERS, sink, path, env_sink, args.rows)
            print("20% UnprocessedItems", flush=True)
            throttled = [c for c in CONTENDERS if c not in ("raw-limit", "worker-pipeline")]
            report["unprocessed_20pct"] = series(
                throttled, sink, path, env_sink, args.rows, unprocessed=0.2
            )
            print("scaling MAX_IN_FLIGHT", flush=True)
            report["scaling"] = []
            for window in (1, 4, 16, 64):
                (result,) = series(
                    ["worker-write"], sink, path, env_sink, args.rows, concurrency=window
                )
                result["max_in_flight"] = window
                report["scaling"].append(result)
            print("memory", flush=True)
            report["memory"] = memory(env_sink, args.memory_mb, scratch)
            print("memory of crafted files at their cap", flush=True)
            report["decode_memory"] = decode_memory(
                env_sink, scratch, (1 if args.quick else 10) * 2**20
            )
        small = scratch / "small.pb"
        small_data = sample_file(rows=args.moto_rows, tables=TABLES).SerializeToString()
        small.write_bytes(small_data)
        env_moto = {**env, "AWS_ENDPOINT_URL_DYNAMODB": moto}
        prepare(env, moto, small_data, moto)
        print(f"moto, {args.moto_rows:,} rows", flush=True)
        report["moto"] = series(
            ["worker-write", "worker-write-sdk", "aioboto3", "seed-style"],
            moto,
            small,
            env_moto,
            args.moto_rows,
            sink=False,
        )
        report["cold_start"] = cold_start(env)
    from benchmarks.report import write_report

    write_report(report, args.out)
    print(f"wrote {args.out}/results.json, results.md, results.png")


if __name__ == "__main__":
    main()
