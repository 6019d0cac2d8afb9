"""``worker lake apply``: MERGE the stream parts not applied yet into a Delta table.

- **Progress lives in the Delta log.** Each apply commit carries, atomically
  with its data, the list of parts it applied (commit ``custom_metadata``) and
  an app transaction ``(worker-cdc:{source}, n)``. A run skips the parts that
  earlier commits list, so running twice changes nothing (no new commit).
- **Semantics** are ``worker.cdc.cdc_rules``: latest change per key, deletes
  applied, older or equal sequence numbers never overwrite.
- **Schema evolution.** A new attribute becomes a new column; older rows get
  null. Nested values (lists, maps, sets) are stored as JSON text. A column
  whose values mix incompatible types is stored as JSON text too.
- **Concurrency.** Two applies on one table conflict on the app transaction;
  the loser reloads the table, recomputes what is left and tries again.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from botocore.exceptions import ClientError

from worker.cdc import cdc_rules as rules
from worker.core.aws import error_code
from worker.core.config import AwsSettings
from worker.core.errors import LakeError

if TYPE_CHECKING:
    import pyarrow as pa
    from deltalake import DeltaTable
    from types_aiobotocore_s3 import S3Client

METADATA_PARTS = "worker.cdc.parts"
METADATA_SOURCE = "worker.cdc.source"
PART_SUFFIXES = (".json.gz", ".parquet")
_DELTA_UNSAFE = re.compile(r"[ ,;{}()\n\t=]")


@dataclass(slots=True)
class ApplyResult:
    parts: list[str] = field(default_factory=list)
    changes: int = 0
    rows: int = 0  # after the latest-per-key dedupe
    version: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise LakeError(f"--source must be s3://BUCKET/PREFIX, not {uri!r}")
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket:
        raise LakeError(f"no bucket in {uri!r}")
    return bucket, prefix.strip("/")


async def list_parts(s3: S3Client, source: str) -> list[str]:
    bucket, prefix = parse_s3_uri(source)
    keys: list[str] = []
    paginator = s3.get_paginator("list_objects_v2")
    try:
        async for page in paginator.paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""):
            keys.extend(
                o["Key"] for o in page.get("Contents", []) if o["Key"].endswith(PART_SUFFIXES)
            )
    except ClientError as exc:
        raise LakeError(f"cannot list {source}: {error_code(exc)}", source=source) from None
    return sorted(keys)


async def read_parts(
    s3: S3Client, source: str, keys: list[str], *, concurrency: int = 8
) -> list[dict[str, Any]]:
    """Every change envelope in ``keys``, in no particular order."""
    bucket, _ = parse_s3_uri(source)
    slots = asyncio.Semaphore(concurrency)

    async def one(key: str) -> list[dict[str, Any]]:
        async with slots:
            response = await s3.get_object(Bucket=bucket, Key=key)
            async with response["Body"] as body:
                data = await body.read()
        try:
            changes = decode_part(key, data)
        except (OSError, ValueError) as exc:
            raise LakeError(f"cannot read part s3://{bucket}/{key}: {exc}") from exc
        for change in changes:
            change["_part"] = key
        return changes

    changes: list[dict[str, Any]] = []
    for found in await asyncio.gather(*(one(k) for k in keys)):
        changes.extend(found)
    return changes


def decode_part(key: str, data: bytes) -> list[dict[str, Any]]:
    if key.endswith(".parquet"):
        import pyarrow.parquet as pq

        rows: list[dict[str, Any]] = pq.read_table(io.BytesIO(data)).to_pylist()
        for row in rows:
            for name in ("keys", "new_image", "old_image"):
                if row[name] is not None:
                    row[name] = orjson.loads(row[name])
        return rows
    return [orjson.loads(line) for line in gzip.decompress(data).splitlines() if line]


def to_rows(changes: Iterable[Mapping[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Envelopes -> one flat row per key (latest change), plus the key column names."""
    flat: list[dict[str, Any]] = []
    key_columns: list[str] | None = None
    for change in changes:
        keys = {column_name(k): v for k, v in (change["keys"] or {}).items()}
        if key_columns is None:
            key_columns = sorted(keys)
        elif sorted(keys) != key_columns:
            raise LakeError(
                f"change {change['event_id']} has keys {sorted(keys)}, not {key_columns}"
            )
        image = {} if change["is_deleted"] else (change["new_image"] or {})
        row = {column_name(k): v for k, v in image.items()}
        row.update(keys)
        row[rules.SEQUENCE_COLUMN] = rules.padded_sequence(change["sequence_number"])
        row[rules.EVENT_TIME_COLUMN] = change["approx_creation_time_ms"]
        row[rules.DELETE_COLUMN] = bool(change["is_deleted"])
        flat.append(row)
    if key_columns is None:
        return [], []
    return key_columns, [dict(r) for r in rules.latest_per_key(flat, key_columns)]


