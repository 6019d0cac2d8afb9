"""The bundled reference ``TableExtract.processOutputData`` (ARCHITECTURE.md, "Contracts")."""

from __future__ import annotations

from typing import Any

from worker.loader.extract.outputfile_pb2 import OutputFile

Rows = dict[str, list[dict[str, Any]]]


def processOutputData(output_file: OutputFile) -> Rows:  # noqa: N802 - the layer's contract name
    """Map each table name to its rows: ``{column: value}`` for every set value.

    A value whose ``kind`` is unset is a missing field; a row shorter than the
    columns simply lacks the trailing fields. Tables sharing a name are
    concatenated in file order.
    """
    tables: Rows = {}
    for table in output_file.tables:
        columns = list(table.columns)
        rows = tables.setdefault(table.name, [])
        append = rows.append
        for row in table.rows:
            record: dict[str, Any] = {}
            for column, value in zip(columns, row.values, strict=False):
                kind = value.WhichOneof("kind")
                if kind is not None:
                    record[column] = getattr(value, kind)
            append(record)
    return tables
