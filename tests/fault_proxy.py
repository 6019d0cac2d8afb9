"""A fault-injecting HTTP proxy in front of a DynamoDB endpoint (moto or dynalite).

It behaves as DynamoDB does under load, which moto does not:
- rejects BatchWriteItem requests DynamoDB would reject (over 25 items,
  duplicate keys, items over 400 KB, non-finite or out-of-range numbers);
- returns a configurable fraction of items as UnprocessedItems (only the rest
  reach the upstream);
- throttles a configurable fraction of whole requests;
- or, with ``capacity`` set, writes at most that many items a second (a token
  bucket holding one second's worth): what does not fit comes back as
  UnprocessedItems, and a request none of whose items fit is throttled, so
  refusals follow the rate sent, as DynamoDB's do;
- optionally delays every request.
It runs its own event loop in a thread, so sync and async tests can share it.
``ForwardingProxy`` is the shared part, also used for S3 faults.
"""

from __future__ import annotations

import asyncio
import random
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Self

import aiohttp
import orjson
from aiohttp import web

from tests.dynamo_rules import batch_problem

_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "content-encoding"}


@dataclass
class ProxyStats:
    batch_requests: int = 0
    items_received: int = 0
    items_forwarded: int = 0
    items_unprocessed: int = 0
    throttled: int = 0
    rejected: list[str] = field(default_factory=list)
    max_batch: int = 0
    bad_signatures: list[str] = field(default_factory=list)


class ForwardingProxy:
    """An aiohttp server on its own loop and thread that forwards to ``upstream``.

    Subclasses decide, in ``_handle``, what to answer themselves and what to forward.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.url = ""

    def __enter__(self) -> Self:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            self._session = session
            self._ready.set()
            await self._stop.wait()
        await runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        status, headers, payload = await self._forward(request, body)
        return web.Response(status=status, headers=headers, body=payload)

    async def _forward(
        self, request: web.Request, body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, data=body, headers=headers
        ) as response:
            kept = {k: v for k, v in response.headers.items() if k.lower() not in _HOP_HEADERS}
            return response.status, kept, await response.read()


class OneAtATime(ForwardingProxy):
    """Forwards one request at a time. moto's DynamoDB is not thread-safe: two
    concurrent updates of one item (an ADD to a run's counter from two loaders)
    can lose one, where DynamoDB serialises them. In front of moto, this gives
    the per-item atomicity the code relies on, while the callers still race."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self._one: asyncio.Lock | None = None  # made on the proxy's own loop

    async def _handle(self, request: web.Request) -> web.Response:
        if self._one is None:
            self._one = asyncio.Lock()
        async with self._one:
            return await super()._handle(request)


class FaultProxy(ForwardingProxy):
    """Behaves as DynamoDB does under load, in front of moto or dynalite."""

    def __init__(self, upstream: str, *, seed: int = 7) -> None:
        super().__init__(upstream)
        self.unprocessed_fraction = 0.0
        self.throttle_fraction = 0.0
        self.throttle_targets = {"BatchWriteItem"}  # operations the throttle applies to
        self.latency_s = 0.0
        self.capacity = 0.0  # items a second; 0: unlimited
        self._tokens, self._filled = 0.0, 0.0
        self.stats = ProxyStats()
        self.key_names: dict[str, list[str]] = {}
        self._random = random.Random(seed)

    async def _handle(self, request: web.Request) -> web.Response:
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        target = request.headers.get("X-Amz-Target", "")
        body = await request.read()
        problem = signature_problem(request, body)
        if problem:
            self.stats.bad_signatures.append(problem)
            return _error(400, "com.amazon.coral.service#InvalidSignatureException", problem)
        if target.endswith(".BatchWriteItem"):
            return await self._batch_write(request, orjson.loads(body))
        operation = target.rpartition(".")[2]
        if operation in self.throttle_targets and self._random.random() < self.throttle_fraction:
            self.stats.throttled += 1
            return _throttled()
        status, headers, payload = await self._forward(request, body)
        if target.endswith((".DescribeTable", ".CreateTable")) and status == 200:
            self._learn_keys(orjson.loads(payload))
        return web.Response(status=status, headers=headers, body=payload)

    def _learn_keys(self, payload: dict[str, Any]) -> None:
        table = payload.get("Table") or payload.get("TableDescription") or {}
        if table.get("KeySchema"):
            ordered = sorted(table["KeySchema"], key=lambda k: k["KeyType"] != "HASH")
            self.key_names[table["TableName"]] = [k["AttributeName"] for k in ordered]

    async def _batch_write(self, request: web.Request, doc: dict[str, Any]) -> web.Response:
        stats = self.stats
        stats.batch_requests += 1
        items = doc.get("RequestItems", {})
        count = sum(len(r) for r in items.values())
        stats.items_received += count
        stats.max_batch = max(stats.max_batch, count)
        problem = batch_problem(items, self.key_names)
        if problem:
            stats.rejected.append(problem)
            return _error(400, "com.amazon.coral.validate#ValidationException", problem)
        if self._random.random() < self.throttle_fraction:
            stats.throttled += 1
            return _throttled()
        fits = self._fits(count)
        if fits == 0:
            stats.throttled += 1
            return _throttled()
        kept: dict[str, list[Any]] = {}
        unprocessed: dict[str, list[Any]] = {}
        for table, requests in items.items():
            for put in requests:
                refused = fits == 0 or self._random.random() < self.unprocessed_fraction
                fits -= not refused
                (unprocessed if refused else kept).setdefault(table, []).append(put)
        if kept:
            forwarded = sum(len(r) for r in kept.values())
            body = orjson.dumps({**doc, "RequestItems": kept})
            status, headers, payload = await self._forward(request, body)
            if status != 200:
                return web.Response(status=status, headers=headers, body=payload)
            stats.items_forwarded += forwarded
        stats.items_unprocessed += count - sum(len(r) for r in kept.values())
        return web.Response(
            body=orjson.dumps({"UnprocessedItems": unprocessed}),
            content_type="application/x-amz-json-1.0",
        )

    def _fits(self, count: int) -> int:
        """How many of ``count`` items the table's capacity takes now."""
        if not self.capacity:
            return count
        now = asyncio.get_running_loop().time()
        if not self._filled:
            self._tokens, self._filled = self.capacity, now
        self._tokens = min(self.capacity, self._tokens + (now - self._filled) * self.capacity)
        self._filled = now
        fits = min(count, int(self._tokens))
        self._tokens -= fits
        return fits


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"__type": kind, "message": message}),
        content_type="application/x-amz-json-1.0",
    )


