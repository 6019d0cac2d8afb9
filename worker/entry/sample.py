"""Realistic reference ``OutputFile`` data for demos and benchmarks (``worker sample``).

Rows carry about ten columns of mixed types, with the corner cases a loader
must survive: NaN and ±Inf, missing fields, short rows, unicode, int64
extremes and tiny floats. The output is deterministic for a given seed.
"""

from __future__ import annotations

import math
import random

from worker.loader.extract.outputfile_pb2 import OutputFile, Value

COLUMNS = [
    "id", "name", "city", "amount", "quantity", "score", "status", "created_at_ms", "ratio", "note",
]  # fmt: skip
_NAMES = ["Ann", "Bob", "Zoë", "José", "Łukasz", "Søren", "李雷", "Ава", "O'Brien", "Nnamdi"]
_CITIES = ["Lisbon", "Kraków", "São Paulo", "Zürich", "東京", "Reykjavík", "Cairo", "Lima"]
_STATUS = ["new", "paid", "shipped", "returned", ""]
_ODD_FLOATS = [math.nan, math.inf, -math.inf, 1e-300, 0.1]
_ODD_INTS = [2**63 - 1, -(2**63)]


def sample_file(
    *, rows: int, tables: int, seed: int = 1, names: list[str] | None = None
) -> OutputFile:
    """An OutputFile of ``rows`` rows spread evenly over ``tables`` tables.

    Tables are called ``names`` (default ``table_0``, ``table_1``...); ids run
    from 1 within each table, so the row count of a table is its item count.
    """
    names = names or [f"table_{i}" for i in range(tables)]
    rng = random.Random(seed)
    file_id = f"sample-{seed}"
    message = OutputFile(file_id=file_id, source_uri=f"sample://{seed}", created_at_ms=0)
    per_table = [rows // tables + (1 if i < rows % tables else 0) for i in range(tables)]
    for index, count in enumerate(per_table):
        table = message.tables.add(name=names[index % len(names)], columns=COLUMNS)
        for row_number in range(count):
            table.rows.add(values=_row(rng, row_number))
    return message


def _row(rng: random.Random, number: int) -> list[Value]:
    odd = rng.random() < 0.01
    values = [
        Value(int_value=number + 1),
        Value(string_value=rng.choice(_NAMES)),
        Value(string_value=rng.choice(_CITIES)),
        Value(float_value=round(rng.uniform(0, 10_000), 2)),
        Value(int_value=rng.choice(_ODD_INTS) if odd else rng.randint(1, 500)),
        Value(float_value=rng.choice(_ODD_FLOATS) if odd else rng.random()),
        Value(string_value=rng.choice(_STATUS)),
        Value(int_value=1_700_000_000_000 + rng.randint(0, 10**10)),
        Value() if rng.random() < 0.05 else Value(float_value=rng.random() / 3),  # missing
        Value(string_value="x" * rng.randint(0, 40)),
    ]
    if rng.random() < 0.03:  # a short row: the trailing fields are absent
        del values[rng.randint(5, 9) :]
    return values
