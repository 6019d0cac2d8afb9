"""DynamoDB exports in S3 (``ExportTableToPointInTime``, ``DYNAMODB_JSON``), read as
AWS writes them, as the change envelopes the stream parts carry.

An export is ``{prefix}/AWSDynamoDB/{ExportId}/``: ``manifest-summary.json``
(the export's ARN, its time, type, format and item count, and the key of
``manifest-files.json``), then ``manifest-files.json``, one JSON object per
line naming a gzip data file (``dataFileS3Key``) and its ``itemCount``. A data
file holds one ``{"Item": {...}}`` per line, attribute values in DynamoDB
JSON.

- A **full export** (``lake bootstrap``): each ``{"Item": ...}`` becomes an
  insert envelope (``images.convert_image``, as the stream's), with sequence
  number 0 and the export's time: older than any change recorded after it
  (``cdc_rules.after_cutover``).
- An **incremental export** (``lake apply --source-format incremental-export``):
  one line per item changed in the export's window, its state at the window's
  end: ``Keys``, ``NewImage`` (absent for a delete), ``OldImage``, and
  ``Metadata.WriteTimestampMicros``, the time of its last write, which is the
  change's sequence number (microseconds, so consecutive exports order as
  their windows do) and its event time.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson
from botocore.exceptions import ClientError

from worker.cdc.images import convert_image
from worker.cdc.parts import parse_s3_uri
from worker.core.aws import error_code
from worker.core.errors import LakeError

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

SUMMARY = "manifest-summary.json"
_CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Export:
    """What ``manifest-summary.json`` and ``manifest-files.json`` say."""

    uri: str  # s3://bucket/prefix/AWSDynamoDB/ExportId
    arn: str
    table_arn: str
    time_ms: int  # the point in time the export is consistent at (an increment's end)
    item_count: int
    data_files: tuple[tuple[str, int], ...]  # (key, items)
    from_ms: int = 0  # an incremental export's window start
    kind: str = "FULL_EXPORT"

    @property
    def bucket(self) -> str:
        return parse_s3_uri(self.uri)[0]


FULL, INCREMENTAL = "FULL_EXPORT", "INCREMENTAL_EXPORT"


async def read_export(s3: S3Client, uri: str, *, kind: str | None = FULL) -> Export:
    """The export at ``uri`` (its folder, or its ``manifest-summary.json``), checked
    to be of ``kind`` (None: either)."""
    uri = uri.removesuffix(SUMMARY).rstrip("/")
    bucket, prefix = parse_s3_uri(uri)
    summary = await _json(s3, bucket, f"{prefix}/{SUMMARY}", uri)
    if not isinstance(summary, dict):
        raise LakeError(f"{uri}/{SUMMARY} is not a JSON object", export=uri)
    found = summary.get("exportType", FULL)
    kind = kind or (found if found in (FULL, INCREMENTAL) else FULL)
    if summary.get("outputFormat") != "DYNAMODB_JSON" or found != kind:
        reader = "a bootstrap" if kind == FULL else "an incremental-export apply"
        raise LakeError(
            f"{uri} is a {found} in {summary.get('outputFormat')}: {reader} reads a "
            f"{kind} in DYNAMODB_JSON",
            export=uri,
        )
    try:
        if kind == FULL:
            time_ms, from_ms = _epoch_ms(str(summary["exportTime"])), 0
        else:
            time_ms = _epoch_ms(str(summary["exportToTime"]))
            from_ms = _epoch_ms(str(summary["exportFromTime"]))
        files_key = str(summary["manifestFilesS3Key"])
        arn, table_arn = str(summary["exportArn"]), str(summary["tableArn"])
        item_count = int(summary.get("itemCount") or 0)
    except (KeyError, ValueError, TypeError) as exc:
        raise LakeError(f"{uri}/{SUMMARY} lacks or garbles {exc}", export=uri) from None
    listing = await _body(s3, bucket, files_key, uri)
    data_files = []
    for number, line in enumerate(listing.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = orjson.loads(line)
            data_files.append((str(entry["dataFileS3Key"]), int(entry.get("itemCount") or 0)))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise LakeError(f"{files_key} line {number} names no data file", export=uri) from None
    return Export(uri, arn, table_arn, time_ms, item_count, tuple(data_files), from_ms, kind)


async def export_changes(
    s3: S3Client, export: Export, key: str, key_names: list[str], *, batch_rows: int
) -> AsyncIterator[list[dict[str, Any]]]:
    """The items of one full export's data file as insert envelopes, ``batch_rows``
    at a time, inflated as they arrive (memory holds a chunk and a batch)."""

    def envelope(line: bytes, number: int) -> dict[str, Any]:
        return _item(line, f"{key}:{number}", key_names, export.time_ms)

    async for batch in _envelopes(s3, export.bucket, key, envelope, batch_rows):
        yield batch


async def list_incremental(s3: S3Client, source: str) -> list[str]:
    """The incremental exports under ``source`` (their folders), oldest window first;
    full exports beside them (a bootstrap's) are left out."""
    bucket, prefix = parse_s3_uri(source)
    folders = []
    paginator = s3.get_paginator("list_objects_v2")
    try:
        async for page in paginator.paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""):
            folders += [
                f"s3://{bucket}/{o['Key'].removesuffix('/' + SUMMARY)}"
                for o in page.get("Contents", [])
                if o["Key"].endswith(f"/{SUMMARY}") and "/AWSDynamoDB/" in o["Key"]
            ]
    except ClientError as exc:
        raise LakeError(f"cannot list {source}: {error_code(exc)}", source=source) from None
    exports = [await read_export(s3, uri, kind=None) for uri in folders]
    increments = [e for e in exports if e.kind == INCREMENTAL]
    return [e.uri for e in sorted(increments, key=lambda e: (e.from_ms, e.time_ms, e.uri))]


