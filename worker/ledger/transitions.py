"""Every status change of a run or a file, each one conditional write naming the
states it may come from: the ledger's one state machine.

```
run:  pending --seal--> dispatched --first fetch--> processing --last file--> success | failed
      pending --no files / permanent dispatch failure--> failed
      any open --cancel / supersede--> cancelled;  any open --sweep: expired--> failed
file: pending --> fetched --> verified --> preprocessed | failed   (failed from any open status)
```

1. **One open run per dataset and date.** A lock item in the RunTable
   (``runId = open#{dataset}#{date}``, no status, so in no index) names the run
   that holds it. A run is put together with its lock in one transaction,
   conditioned on the lock being free or held by a run that has ended, so of
   two submits at once exactly one wins. The lock is never deleted: the run it
   names ending frees it.
2. **A dispatch lease.** A pending run carries ``dispatchToken`` and
   ``dispatchLease`` (epoch seconds). Only the holder of an unexpired lease
   registers files and advances ``dispatchAfter`` (the last S3 key done) and
   ``resolvedFiles``, each step conditioned on its token, so a resumed dispatch
   and one that was thought dead cannot both count a page.
3. **Exactly once.** A file's terminal transition and its run's counter move in
   one transaction: the file's update is conditioned on its status being open
   and on belonging to this run, the run's on being open. A raced or late
   message finds the condition false, and nothing is counted twice.
4. **Completion.** When ``processedFiles + failedFiles = resolvedFiles`` on a
   sealed run, one update guarded by the counters it saw ends it: exactly one
   caller wins.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from structlog.contextvars import bound_contextvars

from worker.core.log import emit_metrics, get_logger
from worker.ledger.models import OPEN_FILE, OPEN_RUN, SEALED_RUN, FileStatus, RunStatus
from worker.ledger.store import Store, attribute_names, now_iso, status_in, to_wire

log = get_logger(__name__)
_OPEN_FILE, _OPEN_FILE_VALUES = status_in("open", OPEN_FILE)
_OPEN_RUN, _OPEN_RUN_VALUES = status_in("run", OPEN_RUN)
_SEALED_RUN, _SEALED_RUN_VALUES = status_in("sealed", SEALED_RUN)
_NAME = {"error": "#e"}
LOCK_PREFIX = "open#"


def lock_id(dataset: str, business_date: str) -> str:
    return f"{LOCK_PREFIX}{dataset}#{business_date}"


def _update(
    table: str, key: dict[str, str], expression: str, condition: str, values: dict[str, Any]
) -> dict[str, Any]:
    """One ``Update`` of a TransactWriteItems."""
    return {
        "Update": {
            "TableName": table,
            "Key": {k: {"S": v} for k, v in key.items()},
            "UpdateExpression": expression,
            "ConditionExpression": condition,
            "ExpressionAttributeNames": attribute_names(expression, condition),
            "ExpressionAttributeValues": to_wire(values),
        }
    }


# --- runs ------------------------------------------------------------------------------


async def open_run(store: Store, run: dict[str, Any], *, ended_holder: str | None) -> bool:
    """Put a new run and take its date's lock, in one transaction. ``ended_holder``:
    the run the lock names, seen ended (or None: the lock must not exist). False
    when the run id exists already or the lock is held by someone else."""
    runs = store.settings.run_table
    lock = {"runId": lock_id(run["datasetName"], run["businessDate"]), "openRunId": run["runId"],
            "updatedAt": run["createdAt"]}  # fmt: skip
    lock_put: dict[str, Any] = {"TableName": runs, "Item": to_wire(lock)}
    if ended_holder is None:
        lock_put["ConditionExpression"] = "attribute_not_exists(runId)"
    else:
        lock_put["ConditionExpression"] = "openRunId = :holder"
        lock_put["ExpressionAttributeValues"] = to_wire({":holder": ended_holder})
    run_put = {"TableName": runs, "Item": to_wire(run),
               "ConditionExpression": "attribute_not_exists(runId)"}  # fmt: skip
    return await store.transact([{"Put": run_put}, {"Put": lock_put}]) is None


def new_token() -> str:
    """A dispatcher's lease token: unique per claim."""
    return uuid.uuid4().hex


