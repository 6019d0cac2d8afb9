"""Memory for decoded objects: the caps derived from the process's memory, and
the byte budget shared by the objects one process loads at once.

- **The decoded cap.** With ``MAX_DECODED_BYTES`` unset, a process that knows
  its memory (``AWS_LAMBDA_FUNCTION_MEMORY_SIZE`` in Lambda, the cgroup limit on
  ECS) caps a decoded object at what fits: (memory - ``RESERVED``) / the
  extract's ratio of memory to decoded bytes. A larger object fails
  permanently, with advice that names the ECS poller.
- **The memory model** (measured by ``python -m benchmarks.decode_memory``,
  held by tests/test_decode_memory.py): the runtime itself peaks at
  ``RUNTIME_PEAK``; the streamed path holds the object's bytes
  (``STREAMED_RATIO`` per decoded byte) and a working set of slices and
  requests that does not grow with the file (``WORKING_SET``), whatever the
  bytes hold; the whole-file path holds the bytes and ``MESSAGE_BYTES`` per
  message upb builds, counted before it parses (``WHOLE_FILE_RATIO``: a
  typical file's cost per byte, for the cap).
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
RUNTIME_PEAK = 96 * MiB  # the interpreter, the SDK and clients, loading a tiny file
WORKING_SET = 64 * MiB  # the streamed path's slices and requests in flight, at most
RESERVED = RUNTIME_PEAK + WORKING_SET
STREAMED_RATIO = 1.25  # the bytes, and a gzipped object's compressed copy while it inflates
MESSAGE_BYTES = 160  # upb's message and the reference extract's row dict, at most
WHOLE_FILE_RATIO = 20.0  # measured 14 for a typical file; MESSAGE_BYTES counts 18.6
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


def decoded_cap(settings: Settings, *, streamed: bool) -> int:
    """MAX_DECODED_BYTES, explicit or derived."""
    if settings.max_decoded_bytes is not None:
        return settings.max_decoded_bytes
    limit = memory_limit(settings)
    return DEFAULT_DECODED_CAP if limit is None else _what_fits(limit, streamed=streamed)


def cap_advice(settings: Settings) -> str:
    """What a decoded cap's error adds when the cap was derived from memory."""
    limit = None if settings.max_decoded_bytes is not None else memory_limit(settings)
    if limit is None:
        return ""
    return (
        f" (derived from this process's {limit // MiB} MB of memory: load larger files "
        "with the ECS poller on a larger task, or give the function more memory)"
    )


def whole_file_memory(decoded_cap: int) -> int:
    """The memory a whole-file decode may take: what the cap promises."""
    return int(decoded_cap * WHOLE_FILE_RATIO)


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
