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

from worker.aws import AWS_FAILURES, error_code
from worker.config import StreamSettings
from worker.log import elapsed_ms, get_logger
from worker.streams.images import convert_image
from worker.timestamps import is_epoch_ms

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

log = get_logger(__name__)

_TTL_PRINCIPAL = {"type": "Service", "principalId": "dynamodb.amazonaws.com"}


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
    key: str
    body: bytes
    records: int
    first_sequence: str  # sequence numbers stay text: they outgrow 64 bits


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


def _part(prefix: str, changes: list[dict[str, Any]], lines: list[bytes], fmt: str) -> Part:
    digest = hashlib.sha256("\n".join(c["event_id"] for c in changes).encode()).hexdigest()[:12]
    first, last = changes[0]["sequence_number"], changes[-1]["sequence_number"]
    if fmt == "parquet":
        body, suffix = _parquet(changes), "parquet"
    else:
        body, suffix = gzip.compress(b"".join(lines), compresslevel=6, mtime=0), "json.gz"
    return Part(f"{prefix}/part-{first}-{last}-{digest}.{suffix}", body, len(changes), first)


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
    s3: S3Client, records: list[dict[str, Any]], settings: StreamSettings
) -> StreamReport:
    """Write a Lambda DynamoDB Streams batch to S3; report what must be retried."""
    start = time.perf_counter()
    if not settings.bucket:
        raise RuntimeError("STREAM_BUCKET is not set")
    now_ms = int(time.time() * 1000)
    envelopes = [envelope(record, now_ms) for record in records]
    parts = plan_parts(envelopes, settings)
    report = StreamReport(records=len(envelopes))
    slots = asyncio.Semaphore(settings.write_concurrency)

    async def write(part: Part) -> None:
        async with slots:
            if await _put_once(s3, settings.bucket, part):
                report.objects += 1
                report.bytes += len(part.body)
            else:
                report.already_present += 1

    results = await asyncio.gather(*(write(p) for p in parts), return_exceptions=True)
    for part, result in zip(parts, results, strict=True):
        if isinstance(result, BaseException):
            if not isinstance(result, AWS_FAILURES):
                raise result
            log.warning("stream_part_failed", key=part.key, error=repr(result))
            if report.failed_from is None or int(part.first_sequence) < int(report.failed_from):
                report.failed_from = part.first_sequence
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
    return report


async def _put_once(s3: S3Client, bucket: str, part: Part) -> bool:
    """Write a part unless it exists; False when it was already there (a redelivery)."""
    content_type = (
        "application/vnd.apache.parquet"
        if part.key.endswith(".parquet")
        else "application/x-ndjson"
    )
    try:
        await s3.put_object(
            Bucket=bucket,
            Key=part.key,
            Body=part.body,
            IfNoneMatch="*",
            ContentType=content_type,
        )
    except ClientError as exc:
        if error_code(exc) in ("PreconditionFailed", "412"):
            return False
        raise
    return True
