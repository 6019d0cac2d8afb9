"""``worker lake apply``: a Delta table kept equal to its DynamoDB source, from the
stream parts in S3 (``lake bootstrap`` starts it from an export, ``lake
maintain`` keeps it small, ``lake repair`` rebuilds what state it can prove).

- **Semantics** are ``worker.cdc.cdc_rules``: latest change per key, deletes
  applied, and nothing older than the key's last applied change (its live row or
  its tombstone) ever overwrites.
- **State beside the target.** Sidecar Delta tables live at ``{target}_cdc/``:
  ``tombstones`` (key columns, ``_sequence_number``, ``_event_time``: one row
  per deleted key), ``progress`` (``source``, ``part``, ``version``,
  ``applied_at``: one row per applied part) and, after a bootstrap,
  ``cutover`` (the export and its time). The target itself holds only live
  rows, so any Delta reader gets the right answer alone. Both sidecars are
  made before the target, so a target without them is state that was lost:
  apply refuses it with one line, and ``lake repair`` says what it can prove.
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
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import orjson

from worker.cdc import cdc_rules as rules
from worker.cdc.exports import list_incremental, read_incremental
from worker.cdc.parts import list_parts, read_parts
from worker.cdc.rows import arrow_table, to_rows
from worker.core.backoff import Backoff
from worker.core.config import AwsSettings
from worker.core.errors import LakeError, first_line
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
SourceFormat = Literal["parts", "incremental-export"]
INCREMENTAL_PREFIX = "incremental-export:"  # the progress source of incremental exports
COMMIT_BACKOFF = Backoff(base_s=0.05, cap_s=2.0, attempts=10)  # a concurrent writer's commit


@dataclass(slots=True)
class ApplyResult:
    parts: list[str] = field(default_factory=list)
    changes: int = 0
    rows: int = 0  # after the latest-per-key dedupe
    refused: int = 0  # no newer than the key's tombstone
    before_cutover: int = 0  # changes the bootstrap's export already holds
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

    @property
    def cutover(self) -> str:
        return f"{self.target.rstrip('/')}{STATE_SUFFIX}/cutover"

    @property
    def sidecars(self) -> tuple[str, str, str]:
        return self.tombstones, self.progress, self.cutover

    def load(self, uri: str) -> DeltaTable | None:
        """The Delta table at ``uri``, None when there is none; a LakeError in one
        line when one is there but cannot be opened."""
        from deltalake import DeltaTable
        from deltalake.exceptions import DeltaError

        try:
            if not DeltaTable.is_deltatable(uri, storage_options=self.storage_options):
                return None
            return DeltaTable(uri, storage_options=self.storage_options)
        except (DeltaError, OSError) as exc:
            raise LakeError(f"{uri} cannot be opened: {first_line(exc)}", target=uri) from None

    def check_state(self, table: DeltaTable | None) -> None:
        """A target's sidecars are there and open (they are made before it)."""
        if table is None:
            return
        for uri, what in ((self.progress, "progress"), (self.tombstones, "tombstones")):
            if self.load(uri) is None:
                raise LakeError(
                    f"{self.target} has no {what} table at {uri}: its state was lost, and "
                    f"applying now could re-apply or resurrect rows. Run: worker lake repair "
                    f"--target {self.target}",
                    target=self.target,
                )
        table.schema()  # a target whose log does not read fails here, in one line


@dataclass(frozen=True, slots=True)
class Cutover:
    """The export a table was bootstrapped from (``cutover`` sidecar)."""

    export_arn: str
    export_time_ms: int
    complete: bool


def read_cutover(lake: Lake) -> Cutover | None:
    """The table's bootstrap, when it has one: the latest row of ``cutover``."""
    table = lake.load(lake.cutover)
    if table is None:
        return None
    rows = table.to_pyarrow_table().to_pylist()
    if not rows:
        return None
    done = [r for r in rows if r["completed_at"] is not None]
    last = (done or rows)[-1]
    return Cutover(
        last["export_arn"], int(last["export_time"].timestamp() * 1000), complete=bool(done)
    )


def app_id(source: str) -> str:
    return f"worker-cdc:{source}"


