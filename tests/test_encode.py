"""Loader v3: rows straight to item texts (issue 19, item 4). The fused encoder's
request bodies equal the dict path's byte for byte, with the same skips,
counts and key identities; shapes it does not take go through ``ItemBuilder``."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.core.config import NanPolicy
from worker.loader.ddb_http import encode_request
from worker.loader.encode import FusedBuilder
from worker.loader.extract import reference
from worker.loader.extract.outputfile_pb2 import OutputFile
from worker.loader.items import MAX_ITEM_BYTES, ItemBuilder, KeyAttribute, KeySchema, Origin

ORIGIN = Origin("bucket", "dir/file.pb", "etag-1", "orders")
S_KEY = KeySchema(KeyAttribute("id", "S"))
N_KEY = KeySchema(KeyAttribute("id", "N"))
Value = dict[str, Any] | None


def file_of(columns: list[str], rows: list[list[Value]]) -> bytes:
    message = OutputFile(file_id="f")
    table = message.tables.add(name="orders", columns=columns)
    for row in rows:
        out = table.rows.add()
        for value in row:
            out.values.add(**(value or {}))
    return message.SerializeToString()


def bodies(
    data: bytes, schema: KeySchema = S_KEY, nan: NanPolicy = "null"
) -> tuple[list[bytes], list[bytes], FusedBuilder, ItemBuilder]:
    """The request bodies of every slice, by the fused encoder and by the dict path."""
    fused, dicts = FusedBuilder(schema, nan, ORIGIN), ItemBuilder(schema, nan, ORIGIN)
    fast: list[bytes] = []
    slow: list[bytes] = []
    offset = 0
    for _, rows in reference.iterOutputData(data, raw=True):
        assert isinstance(rows, reference.RowSlice)
        a, b = fused.convert(rows, offset), dicts.convert(rows.dicts(), offset)
        offset += len(rows)
        assert a.keys == b.keys
        for conversion, out in ((a, fast), (b, slow)):
            request = [{"PutRequest": {"Item": item}} for item in conversion.items]
            out.append(encode_request({"t": request}))
    return fast, slow, fused, dicts


def stats(builder: FusedBuilder | ItemBuilder) -> dict[str, Any]:
    return dataclasses.asdict(builder.stats)


floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-130, 9.99e-131, 1e126, 9.9e125, -1e126, 5e-324, 1.5]),
)
strings = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", '\x00\x1f"\\', "é✓😀", "\u2028", "NaN", "k1", "k2"]),
)
values = st.one_of(
    st.none(),
    strings.map(lambda s: {"string_value": s}),
    st.integers(-(2**63), 2**63 - 1).map(lambda i: {"int_value": i}),
    st.sampled_from([1, -1, 0, 2**63 - 1]).map(lambda i: {"int_value": i}),
    floats.map(lambda x: {"float_value": x}),
)
columns = st.lists(
    st.sampled_from(["id", "v", "w", "名前", "x y", "\x01"]), min_size=0, max_size=5, unique=True
)
rows = st.lists(st.lists(values, max_size=6), max_size=30)
key_values = st.sampled_from(
    [None, "k1", "k2", "", "12", "+12", "012", " 1", "1" * 39, 7, -7, 12, 0, 7.5, 3.0, -0.0,
     1e20, math.nan, math.inf, 1e200]
)  # fmt: skip


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    columns,
    rows,
    st.sampled_from(["null", "string", "drop"]),
    st.lists(key_values),
    st.sampled_from([S_KEY, N_KEY]),
)
def test_the_fused_bodies_equal_the_dict_paths_byte_for_byte(
    names: list[str], table: list[list[Value]], nan: NanPolicy, keys: list[Any], schema: KeySchema
) -> None:
    if "id" in names and keys:  # duplicate, odd and missing keys in the key column
        at = names.index("id")
        for row, key in zip(table, keys, strict=False):
            if len(row) > at:
                row[at] = _value(key)
    fast, slow, fused, dicts = bodies(file_of(names, table), schema=schema, nan=nan)
    assert fast == slow
    assert stats(fused) == stats(dicts)


def _value(key: Any) -> Value:
    if key is None:
        return None
    kind = {str: "string_value", int: "int_value", float: "float_value"}[type(key)]
    return {kind: key}


@pytest.mark.parametrize("schema", [S_KEY, N_KEY], ids=["S", "N"])
def test_the_fused_path_is_the_one_taken_for_the_common_shapes(schema: KeySchema) -> None:
    data = file_of(["id", "v"], [[{"int_value": 5}, {"int_value": 1}], [None, None]])
    (rows,) = [r for _, r in reference.iterOutputData(data, raw=True)]
    items = FusedBuilder(schema, "null", ORIGIN).convert(rows).items
    assert all(isinstance(item, orjson.Fragment) for item in items) and len(items) == 2


@pytest.mark.parametrize(
    ("schema", "names"),
    [
        (KeySchema(KeyAttribute("id", "S"), KeyAttribute("v", "N")), ["id", "v"]),
        (KeySchema(KeyAttribute("id", "B")), ["id", "v"]),
        (S_KEY, ["id", "v", "v"]),  # a repeated column: the last value, in the first place
        (S_KEY, ["id", ""]),  # a name DynamoDB refuses
        (S_KEY, ["id", "n" * 70_000]),
    ],
    ids=["composite", "binary-key", "repeated-column", "empty-name", "long-name"],
)
def test_shapes_the_fused_path_does_not_take_go_through_the_dict_path(
    schema: KeySchema, names: list[str]
) -> None:
    table: list[list[Value]] = [
        [{"string_value": "a"}, {"int_value": 1}, {"int_value": 2}],
        [None, {"int_value": 3}],
    ]
    fast, slow, fused, dicts = bodies(file_of(names, table), schema=schema)
    assert fast == slow and stats(fused) == stats(dicts)
    (rows,) = [r for _, r in reference.iterOutputData(file_of(names, table), raw=True)]
    items = FusedBuilder(schema, "null", ORIGIN).convert(rows).items
    assert not any(isinstance(item, orjson.Fragment) for item in items)


@pytest.mark.parametrize("over", [0, 1])
def test_an_item_at_400_kb_is_kept_and_one_byte_over_is_skipped(over: int) -> None:
    # "id" (2) + "k" (1) + "v" (1) + the string: exactly MAX_ITEM_BYTES, or one more
    text = "é" * ((MAX_ITEM_BYTES - 4 + over) // 2) + "x" * ((MAX_ITEM_BYTES - 4 + over) % 2)
    data = file_of(["id", "v"], [[{"string_value": "k"}, {"string_value": text}]])
    fast, slow, fused, dicts = bodies(data)
    assert fast == slow and stats(fused) == stats(dicts)
    assert fused.stats.skipped == ({"item_too_large": 1} if over else {})


def test_a_key_over_2048_bytes_is_skipped_on_both_paths() -> None:
    data = file_of(["id"], [[{"string_value": "k" * 2049}], [{"string_value": "k" * 2048}]])
    fast, slow, fused, _ = bodies(data)
    assert fast == slow and fused.stats.skipped == {"key_too_large": 1}


@pytest.mark.parametrize("schema", [S_KEY, N_KEY], ids=["S", "N"])
def test_derived_ids_across_slices_equal_the_dict_paths(
    monkeypatch: pytest.MonkeyPatch, schema: KeySchema
) -> None:
    monkeypatch.setattr(reference, "SLICE_ROWS", 7)
    data = file_of(["v"], [[{"int_value": i}] for i in range(30)])
    fast, slow, _, _ = bodies(data, schema=schema)
    assert len(fast) == 5 and fast == slow
