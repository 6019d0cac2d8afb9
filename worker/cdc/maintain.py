"""The lake's upkeep: ``worker lake maintain`` (compaction, vacuum, tombstone
expiry and log clean-up on the target and its sidecars, safe beside a running
apply) and ``worker lake repair`` (lost sidecars rebuilt from what the
target's history proves, and nothing else)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from worker.cdc import cdc_rules as rules
from worker.cdc.lake import (
    METADATA_PARTS,
    METADATA_SOURCE,
    Lake,
    Options,
    bookkeeping,
    create_empty,
    progress_schema,
    record_progress,
    retry_commits,
)
from worker.core.errors import LakeError
from worker.core.log import get_logger

log = get_logger(__name__)


@dataclass(slots=True)
class MaintainResult:
    compacted: dict[str, Any] = field(default_factory=dict)  # table -> optimize metrics
    vacuumed: int = 0  # files deleted
    tombstones_expired: int = 0


def maintain(
    target: str,
    *,
    retention_hours: int,
    tombstone_retention_hours: int,
    storage_options: Options = None,
    now: datetime | None = None,
) -> MaintainResult:
    """Compact small files, vacuum files unreferenced for ``retention_hours``,
    expire tombstones older than ``tombstone_retention_hours`` (by the delete's
    event time), then checkpoint and clean up the log, on the target and both
    sidecars. Each commit is retried on a conflict with a concurrent apply."""
    lake = Lake(target, storage_options)
    result = MaintainResult()
    tables = {uri: lake.load(uri) for uri in (target, *lake.sidecars)}
    if tables[target] is None:
        raise LakeError(f"no Delta table at {target}", target=target)
    tombstones = tables[lake.tombstones]
    if tombstones is not None:
        cutoff = (now or datetime.now(UTC)) - timedelta(hours=tombstone_retention_hours)
        predicate = rules.tombstone_expired(cutoff)
        expired = retry_commits(lambda: tombstones.delete(predicate), tombstones)
        result.tombstones_expired = int(expired.get("num_deleted_rows", 0))
    for uri, table in tables.items():
        if table is None:
            continue
        result.compacted[uri] = retry_commits(table.optimize.compact, table)
        result.vacuumed += len(
            table.vacuum(retention_hours, dry_run=False, enforce_retention_duration=False)
        )
        table.create_checkpoint()
        table.cleanup_metadata()
    log.info(
        "lake_maintained",
        target=target,
        vacuumed=result.vacuumed,
        tombstones_expired=result.tombstones_expired,
        files_removed={k: v.get("numFilesRemoved") for k, v in result.compacted.items()},
    )
    return result


_KEY_IN_PREDICATE = re.compile(  # delta-rs logs "t.id = s.id" for merge_predicate's "t.`id` ..."
    rf"{rules.TARGET_ALIAS}\.`?(\w+)`? = {rules.SOURCE_ALIAS}\."
)


def repair(target: str, *, storage_options: Options = None) -> list[str]:
    """Rebuild a target's missing sidecars where its history proves them; one line
    per sidecar saying what was done, or why nothing could be."""
    import pyarrow as pa

    lake = Lake(target, storage_options)
    table = lake.load(target)
    if table is None:
        raise LakeError(f"no Delta table at {target}", target=target)
    history = table.history()
    oldest = min(int(c.get("version", 0)) for c in history)
    lines = []
    if lake.load(lake.progress) is not None:
        lines.append(f"progress: present at {lake.progress}, left as it is")
    else:
        by_source: dict[str, list[tuple[str, int]]] = {}
        for commit in history:
            if METADATA_PARTS in commit and METADATA_SOURCE in commit:
                parts = orjson.loads(commit[METADATA_PARTS])
                by_source.setdefault(commit[METADATA_SOURCE], []).extend(
                    (part, int(commit["version"])) for part in parts
                )
        for source, parts in by_source.items():
            record_progress(lake, source, sorted(p for p, _ in parts), table)
        if not by_source:
            create_empty(lake, lake.progress, progress_schema())
        lines.append(
            f"progress: rebuilt from the log, {sum(map(len, by_source.values()))} parts of "
            f"{len(by_source)} sources"
            + (
                f"; versions before {oldest} are no longer in the log, so parts applied then "
                "are read again by the next apply, and lose to newer changes by sequence number"
                if oldest > 0
                else ""
            )
        )
    if lake.load(lake.tombstones) is not None:
        lines.append(f"tombstones: present at {lake.tombstones}, left as it is")
        return lines
    deleting = [int(c["version"]) for c in history if _deleted_rows(c)]
    keys = _key_columns(history)
    if oldest > 0 or deleting or not keys:
        why = (
            f"versions {deleting[:5]} deleted rows"
            if deleting
            else f"the log starts at version {oldest}"
            if oldest > 0
            else "the log names no key columns"
        )
        raise LakeError(
            f"tombstones: cannot be rebuilt ({why}), and without them an older change could "
            f"bring a deleted row back. Restore {lake.tombstones} from a backup, or bootstrap "
            "a new table from a fresh export",
            target=target,
        )
    schema = bookkeeping([], keys, pa.schema(table.schema().to_arrow())).schema
    create_empty(lake, lake.tombstones, schema)
    lines.append("tombstones: the log shows no delete since version 0: made empty")
    return lines


def _deleted_rows(commit: dict[str, Any]) -> bool:
    metrics = commit.get("operationMetrics") or {}
    deleted = metrics.get("num_target_rows_deleted") or metrics.get("num_deleted_rows") or 0
    return commit.get("operation") == "DELETE" or int(deleted) > 0


def _key_columns(history: list[dict[str, Any]]) -> list[str]:
    """The key columns the target's MERGEs matched on (``cdc_rules.merge_predicate``)."""
    for commit in history:
        parameters = commit.get("operationParameters") or {}
        predicate = str(parameters.get("mergePredicate") or parameters.get("predicate") or "")
        keys = _KEY_IN_PREDICATE.findall(predicate)
        if keys:
            return sorted(keys)
    return []
