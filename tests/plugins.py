"""TABLE_EXTRACT plugins used by the tests, loaded by ``module:callable`` name."""

from __future__ import annotations

from typing import Any

from worker.extract.outputfile_pb2 import OutputFile, Table
from worker.extract.reference import processOutputData


def explode(output_file: Any) -> Any:
    raise RuntimeError("boom")


def upper_tables(output_file: Any) -> dict[str, list[dict[str, Any]]]:
    return {name.upper(): rows for name, rows in processOutputData(output_file).items()}


def one_table(table: Table) -> dict[str, list[dict[str, Any]]]:
    """An extract for a layer whose files are a single ``Table`` message."""
    return processOutputData(OutputFile(tables=[table]))
