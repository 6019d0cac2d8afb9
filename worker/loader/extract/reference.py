"""The bundled reference ``TableExtract`` (ARCHITECTURE.md, "Contracts").

Two entry points, the same rows:
- ``processOutputData(output_file)``: the whole file as ``{table: [rows]}``,
  the contract every ``TABLE_EXTRACT`` keeps;
- ``iterOutputData(data)``: the optional streaming contract. It walks the
  ``OutputFile``'s wire format and parses one slice of one table's rows at a
  time, so only the file's bytes and one slice of rows are ever in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from google.protobuf.message import DecodeError

from worker.core.errors import CorruptObject
from worker.loader.extract import SLICE_ROWS
from worker.loader.extract.outputfile_pb2 import OutputFile, Table

Rows = dict[str, list[dict[str, Any]]]
SLICE_BYTES = 4 * 1024 * 1024  # rows parsed at once: SLICE_ROWS, or this many bytes
_TABLES, _NAME, _COLUMNS, _ROWS = 4, 1, 2, 3  # field numbers (outputfile.proto)


def processOutputData(output_file: OutputFile) -> Rows:  # noqa: N802 - the layer's contract name
    """Map each table name to its rows: ``{column: value}`` for every set value.

    A value whose ``kind`` is unset is a missing field; a row shorter than the
    columns simply lacks the trailing fields. Tables sharing a name are
    concatenated in file order.
    """
    tables: Rows = {}
    for table in output_file.tables:
        tables.setdefault(table.name, []).extend(_rows(list(table.columns), table.rows))
    return tables


def _rows(columns: list[str], rows: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    append = out.append
    for row in rows:
        record: dict[str, Any] = {}
        for column, value in zip(columns, row.values, strict=False):
            kind = value.WhichOneof("kind")
            if kind is not None:
                record[column] = getattr(value, kind)
        append(record)
    return out


class OutputFileStream:
    """``iterOutputData``'s result: ``(table name, rows)`` slices in file order.

    ``table_names`` is known before any row is parsed (a walk over the wire
    format that skips the rows), so the loader can check the file's tables
    before it creates one.
    """

    def __init__(self, data: bytes | bytearray) -> None:
        self._data = memoryview(data)
        self._tables = [_table_layout(self._data, start, end) for start, end in _table_spans(data)]
        self.table_names = [name for name, _, _ in self._tables]

    def __iter__(self) -> Iterator[tuple[str, list[dict[str, Any]]]]:
        for name, columns, row_spans in self._tables:
            for start, end in row_spans:
                try:
                    rows = Table.FromString(bytes(self._data[start:end])).rows
                except DecodeError as exc:
                    raise CorruptObject(f"rows of table {name!r} do not decode: {exc}") from None
                yield name, _rows(columns, rows)


def iterOutputData(data: bytes | bytearray) -> OutputFileStream:  # noqa: N802 - the contract's name style
    return OutputFileStream(data)


def _varint(data: bytes | bytearray | memoryview, pos: int) -> tuple[int, int]:
    byte = data[pos]
    if byte < 0x80:  # nearly every tag and length
        return byte, pos + 1
    value, shift = 0, 0
    while True:
        if shift > 63:
            raise CorruptObject("a varint of more than 10 bytes")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(
    data: bytes | bytearray | memoryview, start: int, end: int
) -> Iterator[tuple[int, int, int, int]]:
    """(field number, tag start, value start, value end) of every field."""
    pos = start
    try:
        while pos < end:
            at = pos
            tag, pos = _varint(data, pos)
            wire = tag & 7
            value = pos
            if wire == 2:
                length, value = _varint(data, pos)
                pos = value + length
            elif wire == 0:
                _, pos = _varint(data, pos)
            elif wire in (1, 5):
                pos += 8 if wire == 1 else 4
            else:
                raise CorruptObject(f"wire type {wire} is not used by OutputFile")
            if pos > end:
                raise CorruptObject("a field runs past the end of its message")
            yield tag >> 3, at, value, pos
    except IndexError:
        raise CorruptObject("the file ends inside a field") from None


def _table_spans(data: bytes | bytearray) -> list[tuple[int, int]]:
    fields = list(_fields(data, 0, len(data)))
    if not any(1 <= number <= _TABLES for number, _, _, _ in fields):
        raise CorruptObject(
            "decodes to an empty tableextract.v1.OutputFile (no known field is set)"
        )
    return [(s, e) for number, _, s, e in fields if number == _TABLES]


def _table_layout(
    data: memoryview, start: int, end: int
) -> tuple[str, list[str], list[tuple[int, int]]]:
    """A table's name, columns, and its rows cut into slices that each parse
    as a ``Table`` holding only those rows (a message's fields may be split)."""
    name, columns, slices = "", [], []
    first = last = -1
    count = 0
    for number, tag_start, s, e in _fields(data, start, end):
        if number == _ROWS:
            if first < 0:
                first = tag_start
            elif count >= SLICE_ROWS or e - first > SLICE_BYTES:
                slices.append((first, last))
                first, count = tag_start, 0
            last, count = e, count + 1
            continue
        try:
            if number == _NAME:
                name = bytes(data[s:e]).decode()
            elif number == _COLUMNS:
                columns.append(bytes(data[s:e]).decode())
        except UnicodeDecodeError:
            raise CorruptObject("a table or column name is not UTF-8") from None
    if first >= 0:
        slices.append((first, last))
    return name, columns, slices
