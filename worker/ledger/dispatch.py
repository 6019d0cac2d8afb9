"""A run's dispatch: list its files, register them, send one loader message each;
resumable from wherever it stopped, and never bounded by one request's time.

1. **Steps.** One step is one page of the dataset's files (up to ``PAGE``: S3 keys
   listed in order, or the URLs its ``files`` or manifest name, sorted): they are registered
   (``pending``), one message each is sent, and only then is the step counted on
   the run (``resolvedFiles``) and the cursor (``dispatchAfter``, the page's last
   key or URL) moved, under the dispatch lease (``transitions``). The last step
   seals the run. A manifest is read once per dispatch (``read_manifest``); a file
   it lists with a size or checksum carries them to the loader, which verifies.
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
from structlog.contextvars import bound_contextvars

from worker.core.aws import ANY_AWS_FAILURE, aws_error
from worker.core.errors import DispatchFailed, RetryableError, TransientAwsError, WorkerError
from worker.core.fetch import Fetcher
from worker.core.log import get_logger
from worker.ledger.manifest import Entry, read_manifest
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
    return aws_error(what, exc, DispatchFailed)


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


Page = tuple[list["Entry"], str | None, bool, int]  # files, cursor, more follow, looked at
Pages = Callable[[str | None, int], Awaitable[Page]]


async def _page(entries: list[Entry], after: str | None, size: int) -> Page:
    """A page of a sorted list of files, after the cursor ``after``."""
    rest = [e for e in entries if after is None or e.location > after]
    page = rest[:size]
    return page, page[-1].location if page else after, len(rest) > size, len(page)


class Dispatcher:
    def __init__(self, store: Store, s3: S3Client, sqs: SQSClient, fetcher: Fetcher) -> None:
        self._store = store
        self._s3 = s3
        self._sqs = sqs
        self._settings = store.settings
        self._fetcher = fetcher
        self._acquire = fetcher.settings

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
        pages = await self._pages(run, dataset, deadline)
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
            entries, last, more, listed = await pages(after, size)
            files = [self._file(run, entry) for entry in entries]
            bodies = [
                self._body(run, dataset, doc, e) for doc, e in zip(files, entries, strict=True)
            ]
            register = functools.partial(self._register, run["runId"])
            await fan_out(files, REGISTER, register)
            await fan_out(bodies, SEND, self._send)
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

    async def _pages(
        self, run: dict[str, Any], dataset: DatasetIn, deadline: float | None
    ) -> Pages:
        """The dataset's files for the run's date, a page at a time."""
        name, date = run["datasetName"], run["businessDate"]
        if dataset.location is not None:
            bucket, prefix = dataset.prefix_for(name, date)
            return functools.partial(self._list, bucket, prefix, dataset.suffix)
        if dataset.files is not None:
            entries = [Entry(url) for url in dataset.urls_for(name, date)]
        else:
            until = deadline or time.monotonic() + self._acquire.deadline_s
            entries = await read_manifest(
                self._s3, self._fetcher, dataset.manifest_for(name, date), dataset.secret, until
            )
        for entry in entries:
            if not entry.location.startswith("s3://"):
                self._fetcher.check(entry.location)  # a host not allowed fails the run now
        return functools.partial(_page, entries)

    async def _list(
        self, bucket: str, prefix: str, suffix: str | None, after: str | None, size: int
    ) -> Page:
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
        kept = [
            Entry(f"s3://{bucket}/{obj['Key']}", obj.get("Size", 0), _etag(obj))
            for obj in contents
            if not suffix or obj["Key"].endswith(suffix)
        ]
        return kept, last, bool(page.get("IsTruncated")), len(contents)

    def _file(self, run: dict[str, Any], entry: Entry) -> dict[str, Any]:
        return {
            "fileId": file_id(run["datasetName"], run["businessDate"], entry.location),
            "runId": run["runId"],
            "datasetName": run["datasetName"],
            "businessDate": run["businessDate"],
            "environment": run["environment"],
            "location": entry.location,
            "status": FileStatus.PENDING.value,
            "lastUpdated": now_iso(),
            "fileSize": entry.size if entry.size is not None else 0,
            "checksum": entry.checksum,
        }

    @staticmethod
    def _body(
        run: dict[str, Any], dataset: DatasetIn, doc: dict[str, Any], entry: Entry
    ) -> dict[str, Any]:
        """The loader message of one file: an S3 object, or a URL to fetch first."""
        body: dict[str, Any] = {"run_id": doc["runId"], "file_id": doc["fileId"]}
        if entry.location.startswith("s3://"):
            body["bucket"], body["key"] = split_s3_uri(entry.location)
        else:
            body.update(url=entry.location, dataset=run["datasetName"],
                        business_date=run["businessDate"])  # fmt: skip
            if dataset.secret:
                body["secret"] = dataset.secret
        if entry.expect:
            body["expect"] = entry.expect
        return body

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

    async def _send(self, bodies: list[dict[str, Any]]) -> None:
        entries: list[Any] = [
            {"Id": str(index), "MessageBody": orjson.dumps(body).decode()}
            for index, body in enumerate(bodies)
        ]
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


def _etag(obj: Any) -> str:
    return str(obj.get("ETag", "")).strip('"')


def _loop_time(deadline: float) -> float:
    """A ``time.monotonic()`` deadline on the running loop's clock."""
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())
