"""Epoch timestamps whose unit (seconds or milliseconds) is told by magnitude."""

from __future__ import annotations

# 1e11 is the year 1973 in milliseconds and 5138 in seconds: at or above it, milliseconds.
MS_THRESHOLD = 100_000_000_000


def is_epoch_ms(value: float) -> bool:
    return abs(value) >= MS_THRESHOLD
