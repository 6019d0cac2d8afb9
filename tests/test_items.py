"""Rows become DynamoDB items exactly as the README's "Item conversion" says."""

from __future__ import annotations

import asyncio
import math
from decimal import Decimal
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.dynamo_rules import batch_problem, item_problem, key_of
from worker.core.backoff import Backoff
from worker.core.config import NanPolicy, WriteSettings
from worker.loader.items import MAX_ITEM_BYTES, ItemBuilder, KeyAttribute, KeySchema, Origin
from worker.loader.writer import BATCH_SIZE, BatchWriter

ORIGIN = Origin("bucket", "key.pb", "etag1", "orders")
S_KEY = KeySchema(KeyAttribute("id", "S"))
N_KEY = KeySchema(KeyAttribute("id", "N"))


def convert(rows: list[dict[str, Any]], schema: KeySchema = S_KEY, nan: NanPolicy = "null") -> Any:
    return ItemBuilder(schema, nan, ORIGIN).convert(rows)


def only(rows: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    (item,) = convert(rows, **kwargs).items
    return cast(dict[str, Any], item)


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("null", [{"NULL": True}, {"NULL": True}, {"NULL": True}]),
        ("string", [{"S": "NaN"}, {"S": "Infinity"}, {"S": "-Infinity"}]),
        ("drop", [None, None, None]),
    ],
)
def test_nan_and_infinities_follow_the_nan_policy(policy: NanPolicy, expected: list[Any]) -> None:
    result = convert([{"id": "a", "n": math.nan, "p": math.inf, "m": -math.inf}], nan=policy)
    item = result.items[0]
    assert [item.get(name) for name in ("n", "p", "m")] == expected
    assert result.stats.nonfinite == 3


def test_missing_fields_are_simply_absent() -> None:
    assert only([{"id": "a", "x": 1}]) == {"id": {"S": "a"}, "x": {"N": "1"}}


def test_empty_strings_are_kept_but_never_used_as_a_key() -> None:
    item = only([{"id": "", "note": ""}])
    assert item["note"] == {"S": ""}
    assert item["id"]["S"] != ""  # a derived id instead


def test_int64_extremes_are_exact_numbers() -> None:
    item = only([{"id": "a", "lo": -(2**63), "hi": 2**63 - 1}])
    assert item["lo"] == {"N": str(-(2**63))}
    assert item["hi"] == {"N": str(2**63 - 1)}


def test_floats_use_the_shortest_round_trip_and_tiny_ones_become_strings() -> None:
    result = convert([{"id": "a", "tenth": 0.1, "tiny": 1e-300, "big": 1e200, "zero": -0.0}])
    item = result.items[0]
    assert item["tenth"] == {"N": "0.1"}
    assert item["tiny"] == {"S": "1e-300"}
    assert item["big"] == {"S": "1e+200"}
    assert item["zero"] == {"N": "-0.0"}
    assert result.stats.numbers_as_strings == 2


def test_numbers_beyond_38_digits_become_strings_and_are_counted() -> None:
    result = convert([{"id": "a", "huge": 10**40, "ok": 10**37, "dec": Decimal("1." + "1" * 40)}])
    item = result.items[0]
    assert item["huge"] == {"S": str(10**40)}
    assert item["ok"] == {"N": str(10**37)}
    assert item["dec"]["S"].startswith("1.111")
    assert result.stats.numbers_as_strings == 2


def test_duplicate_ids_keep_the_last_row_and_are_counted() -> None:
    result = convert([{"id": "a", "v": 1}, {"id": "b", "v": 2}, {"id": "a", "v": 3}])
    assert [(i["id"]["S"], i["v"]["N"]) for i in result.items] == [("a", "3"), ("b", "2")]
    assert result.stats.duplicates == 1


def test_numeric_keys_compare_by_value_when_deduplicating() -> None:
    result = convert([{"id": 3, "v": 1}, {"id": 3.0, "v": 2}], schema=N_KEY)
    assert len(result.items) == 1 and result.stats.duplicates == 1


def test_int_ids_fill_n_keys_and_str_ids_fill_s_keys() -> None:
    assert only([{"id": 42}], schema=N_KEY)["id"] == {"N": "42"}
    assert only([{"id": "42"}], schema=N_KEY)["id"] == {"N": "42"}
    assert only([{"id": "x-1"}])["id"] == {"S": "x-1"}
    assert only([{"id": 7}])["id"] == {"S": "7"}


def test_a_row_whose_id_cannot_fill_the_key_type_is_skipped_with_a_reason() -> None:
    result = convert([{"id": "abc"}, {"id": 1}], schema=N_KEY)
    assert len(result.items) == 1
    assert result.stats.skipped == {"invalid_key": 1}
    assert result.stats.samples["invalid_key"] == ["row 0: id='abc'"]


def test_derived_ids_are_deterministic_and_distinct_per_row() -> None:
    rows: list[dict[str, Any]] = [{"v": 1}, {"v": 2}]
    first = [i["id"] for i in convert(rows).items]
    again = [i["id"] for i in convert(rows).items]
    assert first == again and first[0] != first[1]
    numeric = [i["id"]["N"] for i in convert(rows, schema=N_KEY).items]
    assert all(0 <= int(n) < 2**63 for n in numeric)
    other: Any = ItemBuilder(S_KEY, "null", Origin("bucket", "key.pb", "etag2", "orders"))
    assert [i["id"] for i in other.convert(rows).items] != first


