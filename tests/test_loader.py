"""One object end to end, against moto and dynalite over HTTP (README "Item conversion",
"Writing")."""

from __future__ import annotations

import asyncio
import gzip
import math
from typing import Any

import pytest

from tests import factories as f
from tests.conftest import BUCKET, events, own, scan
from worker.core.aws import Clients
from worker.core.config import Settings
from worker.core.errors import InvalidTable
from worker.loader.messages import ObjectRef
from worker.loader.pipeline import Loader
from worker.loader.tables import TableRegistry, table_name

pytestmark = pytest.mark.usefixtures("dynamodb")


@pytest.fixture(params=["fast", "sdk"])
def write_path(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both BatchWriteItem paths."""
    return str(request.param)


def put(s3: Any, key: str, data: bytes) -> ObjectRef:
    s3.put_object(Bucket=BUCKET, Key=key, Body=data)
    return ObjectRef(BUCKET, key)


def by_id(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {next(iter(i["id"].values())): i for i in items}


async def test_a_file_lands_in_prefixed_tables_with_every_row(
    loader: Loader, s3: Any, ddb: Any, prefix: str
) -> None:
    data = f.output_file(
        ("orders", ["id", "amount", "note"], [[1, 9.5, "a"], [2, 0.1, None], [3, None, "c"]]),
        ("users", ["id", "name"], [["u1", "Ann"], ["u2", "Bob"]]),
    )
    summary = await loader.load(put(s3, "in/a.pb", data))
    assert summary.ok, summary.error
    orders = by_id(scan(ddb, f"{prefix}_orders"))
    assert orders["2"] == {"id": {"N": "2"}, "amount": {"N": "0.1"}}
    assert orders["3"] == {"id": {"N": "3"}, "note": {"S": "c"}}
    assert set(by_id(scan(ddb, f"{prefix}_users"))) == {"u1", "u2"}
    assert summary.rows_written == 5


async def test_int_first_id_creates_an_n_key_and_str_first_id_an_s_key(
    loader: Loader, s3: Any, ddb: Any, prefix: str
) -> None:
    data = f.output_file(("nums", ["id"], [[5]]), ("strs", ["id"], [["five"]]))
    assert (await loader.load(put(s3, "k.pb", data))).ok
    for table, expected in (("nums", "N"), ("strs", "S")):
        described = ddb.describe_table(TableName=f"{prefix}_{table}")["Table"]
        assert described["AttributeDefinitions"] == [
            {"AttributeName": "id", "AttributeType": expected}
        ]
        assert described["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"


async def test_an_existing_table_keeps_its_own_key_schema(
    loader: Loader, s3: Any, ddb: Any, prefix: str
) -> None:
    ddb.create_table(
        TableName=f"{prefix}_events",
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "seq", "AttributeType": "N"},
        ],
        KeySchema=[
            {"AttributeName": "pk", "KeyType": "HASH"},
            {"AttributeName": "seq", "KeyType": "RANGE"},
        ],
    )
    own(ddb, f"{prefix}_events")
    data = f.output_file(("events", ["pk", "seq", "id"], [["a", 1, "x"], ["a", 2, "y"]]))
    assert (await loader.load(put(s3, "e.pb", data))).ok
    items = scan(ddb, f"{prefix}_events")
    assert sorted((i["pk"]["S"], i["seq"]["N"], i["id"]["S"]) for i in items) == [
        ("a", "1", "x"),
        ("a", "2", "y"),
    ]


async def test_the_same_table_twice_in_one_file_is_concatenated(
    loader: Loader, s3: Any, ddb: Any, prefix: str
) -> None:
    data = f.output_file(("t", ["id"], [["a"], ["b"]]), ("t", ["id"], [["c"]]))
    assert (await loader.load(put(s3, "twice.pb", data))).ok
    assert set(by_id(scan(ddb, f"{prefix}_t"))) == {"a", "b", "c"}


async def test_duplicate_ids_in_a_file_keep_the_last_row(
    loader: Loader, s3: Any, ddb: Any, prefix: str
) -> None:
    data = f.output_file(("d", ["id", "v"], [["a", 1], ["a", 2], ["b", 3]]))
    summary = await loader.load(put(s3, "dup.pb", data))
    assert summary.ok and summary.tables[0].conversion.duplicates == 1
    assert by_id(scan(ddb, f"{prefix}_d"))["a"]["v"] == {"N": "2"}


async def test_rows_without_ids_get_deterministic_ids_so_a_reload_adds_nothing(
    loader: Loader, s3: Any, ddb: Any, prefix: str
) -> None:
    ref = put(s3, "noid.pb", f.output_file(("n", ["v"], [[1], [2], [3]])))
    assert (await loader.load(ref)).ok
    first = scan(ddb, f"{prefix}_n")
    assert (await loader.load(ref)).ok
    assert len(first) == 3
    assert sorted(map(str, first)) == sorted(map(str, scan(ddb, f"{prefix}_n")))


async def test_nonfinite_and_out_of_range_numbers_store_as_the_design_says(
    loader: Loader, s3: Any, ddb: Any, prefix: str
) -> None:
    row = ["r", math.nan, math.inf, 1e-300, -(2**63), 2**63 - 1]
    data = f.output_file(("x", ["id", "nan", "inf", "tiny", "lo", "hi"], [row]))
    assert (await loader.load(put(s3, "x.pb", data))).ok
    (item,) = scan(ddb, f"{prefix}_x")
    assert item["nan"] == {"NULL": True} and item["inf"] == {"NULL": True}
    assert item["tiny"] == {"S": "1e-300"}
    assert item["lo"] == {"N": str(-(2**63))} and item["hi"] == {"N": str(2**63 - 1)}


async def test_an_invalid_table_name_fails_that_table_only(
    loader: Loader, s3: Any, ddb: Any, prefix: str, logs: list[dict[str, Any]]
) -> None:
    data = f.output_file(("ok", ["id"], [["a"]]), ("x" * 300, ["id"], [["b"]]))
    summary = await loader.load(put(s3, "bad-table.pb", data))
    assert isinstance(summary.error, InvalidTable)
    assert set(by_id(scan(ddb, f"{prefix}_ok"))) == {"a"}
    failed = events(logs, "table_failed")
    assert failed and failed[0]["error"] == "invalid_table"


def test_table_names_are_prefixed_and_sanitized() -> None:
    assert table_name("dev", "orders v2/eu") == "dev_orders_v2_eu"
    assert table_name("", "plain.name-1") == "plain.name-1"
    with pytest.raises(InvalidTable):
        table_name("", "ab")


async def test_a_gzipped_object_is_detected_by_content_and_loaded(
    loader: Loader, s3: Any, ddb: Any, prefix: str
) -> None:
    data = gzip.compress(f.output_file(("g", ["id"], [["a"], ["b"]])))
    summary = await loader.load(put(s3, "no-suffix", data))
    assert summary.ok and len(scan(ddb, f"{prefix}_g")) == 2


async def test_a_row_over_400_kb_is_skipped_and_the_rest_is_written(
    loader: Loader, s3: Any, ddb: Any, prefix: str, logs: list[dict[str, Any]]
) -> None:
    data = f.output_file(("big", ["id", "blob"], [["huge", "x" * 410_000], ["fine", "y"]]))
    summary = await loader.load(put(s3, "big.pb", data))
    assert summary.ok and summary.tables[0].conversion.skipped == {"item_too_large": 1}
    assert set(by_id(scan(ddb, f"{prefix}_big"))) == {"fine"}
    (warning,) = events(logs, "rows_skipped")
    assert warning["counts"] == {"item_too_large": 1} and warning["log_level"] == "warning"


async def test_two_tasks_creating_the_same_table_both_succeed(
    clients: Clients, ddb: Any, prefix: str
) -> None:
    first = TableRegistry(clients.dynamodb, active_timeout_s=30)
    second = TableRegistry(clients.dynamodb, active_timeout_s=30)  # as if another worker
    name = f"{prefix}_race"
    schemas = await asyncio.gather(first.ensure(name, {"id": 1}), second.ensure(name, {"id": 1}))
    assert schemas[0] == schemas[1]
    assert ddb.describe_table(TableName=name)["Table"]["TableStatus"] == "ACTIVE"


async def test_per_table_summary_is_logged_with_counts(
    settings: Settings, clients: Clients, s3: Any, prefix: str, logs: list[dict[str, Any]]
) -> None:
    loader = Loader(settings, clients)
    data = f.output_file(("s", ["id", "v"], [["a", 1.5], ["b", math.nan]]))
    await loader.load(put(s3, "s.pb", data))
    (table,) = events(logs, "table_written")
    assert table["table"] == f"{prefix}_s" and table["written"] == 2
    assert table["nonfinite"] == 1 and table["requests"] == 1
    assert {"bytes", "ms", "retries", "throttled_requests", "window"} <= set(table)
    (done,) = events(logs, "object_loaded")
    assert done["rows_written"] == 2 and done["key"] == "s.pb" and done["bucket"] == BUCKET
