"""Many writers, one table (benchmarks.fleet and WRITE_PACE=adaptive): the
simulation runs on a virtual clock, and the pace's rules each hold."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
from botocore.exceptions import ClientError

from benchmarks.fleet import VirtualLoop, run
from worker.core.backoff import Backoff
from worker.core.config import WriteSettings
from worker.core.errors import WriteThrottled
from worker.loader.writer import BatchWriter, Pace, Window

ADAPTIVE = WriteSettings(pace="adaptive")


def on_virtual_time(main: Any) -> Any:
    loop = VirtualLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def test_the_virtual_clock_jumps_to_the_next_timer() -> None:
    async def main() -> float:
        await asyncio.sleep(3600)
        return asyncio.get_running_loop().time()

    assert on_virtual_time(main) == pytest.approx(3600)


@pytest.mark.parametrize("pace", ["adaptive", "window"])
def test_the_simulation_runs_small_and_reports_each_phase(pace: str) -> None:
    outcome = run(3, seconds=8, settings=WriteSettings(pace=pace))  # type: ignore[arg-type]
    assert outcome.writers == 3 and outcome.events_s < 60
    assert 0.5 < outcome.before.utilisation <= 1.1 and 0.5 < outcome.after.utilisation <= 1.1
    assert 0 < outcome.before.jain <= 1 and outcome.failed + outcome.finished > 0


def test_many_adaptive_writers_share_the_table_fairly_without_exhausting_a_message() -> None:
    outcome = run(100, seconds=20, settings=ADAPTIVE)  # the virtual clock: the same every run
    assert outcome.failed == 0 and outcome.before.resends < 1 and outcome.after.resends < 1
    assert outcome.before.utilisation > 0.9 and outcome.after.utilisation > 0.9
    assert min(outcome.before.jain, outcome.after.jain) > 0.85  # in step, without jitter: 0.73


def test_the_pace_engages_on_a_measured_throttle_and_slows_to_a_floor() -> None:
    async def main() -> list[float | None]:
        pace = Pace()
        seen = [pace.rate]
        pace.answered(throttled=True)  # nothing measured yet: it stays off
        seen.append(pace.rate)
        for _ in range(400):  # 400 responses in 1 s: a measured rate
            await asyncio.sleep(0.0025)
            pace.answered(throttled=False)
        pace.answered(throttled=True)
        seen.append(pace.rate)
        for _ in range(60):
            pace.answered(throttled=True)
        seen.append(pace.rate)
        return seen

    off, still_off, engaged, floor = on_virtual_time(main)
    assert off is None and still_off is None
    assert engaged is not None and 0 < engaged < 400  # 0.7x the measured rate (~80% of 400)
    assert floor == Pace.MIN_RATE


@pytest.mark.parametrize("jitter", [0.0, 0.5, 1.0])
def test_the_pace_spaces_requests_by_its_rate_drawn_from_half_to_one_and_a_half(
    jitter: float,
) -> None:
    async def main() -> list[float]:
        pace = Pace(jitter=lambda: jitter)
        pace.rate = 4.0
        loop = asyncio.get_running_loop()
        times = []
        for _ in range(5):
            await pace.wait()
            times.append(loop.time())
        return times

    times = on_virtual_time(main)
    gap = round((0.5 + jitter) / 4.0, 6)  # a fleet's writers never move in step
    assert [round(b - a, 6) for a, b in itertools.pairwise(times)] == [gap] * 4


def test_one_overload_halves_the_window_once() -> None:
    window = Window(8)
    slot_epoch = 0
    assert window.on_throttle(slot_epoch) is True
    assert window.on_throttle(slot_epoch) is False  # an echo of the same round trip
    assert window.limit == 4 and window.on_throttle(1) is True and window.limit == 2


class OneAtATime:
    """A table that writes one item of each request and refuses the rest."""

    def __init__(self) -> None:
        self.calls = 0

    async def batch_write_item(self, *, RequestItems: Any) -> Any:  # noqa: N803
        self.calls += 1
        ((table, requests),) = RequestItems.items()
        return {"UnprocessedItems": {table: requests[1:]} if requests[1:] else {}}


class Refusing:
    async def batch_write_item(self, *, RequestItems: Any) -> Any:  # noqa: N803
        error = {"Error": {"Code": "ProvisionedThroughputExceededException"}}
        raise ClientError(error, "BatchWriteItem")  # type: ignore[arg-type]


async def no_sleep(_: float) -> None:
    return None


async def test_attempts_that_write_something_never_exhaust_a_chunk() -> None:
    settings = WriteSettings(backoff=Backoff(base_s=0, cap_s=0, attempts=2))
    table = OneAtATime()
    writer = BatchWriter(table, settings, sleep=no_sleep)
    stats = await writer.write("t", [{"id": {"S": str(i)}} for i in range(25)])
    assert stats.written == 25 and table.calls == 25  # 25 attempts; 2 allowed in a row idle


async def test_attempts_in_a_row_that_write_nothing_still_fail_the_chunk() -> None:
    settings = WriteSettings(backoff=Backoff(base_s=0, cap_s=0, attempts=3))
    writer = BatchWriter(Refusing(), settings, sleep=no_sleep)
    with pytest.raises(WriteThrottled, match="3 attempts in a row"):
        await writer.write("t", [{"id": {"S": "a"}}])


class Refusing_share:  # noqa: N801 - a table named by what it does
    """A table that refuses ``share`` of every request's items."""

    def __init__(self, share: float) -> None:
        self.share = share

    async def batch_write_item(self, *, RequestItems: Any) -> Any:  # noqa: N803
        await asyncio.sleep(0.05)
        ((table, requests),) = RequestItems.items()
        refused = requests[: int(len(requests) * self.share)]
        return {"UnprocessedItems": {table: refused} if refused else {}}


