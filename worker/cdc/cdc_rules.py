"""The one definition of the CDC apply semantics, shared by the local delta-rs apply
(``worker.cdc.lake``) and the Databricks Auto Loader job
(``databricks/autoloader_cdc.py``), so the two cannot drift.

These are Databricks AUTO CDC / APPLY CHANGES semantics:
- the target holds one row per key, with ``_sequence_number`` and ``_event_time``;
- within a run only the latest change per key counts, by sequence number;
- matched and newer: delete on REMOVE, otherwise update every column;
- not matched and not REMOVE: insert;
- an older or equal sequence number never overwrites.

Sequence numbers are compared numerically. They are stored left-padded with
zeros to ``SEQUENCE_WIDTH`` digits, so a plain string comparison, in any
engine, is the numeric one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

SEQUENCE_WIDTH = 40  # DynamoDB documents sequence numbers of 21 to 40 digits
SEQUENCE_COLUMN = "_sequence_number"
EVENT_TIME_COLUMN = "_event_time"
DELETE_COLUMN = "_is_delete"  # in the source of a MERGE only, never in the target
SOURCE_ALIAS, TARGET_ALIAS = "s", "t"

NEWER = f"{SOURCE_ALIAS}.{SEQUENCE_COLUMN} > {TARGET_ALIAS}.{SEQUENCE_COLUMN}"
DELETE_WHEN = f"{SOURCE_ALIAS}.{DELETE_COLUMN} AND {NEWER}"
UPDATE_WHEN = f"NOT {SOURCE_ALIAS}.{DELETE_COLUMN} AND {NEWER}"
INSERT_WHEN = f"NOT {SOURCE_ALIAS}.{DELETE_COLUMN}"
# The dedupe rule as a window ordering: the first row per key is the one kept.
DEDUPE_ORDER = f"{SEQUENCE_COLUMN} DESC"


def padded_sequence(sequence_number: str | int) -> str:
    text = str(int(sequence_number))
    if len(text) > SEQUENCE_WIDTH:
        raise ValueError(f"sequence number {text} is longer than {SEQUENCE_WIDTH} digits")
    return text.zfill(SEQUENCE_WIDTH)


def merge_predicate(key_columns: Sequence[str]) -> str:
    """Target row = source row when every key column is equal."""
    return " AND ".join(f"{TARGET_ALIAS}.`{k}` = {SOURCE_ALIAS}.`{k}`" for k in key_columns)


def latest_per_key(
    changes: Iterable[Mapping[str, Any]], key_columns: Sequence[str]
) -> list[Mapping[str, Any]]:
    """Keep the change with the highest sequence number for each key (the dedupe rule)."""
    latest: dict[tuple[Any, ...], Mapping[str, Any]] = {}
    for change in changes:
        key = tuple(change[k] for k in key_columns)
        kept = latest.get(key)
        if kept is None or change[SEQUENCE_COLUMN] > kept[SEQUENCE_COLUMN]:
            latest[key] = change
    return list(latest.values())
