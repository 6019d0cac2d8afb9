"""Lambda events -> the product that handles them, within the invocation's deadline.

Routes by event shape: SQS batches go to the loader, DynamoDB Streams batches
to the streams buffer, Firehose transformation events to the Firehose
transform, API Gateway HTTP API / function URL requests (payload 2.0) to the
ledger's API, EventBridge's scheduled events to the ledger's sweep; anything
else is answered with a clear, structured error (and logged at ERROR), never a
crash.

Every route gets the same deadline: the invocation's remaining time less a
safety margin of ``DEADLINE_MARGIN_MS``, scaled down to a fifth of the time
for short timeouts (a 3 s function keeps 600 ms, not 10 s). Work not finished
by then is answered as failed (``batchItemFailures`` or ``ProcessingFailed``),
so the service retries it, and the function returns before Lambda kills it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from worker.core.errors import UnsupportedEvent
from worker.core.log import get_logger

if TYPE_CHECKING:
    from worker.entry.runtime import Runtime

log = get_logger(__name__)
MARGIN_SHARE = 5  # at most a fifth of the remaining time is kept back


def event_kind(event: Any) -> str:
    if isinstance(event, dict):
        records = event.get("Records")
        if isinstance(records, list) and records and isinstance(records[0], dict):
            return str(records[0].get("eventSource") or "unknown")
        if "deliveryStreamArn" in event and isinstance(event.get("records"), list):
            return "aws:firehose"
        if event.get("detail-type") == "Scheduled Event" and event.get("source") == "aws.events":
            return "aws:schedule"
        if event.get("version") == "2.0" and ("requestContext" in event or "rawPath" in event):
            return "http"  # of any shape: the API answers a malformed one 400
    return "unknown"


def deadline_for(remaining_ms: int, margin_ms: int) -> float:
    """The ``time.monotonic()`` by which a route must have answered."""
    margin = min(margin_ms, remaining_ms // MARGIN_SHARE)
    return time.monotonic() + (remaining_ms - margin) / 1000


async def route(rt: Runtime, event: Any, kind: str, deadline: float) -> dict[str, Any]:
    if kind == "aws:sqs":
        from worker.loader.batch import handle_batch

        report = await handle_batch(await rt.loader(), event["Records"], deadline=deadline)
        return report.response()
    if kind == "aws:dynamodb":
        from worker.cdc.buffer import handle_stream_batch

        s3, settings = await rt.stream_buffer()
        stream_report = await handle_stream_batch(s3, event["Records"], settings, deadline=deadline)
        return stream_report.response()
    if kind == "aws:firehose":
        return await (await rt.transformer()).transform(event, deadline=deadline)
    if kind == "http":
        return await (await rt.api()).handle_event(event, deadline)
    if kind == "aws:schedule":
        from dataclasses import asdict

        return asdict(await (await rt.sweeper()).sweep(deadline))
    error = UnsupportedEvent(
        f"no route for event source {kind!r}",
        keys=sorted(map(str, event))[:10] if isinstance(event, dict) else type(event).__name__,
    )
    log.error("invocation_rejected", **error.as_log())
    return {"error": error.reason, "message": error.message}
