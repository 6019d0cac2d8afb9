"""Loader v2: a file is streamed in slices of rows, with bounded memory (issue: loader v2)."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections import Counter
from typing import Any

import boto3
import orjson
import pytest
from aiohttp import web

from tests import factories as f
from tests.conftest import BUCKET, scan, window_alone
from tests.fault_proxy import FaultProxy
from worker.core.aws import Clients
from worker.core.config import Settings
from worker.core.errors import CorruptObject, ObjectTooLarge
from worker.entry.sample import sample_file
from worker.loader.budget import RESERVED, STREAMED_RATIO, ByteBudget, cap_advice, decoded_cap
from worker.loader.extract import reference
from worker.loader.extract.outputfile_pb2 import OutputFile
from worker.loader.messages import ObjectRef
from worker.loader.pipeline import Loader

MiB = 1024 * 1024


def _comparable(tables: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    nan = "nan"  # NaN != NaN: compare its text
    return {
        name: [{k: nan if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}
               for r in rows]
        for name, rows in tables.items()
    }  # fmt: skip


def test_the_stream_yields_the_rows_of_the_whole_file_extract_in_slices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reference, "SLICE_ROWS", 700)
    message = sample_file(rows=6_000, tables=3, seed=4)  # NaN, short rows, unset values...
    message.tables.add(name="table_1", columns=["id"]).rows.add().values.add(string_value="z")
    data = message.SerializeToString()
    stream = reference.iterOutputData(data)
    assert stream.table_names == ["table_0", "table_1", "table_2"]  # distinct, in file order
    slices = list(stream)
    assert max(len(rows) for _, rows in slices) == 700 and len(slices) > 3 * (2000 // 700)
    streamed: dict[str, list[dict[str, Any]]] = {}
    for name, rows in slices:
        streamed.setdefault(name, []).extend(rows)
    whole = reference.processOutputData(OutputFile.FromString(data))
    assert _comparable(streamed) == _comparable(whole)


@pytest.mark.parametrize(
    "data",
    [
        f.output_file(("t", ["id"], [["a"], ["b"]]))[:-3],  # truncated inside a row
        b"\x0f\x00\x00",  # wire type 7
        b"\xff" * 12,  # a varint that never ends
        b"\x28\x01",  # only an unknown field
    ],
    ids=["truncated", "bad-wire-type", "endless-varint", "no-known-field"],
)
def test_a_corrupt_file_is_corrupt_on_the_streamed_path(data: bytes) -> None:
    with pytest.raises(CorruptObject):
        list(reference.iterOutputData(data))


class Watching(FaultProxy):
    """The fault proxy, noting any key that two BatchWriteItem requests carry at once."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.in_flight: Counter[str] = Counter()
        self.overlaps: list[str] = []

    async def _batch_write(self, request: web.Request, doc: dict[str, Any]) -> web.Response:
        keys = [
            orjson.dumps([table, put["PutRequest"]["Item"]["id"]]).decode()
            for table, puts in doc.get("RequestItems", {}).items()
            for put in puts
        ]
        self.overlaps += [key for key in keys if self.in_flight[key]]
        self.in_flight.update(keys)
        try:
            return await super()._batch_write(request, doc)
        finally:
            self.in_flight.subtract(keys)


async def test_the_last_row_of_a_key_wins_across_slices_and_never_races_an_earlier_one(
    moto: str, s3: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reference, "SLICE_ROWS", 40)
    rows = [[f"k{i % 30}", i] for i in range(600)]  # every key in every slice
    s3.put_object(Bucket=BUCKET, Key="dups.pb", Body=f.output_file(("d", ["id", "v"], rows)))
    with Watching(moto) as proxy:
        proxy.unprocessed_fraction, proxy.latency_s = 0.3, 0.002
        monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", proxy.url)
        async with Clients(max_in_flight=8) as clients:
            loader = Loader(window_alone(settings), clients)
            summary = await loader.load(ObjectRef(BUCKET, "dups.pb"))
    assert summary.ok, summary.error
    assert proxy.stats.items_unprocessed > 0 and proxy.overlaps == []
    items = scan(boto3.client("dynamodb", endpoint_url=moto), f"{settings.schema_prefix}_d")
    last = {f"k{k}": max(i for i in range(600) if i % 30 == k) for k in range(30)}
    assert {i["id"]["S"]: int(i["v"]["N"]) for i in items} == last


