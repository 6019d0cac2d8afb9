"""One S3 object end to end: download, decode, extract, convert, create tables, write.

``Loader.load`` never raises a ``WorkerError``: it returns an ``ObjectSummary``
whose ``error`` says why the object was not fully written. A table that fails
(an invalid name, writes that ran out of attempts) does not stop the others.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from structlog.contextvars import bound_contextvars

from worker.core.aws import Clients, is_loopback
from worker.core.config import Settings
from worker.core.errors import (
    ConfigError,
    InvalidTable,
    ObjectTooLarge,
    WorkerError,
)
from worker.core.log import elapsed_ms, get_logger
from worker.core.tracking import FileTracker, LoadedFile, TrackedFile
from worker.loader.budget import (
    ByteBudget,
    budget_bytes,
    cap_advice,
    decoded_cap,
    whole_file_memory,
)
from worker.loader.ddb_http import batch_write_client
from worker.loader.encode import FusedBuilder
from worker.loader.extract import Extractor, Rows, Slice, Tables, WholeFile
from worker.loader.items import Conversion, ConversionStats, ItemBuilder, Origin
from worker.loader.messages import ObjectRef
from worker.loader.s3_reader import Data, Limits
from worker.loader.sources import Fetched, Sources
from worker.loader.tables import TableRegistry, table_name
from worker.loader.writer import BatchWriter, WriteStats

log = get_logger(__name__)
SLICES_AT_ONCE = 3  # slices converted or being dispatched, across the file's tables


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
        streamed = self.extractor.iterate is not None
        # rows straight to item texts: the reference extract, on the orjson write path
        self._fused = self.extractor.fusable and settings.write.path == "fast"
        cap = decoded_cap(settings, streamed=streamed)
        self._limits = Limits(settings.max_object_bytes, cap, cap_advice(settings))
        self.budget = ByteBudget(budget_bytes(settings, streamed=streamed))
        self.tracker = tracker
        self.sources = Sources(settings, clients, self._limits, self.budget, tracker)

    async def load(self, ref: ObjectRef, *, last_attempt: bool = False) -> ObjectSummary:
        """Load one S3 object; report it to the tracker when a ledger run sent it
        (``last_attempt``: no redelivery follows, so a failure is final)."""
        tracked = ref.tracked if self.tracker is not None else None
        if tracked is None:
            with bound_contextvars(bucket=ref.bucket, key=ref.key):
                return await self._load(ref.uri, lambda: self.sources.s3(ref, None))
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
        remote = ref.remote is not None
        summary = await self._load(
            ref.uri,
            lambda: self.sources.remote(ref, tracked) if remote else self.sources.s3(ref, tracked),
        )
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

    async def load_file(self, path: Path) -> ObjectSummary:
        """Load one local file through the same pipeline (``worker load FILE``)."""
        with bound_contextvars(file=str(path)):
            return await self._load(str(path), lambda: self.sources.file(path))

    async def _load(self, uri: str, fetch: Callable[[], Awaitable[Fetched]]) -> ObjectSummary:
        summary = ObjectSummary(uri=uri)
        start = time.perf_counter()
        reserved = 0
        try:
            fetched = await fetch()
            reserved, summary.size, summary.checksum = (
                fetched.reserved,
                fetched.size,
                fetched.checksum,
            )
            data, fetched.data = fetched.data, b""
            tables = await asyncio.to_thread(self._extract, data, time.perf_counter())
            del data  # the stream holds the bytes as long as it needs them
            await self.write_stream(fetched.origin, tables, summary)
        except WorkerError as exc:
            summary.error = exc
        finally:
            await self.budget.release(reserved)
        summary.ms = elapsed_ms(start)
        self._log_summary(summary)
        return summary

    def _extract(self, data: Data, start: float) -> Tables:
        tables = self.extractor.stream(
            data,
            max_tables=self.settings.max_tables_per_file,
            memory=whole_file_memory(self._limits.max_decoded_bytes),
            raw=self._fused,
        )
        names = tables.table_names
        log.info(
            "object_decoded",
            tables=None if names is None else len(set(names)),
            streamed=not isinstance(tables, WholeFile),
            ms=elapsed_ms(start),
        )
        return tables

    async def write_tables(self, source: Origin, tables: Rows, summary: ObjectSummary) -> None:
        """The write stage for rows already extracted (``write_stream`` of them)."""
        await self.write_stream(source, WholeFile(tables), summary)

    async def write_stream(self, source: Origin, tables: Tables, summary: ObjectSummary) -> None:
        """Write a file's slices of rows as they come; raise the error that decides
        the message's fate (a retryable one first).

        Parsing and converting run in a thread, one slice at a time, and a slice
        is taken only while fewer than ``SLICES_AT_ONCE`` slices are still being
        dispatched, so memory holds a few slices, whatever the file's size. A
        key written by a slice still in flight is not sent again until that
        slice is written: the later row wins, and two versions of one item are
        never in flight at once.
        """
        plan = _Plan(self.settings, summary)
        if tables.table_names is not None:
            plan.check_upfront(tables.table_names)  # before any table is made
        async with asyncio.TaskGroup() as group:
            try:
                await self._feed(plan, source, iter(tables), group)
            except WorkerError as exc:  # the file itself: no slice after this one
                plan.errors.insert(0, exc)
        for table in plan.tables.values():
            self._log_table(table)
        if plan.errors:  # a retry can cure a retryable error, so it decides the message's fate
            raise next((e for e in plan.errors if e.retriable), plan.errors[0])

    async def _feed(
        self, plan: _Plan, source: Origin, slices: Iterator[Slice], group: asyncio.TaskGroup
    ) -> None:
        slots = asyncio.Semaphore(SLICES_AT_ONCE)
        while True:
            await slots.acquire()
            turn = _Turn(slots)
            got = await asyncio.to_thread(next, slices, None)
            if got is None:
                turn.end()
                return
            name, rows = got
            table = await self._open(plan, source, name, rows)
            if table is None:
                turn.end()
                continue
            converted = await asyncio.to_thread(table.builder.convert, rows, table.offset)
            table.offset += len(rows)
            del rows, got
            await table.wait_for_earlier(converted.keys)
            task = group.create_task(self._write_slice(table, converted, turn))
            task.add_done_callback(turn.end)
            table.track(task, converted.keys)

    async def _open(
        self, plan: _Plan, source: Origin, name: str, rows: Sequence[dict[str, Any]]
    ) -> _Table | None:
        """The table this slice goes to (made when it is new), or None if it failed."""
        table = plan.tables.get(name)
        if table is None:
            if name in plan.failed or not rows:
                return None  # an empty table makes nothing
            result = plan.add(name)
            if result is None:
                return None
            with bound_contextvars(source_table=name, table=result.table):
                try:
                    schema = await self.registry.ensure(result.table, rows[0])
                except WorkerError as exc:
                    plan.fail(name, result, exc)
                    return None
            origin = dataclasses.replace(source, table=name)
            builder = (FusedBuilder if self._fused else ItemBuilder)(
                schema, self.settings.nan_policy, origin
            )
            table = plan.tables[name] = _Table(plan, name, result, builder)
        table.result.rows += len(rows)
        return table if table.result.error is None and rows else None

    async def _write_slice(self, table: _Table, converted: Conversion, turn: _Turn) -> None:
        result = table.result
        with bound_contextvars(source_table=table.name, table=result.table):
            try:
                await self.writer.write(
                    result.table,
                    converted.take_items(),
                    on_dispatched=turn.end,
                    stats=result.write,
                )
            except WorkerError as exc:
                if result.error is None:
                    table.plan.fail(table.name, result, exc)
            finally:
                result.window = self.writer.window.limit

    def _log_table(self, table: _Table) -> None:
        result = table.result
        result.conversion = table.builder.stats
        with bound_contextvars(source_table=table.name, table=result.table):
            if result.conversion.skipped:
                log.warning(
                    "rows_skipped",
                    counts=dict(result.conversion.skipped),
                    samples=result.conversion.samples,
                )
            if result.error is None:
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


class _Turn:
    """A slice's place among the slices being prepared; given back exactly once."""

    __slots__ = ("_ended", "_slots")

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self._slots = slots
        self._ended = False

    def end(self, *_: object) -> None:
        if not self._ended:
            self._ended = True
            self._slots.release()


