"""The batch writer under DynamoDB's real behaviour, through the fault proxy (README "Writing")."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from tests import factories as f
from tests.conftest import BUCKET, scan, window_alone
from tests.fault_proxy import FaultProxy
from worker.core.aws import Clients
from worker.core.config import Settings
from worker.core.errors import WriteThrottled
from worker.loader.ddb_http import BatchWriteClient, batch_write_client
from worker.loader.items import Item
from worker.loader.messages import ObjectRef
from worker.loader.pipeline import Loader
from worker.loader.writer import BatchWriter, Window


@pytest.fixture(params=["fast", "sdk"])
def write_path(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both BatchWriteItem paths."""
    return str(request.param)


def items(count: int, start: int = 0) -> list[Item]:
    return [{"id": {"S": f"k{i}"}, "v": {"N": str(i)}} for i in range(start, start + count)]


def create_table(name: str) -> None:
    client = boto3.client("dynamodb")  # through whatever endpoint the test set: the proxy
    client.create_table(
        TableName=name,
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
    )
    client.get_waiter("table_exists").wait(TableName=name, WaiterConfig={"Delay": 0.1})


async def test_under_30pct_unprocessed_and_10pct_throttles_every_row_lands_exactly_once(
    proxy: FaultProxy, settings: Settings, clients: Clients, s3: Any, ddb: Any, prefix: str
) -> None:
    proxy.unprocessed_fraction, proxy.throttle_fraction = 0.3, 0.1
    rows: list[list[Any]] = [[f"r{i}", i, float(i) / 7] for i in range(3000)]
    s3.put_object(Bucket=BUCKET, Key="load.pb", Body=f.output_file(("t", ["id", "n", "x"], rows)))
    summary = await Loader(window_alone(settings), clients).load(ObjectRef(BUCKET, "load.pb"))
    assert summary.ok, summary.error
    assert proxy.stats.rejected == [] and proxy.stats.bad_signatures == []
    assert proxy.stats.max_batch <= 25
    assert proxy.stats.items_forwarded == len(rows)  # each row reached DynamoDB once
    assert proxy.stats.items_unprocessed > 0 and proxy.stats.throttled > 0
    stored = scan(ddb, f"{prefix}_t")
    assert sorted(i["id"]["S"] for i in stored) == sorted(r[0] for r in rows)
    table = summary.tables[0]
    assert table.write.retries > 0 and table.write.throttled_requests == proxy.stats.throttled


async def test_at_a_tables_capacity_the_pace_engages_and_every_row_lands_exactly_once(
    proxy: FaultProxy, settings: Settings, clients: Clients, s3: Any, ddb: Any, prefix: str
) -> None:
    proxy.capacity = 1000  # items a second: refusals follow the rate, as DynamoDB's do
    rows: list[list[Any]] = [[f"r{i}", i] for i in range(4000)]
    s3.put_object(Bucket=BUCKET, Key="full.pb", Body=f.output_file(("t", ["id", "n"], rows)))
    loader = Loader(settings, clients)
    summary = await loader.load(ObjectRef(BUCKET, "full.pb"))
    assert summary.ok, summary.error
    assert proxy.stats.items_forwarded == len(rows) and proxy.stats.rejected == []
    assert sorted(i["id"]["S"] for i in scan(ddb, f"{prefix}_t")) == sorted(r[0] for r in rows)
    assert proxy.stats.throttled + proxy.stats.items_unprocessed > 0
    assert loader.writer.paces[f"{prefix}_t"].rate is not None  # engaged by the throttles


async def test_the_window_shrinks_under_throttling_and_recovers_after(
    proxy: FaultProxy, settings: Settings, batch_writes: BatchWriteClient, prefix: str
) -> None:
    create_table(f"{prefix}_w")
    writer = BatchWriter(batch_writes, window_alone(settings).write)
    assert writer.window.limit == settings.write.max_in_flight
    proxy.throttle_fraction = 0.6
    await writer.write(f"{prefix}_w", items(1000))
    shrunk = writer.window.smallest
    assert shrunk < settings.write.max_in_flight and writer.window.decreases > 0
    proxy.throttle_fraction = 0.0
    await writer.write(f"{prefix}_w", items(5000, start=1000))
    assert writer.window.limit == settings.write.max_in_flight > shrunk


