"""The loader's side of the ledger: ``core.tracking.FileTracker`` on the ledger tables.

- A message is loaded only when its run is open and its file is still open and
  still this run's (a later run of the date may have taken it over).
- A redelivery of a file that has ended re-checks its run's completion, so a
  completion update that failed heals on the next delivery, not only at the
  sweep.
- Failures of the ledger itself are ``TransientAwsError``: the message is not
  acknowledged, and its redelivery repeats the (idempotent) transitions.
"""

from __future__ import annotations

from structlog.contextvars import bound_contextvars

from worker.core.errors import WorkerError
from worker.core.log import get_logger
from worker.core.tracking import LoadedFile, TrackedFile
from worker.ledger.models import OPEN_FILE, OPEN_RUN, FileStatus
from worker.ledger.store import Store
from worker.ledger.transitions import (
    complete_if_done,
    end_file,
    file_fetched,
    file_verified,
    note_file_error,
)

log = get_logger(__name__)


class LedgerTracker:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def begin(self, file: TrackedFile) -> bool:
        with bound_contextvars(run_id=file.run_id, file_id=file.file_id):
            settings = self._store.settings
            run = await self._store.get(settings.run_table, "runId", file.run_id)
            if run is None or run["status"] not in OPEN_RUN:
                log.info("ledger_file_skipped", run_status=run and run["status"])
                return False
            record = await self._store.get(settings.file_table, "fileId", file.file_id)
            if record is None or record.get("runId") != file.run_id:
                log.info("ledger_file_skipped", file_run=record and record.get("runId"))
                return False
            if record["status"] not in OPEN_FILE:  # a redelivery: the run may not have ended
                log.info("ledger_file_skipped", file_status=record["status"])
                await complete_if_done(self._store, file.run_id)
                return False
            return True

    async def fetched(self, file: TrackedFile) -> None:
        with bound_contextvars(run_id=file.run_id, file_id=file.file_id):
            await file_fetched(self._store, file.run_id, file.file_id)

    async def verified(self, file: TrackedFile, size: int, checksum: str) -> None:
        with bound_contextvars(run_id=file.run_id, file_id=file.file_id):
            await file_verified(self._store, file.run_id, file.file_id, size, checksum)

    async def finished(self, file: TrackedFile, loaded: LoadedFile) -> None:
        fields = {
            "rowsWritten": loaded.rows_written,
            "fileSize": loaded.size,
            "checksum": loaded.checksum,
        }
        await self._end(file, FileStatus.PREPROCESSED, fields)

    async def failed(self, file: TrackedFile, error: WorkerError, *, final: bool) -> None:
        detail = {"reason": error.reason, "message": error.message[:1000], **_named(error)}
        if final:
            await self._end(file, FileStatus.FAILED, {"error": detail})
            return
        with bound_contextvars(run_id=file.run_id, file_id=file.file_id):
            await note_file_error(self._store, file.run_id, file.file_id, detail)
            log.info("ledger_file_error_noted", error=error.reason)

    async def _end(self, file: TrackedFile, status: FileStatus, fields: dict[str, object]) -> None:
        with bound_contextvars(run_id=file.run_id, file_id=file.file_id):
            await end_file(self._store, file.run_id, file.file_id, status, fields)
            await complete_if_done(self._store, file.run_id)


def _named(error: WorkerError) -> dict[str, object]:
    """The values an error names (a mismatch's expected and actual, an HTTP status)."""
    return {
        k: v[:300] if isinstance(v, str) else v
        for k, v in error.context.items()
        if isinstance(v, str | int) and not isinstance(v, bool) and k not in ("reason", "message")
    }
