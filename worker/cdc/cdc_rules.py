"""The one definition of the CDC apply semantics, shared by the local delta-rs apply
(``worker.cdc.lake``) and the Databricks Auto Loader job
(``databricks/autoloader_cdc.py``), so the two cannot drift.

These are Databricks AUTO CDC / APPLY CHANGES semantics, tombstones included:
- the target holds one live row per key, with ``_sequence_number`` and ``_event_time``;
- every applied delete leaves a **tombstone** (key, sequence number, event time)
  in a sidecar table; tombstones expire after a retention;
- within a run only the latest change per key counts, by sequence number;
- a change applies only when its sequence number is greater than the key's last
  applied one: the live row's, or the tombstone's (``decide`` below);
- matched and newer: delete on REMOVE, otherwise update every column;
- not matched, newer than any tombstone, and not REMOVE: insert;
- a newer insert or update clears the key's tombstone.

Sequence numbers are compared numerically. They are stored left-padded with
zeros to ``SEQUENCE_WIDTH`` digits, so a plain string comparison, in any
engine, is the numeric one.

Attribute names become column names through ``column_names``: lossless, never
one of our own ``_``-prefixed columns, and unique without regard to case
(Spark and DataFusion resolve columns case-insensitively).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

SEQUENCE_WIDTH = 40  # DynamoDB documents sequence numbers of 21 to 40 digits
SEQUENCE_COLUMN = "_sequence_number"
EVENT_TIME_COLUMN = "_event_time"
DELETE_COLUMN = "_is_delete"  # in the source of a MERGE only, never in the target
SOURCE_ALIAS, TARGET_ALIAS, TOMBSTONE_ALIAS = "s", "t", "d"

NEWER = f"{SOURCE_ALIAS}.{SEQUENCE_COLUMN} > {TARGET_ALIAS}.{SEQUENCE_COLUMN}"
# The target's MERGE. Its source has already lost the changes tombstones refuse.
DELETE_WHEN = f"{SOURCE_ALIAS}.{DELETE_COLUMN} AND {NEWER}"
UPDATE_WHEN = f"NOT {SOURCE_ALIAS}.{DELETE_COLUMN} AND {NEWER}"
INSERT_WHEN = f"NOT {SOURCE_ALIAS}.{DELETE_COLUMN}"
# The tombstones' MERGE (same aliases: s = the changes, t = the tombstone table):
# a newer delete moves the tombstone on, a newer insert or update clears it.
TOMBSTONE_MOVE_WHEN = DELETE_WHEN
TOMBSTONE_CLEAR_WHEN = UPDATE_WHEN
TOMBSTONE_ADD_WHEN = f"{SOURCE_ALIAS}.{DELETE_COLUMN}"
# Which changes survive a left join of the changes (s) with the tombstones (d).
NOT_TOMBSTONED = (
    f"{TOMBSTONE_ALIAS}.{SEQUENCE_COLUMN} IS NULL "
    f"OR {SOURCE_ALIAS}.{SEQUENCE_COLUMN} > {TOMBSTONE_ALIAS}.{SEQUENCE_COLUMN}"
)
TOMBSTONE_RETENTION_HOURS = 7 * 24  # LAKE_TOMBSTONE_RETENTION_HOURS' default
# The seam after a bootstrap: a change the export may not hold (README, "Bootstrap").
AFTER_CUTOVER = f"{SOURCE_ALIAS}.{EVENT_TIME_COLUMN} >= date_trunc('second', {{cutover}})"

Action = Literal["insert", "update", "delete"]


def padded_sequence(sequence_number: str | int) -> str:
    """The sequence number as ``SEQUENCE_WIDTH`` digits; ValueError unless it is
    a natural number of at most that many digits."""
    text = str(sequence_number)
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"sequence number {text[:60]!r} is not a natural number")
    text = text.lstrip("0") or "0"
    if len(text) > SEQUENCE_WIDTH:
        raise ValueError(f"sequence number {text} is longer than {SEQUENCE_WIDTH} digits")
    return text.zfill(SEQUENCE_WIDTH)


def survives(sequence: str, tombstone: str | None) -> bool:
    """Whether a change is newer than its key's tombstone (``NOT_TOMBSTONED``)."""
    return tombstone is None or sequence > tombstone


def decide(
    sequence: str, is_delete: bool, live: str | None, tombstone: str | None
) -> Action | None:
    """What one change (the latest of its key in the run) does, given the key's
    live row's and tombstone's sequence numbers (padded; None when absent).

    This is the rule the MERGE conditions above express; the tests hold the SQL
    to it."""
    if not survives(sequence, tombstone):
        return None  # older than (or the same as) an applied delete
    if live is None:
        return None if is_delete else "insert"
    if sequence <= live:
        return None
    return "delete" if is_delete else "update"


def after_cutover(event_time_ms: int, cutover_ms: int) -> bool:
    """Whether a stream change is applied on top of a table bootstrapped from an
    export consistent at ``cutover_ms``: every change recorded in the export's
    second or later (``AFTER_CUTOVER``).

    A stream record's time is its second (``ApproximateCreationDateTime``,
    rounded down); the export's is to the millisecond. A change recorded before
    the export's second happened before the export, which holds it or a later
    change: dropped. One recorded in that second may be on either side: it is
    applied, and that is exact, because every later change of its key is in
    the stream too (recorded in that second or after) and wins by sequence
    number; if none follows, the change is the last before the export and
    rewrites what the export holds.
    """
    return event_time_ms >= cutover_ms - cutover_ms % 1000


def tombstone_expired(cutoff: datetime) -> str:
    """The tombstones ``lake maintain`` deletes: deletes older than ``cutoff``."""
    return f"{EVENT_TIME_COLUMN} < '{cutoff.astimezone(UTC):%Y-%m-%dT%H:%M:%S.%fZ}'"


def merge_predicate(key_columns: Sequence[str], target: str = TARGET_ALIAS) -> str:
    """Target (or tombstone) row = source row when every key column is equal."""
    return " AND ".join(f"{target}.`{k}` = {SOURCE_ALIAS}.`{k}`" for k in key_columns)


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


_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)*")
_NOT_ALNUM = re.compile(r"[^A-Za-z0-9]+")


def column_names(attributes: Iterable[str], existing: Iterable[str] = ()) -> dict[str, str]:
    """Attribute name -> column name, given the target's ``existing`` columns.

    - A *plain* name (a letter, then letters and digits, single ``_`` between
      them) is its own column, unless another name that differs only in case
      took that column first (in the target, or earlier in sorted order here).
    - Every other name, and the loser of such a case clash, becomes
      ``{slug}__{hash}``: its letters and digits, then 10 hex digits of the
      SHA-256 of the exact name. Plain names never hold ``__`` and never start
      with ``_``, so a hashed name never equals a plain one, and neither is ever
      one of our ``_``-prefixed columns.

    The mapping is stable across runs: an attribute finds its column again in
    ``existing`` (plain) or recomputes the same hash.
    """
    taken = set(existing)
    folded = {column.casefold() for column in taken}
    mapping: dict[str, str] = {}
    for attribute in sorted(set(attributes)):
        if _PLAIN.fullmatch(attribute) and (
            attribute in taken or attribute.casefold() not in folded
        ):
            column = attribute
        else:
            slug = _NOT_ALNUM.sub("_", attribute).strip("_")[:48] or "attr"
            column = f"{slug}__{hashlib.sha256(attribute.encode()).hexdigest()[:10]}"
        mapping[attribute] = column
        taken.add(column)
        folded.add(column.casefold())
    return mapping
