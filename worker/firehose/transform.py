"""Amazon Data Firehose transformation: decode, enrich, deduplicate, partition.

For each record of a transformation event:

1. base64 + JSON (orjson); a record that is neither gets ``ProcessingFailed``;
2. ``created_at`` (epoch seconds, epoch milliseconds, told apart by magnitude,
   or ISO 8601) becomes ``created_datetime`` (ISO 8601 UTC);
3. an empty ``event_name`` (or an unreadable ``created_at``) is logged at ERROR
   and routed ``Ok`` to the error partition ``event_type=_error``;
4. ``event_name`` splits on the first ``EVENT_NAME_SEPARATOR`` into
   ``event_type`` / ``event_subtype`` (``none`` when there is no separator);
5. the key, a SHA-256 of the JSON array ``[event_uuid, event_name,
   created_at]``, is claimed with one conditional PutItem on the cache
   table, which accepts a re-claim by the same record (Firehose retries
   whole invocations) and ignores expired items; a key claimed by another
   record is ``Dropped``;
6. ``Ok`` records carry the enriched JSON plus a newline and the partition keys
   ``event_type``, ``event_subtype``, ``year``, ``month``, ``day``, ``hour``.

Every input recordId is answered exactly once, and the response stays under
Firehose's 6 MB: records that would overflow it fail (and give their claim
back) instead of vanishing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import orjson
from botocore.exceptions import ClientError

from worker.core.aws import AWS_FAILURES, THROTTLING_CODES, error_code, is_server_error
from worker.core.config import FirehoseSettings
from worker.core.errors import ConfigError
from worker.core.log import elapsed_ms, emit_metrics, get_logger
from worker.core.timestamps import is_epoch_ms

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

log = get_logger(__name__)

Result = Literal["Ok", "Dropped", "ProcessingFailed"]
MAX_RESPONSE_BYTES = 6 * 1024 * 1024 - 64 * 1024  # Firehose's 6 MB, less headroom
MAX_PARTITION_VALUE = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
# Free, ours already (a retried invocation), or expired but not yet deleted by TTL.
CLAIM_CONDITION = "attribute_not_exists(pk) OR claimed_by = :me OR expires_at < :now"


@dataclass(slots=True)
class Outcome:
    record_id: str
    result: Result
    data: str
    partition_keys: dict[str, str] | None = None
    claim: str | None = None  # the dedupe key this record holds, if any

    def response(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "recordId": self.record_id,
            "result": self.result,
            "data": self.data,
        }
        if self.partition_keys is not None:
            entry["metadata"] = {"partitionKeys": self.partition_keys}
        return entry


def parse_created_at(value: Any) -> datetime | None:
    """Epoch seconds, epoch milliseconds or ISO 8601 -> an aware UTC datetime."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)
        except ValueError:
            try:
                parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                return None
            if parsed.tzinfo is None:
                return parsed.replace(tzinfo=UTC)
            try:
                return parsed.astimezone(UTC)
            except OverflowError:  # year 1 at +14:00, year 9999 at -05:00: no UTC moment
                return None
    if isinstance(value, int | float) and value == value and abs(value) != float("inf"):
        seconds = value / 1000 if is_epoch_ms(value) else value
        try:
            return datetime.fromtimestamp(seconds, tz=UTC)
        except (OverflowError, OSError, ValueError):
            return None
    return None


def dedupe_key(uuid: Any, name: str, created_at: Any) -> str:
    """The cache key of an event: a digest of the JSON array of its parts, so no
    two different (uuid, name, created_at) share a key, and its length is fixed
    however long the input (DynamoDB refuses keys over 2 KB)."""
    identity = orjson.dumps([uuid, name, created_at], option=orjson.OPT_NON_STR_KEYS)
    return hashlib.sha256(identity).hexdigest()


def partition_value(text: str) -> str:
    """Safe inside an S3 prefix: no '/', only [A-Za-z0-9_.-], bounded, never empty or '..'."""
    safe = _UNSAFE.sub("_", text)[:MAX_PARTITION_VALUE]
    return "none" if safe in {"", ".", ".."} else safe


def _date_keys(moment: datetime) -> dict[str, str]:
    return {
        "year": f"{moment.year:04d}",
        "month": f"{moment.month:02d}",
        "day": f"{moment.day:02d}",
        "hour": f"{moment.hour:02d}",
    }


@dataclass(slots=True)
class _Enriched:
    outcome: Outcome
    key: str | None  # dedupe key; None: not deduplicated


