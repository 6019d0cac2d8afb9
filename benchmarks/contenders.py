"""The loaders the benchmark compares, each run in a process of its own.

    python -m benchmarks.contenders NAME --endpoint URL --data FILE [--concurrency 32]

Every contender starts from the same decoded rows (the reference
``processOutputData`` of the same sample file; decoding is not timed, except
for ``worker-pipeline``, which starts from the S3 object) and writes them to the
same endpoint. It prints one JSON line: rows, seconds, CPU seconds, peak RSS
and request latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from worker.loader.extract.outputfile_pb2 import OutputFile
from worker.loader.extract.reference import processOutputData

Rows = dict[str, list[dict[str, Any]]]
Latencies = list[float]
BUCKET, KEY = "bench", "sample.pb"


def load_rows(path: Path) -> Rows:
    return processOutputData(OutputFile.FromString(path.read_bytes()))


def finite(row: dict[str, Any]) -> dict[str, Any]:
    """The baselines' SDKs crash on NaN/Inf and on floats DynamoDB cannot hold (1e-300):
    leave those values out for them, so they can run at all."""
    return {k: v for k, v in row.items() if not (isinstance(v, float) and not _storable(v))}


def _storable(value: float) -> bool:
    return math.isfinite(value) and (value == 0 or 1e-130 <= abs(value) < 1e126)


def decimals(row: dict[str, Any]) -> dict[str, Any]:
    """The seed's conversion: float -> Decimal(str(x)) for boto3's TypeSerializer."""
    return {k: Decimal(str(v)) if isinstance(v, float) else v for k, v in finite(row).items()}


# --- this worker ---------------------------------------------------------------------------


class TimedClient:
    def __init__(self, inner: Any, latencies: Latencies) -> None:
        self._inner, self._latencies = inner, latencies

    async def batch_write_item(self, *, RequestItems: Any) -> Any:  # noqa: N803 - SDK name
        start = time.perf_counter()
        try:
            return await self._inner.batch_write_item(RequestItems=RequestItems)
        finally:
            self._latencies.append(time.perf_counter() - start)


async def worker_write(rows: Rows, concurrency: int, latencies: Latencies, path: str) -> int:
    from worker.core.aws import Clients
    from worker.core.config import Settings, WriteSettings
    from worker.loader.ddb_http import batch_write_client
    from worker.loader.items import Origin
    from worker.loader.pipeline import Loader, ObjectSummary
    from worker.loader.writer import BatchWriter

    settings = Settings(write=WriteSettings(path=path, max_in_flight=concurrency))  # type: ignore[arg-type]
    async with Clients.from_settings(settings) as clients:
        writer = BatchWriter(
            TimedClient(batch_write_client(clients, settings.write.path), latencies), settings.write
        )
        loader = Loader(settings, clients, writer=writer)
        summary = ObjectSummary(uri="rows")
        _mark_start()
        await loader.write_tables(Origin(BUCKET, KEY, "r1", ""), rows, summary)
    return summary.rows_written


async def worker_pipeline(concurrency: int, latencies: Latencies) -> int:
    from worker.core.aws import Clients
    from worker.core.config import Settings, WriteSettings
    from worker.loader.ddb_http import batch_write_client
    from worker.loader.messages import ObjectRef
    from worker.loader.pipeline import Loader
    from worker.loader.writer import BatchWriter

    settings = Settings(write=WriteSettings(max_in_flight=concurrency))
    async with Clients.from_settings(settings) as clients:
        writer = BatchWriter(
            TimedClient(batch_write_client(clients, settings.write.path), latencies), settings.write
        )
        loader = Loader(settings, clients, writer=writer)
        _mark_start()
        summary = await loader.load(ObjectRef(BUCKET, KEY))
    if summary.error is not None:
        raise summary.error
    return summary.rows_written


# --- boto3 family: hooks time each BatchWriteItem call -------------------------------------


def _time_calls(events: Any, latencies: Latencies) -> None:
    def before(context: dict[str, Any], **_: Any) -> None:
        context["bench_t0"] = time.perf_counter()

    def after(context: dict[str, Any], **_: Any) -> None:
        latencies.append(time.perf_counter() - context["bench_t0"])

    events.register("before-call.dynamodb.BatchWriteItem", before)
    events.register("after-call.dynamodb.BatchWriteItem", after)


def seed(rows: Rows, concurrency: int, latencies: Latencies, endpoint: str) -> int:
    """boto3 ``Table.batch_writer`` in a thread pool, one writer per table."""
    import boto3

    session = boto3.Session()
    _time_calls(session.events, latencies)
    dynamodb = session.resource("dynamodb", endpoint_url=endpoint)
    _mark_start()

    def write(name: str) -> int:
        with dynamodb.Table(name).batch_writer() as batch:
            for row in rows[name]:
                batch.put_item(Item=decimals(row))
        return len(rows[name])

    with ThreadPoolExecutor(max_workers=len(rows)) as pool:
        return sum(pool.map(write, rows))


def awswrangler(rows: Rows, concurrency: int, latencies: Latencies, endpoint: str) -> int:
    import awswrangler as wr
    import boto3

    wr.config.dynamodb_endpoint_url = endpoint
    session = boto3.Session()
    _time_calls(session.events, latencies)
    for name, table_rows in rows.items():
        items = [decimals(r) for r in table_rows]
        wr.dynamodb.put_items(items=items, table_name=name, boto3_session=session, use_threads=True)
    return sum(len(r) for r in rows.values())


async def aioboto3_writer(rows: Rows, concurrency: int, latencies: Latencies, endpoint: str) -> int:
    """aioboto3's ``Table.batch_writer``, ``concurrency`` asyncio tasks over slices."""
    import aioboto3

    session = aioboto3.Session()
    _time_calls(session.events, latencies)
    slices = [
        (n, r[i :: max(1, concurrency // len(rows))])
        for n, r in rows.items()
        for i in range(max(1, concurrency // len(rows)))
    ]
    async with session.resource("dynamodb", endpoint_url=endpoint) as dynamodb:
        _mark_start()

        async def write(name: str, part: list[dict[str, Any]]) -> None:
            table = await dynamodb.Table(name)
            async with table.batch_writer() as batch:
                for row in part:
                    await batch.put_item(Item=decimals(row))

        await asyncio.gather(*(write(n, part) for n, part in slices))
    return sum(len(r) for r in rows.values())


async def aiodynamo_writer(
    rows: Rows, concurrency: int, latencies: Latencies, endpoint: str
) -> int:
    """aiodynamo's ``batch_write``: 25-item requests, ``concurrency`` at once, leftovers resent."""
    import aiohttp
    from aiodynamo.client import Client
    from aiodynamo.credentials import Key, StaticCredentials
    from aiodynamo.http.aiohttp import AIOHTTP
    from aiodynamo.models import BatchWriteRequest
    from yarl import URL

    slots = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:
        _mark_start()
        client = Client(
            AIOHTTP(http), StaticCredentials(Key("bench", "bench")), "us-east-1", URL(endpoint)
        )

        async def write(name: str, chunk: list[dict[str, Any]]) -> None:
            async with slots:
                while chunk:
                    start = time.perf_counter()
                    result = await client.batch_write({name: BatchWriteRequest(items_to_put=chunk)})
                    latencies.append(time.perf_counter() - start)
                    chunk = result[name].unput_items if name in result else []
                    if chunk:
                        await asyncio.sleep(0.05)

        chunks = [
            (n, [finite(x) for x in r[i : i + 25]])
            for n, r in rows.items()
            for i in range(0, len(r), 25)
        ]
        await asyncio.gather(*(write(n, c) for n, c in chunks))
    return sum(len(r) for r in rows.values())


# --- the raw limit -------------------------------------------------------------------------


async def raw_limit(rows: Rows, concurrency: int, latencies: Latencies, endpoint: str) -> int:
    """Pre-built, pre-signed bodies posted with aiohttp: no conversion, no SDK (untimed set-up)."""
    import aiohttp
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from worker.loader.ddb_http import CONTENT_TYPE, TARGET, encode_request
    from worker.loader.items import ItemBuilder, KeyAttribute, KeySchema, Origin

    bodies: list[tuple[bytes, dict[str, str]]] = []
    signer = SigV4Auth(Credentials("bench", "bench"), "dynamodb", "us-east-1")
    for name, table_rows in rows.items():
        builder = ItemBuilder(
            KeySchema(KeyAttribute("id", "N")), "null", Origin("b", "k", "r", name)
        )
        items = builder.convert(table_rows).items
        for i in range(0, len(items), 25):
            body = encode_request(
                {name: [{"PutRequest": {"Item": it}} for it in items[i : i + 25]]}
            )
            request = AWSRequest(
                "POST",
                endpoint + "/",
                data=body,
                headers={"Content-Type": CONTENT_TYPE, "X-Amz-Target": TARGET},
            )
            signer.add_auth(request)
            bodies.append((body, dict(request.headers.items())))
    _mark_start()
    slots = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:

        async def post(body: bytes, headers: dict[str, str]) -> None:
            async with slots:
                start = time.perf_counter()
                async with http.post(endpoint + "/", data=body, headers=headers) as response:
                    await response.read()
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(post(b, h) for b, h in bodies))
    return sum(len(r) for r in rows.values())


_started: list[tuple[float, float]] = []


def _mark_start() -> None:
    """Set-up (SDK clients, pre-built bodies) is not timed: contenders restart the clock
    here once it is done. Cold start is measured on its own."""
    _started.append((time.perf_counter(), time.process_time()))


CONTENDERS: dict[str, Callable[..., Any]] = {
    "worker-write": lambda rows, c, lat, _: worker_write(rows, c, lat, "fast"),
    "worker-write-sdk": lambda rows, c, lat, _: worker_write(rows, c, lat, "sdk"),
    "worker-pipeline": lambda _rows, c, lat, _: worker_pipeline(c, lat),
    "seed-style": seed,
    "awswrangler": awswrangler,
    "aioboto3": aioboto3_writer,
    "aiodynamo": aiodynamo_writer,
    "raw-limit": raw_limit,
}


def peak_rss_mb() -> float:
    """This process's own high-water mark (VmHWM). ``ru_maxrss`` would not do: Linux
    carries it over from the parent across fork and exec."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(name: str, endpoint: str, data: Path, concurrency: int) -> dict[str, Any]:
    rows = {} if name == "worker-pipeline" else load_rows(data)
    latencies: Latencies = []
    contender = CONTENDERS[name]
    wall, cpu = time.perf_counter(), time.process_time()
    result = contender(rows, concurrency, latencies, endpoint)
    if isinstance(result, Coroutine):
        import uvloop

        written = uvloop.run(result)
    else:
        written = result
    seconds, cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    if _started:
        seconds = time.perf_counter() - _started[0][0]
        cpu_s = time.process_time() - _started[0][1]
    ordered = sorted(latencies)
    return {
        "contender": name,
        "rows": written,
        "seconds": seconds,
        "cpu_s": cpu_s,
        "peak_rss_mb": peak_rss_mb(),
        "requests": len(ordered),
        "p50_ms": 1000 * statistics.median(ordered) if ordered else None,
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        if ordered
        else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(CONTENDERS))
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    from worker.core import log

    log.configure("ERROR", stream=sys.stderr)
    print(orjson.dumps(run(args.name, args.endpoint, args.data, args.concurrency)).decode())


if __name__ == "__main__":
    main()
