"""DynamoDB's own request rules, written independently of ``worker.loader.items``.

Used by the fault proxy (to reject what DynamoDB would reject) and by the
property tests (to prove the worker never builds such a request).
"""

from __future__ import annotations

import base64
from decimal import Context, Decimal, InvalidOperation
from typing import Any

MAX_BATCH = 25
MAX_ITEM = 400 * 1024
_LOW = Decimal("1e-130")
_HIGH = Decimal("9.9999999999999999999999999999999999999e125")


def number_problem(text: str) -> str | None:
    try:
        number = Decimal(text)
    except InvalidOperation:
        return f"{text!r} is not a number"
    if not number.is_finite():
        return f"{text!r} is not finite"
    if number.is_zero():
        return None
    if len("".join(map(str, number.as_tuple().digits)).strip("0")) > 38:
        return f"{text!r} has more than 38 significant digits"
    if not _LOW <= abs(number) <= _HIGH:
        return f"{text!r} is out of range"
    return None


def value_size(attr: dict[str, Any]) -> int:
    ((kind, value),) = attr.items()
    if kind == "S":
        return len(value.encode())
    if kind == "N":
        digits = "".join(map(str, Decimal(value).as_tuple().digits)).strip("0")
        return (len(digits) + 1) // 2 + 1
    if kind == "B":
        return len(base64.b64decode(value)) if isinstance(value, str) else len(value)
    if kind == "L":
        return 3 + sum(1 + value_size(v) for v in value)
    if kind == "M":
        return 3 + sum(1 + len(k.encode()) + value_size(v) for k, v in value.items())
    return 1


def value_problem(attr: dict[str, Any]) -> str | None:
    if not isinstance(attr, dict) or len(attr) != 1:
        return f"{attr!r} is not one typed value"
    ((kind, value),) = attr.items()
    if kind == "N":
        return number_problem(value)
    if kind == "L":
        return next((p for v in value if (p := value_problem(v))), None)
    if kind == "M":
        return next((p for v in value.values() if (p := value_problem(v))), None)
    if kind not in {"S", "B", "BOOL", "NULL"}:
        return f"unknown type {kind}"
    return None


def item_problem(item: dict[str, Any], key_names: list[str]) -> str | None:
    for name in key_names:
        if name not in item:
            return f"key attribute {name} is missing"
        ((kind, value),) = item[name].items()
        if kind not in {"S", "N", "B"} or value in ("", b""):
            return f"key attribute {name} is empty or not scalar"
    size = sum(len(k.encode()) + value_size(v) for k, v in item.items())
    if size > MAX_ITEM:
        return f"item is {size} bytes, over 400 KB"
    return next((p for v in item.values() if (p := value_problem(v))), None)


def key_of(item: dict[str, Any], key_names: list[str]) -> tuple[Any, ...]:
    parts = []
    for name in key_names:
        ((kind, value),) = item[name].items()
        parts.append(Decimal(value).normalize(Context(prec=60)) if kind == "N" else value)
    return tuple(parts)


def batch_problem(
    request_items: dict[str, list[dict[str, Any]]], keys: dict[str, list[str]]
) -> str | None:
    """Why DynamoDB would refuse this BatchWriteItem, or None."""
    total = sum(len(requests) for requests in request_items.values())
    if total > MAX_BATCH or total == 0:
        return f"{total} requests in one batch; 1 to 25 are allowed"
    for table, requests in request_items.items():
        key_names = keys.get(table, ["id"])
        seen = set()
        for request in requests:
            item = request["PutRequest"]["Item"]
            problem = item_problem(item, key_names)
            if problem:
                return problem
            key = key_of(item, key_names)
            if key in seen:
                return "Provided list of item keys contains duplicates"
            seen.add(key)
    return None