class _Plan:
    """A file's tables as they appear: their DynamoDB names, summaries, failures.

    A name DynamoDB refuses, two names that map to one table (merging them
    would lose rows silently), and tables beyond ``MAX_TABLES_PER_FILE`` fail.
    With the names known up front all of that is decided before any table is
    made; otherwise as each table first appears.
    """

    def __init__(self, settings: Settings, summary: ObjectSummary) -> None:
        self.prefix = settings.schema_prefix
        self.cap = settings.max_tables_per_file
        self.summary = summary
        self.tables: dict[str, _Table] = {}
        self.failed: set[str] = set()
        self.errors: list[WorkerError] = []
        self._targets: dict[str, str] = {}  # DynamoDB table -> the file's table name
        self._seen: set[str] = set()

    def check_upfront(self, names: list[str]) -> None:
        distinct = list(dict.fromkeys(names))
        if len(distinct) > self.cap:
            raise self._too_many(len(distinct))
        mapped: dict[str, list[str]] = {}
        for name in distinct:
            try:
                mapped.setdefault(table_name(self.prefix, name), []).append(name)
            except InvalidTable as exc:
                self.fail(name, name, exc)
        for target, clashing in mapped.items():
            if len(clashing) > 1:
                for name in clashing:
                    self.fail(name, target, _clash(clashing, target))

    def add(self, name: str) -> TableSummary | None:
        """The summary of a table seen for the first time, or None when it fails."""
        self._seen.add(name)
        if len(self._seen) > self.cap:
            raise self._too_many(len(self._seen))
        try:
            target = table_name(self.prefix, name)
        except InvalidTable as exc:
            self.fail(name, name, exc)
            return None
        other = self._targets.setdefault(target, name)
        if other != name:
            self.fail(name, target, _clash([other, name], target))
            return None
        result = TableSummary(target)
        self.summary.tables.append(result)
        return result

    def fail(self, name: str, result: TableSummary | str, error: WorkerError) -> None:
        """``result``: the table's summary, or the DynamoDB name of a new one."""
        if isinstance(result, str):
            result = TableSummary(result)
            self.summary.tables.append(result)
        self.failed.add(name)
        result.error = error.reason
        self.errors.append(error)
        log.warning("table_failed", **{"source_table": name, **error.as_log()})

    def _too_many(self, count: int) -> ObjectTooLarge:
        return ObjectTooLarge(
            f"file holds {count} tables, over MAX_TABLES_PER_FILE={self.cap}",
            table_count=count,
        )


