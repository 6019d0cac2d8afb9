"""One S3 object end to end: download, decode, extract, convert, create tables, write.

``Loader.load`` never raises a ``WorkerError``: it returns an ``ObjectSummary``
whose ``error`` says why the object was not fully written. A table that fails
(an invalid name, writes that ran out of attempts) does not stop the others.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from structlog.contextvars import bound_contextvars

from worker.core.aws import Clients, is_loopback
from worker.core.config import Settings
from worker.core.errors import (
    ConfigError,
    CorruptObject,
    InvalidTable,
    ObjectTooLarge,
    ObjectUnavailable,
    SourceNotAllowed,
    WorkerError,
)
from worker.core.log import elapsed_ms, get_logger
from worker.core.tracking import FileTracker, LoadedFile, TrackedFile
from worker.loader.ddb_http import batch_write_client
from worker.loader.extract import Extractor, Rows
from worker.loader.items import ConversionStats, ItemBuilder, Origin
from worker.loader.messages import ObjectRef
from worker.loader.s3_reader import Limits, gunzip_if_needed, read_object
from worker.loader.tables import TableRegistry, table_name
from worker.loader.writer import BatchWriter, WriteStats

log = get_logger(__name__)
TABLES_AT_ONCE = 2
Fetched = tuple[Origin, bytes, int]  # the rows' origin (the id seed), the bytes, stored size


@dataclass(slots=True)
class TableSummary:
    """One table of one object: what conversion and writing did, composed."""

    table: str  # the DynamoDB table; the file's own name until it is mapped
    rows: int = 0
    conversion: ConversionStats = field(default_factory=ConversionStats)
    write: WriteStats = field(default_factory=WriteStats)
    window: int = 0
    error: str | None = None

    @property
    def written(self) -> int:
        return self.write.written

    @property
    def skipped(self) -> int:
        return sum(self.conversion.skipped.values())

    def log_fields(self) -> dict[str, Any]:
        conversion = {k: v for k, v in asdict(self.conversion).items() if k != "samples"}
        return {"rows": self.rows, **conversion, **asdict(self.write), "window": self.window}


@dataclass(slots=True)
class ObjectSummary:
    uri: str
    tables: list[TableSummary] = field(default_factory=list)
    ms: int = 0
    error: WorkerError | None = None
    size: int = 0  # bytes as stored
    checksum: str = ""  # the version id or ETag

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def rows_written(self) -> int:
        return sum(t.written for t in self.tables)

    @property
    def rows_skipped(self) -> int:
        return sum(t.skipped for t in self.tables)


class Loader:
    """Holds the long-lived parts (clients, registry, window) that every object shares."""

    def __init__(
        self,
        settings: Settings,
        clients: Clients,
        *,
        extractor: Extractor | None = None,
        writer: BatchWriter | None = None,
        tracker: FileTracker | None = None,
    ) -> None:
        self.settings = settings
        self.clients = clients
        self.extractor = extractor or Extractor.from_specs(
            settings.output_file_message, settings.table_extract
        )
        _require_ownership_settings(settings, clients)
        self.registry = TableRegistry(
            clients.dynamodb,
            active_timeout_s=settings.table_active_timeout_s,
            reserved=frozenset(
                filter(None, [settings.firehose.cache_table, *settings.ledger.tables])
            ),
        )
        self.writer = writer or BatchWriter(
            batch_write_client(clients, settings.write.path), settings.write
        )
        self._limits = Limits(settings.max_object_bytes, settings.max_decoded_bytes)
        self.tracker = tracker

    async def load(self, ref: ObjectRef, *, last_attempt: bool = False) -> ObjectSummary:
        """Load one S3 object; report it to the tracker when a ledger run sent it
        (``last_attempt``: no redelivery follows, so a failure is final)."""
        tracked = ref.tracked if self.tracker is not None else None
        if tracked is None:
            with bound_contextvars(bucket=ref.bucket, key=ref.key):
                return await self._load(ref.uri, lambda: self._fetch_s3(ref, None))
        with bound_contextvars(
            bucket=ref.bucket, key=ref.key, run_id=tracked.run_id, file_id=tracked.file_id
        ):
            return await self._load_tracked(ref, tracked, last_attempt=last_attempt)

    async def _load_tracked(
        self, ref: ObjectRef, tracked: TrackedFile, *, last_attempt: bool
    ) -> ObjectSummary:
        assert self.tracker is not None
        try:
            if not await self.tracker.begin(tracked):
                return ObjectSummary(uri=ref.uri)  # the tracker logged why
        except WorkerError as exc:
            return ObjectSummary(uri=ref.uri, error=exc)
        summary = await self._load(ref.uri, lambda: self._fetch_s3(ref, tracked))
        try:
            if summary.error is None:
                loaded = LoadedFile(summary.rows_written, summary.size, summary.checksum)
                await self.tracker.finished(tracked, loaded)
            else:
                final = last_attempt or not summary.error.retriable
                await self.tracker.failed(tracked, summary.error, final=final)
        except WorkerError as exc:  # the ledger did not take it: redeliver and tell it again
            log.warning("ledger_update_failed", **exc.as_log())
            summary.error = summary.error or exc
        return summary

    def _check_source(self, ref: ObjectRef) -> None:
        allowed = self.settings.source_buckets
        if allowed and "*" not in allowed and ref.bucket not in allowed:
            raise SourceNotAllowed(f"bucket {ref.bucket!r} is not in SOURCE_BUCKETS")

    async def load_file(self, path: Path) -> ObjectSummary:
        """Load one local file through the same pipeline (``worker load FILE``)."""
        with bound_contextvars(file=str(path)):
            return await self._load(str(path), lambda: self._fetch_file(path))

    async def _load(self, uri: str, fetch: Callable[[], Awaitable[Fetched]]) -> ObjectSummary:
        summary = ObjectSummary(uri=uri)
        start = time.perf_counter()
        try:
            source, data, summary.size = await fetch()
            summary.checksum = source.revision
            tables = await asyncio.to_thread(self._extract, data, time.perf_counter())
            del data  # only the decoded rows from here on: the bytes can go
            await self.write_tables(source, tables, summary)
        except WorkerError as exc:
            summary.error = exc
        summary.ms = elapsed_ms(start)
        self._log_summary(summary)
        return summary

    async def _fetch_s3(self, ref: ObjectRef, tracked: TrackedFile | None) -> Fetched:
        self._check_source(ref)
        start = time.perf_counter()
        obj = await read_object(self.clients.s3, ref, self._limits)
        if tracked is not None and self.tracker is not None:
            await self.tracker.fetched(tracked)
        log.info(
            "object_downloaded",
            bytes=obj.stored_bytes,
            decoded_bytes=len(obj.data),
            gzipped=obj.gzipped,
            ms=elapsed_ms(start),
        )
        return Origin(ref.bucket, ref.key, obj.revision, ""), obj.data, obj.stored_bytes

    async def _fetch_file(self, path: Path) -> Fetched:
        try:
            raw, absolute = await asyncio.to_thread(_read_file, path)
        except OSError as exc:
            raise ObjectUnavailable(f"cannot read {path}: {exc.strerror}") from None
        if not raw:
            raise CorruptObject("file is empty")
        data, _ = gunzip_if_needed(raw, self._limits)
        revision = hashlib.sha256(raw).hexdigest()[:32]
        return Origin("file", absolute, revision, ""), data, len(raw)

    def _extract(self, data: bytes, start: float) -> Rows:
        tables = self.extractor.extract(data)
        log.info(
            "object_decoded",
            tables=len(tables),
            rows=sum(len(rows) for rows in tables.values()),
            ms=elapsed_ms(start),
        )
        return tables

    async def write_tables(self, source: Origin, tables: Rows, summary: ObjectSummary) -> None:
        """The write stage: every table of decoded rows, concurrently; raises the error
        that decides the message's fate (a retryable one first)."""
        cap = self.settings.max_tables_per_file
        if len(tables) > cap:
            raise ObjectTooLarge(
                f"file holds {len(tables)} tables, over MAX_TABLES_PER_FILE={cap}",
                table_count=len(tables),
            )
        work, errors = self._plan(tables, summary)
        # A few tables are converted at a time: one table alone can fill the write
        # window, and items are only built for tables whose turn has come, which
        # bounds memory. A table gives its turn up once all its requests are under
        # way, so retries of one table never hold the next back.
        slots = asyncio.Semaphore(TABLES_AT_ONCE)
        tasks = []
        async with asyncio.TaskGroup() as group:
            for result, name, rows in reversed(work):
                await slots.acquire()
                turn = _Turn(slots)
                origin = dataclasses.replace(source, table=name)
                task = group.create_task(self._load_table(origin, rows, result, turn))
                task.add_done_callback(turn.end)
                tasks.append(task)
        del work
        errors += [error for task in tasks if (error := task.result()) is not None]
        if errors:  # a retry can cure a retryable error, so it decides the message's fate
            raise next((e for e in errors if e.retriable), errors[0])

    def _plan(
        self, tables: Rows, summary: ObjectSummary
    ) -> tuple[list[tuple[TableSummary, str, list[dict[str, Any]]]], list[WorkerError]]:
        """Map every table of the file to its DynamoDB table. Empty tables need no
        table; a name DynamoDB refuses, or two names that map to one table, fail
        those tables (merging them would lose rows silently)."""
        mapped: dict[str, list[str]] = {}
        errors: list[WorkerError] = []
        for name in tables:
            try:
                mapped.setdefault(table_name(self.settings.schema_prefix, name), []).append(name)
            except InvalidTable as exc:
                errors.append(self._fail(TableSummary(name, len(tables[name])), name, exc, summary))
        work = []
        for target, names in mapped.items():
            for name in names:
                rows = tables.pop(name)  # each table's rows go to its task alone, to be freed
                result = TableSummary(target, len(rows))
                if len(names) > 1:
                    clash = InvalidTable(
                        f"tables {names!r} of the file all map to {target!r}", source_tables=names
                    )
                    errors.append(self._fail(result, name, clash, summary))
                elif rows:
                    summary.tables.append(result)
                    work.append((result, name, rows))
                else:
                    summary.tables.append(result)  # nothing to write: no table is made
        return work, errors

    @staticmethod
    def _fail(
        result: TableSummary, name: str, error: WorkerError, summary: ObjectSummary
    ) -> WorkerError:
        result.error = error.reason
        summary.tables.append(result)
        log.warning("table_failed", **{"source_table": name, **error.as_log()})
        return error

    async def _load_table(
        self, origin: Origin, rows: list[dict[str, Any]], result: TableSummary, turn: _Turn
    ) -> WorkerError | None:
        with bound_contextvars(source_table=origin.table, table=result.table):
            try:
                await self._write_table(origin, rows, result, turn)
            except WorkerError as exc:
                result.error = exc.reason
                log.warning("table_failed", **exc.as_log())
                return exc
        return None

    async def _write_table(
        self, origin: Origin, rows: list[dict[str, Any]], result: TableSummary, turn: _Turn
    ) -> None:
        schema = await self.registry.ensure(result.table, rows[0])
        builder = ItemBuilder(schema, self.settings.nan_policy, origin)
        converted = await asyncio.to_thread(builder.convert, rows)
        rows.clear()
        result.conversion = converted.stats
        if converted.stats.skipped:
            log.warning(
                "rows_skipped",
                counts=dict(converted.stats.skipped),
                samples=converted.stats.samples,
            )
        try:
            result.write = await self.writer.write(
                result.table, converted.take_items(), on_dispatched=turn.end
            )
        finally:
            result.window = self.writer.window.limit
        log.info("table_written", **result.log_fields())

    def _log_summary(self, summary: ObjectSummary) -> None:
        fields = {
            "tables": len(summary.tables),
            "rows_written": summary.rows_written,
            "rows_skipped": summary.rows_skipped,
            "ms": summary.ms,
        }
        if summary.error is None:
            log.info("object_loaded", **fields)
        else:
            log.error("object_failed", **{**fields, **summary.error.as_log()})


def _require_ownership_settings(settings: Settings, clients: Clients) -> None:
    """Outside local use (endpoints on loopback), the loader writes only under a
    prefix and reads only named buckets: file contents name the tables, and
    message bodies name the buckets (ARCHITECTURE.md, "Trust model")."""
    if not settings.schema_prefix and not is_loopback(clients.dynamodb.meta.endpoint_url):
        raise ConfigError(
            "SCHEMA_PREFIX must be set: file contents name the tables", variable="SCHEMA_PREFIX"
        )
    if not settings.source_buckets and not is_loopback(clients.s3.meta.endpoint_url):
        raise ConfigError(
            "SOURCE_BUCKETS must list the buckets to load from ('*' for any)",
            variable="SOURCE_BUCKETS",
        )


def _read_file(path: Path) -> tuple[bytes, str]:
    return path.read_bytes(), str(path.absolute())


class _Turn:
    """A table's place among the tables being prepared; given back exactly once."""

    __slots__ = ("_ended", "_slots")

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self._slots = slots
        self._ended = False

    def end(self, *_: object) -> None:
        if not self._ended:
            self._ended = True
            self._slots.release()