async def test_writes_that_stay_throttled_fail_as_retryable_after_max_attempts(
    proxy: FaultProxy, settings: Settings, batch_writes: BatchWriteClient, prefix: str
) -> None:
    create_table(f"{prefix}_x")
    proxy.throttle_fraction = 1.0
    limited = dataclasses.replace(
        settings.write, backoff=dataclasses.replace(settings.write.backoff, attempts=3)
    )
    writer = BatchWriter(batch_writes, limited)
    with pytest.raises(WriteThrottled) as caught:
        await writer.write(f"{prefix}_x", items(30))
    assert caught.value.retriable
    assert proxy.stats.throttled == proxy.stats.batch_requests
    assert writer.window.in_flight == 0  # every slot came back


async def test_backoff_grows_exponentially_with_full_jitter(
    proxy: FaultProxy, settings: Settings, batch_writes: BatchWriteClient, prefix: str
) -> None:
    create_table(f"{prefix}_b")
    proxy.throttle_fraction = 1.0
    sleeps: list[float] = []

    async def record(seconds: float) -> None:
        sleeps.append(seconds)

    write = dataclasses.replace(
        settings.write,
        backoff=dataclasses.replace(settings.write.backoff, attempts=5, cap_s=100.0),
    )
    writer = BatchWriter(batch_writes, write, sleep=record, jitter=lambda: 1.0)
    with pytest.raises(WriteThrottled):
        await writer.write(f"{prefix}_b", items(1))
    base = write.backoff.base_s
    assert sleeps == [base * 2, base * 4, base * 8, base * 16]


async def test_a_badly_signed_request_is_refused_by_the_proxy(
    proxy: FaultProxy, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    create_table(f"{prefix}_sig")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    async with Clients(max_in_flight=2) as wrong:
        with pytest.raises(ClientError) as caught:
            await batch_write_client(wrong, "fast").batch_write_item(
                RequestItems={f"{prefix}_sig": [{"PutRequest": {"Item": items(1)[0]}}]}
            )
    assert caught.value.response["Error"]["Code"] == "InvalidSignatureException"
    assert proxy.stats.bad_signatures == ["signature does not match"]


def test_the_proxy_rejects_what_dynamodb_rejects(proxy: FaultProxy, prefix: str) -> None:
    create_table(f"{prefix}_p")
    client = boto3.client("dynamodb")
    too_many = [{"PutRequest": {"Item": i}} for i in items(26)]
    duplicate = [{"PutRequest": {"Item": i}} for i in items(1) * 2]
    infinite = [{"PutRequest": {"Item": {"id": {"S": "a"}, "n": {"N": "Infinity"}}}}]
    for requests in (too_many, duplicate, infinite):
        with pytest.raises(ClientError) as caught:
            client.batch_write_item(RequestItems={f"{prefix}_p": requests})
        assert caught.value.response["Error"]["Code"] == "ValidationException"
    assert len(proxy.stats.rejected) == 3


async def test_a_cancelled_waiter_never_leaks_a_window_slot() -> None:
    window = Window(1)
    held = await window.acquire()
    waiter = asyncio.create_task(window.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    held.release()
    again = await asyncio.wait_for(window.acquire(), 1)
    assert window.in_flight == 1
    again.release()
    assert window.in_flight == 0


async def test_the_window_serves_waiters_first_come_first_served() -> None:
    window = Window(1)
    first = await window.acquire()
    order: list[str] = []

    async def take(name: str) -> None:
        slot = await window.acquire()
        order.append(name)
        slot.release()

    tasks = [asyncio.create_task(take(name)) for name in "abc"]
    await asyncio.sleep(0)
    first.release()
    await asyncio.gather(*tasks)
    assert order == ["a", "b", "c"]


async def test_one_throttle_round_halves_the_window_only_once() -> None:
    window = Window(16)
    slots = [await window.acquire() for _ in range(8)]
    for slot in slots:  # eight responses from the same round trip all say "throttled"
        window.on_throttle(slot.epoch)
    assert window.limit == 8 and window.decreases == 1