def _clash(names: list[str], target: str) -> InvalidTable:
    return InvalidTable(f"tables {names!r} of the file all map to {target!r}", source_tables=names)


class _Table:
    """One table of one file being written: its builder, where its next slice
    starts, and the keys of its slices still in flight."""

    def __init__(
        self, plan: _Plan, name: str, result: TableSummary, builder: ItemBuilder | FusedBuilder
    ) -> None:
        self.plan = plan
        self.name = name
        self.result = result
        self.builder = builder
        self.offset = 0  # the table's row index of the next slice (seeds derived ids)
        self._in_flight: dict[int, asyncio.Task[None]] = {}  # key hash -> its slice's task

    async def wait_for_earlier(self, keys: list[int]) -> None:
        """Wait until no slice in flight holds one of ``keys``."""
        earlier = {task for key in keys if (task := self._in_flight.get(key)) is not None}
        if earlier:
            self.builder.stats.duplicates += sum(key in self._in_flight for key in keys)
            await asyncio.wait(earlier)

    def track(self, task: asyncio.Task[None], keys: list[int]) -> None:
        for key in keys:
            self._in_flight[key] = task
        task.add_done_callback(lambda done: self._forget(done, keys))

    def _forget(self, task: asyncio.Task[None], keys: list[int]) -> None:
        for key in keys:
            if self._in_flight.get(key) is task:
                del self._in_flight[key]
