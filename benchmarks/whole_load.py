"""``worker load FILE`` as a whole process against the seed-style write stage.

    python -m benchmarks.whole_load [--rows 120000]

On one ``worker sample`` file (8 tables, 10 columns) and the fast DynamoDB
sink, side by side:
- **seed-style**: boto3 ``batch_writer`` in threads, from rows already decoded
  (its write stage only: the contender of ``python -m benchmarks``);
- **worker write stage**: ``Loader.write_tables`` from rows already decoded;
- **worker load**: the whole ``worker load FILE`` process (interpreter start,
  imports, decode, tables, write), timed from outside.
Each figure is wall seconds and CPU seconds per row; the ratios are against
seed-style's wall time.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import prepare, run_contender, sink_call
from benchmarks.servers import ROOT, moto_process, sink_process
from worker.entry.sample import sample_file


def whole_load(path: Path, env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds (user + system) of ``worker load FILE`` in a child."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "worker", "load", str(path)],
        cwd=ROOT, env=env, check=True, capture_output=True, timeout=3600,
    )  # fmt: skip
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=120_000)
    args = parser.parse_args()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
           "LOG_LEVEL": "ERROR", "SOURCE_BUCKETS": "*"}  # fmt: skip
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})  # for prepare
    data = sample_file(rows=args.rows, tables=8).SerializeToString()
    with tempfile.TemporaryDirectory() as scratch, moto_process() as moto, sink_process() as sink:
        path = Path(scratch) / "sample.pb"
        path.write_bytes(data)
        env = {**env, "AWS_ENDPOINT_URL_DYNAMODB": sink, "AWS_ENDPOINT_URL_S3": moto}
        prepare(env, sink, data, moto)
        print(f"{args.rows:,} rows, 8 tables, {len(data) / 2**20:.1f} MB; sink at {sink}")
        results = {}
        for name in ("seed-style", "worker-write"):
            sink_call(sink, "/reset", {"unprocessed": 0.0})
            got = run_contender(name, sink, path, 32, env)
            results[name] = (got["seconds"], got["cpu_s"])
        sink_call(sink, "/reset", {"unprocessed": 0.0})
        results["worker load (whole process)"] = whole_load(path, env)
        landed = sum(sink_call(sink, "/stats")["distinct_keys"].values())
        assert landed == args.rows, f"{landed} of {args.rows} rows landed"
    seed = results["seed-style"][0]
    for name, (wall, cpu) in results.items():
        per_row = cpu * 1e6 / args.rows
        print(f"  {name:<28} {wall:6.2f} s  {args.rows / wall:>9,.0f} rows/s  "
              f"{per_row:5.1f} us CPU/row  {seed / wall:5.2f}x seed-style")  # fmt: skip


if __name__ == "__main__":
    main()
