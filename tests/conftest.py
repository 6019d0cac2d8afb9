"""Shared fixtures: moto's server over HTTP, dynalite, the fault proxy, clients."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import boto3
import orjson
import pytest
from moto.server import ThreadedMotoServer
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from tests.fault_proxy import FaultProxy
from worker.core.aws import Clients
from worker.core.backoff import Backoff
from worker.core.config import LedgerSettings, Settings, WritePath, WriteSettings
from worker.entry.runtime import make_api
from worker.ledger.api import Api, Request
from worker.ledger.store import setup_tables
from worker.loader.ddb_http import BatchWriteClient, batch_write_client
from worker.loader.pipeline import Loader
from worker.loader.tables import OWNER_TAG

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "input"
_names = itertools.count()


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test reads real credentials or config, nor talks to a real endpoint."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    empty = tmp_path_factory.mktemp("aws") / "empty"
    empty.write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    """Every structured log entry of the test, with its bound context variables."""
    with capture_logs(processors=[merge_contextvars]) as entries:
        yield cast(list[dict[str, Any]], entries)


def events(entries: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in entries if e["event"] == name]


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def moto(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A reset moto, set as the endpoint of every service."""
    request = urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST")
    urllib.request.urlopen(request, timeout=10).close()
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    return moto_server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def dynalite_server() -> Iterator[str]:
    binary = ROOT / "node_modules" / ".bin" / "dynalite"
    node = shutil.which("node")
    assert node and binary.exists(), "dynalite missing: run `make install`"
    port = _free_port()
    process = subprocess.Popen(
        [str(binary), "--host", "127.0.0.1", "--port", str(port), "--createTableMs", "100"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("dynalite did not start") from None
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(10)


@pytest.fixture(params=["moto", "dynalite"])
def dynamodb(request: pytest.FixtureRequest, moto: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The DynamoDB endpoint under test: moto, or dynalite (which behaves as AWS does)."""
    url = moto if request.param == "moto" else request.getfixturevalue("dynalite_server")
    monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", url)
    return url


@pytest.fixture
def proxy(dynamodb: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """The fault proxy in front of the DynamoDB under test, set as its endpoint."""
    with FaultProxy(dynamodb) as fault_proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", fault_proxy.url)
        yield fault_proxy


@pytest.fixture
def prefix() -> str:
    """A schema prefix unique to the test, so tests never share a table."""
    return f"t{next(_names)}_{os.getpid()}"


@pytest.fixture
def settings(prefix: str, write_path: WritePath) -> Settings:
    return Settings(
        schema_prefix=prefix,
        write=WriteSettings(
            path=write_path,
            max_in_flight=8,
            backoff=Backoff(base_s=0.001, cap_s=0.02, attempts=25),
        ),
        table_active_timeout_s=30,
    )


def window_alone(settings: Settings) -> Settings:
    """WRITE_PACE=window, for tests whose refusals are drawn at random whatever
    the rate: those hold a table's pace low, as a fleet's would (writer.py)."""
    return dataclasses.replace(settings, write=dataclasses.replace(settings.write, pace="window"))


@pytest.fixture
def s3(moto: str) -> Any:
    client = boto3.client("s3", endpoint_url=moto)
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture
def ddb(dynamodb: str) -> Any:
    """A sync client on the DynamoDB under test itself (never through the proxy)."""
    return boto3.client("dynamodb", endpoint_url=dynamodb)


def own(client: Any, table: str) -> None:
    """Wait for ``table`` to be ACTIVE and tag it as the loader's, as if it had made it."""
    client.get_waiter("table_exists").wait(TableName=table, WaiterConfig={"Delay": 0.1})
    arn = client.describe_table(TableName=table)["Table"]["TableArn"]
    client.tag_resource(ResourceArn=arn, Tags=[OWNER_TAG])


def scan(client: Any, table: str) -> list[dict[str, Any]]:
    """Every item of ``table``, in wire form, following pagination."""
    items: list[dict[str, Any]] = []
    for page in client.get_paginator("scan").paginate(TableName=table):
        items.extend(page["Items"])
    return items


@pytest.fixture
def write_path() -> WritePath:
    """The BatchWriteItem path; modules that test writing run both (DDB_WRITE_PATH)."""
    return "fast"


@pytest.fixture
async def clients(moto: str) -> AsyncIterator[Clients]:
    async with Clients(max_in_flight=8) as opened:
        yield opened


@pytest.fixture
async def batch_writes(clients: Clients, write_path: WritePath) -> BatchWriteClient:
    """The BatchWriteItem client of the path under test."""
    return batch_write_client(clients, write_path)


@pytest.fixture
async def loader(settings: Settings, clients: Clients) -> Loader:
    return Loader(settings, clients)


@pytest.fixture
def install_runtime() -> Iterator[Callable[[Settings], Callable[..., Any]]]:
    """Give ``lambda_entry`` a runtime built from the given settings; returns its handler."""
    import lambda_entry
    from worker.entry.runtime import Runtime

    runtimes: list[Runtime] = []

    def install(settings: Settings) -> Callable[..., Any]:
        runtime = Runtime(settings)
        runtimes.append(runtime)
        lambda_entry._runtime = runtime
        return lambda_entry.handler

    yield install
    lambda_entry._runtime = None
    for runtime in runtimes:
        runtime.close()


# --- the run ledger ----------------------------------------------------------------------

Call = Callable[..., Awaitable[tuple[int, dict[str, Any]]]]


@pytest.fixture
async def ledger_settings(moto: str, settings: Settings, prefix: str) -> Settings:
    sqs = boto3.client("sqs")
    dlq = sqs.create_queue(QueueName=f"{prefix}-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]
    policy = {"deadLetterTargetArn": dlq_arn["QueueArn"], "maxReceiveCount": "3"}
    queue = sqs.create_queue(
        QueueName=f"{prefix}-loads", Attributes={"RedrivePolicy": orjson.dumps(policy).decode()}
    )["QueueUrl"]
    ledger = LedgerSettings(
        run_table=f"{prefix}-runs",
        file_table=f"{prefix}-files",
        dataset_table=f"{prefix}-datasets",
        loader_queue_url=queue,
        max_receives=3,
    )
    async with Clients(max_in_flight=4) as clients:
        await setup_tables(clients.dynamodb, ledger)
    return dataclasses.replace(settings, ledger=ledger)


@pytest.fixture
def api(ledger_settings: Settings, clients: Clients) -> Api:
    return make_api(ledger_settings, clients)


@pytest.fixture
def call(api: Api) -> Call:
    async def request(
        method: str, path: str, body: Any = None, *, raw: bytes | None = None, **query: str
    ) -> tuple[int, dict[str, Any]]:
        headers = {k.replace("_", "-"): v for k, v in query.items() if k == "idempotency_key"}
        query = {k: v for k, v in query.items() if k != "idempotency_key"}
        data = raw if raw is not None else (b"" if body is None else orjson.dumps(body))
        return await api.handle(Request(method, path, query, headers, data))

    return request


LAKE = "lake"  # the CDC tests' bucket: stream parts, exports


@pytest.fixture
def lake(moto: str, install_runtime: Callable[[Settings], Any]) -> Callable[..., None]:
    """The lake bucket, and a way to give the handler its stream settings."""
    from worker.core.config import StreamSettings

    boto3.client("s3", endpoint_url=moto).create_bucket(Bucket=LAKE)
    return lambda **streams: install_runtime(
        Settings(streams=StreamSettings(bucket=LAKE, **streams))
    )
