"""The one backoff policy: exponential, capped, full jitter, bounded attempts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.core.backoff import Backoff


def test_the_ceiling_doubles_from_the_base_until_the_cap() -> None:
    policy = Backoff(base_s=0.5, cap_s=3.0, jitter=False)
    assert [policy.delay(n) for n in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_full_jitter_draws_below_the_ceiling() -> None:
    policy = Backoff(base_s=1.0, cap_s=100.0)
    assert policy.delay(3, rand=lambda: 0.25) == 0.25 * 8
    assert policy.delay(3, rand=lambda: 0.0) == 0.0


@given(attempt=st.integers(min_value=-5, max_value=10_000), draw=st.floats(0, 0.999))
def test_a_delay_never_exceeds_the_cap_nor_overflows(attempt: int, draw: float) -> None:
    policy = Backoff(base_s=0.05, cap_s=10.0)
    assert 0.0 <= policy.delay(attempt, rand=lambda: draw) <= 10.0


def test_attempts_bound_the_retries_and_zero_leaves_them_to_the_caller() -> None:
    assert [Backoff(base_s=1, cap_s=1, attempts=3).retries_left(n) for n in (1, 2, 3)] == [
        True,
        True,
        False,
    ]
    assert Backoff(base_s=1, cap_s=1).retries_left(1_000_000)


def test_a_negative_bound_is_refused() -> None:
    with pytest.raises(ValueError, match="invalid backoff"):
        Backoff(base_s=-1, cap_s=1)
