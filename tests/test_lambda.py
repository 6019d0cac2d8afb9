"""``lambda_entry.handler`` on SQS events: partial batch responses (README "Errors", "Lambda")."""

from __future__ import annotations

import dataclasses
import gzip
from collections.abc import Callable
from typing import Any

import pytest

from tests import factories as f
from tests.conftest import BUCKET, events, scan
from worker.core.config import Settings

pytestmark = pytest.mark.usefixtures("dynamodb")
Handler = Callable[..., dict[str, Any]]
GOOD = f.output_file(("items", ["id", "v"], [["a", 1], ["b", 2]]))


@pytest.fixture
def make_handler(
    settings: Settings, install_runtime: Callable[[Settings], Handler]
) -> Callable[..., Handler]:
    """The real handler, on a runtime built from ``settings`` with any overrides."""
    return lambda **overrides: install_runtime(dataclasses.replace(settings, **overrides))


@pytest.fixture
def handler(make_handler: Callable[..., Handler]) -> Handler:
    return make_handler()


def invoke(handler: Handler, *records: dict[str, Any], remaining_ms: int = 300_000) -> list[str]:
    response = handler(f.sqs_event(*records), f.LambdaContext(remaining_ms))
    return [failure["itemIdentifier"] for failure in response["batchItemFailures"]]


def test_every_body_format_loads_its_objects(
    handler: Handler, s3: Any, ddb: Any, prefix: str
) -> None:
    keys = ["plain.pb", "dir/with space+plus.pb", "sns.pb", "eb.pb", "multi1.pb", "multi2.pb"]
    for index, key in enumerate(keys):
        s3.put_object(Bucket=BUCKET, Key=key, Body=f.output_file(("t", ["id"], [[f"row{index}"]])))
    records = [
        f.sqs_record(f.plain_body(BUCKET, "plain.pb")),
        f.sqs_record(f.s3_notification(BUCKET, "dir/with+space%2Bplus.pb")),
        f.sqs_record(f.sns_envelope(f.plain_body(BUCKET, "sns.pb"))),
        f.sqs_record(f.eventbridge(BUCKET, "eb.pb")),
        f.sqs_record(f.s3_notification(BUCKET, "multi1.pb", "multi2.pb")),
        f.sqs_record(f.S3_TEST_EVENT),
    ]
    assert invoke(handler, *records) == []
    rows = {i["id"]["S"] for i in scan(ddb, f"{prefix}_t")}
    assert rows == {f"row{i}" for i in range(len(keys))}


def test_replaying_the_same_event_leaves_item_counts_unchanged(
    handler: Handler, s3: Any, ddb: Any, prefix: str
) -> None:
    s3.put_object(Bucket=BUCKET, Key="r.pb", Body=f.output_file(("r", ["v"], [[1], [2], [3]])))
    record = f.sqs_record(f.plain_body(BUCKET, "r.pb"))
    assert invoke(handler, record) == []
    first = sorted(map(str, scan(ddb, f"{prefix}_r")))
    assert invoke(handler, record) == []
    assert sorted(map(str, scan(ddb, f"{prefix}_r"))) == first and len(first) == 3


BAD_OBJECTS: dict[str, bytes] = {
    "corrupt protobuf": b"\xff\xff\xff\xff",
    "empty object": b"",
    "gzip bomb": gzip.compress(b"\x00" * 3_000_000),
    "truncated gzip": gzip.compress(GOOD)[:-12],
    "over the size cap": b"\x0a" * 2_100_000,
}


@pytest.mark.parametrize("case", [*BAD_OBJECTS, "malformed json", "missing key", "no such key"])
def test_bad_input_fails_only_its_message_and_logs_an_error_naming_it(
    make_handler: Callable[..., Handler],
    s3: Any,
    ddb: Any,
    prefix: str,
    logs: list[dict[str, Any]],
    case: str,
) -> None:
    handler = make_handler(max_object_bytes=2_000_000, max_decoded_bytes=2_000_000)
    s3.put_object(Bucket=BUCKET, Key="good.pb", Body=GOOD)
    bad_body: Any = f.plain_body(BUCKET, "bad.pb")
    if case in BAD_OBJECTS:
        s3.put_object(Bucket=BUCKET, Key="bad.pb", Body=BAD_OBJECTS[case])
    elif case == "malformed json":
        bad_body = '{"bucket": "input", "key": '
    elif case == "missing key":
        bad_body = {"bucket": BUCKET}
    good, bad = f.sqs_record(f.plain_body(BUCKET, "good.pb")), f.sqs_record(bad_body)
    assert invoke(handler, good, bad) == [bad["messageId"]]
    assert {i["id"]["S"] for i in scan(ddb, f"{prefix}_items")} == {"a", "b"}
    errors = [e for e in logs if e["log_level"] == "error"]
    assert errors and all(e["message_id"] == bad["messageId"] for e in errors)
    assert errors[0]["error"] and errors[0]["error_message"]
    if case not in ("malformed json", "missing key"):
        assert errors[0]["key"] == "bad.pb" and errors[0]["bucket"] == BUCKET