def _throttled() -> web.Response:
    return _error(
        400,
        "com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException",
        "The level of configured provisioned throughput for the table was exceeded.",
    )


class S3Faults(ForwardingProxy):
    """In front of moto's S3: refuses the first PUT of keys matching ``fail_key``."""

    def __init__(self, upstream: str, fail_key: str) -> None:
        super().__init__(upstream)
        self.fail_key = fail_key
        self.failed: list[str] = []

    async def _handle(self, request: web.Request) -> web.Response:
        if request.method == "PUT" and self.fail_key in request.path and not self.failed:
            self.failed.append(request.path)
            await request.read()
            body = b"<Error><Code>AccessDenied</Code><Message>fault injected</Message></Error>"
            return web.Response(status=403, body=body, content_type="application/xml")
        return await super()._handle(request)


def signature_problem(request: web.Request, body: bytes) -> str | None:
    """Check the request's SigV4 signature as AWS would (with the tests' credentials)."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    authorization = request.headers.get("Authorization", "")
    match = re.match(
        r"AWS4-HMAC-SHA256 Credential=[^/]+/\d{8}/([^/]+)/([^/]+)/aws4_request, "
        r"SignedHeaders=([^,]+), Signature=([0-9a-f]{64})$",
        authorization,
    )
    if not match:
        return f"malformed Authorization header {authorization!r}"
    region, service, signed, signature = match.groups()
    names = signed.split(";")
    headers = {name: request.headers.get(name, "") for name in names}
    url = f"http://{request.headers['Host']}{request.path_qs}"
    rebuilt = AWSRequest(method=request.method, url=url, data=body, headers=headers)
    rebuilt.context["timestamp"] = request.headers["X-Amz-Date"]
    auth = SigV4Auth(Credentials("testing", "testing"), service, region)
    expected = auth.signature(
        auth.string_to_sign(rebuilt, auth.canonical_request(rebuilt)), rebuilt
    )
    return None if expected == signature else "signature does not match"


@dataclass
class Fault:
    """Answer ``times`` requests of ``operation`` whose body holds ``marker`` with
    ``status`` and the DynamoDB error ``kind`` (and ``extra`` fields)."""

    operation: str
    marker: bytes
    status: int
    kind: str
    times: int
    extra: dict[str, Any] = field(default_factory=dict)
    hits: int = 0


class DynamoFaults(OneAtATime):
    """In front of moto's DynamoDB, one request at a time (as ``OneAtATime``):
    answers the requests that a ``Fault`` matches with its error, forwards the rest."""

    def __init__(self, upstream: str, *faults: Fault) -> None:
        super().__init__(upstream)
        self.faults = list(faults)

    async def _handle(self, request: web.Request) -> web.Response:
        operation = request.headers.get("X-Amz-Target", "").rpartition(".")[2]
        body = await request.read()
        for fault in self.faults:
            if fault.operation == operation and fault.marker in body and fault.hits < fault.times:
                fault.hits += 1
                doc = {"__type": f"com.amazonaws.dynamodb.v20120810#{fault.kind}",
                       "message": "fault injected", **fault.extra}  # fmt: skip
                return web.Response(status=fault.status, body=orjson.dumps(doc),
                                    content_type="application/x-amz-json-1.0")  # fmt: skip
        return await super()._handle(request)
