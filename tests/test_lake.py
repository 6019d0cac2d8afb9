"""CDC end to end: a DynamoDB table's stream -> S3 parts -> Delta table equal to the table
(issue: streams + lake apply)."""

from __future__ import annotations

import asyncio
import gzip
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import orjson
import pytest

import lambda_entry
from tests import factories as f
from tests.conftest import LAKE, scan
from tests.fault_proxy import S3Faults
from tests.processes import ROOT
from worker.cdc import cdc_rules as rules
from worker.cdc.buffer import record_from_sdk
from worker.cdc.images import convert_image
from worker.cdc.lake import ApplyResult, apply_changes, read_table
from worker.cdc.maintain import maintain
from worker.cdc.parts import decode_part
from worker.core.aws import Clients
from worker.core.config import AwsSettings

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


def read_part(key: str) -> list[dict[str, Any]]:
    body = boto3.client("s3").get_object(Bucket=LAKE, Key=key)["Body"].read()
    return decode_part(key, body)


class RulesModel:
    """The CDC apply written with nothing but ``cdc_rules``: a target and its
    tombstones as dicts, one ``apply`` per run."""

    def __init__(self) -> None:
        self.rows: dict[Any, dict[str, Any]] = {}
        self.tombstones: dict[Any, str] = {}

    def apply(self, changes: list[dict[str, Any]]) -> None:
        seq = rules.SEQUENCE_COLUMN
        flat = [
            {
                "key": tuple(sorted(c["keys"].items())),
                "image": c["new_image"],
                seq: rules.padded_sequence(c["sequence_number"]),
                "delete": c["is_deleted"],
            }
            for c in changes
        ]
        for change in rules.latest_per_key(flat, ["key"]):
            key, sequence, delete = change["key"], change[seq], change["delete"]
            tombstone = self.tombstones.get(key)
            if not rules.survives(sequence, tombstone):
                continue  # cdc_rules.NOT_TOMBSTONED
            live = self.rows.get(key, {}).get(seq)
            action = rules.decide(sequence, delete, live, tombstone)
            if action == "delete":
                del self.rows[key]
            elif action is not None:
                self.rows[key] = {**change["image"], seq: sequence}
            if delete:  # TOMBSTONE_MOVE_WHEN / TOMBSTONE_ADD_WHEN
                self.tombstones[key] = sequence
            else:  # TOMBSTONE_CLEAR_WHEN
                self.tombstones.pop(key, None)

    def items(self) -> dict[str, dict[str, Any]]:
        seq = rules.SEQUENCE_COLUMN
        return {row["id"]: {k: v for k, v in row.items() if k != seq} for row in self.rows.values()}


def apply(target: str) -> ApplyResult:
    async def run() -> ApplyResult:
        async with Clients(max_in_flight=4, aws=AwsSettings(region="us-east-1")) as clients:
            return await apply_changes(clients.s3, SOURCE, target)

    return asyncio.run(run())


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

    # Old batches come back (a replay, late retried uploads, a redrive): random windows
    # of the stream, cut unlike the first time so they become new parts, shuffled.
    rng = random.Random(11)
    windows = []
    for _ in range(12):
        start = rng.randrange(len(records) - 50)
        windows.append(records[start : start + rng.randrange(5, 50)])
    rng.shuffle(windows)
    first_parts = set(first.parts)
    for window in windows:
        assert deliver(window, batch=len(window)) == []
    replay = apply(target)
    assert replay.parts and not set(replay.parts) & first_parts and replay.refused > 0
    assert lake_rows(target) == source_items(ddb)

    # The same two runs through the pure-Python rules the Databricks job shares.
    model = RulesModel()
    for parts in (first.parts, replay.parts):
        model.apply([c for key in parts for c in read_part(key)])
    assert model.items() == source_items(ddb)


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


def put(target: str, *records: dict[str, Any]) -> ApplyResult:
    """Deliver records as one Lambda batch, then apply: one run of the lake."""
    assert deliver(list(records), batch=len(records)) == []
    return apply(target)


def live(target: str) -> dict[str, Any]:
    return {row["id"]: row.get("v") for row in read_table(target)}


