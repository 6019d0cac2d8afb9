"""A run's dispatch: list its files, register them, send one loader message each;
resumable from wherever it stopped, and never bounded by one request's time.

1. **Steps.** One step is one S3 page (up to ``PAGE`` keys): its files are registered
   (``pending``), one message each is sent, and only then is the step counted on
   the run (``resolvedFiles``) and the cursor (``dispatchAfter``, the page's last
   key) moved, under the dispatch lease (``transitions``). The last step seals
   the run.
2. **Resumable.** A dispatch killed anywhere restarts at the cursor. A file
   that this run registered already (and the loader may have moved on) is read
   first and never registered again, so it is never reset; a file of the
   interrupted step may get a second message, which the loader acknowledges
   once the file has ended. The counts stay exact, since
   only a step's commit counts it, and a step is committed once.
3. **Deadline.** With a deadline (the HTTP route, the sweep), the first step
   lists ``FIRST_PAGE`` keys and each next one as many as the time per file so
   far says will take a third of the time left (``MIN_PAGE`` to ``PAGE``), so a
   slow store still makes progress in every invocation; no step starts that
   would not end in time, and a step still running at the deadline is
   abandoned (it is redone). The lease is then given up, and the next sweep,
   or a repeat with the same Idempotency-Key, goes on.
4. **Failures.** A throttle, 5xx or broken connection leaves the run pending for
   a resume (``TransientAwsError``); a refusal that no retry cures (no such
   bucket or queue, a parameter S3 rejects, access denied) ends the run
   ``failed`` with ``dispatch_failed`` and the cause.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from botocore.exceptions import ClientError
from structlog.contextvars import bound_contextvars

from worker.core.aws import ANY_AWS_FAILURE, error_code, is_transient
from worker.core.errors import DispatchFailed, RetryableError, TransientAwsError, WorkerError
from worker.core.log import get_logger
from worker.ledger.models import DatasetIn, FileStatus, RunStatus, file_id, split_s3_uri
from worker.ledger.store import UNPROCESSED, Store, now_iso
from worker.ledger.transitions import (
    advance_dispatch,
    complete_if_done,
    end_run,
    release_dispatch,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_sqs import SQSClient

log = get_logger(__name__)
PAGE = 1000  # S3 keys a step lists, registers and sends, at most
FIRST_PAGE = 100  # the first step's keys under a deadline: its time per file is unknown
MIN_PAGE = 10
REGISTER = 100  # files a BatchGetItem checks (then BatchWriteItem registers, 25 a call)
SEND = 10  # messages a SendMessageBatch sends
FAN_OUT = 8  # requests of a step in flight at once


def _aws_error(what: str, exc: BaseException) -> WorkerError:
    """An AWS failure as the error it is: transient (resume later) or not."""
    cause = error_code(exc) if isinstance(exc, ClientError) else f"{type(exc).__name__}: {exc}"
    if is_transient(exc):
        return TransientAwsError(f"{what}: {cause}")
    return DispatchFailed(f"{what}: {cause}"[:1000])


async def fan_out(
    items: list[dict[str, Any]], size: int, send: Callable[[list[dict[str, Any]]], Awaitable[None]]
) -> None:
    """``send`` every batch of ``size`` items, ``FAN_OUT`` at a time; the first error raised."""
    slots = asyncio.Semaphore(FAN_OUT)

    async def one(batch: list[dict[str, Any]]) -> None:
        try:
            await send(batch)
        finally:
            slots.release()

    try:
        async with asyncio.TaskGroup() as group:
            for start in range(0, len(items), size):
                await slots.acquire()
                group.create_task(one(items[start : start + size]))
    except* WorkerError as failed:
        raise failed.exceptions[0] from None


class Dispatcher:
    def __init__(self, store: Store, s3: S3Client, sqs: SQSClient) -> None:
        self._store = store
        self._s3 = s3
        self._sqs = sqs
        self._settings = store.settings

    async def dispatch(
        self, run: dict[str, Any], dataset: DatasetIn, token: str, deadline: float | None
    ) -> dict[str, Any]:
        """Dispatch from the run's cursor on, holding the lease ``token``: the run as
        it stands at the end (sealed, ended, or still pending after a pause)."""
        run_id = run["runId"]
        with bound_contextvars(run_id=run_id, dataset=run["datasetName"]):
            try:
                if deadline is None:
                    return await self._steps(run, dataset, token, None)
                async with asyncio.timeout_at(_loop_time(deadline)):
                    return await self._steps(run, dataset, token, deadline)
            except TimeoutError:
                log.info("ledger_dispatch_paused", reason="deadline")
            except RetryableError as exc:
                log.warning("ledger_dispatch_interrupted", **exc.as_log())
                await release_dispatch(self._store, run_id, token)
                raise
            except WorkerError as exc:
                log.error("ledger_dispatch_failed", **exc.as_log())
                error = {"reason": exc.reason, "message": exc.message}
                await end_run(self._store, run_id, RunStatus.FAILED, error,
                              only=(RunStatus.PENDING,))  # fmt: skip
                return await self._current(run_id)
            await release_dispatch(self._store, run_id, token)
            return await self._current(run_id)

    async def _current(self, run_id: str) -> dict[str, Any]:
        run = await self._store.get(self._settings.run_table, "runId", run_id)
        assert run is not None, "a run is never deleted"
        return run

    async def _steps(
        self, run: dict[str, Any], dataset: DatasetIn, token: str, deadline: float | None
    ) -> dict[str, Any]:
        bucket, prefix = dataset.prefix_for(run["datasetName"], run["businessDate"])
        size, per_key = (PAGE, 0.0) if deadline is None else (FIRST_PAGE, 0.0)
        while True:
            if deadline is not None and per_key:
                left = deadline - time.monotonic()
                size = min(PAGE, int(left / 3 / per_key))
                if size < MIN_PAGE:
                    log.info("ledger_dispatch_paused", reason="deadline",
                             resolved_files=run["resolvedFiles"])  # fmt: skip
                    await release_dispatch(self._store, run["runId"], token)
                    return run
            started = time.monotonic()
            after = run.get("dispatchAfter")
            keys, last, more, listed = await self._list(bucket, prefix, after, dataset.suffix, size)
            files = [self._file(run, bucket, obj) for obj in keys]
            register = functools.partial(self._register, run["runId"])
            await fan_out(files, REGISTER, register)
            await fan_out(files, SEND, self._send)
            advanced = await advance_dispatch(
                self._store, run, token, after=last, files=len(files), done=not more,
                lease_s=self._settings.dispatch_timeout_s,
            )  # fmt: skip
            if advanced is None:
                log.warning("ledger_dispatch_lease_lost")
                return await self._current(run["runId"])
            run = advanced
            per_key = (time.monotonic() - started) / max(listed, 1)  # the latest step's
            if not more:
                log.info("ledger_run_sealed", resolved_files=run["resolvedFiles"],
                         status=run["status"])  # fmt: skip
                return await complete_if_done(self._store, run["runId"]) or run

    async def _list(
        self, bucket: str, prefix: str, after: str | None, suffix: str | None, size: int
    ) -> tuple[list[dict[str, Any]], str | None, bool, int]:
        """One page of ``size`` keys after ``after``: those with the suffix, the page's
        last key, whether more follow, and how many keys it listed."""
        args: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": size}
        if after:
            args["StartAfter"] = after
        try:
            page = await self._s3.list_objects_v2(**args)
        except ANY_AWS_FAILURE as exc:
            raise _aws_error(f"cannot list s3://{bucket}/{prefix}", exc) from exc
        contents = page.get("Contents", [])
        last = contents[-1]["Key"] if contents else after
        kept: list[dict[str, Any]] = [
            dict(obj) for obj in contents if not suffix or obj["Key"].endswith(suffix)
        ]
        return kept, last, bool(page.get("IsTruncated")), len(contents)

    def _file(self, run: dict[str, Any], bucket: str, obj: Any) -> dict[str, Any]:
        location = f"s3://{bucket}/{obj['Key']}"
        return {
            "fileId": file_id(run["datasetName"], run["businessDate"], location),
            "runId": run["runId"],
            "datasetName": run["datasetName"],
            "businessDate": run["businessDate"],
            "environment": run["environment"],
            "location": location,
            "status": FileStatus.PENDING.value,
            "lastUpdated": now_iso(),
            "fileSize": obj.get("Size", 0),
            "checksum": str(obj.get("ETag", "")).strip('"'),
        }

    async def _register(self, run_id: str, files: list[dict[str, Any]]) -> None:
        """Register ``files`` as this run's, but none that is this run's already (the
        loader may have moved it on). Under the lease no one else registers for the
        run, and the loader touches only files of the run: read, then write, is safe."""
        table = self._settings.file_table
        ids = [doc["fileId"] for doc in files]
        found = await self._store.batch_get(table, "fileId", ids, "fileId, runId")
        ours = {item["fileId"] for item in found if item.get("runId") == run_id}
        new = [doc for doc in files if doc["fileId"] not in ours]
        for start in range(0, len(new), 25):
            await self._store.batch_put(table, new[start : start + 25])

    async def _send(self, files: list[dict[str, Any]]) -> None:
        entries: list[Any] = []
        for index, doc in enumerate(files):
            bucket, key = split_s3_uri(doc["location"])
            body = {"bucket": bucket, "key": key, "run_id": doc["runId"], "file_id": doc["fileId"]}
            entries.append({"Id": str(index), "MessageBody": orjson.dumps(body).decode()})
        for attempt in range(1, UNPROCESSED.attempts + 1):
            try:
                response = await self._sqs.send_message_batch(
                    QueueUrl=self._settings.loader_queue_url, Entries=entries
                )
            except ANY_AWS_FAILURE as exc:
                raise _aws_error("cannot send to the loader queue", exc) from exc
            failed = {f["Id"] for f in response.get("Failed", [])}
            entries = [entry for entry in entries if entry["Id"] in failed]
            if not entries:
                return
            if attempt < UNPROCESSED.attempts:
                await asyncio.sleep(UNPROCESSED.delay(attempt))
        raise TransientAwsError(f"{len(entries)} loader messages not sent after retries")


def _loop_time(deadline: float) -> float:
    """A ``time.monotonic()`` deadline on the running loop's clock."""
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())
