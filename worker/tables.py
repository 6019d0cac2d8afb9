"""The table registry: name mapping, DescribeTable/CreateTable/wait, key schema cache.

A missing table is created PAY_PER_REQUEST with the partition key ``id``,
typed ``N`` when the first row's ``id`` is an int and ``S`` otherwise. A table
that another worker is creating (``ResourceInUseException``) is waited for
until ACTIVE. An existing table keeps its own key schema. One process creates a
table once: concurrent files that need it wait on the same lock.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import TYPE_CHECKING, Any, cast

from botocore.exceptions import ClientError

from worker.aws import TRANSIENT_EXCEPTIONS, error_code
from worker.errors import InvalidTable, TransientAwsError
from worker.items import KeyAttribute, KeySchema, KeyType
from worker.log import get_logger

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

log = get_logger(__name__)

_INVALID_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
DEFAULT_KEY = "id"


def table_name(prefix: str, name: str) -> str:
    """``{prefix}_{name}`` with characters DynamoDB refuses replaced by ``_``."""
    full = f"{prefix}_{name}" if prefix else name
    cleaned = _INVALID_CHARS.sub("_", full)
    if not 3 <= len(cleaned) <= 255:
        raise InvalidTable(f"table name {cleaned!r} must be 3 to 255 characters", source_table=name)
    return cleaned


def key_type_for(first_row: dict[str, Any] | None) -> KeyType:
    value = (first_row or {}).get(DEFAULT_KEY)
    return "N" if isinstance(value, int) and not isinstance(value, bool) else "S"


class TableRegistry:
    """Finds or creates tables and remembers their key schemas."""

    def __init__(self, client: DynamoDBClient, *, active_timeout_s: float = 120.0) -> None:
        self._client = client
        self._active_timeout_s = active_timeout_s
        self._schemas: dict[str, KeySchema] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def ensure(self, name: str, first_row: dict[str, Any] | None) -> KeySchema:
        """The key schema of ``name``, creating the table when it does not exist."""
        schema = self._schemas.get(name)
        if schema is not None:
            return schema
        async with self._locks.setdefault(name, asyncio.Lock()):
            schema = self._schemas.get(name)
            if schema is None:
                schema = await self._describe_or_create(name, key_type_for(first_row))
                self._schemas[name] = schema
        return schema

    async def _describe_or_create(self, name: str, key_type: KeyType) -> KeySchema:
        try:
            description = await self._describe(name)
            if description is None:
                description = await self._create(name, key_type)
            if description["TableStatus"] != "ACTIVE":
                description = await self._wait_active(name)
        except ClientError as exc:
            code = error_code(exc)
            if code == "ValidationException":
                raise InvalidTable(f"DynamoDB refused table {name!r}: {exc}", table=name) from None
            raise TransientAwsError(f"table {name!r}: {code}", table=name) from exc
        except TRANSIENT_EXCEPTIONS as exc:
            raise TransientAwsError(f"table {name!r}: {exc!r}", table=name) from exc
        return _schema(description)

    async def _describe(self, name: str) -> dict[str, Any] | None:
        try:
            response = await self._client.describe_table(TableName=name)
        except ClientError as exc:
            if error_code(exc) == "ResourceNotFoundException":
                return None
            raise
        return cast(dict[str, Any], response["Table"])

    async def _create(self, name: str, key_type: KeyType) -> dict[str, Any]:
        try:
            response = await self._client.create_table(
                TableName=name,
                BillingMode="PAY_PER_REQUEST",
                AttributeDefinitions=[{"AttributeName": DEFAULT_KEY, "AttributeType": key_type}],
                KeySchema=[{"AttributeName": DEFAULT_KEY, "KeyType": "HASH"}],
            )
        except ClientError as exc:
            if error_code(exc) != "ResourceInUseException":
                raise
            log.info("table_create_raced", table=name)
            return {"TableStatus": "CREATING"}
        log.info("table_created", table=name, key_type=key_type)
        return cast(dict[str, Any], response["TableDescription"])

    async def _wait_active(self, name: str) -> dict[str, Any]:
        deadline = time.monotonic() + self._active_timeout_s
        delay = 0.05
        while True:
            description = await self._describe(name)
            if description is not None and description["TableStatus"] == "ACTIVE":
                return description
            if time.monotonic() > deadline:
                raise TransientAwsError(
                    f"table {name!r} not ACTIVE after {self._active_timeout_s}s", table=name
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


def _schema(description: dict[str, Any]) -> KeySchema:
    types = {d["AttributeName"]: d["AttributeType"] for d in description["AttributeDefinitions"]}
    keys = {k["KeyType"]: k["AttributeName"] for k in description["KeySchema"]}
    hash_name = keys["HASH"]
    range_name = keys.get("RANGE")
    return KeySchema(
        hash=KeyAttribute(hash_name, types[hash_name]),
        range=None if range_name is None else KeyAttribute(range_name, types[range_name]),
    )