class Transformer:
    """Transforms Firehose batches; the cache table makes dedupe retry-safe."""

    def __init__(self, client: DynamoDBClient, settings: FirehoseSettings) -> None:
        settings.require()
        self._client = client
        self._settings = settings

    async def transform(
        self, event: dict[str, Any], *, deadline: float | None = None
    ) -> dict[str, Any]:
        """Answer every record of the event by ``deadline`` (a ``time.monotonic()``
        value): records whose claim has not settled by then are ``ProcessingFailed``,
        so Firehose retries them, and the same claimant may claim again."""
        start = time.perf_counter()
        stream = str(event["deliveryStreamArn"])
        enriched = [self._enrich(record) for record in event["records"]]
        settled: set[str] = set()
        try:
            async with asyncio.timeout(None if deadline is None else deadline - time.monotonic()):
                await self._deduplicate(stream, enriched, settled)
        except TimeoutError:
            unsettled = [e.outcome for e in enriched if e.key is not None and e.key not in settled]
            log.warning("deadline_reached", unsettled=len(unsettled))
            for outcome in unsettled:
                outcome.result, outcome.partition_keys = "ProcessingFailed", None
        outcomes = [e.outcome for e in enriched]
        await self._fit_response(stream, outcomes)
        counts = {
            r: sum(o.result == r for o in outcomes) for r in ("Ok", "Dropped", "ProcessingFailed")
        }
        log.info("firehose_batch_done", records=len(outcomes), **counts, ms=elapsed_ms(start))
        emit_metrics(
            {"Service": "firehose"},
            Records=len(outcomes),
            RecordsDropped=counts["Dropped"],
            RecordsFailed=counts["ProcessingFailed"],
        )
        return {"records": [o.response() for o in outcomes]}

    def _enrich(self, record: dict[str, Any]) -> _Enriched:
        record_id = str(record.get("recordId", ""))
        raw = record.get("data", "")
        try:
            doc = orjson.loads(base64.b64decode(raw, validate=True))
        except (binascii.Error, ValueError, TypeError) as exc:
            return self._failed(record_id, raw, f"undecodable record: {exc}")
        if not isinstance(doc, dict):
            return self._failed(
                record_id, raw, f"record is a JSON {type(doc).__name__}, not an object"
            )
        moment = parse_created_at(doc.get("created_at"))
        arrival = record.get("approximateArrivalTimestamp")
        name = doc.get("event_name")
        if not isinstance(name, str) or not name or moment is None:
            reason = (
                "empty_event_name" if not (isinstance(name, str) and name) else "invalid_created_at"
            )
            log.error("firehose_record_misrouted", record_id=record_id, reason=reason)
            when = moment or parse_created_at(arrival) or datetime.now(UTC)
            keys = {"event_type": "_error", "event_subtype": reason, **_date_keys(when)}
            return _Enriched(Outcome(record_id, "Ok", _encode(doc), keys), None)
        event_type, sep, subtype = name.partition(self._settings.separator)
        doc["event_type"] = event_type
        doc["event_subtype"] = subtype if sep else "none"
        doc["created_datetime"] = moment.isoformat().replace("+00:00", "Z")
        keys = {
            "event_type": partition_value(event_type),
            "event_subtype": partition_value(doc["event_subtype"]),
            **_date_keys(moment),
        }
        uuid = doc.get("event_uuid")
        key = dedupe_key(uuid, name, doc.get("created_at")) if uuid not in (None, "") else None
        return _Enriched(Outcome(record_id, "Ok", _encode(doc), keys), key)

    @staticmethod
    def _failed(record_id: str, raw: Any, reason: str) -> _Enriched:
        log.error("firehose_record_failed", record_id=record_id, reason=reason)
        return _Enriched(
            Outcome(record_id, "ProcessingFailed", raw if isinstance(raw, str) else ""), None
        )

    async def _deduplicate(self, stream: str, enriched: list[_Enriched], settled: set[str]) -> None:
        """One claim per distinct key (its first record); later records follow its fate.
        A key joins ``settled`` once its records have their verdict."""
        groups: dict[str, list[Outcome]] = {}
        for item in enriched:
            if item.key is not None and item.outcome.result == "Ok":
                groups.setdefault(item.key, []).append(item.outcome)
        slots = asyncio.Semaphore(self._settings.dedupe_concurrency)

        async def settle(key: str, members: list[Outcome]) -> None:
            try:
                verdict = await self._claim(key, f"{stream}#{members[0].record_id}")
            finally:
                slots.release()
            _apply(verdict, key, members)
            settled.add(key)

        async with asyncio.TaskGroup() as group:
            for key, members in groups.items():
                await slots.acquire()
                group.create_task(settle(key, members))

    async def _claim(self, key: str, claimant: str) -> Result:
        now = int(time.time())
        expires = now + self._settings.ttl_hours * 3600
        backoff = self._settings.backoff
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._client.put_item(
                    TableName=self._settings.cache_table,
                    Item={
                        "pk": {"S": key},
                        "claimed_by": {"S": claimant},
                        "expires_at": {"N": str(expires)},
                    },
                    ConditionExpression=CLAIM_CONDITION,
                    ExpressionAttributeValues={":me": {"S": claimant}, ":now": {"N": str(now)}},
                )
            except ClientError as exc:
                code = error_code(exc)
                if code == "ConditionalCheckFailedException":
                    return "Dropped"
                if code not in THROTTLING_CODES and not is_server_error(exc):
                    log.error("firehose_claim_failed", key=key, error=code)
                    return "ProcessingFailed"
            except AWS_FAILURES:
                pass
            else:
                return "Ok"
            if not backoff.retries_left(attempt):
                break
            await asyncio.sleep(backoff.delay(attempt))
        log.error("firehose_claim_failed", key=key, error="attempts_exhausted")
        return "ProcessingFailed"

    async def _fit_response(self, stream: str, outcomes: list[Outcome]) -> None:
        """Fail (and un-claim) the last Ok records until the response fits in 6 MB."""
        size = len(orjson.dumps({"records": [o.response() for o in outcomes]}))
        for outcome in reversed(outcomes):
            if size <= MAX_RESPONSE_BYTES:
                return
            if outcome.result != "Ok":
                continue
            before = len(orjson.dumps(outcome.response()))
            outcome.result, outcome.data, outcome.partition_keys = "ProcessingFailed", "", None
            size -= before - len(orjson.dumps(outcome.response()))
            log.error("firehose_response_overflow", record_id=outcome.record_id)
            if outcome.claim is not None:
                await self._release(outcome.claim, f"{stream}#{outcome.record_id}")

    async def _release(self, key: str, claimant: str) -> None:
        try:
            await self._client.delete_item(
                TableName=self._settings.cache_table,
                Key={"pk": {"S": key}},
                ConditionExpression="claimed_by = :me",
                ExpressionAttributeValues={":me": {"S": claimant}},
            )
        except AWS_FAILURES as exc:
            log.warning("firehose_release_failed", key=key, error=repr(exc))


