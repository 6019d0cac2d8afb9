"""The ``worker`` command line (also ``python -m worker``).

Every command has ``--help``. Whatever goes wrong ends in one line on stderr:
a wrong argument or setting exits 2, a failure at run time exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NoReturn

import uvloop

from worker.core import log
from worker.core.config import Settings
from worker.core.errors import ConfigError, LakeError, WorkerError, first_line

DESCRIPTION = (
    "Asyncio ingestion worker for AWS data pipelines: loads S3 OutputFiles named by SQS "
    "messages into DynamoDB, buffers DynamoDB Streams into a Delta lake, and transforms "
    "Firehose records."
)
COMMANDS: dict[str, str] = {
    "load": "load S3 objects or local files into DynamoDB, with a progress line and a summary",
    "poll": "long-poll an SQS queue and load the objects its messages name (the ECS service)",
    "health": "exit 0 when every live poller of this container refreshed its heartbeat",
    "sample": "write a realistic reference OutputFile, for trying the loader",
    "setup": "create supporting AWS resources; running it again changes nothing",
    "lake": "the Delta Lake side of CDC",
    "demo": "run the whole job end to end against an embedded local AWS (moto)",
    "dlq": "the loader's dead letters: what each names and what the ledger says; redrive",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="worker", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"worker {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=COMMANDS[name], description=COMMANDS[name])

    load = command("load")
    load.add_argument(
        "targets", nargs="+", metavar="s3://BUCKET/KEY|FILE", help="objects or files to load"
    )

    poll = command("poll")
    poll.add_argument("--queue-url", help="the queue (default: $QUEUE_URL)")
    poll.add_argument(
        "--processes", type=_positive, default=None, help="poller processes (default: CPU count)"
    )

    command("health")

    sample = command("sample")
    sample.add_argument("out", type=Path, help="the file to write")
    sample.add_argument("--rows", type=_positive, default=10_000, help="rows in all (10000)")
    sample.add_argument("--tables", type=_positive, default=4, help="tables to spread them over")
    sample.add_argument("--seed", type=int, default=1, help="random seed: same seed, same file")
    sample.add_argument("--gzip", action="store_true", help="gzip the output")

    setup = command("setup")
    setup.add_argument(
        "what",
        choices=["firehose-cache", "ledger"],
        help="firehose-cache: the dedupe table with TTL; ledger: the run, file and dataset tables",
    )

    lake = command("lake")
    lake_commands = lake.add_subparsers(dest="lake_command", required=True, parser_class=_Parser)
    what = "MERGE the stream parts not applied yet into a Delta table"
    apply = lake_commands.add_parser("apply", help=what, description=what)
    apply.add_argument("--source", required=True, help="s3://BUCKET/PREFIX/TABLE of the parts")
    apply.add_argument("--target", required=True, help="a local path or s3:// URI")
    apply.add_argument(
        "--source-format",
        choices=["parts", "incremental-export"],
        default="parts",
        help="parts: the stream buffer's (default); incremental-export: DynamoDB incremental "
        "exports under --source (s3://BUCKET/PREFIX holding AWSDynamoDB/EXPORT_ID/)",
    )
    apply.add_argument(
        "--metrics",
        action="store_true",
        help="log the outcome and EMF metrics (Service=lake: PartsApplied, ApplyFailures), "
        "as the scheduled task does",
    )
    what = "load a DynamoDB full export into a new Delta table: where applies start"
    bootstrap = lake_commands.add_parser("bootstrap", help=what, description=what)
    bootstrap.add_argument(
        "--export", required=True, help="s3://BUCKET/PREFIX/AWSDynamoDB/EXPORT_ID of the export"
    )
    bootstrap.add_argument("--target", required=True, help="a local path or s3:// URI")
    bootstrap.add_argument(
        "--keys",
        help="the table's key attributes, comma-separated (default: DescribeTable of the "
        "exported table)",
    )
    what = "rebuild the lake's lost state from what the target's history proves"
    repair = lake_commands.add_parser("repair", help=what, description=what)
    repair.add_argument("--target", required=True, help="a local path or s3:// URI")
    what = "compact, vacuum and expire tombstones: safe beside a running apply"
    maintain = lake_commands.add_parser("maintain", help=what, description=what)
    maintain.add_argument("--target", required=True, help="a local path or s3:// URI")
    maintain.add_argument(
        "--retention-hours",
        type=_at_least(MIN_RETENTION_HOURS),
        default=168,
        help=f"vacuum files unreferenced for this long (168, at least {MIN_RETENTION_HOURS}): "
        "keep it above the longest apply and the longest reader",
    )
    what = "move an unreadable part under SOURCE/_quarantine/ so applies go on without it"
    quarantine = lake_commands.add_parser("quarantine", help=what, description=what)
    quarantine.add_argument("--source", required=True, help="s3://BUCKET/PREFIX/TABLE")
    quarantine.add_argument("--part", required=True, help="the part's key, as the error names it")

    dlq = command("dlq")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, parser_class=_Parser)
    for name, what in (
        ("show", "list the DLQ's messages (left where they are)"),
        ("redrive", "move them back to the loader queue, but not those whose file ended"),
    ):
        sub = dlq_commands.add_parser(name, help=what, description=what)
        sub.add_argument(
            "--dlq", required=True, help="its URL (the stack's LoaderDeadLetterQueueUrl)"
        )
        sub.add_argument("--max", type=_positive, default=100, help="messages at most (100)")
        if name == "redrive":
            sub.add_argument("--to", help="the queue (default: $LOADER_QUEUE_URL or $QUEUE_URL)")

    demo = command("demo")
    demo.add_argument("--rows", type=_positive, default=5_000, help="rows per sample file")
    from worker.entry import ledger_cli

    ledger_cli.add_commands(commands)
    return parser


def _version() -> str:
    try:
        return version("worker")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def _positive(text: str) -> int:
    value = _natural(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


MIN_RETENTION_HOURS = 1  # a vacuum younger than an apply in progress would eat its files


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _natural(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum, {minimum}")
        return value

    return parse


def port(text: str) -> int:
    """A TCP port to listen on: 1 to 65535."""
    value = _natural(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (1-65535)")
    return value


def _natural(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code = _main(args)
    if args.command == "lake":
        _leave(code)
    return code


def _leave(code: int) -> NoReturn:
    """End a lake command without the interpreter's finalization: delta-rs's Rust
    runtime and Arrow's C++ thread pools can still be tearing down when Python
    frees their modules, and now and then the process then aborts (SIGABRT,
    "terminate called without an active exception") after its work and its
    output are done. Everything the command writes is flushed first."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _main(args: argparse.Namespace) -> int:
    prog = f"worker {args.command}"
    try:
        return _dispatch(args, Settings.from_env())
    except WorkerError as exc:
        print(f"{prog}: error: {exc.message}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except ModuleNotFoundError as exc:  # an optional extra this install lacks
        print(f"{prog}: error: {_missing_extra(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a port taken, a directory missing: the OS's own words
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # an AWS call no layer below could answer for
        from worker.core.aws import ANY_AWS_FAILURE, ENVIRONMENT_FAILURES

        if not isinstance(exc, ANY_AWS_FAILURE):
            raise
        print(f"{prog}: error: {type(exc).__name__}: {first_line(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, ENVIRONMENT_FAILURES) else 1


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    command: str = args.command
    own_logging: dict[str, Callable[[], int]] = {
        "sample": lambda: _sample(args),
        "health": lambda: _health(settings),
        "poll": lambda: _poll(settings, args),
    }
    if command in own_logging:
        return own_logging[command]()
    if command == "setup":
        if args.what == "ledger":
            from worker.entry import ledger_cli

            return _run(ledger_cli.setup(settings))
        return _run(_setup_firehose_cache(settings))
    if command in ("datasets", "runs", "api"):
        from worker.entry import ledger_cli

        log.configure(settings.log_level, stream=sys.stderr, fmt=settings.log_format)
        if command == "api":
            return _run(ledger_cli.serve(settings, args.port))
        return _run(ledger_cli.run(settings, args))
    if command == "demo":
        from worker.entry.demo import run_demo

        log.configure("WARNING", stream=sys.stderr)  # the demo prints its own report on stdout
        return run_demo(rows=args.rows)
    log.configure(settings.log_level, stream=sys.stderr, fmt=settings.log_format)
    if command in ("lake", "dlq"):
        return _lake(args, settings) if command == "lake" else _run(_dlq(args, settings))
    from worker.entry.console import load_targets

    return _run(load_targets(settings, args.targets))


def _lake(args: argparse.Namespace, settings: Settings) -> int:
    """A lake command; a delta-rs or Arrow error is one line, like every other."""
    import pyarrow as pa
    from deltalake.exceptions import DeltaError

    try:
        return _lake_command(args, settings)
    except (DeltaError, pa.ArrowException) as exc:
        raise LakeError(f"lake {args.lake_command}: {first_line(exc)}") from None


def _lake_command(args: argparse.Namespace, settings: Settings) -> int:
    from worker.entry import console

    command = args.lake_command
    if command == "maintain":
        return console.lake_maintain(settings, args.target, args.retention_hours)
    if command == "quarantine":
        return _run(console.lake_quarantine(settings, args.source, args.part))
    if command == "bootstrap":
        keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
        return _run(console.lake_bootstrap(settings, args.export, args.target, keys))
    if command == "repair":
        return console.lake_repair(settings, args.target)
    return _run(
        console.lake_apply(
            settings, args.source, args.target, args.source_format, metrics=args.metrics
        )
    )


async def _dlq(args: argparse.Namespace, settings: Settings) -> int:
    from worker.core.aws import Clients
    from worker.entry import dlq
    from worker.entry.runtime import make_ledger

    to = getattr(args, "to", None) or settings.ledger.loader_queue_url or settings.poll.queue_url
    if args.dlq_command == "redrive" and not to:
        raise ConfigError("give --to, or set LOADER_QUEUE_URL", variable="LOADER_QUEUE_URL")
    async with Clients.from_settings(settings) as clients:
        ledger = make_ledger(settings, clients, dispatch=False) if settings.ledger.enabled else None
        letters = await dlq.read(clients.sqs, args.dlq, ledger, args.max)
        if args.dlq_command == "show":
            for letter in letters:
                print(dlq.dumps(letter))
            await dlq.hand_back(clients.sqs, args.dlq, letters)
        else:
            for line in await dlq.redrive(clients.sqs, args.dlq, to, letters):
                print(line)
    if not letters:
        print("no messages in the DLQ", file=sys.stderr)
    return 0


def _run(coroutine: Coroutine[Any, Any, int]) -> int:
    return uvloop.run(coroutine)


def _missing_extra(exc: ModuleNotFoundError) -> str:
    extras = {"deltalake": "lake", "pyarrow": "parquet", "moto": "dev"}
    root = (exc.name or "").partition(".")[0]
    extra = extras.get(root)
    if extra is None:
        raise exc
    return (
        f"this install lacks {root!r}: install the '{extra}' extra (pip install 'worker[{extra}]')"
    )


def _sample(args: argparse.Namespace) -> int:
    import gzip

    from worker.entry.sample import sample_file

    data = sample_file(rows=args.rows, tables=args.tables, seed=args.seed).SerializeToString()
    written = gzip.compress(data) if args.gzip else data
    args.out.write_bytes(written)
    size = f"{len(written)} bytes" + (f" gzipped ({len(data)} decoded)" if args.gzip else "")
    print(f"wrote {args.out}: {args.rows} rows in {args.tables} tables, {size}")
    return 0


def _health(settings: Settings) -> int:
    from worker.loader.poller import check_health

    healthy, why = check_health(settings.poll)
    print(why)
    return 0 if healthy else 1


def _poll(settings: Settings, args: argparse.Namespace) -> int:
    import dataclasses
    import os

    poll = dataclasses.replace(settings.poll, queue_url=args.queue_url or settings.poll.queue_url)
    poll.require()
    processes = args.processes or os.cpu_count() or 1
    log.configure(settings.log_level, fmt="json" if processes > 1 else settings.log_format)
    if processes > 1:
        from worker.loader.supervisor import supervise

        return supervise(processes, ["--queue-url", poll.queue_url])
    from worker.entry.runtime import settle_memory

    settle_memory()
    return _run(_poll_once(dataclasses.replace(settings, poll=poll)))


async def _poll_once(settings: Settings) -> int:
    from worker.core.aws import Clients
    from worker.entry.runtime import make_loader
    from worker.loader.poller import Poller

    async with Clients.from_settings(settings) as clients:
        loader = make_loader(settings, clients)
        poller = Poller(
            loader, clients.sqs, settings.poll, concurrency=settings.max_concurrent_objects
        )
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, poller.stop)
        await poller.run()
    return 0


async def _setup_firehose_cache(settings: Settings) -> int:
    from worker.core.aws import Clients
    from worker.firehose.transform import setup_cache_table

    settings.firehose.require()
    name = settings.firehose.cache_table
    async with Clients.from_settings(settings) as clients:
        done = await setup_cache_table(clients.dynamodb, name)
    created = "created" if done.created else "already exists"
    ttl = "TTL enabled on expires_at" if done.ttl_enabled else "TTL already enabled"
    print(f"{name}: {created}; {ttl}")
    return 0
