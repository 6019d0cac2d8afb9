"""One definition of the CDC semantics serves the local apply and the Databricks job."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from worker.cdc import cdc_rules as rules

JOB = Path(__file__).resolve().parent.parent / "databricks" / "autoloader_cdc.py"


def test_sequence_numbers_pad_so_text_order_is_numeric_order() -> None:
    numbers = [9, 10, 1100000000017454423009, 99999999999999999999999]
    padded = [rules.padded_sequence(n) for n in numbers]
    assert sorted(padded) == padded and all(len(p) == rules.SEQUENCE_WIDTH for p in padded)
    with pytest.raises(ValueError, match="longer"):
        rules.padded_sequence("1" * 41)


def test_the_latest_change_per_key_wins() -> None:
    seq = rules.SEQUENCE_COLUMN
    changes = [
        {"id": "a", seq: rules.padded_sequence(5), "v": 1},
        {"id": "a", seq: rules.padded_sequence(10), "v": 2},
        {"id": "a", seq: rules.padded_sequence(9), "v": 3},
        {"id": "b", seq: rules.padded_sequence(1), "v": 4},
    ]
    kept = {c["id"]: c["v"] for c in rules.latest_per_key(changes, ["id"])}
    assert kept == {"a": 2, "b": 4}


def test_the_merge_predicate_matches_every_key_column() -> None:
    assert rules.merge_predicate(["pk", "sk"]) == "t.`pk` = s.`pk` AND t.`sk` = s.`sk`"


def test_the_databricks_job_takes_its_semantics_from_the_shared_rules() -> None:
    source = JOB.read_text()
    tree = ast.parse(source)
    compile(tree, str(JOB), "exec")
    imported = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "worker.cdc"
    ]
    assert imported and imported[0].names[0].name == "cdc_rules"
    used = {
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "rules"
    }
    assert {
        "merge_predicate",
        "DELETE_WHEN",
        "UPDATE_WHEN",
        "INSERT_WHEN",
        "SEQUENCE_COLUMN",
    } <= used
    literals = [
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    ]
    for private in (rules.SEQUENCE_COLUMN, rules.DELETE_COLUMN, rules.NEWER):
        assert not any(private in text for text in literals), f"{private!r} is redefined in the job"
    for needed in ("cloudFiles", "cloudFiles.schemaLocation", "txnAppId", "txnVersion"):
        assert any(needed in text for text in literals), needed
    assert "availableNow=True" in source and "processingTime=" in source
    assert "foreachBatch" in source and "whenMatchedDelete" in source