async def read_incremental(s3: S3Client, uris: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Every change of each incremental export in ``uris``."""
    found: dict[str, list[dict[str, Any]]] = {}
    for uri in uris:
        export = await read_export(s3, uri, kind=INCREMENTAL)
        changes = found[uri] = []
        for key, _ in export.data_files:

            def envelope(line: bytes, number: int, key: str = key) -> dict[str, Any]:
                return change_envelope(line, f"{key}:{number}")

            async for batch in _envelopes(s3, export.bucket, key, envelope, 50_000):
                changes.extend(batch)
    return found


async def _envelopes(
    s3: S3Client,
    bucket: str,
    key: str,
    envelope: Callable[[bytes, int], dict[str, Any]],
    batch_rows: int,
) -> AsyncIterator[list[dict[str, Any]]]:
    """A gzip data file's lines as envelopes, ``batch_rows`` at a time."""
    batch: list[dict[str, Any]] = []
    number = 0
    try:
        response = await s3.get_object(Bucket=bucket, Key=key)
        inflate = zlib.decompressobj(wbits=47)  # gzip or zlib, as the header says
        rest = b""
        body = response["Body"]
        async with body:
            async for chunk in body.iter_chunks(_CHUNK):
                lines = (rest + inflate.decompress(chunk)).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    number += 1
                    batch.append(envelope(line, number))
                    if len(batch) >= batch_rows:
                        yield batch
                        batch = []
        tail = rest + inflate.flush()
        for line in tail.split(b"\n"):
            if line.strip():
                number += 1
                batch.append(envelope(line, number))
    except ClientError as exc:
        raise LakeError(f"cannot read s3://{bucket}/{key}: {error_code(exc)}", export=key) from None
    except (zlib.error, ValueError, TypeError) as exc:
        raise LakeError(f"s3://{bucket}/{key} line {number + 1}: {exc}", export=key) from None
    if not inflate.eof:
        raise LakeError(f"s3://{bucket}/{key} ends inside its gzip stream", export=key)
    if batch:
        yield batch


def _item(line: bytes, event_id: str, key_names: list[str], time_ms: int) -> dict[str, Any]:
    doc = orjson.loads(line)
    item = doc.get("Item") if isinstance(doc, dict) else None
    if not isinstance(item, dict):
        raise TypeError('not an {"Item": ...} line')
    missing = [name for name in key_names if name not in item]
    if missing:
        raise ValueError(f"an item without its key attributes {missing}")
    return {
        "event_id": event_id,
        "keys": convert_image({name: item[name] for name in key_names}),
        "new_image": convert_image(item),
        "is_deleted": False,
        "approx_creation_time_ms": time_ms,
        "sequence_number": "0",
    }


def change_envelope(line: bytes | str, event_id: str) -> dict[str, Any]:
    """One incremental export line as the stream's envelope (shared with the Databricks job)."""
    doc = orjson.loads(line)
    if not isinstance(doc, dict) or not isinstance(doc.get("Keys"), dict) or not doc["Keys"]:
        raise TypeError("not a change line (no Keys)")
    try:
        micros = int(doc["Metadata"]["WriteTimestampMicros"]["N"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("no Metadata.WriteTimestampMicros") from None
    new = doc.get("NewImage")
    return {
        "event_id": event_id,
        "keys": convert_image(doc["Keys"]),
        "new_image": convert_image(new) if isinstance(new, dict) else None,
        "is_deleted": not isinstance(new, dict),
        "approx_creation_time_ms": micros // 1000,
        "sequence_number": str(micros),
    }


def _epoch_ms(text: str) -> int:
    return round(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


async def _body(s3: S3Client, bucket: str, key: str, uri: str) -> bytes:
    try:
        response = await s3.get_object(Bucket=bucket, Key=key)
        async with response["Body"] as body:
            data: bytes = await body.read()
    except ClientError as exc:
        raise LakeError(
            f"cannot read s3://{bucket}/{key}: {error_code(exc)} (is {uri} an export folder,"
            " .../AWSDynamoDB/EXPORT_ID?)",
            export=uri,
        ) from None
    return data


async def _json(s3: S3Client, bucket: str, key: str, uri: str) -> Any:
    try:
        return orjson.loads(await _body(s3, bucket, key, uri))
    except orjson.JSONDecodeError:
        raise LakeError(f"s3://{bucket}/{key} is not JSON", export=uri) from None