def _apply(verdict: Result, key: str, members: list[Outcome]) -> None:
    """The first record of a key gets the claim's verdict; its in-batch twins are
    dropped when it is Ok and share its failure otherwise."""
    first = members[0]
    first.result = verdict
    first.claim = key if verdict == "Ok" else None
    for twin in members[1:]:
        twin.result = "Dropped" if verdict == "Ok" else verdict
    for outcome in members:
        if outcome.result == "Dropped":
            outcome.data, outcome.partition_keys = "", None
            log.info("firehose_duplicate", record_id=outcome.record_id, key=key)
        elif outcome.result == "ProcessingFailed":
            outcome.partition_keys = None


def _encode(doc: dict[str, Any]) -> str:
    return base64.b64encode(orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE)).decode()


@dataclass(slots=True)
class CacheSetup:
    created: bool = False
    ttl_enabled: bool = False


async def setup_cache_table(client: DynamoDBClient, name: str) -> CacheSetup:
    """Create the dedupe cache table with TTL on ``expires_at``; idempotent."""
    result = CacheSetup()
    try:
        await client.create_table(
            TableName=name,
            BillingMode="PAY_PER_REQUEST",
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        )
        result.created = True
    except ClientError as exc:
        if error_code(exc) != "ResourceInUseException":
            raise
        table = (await client.describe_table(TableName=name))["Table"]
        key = [(k["AttributeName"], k["KeyType"]) for k in table["KeySchema"]]
        if key != [("pk", "HASH")]:
            raise ConfigError(
                f"{name} exists and is not a dedupe cache (its key is {key}, not pk): "
                "set EVENT_CACHE_TABLE_NAME to the cache's own table",
                variable="EVENT_CACHE_TABLE_NAME",
            ) from None
    waiter = client.get_waiter("table_exists")
    await waiter.wait(TableName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 120})
    ttl = await client.describe_time_to_live(TableName=name)
    if ttl["TimeToLiveDescription"].get("TimeToLiveStatus") not in ("ENABLED", "ENABLING"):
        await client.update_time_to_live(
            TableName=name,
            TimeToLiveSpecification={"Enabled": True, "AttributeName": "expires_at"},
        )
        result.ttl_enabled = True
    return result
