"""The ECS poller: backpressure, heartbeat, acknowledging, draining (issue: poller)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import orjson
import pytest

from tests import factories as f
from tests.conftest import BUCKET, scan
from tests.processes import WorkerProcess
from worker.aws import Clients
from worker.config import PollSettings, Settings
from worker.loader import Loader
from worker.poller import Poller, PollStats, check_health

PollerFactory = Callable[..., Poller]


@dataclasses.dataclass
class Queues:
    url: str
    dlq_url: str


@pytest.fixture
def sqs(moto: str) -> Any:
    return boto3.client("sqs", endpoint_url=moto)


def make_queues(sqs: Any, *, visibility: int, max_receives: int = 2) -> Queues:
    dlq = sqs.create_queue(QueueName="loads-dlq")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    policy = orjson.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": str(max_receives)})
    url = sqs.create_queue(
        QueueName="loads",
        Attributes={"VisibilityTimeout": str(visibility), "RedrivePolicy": policy.decode()},
    )["QueueUrl"]
    return Queues(url, dlq)


def send(sqs: Any, queue_url: str, body: dict[str, Any]) -> str:
    return str(
        sqs.send_message(QueueUrl=queue_url, MessageBody=orjson.dumps(body).decode())["MessageId"]
    )


def depth(sqs: Any, queue_url: str) -> tuple[int, int]:
    """(visible, in flight) message counts."""
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    attrs = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=names)["Attributes"]
    return int(attrs[names[0]]), int(attrs[names[1]])


def wait_until_empty(sqs: Any, queue_url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while depth(sqs, queue_url) != (0, 0):
        assert time.monotonic() < deadline, "queue never drained"
        time.sleep(0.3)


def put_file(s3: Any, key: str, rows: int, table: str = "t") -> None:
    data = f.output_file((table, ["id", "v"], [[f"{key}-{i}", i] for i in range(rows)]))
    s3.put_object(Bucket=BUCKET, Key=key, Body=data)


@pytest.fixture
def poll_settings(settings: Settings, tmp_path: Path) -> Settings:
    poll = PollSettings(
        wait_s=1, shutdown_grace_s=2, retry_delay_s=0, health_file=str(tmp_path / "hb")
    )
    return dataclasses.replace(settings, poll=poll, max_concurrent_objects=2)


async def run_until(poller: Poller, done: Any, within_s: float = 60) -> PollStats:
    """Run ``poller`` until ``done()`` is true, then stop it and return its stats."""
    running = asyncio.create_task(poller.run())
    deadline = time.monotonic() + within_s
    while not await asyncio.to_thread(done):
        assert time.monotonic() < deadline, "condition never became true"
        assert not running.done(), running
        await asyncio.sleep(0.2)
    poller.stop()
    return await running


@pytest.fixture
def poller_for(clients: Clients, poll_settings: Settings) -> Iterator[PollerFactory]:
    def build(queue_url: str, **overrides: Any) -> Poller:
        settings = dataclasses.replace(poll_settings, **overrides)
        poll = dataclasses.replace(settings.poll, queue_url=queue_url)
        return Poller(
            Loader(settings, clients),
            clients.sqs,
            poll,
            concurrency=settings.max_concurrent_objects,
        )

    yield build


async def test_the_poller_drains_good_messages_and_bad_ones_reach_the_dlq(
    poller_for: PollerFactory, sqs: Any, s3: Any, prefix: str, logs: list[dict[str, Any]]
) -> None:
    queues = make_queues(sqs, visibility=1)
    for name in ("a.pb", "b.pb", "c.pb"):
        put_file(s3, name, rows=30)
        send(sqs, queues.url, f.plain_body(BUCKET, name))
    bad = send(sqs, queues.url, f.plain_body(BUCKET, "missing.pb"))
    malformed = send(sqs, queues.url, {"nothing": "here"})

    def drained() -> bool:
        return depth(sqs, queues.url) == (0, 0) and depth(sqs, queues.dlq_url)[0] == 2

    stats = await run_until(poller_for(queues.url), drained)
    assert stats.deleted == 3
    ddb = boto3.client("dynamodb")
    assert len(scan(ddb, f"{prefix}_t")) == 90
    dead = sqs.receive_message(QueueUrl=queues.dlq_url, MaxNumberOfMessages=10)["Messages"]
    assert {m["MessageId"] for m in dead} == {bad, malformed}
    failures = [e["message_id"] for e in logs if e["log_level"] == "error"]
    assert set(failures) == {bad, malformed}


async def test_visibility_is_extended_while_a_slow_load_runs(
    poller_for: PollerFactory, sqs: Any, s3: Any, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLOW_EXTRACT_S", "5")
    queues = make_queues(sqs, visibility=2, max_receives=5)
    put_file(s3, "slow.pb", rows=5)
    send(sqs, queues.url, f.plain_body(BUCKET, "slow.pb"))
    poller = poller_for(queues.url, table_extract="tests.plugins:slow")
    stolen: list[Any] = []

    def second_consumer_sees_nothing_until_done() -> bool:
        if poller.stats.received:  # from the moment the poller holds the message
            got = sqs.receive_message(QueueUrl=queues.url, WaitTimeSeconds=0)
            stolen.extend(got.get("Messages", []))
        return poller.stats.deleted == 1

    started = time.monotonic()
    await run_until(poller, second_consumer_sees_nothing_until_done)
    assert time.monotonic() - started > 4  # the load outlived two visibility timeouts
    assert stolen == []
    assert depth(sqs, queues.url) == (0, 0)
    assert len(scan(boto3.client("dynamodb"), f"{prefix}_t")) == 5


async def test_a_retryable_failure_comes_back_soon_not_after_the_full_timeout(
    poller_for: PollerFactory, sqs: Any, s3: Any, prefix: str
) -> None:
    queues = make_queues(sqs, visibility=60, max_receives=5)
    put_file(s3, "flaky.pb", rows=3)
    send(sqs, queues.url, f.plain_body(BUCKET, "flaky.pb"))
    poller = poller_for(queues.url, table_extract="tests.plugins:fail_once")
    started = time.monotonic()
    stats = await run_until(poller, lambda: poller.stats.deleted == 1, within_s=30)
    assert stats.failed == 1 and stats.deleted == 1
    assert time.monotonic() - started < 20  # well inside the 60 s visibility timeout


async def test_messages_a_long_poll_returns_after_the_stop_are_released_at_once(
    poller_for: PollerFactory, poll_settings: Settings, sqs: Any
) -> None:
    queues = make_queues(sqs, visibility=120)
    poller = poller_for(queues.url, poll=dataclasses.replace(poll_settings.poll, wait_s=3))
    running = asyncio.create_task(poller.run())
    await asyncio.sleep(1.0)  # the poller is inside its 3 s long poll
    poller.stop()
    await asyncio.to_thread(send, sqs, queues.url, f.plain_body(BUCKET, "late.pb"))
    stats = await running
    assert stats.received == 0 and stats.released == 1
    assert depth(sqs, queues.url) == (1, 0)  # visible now, not in 120 s


def test_sigterm_mid_load_deletes_nothing_unwritten_and_releases_at_once(
    moto: str, sqs: Any, s3: Any, prefix: str, tmp_path: Path
) -> None:
    queues = make_queues(sqs, visibility=120)
    for name in ("one.pb", "two.pb", "three.pb"):
        put_file(s3, name, rows=20)
        send(sqs, queues.url, f.plain_body(BUCKET, name))
    env = {
        "TABLE_EXTRACT": "tests.plugins:slow",
        "SLOW_EXTRACT_S": "4",
        "SHUTDOWN_GRACE_S": "1",
        "MAX_CONCURRENT_OBJECTS": "2",
        "POLL_WAIT_S": "1",
        "SCHEMA_PREFIX": prefix,
        "HEALTH_FILE": str(tmp_path / "hb"),
    }
    with WorkerProcess("poll", "--processes", "1", "--queue-url", queues.url, env=env) as worker:
        worker.wait_for("object_downloaded", count=2)
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    (released,) = worker.events("released_unfinished")
    assert len(released["messages"]) == 2
    (stopped,) = worker.events("poller_stopped")
    assert stopped["deleted"] == 0 and stopped["released"] == 2
    assert {"window", "throttles", "in_flight", "rows_written"} <= set(stopped)
    assert depth(sqs, queues.url) == (3, 0)  # all visible now, not after 120 s

    env["TABLE_EXTRACT"] = "worker.extract.reference:processOutputData"
    with WorkerProcess("poll", "--processes", "1", "--queue-url", queues.url, env=env) as finish:
        wait_until_empty(sqs, queues.url)
        finish.signal(signal.SIGTERM)
        assert finish.wait(30) == 0
    items = scan(boto3.client("dynamodb"), f"{prefix}_t")
    assert len(items) == 60 and len({i["id"]["S"] for i in items}) == 60


def test_two_processes_share_the_queue_and_stop_cleanly(
    moto: str, sqs: Any, s3: Any, prefix: str, tmp_path: Path
) -> None:
    queues = make_queues(sqs, visibility=30)
    for index in range(6):
        put_file(s3, f"p{index}.pb", rows=10)
        send(sqs, queues.url, f.plain_body(BUCKET, f"p{index}.pb"))
    env = {"SCHEMA_PREFIX": prefix, "POLL_WAIT_S": "1", "HEALTH_FILE": str(tmp_path / "hb")}
    with WorkerProcess("poll", "--processes", "2", "--queue-url", queues.url, env=env) as worker:
        started = worker.wait_for("poller_started", count=2)
        assert len({e["pid"] for e in started}) == 2
        wait_until_empty(sqs, queues.url)
        healthy, why = check_health(PollSettings(health_file=str(tmp_path / "hb")))
        assert healthy and "2 poller(s)" in why
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    assert len(scan(boto3.client("dynamodb"), f"{prefix}_t")) == 60
    assert sum(e["deleted"] for e in worker.events("poller_stopped")) == 6


def test_the_parent_exits_non_zero_when_a_child_dies(moto: str, sqs: Any, tmp_path: Path) -> None:
    queues = make_queues(sqs, visibility=30)
    env = {"POLL_WAIT_S": "1", "HEALTH_FILE": str(tmp_path / "hb")}
    with WorkerProcess("poll", "--processes", "2", "--queue-url", queues.url, env=env) as worker:
        started = worker.wait_for("poller_started", count=2)
        os.kill(started[0]["pid"], signal.SIGKILL)
        assert worker.wait(30) == 1
    assert worker.events("child_died")


def test_health_fails_when_a_heartbeat_is_stale_or_missing(tmp_path: Path) -> None:
    settings = PollSettings(health_file=str(tmp_path / "hb"), health_max_age_s=60)
    assert check_health(settings)[0] is False
    (tmp_path / "hb.123").write_text("x")
    assert check_health(settings)[0] is True
    assert check_health(settings, now=time.time() + 61)[0] is False
