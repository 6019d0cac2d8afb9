"""The ledger's HTTP API: one route table for API Gateway / function URL events
(payload format 2.0) and for ``worker api`` (aiohttp on 127.0.0.1).

JSON in, JSON out, whatever comes in. Errors are ``{"error", "message",
"details"}`` with their status: an event of the wrong shape, a body that is not
JSON, over 64 KB, or breaks a model is 400 (the details name the field); an
unknown dataset, run or route 404; a wrong method 405; cancelling an ended run,
or a submit while another run of the date is open, 409; an Idempotency-Key
reused for another request 422; a ledger that AWS does not answer 503. A bug
is logged with its traceback and answered 500 without one.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web
from pydantic import TypeAdapter, ValidationError

from worker.core.errors import InvalidRequest, NotFound, RetryableError, WorkerError
from worker.core.log import get_logger
from worker.ledger.models import DATASET_NAMES, DatasetIn, FileStatus, RunIn, RunStatus
from worker.ledger.runs import Ledger

log = get_logger(__name__)
MAX_BODY = 64 * 1024
MAX_PAGE = 100
LOCAL_REQUEST_S = 25.0  # ``worker api``: a submit dispatches this long, then the sweep goes on
_LIMIT = re.compile(r"[0-9]{1,3}")
_RUN_ID = re.compile(r"[0-9a-f]{1,64}")
Response = tuple[int, dict[str, Any]]
Health = Callable[[], Awaitable[dict[str, str]]]


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)  # names in lower case
    body: bytes = b""


class _MethodNotAllowed(InvalidRequest):
    reason = "method_not_allowed"
    status = 405


_dates: TypeAdapter[date] = TypeAdapter(date)


class Api:
    def __init__(self, ledger: Ledger, health: Health) -> None:
        self._ledger = ledger
        self._health = health
        self._routes: list[tuple[str, re.Pattern[str], Callable[..., Awaitable[Response]]]] = [
            ("PUT", re.compile(r"/datasets/(?P<name>[^/]+)"), self._put_dataset),
            ("GET", re.compile(r"/datasets/(?P<name>[^/]+)"), self._get_dataset),
            ("POST", re.compile(r"/runs"), self._submit),
            ("GET", re.compile(r"/runs"), self._list_runs),
            ("GET", re.compile(r"/runs/(?P<run_id>[^/]+)"), self._get_run),
            ("GET", re.compile(r"/runs/(?P<run_id>[^/]+)/files"), self._list_files),
            ("POST", re.compile(r"/runs/(?P<run_id>[^/]+)/cancel"), self._cancel),
            ("GET", re.compile(r"/health"), self._get_health),
        ]

    async def handle(self, request: Request, deadline: float | None = None) -> Response:
        """Answer ``request``; a submit dispatches until ``deadline`` (``time.monotonic()``)."""
        try:
            route, params = self._match(request)
            if route == self._submit:
                params["deadline"] = deadline
            return await route(request, **params)
        except ValidationError as exc:
            details = [
                {"field": ".".join(map(str, e["loc"])) or "body", "message": e["msg"]}
                for e in exc.errors()
            ]
            return _error(400, "validation_error", "the request breaks the contract", details)
        except InvalidRequest as exc:
            context = {k: v for k, v in exc.context.items() if isinstance(v, str)}
            return _error(exc.status, exc.reason, exc.message, [context] if context else [])
        except RetryableError as exc:  # AWS did not answer: a retry may pass
            log.error("api_failed", path=request.path, **exc.as_log())
            return _error(503, exc.reason, exc.message, [])
        except WorkerError as exc:
            log.error("api_failed", path=request.path, **exc.as_log())
            return _error(400, exc.reason, exc.message, [])
        except Exception:  # a bug: its traceback goes to the log, not to the caller
            log.exception("api_bug", path=request.path, method=request.method)
            return _error(500, "internal_error", "the ledger failed; see its log", [])

    async def handle_event(self, event: Any, deadline: float | None) -> dict[str, Any]:
        """An API Gateway / function URL event (payload 2.0), answered as one."""
        try:
            request = request_from_event(event)
        except InvalidRequest as exc:
            return event_response(*_error(400, exc.reason, exc.message, [exc.context]))
        return event_response(*await self.handle(request, deadline))

    def _match(self, request: Request) -> tuple[Callable[..., Awaitable[Response]], dict[str, Any]]:
        allowed = []
        for method, pattern, route in self._routes:
            found = pattern.fullmatch(request.path.rstrip("/") or "/")
            if found is None:
                continue
            if method == request.method:
                params: dict[str, Any] = {k: unquote(v) for k, v in found.groupdict().items()}
                if "run_id" in params and not _RUN_ID.fullmatch(params["run_id"]):
                    raise NotFound(f"no run {params['run_id'][:80]!r}")
                return route, params
            allowed.append(method)
        if allowed:
            raise _MethodNotAllowed(
                f"{request.method} is not allowed here; use {', '.join(allowed)}"
            )
        raise NotFound(f"no route {request.path}")

    async def _put_dataset(self, request: Request, name: str) -> Response:
        dataset = DatasetIn.model_validate(_json(request))
        return 200, await self._ledger.put_dataset(name, dataset)

    async def _get_dataset(self, _request: Request, name: str) -> Response:
        dataset = await self._ledger.dataset(name)
        return 200, {"datasetName": name, **dataset.model_dump(exclude_none=True)}

    async def _submit(self, request: Request, deadline: float | None) -> Response:
        run = RunIn.model_validate(_json(request))
        key = request.headers.get("idempotency-key") or None
        if key is not None and not (len(key) <= 255 and key.isprintable()):
            raise InvalidRequest("Idempotency-Key must be at most 255 printable characters",
                                 field="Idempotency-Key")  # fmt: skip
        submitted = await self._ledger.submit(run, key, deadline=deadline)
        return (201 if submitted.created else 200), submit_view(submitted.run)

    async def _get_run(self, _request: Request, run_id: str) -> Response:
        return 200, await self._ledger.run(run_id)

    async def _list_runs(self, request: Request) -> Response:
        limit, token = _page(request)
        query = request.query
        if "status" in query:
            page = await self._ledger.runs_in(
                TypeAdapter(RunStatus).validate_python(query["status"]), limit=limit, token=token
            )
        elif "datasetName" in query and "businessDate" in query:
            page = await self._ledger.runs_of(
                DATASET_NAMES.validate_python(query["datasetName"]),
                _dates.validate_python(query["businessDate"]).isoformat(),
                limit=limit,
                token=token,
            )
        else:
            raise InvalidRequest("give datasetName and businessDate, or status", field="query")
        return 200, page.model_dump()

    async def _list_files(self, request: Request, run_id: str) -> Response:
        limit, token = _page(request)
        raw = request.query.get("status")
        status = None if raw is None else TypeAdapter(FileStatus).validate_python(raw)
        page = await self._ledger.files_of(run_id, status, limit=limit, token=token)
        return 200, page.model_dump()

    async def _cancel(self, _request: Request, run_id: str) -> Response:
        return 200, await self._ledger.cancel(run_id)

    async def _get_health(self, _request: Request) -> Response:
        states = await self._health()
        healthy = all(state == "ACTIVE" for state in states.values())
        return (200 if healthy else 503), {"healthy": healthy, "tables": states}


def _json(request: Request) -> Any:
    if len(request.body) > MAX_BODY:
        raise InvalidRequest(f"body is over {MAX_BODY} bytes", field="body")
    try:
        return orjson.loads(request.body or b"null")
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"body is not JSON: {exc}", field="body") from None


def submit_view(run: dict[str, Any]) -> dict[str, Any]:
    """What a submit answers: the run's id, status and files so far, and its error."""
    keys = ("runId", "status", "resolvedFiles", "error")
    return {k: run[k] for k in keys if k in run}


