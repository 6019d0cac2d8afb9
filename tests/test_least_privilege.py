"""Least privilege, proven: every AWS call each component makes is granted to its role in
deploy/template.yaml, and every grant is used (issue: deployment as code).

Each component runs here as it runs in AWS (the Lambda routes through the real
handler, the ECS poller through ``Poller``), against moto, while every call is
recorded: the SDK's through ``AioBaseClient._make_api_call``, the fast
BatchWriteItem path through ``DynamoDBHttp.batch_write_item``. Each call is
mapped to its IAM action and checked against the role of the component that
made it. Grants that only AWS services use (an event source mapping reading a
queue or stream, an on-failure destination, Firehose itself) are named by
their statement ids and left out of the "every grant is used" half.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import gzip
import os
import re
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import orjson
import pytest
from aiobotocore.client import AioBaseClient
from aiohttp import web

from tests import factories as f
from tests.conftest import BUCKET
from tests.fault_proxy import ForwardingProxy, S3Faults
from tests.processes import ROOT
from tests.test_deploy import expand
from tests.vendor import Vendor, entry
from worker.core.config import (
    AcquireSettings,
    FirehoseSettings,
    LedgerSettings,
    PollSettings,
    Settings,
    StreamSettings,
)
from worker.entry.runtime import make_loader
from worker.ledger.store import setup_tables
from worker.loader.ddb_http import DynamoDBHttp
from worker.loader.poller import Poller

ROLE: contextvars.ContextVar[str] = contextvars.ContextVar("role", default="unattributed")
RAW = "raw-parts"
# used by AWS on the role's behalf (DecryptSource: S3 calls KMS for an SSE-KMS object)
# (LandingMisses: S3 reads ListBucket to answer a missing key 404 rather than 403)
SERVICE_SIDS = {"ConsumeQueue", "ReadStream", "OnFailure", "DecryptSource", "LandingMisses"}
LANDING = "landing-files"
SECRET = "worker/acquire/vendor"
ROLES = ("LoaderFunctionRole", "LoaderTaskRole", "ApiFunctionRole", "StreamsFunctionRole",
         "FirehoseTransformRole")  # fmt: skip


def iam_actions(service: str, operation: str, params: dict[str, Any]) -> set[str]:
    """The IAM actions one API call needs."""
    if service == "s3":
        if operation in ("GetObject", "HeadObject"):
            return {"s3:GetObjectVersion" if params.get("VersionId") else "s3:GetObject"}
        if operation in ("CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload"):
            return {"s3:PutObject"}
        if operation == "PutObject" and params.get("Tagging"):
            return {"s3:PutObject", "s3:PutObjectTagging"}
        return {"s3:ListBucket" if operation == "ListObjectsV2" else f"s3:{operation}"}
    if service == "dynamodb" and operation == "TransactWriteItems":  # no action of its own
        kinds = {next(iter(item)) for item in params["TransactItems"]}
        return {f"dynamodb:{kind}Item" for kind in kinds}
    if service == "sqs":
        return {f"sqs:{operation.removesuffix('Batch')}"}
    return {f"{service}:{operation}"}


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, set[str]]]:
    """IAM actions used, per role, while the test runs."""
    used: dict[str, set[str]] = defaultdict(set)
    sdk_call = AioBaseClient._make_api_call  # type: ignore[attr-defined]
    fast_call = DynamoDBHttp.batch_write_item

    async def record_sdk(self: AioBaseClient, operation: str, params: dict[str, Any]) -> Any:
        used[ROLE.get()] |= iam_actions(self.meta.service_model.service_name, operation, params)
        return await sdk_call(self, operation, params)

    async def record_fast(self: DynamoDBHttp, *, RequestItems: Any) -> Any:  # noqa: N803
        used[ROLE.get()].add("dynamodb:BatchWriteItem")
        return await fast_call(self, RequestItems=RequestItems)

    monkeypatch.setattr(AioBaseClient, "_make_api_call", record_sdk)
    monkeypatch.setattr(DynamoDBHttp, "batch_write_item", record_fast)
    yield used


def granted(template: dict[str, Any], role: str) -> tuple[set[str], set[str]]:
    """A role's actions: those the code may use, and those only AWS services use."""
    mine: set[str] = set()
    services: set[str] = set()
    for policy in template["Resources"][role]["Properties"].get("Policies", []):
        for statement in policy["PolicyDocument"]["Statement"]:
            if "Fn::If" in statement:  # an optional grant: the statement it would add
                statement = statement["Fn::If"][1]
            actions = (
                statement["Action"]
                if isinstance(statement["Action"], list)
                else [statement["Action"]]
            )
            (services if statement.get("Sid") in SERVICE_SIDS else mine).update(actions)
    return mine, services