def tombstones(target: str) -> dict[str, str]:
    from deltalake import DeltaTable

    rows = DeltaTable(f"{target}_cdc/tombstones").to_pyarrow_table().to_pylist()
    return {row["id"]: row[rules.SEQUENCE_COLUMN] for row in rows}


def test_a_delete_survives_an_older_change_applied_in_a_later_run(
    lake: Callable[..., None], tmp_path: Path
) -> None:
    lake()
    target = str(tmp_path / "delta")
    put(
        target,
        f.stream_record(1, key="a", new={"v": {"N": "1"}}),
        f.stream_record(2, "MODIFY", key="a", new={"v": {"N": "2"}}),
        f.stream_record(3, "REMOVE", key="a", old={"v": {"N": "2"}}),
        f.stream_record(4, key="b", new={"v": {"N": "4"}}),
    )
    assert live(target) == {"b": 4} and tombstones(target) == {"a": rules.padded_sequence(3)}
    # a replayed update and a late insert, both older than the delete, in a later run
    replay = put(
        target,
        f.stream_record(2, "MODIFY", key="a", new={"v": {"N": "2"}}),
        f.stream_record(1, key="a", new={"v": {"N": "1"}}),
    )
    assert replay.parts and replay.refused == 1
    assert live(target) == {"b": 4}  # a stays deleted; the target holds live rows only


def test_a_newer_insert_brings_a_deleted_key_back_and_clears_its_tombstone(
    lake: Callable[..., None], tmp_path: Path
) -> None:
    lake()
    target = str(tmp_path / "delta")
    put(target, f.stream_record(1, key="a", new={"v": {"N": "1"}}))
    put(target, f.stream_record(5, "REMOVE", key="a", old={"v": {"N": "1"}}))
    assert live(target) == {} and tombstones(target) == {"a": rules.padded_sequence(5)}
    put(target, f.stream_record(5, "INSERT", key="a", new={"v": {"N": "5"}}))  # not newer
    assert live(target) == {}
    put(target, f.stream_record(7, key="a", new={"v": {"N": "7"}}))
    assert live(target) == {"a": 7} and tombstones(target) == {}
    put(target, f.stream_record(6, "REMOVE", key="a"))  # older than the live row
    assert live(target) == {"a": 7}


def test_applied_parts_stay_applied_after_the_delta_log_is_cleaned_up(
    lake: Callable[..., None], tmp_path: Path
) -> None:
    from datetime import UTC, datetime, timedelta

    from deltalake import DeltaTable

    lake()
    target = str(tmp_path / "delta")
    put(target, f.stream_record(1, key="a", new={"v": {"N": "1"}}))
    put(target, f.stream_record(2, "REMOVE", key="a"))
    put(target, f.stream_record(3, key="b", new={"v": {"N": "3"}}))
    # the tombstone expires, then the log's cleanup removes every commit but the last
    maintain(target, retention_hours=168, tombstone_retention_hours=1,
             now=datetime.now(UTC) + timedelta(hours=2))  # fmt: skip
    assert tombstones(target) == {}
    table = DeltaTable(target)
    table.alter.set_table_properties({"delta.logRetentionDuration": "interval 0 seconds"})
    table.create_checkpoint()
    table.cleanup_metadata()
    table = DeltaTable(target)
    assert len(table.history()) == 1  # the commits that listed the parts are gone
    version = table.version()
    assert apply(target).parts == []  # and still no part is applied twice
    assert DeltaTable(target).version() == version and live(target) == {"b": 3}


def test_attribute_names_become_columns_without_loss_or_clashes(
    lake: Callable[..., None], tmp_path: Path
) -> None:
    lake()
    target = str(tmp_path / "delta")
    image = {
        "a b": {"S": "space"},
        "a_b": {"S": "underscore"},
        "Name": {"S": "upper"},
        "name": {"S": "lower"},
        "_sequence_number": {"S": "ours?"},
    }
    put(target, f.stream_record(1, key="k", new=image))
    put(target, f.stream_record(2, "MODIFY", key="k", new={**image, "name": {"S": "lower2"}}))
    (row,) = read_table(target)
    columns = rules.column_names([*image, "id"])
    assert len(set(columns.values())) == len(columns)  # one column each
    assert {columns[a]: row[columns[a]] for a in image} == {
        columns["a b"]: "space",
        columns["a_b"]: "underscore",
        columns["Name"]: "upper",
        columns["name"]: "lower2",
        columns["_sequence_number"]: "ours?",
    }
    assert row[rules.SEQUENCE_COLUMN] == rules.padded_sequence(2)
    assert columns["a_b"] == "a_b" and columns["Name"] == "Name"  # plain names stay


