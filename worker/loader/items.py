"""Rows -> DynamoDB items (ARCHITECTURE.md, "Items"), built as low-level attribute values.

No boto3 ``TypeSerializer`` and no ``Decimal`` on the hot path: each value is
turned straight into its wire form (``{"N": "0.1"}``, ``{"S": "x"}``...).

- ``int`` -> N; finite ``float`` -> N via ``repr`` (the shortest round trip);
  ``str`` -> S; ``bool`` -> BOOL; ``None`` -> NULL; ``bytes`` -> B;
  list/tuple -> L; dict -> M; ``Decimal`` -> N; numpy scalars are unwrapped.
- NaN/±Inf follow ``NAN_POLICY`` (null, string or drop).
- Numbers DynamoDB cannot hold (over 38 digits, or outside 1e-130..9.99e125)
  are stored as S and counted.
- The key comes from the row when present and non-empty, otherwise from a
  deterministic id of (bucket, key, revision, table, row index), so
  redelivery rewrites the same items. The last row with a given key wins.
- Items over 400 KB, by DynamoDB's size rules, are skipped and counted.
"""

from __future__ import annotations

import math
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Context, Decimal
from hashlib import blake2b
from typing import Any, Literal

import orjson

from worker.core.config import NanPolicy

Attr = dict[str, Any]
Item = dict[str, Attr]
Encoded = Item | orjson.Fragment  # an item, or its JSON text (``worker.loader.encode``)
KeyType = Literal["S", "N", "B"]

MAX_ITEM_BYTES = 400 * 1024
MAX_HASH_KEY_BYTES = 2048
MAX_RANGE_KEY_BYTES = 1024
_INT_LIMIT = 10**38
_FLOAT_MIN = 1e-130
_FLOAT_MAX = 1e126  # exclusive: DynamoDB's largest is 9.9999999999999999999999999999999999999e125
_ID_NAMESPACE = uuid.UUID("6f1d3c1e-7a55-4b7e-9b0a-1d2c3e4f5a6b")
_EXACT = Context(prec=60)  # wide enough that normalizing a DynamoDB number never rounds it
_NONFINITE_TEXT = {math.inf: "Infinity", -math.inf: "-Infinity"}
MAX_SAMPLES = 3
MAX_SAMPLE_CHARS = 200  # a sample quotes the input: bounded, so a log line stays small
MAX_NAME_BYTES = 65_535  # DynamoDB: an attribute name is 1 byte to 64 KB


@dataclass(frozen=True, slots=True)
class KeyAttribute:
    name: str
    type: KeyType


@dataclass(frozen=True, slots=True)
class KeySchema:
    hash: KeyAttribute
    range: KeyAttribute | None = None

    @property
    def attributes(self) -> tuple[KeyAttribute, ...]:
        return (self.hash,) if self.range is None else (self.hash, self.range)


@dataclass(frozen=True, slots=True)
class Origin:
    """Where rows came from: the seed of every deterministic id."""

    bucket: str
    key: str
    revision: str
    table: str

    def seed(self, index: int, attribute: str) -> str:
        return f"{self.bucket}/{self.key}/{self.revision}/{self.table}/{index}/{attribute}"


@dataclass(slots=True)
class ConversionStats:
    """What converting one table's rows did: kept bytes, skips, rewrites."""

    bytes: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    samples: dict[str, list[str]] = field(default_factory=dict)
    duplicates: int = 0
    numbers_as_strings: int = 0
    nonfinite: int = 0

    def skip(self, reason: str, index: int, detail: str) -> None:
        self.skipped[reason] += 1
        samples = self.samples.setdefault(reason, [])
        if len(samples) < MAX_SAMPLES:
            samples.append(f"row {index}: {detail[:MAX_SAMPLE_CHARS]}")


@dataclass(slots=True)
class Conversion:
    """The items of some rows of one table, each item's key identity (a hash: equal
    keys, equal hashes), and what happened to the rows that are not there (the
    builder's stats, over every ``convert`` so far)."""

    items: list[Encoded] = field(default_factory=list)
    stats: ConversionStats = field(default_factory=ConversionStats)
    keys: list[int] = field(default_factory=list)

    def take_items(self) -> list[Encoded]:
        """Hand the items over, keeping no reference, so they can be freed as written."""
        items, self.items = self.items, []
        return items


class _UnsupportedError(TypeError):
    reason = "unsupported_type"


class _InvalidNameError(_UnsupportedError):
    reason = "invalid_attribute_name"