def column_name(attribute: str) -> str:
    """Attribute names Delta cannot hold as columns get ``_`` for the offending characters."""
    return _DELTA_UNSAFE.sub("_", attribute)


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


def applied_parts(table: DeltaTable, source: str) -> set[str]:
    """Parts that earlier apply commits of ``source`` recorded in the Delta log."""
    done: set[str] = set()
    for commit in table.history():
        if commit.get(METADATA_SOURCE) == source and METADATA_PARTS in commit:
            done.update(orjson.loads(commit[METADATA_PARTS]))
    return done


def app_id(source: str) -> str:
    return f"worker-cdc:{source}"


async def apply_changes(
    s3: S3Client,
    source: str,
    target: str,
    *,
    storage_options: dict[str, str] | None = None,
    max_attempts: int = 5,
) -> ApplyResult:
    """Apply every part under ``source`` that ``target`` has not seen yet."""
    from deltalake.exceptions import CommitFailedError

    result = ApplyResult()
    listed = await list_parts(s3, source)
    cache: dict[str, list[dict[str, Any]]] = {}
    for _ in range(max_attempts):
        table = await asyncio.to_thread(_load, target, storage_options)
        done = applied_parts(table, source) if table is not None else set()
        new = [key for key in listed if key not in done]
        if not new:
            return result
        missing = [key for key in new if key not in cache]
        for change in await read_parts(s3, source, missing):
            cache.setdefault(change.pop("_part"), []).append(change)
        changes = [c for key in new for c in cache.get(key, [])]
        key_columns, rows = to_rows(changes)
        try:
            if table is None:
                table = await asyncio.to_thread(_create, target, key_columns, rows, storage_options)
            metrics = await asyncio.to_thread(_merge, table, source, new, key_columns, rows)
        except (CommitFailedError, _TableExists):
            continue  # another apply committed first: reload and see what is left
        result.parts, result.changes, result.rows = new, len(changes), len(rows)
        result.metrics, result.version = metrics, table.version()
        return result
    raise LakeError(f"gave up after {max_attempts} commit conflicts on {target}")


class _TableExists(Exception):
    pass


def _load(target: str, storage_options: dict[str, str] | None) -> DeltaTable | None:
    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(target, storage_options=storage_options):
        return None
    return DeltaTable(target, storage_options=storage_options)


def _create(
    target: str,
    key_columns: list[str],
    rows: list[dict[str, Any]],
    storage_options: dict[str, str] | None,
) -> DeltaTable:
    """An empty table of the key and bookkeeping columns, typed from the first
    changes; MERGE adds the attribute columns."""
    from deltalake import DeltaTable, write_deltalake
    from deltalake.exceptions import DeltaError

    columns = [*key_columns, rules.SEQUENCE_COLUMN, rules.EVENT_TIME_COLUMN]
    typed = arrow_table([{c: row.get(c) for c in columns} for row in rows], None)
    schema = typed.schema
    try:
        write_deltalake(target, schema.empty_table(), mode="error", storage_options=storage_options)
    except (DeltaError, FileExistsError) as exc:
        if DeltaTable.is_deltatable(target, storage_options=storage_options):
            raise _TableExists from exc  # another apply created it first
        raise LakeError(f"cannot create a Delta table at {target}: {exc}", target=target) from exc
    return DeltaTable(target, storage_options=storage_options)


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


def read_table(target: str, storage_options: dict[str, str] | None = None) -> list[dict[str, Any]]:
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
