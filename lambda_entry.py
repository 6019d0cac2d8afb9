"""Container-image Lambda entry point: ``lambda_entry.handler``.

Routes by event shape: SQS batches go to the loader, DynamoDB Streams batches
to ``worker.streams``, Firehose transformation events to ``worker.firehose``;
anything else is answered
with a clear, structured error (and logged at ERROR), never a crash.
"""

from __future__ import annotations

import time
from typing import Any

from structlog.contextvars import bound_contextvars

from worker.errors import UnsupportedEvent
from worker.firehose import is_firehose_event
from worker.log import get_logger
from worker.runtime import Runtime
from worker.sqs_batch import handle_batch
from worker.streams.buffer import handle_stream_batch

log = get_logger("lambda_entry")
_runtime: Runtime | None = None


def runtime() -> Runtime:
    """The container's runtime, built on the first invocation and kept warm."""
    global _runtime
    if _runtime is None:
        _runtime = Runtime()
    return _runtime


def event_kind(event: Any) -> str:
    if isinstance(event, dict):
        records = event.get("Records")
        if isinstance(records, list) and records and isinstance(records[0], dict):
            return str(records[0].get("eventSource") or "unknown")
        if is_firehose_event(event):
            return "aws:firehose"
    return "unknown"


def handler(event: Any, context: Any) -> dict[str, Any]:
    rt = runtime()
    request_id = getattr(context, "aws_request_id", "local")
    with bound_contextvars(aws_request_id=request_id):
        kind = event_kind(event)
        log.info("invocation_start", event_source=kind)
        if kind == "aws:sqs":
            remaining_ms = context.get_remaining_time_in_millis()
            deadline = time.monotonic() + (remaining_ms - rt.settings.deadline_margin_ms) / 1000
            return rt.run(_sqs(rt, event["Records"], deadline))
        if kind == "aws:dynamodb":
            return rt.run(_streams(rt, event["Records"]))
        if kind == "aws:firehose":
            return rt.run(_firehose(rt, event))
        error = UnsupportedEvent(
            f"no route for event source {kind!r}",
            keys=sorted(event)[:10] if isinstance(event, dict) else type(event).__name__,
        )
        log.error("invocation_rejected", **error.as_log())
        return {"error": error.reason, "message": error.message}


async def _sqs(rt: Runtime, records: list[dict[str, Any]], deadline: float) -> dict[str, Any]:
    report = await handle_batch(await rt.loader(), records, deadline=deadline)
    return report.response()


async def _firehose(rt: Runtime, event: dict[str, Any]) -> dict[str, Any]:
    return await (await rt.transformer()).transform(event)


async def _streams(rt: Runtime, records: list[dict[str, Any]]) -> dict[str, Any]:
    clients = await rt.clients()
    report = await handle_stream_batch(clients.s3, records, rt.settings.streams)
    return report.response()