def test_another_key_schema_uses_its_own_attributes() -> None:
    schema = KeySchema(KeyAttribute("pk", "S"), KeyAttribute("sk", "N"))
    item = only([{"pk": "p", "sk": 5, "id": "x"}], schema=schema)
    assert item == {"pk": {"S": "p"}, "sk": {"N": "5"}, "id": {"S": "x"}}


def test_a_row_over_400_kb_is_skipped_and_counted() -> None:
    result = convert([{"id": "big", "blob": "x" * MAX_ITEM_BYTES}, {"id": "small"}])
    assert [i["id"]["S"] for i in result.items] == ["small"]
    assert result.stats.skipped == {"item_too_large": 1}


def test_multibyte_text_counts_its_utf8_bytes_toward_the_limit() -> None:
    almost = "é" * (MAX_ITEM_BYTES // 2 - 10)  # 2 bytes each: just under the limit
    assert len(convert([{"id": "a", "t": almost}]).items) == 1
    assert convert([{"id": "a", "t": almost + "é" * 20}]).stats.skipped == {"item_too_large": 1}


def test_other_python_types_map_to_their_dynamodb_types() -> None:
    item = only([{"id": "a", "b": True, "n": None, "raw": b"\x00", "l": [1, "x"], "m": {"k": 1.5}}])
    assert item["b"] == {"BOOL": True}
    assert item["n"] == {"NULL": True}
    assert item["raw"] == {"B": b"\x00"}
    assert item["l"] == {"L": [{"N": "1"}, {"S": "x"}]}
    assert item["m"] == {"M": {"k": {"N": "1.5"}}}


def test_a_value_without_a_dynamodb_type_skips_its_row() -> None:
    result = convert([{"id": "a", "when": object()}, {"id": "b"}])
    assert len(result.items) == 1 and result.stats.skipped == {"unsupported_type": 1}


values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**45), max_value=10**45)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=10,
)
rows = st.lists(
    st.dictionaries(
        st.sampled_from(["id", "a", "b", "c", "é"]),
        values | st.integers(min_value=0, max_value=20),
        max_size=5,
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(rows=rows, policy=st.sampled_from(["null", "string", "drop"]), numeric=st.booleans())
def test_conversion_never_builds_an_item_dynamodb_would_reject(
    rows: list[dict[str, Any]], policy: NanPolicy, numeric: bool
) -> None:
    schema = N_KEY if numeric else S_KEY
    result = convert(rows, schema=schema, nan=policy)
    for item in result.items:
        assert item_problem(item, ["id"]) is None  # B values may stay raw bytes
    accounted = len(result.items) + result.stats.duplicates + sum(result.stats.skipped.values())
    assert accounted == len(rows)


class MemoryTable:
    """A BatchWriteItem endpoint in memory that holds DynamoDB's request rules and
    leaves part of every other request unprocessed, as DynamoDB does under load."""

    def __init__(self, unprocessed: int) -> None:
        self.items: dict[Any, dict[str, Any]] = {}
        self.puts = 0  # items stored, counting rewrites
        self.requests = 0
        self._unprocessed = unprocessed

    async def batch_write_item(self, *, RequestItems: Any) -> Any:  # noqa: N803 - the SDK's name
        self.requests += 1
        ((table, puts),) = RequestItems.items()
        assert len(puts) <= BATCH_SIZE
        assert batch_problem(RequestItems, {table: ["id"]}) is None
        left = puts[: self._unprocessed] if self.requests % 2 else []
        for put in puts[len(left) :]:
            item = put["PutRequest"]["Item"]
            self.items[key_of(item, ["id"])] = item
            self.puts += 1
        return {"UnprocessedItems": {table: left} if left else {}}


@settings(max_examples=100, deadline=None)
@given(rows=rows, unprocessed=st.integers(min_value=0, max_value=30))
def test_the_writer_stores_every_item_exactly_once(
    rows: list[dict[str, Any]], unprocessed: int
) -> None:
    items = convert(rows).items
    table = MemoryTable(unprocessed)
    write = WriteSettings(max_in_flight=4, backoff=Backoff(base_s=0, cap_s=0, attempts=100))
    stats = asyncio.run(BatchWriter(table, write).write("t", list(items)))
    assert stats.written == len(items) == table.puts  # none lost, none written twice
    assert table.items == {key_of(item, ["id"]): item for item in items}


@pytest.mark.parametrize("over", [0, 1])
def test_an_integer_of_38_digits_counts_its_dynamodb_size_to_the_byte(over: int) -> None:
    number = 10**37 + 12345  # 38 significant digits
    number_size = 38 // 2 + 1  # DynamoDB: about one byte per two significant digits, plus one
    fixed = len("id") + len("a") + len("n") + number_size + len("t")
    row = {"id": "a", "n": number, "t": "x" * (MAX_ITEM_BYTES - fixed + over)}
    result = convert([row])
    if over:
        assert result.items == [] and result.stats.skipped == {"item_too_large": 1}
    else:
        (item,) = result.items
        assert item["n"] == {"N": str(number)}  # exactly at the limit: kept
