"""SQS message body -> the S3 objects it names (ARCHITECTURE.md, "Message formats").

Accepted bodies:
1. ``{"bucket": ..., "key": ..., "version_id": ...?, "run_id": ...?, "file_id": ...?,
   "expect": {"size", "sha256", "md5"}?}`` (a ledger run's message carries its run and
   file, and what its manifest says the file is)
1b. ``{"url": "https://...", "run_id", "file_id", "dataset", "business_date",
   "secret": ...?, "expect": ...?}``: a run's HTTP(S) file, fetched into the landing
   bucket first (``loader.landing``)
2. an S3 event notification (``Records[].s3``); keys are URL-decoded with
   ``unquote_plus``; ``s3:TestEvent`` names nothing and is acknowledged
3. an SNS envelope (``Type: Notification``) whose ``Message`` is 1 or 2
4. an EventBridge "Object Created" event (``detail.bucket.name``/``detail.object.key``)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

import orjson

from worker.core.errors import MalformedMessage
from worker.core.fetch import shown
from worker.core.tracking import TrackedFile
from worker.loader.landing import landing_key
from worker.loader.verify import Expected

_DATASET = re.compile(r"[A-Za-z0-9_.\-]{1,200}")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_FILE_ID = re.compile(r"[A-Za-z0-9_\-]{1,64}")
MAX_URL = 2048


@dataclass(frozen=True, slots=True)
class Remote:
    """An HTTP(S) file of a run: fetched into the landing bucket, then loaded from there."""

    url: str
    secret: str | None = None


@dataclass(frozen=True, slots=True)
class ObjectRef:
    bucket: str  # "" for a remote file until the loader names its landing bucket
    key: str
    version_id: str | None = None
    tracked: TrackedFile | None = None  # the ledger's run and file, when a run sent it
    expected: Expected = field(default_factory=Expected)
    remote: Remote | None = None

    @property
    def uri(self) -> str:
        return shown(self.remote.url) if self.remote else f"s3://{self.bucket}/{self.key}"


def parse_body(body: Any, *, max_objects: int = 100) -> list[ObjectRef]:
    """Return the distinct objects a message body names, in order; ``[]`` for an S3
    test event. Any shape the formats do not allow is ``MalformedMessage``."""
    if not isinstance(body, str | bytes):
        raise MalformedMessage(f"body is a {type(body).__name__}, not text")
    refs = list(dict.fromkeys(_refs(_json(body, "body"), depth=0)))
    if len(refs) > max_objects:
        raise MalformedMessage(
            f"body names {len(refs)} objects, over MAX_OBJECTS_PER_MESSAGE={max_objects}"
        )
    return refs


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
    if "url" in doc:
        return [_remote(doc)]
    raise MalformedMessage(
        "body is none of: {bucket,key}, {url,...}, S3 notification, SNS envelope, EventBridge event"
    )


def _section(doc: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    """``doc[name]`` when it is an object; ``{}`` when absent; malformed otherwise."""
    value = doc.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MalformedMessage(f"{where}{name} is a {type(value).__name__}, not an object")
    return value


def _optional_text(value: Any, field: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise MalformedMessage(f"{field} is not a string")
    return value


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise MalformedMessage(f"{field} is missing or not a non-empty string")
    return value


def _tracked(doc: dict[str, Any]) -> TrackedFile | None:
    run_id = _optional_text(doc.get("run_id"), "run_id")
    file_id = _optional_text(doc.get("file_id"), "file_id")
    if (run_id is None) != (file_id is None):
        raise MalformedMessage("run_id and file_id come together or not at all")
    return None if run_id is None or file_id is None else TrackedFile(run_id, file_id)


def _plain(doc: dict[str, Any]) -> ObjectRef:
    return ObjectRef(
        _text(doc.get("bucket"), "bucket"),
        _text(doc.get("key"), "key"),
        _optional_text(doc.get("version_id"), "version_id"),
        _tracked(doc),
        Expected.from_doc(doc.get("expect")),
    )


def _matching(doc: dict[str, Any], name: str, pattern: re.Pattern[str]) -> str:
    value = _text(doc.get(name), name)
    if not pattern.fullmatch(value):
        raise MalformedMessage(f"{name} {value[:80]!r} is not of the form {pattern.pattern}")
    return value


def _remote(doc: dict[str, Any]) -> ObjectRef:
    """A run's HTTP(S) file: its landing key is made of its dataset, date and file."""
    url = _text(doc.get("url"), "url")
    if not url.startswith(("https://", "http://")) or len(url) > MAX_URL:
        raise MalformedMessage(f"url is not an http(s) URL of at most {MAX_URL} characters")
    tracked = _tracked(doc)
    if tracked is None:
        raise MalformedMessage("a url message is a run's: run_id and file_id are missing")
    _matching(doc, "file_id", _FILE_ID)
    key = landing_key(
        _matching(doc, "dataset", _DATASET), _matching(doc, "business_date", _DATE),
        tracked.file_id, url,
    )  # fmt: skip
    remote = Remote(url, _optional_text(doc.get("secret"), "secret"))
    return ObjectRef("", key, None, tracked, Expected.from_doc(doc.get("expect")), remote)


def _s3_notification(records: Any) -> list[ObjectRef]:
    if not isinstance(records, list) or not records:
        raise MalformedMessage("Records is not a non-empty list")
    refs = []
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("s3"), dict):
            raise MalformedMessage(f"Records[{index}] has no s3 section")
        if not str(record.get("eventName", "ObjectCreated")).startswith("ObjectCreated"):
            continue  # removals and restores name nothing to load
        where = f"Records[{index}].s3."
        s3 = record["s3"]
        obj = _section(s3, "object", where)
        refs.append(
            ObjectRef(
                _text(_section(s3, "bucket", where).get("name"), f"{where}bucket.name"),
                unquote_plus(_text(obj.get("key"), f"{where}object.key")),
                _optional_text(obj.get("versionId"), f"{where}object.versionId"),
            )
        )
    return refs


def _eventbridge(detail: dict[str, Any]) -> ObjectRef:
    obj = _section(detail, "object", "detail.")
    return ObjectRef(
        _text(_section(detail, "bucket", "detail.").get("name"), "detail.bucket.name"),
        _text(obj.get("key"), "detail.object.key"),
        _optional_text(obj.get("version-id"), "detail.object.version-id"),
    )
