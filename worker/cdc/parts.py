"""The stream parts in S3, as the lake apply reads them: listed, fetched, checked.

A part that cannot be read whole (a truncated gzip, a line that is not a change
envelope, a sequence number of more than 40 digits, a change without keys)
fails the apply with one line naming it, before anything is committed. The
operator then fixes it, or moves it aside with ``worker lake quarantine``: the
part goes under ``{source}/_quarantine/``, which no apply lists (names that
start with ``_`` are hidden from Spark and Auto Loader too).
"""

from __future__ import annotations

import asyncio
import gzip
import io
import zlib
from typing import TYPE_CHECKING, Any

import orjson
from botocore.exceptions import ClientError

from worker.cdc import cdc_rules as rules
from worker.cdc.buffer import PARQUET_JSON_COLUMNS
from worker.core.aws import error_code
from worker.core.errors import LakeError
from worker.core.log import get_logger

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

log = get_logger(__name__)

PART_SUFFIXES = (".json.gz", ".parquet")
QUARANTINE = "_quarantine"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise LakeError(f"--source must be s3://BUCKET/PREFIX, not {uri!r}")
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket:
        raise LakeError(f"no bucket in {uri!r}")
    return bucket, prefix.strip("/")


async def list_parts(s3: S3Client, source: str) -> list[str]:
    """Every part under ``source``, in key order; hidden (``_``) folders are skipped."""
    bucket, prefix = parse_s3_uri(source)
    start = f"{prefix}/" if prefix else ""
    keys: list[str] = []
    paginator = s3.get_paginator("list_objects_v2")
    try:
        async for page in paginator.paginate(Bucket=bucket, Prefix=start):
            keys.extend(
                o["Key"]
                for o in page.get("Contents", [])
                if o["Key"].endswith(PART_SUFFIXES)
                and not any(s.startswith("_") for s in o["Key"][len(start) :].split("/"))
            )
    except ClientError as exc:
        raise LakeError(f"cannot list {source}: {error_code(exc)}", source=source) from None
    return sorted(keys)


async def read_parts(
    s3: S3Client, source: str, keys: list[str], *, concurrency: int = 8
) -> dict[str, list[dict[str, Any]]]:
    """Every part in ``keys`` -> its change envelopes, checked."""
    bucket, _ = parse_s3_uri(source)
    slots = asyncio.Semaphore(concurrency)

    async def one(key: str) -> list[dict[str, Any]]:
        async with slots:
            try:
                response = await s3.get_object(Bucket=bucket, Key=key)
                async with response["Body"] as body:
                    data = await body.read()
            except ClientError as exc:
                raise LakeError(
                    f"cannot read part s3://{bucket}/{key}: {error_code(exc)}", part=key
                ) from None
        try:
            return decode_part(key, data)
        except (OSError, EOFError, zlib.error, ValueError) as exc:
            raise LakeError(
                f"part s3://{bucket}/{key} is unreadable ({exc}); nothing was applied. "
                f"Fix or replace it, or set it aside with: worker lake quarantine "
                f"--source {source} --part {key}",
                part=key,
            ) from None

    found = await asyncio.gather(*(one(k) for k in keys))
    return dict(zip(keys, found, strict=True))


def decode_part(key: str, data: bytes) -> list[dict[str, Any]]:
    """A part's bytes -> its change envelopes; ValueError (or a gzip error) if any
    change is not one the buffer writes."""
    if key.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            changes: list[Any] = pq.read_table(io.BytesIO(data)).to_pylist()
        except (pa.ArrowException, KeyError) as exc:
            raise ValueError(f"not a Parquet part: {exc}") from None
        for change in changes:
            for name in PARQUET_JSON_COLUMNS:
                if isinstance(change.get(name), str):
                    change[name] = orjson.loads(change[name])
    else:
        changes = [orjson.loads(line) for line in gzip.decompress(data).splitlines() if line]
    for number, change in enumerate(changes, 1):
        problem = _problem(change)
        if problem:
            raise ValueError(f"change {number}: {problem}")
        change["sequence_number"] = rules.padded_sequence(change["sequence_number"])
    return changes


def _problem(change: Any) -> str | None:
    if not isinstance(change, dict):
        return f"a {type(change).__name__}, not a change envelope"
    if not isinstance(change.get("keys"), dict) or not change["keys"]:
        return "no keys"
    if not isinstance(change.get("is_deleted"), bool):
        return "no is_deleted flag"
    if not change["is_deleted"] and not isinstance(change.get("new_image"), dict):
        return "an insert or modify without new_image"
    if not isinstance(change.get("approx_creation_time_ms"), int):
        return "no approx_creation_time_ms"
    if not isinstance(change.get("sequence_number"), str | int):
        return "no sequence_number"
    try:
        rules.padded_sequence(change["sequence_number"])
    except ValueError as exc:
        return str(exc)
    return None


async def quarantine_part(s3: S3Client, source: str, key: str) -> tuple[str, bool]:
    """Move one part (its key, or its ``s3://`` URI) under ``{source}/_quarantine/``;
    its new key, and whether it was there already (nothing moved)."""
    bucket, prefix = parse_s3_uri(source)
    if key.startswith("s3://"):
        part_bucket, key = parse_s3_uri(key)
        if part_bucket != bucket:
            raise LakeError(f"--part is in bucket {part_bucket!r}, not {bucket!r}", part=key)
    start = f"{prefix}/" if prefix else ""
    if not key.startswith(start) or not key.endswith(PART_SUFFIXES):
        raise LakeError(f"--part {key!r} is not a part under {source}", part=key)
    moved = f"{start}{QUARANTINE}/{key[len(start) :]}"
    try:
        await s3.copy_object(Bucket=bucket, Key=moved, CopySource={"Bucket": bucket, "Key": key})
        await s3.delete_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if error_code(exc) in ("NoSuchKey", "404") and await _exists(s3, bucket, moved):
            return moved, True
        raise LakeError(
            f"cannot quarantine s3://{bucket}/{key}: {error_code(exc)}", part=key
        ) from None
    log.warning("lake_part_quarantined", part=key, moved_to=moved, source=source)
    return moved, False


async def _exists(s3: S3Client, bucket: str, key: str) -> bool:
    try:
        await s3.head_object(Bucket=bucket, Key=key)
    except ClientError:
        return False
    return True
