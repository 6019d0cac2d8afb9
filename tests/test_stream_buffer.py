"""DynamoDB Streams batches become exactly-once part files in S3 (issue: streams)."""

from __future__ import annotations

import dataclasses
import gzip
import io
from collections.abc import Callable
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest

from tests import factories as f
from tests.conftest import events
from tests.fault_proxy import S3Faults
from worker.core.config import Settings, StreamSettings

LAKE = "lake"
Handler = Callable[..., dict[str, Any]]


@pytest.fixture
def lake(moto: str) -> Any:
    import boto3

    client = boto3.client("s3", endpoint_url=moto)
    client.create_bucket(Bucket=LAKE)
    return client


@pytest.fixture
def make_handler(
    lake: Any, install_runtime: Callable[[Settings], Handler]
) -> Callable[..., Handler]:
    def build(**stream_overrides: Any) -> Handler:
        streams = dataclasses.replace(StreamSettings(bucket=LAKE), **stream_overrides)
        return install_runtime(Settings(streams=streams))

    return build


def objects(lake: Any) -> dict[str, bytes]:
    listed = lake.list_objects_v2(Bucket=LAKE).get("Contents", [])
    return {o["Key"]: lake.get_object(Bucket=LAKE, Key=o["Key"])["Body"].read() for o in listed}


def ndjson(body: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in gzip.decompress(body).splitlines()]


def invoke(handler: Handler, *records: dict[str, Any]) -> list[str]:
    response = handler({"Records": list(records)}, f.LambdaContext())
    return [failure["itemIdentifier"] for failure in response["batchItemFailures"]]


def test_a_batch_becomes_one_gzipped_ndjson_part_of_envelopes(
    make_handler: Callable[..., Handler], lake: Any
) -> None:
    handler = make_handler()
    records = [
        f.stream_record(101, new={"n": {"N": "1.5"}}),
        f.stream_record(102, "MODIFY", new={"n": {"N": "2"}}, old={"n": {"N": "1.5"}}),
        f.stream_record(103, "REMOVE", old={"n": {"N": "2"}}, ttl=True),
    ]
    assert invoke(handler, *records) == []
    ((key, body),) = objects(lake).items()
    assert key.startswith("cdc/src/dt=2025-11-21/hour=04/part-101-103-") and key.endswith(
        ".json.gz"
    )
    first, second, third = ndjson(body)
    assert first["event_name"] == "INSERT" and first["new_image"] == {"id": "k1", "n": 1.5}
    assert first["keys"] == {"id": "k1"} and first["old_image"] is None
    assert first["source_table"] == "src" and first["approx_creation_time_ms"] == 1_763_700_000_000
    assert second["old_image"] == {"id": "k1", "n": 1.5} and second["new_image"]["n"] == 2
    assert third["is_deleted"] is True and third["ttl_expired"] is True
    assert first["ttl_expired"] is False and first["is_deleted"] is False
    assert {"event_id", "sequence_number", "size_bytes", "ingest_ts_ms"} <= set(first)


def test_a_redelivered_batch_rewrites_nothing(
    make_handler: Callable[..., Handler], lake: Any, logs: list[dict[str, Any]]
) -> None:
    handler = make_handler()
    records = [f.stream_record(s, key=f"k{s}", new={}) for s in range(1, 30)]
    invoke(handler, *records)
    first = objects(lake)
    invoke(handler, *records)
    assert objects(lake) == first  # the same keys, the same bytes, no second copy
    done = events(logs, "stream_batch_done")
    assert (done[0]["objects"], done[1]["objects"], done[1]["already_present"]) == (1, 0, 1)


def test_a_batch_across_an_hour_boundary_becomes_two_partitions(
    make_handler: Callable[..., Handler], lake: Any
) -> None:
    handler = make_handler()
    before, after = 1_763_701_199, 1_763_701_200  # 04:59:59 and 05:00:00 UTC
    invoke(
        handler,
        f.stream_record(1, key="a", new={}, created_s=before),
        f.stream_record(2, key="b", new={}, created_s=after),
    )
    keys = sorted(objects(lake))
    assert [k.split("/")[3] for k in keys] == ["hour=04", "hour=05"]


def test_parts_are_cut_at_the_record_limit_in_sequence_order(
    make_handler: Callable[..., Handler], lake: Any
) -> None:
    handler = make_handler(max_records=10)
    records = [f.stream_record(s, key=f"k{s}", new={}) for s in range(100, 125)]
    invoke(handler, *reversed(records))
    stored = objects(lake)
    assert len(stored) == 3
    sequences = [int(e["sequence_number"]) for k in sorted(stored) for e in ndjson(stored[k])]
    assert sequences == list(range(100, 125))


