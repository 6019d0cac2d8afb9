"""CDC lake from day one (issue 20): a table bootstrapped from a DynamoDB full export,
the seam between the export and the stream, and state that cannot vanish silently."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import orjson
import pytest

from tests.conftest import LAKE
from tests.test_lake import (
    SOURCE,
    RulesModel,
    apply,
    deliver,
    lake_cli,
    lake_rows,
    make_source_table,
    mutate,
    random_item,
    read_stream,
    source_items,
)
from worker.cdc import bootstrap as bootstrap_module
from worker.cdc import cdc_rules as rules
from worker.cdc.bootstrap import BootstrapResult, bootstrap
from worker.cdc.lake import Lake, apply_changes, read_cutover, read_table
from worker.core.aws import Clients
from worker.core.config import AwsSettings
from worker.core.errors import LakeError

EXPORT_PREFIX = "exports"


def write_export(
    items: list[dict[str, Any]], time_ms: int, *, files: int = 2, export_id: str = "0170-abc"
) -> str:
    """A full export in S3, laid out and named as DynamoDB writes one."""
    s3 = boto3.client("s3")
    base = f"{EXPORT_PREFIX}/AWSDynamoDB/{export_id}"
    listing = []
    for n in range(files):
        chunk = items[n::files]
        key = f"{base}/data/file-{n}.json.gz"
        body = b"".join(orjson.dumps({"Item": item}) + b"\n" for item in chunk)
        s3.put_object(Bucket=LAKE, Key=key, Body=gzip.compress(body))
        listing.append({"itemCount": len(chunk), "md5Checksum": "x", "etag": "y",
                        "dataFileS3Key": key})  # fmt: skip
    s3.put_object(
        Bucket=LAKE,
        Key=f"{base}/manifest-files.json",
        Body=b"\n".join(orjson.dumps(entry) for entry in listing),
    )
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time_ms // 1000))
    summary = {
        "version": "2020-06-30",
        "exportArn": f"arn:aws:dynamodb:us-east-1:123456789012:table/src/export/{export_id}",
        "startTime": f"{stamp}.{time_ms % 1000:03d}Z",
        "endTime": f"{stamp}.{time_ms % 1000:03d}Z",
        "tableArn": "arn:aws:dynamodb:us-east-1:123456789012:table/src",
        "tableId": "1",
        "exportTime": f"{stamp}.{time_ms % 1000:03d}Z",
        "s3Bucket": LAKE,
        "s3Prefix": EXPORT_PREFIX,
        "s3SseAlgorithm": "AES256",
        "s3SseKmsKeyId": None,
        "manifestFilesS3Key": f"{base}/manifest-files.json",
        "billedSizeBytes": 0,
        "itemCount": len(items),
        "outputFormat": "DYNAMODB_JSON",
    }
    s3.put_object(Bucket=LAKE, Key=f"{base}/manifest-summary.json", Body=orjson.dumps(summary))
    return f"s3://{LAKE}/{base}"


def run_bootstrap(uri: str, target: str, **kwargs: Any) -> BootstrapResult:
    async def run() -> BootstrapResult:
        async with Clients(max_in_flight=4, aws=AwsSettings(region="us-east-1")) as clients:
            return await bootstrap(clients.s3, uri, target, key_names=["id"], **kwargs)

    return asyncio.run(run())


def whole_seconds(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """As DynamoDB Streams records them: ApproximateCreationDateTime in whole seconds."""
    for record in records:
        change = record["dynamodb"]
        change["ApproximateCreationDateTime"] = int(change["ApproximateCreationDateTime"])
    return records


def test_a_bootstrapped_table_with_a_stream_busy_across_the_export_ends_equal_to_the_source(
    moto: str, lake: Callable[..., None], tmp_path: Path
) -> None:
    lake()
    ddb = boto3.client("dynamodb", endpoint_url=moto)
    arn = make_source_table(ddb)  # the stream on
    rng = random.Random(9)
    for start in range(0, 10_200, 25):  # more than 10,000 items exist at the export
        puts = [{"PutRequest": {"Item": random_item(rng, f"k{n}", n)}}
                for n in range(start, start + 25)]  # fmt: skip
        ddb.batch_write_item(RequestItems={"src": puts})
    mutate(ddb, operations=600, keys=10_400, seed=1)
    export_ms = int(time.time() * 1000)
    exported = [item for item in _scan(ddb)]
    mutate(ddb, operations=600, keys=10_400, seed=2)  # busy across the export, same second too
    uri = write_export(exported, export_ms, files=3)
    records = whole_seconds(read_stream(moto, arn))
    assert any(r["dynamodb"]["ApproximateCreationDateTime"] * 1000 < export_ms for r in records)
    deliver(records[::-1][:400], batch=100)  # parts from after and before the export, replayed
    deliver(shuffled_batches(records, 250), batch=250)
    target = str(tmp_path / "delta")
    result = run_bootstrap(uri, target, batch_rows=2_000)
    assert result.items == len(exported) >= 10_000 and result.files == 3
    applied = apply(target)
    assert applied.before_cutover > 0 and applied.parts
    assert lake_rows(target) == source_items(ddb)
    again = run_bootstrap(uri, target)
    assert again.already and again.items == 0


def shuffled_batches(records: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    """The records in batches of ``size``, the batches in a shuffled order (each batch
    in order, as Lambda delivers one)."""
    batches = [records[i : i + size] for i in range(0, len(records), size)]
    random.Random(3).shuffle(batches)
    return [record for batch in batches for record in batch]


def _scan(ddb: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for page in ddb.get_paginator("scan").paginate(TableName="src"):
        items.extend(page["Items"])
    return items


# --- the seam: every order of one key's changes around the export ------------------

EXPORT_MS = 10_500
TIMES = [8_100, 9_200, 10_100, 10_500, 10_800, 11_300]  # two before its second; before, at
BEFORE = 2  # and after the export in it; after it. The first BEFORE may be missing.


def source_after(ops: list[tuple[int, str | None]], until: float) -> str | None:
    value = None
    for at, op in ops:
        if at <= until:
            value = op
    return value


def test_the_seam_rule_leaves_every_key_equal_to_the_source_in_every_delivery_order() -> None:
    """One key, at each of TIMES a put, a delete or nothing, the export consistent at
    EXPORT_MS, stream records in whole seconds. The stream holds every change from
    the export's second on, and any of those before it (a part lost, or a stream
    turned on late); the model applies the parts one by one, in every order (up to
    four parts; beyond, 30 shuffles), with cdc_rules.after_cutover and decide, and
    always ends equal to the source."""
    shuffles = random.Random(7)
    for ops in itertools.product(["v", None, "-"], repeat=len(TIMES)):
        timed = [(at, None if op is None else f"v{at}") for at, op in zip(TIMES, ops, strict=True)
                 if op != "-"]  # fmt: skip
        exported = source_after(timed, EXPORT_MS)
        final = source_after(timed, float("inf"))
        changes = [_model_change(n, at, value) for n, (at, value) in enumerate(timed)]
        before = [n for n, (at, _) in enumerate(timed) if at < EXPORT_MS - EXPORT_MS % 1000]
        for missing in itertools.chain.from_iterable(
            itertools.combinations(before, n) for n in range(len(before) + 1)
        ):
            delivered = [c for n, c in enumerate(changes) if n not in missing]
            orders: list[Any] = list(itertools.permutations(delivered))
            if len(delivered) > 4:
                orders = [shuffles.sample(delivered, len(delivered)) for _ in range(30)]
            for order in orders:
                model = RulesModel()
                if exported is not None:
                    zero = rules.padded_sequence(0)
                    model.rows[(("id", "k"),)] = {
                        "id": "k",
                        "v": exported,
                        rules.SEQUENCE_COLUMN: zero,
                    }
                for change in order:
                    if rules.after_cutover(change["approx_creation_time_ms"], EXPORT_MS):
                        model.apply([change])
                got = model.items().get("k", {}).get("v")
                assert got == final, (ops, missing, [c["sequence_number"] for c in order])


def _model_change(n: int, at: int, value: str | None) -> dict[str, Any]:
    return {
        "keys": {"id": "k"},
        "new_image": None if value is None else {"id": "k", "v": value},
        "is_deleted": value is None,
        "sequence_number": str(1000 + n),
        "approx_creation_time_ms": at - at % 1000,
    }


def test_after_cutover_keeps_the_export_second_and_drops_only_what_is_before_it() -> None:
    assert rules.after_cutover(10_000, 10_500) and rules.after_cutover(10_999, 10_500)
    assert not rules.after_cutover(9_999, 10_500) and not rules.after_cutover(9_000, 10_000)
    assert rules.after_cutover(10_000, 10_000)


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)])
def test_the_seam_through_delta_rs_in_several_orders(
    moto: str, lake: Callable[..., None], tmp_path: Path, order: tuple[int, ...]
) -> None:
    """Key a: changed before the export's second, in it before and after the export,
    and deleted after; key b: deleted in the export's second, after the export."""
    lake()
    export_ms = 1_700_000_010_500
    second = export_ms - export_ms % 1000
    uri = write_export([{"id": {"S": "a"}, "v": {"N": "2"}}, {"id": {"S": "b"}, "v": {"N": "9"}}],
                       export_ms, files=1)  # fmt: skip
    parts = [
        [_change("a", 1, second - 1000, 1)],  # before: the export holds a later value
        [_change("a", 2, second, 2)],  # in the export's second, before it: rewrites the same
        [_change("a", 3, second, 3), _change("b", 4, second, None)],  # in it, after the export
        [_change("a", 5, second + 1000, None), _change("a", 6, second + 2000, 7)],
    ]
    target = str(tmp_path / "delta")
    run_bootstrap(uri, target)
    for n in order:
        _write_part(f"p{n}", parts[n])
        apply(target)
    assert {k: v["v"] for k, v in lake_rows(target).items()} == {"a": 7}


