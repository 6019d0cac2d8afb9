"""Logs are JSON lines (console lines on a terminal); metrics are EMF lines through the
same logger."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import orjson

from tests.processes import ROOT


def run_python(code: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [orjson.loads(line) for line in done.stdout.splitlines()]


def test_a_metrics_line_is_valid_embedded_metric_format() -> None:
    (line,) = run_python(
        "from worker.core import log\n"
        "log.configure('INFO', fmt='json')\n"
        "log.emit_metrics({'Service': 'loader'}, RowsWritten=3, FailedMessages=0)\n"
    )
    directive = line["_aws"]["CloudWatchMetrics"][0]
    assert directive["Namespace"] == "worker" and directive["Dimensions"] == [["Service"]]
    assert isinstance(line["_aws"]["Timestamp"], int)
    for metric in directive["Metrics"]:  # every metric's value is a top-level member
        assert isinstance(line[metric["Name"]], int | float)
    assert (line["Service"], line["RowsWritten"], line["event"]) == ("loader", 3, "metrics")


def test_a_json_line_carries_the_bound_context_and_caps_what_it_quotes() -> None:
    (line,) = run_python(
        "from structlog.contextvars import bound_contextvars\n"
        "from worker.core import log\n"
        "log.configure('INFO', fmt='json')\n"
        "with bound_contextvars(message_id='m-1'):\n"
        "    log.get_logger('t').info('seen', table='x' * 5000)\n"
    )
    assert line["message_id"] == "m-1" and line["level"] == "info" and line["timestamp"]
    assert line["table"] == "x" * 1000 + "...(+4000 chars)"


def test_the_console_format_renders_for_people() -> None:
    done = subprocess.run(
        [sys.executable, "-c",
         "from worker.core import log\nlog.configure('INFO', fmt='console')\n"
         "log.get_logger('t').info('seen', rows=3)\n"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "seen" in done.stdout and "rows=3" in done.stdout
    assert not done.stdout.lstrip("\r\x1b[K").startswith("{")
