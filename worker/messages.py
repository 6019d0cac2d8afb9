"""SQS message body -> the S3 objects it names (DESIGN §3.2).

Accepted bodies:
1. ``{"bucket": ..., "key": ..., "version_id": ...?}``
2. an S3 event notification (``Records[].s3``); keys are URL-decoded with
   ``unquote_plus``; ``s3:TestEvent`` names nothing and is acknowledged
3. an SNS envelope (``Type: Notification``) whose ``Message`` is 1 or 2
4. an EventBridge "Object Created" event (``detail.bucket.name``/``detail.object.key``)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

import orjson

from worker.errors import MalformedMessage


@dataclass(frozen=True, slots=True)
class ObjectRef:
    bucket: str
    key: str
    version_id: str | None = None

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def parse_body(body: str | bytes) -> list[ObjectRef]:
    """Return the objects a message body names; ``[]`` for an S3 test event."""
    return _refs(_json(body, "body"), depth=0)


def _json(text: str | bytes, what: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise MalformedMessage(f"{what} is not JSON: {exc}") from None


def _refs(doc: Any, *, depth: int) -> list[ObjectRef]:
    if not isinstance(doc, dict):
        raise MalformedMessage(f"body is a JSON {type(doc).__name__}, not an object")
    if doc.get("Type") == "Notification" and "Message" in doc and depth == 0:
        message = doc["Message"]
        if not isinstance(message, str):
            raise MalformedMessage("SNS envelope Message is not a string")
        return _refs(_json(message, "SNS Message"), depth=1)
    if doc.get("Event") == "s3:TestEvent":
        return []
    if "Records" in doc:
        return _s3_notification(doc["Records"])
    if doc.get("detail-type") == "Object Created" and isinstance(doc.get("detail"), dict):
        return [_eventbridge(doc["detail"])]
    if "bucket" in doc or "key" in doc:
        return [_plain(doc)]
    raise MalformedMessage(
        "body is none of: {bucket,key}, S3 notification, SNS envelope, EventBridge event"
    )


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise MalformedMessage(f"{field} is missing or not a non-empty string")
    return value


def _plain(doc: dict[str, Any]) -> ObjectRef:
    version = doc.get("version_id")
    if version is not None and not isinstance(version, str):
        raise MalformedMessage("version_id is not a string")
    return ObjectRef(_text(doc.get("bucket"), "bucket"), _text(doc.get("key"), "key"), version)


def _s3_notification(records: Any) -> list[ObjectRef]:
    if not isinstance(records, list) or not records:
        raise MalformedMessage("Records is not a non-empty list")
    refs = []
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("s3"), dict):
            raise MalformedMessage(f"Records[{index}] has no s3 section")
        if not str(record.get("eventName", "ObjectCreated")).startswith("ObjectCreated"):
            continue  # removals and restores name nothing to load
        s3 = record["s3"]
        bucket = (s3.get("bucket") or {}).get("name")
        obj = s3.get("object") or {}
        refs.append(
            ObjectRef(
                _text(bucket, f"Records[{index}].s3.bucket.name"),
                unquote_plus(_text(obj.get("key"), f"Records[{index}].s3.object.key")),
                obj.get("versionId") or None,
            )
        )
    return refs


def _eventbridge(detail: dict[str, Any]) -> ObjectRef:
    bucket = (detail.get("bucket") or {}).get("name")
    obj = detail.get("object") or {}
    return ObjectRef(
        _text(bucket, "detail.bucket.name"),
        _text(obj.get("key"), "detail.object.key"),
        obj.get("version-id") or None,
    )
