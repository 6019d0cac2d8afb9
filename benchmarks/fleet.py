"""Many writers, one table: the project's own ``BatchWriter`` (its ``Window``,
``Slot`` and ``core.backoff`` waits) driven on a virtual clock against a
simulated DynamoDB table, for 1 to 1,000 writer processes.

The table: ``TABLE_WCU`` write units a second over ``PARTITIONS`` partitions of
``PARTITION_WCU`` each (token buckets holding one second of capacity), items of
one unit, keys spread evenly; its capacity halves at ``STEP_S``. A request is
answered after ``LATENCY_S``: the items the buckets hold tokens for are
written, the rest come back as UnprocessedItems, and a request none of whose
items fit is refused whole (``ProvisionedThroughputExceededException``), as
DynamoDB does.

A writer is one process: one ``BatchWriter`` and its window, loading
``MESSAGES_AT_ONCE`` messages of ``ROWS_PER_MESSAGE`` rows at a time, one after
another. A message whose rows were not all written (``WriteThrottled``) is a
failed message: SQS would deliver it again, and every row it wrote is written
again, so those rows count as wasted.

Printed per N (before / after the step): utilisation of the table's capacity,
throttled requests (refused whole or in part), items resent per item written,
Jain's fairness of the items each writer wrote, messages that exhausted their
attempts out of those finished, the share of written items wasted, and the
seconds until the throttling settles after the step.

    python -m benchmarks.fleet                  # WRITE_PACE=adaptive, 1 to 1,000 writers
    python -m benchmarks.fleet --pace window --writers 1 10 50 200   # the window alone

The window alone at 1,000 writers sends about 100,000 requests a simulated
second, and takes the better part of an hour here; the adaptive pace about
2,000.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import selectors
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from worker.core.config import WriteSettings
from worker.core.errors import WriteThrottled
from worker.loader.writer import BatchWriter, WriteStats

TABLE_WCU = 40_000
PARTITIONS = 64  # drawn with getrandbits(6)
PARTITION_WCU = 1_000
LATENCY_S = 0.010
STEP_S = 60.0
MESSAGES_AT_ONCE = 4
ROWS_PER_MESSAGE = 10_000
BIN_S = 1.0


class _Selector(selectors.SelectSelector):
    """Never waits: with nothing ready, the clock jumps to the next timer."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[Any]:
        ready = super().select(0)
        if not ready:
            # a nanosecond a turn even when callbacks are ready: a wait shorter than
            # the loop's resolution (a token bucket's last fraction) then ends too
            self.now += timeout or 1e-9
        return ready


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock is virtual: a simulated hour takes what its
    events take to run, not an hour."""

    def __init__(self) -> None:
        self._clock = _Selector()
        super().__init__(self._clock)

    def time(self) -> float:
        return self._clock.now


class _Bucket:
    __slots__ = ("last", "rate", "tokens")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate  # one second of burst
        self.last = 0.0

    def refill(self, now: float) -> None:
        self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now


@dataclass
class Bin:
    sent: int = 0
    written: int = 0
    requests: int = 0
    throttled: int = 0  # requests refused whole or in part


class SimTable:
    """A ``BatchWriteClient`` that answers as a table at its limits does."""

    def __init__(self, rng: random.Random, step_s: float = STEP_S) -> None:
        self._rng = rng
        self._step_s = step_s
        self._table = _Bucket(TABLE_WCU)
        self._partitions = [_Bucket(PARTITION_WCU) for _ in range(PARTITIONS)]
        self.bins: defaultdict[int, Bin] = defaultdict(Bin)
        self._stepped = False

    def _step(self, now: float) -> None:
        if not self._stepped and now >= self._step_s:
            self._stepped = True
            for bucket in (self._table, *self._partitions):
                bucket.refill(now)
                bucket.rate /= 2
                bucket.tokens = min(bucket.tokens, bucket.rate)

    async def batch_write_item(self, *, RequestItems: Any) -> Any:  # noqa: N803
        await asyncio.sleep(LATENCY_S)
        now = asyncio.get_running_loop().time()
        self._step(now)
        ((table, requests),) = RequestItems.items()
        total = self._table
        total.refill(now)
        partitions, draw = self._partitions, self._rng.getrandbits
        left = []
        for request in requests:
            partition = partitions[draw(6)]  # PARTITIONS = 64: keys spread evenly
            if partition.last != now:
                partition.refill(now)
            if partition.tokens >= 1 and total.tokens >= 1:
                partition.tokens -= 1
                total.tokens -= 1
            else:
                left.append(request)
        stats = self.bins[int(now // BIN_S)]
        stats.requests += 1
        stats.sent += len(requests)
        stats.written += len(requests) - len(left)
        if left:
            stats.throttled += 1
        if len(left) == len(requests):
            error = {"Error": {"Code": "ProvisionedThroughputExceededException"}}
            raise ClientError(error, "BatchWriteItem")  # type: ignore[arg-type]
        return {"UnprocessedItems": {table: left} if left else {}}


@dataclass
class Writer:
    """One process: its writer, and what it achieved."""

    batch: BatchWriter
    written: defaultdict[int, int] = field(default_factory=lambda: defaultdict(int))
    finished: int = 0
    failed: int = 0
    wasted: int = 0


ITEMS = [{"id": {"S": str(row)}} for row in range(ROWS_PER_MESSAGE)]  # keys do not matter here


async def _process(writer: Writer, stop: float) -> None:
    async def message() -> None:
        items = ITEMS
        stats = WriteStats()
        try:
            await writer.batch.write("t", items, stats=stats)
            writer.finished += 1
        except WriteThrottled:
            writer.failed += 1
            writer.wasted += stats.written  # written again when SQS redelivers it

    loop = asyncio.get_running_loop()
    running: set[asyncio.Task[None]] = set()
    while loop.time() < stop:
        while len(running) < MESSAGES_AT_ONCE:
            running.add(asyncio.ensure_future(message()))
        left = stop - loop.time()
        _, running = await asyncio.wait(running, timeout=left, return_when=asyncio.FIRST_COMPLETED)
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)


@dataclass
class Phase:
    utilisation: float
    throttled: float
    resends: float
    jain: float


@dataclass
class Outcome:
    writers: int
    before: Phase
    after: Phase
    finished: int
    failed: int
    wasted: float
    settle_s: float | None
    events_s: float


def _phase(table: SimTable, writers: Sequence[Writer], start: float, end: float,
           capacity: float) -> Phase:  # fmt: skip
    numbers = range(int(start // BIN_S), int(end // BIN_S))
    start, end = numbers[0] * BIN_S, (numbers[-1] + 1) * BIN_S  # whole bins
    bins = [table.bins[b] for b in numbers]
    sent, written = sum(b.sent for b in bins), sum(b.written for b in bins)
    requests, throttled = sum(b.requests for b in bins), sum(b.throttled for b in bins)
    return Phase(
        utilisation=written / (capacity * (end - start)),
        throttled=throttled / max(requests, 1),
        resends=(sent - written) / max(written, 1),
        jain=_jain([_share(w, start, end) for w in writers]),
    )


def _share(writer: Writer, start: float, end: float) -> float:
    return float(sum(v for b, v in writer.written.items() if start <= b * BIN_S < end))


def _jain(values: Sequence[float]) -> float:
    total, squares = sum(values), sum(v * v for v in values)
    return total * total / (len(values) * squares) if squares else 1.0


def run(writers: int, seconds: float = 2 * STEP_S, seed: int = 1,
        settings: WriteSettings | None = None) -> Outcome:  # fmt: skip
    """Simulate ``writers`` processes on one table for ``seconds`` of virtual time."""
    rng = random.Random(seed)
    step = seconds / 2
    table = SimTable(rng, step)
    settings = settings or WriteSettings()
    loop = VirtualLoop()
    started = time.perf_counter()

    async def main() -> list[Writer]:
        fleet = [
            Writer(BatchWriter(table, settings, sleep=asyncio.sleep, jitter=rng.random))
            for _ in range(writers)
        ]
        for writer in fleet:
            _count_writes(writer)
        await asyncio.gather(*(_process(w, seconds) for w in fleet))
        return fleet

    try:
        fleet = loop.run_until_complete(main())
    finally:
        loop.close()
    warm = min(10.0, step / 3)
    settle = _settle(table, step, seconds)
    return Outcome(
        writers=writers,
        before=_phase(table, fleet, warm, step, TABLE_WCU),
        after=_phase(table, fleet, step + warm, seconds, TABLE_WCU / 2),
        finished=sum(w.finished for w in fleet),
        failed=sum(w.failed for w in fleet),
        wasted=sum(w.wasted for w in fleet) / max(sum(b.written for b in table.bins.values()), 1),
        settle_s=settle,
        events_s=time.perf_counter() - started,
    )


def _count_writes(writer: Writer) -> None:
    """Count each writer's written items per bin, from its own progress counter."""
    batch = writer.batch
    progress = batch.progress

    class Counting(type(progress)):  # type: ignore[misc]
        def __setitem__(self, key: str, value: int) -> None:
            now = asyncio.get_running_loop().time()
            writer.written[int(now // BIN_S)] += value - self.get(key, 0)
            super().__setitem__(key, value)

    batch.progress = Counting(progress)


def _settle(table: SimTable, step: float, end: float) -> float | None:
    """Seconds after the step until no later second has more than 10% of its
    items refused."""
    bins = range(int(step // BIN_S), int(end // BIN_S))
    calm = None
    for b in bins:
        stats = table.bins[b]
        if stats.sent and (stats.sent - stats.written) / stats.sent > 0.10:
            calm = None
        elif calm is None:
            calm = b * BIN_S - step
    return calm


def _row(o: Outcome) -> str:
    def pair(a: float, b: float, fmt: str) -> str:
        return f"{a:{fmt}} / {b:{fmt}}"

    settle = "-" if o.settle_s is None else f"{o.settle_s:.0f} s"
    return (
        f"| {o.writers} | {pair(o.before.utilisation, o.after.utilisation, '.2f')} "
        f"| {pair(100 * o.before.throttled, 100 * o.after.throttled, '.1f')} "
        f"| {pair(o.before.resends, o.after.resends, '.2f')} "
        f"| {pair(o.before.jain, o.after.jain, '.2f')} "
        f"| {o.failed} / {o.finished + o.failed} | {100 * o.wasted:.0f}% | {settle} "
        f"| {o.events_s:.0f} s |"
    )


HEADER = (
    "| writers | utilisation | throttled % | resends per item written | Jain "
    "| messages failed / ended | wasted | settles in | run time |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", type=int, nargs="*", default=[1, 10, 50, 200, 1000])
    parser.add_argument("--seconds", type=float, default=2 * STEP_S)
    parser.add_argument("--pace", choices=["adaptive", "window"], default="adaptive")
    args = parser.parse_args(argv)
    settings = WriteSettings(pace=args.pace)
    print(f"WRITE_PACE={args.pace}, {args.seconds:.0f} simulated seconds, capacity halved "
          f"at {args.seconds / 2:.0f} s (before / after)")  # fmt: skip
    print(HEADER)
    for writers in args.writers:
        print(_row(run(writers, args.seconds, settings=settings)), flush=True)


if __name__ == "__main__":
    main()
