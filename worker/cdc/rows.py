"""Change envelopes -> the lake's rows: flattened, named, deduplicated, typed.

- ``to_rows``: one flat row per key (the latest change, ``cdc_rules``), with
  attribute names made column names by ``cdc_rules.column_names`` and the key
  columns checked to be the same for every change;
- ``arrow_table``: rows -> Arrow with one type per column, aligned to the
  target's schema (a column of mixed types is JSON text).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from worker.cdc import cdc_rules as rules
from worker.core.errors import LakeError

if TYPE_CHECKING:
    import pyarrow as pa


def to_rows(
    changes: Iterable[Mapping[str, Any]], existing: Iterable[str] = ()
) -> tuple[list[str], list[dict[str, Any]]]:
    """Envelopes -> one flat row per key (latest change), plus the key column names.
    Attribute names become columns through ``cdc_rules.column_names``."""
    changes = list(changes)
    attributes = {
        name
        for change in changes
        for image in (change["keys"], change["new_image"] or {})
        for name in image
    }
    columns = rules.column_names(attributes, existing)
    flat: list[dict[str, Any]] = []
    key_columns: list[str] | None = None
    for change in changes:
        keys = {columns[k]: v for k, v in change["keys"].items()}
        if key_columns is None:
            key_columns = sorted(keys)
        elif sorted(keys) != key_columns:
            raise LakeError(
                f"change {change['event_id']} has keys {sorted(keys)}, not {key_columns}"
            )
        image = {} if change["is_deleted"] else (change["new_image"] or {})
        row = {columns[k]: v for k, v in image.items()}
        row.update(keys)
        row[rules.SEQUENCE_COLUMN] = rules.padded_sequence(change["sequence_number"])
        row[rules.EVENT_TIME_COLUMN] = change["approx_creation_time_ms"]
        row[rules.DELETE_COLUMN] = bool(change["is_deleted"])
        flat.append(row)
    if key_columns is None:
        return [], []
    return key_columns, [dict(r) for r in rules.latest_per_key(flat, key_columns)]


def arrow_table(rows: list[dict[str, Any]], target_schema: pa.Schema | None) -> pa.Table:
    """Rows -> Arrow with one inferred type per column, aligned to the target's schema."""
    import pyarrow as pa

    names = sorted({name for row in rows for name in row})
    if target_schema is not None:
        names += [n for n in target_schema.names if n not in names]
    arrays, fields = [], []
    for name in names:
        values = [row.get(name) for row in rows]
        wanted = (
            target_schema.field(name).type
            if target_schema is not None and name in target_schema.names
            else None
        )
        array = _column(name, values, wanted)
        arrays.append(array)
        fields.append(pa.field(name, array.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _column(name: str, values: list[Any], wanted: pa.DataType | None) -> pa.Array:
    import pyarrow as pa

    if name == rules.EVENT_TIME_COLUMN:
        return pa.array(values, type=pa.timestamp("ms", tz="UTC"))
    if name == rules.DELETE_COLUMN:
        return pa.array(values, type=pa.bool_())
    present = {type(v) for v in values if v is not None}
    if wanted == pa.string() or (
        wanted is None
        and not present <= {bool}
        and not present <= {int, float}
        and present != {str}
    ):
        return pa.array([_text(v) for v in values], type=pa.string())
    if not present:
        return pa.array(values, type=wanted or pa.string())
    inferred = pa.array(values, type=pa.float64() if present == {int, float} else None)
    if wanted is None or inferred.type == wanted:
        return inferred
    try:
        return inferred.cast(wanted)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise LakeError(
            f"column {name!r} is {wanted} in the table but {inferred.type} here"
        ) from exc


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return orjson.dumps(value).decode()