async def claim_dispatch(store: Store, run_id: str, lease_s: float) -> str | None:
    """Take a pending run's dispatch lease when it is free or expired: the new token."""
    token = new_token()
    now = time.time()
    claimed = await store.update(
        store.settings.run_table, {"runId": run_id},
        "SET dispatchToken = :token, dispatchLease = :until",
        {":token": token, ":until": now + lease_s, ":now": now,
         ":pending": RunStatus.PENDING.value},
        condition="#s = :pending AND (attribute_not_exists(dispatchLease)"
        " OR dispatchLease < :now)",
    )  # fmt: skip
    return token if claimed is not None else None


async def release_dispatch(store: Store, run_id: str, token: str) -> None:
    """Give the lease up at once (a pause, not a crash): the next sweep resumes."""
    await store.update(
        store.settings.run_table, {"runId": run_id}, "SET dispatchLease = :zero",
        {":zero": 0, ":token": token}, condition="dispatchToken = :token",
    )  # fmt: skip


async def advance_dispatch(
    store: Store, run: dict[str, Any], token: str, *, after: str | None, files: int,
    done: bool, lease_s: float,
) -> dict[str, Any] | None:  # fmt: skip
    """Count one page of registered and sent files, and move the cursor past it;
    on the last page, seal the run (``dispatched``; ``failed`` with no files).
    None when the lease was lost or the run ended meanwhile."""
    total = int(run["resolvedFiles"]) + files
    values: dict[str, Any] = {
        ":n": total, ":prev": int(run["resolvedFiles"]), ":now": now_iso(), ":token": token,
        ":pending": RunStatus.PENDING.value,
    }  # fmt: skip
    sets = ["resolvedFiles = :n", "updatedAt = :now"]
    if after is not None:
        sets.append("dispatchAfter = :after")
        values[":after"] = after
    if not done:
        sets.append("dispatchLease = :until")
        values[":until"] = time.time() + lease_s
        expression = "SET " + ", ".join(sets)
    else:
        sets.append("#s = :to")
        values[":to"] = (RunStatus.DISPATCHED if total else RunStatus.FAILED).value
        if not total:
            sets.append("#e = :error")
            values[":error"] = {"reason": "no_files"}
        expression = "SET " + ", ".join(sets) + " REMOVE dispatchToken, dispatchLease"
    return await store.update(
        store.settings.run_table, {"runId": run["runId"]}, expression, values,
        condition="#s = :pending AND dispatchToken = :token AND resolvedFiles = :prev",
    )  # fmt: skip


async def end_run(
    store: Store, run_id: str, status: RunStatus, error: dict[str, Any] | None,
    *, only: tuple[RunStatus, ...] = OPEN_RUN,
) -> dict[str, Any] | None:  # fmt: skip
    """End a run that is in one of ``only`` as ``status`` (with ``error``); None when
    it was not (it ended already, or does not exist)."""
    condition, statuses = status_in("from", only)
    values: dict[str, Any] = {**statuses, ":to": status.value, ":now": now_iso()}
    expression = "SET #s = :to, updatedAt = :now"
    if error is not None:
        values[":error"] = error
        expression += ", #e = :error"
    ended = await store.update(
        store.settings.run_table, {"runId": run_id}, expression + " REMOVE dispatchLease",
        values, condition=f"attribute_exists(runId) AND {condition}",
    )  # fmt: skip
    if ended is not None:
        _ended(run_id, status, **(error or {}))
    return ended


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
        store.settings.run_table, {"runId": run_id}, expression, values,
        condition=f"{_SEALED_RUN} AND processedFiles = :p AND failedFiles = :f"
        " AND resolvedFiles = :r",
    )  # fmt: skip
    if ended is not None:
        _ended(run_id, final, processed=processed, failed=failed)
        return ended
    return await store.get(store.settings.run_table, "runId", run_id)


