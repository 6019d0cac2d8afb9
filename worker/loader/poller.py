"""The ECS long poller: receive, heartbeat, load, acknowledge, drain.

- **Backpressure.** At most ``MAX_CONCURRENT_OBJECTS`` messages are in flight;
  the receive loop asks SQS only for as many messages as there are free slots
  (and waits for one when there are none), so nothing piles up in memory.
- **FIFO order.** Messages of one ``MessageGroupId`` are loaded one at a time,
  in the order received; different groups run concurrently. When one fails,
  the group's later messages are released unprocessed, and SQS hands the
  group back in order.
- **Heartbeat.** While a message is held, its visibility is extended by the
  queue's timeout every third of it, so a slow load is never handed to a
  second consumer.
- **Acknowledging.** A message is deleted (``DeleteMessageBatch``) only once
  all of its objects are written. A retryable failure gets its visibility cut
  to a backoff delay (``RETRY_DELAY_S`` * 2^(receives-1), at most 15 min); a
  permanent one is logged at ERROR and left to the redrive policy (DLQ).
- **Health.** A task of its own stamps ``HEALTH_FILE.<pid>`` every third of
  ``HEALTH_MAX_AGE_S``, whatever the receive loop is doing: the stamp ages only
  when the event loop itself is stuck.
- **Shutdown.** ``stop()`` stops receiving; in-flight messages get
  ``SHUTDOWN_GRACE_S`` to finish; the rest are cancelled and their visibility
  reset to 0 so another consumer takes them at once. A long poll under way at
  the stop is allowed to finish (at most ``POLL_WAIT_S``), and whatever it
  returns is released the same way: cancelling it client-side would leave SQS
  free to hand messages to the abandoned request, hidden for a full visibility
  timeout. Nothing unwritten is deleted; deletes and resets are shielded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import orjson
from botocore.exceptions import ClientError

from worker.core.aws import AWS_FAILURES, error_code
from worker.core.config import PollSettings
from worker.core.errors import ConfigError, TransientAwsError
from worker.core.log import emit_metrics, get_logger
from worker.loader.batch import LoadMetrics, MessageOutcome, handle_message, receive_count
from worker.loader.pipeline import Loader

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.type_defs import DeleteMessageBatchRequestEntryTypeDef

log = get_logger(__name__)
MAX_VISIBILITY_S = 12 * 3600
_NO_QUEUE = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})


@dataclass(slots=True)
class PollStats:
    received: int = 0
    deleted: int = 0
    failed: int = 0
    released: int = 0


class Poller:
    def __init__(
        self, loader: Loader, sqs: SQSClient, settings: PollSettings, *, concurrency: int
    ) -> None:
        self._loader = loader
        self._sqs = sqs
        self._settings = settings
        self._queue = settings.queue_url
        self._concurrency = concurrency
        self._room = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: dict[asyncio.Task[bool], dict[str, Any]] = {}
        self._groups: dict[str, asyncio.Task[bool]] = {}  # the last task of each FIFO group
        self._deletes: list[DeleteMessageBatchRequestEntryTypeDef] = []
        self._late_receive: asyncio.Task[list[dict[str, Any]]] | None = None
        self._visibility_s = 30
        self._max_receives = loader.settings.ledger.max_receives
        self.stats = PollStats()
        self._metrics = LoadMetrics()
        self._throttles_seen: dict[str, int] = {}  # per table, at the last summary

    @property
    def rows_written(self) -> int:
        """Rows written so far, counted as each request succeeds."""
        return self._loader.writer.written

    def stop(self) -> None:
        """Stop receiving; ``run`` then drains and returns."""
        if not self._stopping.is_set():
            log.info(
                "poller_stopping",
                in_flight=len(self._tasks),
                long_poll_ends_within_s=self._settings.wait_s,
                grace_s=self._settings.shutdown_grace_s,
            )
        self._stopping.set()

    async def run(self) -> PollStats:
        self._visibility_s, redrive = await self._queue_attributes()
        self._max_receives = redrive or self._max_receives
        log.info(
            "poller_started",
            queue_url=self._queue,
            visibility_s=self._visibility_s,
            pid=os.getpid(),
        )
        helpers = [
            asyncio.create_task(self._report_periodically()),
            asyncio.create_task(self._stamp_health()),
        ]
        try:
            await self._receive_until_stopped()
        finally:
            await asyncio.gather(self._drain(), self._release_late_receive())
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            self.health_path.unlink(missing_ok=True)
            self._log_summary("poller_stopped")
        return self.stats

    async def _queue_attributes(self) -> tuple[int, int | None]:
        """The queue's visibility timeout, and the maxReceiveCount of its redrive
        policy (the receive after which a failed message goes to the DLQ)."""
        try:
            response = await self._sqs.get_queue_attributes(
                QueueUrl=self._queue, AttributeNames=["VisibilityTimeout", "RedrivePolicy"]
            )
        except ClientError as exc:
            code = error_code(exc)
            if code in _NO_QUEUE:
                raise ConfigError(
                    f"queue {self._queue} does not exist", variable="QUEUE_URL"
                ) from None
            raise TransientAwsError(f"queue {self._queue}: {code}") from exc
        except AWS_FAILURES as exc:
            raise TransientAwsError(f"queue {self._queue}: {exc!r}") from exc
        attributes = response["Attributes"]
        policy = orjson.loads(attributes.get("RedrivePolicy", "{}"))
        max_receives = int(policy["maxReceiveCount"]) if "maxReceiveCount" in policy else None
        return int(attributes["VisibilityTimeout"]), max_receives

    async def _receive_until_stopped(self) -> None:
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                free = self._concurrency - len(self._tasks)
                if free <= 0:  # backpressure: ask SQS for nothing until a message finishes
                    self._room.clear()
                    room = asyncio.create_task(self._room.wait())
                    await asyncio.wait({room, stopping}, return_when=asyncio.FIRST_COMPLETED)
                    room.cancel()
                    continue
                receive = asyncio.create_task(self._receive(min(10, free)))
                done, _ = await asyncio.wait(
                    {receive, stopping}, return_when=asyncio.FIRST_COMPLETED
                )
                if receive not in done:
                    # Stopping mid long poll. Cancelling it would not stop SQS from
                    # handing messages to the dropped request, where they would hide
                    # for a whole visibility timeout: let it finish, and release them.
                    self._late_receive = receive
                    break
                self._start(receive.result())
        finally:
            stopping.cancel()

    async def _release_late_receive(self) -> None:
        """Messages the last long poll returned after the stop go straight back."""
        receive, self._late_receive = self._late_receive, None
        if receive is None:
            return
        try:
            messages = await asyncio.wait_for(receive, self._settings.shutdown_grace_s)
        except TimeoutError:
            return
        for message in messages:
            await asyncio.shield(self._set_visibility(message, 0))
        self.stats.released += len(messages)
        if messages:
            log.info("released_late_receive", messages=[m["MessageId"] for m in messages])

    async def _receive(self, count: int) -> list[dict[str, Any]]:
        try:
            response = await self._sqs.receive_message(
                QueueUrl=self._queue,
                MaxNumberOfMessages=count,
                WaitTimeSeconds=self._settings.wait_s,
                MessageSystemAttributeNames=["ApproximateReceiveCount", "MessageGroupId"],
            )
        except AWS_FAILURES as exc:
            log.warning("receive_failed", error=repr(exc))
            await asyncio.sleep(1)
            return []
        return cast(list[dict[str, Any]], response.get("Messages", []))

    def _start(self, messages: list[dict[str, Any]]) -> None:
        self.stats.received += len(messages)
        for message in messages:
            group = message.get("Attributes", {}).get("MessageGroupId")
            task = asyncio.create_task(self._process(message, self._groups.get(group or "")))
            if group:
                self._groups[group] = task
            self._tasks[task] = message
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[bool]) -> None:
        message = self._tasks.pop(task, {})
        group = message.get("Attributes", {}).get("MessageGroupId")
        if group and self._groups.get(group) is task:
            del self._groups[group]
        if not task.cancelled() and task.exception() is not None:  # never lost silently
            self.stats.failed += 1
            self._metrics.messages += 1
            self._metrics.failed_messages += 1
            log.error(
                "message_task_crashed",
                message_id=message.get("MessageId"),
                exc_info=task.exception(),
            )
        self._room.set()

    async def _process(self, message: dict[str, Any], after: asyncio.Task[bool] | None) -> bool:
        """Load one message (after the one before it in its FIFO group); True when done."""
        heartbeat = asyncio.create_task(self._heartbeat(message))
        try:
            if after is not None and not await _succeeded(after):
                log.info("released_behind_failure", message_id=message["MessageId"])
                await asyncio.shield(self._set_visibility(message, 0))
                self.stats.released += 1
                return False
            outcome = await handle_message(
                self._loader,
                message["MessageId"],
                message["Body"],
                last_attempt=_receives(message) >= self._max_receives,
            )
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        await asyncio.shield(self._settle(message, outcome))
        return outcome.ok

    async def _settle(self, message: dict[str, Any], outcome: MessageOutcome) -> None:
        self._metrics.add(outcome)
        if outcome.ok:
            await self._delete(message)
            return
        self.stats.failed += 1
        if outcome.retriable:
            delay = self._settings.retry_backoff.delay(_receives(message) - 1)
            await self._set_visibility(message, round(delay))
        # a permanent failure keeps its visibility: the redrive policy takes it to the DLQ

    async def _heartbeat(self, message: dict[str, Any]) -> None:
        every = max(1.0, self._visibility_s / 3)
        while True:
            await asyncio.sleep(every)
            await self._set_visibility(message, min(self._visibility_s, MAX_VISIBILITY_S))
            log.debug("visibility_extended", message_id=message["MessageId"])

    async def _set_visibility(self, message: dict[str, Any], seconds: int) -> None:
        try:
            await self._sqs.change_message_visibility(
                QueueUrl=self._queue,
                ReceiptHandle=message["ReceiptHandle"],
                VisibilityTimeout=seconds,
            )
        except AWS_FAILURES as exc:
            log.warning(
                "visibility_change_failed", message_id=message["MessageId"], error=repr(exc)
            )

    async def _delete(self, message: dict[str, Any]) -> None:
        """Batch deletes: the first completion flushes whatever has gathered meanwhile."""
        self._deletes.append(
            {"Id": message["MessageId"], "ReceiptHandle": message["ReceiptHandle"]}
        )
        await asyncio.sleep(0)  # let completions of the same tick join this batch
        while self._deletes:
            batch, self._deletes = self._deletes[:10], self._deletes[10:]
            try:
                response = await self._sqs.delete_message_batch(QueueUrl=self._queue, Entries=batch)
            except AWS_FAILURES as exc:
                log.warning("delete_failed", messages=len(batch), error=repr(exc))
                continue
            self.stats.deleted += len(response.get("Successful", []))
            for failure in response.get("Failed", []):
                log.warning("delete_failed", message_id=failure["Id"], error=failure["Code"])

    async def _drain(self) -> None:
        if not self._tasks:
            return
        log.info("draining", in_flight=len(self._tasks), grace_s=self._settings.shutdown_grace_s)
        _, pending = await asyncio.wait(set(self._tasks), timeout=self._settings.shutdown_grace_s)
        unfinished = [self._tasks[task] for task in pending if task in self._tasks]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        for message in unfinished:  # hand them to another consumer at once
            await asyncio.shield(self._set_visibility(message, 0))
        self.stats.released += len(unfinished)
        if unfinished:
            log.warning("released_unfinished", messages=[m["MessageId"] for m in unfinished])

    async def _stamp_health(self) -> None:
        every = max(1.0, self._settings.health_max_age_s / 3)
        while True:
            self.touch_health()
            await asyncio.sleep(every)

    async def _report_periodically(self) -> None:
        while True:
            before, start = self.rows_written, time.monotonic()
            await asyncio.sleep(self._settings.summary_interval_s)
            rows = self.rows_written - before
            self._log_summary(
                "poller_summary", rows_per_s=round(rows / (time.monotonic() - start), 1)
            )
            metrics, self._metrics = self._metrics, LoadMetrics()
            metrics.emit(InFlight=len(self._tasks), Window=self._loader.writer.window.limit)
            self._emit_contention()

    def _emit_contention(self) -> None:
        """Per table that throttled: its throttles since the last summary and, once
        its pace is engaged, the rate this process sends at (requests a second)."""
        writer = self._loader.writer
        rates = writer.pace_rates()
        for table, count in writer.table_throttles.items():
            values = {"Throttles": float(count - self._throttles_seen.get(table, 0))}
            if table in rates:
                values["PaceRate"] = rates[table]
            emit_metrics({"Service": "loader", "Table": table}, **values)
        self._throttles_seen = dict(writer.table_throttles)

    def _log_summary(self, event: str, **extra: Any) -> None:
        writer = self._loader.writer
        log.info(
            event,
            pid=os.getpid(),
            received=self.stats.received,
            deleted=self.stats.deleted,
            failed=self.stats.failed,
            released=self.stats.released,
            rows_written=self.rows_written,
            in_flight=len(self._tasks),
            window=writer.window.limit,
            window_decreases=writer.window.decreases,
            throttles=writer.throttles,
            table_throttles=dict(writer.table_throttles),
            paces=writer.pace_rates(),
            **extra,
        )

    @property
    def health_path(self) -> Path:
        return health_path(self._settings, os.getpid())

    def touch_health(self) -> None:
        """Refresh this process's liveness stamp, which ``worker health`` reads."""
        self.health_path.write_text(f"{time.time():.0f}\n")


