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
        self.definitions: dict[str, list[dict[str, str]]] = {}
        self.tags: dict[str, list[Any]] = {}
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
            self.definitions[doc["TableName"]] = doc["AttributeDefinitions"]
            self.tags[_ARN + doc["TableName"]] = doc.get("Tags", [])
            return _json({"TableDescription": self.describe(doc["TableName"])})
        if target == "TagResource":
            self.tags.setdefault(doc["ResourceArn"], []).extend(doc["Tags"])
            return _json({})
        if target == "ListTagsOfResource":
            return _json({"Tags": self.tags.get(doc["ResourceArn"], [])})
        if target == "DescribeTable":
            name = doc["TableName"]
            if name not in self.tables:
                return _error("ResourceNotFoundException", f"Table {name} not found")
            return _json({"Table": self.describe(name)})
        return _error("UnknownOperationException", target)

    def describe(self, name: str) -> dict[str, Any]:
        keys = self.tables[name]
        return {
            "TableName": name,
            "TableArn": _ARN + name,
            "TableStatus": "ACTIVE",
            "KeySchema": [
                {"AttributeName": k, "KeyType": "HASH" if i == 0 else "RANGE"}
                for i, k in enumerate(keys)
            ],
            "AttributeDefinitions": self.definitions[name],
        }

    def batch_write(self, body: bytes) -> web.Response:
        self.requests += 1
        requests = orjson.loads(body)["RequestItems"]
        missing = [t for t in requests if t not in self.tables]
        if missing:
            return _error("ResourceNotFoundException", f"Table {missing[0]} not found")
        keys = {t: [self.key_of(t, p) for p in puts] for t, puts in requests.items()}
        problem = number_problem(body) or batch_problem(requests, keys, large=len(body) > MAX_ITEM)
        if problem:
            return self.reject(problem)
        unprocessed: dict[str, list[Any]] = {}
        for table, puts in requests.items():
            accepted = self.keys.setdefault(table, set())
            for put, key in zip(puts, keys[table], strict=True):
                if self.unprocessed and self.random.random() < self.unprocessed:
                    unprocessed.setdefault(table, []).append(put)
                else:
                    accepted.add(key)
        self.items += sum(len(k) for k in keys.values())
        self.returned += sum(len(v) for v in unprocessed.values())
        return _json({"UnprocessedItems": unprocessed})

    def key_of(self, table: str, put: dict[str, Any]) -> tuple[str, ...]:
        item = put["PutRequest"]["Item"]
        return tuple(str(item.get(name)) for name in self.tables[table])

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


_ARN = "arn:aws:dynamodb:us-east-1:000000000000:table/"


def number_problem(body: bytes) -> str | None:
    """Non-finite or over-precise numbers, found in the raw body without parsing it."""
    if _BAD_NUMBER.search(body):
        return "a number is not finite"
    for match in _NUMBER.finditer(body):
        digits = match.group(1).lstrip(b"-").split(b"e")[0].split(b"E")[0].replace(b".", b"")
        if len(digits.strip(b"0")) > 38:
            return "a number has more than 38 digits"
    return None


def batch_problem(
    requests: dict[str, list[Any]], keys: dict[str, list[tuple[str, ...]]], *, large: bool
) -> str | None:
    count = sum(len(k) for k in keys.values())
    if not 1 <= count <= 25:
        return f"{count} requests in one batch"
    for table_keys in keys.values():
        if len(set(table_keys)) != len(table_keys):
            return "Provided list of item keys contains duplicates"
    if large:  # only a body over 400 KB can hold an item over 400 KB
        for puts in requests.values():
            for put in puts:
                item = put["PutRequest"]["Item"]
                if sum(len(k.encode()) + value_size(v) for k, v in item.items()) > MAX_ITEM:
                    return "Item size has exceeded the maximum allowed size"
    return None


def value_size(attribute: dict[str, Any]) -> int:
    """DynamoDB's size of one wire-format value (numbers by their digit count)."""
    ((kind, value),) = attribute.items()
    if kind == "S":
        return len(value.encode())
    if kind == "N":
        return (len(value) + 1) // 2 + 1
    if kind == "B":
        return len(value) * 3 // 4
    if kind == "L":
        return 3 + sum(1 + value_size(v) for v in value)
    if kind == "M":
        return 3 + sum(1 + len(k.encode()) + value_size(v) for k, v in value.items())
    return 1


def _json(doc: Any) -> web.Response:
    return web.Response(body=orjson.dumps(doc), content_type="application/x-amz-json-1.0")


def _error(code: str, message: str) -> web.Response:
    body = {"__type": f"com.amazonaws.dynamodb.v20120810#{code}", "message": message}
    return web.Response(
        status=400, body=orjson.dumps(body), content_type="application/x-amz-json-1.0"
    )


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
    web.run_app(
        make_app(Sink(args.unprocessed)),
        host="127.0.0.1",
        port=args.port,
        print=None,
        access_log=None,
    )


if __name__ == "__main__":
    main()
