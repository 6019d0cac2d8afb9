"""The one backoff policy: exponential, capped, optionally with full jitter.

Every retry loop in the worker takes its waits from a ``Backoff``: the batch
writer (throttles and UnprocessedItems), the Firehose dedupe claims, waiting
for a table to become ACTIVE, and the poller's visibility delay for a message
whose load may succeed later.

Full jitter (a uniform draw in ``[0, min(cap, base * 2**attempt))``) spreads
the retries of many workers apart, which is what DynamoDB's and SQS's
throttling needs; the deterministic form (the upper bound itself) suits
polling one resource and delays a human may want to predict.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

_MAX_SHIFT = 62  # 2**62 * any sane base is far past every cap: no overflow, no surprise


@dataclass(frozen=True, kw_only=True, slots=True)
class Backoff:
    """How long to wait after a failed attempt, and how many attempts there are."""

    base_s: float
    cap_s: float
    attempts: int = 0  # attempts in all, the first included; 0: bounded by the caller
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.base_s < 0 or self.cap_s < 0 or self.attempts < 0:
            raise ValueError(f"invalid backoff {self}")

    def ceiling(self, attempt: int) -> float:
        """The longest wait after failed attempt ``attempt`` (``base * 2**attempt``, capped)."""
        return min(self.cap_s, self.base_s * float(1 << min(max(attempt, 0), _MAX_SHIFT)))

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """The wait after failed attempt ``attempt``: a uniform draw below the ceiling
        with jitter, the ceiling itself without."""
        ceiling = self.ceiling(attempt)
        return rand() * ceiling if self.jitter else ceiling

    def retries_left(self, attempt: int) -> bool:
        """Whether another attempt may follow attempt ``attempt`` (1-based)."""
        return self.attempts == 0 or attempt < self.attempts
