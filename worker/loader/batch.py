"""SQS messages -> loads -> ``batchItemFailures`` (Lambda partial batch response).

A message succeeds only when every object it names was fully written; every
other message, including those never started because the deadline came, is
reported as a failure so SQS redelivers it (or, after ``maxReceiveCount``,
moves it to the DLQ). FIFO queues are processed in order, and everything after
the first failure is reported as failed too, as Lambda requires.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from structlog.contextvars import bound_contextvars

from worker.core.errors import DeadlineExceeded, PermanentError, WorkerError
from worker.core.log import elapsed_ms, emit_metrics, get_logger
from worker.loader.messages import parse_body
from worker.loader.pipeline import Loader, ObjectSummary

log = get_logger(__name__)


@dataclass(slots=True)
class MessageOutcome:
    message_id: str
    objects: list[ObjectSummary] = field(default_factory=list)
    error: WorkerError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def retriable(self) -> bool:
        return self.error is not None and self.error.retriable


@dataclass(slots=True)
class LoadMetrics:
    """The loader's EMF metrics (``Service=loader``), the same names for the same
    events on both routes: the Lambda route emits them per batch, the poller per
    ``SUMMARY_INTERVAL_S``, so one alarm watches either ``LoaderMode``."""

    messages: int = 0
    failed_messages: int = 0
    failed_files: int = 0
    rows_written: int = 0
    rows_skipped: int = 0

    def add(self, outcome: MessageOutcome) -> None:
        self.messages += 1
        self.failed_messages += not outcome.ok
        self.failed_files += sum(1 for s in outcome.objects if s.error is not None)
        self.rows_written += sum(s.rows_written for s in outcome.objects)
        self.rows_skipped += sum(s.rows_skipped for s in outcome.objects)

    def emit(self, **extra: float) -> None:
        emit_metrics(
            {"Service": "loader"},
            Messages=self.messages,
            FailedMessages=self.failed_messages,
            FailedFiles=self.failed_files,
            RowsWritten=self.rows_written,
            RowsSkipped=self.rows_skipped,
            **extra,
        )


async def handle_message(
    loader: Loader, message_id: str, body: Any, *, last_attempt: bool = False
) -> MessageOutcome:
    """Load every object the message names; the outcome fails if any object failed.

    It never raises (but for cancellation): a body it cannot read is a
    ``MalformedMessage``, and any other exception is logged with its traceback and
    becomes a ``PermanentError`` of this message alone, on every entry point.
    """
    outcome = MessageOutcome(message_id)
    with bound_contextvars(message_id=message_id):
        try:
            refs = parse_body(body, max_objects=loader.settings.max_objects_per_message)
        except WorkerError as exc:
            outcome.error = exc
            log.error("message_failed", **exc.as_log(), body_preview=str(body)[:200])
            return outcome
        if not refs:
            log.info("message_ignored", reason="names no object to load")
        try:
            for ref in refs:
                summary = await loader.load(ref, last_attempt=last_attempt)
                outcome.objects.append(summary)
                if summary.error is not None and (outcome.error is None or summary.error.retriable):
                    outcome.error = summary.error
        except Exception as exc:  # a bug in one message must not sink the others
            log.exception("message_crashed")
            outcome.error = PermanentError(f"unexpected {exc!r}")
    return outcome


def receive_count(attributes: Mapping[str, Any]) -> int:
    """A message's ``ApproximateReceiveCount`` (1 when SQS did not say)."""
    count = str(attributes.get("ApproximateReceiveCount", "1"))
    return int(count) if count.isdigit() else 1


@dataclass(slots=True)
class BatchReport:
    outcomes: dict[str, MessageOutcome] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def response(self) -> dict[str, list[dict[str, str]]]:
        return {"batchItemFailures": [{"itemIdentifier": m} for m in self.failures]}


async def handle_batch(
    loader: Loader, records: list[dict[str, Any]], *, deadline: float
) -> BatchReport:
    """Process an SQS event's records until ``deadline`` (a ``time.monotonic`` value)."""
    start = time.perf_counter()
    fifo = bool(records) and str(records[0].get("eventSourceARN", "")).endswith(".fifo")
    report = BatchReport()
    limit = 1 if fifo else loader.settings.max_concurrent_objects
    try:
        await _run(loader, records, report, limit=limit, fifo=fifo, deadline=deadline)
    except TimeoutError:
        log.warning("deadline_reached", unfinished=len(records) - len(report.outcomes))
    for record in records:
        message_id = record["messageId"]
        if message_id not in report.outcomes:
            report.outcomes[message_id] = MessageOutcome(
                message_id, error=DeadlineExceeded("not finished before the deadline")
            )
        if not report.outcomes[message_id].ok:
            report.failures.append(message_id)
    _log_batch(report.outcomes.values(), elapsed_ms(start))
    return report


async def _run(
    loader: Loader,
    records: list[dict[str, Any]],
    report: BatchReport,
    *,
    limit: int,
    fifo: bool,
    deadline: float,
) -> None:
    slots = asyncio.Semaphore(limit)
    running: set[asyncio.Task[None]] = set()

    async def one(record: dict[str, Any]) -> None:
        message_id = record["messageId"]
        try:
            receives = receive_count(record.get("attributes", {}))
            last = receives >= loader.settings.ledger.max_receives
            outcome = await handle_message(
                loader, message_id, record.get("body", ""), last_attempt=last
            )
        finally:
            slots.release()
        report.outcomes[message_id] = outcome

    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout_at(loop.time() + (deadline - time.monotonic())):
            for record in records:
                await slots.acquire()
                if fifo and any(not o.ok for o in report.outcomes.values()):
                    slots.release()
                    break  # a FIFO group may not run past a failure
                task = asyncio.create_task(one(record))
                running.add(task)
                task.add_done_callback(running.discard)
            while running:
                await asyncio.wait(set(running))
    finally:
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(set(running))


def _log_batch(outcomes: Iterable[MessageOutcome], ms: int) -> None:
    outcomes = list(outcomes)
    objects = [summary for o in outcomes for summary in o.objects]
    failed = [o for o in outcomes if not o.ok]
    rows_written = sum(s.rows_written for s in objects)
    rows_skipped = sum(s.rows_skipped for s in objects)
    log.info(
        "batch_done",
        messages=len(outcomes),
        failed=len(failed),
        objects=len(objects),
        tables=len({t.table for s in objects for t in s.tables}),
        rows_written=rows_written,
        rows_skipped=rows_skipped,
        errors=sorted({o.error.reason for o in failed if o.error is not None}),
        ms=ms,
    )
    metrics = LoadMetrics()
    for outcome in outcomes:
        metrics.add(outcome)
    metrics.emit(DurationMs=ms)
