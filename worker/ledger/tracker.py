"""The loader's side of the ledger: file transitions, counted exactly once, and completion.

- **Exactly once.** A file's terminal transition and its run's counter move in
  one TransactWriteItems: the file's update is conditioned on its current
  status being open (and on belonging to this run), the run's on being open.
  A redelivered or raced message finds the file already terminal, the
  transaction is cancelled, and nothing is counted twice.
- **Completion.** After every terminal transition (and at the seal) the run is
  read back; when ``processedFiles + failedFiles = resolvedFiles`` on a sealed
  run, one conditional update moves it to ``success`` or ``failed``, guarded by
  the counters it saw and its status, so exactly one writer ends it.
- **Failures of the ledger itself** are ``TransientAwsError``: the message is
  not acknowledged, and its redelivery repeats the (idempotent) transitions.
"""

from __future__ import annotations

from typing import Any

from botocore.exceptions import ClientError
from structlog.contextvars import bound_contextvars

from worker.core.aws import AWS_FAILURES, error_code
from worker.core.errors import TransientAwsError, WorkerError
from worker.core.log import get_logger
from worker.core.tracking import LoadedFile, TrackedFile
from worker.ledger.models import OPEN_FILE, OPEN_RUN, SEALED_RUN, FileStatus, RunStatus
from worker.ledger.store import Store, attribute_names, now_iso, status_in, to_wire

log = get_logger(__name__)
_OPEN_FILE, _OPEN_FILE_VALUES = status_in("open", OPEN_FILE)
_OPEN_RUN, _OPEN_RUN_VALUES = status_in("run", OPEN_RUN)
_SEALED_RUN, _SEALED_RUN_VALUES = status_in("sealed", SEALED_RUN)
_NAME = {"error": "#e"}


