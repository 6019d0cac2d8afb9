"""The bundled reference ``TableExtract`` (ARCHITECTURE.md, "Contracts").

Two entry points, the same rows:
- ``processOutputData(output_file)``: the whole file as ``{table: [rows]}``,
  the contract every ``TABLE_EXTRACT`` keeps;
- ``iterOutputData(data)``: the optional streaming contract. It walks the
  ``OutputFile``'s wire format (``wire``: upb's rules, so both paths give one
  answer) and parses one slice of one table's rows at a time.

**Bounded whatever the file holds.** The walk keeps no list of fields: a first
pass checks the whole file (every tag, every string's UTF-8, every row slice
through upb) and collects only the distinct table names, refusing past
``max_tables``; iterating walks again, one table at a time, holding its name,
columns and slice positions. A row larger than ``SLICE_BYTES`` is parsed a
chunk of values at a time. So memory holds the file's bytes, one table's
columns (at most ``MAX_COLUMNS``) and one slice, never a structure per field.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, overload

from google.protobuf.message import DecodeError

from worker.core.errors import CorruptObject, ObjectTooLarge
from worker.loader.extract import SLICE_ROWS
from worker.loader.extract.outputfile_pb2 import OutputFile
from worker.loader.extract.wire import (
    LENGTH,
    MASK64,
    MAX_DEPTH,
    VARINT,
    Buffer,
    encode_varint,
    fields,
    varint,
)

Rows = dict[str, list[dict[str, Any]]]
SLICE_BYTES = 1024 * 1024  # rows parsed at once: SLICE_ROWS, or this many bytes
MAX_COLUMNS = 100_000  # a table's columns: an item of 400 KB holds fewer attributes
_FILE_ID, _SOURCE_URI, _CREATED_AT, _TABLES = 1, 2, 3, 4  # OutputFile's field numbers
_NAME, _COLUMNS, _ROWS = 1, 2, 3  # Table's
_VALUES = 1  # Row's
_ROWS_SLICE, _BIG_ROW = -1, -2  # not field numbers


def processOutputData(output_file: OutputFile) -> Rows:  # noqa: N802 - the layer's contract name
    """Map each table name to its rows: ``{column: value}`` for every set value.

    A value whose ``kind`` is unset is a missing field; a row shorter than the
    columns simply lacks the trailing fields. Tables sharing a name are
    concatenated in file order.
    """
    tables: Rows = {}
    for table in output_file.tables:
        _check_columns(table.name, len(table.columns))
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


def _check_columns(name: str, count: int) -> None:
    if count > MAX_COLUMNS:
        raise ObjectTooLarge(
            f"table {name!r} has {count} columns, over the {MAX_COLUMNS} a row can use",
            columns=count,
        )


class RowSlice(Sequence[dict[str, Any]]):
    """Some rows of one table as upb parsed them, with the table's columns: what
    the fused encoder (``worker.loader.encode``) reads; as a sequence, the rows
    as dicts."""

    __slots__ = ("columns", "rows")

    def __init__(self, columns: list[str], rows: Any) -> None:
        self.columns = columns
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...
    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(index, slice):
            return _rows(self.columns, self.rows[index])
        return _rows(self.columns, [self.rows[index]])[0]

    def dicts(self) -> list[dict[str, Any]]:
        return _rows(self.columns, self.rows)


class OutputFileStream:
    """``iterOutputData``'s result: ``(table name, rows)`` slices in file order.

    ``table_names`` (distinct, in file order) is known before any row is
    converted: building the stream checks the whole file, so a corrupt file
    fails before a table is made or a row written.
    """

    def __init__(self, data: Buffer, max_tables: int | None = None, *, raw: bool = False) -> None:
        self._data = memoryview(data)
        self._raw = raw
        self.table_names = _check_file(self._data, max_tables)

    def __iter__(self) -> Iterator[tuple[str, list[dict[str, Any]] | RowSlice]]:
        data = self._data
        for number, wire, _, start, end in fields(data, 0, len(data)):
            if number != _TABLES or wire != LENGTH:
                continue
            name, columns, slices = _table_layout(data, start, end)
            for kind, first, last in slices:
                if kind == _ROWS_SLICE:
                    rows = RowSlice(columns, _parse_rows(data, first, last))
                    yield name, rows if self._raw else rows.dicts()
                else:
                    yield name, [_big_row(data, first, last, columns)]


def iterOutputData(  # noqa: N802 - the contract's name style
    data: Buffer, max_tables: int | None = None, *, raw: bool = False
) -> OutputFileStream:
    """``raw``: slices as ``RowSlice`` (the fused encoder's input), not dicts."""
    return OutputFileStream(data, max_tables, raw=raw)


def _check_file(data: memoryview, max_tables: int | None) -> list[str]:
    """Every field of the file checked as upb would (rows through upb itself);
    the distinct table names. Refuses a file with no known field set, as the
    whole-message path does."""
    names: dict[str, None] = {}
    ids = {_FILE_ID: False, _SOURCE_URI: False}  # last value non-empty: a set field
    created_at = False
    for number, wire, _, start, end in fields(data, 0, len(data)):
        if number in ids and wire == LENGTH:
            _text(data, start, end, "file_id" if number == _FILE_ID else "source_uri")
            ids[number] = end > start
        elif number == _CREATED_AT and wire == VARINT:
            created_at = varint(data, start)[0] & MASK64 != 0
        elif number == _TABLES and wire == LENGTH:
            names.setdefault(_check_table(data, start, end))
            if max_tables is not None and len(names) > max_tables:
                raise ObjectTooLarge(
                    f"file holds more than {max_tables} tables,"
                    f" over MAX_TABLES_PER_FILE={max_tables}",
                    table_count=len(names),
                )
    if not (names or created_at or any(ids.values())):
        raise CorruptObject(
            "decodes to an empty tableextract.v1.OutputFile (no known field is set)"
        )
    return list(names)


def _check_table(data: memoryview, start: int, end: int) -> str:
    name, columns = "", 0
    for kind, first, last in _table_parts(data, start, end):
        if kind == _NAME:
            name = _text(data, first, last, "a table name")
        elif kind == _COLUMNS:
            _text(data, first, last, "a column name")
            columns += 1
        elif kind == _ROWS_SLICE:
            _parse_rows(data, first, last)
        else:
            for values in _value_chunks(data, first, last):
                _parse_values(data, values)
    _check_columns(name, columns)
    return name


def _table_layout(
    data: memoryview, start: int, end: int
) -> tuple[str, list[str], list[tuple[int, int, int]]]:
    """A table's name, columns, and its rows as slices (each parses as a table
    holding just those rows) or single large rows."""
    name, columns, slices = "", [], []
    for kind, first, last in _table_parts(data, start, end):
        if kind == _NAME:
            name = _text(data, first, last, "a table name")
        elif kind == _COLUMNS:
            columns.append(_text(data, first, last, "a column name"))
        else:
            slices.append((kind, first, last))
    return name, columns, slices


def _table_parts(data: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """``(_NAME | _COLUMNS, value start, end)`` per name or column, and the rows
    as ``(_ROWS_SLICE, first tag, end)`` or ``(_BIG_ROW, row start, end)``."""
    first = last = -1
    count = 0
    for number, wire, at, value, value_end in fields(data, start, end, MAX_DEPTH - 1):
        if wire != LENGTH or number not in (_NAME, _COLUMNS, _ROWS):
            continue
        if number != _ROWS:
            yield number, value, value_end
            continue
        if value_end - at > SLICE_BYTES:  # one row larger than a slice: alone, in chunks
            if first >= 0:
                yield _ROWS_SLICE, first, last
                first = -1
            yield _BIG_ROW, value, value_end
            continue
        if first < 0:
            first, count = at, 0
        elif count >= SLICE_ROWS or value_end - first > SLICE_BYTES:
            yield _ROWS_SLICE, first, last
            first, count = at, 0
        last, count = value_end, count + 1
    if first >= 0:
        yield _ROWS_SLICE, first, last


def _parse_rows(data: memoryview, first: int, last: int) -> Any:
    """The rows in ``data[first:last]``, parsed by upb."""
    try:
        return _in_file(bytes(data[first:last])).tables[0].rows
    except DecodeError as exc:
        raise CorruptObject(f"rows do not decode: {exc}") from None


def _value_chunks(data: memoryview, start: int, end: int) -> Iterator[tuple[int, int]]:
    """A large row's values as spans of at most about ``SLICE_BYTES``."""
    first = last = -1
    for number, wire, at, _, value_end in fields(data, start, end, MAX_DEPTH - 2):
        if number != _VALUES or wire != LENGTH:
            continue
        if first >= 0 and value_end - first > SLICE_BYTES:
            yield first, last
            first = -1
        if first < 0:
            first = at
        last = value_end
    if first >= 0:
        yield first, last


def _parse_values(data: memoryview, span: tuple[int, int]) -> Any:
    row = bytes(data[span[0] : span[1]])
    try:
        return _in_file(b"\x1a" + encode_varint(len(row)) + row).tables[0].rows[0].values
    except DecodeError as exc:
        raise CorruptObject(f"a row does not decode: {exc}") from None


def _in_file(rows: bytes) -> OutputFile:
    """``rows`` (a table's fields) as the one table of a file, so upb counts
    nesting as in the file."""
    return OutputFile.FromString(b"\x22" + encode_varint(len(rows)) + rows)


def _big_row(data: memoryview, start: int, end: int, columns: list[str]) -> dict[str, Any]:
    """One row larger than a slice, built a chunk of values at a time."""
    record: dict[str, Any] = {}
    index = 0
    for span in _value_chunks(data, start, end):
        for value in _parse_values(data, span):
            if index >= len(columns):
                return record
            kind = value.WhichOneof("kind")
            if kind is not None:
                record[columns[index]] = getattr(value, kind)
            index += 1
    return record


def _text(data: memoryview, start: int, end: int, what: str) -> str:
    try:
        return str(data[start:end], "utf-8")
    except UnicodeDecodeError:
        raise CorruptObject(f"{what} is not UTF-8") from None
