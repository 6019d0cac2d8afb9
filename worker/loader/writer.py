"""The batch writer: chunk, bounded window, adaptive backoff (ARCHITECTURE.md, "Writing").

- Each BatchWriteItem carries at most 25 items; keys are unique per request
  because ``worker.loader.items`` already keeps one item per key. An item is a
  dict of attribute values or, from the fused encoder, its JSON text, which
  the request body embeds as it is; UnprocessedItems come back as dicts. 25 items of at most
  400 KB stay under the 16 MB request limit.
- One ``Window`` per process bounds the requests in flight across every table
  of every file. A slot is taken *before* a chunk's task is created, so a large
  table never queues more than the window's worth of work.
- UnprocessedItems, throttling exceptions, 5xx and connection errors resend
  only what was not written, after exponential backoff with full jitter, up to
  ``max_attempts`` in all. A throttling error, or a response that leaves at
  least half its items unprocessed (DynamoDB's way of saying the table is at
  capacity), halves the window, once per round trip; a few unprocessed items
  (one hot partition) are only resent, since shrinking the shared window for
  them would slow every other table. Every clean response grows the window by
  about one request per window's worth of successes.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from worker.core.aws import (
    ENVIRONMENT_FAILURES,
    THROTTLING_CODES,
    TRANSIENT_EXCEPTIONS,
    environment_error,
    error_code,
    is_server_error,
)
from worker.core.config import WriteSettings
from worker.core.errors import InvalidTable, TransientAwsError, WorkerError, WriteThrottled
from worker.loader.items import Encoded

if TYPE_CHECKING:
    from worker.loader.ddb_http import BatchWriteClient

BATCH_SIZE = 25


class Window:
    """A shared, adaptive (AIMD) bound on in-flight requests, FIFO-fair."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self._limit = float(maximum)
        self._in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._epoch = 0
        self.smallest = maximum
        self.decreases = 0

    @property
    def limit(self) -> int:
        return max(1, int(self._limit))

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def acquire(self) -> Slot:
        if not self._waiters and self._in_flight < self.limit:
            self._in_flight += 1
            return Slot(self, self._epoch)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the slot was granted as we were cancelled
            raise
        return Slot(self, self._epoch)

    def on_success(self) -> None:
        self._limit = min(float(self.maximum), self._limit + 1.0 / self._limit)
        self._wake()

    def on_throttle(self, epoch: int) -> None:
        """Halve the window, once per round trip: later echoes of it are ignored."""
        if epoch != self._epoch:
            return
        self._epoch += 1
        self._limit = max(1.0, self._limit / 2)
        self.decreases += 1
        self.smallest = min(self.smallest, self.limit)

    def _release(self) -> None:
        self._in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._in_flight < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._in_flight += 1
                waiter.set_result(None)


class Slot:
    """One place in the window; releasing it twice is harmless."""

    __slots__ = ("_held", "epoch", "window")

    def __init__(self, window: Window, epoch: int) -> None:
        self.window = window
        self.epoch = epoch
        self._held = True

    def on_done(self, _task: asyncio.Task[None]) -> None:
        """Release the slot when its task ends, however it ends: a task cancelled
        before it ever ran never reaches its own ``release``."""
        self.release()

    def release(self) -> None:
        if self._held:
            self._held = False
            self.window._release()


@dataclass(slots=True)
class WriteStats:
    written: int = 0
    requests: int = 0
    retries: int = 0
    throttled_requests: int = 0
    unprocessed_items: int = 0
    transient_errors: int = 0
    ms: int = 0