def test_a_table_extract_that_raises_fails_the_message_as_permanent(
    make_handler: Callable[..., Handler], s3: Any, logs: list[dict[str, Any]]
) -> None:
    handler = make_handler(table_extract="tests.plugins:explode")
    s3.put_object(Bucket=BUCKET, Key="x.pb", Body=GOOD)
    record = f.sqs_record(f.plain_body(BUCKET, "x.pb"))
    assert invoke(handler, record) == [record["messageId"]]
    (failed,) = events(logs, "object_failed")
    assert failed["error"] == "extract_failed" and "boom" in failed["error_message"]
    assert failed["retriable"] is False


def test_a_custom_extract_plugin_is_used(
    make_handler: Callable[..., Handler], s3: Any, ddb: Any, prefix: str
) -> None:
    handler = make_handler(table_extract="tests.plugins:upper_tables")
    s3.put_object(Bucket=BUCKET, Key="x.pb", Body=GOOD)
    assert invoke(handler, f.sqs_record(f.plain_body(BUCKET, "x.pb"))) == []
    assert len(scan(ddb, f"{prefix}_ITEMS")) == 2


def test_messages_not_started_before_the_deadline_are_reported_failed(
    make_handler: Callable[..., Handler], s3: Any, logs: list[dict[str, Any]]
) -> None:
    handler = make_handler(deadline_margin_ms=10_000)
    s3.put_object(Bucket=BUCKET, Key="good.pb", Body=GOOD)
    records = [f.sqs_record(f.plain_body(BUCKET, "good.pb")) for _ in range(3)]
    failed = invoke(handler, *records, remaining_ms=0)  # no time left at all
    assert failed == [r["messageId"] for r in records]
    assert events(logs, "deadline_reached")


def test_a_timeout_shorter_than_the_margin_still_leaves_time_to_work(
    make_handler: Callable[..., Handler], s3: Any, ddb: Any, prefix: str
) -> None:
    handler = make_handler(deadline_margin_ms=10_000)
    s3.put_object(Bucket=BUCKET, Key="good.pb", Body=GOOD)
    records = [f.sqs_record(f.plain_body(BUCKET, "good.pb")) for _ in range(3)]
    assert invoke(handler, *records, remaining_ms=3_000) == []  # the margin shrinks to 600 ms
    assert len(scan(ddb, f"{prefix}_items")) == 2


def test_every_log_line_of_an_invocation_carries_the_request_id(
    handler: Handler, s3: Any, logs: list[dict[str, Any]]
) -> None:
    s3.put_object(Bucket=BUCKET, Key="good.pb", Body=GOOD)
    handler(f.sqs_event(f.sqs_record(f.plain_body(BUCKET, "good.pb"))), f.LambdaContext())
    assert logs and all(e.get("aws_request_id") == "req-1" for e in logs)
    assert {"invocation_start", "object_downloaded", "object_decoded", "table_written"} <= {
        e["event"] for e in logs
    }
    (done,) = events(logs, "batch_done")
    assert done["messages"] == 1 and done["rows_written"] == 2 and done["failed"] == 0


def test_an_unknown_event_gets_a_clear_error_not_a_crash(
    handler: Handler, logs: list[dict[str, Any]]
) -> None:
    response = handler({"hello": "world"}, f.LambdaContext())
    assert response["error"] == "unsupported_event"
    assert events(logs, "invocation_rejected")[0]["log_level"] == "error"


def test_a_fifo_batch_fails_everything_after_its_first_failure(handler: Handler, s3: Any) -> None:
    s3.put_object(Bucket=BUCKET, Key="good.pb", Body=GOOD)
    records = [
        f.sqs_record(f.plain_body(BUCKET, "good.pb")),
        f.sqs_record({"bucket": BUCKET}),
        f.sqs_record(f.plain_body(BUCKET, "good.pb")),
    ]
    for record in records:
        record["eventSourceARN"] += ".fifo"
    assert invoke(handler, *records) == [r["messageId"] for r in records[1:]]