async def apply_changes(
    s3: S3Client,
    source: str,
    target: str,
    *,
    storage_options: Options = None,
    max_attempts: int = 5,
    source_format: SourceFormat = "parts",
) -> ApplyResult:
    """Apply every part (or incremental export) under ``source`` that ``target``
    has not seen yet."""
    from deltalake.exceptions import CommitFailedError

    lake = Lake(target, storage_options)
    result = ApplyResult()
    cutover = await asyncio.to_thread(_finished_bootstrap, lake)
    incremental = source_format == "incremental-export"
    listed = await (list_incremental(s3, source) if incremental else list_parts(s3, source))
    if not listed:
        raise LakeError(
            f"no incremental exports under {source}: check --source (exports are "
            "{source}/AWSDynamoDB/EXPORT_ID/manifest-summary.json)"
            if incremental
            else f"no parts under {source}: check --source (parts are "
            "{source}/dt=YYYY-MM-DD/hour=HH/part-*.json.gz or .parquet)",
            source=source,
        )
    origin, source = source, f"{INCREMENTAL_PREFIX}{source}" if incremental else source
    cache: dict[str, list[dict[str, Any]]] = {}
    for attempt in range(1, max_attempts + 1):
        if attempt > 1:  # another apply committed first: wait, reload, see what is left
            await asyncio.sleep(COMMIT_BACKOFF.delay(attempt - 1))
        table = await asyncio.to_thread(lake.load, target)
        await asyncio.to_thread(lake.check_state, table)
        progress = await asyncio.to_thread(progress_rows, lake)  # read once per attempt
        _one_ordering(lake, source, {row["source"] for row in progress})
        recorded = {row["part"] for row in progress if row["source"] == source}
        done, unrecorded = await asyncio.to_thread(_applied_parts, table, source, recorded)
        new = [key for key in listed if key not in done]
        if not new:
            if unrecorded:
                await asyncio.to_thread(record_progress, lake, source, sorted(unrecorded), table)
            return result
        unread = [k for k in new if k not in cache]
        cache.update(
            await (read_incremental(s3, unread) if incremental else read_parts(s3, origin, unread))
        )
        changes = [c for key in new for c in cache[key]]
        kept = _after_cutover(changes, cutover)
        result.before_cutover, changes = len(changes) - len(kept), kept
        existing = table.schema().to_arrow().names if table is not None else []
        key_columns, rows = to_rows(changes, existing)
        # Tombstones are read after the target: any delete the target holds has
        # its tombstone committed before it.
        tombstones = await asyncio.to_thread(_read_tombstones, lake, key_columns)
        live = [r for r in rows if _survives(r, key_columns, tombstones)]
        try:
            if table is None and key_columns:
                table = await asyncio.to_thread(create_target, lake, key_columns, live or rows)
            if table is not None and key_columns:  # none: the export held every change
                await asyncio.to_thread(
                    _record_tombstones, lake, table, key_columns, live, tombstones
                )
                result.metrics = await asyncio.to_thread(
                    _merge, table, source, new, key_columns, live
                )
        except (CommitFailedError, _TableExists):
            continue  # another apply committed first: reload and see what is left
        await asyncio.to_thread(record_progress, lake, source, sorted({*new, *unrecorded}), table)
        result.parts, result.changes, result.rows = new, len(changes), len(rows)
        result.refused = len(rows) - len(live)
        result.version = table.version() if table is not None else None
        return result
    raise LakeError(f"gave up after {max_attempts} commit conflicts on {target}")


def _one_ordering(lake: Lake, source: str, sources: set[str]) -> None:
    """Stream parts order changes by sequence number, incremental exports by write
    time: the two cannot be compared, so one table takes one of them (``sources``:
    those ``progress`` lists)."""
    kind = source.startswith(INCREMENTAL_PREFIX)
    for other in sorted(sources):
        if not other.startswith("arn:") and other.startswith(INCREMENTAL_PREFIX) != kind:
            raise LakeError(
                f"{lake.target} is kept from {other.removeprefix(INCREMENTAL_PREFIX)} "
                f"({'incremental exports' if not kind else 'stream parts'}); "
                f"{'stream parts' if not kind else 'incremental exports'} cannot be mixed in: "
                "sequence numbers and write times do not order each other",
                target=lake.target,
            )


def _finished_bootstrap(lake: Lake) -> Cutover | None:
    """The table's bootstrap; a LakeError when one started and has not ended."""
    cutover = read_cutover(lake)
    if cutover is not None and not cutover.complete:
        raise LakeError(
            f"{lake.target}: the bootstrap from {cutover.export_arn} has not finished; run "
            "worker lake bootstrap again (it carries on where it stopped)",
            target=lake.target,
        )
    return cutover


def _after_cutover(changes: list[dict[str, Any]], cutover: Cutover | None) -> list[dict[str, Any]]:
    """The changes the bootstrap's export may not hold (``cdc_rules.after_cutover``)."""
    if cutover is None:
        return changes
    time_ms = cutover.export_time_ms
    return [c for c in changes if rules.after_cutover(c["approx_creation_time_ms"], time_ms)]