def lake_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", "lake", *args],
        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def write_part(key: str, body: bytes) -> None:
    boto3.client("s3").put_object(
        Bucket=LAKE, Key=f"cdc/src/dt=2026-11-22/hour=01/{key}", Body=body
    )


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (gzip.compress(b'{"a": 1}\n' * 1000)[:-40], "Compressed file ended"),
        (gzip.compress(b"{}\n"), "change 1: no keys"),
        (gzip.compress(b"[1,2]\n"), "change 1: a list, not a change envelope"),
    ],
    ids=["truncated-gzip", "empty-object", "a-list"],
)
def test_an_unreadable_part_stops_the_apply_with_one_line_until_it_is_quarantined(
    lake: Callable[..., None], tmp_path: Path, body: bytes, why: str
) -> None:
    lake()
    target = str(tmp_path / "delta")
    put(target, f.stream_record(1, key="a", new={"v": {"N": "1"}}))
    deliver([f.stream_record(2, key="b", new={"v": {"N": "2"}})], batch=1)
    write_part("part-x.json.gz", body)
    failed = lake_cli("apply", "--source", SOURCE, "--target", target)
    assert failed.returncode == 1, failed.stderr
    (line,) = failed.stderr.splitlines()
    assert "part-x.json.gz" in line and why in line and "nothing was applied" in line
    assert live(target) == {"a": 1}  # b's good part was not applied either
    part = "cdc/src/dt=2026-11-22/hour=01/part-x.json.gz"
    assert f"s3://{LAKE}/{part}" in line  # the URI quarantine accepts as it is
    moved = lake_cli("quarantine", "--source", SOURCE, "--part", f"s3://{LAKE}/{part}")
    assert moved.returncode == 0 and "_quarantine" in moved.stdout, moved.stderr
    assert any('"lake_part_quarantined"' in line for line in moved.stderr.splitlines())
    assert apply(target).parts and live(target) == {"a": 1, "b": 2}
    elsewhere = lake_cli("quarantine", "--source", SOURCE, "--part", "other/part-y.json.gz")
    assert elsewhere.returncode == 1 and elsewhere.stderr.splitlines() == [
        f"worker lake: error: --part 'other/part-y.json.gz' is not a part under {SOURCE}"
    ]
    s3 = boto3.client("s3")
    assert s3.get_object(Bucket=LAKE, Key=part.replace("cdc/src/", "cdc/src/_quarantine/"))
    again = lake_cli("quarantine", "--source", SOURCE, "--part", part)
    assert again.returncode == 0 and "already quarantined" in again.stdout, again.stderr


def test_an_apply_of_a_source_with_no_parts_at_all_says_so_and_names_it(
    lake: Callable[..., None], tmp_path: Path
) -> None:
    lake()
    typo = SOURCE + "-typo"
    result = lake_cli("apply", "--source", typo, "--target", str(tmp_path / "delta"))
    assert result.returncode == 1, result.stdout
    (line,) = result.stderr.splitlines()
    assert f"no parts under {typo}" in line


def test_maintain_refuses_a_retention_below_its_minimum(tmp_path: Path) -> None:
    result = lake_cli("maintain", "--target", str(tmp_path / "delta"), "--retention-hours", "0")
    assert result.returncode == 2 and "below the minimum" in result.stderr


