"""The ``worker`` command line (also ``python -m worker``).

Commands: ``load``, ``poll``, ``health``, ``sample``, ``setup``, ``lake apply`` and
``demo``. Every command
has ``--help``; a wrong argument prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import uvloop

from worker import log
from worker.config import ConfigError, Settings


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="worker", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    load = commands.add_parser("load", help="load S3 objects or local files into DynamoDB")
    load.add_argument("targets", nargs="+", metavar="s3://BUCKET/KEY|FILE")

    poll = commands.add_parser("poll", help="long-poll an SQS queue and load what it names")
    poll.add_argument("--queue-url", help="the queue (default: $QUEUE_URL)")
    poll.add_argument("--processes", type=_positive, default=None, help="default: CPU count")

    commands.add_parser("health", help="exit 0 when every poller refreshed its heartbeat")

    sample = commands.add_parser("sample", help="write a realistic reference OutputFile")
    sample.add_argument("out", type=Path)
    sample.add_argument("--rows", type=_positive, default=10_000)
    sample.add_argument("--tables", type=_positive, default=4)
    sample.add_argument("--seed", type=int, default=1)
    sample.add_argument("--gzip", action="store_true", help="gzip the output")

    setup = commands.add_parser("setup", help="create supporting AWS resources (idempotent)")
    setup.add_argument("what", choices=["firehose-cache"])

    lake = commands.add_parser("lake", help="the Delta Lake side of CDC")
    lake_commands = lake.add_subparsers(dest="lake_command", required=True, parser_class=_Parser)
    apply = lake_commands.add_parser("apply", help="MERGE new stream parts into a Delta table")
    apply.add_argument("--source", required=True, help="s3://BUCKET/PREFIX/TABLE of the parts")
    apply.add_argument("--target", required=True, help="a local path or s3:// URI")

    demo = commands.add_parser("demo", help="run the whole job against an embedded local AWS")
    demo.add_argument("--rows", type=_positive, default=5_000, help="rows per sample file")
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"worker: error: {exc}", file=sys.stderr)
        return 2
    command: str = args.command
    if command == "sample":
        return _sample(args)
    if command == "health":
        return _health(settings)
    if command == "poll":
        return _poll(settings, args)
    if command == "setup":
        return uvloop.run(_setup_firehose_cache(settings))
    if command == "lake":
        from worker.console import lake_apply

        log.configure(settings.log_level, stream=sys.stderr)
        return uvloop.run(lake_apply(settings, args.source, args.target))
    if command == "load":
        log.configure(settings.log_level, stream=sys.stderr)
        from worker.console import load_targets

        return uvloop.run(load_targets(settings, args.targets))
    from worker.demo import run_demo

    log.configure("WARNING", stream=sys.stderr)  # the demo prints its own report on stdout
    return run_demo(rows=args.rows)


def _sample(args: argparse.Namespace) -> int:
    import gzip

    from worker.sample import sample_file

    data = sample_file(rows=args.rows, tables=args.tables, seed=args.seed).SerializeToString()
    args.out.write_bytes(gzip.compress(data) if args.gzip else data)
    print(f"wrote {args.out}: {args.rows} rows in {args.tables} tables, {len(data)} bytes")
    return 0


def _health(settings: Settings) -> int:
    from worker.poller import check_health

    healthy, why = check_health(settings.poll)
    print(why)
    return 0 if healthy else 1


def _poll(settings: Settings, args: argparse.Namespace) -> int:
    import dataclasses
    import os

    queue_url = args.queue_url or settings.poll.queue_url
    if not queue_url:
        print("worker poll: error: no queue: pass --queue-url or set QUEUE_URL", file=sys.stderr)
        return 2
    processes = args.processes or os.cpu_count() or 1
    log.configure(settings.log_level)
    if processes > 1:
        from worker.supervisor import supervise

        return supervise(processes, ["--queue-url", queue_url])
    poll = dataclasses.replace(settings.poll, queue_url=queue_url)
    return uvloop.run(_poll_once(dataclasses.replace(settings, poll=poll)))


async def _poll_once(settings: Settings) -> int:
    from worker.aws import Clients
    from worker.loader import Loader
    from worker.poller import Poller

    async with Clients.from_settings(settings) as clients:
        loader = Loader(settings, clients)
        poller = Poller(
            loader, clients.sqs, settings.poll, concurrency=settings.max_concurrent_objects
        )
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, poller.stop)
        await poller.run()
    return 0


async def _setup_firehose_cache(settings: Settings) -> int:
    from worker.aws import Clients
    from worker.firehose import setup_cache_table

    name = settings.firehose.cache_table
    if not name:
        print("worker setup: error: set EVENT_CACHE_TABLE_NAME", file=sys.stderr)
        return 2
    async with Clients.from_settings(settings) as clients:
        done = await setup_cache_table(clients.dynamodb, name)
    created = "created" if done.created else "already exists"
    ttl = "TTL enabled on expires_at" if done.ttl_enabled else "TTL already enabled"
    print(f"{name}: {created}; {ttl}")
    return 0
