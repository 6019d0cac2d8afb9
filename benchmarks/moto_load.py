"""One local run of the loader on a sample file against moto's server.

    python -m benchmarks.moto_load --rows 100000 [--tables 8] [--profile]

Prints rows/s for the whole pipeline (S3 read, decode, extract, convert,
create tables, write). ``--profile`` adds a cProfile of the worker's event-loop thread
(moto's server runs in its own process, so the client does not share its GIL).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import uvloop

from benchmarks.servers import local_aws_env, moto_process
from worker.core import log
from worker.core.aws import Clients
from worker.core.config import Settings
from worker.entry.sample import sample_file
from worker.loader.messages import ObjectRef
from worker.loader.pipeline import Loader


async def _run(rows: int, tables: int) -> tuple[int, float]:
    settings = Settings.from_env()
    data = sample_file(rows=rows, tables=tables).SerializeToString()
    async with Clients.from_settings(settings) as clients:
        await clients.s3.create_bucket(Bucket="bench")
        await clients.s3.put_object(Bucket="bench", Key="sample.pb", Body=data)
        start = time.perf_counter()
        summary = await Loader(settings, clients).load(ObjectRef("bench", "sample.pb"))
        seconds = time.perf_counter() - start
    assert summary.ok, summary.error
    return summary.rows_written, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--tables", type=int, default=8)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    log.configure("WARNING")
    with moto_process() as endpoint, local_aws_env(endpoint):
        profiler = cProfile.Profile() if args.profile else None
        if profiler:
            profiler.enable()
        written, seconds = uvloop.run(_run(args.rows, args.tables))
        if profiler:
            profiler.disable()
    print(f"{written:,} rows in {seconds:.2f}s: {written / seconds:,.0f} rows/s against moto")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
