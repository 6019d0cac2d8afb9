"""Exactly once, tested where it can break (issue: runs that always end): the
tracker called directly, as two loaders, a late message or a refusing DynamoDB
would call it."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from tests.conftest import Call, events
from tests.fault_proxy import DynamoFaults, Fault, OneAtATime
from tests.test_ledger import load, put_files, receive_all, run_of, submit
from worker.core.aws import Clients
from worker.core.config import Settings
from worker.core.errors import TransientAwsError
from worker.core.tracking import LoadedFile, TrackedFile
from worker.ledger.store import Store
from worker.ledger.tracker import LedgerTracker

LOADED = LoadedFile(rows_written=2, size=10, checksum="c")


async def one_file(call: Call, s3: Any, settings: Settings) -> tuple[TrackedFile, list[Any]]:
    put_files(s3, 1)
    run_id = (await submit(call))["runId"]
    records = receive_all(settings.ledger.loader_queue_url, count=1)
    return TrackedFile(run_id, orjson.loads(records[0]["body"])["file_id"]), records


def tracker(clients: Clients, settings: Settings) -> LedgerTracker:
    return LedgerTracker(Store(clients.dynamodb, settings.ledger))


async def test_two_trackers_finishing_one_file_after_both_began_count_it_once(
    ledger_settings: Settings, call: Call, s3: Any, moto: str, monkeypatch: pytest.MonkeyPatch,
    logs: list[dict[str, Any]],
) -> None:  # fmt: skip
    file, _ = await one_file(call, s3, ledger_settings)
    with OneAtATime(moto) as dynamodb:  # DynamoDB's per-item atomicity, which moto lacks
        monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", dynamodb.url)
        async with Clients(max_in_flight=4) as a, Clients(max_in_flight=4) as b:
            first, second = tracker(a, ledger_settings), tracker(b, ledger_settings)
            assert await first.begin(file) and await second.begin(file)
            await asyncio.gather(first.finished(file, LOADED), second.finished(file, LOADED))
    monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", moto)
    run = await run_of(call, file.run_id)
    assert (run["status"], run["processedFiles"], run["failedFiles"]) == ("success", 1, 0)
    assert len(events(logs, "ledger_file_ended")) == 1
    assert len(events(logs, "ledger_transition_skipped")) == 1
    assert len(events(logs, "ledger_run_ended")) == 1


async def test_a_message_of_an_earlier_run_after_a_later_run_took_its_file_moves_no_count(
    ledger_settings: Settings, call: Call, s3: Any, clients: Clients
) -> None:
    earlier, _ = await one_file(call, s3, ledger_settings)
    body = {"datasetName": "sales", "businessDate": "2026-11-21", "supersede": True}
    status, later = await call("POST", "/runs", body)
    assert status == 201
    late = tracker(clients, ledger_settings)
    assert not await late.begin(earlier)  # its run was superseded, and its file taken over
    await late.finished(earlier, LOADED)  # even a loader past begin() moves nothing
    for run_id in (earlier.run_id, later["runId"]):
        assert (await run_of(call, run_id))["processedFiles"] == 0
    assert (await run_of(call, earlier.run_id))["status"] == "cancelled"


@pytest.mark.parametrize("reason", ["TransactionConflict", "ThrottlingError"])
async def test_a_transaction_cancelled_for_a_conflict_or_throttle_is_retried_not_acknowledged(
    ledger_settings: Settings, call: Call, s3: Any, moto: str, monkeypatch: pytest.MonkeyPatch,
    reason: str,
) -> None:  # fmt: skip
    file, records = await one_file(call, s3, ledger_settings)
    reasons = {"CancellationReasons": [{"Code": reason}, {"Code": "None"}]}
    cancelled = Fault(
        "TransactWriteItems", b"preprocessed", 400, "TransactionCanceledException", 1, reasons
    )
    with DynamoFaults(moto, cancelled) as faults:
        monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", faults.url)
        async with Clients(max_in_flight=4) as clients:
            with pytest.raises(TransientAwsError, match=reason):
                await tracker(clients, ledger_settings).finished(file, LOADED)
    monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", moto)
    assert cancelled.hits == 1
    assert (await run_of(call, file.run_id))["processedFiles"] == 0  # nothing counted yet
    assert await load(ledger_settings, records) == []  # the redelivery counts it, once
    run = await run_of(call, file.run_id)
    assert (run["status"], run["processedFiles"]) == ("success", 1)


async def test_a_transaction_whose_condition_failed_is_acknowledged_without_counting(
    ledger_settings: Settings, call: Call, s3: Any, clients: Clients
) -> None:
    file, records = await one_file(call, s3, ledger_settings)
    assert await load(ledger_settings, records) == []
    await tracker(clients, ledger_settings).finished(file, LOADED)  # raises nothing
    await tracker(clients, ledger_settings).failed(file, TransientAwsError("x"), final=True)
    run = await run_of(call, file.run_id)
    assert (run["processedFiles"], run["failedFiles"]) == (1, 0)


async def test_a_file_another_run_took_over_is_not_loaded_for_the_earlier_run(
    ledger_settings: Settings, call: Call, s3: Any, clients: Clients
) -> None:
    import boto3

    file, _ = await one_file(call, s3, ledger_settings)
    boto3.client("dynamodb").update_item(  # registered again by a later run of the date
        TableName=ledger_settings.ledger.file_table, Key={"fileId": {"S": file.file_id}},
        UpdateExpression="SET runId = :later", ExpressionAttributeValues={":later": {"S": "l"}},
    )  # fmt: skip
    assert not await tracker(clients, ledger_settings).begin(file)  # its own run is still open
    assert (await run_of(call, file.run_id))["status"] == "dispatched"


async def test_only_the_holder_of_a_dispatch_lease_counts_a_step(
    ledger_settings: Settings, call: Call, clients: Clients
) -> None:
    import boto3

    from worker.ledger.transitions import advance_dispatch, claim_dispatch

    await call("PUT", "/datasets/sales", {"location": "s3://input/raw/"})
    run_id = "0" * 32
    boto3.client("dynamodb").put_item(TableName=ledger_settings.ledger.run_table, Item={
        "runId": {"S": run_id}, "status": {"S": "pending"}, "resolvedFiles": {"N": "0"},
        "dispatchLease": {"N": "0"}})  # fmt: skip
    store = Store(clients.dynamodb, ledger_settings.ledger)
    first = await claim_dispatch(store, run_id, lease_s=-1)  # lapses at once
    second = await claim_dispatch(store, run_id, lease_s=60)
    assert first and second and first != second
    assert await claim_dispatch(store, run_id, lease_s=60) is None  # held: nobody else
    run = {"runId": run_id, "resolvedFiles": 0}
    stale = await advance_dispatch(store, run, first, after="k", files=5, done=False, lease_s=60)
    assert stale is None  # the lapsed holder counts nothing
    live = await advance_dispatch(store, run, second, after="k", files=5, done=False, lease_s=60)
    assert live is not None and live["resolvedFiles"] == 5
    again = await advance_dispatch(store, run, second, after="k", files=5, done=False, lease_s=60)
    assert again is None  # the same step is not counted twice (resolvedFiles moved on)
