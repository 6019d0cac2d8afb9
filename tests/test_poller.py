"""The ECS poller: backpressure, heartbeat, acknowledging, draining (issue: poller)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import orjson
import pytest

from tests import factories as f
from tests import plugins
from tests.conftest import BUCKET, events, scan
from tests.fault_proxy import FaultProxy
from tests.processes import WorkerProcess
from worker.core.aws import Clients
from worker.core.backoff import Backoff
from worker.core.config import PollSettings, Settings, WriteSettings
from worker.loader.pipeline import Loader
from worker.loader.poller import Poller, PollStats, check_health

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

    env["TABLE_EXTRACT"] = "worker.loader.extract.reference:processOutputData"
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
    (tmp_path / f"hb.{os.getpid()}").write_text("x")
    assert check_health(settings)[0] is True
    assert check_health(settings, now=time.time() + 61)[0] is False


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(10)
    return child.pid


def test_the_stale_stamp_of_a_dead_process_does_not_fail_a_live_one(tmp_path: Path) -> None:
    settings = PollSettings(health_file=str(tmp_path / "hb"), health_max_age_s=60)
    dead = tmp_path / f"hb.{dead_pid()}"  # killed with SIGKILL: it never removed its stamp
    dead.write_text("x")
    os.utime(dead, (time.time() - 3600, time.time() - 3600))
    assert check_health(settings) == (False, f"no live poller stamps {tmp_path / 'hb'}.<pid>")
    (tmp_path / f"hb.{os.getpid()}").write_text("x")
    assert check_health(settings) == (True, "1 poller(s) alive")


def test_health_holds_while_one_long_load_takes_every_slot(
    moto: str, sqs: Any, s3: Any, prefix: str, tmp_path: Path
) -> None:
    queues = make_queues(sqs, visibility=30)
    put_file(s3, "long.pb", rows=5)
    send(sqs, queues.url, f.plain_body(BUCKET, "long.pb"))
    health = PollSettings(health_file=str(tmp_path / "hb"), health_max_age_s=3)
    env = {
        "TABLE_EXTRACT": "tests.plugins:slow",
        "SLOW_EXTRACT_S": "8",
        "MAX_CONCURRENT_OBJECTS": "1",
        "POLL_WAIT_S": "1",
        "HEALTH_FILE": health.health_file,
        "HEALTH_MAX_AGE_S": "3",
        "SCHEMA_PREFIX": prefix,
    }
    verdicts = []
    with WorkerProcess("poll", "--processes", "1", "--queue-url", queues.url, env=env) as worker:
        worker.wait_for("object_downloaded")
        for _ in range(12):  # 6 s of the 8 s load, twice the health limit
            verdicts.append(check_health(health))
            time.sleep(0.5)
        assert not worker.events("object_loaded")  # still loading throughout
        worker.signal(signal.SIGTERM)
        worker.wait(30)
    assert all(healthy for healthy, _ in verdicts), verdicts


async def test_a_fifo_group_loads_in_order_while_other_groups_run_beside_it(
    poller_for: PollerFactory, sqs: Any, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLOW_EXTRACT_S", "0.6")
    url = sqs.create_queue(
        QueueName="ordered.fifo",
        Attributes={"FifoQueue": "true", "ContentBasedDeduplication": "true"},
    )["QueueUrl"]
    for name, group in (("a1", "A"), ("a2", "A"), ("a3", "A"), ("b1", "B")):
        data = f.output_file(("t", ["id"], [[name]]), file_id=name)
        s3.put_object(Bucket=BUCKET, Key=f"{name}.pb", Body=data)
        body = orjson.dumps(f.plain_body(BUCKET, f"{name}.pb")).decode()
        sqs.send_message(QueueUrl=url, MessageBody=body, MessageGroupId=group)
    plugins.LOADS.clear()
    poller = poller_for(url, table_extract="tests.plugins:timed", max_concurrent_objects=4)
    await run_until(poller, lambda: poller.stats.deleted == 4)
    spans = {file_id: (start, end) for file_id, start, end in plugins.LOADS}
    assert spans["a1"][1] <= spans["a2"][0] and spans["a2"][1] <= spans["a3"][0]
    assert spans["b1"][0] < spans["a2"][0]  # group B did not queue behind group A


async def test_a_failure_holds_back_the_rest_of_its_fifo_group(
    poller_for: PollerFactory, sqs: Any, s3: Any, logs: list[dict[str, Any]]
) -> None:
    url = sqs.create_queue(
        QueueName="held.fifo",
        Attributes={"FifoQueue": "true", "ContentBasedDeduplication": "true"},
    )["QueueUrl"]
    put_file(s3, "after.pb", rows=1)
    for key in ("missing.pb", "after.pb"):
        body = orjson.dumps(f.plain_body(BUCKET, key)).decode()
        sqs.send_message(QueueUrl=url, MessageBody=body, MessageGroupId="G")
    poller = poller_for(url)
    stats = await run_until(poller, lambda: poller.stats.failed >= 1, within_s=20)
    loaded = [e["key"] for e in events(logs, "object_loaded")]
    assert "after.pb" not in loaded  # never loaded ahead of the failed message before it
    assert stats.deleted == 0


async def test_a_body_whose_shape_breaks_the_parser_fails_with_an_error_line(
    poller_for: PollerFactory, sqs: Any, logs: list[dict[str, Any]]
) -> None:
    queues = make_queues(sqs, visibility=30)
    body = {"Records": [{"s3": {"bucket": "a-string", "object": {"key": "k"}}}]}
    message_id = send(sqs, queues.url, body)
    poller = poller_for(queues.url)
    stats = await run_until(poller, lambda: poller.stats.failed == 1, within_s=20)
    assert stats.failed == 1 and stats.deleted == 0
    (failed,) = events(logs, "message_failed")
    assert failed["message_id"] == message_id and failed["error"] == "malformed_message"
    assert "Records[0].s3.bucket is a str" in failed["error_message"]


async def test_the_summary_counts_rows_as_they_are_written_and_names_its_process(
    proxy: FaultProxy, poller_for: PollerFactory, sqs: Any, s3: Any, logs: list[dict[str, Any]]
) -> None:
    proxy.latency_s = 0.05  # every request takes a while: 60 batches, 3 s at least
    queues = make_queues(sqs, visibility=30)
    put_file(s3, "big.pb", rows=1500)
    send(sqs, queues.url, f.plain_body(BUCKET, "big.pb"))
    poll = PollSettings(wait_s=1, summary_interval_s=0.3, health_file="/tmp/unused-hb")
    one_at_a_time = WriteSettings(max_in_flight=1)
    poller = poller_for(queues.url, poll=poll, write=one_at_a_time)
    await run_until(poller, lambda: poller.stats.deleted == 1)
    during = [e for e in events(logs, "poller_summary") if e["in_flight"] == 1]
    assert any(0 < e["rows_written"] < 1500 and e["rows_per_s"] > 0 for e in during), during
    assert {e["pid"] for e in events(logs, "poller_summary")} == {os.getpid()}
    metrics = events(logs, "metrics")
    assert metrics and metrics[0]["Service"] == "loader"
    assert {"RowsWritten", "FailedMessages", "FailedFiles", "InFlight"} <= {
        m["Name"] for m in metrics[0]["_aws"]["CloudWatchMetrics"][0]["Metrics"]
    }


async def test_a_stop_is_announced_at_once_even_while_a_long_poll_waits(
    poller_for: PollerFactory, poll_settings: Settings, sqs: Any, logs: list[dict[str, Any]]
) -> None:
    queues = make_queues(sqs, visibility=30)
    poller = poller_for(queues.url, poll=dataclasses.replace(poll_settings.poll, wait_s=2))
    running = asyncio.create_task(poller.run())
    await asyncio.sleep(0.5)
    poller.stop()
    (stopping,) = events(logs, "poller_stopping")
    assert stopping["long_poll_ends_within_s"] == 2
    await running
    assert events(logs, "poller_stopped")


def watched(alarm: str) -> tuple[str, dict[str, str]]:
    """The metric name and dimensions an alarm of the template watches."""
    from tests.test_deploy import expand

    props = expand()["Resources"][alarm]["Properties"]
    assert props["Namespace"] == "worker"
    return props["MetricName"], {d["Name"]: d["Value"] for d in props["Dimensions"]}


def emitted(logs: list[dict[str, Any]], name: str, dimensions: dict[str, str]) -> float:
    """The sum of the EMF metric ``name`` under exactly ``dimensions`` in ``logs``."""
    total = 0.0
    for line in events(logs, "metrics"):
        (spec,) = line["_aws"]["CloudWatchMetrics"]
        names = {m["Name"] for m in spec["Metrics"]}
        ours = spec["Namespace"] == "worker" and spec["Dimensions"] == [list(dimensions)]
        if ours and name in names and all(line[k] == v for k, v in dimensions.items()):
            total += line[name]
    return total


@pytest.mark.parametrize("route", ["lambda", "ecs"])
async def test_a_failed_message_moves_the_metric_the_alarm_watches_on_either_route(
    route: str, poller_for: PollerFactory, poll_settings: Settings, sqs: Any,
    logs: list[dict[str, Any]], install_runtime: Callable[[Settings], Any],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    name, dimensions = watched("LoaderFailedMessagesAlarm")
    body = {"bucket": BUCKET, "key": "missing.pb"}
    if route == "lambda":
        handler = install_runtime(poll_settings)
        event = f.sqs_event(f.sqs_record(body))
        await asyncio.to_thread(handler, event, f.LambdaContext())
        # the runtime logs JSON lines to stdout, as Lambda's log stream has them
        lines = capsys.readouterr().out.splitlines()
        logs = [orjson.loads(line) for line in lines if line.startswith("{")]
    else:
        queues = make_queues(sqs, visibility=30)
        send(sqs, queues.url, body)
        poll = dataclasses.replace(poll_settings.poll, summary_interval_s=0.2)
        poller = poller_for(queues.url, poll=poll)
        await run_until(poller, lambda: emitted(logs, name, dimensions) >= 1, within_s=20)
    assert emitted(logs, name, dimensions) == 1
    assert emitted(logs, "FailedFiles", dimensions) == 1


async def test_the_summary_shows_each_tables_throttles_and_the_rate_it_is_paced_at(
    proxy: FaultProxy, poller_for: PollerFactory, sqs: Any, s3: Any, logs: list[dict[str, Any]]
) -> None:
    proxy.throttle_fraction, proxy.latency_s = 0.5, 0.01
    queues = make_queues(sqs, visibility=30)
    put_file(s3, "busy.pb", rows=2000)
    send(sqs, queues.url, f.plain_body(BUCKET, "busy.pb"))
    poll = PollSettings(wait_s=1, summary_interval_s=0.3, health_file="/tmp/unused-hb",
                        shutdown_grace_s=1)  # fmt: skip
    paced = WriteSettings(pace="adaptive", backoff=Backoff(base_s=0.01, cap_s=0.05, attempts=20))
    poller = poller_for(queues.url, poll=poll, write=paced)

    def shown() -> list[dict[str, Any]]:
        return [e for e in events(logs, "poller_summary") if e["paces"]]

    await run_until(poller, lambda: len(shown()) >= 2, within_s=30)
    last = shown()[-1]
    (table,) = last["table_throttles"]
    assert last["table_throttles"][table] > 0 and last["paces"][table] > 0
    per_table = [m for m in events(logs, "metrics") if m.get("Table") == table]
    assert 0 < sum(m["Throttles"] for m in per_table) <= poller._loader.writer.throttles
    assert all(m["PaceRate"] > 0 for m in per_table if "PaceRate" in m)
    assert any("PaceRate" in m for m in per_table)
