"""DynamoDB Streams records -> envelopes -> exactly-once part files in S3.

- **Envelope.** One JSON record per change: ``event_name``, ``event_id``,
  ``sequence_number``, ``approx_creation_time_ms``, ``size_bytes``,
  ``source_table`` (from ``eventSourceARN``), ``keys``, ``new_image``,
  ``old_image``, ``is_deleted`` (REMOVE), ``ttl_expired`` (a REMOVE by the
  DynamoDB TTL service) and ``ingest_ts_ms``.
- **Layout.** ``s3://{STREAM_BUCKET}/{STREAM_PREFIX}/{table}/dt=YYYY-MM-DD/hour=HH/``,
  by each record's own ``ApproximateCreationDateTime`` (UTC), never wall-clock
  time: a batch across an hour boundary becomes one object per hour.
- **Exactly once.** A part's name comes only from its content: the first and
  last sequence numbers and a hash of its event IDs. It is written with
  ``If-None-Match: *``, so a redelivered batch finds its parts already there
  and never adds a second copy.
- **Stable under retries.** When a part fails, Lambda resends every record from
  its first sequence number, possibly with more records after them, so their
  parts may be cut differently next time. Every part of this batch that starts
  at or after that point is therefore deleted before the handler returns: the
  retry writes those records once, in its own parts.
- **Refused records.** A record the lake could not apply (no ``Keys``, a
  sequence number that is not 1 to 40 digits, an INSERT or MODIFY without
  ``NewImage`` because the stream's view type is KEYS_ONLY or OLD_IMAGE) stops
  the batch there: the records before it are written, it is reported as the
  batch item failure, and an ERROR line names it and what it lacks.
- **Flushing.** Parts hold at most ``STREAM_MAX_RECORDS`` records and
  ``STREAM_MAX_BYTES`` (uncompressed); writes run ``STREAM_WRITE_CONCURRENCY``
  at a time.
- **Partial failure.** The lowest sequence number of any part not durably
  written is reported as the batch item failure, as Lambda's stream
  checkpointing requires; records before it are never sent again.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from botocore.exceptions import ClientError

from worker.cdc import cdc_rules as rules
from worker.cdc.images import convert_image
from worker.core.aws import AWS_FAILURES, error_code
from worker.core.config import StreamFormat, StreamSettings
from worker.core.errors import InvalidStreamRecord
from worker.core.log import elapsed_ms, emit_metrics, get_logger
from worker.core.timestamps import is_epoch_ms

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

log = get_logger(__name__)

_TTL_PRINCIPAL = {"type": "Service", "principalId": "dynamodb.amazonaws.com"}
_EVENTS = ("INSERT", "MODIFY", "REMOVE")
_ROLLBACK_S = 5.0  # for deleting the parts a retry will write again


def check_record(record: Any) -> None:
    """InvalidStreamRecord unless the lake can apply this record."""
    change = record.get("dynamodb") if isinstance(record, dict) else None
    if not isinstance(change, dict):
        raise InvalidStreamRecord("not a DynamoDB Streams record (no dynamodb field)")
    sequence = change.get("SequenceNumber")
    context = {"event_id": record.get("eventID"), "sequence_number": sequence}
    name = record.get("eventName")
    if name not in _EVENTS:
        raise InvalidStreamRecord(f"eventName {name!r} is not one of {_EVENTS}", **context)
    try:
        rules.padded_sequence(sequence if isinstance(sequence, str) else "")
    except ValueError as exc:
        raise InvalidStreamRecord(str(exc), **context) from None
    if not isinstance(change.get("Keys"), dict) or not change["Keys"]:
        raise InvalidStreamRecord("the record has no Keys", **context)
    if not isinstance(change.get("ApproximateCreationDateTime"), int | float):
        raise InvalidStreamRecord("the record has no ApproximateCreationDateTime", **context)
    if name != "REMOVE" and not isinstance(change.get("NewImage"), dict):
        view = change.get("StreamViewType", "unknown")
        raise InvalidStreamRecord(
            f"an {name} without NewImage: the stream's view type is {view}; "
            "the lake needs NEW_IMAGE or NEW_AND_OLD_IMAGES",
            **context,
        )


def envelope(record: dict[str, Any], ingest_ts_ms: int) -> dict[str, Any]:
    """One stream record as the flat change envelope written to S3."""
    change = record["dynamodb"]
    created = float(change["ApproximateCreationDateTime"])
    created_ms = int(created if is_epoch_ms(created) else created * 1000)
    removed = record["eventName"] == "REMOVE"
    return {
        "event_name": record["eventName"],
        "event_id": record["eventID"],
        "sequence_number": change["SequenceNumber"],
        "approx_creation_time_ms": created_ms,
        "size_bytes": change.get("SizeBytes"),
        "source_table": source_table(record.get("eventSourceARN", "")),
        "keys": convert_image(change.get("Keys")),
        "new_image": convert_image(change.get("NewImage")),
        "old_image": convert_image(change.get("OldImage")),
        "is_deleted": removed,
        "ttl_expired": removed and record.get("userIdentity") == _TTL_PRINCIPAL,
        "ingest_ts_ms": ingest_ts_ms,
    }


def record_from_sdk(record: dict[str, Any], stream_arn: str) -> dict[str, Any]:
    """A record from the DynamoDB Streams API (SDK types) in the shape Lambda delivers:
    ``ApproximateCreationDateTime`` in epoch seconds, binary as base64, the stream ARN."""
    raw = orjson.dumps(record, default=_json_default, option=orjson.OPT_PASSTHROUGH_DATETIME)
    lambda_record = orjson.loads(raw)
    lambda_record["eventSourceARN"] = stream_arn
    return dict(lambda_record)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, datetime):
        return value.timestamp()
    raise TypeError(f"{type(value).__name__} in a stream record")


def source_table(arn: str) -> str:
    """``arn:aws:dynamodb:REGION:ACCOUNT:table/NAME/stream/LABEL`` -> ``NAME``."""
    _, _, resource = arn.partition(":table/")
    return resource.split("/", 1)[0] or "unknown"


@dataclass(frozen=True, slots=True)
class Part:
    """One part file to write: its name and changes; the body is encoded only
    when its write's turn comes, so at most STREAM_WRITE_CONCURRENCY bodies exist."""

    key: str
    changes: list[dict[str, Any]]
    lines: list[bytes]
    format: StreamFormat

    @property
    def records(self) -> int:
        return len(self.changes)

    @property
    def first_sequence(self) -> str:  # sequence numbers stay text: they outgrow 64 bits
        return str(self.changes[0]["sequence_number"])

    def body(self) -> bytes:
        if self.format == "parquet":
            return _parquet(self.changes)
        return gzip.compress(b"".join(self.lines), compresslevel=6, mtime=0)


