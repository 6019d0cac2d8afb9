"""Input that tries to hurt: every item reproduced, and none can (issue: layout and operability).

A message body or a file may name tables, buckets and sizes at will; the worker
writes only what it owns, reads only what it may, stays within its bounds and
answers within its deadline.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import orjson
import pytest
from botocore.exceptions import ClientError
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import factories as f
from tests.conftest import BUCKET, events, scan
from worker.core.aws import Clients
from worker.core.config import FirehoseSettings, Settings, StreamSettings
from worker.core.errors import (
    ConfigError,
    InvalidTable,
    MalformedMessage,
    ObjectTooLarge,
    SourceNotAllowed,
    TableNotOwned,
)
from worker.core.log import MAX_FIELD_CHARS, cap_input
from worker.firehose.transform import dedupe_key, parse_created_at
from worker.loader.items import ItemBuilder, KeyAttribute, KeySchema, Origin
from worker.loader.messages import ObjectRef, parse_body
from worker.loader.pipeline import Loader


def put(s3: Any, key: str, data: bytes) -> ObjectRef:
    s3.put_object(Bucket=BUCKET, Key=key, Body=data)
    return ObjectRef(BUCKET, key)


def exists(ddb: Any, table: str) -> bool:
    try:
        ddb.describe_table(TableName=table)
    except ClientError as exc:
        assert exc.response["Error"]["Code"] == "ResourceNotFoundException"
        return False
    return True


# --- the loader writes only tables it owns, from buckets it may read -------------------


@pytest.mark.usefixtures("dynamodb")
async def test_a_file_cannot_write_into_a_table_the_loader_did_not_create(
    loader: Loader, s3: Any, ddb: Any, prefix: str
) -> None:
    ddb.create_table(
        TableName=f"{prefix}_ledger",
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
    )
    ddb.get_waiter("table_exists").wait(TableName=f"{prefix}_ledger", WaiterConfig={"Delay": 0.1})
    data = f.output_file(("ledger", ["id"], [["planted"]]), ("mine", ["id"], [["a"]]))
    summary = await loader.load(put(s3, "plant.pb", data))
    assert isinstance(summary.error, TableNotOwned) and not summary.error.retriable
    assert scan(ddb, f"{prefix}_ledger") == []
    assert [i["id"]["S"] for i in scan(ddb, f"{prefix}_mine")] == ["a"]  # its own table loads


@pytest.mark.usefixtures("dynamodb")
async def test_a_table_the_loader_created_stays_writable_for_the_next_process(
    settings: Settings, clients: Clients, s3: Any, ddb: Any, prefix: str
) -> None:
    data = f.output_file(("t", ["id"], [["a"]]))
    assert (await Loader(settings, clients).load(put(s3, "one.pb", data))).ok
    again = await Loader(settings, clients).load(put(s3, "one.pb", data))  # a fresh registry
    assert again.ok, again.error


async def test_the_firehose_cache_table_is_refused_by_name(
    moto: str, settings: Settings, clients: Clients, s3: Any, prefix: str
) -> None:
    cache = dataclasses.replace(settings, firehose=FirehoseSettings(cache_table=f"{prefix}_cache"))
    summary = await Loader(cache, clients).load(
        put(s3, "c.pb", f.output_file(("cache", ["id"], [["x"]])))
    )
    assert isinstance(summary.error, TableNotOwned)


async def test_outside_local_use_a_prefix_and_the_source_buckets_are_required(
    settings: Settings,
) -> None:
    async with Clients(max_in_flight=2) as aws:  # the real endpoints: nothing is called
        with pytest.raises(ConfigError, match="SCHEMA_PREFIX"):
            Loader(dataclasses.replace(settings, schema_prefix=""), aws)
        with pytest.raises(ConfigError, match="SOURCE_BUCKETS"):
            Loader(settings, aws)
        Loader(dataclasses.replace(settings, source_buckets=("*",)), aws)


async def test_a_bucket_outside_source_buckets_is_refused_before_it_is_read(
    moto: str, settings: Settings, clients: Clients, s3: Any, logs: list[dict[str, Any]]
) -> None:
    data = f.output_file(("t", ["id"], [["a"]]))
    allowed = Loader(dataclasses.replace(settings, source_buckets=("elsewhere",)), clients)
    summary = await allowed.load(put(s3, "x.pb", data))
    assert isinstance(summary.error, SourceNotAllowed) and not summary.error.retriable
    assert not events(logs, "object_downloaded")
    anywhere = Loader(dataclasses.replace(settings, source_buckets=("*",)), clients)
    assert (await anywhere.load(ObjectRef(BUCKET, "x.pb"))).ok


# --- names that collide, tables that are empty or too many ----------------------------


@pytest.mark.usefixtures("dynamodb")
async def test_two_tables_that_sanitise_to_one_name_both_fail_and_nothing_merges(
    loader: Loader, s3: Any, ddb: Any, prefix: str
) -> None:
    data = f.output_file(("a b", ["id"], [["1"]]), ("a_b", ["id"], [["2"]]), ("c", ["id"], [["3"]]))
    summary = await loader.load(put(s3, "clash.pb", data))
    assert isinstance(summary.error, InvalidTable)
    assert sorted(t.error or "ok" for t in summary.tables) == [
        "invalid_table",
        "invalid_table",
        "ok",
    ]
    assert summary.rows_written == 1 and not exists(ddb, f"{prefix}_a_b")


async def test_an_empty_table_creates_nothing(
    moto: str, loader: Loader, s3: Any, prefix: str
) -> None:
    data = f.output_file(("empty", ["id"], []), ("full", ["id"], [["a"]]))
    summary = await loader.load(put(s3, "empty.pb", data))
    ddb = boto3.client("dynamodb")
    assert summary.ok and summary.rows_written == 1
    assert exists(ddb, f"{prefix}_full") and not exists(ddb, f"{prefix}_empty")


async def test_a_file_with_more_tables_than_the_cap_fails_before_creating_any(
    moto: str, settings: Settings, clients: Clients, s3: Any
) -> None:
    tables = [(f"t{i}", ["id"], [["a"]]) for i in range(6)]
    capped = Loader(dataclasses.replace(settings, max_tables_per_file=5), clients)
    summary = await capped.load(put(s3, "many.pb", f.output_file(*tables)))
    assert isinstance(summary.error, ObjectTooLarge)
    assert "MAX_TABLES_PER_FILE=5" in summary.error.message
    assert boto3.client("dynamodb").list_tables()["TableNames"] == []


def test_the_gzip_bomb_stops_at_the_decoded_cap_without_inflating_it_all() -> None:
    from worker.core.errors import ObjectTooLarge
    from worker.loader.s3_reader import Limits, gunzip_if_needed

    bomb = gzip.compress(b"\x00" * 50_000_000)
    with pytest.raises(ObjectTooLarge, match="MAX_DECODED_BYTES=1000000") as caught:
        gunzip_if_needed(bomb, Limits(max_object_bytes=10_000_000, max_decoded_bytes=1_000_000))
    assert caught.value.context["size"] <= 1_000_001  # it stopped at the cap


# --- message bodies of any shape ------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"Records": [{"s3": {"bucket": "a-string", "object": {"key": "k"}}}]},
        {"Records": [{"s3": {"bucket": {"name": "b"}, "object": "k"}}]},
        {"Records": [{"s3": {"bucket": {"name": "b"}, "object": {"key": "k", "versionId": 3}}}]},
        {"Records": [{"s3": {"bucket": {"name": ["b"]}, "object": {"key": "k"}}}]},
        {"detail-type": "Object Created", "detail": {"bucket": 7, "object": {"key": "k"}}},
        {"detail-type": "Object Created", "detail": {"bucket": {"name": "b"}, "object": []}},
        {"bucket": {"nested": True}, "key": "k"},
        {"bucket": "b", "key": "k", "version_id": {"v": 1}},
        {"Type": "Notification", "Message": "[1, 2]"},
    ],
)
def test_a_body_of_the_wrong_shape_is_malformed_never_a_crash(body: Any) -> None:
    with pytest.raises(MalformedMessage):
        parse_body(orjson.dumps(body).decode())


BODY_KEYS = st.sampled_from(["Records", "s3", "bucket", "name", "object", "key", "detail", "Type"])
json_values: st.SearchStrategy[Any] = st.deferred(
    lambda: (
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**63 - 1)
        | st.text(max_size=5)
        | st.lists(json_values, max_size=3)
        | st.dictionaries(BODY_KEYS, json_values, max_size=4)
    )
)


@settings(max_examples=300, deadline=None)
@given(doc=json_values)
def test_any_json_body_yields_refs_or_malformed_message(doc: Any) -> None:
    try:
        refs = parse_body(orjson.dumps(doc))
    except MalformedMessage:
        return
    assert all(isinstance(r.bucket, str) and isinstance(r.key, str) for r in refs)


def test_a_body_naming_one_object_many_times_names_it_once() -> None:
    body = f.s3_notification(BUCKET, *(["same.pb"] * 2600))
    assert parse_body(orjson.dumps(body)) == [ObjectRef(BUCKET, "same.pb")]


def test_a_body_naming_more_objects_than_the_cap_is_refused() -> None:
    body = f.s3_notification(BUCKET, *(f"k{i}.pb" for i in range(101)))
    with pytest.raises(MalformedMessage, match="MAX_OBJECTS_PER_MESSAGE=100"):
        parse_body(orjson.dumps(body), max_objects=100)


def test_an_attribute_name_dynamodb_refuses_skips_its_row() -> None:
    builder = ItemBuilder(KeySchema(KeyAttribute("id", "S")), "null", Origin("b", "k", "r", "t"))
    result: Any = builder.convert([{"id": "a", "n" * 70_000: 1}, {"id": "b", "": 2}, {"id": "c"}])
    assert result.stats.skipped == {"invalid_attribute_name": 2}
    assert [i["id"] for i in result.items] == [{"S": "c"}]


# --- what a log line may quote ---------------------------------------------------------


def test_every_logged_value_is_capped_whatever_the_input() -> None:
    huge = "x" * 20_000_000
    line = cap_input(
        None, "info", {"event": "e", "table": huge, "names": [huge] * 1000, "m": {huge: huge}}
    )
    assert len(orjson.dumps(dict(line))) < 200 * MAX_FIELD_CHARS
    assert line["table"].endswith(f"(+{20_000_000 - MAX_FIELD_CHARS} chars)")


async def test_a_huge_table_name_yields_small_log_lines(
    moto: str, loader: Loader, s3: Any, logs: list[dict[str, Any]]
) -> None:
    data = f.output_file(("t" * 2_000_000, ["id"], [["a"]]))
    summary = await loader.load(put(s3, "huge.pb", data))
    assert isinstance(summary.error, InvalidTable)
    for entry in logs:
        capped = cap_input(None, "info", dict(entry))
        assert len(orjson.dumps(dict(capped), default=str)) < 20_000, entry["event"]


# --- Firehose: timestamps at the edge of time, keys that cannot collide ---------------


@pytest.mark.parametrize("text", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-05:00"])
def test_a_timestamp_with_no_utc_moment_is_unreadable_not_an_overflow(text: str) -> None:
    assert parse_created_at(text) is None


def test_dedupe_keys_of_different_events_never_collide() -> None:
    assert dedupe_key("u", "a|b", 1) != dedupe_key("u|a", "b", 1)
    assert dedupe_key("u", "a", "1") != dedupe_key("u", "a", 1)
    assert len(dedupe_key("u" * 10_000, "e", 1)) == 64  # a key DynamoDB accepts, however long


async def test_a_batch_with_an_edge_timestamp_answers_every_record(
    moto: str, clients: Clients, cache_table: str
) -> None:
    from worker.firehose.transform import Transformer

    records = [
        f.firehose_record({"event_uuid": "1", "event_name": "a.b", "created_at": text})
        for text in ("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-05:00", 1_700_000_000)
    ]
    settings = FirehoseSettings(cache_table=cache_table)
    out = await Transformer(clients.dynamodb_writes, settings).transform(f.firehose_event(*records))
    assert [r["recordId"] for r in out["records"]] == [r["recordId"] for r in records]
    keys = [r["metadata"]["partitionKeys"]["event_type"] for r in out["records"]]
    assert keys == ["_error", "_error", "a"]


async def test_events_whose_pipe_joined_keys_would_collide_are_both_kept(
    moto: str, clients: Clients, cache_table: str
) -> None:
    from worker.firehose.transform import Transformer

    records = [
        f.firehose_record({"event_uuid": "u", "event_name": "a|b", "created_at": 1_700_000_000}),
        f.firehose_record({"event_uuid": "u|a", "event_name": "b", "created_at": 1_700_000_000}),
    ]
    settings = FirehoseSettings(cache_table=cache_table)
    out = await Transformer(clients.dynamodb_writes, settings).transform(f.firehose_event(*records))
    assert [r["result"] for r in out["records"]] == ["Ok", "Ok"]


@pytest.fixture
async def cache_table(clients: Clients) -> str:
    from worker.firehose.transform import setup_cache_table

    await setup_cache_table(clients.dynamodb, "hostile-cache")
    return "hostile-cache"


# --- every route answers before its deadline ------------------------------------------


@pytest.fixture
def silent_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An endpoint that accepts connections and never answers a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    yield url
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    start = time.monotonic()
    return call(), time.monotonic() - start


def test_the_streams_route_answers_before_the_deadline_against_a_silent_s3(
    silent_endpoint: str, install_runtime: Callable[[Settings], Any]
) -> None:
    handler = install_runtime(Settings(streams=StreamSettings(bucket="lake")))
    event = {"Records": [f.stream_record(100, new={"v": {"N": "1"}})]}
    response, seconds = timed(lambda: handler(event, f.LambdaContext(remaining_ms=3_000)))
    assert seconds < 3.0
    assert response == {"batchItemFailures": [{"itemIdentifier": "100"}]}


def test_the_firehose_route_answers_before_the_deadline_against_a_silent_dynamodb(
    silent_endpoint: str, install_runtime: Callable[[Settings], Any]
) -> None:
    handler = install_runtime(Settings(firehose=FirehoseSettings(cache_table="cache")))
    doc = {"event_uuid": "1", "event_name": "a.b", "created_at": 1_700_000_000}
    event = f.firehose_event(f.firehose_record(doc))
    response, seconds = timed(lambda: handler(event, f.LambdaContext(remaining_ms=3_000)))
    assert seconds < 3.0
    assert [r["result"] for r in response["records"]] == ["ProcessingFailed"]
    assert base64.b64decode(response["records"][0]["data"])  # the record itself goes back


def test_a_route_whose_settings_are_missing_fails_the_event_naming_the_variable(
    moto: str, install_runtime: Callable[[Settings], Any]
) -> None:
    handler = install_runtime(Settings())
    with pytest.raises(ConfigError, match="STREAM_BUCKET"):
        handler({"Records": [f.stream_record(1, new={})]}, f.LambdaContext())
    with pytest.raises(ConfigError, match="EVENT_CACHE_TABLE_NAME"):
        handler(f.firehose_event(f.firehose_record({"a": 1})), f.LambdaContext())


# --- a missing credential is permanent ------------------------------------------------


async def test_a_missing_credential_fails_as_permanent_not_transient(
    moto: str, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    async with Clients(max_in_flight=2) as clients:
        summary = await Loader(settings, clients).load(ObjectRef(BUCKET, "any.pb"))
    assert isinstance(summary.error, ConfigError) and not summary.error.retriable
    assert summary.error.context["aws_error"] == "NoCredentialsError"
