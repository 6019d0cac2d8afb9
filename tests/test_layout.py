"""The tree reads as the architecture: the core imports no product, a product imports
only the core and itself, and only the entry points put products together."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.processes import ROOT

PRODUCTS = ("loader", "cdc", "firehose", "ledger")


def imported_packages(path: Path) -> set[str]:
    """The second-level ``worker.X`` packages a module imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found |= {n.split(".")[1] for n in names if n.startswith("worker.") and n.count(".") >= 1}
    return found


def modules(package: str) -> list[Path]:
    return sorted((ROOT / "worker" / package).rglob("*.py"))


def test_the_core_imports_no_product_and_no_entry_point() -> None:
    for path in modules("core"):
        assert imported_packages(path) <= {"core"}, path


@pytest.mark.parametrize("product", PRODUCTS)
def test_a_product_imports_only_the_core_and_itself(product: str) -> None:
    assert modules(product)
    for path in modules(product):
        assert imported_packages(path) <= {"core", product}, path


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from worker.loader.items import I\n    import worker.cdc.x\n")
    assert imported_packages(source) == {"loader", "cdc"}


def test_no_module_or_doc_points_outside_the_repository() -> None:
    texts = [p for p in ROOT.glob("*.md")] + list((ROOT / "worker").rglob("*.py"))
    for path in texts:
        text = path.read_text()
        assert "../shared" not in text and "DESIGN" not in text, path
