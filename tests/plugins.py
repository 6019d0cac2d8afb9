"""TABLE_EXTRACT plugins used by the tests, loaded by ``module:callable`` name."""

from __future__ import annotations

import os
import time
from typing import Any

from worker.loader.extract.outputfile_pb2 import OutputFile, Table
from worker.loader.extract.reference import processOutputData


def explode(output_file: Any) -> Any:
    raise RuntimeError("boom")


def upper_tables(output_file: Any) -> dict[str, list[dict[str, Any]]]:
    return {name.upper(): rows for name, rows in processOutputData(output_file).items()}


def one_table(table: Table) -> dict[str, list[dict[str, Any]]]:
    """An extract for a layer whose files are a single ``Table`` message."""
    return processOutputData(OutputFile(tables=[table]))


def slow(output_file: OutputFile) -> dict[str, list[dict[str, Any]]]:
    """The reference extract after a pause of $SLOW_EXTRACT_S seconds: a slow load."""
    time.sleep(float(os.environ.get("SLOW_EXTRACT_S", "3")))
    return processOutputData(output_file)


_failed_once: set[str] = set()


def fail_once(output_file: OutputFile) -> dict[str, list[dict[str, Any]]]:
    """Raise a retryable error the first time a file is seen, then extract normally."""
    from worker.core.errors import TransientAwsError

    if output_file.file_id not in _failed_once:
        _failed_once.add(output_file.file_id)
        raise TransientAwsError("simulated transient failure")
    return processOutputData(output_file)


LOADS: list[tuple[str, float, float]] = []  # (file_id, start, end) of every ``timed`` extract


def timed(output_file: OutputFile) -> dict[str, list[dict[str, Any]]]:
    """``slow``, recording when each file's extract ran: the order loads happened in."""
    start = time.monotonic()
    rows = slow(output_file)
    LOADS.append((output_file.file_id, start, time.monotonic()))
    return rows


def always_transient(output_file: OutputFile) -> dict[str, list[dict[str, Any]]]:
    """A dependency that never recovers: every attempt fails as retryable."""
    from worker.core.errors import TransientAwsError

    raise TransientAwsError("simulated outage")
