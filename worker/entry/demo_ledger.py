"""The ledger part of ``worker demo``: runs submitted over real HTTP, loaded by the
poller, completing by themselves.

It sets up the ledger tables, serves the ledger's API on 127.0.0.1 (as
``worker api`` does) and drives it with aiohttp's client: a dataset, then two
runs. One run's three files all load and the run ends ``success``; the other
holds a corrupt file, which fails, and that run ends ``failed``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import aiohttp

from worker.core.aws import Clients
from worker.core.config import LedgerSettings, Settings
from worker.entry.runtime import make_api, make_loader
from worker.entry.sample import sample_file
from worker.ledger.api import serve
from worker.ledger.store import setup_tables
from worker.loader.poller import Poller

DATASET = "sales"
GOOD_DAY, BAD_DAY = "2026-11-21", "2026-11-20"
ENDED = ("success", "failed", "cancelled")


async def ledger_demo(
    clients: Clients, settings: Settings, bucket: str, queue_url: str
) -> tuple[bool, list[str]]:
    """Whether both runs ended as they should, and the report's lines."""
    ledger = LedgerSettings(
        run_table="demo-runs",
        file_table="demo-files",
        dataset_table="demo-datasets",
        loader_queue_url=queue_url,
        max_receives=2,
    )
    settings = dataclasses.replace(settings, ledger=ledger)
    await setup_tables(clients.dynamodb, ledger)
    await _upload(clients, bucket)
    runner = await serve(make_api(settings, clients), 0)
    api = f"http://127.0.0.1:{runner.addresses[0][1]}"
    poll = dataclasses.replace(settings.poll, queue_url=queue_url)
    poller = Poller(make_loader(settings, clients), clients.sqs, poll, concurrency=4)
    polling = asyncio.create_task(poller.run())
    try:
        async with aiohttp.ClientSession() as http:
            location = f"s3://{bucket}/raw/{{datasetName}}/{{businessDate}}/"
            await _call(http, "PUT", f"{api}/datasets/{DATASET}", {"location": location})
            runs = {}
            for day in (GOOD_DAY, BAD_DAY):
                body = {"datasetName": DATASET, "businessDate": day, "sourceType": "manual"}
                runs[day] = (await _call(http, "POST", f"{api}/runs", body))["runId"]
            ended = {
                day: await _until_ended(http, f"{api}/runs/{run}") for day, run in runs.items()
            }
    finally:
        poller.stop()
        await polling
        await runner.cleanup()
    good, bad = ended[GOOD_DAY], ended[BAD_DAY]
    ok = (good["status"], good["processedFiles"]) == ("success", 3) and (
        bad["status"],
        bad["processedFiles"],
        bad["failedFiles"],
    ) == ("failed", 1, 1)
    lines = [
        f"{api} (worker api), driven with aiohttp",
        *(
            f"run {run['runId'][:12]}  {day}  {run['status']:<8} resolved {run['resolvedFiles']}, "
            f"processed {run['processedFiles']}, failed {run['failedFiles']}"
            for day, run in ended.items()
        ),
    ]
    return ok, lines


async def _upload(clients: Clients, bucket: str) -> None:
    for index in range(3):
        data = sample_file(rows=50, tables=1, seed=10 + index, names=["ledger_sales"])
        key = f"raw/{DATASET}/{GOOD_DAY}/part-{index}.pb"
        await clients.s3.put_object(Bucket=bucket, Key=key, Body=data.SerializeToString())
    data = sample_file(rows=50, tables=1, seed=20, names=["ledger_sales"])
    await clients.s3.put_object(
        Bucket=bucket, Key=f"raw/{DATASET}/{BAD_DAY}/part-0.pb", Body=data.SerializeToString()
    )
    await clients.s3.put_object(
        Bucket=bucket,
        Key=f"raw/{DATASET}/{BAD_DAY}/part-1.pb",
        Body=b"\x08\x96",  # corrupt
    )


async def _call(http: aiohttp.ClientSession, method: str, url: str, body: Any) -> Any:
    async with http.request(method, url, json=body) as response:
        doc = await response.json()
        if response.status >= 300:
            raise RuntimeError(f"{method} {url}: {response.status} {doc}")
        return doc


async def _until_ended(http: aiohttp.ClientSession, url: str, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        async with http.get(url) as response:
            run = await response.json()
        if run["status"] in ENDED or time.monotonic() > deadline:
            return run
        await asyncio.sleep(0.3)
