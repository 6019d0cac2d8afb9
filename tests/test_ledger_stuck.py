"""Runs that always end (issue: runs that always end): each way a run stayed open
forever, ending here with every run ended and exact counts; the one-open-run
rule; the sweep. moto over HTTP, through the real handler, the API or the CLI."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import orjson
import pytest

from tests import factories as f
from tests.conftest import BUCKET, Call, events, scan
from tests.fault_proxy import DynamoFaults, Fault, OneAtATime
from tests.test_ledger import (
    DATASET,
    DAY,
    load,
    put_files,
    receive_all,
    run_of,
    submit,
)
from worker.core.aws import Clients
from worker.core.config import Settings
from worker.core.tracking import TrackedFile
from worker.entry.runtime import make_api, make_ledger
from worker.ledger import dispatch
from worker.ledger.api import Request
from worker.ledger.store import Store
from worker.ledger.sweeper import Sweeper, SweepReport
from worker.ledger.tracker import LedgerTracker

BODY = {"datasetName": DATASET, "businessDate": DAY}
ENDED = ("success", "failed", "cancelled")


async def sweep(settings: Settings) -> SweepReport:
    async with Clients(max_in_flight=4) as clients:
        return await Sweeper(make_ledger(settings, clients)).sweep()


def age(table: str, key: dict[str, str], attribute: str, hours: float) -> None:
    """Set a timestamp of an item ``hours`` into the past (instead of waiting)."""
    stamp = (datetime.now(UTC) - timedelta(hours=hours)).isoformat().replace("+00:00", "Z")
    boto3.client("dynamodb").update_item(
        TableName=table, Key={k: {"S": v} for k, v in key.items()},
        UpdateExpression="SET #a = :t", ExpressionAttributeNames={"#a": attribute},
        ExpressionAttributeValues={":t": {"S": stamp}},
    )  # fmt: skip


def files_of(settings: Settings, run_id: str) -> list[dict[str, Any]]:
    items = scan(boto3.client("dynamodb"), settings.ledger.file_table)
    return [i for i in items if i["runId"]["S"] == run_id]


# --- 1. a second run of the same dataset and date -----------------------------------------


async def test_a_second_run_of_an_open_date_is_409_naming_it_and_supersede_cancels_it_first(
    ledger_settings: Settings, call: Call, s3: Any, prefix: str
) -> None:
    put_files(s3, 3)
    first = await submit(call)
    first_messages = receive_all(ledger_settings.ledger.loader_queue_url, count=3)
    status, refused = await call("POST", "/runs", BODY)
    assert status == 409 and refused["details"][0]["openRunId"] == first["runId"]
    status, second = await call("POST", "/runs", BODY | {"supersede": True})
    assert status == 201 and second["status"] == "dispatched"
    earlier = await run_of(call, first["runId"])
    assert earlier["status"] == "cancelled"
    assert earlier["error"] == {"reason": "superseded", "supersededBy": second["runId"]}
    assert await load(ledger_settings, first_messages) == []  # acknowledged, not loaded
    assert f"{prefix}_t" not in boto3.client("dynamodb").list_tables()["TableNames"]
    assert await load(ledger_settings, receive_all(ledger_settings.ledger.loader_queue_url)) == []
    later = await run_of(call, second["runId"])
    assert (later["status"], later["processedFiles"], later["failedFiles"]) == ("success", 3, 0)
    assert (await run_of(call, first["runId"]))["processedFiles"] == 0
    assert len(scan(boto3.client("dynamodb"), f"{prefix}_t")) == 6  # 3 files x 2 rows, once


async def test_of_two_submits_of_one_date_at_once_exactly_one_opens_a_run(
    ledger_settings: Settings, call: Call, s3: Any, moto: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_files(s3, 2)
    location = {"location": f"s3://{BUCKET}/raw/{{datasetName}}/{{businessDate}}/"}
    assert (await call("PUT", f"/datasets/{DATASET}", location))[0] == 200
    with OneAtATime(moto) as dynamodb:  # DynamoDB's per-item atomicity, which moto lacks
        monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", dynamodb.url)
        async with Clients(max_in_flight=4) as clients:
            raced = make_api(ledger_settings, clients)
            body = orjson.dumps(BODY)
            answers = await asyncio.gather(
                *(raced.handle(Request("POST", "/runs", body=body)) for _ in range(2))
            )
    monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", moto)
    assert sorted(status for status, _ in answers) == [201, 409]
    open_runs = [r for r in scan(boto3.client("dynamodb"), ledger_settings.ledger.run_table)
                 if r.get("status", {}).get("S") not in (None, *ENDED)]  # fmt: skip
    assert len(open_runs) == 1


# --- 2. a lost completion update ------------------------------------------------------------


@pytest.mark.parametrize("heal", ["redelivery", "sweep"])
async def test_a_lost_completion_update_heals(
    ledger_settings: Settings, call: Call, s3: Any, moto: str, monkeypatch: pytest.MonkeyPatch,
    heal: str,
) -> None:  # fmt: skip
    put_files(s3, 1)
    run_id = (await submit(call))["runId"]
    records = receive_all(ledger_settings.ledger.loader_queue_url, count=1)
    # every attempt of the SDK (5) at the completion update answers 500
    fault = Fault("UpdateItem", b":final", 500, "InternalServerError", times=5)
    with DynamoFaults(moto, fault) as faults:
        monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", faults.url)
        assert await load(ledger_settings, records) == [records[0]["messageId"]]
    monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", moto)
    assert fault.hits == 5
    stuck = await run_of(call, run_id)
    assert (stuck["status"], stuck["processedFiles"], stuck["resolvedFiles"]) == (
        "processing",
        1,
        1,
    )
    if heal == "redelivery":
        assert await load(ledger_settings, records) == []
    else:
        assert (await sweep(ledger_settings)).completed_runs == 1
    run = await run_of(call, run_id)
    assert (run["status"], run["processedFiles"], run["failedFiles"]) == ("success", 1, 0)


# --- 3. a submit cut off by the function's timeout ------------------------------------------


def test_a_submit_through_the_handler_answers_within_its_deadline_and_the_sweep_finishes(
    ledger_settings: Settings, s3: Any, install_runtime: Callable[[Settings], Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    put_files(s3, 300, rows=1)
    monkeypatch.setattr(dispatch, "PAGE", 20)  # many steps: the deadline falls among them
    send = dispatch.Dispatcher._send

    async def slow_send(self: Any, files: list[dict[str, Any]]) -> None:
        await asyncio.sleep(0.2)  # a slow queue: 15 steps of 20 files take 3 s at least
        await send(self, files)

    monkeypatch.setattr(dispatch.Dispatcher, "_send", slow_send)
    handler = install_runtime(ledger_settings)

    def http(method: str, path: str, body: Any, remaining_ms: int) -> tuple[int, dict[str, Any]]:
        event = {"version": "2.0", "rawPath": path, "requestContext": {"http": {"method": method}},
                 "body": orjson.dumps(body).decode()}  # fmt: skip
        answer = handler(event, f.LambdaContext(remaining_ms=remaining_ms))
        return answer["statusCode"], orjson.loads(answer["body"])

    location = {"location": f"s3://{BUCKET}/raw/{{datasetName}}/{{businessDate}}/", "suffix": ".pb"}
    assert http("PUT", f"/datasets/{DATASET}", location, 5000)[0] == 200
    started = time.monotonic()
    status, created = http("POST", "/runs", BODY, 2000)
    assert time.monotonic() - started < 2.0
    assert status == 201 and created["status"] == "pending" and created["resolvedFiles"] < 300
    for _ in range(20):  # the scheduled sweep, each with its own deadline
        handler(f.scheduled_event(), f.LambdaContext(remaining_ms=5000))
        status, run = http("GET", f"/runs/{created['runId']}", None, 5000)
        if run["status"] != "pending":
            break
    assert (run["status"], run["resolvedFiles"]) == ("dispatched", 300)
    records = receive_all(ledger_settings.ledger.loader_queue_url, count=300)
    assert len({orjson.loads(r["body"])["file_id"] for r in records}) == 300
    assert asyncio.run(load(ledger_settings, records)) == []
    run = http("GET", f"/runs/{created['runId']}", None, 5000)[1]
    assert (run["status"], run["processedFiles"]) == ("success", 300)


async def test_a_dispatch_killed_midway_resumes_on_a_repeat_and_counts_exactly(
    ledger_settings: Settings, clients: Clients, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_files(s3, 60, rows=1)
    monkeypatch.setattr(dispatch, "PAGE", 10)
    settings = dataclasses.replace(
        ledger_settings, ledger=dataclasses.replace(ledger_settings.ledger, dispatch_timeout_s=1)
    )
    api = make_api(settings, clients)
    location = {"location": f"s3://{BUCKET}/raw/{{datasetName}}/{{businessDate}}/", "suffix": ".pb"}
    await api.handle(Request("PUT", f"/datasets/{DATASET}", body=orjson.dumps(location)))
    request = Request("POST", "/runs", headers={"idempotency-key": "k"}, body=orjson.dumps(BODY))
    pages = 0
    original = dispatch.Dispatcher._send

    async def killed_after_two_pages(self: Any, files: list[dict[str, Any]]) -> None:
        nonlocal pages
        if pages == 2:  # the function dies in the middle of the third page
            await asyncio.sleep(3600)
        pages += 1
        await original(self, files)

    monkeypatch.setattr(dispatch.Dispatcher, "_send", killed_after_two_pages)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(api.handle(request), 2)
    monkeypatch.setattr(dispatch.Dispatcher, "_send", original)
    (stored,) = [r for r in scan(boto3.client("dynamodb"), settings.ledger.run_table)
                 if "status" in r]  # fmt: skip
    assert stored["status"] == {"S": "pending"} and 0 < int(stored["resolvedFiles"]["N"]) < 60
    await asyncio.sleep(1.1)  # its lease lapses: nobody is dispatching it
    status, again = await api.handle(request)
    assert status == 200 and (again["status"], again["resolvedFiles"]) == ("dispatched", 60)
    records = receive_all(settings.ledger.loader_queue_url, count=60)
    assert len({orjson.loads(r["body"])["file_id"] for r in records}) == 60
    assert await load(settings, records) == []
    run = (await api.handle(Request("GET", f"/runs/{again['runId']}")))[1]
    assert (run["status"], run["processedFiles"], run["failedFiles"]) == ("success", 60, 0)


# --- 4. a dataset the API accepted but S3 refuses -------------------------------------------


async def test_a_bucket_s3_does_not_have_ends_the_run_failed_and_a_repeat_does_not_say_retry(
    call: Call,
) -> None:
    location = {"location": "s3://no-such-bucket-x/{businessDate}/"}
    assert (await call("PUT", f"/datasets/{DATASET}", location))[0] == 200
    status, created = await call("POST", "/runs", BODY, idempotency_key="k")
    assert status == 201 and created["status"] == "failed", created
    assert created["error"]["reason"] == "dispatch_failed"
    assert "NoSuchBucket" in created["error"]["message"]
    status, again = await call("POST", "/runs", BODY, idempotency_key="k")
    assert (status, again["status"], again["runId"]) == (200, "failed", created["runId"])


async def test_a_location_s3_would_refuse_is_400_at_put_and_at_submit_and_opens_no_run(
    ledger_settings: Settings, call: Call
) -> None:
    status, refused = await call("PUT", f"/datasets/{DATASET}", {"location": "s3://bad bucket/"})
    assert status == 400 and refused["details"][0]["field"] == "location"
    doc = {"datasetName": {"S": DATASET}, "location": {"S": "s3://bad bucket/x/"}}  # stored
    boto3.client("dynamodb").put_item(TableName=ledger_settings.ledger.dataset_table, Item=doc)
    status, refused = await call("POST", "/runs", BODY)  # before the rule existed
    assert status == 400 and refused["details"][0]["field"] == "location"
    assert not scan(boto3.client("dynamodb"), ledger_settings.ledger.run_table)


async def test_a_loader_queue_that_does_not_exist_ends_the_run_failed(
    ledger_settings: Settings, clients: Clients, s3: Any
) -> None:
    put_files(s3, 2)
    nowhere = dataclasses.replace(
        ledger_settings.ledger, loader_queue_url=f"{ledger_settings.ledger.loader_queue_url}-gone"
    )
    api = make_api(dataclasses.replace(ledger_settings, ledger=nowhere), clients)
    location = {"location": f"s3://{BUCKET}/raw/{{datasetName}}/{{businessDate}}/"}
    await api.handle(Request("PUT", f"/datasets/{DATASET}", body=orjson.dumps(location)))
    status, answer = await api.handle(Request("POST", "/runs", body=orjson.dumps(BODY)))
    assert status == 201 and answer["status"] == "failed"
    assert "NonExistentQueue" in answer["error"]["message"]


# --- 5. a file whose every attempt dies --------------------------------------------------


async def test_a_file_whose_every_attempt_died_is_failed_stalled_and_its_run_ends(
    ledger_settings: Settings, call: Call, clients: Clients, s3: Any, logs: list[dict[str, Any]]
) -> None:
    put_files(s3, 2)
    run_id = (await submit(call))["runId"]
    records = receive_all(ledger_settings.ledger.loader_queue_url, count=2)
    assert await load(ledger_settings, records[:1]) == []
    # the other file's every attempt was killed after its download (OOM, timeout)
    dying = TrackedFile(run_id, orjson.loads(records[1]["body"])["file_id"])
    tracker = LedgerTracker(Store(clients.dynamodb, ledger_settings.ledger))
    assert await tracker.begin(dying)
    await tracker.fetched(dying)
    assert (await sweep(ledger_settings)).stalled_files == 0  # still within the queue's reach
    age(ledger_settings.ledger.file_table, {"fileId": dying.file_id}, "lastUpdated", 1)
    age(ledger_settings.ledger.run_table, {"runId": run_id}, "updatedAt", 1)
    report = await sweep(ledger_settings)
    assert (report.stalled_files, report.open_runs) == (1, 1)
    run = await run_of(call, run_id)
    assert (run["status"], run["processedFiles"], run["failedFiles"]) == ("failed", 1, 1)
    (failed,) = (await call("GET", f"/runs/{run_id}/files", status="failed"))[1]["items"]
    assert failed["fileId"] == dying.file_id and failed["error"]["reason"] == "stalled"
    assert [e["reason"] for e in events(logs, "ledger_sweep_file_ended")] == ["stalled"]
    assert (await sweep(ledger_settings)).open_runs == 0


async def test_a_pending_file_is_not_called_stalled_while_the_queue_has_a_backlog(
    ledger_settings: Settings, call: Call, s3: Any
) -> None:
    put_files(s3, 1)
    run_id = (await submit(call))["runId"]  # its message waits on the queue
    (item,) = files_of(ledger_settings, run_id)
    age(ledger_settings.ledger.file_table, {"fileId": item["fileId"]["S"]}, "lastUpdated", 1)
    age(ledger_settings.ledger.run_table, {"runId": run_id}, "updatedAt", 1)
    assert (await sweep(ledger_settings)).stalled_files == 0
    receive_all(ledger_settings.ledger.loader_queue_url, count=1)  # lost: the backlog is gone
    assert (await sweep(ledger_settings)).stalled_files == 1
    assert (await run_of(call, run_id))["status"] == "failed"


async def test_a_run_open_longer_than_its_maximum_age_is_expired_with_its_files(
    ledger_settings: Settings, call: Call, s3: Any
) -> None:
    put_files(s3, 2)
    run_id = (await submit(call))["runId"]
    age(ledger_settings.ledger.run_table, {"runId": run_id}, "createdAt", 25)
    report = await sweep(ledger_settings)
    assert (report.expired_runs, report.open_runs) == (1, 1) and report.oldest_open_s > 24 * 3600
    run = await run_of(call, run_id)
    assert (run["status"], run["failedFiles"], run["error"]["reason"]) == ("failed", 2, "expired")
    assert {i["error"]["M"]["reason"]["S"] for i in files_of(ledger_settings, run_id)} == {
        "expired"
    }


# --- the DLQ, for the operator -----------------------------------------------------------


async def test_dlq_show_names_each_message_and_redrive_keeps_what_the_ledger_ended(
    ledger_settings: Settings, call: Call, s3: Any, prefix: str
) -> None:
    from tests.test_cli import worker
    from tests.test_ledger import ledger_env

    put_files(s3, 2)
    run_id = (await submit(call))["runId"]
    records = receive_all(ledger_settings.ledger.loader_queue_url, count=2)
    ended = orjson.loads(records[0]["body"])
    failed_for_good = TrackedFile(run_id, ended["file_id"])
    with_error = {"reason": "corrupt_object", "message": "bad"}
    await _end(ledger_settings, failed_for_good, with_error)
    sqs = boto3.client("sqs")
    dlq = sqs.create_queue(QueueName=f"{prefix}-cli-dlq")["QueueUrl"]
    for body in (records[0]["body"], records[1]["body"], orjson.dumps({"bucket": BUCKET,
                 "key": "plain.pb"}).decode()):  # fmt: skip
        sqs.send_message(QueueUrl=dlq, MessageBody=body)
    env = {
        "RUN_TABLE_NAME": ledger_settings.ledger.run_table,
        "FILE_TABLE_NAME": ledger_settings.ledger.file_table,
        "DATASET_TABLE_NAME": ledger_settings.ledger.dataset_table,
        "LOADER_QUEUE_URL": ledger_settings.ledger.loader_queue_url,
    }
    assert set(env) == set(ledger_env(prefix))
    shown = worker("dlq", "show", "--dlq", dlq, env=env)
    assert shown.returncode == 0, shown.stderr
    letters = [orjson.loads(line) for line in shown.stdout.splitlines()]
    assert len(letters) == 3
    by_object = {tuple(letter["objects"]): letter for letter in letters}
    assert by_object[(f"s3://{BUCKET}/plain.pb",)]["ended"] == []
    assert [e for letter in letters for e in letter["ended"]] == [
        f"{ended['file_id']}: failed corrupt_object"
    ]
    moved = worker("dlq", "redrive", "--dlq", dlq, env=env)
    assert moved.returncode == 0, moved.stderr
    lines = moved.stdout.splitlines()
    assert sum("moved to the loader queue" in line for line in lines) == 2
    (kept,) = [line for line in lines if "kept" in line]
    assert f"worker runs submit {DATASET} {DAY} --supersede" in kept
    back = receive_all(ledger_settings.ledger.loader_queue_url, count=2)
    assert sorted(r["body"] for r in back) == sorted([records[1]["body"], orjson.dumps(
        {"bucket": BUCKET, "key": "plain.pb"}).decode()])  # fmt: skip
    again = worker("dlq", "show", "--dlq", dlq, env=env)
    assert [orjson.loads(line)["ended"] for line in again.stdout.splitlines()] == [
        [f"{ended['file_id']}: failed corrupt_object"]
    ]


async def _end(settings: Settings, file: TrackedFile, error: dict[str, str]) -> None:
    from worker.ledger.models import FileStatus
    from worker.ledger.transitions import end_file

    async with Clients(max_in_flight=2) as clients:
        store = Store(clients.dynamodb, settings.ledger)
        assert await end_file(store, file.run_id, file.file_id, FileStatus.FAILED,
                              {"error": error})  # fmt: skip
