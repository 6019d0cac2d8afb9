"""The image's default command, ``python -m awslambdaric lambda_entry.handler``, run for
real against a local Lambda Runtime API, with moto behind it (issue: one image)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import orjson

from tests import factories as f
from tests.conftest import BUCKET, scan
from tests.processes import ROOT
from tests.runtime_api import RuntimeApi


def test_the_runtime_interface_client_serves_sqs_events_through_the_handler(
    moto: str, s3: Any, prefix: str, tmp_path: Path
) -> None:
    s3.put_object(Bucket=BUCKET, Key="a.pb", Body=f.output_file(("t", ["id"], [["x"], ["y"]])))
    good = f.sqs_record(f.plain_body(BUCKET, "a.pb"))
    bad = f.sqs_record(f.plain_body(BUCKET, "missing.pb"))
    with RuntimeApi() as api:
        env = {
            **os.environ,
            "AWS_LAMBDA_RUNTIME_API": api.address,
            "SCHEMA_PREFIX": prefix,
            "PYTHONPATH": str(ROOT),
        }
        runtime = subprocess.Popen(
            [sys.executable, "-m", "awslambdaric", "lambda_entry.handler"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            kind, payload = api.invoke("req-1", f.sqs_event(good, bad))
            assert kind == "response"
            assert payload == {"batchItemFailures": [{"itemIdentifier": bad["messageId"]}]}
            # a second, warm invocation on the same process and clients
            kind, payload = api.invoke("req-2", f.sqs_event(good))
            assert (kind, payload) == ("response", {"batchItemFailures": []})
            kind, payload = api.invoke("req-3", {"unexpected": True})
            assert kind == "response" and payload["error"] == "unsupported_event"
        finally:
            runtime.kill()
            runtime.wait(10)
    assert api.init_errors == []
    assert {i["id"]["S"] for i in scan(boto3.client("dynamodb"), f"{prefix}_t")} == {"x", "y"}


WARM_PROCESS = """
import lambda_entry
from tests import factories as f

for request in ("req-1", "req-2"):  # two invocations on one warm runtime
    event = f.sqs_event(f.sqs_record(f.plain_body("input", "a.pb")))
    response = lambda_entry.handler(event, f.LambdaContext(aws_request_id=request))
    assert response == {"batchItemFailures": []}, response
"""  # then the interpreter exits, as it does when Lambda ends the environment


def test_a_warm_lambda_process_writes_only_json_lines_through_its_exit(
    moto: str, s3: Any, prefix: str
) -> None:
    s3.put_object(Bucket=BUCKET, Key="a.pb", Body=f.output_file(("t", ["id"], [["x"]])))
    done = subprocess.run(
        [sys.executable, "-c", WARM_PROCESS],
        cwd=ROOT, env={**os.environ, "SCHEMA_PREFIX": prefix, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert sum('"invocation_start"' in line for line in lines) == 2
    for line in lines:  # "Unclosed client session" would be a plain-text line
        assert isinstance(orjson.loads(line), dict), line
