"""``worker load``: the pipeline on named objects or files, with a progress line and a table."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from worker.core.aws import Clients
from worker.core.config import Settings
from worker.entry.runtime import settle_memory
from worker.loader.messages import ObjectRef
from worker.loader.pipeline import Loader, ObjectSummary

if TYPE_CHECKING:
    from worker.cdc.lake import SourceFormat


def parse_target(target: str) -> ObjectRef | Path:
    if target.startswith("s3://"):
        bucket, _, key = target[5:].partition("/")
        if not bucket or not key:
            raise ValueError(f"{target!r} is not s3://BUCKET/KEY")
        return ObjectRef(bucket, key)
    return Path(target)


async def load_targets(settings: Settings, targets: list[str]) -> int:
    try:
        parsed = [parse_target(t) for t in targets]
    except ValueError as exc:
        print(f"worker load: error: {exc}", file=sys.stderr)
        return 2
    async with Clients.from_settings(settings) as clients:
        loader = Loader(settings, clients)
        settle_memory()
        progress = asyncio.create_task(_show_progress(loader)) if sys.stderr.isatty() else None
        summaries = []
        try:
            for target in parsed:
                if isinstance(target, Path):
                    summaries.append(await loader.load_file(target))
                else:
                    summaries.append(await loader.load(target))
        finally:
            if progress is not None:
                progress.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await progress
                _draw_progress(loader, final=True)  # the last frame shows the final counts
    print(format_summaries(summaries))
    return 0 if all(s.ok for s in summaries) else 1


async def _show_progress(loader: Loader) -> None:
    while True:
        _draw_progress(loader, final=False)
        await asyncio.sleep(0.25)


def _draw_progress(loader: Loader, *, final: bool) -> None:
    """One progress line on the terminal, redrawn in place; log lines wipe it first."""
    counts = "  ".join(f"{t}: {n:,}" for t, n in sorted(loader.writer.progress.items()))
    end = "\n" if final else ""
    print(f"\r\x1b[Kwritten  {counts or 'nothing yet'}", end=end, file=sys.stderr, flush=True)


def format_summaries(summaries: list[ObjectSummary]) -> str:
    """A plain-text table: one line per table of every object, then a status per object."""
    header = ("object", "table", "rows", "written", "skipped", "dupes", "retries", "ms")
    lines: list[tuple[str, ...]] = [header]
    for summary in summaries:
        for t in summary.tables:
            lines.append(
                (summary.uri, t.table, str(t.rows), str(t.written), str(t.skipped),
                 str(t.conversion.duplicates), str(t.write.retries), str(t.write.ms))
            )  # fmt: skip
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in lines
    ]
    if len(lines) == 1:
        text = []  # no table got as far as being read: the status lines say why
    for summary in summaries:
        status = (
            "ok" if summary.error is None else f"FAILED {summary.error.reason}: {summary.error}"
        )
        text.append(f"{summary.uri}: {status} ({summary.rows_written:,} rows in {summary.ms} ms)")
    return "\n".join(text)


async def lake_apply(
    settings: Settings,
    source: str,
    target: str,
    source_format: SourceFormat = "parts",
    *,
    metrics: bool = False,
) -> int:
    """``worker lake apply``: one run, then a one-line report; with ``metrics`` (the
    scheduled task), its outcome as a log line and EMF metrics (``Service=lake``)
    that the stack's alarms watch."""
    from worker.cdc.lake import apply_changes, storage_options_for
    from worker.core.errors import WorkerError
    from worker.core.log import emit_metrics, get_logger

    log = get_logger("worker.lake")
    try:
        async with Clients.from_settings(settings) as clients:
            result = await apply_changes(
                clients.s3,
                source,
                target,
                storage_options=storage_options_for(target, settings.aws),
                source_format=source_format,
            )
    except Exception as exc:
        if metrics:  # counted, then raised as it was: one line on stderr still
            found = exc.as_log() if isinstance(exc, WorkerError) else {"error": type(exc).__name__}
            log.error("lake_apply_failed", source=source, target=target, **found)
            emit_metrics({"Service": "lake"}, ApplyFailures=1, PartsApplied=0)
        raise
    if metrics:
        log.info("lake_applied", source=source, target=target, parts=len(result.parts),
                 changes=result.changes, version=result.version)  # fmt: skip
        emit_metrics({"Service": "lake"}, ApplyFailures=0, PartsApplied=len(result.parts))
    if not result.parts:
        print(f"{target}: up to date, every part under {source} is applied")
        return 0
    m = result.metrics
    print(
        f"{target}: applied {len(result.parts)} parts, {result.changes} changes "
        f"({result.rows} keys): {m.get('num_target_rows_inserted', 0)} inserted, "
        f"{m.get('num_target_rows_updated', 0)} updated, "
        f"{m.get('num_target_rows_deleted', 0)} deleted, "
        f"{result.refused} refused by tombstones, {result.before_cutover} held by the "
        f"bootstrap's export; version {result.version}"
    )
    return 0