def _page(request: Request) -> tuple[int, str | None]:
    raw = request.query.get("limit", "50")
    if not _LIMIT.fullmatch(raw) or not 1 <= int(raw) <= MAX_PAGE:
        raise InvalidRequest(f"limit must be 1 to {MAX_PAGE}", field="limit")
    return int(raw), request.query.get("nextToken") or None


def _error(status: int, code: str, message: str, details: list[dict[str, Any]]) -> Response:
    return status, {"error": code, "message": message, "details": details}


# --- the two transports ---------------------------------------------------------------


def _text(value: str) -> str:
    """A string that encodes as UTF-8 (a lone surrogate becomes "?")."""
    return value.encode("utf-8", "replace").decode("utf-8")


def _field(container: Any, name: str, kind: type, default: Any) -> Any:
    value = container.get(name) if isinstance(container, dict) else None
    if value is None:
        return default
    if not isinstance(value, kind):
        raise InvalidRequest(f"the event's {name} is not a {kind.__name__}", field=name)
    return value


def _strings(container: Any, name: str) -> dict[str, str]:
    """A map of the event's (query parameters, headers) as strings."""
    raw = _field(container, name, dict, {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise InvalidRequest(f"the event's {name} is not a map of strings", field=name)
    return {_text(k): _text(v) for k, v in raw.items()}


def request_from_event(event: Any) -> Request:
    """An API Gateway HTTP API / function URL event (payload 2.0) as a ``Request``;
    ``InvalidRequest`` naming the field when the event is not of that shape."""
    http = _field(_field(event, "requestContext", dict, {}), "http", dict, {})
    body = _field(event, "body", str, "")
    if _field(event, "isBase64Encoded", bool, False):
        try:
            raw = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raw = b"\xff"  # not JSON: refused as such
    else:
        raw = body.encode("utf-8", "surrogatepass")  # a lone surrogate: not UTF-8, refused
    path = _field(event, "rawPath", str, "") or _field(http, "path", str, "") or "/"
    headers = {k.lower(): v for k, v in _strings(event, "headers").items()}
    return Request(
        method=_text(_field(http, "method", str, "GET")).upper(),
        path=_text(path),
        query=_strings(event, "queryStringParameters"),
        headers=headers,
        body=raw,
    )


def event_response(status: int, doc: dict[str, Any]) -> dict[str, Any]:
    return {
        "statusCode": status,
        "headers": {"content-type": "application/json"},
        "body": orjson.dumps(doc).decode(),
    }


async def serve(api: Api, port: int, host: str = "127.0.0.1") -> web.AppRunner:
    """``worker api``: the same routes over HTTP; the caller cleans the runner up."""

    async def handle(http: web.Request) -> web.Response:
        body = await http.content.read(MAX_BODY + 1)
        request = Request(
            method=http.method,
            path=http.path,
            query=dict(http.query),
            headers={k.lower(): v for k, v in http.headers.items()},
            body=body,
        )
        deadline = time.monotonic() + LOCAL_REQUEST_S
        status, doc = await api.handle(request, deadline)
        return web.json_response(doc, status=status, dumps=lambda d: orjson.dumps(d).decode())

    app = web.Application(client_max_size=MAX_BODY + 1)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
