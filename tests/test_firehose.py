"""Firehose transformation: decode, enrich, retry-safe dedupe, partition keys (issue: firehose)."""

from __future__ import annotations

import base64
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import boto3
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import factories as f
from tests.fault_proxy import FaultProxy
from worker.core.aws import Clients
from worker.core.backoff import Backoff
from worker.core.config import FirehoseSettings, Settings
from worker.firehose.transform import (
    MAX_RESPONSE_BYTES,
    Transformer,
    parse_created_at,
    partition_value,
    setup_cache_table,
)

Transform = Callable[..., Awaitable[dict[str, Any]]]
_tables = itertools.count()
T0 = 1_763_700_000  # 2025-11-21T04:40:00Z


def event_doc(uuid: str = "u1", name: str = "order.created", created: Any = T0, **more: Any) -> Any:
    return {"event_uuid": uuid, "event_name": name, "created_at": created, **more}


def decoded(entry: dict[str, Any]) -> Any:
    return orjson.loads(base64.b64decode(entry["data"]))


@pytest.fixture
async def cache_table(moto: str, clients: Clients) -> str:
    name = f"event-cache-{next(_tables)}"
    await setup_cache_table(clients.dynamodb, name)
    return name


@pytest.fixture
def transform(clients: Clients, cache_table: str) -> Transform:
    async def run(*records: dict[str, Any], separator: str = ".") -> dict[str, Any]:
        config = FirehoseSettings(cache_table=cache_table, separator=separator)
        return await Transformer(clients.dynamodb_writes, config).transform(
            f.firehose_event(*records)
        )

    return run


@pytest.mark.parametrize(
    ("created", "iso"),
    [
        (T0, "2025-11-21T04:40:00+00:00"),
        (T0 * 1000 + 250, "2025-11-21T04:40:00.250000+00:00"),
        (str(T0), "2025-11-21T04:40:00+00:00"),
        ("2025-11-21T04:40:00Z", "2025-11-21T04:40:00+00:00"),
        ("2025-11-21T06:40:00+02:00", "2025-11-21T04:40:00+00:00"),
        ("2025-11-21 04:40:00", "2025-11-21T04:40:00+00:00"),
    ],
)
def test_created_at_may_be_seconds_milliseconds_or_iso_8601(created: Any, iso: str) -> None:
    moment = parse_created_at(created)
    assert moment is not None and moment.isoformat() == iso


@pytest.mark.parametrize("bad", [None, "yesterday", True, float("nan"), [1]])
def test_an_unreadable_created_at_parses_to_nothing(bad: Any) -> None:
    assert parse_created_at(bad) is None


def test_partition_values_are_safe_for_s3_prefixes() -> None:
    assert partition_value("a/b c") == "a_b_c"
    assert partition_value("x" * 500) == "x" * 64
    assert partition_value("") == partition_value("..") == "none"


async def test_a_record_is_enriched_and_given_partition_keys(transform: Transform) -> None:
    response = await transform(f.firehose_record(event_doc(extra=1), "r1"))
    (entry,) = response["records"]
    assert entry["result"] == "Ok" and entry["recordId"] == "r1"
    assert base64.b64decode(entry["data"]).endswith(b"\n")
    assert decoded(entry) == {
        **event_doc(extra=1),
        "event_type": "order",
        "event_subtype": "created",
        "created_datetime": "2025-11-21T04:40:00Z",
    }
    assert entry["metadata"]["partitionKeys"] == {
        "event_type": "order",
        "event_subtype": "created",
        "year": "2025",
        "month": "11",
        "day": "21",
        "hour": "04",
    }


@pytest.mark.parametrize(
    ("name", "separator", "kind", "sub"),
    [
        ("order.created.v2", ".", "order", "created.v2"),
        ("order", ".", "order", "none"),
        ("order::paid", "::", "order", "paid"),
        ("a/b.c d", ".", "a_b", "c_d"),
    ],
)
async def test_event_names_split_on_the_first_separator_only(
    transform: Transform, name: str, separator: str, kind: str, sub: str
) -> None:
    (entry,) = (await transform(f.firehose_record(event_doc(name=name)), separator=separator))[
        "records"
    ]
    keys = entry["metadata"]["partitionKeys"]
    assert (keys["event_type"], keys["event_subtype"]) == (kind, sub)


