"""The sweep: find what is stuck in the ledger and end it (``worker runs sweep``,
and the scheduled Lambda route).

For every open run (the ``status-index``, pending, dispatched and processing):

1. **Expired.** Open longer than ``RUN_MAX_AGE_H``: its open files end
   ``failed`` (``expired``) through the exactly-once transition, then the run
   ends ``failed`` (``expired``).
2. **Dispatch.** ``pending`` with a free or lapsed dispatch lease (nothing
   moved for ``RUN_DISPATCH_TIMEOUT_S``, or a request paused it at its
   deadline): its dispatch goes on from its cursor.
3. **Complete.** Sealed, with counters that add up: ended (a completion
   update that was lost).
4. **Stalled files.** A sealed run with no change for longer than the queue can
   still deliver a message (visibility timeout x maxReceiveCount, read from
   the queue, plus ``RUN_STALL_MARGIN_S``): each open file unchanged that long
   ends ``failed`` (``stalled``), so its run ends. A ``pending`` file (never
   received) is judged only when the loader queue has no visible backlog: a
   message waiting behind others has not stalled.

Each action is one log line; the sweep ends with a summary line and EMF metrics
(``Service=ledger``): ``StalledFiles``, ``ResumedRuns``, ``ExpiredRuns``,
``CompletedRuns``, ``OpenRuns``, ``OldestOpenRunAgeSeconds``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from worker.core.aws import ANY_AWS_FAILURE
from worker.core.errors import TransientAwsError
from worker.core.log import emit_metrics, get_logger
from worker.ledger.models import OPEN_FILE, OPEN_RUN, SEALED_RUN, FileStatus, RunStatus
from worker.ledger.runs import Ledger
from worker.ledger.store import age_s, every_item
from worker.ledger.transitions import complete_if_done, end_file, end_run

log = get_logger(__name__)
_PAGE = 100


@dataclass(slots=True)
class SweepReport:
    open_runs: int = 0
    oldest_open_s: float = 0.0
    resumed_runs: int = 0
    completed_runs: int = 0
    expired_runs: int = 0
    stalled_files: int = 0

    def emit(self) -> None:
        log.info("ledger_sweep_done", **asdict(self))
        emit_metrics(
            {"Service": "ledger"},
            OpenRuns=self.open_runs,
            OldestOpenRunAgeSeconds=round(self.oldest_open_s),
            ResumedRuns=self.resumed_runs,
            CompletedRuns=self.completed_runs,
            ExpiredRuns=self.expired_runs,
            StalledFiles=self.stalled_files,
        )


class Sweeper:
    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._store = ledger.store
        self._settings = ledger.store.settings

    async def sweep(self, deadline: float | None = None) -> SweepReport:
        report = SweepReport()
        window_s, backlog = await self._queue()
        now = time.time()
        for status in OPEN_RUN:
            async for run in self._all_runs(status):
                if deadline is not None and time.monotonic() > deadline:
                    log.warning("ledger_sweep_cut_short", reason="deadline")
                    report.emit()
                    return report
                report.open_runs += 1
                report.oldest_open_s = max(report.oldest_open_s, age_s(run["createdAt"], now))
                await self._one(run, report, now, window_s, backlog, deadline)
        report.emit()
        return report

    async def _one(
        self, run: dict[str, Any], report: SweepReport, now: float, window_s: float,
        backlog: bool, deadline: float | None,
    ) -> None:  # fmt: skip
        run_id = run["runId"]
        if age_s(run["createdAt"], now) > self._settings.max_age_h * 3600:
            await self._end_files(run_id, now, None, "expired", skip_pending=False)
            error = {"reason": "expired", "maxAgeHours": self._settings.max_age_h}
            if await end_run(self._store, run_id, RunStatus.FAILED, error) is not None:
                report.expired_runs += 1
                log.warning("ledger_sweep_expired", run_id=run_id, created_at=run["createdAt"])
            return
        if run["status"] == RunStatus.PENDING:
            if float(run.get("dispatchLease", 0)) < now:
                resumed = await self._ledger.resume(run, None, deadline)
                report.resumed_runs += 1
                log.info("ledger_sweep_resumed", run_id=run_id, status=resumed["status"],
                         resolved_files=resumed["resolvedFiles"])  # fmt: skip
            return
        ended = await complete_if_done(self._store, run_id)
        if ended is not None and ended["status"] not in SEALED_RUN:
            report.completed_runs += 1
            log.info("ledger_sweep_completed", run_id=run_id, status=ended["status"])
            return
        if age_s(run["updatedAt"], now) > window_s:
            stalled = await self._end_files(run_id, now, window_s, "stalled", skip_pending=backlog)
            report.stalled_files += stalled
            if stalled:
                await complete_if_done(self._store, run_id)

    async def _end_files(
        self, run_id: str, now: float, window_s: float | None, reason: str, *, skip_pending: bool
    ) -> int:
        """End the run's open files unchanged for ``window_s`` (None: all) as ``failed``
        with ``reason``."""
        ended = 0
        message = (
            "no outcome was recorded while the queue could still deliver the file"
            if reason == "stalled"
            else f"the run was open longer than {self._settings.max_age_h} h"
        )
        for status in OPEN_FILE:
            if status is FileStatus.PENDING and skip_pending:
                continue
            async for item in self._all_files(run_id, status):
                if window_s is not None and age_s(item["lastUpdated"], now) <= window_s:
                    continue
                error = {"reason": reason, "message": message}
                if await end_file(self._store, run_id, item["fileId"], FileStatus.FAILED,
                                  {"error": error}):  # fmt: skip
                    ended += 1
                    log.warning("ledger_sweep_file_ended", reason=reason, run_id=run_id,
                                file_id=item["fileId"], file_status=status.value,
                                location=item.get("location"))  # fmt: skip
        return ended

    def _all_runs(self, status: RunStatus) -> AsyncIterator[dict[str, Any]]:
        return every_item(lambda token: self._ledger.runs_in(status, limit=_PAGE, token=token))

    def _all_files(self, run_id: str, status: FileStatus) -> AsyncIterator[dict[str, Any]]:
        return every_item(
            lambda token: self._ledger.files_of(run_id, status, limit=_PAGE, token=token)
        )

    async def _queue(self) -> tuple[float, bool]:
        """How long the loader queue may still deliver a message (visibility timeout x
        maxReceiveCount, plus the margin), and whether it has messages waiting."""
        try:
            attributes = (
                await self._ledger.sqs.get_queue_attributes(
                    QueueUrl=self._settings.loader_queue_url,
                    AttributeNames=[
                        "VisibilityTimeout",
                        "RedrivePolicy",
                        "ApproximateNumberOfMessages",
                    ],
                )
            )["Attributes"]
        except ANY_AWS_FAILURE as exc:
            raise TransientAwsError(f"cannot read the loader queue's attributes: {exc!r}") from exc
        visibility = int(attributes.get("VisibilityTimeout", 30))
        receives = self._settings.max_receives
        if "RedrivePolicy" in attributes:
            receives = int(orjson.loads(attributes["RedrivePolicy"])["maxReceiveCount"])
        window = visibility * receives + self._settings.stall_margin_s
        backlog = int(attributes.get("ApproximateNumberOfMessages", 0)) > 0
        return float(window), backlog
