"""Loader v3: no file within MAX_DECODED_BYTES takes more memory than the
derived cap promises (issue 19, items 1 and 3). The crafted files of the
issue, and a typical one, each loaded at its cap by ``worker load`` in a fresh
process; peaks (VmHWM) against the constants in ``worker.loader.budget``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks.decode_memory import CRAFTED, allowed_mb, measure
from benchmarks.servers import sink_process
from worker.loader.budget import RUNTIME_PEAK

MiB = 1024 * 1024
SIZE = 4 * MiB


@pytest.fixture(scope="module")
def peaks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t",
           "AWS_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
           "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "LOG_LEVEL": "ERROR",
           "SCHEMA_PREFIX": "mem", "SOURCE_BUCKETS": "*"}  # fmt: skip
    with sink_process() as sink:
        scratch = Path(tmp_path_factory.mktemp("decode_memory"))
        return measure({**env, "AWS_ENDPOINT_URL_DYNAMODB": sink}, scratch, SIZE)


def test_the_runtime_peaks_within_its_reserve(peaks: dict[str, float]) -> None:
    assert 0 < peaks["runtime"] <= RUNTIME_PEAK / MiB


@pytest.mark.parametrize("path", ["streamed", "whole file"])
@pytest.mark.parametrize("name", [*CRAFTED, "typical (benchmark sample)"])
def test_a_file_at_its_cap_stays_within_what_the_cap_promises(
    peaks: dict[str, float], name: str, path: str
) -> None:
    assert peaks[f"{name} / {path}"] <= allowed_mb(path, SIZE / MiB)


@pytest.mark.parametrize("path", ["streamed", "whole file"])
def test_a_typical_file_at_its_cap_loads(peaks: dict[str, float], path: str) -> None:
    assert peaks[f"typical (benchmark sample) / {path} / exit"] == 0


def test_a_whole_file_whose_messages_would_pass_its_memory_is_refused(
    peaks: dict[str, float],
) -> None:
    """54 times its size if parsed (measured at 10 MB): refused by its count."""
    assert peaks["rows of one int / whole file / exit"] == 1
    assert peaks["rows of one int / streamed / exit"] == 0  # the stream holds a slice