async def test_an_empty_event_name_goes_to_the_error_partition(
    transform: Transform, logs: list[dict[str, Any]]
) -> None:
    response = await transform(
        f.firehose_record(event_doc(name=""), "r1"), f.firehose_record({"created_at": T0}, "r2")
    )
    for entry in response["records"]:
        assert entry["result"] == "Ok"
        keys = entry["metadata"]["partitionKeys"]
        assert (keys["event_type"], keys["event_subtype"], keys["year"]) == (
            "_error",
            "empty_event_name",
            "2025",
        )
    errors = [e for e in logs if e["event"] == "firehose_record_misrouted"]
    assert [e["record_id"] for e in errors] == ["r1", "r2"]


async def test_malformed_records_fail_alone_with_a_logged_reason(
    transform: Transform, logs: list[dict[str, Any]]
) -> None:
    bad_base64 = {"recordId": "b64", "data": "%%%not-base64%%%"}
    response = await transform(
        bad_base64,
        f.firehose_record(b"{not json", "json"),
        f.firehose_record([1, 2], "list"),
        f.firehose_record(event_doc(), "good"),
    )
    results = {e["recordId"]: e["result"] for e in response["records"]}
    assert results == {
        "b64": "ProcessingFailed",
        "json": "ProcessingFailed",
        "list": "ProcessingFailed",
        "good": "Ok",
    }
    failed = [e for e in logs if e["event"] == "firehose_record_failed"]
    assert {e["record_id"] for e in failed} == {"b64", "json", "list"}
    assert all(e["log_level"] == "error" and e["reason"] for e in failed)


async def test_duplicates_within_and_across_batches_are_dropped(transform: Transform) -> None:
    first = await transform(
        f.firehose_record(event_doc("a"), "r1"),
        f.firehose_record(event_doc("a"), "r2"),
        f.firehose_record(event_doc("b"), "r3"),
    )
    assert [e["result"] for e in first["records"]] == ["Ok", "Dropped", "Ok"]
    second = await transform(
        f.firehose_record(event_doc("a"), "r4"), f.firehose_record(event_doc("c"), "r5")
    )
    assert [e["result"] for e in second["records"]] == ["Dropped", "Ok"]


async def test_a_retried_batch_drops_nothing_and_answers_identically(transform: Transform) -> None:
    batch = [f.firehose_record(event_doc(str(i)), f"r{i}") for i in range(20)]
    batch.append(f.firehose_record(event_doc("0"), "dup"))
    first = await transform(*batch)
    again = await transform(*batch)
    assert first == again
    assert [e["result"] for e in first["records"]].count("Ok") == 20


async def test_an_expired_cache_item_is_not_a_duplicate(
    transform: Transform, cache_table: str
) -> None:
    boto3.client("dynamodb").put_item(
        TableName=cache_table,
        Item={
            "pk": {"S": f"old|order.created|{T0}"},
            "claimed_by": {"S": "someone-else"},
            "expires_at": {"N": str(int(time.time()) - 60)},
        },
    )
    (entry,) = (await transform(f.firehose_record(event_doc("old"))))["records"]
    assert entry["result"] == "Ok"


