"""What the loader tells a run ledger about the files it loads, as a protocol.

The loader knows nothing of runs: a message may carry ``run_id``/``file_id``,
and when the entry point gave the loader a ``FileTracker`` (the ledger's), the
loader reports each such file's progress through it. Keeping the protocol in
the core lets the ledger and the loader stay separate products.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from worker.core.errors import WorkerError


@dataclass(frozen=True, slots=True)
class TrackedFile:
    run_id: str
    file_id: str


@dataclass(frozen=True, slots=True)
class LoadedFile:
    rows_written: int
    size: int
    checksum: str  # "sha256:<hex>" when verified by digest, else the object's ETag


class FileTracker(Protocol):
    async def begin(self, file: TrackedFile) -> bool:
        """Whether to load the file at all: False when its run was cancelled or
        has ended, or the file is already done (a redelivery)."""
        ...

    async def fetched(self, file: TrackedFile) -> None:
        """The file was downloaded: it is ``fetched``; its run is ``processing``."""
        ...

    async def verified(self, file: TrackedFile, size: int, checksum: str) -> None:
        """The file is what its manifest (or server) says: it is ``verified``, with the
        size and checksum its bytes had."""
        ...

    async def finished(self, file: TrackedFile, loaded: LoadedFile) -> None:
        """Every row is written: the file is done, counted once, and its run may end."""
        ...

    async def failed(self, file: TrackedFile, error: WorkerError, *, final: bool) -> None:
        """The load failed: ``final`` when no redelivery will follow (a permanent
        error, or the last receive before the DLQ); otherwise the error is noted."""
        ...
