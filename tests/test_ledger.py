"""The run ledger: a dataset run from request to completion, tracked file by file
(issue: run ledger and submit API). moto over HTTP, as everywhere."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import boto3
import orjson
import pytest

from tests import factories as f
from tests.conftest import BUCKET, Call, events, scan
from tests.fault_proxy import OneAtATime
from worker.core.aws import Clients
from worker.core.config import Settings
from worker.entry.runtime import make_loader
from worker.ledger.api import Api, serve
from worker.ledger.models import file_id
from worker.loader.batch import handle_batch
from worker.loader.messages import parse_body

DATASET = "sales"
DAY = "2026-11-21"
RUN = {"datasetName": "sales", "businessDate": DAY}
INVALID, BAD = "validation_error", "invalid_request"
DEEP: Any = {}
for _ in range(200):
    DEEP = {"a": DEEP}
LOC = "location"
TYPES = base64.urlsafe_b64encode(orjson.dumps({"runId": {"S": 5}})).decode()


def put_files(s3: Any, count: int, *, day: str = DAY, rows: int = 2, corrupt: int = 0) -> None:
    for index in range(count):
        data = f.output_file(
            ("t", ["id"], [[f"{index}-{r}"] for r in range(rows)]), file_id=str(index)
        )
        s3.put_object(Bucket=BUCKET, Key=f"raw/{DATASET}/{day}/f{index:04d}.pb", Body=data)
    for index in range(corrupt):
        s3.put_object(Bucket=BUCKET, Key=f"raw/{DATASET}/{day}/bad{index}.pb", Body=b"\x08\x96")
    s3.put_object(Bucket=BUCKET, Key=f"raw/{DATASET}/{day}/_SUCCESS", Body=b"")  # not a file


async def submit(call: Call, **extra: Any) -> dict[str, Any]:
    location = f"s3://{BUCKET}/raw/{{datasetName}}/{{businessDate}}/"
    assert (await call("PUT", f"/datasets/{DATASET}", {"location": location, "suffix": ".pb"}))[
        0
    ] == 200
    status, body = await call(
        "POST", "/runs", {"datasetName": DATASET, "businessDate": DAY}, **extra
    )
    assert status in (200, 201), body
    return body


def receive_all(queue_url: str, count: int = 0) -> list[dict[str, Any]]:
    """Every message on the queue, as Lambda SQS records (then deleted from the queue);
    at least ``count`` of them (moto may answer empty while messages remain)."""
    sqs = boto3.client("sqs")
    records: list[dict[str, Any]] = []
    deadline = time.monotonic() + 20
    while True:
        got = sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, MessageSystemAttributeNames=["All"]
        ).get("Messages", [])
        if not got and (len(records) >= count or time.monotonic() > deadline):
            return records
        for message in got:
            record = f.sqs_record(message["Body"], message["MessageId"])
            record["attributes"] = {"ApproximateReceiveCount": "1"}
            records.append(record)
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])


async def load(settings: Settings, records: list[dict[str, Any]]) -> list[str]:
    """One loader (its own clients) over ``records``; the ids of the failed messages.

    Its messages load concurrently, and each ends its file with an ADD to the
    run's counter: DynamoDB serialises updates of one item, moto does not (two
    at once can lose one), so unless the test chose its own DynamoDB endpoint,
    the calls go through ``OneAtATime``."""
    if os.environ.get("AWS_ENDPOINT_URL_DYNAMODB"):
        return await _load(settings, records)
    with OneAtATime(os.environ["AWS_ENDPOINT_URL"]) as dynamodb:
        os.environ["AWS_ENDPOINT_URL_DYNAMODB"] = dynamodb.url
        try:
            return await _load(settings, records)
        finally:
            del os.environ["AWS_ENDPOINT_URL_DYNAMODB"]


async def _load(settings: Settings, records: list[dict[str, Any]]) -> list[str]:
    async with Clients(max_in_flight=4) as clients:
        loader = make_loader(settings, clients)
        report = await handle_batch(
            loader, records, deadline=asyncio.get_running_loop().time() + 60
        )
    return report.failures


async def run_of(call: Call, run_id: str) -> dict[str, Any]:
    status, run = await call("GET", f"/runs/{run_id}")
    assert status == 200, run
    return run


# --- the flow ---------------------------------------------------------------------------


async def test_a_run_is_resolved_dispatched_loaded_and_completes_by_itself(
    ledger_settings: Settings, call: Call, s3: Any, prefix: str
) -> None:
    put_files(s3, 3)
    created = await submit(call)
    assert created["status"] == "dispatched" and created["resolvedFiles"] == 3
    records = receive_all(ledger_settings.ledger.loader_queue_url)
    bodies = [orjson.loads(r["body"]) for r in records]
    assert {b["run_id"] for b in bodies} == {created["runId"]} and len(bodies) == 3
    assert await load(ledger_settings, records) == []
    run = await run_of(call, created["runId"])
    assert (run["status"], run["processedFiles"], run["failedFiles"]) == ("success", 3, 0)
    status, page = await call("GET", f"/runs/{created['runId']}/files", status="preprocessed")
    assert status == 200 and len(page["items"]) == 3
    assert all(item["rowsWritten"] == 2 and item["checksum"] for item in page["items"])
    assert len(scan(boto3.client("dynamodb"), f"{prefix}_t")) == 6


async def test_every_message_delivered_twice_counts_once_and_completes_once(
    ledger_settings: Settings, call: Call, s3: Any, logs: list[dict[str, Any]]
) -> None:
    put_files(s3, 4)
    run_id = (await submit(call))["runId"]
    records = receive_all(ledger_settings.ledger.loader_queue_url)
    assert await load(ledger_settings, records) == []
    assert await load(ledger_settings, records) == []  # every message redelivered
    run = await run_of(call, run_id)
    assert (run["status"], run["processedFiles"], run["failedFiles"]) == ("success", 4, 0)
    assert len(events(logs, "ledger_run_ended")) == 1


@pytest.mark.parametrize("attempt", range(3))
async def test_two_loaders_racing_on_one_run_leave_exact_counters(
    ledger_settings: Settings,
    call: Call,
    s3: Any,
    attempt: int,
    moto: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    put_files(s3, 12, rows=1)
    run_id = (await submit(call, idempotency_key=f"race-{attempt}"))["runId"]
    records = receive_all(ledger_settings.ledger.loader_queue_url, count=12)
    assert len(records) == 12
    halves = [records[0::2], records[1::2]]
    with OneAtATime(moto) as dynamodb:  # DynamoDB's per-item atomicity, which moto lacks
        monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", dynamodb.url)
        failures = await asyncio.gather(*(load(ledger_settings, half) for half in halves))
    assert failures == [[], []]
    run = await run_of(call, run_id)
    assert (run["status"], run["processedFiles"], run["failedFiles"]) == ("success", 12, 0)


async def test_a_corrupt_file_fails_and_so_does_its_run(
    ledger_settings: Settings, call: Call, s3: Any
) -> None:
    put_files(s3, 2, corrupt=1)
    run_id = (await submit(call))["runId"]
    failed = await load(ledger_settings, receive_all(ledger_settings.ledger.loader_queue_url))
    assert len(failed) == 1  # the corrupt file's message goes on towards the DLQ
    run = await run_of(call, run_id)
    assert (run["status"], run["processedFiles"], run["failedFiles"]) == ("failed", 2, 1)
    assert run["error"] == {"reason": "files_failed", "failedFiles": 1}
    (bad,) = (await call("GET", f"/runs/{run_id}/files", status="failed"))[1]["items"]
    assert bad["location"].endswith("bad0.pb") and bad["error"]["reason"] == "corrupt_object"


async def test_a_file_whose_message_is_dead_lettered_ends_failed(
    ledger_settings: Settings, call: Call, s3: Any
) -> None:
    put_files(s3, 1)
    run_id = (await submit(call))["runId"]
    (record,) = receive_all(ledger_settings.ledger.loader_queue_url)
    flaky = dataclasses.replace(ledger_settings, table_extract="tests.plugins:always_transient")
    for receive in (1, 2):  # retryable failures: the file stays open, its error noted
        record["attributes"]["ApproximateReceiveCount"] = str(receive)
        assert await load(flaky, [record]) == [record["messageId"]]
        (item,) = (await call("GET", f"/runs/{run_id}/files"))[1]["items"]
        assert item["status"] == "verified" and item["error"]["reason"] == "transient_aws_error"
    record["attributes"]["ApproximateReceiveCount"] = "3"  # maxReceiveCount: next stop, the DLQ
    assert await load(flaky, [record]) == [record["messageId"]]
    (item,) = (await call("GET", f"/runs/{run_id}/files"))[1]["items"]
    assert item["status"] == "failed"
    run = await run_of(call, run_id)
    assert (run["status"], run["failedFiles"]) == ("failed", 1)


async def test_after_cancel_no_rows_are_loaded_and_a_second_cancel_conflicts(
    ledger_settings: Settings, call: Call, s3: Any, prefix: str
) -> None:
    put_files(s3, 4, rows=1)
    run_id = (await submit(call))["runId"]
    records = receive_all(ledger_settings.ledger.loader_queue_url)
    assert await load(ledger_settings, records[:1]) == []
    status, cancelled = await call("POST", f"/runs/{run_id}/cancel")
    assert status == 200 and cancelled["status"] == "cancelled"
    assert await load(ledger_settings, records[1:]) == []  # acknowledged, not loaded
    assert len(scan(boto3.client("dynamodb"), f"{prefix}_t")) == 1
    status, body = await call("POST", f"/runs/{run_id}/cancel")
    assert status == 409 and body["error"] == "conflict"
    assert (await run_of(call, run_id))["status"] == "cancelled"


async def test_a_date_with_no_files_ends_the_run_failed_at_once(call: Call, s3: Any) -> None:
    put_files(s3, 2, day="2026-11-20")
    created = await submit(call)
    run = await run_of(call, created["runId"])
    assert (run["status"], run["resolvedFiles"], run["error"]) == (
        "failed",
        0,
        {"reason": "no_files"},
    )


async def test_the_same_idempotency_key_gives_one_run_one_set_of_files_and_messages(
    ledger_settings: Settings, call: Call, s3: Any
) -> None:
    put_files(s3, 3)
    body = {"datasetName": DATASET, "businessDate": DAY}
    first = await submit(call, idempotency_key="k-1")
    status, again = await call("POST", "/runs", body, idempotency_key="k-1")
    assert status == 200 and again["runId"] == first["runId"]
    assert len(receive_all(ledger_settings.ledger.loader_queue_url)) == 3
    files = boto3.client("dynamodb").scan(TableName=ledger_settings.ledger.file_table)["Items"]
    assert len(files) == 3
    status, other = await call("POST", "/runs", body | {"metadata": {"other": True}},
                               idempotency_key="k-1")  # fmt: skip
    assert status == 422 and other["details"][0]["field"] == "Idempotency-Key"
    assert "k-1" in other["message"]


async def test_a_run_with_more_files_than_a_page_pages_through_all(
    ledger_settings: Settings, call: Call, s3: Any
) -> None:
    put_files(s3, 130, rows=1)
    run_id = (await submit(call))["runId"]
    seen: list[str] = []
    token = None
    pages = 0
    while True:
        query = {"limit": "50"} | ({"nextToken": token} if token else {})
        status, page = await call("GET", f"/runs/{run_id}/files", **query)
        assert status == 200
        seen += [item["fileId"] for item in page["items"]]
        pages += 1
        if not (token := page["nextToken"]):
            break
    assert len(seen) == len(set(seen)) == 130 and pages >= 3


def test_the_file_id_is_the_platforms_formula() -> None:
    location = "s3://input/raw/sales/2026-11-21/f0000.pb"
    by_hand = hashlib.md5(b"sales:2026-11-21:s3://input/raw/sales/2026-11-21/f0000.pb").hexdigest()
    assert file_id("sales", "2026-11-21", location) == by_hand


def test_a_loader_message_carries_its_run_and_file() -> None:
    body = {"bucket": "b", "key": "k", "run_id": "r", "file_id": "f"}
    (ref,) = parse_body(orjson.dumps(body))
    assert ref.tracked is not None and (ref.tracked.run_id, ref.tracked.file_id) == ("r", "f")
    with pytest.raises(Exception, match="run_id and file_id"):
        parse_body(orjson.dumps({"bucket": "b", "key": "k", "run_id": "r"}))


# --- every route, every error status --------------------------------------------------


async def test_every_route_answers_its_happy_path(call: Call, s3: Any) -> None:
    put_files(s3, 1)
    status, dataset = await call(
        "PUT",
        "/datasets/sales",
        {"location": "s3://input/raw/{datasetName}/{businessDate}/", "suffix": ".pb"},
    )
    assert status == 200 and dataset["datasetName"] == "sales"
    status, dataset = await call("GET", "/datasets/sales")
    assert status == 200 and dataset["location"].startswith("s3://input/")
    status, created = await call(
        "POST",
        "/runs",
        {
            "datasetName": "sales",
            "businessDate": DAY,
            "sourceType": "control-m",
            "metadata": {"a": 1},
        },
    )
    assert status == 201 and set(created) == {"runId", "status", "resolvedFiles"}
    status, run = await call("GET", f"/runs/{created['runId']}")
    assert status == 200 and run["sourceType"] == "control-m" and run["metadata"] == {"a": 1}
    status, page = await call("GET", "/runs", datasetName="sales", businessDate=DAY)
    assert status == 200 and [r["runId"] for r in page["items"]] == [created["runId"]]
    status, page = await call("GET", "/runs", status="dispatched")
    assert status == 200 and created["runId"] in [r["runId"] for r in page["items"]]
    status, files = await call("GET", f"/runs/{created['runId']}/files")
    assert status == 200 and len(files["items"]) == 1 and files["nextToken"] is None
    status, health = await call("GET", "/health")
    assert status == 200 and health["healthy"] is True and len(health["tables"]) == 3


@pytest.mark.parametrize(
    ("method", "path", "body", "query", "status", "error", "field"),
    [
        ("GET", "/nowhere", None, {}, 404, "not_found", None),
        ("DELETE", "/runs", None, {}, 405, "method_not_allowed", None),
        ("POST", "/runs", b"{not json", {}, 400, "invalid_request", "body"),
        ("POST", "/runs", b"[" + b"1," * 40_000 + b"1]", {}, 400, "invalid_request", "body"),
        ("POST", "/runs", RUN | {"businessDate": "2026-02-30"}, {}, 400, INVALID, "businessDate"),
        ("POST", "/runs", RUN | {"x": 1}, {}, 400, INVALID, "x"),
        ("POST", "/runs", RUN | {"sourceType": "fax"}, {}, 400, INVALID, "sourceType"),
        ("POST", "/runs", RUN | {"datasetName": "nosuch"}, {}, 404, "not_found", None),
        ("POST", "/runs", [RUN], {}, 400, INVALID, None),
        ("POST", "/runs", RUN | {"metadata": "not a map"}, {}, 400, INVALID, "metadata"),
        ("POST", "/runs", RUN, {"idempotency_key": "k" * 300}, 400, BAD, "Idempotency-Key"),
        ("POST", "/runs", RUN | {"datasetName": "../x"}, {}, 400, INVALID, "datasetName"),
        ("PUT", "/datasets/sales", {"location": "https://x/y"}, {}, 400, INVALID, "location"),
        ("PUT", "/datasets/sales", {"location": "s3://b/{oops}/"}, {}, 400, INVALID, "location"),
        ("GET", "/datasets/nosuch", None, {}, 404, "not_found", None),
        ("PUT", "/datasets/no%20spaces", {"location": "s3://b/x/"}, {}, 400, INVALID, None),
        ("GET", "/runs/nosuch", None, {}, 404, "not_found", None),
        ("GET", "/runs/nosuch/files", None, {}, 404, "not_found", None),
        ("POST", "/runs/nosuch/cancel", None, {}, 404, "not_found", None),
        ("GET", "/runs", None, {}, 400, "invalid_request", "query"),
        ("GET", "/runs", None, {"status": "lost"}, 400, "validation_error", None),
        ("GET", "/runs", None, {"status": "failed", "nextToken": "%%%"}, 400, BAD, "nextToken"),
        ("GET", "/runs", None, {"status": "failed", "limit": "0"}, 400, BAD, "limit"),
        ("GET", "/runs", None, {"status": "failed", "limit": "\u00b2"}, 400, BAD, "limit"),
        ("GET", "/runs", None, {"status": "failed", "nextToken": TYPES}, 400, BAD, "nextToken"),
        ("GET", "/runs/" + "a" * 65, None, {}, 404, "not_found", None),
        ("POST", "/runs", RUN | {"metadata": DEEP}, {}, 400, INVALID, "metadata"),
        ("POST", "/runs", orjson.dumps(RUN | {"metadata": [1e40]}), {}, 400, INVALID, "metadata"),
        ("PUT", "/datasets/sales", {LOC: "s3://b1/{datasetName:>400000}/"}, {}, 400, INVALID, LOC),
        ("PUT", "/datasets/sales", {LOC: "s3://b1/{businessDate!r}/"}, {}, 400, INVALID, LOC),
        ("PUT", "/datasets/sales", {"location": "s3://b1/{0}/"}, {}, 400, INVALID, LOC),
        ("PUT", "/datasets/sales", {"location": "s3://Bad_Bucket/x/"}, {}, 400, INVALID, LOC),
        ("PUT", "/datasets/sales", {"location": "s3://192.168.0.1/x/"}, {}, 400, INVALID, LOC),
    ],
)  # fmt: skip
async def test_every_error_has_its_status_and_names_the_field(
    call: Call, method: str, path: str, body: Any, query: dict[str, str], status: int,
    error: str, field: str | None,
) -> None:  # fmt: skip
    await call("PUT", "/datasets/sales", {"location": "s3://input/raw/"})
    raw = body if isinstance(body, bytes) else None
    got, answer = await call(method, path, None if raw else body, raw=raw, **query)
    assert (got, answer["error"]) == (status, error), answer
    assert answer["message"]
    if field is not None:
        assert field in [d["field"] for d in answer["details"]], answer


async def test_health_is_503_when_a_table_is_missing(ledger_settings: Settings, call: Call) -> None:
    boto3.client("dynamodb").delete_table(TableName=ledger_settings.ledger.dataset_table)
    status, health = await call("GET", "/health")
    assert status == 503 and health["tables"][ledger_settings.ledger.dataset_table] == "MISSING"


def test_the_lambda_route_answers_http_api_events(
    ledger_settings: Settings, install_runtime: Callable[[Settings], Any]
) -> None:
    handler = install_runtime(ledger_settings)
    event = {
        "version": "2.0",
        "rawPath": "/datasets/sales",
        "requestContext": {"http": {"method": "PUT", "path": "/datasets/sales"}},
        "headers": {"Content-Type": "application/json"},
        "body": '{"location": "s3://input/raw/"}',
        "isBase64Encoded": False,
    }
    response = handler(event, f.LambdaContext())
    assert (
        response["statusCode"] == 200 and orjson.loads(response["body"])["datasetName"] == "sales"
    )
    event["body"] = "not json"
    assert handler(event, f.LambdaContext())["statusCode"] == 400


@pytest.fixture
async def http_api(api: Api) -> AsyncIterator[str]:
    runner = await serve(api, 0)
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_worker_api_serves_the_routes_over_real_http(http_api: str, s3: Any) -> None:
    put_files(s3, 2)
    async with aiohttp.ClientSession() as http:
        async with http.put(
            f"{http_api}/datasets/{DATASET}",
            json={
                "location": f"s3://{BUCKET}/raw/{{datasetName}}/{{businessDate}}/",
                "suffix": ".pb",
            },
        ) as response:
            assert response.status == 200
        body = {"datasetName": DATASET, "businessDate": DAY}
        async with http.post(
            f"{http_api}/runs", json=body, headers={"Idempotency-Key": "h"}
        ) as response:
            assert response.status == 201
            run_id = (await response.json())["runId"]
        async with http.post(
            f"{http_api}/runs", json=body, headers={"Idempotency-Key": "h"}
        ) as response:
            assert response.status == 200 and (await response.json())["runId"] == run_id
        async with http.get(f"{http_api}/runs/{run_id}") as response:
            assert response.status == 200 and (await response.json())["resolvedFiles"] == 2
        async with http.post(f"{http_api}/runs", data=b"x" * 70_000) as response:
            assert response.status == 400 and (await response.json())["details"] == [
                {"field": "body"}
            ]
        async with http.patch(f"{http_api}/runs/{run_id}") as response:
            assert response.status == 405


def ledger_env(prefix: str, queue_url: str = "") -> dict[str, str]:
    return {
        "RUN_TABLE_NAME": f"{prefix}-cli-runs",
        "FILE_TABLE_NAME": f"{prefix}-cli-files",
        "DATASET_TABLE_NAME": f"{prefix}-cli-datasets",
        "LOADER_QUEUE_URL": queue_url,
    }


def test_the_cli_sets_up_submits_shows_and_refuses_in_one_line(
    moto: str, s3: Any, prefix: str
) -> None:
    from tests.test_cli import one_line_error, worker

    queue = boto3.client("sqs").create_queue(QueueName=f"{prefix}-cli")["QueueUrl"]
    env = ledger_env(prefix, queue)
    first = worker("setup", "ledger", env=env)
    assert first.returncode == 0 and first.stdout.count("created") == 3, first.stderr
    again = worker("setup", "ledger", env=env)
    assert again.returncode == 0 and again.stdout.count("exists") == 3  # changes nothing
    put_files(s3, 2)
    location = f"s3://{BUCKET}/raw/{{datasetName}}/{{businessDate}}/"
    assert worker("datasets", "put", DATASET, location, "--suffix", ".pb", env=env).returncode == 0
    submitted = worker("runs", "submit", DATASET, DAY, "--idempotency-key", "c", env=env)
    assert submitted.returncode == 0, submitted.stderr
    run = orjson.loads(submitted.stdout)
    assert (run["status"], run["resolvedFiles"]) == ("dispatched", 2)
    shown = orjson.loads(worker("runs", "show", run["runId"], env=env).stdout)
    assert shown["files"]["pending"] == 2 and shown["runId"] == run["runId"]
    assert shown["ageSeconds"] >= 0 and "durationSeconds" not in shown  # open: no duration
    listed = worker("runs", "list", "--dataset", DATASET, "--date", DAY, env=env).stdout
    assert [orjson.loads(line)["runId"] for line in listed.splitlines()] == [run["runId"]]
    files = worker("runs", "files", run["runId"], "--status", "pending", env=env).stdout
    lines = [orjson.loads(line) for line in files.splitlines()]
    assert len(lines) == 2 and {line["status"] for line in lines} == {"pending"}
    assert all(line["location"].startswith("s3://") and line["ageSeconds"] >= 0 for line in lines)
    none = worker("runs", "files", run["runId"], "--status", "failed", env=env)
    assert none.returncode == 0 and none.stdout == "" and none.stderr.strip() == "no files failed"
    empty = worker("runs", "list", "--status", "cancelled", env=env)
    assert empty.returncode == 0 and empty.stderr.strip() == "no runs"
    nothing = worker("runs", "submit", DATASET, "2026-01-01", env=env)  # a date with no files
    assert nothing.returncode == 1 and orjson.loads(nothing.stdout)["status"] == "failed"
    assert "failed: no_files" in nothing.stderr
    one_line_error(worker("runs", "submit", DATASET, "2026-13-01", env=env), 2, "businessDate")
    one_line_error(worker("runs", "show", "nosuch", env=env), 1, "no run 'nosuch'")
    one_line_error(worker("runs", "list", env=env), 2, "--status")
    one_line_error(worker("datasets", "put", "no spaces", location, env=env), 2, "pattern")
    assert worker("runs", "cancel", run["runId"], env=env).returncode == 0
    one_line_error(worker("runs", "cancel", run["runId"], env=env), 1, "has ended")
    one_line_error(worker("setup", "ledger"), 2, "RUN_TABLE_NAME")