async def test_the_response_stays_under_6_mb_and_overflow_fails_visibly(
    transform: Transform, cache_table: str, logs: list[dict[str, Any]]
) -> None:
    padding = "x" * 900_000  # each record ~1.2 MB once base64-encoded
    records = [f.firehose_record(event_doc(str(i), pad=padding), f"r{i}") for i in range(7)]
    response = await transform(*records)
    assert len(orjson.dumps(response)) <= MAX_RESPONSE_BYTES
    results = [e["result"] for e in response["records"]]
    assert [e["recordId"] for e in response["records"]] == [f"r{i}" for i in range(7)]
    assert results[:4] == ["Ok"] * 4 and "ProcessingFailed" in results
    overflow = [e["record_id"] for e in logs if e["event"] == "firehose_response_overflow"]
    assert overflow == [f"r{i}" for i, r in enumerate(results) if r == "ProcessingFailed"][::-1]
    left = boto3.client("dynamodb").scan(TableName=cache_table)["Items"]
    assert len(left) == results.count("Ok")  # overflowed records gave their claims back


async def test_throttled_claims_are_retried_and_never_passed_unverified(
    proxy: FaultProxy, clients: Clients, prefix: str
) -> None:
    name = f"{prefix}-cache"
    boto3.client("dynamodb").create_table(
        TableName=name,
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
    )
    boto3.client("dynamodb").get_waiter("table_exists").wait(
        TableName=name, WaiterConfig={"Delay": 0.1}
    )
    proxy.throttle_targets, proxy.throttle_fraction = {"PutItem"}, 0.3
    records = [f.firehose_record(event_doc(str(i)), f"r{i}") for i in range(40)]
    config = FirehoseSettings(
        cache_table=name, backoff=Backoff(base_s=0.05, cap_s=2.0, attempts=12)
    )
    transformer = Transformer(clients.dynamodb_writes, config)
    response = await transformer.transform(f.firehose_event(*records))
    assert proxy.stats.throttled > 0
    assert all(e["result"] == "Ok" for e in response["records"])
    proxy.throttle_fraction = 1.0  # now nothing can be verified
    more = [f.firehose_record(event_doc(f"new{i}"), f"n{i}") for i in range(3)]
    response = await transformer.transform(f.firehose_event(*more))
    assert [e["result"] for e in response["records"]] == ["ProcessingFailed"] * 3


async def test_every_record_id_is_answered_exactly_once(transform: Transform) -> None:
    records = [
        f.firehose_record(event_doc("same"), "a"),
        f.firehose_record(b"bad", "b"),
        f.firehose_record(event_doc("same"), "c"),
        f.firehose_record(event_doc(name=""), "d"),
    ]
    response = await transform(*records)
    assert [e["recordId"] for e in response["records"]] == ["a", "b", "c", "d"]


keys = st.sampled_from(["k1", "k2", "k3", "k4"])
batch_lists = st.lists(st.lists(keys, min_size=1, max_size=6), min_size=1, max_size=4)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batches=st.lists(st.lists(keys, min_size=1, max_size=6), min_size=1, max_size=4), data=st.data()
)
async def test_each_unique_key_yields_exactly_one_ok_across_batches_and_retries(
    clients: Clients, moto: str, batches: list[list[str]], data: st.DataObject
) -> None:
    name = f"event-cache-h{next(_tables)}"
    await setup_cache_table(clients.dynamodb, name)
    transformer = Transformer(clients.dynamodb_writes, FirehoseSettings(cache_table=name))
    ok: list[str] = []
    ids = itertools.count()
    for keys_in_batch in batches:
        batch = [f.firehose_record(event_doc(k), f"r{next(ids)}") for k in keys_in_batch]
        tries = data.draw(st.integers(min_value=1, max_value=2))  # Firehose may retry
        for attempt in range(tries):
            response = await transformer.transform(f.firehose_event(*batch))
            if attempt == tries - 1:
                ok.extend(
                    decoded(e)["event_uuid"] for e in response["records"] if e["result"] == "Ok"
                )
    assert sorted(ok) == sorted({k for batch in batches for k in batch})


def test_the_lambda_handler_routes_firehose_events(
    cache_table: str, install_runtime: Callable[[Settings], Any]
) -> None:
    handler = install_runtime(Settings(firehose=FirehoseSettings(cache_table=cache_table)))
    event = f.firehose_event(f.firehose_record(event_doc(), "r1"))
    response = handler(event, f.LambdaContext())
    assert response["records"][0]["result"] == "Ok"