def test_parquet_output_reads_back_with_pyarrow(
    make_handler: Callable[..., Handler], lake: Any
) -> None:
    handler = make_handler(format="parquet")
    invoke(handler, f.stream_record(7, new={"tags": {"SS": ["b", "a"]}}))
    ((key, body),) = objects(lake).items()
    assert key.endswith(".parquet")
    (row,) = pq.read_table(io.BytesIO(body)).to_pylist()
    assert row["sequence_number"] == "7" and row["is_deleted"] is False
    assert orjson.loads(row["new_image"]) == {"id": "k1", "tags": ["a", "b"]}


def test_a_failed_write_reports_the_lowest_sequence_not_written(
    moto: str, lake: Any, monkeypatch: pytest.MonkeyPatch, make_handler: Callable[..., Handler]
) -> None:
    with S3Faults(moto, fail_key="hour=05") as faults:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", faults.url)
        handler = make_handler()
        records = [
            f.stream_record(10, key="a", new={}, created_s=1_763_701_199),  # hour 04
            f.stream_record(11, key="b", new={}, created_s=1_763_701_200),  # hour 05: fails
            f.stream_record(12, key="c", new={}, created_s=1_763_701_201),
        ]
        assert invoke(handler, *records) == ["11"]
        assert faults.failed
        assert invoke(handler, *records[1:]) == []  # Lambda resends from 11 on
    assert sorted(k.split("/")[3] for k in objects(lake)) == ["hour=04", "hour=05"]


def test_a_retry_with_more_records_leaves_every_record_in_exactly_one_part(
    moto: str, lake: Any, monkeypatch: pytest.MonkeyPatch, make_handler: Callable[..., Handler]
) -> None:
    # Records 1-5 in hour 04, 6-12 in hour 05. The first delivery (1-10) writes hour 05's
    # part 6-10 but not hour 04's; Lambda resends from 1, now with 11 and 12 as well.
    records = [
        f.stream_record(s, key=f"k{s}", new={}, created_s=1_763_701_195 + s) for s in range(1, 13)
    ]
    with S3Faults(moto, fail_key="hour=04") as faults:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", faults.url)
        handler = make_handler()
        assert invoke(handler, *records[:10]) == ["1"]
        assert faults.failed
        assert objects(lake) == {}  # part 6-10 would be cut as 6-12 next time: it is gone
        assert invoke(handler, *records) == []
    seen = [c["event_id"] for body in objects(lake).values() for c in ndjson(body)]
    assert sorted(seen) == sorted(r["eventID"] for r in records)  # each exactly once


def _changed(record: dict[str, Any], **change: Any) -> dict[str, Any]:
    """The record with fields of its ``dynamodb`` part replaced (None: removed)."""
    merged = {**record["dynamodb"], **change}
    return {**record, "dynamodb": {k: v for k, v in merged.items() if v is not None}}


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        (
            _changed(f.stream_record(3, "MODIFY"), StreamViewType="KEYS_ONLY"),
            "view type is KEYS_ONLY; the lake needs NEW_IMAGE or NEW_AND_OLD_IMAGES",
        ),
        (_changed(f.stream_record(3, new={}), Keys=None), "no Keys"),
        (_changed(f.stream_record(3, new={}), SequenceNumber="9" * 41), "longer than 40 digits"),
    ],
    ids=["modify-without-new-image", "no-keys", "41-digit-sequence"],
)
def test_a_record_the_lake_could_not_apply_stops_the_batch_there(
    make_handler: Callable[..., Handler],
    lake: Any,
    bad: dict[str, Any],
    named: str,
    logs: list[dict[str, Any]],
) -> None:
    handler = make_handler()
    before = [f.stream_record(s, key=f"k{s}", new={}) for s in (1, 2)]
    after = f.stream_record(4, key="k4", new={})
    failures = invoke(handler, *before, bad, after)
    assert failures == [bad["dynamodb"]["SequenceNumber"]]
    written = [c["event_id"] for body in objects(lake).values() for c in ndjson(body)]
    assert written == ["ev-1", "ev-2"]  # before it: written; it and after it: resent
    (refused,) = events(logs, "stream_record_refused")
    assert refused["log_level"] == "error" and named in refused["error_message"]
    assert refused["event_id"] == "ev-3"
