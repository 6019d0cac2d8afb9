"""A dataset's manifest: the list of a date's files, read when a run is dispatched.

A manifest is JSON, either ``{"files": [{"url", "size"?, "sha256"?, "md5"?}]}``
(other fields ignored) or a plain list of URL strings. A relative URL is
resolved against the manifest's own; a file may be ``https://``, ``http://`` or
``s3://``. The manifest is read over HTTP(S) by ``core.fetch`` (the same rules
as every fetch, at most ``ACQUIRE_MAX_MANIFEST_BYTES``) or from S3. Anything
else (not JSON, a field of the wrong type, another scheme) fails the run with
``dispatch_failed``, naming the manifest and the first problem.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

from pydantic import ValidationError

from worker.core.aws import ANY_AWS_FAILURE, aws_error
from worker.core.errors import DispatchFailed, ObjectTooLarge
from worker.core.fetch import Fetcher, read_body, shown
from worker.ledger.models import MANIFESTS, Manifest, ManifestFile, split_s3_uri

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client


@dataclass(frozen=True, slots=True)
class Entry:
    """One file a dataset names for a date: where it is, and what it should be."""

    location: str  # s3://bucket/key, or the URL
    size: int | None = None
    checksum: str = ""  # S3's ETag, as listed
    expect: dict[str, Any] = field(default_factory=dict)  # the manifest's size and digests


async def read_manifest(
    s3: S3Client, fetcher: Fetcher, url: str, secret: str | None, deadline: float
) -> list[Entry]:
    """The files ``url``'s manifest lists, sorted by location, each once."""
    limit = fetcher.settings.max_manifest_bytes
    what = f"manifest {shown(url)}"
    if url.startswith("s3://"):
        body = await _s3_body(s3, url, limit, what)
    else:
        body = await fetcher.fetch(
            url, lambda response: read_body(response, limit, what), deadline=deadline,
            secret=secret,
        )  # fmt: skip
    try:
        doc = MANIFESTS.validate_json(body)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(p) for p in problem["loc"][1:]) or "the document"
        raise DispatchFailed(f"{what} is not a manifest: {where}: {problem['msg']}") from None
    files = doc.files if isinstance(doc, Manifest) else [ManifestFile(url=u) for u in doc]
    entries: dict[str, Entry] = {}
    for listed in files:
        location = _resolve(url, listed.url)
        if urlsplit(location).scheme not in ("https", "http", "s3"):
            raise DispatchFailed(f"{what} lists {location[:200]!r}: not https, http or s3")
        expect = {"size": listed.size, "sha256": listed.sha256, "md5": listed.md5}
        expect = {k: v for k, v in expect.items() if v is not None}
        entries.setdefault(location, Entry(location, listed.size, "", expect))
    return sorted(entries.values(), key=lambda e: e.location)


def _resolve(base: str, url: str) -> str:
    """``url`` against the manifest's own (urljoin knows no s3://)."""
    if urlsplit(url).scheme:
        return url
    if not base.startswith("s3://"):
        return urljoin(base, url)
    bucket, key = split_s3_uri(base)
    path = url.lstrip("/") if url.startswith("/") else posixpath.join(posixpath.dirname(key), url)
    return f"s3://{bucket}/{posixpath.normpath(path)}"


async def _s3_body(s3: S3Client, url: str, limit: int, what: str) -> bytes:
    bucket, key = split_s3_uri(url)
    try:
        response = await s3.get_object(Bucket=bucket, Key=key)
        if response["ContentLength"] > limit:
            response["Body"].close()
            raise ObjectTooLarge(f"{what} is {response['ContentLength']} bytes, over {limit}")
        async with response["Body"] as stream:
            return bytes(await stream.read())
    except ANY_AWS_FAILURE as exc:
        raise aws_error(f"cannot read {what}", exc, DispatchFailed) from exc
