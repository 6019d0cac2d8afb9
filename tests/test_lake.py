"""CDC end to end: a DynamoDB table's stream -> S3 parts -> Delta table equal to the table
(issue: streams + lake apply)."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import orjson
import pytest

import lambda_entry
from tests import factories as f
from tests.conftest import scan
from tests.fault_proxy import S3Faults
from tests.processes import ROOT
from worker.cdc import cdc_rules as rules
from worker.cdc.buffer import record_from_sdk
from worker.cdc.images import convert_image
from worker.cdc.lake import ApplyResult, apply_changes, read_table
from worker.core.aws import Clients
from worker.core.config import AwsSettings, Settings, StreamSettings

LAKE = "lake"
SOURCE = f"s3://{LAKE}/cdc/src"
META = {rules.SEQUENCE_COLUMN, rules.EVENT_TIME_COLUMN}


def make_source_table(ddb: Any) -> str:
    described = ddb.create_table(
        TableName="src",
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
    )
    return str(described["TableDescription"]["LatestStreamArn"])


def random_item(rng: random.Random, key: str, step: int) -> dict[str, Any]:
    item: dict[str, Any] = {
        "id": {"S": key},
        "count": {"N": str(rng.randint(-(10**12), 10**12))},
        "price": {"N": repr(round(rng.uniform(0, 1000), 3))},
        "name": {"S": rng.choice(["ann", "bob", "zoë", ""])},
        "active": {"BOOL": rng.random() < 0.5},
        "tags": {"SS": rng.sample(["a", "b", "c", "d"], k=rng.randint(1, 3))},
        "meta": {"M": {"v": {"N": str(step)}, "l": {"L": [{"S": "x"}, {"N": "1"}]}}},
    }
    if rng.random() < 0.3:
        del item["name"]  # attributes come and go
    if step > 1000:
        item["added_later"] = {"S": f"new-{step}"}  # schema evolution
    return item


def mutate(ddb: Any, operations: int, keys: int, seed: int = 5) -> None:
    rng = random.Random(seed)
    for step in range(operations):
        key = f"k{rng.randrange(keys)}"
        roll = rng.random()
        if roll < 0.6:
            ddb.put_item(TableName="src", Item=random_item(rng, key, step))
        elif roll < 0.85:
            ddb.update_item(
                TableName="src",
                Key={"id": {"S": key}},
                UpdateExpression="SET #c = :c",
                ExpressionAttributeNames={"#c": "count"},
                ExpressionAttributeValues={":c": {"N": str(step)}},
            )
        else:
            ddb.delete_item(TableName="src", Key={"id": {"S": key}})


def read_stream(moto: str, stream_arn: str) -> list[dict[str, Any]]:
    """Every record of the stream, as Lambda would deliver it (JSON: B as base64)."""
    streams = boto3.client("dynamodbstreams", endpoint_url=moto)
    records: list[dict[str, Any]] = []
    for shard in streams.describe_stream(StreamArn=stream_arn)["StreamDescription"]["Shards"]:
        iterator = streams.get_shard_iterator(
            StreamArn=stream_arn, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
        )["ShardIterator"]
        while True:
            page = streams.get_records(ShardIterator=iterator, Limit=1000)
            records.extend(page["Records"])
            iterator = page.get("NextShardIterator")
            if not page["Records"] or not iterator:
                break
    return [record_from_sdk(record, stream_arn) for record in records]


def deliver(records: list[dict[str, Any]], batch: int) -> list[str]:
    """Invoke the handler as Lambda does: batches in order, resending from a reported failure.
    Returns the failure identifiers seen."""
    seen: list[str] = []
    start = 0
    while start < len(records):
        chunk = records[start : start + batch]
        response = lambda_entry.handler({"Records": chunk}, f.LambdaContext())
        failures = [x["itemIdentifier"] for x in response["batchItemFailures"]]
        if failures:
            seen.extend(failures)
            start += [r["dynamodb"]["SequenceNumber"] for r in chunk].index(failures[0])
            continue
        start += batch
    return seen


def lake_rows(target: str) -> dict[str, dict[str, Any]]:
    """The Delta table as {key: item}, without bookkeeping columns or nulls."""
    rows = {}
    for row in read_table(target):
        item = {k: v for k, v in row.items() if k not in META and v is not None}
        for name in ("tags", "meta"):
            if name in item:
                item[name] = orjson.loads(item[name])
        rows[row["id"]] = item
    return rows


def source_items(ddb: Any) -> dict[str, dict[str, Any]]:
    items = {}
    for raw in scan(ddb, "src"):
        item = convert_image(raw)
        assert item is not None
        items[item["id"]] = item
    return items


def apply(target: str) -> ApplyResult:
    async def run() -> ApplyResult:
        async with Clients(max_in_flight=4, aws=AwsSettings(region="us-east-1")) as clients:
            return await apply_changes(clients.s3, SOURCE, target)

    return asyncio.run(run())


@pytest.fixture
def lake(moto: str, install_runtime: Callable[[Settings], Any]) -> Callable[..., None]:
    """The lake bucket, and a way to give the handler its stream settings."""
    boto3.client("s3", endpoint_url=moto).create_bucket(Bucket=LAKE)
    return lambda **streams: install_runtime(
        Settings(streams=StreamSettings(bucket=LAKE, **streams))
    )


@pytest.fixture
def stream_runtime(
    moto: str, lake: Callable[..., None], monkeypatch: pytest.MonkeyPatch
) -> Iterator[S3Faults]:
    with S3Faults(moto, fail_key="/cdc/src/") as faults:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", faults.url)  # the handler's S3 goes through it
        lake(max_records=150)
        yield faults


def test_the_delta_table_ends_equal_to_the_source_table(
    moto: str, stream_runtime: S3Faults, tmp_path: Path
) -> None:
    ddb = boto3.client("dynamodb", endpoint_url=moto)
    stream_arn = make_source_table(ddb)
    mutate(ddb, operations=1500, keys=200)
    records = read_stream(moto, stream_arn)
    assert len(records) > 1200  # deletes of absent keys leave no record

    batches = [records[i : i + 100] for i in range(0, len(records), 100)]
    batches[3], batches[4] = batches[4], batches[3]  # two delivered out of order
    batches.insert(7, batches[2])  # a redelivery
    batches.append(batches[0])  # and another, much later
    failures = deliver([r for b in batches for r in b], batch=100)
    assert stream_runtime.failed and failures  # one S3 write failed and was retried

    target = str(tmp_path / "delta")
    first = apply(target)
    assert first.parts and first.version is not None
    assert lake_rows(target) == source_items(ddb)

    before = read_table(target)
    again = apply(target)
    assert again.parts == [] and read_table(target) == before
    from deltalake import DeltaTable

    assert DeltaTable(target).version() == first.version  # no new commit at all


def test_apply_of_new_parts_updates_deletes_and_adds_columns(
    lake: Callable[..., None], tmp_path: Path
) -> None:
    lake()
    target = str(tmp_path / "delta")
    deliver(
        [
            f.stream_record(1, key="a", new={"v": {"N": "1"}}),
            f.stream_record(2, key="b", new={"v": {"N": "2"}}),
        ],
        batch=10,
    )
    apply(target)
    deliver(
        [
            f.stream_record(3, "MODIFY", key="a", new={"v": {"N": "3"}, "w": {"S": "new"}}),
            f.stream_record(4, "REMOVE", key="b", old={"v": {"N": "2"}}),
            f.stream_record(0, "MODIFY", key="a", new={"v": {"N": "-1"}}),  # stale: ignored
        ],
        batch=10,
    )
    result = apply(target)
    assert result.metrics["num_target_rows_deleted"] == 1
    (row,) = read_table(target)
    assert (row["id"], row["v"], row["w"]) == ("a", 3, "new")
    assert row[rules.SEQUENCE_COLUMN] == rules.padded_sequence(3)


def test_two_concurrent_applies_leave_one_row_per_key(
    lake: Callable[..., None], tmp_path: Path
) -> None:
    lake(max_records=5)
    deliver(
        [f.stream_record(s, key=f"k{s % 17}", new={"v": {"N": str(s)}}) for s in range(1, 60)],
        20,
    )
    target = str(tmp_path / "delta")
    results: list[ApplyResult | BaseException] = []

    def run() -> None:
        try:
            results.append(apply(target))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not [r for r in results if isinstance(r, BaseException)], results
    applied = sorted(bool(r.parts) for r in results if isinstance(r, ApplyResult))
    assert applied == [False, True]  # the parts were applied exactly once
    rows = read_table(target)
    assert sorted(r["id"] for r in rows) == sorted(f"k{i}" for i in range(17))
    latest = {f"k{i}": max(s for s in range(1, 60) if s % 17 == i) for i in range(17)}
    assert {r["id"]: r["v"] for r in rows} == latest


def test_the_cli_applies_once_then_reports_up_to_date(
    lake: Callable[..., None], tmp_path: Path
) -> None:
    lake()
    deliver([f.stream_record(1, key="a", new={"v": {"N": "1"}})], 10)
    target = str(tmp_path / "delta")
    command = [
        sys.executable,
        "-m",
        "worker",
        "lake",
        "apply",
        "--source",
        SOURCE,
        "--target",
        target,
    ]
    first = subprocess.run(
        command, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=120
    )
    assert first.returncode == 0, first.stderr
    assert "applied 1 parts" in first.stdout and "1 inserted" in first.stdout
    second = subprocess.run(
        command, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=120
    )
    assert second.returncode == 0 and "up to date" in second.stdout