def _survives(
    row: Mapping[str, Any], keys: list[str], tombstones: dict[tuple[Any, ...], str]
) -> bool:
    tombstone = tombstones.get(tuple(row[k] for k in keys))
    return rules.survives(row[rules.SEQUENCE_COLUMN], tombstone)


def _applied_parts(
    table: DeltaTable | None, source: str, recorded: set[str]
) -> tuple[set[str], set[str]]:
    """Parts applied to ``table`` from ``source``: those ``progress`` lists
    (``recorded``), and those that target commits still in the log name but
    ``progress`` does not (yet)."""
    in_log: set[str] = set()
    for commit in table.history() if table is not None else []:
        if commit.get(METADATA_SOURCE) == source and METADATA_PARTS in commit:
            in_log.update(orjson.loads(commit[METADATA_PARTS]))
    return recorded | in_log, in_log - recorded


def progress_rows(lake: Lake) -> list[dict[str, str]]:
    """``progress``'s (source, part) rows; none when it is not there."""
    progress = lake.load(lake.progress)
    if progress is None:
        return []
    rows: list[dict[str, str]] = progress.to_pyarrow_table(columns=["source", "part"]).to_pylist()
    return rows


def recorded_parts(lake: Lake, source: str) -> set[str]:
    """The parts (or export files) ``progress`` lists for ``source``."""
    return {row["part"] for row in progress_rows(lake) if row["source"] == source}


class _TableExists(Exception):
    pass


def create_empty(lake: Lake, uri: str, schema: pa.Schema) -> DeltaTable:
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


def bookkeeping(
    rows: list[dict[str, Any]], key_columns: list[str], schema: pa.Schema | None
) -> pa.Table:
    import pyarrow as pa

    columns = [*key_columns, rules.SEQUENCE_COLUMN, rules.EVENT_TIME_COLUMN]
    if schema is not None:  # the target's types, for these columns only
        schema = pa.schema([schema.field(c) for c in columns if c in schema.names])
    return arrow_table([{c: row.get(c) for c in columns} for row in rows], schema)


def create_target(lake: Lake, key_columns: list[str], rows: list[dict[str, Any]]) -> DeltaTable:
    """The sidecars, then an empty target of the key and bookkeeping columns, typed
    from the first changes (MERGE or append adds the attribute columns). A crash
    in between leaves sidecars and no target: the next run carries on."""
    schema = bookkeeping(rows, key_columns, None).schema
    for uri, sidecar in ((lake.tombstones, schema), (lake.progress, progress_schema())):
        if lake.load(uri) is None:
            with contextlib.suppress(_TableExists):  # another apply made it first
                create_empty(lake, uri, sidecar)
    return create_empty(lake, lake.target, schema)


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
    data = bookkeeping(touched, key_columns, schema).append_column(
        rules.DELETE_COLUMN, pa.array([r[rules.DELETE_COLUMN] for r in touched], pa.bool_())
    )
    table = lake.load(lake.tombstones)
    if table is None:
        try:
            table = create_empty(
                lake, lake.tombstones, data.drop_columns([rules.DELETE_COLUMN]).schema
            )
        except _TableExists:
            table = lake.load(lake.tombstones)
            assert table is not None
    retry_commits(
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


def progress_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema(
        [
            ("source", pa.string()),
            ("part", pa.string()),
            ("version", pa.int64()),
            ("applied_at", pa.timestamp("ms", tz="UTC")),
        ]
    )


def record_progress(lake: Lake, source: str, parts: list[str], target: DeltaTable | None) -> None:
    """Append the applied parts to ``progress`` (blind appends never conflict)."""
    import pyarrow as pa
    from deltalake import write_deltalake

    now = datetime.now(UTC)
    version = target.version() if target is not None else None
    data = pa.table(
        [[source] * len(parts), parts, [version] * len(parts), [now] * len(parts)],
        schema=progress_schema(),
    )
    write_deltalake(lake.progress, data, mode="append", storage_options=lake.storage_options)


def retry_commits(commit: Callable[[], T], table: DeltaTable) -> T:
    """Run one commit, reloading ``table`` after each conflict with a concurrent writer."""
    from deltalake.exceptions import CommitFailedError

    attempt = 0
    while True:
        attempt += 1
        try:
            return commit()
        except CommitFailedError:
            if not COMMIT_BACKOFF.retries_left(attempt):
                raise
            time.sleep(COMMIT_BACKOFF.delay(attempt))
            table.update_incremental()


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