def _change(key: str, seq: int, at_ms: int, value: int | None) -> dict[str, Any]:
    return {
        "event_id": f"e{seq}",
        "keys": {"id": key},
        "new_image": None if value is None else {"id": key, "v": value},
        "old_image": None,
        "is_deleted": value is None,
        "sequence_number": str(10**20 + seq),
        "approx_creation_time_ms": at_ms,
    }


def _write_part(name: str, changes: list[dict[str, Any]]) -> None:
    body = gzip.compress(b"".join(orjson.dumps(c) + b"\n" for c in changes))
    boto3.client("s3").put_object(
        Bucket=LAKE, Key=f"cdc/src/dt=2023-11-14/hour=22/part-{name}.json.gz", Body=body
    )


# --- resumable, refused where it must be ----------------------------------------------


def test_a_bootstrap_cut_off_midway_carries_on_without_a_row_twice_and_apply_waits_for_it(
    moto: str, lake: Callable[..., None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lake()
    items = [{"id": {"S": f"k{i}"}, "n": {"N": str(i)}} for i in range(500)]
    uri = write_export(items, 1_700_000_000_000, files=2)
    target = str(tmp_path / "delta")
    real_append, calls = bootstrap_module._append, []

    def crash_on_the_fourth(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # a killed process, between two commits
        return real_append(*args)

    monkeypatch.setattr(bootstrap_module, "_append", crash_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        run_bootstrap(uri, target, batch_rows=70)
    cutover = read_cutover(Lake(target))
    assert cutover is not None and not cutover.complete
    _write_part("after", [_change("k1", 1, 1_700_000_001_000, 11)])
    with pytest.raises(LakeError, match="has not finished; run worker lake bootstrap again"):
        apply(target)
    monkeypatch.setattr(bootstrap_module, "_append", real_append)
    run_bootstrap(uri, target, batch_rows=70)
    apply(target)
    assert len(read_table(target)) == 500  # every row once: no batch appended twice
    rows = lake_rows(target)
    assert rows["k1"]["v"] == 11 and rows["k2"]["n"] == 2


def test_a_bootstrap_into_a_table_that_exists_is_refused_in_one_line(
    moto: str, lake: Callable[..., None], tmp_path: Path
) -> None:
    lake()
    target = str(tmp_path / "delta")
    _write_part("first", [_change("a", 1, 1_000, 1)])
    apply(target)
    uri = write_export([{"id": {"S": "x"}}], 5_000, files=1)
    result = lake_cli("bootstrap", "--export", uri, "--target", target, "--keys", "id")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"worker lake: error: {target} exists: a bootstrap makes a new table (choose another "
        "--target, or keep this one and run lake apply)"
    ]


@pytest.mark.parametrize(
    ("summary", "says"),
    [
        ({"exportType": "INCREMENTAL_EXPORT"}, "is a INCREMENTAL_EXPORT in DYNAMODB_JSON"),
        ({"outputFormat": "ION"}, "is a FULL_EXPORT in ION"),
        ({"exportTime": None}, "lacks or garbles"),
    ],
)
def test_an_export_a_bootstrap_cannot_read_is_refused_in_one_line(
    moto: str, lake: Callable[..., None], tmp_path: Path, summary: dict[str, Any], says: str
) -> None:
    lake()
    uri = write_export([{"id": {"S": "x"}}], 5_000, files=1)
    key = uri.removeprefix(f"s3://{LAKE}/") + "/manifest-summary.json"
    s3 = boto3.client("s3")
    doc = {**orjson.loads(s3.get_object(Bucket=LAKE, Key=key)["Body"].read()), **summary}
    s3.put_object(Bucket=LAKE, Key=key, Body=orjson.dumps(doc))
    result = lake_cli("bootstrap", "--export", uri, "--target", str(tmp_path / "t"), "--keys", "id")
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    assert says in result.stderr
    missing = lake_cli("bootstrap", "--export", uri + "-nope", "--target", str(tmp_path / "t"))
    assert missing.returncode == 1 and "manifest-summary.json: NoSuchKey" in missing.stderr
    assert len(missing.stderr.splitlines()) == 1


def test_the_keys_come_from_the_exported_table_when_not_given(
    moto: str, lake: Callable[..., None], tmp_path: Path
) -> None:
    lake()
    make_source_table(boto3.client("dynamodb", endpoint_url=moto))
    uri = write_export([{"id": {"S": "x"}, "n": {"N": "1"}}], 5_000, files=1)
    result = lake_cli("bootstrap", "--export", uri, "--target", str(tmp_path / "t"))
    assert result.returncode == 0, result.stderr
    assert "bootstrapped from" in result.stdout and "1 items" in result.stdout
    assert lake_rows(str(tmp_path / "t")) == {"x": {"id": "x", "n": 1}}


# --- state that cannot vanish silently ---------------------------------------------------


@pytest.fixture
def applied_lake(lake: Callable[..., None], tmp_path: Path) -> str:
    lake()
    target = str(tmp_path / "delta")
    _write_part("one", [_change("a", 1, 1_000, 1), _change("b", 2, 1_000, 2)])
    apply(target)
    return target


@pytest.mark.parametrize("sidecar", ["progress", "tombstones"])
def test_a_lost_sidecar_stops_apply_in_one_line_naming_repair(
    applied_lake: str, sidecar: str
) -> None:
    _remove(Path(f"{applied_lake}_cdc/{sidecar}"))
    result = lake_cli("apply", "--source", SOURCE, "--target", applied_lake)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert f"has no {sidecar} table" in line and "worker lake repair --target" in line


def test_repair_rebuilds_progress_from_the_log_and_apply_goes_on(applied_lake: str) -> None:
    _remove(Path(f"{applied_lake}_cdc/progress"))
    repaired = lake_cli("repair", "--target", applied_lake)
    assert repaired.returncode == 0, repaired.stderr
    assert "progress: rebuilt from the log, 1 parts of 1 sources" in repaired.stdout
    assert "tombstones: present" in repaired.stdout
    _write_part("two", [_change("b", 3, 2_000, 20)])
    assert apply(target=applied_lake).parts == [_key("two")]  # "one" is known again
    assert {k: v["v"] for k, v in lake_rows(applied_lake).items()} == {"a": 1, "b": 20}


def test_repair_makes_tombstones_only_when_the_log_proves_there_was_no_delete(
    applied_lake: str,
) -> None:
    _remove(Path(f"{applied_lake}_cdc/tombstones"))
    repaired = lake_cli("repair", "--target", applied_lake)
    assert repaired.returncode == 0, repaired.stderr
    assert "tombstones: the log shows no delete since version 0: made empty" in repaired.stdout
    _write_part("del", [_change("a", 5, 2_000, None)])
    apply(applied_lake)
    _remove(Path(f"{applied_lake}_cdc/tombstones"))
    refused = lake_cli("repair", "--target", applied_lake)
    assert refused.returncode == 1
    (line,) = refused.stderr.splitlines()
    assert "tombstones: cannot be rebuilt (versions" in line and "deleted rows" in line


def test_a_corrupt_sidecar_is_one_line_not_a_traceback(applied_lake: str) -> None:
    log = Path(f"{applied_lake}_cdc/tombstones/_delta_log")
    for entry in log.glob("*.json"):
        entry.write_text("garbage\n")
    result = lake_cli("apply", "--source", SOURCE, "--target", applied_lake)
    assert result.returncode == 1, result.stdout
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr


def _key(name: str) -> str:
    return f"cdc/src/dt=2023-11-14/hour=22/part-{name}.json.gz"


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


# --- incremental exports as the change source ------------------------------------------


def write_incremental(
    changes: dict[str, tuple[int, dict[str, Any] | None]], from_ms: int, to_ms: int, export_id: str
) -> str:
    """An incremental export as DynamoDB writes one: per key changed in the window,
    its last write's time and its state at the window's end (no NewImage: deleted)."""
    s3 = boto3.client("s3")
    base = f"{EXPORT_PREFIX}/inc/AWSDynamoDB/{export_id}"
    lines = []
    for key, (micros, image) in changes.items():
        line: dict[str, Any] = {
            "Metadata": {"WriteTimestampMicros": {"N": str(micros)}},
            "Keys": {"id": {"S": key}},
            "OldImage": {"id": {"S": key}},
        }
        if image is not None:
            line["NewImage"] = image
        lines.append(orjson.dumps(line))
    data_key = f"{base}/data/inc-0.json.gz"
    s3.put_object(Bucket=LAKE, Key=data_key, Body=gzip.compress(b"\n".join(lines)))
    listing = orjson.dumps({"itemCount": len(lines), "dataFileS3Key": data_key})
    s3.put_object(Bucket=LAKE, Key=f"{base}/manifest-files.json", Body=listing)

    def stamp(ms: int) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"

    summary = {
        "version": "2023-08-01",
        "exportArn": f"arn:aws:dynamodb:us-east-1:123456789012:table/src/export/{export_id}",
        "tableArn": "arn:aws:dynamodb:us-east-1:123456789012:table/src",
        "exportFromTime": stamp(from_ms),
        "exportToTime": stamp(to_ms),
        "exportType": "INCREMENTAL_EXPORT",
        "exportViewType": "NEW_AND_OLD_IMAGES",
        "manifestFilesS3Key": f"{base}/manifest-files.json",
        "itemCount": len(lines),
        "outputFormat": "DYNAMODB_JSON",
    }
    s3.put_object(Bucket=LAKE, Key=f"{base}/manifest-summary.json", Body=orjson.dumps(summary))
    return f"s3://{LAKE}/{EXPORT_PREFIX}"  # beside the full exports, which an apply leaves out


class SimulatedTable:
    """A DynamoDB table as its exports see it: items, and each key's last write time."""

    def __init__(self, seed: int) -> None:
        self.items: dict[str, dict[str, Any]] = {}
        self.writes: dict[str, int] = {}  # key -> micros of its last write
        self.rng = random.Random(seed)
        self.clock = 1_700_000_000_000_000

    def mutate(self, operations: int, keys: int) -> None:
        for _ in range(operations):
            self.clock += self.rng.randint(1, 3_000)
            key = f"k{self.rng.randrange(keys)}"
            if self.rng.random() < 0.2:
                self.items.pop(key, None)
            else:
                self.items[key] = {"id": {"S": key}, "n": {"N": str(self.rng.randint(0, 10**9))},
                                   "s": {"S": self.rng.choice(["a", "é", ""])}}  # fmt: skip
            self.writes[key] = self.clock

    def window(self, from_micros: int) -> dict[str, tuple[int, dict[str, Any] | None]]:
        return {k: (t, self.items.get(k)) for k, t in self.writes.items() if t >= from_micros}

    def plain(self) -> dict[str, dict[str, Any]]:
        return {
            k: {"id": k, "n": int(v["n"]["N"]), "s": v["s"]["S"]} for k, v in self.items.items()
        }


def run_apply(target: str, source: str, source_format: str = "incremental-export") -> Any:
    async def run() -> Any:
        async with Clients(max_in_flight=4, aws=AwsSettings(region="us-east-1")) as clients:
            return await apply_changes(
                clients.s3,
                source,
                target,
                source_format=source_format,  # type: ignore[arg-type]
            )

    return asyncio.run(run())


def test_a_table_kept_by_a_full_export_then_incremental_exports_equals_the_source(
    lake: Callable[..., None], tmp_path: Path
) -> None:
    lake()
    table = SimulatedTable(seed=3)
    table.mutate(20_000, keys=10_000)  # some 8,000 existing items
    export_micros = table.clock + 1
    uri = write_export(list(table.items.values()), export_micros // 1000, files=4)
    target = str(tmp_path / "delta")
    assert run_bootstrap(uri, target, batch_rows=3_000).items == len(table.items)
    start = export_micros
    for n in range(3):
        table.mutate(3_000, keys=12_000)  # new keys, updates, deletes
        end = table.clock + 1
        source = write_incremental(table.window(start), start // 1000, end // 1000, f"inc-{n}")
        start = end
        if n == 1:
            continue  # two exports land before the next apply: applied in window order
        result = run_apply(target, source)
        assert result.parts and result.before_cutover == 0
    assert lake_rows(target) == table.plain()
    assert not run_apply(target, source).parts  # every export is recorded in progress


def test_a_table_kept_only_by_incremental_exports_equals_the_source(
    lake: Callable[..., None], tmp_path: Path
) -> None:
    lake()
    table = SimulatedTable(seed=4)
    start, target = table.clock, str(tmp_path / "delta")
    for n in range(2):
        table.mutate(1_500, keys=500)
        end = table.clock + 1
        source = write_incremental(table.window(start), start // 1000, end // 1000, f"only-{n}")
        start = end
        run_apply(target, source)
    assert lake_rows(target) == table.plain()


def test_stream_parts_and_incremental_exports_are_not_mixed_in_one_table(
    lake: Callable[..., None], tmp_path: Path
) -> None:
    lake()
    target = str(tmp_path / "delta")
    _write_part("first", [_change("a", 1, 1_000, 1)])
    apply(target)
    table = SimulatedTable(seed=5)
    table.mutate(10, keys=5)
    source = write_incremental(table.window(0), 0, table.clock // 1000 + 1, "mix")
    result = lake_cli("apply", "--source-format", "incremental-export", "--source", source,
                      "--target", target)  # fmt: skip
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert f"is kept from {SOURCE} (stream parts)" in line and "cannot be mixed in" in line
    other = str(tmp_path / "other")
    run_apply(other, source)
    back = lake_cli("apply", "--source", SOURCE, "--target", other)
    assert back.returncode == 1 and "(incremental exports); stream parts cannot" in back.stderr
