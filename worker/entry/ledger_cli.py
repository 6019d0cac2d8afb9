"""The ledger's commands: ``setup ledger``, ``datasets``, ``runs`` and ``api``.

They call the same operations as the HTTP API; a request the API would answer
400, 404 or 409 is one line on stderr and exit 2 (a bad argument) or 1.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

import orjson

from worker.core.config import Settings

if TYPE_CHECKING:
    from worker.ledger.runs import Ledger

RUN_STATUSES = ("pending", "dispatched", "processing", "success", "failed", "cancelled")
FILE_STATUSES = ("pending", "fetched", "verified", "preprocessed", "failed")

COMMANDS = {
    "datasets": "register where a dataset's files live",
    "runs": "submit, inspect, list, cancel and sweep dataset runs",
    "api": "serve the ledger's HTTP API on 127.0.0.1 (the Lambda's routes, for local use)",
}


def add_commands(commands: Any) -> None:
    """The ledger's sub-commands, on the ``worker`` parser's sub-parsers."""
    from worker.entry.cli import port

    def command(parent: Any, name: str, what: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = parent.add_parser(name, help=what, description=what)
        return parser

    datasets = command(commands, "datasets", COMMANDS["datasets"])
    sub = datasets.add_subparsers(
        dest="datasets_command", required=True, parser_class=type(datasets)
    )
    put = command(sub, "put", "create or replace a dataset")
    put.add_argument("name", help="the dataset's name")
    put.add_argument(
        "location",
        nargs="?",
        help="s3:// template, e.g. s3://b/raw/{datasetName}/{businessDate}/",
    )
    put.add_argument("--suffix", help="only keys ending with it are files of the dataset")
    put.add_argument(
        "--file",
        action="append",
        dest="files",
        metavar="URL",
        help="an https:// template of one file (repeat it; instead of a location)",
    )
    put.add_argument("--manifest", metavar="URL", help="the template of a manifest's URL")
    put.add_argument("--secret", help="Secrets Manager name of the source's credentials")

    runs = command(commands, "runs", COMMANDS["runs"])
    sub = runs.add_subparsers(dest="runs_command", required=True, parser_class=type(runs))
    submit = command(sub, "submit", "start a run: resolve the files, send them to the loader")
    submit.add_argument("dataset", help="the dataset's name")
    submit.add_argument("date", help="the business date, YYYY-MM-DD")
    submit.add_argument("--idempotency-key", help="the same key returns the first run")
    submit.add_argument(
        "--supersede", action="store_true", help="cancel the date's open run instead of refusing"
    )
    show = command(sub, "show", "a run's counters, and its files by status")
    show.add_argument("run_id")
    listing = command(sub, "list", "runs of a dataset and date, or runs in a status")
    listing.add_argument("--dataset", help="with --date")
    listing.add_argument("--date", help="with --dataset")
    listing.add_argument("--status", choices=RUN_STATUSES)
    files = command(sub, "files", "a run's files: status, error and age, one JSON line each")
    files.add_argument("run_id")
    files.add_argument("--status", choices=FILE_STATUSES)
    cancel = command(sub, "cancel", "cancel a run: its remaining files are not loaded")
    cancel.add_argument("run_id")
    command(sub, "sweep", "end what is stuck: resume dispatch, complete, fail stalled/expired")

    api = command(commands, "api", COMMANDS["api"])
    api.add_argument("--port", type=port, default=8080, help="port on 127.0.0.1 (8080)")


async def setup(settings: Settings) -> int:
    from worker.core.aws import Clients
    from worker.ledger.store import setup_tables

    settings.ledger.require()
    async with Clients.from_settings(settings) as clients:
        outcome = await setup_tables(clients.dynamodb, settings.ledger)
    for name, what in outcome.items():
        print(f"{name}: {what}")
    return 0


async def run(settings: Settings, args: argparse.Namespace) -> int:
    """``datasets ...`` and ``runs ...``; a value the ledger's models refuse is one
    line naming it, and exit 2."""
    from pydantic import ValidationError

    from worker.core.aws import Clients
    from worker.entry.runtime import make_ledger
    from worker.ledger.models import DatasetIn

    dispatch = args.command == "runs" and args.runs_command in ("submit", "sweep")
    async with Clients.from_settings(settings) as clients:
        ledger = make_ledger(settings, clients, dispatch=dispatch)
        try:
            if args.command == "datasets":
                fields = ("location", "suffix", "files", "manifest", "secret")
                given = {name: getattr(args, name) for name in fields}
                dataset = DatasetIn.model_validate({k: v for k, v in given.items() if v})
                _print(await ledger.put_dataset(args.name, dataset))
                return 0
            return await _runs(ledger, args)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"])) or "value"
            print(f"worker {args.command}: error: {where}: {first['msg']}", file=sys.stderr)
            return 2


async def _submit(ledger: Ledger, args: argparse.Namespace) -> int:
    """Exit 1 when the run ends ``failed`` (no files, a source that cannot be listed)."""
    from worker.ledger.api import submit_view
    from worker.ledger.models import RunIn, RunStatus

    request = RunIn.model_validate(
        {"datasetName": args.dataset, "businessDate": args.date, "supersede": args.supersede}
    )
    submitted = await ledger.submit(request, args.idempotency_key)
    _print(submit_view(submitted.run))
    if submitted.run["status"] != RunStatus.FAILED:
        return 0
    reason = submitted.run.get("error", {}).get("reason", "unknown")
    print(f"worker runs submit: run {submitted.run['runId']} failed: {reason}", file=sys.stderr)
    return 1


def _age_s(stamp: str) -> int:
    from worker.ledger.store import age_s

    return round(age_s(stamp))


def _with_age(run: dict[str, Any]) -> dict[str, Any]:
    """A run with ``ageSeconds`` (since it was created) and, once ended, how long it
    took (``durationSeconds``)."""
    age = {"ageSeconds": _age_s(run["createdAt"])}
    if run["status"] not in ("pending", "dispatched", "processing"):
        age["durationSeconds"] = age["ageSeconds"] - _age_s(run["updatedAt"])
    return {**run, **age}


async def _list(ledger: Ledger, args: argparse.Namespace) -> int:
    from worker.ledger.models import RunStatus
    from worker.ledger.store import every_item

    if args.status:
        status = RunStatus(args.status)
        runs = every_item(lambda token: ledger.runs_in(status, limit=100, token=token))
    elif args.dataset and args.date:
        runs = every_item(
            lambda token: ledger.runs_of(args.dataset, args.date, limit=100, token=token)
        )
    else:
        print("worker runs list: error: give --dataset and --date, or --status", file=sys.stderr)
        return 2
    listed = 0
    async for run in runs:
        print(orjson.dumps(_with_age(run)).decode())
        listed += 1
    if not listed:
        print("no runs", file=sys.stderr)
    return 0


async def _files(ledger: Ledger, args: argparse.Namespace) -> int:
    from worker.ledger.models import FileStatus
    from worker.ledger.store import every_item

    status = FileStatus(args.status) if args.status else None
    listed = 0
    async for item in every_item(
        lambda token: ledger.files_of(args.run_id, status, limit=100, token=token)
    ):
        error = item.get("error") or {}
        line = {"fileId": item["fileId"], "status": item["status"],
                "location": item.get("location"), "error": error.get("reason"),
                "errorMessage": error.get("message"),
                "ageSeconds": _age_s(item["lastUpdated"])}  # fmt: skip
        print(orjson.dumps(line).decode())
        listed += 1
    if not listed:
        print("no files" + (f" {args.status}" if args.status else ""), file=sys.stderr)
    return 0


async def _runs(ledger: Ledger, args: argparse.Namespace) -> int:
    from worker.ledger.models import FileStatus
    from worker.ledger.store import every_item
    from worker.ledger.sweeper import Sweeper

    what = args.runs_command
    if what == "submit":
        return await _submit(ledger, args)
    if what == "sweep":
        report = await Sweeper(ledger).sweep()
        _print(dataclasses.asdict(report))
    elif what == "show":
        run = await ledger.run(args.run_id)
        counts: Counter[str] = Counter()
        async for item in every_item(
            lambda token: ledger.files_of(args.run_id, None, limit=100, token=token)
        ):
            counts[item["status"]] += 1
        _print({**_with_age(run), "files": {s.value: counts[s.value] for s in FileStatus}})
    elif what == "list":
        return await _list(ledger, args)
    elif what == "files":
        return await _files(ledger, args)
    else:
        _print(await ledger.cancel(args.run_id))
    return 0


async def serve(settings: Settings, port: int) -> int:
    from worker.core.aws import Clients
    from worker.entry.runtime import make_api
    from worker.ledger.api import serve as serve_http

    async with Clients.from_settings(settings) as clients:
        runner = await serve_http(make_api(settings, clients), port)
        print(f"ledger API on http://127.0.0.1:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
    return 0


def _print(doc: dict[str, Any]) -> None:
    print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
