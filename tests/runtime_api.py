"""A small, real implementation of the Lambda Runtime API, for the RIC contract test.

It serves ``GET /2018-06-01/runtime/invocation/next`` (one queued event at a
time, with the headers Lambda sends) and records what the runtime posts to
``.../invocation/{id}/response``, ``.../invocation/{id}/error`` and
``/2018-06-01/runtime/init/error``.
"""

from __future__ import annotations

import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

PREFIX = "/2018-06-01/runtime"
TRACE_ID = "Root=1-5e1b4151-5ac6c58f5b5daa6532e4f3f5"


class RuntimeApi:
    def __init__(self) -> None:
        self.events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.results: dict[str, tuple[str, Any]] = {}
        self.init_errors: list[Any] = []
        self._posted = threading.Condition()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def do_GET(self) -> None:
                if self.path != f"{PREFIX}/invocation/next":
                    self.send_error(404)
                    return
                request_id, event = api.events.get()
                body = orjson.dumps(event)
                self.send_response(200)
                self.send_header("Lambda-Runtime-Aws-Request-Id", request_id)
                self.send_header(
                    "Lambda-Runtime-Deadline-Ms", str(int(time.time() * 1000) + 60_000)
                )
                self.send_header(
                    "Lambda-Runtime-Invoked-Function-Arn",
                    "arn:aws:lambda:us-east-1:123456789012:function:worker",
                )
                self.send_header(
                    "Lambda-Runtime-Trace-Id", "Root=1-5e1b4151-5ac6c58f5b5daa6532e4f3f5"
                )
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                payload = orjson.loads(self.rfile.read(length) or b"null")
                parts = self.path.removeprefix(PREFIX).strip("/").split("/")
                with api._posted:
                    if parts == ["init", "error"]:
                        api.init_errors.append(payload)
                    elif len(parts) == 3 and parts[0] == "invocation":
                        api.results[parts[1]] = (parts[2], payload)
                    api._posted.notify_all()
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host!s}:{port}"

    def __enter__(self) -> RuntimeApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def invoke(
        self, request_id: str, event: dict[str, Any], timeout: float = 60
    ) -> tuple[str, Any]:
        """Queue an event and wait for what the runtime posts back: (kind, payload)."""
        self.events.put((request_id, event))
        deadline = time.monotonic() + timeout
        with self._posted:
            while request_id not in self.results:
                left = deadline - time.monotonic()
                if left <= 0 or self.init_errors:
                    raise AssertionError(
                        f"no result for {request_id}; init errors {self.init_errors}"
                    )
                self._posted.wait(left)
            return self.results[request_id]
