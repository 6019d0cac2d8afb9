"""Memory for decoded objects: the caps derived from the process's memory, and
the byte budget shared by the objects one process loads at once.

- **The decoded cap.** With ``MAX_DECODED_BYTES`` unset, a process that knows
  its memory (``AWS_LAMBDA_FUNCTION_MEMORY_SIZE`` in Lambda, the cgroup limit on
  ECS) caps a decoded object at what fits: (memory - ``RESERVED``) / the
  extract's ratio of peak memory to decoded bytes (``STREAMED_RATIO`` with
  ``iterOutputData``, ``WHOLE_FILE_RATIO`` without). A larger object fails
  permanently, with a message that names the cap and suggests the ECS poller.
- **The byte budget.** ``MAX_CONCURRENT_OBJECTS`` bounds a count, not memory.
  Each object reserves its stored size as soon as S3 answers (before a byte of
  the body is read), and its decoded size once it is whole; a new object waits
  while the reservations would pass the budget, unless nothing else is loading.
  So four 1 GB files do not start at once on a 4 GB task. A gzipped object
  counts its stored size until it is decoded.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from worker.core.config import Settings

MiB = 1024 * 1024
RESERVED = 256 * MiB  # the interpreter, the SDK, clients and buffers
STREAMED_RATIO = 2.0  # peak over decoded size, measured (benchmarks.memory): 1.1-1.7
WHOLE_FILE_RATIO = 16.0  # measured 14-15 for the whole-file extract
DEFAULT_DECODED_CAP = 1024 * MiB  # when the process does not know its memory
_CGROUP_LIMITS = (  # v2, then v1 (an unlimited v1 group reports about 2**63)
    Path("/sys/fs/cgroup/memory.max"),
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
)
_UNLIMITED = 2**50


def memory_limit(settings: Settings) -> int | None:
    """The process's memory in bytes, when it can know it."""
    if settings.lambda_memory_mb:
        return settings.lambda_memory_mb * MiB
    for path in _CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        return int(text) if text.isdigit() and int(text) < _UNLIMITED else None
    return None


def decoded_cap(settings: Settings, *, streamed: bool) -> tuple[int, str]:
    """MAX_DECODED_BYTES, explicit or derived, and the advice its error carries."""
    if settings.max_decoded_bytes is not None:
        return settings.max_decoded_bytes, ""
    limit = memory_limit(settings)
    if limit is None:
        return DEFAULT_DECODED_CAP, ""
    cap = _what_fits(limit, streamed=streamed)
    advice = (
        f" (derived from this process's {limit // MiB} MB of memory: load larger files "
        "with the ECS poller on a larger task, or give the function more memory)"
    )
    return cap, advice


def budget_bytes(settings: Settings, *, streamed: bool) -> int | None:
    """MAX_BYTES_IN_FLIGHT, explicit or derived; None: no budget."""
    if settings.max_bytes_in_flight is not None:
        return settings.max_bytes_in_flight
    limit = memory_limit(settings)
    return None if limit is None else _what_fits(limit, streamed=streamed)


def _what_fits(limit: int, *, streamed: bool) -> int:
    """The decoded bytes that fit in ``limit`` bytes of memory, by the extract's ratio."""
    return max(MiB, int((limit - RESERVED) / (STREAMED_RATIO if streamed else WHOLE_FILE_RATIO)))


class ByteBudget:
    """Decoded bytes reserved by the objects being loaded, against a capacity."""

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.reserved = 0
        self.peak = 0
        self._changed = asyncio.Condition()

    async def reserve(self, size: int) -> None:
        """Wait until ``size`` fits (or nothing else is reserved), then take it."""
        if self.capacity is not None:
            async with self._changed:
                await self._changed.wait_for(
                    lambda: self.reserved == 0 or self.reserved + size <= (self.capacity or 0)
                )
        self.grow(size)

    def grow(self, size: int) -> None:
        self.reserved += size
        self.peak = max(self.peak, self.reserved)

    async def release(self, size: int) -> None:
        self.reserved -= size
        async with self._changed:
            self._changed.notify_all()
