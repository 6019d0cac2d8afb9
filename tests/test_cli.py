"""The ``worker`` command line, run as a user runs it: a real process."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import orjson
import pytest

from tests.conftest import BUCKET, scan
from tests.processes import ROOT
from worker.core.config import Settings


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
    assert result.returncode == 1 and "no live poller" in result.stdout
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


def one_line_error(result: Any, code: int, *says: str) -> None:
    """The process printed exactly one line on stderr, naming the problem."""
    assert result.returncode == code, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("worker") and "error:" in lines[0]
    for word in says:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"TABLE_EXTRACT": "nosuch.mod:fn"}, "TABLE_EXTRACT"),
        ({"OUTPUT_FILE_MESSAGE": "worker.loader.extract.reference:processOutputData"},
         "OUTPUT_FILE_MESSAGE"),
        ({"MAX_IN_FLIGHT": "0"}, "MAX_IN_FLIGHT"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
    ],
)  # fmt: skip
def test_a_bad_setting_for_load_is_one_line_naming_it_and_exit_2(
    moto: str, tmp_path: Path, env: dict[str, str], names: str
) -> None:
    sample = tmp_path / "s.pb"
    assert worker("sample", str(sample), "--rows", "3", "--tables", "1").returncode == 0
    one_line_error(worker("load", str(sample), env=env), 2, names)


def test_a_long_poll_sqs_refuses_is_refused_at_start_up() -> None:
    env = {"POLL_WAIT_S": "30"}
    result = worker("poll", "--processes", "1", "--queue-url", "http://q", env=env)
    one_line_error(result, 2, "POLL_WAIT_S=30", "between 0 and 20")


def test_a_missing_region_is_one_line_and_exit_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_REGION", "AWS_DEFAULT_REGION")}
    result = subprocess.run(
        [sys.executable, "-m", "worker", "load", "s3://bucket/key"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    one_line_error(result, 2, "AWS_REGION")


def test_an_unknown_queue_is_one_line_and_exit_2(moto: str) -> None:
    result = worker("poll", "--processes", "1", "--queue-url", f"{moto}/123456789012/nope")
    one_line_error(result, 2, "does not exist")


def test_lake_apply_on_a_missing_bucket_is_one_line_and_exit_1(moto: str, tmp_path: Path) -> None:
    result = worker("lake", "apply", "--source", "s3://no-such-bucket/t", "--target", str(tmp_path))
    one_line_error(result, 1, "no-such-bucket", "NoSuchBucket")


def test_a_missing_extra_is_named_in_one_line(tmp_path: Path) -> None:
    script = (
        "import sys; sys.modules['deltalake'] = None\n"
        "from worker.entry.cli import main\n"
        "raise SystemExit(main(['lake', 'apply', '--source', 's3://b/t', '--target', 'x']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    one_line_error(result, 2, "'lake' extra")


def test_a_lake_command_ends_without_the_interpreters_finalization() -> None:
    """delta-rs and Arrow threads tearing down at finalization abort the process
    now and then (SIGABRT after a finished command): a lake command skips it. An
    endpoint that does not answer is one line too, not botocore's traceback."""
    script = (
        "import atexit\n"
        "atexit.register(lambda: print('finalized'))\n"
        "from worker.entry.cli import main\n"
        "raise SystemExit(main(['lake', 'apply', '--source', 's3://b/t', '--target', 'x']))\n"
    )
    env = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, env=env,
        timeout=60,
    )  # fmt: skip
    assert "finalized" not in result.stdout
    one_line_error(result, 1, "worker lake: error:")


def test_version_and_help_read_as_plain_text() -> None:
    version = worker("--version")
    assert version.returncode == 0 and version.stdout.startswith("worker ")
    top = worker("--help").stdout
    assert "``" not in top and "Asyncio ingestion worker" in top
    for command in ("load", "poll", "health", "sample", "setup", "lake", "demo"):
        page = worker(command, "--help").stdout
        assert "``" not in page
        assert page.split("\n\n")[1].strip(), f"{command} --help has no description"
    sample = worker("sample", "--help").stdout
    for option in ("--rows", "--tables", "--seed", "--gzip"):
        line = next(x for x in sample.splitlines() if x.strip().startswith(option))
        assert len(line.split()) > 2, f"{option} has no help text"


def test_sample_gzip_reports_the_size_it_wrote(tmp_path: Path) -> None:
    out = tmp_path / "s.pb.gz"
    result = worker("sample", str(out), "--rows", "200", "--tables", "1", "--gzip")
    assert result.returncode == 0
    assert f"{out.stat().st_size} bytes gzipped" in result.stdout


