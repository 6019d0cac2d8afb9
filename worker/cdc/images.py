"""DynamoDB stream images (wire-format attribute values) -> JSON-ready values.

A converter of our own, not boto3's ``TypeDeserializer``: no ``Decimal`` on the
hot path, and no precision ever lost.

| DynamoDB | JSON value |
|---|---|
| S | string |
| N | int when integral and within int64; else float when it reads back as exactly |
|   | the same number; else the decimal string |
| B | base64 string |
| BOOL / NULL | true/false / null |
| SS / NS / BS | sorted list (NS sorted by numeric value) |
| L / M | list / object, converted recursively |
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

_INT64 = (-(2**63), 2**63 - 1)


def convert_image(image: dict[str, Any] | None) -> dict[str, Any] | None:
    if image is None:
        return None
    converted: dict[str, Any] = {}
    for name, attribute in image.items():
        for kind, value in attribute.items():  # inlined for strings, a call saved per value
            converted[name] = value if kind == "S" else convert_value(attribute)
    return converted


def convert_value(attribute: dict[str, Any]) -> Any:
    for kind, value in attribute.items():  # exactly one entry
        if kind == "S":  # the common cases first, without a dict lookup
            return value
        if kind == "N":
            return number(value)
        try:
            convert = _CONVERTERS[kind]
        except KeyError:
            raise ValueError(f"unknown DynamoDB attribute type {kind!r}") from None
        return convert(value)
    raise ValueError("an attribute value with no type")


def number(text: str) -> int | float | str:
    """The JSON value of a DynamoDB number, without losing a digit."""
    if len(text) < 19 and text.isdigit():  # the common case: a small natural number
        return int(text)
    if "." in text and "E" not in text and "e" not in text:
        approximate = float(text)
        if repr(approximate) == text and not approximate.is_integer():  # prints back the same
            return approximate
    if text.lstrip("-").isdigit():
        integer = int(text)
        if _INT64[0] <= integer <= _INT64[1]:
            return integer
    try:
        exact = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a DynamoDB number") from None
    if exact == exact.to_integral_value() and _INT64[0] <= exact <= _INT64[1]:
        return int(exact)
    approximate = float(text)
    if Decimal(repr(approximate)) == exact:
        return approximate
    return text


def _base64(value: bytes | str) -> str:
    # Lambda events carry B as base64 text already; the SDK hands over bytes.
    return value if isinstance(value, str) else base64.b64encode(value).decode()


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "S": lambda v: v,
    "N": number,
    "BOOL": bool,
    "NULL": lambda _: None,
    "M": lambda v: {name: convert_value(member) for name, member in v.items()},
    "L": lambda v: [convert_value(member) for member in v],
    "B": _base64,
    "SS": sorted,
    "NS": lambda v: [number(text) for text in sorted(v, key=Decimal)],
    "BS": lambda v: sorted(_base64(member) for member in v),
}
