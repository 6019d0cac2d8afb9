"""The ledger's three tables: their schema, set-up, reads, listings and guarded writes.

- **RunTable** (``RUN_TABLE_NAME``), key ``runId``; GSIs
  ``datasetName-businessDate-index`` and ``status-index`` (status, createdAt).
- **FileTable** (``FILE_TABLE_NAME``), key ``fileId``; GSIs ``runId-index``
  (runId, status: a run's files, filtered by status in the key condition) and
  ``datasetName-status-index``.
- **DatasetTable** (``DATASET_TABLE_NAME``), key ``datasetName``.

Every status change is a conditional write naming the states it may come
from, so a run that ended never changes again and no file goes backwards.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import ClientError

from worker.core.aws import AWS_FAILURES, error_code
from worker.core.backoff import Backoff
from worker.core.config import LedgerSettings
from worker.core.errors import InvalidRequest, TransientAwsError
from worker.core.log import get_logger
from worker.ledger.models import Page

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

log = get_logger(__name__)
T = TypeVar("T")
_serializer = TypeSerializer()
_deserializer = TypeDeserializer()
S = "S"
# Unprocessed keys and items of the batch calls (botocore retries only whole calls).
UNPROCESSED = Backoff(base_s=0.05, cap_s=2.0, attempts=8)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def age_s(stamp: str, now: float | None = None) -> float:
    """Seconds from a ``now_iso()`` stamp to ``now`` (epoch seconds; default: now)."""
    then = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    return (time.time() if now is None else now) - then


def to_wire(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: _serializer.serialize(_decimals(v)) for k, v in doc.items() if v is not None}


def from_wire(item: dict[str, Any]) -> dict[str, Any]:
    return {k: _plain(_deserializer.deserialize(v)) for k, v in item.items()}


def _decimals(value: Any) -> Any:
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, dict):
        return {k: _decimals(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decimals(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | set):
        return [_plain(v) for v in value]
    return value


def table_specs(settings: LedgerSettings) -> dict[str, dict[str, Any]]:
    """CreateTable arguments of the three tables (PAY_PER_REQUEST, all GSIs projected ALL)."""

    def gsi(name: str, hash_key: str, range_key: str) -> dict[str, Any]:
        return {
            "IndexName": name,
            "KeySchema": [
                {"AttributeName": hash_key, "KeyType": "HASH"},
                {"AttributeName": range_key, "KeyType": "RANGE"},
            ],
            "Projection": {"ProjectionType": "ALL"},
        }

    def attrs(*names: str) -> list[dict[str, str]]:
        return [{"AttributeName": n, "AttributeType": S} for n in names]

    def key(name: str) -> list[dict[str, str]]:
        return [{"AttributeName": name, "KeyType": "HASH"}]

    return {
        settings.run_table: {
            "AttributeDefinitions": attrs(
                "runId", "datasetName", "businessDate", "status", "createdAt"
            ),
            "KeySchema": key("runId"),
            "GlobalSecondaryIndexes": [
                gsi("datasetName-businessDate-index", "datasetName", "businessDate"),
                gsi("status-index", "status", "createdAt"),
            ],
        },
        settings.file_table: {
            "AttributeDefinitions": attrs("fileId", "runId", "status", "datasetName"),
            "KeySchema": key("fileId"),
            "GlobalSecondaryIndexes": [
                gsi("runId-index", "runId", "status"),
                gsi("datasetName-status-index", "datasetName", "status"),
            ],
        },
        settings.dataset_table: {
            "AttributeDefinitions": attrs("datasetName"),
            "KeySchema": key("datasetName"),
        },
    }


def status_in(name: str, statuses: Sequence[str]) -> tuple[str, dict[str, str]]:
    """A condition that ``status`` is one of ``statuses``, and the values it names."""
    values = {f":{name}{i}": str(status) for i, status in enumerate(statuses)}
    return "(" + " OR ".join(f"#s = {placeholder}" for placeholder in values) + ")", values


_NAMES = {"#s": "status", "#e": "error"}  # reserved words, or near enough


def attribute_names(*expressions: str) -> dict[str, str]:
    """The placeholders the expressions use (DynamoDB refuses unused ones)."""
    return {k: v for k, v in _NAMES.items() if any(k in e for e in expressions)}


def encode_token(last_key: dict[str, Any] | None) -> str | None:
    if not last_key:
        return None
    return base64.urlsafe_b64encode(orjson.dumps(last_key)).decode().rstrip("=")


def decode_token(token: str | None) -> dict[str, Any] | None:
    if not token:
        return None
    try:
        doc = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError):
        raise InvalidRequest(
            "nextToken is not a token this API gave out", field="nextToken"
        ) from None
    if not (isinstance(doc, dict) and 0 < len(doc) <= 4) or not all(
        isinstance(k, str) and isinstance(v, dict) and list(v) == [S] and isinstance(v[S], str)
        for k, v in doc.items()
    ):  # every key of the ledger's tables and indexes is a string
        raise InvalidRequest("nextToken is not a token this API gave out", field="nextToken")
    return doc


async def every_item(fetch: Callable[[str | None], Awaitable[Page]]) -> AsyncIterator[Any]:
    """Every item of a paginated listing; ``fetch(token)`` gives one page."""
    token = None
    while True:
        page = await fetch(token)
        for item in page.items:
            yield item
        if not (token := page.nextToken):
            return


async def _guarded(table: str, operation: str, call: Awaitable[T]) -> T | None:
    """Await one call: None when its condition did not hold; any failure of AWS is
    a ``TransientAwsError`` naming the table and the operation."""
    try:
        return await call
    except ClientError as exc:
        if error_code(exc) == "ConditionalCheckFailedException":
            return None
        raise TransientAwsError(f"{table}: {operation} failed: {error_code(exc)}") from exc
    except AWS_FAILURES as exc:
        raise TransientAwsError(f"{table}: {operation} failed: {exc!r}") from exc


class Store:
    """Reads and writes of the ledger tables; AWS failures become ``TransientAwsError``."""

    def __init__(self, client: DynamoDBClient, settings: LedgerSettings) -> None:
        self.client = client
        self.settings = settings

    async def get(self, table: str, key: str, value: str) -> dict[str, Any] | None:
        call = self.client.get_item(TableName=table, Key={key: {S: value}}, ConsistentRead=True)
        response = await _guarded(table, "GetItem", call)
        item = None if response is None else response.get("Item")
        return None if item is None else from_wire(item)

    async def put(self, table: str, doc: dict[str, Any], *, condition: str | None = None) -> bool:
        """PutItem; False when ``condition`` did not hold."""
        args: dict[str, Any] = {"TableName": table, "Item": to_wire(doc)}
        if condition:
            args["ConditionExpression"] = condition
        return await _guarded(table, "PutItem", self.client.put_item(**args)) is not None

    async def update(
        self,
        table: str,
        key: dict[str, str],
        expression: str,
        values: dict[str, Any],
        *,
        condition: str,
    ) -> dict[str, Any] | None:
        """A guarded UpdateItem; the new item, or None when ``condition`` did not hold."""
        call = self.client.update_item(
            TableName=table,
            Key={k: {S: v} for k, v in key.items()},
            UpdateExpression=expression,
            ConditionExpression=condition,
            ExpressionAttributeNames=attribute_names(expression, condition),
            ExpressionAttributeValues=to_wire(values),
            ReturnValues="ALL_NEW",
        )
        response = await _guarded(table, "UpdateItem", call)
        return None if response is None else from_wire(response["Attributes"])

    async def batch_get(
        self, table: str, key: str, values: list[str], attributes: str
    ) -> list[dict[str, Any]]:
        """BatchGetItem (consistent) of at most 100 keys, unprocessed keys asked again."""
        pending: Any = {table: {"Keys": [{key: {S: v}} for v in values], "ConsistentRead": True,
                                "ProjectionExpression": attributes}}  # fmt: skip
        found: list[dict[str, Any]] = []
        for attempt in range(1, UNPROCESSED.attempts + 1):
            call = self.client.batch_get_item(RequestItems=pending)
            response = await _guarded(table, "BatchGetItem", call)
            assert response is not None, "a BatchGetItem has no condition"
            found += [from_wire(item) for item in response.get("Responses", {}).get(table, [])]
            if not (pending := response.get("UnprocessedKeys")):
                return found
            await asyncio.sleep(UNPROCESSED.delay(attempt))
        raise TransientAwsError(f"{table}: BatchGetItem left keys unprocessed")

    async def batch_put(self, table: str, docs: list[dict[str, Any]]) -> None:
        """BatchWriteItem of at most 25 items, unprocessed items sent again."""
        pending: Any = {table: [{"PutRequest": {"Item": to_wire(doc)}} for doc in docs]}
        for attempt in range(1, UNPROCESSED.attempts + 1):
            call = self.client.batch_write_item(RequestItems=pending)
            response = await _guarded(table, "BatchWriteItem", call)
            assert response is not None, "a BatchWriteItem has no condition"
            if not (pending := response.get("UnprocessedItems")):
                return
            await asyncio.sleep(UNPROCESSED.delay(attempt))
        raise TransientAwsError(f"{table}: BatchWriteItem left items unprocessed")

    async def transact(self, items: list[dict[str, Any]]) -> list[str] | None:
        """TransactWriteItems: None when it was written; the cancellation reasons
        (one code per item, ``"None"`` for those that held) when a condition did
        not hold. A cancellation for any other reason (a conflict with another
        transaction, a throttle) is a ``TransientAwsError``: sent again, it may pass."""
        try:
            await self.client.transact_write_items(TransactItems=items)  # type: ignore[arg-type]
        except ClientError as exc:
            if error_code(exc) != "TransactionCanceledException":
                raise TransientAwsError(f"TransactWriteItems failed: {error_code(exc)}") from exc
            reasons = [r.get("Code") or "None" for r in exc.response.get("CancellationReasons", [])]
            if "ConditionalCheckFailed" not in reasons:
                raise TransientAwsError(f"TransactWriteItems cancelled: {reasons}") from exc
            return reasons
        except AWS_FAILURES as exc:
            raise TransientAwsError(f"TransactWriteItems failed: {exc!r}") from exc
        return None

    async def query(
        self,
        table: str,
        index: str,
        keys: dict[str, str],
        *,
        limit: int,
        token: str | None,
    ) -> Page:
        """One page of an index, every key attribute matched for equality."""
        names = {f"#k{i}": name for i, name in enumerate(keys)}
        args: dict[str, Any] = {
            "TableName": table,
            "IndexName": index,
            "KeyConditionExpression": " AND ".join(f"{n} = :k{n[2:]}" for n in names),
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": {f":k{i}": {S: v} for i, v in enumerate(keys.values())},
            "Limit": limit,
        }
        start = decode_token(token)
        if start:
            args["ExclusiveStartKey"] = start
        try:
            response = await self.client.query(**args)
        except ClientError as exc:
            if error_code(exc) == "ValidationException" and start:
                raise InvalidRequest(
                    "nextToken does not fit this listing", field="nextToken"
                ) from None
            raise TransientAwsError(f"{table}: Query failed: {error_code(exc)}") from exc
        except AWS_FAILURES as exc:
            raise TransientAwsError(f"{table}: Query failed: {exc!r}") from exc
        items = [from_wire(item) for item in response.get("Items", [])]
        return Page(items=items, nextToken=encode_token(response.get("LastEvaluatedKey")))


async def setup_tables(client: DynamoDBClient, settings: LedgerSettings) -> dict[str, str]:
    """Create the three tables (and their indexes) where missing, wait until they
    are ACTIVE, and turn on point-in-time recovery; running it again changes nothing."""
    outcome: dict[str, str] = {}
    for name, spec in table_specs(settings).items():
        try:
            await client.create_table(TableName=name, BillingMode="PAY_PER_REQUEST", **spec)
            outcome[name] = "created"
        except ClientError as exc:
            if error_code(exc) != "ResourceInUseException":
                raise
            outcome[name] = "exists"
    for name in outcome:
        waiter = client.get_waiter("table_exists")
        await waiter.wait(TableName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 300})
        backups = await client.describe_continuous_backups(TableName=name)
        recovery = backups["ContinuousBackupsDescription"].get("PointInTimeRecoveryDescription", {})
        if recovery.get("PointInTimeRecoveryStatus") != "ENABLED":
            await client.update_continuous_backups(
                TableName=name,
                PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": True},
            )
            outcome[name] += ", point-in-time recovery on"
    return outcome


async def table_health(client: DynamoDBClient, settings: LedgerSettings) -> dict[str, str]:
    """Each ledger table's state: ACTIVE only when the table and every index it
    needs are ACTIVE; MISSING, or the state that is not ACTIVE, otherwise."""
    states: dict[str, str] = {}
    for name, spec in table_specs(settings).items():
        try:
            table = (await client.describe_table(TableName=name))["Table"]
        except ClientError as exc:
            if error_code(exc) != "ResourceNotFoundException":
                raise
            states[name] = "MISSING"
            continue
        indexes = {
            i["IndexName"]: i.get("IndexStatus", "ACTIVE")
            for i in table.get("GlobalSecondaryIndexes", [])
        }
        wanted = [i["IndexName"] for i in spec.get("GlobalSecondaryIndexes", [])]
        missing = [i for i in wanted if indexes.get(i) != "ACTIVE"]
        states[name] = (
            table["TableStatus"]
            if not missing
            else f"INDEX {missing[0]} {indexes.get(missing[0], 'MISSING')}"
        )
    return states