async def lake_bootstrap(
    settings: Settings, export_uri: str, target: str, keys: list[str] | None
) -> int:
    """``worker lake bootstrap``: one export into a new table, then a one-line report."""
    from worker.cdc.bootstrap import bootstrap
    from worker.cdc.exports import read_export
    from worker.cdc.lake import storage_options_for

    async with Clients.from_settings(settings) as clients:
        if not keys:
            export = await read_export(clients.s3, export_uri)
            keys = await _key_names(clients, export.table_arn)
        result = await bootstrap(
            clients.s3,
            export_uri,
            target,
            key_names=keys,
            storage_options=storage_options_for(target, settings.aws),
        )
    export = result.export
    if result.already:
        print(f"{target}: already bootstrapped from {export.arn}")
        return 0
    print(
        f"{target}: bootstrapped from {export.arn} ({result.items:,} items from "
        f"{result.files} data files this run, {export.item_count:,} in the export); "
        f"cut-over {export.time_ms} ms; version {result.version}"
    )
    return 0


async def _key_names(clients: Clients, table_arn: str) -> list[str]:
    from botocore.exceptions import ClientError

    from worker.core.aws import error_code
    from worker.core.errors import LakeError

    name = table_arn.partition(":table/")[2].partition("/")[0]
    try:
        described = await clients.dynamodb.describe_table(TableName=name)
    except ClientError as exc:
        raise LakeError(
            f"cannot read the key of {name!r} ({error_code(exc)}): give --keys", table=name
        ) from None
    return [k["AttributeName"] for k in described["Table"]["KeySchema"]]


def lake_repair(settings: Settings, target: str) -> int:
    """``worker lake repair``: what it rebuilt, and what it could not prove."""
    from worker.cdc.lake import storage_options_for
    from worker.cdc.maintain import repair

    for line in repair(target, storage_options=storage_options_for(target, settings.aws)):
        print(line)
    return 0


def lake_maintain(settings: Settings, target: str, retention_hours: int) -> int:
    """``worker lake maintain``: one pass, then a one-line report."""
    from worker.cdc.lake import storage_options_for
    from worker.cdc.maintain import maintain

    result = maintain(
        target,
        retention_hours=retention_hours,
        tombstone_retention_hours=settings.lake_tombstone_retention_hours,
        storage_options=storage_options_for(target, settings.aws),
    )
    removed = sum(m.get("numFilesRemoved", 0) for m in result.compacted.values())
    added = sum(m.get("numFilesAdded", 0) for m in result.compacted.values())
    print(
        f"{target}: compacted {removed} files into {added}, vacuumed {result.vacuumed}, "
        f"expired {result.tombstones_expired} tombstones"
    )
    return 0


async def lake_quarantine(settings: Settings, source: str, part: str) -> int:
    """``worker lake quarantine``: move one part aside."""
    from worker.cdc.parts import quarantine_part

    async with Clients.from_settings(settings) as clients:
        moved, already = await quarantine_part(clients.s3, source, part)
    if already:
        print(f"{part}: already quarantined at {moved}")
        return 0
    print(f"{part}: moved to {moved}; later applies go on without it")
    return 0
