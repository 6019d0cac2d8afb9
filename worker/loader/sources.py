"""Where a file's bytes come from: an S3 object, an HTTP(S) file by way of the
landing bucket, or a local file. Each source honours the same ``Limits``,
reserves from the same ``ByteBudget``, and moves a tracked file through the
ledger's lifecycle: ``fetched`` once its bytes are in, ``verified`` once they
are what its manifest (or server) says, before any row is written.

- **S3.** Read within the caps; hashed on the way when the message carries a
  checksum to compare with (``verify``). Without one the file moves straight
  through ``verified`` with its ETag and size.
- **HTTP(S).** Fetched into the landing bucket (``landing``) unless this run's
  verified copy is there already (a redelivery), then read from there like any
  S3 object. The landing copy's SHA-256 seeds the rows' ids, so a redelivery
  writes the same items.
- **Local file** (``worker load FILE``): read whole, the same gzip rules.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from worker.core.aws import Clients
from worker.core.config import Settings
from worker.core.errors import CorruptObject, ObjectUnavailable, SourceNotAllowed
from worker.core.fetch import Fetcher, Secrets
from worker.core.log import elapsed_ms, get_logger
from worker.core.tracking import FileTracker, TrackedFile
from worker.loader.budget import ByteBudget
from worker.loader.items import Origin
from worker.loader.landing import Landing
from worker.loader.messages import ObjectRef
from worker.loader.s3_reader import Data, Limits, gunzip_if_needed, read_object
from worker.loader.verify import Digests, check_size

log = get_logger(__name__)


@dataclass(slots=True)
class Fetched:
    origin: Origin  # the rows' id seed
    data: Data
    size: int  # bytes as stored
    reserved: int  # bytes held in the budget for it
    checksum: str  # "sha256:<hex>" once verified by digest, else the version id or ETag


class Sources:
    def __init__(
        self,
        settings: Settings,
        clients: Clients,
        limits: Limits,
        budget: ByteBudget,
        tracker: FileTracker | None,
    ) -> None:
        self.settings = settings
        self.clients = clients
        self.limits = limits
        self.budget = budget
        self.tracker = tracker
        self._landing: Landing | None = None

    async def s3(self, ref: ObjectRef, tracked: TrackedFile | None) -> Fetched:
        allowed = self.settings.source_buckets
        if allowed and "*" not in allowed and ref.bucket not in allowed:
            raise SourceNotAllowed(f"bucket {ref.bucket!r} is not in SOURCE_BUCKETS")
        start = time.perf_counter()
        want = ref.expected
        digests = Digests(md5=want.md5 is not None) if want.checksum else None
        obj = await read_object(self.clients.s3, ref, self.limits, self.budget, digests)
        try:
            log.info("object_downloaded", bytes=obj.stored_bytes, decoded_bytes=len(obj.data),
                     gzipped=obj.gzipped, ms=elapsed_ms(start))  # fmt: skip
            if tracked is not None and self.tracker is not None:
                await self.tracker.fetched(tracked)
            checksum = obj.revision
            if digests is not None:
                digests.check(want, ref.uri)
                checksum = digests.checksum
            else:
                check_size(want, obj.stored_bytes, ref.uri)
            if tracked is not None and self.tracker is not None:
                await self.tracker.verified(tracked, obj.stored_bytes, checksum)
        except BaseException:
            await self.budget.release(obj.reserved)
            raise
        origin = Origin(ref.bucket, ref.key, obj.revision, "")
        return Fetched(origin, obj.data, obj.stored_bytes, obj.reserved, checksum)

    async def remote(self, ref: ObjectRef, tracked: TrackedFile) -> Fetched:
        assert ref.remote is not None and self.tracker is not None
        landing = self._landing_place()
        tracker = self.tracker
        landed = await landing.find(ref.key, tracked.run_id, ref.expected)
        if landed is None:
            deadline = time.monotonic() + self.settings.acquire.deadline_s
            await self.budget.reserve(2 * landing.part)  # the parts in memory
            try:
                landed = await landing.land(
                    ref.remote.url, ref.key, tracked.run_id, ref.expected,
                    secret=ref.remote.secret, deadline=deadline,
                    fetched=lambda: tracker.fetched(tracked),
                )  # fmt: skip
            finally:
                await self.budget.release(2 * landing.part)
        else:
            log.info("file_landed_already", key=ref.key, bytes=landed.size)
            await tracker.fetched(tracked)
        await tracker.verified(tracked, landed.size, landed.checksum)
        copy = ObjectRef(landing.bucket, landed.key)
        obj = await read_object(self.clients.s3, copy, self.limits, self.budget)
        origin = Origin(landing.bucket, landed.key, landed.sha256[:32], "")
        return Fetched(origin, obj.data, obj.stored_bytes, obj.reserved, landed.checksum)

    def _landing_place(self) -> Landing:
        if self._landing is None:
            acquire = self.settings.acquire
            acquire.require()
            fetcher = Fetcher(acquire, Secrets(self.clients.secrets, acquire.secret_prefix))
            self.clients.on_close(fetcher.aclose)
            self._landing = Landing(
                self.clients.s3, acquire.landing_bucket, fetcher, self.settings.max_object_bytes
            )
        return self._landing

    async def file(self, path: Path) -> Fetched:
        try:
            raw, absolute = await asyncio.to_thread(_read_file, path)
        except OSError as exc:
            raise ObjectUnavailable(f"cannot read {path}: {exc.strerror}") from None
        if not raw:
            raise CorruptObject("file is empty")
        data, _ = gunzip_if_needed(raw, self.limits)
        revision = hashlib.sha256(raw).hexdigest()[:32]
        await self.budget.reserve(len(data))
        return Fetched(Origin("file", absolute, revision, ""), data, len(raw), len(data), revision)


def _read_file(path: Path) -> tuple[bytes, str]:
    return path.read_bytes(), str(path.absolute())
