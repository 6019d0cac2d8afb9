"""The table registry: name mapping, DescribeTable/CreateTable/wait, key schema cache.

Only tables the loader created are written: a new table is tagged
``worker:owner=loader``, and an existing table without that tag (or one of the
worker's own ledger and cache tables) is refused with ``TableNotOwned``.

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

from worker.core.aws import (
    ENVIRONMENT_FAILURES,
    TRANSIENT_EXCEPTIONS,
    environment_error,
    error_code,
)
from worker.core.backoff import Backoff
from worker.core.errors import InvalidTable, TableNotOwned, TransientAwsError
from worker.core.log import get_logger
from worker.loader.items import KeyAttribute, KeySchema, KeyType

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient
    from types_aiobotocore_dynamodb.type_defs import TagTypeDef

log = get_logger(__name__)

_INVALID_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
DEFAULT_KEY = "id"
ACTIVE_POLL = Backoff(base_s=0.05, cap_s=2.0, jitter=False)  # DescribeTable until ACTIVE
OWNER_TAG: TagTypeDef = {"Key": "worker:owner", "Value": "loader"}


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

    def __init__(
        self,
        client: DynamoDBClient,
        *,
        active_timeout_s: float = 120.0,
        reserved: frozenset[str] = frozenset(),
    ) -> None:
        self._client = client
        self._active_timeout_s = active_timeout_s
        self._reserved = reserved
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
        if name in self._reserved:
            raise TableNotOwned(f"{name!r} is one of the worker's own tables", table=name)
        try:
            description = await self._describe(name)
            origin = "existing"
            if description is None:
                description, origin = await self._create(name, key_type)
            if description["TableStatus"] != "ACTIVE":
                description = await self._wait_active(name)
            if origin == "created":
                await self._tag(description["TableArn"])
            elif origin == "existing":
                await self._check_owner(name, description["TableArn"])
        except ClientError as exc:
            code = error_code(exc)
            if code == "ValidationException":
                raise InvalidTable(f"DynamoDB refused table {name!r}: {exc}", table=name) from None
            raise TransientAwsError(f"table {name!r}: {code}", table=name) from exc
        except ENVIRONMENT_FAILURES as exc:
            raise environment_error(exc) from None
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

    async def _create(self, name: str, key_type: KeyType) -> tuple[dict[str, Any], str]:
        """Create the table, tagged as the loader's; ``raced`` when another worker
        was creating it at the same moment (a peer: the name came from the same
        prefix), ``created`` otherwise."""
        try:
            response = await self._client.create_table(
                TableName=name,
                BillingMode="PAY_PER_REQUEST",
                AttributeDefinitions=[{"AttributeName": DEFAULT_KEY, "AttributeType": key_type}],
                KeySchema=[{"AttributeName": DEFAULT_KEY, "KeyType": "HASH"}],
                Tags=[OWNER_TAG],
            )
        except ClientError as exc:
            if error_code(exc) != "ResourceInUseException":
                raise
            log.info("table_create_raced", table=name)
            return {"TableStatus": "CREATING"}, "raced"
        log.info("table_created", table=name, key_type=key_type)
        return cast(dict[str, Any], response["TableDescription"]), "created"

    async def _tag(self, arn: str) -> None:
        """Tag again once ACTIVE: CreateTable's own tags are atomic on AWS, but some
        local stand-ins (dynalite) drop them."""
        await self._client.tag_resource(ResourceArn=arn, Tags=[OWNER_TAG])

    async def _check_owner(self, name: str, arn: str) -> None:
        """Refuse a table the loader did not create: a file must not be able to
        write into the ledger, the Firehose cache or anybody else's table."""
        response = await self._client.list_tags_of_resource(ResourceArn=arn)
        tags = {tag["Key"]: tag["Value"] for tag in response.get("Tags", [])}
        if tags.get(OWNER_TAG["Key"]) != OWNER_TAG["Value"]:
            raise TableNotOwned(
                f"table {name!r} exists but was not created by the loader "
                f"(no tag {OWNER_TAG['Key']}={OWNER_TAG['Value']})",
                table=name,
            )

    async def _wait_active(self, name: str) -> dict[str, Any]:
        deadline = time.monotonic() + self._active_timeout_s
        attempt = 0
        while True:
            description = await self._describe(name)
            if description is not None and description["TableStatus"] == "ACTIVE":
                return description
            if time.monotonic() > deadline:
                raise TransientAwsError(
                    f"table {name!r} not ACTIVE after {self._active_timeout_s}s", table=name
                )
            await asyncio.sleep(ACTIVE_POLL.delay(attempt))
            attempt += 1


def _schema(description: dict[str, Any]) -> KeySchema:
    types = {d["AttributeName"]: d["AttributeType"] for d in description["AttributeDefinitions"]}
    keys = {k["KeyType"]: k["AttributeName"] for k in description["KeySchema"]}
    hash_name = keys["HASH"]
    range_name = keys.get("RANGE")
    return KeySchema(
        hash=KeyAttribute(hash_name, types[hash_name]),
        range=None if range_name is None else KeyAttribute(range_name, types[range_name]),
    )
