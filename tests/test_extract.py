"""The bundled OutputFile schema, its generated code, and the pluggable extract
(ARCHITECTURE.md, "Contracts")."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import factories as f
from worker.core.errors import ConfigError, CorruptObject
from worker.loader.extract import Extractor, load_plugin
from worker.loader.extract.outputfile_pb2 import Table

EXTRACT = Path(__file__).resolve().parent.parent / "worker" / "loader" / "extract"
DEFAULT = Extractor.from_specs(
    "worker.loader.extract.outputfile_pb2:OutputFile",
    "worker.loader.extract.reference:processOutputData",
)


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{EXTRACT}",
            f"--python_out={tmp_path}", f"--mypy_out={tmp_path}", str(EXTRACT / "outputfile.proto"),
        ],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    for name in ("outputfile_pb2.py", "outputfile_pb2.pyi"):
        assert (tmp_path / name).read_text() == (EXTRACT / name).read_text(), (
            f"run `make proto`: {name}"
        )


def test_process_output_data_maps_tables_to_rows_of_set_values() -> None:
    data = f.output_file(
        ("t", ["id", "s", "i", "x"], [["a", "", -5, math.inf], ["b"], [None, "z"]]),
        ("t", ["id"], [["c"]]),
        ("u", ["k"], []),
    )
    tables = DEFAULT.extract(data)
    assert tables == {
        "t": [{"id": "a", "s": "", "i": -5, "x": math.inf}, {"id": "b"}, {"s": "z"}, {"id": "c"}],
        "u": [],
    }


@pytest.mark.parametrize("data", [b"\xff\xff\xff", b"\x0a\x05ab", b"\x08\x01"])
def test_bytes_that_are_not_an_output_file_are_corrupt(data: bytes) -> None:
    with pytest.raises(CorruptObject):
        DEFAULT.extract(data)


def test_another_message_class_and_extract_can_be_plugged_in() -> None:
    extractor = Extractor.from_specs(
        "worker.loader.extract.outputfile_pb2:Table", "tests.plugins:one_table"
    )
    table = Table(name="solo", columns=["id"])
    table.rows.add(values=[f.value("x")])
    assert extractor.extract(table.SerializeToString()) == {"solo": [{"id": "x"}]}


@pytest.mark.parametrize("spec", ["nocolon", "no.such.module:x", "worker.loader.extract:missing"])
def test_a_plugin_name_that_does_not_resolve_names_its_variable(spec: str) -> None:
    with pytest.raises(ConfigError, match=f"TABLE_EXTRACT={spec!r}") as caught:
        load_plugin(spec, "TABLE_EXTRACT")
    assert caught.value.context["variable"] == "TABLE_EXTRACT"


@pytest.mark.parametrize(
    ("message", "extract", "variable"),
    [
        (
            "worker.loader.extract.reference:processOutputData",
            "tests.plugins:one_table",
            "OUTPUT_FILE_MESSAGE",
        ),
        (
            "worker.loader.extract.outputfile_pb2:Table",
            "worker.loader.pipeline:SLICES_AT_ONCE",
            "TABLE_EXTRACT",
        ),
    ],
)
def test_a_plugin_of_the_wrong_kind_names_its_variable(
    message: str, extract: str, variable: str
) -> None:
    with pytest.raises(ConfigError, match=f"{variable}=.* is not (a protobuf|callable)"):
        Extractor.from_specs(message, extract)