class ItemBuilder:
    """Converts the rows of one table with one key schema and NaN policy."""

    def __init__(self, schema: KeySchema, nan_policy: NanPolicy, origin: Origin) -> None:
        self.schema = schema
        self.nan_policy = nan_policy
        self.origin = origin
        self.stats = ConversionStats()
        self._name_sizes: dict[str, int] = {}

    def convert(self, rows: Sequence[dict[str, Any]], first_index: int = 0) -> Conversion:
        """Build the items of ``rows`` (the table's rows from ``first_index`` on, which
        seeds the derived ids): unique keys, last row wins, skips counted."""
        single = self.schema.hash if self.schema.range is None else None
        by_key: dict[Any, tuple[Item, int]] = {}
        for index, row in enumerate(rows, first_index):
            built = self._item(index, row)
            if built is None:
                continue
            item, size = built
            identity = (
                _identity(item[single.name])
                if single is not None
                else tuple(_identity(item[k.name]) for k in self.schema.attributes)
            )
            if identity in by_key:
                self.stats.duplicates += 1
            by_key[identity] = (item, size)
        self.stats.bytes += sum(size for _, size in by_key.values())
        return Conversion(
            items=[item for item, _ in by_key.values()],
            stats=self.stats,
            keys=[hash(identity) for identity in by_key],
        )

    def _item(self, index: int, row: Any) -> tuple[Item, int] | None:
        stats = self.stats
        if not isinstance(row, dict):
            stats.skip("not_a_row", index, f"{type(row).__name__} is not a dict")
            return None
        try:
            item, size = self._attributes(row)
        except _UnsupportedError as exc:
            stats.skip(exc.reason, index, str(exc))
            return None
        for position, key in enumerate(self.schema.attributes):
            present = item.get(key.name)
            if present is not None and key.type in present and present[key.type] not in ("", b""):
                attr = present  # the row's own value already has the key's type: the common case
            else:
                made = self._key(index, key, row.get(key.name))
                if made is None:
                    stats.skip("invalid_key", index, f"{key.name}={row.get(key.name)!r}")
                    return None
                attr = made
                if present is not None:
                    size -= _utf8_len(key.name) + _attr_size(present)
                item[key.name] = attr
                size += _utf8_len(key.name) + _attr_size(attr)
            limit = MAX_HASH_KEY_BYTES if position == 0 else MAX_RANGE_KEY_BYTES
            if key.type != "N" and _attr_size(attr) > limit:
                stats.skip("key_too_large", index, f"{key.name} is over {limit} bytes")
                return None
        if size > MAX_ITEM_BYTES:
            stats.skip("item_too_large", index, f"{size} bytes")
            return None
        return item, size

    def _attributes(self, row: dict[str, Any]) -> tuple[Item, int]:
        """The row's values as attributes, and their size by DynamoDB's rules.

        Strings and in-range numbers, nearly every value, are handled inline;
        everything else goes through ``_value``. Column names repeat from row to
        row, so their sizes are remembered.
        """
        item: Item = {}
        size = 0
        names = self._name_sizes
        for name, value in row.items():
            kind = type(value)
            attr: Attr | None
            if kind is str:
                attr = {"S": value}
                value_size = (
                    len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
                )
            elif kind is int and -_INT_LIMIT < value < _INT_LIMIT:
                text = str(value)
                attr, value_size = {"N": text}, (len(text) + 1) // 2 + 1
            elif kind is float and (value == 0.0 or _FLOAT_MIN <= abs(value) < _FLOAT_MAX):
                text = repr(value)
                attr, value_size = {"N": text}, (len(text) + 1) // 2 + 1
            else:
                attr = self._value(value, in_list=False)
                if attr is None:
                    continue
                value_size = _attr_size(attr)
            item[name] = attr
            name_size = names.get(name)
            if name_size is None:
                name_size = names[name] = _name_size(name)
            size += name_size + value_size
        return item, size

    def _key(self, index: int, key: KeyAttribute, value: Any) -> Attr | None:
        """The key attribute from the row, or a deterministic id when it is absent."""
        if value is None or value == "" or value == b"":
            return self._derived_key(index, key)
        if key.type == "B":
            return {"B": value} if isinstance(value, bytes) else None
        if key.type == "S":
            plain_int = isinstance(value, int) and not isinstance(value, bool)
            return {"S": str(value)} if isinstance(value, str) or plain_int else None
        if isinstance(value, str):
            return {"N": str(int(value))} if _is_int_text(value) else None
        return None  # a value that converts to N is the row's own key: it never gets here

    def _derived_key(self, index: int, key: KeyAttribute) -> Attr:
        seed = self.origin.seed(index, key.name)
        if key.type == "S":
            return {"S": str(uuid.uuid5(_ID_NAMESPACE, seed))}
        if key.type == "B":
            return {"B": uuid.uuid5(_ID_NAMESPACE, seed).bytes}
        digest = blake2b(seed.encode(), digest_size=8).digest()
        return {"N": str(int.from_bytes(digest, "big") >> 1)}

    def _value(self, value: Any, *, in_list: bool) -> Attr | None:
        kind = type(value)
        if kind is str:  # the common cases first, without a dict lookup
            return {"S": value}
        if kind is int:
            return self._int(value)
        if kind is float:
            return self._float(value, in_list=in_list)
        if kind is bool:
            return {"BOOL": value}
        if value is None:
            return {"NULL": True}
        if isinstance(value, list | tuple):
            elements = [self._value(v, in_list=True) for v in value]
            return {"L": [e for e in elements if e is not None]}
        if isinstance(value, dict):
            return self._map(value)
        return self._other(value, in_list=in_list)

    def _map(self, value: dict[Any, Any]) -> Attr:
        members: dict[str, Attr] = {}
        for name, member in value.items():
            if not isinstance(name, str):
                raise _UnsupportedError(f"map key {name!r} is not a string")
            attr = self._value(member, in_list=False)
            if attr is not None:
                members[name] = attr
        return {"M": members}

    def _other(self, value: Any, *, in_list: bool) -> Attr | None:
        """Subclasses of the basic types, bytes, Decimal and numpy scalars."""
        if isinstance(value, bytes | bytearray | memoryview):
            return {"B": bytes(value)}
        if isinstance(value, Decimal):
            return self._decimal(value, in_list=in_list)
        if isinstance(value, bool):
            return {"BOOL": bool(value)}
        if isinstance(value, str):
            return {"S": str(value)}
        if isinstance(value, int):
            return self._int(int(value))
        if isinstance(value, float):
            return self._float(float(value), in_list=in_list)
        if type(value).__module__ == "numpy" and hasattr(value, "item"):
            return self._value(value.item(), in_list=in_list)
        raise _UnsupportedError(f"{type(value).__name__} has no DynamoDB type")

    def _int(self, value: int) -> Attr:
        if -_INT_LIMIT < value < _INT_LIMIT:
            return {"N": str(value)}
        self.stats.numbers_as_strings += 1
        return {"S": str(value)}

    def _float(self, value: float, *, in_list: bool) -> Attr | None:
        if value != value or value in _NONFINITE_TEXT:
            return self._nonfinite("NaN" if value != value else _NONFINITE_TEXT[value], in_list)
        if value == 0.0 or _FLOAT_MIN <= abs(value) < _FLOAT_MAX:
            return {"N": repr(value)}
        self.stats.numbers_as_strings += 1
        return {"S": repr(value)}

    def _decimal(self, value: Decimal, *, in_list: bool) -> Attr | None:
        if not value.is_finite():
            text = "NaN" if value.is_nan() else ("Infinity" if value > 0 else "-Infinity")
            return self._nonfinite(text, in_list)
        if value.is_zero() or (
            _significant_digits(value) <= 38 and _FLOAT_MIN <= abs(value) < _FLOAT_MAX
        ):
            return {"N": str(value)}
        self.stats.numbers_as_strings += 1
        return {"S": str(value)}

    def _nonfinite(self, text: str, in_list: bool) -> Attr | None:
        self.stats.nonfinite += 1
        if self.nan_policy == "string":
            return {"S": text}
        if self.nan_policy == "drop" and not in_list:
            return None
        return {"NULL": True}