def plan_parts(envelopes: Sequence[dict[str, Any]], settings: StreamSettings) -> list[Part]:
    """Group by (table, event hour), order by sequence number, cut at the size limits."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for change in envelopes:
        moment = datetime.fromtimestamp(change["approx_creation_time_ms"] / 1000, tz=UTC)
        partition = f"dt={moment:%Y-%m-%d}/hour={moment:%H}"
        groups.setdefault((change["source_table"], partition), []).append(change)
    parts = []
    for (table, partition), changes in sorted(groups.items()):
        changes.sort(key=lambda c: int(c["sequence_number"]))
        lines = [orjson.dumps(c, option=orjson.OPT_APPEND_NEWLINE) for c in changes]
        start = 0
        while start < len(changes):
            end, size = start, 0
            while end < len(changes) and end - start < settings.max_records:
                if end > start and size + len(lines[end]) > settings.max_bytes:
                    break
                size += len(lines[end])
                end += 1
            prefix = (
                f"{settings.prefix}/{table}/{partition}"
                if settings.prefix
                else f"{table}/{partition}"
            )
            parts.append(_part(prefix, changes[start:end], lines[start:end], settings.format))
            start = end
    return parts


def _part(
    prefix: str, changes: list[dict[str, Any]], lines: list[bytes], fmt: StreamFormat
) -> Part:
    digest = hashlib.sha256("\n".join(c["event_id"] for c in changes).encode()).hexdigest()[:12]
    first, last = changes[0]["sequence_number"], changes[-1]["sequence_number"]
    suffix = "parquet" if fmt == "parquet" else "json.gz"
    return Part(f"{prefix}/part-{first}-{last}-{digest}.{suffix}", changes, lines, fmt)


PARQUET_JSON_COLUMNS = ("keys", "new_image", "old_image")


def _parquet(changes: list[dict[str, Any]]) -> bytes:
    """Flat columns; the nested images are JSON strings (their schema is the items')."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, list[Any]] = {name: [] for name in changes[0]}
    for change in changes:
        for name, value in change.items():
            if name in PARQUET_JSON_COLUMNS and value is not None:
                value = orjson.dumps(value).decode()
            columns[name].append(value)
    schema = pa.schema(
        [
            ("event_name", pa.string()), ("event_id", pa.string()),
            ("sequence_number", pa.string()), ("approx_creation_time_ms", pa.int64()),
            ("size_bytes", pa.int64()), ("source_table", pa.string()), ("keys", pa.string()),
            ("new_image", pa.string()), ("old_image", pa.string()), ("is_deleted", pa.bool_()),
            ("ttl_expired", pa.bool_()), ("ingest_ts_ms", pa.int64()),
        ]
    )  # fmt: skip
    sink = io.BytesIO()
    pq.write_table(pa.table(columns, schema=schema), sink, compression="zstd")
    return sink.getvalue()


@dataclass(slots=True)
class StreamReport:
    records: int = 0
    objects: int = 0
    bytes: int = 0
    already_present: int = 0
    failed_from: str | None = None  # lowest sequence number not durably written

    def response(self) -> dict[str, list[dict[str, str]]]:
        failures = [] if self.failed_from is None else [{"itemIdentifier": self.failed_from}]
        return {"batchItemFailures": failures}


async def handle_stream_batch(
    s3: S3Client,
    records: list[dict[str, Any]],
    settings: StreamSettings,
    *,
    deadline: float | None = None,
) -> StreamReport:
    """Write a Lambda DynamoDB Streams batch to S3 by ``deadline`` (a
    ``time.monotonic()`` value); report what must be retried."""
    start = time.perf_counter()
    now_ms = int(time.time() * 1000)
    envelopes, refused = _accepted(records, now_ms)
    parts = plan_parts(envelopes, settings)
    report = StreamReport(records=len(envelopes), failed_from=refused)
    done: set[str] = set()
    budget = None if deadline is None else deadline - time.monotonic()
    try:  # the last fifth of the time is kept for a roll-back
        async with asyncio.timeout(None if budget is None else budget * 0.8):
            await _write_parts(s3, settings, parts, report, done)
    except TimeoutError:
        log.warning("deadline_reached", unwritten_parts=len(parts) - len(done))
    unwritten = [int(p.first_sequence) for p in parts if p.key not in done]
    if unwritten:  # every part comes before a refused record
        report.failed_from = str(min(unwritten))
        left = _ROLLBACK_S if deadline is None else max(0.0, deadline - time.monotonic())
        await _roll_back(s3, settings.bucket, parts, min(unwritten), min(left, _ROLLBACK_S))
    oldest = min((e["approx_creation_time_ms"] for e in envelopes), default=now_ms)
    log.info(
        "stream_batch_done",
        records=report.records,
        objects=report.objects,
        already_present=report.already_present,
        bytes=report.bytes,
        lag_ms=now_ms - oldest,
        failed_from=report.failed_from,
        ms=elapsed_ms(start),
    )
    emit_metrics(
        {"Service": "streams"},
        PartsWritten=report.objects,
        Records=report.records,
        FailedBatches=int(report.failed_from is not None),
        LagMs=now_ms - oldest,
    )
    return report


def _accepted(
    records: list[dict[str, Any]], now_ms: int
) -> tuple[list[dict[str, Any]], str | None]:
    """The envelopes of the records before the first refused one, and that one's
    sequence number (None when all are accepted)."""
    envelopes: list[dict[str, Any]] = []
    for record in records:
        try:
            check_record(record)
        except InvalidStreamRecord as exc:
            log.error("stream_record_refused", **exc.as_log())
            sequence = exc.context.get("sequence_number")
            return envelopes, sequence if isinstance(sequence, str) else ""
        envelopes.append(envelope(record, now_ms))
    return envelopes, None


async def _roll_back(
    s3: S3Client, bucket: str, parts: list[Part], failed_from: int, within_s: float
) -> None:
    """Delete every part that starts at or after ``failed_from``: Lambda resends
    all its records, and the retry may cut them into other parts."""
    doomed = [p.key for p in parts if int(p.first_sequence) >= failed_from]
    try:
        async with asyncio.timeout(within_s):
            await asyncio.gather(*(s3.delete_object(Bucket=bucket, Key=k) for k in doomed))
    except AWS_FAILURES as exc:
        log.error("stream_rollback_failed", parts=doomed, error=repr(exc))  # copies may stay
    except TimeoutError:
        log.error("stream_rollback_failed", parts=doomed, error="timed out")
    else:
        log.info("stream_parts_rolled_back", parts=doomed)


async def _write_parts(
    s3: S3Client, settings: StreamSettings, parts: list[Part], report: StreamReport, done: set[str]
) -> None:
    """Write every part, ``STREAM_WRITE_CONCURRENCY`` at a time; a part's key joins
    ``done`` once it is durably in S3 (written now, or by an earlier delivery)."""
    slots = asyncio.Semaphore(settings.write_concurrency)

    async def write(part: Part) -> None:
        try:
            body = part.body()
            if await _put_once(s3, settings.bucket, part.key, body):
                report.objects += 1
                report.bytes += len(body)
            else:
                report.already_present += 1
            done.add(part.key)
        except AWS_FAILURES as exc:
            log.warning("stream_part_failed", key=part.key, error=repr(exc))
        finally:
            slots.release()

    async with asyncio.TaskGroup() as group:
        for part in parts:
            await slots.acquire()  # the turn comes before the body is built
            group.create_task(write(part))


async def _put_once(s3: S3Client, bucket: str, key: str, body: bytes) -> bool:
    """Write a part unless it exists; False when it was already there (a redelivery)."""
    content_type = (
        "application/vnd.apache.parquet" if key.endswith(".parquet") else "application/x-ndjson"
    )
    try:
        await s3.put_object(
            Bucket=bucket,
            Key=key,
            Body=body,
            IfNoneMatch="*",
            ContentType=content_type,
        )
    except ClientError as exc:
        if error_code(exc) in ("PreconditionFailed", "412"):
            return False
        raise
    return True
