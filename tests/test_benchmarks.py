"""The benchmark harness cannot rot: every contender runs at a tiny size (no timing asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson

from benchmarks.harness import CONTENDERS
from benchmarks.sink import batch_problem, number_problem
from tests.processes import ROOT


def test_the_sink_refuses_what_dynamodb_refuses() -> None:
    assert number_problem(b'{"N":"NaN"}') == "a number is not finite"
    assert number_problem(b'{"N":"1' + b"1" * 38 + b'"}') == "a number has more than 38 digits"
    assert number_problem(b'{"N":"1.5e10"}') is None
    put = {"PutRequest": {"Item": {"id": {"N": "1"}}}}
    assert batch_problem({"t": [put] * 26}, {"t": [("1",)] * 26}, large=False)
    assert batch_problem({"t": [put] * 2}, {"t": [("1",), ("1",)]}, large=False)
    big = {"PutRequest": {"Item": {"id": {"N": "1"}, "s": {"S": "x" * 410_000}}}}
    assert batch_problem({"t": [big]}, {"t": [("1",)]}, large=True)
    assert batch_problem({"t": [put]}, {"t": [("1",)]}, large=False) is None


def test_every_contender_runs_and_the_report_is_written(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT")}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = orjson.loads((tmp_path / "results.json").read_bytes())
    unthrottled = {r["contender"]: r for r in report["unthrottled"]}
    assert set(unthrottled) == set(CONTENDERS)
    expected = {"unthrottled": report["rows"], "unprocessed_20pct": report["rows"]}
    expected["moto"] = report["moto_rows"]
    for series, rows in expected.items():
        for result in report[series]:
            assert "error" not in result, result
            assert result["rows"] == rows, (series, result)  # every row of the file written
    for result in report["unthrottled"] + report["unprocessed_20pct"]:
        assert result["sink_rejected"] == 0, result  # nobody sent what DynamoDB refuses
    throttled = {r["contender"]: r for r in report["unprocessed_20pct"]}
    assert throttled["worker-write"]["rows_lost"] == 0
    assert throttled["worker-write"]["resent_items"] > 0
    assert [r["max_in_flight"] for r in report["scaling"]] == [1, 4, 16, 64]
    assert report["memory"][0]["exit"] == 0 and report["cold_start"]["import_lambda_entry_ms"] > 0
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| worker-write |" in (tmp_path / "results.md").read_text()


def test_the_lake_benchmark_runs_small() -> None:
    import subprocess
    import sys

    from tests.processes import ROOT

    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.lake", "--sizes", "3000", "--keys", "200",
         "--runs", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "3,000 changes over 200 keys" in done.stdout and "with maintain" in done.stdout


def test_the_encode_benchmark_runs_small_and_prints_the_floor_under_the_encoder() -> None:
    from benchmarks.encode import floor_per_row
    from worker.entry.sample import sample_file

    assert floor_per_row(sample_file(rows=50, tables=2).SerializeToString()) > 0
    done = subprocess.run([sys.executable, "-m", "benchmarks.encode", "--rows", "500"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "500 rows, N key: dict path" in done.stdout and "upb reads alone" in done.stdout
