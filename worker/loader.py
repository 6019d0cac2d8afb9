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

from worker.aws import Clients
from worker.config import Settings
from worker.errors import CorruptObject, ObjectUnavailable, WorkerError
from worker.extract import Extractor, Rows
from worker.items import ItemBuilder, Origin
from worker.log import elapsed_ms, get_logger
from worker.messages import ObjectRef
from worker.s3_reader import Limits, gunzip_if_needed, read_object
from worker.tables import TableRegistry, table_name
from worker.writer import BatchWriter

log = get_logger(__name__)
TABLES_AT_ONCE = 2
Fetched = tuple[Origin, bytes]  # where the rows come from (the id seed), and the bytes


@dataclass(slots=True)
class TableSummary:
    table: str
    rows: int = 0
    written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    numbers_as_strings: int = 0
    nonfinite: int = 0
    bytes: int = 0
    ms: int = 0
    requests: int = 0
    retries: int = 0
    throttled_requests: int = 0
    unprocessed_items: int = 0
    transient_errors: int = 0
    window: int = 0
    error: str | None = None


@dataclass(slots=True)
class ObjectSummary:
    uri: str
    tables: list[TableSummary] = field(default_factory=list)
    ms: int = 0
    error: WorkerError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def rows_written(self) -> int:
        return sum(t.written for t in self.tables)

    @property
    def rows_skipped(self) -> int:
        return sum(sum(t.skipped.values()) for t in self.tables)


class Loader:
    """Holds the long-lived parts (clients, registry, window) that every object shares."""

    def __init__(
        self,
        settings: Settings,
        clients: Clients,
        *,
        extractor: Extractor | None = None,
        writer: BatchWriter | None = None,
    ) -> None:
        self.settings = settings
        self.clients = clients
        self.extractor = extractor or Extractor.from_specs(
            settings.output_file_message, settings.table_extract
        )
        self.registry = TableRegistry(
            clients.dynamodb, active_timeout_s=settings.table_active_timeout_s
        )
        self.writer = writer or BatchWriter(clients.batch_writes, settings.write)
        self._limits = Limits(settings.max_object_bytes, settings.max_decoded_bytes)

    async def load(self, ref: ObjectRef) -> ObjectSummary:
        """Load one S3 object."""
        with bound_contextvars(bucket=ref.bucket, key=ref.key):
            return await self._load(ref.uri, lambda: self._fetch_s3(ref))

    async def load_file(self, path: Path) -> ObjectSummary:
        """Load one local file through the same pipeline (``worker load FILE``)."""
        with bound_contextvars(file=str(path)):
            return await self._load(str(path), lambda: self._fetch_file(path))

    async def _load(self, uri: str, fetch: Callable[[], Awaitable[Fetched]]) -> ObjectSummary:
        summary = ObjectSummary(uri=uri)
        start = time.perf_counter()
        try:
            source, data = await fetch()
            tables = await asyncio.to_thread(self._extract, data, time.perf_counter())
            del data  # only the decoded rows from here on: the bytes can go
            await self.write_tables(source, tables, summary)
        except WorkerError as exc:
            summary.error = exc
        summary.ms = elapsed_ms(start)
        self._log_summary(summary)
        return summary

    async def _fetch_s3(self, ref: ObjectRef) -> Fetched:
        start = time.perf_counter()
        obj = await read_object(self.clients.s3, ref, self._limits)
        log.info(
            "object_downloaded",
            bytes=obj.stored_bytes,
            decoded_bytes=len(obj.data),
            gzipped=obj.gzipped,
            ms=elapsed_ms(start),
        )
        return Origin(ref.bucket, ref.key, obj.revision, ""), obj.data

    async def _fetch_file(self, path: Path) -> Fetched:
        try:
            raw, absolute = await asyncio.to_thread(_read_file, path)
        except OSError as exc:
            raise ObjectUnavailable(f"cannot read {path}: {exc.strerror}") from None
        if not raw:
            raise CorruptObject("file is empty")
        data, _ = gunzip_if_needed(raw, self._limits)
        revision = hashlib.sha256(raw).hexdigest()[:32]
        return Origin("file", absolute, revision, ""), data

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
        work = []
        while tables:  # hand each table's rows to its task alone, so they can be freed
            work.append(tables.popitem())
        # A few tables are converted at a time: one table alone can fill the write
        # window, and items are only built for tables whose turn has come, which
        # bounds memory. A table gives its turn up once all its requests are under
        # way, so retries of one table never hold the next back.
        slots = asyncio.Semaphore(TABLES_AT_ONCE)
        tasks = []
        async with asyncio.TaskGroup() as group:
            for name, rows in reversed(work):
                await slots.acquire()
                turn = _Turn(slots)
                origin = dataclasses.replace(source, table=name)
                task = group.create_task(self._load_table(origin, rows, summary, turn))
                task.add_done_callback(turn.end)
                tasks.append(task)
        del work
        errors = [error for task in tasks if (error := task.result()) is not None]
        if errors:  # a retry can cure a retryable error, so it decides the message's fate
            raise next((e for e in errors if e.retriable), errors[0])

    async def _load_table(
        self, origin: Origin, rows: list[dict[str, Any]], summary: ObjectSummary, turn: _Turn
    ) -> WorkerError | None:
        result = TableSummary(table=origin.table, rows=len(rows))
        summary.tables.append(result)
        with bound_contextvars(source_table=origin.table):
            try:
                result.table = table_name(self.settings.schema_prefix, origin.table)
                with bound_contextvars(table=result.table):
                    await self._write_table(origin, rows, result, turn)
            except WorkerError as exc:
                result.error = exc.reason
                log.warning("table_failed", **exc.as_log())
                return exc
        return None

    async def _write_table(
        self, origin: Origin, rows: list[dict[str, Any]], result: TableSummary, turn: _Turn
    ) -> None:
        schema = await self.registry.ensure(result.table, rows[0] if rows else None)
        builder = ItemBuilder(schema, self.settings.nan_policy, origin)
        converted = await asyncio.to_thread(builder.convert, rows)
        rows.clear()
        result.skipped = dict(converted.skipped)
        result.duplicates = converted.duplicates
        result.numbers_as_strings = converted.numbers_as_strings
        result.nonfinite = converted.nonfinite
        result.bytes = converted.bytes
        if converted.skipped:
            log.warning("rows_skipped", counts=result.skipped, samples=converted.samples)
        try:
            stats = await self.writer.write(
                result.table, converted.take_items(), on_dispatched=turn.end
            )
        finally:
            result.window = self.writer.window.limit
        result.written = stats.written
        result.ms = stats.ms
        result.requests = stats.requests
        result.retries = stats.retries
        result.throttled_requests = stats.throttled_requests
        result.unprocessed_items = stats.unprocessed_items
        result.transient_errors = stats.transient_errors
        log.info("table_written", **{k: v for k, v in asdict(result).items() if k != "error"})

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
            log.error("object_failed", **fields, **summary.error.as_log())


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
