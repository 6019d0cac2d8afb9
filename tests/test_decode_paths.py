"""Loader v3: the streamed walk and the whole-message parse give one answer for
any bytes (issue 19, item 2): the same tables and rows, or both refuse."""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.core.errors import CorruptObject, ObjectTooLarge, WorkerError
from worker.loader.budget import MESSAGE_BYTES
from worker.loader.extract import Extractor, reference
from worker.loader.extract.outputfile_pb2 import OutputFile
from worker.loader.extract.wire import encode_varint as varint
from worker.loader.extract.wire import fields

WHOLE = Extractor.from_specs(
    "worker.loader.extract.outputfile_pb2:OutputFile",
    "worker.loader.extract.reference:processOutputData",
)
Answer = dict[str, list[dict[str, Any]]] | str


def whole_path(data: bytes) -> Answer:
    try:
        return WHOLE.extract(data)
    except WorkerError as exc:
        return f"refused: {exc.reason}"


def streamed_path(data: bytes) -> Answer:
    try:
        stream = reference.iterOutputData(data)
        tables: dict[str, list[dict[str, Any]]] = {name: [] for name in stream.table_names}
        for name, rows in stream:
            tables[name].extend(rows)
    except WorkerError as exc:
        return f"refused: {exc.reason}"
    return tables


def comparable(answer: Answer) -> Any:
    if isinstance(answer, str):
        return "refused"  # the reasons may differ (a cap, corruption); refusing may not
    return {
        name: [{k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}
               for r in rows]
        for name, rows in answer.items()
    }  # fmt: skip


def field(number: int, wire: int, payload: bytes = b"") -> bytes:
    tag = varint(number << 3 | wire)
    if wire == 2:
        return tag + varint(len(payload)) + payload
    if wire == 3:
        return tag + payload + varint(number << 3 | 4)
    return tag + payload


def group(number: int, depth: int) -> bytes:
    return field(number, 3, group(number + 1, depth - 1)) if depth else b""


values = st.one_of(
    st.none(),
    st.text(max_size=8).map(lambda s: {"string_value": s}),
    st.integers(-(2**63), 2**63 - 1).map(lambda i: {"int_value": i}),
    st.floats(allow_nan=True).map(lambda x: {"float_value": x}),
)
tables = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "", "é"]),
        st.lists(st.sampled_from(["id", "v", "w", "ü"]), max_size=4),
        st.lists(st.lists(values, max_size=5), max_size=6),
    ),
    max_size=4,
)


def serialized(file_tables: list[Any], file_id: str) -> bytes:
    message = OutputFile(file_id=file_id)
    for name, columns, rows in file_tables:
        table = message.tables.add(name=name, columns=columns)
        for row in rows:
            out = table.rows.add()
            for value in row:
                out.values.add(**(value or {}))
    return message.SerializeToString()


