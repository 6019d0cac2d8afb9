"""Builders for OutputFile objects and for SQS / Lambda events."""

from __future__ import annotations

import base64
import itertools
from dataclasses import dataclass
from typing import Any

import orjson

from worker.loader.extract.outputfile_pb2 import OutputFile, Value

_ids = itertools.count(1)


def value(v: Any) -> Value:
    if v is None:
        return Value()
    if isinstance(v, bool):
        raise TypeError("the reference schema has no bool")
    if isinstance(v, int):
        return Value(int_value=v)
    if isinstance(v, float):
        return Value(float_value=v)
    return Value(string_value=v)


def output_file(*tables: tuple[str, list[str], list[list[Any]]], file_id: str = "f1") -> bytes:
    """Serialize an OutputFile: each table is (name, columns, rows of values; None = unset)."""
    message = OutputFile(file_id=file_id, source_uri="test://", created_at_ms=1_700_000_000_000)
    for name, columns, rows in tables:
        table = message.tables.add(name=name, columns=columns)
        for row in rows:
            table.rows.add(values=[value(v) for v in row])
    return message.SerializeToString()


def sqs_record(body: str | dict[str, Any], message_id: str | None = None) -> dict[str, Any]:
    text = body if isinstance(body, str) else orjson.dumps(body).decode()
    return {
        "messageId": message_id or f"m-{next(_ids)}",
        "receiptHandle": "rh",
        "body": text,
        "attributes": {"ApproximateReceiveCount": "1"},
        "messageAttributes": {},
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:loader",
        "awsRegion": "us-east-1",
    }


def sqs_event(*records: dict[str, Any]) -> dict[str, Any]:
    return {"Records": list(records)}


def plain_body(bucket: str, key: str) -> dict[str, Any]:
    return {"bucket": bucket, "key": key}


def s3_notification(bucket: str, *encoded_keys: str) -> dict[str, Any]:
    return {
        "Records": [
            {
                "eventVersion": "2.1",
                "eventSource": "aws:s3",
                "eventName": "ObjectCreated:Put",
                "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 1}},
            }
            for key in encoded_keys
        ]
    }


def sns_envelope(inner: dict[str, Any]) -> dict[str, Any]:
    return {
        "Type": "Notification",
        "MessageId": "sns-1",
        "TopicArn": "arn:aws:sns:us-east-1:123456789012:files",
        "Message": orjson.dumps(inner).decode(),
    }


def eventbridge(bucket: str, key: str) -> dict[str, Any]:
    return {
        "version": "0",
        "detail-type": "Object Created",
        "source": "aws.s3",
        "detail": {"bucket": {"name": bucket}, "object": {"key": key, "size": 1}},
    }


S3_TEST_EVENT = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "b"}


@dataclass
class LambdaContext:
    """The two members of the Lambda context object the handler reads."""

    remaining_ms: int = 300_000
    aws_request_id: str = "req-1"

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


STREAM_ARN = "arn:aws:firehose:us-east-1:123456789012:deliverystream/events"


def firehose_record(doc: Any, record_id: str | None = None) -> dict[str, Any]:
    """A Firehose record whose data is ``doc`` as JSON (or raw bytes, as given)."""
    raw = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return {
        "recordId": record_id or f"r-{next(_ids)}",
        "approximateArrivalTimestamp": 1_700_000_000_000,
        "data": base64.b64encode(raw).decode(),
    }


def firehose_event(*records: dict[str, Any]) -> dict[str, Any]:
    return {
        "invocationId": f"inv-{next(_ids)}",
        "deliveryStreamArn": STREAM_ARN,
        "region": "us-east-1",
        "records": list(records),
    }


TABLE_STREAM_ARN = (
    "arn:aws:dynamodb:us-east-1:123456789012:table/{table}/stream/2026-01-01T00:00:00.000"
)


def stream_record(
    sequence: int,
    name: str = "INSERT",
    *,
    key: str = "k1",
    new: dict[str, Any] | None = None,
    old: dict[str, Any] | None = None,
    created_s: float = 1_763_700_000,
    table: str = "src",
    ttl: bool = False,
) -> dict[str, Any]:
    """A Lambda DynamoDB Streams record (wire-format images, as Lambda sends them)."""
    change: dict[str, Any] = {
        "ApproximateCreationDateTime": created_s,
        "Keys": {"id": {"S": key}},
        "SequenceNumber": str(sequence),
        "SizeBytes": 100,
        "StreamViewType": "NEW_AND_OLD_IMAGES",
    }
    if new is not None:
        change["NewImage"] = {"id": {"S": key}, **new}
    if old is not None:
        change["OldImage"] = {"id": {"S": key}, **old}
    record: dict[str, Any] = {
        "eventID": f"ev-{sequence}",
        "eventName": name,
        "eventVersion": "1.1",
        "eventSource": "aws:dynamodb",
        "awsRegion": "us-east-1",
        "dynamodb": change,
        "eventSourceARN": TABLE_STREAM_ARN.format(table=table),
    }
    if ttl:
        record["userIdentity"] = {"type": "Service", "principalId": "dynamodb.amazonaws.com"}
    return record


def scheduled_event() -> dict[str, Any]:
    """What an EventBridge schedule delivers to a Lambda target."""
    return {
        "version": "0",
        "id": "53dc4d37-cffa-4f76-80c9-8b7d4a4d2eaa",
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "123456789012",
        "time": "2026-11-21T10:00:00Z",
        "region": "us-east-1",
        "resources": ["arn:aws:events:us-east-1:123456789012:rule/sweep"],
        "detail": {},
    }
