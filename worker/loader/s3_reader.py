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

from worker.core.aws import AWS_FAILURES, ENVIRONMENT_FAILURES, environment_error, error_code
from worker.core.errors import (
    CorruptObject,
    ObjectTooLarge,
    ObjectUnavailable,
    TransientAwsError,
    WorkerError,
)
from worker.loader.messages import ObjectRef

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

    from worker.loader.budget import ByteBudget
    from worker.loader.verify import Digests

CHUNK = 1024 * 1024
_STEP = 8 * CHUNK  # gunzipped bytes produced per step
Data = bytes | bytearray  # a decoded object: never copied once it is whole
GZIP_MAGIC = b"\x1f\x8b"
_UNAVAILABLE = frozenset(
    {"NoSuchKey", "NoSuchBucket", "NoSuchVersion", "AccessDenied", "404", "403"}
)


@dataclass(frozen=True, slots=True)
class S3Object:
    data: Data
    revision: str  # version id, else ETag: part of every deterministic item id
    stored_bytes: int
    gzipped: bool
    reserved: int = 0  # bytes held in the loader's budget for this object


@dataclass(frozen=True, slots=True)
class Limits:
    max_object_bytes: int
    max_decoded_bytes: int
    advice: str = ""  # appended to the decoded cap's error: where the cap came from

    def too_large(self, size: int, what: str) -> ObjectTooLarge:
        return ObjectTooLarge(
            f"{what} passed MAX_DECODED_BYTES={self.max_decoded_bytes}{self.advice}", size=size
        )


async def read_object(
    s3: S3Client,
    ref: ObjectRef,
    limits: Limits,
    budget: ByteBudget | None = None,
    digests: Digests | None = None,
) -> S3Object:
    """Download ``ref`` whole, gunzipping when needed, within ``limits``; with a
    ``budget``, reserve the object's bytes there (``S3Object.reserved``: the
    caller releases them; on an error they are released here); with ``digests``,
    hash the bytes as stored while they stream past."""
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
            data, gzipped, reserved = await _drain_within(body, length, limits, budget, digests)
        finally:
            body.close()
    except AWS_FAILURES as exc:
        raise _read_failure(exc) from exc
    version = response.get("VersionId")
    revision = ref.version_id or (version if version and version != "null" else "")
    return S3Object(
        data=data,
        revision=revision or response.get("ETag", "").strip('"'),
        stored_bytes=length,
        gzipped=gzipped,
        reserved=reserved,
    )


def _read_failure(exc: BaseException) -> WorkerError:
    if isinstance(exc, ClientError):
        code = error_code(exc)
        if code in _UNAVAILABLE:
            return ObjectUnavailable(f"S3 answered {code}", s3_error=code)
        return TransientAwsError(f"S3 GetObject failed: {code}", s3_error=code)
    if isinstance(exc, ENVIRONMENT_FAILURES):
        return environment_error(exc)
    return TransientAwsError(f"S3 read failed: {exc!r}")


async def _drain_within(
    body: object, length: int, limits: Limits, budget: ByteBudget | None, digests: Digests | None
) -> tuple[Data, bool, int]:
    """``_drain``, holding the object's bytes in ``budget``: its stored size before
    the body is read, its decoded size once whole; all given back on an error."""
    reserved = 0
    try:
        if budget is not None:
            await budget.reserve(length)
            reserved = length
        data, gzipped = await _drain(body, limits, digests)
        if budget is not None and len(data) > reserved:
            budget.grow(len(data) - reserved)
            reserved = len(data)
    except BaseException:
        if budget is not None and reserved:
            await budget.release(reserved)
        raise
    return data, gzipped, reserved


async def _drain(body: object, limits: Limits, digests: Digests | None) -> tuple[Data, bool]:
    read = body.read  # type: ignore[attr-defined]
    first: bytes = await read(CHUNK)
    gunzip = _Gunzip(limits) if first[:2] == GZIP_MAGIC else None
    out = bytearray()
    received = 0
    chunk = first
    while chunk:
        received += len(chunk)
        if digests is not None:
            digests.update(chunk)
        if received > limits.max_object_bytes:
            raise ObjectTooLarge(
                f"stream passed MAX_OBJECT_BYTES={limits.max_object_bytes}", size=received
            )
        if gunzip is None:
            if received > limits.max_decoded_bytes:
                raise limits.too_large(received, "object size")
            out += chunk
        else:
            gunzip.feed(chunk, out)
        chunk = await read(CHUNK)
    if gunzip is not None:
        gunzip.finish()
    if not out:
        raise CorruptObject("object is empty")
    return out, gunzip is not None  # not copied to bytes: that would double the peak


def gunzip_if_needed(data: bytes, limits: Limits) -> tuple[Data, bool]:
    """Local-file twin of the streaming path: the same gzip detection and caps."""
    if len(data) > limits.max_object_bytes:
        raise ObjectTooLarge(
            f"file is {len(data)} bytes, over MAX_OBJECT_BYTES={limits.max_object_bytes}",
            size=len(data),
        )
    if data[:2] != GZIP_MAGIC:
        if len(data) > limits.max_decoded_bytes:
            raise limits.too_large(len(data), "file size")
        return data, False
    gunzip, out = _Gunzip(limits), bytearray()
    gunzip.feed(data, out)
    gunzip.finish()
    return out, True


class _Gunzip:
    """Multi-member gzip decoder that never emits more than ``cap`` bytes."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._cap = limits.max_decoded_bytes
        self._inflater = zlib.decompressobj(wbits=31)
        self._open = False  # inside a member whose end we have not seen

    def feed(self, chunk: bytes, out: bytearray) -> None:
        """Inflate ``chunk`` into ``out`` at most ``_STEP`` bytes at a time: one
        call for a whole file would hold its output twice (a bytes, then ``out``)."""
        data = chunk
        while True:
            self._open = True
            step = min(self._cap - len(out) + 1, _STEP)
            try:
                piece = self._inflater.decompress(data, step)
            except zlib.error as exc:
                raise CorruptObject(f"gzip stream is corrupt: {exc}") from None
            out += piece
            if len(out) > self._cap:
                raise self._limits.too_large(len(out), "gunzipped size")
            if self._inflater.eof:  # a member ended; another may follow
                data = self._inflater.unused_data
                self._inflater = zlib.decompressobj(wbits=31)
                self._open = False
                if not data:
                    return
            else:
                data = self._inflater.unconsumed_tail
                if not data and len(piece) < step:  # all input in, no output pending
                    return

    def finish(self) -> None:
        if self._open:
            raise CorruptObject("gzip stream is truncated")