def _identity(attr: Attr) -> Any:
    """A key value as DynamoDB compares it: numbers by value ("3.0" is "3")."""
    for kind, value in attr.items():
        if kind != "N" or value.isdigit():  # strings, and the canonical text of naturals
            return value
        number = Decimal(value)
        if number == number.to_integral_value():
            return str(int(number))  # "-0", "3.0", "1e2": the text an int would have
        return str(number.normalize(_EXACT))
    return None


def _significant_digits(value: Decimal) -> int:
    """Digits without leading or trailing zeros (``normalize`` would round to 28)."""
    return len("".join(map(str, value.as_tuple().digits)).strip("0"))


def _is_int_text(text: str) -> bool:
    body = text[1:] if text[:1] in "+-" else text
    return body.isdigit() and body.isascii() and len(body) < 39


def _name_size(name: Any) -> int:
    """An attribute name's size; a name DynamoDB refuses is the row's problem."""
    if not isinstance(name, str):
        raise _UnsupportedError(f"attribute name {name!r:.80} is not a string")
    size = _utf8_len(name)
    if not 0 < size <= MAX_NAME_BYTES:
        raise _InvalidNameError(f"attribute name of {size} bytes (1 to {MAX_NAME_BYTES})")
    return size


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _attr_size(attr: Attr) -> int:
    """An attribute value's size by DynamoDB's rules (numbers over-estimated slightly)."""
    ((kind, value),) = attr.items()
    if kind == "S":
        return _utf8_len(value)
    if kind == "N":
        return (len(value) + 1) // 2 + 1
    if kind == "B":
        return len(value)
    if kind == "L":
        return 3 + sum(1 + _attr_size(v) for v in value)
    if kind == "M":
        return 3 + sum(1 + _utf8_len(k) + _attr_size(v) for k, v in value.items())
    return 1  # BOOL, NULL