def test_load_on_a_terminal_shows_readable_logs_apart_from_a_final_progress_line(
    moto: str, tmp_path: Path, prefix: str
) -> None:
    sample = tmp_path / "s.pb"
    assert worker("sample", str(sample), "--rows", "300", "--tables", "2").returncode == 0
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "load", str(sample)],
        cwd=ROOT, env={**os.environ, "SCHEMA_PREFIX": prefix},
        stdin=secondary, stdout=secondary, stderr=secondary,
    )  # fmt: skip
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(primary)
    assert process.wait(60) == 0
    text = b"".join(chunks).decode()
    assert '"event"' not in text  # no JSON on a terminal
    visible = [line.split("\r")[-1].replace("\x1b[K", "") for line in text.splitlines()]
    assert any("object_loaded" in line for line in visible)
    assert not any("object_loaded" in line and "written  " in line for line in visible)
    frames = [line for line in visible if line.startswith("written  ")]
    assert frames[-1] == f"written  {prefix}_table_0: 150  {prefix}_table_1: 150"
    assert ": ok (300 rows" in text


def test_a_failed_load_prints_its_status_without_an_empty_table(moto: str, tmp_path: Path) -> None:
    result = worker("load", str(tmp_path / "nope.pb"))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [result.stdout.strip()]  # one line, no table header
    assert "nope.pb: FAILED object_unavailable" in result.stdout


def test_a_port_out_of_range_is_refused_and_a_taken_one_is_one_line(moto: str) -> None:
    import socket

    refused = worker("api", "--port", "80000")
    assert refused.returncode == 2 and "not a port (1-65535)" in refused.stderr
    env = {"RUN_TABLE_NAME": "r", "FILE_TABLE_NAME": "f", "DATASET_TABLE_NAME": "d",
           "LOADER_QUEUE_URL": "http://127.0.0.1/q"}  # fmt: skip
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        one_line_error(worker("api", "--port", port, env=env, timeout=30), 1, port)


def test_a_sample_into_a_missing_directory_is_one_line() -> None:
    one_line_error(worker("sample", "/no/such/dir/f.pb"), 1, "/no/such/dir/f.pb")


def test_setup_firehose_cache_refuses_a_table_that_is_not_a_cache(moto: str, prefix: str) -> None:
    import boto3

    ddb = boto3.client("dynamodb")
    name = f"{prefix}-runs"
    ddb.create_table(
        TableName=name, BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": "runId", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "runId", "KeyType": "HASH"}],
    )  # fmt: skip
    result = worker("setup", "firehose-cache", env={"EVENT_CACHE_TABLE_NAME": name})
    one_line_error(result, 2, name, "not a dedupe cache")
    ttl = ddb.describe_time_to_live(TableName=name)["TimeToLiveDescription"]
    assert ttl["TimeToLiveStatus"] == "DISABLED"  # and never touched


def test_the_readmes_try_out_runs_as_written(tmp_path: Path) -> None:
    """The README's "Try it by hand" block, run line for line by bash."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Try it by hand", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SCHEMA", "SOURCE"))}
    env["HOME"] = str(tmp_path)
    cleanup = "trap 'kill $(jobs -p) 2> /dev/null || true' EXIT\n"  # even when a line fails
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", cleanup + block], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    assert "wrote /tmp/sample.pb: 1000 rows in 2 tables" in out
    assert "/tmp/sample.pb: ok (1,000 rows" in out  # worker load
    docs = [orjson.loads(line) for line in out.splitlines() if line.startswith("{")]
    polled = [d for d in docs if d.get("event") == "poller_stopped"]
    assert [d["rows_written"] for d in polled] == [1000, 1000]  # the queue's file, the run's
    (dataset,) = [d for d in docs if "location" in d]
    assert dataset["datasetName"] == "sample"
    (created,) = [d for d in docs if set(d) == {"runId", "status", "resolvedFiles"}]
    assert created["status"] == "dispatched"
    (listing,) = [d for d in docs if "items" in d]
    (run,) = listing["items"]
    assert (run["runId"], run["status"], run["processedFiles"]) == (created["runId"], "success", 1)


def test_a_dataset_of_urls_is_put_from_the_command_line(ledger_settings: Settings) -> None:
    ledger = ledger_settings.ledger
    env = {"RUN_TABLE_NAME": ledger.run_table, "FILE_TABLE_NAME": ledger.file_table,
           "DATASET_TABLE_NAME": ledger.dataset_table}  # fmt: skip
    urls = ["--file", "https://data.vendor.com/{businessDate}/a.pb",
            "--file", "https://data.vendor.com/{businessDate}/b.pb"]  # fmt: skip
    put = ["datasets", "put", "quotes", *urls, "--secret", "worker/acquire/v"]
    refused = worker(*put, env=env)  # no host is allowed yet
    one_line_error(refused, 1, "'data.vendor.com' is not in ACQUIRE_ALLOWED_HOSTS")
    stored = worker(*put, env={**env, "ACQUIRE_ALLOWED_HOSTS": "*.vendor.com"})
    assert stored.returncode == 0, stored.stderr
    assert orjson.loads(stored.stdout)["files"] == urls[1::2]
    both = worker("datasets", "put", "quotes", "s3://bucket/x/", "--manifest", "https://a.com/m",
                  env=env)  # fmt: skip
    one_line_error(both, 2, "exactly one of location, files, manifest")
