"""Runs from request to dispatch: submit, resolve, register, send, seal; cancel; list.

1. **Submit.** ``POST /runs`` puts the run as ``pending`` with a conditional
   write. With an ``Idempotency-Key`` the ``runId`` is derived from (dataset,
   key), so a repeat finds the first run and registers and sends nothing.
2. **Resolve.** The dataset's location for the date is listed (paginated,
   filtered by its suffix); every file is registered ``pending`` in batches.
3. **Dispatch.** One loader message per file, with SendMessageBatch; entries
   that fail are sent again with backoff.
4. **Seal.** Only then is the run ``dispatched`` with ``resolvedFiles``; a run
   with no files ends ``failed`` (``no_files``). Files the loader finished
   before the seal are counted already, so the seal may end the run at once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from botocore.exceptions import ClientError
from structlog.contextvars import bound_contextvars

from worker.core.aws import AWS_FAILURES, THROTTLING_CODES, error_code, is_server_error
from worker.core.backoff import Backoff
from worker.core.errors import Conflict, NotFound, TransientAwsError, WorkerError
from worker.core.log import get_logger
from worker.ledger.models import (
    DATASET_NAMES,
    OPEN_RUN,
    DatasetIn,
    FileStatus,
    Page,
    RunIn,
    RunStatus,
    file_id,
)
from worker.ledger.store import Store, now_iso, status_in, to_wire
from worker.ledger.tracker import complete_if_done

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_sqs import SQSClient

log = get_logger(__name__)
_RUN_NAMESPACE = uuid.UUID("0b8f3c52-8a4e-4b8e-9d7e-5d3c2a1f6e90")
RETRIES = Backoff(base_s=0.05, cap_s=2.0, attempts=8)
FAN_OUT = 8  # batches of registration or dispatch in flight at once


@dataclass(frozen=True, slots=True)
class Submitted:
    run: dict[str, Any]
    created: bool  # False: an Idempotency-Key's repeat, answered with the first run


def _may_retry(exc: BaseException) -> bool:
    """Throttles, 5xx and broken connections may pass; a refusal will not."""
    if isinstance(exc, ClientError):
        return error_code(exc) in THROTTLING_CODES or is_server_error(exc)
    return True


class Ledger:
    """The ledger's operations, shared by the HTTP API and the CLI."""

    def __init__(self, store: Store, s3: S3Client, sqs: SQSClient) -> None:
        self.store = store
        self._s3 = s3
        self._sqs = sqs
        self._settings = store.settings

    # --- datasets ---------------------------------------------------------------------

    async def put_dataset(self, name: str, dataset: DatasetIn) -> dict[str, Any]:
        """Create or replace a dataset; a name the model refuses is a ValidationError."""
        name = DATASET_NAMES.validate_python(name)
        doc = {"datasetName": name, **dataset.model_dump(exclude_none=True), "updatedAt": now_iso()}
        await self.store.put(self._settings.dataset_table, doc)
        return doc

    async def dataset(self, name: str) -> DatasetIn:
        doc = await self.store.get(self._settings.dataset_table, "datasetName", name)
        if doc is None:
            raise NotFound(f"no dataset {name!r}", dataset=name)
        return DatasetIn(location=doc["location"], suffix=doc.get("suffix"))

    # --- runs -------------------------------------------------------------------------

    async def run(self, run_id: str) -> dict[str, Any]:
        run = await self.store.get(self._settings.run_table, "runId", run_id)
        if run is None:
            raise NotFound(f"no run {run_id!r}", run_id=run_id)
        return run

    async def submit(self, request: RunIn, idempotency_key: str | None = None) -> Submitted:
        dataset = await self.dataset(request.datasetName)
        business_date = request.businessDate.isoformat()
        run_id = (
            uuid.uuid5(_RUN_NAMESPACE, f"{request.datasetName}\0{idempotency_key}").hex
            if idempotency_key
            else uuid.uuid4().hex
        )
        now = now_iso()
        run = {
            "runId": run_id,
            "datasetName": request.datasetName,
            "businessDate": business_date,
            "sourceType": request.sourceType.value,
            "sourceTrigger": request.sourceTrigger,
            "metadata": request.metadata,
            "environment": self._settings.environment,
            "status": RunStatus.PENDING.value,
            "resolvedFiles": 0,
            "processedFiles": 0,
            "failedFiles": 0,
            "createdAt": now,
            "updatedAt": now,
            "idempotencyKey": idempotency_key,
        }
        if not await self.store.put(
            self._settings.run_table, run, condition="attribute_not_exists(runId)"
        ):
            log.info("ledger_run_repeated", run_id=run_id)
            return Submitted(await self.run(run_id), created=False)
        with bound_contextvars(run_id=run_id, dataset=request.datasetName):
            log.info("ledger_run_submitted", business_date=business_date)
            try:
                return Submitted(await self._dispatch(run, dataset), created=True)
            except WorkerError as exc:  # never leave a run pending that nothing will seal
                await self._abandon(run_id, exc)
                raise

    async def _abandon(self, run_id: str, error: WorkerError) -> None:
        detail = {"reason": "dispatch_failed", "message": error.message[:1000]}
        await self._fail_pending(run_id, detail)
        log.error("ledger_dispatch_failed", **error.as_log())

    async def _fail_pending(self, run_id: str, error: dict[str, Any]) -> dict[str, Any] | None:
        """End a run that was never sealed as ``failed``, with ``error``."""
        values = {":pending": RunStatus.PENDING.value, ":failed": RunStatus.FAILED.value,
                  ":error": error, ":now": now_iso()}  # fmt: skip
        return await self.store.update(
            self._settings.run_table, {"runId": run_id},
            "SET #s = :failed, #e = :error, updatedAt = :now", values,
            condition="#s = :pending",
        )  # fmt: skip

    async def _dispatch(self, run: dict[str, Any], dataset: DatasetIn) -> dict[str, Any]:
        started = time.perf_counter()
        files = await self._resolve(run, dataset)
        resolved = time.perf_counter()
        await self._fan_out(files, 25, self._register_batch)
        registered = time.perf_counter()
        await self._fan_out(files, 10, self._send_batch)
        log.info(
            "ledger_run_dispatched",
            files=len(files),
            resolve_ms=round((resolved - started) * 1000),
            register_ms=round((registered - resolved) * 1000),
            send_ms=round((time.perf_counter() - registered) * 1000),
        )
        return await self._seal(run["runId"], len(files))

    async def _resolve(self, run: dict[str, Any], dataset: DatasetIn) -> list[dict[str, Any]]:
        bucket, prefix = dataset.prefix_for(run["datasetName"], run["businessDate"])
        files: list[dict[str, Any]] = []
        paginator = self._s3.get_paginator("list_objects_v2")
        try:
            async for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    if dataset.suffix and not key.endswith(dataset.suffix):
                        continue
                    location = f"s3://{bucket}/{key}"
                    files.append({
                        "fileId": file_id(run["datasetName"], run["businessDate"], location),
                        "runId": run["runId"],
                        "datasetName": run["datasetName"],
                        "businessDate": run["businessDate"],
                        "environment": run["environment"],
                        "location": location,
                        "status": FileStatus.PENDING.value,
                        "lastUpdated": now_iso(),
                        "fileSize": obj.get("Size", 0),
                        "checksum": obj.get("ETag", "").strip('"'),
                    })  # fmt: skip
        except ClientError as exc:
            raise TransientAwsError(
                f"cannot list s3://{bucket}/{prefix}: {error_code(exc)}"
            ) from exc
        log.info("ledger_files_resolved", files=len(files), bucket=bucket, prefix=prefix)
        return files

    async def _fan_out(
        self,
        files: list[dict[str, Any]],
        size: int,
        send: Callable[[list[dict[str, Any]]], Awaitable[None]],
    ) -> None:
        """``send`` every batch of ``size`` files, ``FAN_OUT`` at a time."""
        slots = asyncio.Semaphore(FAN_OUT)

        async def one(batch: list[dict[str, Any]]) -> None:
            try:
                await send(batch)
            finally:
                slots.release()

        try:
            async with asyncio.TaskGroup() as group:
                for start in range(0, len(files), size):
                    await slots.acquire()
                    group.create_task(one(files[start : start + size]))
        except* WorkerError as failed:
            raise failed.exceptions[0] from None

    async def _register_batch(self, batch: list[dict[str, Any]]) -> None:
        table = self._settings.file_table
        pending: list[Any] = [{"PutRequest": {"Item": to_wire(doc)}} for doc in batch]
        await self._retry(
            "register files",
            pending,
            lambda items: self._unprocessed_puts(table, items),
        )

    async def _unprocessed_puts(self, table: str, items: list[Any]) -> list[Any]:
        response = await self.store.client.batch_write_item(RequestItems={table: items})
        return list(response.get("UnprocessedItems", {}).get(table, []))

    async def _send_batch(self, batch: list[dict[str, Any]]) -> None:
        entries: list[Any] = []
        for index, doc in enumerate(batch):
            bucket, _, key = doc["location"][5:].partition("/")
            body = {"bucket": bucket, "key": key, "run_id": doc["runId"], "file_id": doc["fileId"]}
            entries.append({"Id": str(index), "MessageBody": orjson.dumps(body).decode()})
        await self._retry("send messages", entries, self._unsent)

    async def _unsent(self, entries: list[Any]) -> list[Any]:
        response = await self._sqs.send_message_batch(
            QueueUrl=self._settings.loader_queue_url, Entries=entries
        )
        failed = {f["Id"] for f in response.get("Failed", [])}
        return [entry for entry in entries if entry["Id"] in failed]

    async def _retry(
        self, what: str, pending: list[Any], attempt: Callable[[list[Any]], Awaitable[list[Any]]]
    ) -> None:
        """Call ``attempt`` on what is left until nothing is, with backoff between."""
        tries = 0
        while pending:
            tries += 1
            try:
                pending = await attempt(pending)
            except AWS_FAILURES as exc:
                if not RETRIES.retries_left(tries) or not _may_retry(exc):
                    raise TransientAwsError(f"{what}: {exc!r}") from exc
            if pending and not RETRIES.retries_left(tries):
                raise TransientAwsError(f"{what}: {len(pending)} left after {tries} attempts")
            if pending:
                await asyncio.sleep(RETRIES.delay(tries))

    async def _seal(self, run_id: str, resolved: int) -> dict[str, Any]:
        if resolved:
            values = {":to": RunStatus.DISPATCHED.value, ":n": resolved, ":now": now_iso(),
                      ":pending": RunStatus.PENDING.value}  # fmt: skip
            sealed = await self.store.update(
                self._settings.run_table, {"runId": run_id},
                "SET #s = :to, resolvedFiles = :n, updatedAt = :now", values,
                condition="#s = :pending",
            )  # fmt: skip
        else:
            sealed = await self._fail_pending(run_id, {"reason": "no_files"})
        log.info("ledger_run_sealed", resolved_files=resolved, sealed=sealed is not None)
        return await complete_if_done(self.store, run_id) or await self.run(run_id)

    async def cancel(self, run_id: str) -> dict[str, Any]:
        open_run, open_values = status_in("open", OPEN_RUN)
        values = {":cancelled": RunStatus.CANCELLED.value, ":now": now_iso(), **open_values}
        cancelled = await self.store.update(
            self._settings.run_table, {"runId": run_id},
            "SET #s = :cancelled, updatedAt = :now", values,
            condition=f"attribute_exists(runId) AND {open_run}",
        )  # fmt: skip
        if cancelled is None:
            run = await self.run(run_id)  # NotFound when there is none
            raise Conflict(f"run {run_id} has ended ({run['status']})", status=run["status"])
        with bound_contextvars(run_id=run_id):
            log.info("ledger_run_cancelled")
        return cancelled

    # --- listings ---------------------------------------------------------------------

    async def runs_of(
        self, dataset: str, business_date: str, *, limit: int, token: str | None
    ) -> Page:
        return await self.store.query(
            self._settings.run_table, "datasetName-businessDate-index",
            {"datasetName": dataset, "businessDate": business_date}, limit=limit, token=token,
        )  # fmt: skip

    async def runs_in(self, status: RunStatus, *, limit: int, token: str | None) -> Page:
        return await self.store.query(
            self._settings.run_table, "status-index", {"status": status.value},
            limit=limit, token=token,
        )  # fmt: skip

    async def files_of(
        self, run_id: str, status: FileStatus | None, *, limit: int, token: str | None
    ) -> Page:
        await self.run(run_id)  # NotFound for an unknown run
        keys = {"runId": run_id} | ({"status": status.value} if status else {})
        return await self.store.query(
            self._settings.file_table, "runId-index", keys, limit=limit, token=token
        )