def _receives(message: dict[str, Any]) -> int:
    return receive_count(message.get("Attributes", {}))


async def _succeeded(task: asyncio.Task[bool]) -> bool:
    """Wait for ``task`` to end, whatever its fate; whether it did its message."""
    await asyncio.wait({task})
    return not task.cancelled() and task.exception() is None and task.result()


def health_path(settings: PollSettings, pid: int) -> Path:
    return Path(f"{settings.health_file}.{pid}")


def check_health(settings: PollSettings, *, now: float | None = None) -> tuple[bool, str]:
    """Whether every live poller process stamped its health file recently enough.

    Stamps of processes that no longer exist (killed without a chance to remove
    theirs) are ignored: a dead sibling is the supervisor's business, not a
    reason to fail the live ones.
    """
    pattern = Path(settings.health_file)
    now = time.time() if now is None else now
    live = [s for s in pattern.parent.glob(pattern.name + ".*") if _alive(s.suffix[1:])]
    if not live:
        return False, f"no live poller stamps {settings.health_file}.<pid>"
    for stamp in sorted(live):
        age = now - stamp.stat().st_mtime
        if age > settings.health_max_age_s:
            return False, f"{stamp} is {age:.0f}s old (limit {settings.health_max_age_s}s)"
    return True, f"{len(live)} poller(s) alive"


def _alive(pid_text: str) -> bool:
    try:
        os.kill(int(pid_text), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True
