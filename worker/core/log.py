"""Structured logs (structlog), context variables and CloudWatch metrics.

Every line is one JSON object (orjson) with ``timestamp``, ``level`` and
``event``, plus whatever context is bound with
``structlog.contextvars.bound_contextvars`` (``aws_request_id``, ``message_id``,
``bucket``, ``key``, ``table``). On a terminal (``LOG_FORMAT=auto``, the
default) the same events are rendered for a person instead.

Values quoted from the input (a table name, a key, a body preview) are capped
at ``MAX_FIELD_CHARS`` characters, and containers at ``MAX_FIELD_ITEMS`` items,
so no input can blow a log line up.

Metrics are CloudWatch Embedded Metric Format lines written through the same
logger (``emit_metrics``): Lambda and the CloudWatch agent on ECS turn them
into metrics, with no PutMetricData call and no latency.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any, TextIO

import orjson
import structlog

NAMESPACE = "worker"
MAX_FIELD_CHARS = 1_000
MAX_FIELD_ITEMS = 50
_OWN_FIELDS = frozenset({"exc_info", "_aws"})  # made by the worker, never from the input
_CLEAR_LINE = "\r\x1b[K"  # a log line on a terminal first wipes any progress line

_configured: tuple[str, TextIO, bool] | None = None


def configure(level: str = "INFO", *, stream: TextIO | None = None, fmt: str = "auto") -> None:
    """Set up structlog for this process: JSON lines on ``stream`` (stdout by
    default), or human-readable lines when ``fmt`` is ``console``, or ``auto``
    and the stream is a terminal."""
    global _configured
    out = stream or sys.stdout
    human = fmt == "console" or (fmt == "auto" and out.isatty())
    if _configured == (level, out, human):
        return
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        cap_input,
    ]
    factory: Any
    processors: list[structlog.typing.Processor]
    if human:
        processors = [*shared, structlog.dev.ConsoleRenderer(colors=out.isatty())]
        factory = _TerminalLoggerFactory(out)
    else:
        processors = [
            *shared,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ]
        factory = structlog.BytesLoggerFactory(out.buffer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level]),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    _configured = (level, out, human)


def cap_input(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Bound every value of a log line, however much of the input it quotes."""
    for name, value in event.items():
        if name not in _OWN_FIELDS:
            event[name] = _capped(value, depth=0)
    return event


def _capped(value: Any, *, depth: int) -> Any:
    if isinstance(value, str):
        if len(value) <= MAX_FIELD_CHARS:
            return value
        return f"{value[:MAX_FIELD_CHARS]}...(+{len(value) - MAX_FIELD_CHARS} chars)"
    if isinstance(value, dict):
        if depth > 3:
            return "{...}"
        items = list(value.items())[:MAX_FIELD_ITEMS]
        return {_capped(str(k), depth=depth + 1): _capped(v, depth=depth + 1) for k, v in items}
    if isinstance(value, list | tuple | set | frozenset):
        if depth > 3:
            return "[...]"
        return [_capped(v, depth=depth + 1) for v in list(value)[:MAX_FIELD_ITEMS]]
    return value


class _TerminalLogger:
    """Writes each rendered line after wiping the current terminal line."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def msg(self, message: str) -> None:
        self._out.write(f"{_CLEAR_LINE}{message}\n")
        self._out.flush()

    debug = info = warning = error = critical = exception = msg


class _TerminalLoggerFactory:
    def __init__(self, out: TextIO) -> None:
        self._out = out

    def __call__(self, *_args: Any) -> _TerminalLogger:
        return _TerminalLogger(self._out)


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name)
    return logger


_metrics_log = get_logger("metrics")


def emit_metrics(dimensions: dict[str, str], **values: float) -> None:
    """Log one CloudWatch Embedded Metric Format line: ``values`` under ``dimensions``.

    Dimensions must stay low-cardinality (a service or function name, a
    bounded table name), since every distinct combination is a metric.
    """
    _metrics_log.info(
        "metrics",
        _aws={
            "Timestamp": int(time.time() * 1000),
            "CloudWatchMetrics": [
                {
                    "Namespace": NAMESPACE,
                    "Dimensions": [list(dimensions)],
                    "Metrics": [{"Name": name} for name in values],
                }
            ],
        },
        **dimensions,
        **values,
    )


def elapsed_ms(start: float) -> int:
    """Milliseconds since ``start`` (a ``time.perf_counter()`` value)."""
    return round((time.perf_counter() - start) * 1000)


__all__ = ["configure", "elapsed_ms", "emit_metrics", "get_logger"]
