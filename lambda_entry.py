"""Container-image Lambda entry point: ``lambda_entry.handler``.

The handler keeps one ``Runtime`` (event loop, clients, products) for the
container's life and hands each event to ``worker.entry.routing``. The runtime
is closed at interpreter exit, so the process never ends with unclosed
connections and everything it writes stays a JSON line. (A SIGTERM or SIGKILL
from Lambda ends the process at once, as the default action; the runtime
client is blocked in native code between invocations, where no Python signal
handler could run.)
"""

from __future__ import annotations

import atexit
from typing import Any

from structlog.contextvars import bound_contextvars

from worker.core.errors import ConfigError
from worker.core.log import get_logger
from worker.entry.routing import deadline_for, event_kind, route
from worker.entry.runtime import Runtime

log = get_logger("lambda_entry")
_runtime: Runtime | None = None


def runtime() -> Runtime:
    """The container's runtime, built on the first invocation and kept warm."""
    global _runtime
    if _runtime is None:
        _runtime = Runtime()
    return _runtime


def handler(event: Any, context: Any) -> dict[str, Any]:
    rt = runtime()
    request_id = getattr(context, "aws_request_id", "local")
    with bound_contextvars(aws_request_id=request_id):
        kind = event_kind(event)
        log.info("invocation_start", event_source=kind)
        deadline = deadline_for(
            context.get_remaining_time_in_millis(), rt.settings.deadline_margin_ms
        )
        try:
            return rt.run(route(rt, event, kind, deadline))
        except ConfigError as exc:  # the function is misconfigured: fail the whole event
            log.error("invocation_failed", **exc.as_log())
            raise


def close() -> None:
    """Close the runtime (clients, loop); safe to call more than once."""
    global _runtime
    rt, _runtime = _runtime, None
    if rt is not None:
        rt.close()


atexit.register(close)
