"""The fused encoder: a slice of the reference schema's rows, as upb parsed them,
straight to each item's DynamoDB JSON text (ARCHITECTURE.md, "Items").

``FusedBuilder`` keeps ``ItemBuilder``'s interface (``convert -> Conversion``)
and every rule of "Item conversion" (the key from the row or derived, last row
wins, 400 KB and key sizes, the NaN policy, number ranges, skips counted and
sampled), but builds no row dict and no item dict: each column's JSON prefix is
made once per table, each value is appended as text, and an item is an
``orjson.Fragment`` that the request body embeds as it is. Derived ids are
``uuid5`` computed from one SHA-1 state per table (the same bytes, about a
third of the cost). It takes the common shape only: one ``S`` or ``N`` hash
key and distinct, valid column names. Anything else (a composite or ``B`` key,
odd column names, rows that are already dicts) goes through ``ItemBuilder``,
so the answer is the dict path's, byte for byte (tests/test_encode.py).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import orjson

from worker.core.config import NanPolicy
from worker.loader.extract.reference import RowSlice
from worker.loader.items import (
    _FLOAT_MAX,
    _FLOAT_MIN,
    _ID_NAMESPACE,
    MAX_HASH_KEY_BYTES,
    MAX_ITEM_BYTES,
    MAX_NAME_BYTES,
    Conversion,
    ItemBuilder,
    KeySchema,
    Origin,
    _identity,
    _is_int_text,
)

_NULL = b'{"NULL":true}'


class FusedBuilder:
    """Converts the rows of one table: ``RowSlice``s through the fused encoder when
    the table's shape allows, everything else through ``ItemBuilder``."""

    def __init__(self, schema: KeySchema, nan_policy: NanPolicy, origin: Origin) -> None:
        self.dicts = ItemBuilder(schema, nan_policy, origin)
        self.stats = self.dicts.stats
        self.schema = schema
        self.nan_policy = nan_policy
        key = schema.hash
        self._key = key.name if schema.range is None and key.type != "B" else None
        self._strings = key.type == "S"  # else N
        seed = f"{origin.bucket}/{origin.key}/{origin.revision}/{origin.table}/".encode()
        self._ids = (  # the ItemBuilder's derived ids, from one hash state per table
            hashlib.sha1(_ID_NAMESPACE.bytes + seed)
            if self._strings
            else hashlib.blake2b(seed, digest_size=8)
        )
        self._key_suffix = f"/{key.name}".encode()
        self._columns: list[str] | None = None
        self._layout: _Layout | None = None

    def convert(self, rows: Sequence[dict[str, Any]], first_index: int = 0) -> Conversion:
        if not isinstance(rows, RowSlice):
            return self.dicts.convert(rows, first_index)
        layout = self._layout_of(rows)
        if layout is None:
            return self.dicts.convert(rows.dicts(), first_index)
        return self._convert(layout, rows.rows, first_index)

    def _layout_of(self, rows: RowSlice) -> _Layout | None:
        if self._key is None:
            return None
        if rows.columns is not self._columns:
            self._columns = rows.columns
            self._layout = _Layout.of(rows.columns, self._key, strings=self._strings)
        return self._layout

    def _convert(  # noqa: C901 - one loop over every value, inlined: the hot path
        self, layout: _Layout, rows: Any, first_index: int
    ) -> Conversion:
        stats = self.stats
        nan_policy = self.nan_policy
        names, name_sizes, string_prefix, number_prefix = (
            layout.names,
            layout.name_sizes,
            layout.string_prefix,
            layout.number_prefix,
        )
        key_at, key_prefix, key_name_size = layout.key_at, layout.key_prefix, layout.key_name_size
        strings = self._strings
        wanted = "S" if strings else "N"
        positions = range(len(names))
        dumps = orjson.dumps
        by_key: dict[Any, tuple[bytes, int]] = {}
        index = first_index - 1
        for row in rows:
            index += 1
            parts: list[bytes] = []
            size = 0
            key_part = -1  # where the key column's attribute is in ``parts``
            key_value: Any = None  # the row's raw value for the key column
            key_text: str | None = None  # the key attribute, when it is an S
            key_size = 0
            for at, value in zip(positions, row.values, strict=False):
                kind = value.WhichOneof("kind")
                if kind is None:
                    continue
                text: str | None = None  # the attribute's S or N text
                if kind == "string_value":
                    raw = text = value.string_value
                    typed = "S"
                    part = string_prefix[at] + dumps(raw) + b"}"
                    value_size = len(raw) if raw.isascii() else len(raw.encode())
                elif kind == "int_value":
                    raw = value.int_value
                    text, typed = str(raw), "N"
                    part = number_prefix[at] + text.encode() + b'"}'
                    value_size = (len(text) + 1) // 2 + 1
                else:
                    raw = value.float_value
                    if raw == 0.0 or _FLOAT_MIN <= abs(raw) < _FLOAT_MAX:
                        text, typed = repr(raw), "N"
                        part = number_prefix[at] + text.encode() + b'"}'
                        value_size = (len(text) + 1) // 2 + 1
                    elif math.isfinite(raw):
                        stats.numbers_as_strings += 1
                        text, typed = repr(raw), "S"
                        part = string_prefix[at] + b'"' + text.encode() + b'"}'
                        value_size = len(text)
                    else:
                        stats.nonfinite += 1
                        if nan_policy == "string":
                            text = "NaN" if raw != raw else ("Infinity" if raw > 0 else "-Infinity")
                            typed = "S"
                            part = string_prefix[at] + b'"' + text.encode() + b'"}'
                            value_size = len(text)
                        elif nan_policy == "drop":
                            if at == key_at:
                                key_value = raw
                            continue
                        else:
                            typed = "NULL"
                            part = names[at] + _NULL
                            value_size = 1
                if at == key_at:
                    key_part, key_value, key_size = len(parts), raw, value_size
                    key_text = text if typed == wanted else None
                parts.append(part)
                size += name_sizes[at] + value_size
            if not key_text:  # none of the key's type in the row: made as ItemBuilder._key does
                if key_value is None or key_value == "":
                    digest = self._ids.copy()
                    digest.update(f"{index}".encode() + self._key_suffix)
                    key_text = (
                        _uuid_text(digest.digest())
                        if strings
                        else str(int.from_bytes(digest.digest(), "big") >> 1)
                    )
                elif strings and type(key_value) is int:
                    key_text = str(key_value)
                elif not strings and type(key_value) is str and _is_int_text(key_value):
                    key_text = str(int(key_value))
                else:
                    stats.skip("invalid_key", index, f"{self._key}={key_value!r}")
                    continue
                if strings:
                    part = key_prefix + dumps(key_text) + b"}"
                    new_size = len(key_text) if key_text.isascii() else len(key_text.encode())
                else:
                    part = key_prefix + key_text.encode() + b'"}'
                    new_size = (len(key_text) + 1) // 2 + 1
                if key_part >= 0:
                    parts[key_part] = part
                    size += new_size - key_size
                else:
                    parts.append(part)
                    size += key_name_size + new_size
                key_size = new_size
            if strings and key_size > MAX_HASH_KEY_BYTES:
                stats.skip(
                    "key_too_large", index, f"{self._key} is over {MAX_HASH_KEY_BYTES} bytes"
                )
                continue
            if size > MAX_ITEM_BYTES:
                stats.skip("item_too_large", index, f"{size} bytes")
                continue
            identity = key_text if strings or key_text.isdigit() else _identity({"N": key_text})
            if identity in by_key:
                stats.duplicates += 1  # the last row wins, in the first one's place
            by_key[identity] = (b"{" + b",".join(parts) + b"}", size)
        stats.bytes += sum(size for _, size in by_key.values())
        return Conversion(
            items=[orjson.Fragment(text) for text, _ in by_key.values()],
            stats=stats,
            keys=[hash(key) for key in by_key],
        )


