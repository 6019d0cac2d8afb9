"""A data vendor's HTTP server on loopback, in a thread of its own: files to
serve, and scripted misbehaviour (statuses, redirects, trickles, lying headers)
taken one per request before the file itself is served."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import threading
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiohttp import web

Behaviour = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Vendor:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.streams: dict[str, tuple[int | None, Callable[[], Iterator[bytes]]]] = {}
        self.headers: dict[str, dict[str, str]] = defaultdict(dict)
        self.script: dict[str, list[Behaviour]] = defaultdict(list)
        self.hits: Counter[str] = Counter()
        self.auth: list[str | None] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.port = 0

    def __enter__(self) -> Vendor:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *_: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/{path.lstrip('/')}"

    def serve(self, path: str, body: bytes, **headers: str) -> str:
        self.files[path.lstrip("/")] = body
        self.headers[path.lstrip("/")].update(headers)
        return self.url(path)

    def then(self, path: str, *behaviours: Behaviour) -> None:
        self.script[path.lstrip("/")].extend(behaviours)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/{path:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = runner.addresses[0][1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        self.hits[path] += 1
        self.auth.append(request.headers.get("Authorization"))
        if self.script[path]:
            return await self.script[path].pop(0)(request)
        if path in self.streams:
            size, chunks = self.streams[path]
            length = {} if size is None else {"Content-Length": str(size)}  # None: chunked
            response = web.StreamResponse(headers=length)
            await response.prepare(request)
            for chunk in chunks():
                await response.write(chunk)
            return response
        if path not in self.files:
            return web.Response(status=404)
        return web.Response(body=self.files[path], headers=self.headers[path])


def status(code: int, **headers: str) -> Behaviour:
    async def answer(_request: web.Request) -> web.StreamResponse:
        return web.Response(status=code, headers=headers)

    return answer


def redirect(to: str, code: int = 302) -> Behaviour:
    return status(code, Location=to)


def trickle(body: bytes, every_s: float) -> Behaviour:
    """A byte at a time, ``every_s`` apart (the headers at once)."""

    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(len(body))})
        await response.prepare(request)
        for index in range(len(body)):
            await response.write(body[index : index + 1])
            await asyncio.sleep(every_s)
        return response

    return answer


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def sha256_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def entry(url: str, data: bytes, **fields: Any) -> dict[str, Any]:
    """A manifest entry that tells the truth about ``data``, unless ``fields`` lie."""
    return {"url": url, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), **fields}
