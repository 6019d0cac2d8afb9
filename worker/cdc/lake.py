"""``worker lake apply`` and ``worker lake maintain``: a Delta table kept equal to
its DynamoDB source, from the stream parts in S3.

- **Semantics** are ``worker.cdc.cdc_rules``: latest change per key, deletes
  applied, and nothing older than the key's last applied change (its live row or
  its tombstone) ever overwrites.
- **State beside the target.** Two sidecar Delta tables live at
  ``{target}_cdc/``: ``tombstones`` (key columns, ``_sequence_number``,
  ``_event_time``: one row per deleted key) and ``progress`` (``source``,
  ``part``, ``version``, ``applied_at``: one row per applied part). The target
  itself holds only live rows, so any Delta reader gets the right answer alone.
- **Order of commits**, so a crash anywhere is harmless: tombstones first (they
  only ever refuse older changes, so early ones change nothing), then the
  target's MERGE (which also names its parts in the commit's metadata and takes
  an app transaction), then the progress rows. Parts named by a target commit
  but missing from ``progress`` (a crash in between) are found in the history
  and written to ``progress`` by the next apply. The Delta log's cleanup may
  drop that history later; ``progress`` keeps it.
- **Schema evolution.** A new attribute becomes a new column; older rows get
  null. Nested values (lists, maps, sets) are stored as JSON text. A column
  whose values mix incompatible types is stored as JSON text too.
- **Concurrency.** Two applies on one table conflict on the app transaction;
  the loser reloads the table, recomputes what is left and tries again.
  ``maintain`` retries its commits the same way, so it can run beside applies.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from worker.cdc import cdc_rules as rules
from worker.cdc.parts import list_parts, read_parts
from worker.core.config import AwsSettings
from worker.core.errors import LakeError
from worker.core.log import get_logger

if TYPE_CHECKING:
    from collections.abc import Callable

    import pyarrow as pa
    from deltalake import DeltaTable
    from types_aiobotocore_s3 import S3Client

log = get_logger(__name__)

METADATA_PARTS = "worker.cdc.parts"
METADATA_SOURCE = "worker.cdc.source"
STATE_SUFFIX = "_cdc"
Options = dict[str, str] | None
T = TypeVar("T")


@dataclass(slots=True)
class ApplyResult:
    parts: list[str] = field(default_factory=list)
    changes: int = 0
    rows: int = 0  # after the latest-per-key dedupe
    refused: int = 0  # no newer than the key's tombstone
    version: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Lake:
    """A target table and its sidecars."""

    target: str
    storage_options: Options = None

    @property
    def tombstones(self) -> str:
        return f"{self.target.rstrip('/')}{STATE_SUFFIX}/tombstones"

    @property
    def progress(self) -> str:
        return f"{self.target.rstrip('/')}{STATE_SUFFIX}/progress"

    def load(self, uri: str) -> DeltaTable | None:
        from deltalake import DeltaTable

        if not DeltaTable.is_deltatable(uri, storage_options=self.storage_options):
            return None
        return DeltaTable(uri, storage_options=self.storage_options)


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


def app_id(source: str) -> str:
    return f"worker-cdc:{source}"


async def apply_changes(
    s3: S3Client,
    source: str,
    target: str,
    *,
    storage_options: Options = None,
    max_attempts: int = 5,
) -> ApplyResult:
    """Apply every part under ``source`` that ``target`` has not seen yet."""
    from deltalake.exceptions import CommitFailedError

    lake = Lake(target, storage_options)
    result = ApplyResult()
    listed = await list_parts(s3, source)
    if not listed:
        raise LakeError(
            f"no parts under {source}: check --source (parts are "
            "{source}/dt=YYYY-MM-DD/hour=HH/part-*.json.gz or .parquet)",
            source=source,
        )
    cache: dict[str, list[dict[str, Any]]] = {}
    for _ in range(max_attempts):
        table = await asyncio.to_thread(lake.load, target)
        done, unrecorded = await asyncio.to_thread(_applied_parts, lake, table, source)
        new = [key for key in listed if key not in done]
        if not new:
            if unrecorded:
                await asyncio.to_thread(_record_progress, lake, source, sorted(unrecorded), table)
            return result
        cache.update(await read_parts(s3, source, [k for k in new if k not in cache]))
        changes = [c for key in new for c in cache[key]]
        existing = table.schema().to_arrow().names if table is not None else []
        key_columns, rows = to_rows(changes, existing)
        # Tombstones are read after the target: any delete the target holds has
        # its tombstone committed before it.
        tombstones = await asyncio.to_thread(_read_tombstones, lake, key_columns)
        live = [r for r in rows if _survives(r, key_columns, tombstones)]
        try:
            if table is None and key_columns:
                table = await asyncio.to_thread(_create, lake, key_columns, live or rows)
            if table is not None:
                await asyncio.to_thread(
                    _record_tombstones, lake, table, key_columns, live, tombstones
                )
                result.metrics = await asyncio.to_thread(
                    _merge, table, source, new, key_columns, live
                )
        except (CommitFailedError, _TableExists):
            continue  # another apply committed first: reload and see what is left
        await asyncio.to_thread(_record_progress, lake, source, sorted({*new, *unrecorded}), table)
        result.parts, result.changes, result.rows = new, len(changes), len(rows)
        result.refused = len(rows) - len(live)
        result.version = table.version() if table is not None else None
        return result
    raise LakeError(f"gave up after {max_attempts} commit conflicts on {target}")


def _survives(
    row: Mapping[str, Any], keys: list[str], tombstones: dict[tuple[Any, ...], str]
) -> bool:
    tombstone = tombstones.get(tuple(row[k] for k in keys))
    return rules.survives(row[rules.SEQUENCE_COLUMN], tombstone)


def _applied_parts(lake: Lake, table: DeltaTable | None, source: str) -> tuple[set[str], set[str]]:
    """Parts applied to ``table`` from ``source``: those ``progress`` lists, and those
    that target commits still in the log name but ``progress`` does not (yet)."""
    recorded: set[str] = set()
    progress = lake.load(lake.progress)
    if progress is not None:
        rows = progress.to_pyarrow_table(columns=["source", "part"]).to_pylist()
        recorded = {r["part"] for r in rows if r["source"] == source}
    in_log: set[str] = set()
    for commit in table.history() if table is not None else []:
        if commit.get(METADATA_SOURCE) == source and METADATA_PARTS in commit:
            in_log.update(orjson.loads(commit[METADATA_PARTS]))
    return recorded | in_log, in_log - recorded


class _TableExists(Exception):
    pass


def _create_empty(lake: Lake, uri: str, schema: pa.Schema) -> DeltaTable:
    from deltalake import DeltaTable, write_deltalake
    from deltalake.exceptions import DeltaError

    options = lake.storage_options
    try:
        write_deltalake(uri, schema.empty_table(), mode="error", storage_options=options)
    except (DeltaError, FileExistsError) as exc:
        if DeltaTable.is_deltatable(uri, storage_options=options):
            raise _TableExists from exc  # another apply created it first
        raise LakeError(f"cannot create a Delta table at {uri}: {exc}", target=uri) from exc
    return DeltaTable(uri, storage_options=options)


def _bookkeeping(
    rows: list[dict[str, Any]], key_columns: list[str], schema: pa.Schema | None
) -> pa.Table:
    import pyarrow as pa

    columns = [*key_columns, rules.SEQUENCE_COLUMN, rules.EVENT_TIME_COLUMN]
    if schema is not None:  # the target's types, for these columns only
        schema = pa.schema([schema.field(c) for c in columns if c in schema.names])
    return arrow_table([{c: row.get(c) for c in columns} for row in rows], schema)


def _create(lake: Lake, key_columns: list[str], rows: list[dict[str, Any]]) -> DeltaTable:
    """An empty table of the key and bookkeeping columns, typed from the first
    changes; MERGE adds the attribute columns."""
    return _create_empty(lake, lake.target, _bookkeeping(rows, key_columns, None).schema)


def _read_tombstones(lake: Lake, key_columns: list[str]) -> dict[tuple[Any, ...], str]:
    table = lake.load(lake.tombstones)
    if table is None or not key_columns:
        return {}
    rows = table.to_pyarrow_table(columns=[*key_columns, rules.SEQUENCE_COLUMN]).to_pylist()
    return {tuple(r[k] for k in key_columns): r[rules.SEQUENCE_COLUMN] for r in rows}


def _record_tombstones(
    lake: Lake,
    target: DeltaTable,
    key_columns: list[str],
    rows: list[dict[str, Any]],
    tombstones: dict[tuple[Any, ...], str],
) -> None:
    """MERGE this run's deletes into the tombstones, and clear the tombstones of
    keys this run brings back (``cdc_rules.TOMBSTONE_*``)."""
    import pyarrow as pa

    touched = [
        r for r in rows if r[rules.DELETE_COLUMN] or tuple(r[k] for k in key_columns) in tombstones
    ]
    if not touched:
        return
    schema = pa.schema(target.schema().to_arrow())
    data = _bookkeeping(touched, key_columns, schema).append_column(
        rules.DELETE_COLUMN, pa.array([r[rules.DELETE_COLUMN] for r in touched], pa.bool_())
    )
    table = lake.load(lake.tombstones)
    if table is None:
        try:
            table = _create_empty(
                lake, lake.tombstones, data.drop_columns([rules.DELETE_COLUMN]).schema
            )
        except _TableExists:
            table = lake.load(lake.tombstones)
            assert table is not None
    _retry_commits(
        lambda: (
            table.merge(
                data,
                rules.merge_predicate(key_columns),
                source_alias=rules.SOURCE_ALIAS,
                target_alias=rules.TARGET_ALIAS,
            )
            .when_matched_update_all(rules.TOMBSTONE_MOVE_WHEN, except_cols=[rules.DELETE_COLUMN])
            .when_matched_delete(rules.TOMBSTONE_CLEAR_WHEN)
            .when_not_matched_insert_all(
                rules.TOMBSTONE_ADD_WHEN, except_cols=[rules.DELETE_COLUMN]
            )
            .execute()
        ),
        table,
    )


def _merge(
    table: DeltaTable,
    source: str,
    parts: list[str],
    key_columns: list[str],
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    import pyarrow as pa
    from deltalake import CommitProperties, Transaction

    target_schema = pa.schema(table.schema().to_arrow())
    data = arrow_table(rows, target_schema)
    if not rows:  # every change was refused: an empty MERGE still records the parts
        data = data.append_column(rules.DELETE_COLUMN, pa.array([], pa.bool_()))
    version = (table.transaction_version(app_id(source)) or 0) + 1
    commit = CommitProperties(
        custom_metadata={METADATA_PARTS: orjson.dumps(parts).decode(), METADATA_SOURCE: source},
        app_transactions=[Transaction(app_id=app_id(source), version=version)],
    )
    merger = table.merge(
        data,
        rules.merge_predicate(key_columns),
        source_alias=rules.SOURCE_ALIAS,
        target_alias=rules.TARGET_ALIAS,
        merge_schema=True,
        commit_properties=commit,
    )
    metrics: dict[str, Any] = (
        merger.when_matched_delete(rules.DELETE_WHEN)
        .when_matched_update_all(rules.UPDATE_WHEN, except_cols=[rules.DELETE_COLUMN])
        .when_not_matched_insert_all(rules.INSERT_WHEN, except_cols=[rules.DELETE_COLUMN])
        .execute()
    )
    return metrics


def _record_progress(lake: Lake, source: str, parts: list[str], target: DeltaTable | None) -> None:
    """Append the applied parts to ``progress`` (blind appends never conflict)."""
    import pyarrow as pa
    from deltalake import write_deltalake

    now = datetime.now(UTC)
    version = target.version() if target is not None else None
    data = pa.table(
        {
            "source": pa.array([source] * len(parts), pa.string()),
            "part": pa.array(parts, pa.string()),
            "version": pa.array([version] * len(parts), pa.int64()),
            "applied_at": pa.array([now] * len(parts), pa.timestamp("ms", tz="UTC")),
        }
    )
    write_deltalake(lake.progress, data, mode="append", storage_options=lake.storage_options)


def _retry_commits(commit: Callable[[], T], table: DeltaTable, attempts: int = 10) -> T:
    """Run one commit, reloading ``table`` after each conflict with a concurrent writer."""
    from deltalake.exceptions import CommitFailedError

    for attempt in range(attempts):
        try:
            return commit()
        except CommitFailedError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
            table.update_incremental()
    raise AssertionError("unreachable")


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
    tables = {uri: lake.load(uri) for uri in (target, lake.tombstones, lake.progress)}
    if tables[target] is None:
        raise LakeError(f"no Delta table at {target}", target=target)
    tombstones = tables[lake.tombstones]
    if tombstones is not None:
        cutoff = (now or datetime.now(UTC)) - timedelta(hours=tombstone_retention_hours)
        predicate = f"{rules.EVENT_TIME_COLUMN} < '{cutoff:%Y-%m-%dT%H:%M:%S.%fZ}'"
        expired = _retry_commits(lambda: tombstones.delete(predicate), tombstones)
        result.tombstones_expired = int(expired.get("num_deleted_rows", 0))
    for uri, table in tables.items():
        if table is None:
            continue
        result.compacted[uri] = _retry_commits(table.optimize.compact, table)
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


def read_table(target: str, storage_options: Options = None) -> list[dict[str, Any]]:
    """Every row of a Delta table (through delta-rs' own query engine)."""
    import pyarrow as pa
    from deltalake import DeltaTable, QueryBuilder

    table = DeltaTable(target, storage_options=storage_options)
    reader = QueryBuilder().register("t", table).execute("SELECT * FROM t")
    rows: list[dict[str, Any]] = pa.table(reader.read_all()).to_pylist()
    return rows


def storage_options_for(target: str, aws: AwsSettings) -> dict[str, str] | None:
    """delta-rs options for an ``s3://`` target, from the worker's AWS settings.

    The object store needs to be told about a custom endpoint (moto, MinIO) and
    plain HTTP; writes use S3 conditional puts, so no external lock table is
    needed for concurrent writers. Credentials come from the standard chain.
    """
    if not target.startswith("s3://"):
        return None
    options = {"conditional_put": "etag"}
    if aws.s3_endpoint_url:
        options["endpoint_url"] = aws.s3_endpoint_url
        options["allow_http"] = str(aws.s3_endpoint_url.startswith("http://")).lower()
    if aws.region:
        options["region"] = aws.region
    return options
