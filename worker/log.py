"""Structured JSON logs (structlog + orjson), context variables and metrics.

Every line is one JSON object with ``timestamp``, ``level`` and ``event``, plus
whatever context is bound with ``structlog.contextvars.bound_contextvars``
(``aws_request_id``, ``message_id``, ``bucket``, ``key``, ``table``).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, TextIO

import orjson
import structlog

_configured: tuple[str, IO[bytes]] | None = None


def configure(level: str = "INFO", *, stream: TextIO | None = None) -> None:
    """Set up structlog for this process: JSON lines on ``stream`` (stdout by default)."""
    global _configured
    out = (stream or sys.stdout).buffer
    if _configured == (level, out):
        return
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level]),
        logger_factory=structlog.BytesLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    _configured = (level, out)


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name)
    return logger


def emit_metrics(namespace: str, dimensions: dict[str, str], **values: float) -> None:
    """Write CloudWatch metrics as one Embedded Metric Format line on stdout.

    Lambda and the CloudWatch agent on ECS turn these lines into metrics, so
    the worker needs no PutMetricData calls (and no extra latency) to publish.
    """
    line = {
        "_aws": {
            "Timestamp": int(time.time() * 1000),
            "CloudWatchMetrics": [
                {
                    "Namespace": namespace,
                    "Dimensions": [list(dimensions)],
                    "Metrics": [{"Name": name} for name in values],
                }
            ],
        },
        **dimensions,
        **values,
    }
    sys.stdout.buffer.write(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))
    sys.stdout.buffer.flush()


def elapsed_ms(start: float) -> int:
    """Milliseconds since ``start`` (a ``time.perf_counter()`` value)."""
    return round((time.perf_counter() - start) * 1000)


__all__ = ["configure", "elapsed_ms", "emit_metrics", "get_logger"]
