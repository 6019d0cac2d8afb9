"""Peak RSS of ``worker load FILE`` over a tiny file's, per decoded size.

    python -m benchmarks.memory [--sizes 70 300 1000]

For each size, a ``worker sample`` file of the benchmark's shape (8 tables,
10 columns, ~100 bytes a row) is loaded into the fast DynamoDB sink twice,
each in a fresh process:
- **streamed**: the default extract (``iterOutputData``: slices of rows);
- **whole file**: the same extract without its streaming hook
  (``benchmarks.whole_extract``), the path every ``TABLE_EXTRACT`` without
  ``iterOutputData`` takes, and the only one before.
The baseline is the same command on a 1,000-row file. The figure is
(peak - baseline) / decoded size; the goal is at most 2.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.servers import ROOT, sink_process

TABLES = 8
WHOLE_FILE = "benchmarks.whole_extract:processOutputData"
MEASURED_LOAD = """
import sys
from worker.entry.cli import main
code = main(["load", sys.argv[1]])
with open("/proc/self/status") as status:
    sys.stderr.write("".join(line for line in status if line.startswith("VmHWM:")))
raise SystemExit(code)
"""


def peak_mb(path: Path, env: dict[str, str]) -> tuple[float, int]:
    done = subprocess.run(
        [sys.executable, "-c", MEASURED_LOAD, str(path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    kb = next((int(x.split()[1]) for x in done.stderr.splitlines() if x.startswith("VmHWM:")), 0)
    if done.returncode:
        print(done.stderr[-2000:], file=sys.stderr)
    return kb / 1024, done.returncode


def sample(path: Path, rows: int, env: dict[str, str]) -> None:
    subprocess.run(
        [sys.executable, "-m", "worker", "sample", str(path), "--rows", str(rows),
         "--tables", str(TABLES)],
        cwd=ROOT, env=env, check=True, capture_output=True, timeout=3600,
    )  # fmt: skip


def memory(
    env: dict[str, str], sizes_mb: list[int], scratch: Path, *, whole_up_to: int = 300
) -> list[dict[str, Any]]:
    """Both paths at every size (the whole-file one up to ``whole_up_to`` MB: at 1 GB it
    needs some 15 GB); ``env`` points DynamoDB at a sink."""
    env = {**env, "MAX_OBJECT_BYTES": str(8 * 2**30), "MAX_DECODED_BYTES": str(8 * 2**30)}
    tiny = scratch / "tiny.pb"
    sample(tiny, 1_000, env)
    paths = {"streamed": env, "whole file": {**env, "TABLE_EXTRACT": WHOLE_FILE}}
    baseline = {name: peak_mb(tiny, path_env)[0] for name, path_env in paths.items()}
    results = []
    for size in sizes_mb:
        path = scratch / f"mem-{size}.pb"
        rows = size * 100_000 // 10  # the sample's rows run at about 100 bytes each
        sample(path, rows, env)
        decoded = path.stat().st_size / 2**20
        for name, path_env in paths.items():
            if name == "whole file" and size > whole_up_to:
                continue
            peak, code = peak_mb(path, path_env)
            over = (peak - baseline[name]) / decoded
            results.append({"path": name, "decoded_mb": round(decoded, 1), "rows": rows,
                            "peak_rss_mb": round(peak, 1), "baseline_mb": round(baseline[name], 1),
                            "over_baseline_ratio": round(over, 2), "exit": code})  # fmt: skip
            print(f"  {name:>10}: {decoded:7.1f} MB decoded -> peak {peak:8.1f} MB, "
                  f"{peak - baseline[name]:8.1f} MB over the tiny file's "
                  f"({over:.2f}x decoded), exit {code}", flush=True)  # fmt: skip
        path.unlink()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[70, 300, 1000])
    parser.add_argument("--whole-up-to", type=int, default=300, help="MB (default 300)")
    args = parser.parse_args()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
           "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "LOG_LEVEL": "ERROR",
           "SCHEMA_PREFIX": "mem", "SOURCE_BUCKETS": "*"}  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch, sink_process() as sink:
        sink_env = {**env, "AWS_ENDPOINT_URL_DYNAMODB": sink}
        memory(sink_env, args.sizes, Path(scratch), whole_up_to=args.whole_up_to)


if __name__ == "__main__":
    main()
