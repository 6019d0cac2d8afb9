"""The ledger's HTTP API: one route table for API Gateway / function URL events
(payload format 2.0) and for ``worker api`` (aiohttp on 127.0.0.1).

JSON in, JSON out. Errors are ``{"error", "message", "details"}`` with their
status: a body that is not JSON, over 64 KB, or breaks a model is 400 (the
details name the field); an unknown dataset, run or route 404; a wrong method
405; cancelling an ended run 409; a ledger that AWS does not answer 503.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web
from pydantic import TypeAdapter, ValidationError

from worker.core.errors import InvalidRequest, NotFound, WorkerError
from worker.core.log import get_logger
from worker.ledger.models import DATASET_NAMES, DatasetIn, FileStatus, RunIn, RunStatus
from worker.ledger.runs import Ledger

log = get_logger(__name__)
MAX_BODY = 64 * 1024
MAX_PAGE = 100
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

    async def handle(self, request: Request) -> Response:
        try:
            route, params = self._match(request)
            return await route(request, **params)
        except ValidationError as exc:
            details = [
                {"field": ".".join(map(str, e["loc"])) or "body", "message": e["msg"]}
                for e in exc.errors()
            ]
            return _error(400, "validation_error", "the request breaks the contract", details)
        except InvalidRequest as exc:
            details = [{"field": exc.context["field"]}] if "field" in exc.context else []
            return _error(exc.status, exc.reason, exc.message, details)
        except WorkerError as exc:  # the ledger's tables did not answer
            log.error("api_failed", path=request.path, **exc.as_log())
            return _error(503, exc.reason, exc.message, [])

    def _match(self, request: Request) -> tuple[Callable[..., Awaitable[Response]], dict[str, str]]:
        allowed = []
        for method, pattern, route in self._routes:
            found = pattern.fullmatch(request.path.rstrip("/") or "/")
            if found is None:
                continue
            if method == request.method:
                return route, {k: unquote(v) for k, v in found.groupdict().items()}
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

    async def _submit(self, request: Request) -> Response:
        run = RunIn.model_validate(_json(request))
        key = request.headers.get("idempotency-key") or None
        if key is not None and not (len(key) <= 255 and key.isprintable()):
            raise InvalidRequest("Idempotency-Key must be at most 255 printable characters",
                                 field="Idempotency-Key")  # fmt: skip
        submitted = await self._ledger.submit(run, key)
        doc = submitted.run
        body = {k: doc[k] for k in ("runId", "status", "resolvedFiles")}
        return (201 if submitted.created else 200), body

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


def _page(request: Request) -> tuple[int, str | None]:
    raw = request.query.get("limit", "50")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE:
        raise InvalidRequest(f"limit must be 1 to {MAX_PAGE}", field="limit")
    return int(raw), request.query.get("nextToken") or None


def _error(status: int, code: str, message: str, details: list[dict[str, Any]]) -> Response:
    return status, {"error": code, "message": message, "details": details}


# --- the two transports ---------------------------------------------------------------


def request_from_event(event: dict[str, Any]) -> Request:
    """An API Gateway HTTP API / function URL event (payload 2.0) as a ``Request``."""
    http = event["requestContext"]["http"]
    body = event.get("body") or ""
    if event.get("isBase64Encoded"):
        try:
            raw = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raw = b"\xff"  # not JSON: refused as such
    else:
        raw = body.encode()
    return Request(
        method=str(http.get("method", "GET")).upper(),
        path=str(event.get("rawPath") or http.get("path") or "/"),
        query={str(k): str(v) for k, v in (event.get("queryStringParameters") or {}).items()},
        headers={str(k).lower(): str(v) for k, v in (event.get("headers") or {}).items()},
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
        status, doc = await api.handle(request)
        return web.json_response(doc, status=status, dumps=lambda d: orjson.dumps(d).decode())

    app = web.Application(client_max_size=MAX_BODY + 1)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
