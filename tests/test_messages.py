"""SQS bodies name S3 objects in four formats (README "Message formats")."""

from __future__ import annotations

import re

import pytest

from tests import factories as f
from worker.core.errors import MalformedMessage
from worker.loader.messages import ObjectRef, parse_body
from worker.loader.verify import Expected


def body(doc: object) -> str:
    import orjson

    return orjson.dumps(doc).decode()


def test_plain_body_names_one_object_with_optional_version() -> None:
    assert parse_body(body({"bucket": "b", "key": "k/x.pb", "version_id": "v1"})) == [
        ObjectRef("b", "k/x.pb", "v1")
    ]


def test_s3_notification_keys_are_url_decoded() -> None:
    refs = parse_body(body(f.s3_notification("b", "dir/my+file%20name%2B1.pb")))
    assert refs == [ObjectRef("b", "dir/my file name+1.pb")]


def test_s3_notification_with_several_records_names_each_object() -> None:
    refs = parse_body(body(f.s3_notification("b", "a.pb", "b.pb", "c.pb")))
    assert [r.key for r in refs] == ["a.pb", "b.pb", "c.pb"]


def test_s3_notification_ignores_records_that_are_not_creations() -> None:
    doc = f.s3_notification("b", "a.pb", "gone.pb")
    doc["Records"][1]["eventName"] = "ObjectRemoved:Delete"
    assert parse_body(body(doc)) == [ObjectRef("b", "a.pb")]


def test_sns_envelope_unwraps_a_plain_body_or_a_notification() -> None:
    assert parse_body(body(f.sns_envelope(f.plain_body("b", "k")))) == [ObjectRef("b", "k")]
    assert parse_body(body(f.sns_envelope(f.s3_notification("b", "a+b")))) == [
        ObjectRef("b", "a b")
    ]


def test_eventbridge_object_created_names_its_object() -> None:
    assert parse_body(body(f.eventbridge("b", "x/y.pb"))) == [ObjectRef("b", "x/y.pb")]


def test_s3_test_event_names_nothing() -> None:
    assert parse_body(body(f.S3_TEST_EVENT)) == []


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "JSON list"),
        (body({"bucket": "b"}), "key is missing"),
        (body({"key": "k"}), "bucket is missing"),
        (body({"bucket": "", "key": "k"}), "bucket is missing"),
        (body({"Records": []}), "non-empty list"),
        (body({"Records": [{"eventName": "ObjectCreated:Put"}]}), "no s3 section"),
        (body({"hello": "world"}), "none of"),
        (body({"Type": "Notification", "Message": "nope"}), "SNS Message is not JSON"),
    ],
)
def test_malformed_bodies_are_permanent_errors_that_say_why(raw: str, says: str) -> None:
    with pytest.raises(MalformedMessage, match=says) as caught:
        parse_body(raw)
    assert not caught.value.retriable


RUN_FILE = {"run_id": "r1", "file_id": "0f" * 16}
URL_BODY = {"url": "https://data.vendor.com/2026/q%201.pb?sig=x", **RUN_FILE,
            "dataset": "quotes", "business_date": "2026-11-21"}  # fmt: skip


def test_a_url_body_names_a_runs_file_and_where_it_lands() -> None:
    (ref,) = parse_body(body({**URL_BODY, "secret": "worker/acquire/v", "expect": {"size": 9}}))
    assert ref.key == f"quotes/2026-11-21/{'0f' * 16}/q_1.pb"  # the name made safe
    assert ref.remote is not None and ref.remote.secret == "worker/acquire/v"
    assert ref.expected == Expected(size=9) and ref.uri == "https://data.vendor.com/2026/q%201.pb"


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"url": "ftp://x/y"}, "http(s) URL"),
        ({"run_id": None, "file_id": None}, "a url message is a run's"),
        ({"business_date": "21/11/2026"}, "business_date"),
        ({"dataset": "../up"}, "dataset"),
        ({"file_id": "a/b"}, "file_id"),
        ({"expect": {"sha256": "XYZ"}}, "expect.sha256"),
        ({"expect": {"size": -1}}, "expect.size"),
        ({"expect": {"crc": 1}}, "expect is not"),
    ],
)
def test_a_url_body_that_breaks_the_format_is_malformed(
    change: dict[str, object], says: str
) -> None:
    doc = {k: v for k, v in {**URL_BODY, **change}.items() if v is not None}
    with pytest.raises(MalformedMessage, match=re.escape(says)):
        parse_body(body(doc))


def test_a_plain_body_carries_what_its_manifest_says() -> None:
    (ref,) = parse_body(body({"bucket": "b", "key": "k", **RUN_FILE, "expect": {"md5": "a" * 32}}))
    assert ref.expected == Expected(md5="a" * 32) and ref.remote is None
