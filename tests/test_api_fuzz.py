"""No 500 and no traceback from the ledger's API, ever (issue: runs that always
end): hand-made event shapes, the source allow-list, and a Hypothesis fuzz of
payload 2.0 events through the real Lambda handler."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import factories as f
from tests.conftest import Call
from worker.core.config import Settings

Handler = Callable[..., dict[str, Any]]
PATHS = ["/runs", "/runs/abc", "/runs/abc/files", "/runs/abc/cancel", "/datasets/sales",
         "/datasets/", "/health", "/", "/runs//files"]  # fmt: skip
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH"]


@pytest.fixture
def handler(ledger_settings: Settings, install_runtime: Callable[[Settings], Any]) -> Handler:
    handle: Handler = install_runtime(ledger_settings)
    return handle


def answered(response: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """A well-formed HTTP answer with a JSON body, and never a 500."""
    assert set(response) == {"statusCode", "headers", "body"}, response
    status = response["statusCode"]
    assert isinstance(status, int) and 200 <= status < 600 and status != 500, response
    body = orjson.loads(response["body"])
    assert isinstance(body, dict)
    if status >= 400:
        assert body["error"] and body["message"] and "Traceback" not in response["body"]
    return status, body


def event(**fields: Any) -> dict[str, Any]:
    return {"version": "2.0", "rawPath": "/runs", "requestContext": {"http": {"method": "GET"}},
            **fields}  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"queryStringParameters": ["status", "failed"]}, "queryStringParameters"),
        ({"queryStringParameters": {"status": 5}}, "queryStringParameters"),
        ({"headers": "Idempotency-Key: k"}, "headers"),
        ({"body": 42}, "body"),
        ({"body": {"datasetName": "sales"}}, "body"),
        ({"rawPath": 7}, "rawPath"),
        ({"isBase64Encoded": "yes"}, "isBase64Encoded"),
        ({"requestContext": {"http": "GET"}}, "http"),
    ],
)
def test_an_event_of_the_wrong_shape_is_400_naming_the_field(
    handler: Handler, fields: dict[str, Any], field: str
) -> None:
    status, body = answered(handler(event(**fields), f.LambdaContext()))
    assert status == 400 and body["details"] == [{"field": field}]


def test_a_lone_surrogate_anywhere_is_a_400_or_404_not_a_crash(handler: Handler) -> None:
    surrogate = "\ud800"
    for fields in (
        {"body": '{"datasetName": "' + surrogate + '"}', "requestContext": {"http": {}}},
        {"rawPath": "/runs/" + surrogate},
        {"queryStringParameters": {"status": surrogate}},
        {"headers": {"idempotency-key": surrogate}},
    ):  # fmt: skip
        status, _ = answered(handler(event(**fields), f.LambdaContext()))
        assert status in (400, 404)


async def test_a_dataset_outside_the_loaders_buckets_is_refused(
    ledger_settings: Settings, clients: Any
) -> None:
    from worker.entry.runtime import make_api
    from worker.ledger.api import Request

    narrow = make_api(dataclasses.replace(ledger_settings, source_buckets=("input",)), clients)
    body = orjson.dumps({"location": "s3://elsewhere/{businessDate}/"})
    status, answer = await narrow.handle(Request("PUT", "/datasets/sales", body=body))
    assert status == 400 and answer["details"] == [{"field": "location"}]
    assert "SOURCE_BUCKETS" in answer["message"]
    body = orjson.dumps({"location": "s3://input/{businessDate}/"})
    assert (await narrow.handle(Request("PUT", "/datasets/sales", body=body)))[0] == 200


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)  # fmt: skip
ANYTHING = JSON | st.text(max_size=40)
RUN_BODIES = st.fixed_dictionaries(
    {"datasetName": st.sampled_from(["sales", "nosuch", "", "../x"]) | st.text(max_size=10),
     "businessDate": st.sampled_from(["2026-11-21", "2026-02-30", ""]) | ANYTHING},
    optional={"metadata": JSON, "sourceTrigger": JSON, "supersede": ANYTHING,
              "sourceType": st.sampled_from(["manual", "fax"]) | ANYTHING},
)  # fmt: skip
QUERY = st.dictionaries(
    st.sampled_from(["limit", "nextToken", "status", "datasetName", "businessDate", "x"]),
    st.text(max_size=30) | st.sampled_from(["50", "\u00b2", "failed", "eyJ4IjoxfQ", "2026-11-21"]),
    max_size=4,
)  # fmt: skip
EVENTS = st.fixed_dictionaries(
    {"version": st.just("2.0"),
     "requestContext": st.fixed_dictionaries({"http": st.fixed_dictionaries(
         {"method": st.sampled_from(METHODS) | ANYTHING})}) | ANYTHING,
     "rawPath": st.sampled_from(PATHS) | st.text(max_size=30).map(lambda t: "/" + t)},
    optional={
        "queryStringParameters": QUERY | ANYTHING,
        "headers": st.dictionaries(st.sampled_from(["idempotency-key", "content-type", "x"]),
                                   st.text(max_size=20), max_size=3) | ANYTHING,
        "body": RUN_BODIES.map(lambda b: orjson.dumps(b).decode()) | ANYTHING,
        "isBase64Encoded": st.booleans() | ANYTHING,
    },
)  # fmt: skip


SLOW = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@settings(max_examples=500, deadline=None, suppress_health_check=SLOW)
@given(events=EVENTS)
def test_any_event_gets_a_json_answer_and_never_a_500(
    handler: Handler, call: Call, events: dict[str, Any]
) -> None:
    answered(handler(events, f.LambdaContext()))