class _Layout:
    """A table's columns as JSON prefixes, made once per table."""

    __slots__ = (
        "key_at",
        "key_name_size",
        "key_prefix",
        "name_sizes",
        "names",
        "number_prefix",
        "string_prefix",
    )

    def __init__(self, columns: list[str], key: str, *, strings: bool) -> None:
        self.names = [orjson.dumps(c) + b":" for c in columns]
        self.name_sizes = [len(c.encode()) for c in columns]
        self.string_prefix = [n + b'{"S":' for n in self.names]
        self.number_prefix = [n + b'{"N":"' for n in self.names]
        self.key_at = columns.index(key) if key in columns else -1
        self.key_prefix = orjson.dumps(key) + (b':{"S":' if strings else b':{"N":"')
        self.key_name_size = len(key.encode())

    @classmethod
    def of(cls, columns: list[str], key: str, *, strings: bool) -> _Layout | None:
        """None when a column name repeats or is one DynamoDB refuses: the dict path's."""
        if len(set(columns)) != len(columns):
            return None
        if any(not 0 < len(c.encode()) <= MAX_NAME_BYTES for c in columns):
            return None
        return cls(columns, key, strings=strings)


def _uuid_text(digest: bytes) -> str:
    """``str(uuid.UUID(bytes=digest[:16], version=5))``."""
    raw = bytearray(digest[:16])
    raw[6] = raw[6] & 0x0F | 0x50
    raw[8] = raw[8] & 0x3F | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