class LedgerTracker:
    """``worker.core.tracking.FileTracker`` on the ledger tables."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._runs = store.settings.run_table
        self._files = store.settings.file_table

    async def begin(self, file: TrackedFile) -> bool:
        with bound_contextvars(run_id=file.run_id, file_id=file.file_id):
            run = await self._store.get(self._runs, "runId", file.run_id)
            if run is None or run["status"] not in OPEN_RUN:
                log.info("ledger_file_skipped", run_status=run and run["status"])
                return False
            record = await self._store.get(self._files, "fileId", file.file_id)
            ours = record is not None and record.get("runId") == file.run_id
            if ours and record and record["status"] not in OPEN_FILE:  # a redelivery
                log.info("ledger_file_skipped", file_status=record["status"])
                return False
            return True

    async def fetched(self, file: TrackedFile) -> None:
        with bound_contextvars(run_id=file.run_id, file_id=file.file_id):
            now = now_iso()
            await self._store.update(
                self._files,
                {"fileId": file.file_id},
                "SET #s = :fetched, lastUpdated = :now",
                {":fetched": FileStatus.FETCHED.value, ":now": now, ":run": file.run_id,
                 ":pending": FileStatus.PENDING.value},
                condition="#s = :pending AND runId = :run",
            )  # fmt: skip
            started = await self._store.update(
                self._runs,
                {"runId": file.run_id},
                "SET #s = :processing, updatedAt = :now",
                {":processing": RunStatus.PROCESSING.value, ":now": now,
                 ":dispatched": RunStatus.DISPATCHED.value},
                condition="#s = :dispatched",
            )  # fmt: skip
            if started is not None:
                log.info("ledger_run_processing")

    async def finished(self, file: TrackedFile, loaded: LoadedFile) -> None:
        fields = {
            "rowsWritten": loaded.rows_written,
            "fileSize": loaded.size,
            "checksum": loaded.checksum,
        }
        await self._end(file, FileStatus.PREPROCESSED, "processedFiles", fields)

    async def failed(self, file: TrackedFile, error: WorkerError, *, final: bool) -> None:
        detail = {"reason": error.reason, "message": error.message[:1000]}
        if final:
            await self._end(file, FileStatus.FAILED, "failedFiles", {"error": detail})
            return
        with bound_contextvars(run_id=file.run_id, file_id=file.file_id):
            await self._store.update(
                self._files,
                {"fileId": file.file_id},
                "SET #e = :error, lastUpdated = :now",
                {":error": detail, ":now": now_iso(), ":run": file.run_id,
                 **_OPEN_FILE_VALUES},
                condition=f"{_OPEN_FILE} AND runId = :run",
            )  # fmt: skip
            log.info("ledger_file_error_noted", error=error.reason)

    async def _end(
        self, file: TrackedFile, status: FileStatus, counter: str, fields: dict[str, Any]
    ) -> None:
        """The file's terminal transition and its run's count, in one transaction."""
        with bound_contextvars(run_id=file.run_id, file_id=file.file_id):
            now = now_iso()
            sets = ", ".join(f"{_NAME.get(name, name)} = :{name}" for name in fields)
            file_update = {
                "TableName": self._files,
                "Key": {"fileId": {"S": file.file_id}},
                "UpdateExpression": f"SET #s = :status, lastUpdated = :now, {sets}",
                "ConditionExpression": f"{_OPEN_FILE} AND runId = :run",
                "ExpressionAttributeNames": attribute_names(f"SET {sets}", "#s"),
                "ExpressionAttributeValues": to_wire(
                    {":status": status.value, ":now": now, ":run": file.run_id,
                     **{f":{k}": v for k, v in fields.items()}, **_OPEN_FILE_VALUES}
                ),
            }  # fmt: skip
            run_update = {
                "TableName": self._runs,
                "Key": {"runId": {"S": file.run_id}},
                "UpdateExpression": f"ADD {counter} :one SET updatedAt = :now",
                "ConditionExpression": _OPEN_RUN,
                "ExpressionAttributeNames": {"#s": "status"},
                "ExpressionAttributeValues": to_wire({":one": 1, ":now": now, **_OPEN_RUN_VALUES}),
            }
            try:
                await self._store.client.transact_write_items(
                    TransactItems=[{"Update": file_update}, {"Update": run_update}]  # type: ignore[typeddict-item]
                )
            except ClientError as exc:
                if error_code(exc) != "TransactionCanceledException":
                    raise TransientAwsError(f"ledger transition: {error_code(exc)}") from exc
                reasons = [r.get("Code", "") for r in exc.response.get("CancellationReasons", [])]
                if "ConditionalCheckFailed" not in reasons:  # a conflict or throttle: retry
                    raise TransientAwsError(f"ledger transition cancelled: {reasons}") from exc
                log.info("ledger_transition_skipped", status=status.value, reasons=reasons)
            except AWS_FAILURES as exc:
                raise TransientAwsError(f"ledger transition: {exc!r}") from exc
            else:
                log.info("ledger_file_ended", status=status.value, **_public(fields))
            await complete_if_done(self._store, file.run_id)


def _public(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if k != "error"}


async def complete_if_done(store: Store, run_id: str) -> dict[str, Any] | None:
    """End a sealed run whose files are all accounted for; exactly one caller wins."""
    run = await store.get(store.settings.run_table, "runId", run_id)
    if run is None or run["status"] not in SEALED_RUN:
        return run
    processed, failed = int(run.get("processedFiles", 0)), int(run.get("failedFiles", 0))
    resolved = int(run.get("resolvedFiles", 0))
    if processed + failed < resolved:
        return run
    final = RunStatus.SUCCESS if failed == 0 else RunStatus.FAILED
    values: dict[str, Any] = {
        ":final": final.value, ":now": now_iso(), ":p": processed, ":f": failed,
        ":r": resolved, **_SEALED_RUN_VALUES,
    }  # fmt: skip
    expression = "SET #s = :final, updatedAt = :now"
    if failed:
        values[":error"] = {"reason": "files_failed", "failedFiles": failed}
        expression += ", #e = :error"
    ended = await store.update(
        store.settings.run_table,
        {"runId": run_id},
        expression,
        values,
        condition=f"{_SEALED_RUN} AND processedFiles = :p AND failedFiles = :f"
        " AND resolvedFiles = :r",
    )
    if ended is not None:
        with bound_contextvars(run_id=run_id):
            log.info("ledger_run_ended", status=final.value, processed=processed, failed=failed)
        return ended
    return await store.get(store.settings.run_table, "runId", run_id)
