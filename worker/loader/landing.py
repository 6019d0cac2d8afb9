"""The landing bucket: an HTTP(S) file streamed into S3, verified before anything
can see it, and found again by a redelivery.

1. **Where.** ``LANDING_BUCKET``, key ``{datasetName}/{businessDate}/{fileId}/{name}``
   (``name``: the URL's last path segment, made safe).
2. **Streamed.** The body goes up in parts of ``PART`` bytes while it arrives, the
   next part read while the last one uploads: memory holds two parts, whatever
   the file's size. A body that ends within its first part is one PutObject.
3. **Verified, then visible.** Size and digests are computed on the way
   (``verify.Digests``); the multipart upload is completed (or the PutObject
   made) only when they match. A mismatch, a cap passed or any failure aborts
   the upload, so no partial or unverified object is ever visible (a process
   killed mid-upload leaves parts that the bucket's lifecycle aborts).
4. **Recorded.** The object's metadata names its source (``source-url``, no
   query); its tags hold ``run``, ``size``, ``sha256`` and ``verified``. A
   redelivery of the same run whose object carries them skips the download.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlencode, urlsplit

import aiohttp
from botocore.exceptions import ClientError

from worker.core.aws import ANY_AWS_FAILURE, aws_error, error_code
from worker.core.errors import ConfigError, ObjectTooLarge, WorkerError
from worker.core.fetch import CHUNK, Fetcher, shown
from worker.core.log import get_logger
from worker.loader.verify import Digests, Expected

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

log = get_logger(__name__)
PART = 8 * 1024 * 1024  # S3 wants 5 MiB at least for every part but the last
_MAX_PARTS = 10_000
_NOT_FOUND = frozenset({"NoSuchKey", "404"})


@dataclass(frozen=True, slots=True)
class Landed:
    key: str
    size: int
    sha256: str

    @property
    def checksum(self) -> str:
        return f"sha256:{self.sha256}"


def landing_key(dataset: str, business_date: str, file_id: str, url: str) -> str:
    name = unquote(urlsplit(url).path.rstrip("/").rpartition("/")[2])
    name = re.sub(r"[^A-Za-z0-9._\-]", "_", name)[:200].lstrip(".") or "file"
    return f"{dataset}/{business_date}/{file_id}/{name}"


class Landing:
    def __init__(self, s3: S3Client, bucket: str, fetcher: Fetcher, max_object_bytes: int) -> None:
        self._s3 = s3
        self.bucket = bucket
        self._fetcher = fetcher
        self._max = max_object_bytes
        self.part = max(PART, -(-max_object_bytes // _MAX_PARTS))

    async def find(self, key: str, run_id: str, expected: Expected) -> Landed | None:
        """The object this run landed and verified at ``key`` already, if any."""
        try:
            tagging = await self._s3.get_object_tagging(Bucket=self.bucket, Key=key)
        except ANY_AWS_FAILURE as exc:
            if isinstance(exc, ClientError) and error_code(exc) in _NOT_FOUND:
                return None
            raise _landing_error(self.bucket, "GetObjectTagging", exc) from exc
        tags = {t["Key"]: t["Value"] for t in tagging["TagSet"]}
        if tags.get("verified") != "true" or tags.get("run") != run_id:
            return None
        size, sha256 = int(tags.get("size", "-1")), tags.get("sha256", "")
        if expected.size not in (None, size) or expected.sha256 not in (None, sha256):
            return None
        if expected.md5 is not None and tags.get("md5") != expected.md5:
            return None
        return Landed(key, size, sha256)

    async def land(
        self, url: str, key: str, run_id: str, expected: Expected, *,
        secret: str | None, deadline: float, fetched: Callable[[], Awaitable[None]],
    ) -> Landed:  # fmt: skip
        """Fetch ``url`` into ``key``, verified; ``fetched`` is told once every byte
        is in, before the verdict."""

        async def consume(response: aiohttp.ClientResponse) -> Landed:
            want = expected.or_server(response.headers)
            if response.content_length is not None and response.content_length > self._max:
                raise ObjectTooLarge(
                    f"{shown(url)} is {response.content_length} bytes, over "
                    f"MAX_OBJECT_BYTES={self._max}",
                    size=response.content_length,
                )
            digests = Digests(md5=want.md5 is not None)
            upload = _Upload(self._s3, self.bucket, key, self.part, {"source-url": _ascii(url)})
            try:
                await self._stream(url, response, upload, digests)
                await fetched()
                digests.check(want, shown(url))
                tags = {"run": run_id, "size": str(digests.size), "sha256": digests.sha256,
                        "verified": "true"}  # fmt: skip
                if want.md5 is not None:
                    tags["md5"] = want.md5
                await upload.complete(tags)
            except BaseException:
                await upload.abort()
                raise
            checked = want.source if want.checksum else "size"
            log.info("file_landed", url=shown(url), key=key, bytes=digests.size,
                     parts=upload.parts, checked=checked)  # fmt: skip
            return Landed(key, digests.size, digests.sha256)

        return await self._fetcher.fetch(url, consume, deadline=deadline, secret=secret)

    async def _stream(
        self, url: str, response: aiohttp.ClientResponse, upload: _Upload, digests: Digests
    ) -> None:
        async for chunk in response.content.iter_chunked(CHUNK):
            digests.update(chunk)
            if digests.size > self._max:
                raise ObjectTooLarge(
                    f"{shown(url)} passed MAX_OBJECT_BYTES={self._max}", size=digests.size
                )
            await upload.write(chunk)


def _ascii(url: str) -> str:
    return quote(shown(url), safe=":/%@!$&'()*+,;=-._~")[:1024]


def _landing_error(bucket: str, call: str, exc: BaseException) -> WorkerError:
    def refused(message: str) -> WorkerError:
        return ConfigError(f"{message} (check LANDING_BUCKET and its grants)",
                           variable="LANDING_BUCKET")  # fmt: skip

    return aws_error(f"landing bucket {bucket}: {call} failed", exc, refused)


class _Upload:
    """One object written part by part; nothing visible before ``complete``."""

    def __init__(
        self, s3: S3Client, bucket: str, key: str, part: int, metadata: dict[str, str]
    ) -> None:
        self._s3 = s3
        self._bucket = bucket
        self._key = key
        self._part = part
        self._metadata = metadata
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._done: list[dict[str, Any]] = []
        self._pending: asyncio.Task[None] | None = None
        self.parts = 0

    async def write(self, chunk: bytes) -> None:
        self._buffer += chunk
        if len(self._buffer) >= self._part:
            await self._send_part()

    async def _send_part(self) -> None:
        if self._upload_id is None:
            created = await self._call(
                "CreateMultipartUpload",
                self._s3.create_multipart_upload(
                    Bucket=self._bucket, Key=self._key, Metadata=self._metadata
                ),
            )
            self._upload_id = created["UploadId"]
        await self._settle()  # the part before: two at most in memory
        self.parts += 1
        body, self._buffer = bytes(self._buffer), bytearray()
        self._pending = asyncio.create_task(self._put_part(self.parts, body))

    async def _put_part(self, number: int, body: bytes) -> None:
        assert self._upload_id is not None
        sent = await self._call(
            "UploadPart",
            self._s3.upload_part(
                Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
                PartNumber=number, Body=body,
            ),
        )  # fmt: skip
        self._done.append({"PartNumber": number, "ETag": sent["ETag"]})

    async def _settle(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            await pending

    async def complete(self, tags: dict[str, str]) -> None:
        if self._upload_id is None:  # the whole body within one part
            self.parts = 1
            await self._call(
                "PutObject",
                self._s3.put_object(
                    Bucket=self._bucket, Key=self._key, Body=bytes(self._buffer),
                    Metadata=self._metadata, Tagging=urlencode(tags),
                ),
            )  # fmt: skip
            return
        if self._buffer:
            await self._send_part()
        await self._settle()
        parts = sorted(self._done, key=lambda p: int(p["PartNumber"]))
        await self._call(
            "CompleteMultipartUpload",
            self._s3.complete_multipart_upload(
                Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
                MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
            ),
        )  # fmt: skip
        self._upload_id = None
        tag_set: list[Any] = [{"Key": k, "Value": v} for k, v in tags.items()]
        await self._call(
            "PutObjectTagging",
            self._s3.put_object_tagging(
                Bucket=self._bucket, Key=self._key, Tagging={"TagSet": tag_set}
            ),
        )

    async def abort(self) -> None:
        """Give the upload up; nothing of it stays. Never raises (the caller's
        error is the one to report)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is None:
            return
        try:
            await self._s3.abort_multipart_upload(
                Bucket=self._bucket, Key=self._key, UploadId=upload_id
            )
        except ANY_AWS_FAILURE as exc:  # the bucket's lifecycle aborts it later
            log.warning("landing_abort_failed", key=self._key, error=type(exc).__name__)

    async def _call(self, name: str, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except ANY_AWS_FAILURE as exc:
            raise _landing_error(self._bucket, name, exc) from exc
