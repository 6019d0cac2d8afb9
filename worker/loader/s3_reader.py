"""Streaming S3 download with size caps and transparent gzip.

The object is refused before download when its ``ContentLength`` is over
``MAX_OBJECT_BYTES``; the stream is also counted as it arrives. A gzip object
(detected by its magic bytes, not its name) is decompressed chunk by chunk with
a bound on the output, so a gzip bomb stops at ``MAX_DECODED_BYTES`` without
ever holding more than that in memory.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from worker.core.aws import (
    ENVIRONMENT_FAILURES,
    TRANSIENT_EXCEPTIONS,
    environment_error,
    error_code,
)
from worker.core.errors import CorruptObject, ObjectTooLarge, ObjectUnavailable, TransientAwsError
from worker.loader.messages import ObjectRef

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

CHUNK = 1024 * 1024
GZIP_MAGIC = b"\x1f\x8b"
_UNAVAILABLE = frozenset(
    {"NoSuchKey", "NoSuchBucket", "NoSuchVersion", "AccessDenied", "404", "403"}
)


@dataclass(frozen=True, slots=True)
class S3Object:
    data: bytes
    revision: str  # version id, else ETag: part of every deterministic item id
    stored_bytes: int
    gzipped: bool


@dataclass(frozen=True, slots=True)
class Limits:
    max_object_bytes: int
    max_decoded_bytes: int


async def read_object(s3: S3Client, ref: ObjectRef, limits: Limits) -> S3Object:
    """Download ``ref`` whole, gunzipping when needed, within ``limits``."""
    params = {"Bucket": ref.bucket, "Key": ref.key}
    if ref.version_id:
        params["VersionId"] = ref.version_id
    try:
        response = await s3.get_object(**params)  # type: ignore[arg-type]
        length = response["ContentLength"]
        if length > limits.max_object_bytes:
            response["Body"].close()  # refuse before downloading a byte of it
            raise ObjectTooLarge(
                f"object is {length} bytes, over MAX_OBJECT_BYTES={limits.max_object_bytes}",
                size=length,
            )
        body = response["Body"]
        try:
            data, gzipped = await _drain(body, limits)
        finally:
            body.close()
    except ClientError as exc:
        code = error_code(exc)
        if code in _UNAVAILABLE:
            raise ObjectUnavailable(f"S3 answered {code}", s3_error=code) from None
        raise TransientAwsError(f"S3 GetObject failed: {code}", s3_error=code) from exc
    except ENVIRONMENT_FAILURES as exc:
        raise environment_error(exc) from None
    except TRANSIENT_EXCEPTIONS as exc:
        raise TransientAwsError(f"S3 read failed: {exc!r}") from exc
    if not data:
        raise CorruptObject("object is empty")
    version = response.get("VersionId")
    revision = ref.version_id or (version if version and version != "null" else "")
    return S3Object(
        data=data,
        revision=revision or response.get("ETag", "").strip('"'),
        stored_bytes=length,
        gzipped=gzipped,
    )


async def _drain(body: object, limits: Limits) -> tuple[bytes, bool]:
    read = body.read  # type: ignore[attr-defined]
    first: bytes = await read(CHUNK)
    gunzip = _Gunzip(limits.max_decoded_bytes) if first[:2] == GZIP_MAGIC else None
    out = bytearray()
    received = 0
    chunk = first
    while chunk:
        received += len(chunk)
        if received > limits.max_object_bytes:
            raise ObjectTooLarge(
                f"stream passed MAX_OBJECT_BYTES={limits.max_object_bytes}", size=received
            )
        if gunzip is None:
            out += chunk
        else:
            gunzip.feed(chunk, out)
        chunk = await read(CHUNK)
    if gunzip is not None:
        gunzip.finish()
    return bytes(out), gunzip is not None


def gunzip_if_needed(data: bytes, limits: Limits) -> tuple[bytes, bool]:
    """Local-file twin of the streaming path: the same gzip detection and caps."""
    if len(data) > limits.max_object_bytes:
        raise ObjectTooLarge(
            f"file is {len(data)} bytes, over MAX_OBJECT_BYTES={limits.max_object_bytes}",
            size=len(data),
        )
    if data[:2] != GZIP_MAGIC:
        return data, False
    gunzip, out = _Gunzip(limits.max_decoded_bytes), bytearray()
    gunzip.feed(data, out)
    gunzip.finish()
    return bytes(out), True


class _Gunzip:
    """Multi-member gzip decoder that never emits more than ``cap`` bytes."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._inflater = zlib.decompressobj(wbits=31)
        self._open = False  # inside a member whose end we have not seen

    def feed(self, chunk: bytes, out: bytearray) -> None:
        data = chunk
        while data:
            self._open = True
            try:
                out += self._inflater.decompress(data, self._cap - len(out) + 1)
            except zlib.error as exc:
                raise CorruptObject(f"gzip stream is corrupt: {exc}") from None
            if len(out) > self._cap:
                raise ObjectTooLarge(
                    f"gunzipped size passed MAX_DECODED_BYTES={self._cap}", size=len(out)
                )
            if self._inflater.eof:  # a member ended; another may follow
                data = self._inflater.unused_data
                self._inflater = zlib.decompressobj(wbits=31)
                self._open = False
            else:
                data = self._inflater.unconsumed_tail

    def finish(self) -> None:
        if self._open:
            raise CorruptObject("gzip stream is truncated")