def test_without_max_decoded_bytes_lambda_derives_a_cap_that_fits_its_memory() -> None:
    lambda_settings = Settings.from_env({"AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "1024"})
    cap, advice = decoded_cap(lambda_settings, streamed=True), cap_advice(lambda_settings)
    assert cap == int((1024 * MiB - RESERVED) / STREAMED_RATIO)
    assert "1024 MB" in advice and "ECS poller" in advice
    whole = decoded_cap(lambda_settings, streamed=False)
    assert whole < cap / 4  # the whole-file path needs far more memory per byte
    explicit = Settings.from_env({"AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "1024",
                                  "MAX_DECODED_BYTES": "5"})  # fmt: skip
    assert decoded_cap(explicit, streamed=True) == 5 and cap_advice(explicit) == ""


async def test_a_file_over_the_derived_cap_fails_naming_it_and_the_ecs_poller(
    moto: str, s3: Any, settings: Settings, clients: Clients
) -> None:
    small = dataclasses.replace(settings, lambda_memory_mb=180)  # (180 - 160) MB / 1.25 = 16 MB
    s3.put_object(Bucket=BUCKET, Key="big.pb", Body=b"\x0a" * (30 * MiB))
    summary = await Loader(small, clients).load(ObjectRef(BUCKET, "big.pb"))
    assert isinstance(summary.error, ObjectTooLarge)
    message = summary.error.message
    assert f"MAX_DECODED_BYTES={int((180 * MiB - RESERVED) / STREAMED_RATIO)}" in message
    assert "180 MB" in message and "ECS poller" in message


async def test_the_byte_budget_keeps_two_large_objects_from_loading_at_once(
    moto: str, s3: Any, settings: Settings, clients: Clients
) -> None:
    data = f.output_file(("t", ["id"], [[f"r{i}"] for i in range(2_000)]))
    for key in ("a.pb", "b.pb"):
        s3.put_object(Bucket=BUCKET, Key=key, Body=data)
    refs = [ObjectRef(BUCKET, "a.pb"), ObjectRef(BUCKET, "b.pb")]
    peaks = []
    for budget in (len(data) + 1, None):  # room for one object; no budget at all
        loader = Loader(settings, clients)
        loader.budget = loader.sources.budget = ByteBudget(budget)
        loader.extractor = dataclasses.replace(
            loader.extractor, process=_slowly(loader.extractor.process), iterate=None
        )
        summaries = await asyncio.gather(*(loader.load(ref) for ref in refs))
        assert all(s.ok for s in summaries) and loader.budget.reserved == 0
        peaks.append(loader.budget.peak)
    assert peaks == [len(data), 2 * len(data)]  # one at a time; both at once without


def _slowly(process: Any) -> Any:
    def slow(message: Any) -> Any:
        import time

        time.sleep(0.5)  # both objects would be decoded at once, if let
        return process(message)

    return slow


@pytest.mark.parametrize("size", [0, 100, 8 * MiB, 8 * MiB + 1, 20 * MiB])
def test_gzip_inflates_in_steps_and_round_trips(size: int) -> None:
    import gzip
    import random

    from worker.loader.s3_reader import Limits, gunzip_if_needed

    raw = random.Random(size).randbytes(size // 2) + b"a" * (size - size // 2)
    members = gzip.compress(raw[: size // 3]) + gzip.compress(raw[size // 3 :])
    for packed in (gzip.compress(raw), members):
        out, gzipped = gunzip_if_needed(packed, Limits(10**10, 10**10))
        assert gzipped and bytes(out) == raw


def test_after_start_up_the_collector_runs_less_often_and_still_frees_cycles() -> None:
    import gc
    import weakref

    from worker.entry.runtime import GC_THRESHOLD, settle_memory

    before = gc.get_threshold()
    try:
        settle_memory()
        settle_memory()  # idempotent: frozen once
        assert gc.get_threshold() == GC_THRESHOLD and gc.get_freeze_count() > 0

        class Node:
            link: Any = None

        node = Node()
        node.link = node  # a cycle: only the collector can free it
        ref = weakref.ref(node)
        del node
        gc.collect()
        assert ref() is None
    finally:
        gc.set_threshold(*before)


@pytest.mark.parametrize(
    ("data", "says"), [(b"bad", r"yielded str, not \(name, rows\)"), (b"raise", "the plugin broke")]
)
def test_a_streaming_extract_that_misbehaves_fails_its_file_only(data: bytes, says: str) -> None:
    from worker.core.errors import ExtractFailed
    from worker.loader.extract import Extractor

    extractor = Extractor.from_specs(
        "worker.loader.extract.outputfile_pb2:OutputFile", "tests.stream_plugins:processOutputData"
    )
    assert extractor.iterate is not None
    with pytest.raises(ExtractFailed, match=says):
        list(extractor.stream(data))
