"""The container's single event loop (uvloop) and its long-lived products.

Lambda calls the handler synchronously, once per invocation, on the same
thread. ``Runtime`` keeps one ``asyncio.Runner`` and one set of clients for the
container's life, so warm invocations reuse connections, the table-schema
cache and the write window. Each product (the loader, the Firehose
transformer, the streams buffer) is built on its first event, and that is
when its settings are checked: a bad one is a ``ConfigError`` naming the
variable, before any record is touched.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import uvloop

from worker.core import log
from worker.core.aws import Clients
from worker.core.config import Settings, StreamSettings

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

    from worker.firehose.transform import Transformer
    from worker.ledger.api import Api
    from worker.ledger.runs import Ledger
    from worker.ledger.sweeper import Sweeper
    from worker.loader.pipeline import Loader

T = TypeVar("T")


GC_THRESHOLD = (50_000, 20, 20)  # gen 0 every 50k allocations instead of 700


def settle_memory() -> None:
    """Once start-up is done: keep what exists now (modules, settings, clients) out
    of the cyclic collector's passes, and run generation 0 less often. The loader
    makes millions of short-lived dicts that form no cycles; with CPython's
    defaults every pass walks them (measured: a third of a load's CPU). Cycles
    are still collected, only later. Idempotent."""
    if gc.get_threshold() != GC_THRESHOLD:
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLD)


class Runtime:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env()
        log.configure(self.settings.log_level, fmt=self.settings.log_format)
        settle_memory()
        self._runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        self._clients: Clients | None = None
        self._loader: Loader | None = None
        self._transformer: Transformer | None = None
        self._api: Api | None = None
        self._sweeper: Sweeper | None = None

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coroutine)

    async def clients(self) -> Clients:
        """The container's clients, opened on first use."""
        if self._clients is None:
            clients = Clients.from_settings(self.settings)
            await clients.__aenter__()
            self._clients = clients
        return self._clients

    async def loader(self) -> Loader:
        if self._loader is None:
            self._loader = make_loader(self.settings, await self.clients())
        return self._loader

    async def api(self) -> Api:
        if self._api is None:
            self._api = make_api(self.settings, await self.clients())
        return self._api

    async def sweeper(self) -> Sweeper:
        if self._sweeper is None:
            from worker.ledger.sweeper import Sweeper

            self._sweeper = Sweeper(make_ledger(self.settings, await self.clients()))
        return self._sweeper

    async def transformer(self) -> Transformer:
        if self._transformer is None:
            from worker.firehose.transform import Transformer

            self.settings.firehose.require()
            clients = await self.clients()
            self._transformer = Transformer(clients.dynamodb_writes, self.settings.firehose)
        return self._transformer

    async def stream_buffer(self) -> tuple[S3Client, StreamSettings]:
        self.settings.streams.require()
        return (await self.clients()).s3, self.settings.streams

    def close(self) -> None:
        """Close the clients and the loop; safe to call more than once."""
        clients, self._clients = self._clients, None
        self._loader, self._transformer, self._api, self._sweeper = None, None, None, None
        if clients is not None:
            self._runner.run(clients.aclose())
        self._runner.close()


def make_loader(settings: Settings, clients: Clients) -> Loader:
    """The loader, reporting to the run ledger when its tables are configured."""
    from worker.loader.pipeline import Loader

    tracker = None
    if settings.ledger.enabled:
        from worker.ledger.store import Store
        from worker.ledger.tracker import LedgerTracker

        tracker = LedgerTracker(Store(clients.dynamodb, settings.ledger))
    return Loader(settings, clients, tracker=tracker)


def make_ledger(settings: Settings, clients: Clients, *, dispatch: bool = True) -> Ledger:
    """The ledger's operations over the container's clients; its settings checked first."""
    from worker.core.fetch import Fetcher, Secrets
    from worker.ledger.runs import Ledger
    from worker.ledger.store import Store

    settings.ledger.require(dispatch=dispatch)
    store = Store(clients.dynamodb, settings.ledger)
    acquire = settings.acquire
    fetcher = Fetcher(acquire, Secrets(clients.secrets, acquire.secret_prefix))  # manifests
    clients.on_close(fetcher.aclose)
    return Ledger(
        store, clients.s3, clients.sqs, source_buckets=settings.source_buckets, fetcher=fetcher
    )


def make_api(settings: Settings, clients: Clients) -> Api:
    """The ledger's API over the container's clients."""
    from worker.ledger.api import Api
    from worker.ledger.store import table_health

    return Api(
        make_ledger(settings, clients), lambda: table_health(clients.dynamodb, settings.ledger)
    )
