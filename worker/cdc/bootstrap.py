"""``worker lake bootstrap``: a new Delta table from a DynamoDB full export, and the
export's time recorded as the table's cut-over point (README, "Bootstrap").

- **Bounded memory.** Data files are read one at a time, inflated as they
  arrive, and appended ``batch_rows`` rows per commit, with the same column
  naming and values as the stream path (``rows.to_rows``).
- **Resumable.** Every batch's commit names its data file and batch in the
  commit's metadata, and a finished data file is written to ``progress``: a
  bootstrap run again after a crash skips what is in the table already and
  appends no row twice.
- **The cut-over** (``{target}_cdc/cutover``): a row when the bootstrap starts
  (``completed_at`` null) and one when it ends. ``lake apply`` refuses a
  table whose bootstrap has not ended, and afterwards drops every change the
  export already holds (``cdc_rules.after_cutover``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from worker.cdc import cdc_rules as rules
from worker.cdc.exports import Export, export_changes, read_export
from worker.cdc.lake import (
    METADATA_SOURCE,
    Lake,
    Options,
    create_target,
    read_cutover,
    record_progress,
    recorded_parts,
)
from worker.cdc.rows import arrow_table, to_rows
from worker.core.errors import LakeError
from worker.core.log import get_logger

if TYPE_CHECKING:
    from deltalake import DeltaTable
    from types_aiobotocore_s3 import S3Client

log = get_logger(__name__)
METADATA_BATCH = "worker.cdc.export_batch"
BATCH_ROWS = 50_000


@dataclass(slots=True)
class BootstrapResult:
    export: Export
    files: int = 0  # data files appended by this run
    items: int = 0  # items appended by this run
    version: int | None = None
    already: bool = False  # the bootstrap had ended before: nothing to do


async def bootstrap(
    s3: S3Client,
    export_uri: str,
    target: str,
    *,
    key_names: list[str],
    storage_options: Options = None,
    batch_rows: int = BATCH_ROWS,
) -> BootstrapResult:
    """Load the export at ``export_uri`` into a new table at ``target``; run again
    after a crash, it carries on where it stopped."""
    export = await read_export(s3, export_uri)
    lake = Lake(target, storage_options)
    result = BootstrapResult(export)
    table = await asyncio.to_thread(lake.load, target)
    cutover = await asyncio.to_thread(read_cutover, lake)
    if cutover is not None and cutover.export_arn == export.arn and cutover.complete:
        result.already, result.version = True, table.version() if table else None
        return result
    if table is not None and (cutover is None or cutover.export_arn != export.arn):
        raise LakeError(
            f"{target} exists: a bootstrap makes a new table (choose another --target,"
            " or keep this one and run lake apply)",
            target=target,
        )
    if cutover is None:
        await asyncio.to_thread(_record_cutover, lake, export, complete=False)
    done = await asyncio.to_thread(recorded_parts, lake, export.arn)
    batches = _committed_batches(table)
    for key, _ in export.data_files:
        if key in done:
            continue
        index = 0
        async for changes in export_changes(s3, export, key, key_names, batch_rows=batch_rows):
            index += 1
            if f"{key}#{index}" in batches:
                continue
            existing = table.schema().to_arrow().names if table is not None else []
            key_columns, rows = to_rows(changes, existing)
            table = await asyncio.to_thread(
                _append, lake, table, key_columns, rows, f"{key}#{index}", export.arn
            )
            result.items += len(rows)
        await asyncio.to_thread(record_progress, lake, export.arn, [key], table)
        result.files += 1
        log.info("lake_bootstrap_file", export=export.arn, file=key, items=result.items)
    if table is None:  # an export of an empty table: the table is made at the first change
        raise LakeError(f"{export.uri} holds no item: nothing to bootstrap", export=export.uri)
    await asyncio.to_thread(_record_cutover, lake, export, complete=True)
    result.version = table.version()
    return result


def _append(
    lake: Lake,
    table: DeltaTable | None,
    key_columns: list[str],
    rows: list[dict[str, Any]],
    batch: str,
    source: str,
) -> DeltaTable:
    """One batch appended in one commit that names it (the first makes the table)."""
    import pyarrow as pa
    from deltalake import CommitProperties, write_deltalake

    rows = [{k: v for k, v in r.items() if k != rules.DELETE_COLUMN} for r in rows]
    if table is None:
        table = create_target(lake, key_columns, rows)
    data = arrow_table(rows, pa.schema(table.schema().to_arrow()))
    commit = CommitProperties(custom_metadata={METADATA_BATCH: batch, METADATA_SOURCE: source})
    write_deltalake(
        lake.target,
        data,
        mode="append",
        schema_mode="merge",
        storage_options=lake.storage_options,
        commit_properties=commit,
    )
    table.update_incremental()
    return table


def _committed_batches(table: DeltaTable | None) -> set[str]:
    """Batches the table's log names (the ones a crash left out of ``progress``)."""
    if table is None:
        return set()
    return {c[METADATA_BATCH] for c in table.history() if METADATA_BATCH in c}


def _record_cutover(lake: Lake, export: Export, *, complete: bool) -> None:
    import pyarrow as pa
    from deltalake import write_deltalake

    now = datetime.now(UTC)
    data = pa.table(
        {
            "export_arn": pa.array([export.arn], pa.string()),
            "export_uri": pa.array([export.uri], pa.string()),
            "export_time": pa.array(
                [datetime.fromtimestamp(export.time_ms / 1000, UTC)], pa.timestamp("ms", tz="UTC")
            ),
            "items": pa.array([export.item_count], pa.int64()),
            "completed_at": pa.array([now if complete else None], pa.timestamp("ms", tz="UTC")),
        }
    )
    write_deltalake(lake.cutover, data, mode="append", storage_options=lake.storage_options)
    log.info("lake_cutover", export=export.arn, complete=complete, files=len(export.data_files))
