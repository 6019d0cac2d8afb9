"""A TABLE_EXTRACT module with a streaming hook that yields the wrong shapes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def processOutputData(output_file: Any) -> dict[str, list[dict[str, Any]]]:  # noqa: N802
    return {}


def iterOutputData(data: bytes) -> Iterator[Any]:  # noqa: N802
    if data == b"raise":
        raise RuntimeError("the plugin broke")
    yield ("good", [{"id": "a"}])
    yield data.decode()  # a string, not (name, rows)
