"""One definition of the CDC semantics serves the local apply and the Databricks job."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

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
        "column_names",
        "DELETE_WHEN",
        "UPDATE_WHEN",
        "INSERT_WHEN",
        "NOT_TOMBSTONED",
        "TOMBSTONE_MOVE_WHEN",
        "TOMBSTONE_CLEAR_WHEN",
        "TOMBSTONE_ADD_WHEN",
        "TOMBSTONE_RETENTION_HOURS",
        "SEQUENCE_COLUMN",
    } <= used
    literals = [
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    ]
    for private in (rules.SEQUENCE_COLUMN, rules.DELETE_COLUMN, rules.NEWER, rules.NOT_TOMBSTONED):
        assert not any(private in text for text in literals), f"{private!r} is redefined in the job"
    for needed in ("cloudFiles", "cloudFiles.schemaLocation", "txnAppId", "txnVersion"):
        assert any(needed in text for text in literals), needed
    assert "availableNow=True" in source and "processingTime=" in source
    assert "foreachBatch" in source and "whenMatchedDelete" in source
    functions = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    # Parquet parts: the format is the caller's, and their JSON images are parsed
    formats = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
               and any(isinstance(a, ast.Constant) and a.value == "cloudFiles.format"
                       for a in n.args)]  # fmt: skip
    assert formats and not isinstance(formats[0].args[1], ast.Constant)
    assert '"parquet"' in source and "from_json" in ast.unparse(functions["parse_images"])
    # the tombstones are merged before the target, in every micro-batch
    upsert = ast.unparse(functions["upsert"])
    assert "not_tombstoned(" in upsert
    assert upsert.index("merge_tombstones(") < upsert.index("DeltaTable.forName(spark, target)")
    assert "TOMBSTONE_RETENTION_HOURS" in ast.unparse(functions["parse_args"])
    assert "EVENT_TIME_COLUMN" in ast.unparse(functions["maintain"])
    # the bootstrap: items converted and named as the stream's; the seam rule from cdc_rules
    boot = ast.unparse(functions["bootstrap"])
    assert "convert_image" in boot and "flatten(" in boot and "cutover_table(" in boot
    assert "rules.AFTER_CUTOVER" in ast.unparse(functions["after_cutover"])
    assert upsert.index("after_cutover(") < upsert.index("not_tombstoned(")
    # incremental exports: each line made an envelope by the function lake apply uses
    assert "change_envelope" in ast.unparse(functions["parse_exports"])
    assert "parse_exports(" in upsert and '"incremental-export"' in source


@pytest.mark.parametrize("bad", ["-5", "12a", "", "1.5", "٣"])
def test_a_sequence_number_is_digits_only(bad: str) -> None:
    with pytest.raises(ValueError, match="natural number"):
        rules.padded_sequence(bad)


names = st.text(alphabet=st.sampled_from("aAbB_ z9.-é"), min_size=1, max_size=6)


@given(st.sets(names, max_size=12), st.sets(names, max_size=12))
def test_column_names_are_lossless_case_insensitively_and_stable(
    first: set[str], later: set[str]
) -> None:
    ours = {rules.SEQUENCE_COLUMN, rules.EVENT_TIME_COLUMN, rules.DELETE_COLUMN}
    columns = rules.column_names(first)
    assert len({c.casefold() for c in columns.values()}) == len(first)  # no two share one
    assert not {c.casefold() for c in columns.values()} & ours
    assert all(not c.startswith("_") for c in columns.values())
    # a later run, with the columns the first one made, maps the old names the same way
    again = rules.column_names(first | later, existing=[*columns.values(), *ours])
    assert {a: again[a] for a in first} == columns
    assert len({c.casefold() for c in again.values()}) == len(first | later)


def test_plain_names_are_their_own_columns_and_the_rest_are_hashed() -> None:
    columns = rules.column_names(["user_id", "Name", "name", "a b", "_sequence_number"])
    assert columns["user_id"] == "user_id" and columns["Name"] == "Name"
    assert columns["name"].startswith("name__") and columns["a b"].startswith("a_b__")
    assert columns["_sequence_number"].startswith("sequence_number__")
    later = rules.column_names(["Name", "name"], existing=["name"])  # "name" came first there
    assert later["name"] == "name" and later["Name"].startswith("Name__")


def test_the_merge_conditions_are_the_decide_rule_in_a_sql_engine(tmp_path: Path) -> None:
    """The SQL the Databricks job runs, evaluated by DataFusion (delta-rs' engine)
    against ``rules.decide`` on every combination of sequence numbers."""
    import pyarrow as pa
    from deltalake import DeltaTable, QueryBuilder, write_deltalake

    seq, delete = rules.SEQUENCE_COLUMN, rules.DELETE_COLUMN
    cases = [
        (s, d, live, tomb)
        for s in (1, 2, 3)
        for d in (False, True)
        for live in (None, 1, 2, 3)
        for tomb in (None, 1, 2, 3)
    ]
    source = {"id": list(range(len(cases))), seq: [rules.padded_sequence(c[0]) for c in cases],
              delete: [c[1] for c in cases]}  # fmt: skip
    target = [(i, pad(c[2])) for i, c in enumerate(cases) if c[2] is not None]
    tombs = [(i, pad(c[3])) for i, c in enumerate(cases) if c[3] is not None]
    for name, table in (
        ("s", pa.table(source)),
        ("t", pa.table({"id": [i for i, _ in target], seq: [v for _, v in target]})),
        ("d", pa.table({"id": [i for i, _ in tombs], seq: [v for _, v in tombs]})),
    ):
        write_deltalake(str(tmp_path / name), table)
    s, t, d = rules.SOURCE_ALIAS, rules.TARGET_ALIAS, rules.TOMBSTONE_ALIAS
    sql = f"""
        SELECT {s}.id,
          CASE WHEN NOT ({rules.NOT_TOMBSTONED}) THEN 'none'
               WHEN {t}.id IS NULL THEN CASE WHEN {rules.INSERT_WHEN} THEN 'insert' ELSE 'none' END
               WHEN {rules.DELETE_WHEN} THEN 'delete'
               WHEN {rules.UPDATE_WHEN} THEN 'update'
               ELSE 'none' END AS action
        FROM {s} LEFT JOIN {t} ON {rules.merge_predicate(["id"])}
                 LEFT JOIN {d} ON {rules.merge_predicate(["id"], target=d)}
    """
    builder = QueryBuilder()
    for name in ("s", "t", "d"):
        builder = builder.register(name, DeltaTable(str(tmp_path / name)))
    rows = pa.table(builder.execute(sql).read_all()).to_pylist()
    by_sql = {row["id"]: row["action"] for row in rows}
    by_rule = {i: rules.decide(rules.padded_sequence(c[0]), c[1], pad(c[2]), pad(c[3])) or "none"
               for i, c in enumerate(cases)}  # fmt: skip
    assert by_sql == by_rule
    assert set(by_rule.values()) == {"insert", "update", "delete", "none"}


def pad(number: int | None) -> str | None:
    return None if number is None else rules.padded_sequence(number)


def test_the_seam_in_sql_is_the_after_cutover_rule(tmp_path: Path) -> None:
    """``AFTER_CUTOVER`` (the Databricks job's filter), evaluated by DataFusion,
    keeps exactly the changes ``after_cutover`` keeps."""
    import pyarrow as pa
    from deltalake import DeltaTable, QueryBuilder, write_deltalake

    cutover = 1_700_000_010_500
    times = [cutover + delta for delta in (-1501, -1000, -501, -500, -1, 0, 1, 499, 500, 1500)]
    table = pa.table({"id": list(range(len(times))),
                      rules.EVENT_TIME_COLUMN: pa.array(times, pa.timestamp("ms"))})  # fmt: skip
    write_deltalake(str(tmp_path / "s"), table)
    keep = rules.AFTER_CUTOVER.format(cutover=f"to_timestamp_millis({cutover})")
    sql = f"SELECT {rules.SOURCE_ALIAS}.id FROM {rules.SOURCE_ALIAS} WHERE {keep}"
    builder = QueryBuilder().register(rules.SOURCE_ALIAS, DeltaTable(str(tmp_path / "s")))
    kept = {row["id"] for row in pa.table(builder.execute(sql).read_all()).to_pylist()}
    assert kept == {i for i, t in enumerate(times) if rules.after_cutover(t, cutover)}
    assert 0 < len(kept) < len(times)
