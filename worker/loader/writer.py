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
  only what was not written, after exponential backoff with full jitter (see
  the last point for when a chunk gives up). A throttling error, or a response
  that leaves unprocessed at least half of a full request (13 items: DynamoDB's
  way of saying the table is at capacity), halves the window, once per round
  trip; a few unprocessed items (one hot partition) are only resent, since
  shrinking the shared window for them would slow every other table. Every
  clean response grows the window by about one request per window's worth of
  successes.
- Each table also gets a send rate (``Pace``, ``WRITE_PACE=adaptive``, the
  default) from its first throttle on: the window cannot go below one request
  per round trip, so many processes on one table would keep sending far more
  than it takes (``benchmarks.fleet``); a rate can, down to one request every
  20 s. It falls on each throttle and climbs with time, so a fleet shares the
  table fairly. The price: refusals that come whatever the rate (the fault
  proxy's random ones) hold it low, as a fleet's would; ``WRITE_PACE=window``
  keeps the window alone, for one process that owns its table.
- A chunk fails only after ``max_attempts`` attempts in a row that wrote
  nothing: an attempt that writes some of its items starts the count again,
  so a slow table, fairly shared, never exhausts a message that progresses.
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
from botocore.retries.adaptive import RateClocker
from botocore.retries.throttling import CubicCalculator

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

    def on_throttle(self, epoch: int) -> bool:
        """Halve the window, once per round trip: later echoes of it are ignored.
        Whether this throttle was the first of its round trip."""
        if epoch != self._epoch:
            return False
        self._epoch += 1
        self._limit = max(1.0, self._limit / 2)
        self.decreases += 1
        self.smallest = min(self.smallest, self.limit)
        return True

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


class _LoopClock:
    """botocore's clock interface, on the event loop's clock."""

    def current_time(self) -> float:
        return asyncio.get_running_loop().time()


class Pace:
    """One table's send rate, set by its throttles with botocore's CUBIC calculator
    (as its adaptive retry mode sets a client's), off until the first throttle
    that comes after a rate has been measured.

    1. Requests take turns: each is sent ``gap / rate`` after the one before, at
       the rate of the moment, ``gap`` drawn from 0.5 to 1.5: without it the
       writers of a fleet that started together stay in step, and the same
       ones lose every race for the table's capacity.
    2. The rate falls on the first throttle of a round trip, to 0.7x the rate
       measured, and climbs with the time since, looked at every ``RECHECK_S``
       while a request waits for its turn. Growth follows time, not answers: a
       writer the fleet has slowed to one request in seconds climbs back as
       fast as one sending hundreds. (botocore grows per answer, bounded by
       twice the rate measured, so there the slow stay slow: at 1,000 writers
       a fairness of 0.2.)
    3. It climbs only while requests wait: a process that sends less than its
       rate allows does not earn a higher one.
    """

    MIN_RATE = 0.05  # requests a second: a fleet's share can be below botocore's 0.5
    RECHECK_S = 0.5
    CLIMB = 0.1  # CUBIC's scale constant, requests a second per second cubed

    def __init__(self, jitter: Callable[[], float] = random.random) -> None:
        self._jitter = jitter
        self._clock = _LoopClock()
        self._clocker = RateClocker(self._clock)
        self._cubic = CubicCalculator(
            starting_max_rate=0, start_time=self._clock.current_time(), scale_constant=self.CLIMB
        )
        self.rate: float | None = None  # requests a second; None: not engaged
        self._last = float("-inf")  # when the last request was sent
        self._turn = asyncio.Lock()

    async def wait(self) -> None:
        """Wait for this request's turn and send time."""
        if self.rate is None:
            return
        async with self._turn:
            gap = 0.5 + self._jitter()  # in units of 1 / rate: a fleet never moves in step
            while self.rate is not None:
                delay = self._last + gap / self.rate - self._clock.current_time()
                if delay <= 0:
                    break
                await asyncio.sleep(min(delay, self.RECHECK_S))
                climbed = self._cubic.success_received(self._clock.current_time())
                self.rate = max(self.rate, climbed)
            self._last = self._clock.current_time()

    def answered(self, *, throttled: bool) -> None:
        """One response: the first throttle of its round trip, or not."""
        measured = self._clocker.record()
        if not throttled or (self.rate is None and not measured):
            return  # a throttle before any rate is measured only halves the window
        sent = measured if self.rate is None else min(measured, self.rate)
        now = self._clock.current_time()
        self.rate = max(self.MIN_RATE, self._cubic.error_received(sent, now))


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
        self.table_throttles: Counter[str] = Counter()  # throttles and mostly refused, per table
        self.paces: dict[str, Pace] = {}  # WRITE_PACE=adaptive: each table's rate
        self._sleep = sleep
        self._jitter = jitter

    @property
    def written(self) -> int:
        """Items written in all, counted as each response arrives."""
        return sum(self.progress.values())

    @property
    def throttles(self) -> int:
        """Throttled requests and mostly refused responses, in all."""
        return sum(self.table_throttles.values())

    def pace_rates(self) -> dict[str, float]:
        """Each engaged table's send rate, requests a second (for summaries)."""
        return {t: round(p.rate, 2) for t, p in self.paces.items() if p.rate is not None}

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
        pace = self._pace(table)
        try:
            attempt = 0  # attempts in a row that wrote nothing
            while True:
                attempt += 1
                stats.requests += 1
                if pace is not None:
                    await pace.wait()
                before = len(pending)
                pending = await self._attempt(table, pending, slot, stats, pace)
                if not pending:
                    return
                if len(pending) < before:
                    attempt = 0
                elif not backoff.retries_left(attempt):
                    break
                stats.retries += 1
                slot.release()  # no place in the window is held through a backoff sleep
                await self._sleep(backoff.delay(attempt, self._jitter))
                slot = await self.window.acquire()
        finally:
            slot.release()
        raise WriteThrottled(
            f"{len(pending)} items still unwritten after {backoff.attempts} attempts in a row "
            "that wrote nothing",
            table=table,
            unwritten=len(pending),
        )

    def _pace(self, table: str) -> Pace | None:
        if self._settings.pace != "adaptive":
            return None
        return self.paces.get(table) or self.paces.setdefault(table, Pace(self._jitter))

    async def _attempt(
        self,
        table: str,
        pending: Sequence[Encoded],
        slot: Slot,
        stats: WriteStats,
        pace: Pace | None,
    ) -> Sequence[Encoded]:
        """One BatchWriteItem; returns the items still to write."""
        request = {table: [{"PutRequest": {"Item": item}} for item in pending]}
        try:
            response = await self._client.batch_write_item(RequestItems=request)
        except ClientError as exc:
            code = error_code(exc)
            if code in THROTTLING_CODES:
                stats.throttled_requests += 1
                fresh = self._throttled(table, slot)
                if pace is not None:
                    pace.answered(throttled=fresh)
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
        stats.unprocessed_items += len(left)
        self._refused(table, len(left), len(pending), slot, pace)
        return [request["PutRequest"]["Item"] for request in left]

    def _refused(self, table: str, refused: int, sent: int, slot: Slot, pace: Pace | None) -> None:
        """What a response's unprocessed items say: most of a request refused, the
        table is at capacity (a throttle); a few, or most of a small resend, a
        hot partition or chance (only resent: a resend of two items that loses
        one says little, and taken as a throttle it held the pace of a table
        refusing a fifth of its items at random near one request a second)."""
        mostly = 2 * refused >= max(sent, BATCH_SIZE)
        fresh = self._throttled(table, slot) if mostly else False
        if pace is not None:
            pace.answered(throttled=fresh)

    def _throttled(self, table: str, slot: Slot) -> bool:
        """Count a throttle and halve the window: whether it was the round trip's first."""
        self.table_throttles[table] += 1
        return self.window.on_throttle(slot.epoch)


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