def http_event(method: str, path: str, body: Any = None, **query: str) -> dict[str, Any]:
    return {
        "version": "2.0",
        "rawPath": path,
        "requestContext": {"http": {"method": method, "path": path}},
        "queryStringParameters": query,
        "headers": {},
        "body": None if body is None else orjson.dumps(body).decode(),
    }


def sqs_records(queue_url: str, count: int) -> list[dict[str, Any]]:
    sqs = boto3.client("sqs")
    got: list[Any] = []
    for _ in range(20):  # moto may answer with fewer than are there
        got += sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=count - len(got)).get(
            "Messages", []
        )
        if len(got) == count:
            break
    for message in got:
        sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    return [f.sqs_record(m["Body"], m["MessageId"]) for m in got]


def test_every_call_is_granted_to_its_role_and_every_grant_is_used(
    moto: str,
    calls: dict[str, set[str]],
    install_runtime: Callable[[Settings], Any],
    prefix: str,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s3, sqs = boto3.client("s3"), boto3.client("sqs")
    s3.create_bucket(Bucket=BUCKET)
    s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    s3.create_bucket(Bucket=RAW)
    queue = sqs.create_queue(QueueName=f"{prefix}-loads")["QueueUrl"]
    for day, tables in (("2026-11-21", ["a"]), ("2026-11-22", ["a", "b"]), ("2026-11-23", ["b"])):
        data = f.output_file(
            *[(t, ["id"], [[f"{day}-{t}"]]) for t in tables], file_id=f"{prefix}-{day}"
        )
        s3.put_object(Bucket=BUCKET, Key=f"raw/{day}/f.pb", Body=data)
    # file ids of their own: tests.plugins:fail_once remembers ids for the whole session
    data = f.output_file(("a", ["id"], [["v"]]), file_id=f"{prefix}-versioned")
    versioned = s3.put_object(Bucket=BUCKET, Key="v.pb", Body=data)
    ledger = LedgerSettings(run_table=f"{prefix}-runs", file_table=f"{prefix}-files",
                            dataset_table=f"{prefix}-datasets", loader_queue_url=queue)  # fmt: skip
    cache = f"{prefix}-cache"
    settings = Settings(
        schema_prefix=prefix, source_buckets=(BUCKET,), ledger=ledger,
        streams=StreamSettings(bucket=RAW), firehose=FirehoseSettings(cache_table=cache),
        poll=PollSettings(queue_url=queue, wait_s=1, retry_delay_s=0,
                          health_file=str(tmp_path / "hb")),
        acquire=AcquireSettings(landing_bucket=LANDING, allowed_hosts=("127.0.0.1",),
                                allow_http=True, allow_private=True),
    )  # fmt: skip
    ROLE.set("setup")  # what CloudFormation creates in AWS; `worker setup` here
    asyncio.run(_setup(ledger, cache))
    s3.create_bucket(Bucket=LANDING)
    boto3.client("secretsmanager").create_secret(Name=SECRET, SecretString='{"token": "t"}')
    context = f.LambdaContext()

    def submit(day: str, dataset: str = "d") -> dict[str, Any]:
        ROLE.set("ApiFunctionRole")  # a runtime keeps the context of its first event:
        api = install_runtime(settings)  # each phase gets a runtime of its own
        body = {"datasetName": dataset, "businessDate": day}
        return dict(orjson.loads(api(http_event("POST", "/runs", body), context)["body"]))

    # the API (ApiFunctionRole): a dataset, a run, listings, health, a refused cancel
    ROLE.set("ApiFunctionRole")
    api = install_runtime(settings)
    location = {"location": f"s3://{BUCKET}/raw/{{businessDate}}/"}
    assert api(http_event("PUT", "/datasets/d", location), context)["statusCode"] == 200
    assert api(http_event("GET", "/runs", status="dispatched"), context)["statusCode"] == 200
    assert api(http_event("GET", "/health"), context)["statusCode"] == 200
    assert submit("2026-11-21")["resolvedFiles"] == 1
    empty = submit("2026-11-24")  # no files: it ends at once, and cannot be cancelled
    assert api(http_event("POST", f"/runs/{empty['runId']}/cancel"), context)["statusCode"] == 409
    swept = api(f.scheduled_event(), context)  # the sweep, on its EventBridge schedule
    assert swept["open_runs"] == 1 and swept["stalled_files"] == 0

    # the loader as Lambda (LoaderFunctionRole): the run's file makes table a; an
    # object named by its version
    ROLE.set("LoaderFunctionRole")
    loader = install_runtime(settings)
    by_version = f.sqs_record(
        {"bucket": BUCKET, "key": "v.pb", "version_id": versioned["VersionId"]}
    )
    event = f.sqs_event(*sqs_records(queue, 1), by_version)
    assert loader(event, context) == {"batchItemFailures": []}

    # the loader on ECS (LoaderTaskRole): table a, made by another process, is read for
    # its tag; table b is new; one retryable failure comes first
    submit("2026-11-22")
    sqs.send_message(QueueUrl=queue, MessageBody=by_version["body"])
    ROLE.set("LoaderTaskRole")
    flaky = dataclasses.replace(settings, table_extract="tests.plugins:fail_once")
    stats = asyncio.run(_poll(flaky, until_deleted=2))
    assert stats.deleted == 2 and stats.failed >= 1

    # the Lambda loader again, in a new container: table b is read for its tag
    submit("2026-11-23")
    ROLE.set("LoaderFunctionRole")
    loader = install_runtime(settings)
    assert loader(f.sqs_event(*sqs_records(queue, 1)), context) == {"batchItemFailures": []}

    # acquisition: a vendor's manifest behind credentials, read by the API; one file
    # lands, the other (over a part, its checksum wrong) is aborted, by either loader
    with Vendor() as vendor:
        good = f.output_file(("a", ["id"], [["fetched"]]), file_id=f"{prefix}-fetched")
        vendor.serve("2026-11-25/good.pb", good)
        vendor.serve("2026-11-25/bad.bin", os.urandom(9 << 20))
        listing = [entry("good.pb", good), entry("bad.bin", b"", size=9 << 20)]
        vendor.serve("2026-11-25/m.json", orjson.dumps({"files": listing}))
        absolute = [{**e, "url": vendor.url(f"2026-11-25/{e['url']}")} for e in listing]
        s3.put_object(Bucket=BUCKET, Key="manifests/2026-11-26.json",
                      Body=orjson.dumps({"files": absolute}))  # fmt: skip
        ROLE.set("ApiFunctionRole")
        api = install_runtime(settings)
        for name, manifest in (
            ("h", vendor.url("{businessDate}/m.json")),
            ("m", f"s3://{BUCKET}/manifests/{{businessDate}}.json"),
        ):
            dataset = {"manifest": manifest, "secret": SECRET}
            assert (
                api(http_event("PUT", f"/datasets/{name}", dataset), context)["statusCode"] == 200
            )
        assert submit("2026-11-25", "h")["resolvedFiles"] == 2
        ROLE.set("LoaderFunctionRole")
        loader = install_runtime(settings)
        failed = loader(f.sqs_event(*sqs_records(queue, 2)), context)["batchItemFailures"]
        assert len(failed) == 1
        assert submit("2026-11-26", "m")["resolvedFiles"] == 2
        ROLE.set("LoaderTaskRole")
        stats = asyncio.run(_poll(settings, until_deleted=1))
        assert stats.deleted == 1 and stats.failed >= 1
    landed = s3.list_objects_v2(Bucket=LANDING)["Contents"]
    assert [o["Key"].rpartition("/")[2] for o in landed] == ["good.pb", "good.pb"]

    # the streams buffer (StreamsFunctionRole)
    ROLE.set("StreamsFunctionRole")
    streams = install_runtime(settings)
    event = {"Records": [f.stream_record(1, new={"v": {"N": "1"}})]}
    assert streams(event, context) == {"batchItemFailures": []}
    # a batch over two hours whose first part fails: the second is deleted again
    with S3Faults(moto, fail_key="/hour=10/") as faults:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", faults.url)
        streams = install_runtime(settings)
        hours = [
            f.stream_record(s, new={}, created_s=1_763_719_200 + 3600 * (s - 2)) for s in (2, 3)
        ]
        assert streams({"Records": hours}, context) == {
            "batchItemFailures": [{"itemIdentifier": "2"}]
        }
        assert faults.failed
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")

    # the Firehose transform (FirehoseTransformRole): claims, and a batch over 6 MB
    # whose last records give their claims back
    ROLE.set("FirehoseTransformRole")
    transform = install_runtime(settings)
    big = "x" * 1_000_000
    docs = [{"event_uuid": str(i), "event_name": "a.b", "created_at": 1_700_000_000, "pad": big}
            for i in range(7)]  # fmt: skip
    records = [f.firehose_record(doc) for doc in docs]
    out = transform(f.firehose_event(*records), context)
    assert [r["result"] for r in out["records"]].count("ProcessingFailed") >= 1

    template = expand()
    assert set(calls) <= {"setup", *ROLES}, set(calls) - set(ROLES)  # nothing unattributed
    for role in ROLES:
        mine, services = granted(template, role)
        assert calls[role] <= mine, f"{role} calls what it is not granted: {calls[role] - mine}"
        assert mine <= calls[role], f"{role} is granted what it never calls: {mine - calls[role]}"
        assert not services & calls[role], role


async def _setup(ledger: LedgerSettings, cache: str) -> None:
    from worker.core.aws import Clients
    from worker.firehose.transform import setup_cache_table

    async with Clients(max_in_flight=2) as clients:
        await setup_tables(clients.dynamodb, ledger)
        await setup_cache_table(clients.dynamodb, cache)


async def _poll(settings: Settings, *, until_deleted: int) -> Any:
    from worker.core.aws import Clients

    async with Clients(max_in_flight=2) as clients:
        poller = Poller(make_loader(settings, clients), clients.sqs, settings.poll, concurrency=1)
        running = asyncio.create_task(poller.run())
        for _ in range(300):
            if poller.stats.deleted >= until_deleted or running.done():
                break
            await asyncio.sleep(0.1)
        poller.stop()
        return await running


class S3Recorder(ForwardingProxy):
    """In front of moto's S3: every request, as (method, path, query), whoever sends
    it (the SDK, or delta-rs' object store, which no SDK patch sees)."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.requests: list[tuple[str, str, dict[str, str]]] = []

    async def _handle(self, request: web.Request) -> web.Response:
        if request.method == "POST" and "delete" in request.query:  # DeleteObjects: the keys
            body = await request.read()  # cached: forwarded as it came
            for key in re.findall(rb"<Key>(.*?)</Key>", body):
                self.requests.append(("DELETE", f"{request.path}/{key.decode()}", {}))
        else:
            self.requests.append((request.method, request.path, dict(request.query)))
        if request.method != "HEAD":
            return await super()._handle(request)
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with self._session.head(self.upstream + request.path_qs, headers=headers) as answer:
            kept = {k: v for k, v in answer.headers.items()  # Content-Length: the object's size
                    if k.lower() not in ("connection", "transfer-encoding")}  # fmt: skip
            return web.Response(status=answer.status, headers=kept)


def s3_action(method: str, path: str, query: dict[str, str]) -> tuple[str, str]:
    """The IAM action of one path-style S3 request, and the key (or list prefix) it names."""
    _, _, rest = path.lstrip("/").partition("/")
    if not rest:  # the bucket itself
        return "s3:ListBucket", query.get("prefix", "")
    if method in ("GET", "HEAD"):
        return "s3:GetObject", rest
    if method == "DELETE":
        return ("s3:AbortMultipartUpload" if "uploadId" in query else "s3:DeleteObject"), rest
    return "s3:PutObject", rest  # PUT, and the multipart POSTs


MAINTAIN_NOW = """
import sys
from worker.cdc.lake import storage_options_for
from worker.cdc.maintain import maintain
from worker.core.config import Settings
settings = Settings.from_env()
maintain(sys.argv[1], retention_hours=0, tombstone_retention_hours=1,
         storage_options=storage_options_for(sys.argv[1], settings.aws))
"""


def test_the_scheduled_lake_tasks_call_only_what_their_role_grants_and_use_every_grant(
    moto: str,
) -> None:
    """``worker lake apply --metrics`` (three scheduled runs, a part more each time) and
    ``lake maintain`` (with retention 0, so vacuum deletes), each a process of its
    own as the LakeTaskRole runs it, the table in the raw bucket: every S3 request
    in the source or table prefix, every action granted, every grant used. delta-rs
    holds the GIL while it waits on S3, hence the processes."""
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=RAW)
    source_prefix, table_prefix = "cdc/orders", "lake/orders"
    changes = [("a", 1), ("b", 2), ("a", None)]
    with S3Recorder(moto) as recorder:
        env = {**os.environ, "AWS_ENDPOINT_URL_S3": recorder.url, "LOG_LEVEL": "INFO"}
        source, target = f"s3://{RAW}/{source_prefix}", f"s3://{RAW}/{table_prefix}"
        for n, (key, value) in enumerate(changes):  # three scheduled runs, a part more each
            change = {
                "event_id": f"e{n}",
                "keys": {"id": key},
                "is_deleted": value is None,
                "new_image": None if value is None else {"id": key, "v": value},
                "sequence_number": str(100 + n),
                "approx_creation_time_ms": 1_000 * n,
            }
            part = f"{source_prefix}/dt=2026-11-29/hour=0{n}/part-{n}.json.gz"
            s3.put_object(Bucket=RAW, Key=part, Body=gzip.compress(orjson.dumps(change)))
            applied = run_worker(env, "lake", "apply", "--metrics", "--source", source,
                                 "--target", target)  # fmt: skip
            assert applied.returncode == 0, applied.stderr
            assert '"PartsApplied":1' in applied.stderr and '"ApplyFailures":0' in applied.stderr
        maintained = subprocess.run(
            [sys.executable, "-c", MAINTAIN_NOW, target],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert maintained.returncode == 0, maintained.stderr
    actions: set[str] = set()
    for method, path, query in recorder.requests:
        action, key = s3_action(method, path, query)
        assert path.startswith(f"/{RAW}"), path
        within = key.startswith(table_prefix) or (
            action in ("s3:GetObject", "s3:ListBucket") and key.startswith(source_prefix)
        )
        assert within, f"{method} {path} {query} is outside the lake's prefixes"
        actions.add(action)
    mine, _ = granted(expand(), "LakeTaskRole")
    assert actions <= mine, f"LakeTaskRole calls what it is not granted: {actions - mine}"
    assert mine <= actions, f"LakeTaskRole is granted what it never calls: {mine - actions}"


def run_worker(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