@pytest.mark.parametrize(("share", "paced"), [(0.44, False), (0.6, True)])
def test_a_request_mostly_refused_engages_the_tables_pace_and_a_few_items_do_not(
    share: float, paced: bool
) -> None:
    async def main() -> float | None:
        writer = BatchWriter(Refusing_share(share), ADAPTIVE, sleep=asyncio.sleep)
        await writer.write("t", [{"id": {"S": str(i)}} for i in range(20_000)])  # 1 s and more
        return writer.paces["t"].rate

    rate = on_virtual_time(main)
    assert (rate is not None) is paced


def test_most_of_a_small_resend_refused_is_not_a_throttle() -> None:
    """Two items sent, one refused: chance or a hot partition, not a table at capacity."""

    async def main() -> tuple[int, float | None]:
        writer = BatchWriter(Refusing_share(0.5), ADAPTIVE, sleep=asyncio.sleep)
        for _ in range(40):  # 2 s and more of requests: a measured rate
            await writer.write("t", [{"id": {"S": "a"}}, {"id": {"S": "b"}}])
        return writer.throttles, writer.paces["t"].rate

    throttles, rate = on_virtual_time(main)
    assert throttles == 0 and rate is None


def test_a_rate_that_recovers_is_used_by_requests_already_waiting() -> None:
    """A burst of cuts must not book sends far ahead: waiting requests go at the
    rate of the moment, looked at again every RECHECK_S."""

    async def main() -> list[float]:
        pace = Pace(jitter=lambda: 0.5)  # gaps of exactly 1 / rate
        pace.rate = Pace.MIN_RATE  # one request every 20 s
        loop = asyncio.get_running_loop()
        sent: list[float] = []

        async def request() -> None:
            await pace.wait()
            sent.append(loop.time())

        waiting = [asyncio.ensure_future(request()) for _ in range(3)]
        await asyncio.sleep(1.0)
        pace.rate = 10.0  # recovered
        await asyncio.gather(*waiting)
        return sent

    first, second, third = on_virtual_time(main)
    assert first < 1e-6 and second <= 1.0 + Pace.RECHECK_S
    assert third - second == pytest.approx(0.1)


def test_a_slowed_pace_climbs_back_with_time_while_a_request_waits_not_with_answers() -> None:
    """Growth by answers would keep a writer at the floor there: it gets one
    answer in 20 s. Growth by time brings it back as fast as any other."""

    async def main() -> tuple[float | None, float | None, float, float | None]:
        pace = Pace(jitter=lambda: 0.5)
        for _ in range(400):
            await asyncio.sleep(0.0025)
            pace.answered(throttled=False)
        for _ in range(60):
            pace.answered(throttled=True)  # engaged, then cut to the floor
        floor = pace.rate
        for _ in range(100):
            pace.answered(throttled=False)
        answered = pace.rate
        loop = asyncio.get_running_loop()
        await pace.wait()
        start = loop.time()
        await pace.wait()  # 20 s away at the floor
        return floor, answered, loop.time() - start, pace.rate

    floor, answered, waited, climbed = on_virtual_time(main)
    assert floor == answered == Pace.MIN_RATE
    assert waited < 5 and climbed is not None and climbed > 10 * Pace.MIN_RATE
