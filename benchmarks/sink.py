"""A fast DynamoDB sink: speaks the JSON protocol for CreateTable, DescribeTable and
BatchWriteItem, validates as DynamoDB does, counts, and forgets.

    python -m benchmarks.sink --port 8000 [--unprocessed 0.2]

It checks every BatchWriteItem as DynamoDB would (1 to 25 requests, unique
keys, items at most 400 KB, finite in-range numbers), counts the distinct keys
it accepted per table (so lost rows show), and can return a fraction of items
as ``UnprocessedItems``. ``GET /stats`` reports counts and the sink's own CPU
time; ``POST /reset`` clears them. It runs on uvloop in its own process and
does as little as it can, so that the client is the bottleneck.
"""

from __future__ import annotations

import argparse
import random
import re
import resource
from typing import Any

import orjson
import uvloop
from aiohttp import web

MAX_ITEM = 400 * 1024
_NUMBER = re.compile(rb'"N":"(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"')
_BAD_NUMBER = re.compile(rb'"N":"(?!-?\d)')


class Sink:
    def __init__(self, unprocessed: float, seed: int = 1) -> None:
        self.unprocessed = unprocessed
        self.random = random.Random(seed)
        self.tables: dict[str, list[str]] = {}
        self.reset()

    def reset(self) -> None:
        self.keys: dict[str, set[Any]] = {}
        self.requests = 0
        self.items = 0
        self.returned = 0
        self.rejected: list[str] = []
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu_start = usage.ru_utime + usage.ru_stime

    async def handle(self, request: web.Request) -> web.Response:
        target = request.headers.get("X-Amz-Target", "").rpartition(".")[2]
        body = await request.read()
        if target == "BatchWriteItem":
            return self.batch_write(body)
        doc = orjson.loads(body)
        if target == "CreateTable":
            keys = sorted(doc["KeySchema"], key=lambda k: k["KeyType"] != "HASH")
            self.tables[doc["TableName"]] = [k["AttributeName"] for k in keys]
            return _json({"TableDescription": self.describe(doc["TableName"], doc)})
        if target == "DescribeTable":
            name = doc["TableName"]
            if name not in self.tables:
                return _error("ResourceNotFoundException", f"Table {name} not found")
            return _json({"Table": self.describe(name, None)})
        return _error("UnknownOperationException", target)

    def describe(self, name: str, created: dict[str, Any] | None) -> dict[str, Any]:
        keys = self.tables[name]
        return {
            "TableName": name,
            "TableStatus": "ACTIVE",
            "KeySchema": [
                {"AttributeName": k, "KeyType": "HASH" if i == 0 else "RANGE"}
                for i, k in enumerate(keys)
            ],
            "AttributeDefinitions": (created or {}).get("AttributeDefinitions")
            or [{"AttributeName": k, "AttributeType": "S"} for k in keys],
        }

    def batch_write(self, body: bytes) -> web.Response:
        self.requests += 1
        if _BAD_NUMBER.search(body):
            return self.reject("a number is not finite")
        for match in _NUMBER.finditer(body):
            digits = match.group(1).lstrip(b"-").split(b"e")[0].split(b"E")[0].replace(b".", b"")
            if len(digits.strip(b"0")) > 38:
                return self.reject("a number has more than 38 digits")
        requests = orjson.loads(body)["RequestItems"]
        count = sum(len(r) for r in requests.values())
        if not 1 <= count <= 25:
            return self.reject(f"{count} requests in one batch")
        unprocessed: dict[str, list[Any]] = {}
        for table, puts in requests.items():
            names = self.tables.get(table)
            if names is None:
                return _error("ResourceNotFoundException", f"Table {table} not found")
            keys = [tuple(str(put["PutRequest"]["Item"][n]) for n in names) for put in puts]
            if len(set(keys)) != len(keys):
                return self.reject("Provided list of item keys contains duplicates")
            if len(body) > MAX_ITEM:
                for put in puts:
                    if len(orjson.dumps(put["PutRequest"]["Item"])) > MAX_ITEM * 4 // 3 + 1024:
                        return self.reject("Item size has exceeded the maximum allowed size")
            accepted = self.keys.setdefault(table, set())
            for put, key in zip(puts, keys, strict=True):
                if self.unprocessed and self.random.random() < self.unprocessed:
                    unprocessed.setdefault(table, []).append(put)
                else:
                    accepted.add(key)
        self.items += count
        self.returned += sum(len(v) for v in unprocessed.values())
        return _json({"UnprocessedItems": unprocessed})

    def reject(self, why: str) -> web.Response:
        self.rejected.append(why)
        return _error("ValidationException", why)

    def stats(self) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "requests": self.requests,
            "items": self.items,
            "returned_unprocessed": self.returned,
            "distinct_keys": {t: len(k) for t, k in self.keys.items()},
            "rejected": self.rejected[:10],
            "rejected_count": len(self.rejected),
            "cpu_s": usage.ru_utime + usage.ru_stime - self.cpu_start,
        }


def _json(doc: Any) -> web.Response:
    return web.Response(body=orjson.dumps(doc), content_type="application/x-amz-json-1.0")


def _error(code: str, message: str) -> web.Response:
    body = {"__type": f"com.amazonaws.dynamodb.v20120810#{code}", "message": message}
    return web.Response(status=400, body=orjson.dumps(body), content_type="application/x-amz-json-1.0")


def make_app(sink: Sink) -> web.Application:
    async def stats(_: web.Request) -> web.Response:
        return _json(sink.stats())

    async def reset(request: web.Request) -> web.Response:
        doc = orjson.loads(await request.read() or b"{}")
        sink.unprocessed = float(doc.get("unprocessed", sink.unprocessed))
        sink.reset()
        return _json({"ok": True})

    app = web.Application(client_max_size=32 * 1024 * 1024)
    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", reset)
    app.router.add_post("/", sink.handle)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--unprocessed", type=float, default=0.0)
    args = parser.parse_args()
    uvloop.install()
    web.run_app(make_app(Sink(args.unprocessed)), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
