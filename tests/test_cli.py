"""The ``worker`` command line, run as a user runs it: a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.conftest import BUCKET, scan
from tests.processes import ROOT


def worker(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["frobnicate"],
        ["load"],
        ["sample", "out.pb", "--rows", "many"],
        ["poll", "--processes", "0"],
        [],
    ],
)
def test_a_wrong_argument_gives_one_line_and_exit_code_2(args: list[str]) -> None:
    result = worker(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("worker")
    assert "error:" in result.stderr


@pytest.mark.parametrize("command", ["load", "poll", "health", "sample", "demo"])
def test_every_command_has_help(command: str) -> None:
    result = worker(command, "--help")
    assert result.returncode == 0 and "usage: worker" in result.stdout


def test_poll_without_a_queue_says_so() -> None:
    result = worker("poll", "--processes", "1")
    assert result.returncode == 2 and "QUEUE_URL" in result.stderr


def test_sample_then_load_a_local_file_writes_every_row(
    moto: str, tmp_path: Path, prefix: str
) -> None:
    out = tmp_path / "sample.pb.gz"
    made = worker("sample", str(out), "--rows", "300", "--tables", "2", "--gzip")
    assert made.returncode == 0, made.stderr
    loaded = worker("load", str(out), env={"SCHEMA_PREFIX": prefix})
    assert loaded.returncode == 0, loaded.stderr
    assert f"{prefix}_table_0" in loaded.stdout and ": ok (300 rows" in loaded.stdout
    ddb = boto3.client("dynamodb")
    assert len(scan(ddb, f"{prefix}_table_0")) + len(scan(ddb, f"{prefix}_table_1")) == 300


def test_load_from_s3_and_a_missing_file_reports_each(
    moto: str, s3: Any, tmp_path: Path, prefix: str
) -> None:
    sample = tmp_path / "s.pb"
    assert worker("sample", str(sample), "--rows", "10", "--tables", "1").returncode == 0
    s3.put_object(Bucket=BUCKET, Key="in/s.pb", Body=sample.read_bytes())
    result = worker("load", f"s3://{BUCKET}/in/s.pb", str(tmp_path / "nope.pb"))
    assert result.returncode == 1
    assert f"s3://{BUCKET}/in/s.pb: ok (10 rows" in result.stdout
    assert "nope.pb: FAILED object_unavailable" in result.stdout


def test_health_exits_non_zero_without_a_heartbeat(tmp_path: Path) -> None:
    result = worker("health", env={"HEALTH_FILE": str(tmp_path / "hb")})
    assert result.returncode == 1 and "no health file" in result.stdout
    (tmp_path / "hb.1").write_text("now")
    assert worker("health", env={"HEALTH_FILE": str(tmp_path / "hb")}).returncode == 0


def test_the_demo_runs_end_to_end_and_exits_0() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT")}
    result = subprocess.run(
        [sys.executable, "-m", "worker", "demo", "--rows", "400"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "result: OK" in result.stdout
    assert "does-not-exist" in result.stdout.split("== dead-letter queue")[1]