unknown = st.one_of(
    st.tuples(st.integers(1, 40), st.sampled_from([0, 1, 2, 5])).map(
        lambda nw: field(
            nw[0], nw[1], {0: b"\x01", 1: b"\x00" * 8, 2: b"xy", 5: b"\x00" * 4}[nw[1]]
        )
    ),
    st.integers(1, 40).map(lambda n: field(n, 3, field(1, 0, b"\x05"))),  # a group
    st.integers(1, 3).map(lambda wire: field(4, wire if wire != 2 else 0, b"\x01" * 8)),
    st.sampled_from([b"\x00\x00", b"\x0c", b"\x0e", b"\x80\x80\x80\x80\x10\x00", b"\x0a\x01\xff"]),
)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid file, then a few of: a field moved, repeated, dropped, or given
    another wire type; an unknown field or group inserted anywhere; a byte
    changed; the end cut off."""
    data = bytearray(serialized(draw(tables), draw(st.sampled_from(["f1", "", "ß"]))))
    for _ in range(draw(st.integers(0, 3))):
        bounds = [(at, end) for _, _, at, _, end in _boundaries(bytes(data))] or [(0, 0)]
        at, end = draw(st.sampled_from(bounds))
        op = draw(st.sampled_from(["move", "repeat", "drop", "wire", "insert", "byte", "cut"]))
        piece = bytes(data[at:end])
        if op == "move":
            del data[at:end]
            where = draw(st.integers(0, len(data)))
            data[where:where] = piece
        elif op == "repeat":
            data[end:end] = piece
        elif op == "drop":
            del data[at:end]
        elif op == "wire" and end > at:
            data[at] = data[at] & 0xF8 | draw(st.integers(0, 7))
        elif op == "insert":
            where = draw(st.sampled_from([at, end, draw(st.integers(0, len(data)))]))
            data[where:where] = draw(unknown)
        elif op == "byte" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


def _boundaries(data: bytes) -> list[tuple[int, int, int, int, int]]:
    """Fields of the file and of its tables (where a mutation keeps the framing)."""
    try:
        top = list(fields(data, 0, len(data)))
        inner = [f for n, w, _, s, e in top if n == 4 and w == 2 for f in fields(data, s, e)]
    except CorruptObject:
        return []
    return top + inner


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_both_decode_paths_give_the_same_tables_and_rows_or_both_refuse(data: bytes) -> None:
    assert comparable(streamed_path(data)) == comparable(whole_path(data))


@pytest.mark.parametrize(
    ("data", "loads"),
    [
        (field(1, 2, b"f") + field(4, 0, b"\x01"), True),  # tables as a varint: unknown
        (field(4, 2, field(1, 2, b"real")) + field(4, 5, b"evil"), True),  # wrong wire type
        (field(3, 2, b"x") + field(4, 2, field(1, 2, b"t")), True),  # created_at_ms as bytes
        (field(9, 3, field(1, 2, b"x")) + field(4, 2, field(1, 2, b"t")), True),  # a group
        (group(5, 100) + field(1, 2, b"f"), True),  # groups 100 deep: upb's limit
        (group(5, 101) + field(1, 2, b"f"), False),  # 101 deep
        (field(4, 2, group(5, 99) + field(1, 2, b"t")), True),  # in a table: one less
        (field(4, 2, group(5, 100) + field(1, 2, b"t")), False),
        (b"\x00\x00" + field(1, 2, b"f"), False),  # field number 0
        (b"\x80\x80\x80\x80\x10\x00" + field(1, 2, b"f"), False),  # tag 2**32
        (b"\xf8\xff\xff\xff\x0f\x00" + field(1, 2, b"f"), True),  # tag 2**32 - 1
        (b"\x98\x80\x80\x80\x80\x00\x00" + field(1, 2, b"f"), False),  # a 6-byte tag
        (field(1, 2, b"\xff"), False),  # file_id not UTF-8
        (field(2, 2, b"\xed\xa0\x80"), False),  # source_uri: an encoded surrogate
        (field(1, 2, b"\xff") + field(1, 2, b"f"), False),  # even when a later one wins
        (field(4, 2, field(2, 2, b"\xc0\xaf")), False),  # a column: an overlong encoding
        (field(3, 0, b"\x00") * 50, False),  # created_at_ms = 0 repeated: an empty file
        (field(3, 0, b"\x80" * 9 + b"\x02"), False),  # 2**64: zero in 64 bits
        (field(3, 0, b"\xff" * 10 + b"\x01"), False),  # an 11-byte varint
        (field(9, 3, b"")[:-1] + b"\x54" + field(4, 2, b""), False),  # closed by another group
        (b"\x2c", False),  # an end group with no group
        (field(5, 3, b"\x01" + b"\x00" * 8) + field(1, 2, b"f"), True),  # field 0 in a group
        (field(5, 3, b"\x03\x04") + field(1, 2, b"f"), True),  # even a group 0
        (b"\x2b\x04" + field(1, 2, b"f"), False),  # but not group 0's end closing group 5
        (field(4, 2, field(3, 2, field(1, 2, field(5, 3, b"\x2e")))), False),  # wire 6 in a value
    ],
)
def test_each_wire_rule_gives_one_answer(data: bytes, loads: bool) -> None:
    whole, streamed = whole_path(data), streamed_path(data)
    assert comparable(streamed) == comparable(whole)
    assert isinstance(whole, dict) is loads, whole


def test_a_row_larger_than_a_slice_is_read_a_chunk_of_values_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reference, "SLICE_BYTES", 64)
    row = b"".join(field(1, 2, field(2, 0, varint(2 * i))) for i in range(50))  # ints 0..49
    row += field(1, 2, field(3, 1, struct.pack("<d", 0.5)))
    big = field(3, 2, row)
    data = field(4, 2, field(1, 2, b"t") + field(2, 2, b"a") + field(2, 2, b"b") + big
                 + field(3, 2, field(1, 2, field(1, 2, b"small"))))  # fmt: skip
    assert (
        comparable(streamed_path(data))
        == comparable(whole_path(data))
        == {"t": [{"a": 0, "b": 1}, {"a": "small"}]}
    )
    assert len(list(reference._value_chunks(memoryview(row), 0, len(row)))) > 1


def test_a_table_with_more_columns_than_a_row_can_use_is_refused_on_both_paths(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reference, "MAX_COLUMNS", 3)
    table = field(1, 2, b"t") + b"".join(field(2, 2, c) for c in (b"a", b"b", b"c"))
    assert isinstance(whole_path(field(4, 2, table)), dict)
    assert isinstance(streamed_path(field(4, 2, table)), dict)
    wide = field(4, 2, table + field(2, 2, b"d"))
    assert whole_path(wide) == streamed_path(wide) == "refused: object_too_large"


def test_the_walk_refuses_past_max_tables_distinct_names_before_reading_further() -> None:
    three = b"".join(field(4, 2, field(1, 2, name)) for name in (b"a", b"b", b"c"))
    assert reference.iterOutputData(three, max_tables=3).table_names == ["a", "b", "c"]
    with pytest.raises(ObjectTooLarge, match="MAX_TABLES_PER_FILE=2"):
        reference.iterOutputData(three + b"\xff", max_tables=2)  # refused before the bad tail
    chunks = field(4, 2, field(1, 2, b"a")) * 1000  # one table in many chunks is one table
    assert reference.iterOutputData(chunks, max_tables=1).table_names == ["a"]


def test_the_whole_message_path_refuses_before_parsing_when_its_messages_would_pass_memory() -> (
    None
):
    rows = field(4, 2, field(1, 2, b"t") + field(3, 2, b"") * 1000)  # 1,002 messages
    need = len(rows) + MESSAGE_BYTES * 1002
    assert WHOLE.extract(rows, memory=need) == {"t": [{}] * 1000}
    with pytest.raises(ObjectTooLarge, match="decoding the whole file would take"):
        WHOLE.extract(rows, memory=need - 1)