class BatchWriter:
    """Writes items to DynamoDB tables through one shared ``Window``."""

    def __init__(
        self,
        client: BatchWriteClient,
        settings: WriteSettings,
        *,
        window: Window | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._client = client
        self._settings = settings
        self.window = window or Window(settings.max_in_flight)
        self.progress: Counter[str] = Counter()  # items written per table, for displays
        self.throttles = 0  # throttled requests and mostly-refused responses, in all
        self._sleep = sleep
        self._jitter = jitter

    @property
    def written(self) -> int:
        """Items written in all, counted as each response arrives."""
        return sum(self.progress.values())

    async def write(
        self,
        table: str,
        items: Sequence[Encoded],
        *,
        on_dispatched: Callable[[], object] | None = None,
        stats: WriteStats | None = None,
    ) -> WriteStats:
        """Write every item, or raise WriteThrottled, TransientAwsError or InvalidTable.

        ``on_dispatched`` is called once every chunk has its request under way; from
        then on only the chunks still being retried hold items, so the caller may
        start preparing more work while the retries finish. ``stats``, when given,
        is added to (a table written in several calls).
        """
        stats = WriteStats() if stats is None else stats
        start = time.perf_counter()
        try:
            async with asyncio.TaskGroup() as group:
                for offset in range(0, len(items), BATCH_SIZE):
                    slot = await self.window.acquire()
                    task = group.create_task(
                        self._send(table, items[offset : offset + BATCH_SIZE], slot, stats)
                    )
                    task.add_done_callback(slot.on_done)
                del items  # the chunks hold what is left to write
                if on_dispatched is not None:
                    on_dispatched()
        except BaseExceptionGroup as group_error:
            raise _first_worker_error(group_error) from None
        finally:
            stats.ms += round((time.perf_counter() - start) * 1000)
        return stats

    async def _send(
        self, table: str, pending: Sequence[Encoded], slot: Slot, stats: WriteStats
    ) -> None:
        backoff = self._settings.backoff
        try:
            attempt = 0
            while True:
                attempt += 1
                stats.requests += 1
                pending = await self._attempt(table, pending, slot, stats)
                if not pending:
                    return
                if not backoff.retries_left(attempt):
                    break
                stats.retries += 1
                slot.release()  # no place in the window is held through a backoff sleep
                await self._sleep(backoff.delay(attempt, self._jitter))
                slot = await self.window.acquire()
        finally:
            slot.release()
        raise WriteThrottled(
            f"{len(pending)} items still unwritten after {backoff.attempts} attempts",
            table=table,
            unwritten=len(pending),
        )

    async def _attempt(
        self, table: str, pending: Sequence[Encoded], slot: Slot, stats: WriteStats
    ) -> Sequence[Encoded]:
        """One BatchWriteItem; returns the items still to write."""
        request = {table: [{"PutRequest": {"Item": item}} for item in pending]}
        try:
            response = await self._client.batch_write_item(RequestItems=request)
        except ClientError as exc:
            code = error_code(exc)
            if code in THROTTLING_CODES:
                stats.throttled_requests += 1
                self.throttles += 1
                self.window.on_throttle(slot.epoch)
                return pending
            if is_server_error(exc):
                stats.transient_errors += 1
                return pending
            if code == "ResourceNotFoundException":
                raise TransientAwsError(f"table {table!r} not found on write", table=table) from exc
            raise InvalidTable(f"DynamoDB rejected a batch: {code}: {exc}", table=table) from exc
        except ENVIRONMENT_FAILURES as exc:
            raise environment_error(exc) from None
        except TRANSIENT_EXCEPTIONS:
            stats.transient_errors += 1
            return pending
        left = response.get("UnprocessedItems", {}).get(table, [])
        stats.written += len(pending) - len(left)
        self.progress[table] += len(pending) - len(left)
        if not left:
            self.window.on_success()
            return []
        stats.unprocessed_items += len(left)
        if 2 * len(left) >= len(pending):  # mostly refused: the table is at capacity
            self.throttles += 1
            self.window.on_throttle(slot.epoch)
        return [request["PutRequest"]["Item"] for request in left]


def _first_worker_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report from a failed TaskGroup: its first WorkerError, if any."""
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        error = stack.pop(0)
        if isinstance(error, BaseExceptionGroup):
            stack.extend(error.exceptions)
        else:
            leaves.append(error)
    for error in leaves:
        if isinstance(error, WorkerError):
            return error
    return leaves[0]