def _ended(run_id: str, status: RunStatus, **fields: Any) -> None:
    """One line for a run that ended; a failed run is also the metric ``FailedRuns``."""
    with bound_contextvars(run_id=run_id):
        log.info("ledger_run_ended", status=status.value, **fields)
    if status is RunStatus.FAILED:
        emit_metrics({"Service": "ledger"}, FailedRuns=1)


# --- files -----------------------------------------------------------------------------


async def file_fetched(store: Store, run_id: str, file_id: str) -> None:
    """The file was downloaded: ``fetched``; its run, if only dispatched, ``processing``."""
    now = now_iso()
    await store.update(
        store.settings.file_table, {"fileId": file_id},
        "SET #s = :fetched, lastUpdated = :now, fetchedAt = :now",
        {":fetched": FileStatus.FETCHED.value, ":now": now, ":run": run_id,
         ":pending": FileStatus.PENDING.value},
        condition="#s = :pending AND runId = :run",
    )  # fmt: skip
    started = await store.update(
        store.settings.run_table, {"runId": run_id}, "SET #s = :processing, updatedAt = :now",
        {":processing": RunStatus.PROCESSING.value, ":now": now,
         ":dispatched": RunStatus.DISPATCHED.value},
        condition="#s = :dispatched",
    )  # fmt: skip
    if started is not None:
        log.info("ledger_run_processing")


async def file_verified(store: Store, run_id: str, file_id: str, size: int, checksum: str) -> None:
    """The file is what it should be: ``verified``, with its size and checksum."""
    await store.update(
        store.settings.file_table, {"fileId": file_id},
        "SET #s = :verified, fileSize = :size, checksum = :sum, lastUpdated = :now,"
        " verifiedAt = :now",
        {":verified": FileStatus.VERIFIED.value, ":size": size, ":sum": checksum,
         ":now": now_iso(), ":run": run_id, ":pending": FileStatus.PENDING.value,
         ":fetched": FileStatus.FETCHED.value},
        condition="#s IN (:pending, :fetched) AND runId = :run",
    )  # fmt: skip


async def note_file_error(store: Store, run_id: str, file_id: str, error: dict[str, Any]) -> None:
    """A failure that a redelivery may cure: noted on the open file, nothing counted."""
    await store.update(
        store.settings.file_table, {"fileId": file_id}, "SET #e = :error, lastUpdated = :now",
        {":error": error, ":now": now_iso(), ":run": run_id, **_OPEN_FILE_VALUES},
        condition=f"{_OPEN_FILE} AND runId = :run",
    )  # fmt: skip


async def end_file(
    store: Store, run_id: str, file_id: str, status: FileStatus, fields: dict[str, Any]
) -> bool:
    """The file's terminal transition and its run's count, in one transaction; False
    when the file had ended already, belongs to another run, or the run has ended."""
    counter = "processedFiles" if status is FileStatus.PREPROCESSED else "failedFiles"
    now = now_iso()
    sets = ", ".join(f"{_NAME.get(name, name)} = :{name}" for name in fields)
    file_update = _update(
        store.settings.file_table, {"fileId": file_id},
        f"SET #s = :status, lastUpdated = :now, {sets}", f"{_OPEN_FILE} AND runId = :run",
        {":status": status.value, ":now": now, ":run": run_id,
         **{f":{k}": v for k, v in fields.items()}, **_OPEN_FILE_VALUES},
    )  # fmt: skip
    run_update = _update(
        store.settings.run_table, {"runId": run_id},
        f"ADD {counter} :one SET updatedAt = :now", _OPEN_RUN,
        {":one": 1, ":now": now, **_OPEN_RUN_VALUES},
    )  # fmt: skip
    reasons = await store.transact([file_update, run_update])
    if reasons is not None:
        log.info("ledger_transition_skipped", status=status.value, reasons=reasons)
        return False
    log.info("ledger_file_ended", status=status.value,
             **{k: v for k, v in fields.items() if k != "error"})  # fmt: skip
    return True
