"""The ledger part of ``worker demo``: runs submitted over real HTTP, loaded by the
poller, completing by themselves.

It sets up the ledger tables, serves the ledger's API on 127.0.0.1 (as
``worker api`` does) and drives it with aiohttp's client: a dataset, then two
runs. One run's three files all load and the run ends ``success``; the other
holds a corrupt file, which fails, and that run ends ``failed``. Then a
vendor's dataset: a manifest with SHA-256s, served over HTTPS on 127.0.0.1
(``demo_vendor``); its files are fetched into a landing bucket, verified and
loaded, and that run ends ``success``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from worker.core.aws import Clients
from worker.core.config import AcquireSettings, LedgerSettings, Settings
from worker.entry.demo_vendor import make_certificates, vendor
from worker.entry.runtime import make_api, make_loader
from worker.entry.sample import sample_file
from worker.ledger.api import serve
from worker.ledger.store import setup_tables
from worker.loader.poller import Poller

DATASET = "sales"
VENDOR_DATASET = "quotes"
LANDING = "demo-landing"
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
    with tempfile.TemporaryDirectory() as certificates:
        ca_file, tls = make_certificates(Path(certificates))
        acquire = AcquireSettings(
            landing_bucket=LANDING, allowed_hosts=("127.0.0.1",), ca_bundle=str(ca_file),
            allow_private=True,  # the vendor is on loopback
        )  # fmt: skip
        settings = dataclasses.replace(settings, ledger=ledger, acquire=acquire)
        await clients.s3.create_bucket(Bucket=LANDING)
        async with vendor(_vendor_files(), tls) as vendor_url:
            return await _runs(clients, settings, bucket, queue_url, vendor_url)


def _vendor_files() -> dict[str, bytes]:
    files = {
        f"eod/{GOOD_DAY}/quotes-{index}.pb": sample_file(
            rows=40, tables=1, seed=30 + index, names=["ledger_quotes"]
        ).SerializeToString()
        for index in range(2)
    }
    listing = [
        {"url": path.rpartition("/")[2], "size": len(body),
         "sha256": hashlib.sha256(body).hexdigest()}
        for path, body in files.items()
    ]  # fmt: skip
    files[f"eod/{GOOD_DAY}/manifest.json"] = orjson.dumps({"files": listing})
    return files


async def _runs(
    clients: Clients, settings: Settings, bucket: str, queue_url: str, vendor_url: str
) -> tuple[bool, list[str]]:
    await setup_tables(clients.dynamodb, settings.ledger)
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
            manifest = {"manifest": f"{vendor_url}/eod/{{businessDate}}/manifest.json"}
            await _call(http, "PUT", f"{api}/datasets/{VENDOR_DATASET}", manifest)
            runs = {}
            for dataset, day in (
                (DATASET, GOOD_DAY),
                (DATASET, BAD_DAY),
                (VENDOR_DATASET, GOOD_DAY),
            ):
                body = {"datasetName": dataset, "businessDate": day, "sourceType": "manual"}
                runs[dataset, day] = (await _call(http, "POST", f"{api}/runs", body))["runId"]
            ended = {
                key: await _until_ended(http, f"{api}/runs/{run}") for key, run in runs.items()
            }
            fetched = await _call(
                http, "GET", f"{api}/runs/{runs[VENDOR_DATASET, GOOD_DAY]}/files", None
            )
    finally:
        poller.stop()
        await polling
        await runner.cleanup()
    good, bad = ended[DATASET, GOOD_DAY], ended[DATASET, BAD_DAY]
    quotes = ended[VENDOR_DATASET, GOOD_DAY]
    verified = [f for f in fetched["items"] if f["checksum"].startswith("sha256:")]
    ok = (
        (good["status"], good["processedFiles"]) == ("success", 3)
        and (bad["status"], bad["processedFiles"], bad["failedFiles"]) == ("failed", 1, 1)
        and (quotes["status"], quotes["processedFiles"], len(verified)) == ("success", 2, 2)
    )
    lines = [
        f"{api} (worker api), driven with aiohttp",
        *(
            f"run {run['runId'][:12]}  {dataset:<7} {day}  {run['status']:<8} resolved "
            f"{run['resolvedFiles']}, processed {run['processedFiles']}, "
            f"failed {run['failedFiles']}"
            for (dataset, day), run in ended.items()
        ),
        f"  {VENDOR_DATASET}: a manifest over HTTPS ({vendor_url}, the demo's own CA); "
        f"{len(verified)} files fetched into s3://{LANDING}, sha256 verified, then loaded",
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
    async with http.request(method, url, json=body if body is not None else None) as response:
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
