"""``worker demo`` (``make demo``): the whole job against an embedded local AWS.

It starts moto's server on loopback, makes a bucket, a queue with a DLQ
(maxReceiveCount 2), and sample files; sends messages in every body format
plus one bad one; runs the poller until the queue is drained; then reads back
what landed. Then the CDC path: a few changes to a table with a stream, the
stream turned into S3 parts, and the parts applied to a local Delta table,
read back. It exits 0 only when every table holds exactly its rows, the bad
message reached the DLQ and the Delta table equals the source; it leaves
nothing running. Between the two, the ledger: runs submitted over HTTP to the
ledger's API, loaded by the poller, ending by themselves (``demo_ledger``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import os
import tempfile
import time
from typing import Any
from urllib.parse import quote_plus

import orjson

from worker.cdc.buffer import handle_stream_batch, record_from_sdk
from worker.cdc.lake import apply_changes, read_table
from worker.core.aws import Clients
from worker.core.config import Settings
from worker.entry.demo_ledger import ledger_demo
from worker.entry.sample import sample_file
from worker.loader.pipeline import Loader
from worker.loader.poller import Poller

BUCKET = "demo-input"
PREFIX = "demo"
# file key -> (table names, seed, gzip)
FILES: dict[str, tuple[list[str], int, bool]] = {
    "drops/2026-11-21/part one.pb": (["orders", "payments"], 1, False),
    "drops/2026-11-21/part-two.pb.gz": (["customers"], 2, True),
    "drops/2026-11-21/part-three.pb": (["events", "sessions"], 3, False),
}


def run_demo(*, rows: int) -> int:
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        print("worker demo needs moto (the dev extra): run `make demo`")
        return 2
    import logging

    import uvloop

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        with tempfile.TemporaryDirectory() as scratch:
            _point_at_local_aws(f"http://{host}:{port}", scratch)
            settings = Settings.from_env()
            settings = dataclasses.replace(
                settings,
                schema_prefix=PREFIX,
                poll=dataclasses.replace(
                    settings.poll,
                    wait_s=1,
                    retry_delay_s=1,
                    shutdown_grace_s=5,
                    health_file=os.path.join(scratch, "health"),
                ),
            )
            return uvloop.run(_demo(settings, rows))
    finally:
        server.stop()


def _point_at_local_aws(endpoint: str, scratch: str) -> None:
    """The demo is an entry point: it alone may set the environment botocore reads."""
    empty = os.path.join(scratch, "empty")
    open(empty, "w").close()
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="demo",
        AWS_SECRET_ACCESS_KEY="demo",
        AWS_REGION="us-east-1",
        AWS_CONFIG_FILE=empty,
        AWS_SHARED_CREDENTIALS_FILE=empty,
        AWS_EC2_METADATA_DISABLED="true",
    )
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_DYNAMODB"):
        os.environ.pop(name, None)


async def _demo(settings: Settings, rows: int) -> int:
    async with Clients.from_settings(settings) as clients:
        queue_url, dlq_url = await _make_queues(clients)
        expected = await _upload_files(clients, rows)
        bodies = _messages()
        for body in bodies.values():
            await clients.sqs.send_message(QueueUrl=queue_url, MessageBody=body)
        _section("sent", *(f"{kind:<22} {body[:90]}" for kind, body in bodies.items()))

        poll = dataclasses.replace(settings.poll, queue_url=queue_url)
        poller = Poller(Loader(settings, clients), clients.sqs, poll, concurrency=4)
        started = time.perf_counter()
        running = asyncio.create_task(poller.run())
        await _wait_until_drained(clients, queue_url, dlq_url)
        poller.stop()
        await running
        seconds = time.perf_counter() - started
        loaded = await _report(clients, expected, dlq_url, poller, seconds)
        runs_ok, lines = await ledger_demo(clients, settings, BUCKET, queue_url)
        _section("ledger runs", *lines, "result: OK" if runs_ok else "result: MISMATCH")
        captured = await _cdc(clients, settings)
        return loaded or captured or int(not runs_ok)


async def _make_queues(clients: Clients) -> tuple[str, str]:
    await clients.s3.create_bucket(Bucket=BUCKET)
    dlq_url = (await clients.sqs.create_queue(QueueName="demo-loads-dlq"))["QueueUrl"]
    dlq_arn = (
        await clients.sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])
    )["Attributes"]["QueueArn"]
    redrive = orjson.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "2"}).decode()
    queue = await clients.sqs.create_queue(
        QueueName="demo-loads",
        Attributes={"VisibilityTimeout": "3", "RedrivePolicy": redrive},
    )
    return queue["QueueUrl"], dlq_url


async def _upload_files(clients: Clients, rows: int) -> dict[str, int]:
    expected: dict[str, int] = {}
    for key, (names, seed, zipped) in FILES.items():
        message = sample_file(rows=rows, tables=len(names), seed=seed, names=names)
        data = message.SerializeToString()
        await clients.s3.put_object(
            Bucket=BUCKET, Key=key, Body=gzip.compress(data) if zipped else data
        )
        for table in message.tables:
            expected[f"{PREFIX}_{table.name}"] = len(table.rows)
    _section("uploaded", *(f"s3://{BUCKET}/{key}" for key in FILES))
    return expected


def _messages() -> dict[str, str]:
    one, two, three = FILES
    docs: dict[str, Any] = {
        "plain": {"bucket": BUCKET, "key": one},
        "s3 notification": {  # the same file again: a redelivery must not duplicate rows
            "Records": [
                {
                    "eventName": "ObjectCreated:Put",
                    "s3": {"bucket": {"name": BUCKET}, "object": {"key": quote_plus(one)}},
                }
            ]
        },
        "sns envelope": {
            "Type": "Notification",
            "Message": orjson.dumps({"bucket": BUCKET, "key": two}).decode(),
        },
        "eventbridge": {
            "detail-type": "Object Created",
            "source": "aws.s3",
            "detail": {"bucket": {"name": BUCKET}, "object": {"key": three}},
        },
        "s3 test event": {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": BUCKET},
        "bad: missing object": {"bucket": BUCKET, "key": "drops/does-not-exist.pb"},
    }
    return {kind: orjson.dumps(doc).decode() for kind, doc in docs.items()}


async def _wait_until_drained(clients: Clients, queue_url: str, dlq_url: str) -> None:
    names: list[Any] = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        main = await clients.sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=names)
        dead = await clients.sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=names)
        left = sum(int(v) for v in main["Attributes"].values())
        if left == 0 and int(dead["Attributes"]["ApproximateNumberOfMessages"]) > 0:
            return
        await asyncio.sleep(0.5)


async def _report(
    clients: Clients, expected: dict[str, int], dlq_url: str, poller: Poller, seconds: float
) -> int:
    ok = True
    lines = []
    for table, want in sorted(expected.items()):
        have = await _count(clients, table)
        ok &= have == want
        lines.append(f"{table:<16} {have:>8,} items (expected {want:,})")
    _section("DynamoDB tables", *lines)

    page = await clients.dynamodb.scan(TableName=f"{PREFIX}_orders", Limit=2)
    _section("a few items", *(orjson.dumps(item).decode()[:160] for item in page["Items"]))

    dead = await clients.sqs.receive_message(
        QueueUrl=dlq_url, MaxNumberOfMessages=10, MessageSystemAttributeNames=["All"]
    )
    dead_bodies = [m["Body"] for m in dead.get("Messages", [])]
    ok &= len(dead_bodies) == 1 and "does-not-exist" in dead_bodies[0]
    _section("dead-letter queue", *dead_bodies)

    stats = poller.stats
    _section(
        "summary",
        f"messages received {stats.received} (redeliveries included), deleted "
        f"{stats.deleted}, failed attempts {stats.failed}",
        f"rows written {poller.rows_written:,}; queue drained in {seconds:.1f}s "
        "(the bad message waits out its visibility timeout twice)",
        "result: OK" if ok else "result: MISMATCH",
    )
    return 0 if ok else 1


async def _count(clients: Clients, table: str) -> int:
    total, start_key = 0, None
    while True:
        extra: dict[str, Any] = {"ExclusiveStartKey": start_key} if start_key else {}
        page = await clients.dynamodb.scan(TableName=table, Select="COUNT", **extra)
        total += page["Count"]
        start_key = page.get("LastEvaluatedKey")
        if not start_key:
            return total


async def _cdc(clients: Clients, settings: Settings) -> int:
    """DynamoDB Streams -> S3 parts -> Delta table, on a small table of its own."""
    table, lake = "demo_accounts", "demo-lake"
    await clients.s3.create_bucket(Bucket=lake)
    created = await clients.dynamodb.create_table(
        TableName=table,
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
    )
    stream_arn = created["TableDescription"]["LatestStreamArn"]
    changes: list[tuple[str, str, dict[str, Any]]] = [
        ("put", "alice", {"balance": {"N": "100"}, "tier": {"S": "gold"}}),
        ("put", "bob", {"balance": {"N": "20.5"}}),
        ("put", "carol", {"balance": {"N": "7"}, "tags": {"SS": ["new", "vip"]}}),
        ("put", "alice", {"balance": {"N": "80"}, "tier": {"S": "gold"}}),
        ("delete", "bob", {}),
    ]
    for action, key, attributes in changes:
        if action == "put":
            item = {"id": {"S": key}, **attributes}
            await clients.dynamodb.put_item(TableName=table, Item=item)
        else:
            await clients.dynamodb.delete_item(TableName=table, Key={"id": {"S": key}})
    _section("CDC: changes made", *(f"{a} {k} {orjson.dumps(v).decode()}" for a, k, v in changes))

    records = await _stream_records(stream_arn, settings.region)
    streams = dataclasses.replace(settings.streams, bucket=lake, prefix="cdc")
    report = await handle_stream_batch(clients.s3, records, streams)
    listed = await clients.s3.list_objects_v2(Bucket=lake, Prefix="cdc/")
    _section(
        "CDC: stream parts in S3",
        *(f"s3://{lake}/{o['Key']} ({o['Size']} bytes)" for o in listed.get("Contents", [])),
    )

    with tempfile.TemporaryDirectory() as scratch:
        target = os.path.join(scratch, table)
        source = f"s3://{lake}/cdc/{table}"
        result = await apply_changes(clients.s3, source, target)
        again = await apply_changes(clients.s3, source, target)
        # bob's first put comes back late, alone (a retried upload, a replay): a new part
        bob = next(r for r in records if r["dynamodb"]["Keys"]["id"]["S"] == "bob")
        await handle_stream_batch(clients.s3, [bob], streams)
        replay = await apply_changes(clients.s3, source, target)
        rows = await asyncio.to_thread(read_table, target)
    shown = [
        orjson.dumps({k: v for k, v in r.items() if v is not None}, default=str).decode()
        for r in sorted(rows, key=lambda r: r["id"])
    ]
    _section(
        "CDC: Delta table after `lake apply`",
        *shown,
        f"applied {len(result.parts)} part(s); a second apply found {len(again.parts)} new",
        f"bob's old put delivered again: {replay.refused} change refused by bob's tombstone",
    )
    final = {row["id"]: row.get("balance") for row in rows}
    ok = report.failed_from is None and final == {"alice": 80, "carol": 7} and not again.parts
    ok = ok and replay.refused == 1
    _section("CDC result", "OK" if ok else "MISMATCH")
    return 0 if ok else 1


async def _stream_records(stream_arn: str, region: str | None) -> list[dict[str, Any]]:
    import aioboto3

    records: list[dict[str, Any]] = []
    async with aioboto3.Session(region_name=region).client("dynamodbstreams") as streams:
        shards = (await streams.describe_stream(StreamArn=stream_arn))["StreamDescription"]
        for shard in shards["Shards"]:
            iterator = (
                await streams.get_shard_iterator(
                    StreamArn=stream_arn,
                    ShardId=shard["ShardId"],
                    ShardIteratorType="TRIM_HORIZON",
                )
            )["ShardIterator"]
            page = await streams.get_records(ShardIterator=iterator, Limit=1000)
            records.extend(record_from_sdk(dict(r), stream_arn) for r in page["Records"])
    return records


def _section(title: str, *lines: str) -> None:
    print(f"\n== {title}")
    for line in lines:
        print(f"   {line}")
