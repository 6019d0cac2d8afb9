"""Runs from request to dispatch: submit, repeat, supersede, resume, cancel; listings.

1. **Submit.** ``POST /runs`` puts the run as ``pending`` together with its
   date's lock (``transitions``): while another run of the dataset and date is
   open, the answer is 409 naming it, unless the request asks to ``supersede``
   it, which ends that run ``cancelled`` (reason ``superseded``) before the new
   one registers a file.
2. **Idempotency.** With an ``Idempotency-Key`` the ``runId`` is derived from
   (dataset, key) and the request's fingerprint is stored: a repeat of the same
   request answers the first run (and resumes its dispatch if it is still
   pending); the key with another request is 422.
3. **Dispatch** (``dispatch``) runs within the caller's deadline, resumably.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from structlog.contextvars import bound_contextvars

from worker.core.config import AcquireSettings
from worker.core.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    SourceNotAllowed,
    Unprocessable,
)
from worker.core.fetch import Fetcher
from worker.core.log import get_logger
from worker.ledger.dispatch import Dispatcher
from worker.ledger.models import (
    DATASET_NAMES,
    OPEN_RUN,
    DatasetIn,
    FileStatus,
    Page,
    RunIn,
    RunStatus,
)
from worker.ledger.store import Store, now_iso
from worker.ledger.transitions import (
    LOCK_PREFIX,
    claim_dispatch,
    end_run,
    lock_id,
    new_token,
    open_run,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_sqs import SQSClient

log = get_logger(__name__)
_RUN_NAMESPACE = uuid.UUID("0b8f3c52-8a4e-4b8e-9d7e-5d3c2a1f6e90")
_OPEN_ATTEMPTS = 4  # submits racing for one date: each lost race re-reads the lock


@dataclass(frozen=True, slots=True)
class Submitted:
    run: dict[str, Any]
    created: bool  # False: an Idempotency-Key's repeat, answered with the first run


class Ledger:
    """The ledger's operations, shared by the HTTP API, the CLI and the sweep."""

    def __init__(
        self,
        store: Store,
        s3: S3Client,
        sqs: SQSClient,
        *,
        source_buckets: tuple[str, ...] = (),
        fetcher: Fetcher | None = None,
    ) -> None:
        self.store = store
        self.sqs = sqs
        self._settings = store.settings
        self._source_buckets = source_buckets
        self._fetcher = fetcher or Fetcher(AcquireSettings())  # none: no HTTP(S) source
        self._dispatcher = Dispatcher(store, s3, sqs, self._fetcher)

    # --- datasets ---------------------------------------------------------------------

    def _check_source(self, dataset: DatasetIn) -> None:
        """A dataset the workers could not read is refused when it is stored (and
        again when a run is submitted, for one stored before the rules changed)."""
        allowed = self._source_buckets
        for bucket in dataset.buckets:
            if allowed and "*" not in allowed and bucket not in allowed:
                raise InvalidRequest(
                    f"bucket {bucket!r} is not one the loader may read (SOURCE_BUCKETS)",
                    field="location" if dataset.location else "manifest",
                )
        example = {"datasetName": "dataset", "businessDate": "2000-01-01"}
        for template in [*(dataset.files or ()), dataset.manifest or ""]:
            if template.startswith(("https://", "http://")):
                try:
                    self._fetcher.check(template.format(**example))
                except SourceNotAllowed as exc:
                    field = "files" if dataset.files else "manifest"
                    raise InvalidRequest(exc.message, field=field) from None

    async def put_dataset(self, name: str, dataset: DatasetIn) -> dict[str, Any]:
        """Create or replace a dataset; a name the model refuses is a ValidationError."""
        name = DATASET_NAMES.validate_python(name)
        self._check_source(dataset)
        doc = {"datasetName": name, **dataset.model_dump(exclude_none=True), "updatedAt": now_iso()}
        await self.store.put(self._settings.dataset_table, doc)
        return doc

    async def dataset(self, name: str) -> DatasetIn:
        doc = await self.store.get(self._settings.dataset_table, "datasetName", name)
        if doc is None:
            raise NotFound(f"no dataset {name!r}", dataset=name)
        return DatasetIn.model_validate(
            {k: v for k, v in doc.items() if k in DatasetIn.model_fields}
        )

    # --- runs -------------------------------------------------------------------------

    async def run(self, run_id: str) -> dict[str, Any]:
        run = None
        if not run_id.startswith(LOCK_PREFIX):  # a date's lock is no run
            run = await self.store.get(self._settings.run_table, "runId", run_id)
        if run is None:
            raise NotFound(f"no run {run_id!r}", run_id=run_id)
        return run

    async def submit(
        self, request: RunIn, idempotency_key: str | None = None, *, deadline: float | None = None
    ) -> Submitted:
        """Open a run and dispatch it until ``deadline`` (``time.monotonic()``; None: to
        the end). A run still ``pending`` at the deadline goes on at the next sweep."""
        dataset = await self.dataset(request.datasetName)
        self._check_source(dataset)
        fingerprint = request.fingerprint()
        if idempotency_key:
            run_id = uuid.uuid5(_RUN_NAMESPACE, f"{request.datasetName}\0{idempotency_key}").hex
            if existing := await self.store.get(self._settings.run_table, "runId", run_id):
                return await self._repeat(existing, fingerprint, dataset, deadline)
        else:
            run_id = uuid.uuid4().hex
        now = now_iso()
        token = new_token()
        run = {
            "runId": run_id,
            "datasetName": request.datasetName,
            "businessDate": request.businessDate.isoformat(),
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
            "requestHash": fingerprint,
            "dispatchToken": token,
            "dispatchLease": time.time() + self._settings.dispatch_timeout_s,
        }
        with bound_contextvars(run_id=run_id, dataset=request.datasetName):
            repeat = await self._open(run, supersede=request.supersede)
            if repeat is not None:
                return await self._repeat(repeat, fingerprint, dataset, deadline)
            log.info("ledger_run_submitted", business_date=run["businessDate"])
            dispatched = await self._dispatcher.dispatch(run, dataset, token, deadline)
            return Submitted(dispatched, created=True)

    async def _open(self, run: dict[str, Any], *, supersede: bool) -> dict[str, Any] | None:
        """Put ``run`` with its date's lock; None when done, or the stored run when an
        Idempotency-Key's twin won the race. 409 when another run of the date is open."""
        lock = lock_id(run["datasetName"], run["businessDate"])
        for _ in range(_OPEN_ATTEMPTS):
            held = await self.store.get(self._settings.run_table, "runId", lock)
            holder = held["openRunId"] if held else None
            if holder is not None and holder != run["runId"]:
                other = await self.store.get(self._settings.run_table, "runId", holder)
                if other is not None and other["status"] in OPEN_RUN:
                    if not supersede:
                        raise Conflict(
                            f"run {holder} of {run['datasetName']} {run['businessDate']} is "
                            f"still {other['status']}; cancel it, or submit with supersede",
                            field="supersede", openRunId=holder,
                        )  # fmt: skip
                    error = {"reason": "superseded", "supersededBy": run["runId"]}
                    await end_run(self.store, holder, RunStatus.CANCELLED, error)
                    continue  # read the lock again: the holder has ended
            if await open_run(self.store, run, ended_holder=holder):
                return None
            if run["idempotencyKey"]:
                twin = await self.store.get(self._settings.run_table, "runId", run["runId"])
                if twin is not None:
                    return twin
        raise Conflict(
            f"another run of {run['datasetName']} {run['businessDate']} is being submitted",
            field="supersede",
        )

    async def _repeat(
        self, run: dict[str, Any], fingerprint: str, dataset: DatasetIn, deadline: float | None
    ) -> Submitted:
        """An Idempotency-Key's repeat: the first run, its dispatch resumed if pending."""
        key = run.get("idempotencyKey")
        if run.get("requestHash", fingerprint) != fingerprint:
            raise Unprocessable(
                f"Idempotency-Key {key!r} was used for another request (run {run['runId']})",
                field="Idempotency-Key",
            )
        log.info("ledger_run_repeated", run_id=run["runId"], status=run["status"])
        return Submitted(await self.resume(run, dataset, deadline), created=False)

    async def resume(
        self, run: dict[str, Any], dataset: DatasetIn | None, deadline: float | None
    ) -> dict[str, Any]:
        """Go on with a pending run's dispatch if its lease is free; the run as it stands."""
        if run["status"] != RunStatus.PENDING:
            return run
        token = await claim_dispatch(self.store, run["runId"], self._settings.dispatch_timeout_s)
        if token is None:  # someone is dispatching it
            return run
        with bound_contextvars(run_id=run["runId"]):
            log.info("ledger_dispatch_resumed", resolved_files=run["resolvedFiles"])
        if dataset is None:
            try:
                dataset = await self.dataset(run["datasetName"])
            except NotFound as exc:
                error = {"reason": "dataset_missing", "message": exc.message}
                ended = await end_run(self.store, run["runId"], RunStatus.FAILED, error)
                return ended or await self.run(run["runId"])
        return await self._dispatcher.dispatch(run, dataset, token, deadline)

    async def cancel(self, run_id: str) -> dict[str, Any]:
        cancelled = await end_run(self.store, run_id, RunStatus.CANCELLED, None)
        if cancelled is None:
            run = await self.run(run_id)  # NotFound when there is none
            raise Conflict(f"run {run_id} has ended ({run['status']})", status=run["status"])
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
