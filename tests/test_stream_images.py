"""Stream images become JSON-ready values without losing precision (issue: streams)."""

from __future__ import annotations

import base64
import math
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.cdc.images import convert_image, convert_value, number


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("42", 42),
        ("-0", 0),
        ("1.0", 1),
        ("1e2", 100),
        ("0.1", 0.1),
        ("-2.5e-7", -2.5e-7),
        (str(2**63 - 1), 2**63 - 1),
        (str(2**63), str(2**63)),  # beyond int64, and its float prints differently
        ("1e30", 1e30),  # beyond int64, but the float prints back the same number
        ("12345678901234567890123", "12345678901234567890123"),
        ("0.12345678901234567890123456789", "0.12345678901234567890123456789"),
        (
            "9.9999999999999999999999999999999999999E+125",
            "9.9999999999999999999999999999999999999E+125",
        ),
    ],
)
def test_numbers_are_ints_floats_or_exact_strings(text: str, value: Any) -> None:
    converted = number(text)
    assert converted == value and type(converted) is type(value)


def test_every_type_converts() -> None:
    image = {
        "s": {"S": "x"},
        "n": {"N": "3"},
        "b": {"B": b"\x00\xff"},
        "b64": {"B": "AP8="},
        "t": {"BOOL": True},
        "z": {"NULL": True},
        "ss": {"SS": ["b", "a"]},
        "ns": {"NS": ["10", "9", "-1.5"]},
        "bs": {"BS": [b"\x02", b"\x01"]},
        "l": {"L": [{"N": "1"}, {"M": {"k": {"S": "v"}}}]},
        "m": {"M": {"inner": {"L": []}}},
    }
    assert convert_image(image) == {
        "s": "x",
        "n": 3,
        "b": "AP8=",
        "b64": "AP8=",
        "t": True,
        "z": None,
        "ss": ["a", "b"],
        "ns": [-1.5, 9, 10],
        "bs": ["AQ==", "Ag=="],
        "l": [1, {"k": "v"}],
        "m": {"inner": []},
    }
    assert convert_image(None) is None


def test_an_unknown_type_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown"):
        convert_value({"X": 1})


# A DynamoDB number as text: up to 38 significant digits, exponent within range.
numbers = st.builds(
    lambda digits, exponent, sign: f"{sign}{digits}E{exponent}",
    st.integers(min_value=1, max_value=10**38 - 1),
    st.integers(min_value=-120, max_value=80),
    st.sampled_from(["", "-"]),
)
scalars = st.one_of(
    st.builds(lambda s: {"S": s}, st.text(max_size=10)),
    st.builds(lambda n: {"N": n}, numbers),
    st.builds(lambda b: {"B": b}, st.binary(max_size=8)),
    st.builds(lambda b: {"BOOL": b}, st.booleans()),
    st.just({"NULL": True}),
    st.builds(lambda s: {"SS": sorted(s)}, st.sets(st.text(max_size=5), min_size=1, max_size=4)),
    st.builds(lambda s: {"NS": sorted(s)}, st.sets(numbers, min_size=1, max_size=4)),
)
attributes = st.recursive(
    scalars,
    lambda inner: (
        st.builds(lambda v: {"L": v}, st.lists(inner, max_size=3))
        | st.builds(lambda v: {"M": v}, st.dictionaries(st.text(max_size=4), inner, max_size=3))
    ),
    max_leaves=8,
)


def same_value(attribute: dict[str, Any], value: Any) -> bool:
    ((kind, raw),) = attribute.items()
    if kind == "N":
        return (
            Decimal(str(value)) == Decimal(raw)
            if not isinstance(value, float)
            else Decimal(repr(value)) == Decimal(raw)
        )
    if kind == "NS":
        return sorted(Decimal(x) for x in raw) == [
            Decimal(repr(v) if isinstance(v, float) else str(v)) for v in value
        ]
    if kind == "B":
        return bool(base64.b64decode(value) == raw)
    if kind == "L":
        return len(raw) == len(value) and all(
            same_value(a, v) for a, v in zip(raw, value, strict=True)
        )
    if kind == "M":
        return raw.keys() == value.keys() and all(same_value(raw[k], value[k]) for k in raw)
    if kind == "SS":
        return bool(sorted(raw) == value)
    if kind == "NULL":
        return value is None
    return bool(raw == value)


@settings(max_examples=300, deadline=None)
@given(attribute=attributes)
def test_conversion_keeps_every_value_exactly_and_is_json_ready(attribute: dict[str, Any]) -> None:
    value = convert_value(attribute)
    assert same_value(attribute, value)
    orjson.dumps(value)  # raises if not JSON-ready (e.g. an int beyond 64 bits)
    assert not (isinstance(value, float) and math.isnan(value))