def test_maintain_compacts_vacuums_and_expires_only_old_tombstones(
    lake: Callable[..., None], tmp_path: Path
) -> None:
    from datetime import UTC, datetime

    from deltalake import DeltaTable

    lake()
    target = str(tmp_path / "delta")
    hour = 3600
    put(target, *[f.stream_record(s, key=f"k{s}", new={"v": {"N": str(s)}}) for s in range(1, 9)])
    put(target, f.stream_record(10, "REMOVE", key="k1", created_s=1_763_700_000))
    put(target, f.stream_record(11, "REMOVE", key="k2", created_s=1_763_700_000 + 50 * hour))
    for s in range(12, 20):  # one commit, and at least one small file, per run
        put(target, f.stream_record(s, "MODIFY", key="k3", new={"v": {"N": str(s)}}))
    progress = Path(f"{target}_cdc/progress")
    assert len(DeltaTable(str(progress)).file_uris()) == 11  # one small file per run
    on_disk = len(list(Path(target).glob("*.parquet")))
    now = datetime.fromtimestamp(1_763_700_000 + 60 * hour, tz=UTC)
    result = maintain(target, retention_hours=0, tombstone_retention_hours=24, now=now)
    assert result.tombstones_expired == 1
    assert tombstones(target) == {"k2": rules.padded_sequence(11)}
    assert len(DeltaTable(str(progress)).file_uris()) == 1  # compacted
    assert len(list(progress.glob("*.parquet"))) == 1  # and the small files vacuumed
    table = DeltaTable(target)
    assert len(list(Path(target).glob("*.parquet"))) == len(table.file_uris()) < on_disk
    assert live(target) == {f"k{s}": (19 if s == 3 else s) for s in range(3, 9)}
    assert apply(target).parts == []  # the compacted progress still lists every part


def test_maintain_is_safe_beside_running_applies(lake: Callable[..., None], tmp_path: Path) -> None:
    lake(max_records=3)
    target = str(tmp_path / "delta")
    expected = {"k0": 1}
    put(target, f.stream_record(1, key="k0", new={"v": {"N": "1"}}))
    stop = threading.Event()
    passes: list[int] = []
    errors: list[BaseException] = []

    def keep_maintaining() -> None:
        while not stop.is_set():
            try:
                maintain(target, retention_hours=168, tombstone_retention_hours=168)
                passes.append(1)
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)
                return

    thread = threading.Thread(target=keep_maintaining)
    thread.start()
    try:
        for run in range(8):
            records = []
            for s in range(10 + run * 10, 18 + run * 10):
                key = f"k{s % 7}"
                if s % 5 == 0:
                    records.append(f.stream_record(s, "REMOVE", key=key))
                    expected.pop(key, None)
                else:
                    records.append(f.stream_record(s, key=key, new={"v": {"N": str(s)}}))
                    expected[key] = s
            put(target, *records)
    finally:
        stop.set()
        thread.join(120)
    assert not errors, errors
    assert len(passes) >= 2
    assert live(target) == expected


def test_the_cli_maintains_with_the_retention_from_the_environment(
    lake: Callable[..., None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lake()
    target = str(tmp_path / "delta")
    missing = lake_cli("maintain", "--target", target)
    assert missing.returncode == 1 and missing.stderr.splitlines() == [
        f"worker lake: error: no Delta table at {target}"
    ]
    put(target, f.stream_record(1, key="a", new={"v": {"N": "1"}}))
    now = time.time()
    put(target, f.stream_record(2, "REMOVE", key="a", created_s=now - 30 * 86400))
    put(target, f.stream_record(3, "REMOVE", key="b", created_s=now))
    monkeypatch.setenv("LAKE_TOMBSTONE_RETENTION_HOURS", str(24 * 60))
    kept = lake_cli("maintain", "--target", target)
    assert kept.returncode == 0 and "expired 0 tombstones" in kept.stdout, kept.stderr
    monkeypatch.setenv("LAKE_TOMBSTONE_RETENTION_HOURS", "24")
    done = lake_cli("maintain", "--target", target, "--retention-hours", "1")
    assert done.returncode == 0 and "expired 1 tombstones" in done.stdout, done.stderr
    assert tombstones(target) == {"b": rules.padded_sequence(3)}


def test_parquet_parts_apply_like_ndjson_parts(lake: Callable[..., None], tmp_path: Path) -> None:
    lake(format="parquet")
    target = str(tmp_path / "delta")
    put(
        target,
        f.stream_record(1, key="a", new={"v": {"N": "1"}, "m": {"M": {"x": {"S": "y"}}}}),
        f.stream_record(2, key="b", new={"v": {"N": "2"}}),
    )
    put(target, f.stream_record(3, "REMOVE", key="b"), f.stream_record(2, key="b", new={}))
    assert live(target) == {"a": 1} and tombstones(target) == {"b": rules.padded_sequence(3)}
    assert orjson.loads(read_table(target)[0]["m"]) == {"x": "y"}
