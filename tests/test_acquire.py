"""Acquisition: a run of an HTTP(S) dataset, its files fetched into the landing
bucket, verified, then loaded; every file through pending -> fetched ->
verified -> preprocessed (or failed, with the reason). A vendor's server on
loopback, moto over HTTP."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import boto3
import orjson
import pytest

from tests import factories as f
from tests.conftest import BUCKET, Call, scan
from tests.processes import ROOT
from tests.test_ledger import load, receive_all
from tests.vendor import Vendor, entry, md5_b64, redirect, sha256_b64, status
from worker.core.aws import Clients
from worker.core.backoff import Backoff
from worker.core.config import AcquireSettings, Settings
from worker.core.tracking import TrackedFile
from worker.entry.runtime import make_api
from worker.ledger.api import Request
from worker.ledger.store import Store
from worker.ledger.tracker import LedgerTracker
from worker.loader.verify import Expected

DATASET = "quotes"
DAY = "2026-11-21"
LANDING = "landing"


@pytest.fixture
def vendor() -> Iterator[Vendor]:
    with Vendor() as server:
        yield server


@pytest.fixture
def acquiring(ledger_settings: Settings, s3: Any) -> Settings:
    s3.create_bucket(Bucket=LANDING)
    acquire = AcquireSettings(
        landing_bucket=LANDING, allowed_hosts=("127.0.0.1",), allow_http=True,
        allow_private=True, read_timeout_s=2, deadline_s=30,
        backoff=Backoff(base_s=0.01, cap_s=0.05, attempts=3),
    )  # fmt: skip
    return dataclasses.replace(ledger_settings, acquire=acquire)


@pytest.fixture
async def acall(acquiring: Settings, clients: Clients) -> Call:
    api = make_api(acquiring, clients)

    async def request(method: str, path: str, body: Any = None, **query: str) -> Any:
        data = b"" if body is None else orjson.dumps(body)
        return await api.handle(Request(method, path, query, {}, data))

    return request


def quote_file(index: int, rows: int = 3) -> bytes:
    return f.output_file(
        ("quotes", ["id", "px"], [[f"{index}-{r}", r] for r in range(rows)]), file_id=str(index)
    )


async def run_dataset(call: Call, settings: Settings, dataset: dict[str, Any]) -> dict[str, Any]:
    """Register ``dataset``, submit a run, load every message once: the run and its files."""
    status_code, body = await call("PUT", f"/datasets/{DATASET}", dataset)
    assert status_code == 200, body
    status_code, run = await call("POST", "/runs", {"datasetName": DATASET, "businessDate": DAY})
    assert status_code == 201, run
    await load(settings, receive_all(settings.ledger.loader_queue_url, run["resolvedFiles"]))
    return await ended(call, run["runId"])


async def ended(call: Call, run_id: str) -> dict[str, Any]:
    run = (await call("GET", f"/runs/{run_id}"))[1]
    run["files"] = (await call("GET", f"/runs/{run_id}/files"))[1]["items"]
    return run


def landed(s3: Any) -> tuple[list[str], list[str]]:
    """The landing bucket's objects, and its multipart uploads still open."""
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=LANDING).get("Contents", [])]
    uploads = [u["Key"] for u in s3.list_multipart_uploads(Bucket=LANDING).get("Uploads", [])]
    return keys, uploads


def rows_in(prefix: str) -> list[str]:
    return sorted(item["id"]["S"] for item in scan(boto3.client("dynamodb"), f"{prefix}_quotes"))


def walked_the_lifecycle(item: dict[str, Any], data: bytes) -> None:
    assert item["status"] == "preprocessed", item
    assert item["fetchedAt"] <= item["verifiedAt"] <= item["lastUpdated"]
    assert item["fileSize"] == len(data)
    assert item["checksum"] == f"sha256:{hashlib.sha256(data).hexdigest()}"


async def test_a_dataset_of_three_https_files_runs_to_success(
    vendor: Vendor, acquiring: Settings, acall: Call, s3: Any, prefix: str
) -> None:
    files = {index: quote_file(index) for index in range(3)}
    for index, data in files.items():
        vendor.serve(f"{DAY}/part-{index}.pb", data)
    templates = [vendor.url(f"{{businessDate}}/part-{index}.pb") for index in files]
    run = await run_dataset(acall, acquiring, {"files": templates})
    assert (run["status"], run["processedFiles"], run["resolvedFiles"]) == ("success", 3, 3)
    assert rows_in(prefix) == sorted(f"{i}-{r}" for i in files for r in range(3))
    by_location = {item["location"]: item for item in run["files"]}
    for index, data in files.items():
        walked_the_lifecycle(by_location[vendor.url(f"{DAY}/part-{index}.pb")], data)
    keys, uploads = landed(s3)
    assert len(keys) == 3 and uploads == []
    key = next(k for k in keys if k.endswith("part-0.pb"))
    assert key.startswith(f"{DATASET}/{DAY}/") and key.count("/") == 3
    assert s3.get_object(Bucket=LANDING, Key=key)["Body"].read() == files[0]
    tags = {t["Key"]: t["Value"] for t in s3.get_object_tagging(Bucket=LANDING, Key=key)["TagSet"]}
    assert tags["sha256"] == hashlib.sha256(files[0]).hexdigest() and tags["verified"] == "true"
    head = s3.head_object(Bucket=LANDING, Key=key)
    assert head["Metadata"]["source-url"] == vendor.url(f"{DAY}/part-0.pb")


async def test_a_manifest_with_checksums_runs_to_success(
    vendor: Vendor, acquiring: Settings, acall: Call, s3: Any, prefix: str
) -> None:
    files = {index: quote_file(index, rows=2) for index in range(3)}
    for index, data in files.items():
        vendor.serve(f"{DAY}/files/{index}.pb", data)
    s3.put_object(Bucket=BUCKET, Key="mirror/2.pb", Body=files[2])
    manifest = {"files": [
        entry("files/0.pb", files[0]),  # relative to the manifest's URL
        {"url": vendor.url(f"{DAY}/files/1.pb"), "md5": hashlib.md5(files[1]).hexdigest().upper()},
        entry(f"s3://{BUCKET}/mirror/2.pb", files[2]),  # an S3 file, verified too
    ], "generator": "vendor-tool 1.2"}  # fmt: skip
    vendor.serve(f"{DAY}/manifest.json", orjson.dumps(manifest))
    run = await run_dataset(
        acall, acquiring, {"manifest": vendor.url("{businessDate}/manifest.json")}
    )
    assert (run["status"], run["processedFiles"]) == ("success", 3), run
    assert rows_in(prefix) == sorted(f"{i}-{r}" for i in files for r in range(2))
    by_location = {item["location"]: item for item in run["files"]}
    walked_the_lifecycle(by_location[vendor.url(f"{DAY}/files/0.pb")], files[0])
    walked_the_lifecycle(by_location[vendor.url(f"{DAY}/files/1.pb")], files[1])
    walked_the_lifecycle(by_location[f"s3://{BUCKET}/mirror/2.pb"], files[2])
    assert len(landed(s3)[0]) == 2  # the S3 file is read where it is


async def test_a_plain_list_manifest_and_an_s3_manifest(
    vendor: Vendor, acquiring: Settings, acall: Call, s3: Any, prefix: str
) -> None:
    data = quote_file(7)
    vendor.serve("d/7.pb", data)
    s3.put_object(
        Bucket=BUCKET, Key=f"manifests/{DAY}.json", Body=orjson.dumps([vendor.url("d/7.pb")])
    )
    run = await run_dataset(
        acall, acquiring, {"manifest": f"s3://{BUCKET}/manifests/{{businessDate}}.json"}
    )
    assert run["status"] == "success"
    walked_the_lifecycle(run["files"][0], data)


BIG = 9 * 1024 * 1024  # over one part: a multipart upload, aborted on a mismatch


@pytest.mark.parametrize(
    ("lie", "size", "reason", "named"),
    [
        ({"sha256": "0" * 64}, 1000, "checksum_mismatch", "sha256"),
        ({"sha256": "0" * 64}, BIG, "checksum_mismatch", "sha256"),
        ({"md5": "0" * 32, "sha256": None}, 1000, "checksum_mismatch", "md5"),
        ({"size": 999}, 1000, "size_mismatch", "size"),
        ({"size": BIG - 1}, BIG, "size_mismatch", "size"),
    ],
)
async def test_a_file_that_is_not_what_its_manifest_says_fails_for_good_and_leaves_nothing(
    vendor: Vendor, acquiring: Settings, acall: Call, s3: Any,
    lie: dict[str, Any], size: int, reason: str, named: str,
) -> None:  # fmt: skip
    data = os.urandom(size)
    vendor.serve("x.pb", data)
    listed = {k: v for k, v in entry("x.pb", data, **lie).items() if v is not None}
    vendor.serve("manifest.json", orjson.dumps({"files": [listed]}))
    run = await run_dataset(acall, acquiring, {"manifest": vendor.url("manifest.json")})
    assert (run["status"], run["failedFiles"]) == ("failed", 1)
    (item,) = run["files"]
    error = item["error"]
    assert (item["status"], error["reason"], error["algorithm"]) == ("failed", reason, named)
    actual = {"sha256": hashlib.sha256(data).hexdigest(), "md5": hashlib.md5(data).hexdigest(),
              "size": size}[named]  # fmt: skip
    assert (error["expected"], error["actual"]) == (listed[named], actual)
    assert landed(s3) == ([], [])


async def test_the_servers_own_digest_is_checked_when_the_manifest_is_silent(
    vendor: Vendor, acquiring: Settings, acall: Call, s3: Any
) -> None:
    data = quote_file(1)
    vendor.serve("ok.pb", data, **{"Content-MD5": md5_b64(data)})
    vendor.serve("lies.pb", data, **{"Content-MD5": md5_b64(b"other bytes")})
    run = await run_dataset(
        acall, acquiring, {"files": [vendor.url("ok.pb"), vendor.url("lies.pb")]}
    )
    by_name = {item["location"].rpartition("/")[2]: item for item in run["files"]}
    walked_the_lifecycle(by_name["ok.pb"], data)
    assert by_name["lies.pb"]["error"]["reason"] == "checksum_mismatch"
    assert by_name["lies.pb"]["error"]["expected"] == hashlib.md5(b"other bytes").hexdigest()
    assert [k.rpartition("/")[2] for k in landed(s3)[0]] == ["ok.pb"]


async def test_an_s3_file_that_is_not_what_its_manifest_says_fails(
    vendor: Vendor, acquiring: Settings, acall: Call, s3: Any
) -> None:
    data = quote_file(3)
    s3.put_object(Bucket=BUCKET, Key="in/3.pb", Body=data)
    listed = entry(f"s3://{BUCKET}/in/3.pb", data, sha256="f" * 64)
    vendor.serve("manifest.json", orjson.dumps({"files": [listed]}))
    run = await run_dataset(acall, acquiring, {"manifest": vendor.url("manifest.json")})
    (item,) = run["files"]
    assert (item["status"], item["error"]["reason"]) == ("failed", "checksum_mismatch")
    assert s3.get_object(Bucket=BUCKET, Key="in/3.pb")["Body"].read() == data  # not ours to delete


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        ([status(404)], "fetch_failed"),
        ([redirect("http://elsewhere.example.com/x.pb")], "host_not_allowed"),
        ([redirect("http://169.254.169.254/latest/meta-data/")], "host_not_allowed"),
    ],
)
async def test_a_fetch_the_rules_refuse_fails_the_file_with_its_reason(
    vendor: Vendor, acquiring: Settings, acall: Call, s3: Any, script: list[Any], reason: str
) -> None:
    vendor.serve("x.pb", quote_file(1))
    vendor.then("x.pb", *script)
    run = await run_dataset(acall, acquiring, {"files": [vendor.url("x.pb")]})
    (item,) = run["files"]
    assert (item["status"], item["error"]["reason"]) == ("failed", reason)
    assert run["status"] == "failed" and landed(s3) == ([], [])


async def test_a_500_then_success_and_a_429_with_retry_after_load(
    vendor: Vendor, acquiring: Settings, acall: Call
) -> None:
    data = quote_file(1)
    vendor.serve("a.pb", data)
    vendor.serve("b.pb", quote_file(2))
    vendor.then("a.pb", status(500))
    vendor.then("b.pb", status(429, **{"Retry-After": "1"}))
    run = await run_dataset(acall, acquiring, {"files": [vendor.url("a.pb"), vendor.url("b.pb")]})
    assert (run["status"], run["processedFiles"]) == ("success", 2)
    assert vendor.hits["a.pb"] == vendor.hits["b.pb"] == 2


async def test_a_source_still_failing_is_noted_and_left_for_redelivery(
    vendor: Vendor, acquiring: Settings, acall: Call, s3: Any
) -> None:
    vendor.then("a.pb", *[status(503)] * 3)
    run = await run_dataset(acall, acquiring, {"files": [vendor.url("a.pb")]})
    (item,) = run["files"]
    assert (item["status"], item["error"]["reason"]) == ("pending", "fetch_unavailable")
    assert run["status"] == "dispatched" and landed(s3) == ([], [])


async def test_a_body_over_the_cap_fails_and_leaves_nothing(
    vendor: Vendor, acquiring: Settings, acall: Call, s3: Any
) -> None:
    capped = dataclasses.replace(acquiring, max_object_bytes=9 * 1024 * 1024)
    vendor.serve("told.pb", os.urandom(10 * 1024 * 1024))  # Content-Length says so
    vendor.streams["untold.pb"] = (None, lambda: iter([b"x" * (1 << 20)] * 10))  # chunked
    files = [vendor.url("told.pb"), vendor.url("untold.pb")]
    run = await run_dataset(acall, capped, {"files": files})
    assert [item["error"]["reason"] for item in run["files"]] == ["object_too_large"] * 2
    assert "passed MAX_OBJECT_BYTES" in orjson.dumps(run["files"]).decode()  # the stream's count
    assert landed(s3) == ([], [])


async def test_a_redelivery_after_the_landing_copy_is_verified_does_not_download_again(
    vendor: Vendor, acquiring: Settings, acall: Call, prefix: str
) -> None:
    data = quote_file(4)
    vendor.serve("a.pb", data)
    await acall("PUT", f"/datasets/{DATASET}", {"files": [vendor.url("a.pb")]})
    run = (await acall("POST", "/runs", {"datasetName": DATASET, "businessDate": DAY}))[1]
    (record,) = receive_all(acquiring.ledger.loader_queue_url, 1)
    flaky = dataclasses.replace(acquiring, table_extract="tests.plugins:always_transient")
    assert await load(flaky, [record]) == [record["messageId"]]
    verified = (await acall("GET", f"/runs/{run['runId']}/files", status="verified"))[1]["items"]
    assert [item["location"] for item in verified] == [vendor.url("a.pb")]
    record["attributes"]["ApproximateReceiveCount"] = "2"
    assert await load(acquiring, [record]) == []
    assert vendor.hits["a.pb"] == 1
    walked_the_lifecycle((await ended(acall, run["runId"]))["files"][0], data)
    assert rows_in(prefix) == ["4-0", "4-1", "4-2"]


@pytest.mark.parametrize(
    ("dataset", "says"),
    [
        ({"files": ["https://elsewhere.example.com/a.pb"]}, "not in ACQUIRE_ALLOWED_HOSTS"),
        ({"manifest": "http://127.0.0.1/m.json", "suffix": ".pb"}, "with location only"),
        ({"files": ["https://user:pw@127.0.0.1/a.pb"]}, "credentials"),
        ({"location": f"s3://{BUCKET}/x/", "manifest": "https://127.0.0.1/m"}, "exactly one"),
        ({"files": ["https://127.0.0.1/{datasetName!r}"]}, "may use only"),
        ({"files": ["https://127.0.0.1/a"], "secret": "has spaces"}, "secret"),
    ],
)
async def test_a_dataset_the_rules_refuse_is_400(
    acall: Call, dataset: dict[str, Any], says: str
) -> None:
    status_code, body = await acall("PUT", f"/datasets/{DATASET}", dataset)
    assert status_code == 400 and says in orjson.dumps(body).decode(), body


@pytest.mark.parametrize(
    ("manifest", "says"),
    [
        (b"not json", "is not a manifest"),
        (b'{"files": [{"url": 5}]}', "is not a manifest: files.0.url"),
        (b'{"files": [{"url": "ftp://x/y"}]}', "not https, http or s3"),
    ],
)
async def test_a_manifest_that_is_not_one_fails_the_run(
    vendor: Vendor, acquiring: Settings, acall: Call, manifest: bytes, says: str
) -> None:
    vendor.serve("m.json", manifest)
    await acall("PUT", f"/datasets/{DATASET}", {"manifest": vendor.url("m.json")})
    _, run = await acall("POST", "/runs", {"datasetName": DATASET, "businessDate": DAY})
    assert run["status"] == "failed", run
    assert run["error"]["reason"] == "dispatch_failed" and says in run["error"]["message"]


async def test_a_manifest_naming_a_host_not_allowed_fails_the_run_before_any_file(
    vendor: Vendor, acquiring: Settings, acall: Call
) -> None:
    vendor.serve("m.json", orjson.dumps(["https://elsewhere.example.com/a.pb"]))
    await acall("PUT", f"/datasets/{DATASET}", {"manifest": vendor.url("m.json")})
    _, run = await acall("POST", "/runs", {"datasetName": DATASET, "businessDate": DAY})
    assert (run["status"], run["error"]["reason"]) == ("failed", "host_not_allowed")
    assert receive_all(acquiring.ledger.loader_queue_url) == []


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Content-Length": "5"}, Expected(5, source="server")),
        ({"Digest": f"SHA-256={sha256_b64(b'abc')}, MD5={md5_b64(b'abc')}"},
         Expected(None, hashlib.sha256(b"abc").hexdigest(), hashlib.md5(b"abc").hexdigest(),
                  source="server")),
        ({"Repr-Digest": f"sha-256=:{sha256_b64(b'abc')}:"},
         Expected(None, hashlib.sha256(b"abc").hexdigest(), source="server")),
        ({"Content-MD5": "not base64!"}, Expected(source="server")),
        ({"Digest": "SHA-256=c2hvcnQ="}, Expected(source="server")),  # not 32 bytes
    ],
)  # fmt: skip
def test_the_server_s_word_is_read_from_its_headers(
    headers: dict[str, str], expected: Expected
) -> None:
    assert Expected().or_server(headers) == expected


def test_the_manifest_s_word_wins_over_the_server_s() -> None:
    manifest = Expected(3, sha256="a" * 64)
    told = {"Content-Length": "4", "Digest": f"SHA-256={sha256_b64(b'abc')}"}
    assert manifest.or_server(told) == manifest
    assert Expected(sha256="a" * 64).or_server(told) == Expected(
        4, "a" * 64, source="manifest and server"
    )


async def test_a_later_run_of_the_date_downloads_again(
    vendor: Vendor, acquiring: Settings, acall: Call
) -> None:
    """The landing copy is this run's: a superseding run does not trust an older one."""
    vendor.serve("a.pb", quote_file(1))
    first = await run_dataset(acall, acquiring, {"files": [vendor.url("a.pb")]})
    vendor.serve("a.pb", quote_file(2))  # republished
    _, run = await acall("POST", "/runs", {"datasetName": DATASET, "businessDate": DAY})
    await load(acquiring, receive_all(acquiring.ledger.loader_queue_url, 1))
    second = await ended(acall, run["runId"])
    assert first["status"] == second["status"] == "success" and vendor.hits["a.pb"] == 2
    walked_the_lifecycle(second["files"][0], quote_file(2))


async def test_a_late_message_never_moves_an_ended_file_back_to_verified(
    vendor: Vendor, acquiring: Settings, acall: Call
) -> None:
    vendor.serve("a.pb", quote_file(1))
    run = await run_dataset(acall, acquiring, {"files": [vendor.url("a.pb")]})
    (item,) = run["files"]
    async with Clients(max_in_flight=4) as clients:
        tracker = LedgerTracker(Store(clients.dynamodb, acquiring.ledger))
        await tracker.verified(TrackedFile(run["runId"], item["fileId"]), 1, "sha256:late")
    (after,) = (await ended(acall, run["runId"]))["files"]
    assert (after["status"], after["checksum"]) == ("preprocessed", item["checksum"])


CHILD = """
import asyncio, json, sys, time
from worker.core.aws import Clients
from worker.core.config import AcquireSettings
from worker.core.fetch import Fetcher
from worker.loader.landing import Landing
from worker.loader.verify import Expected

def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

async def noop():
    return None

async def main(small, big, size):
    rules = AcquireSettings(allowed_hosts=("127.0.0.1",), allow_http=True, allow_private=True)
    async with Clients(max_in_flight=4) as clients:
        landing = Landing(clients.s3, "landing", Fetcher(rules), 1 << 31)
        args = dict(secret=None, deadline=time.monotonic() + 300, fetched=noop)
        await landing.land(small, "warm", "run", Expected(), **args)  # every import, every pool
        base = kb("VmRSS")
        landed = await landing.land(big, "big", "run", Expected(size=size), **args)
        print(json.dumps({"base_kb": base, "hwm_kb": kb("VmHWM"), "sha256": landed.sha256}))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


def blocks(count: int) -> Iterator[bytes]:
    for index in range(count):
        yield hashlib.sha256(str(index).encode()).digest() * (1 << 15)  # 1 MiB, not compressible


def test_a_300_mb_file_is_fetched_in_bounded_memory(vendor: Vendor, moto: str, s3: Any) -> None:
    """Peak RSS over the process's own baseline (VmHWM of the child, which does
    nothing else) stays under 150 MB for a 300 MB file: it is streamed."""
    s3.create_bucket(Bucket=LANDING)
    mib = 300
    vendor.streams["big.bin"] = (mib << 20, lambda: blocks(mib))
    vendor.serve("small.bin", b"warm")
    digest = hashlib.sha256()
    for block in blocks(mib):
        digest.update(block)
    result = subprocess.run(
        [sys.executable, "-c", CHILD, vendor.url("small.bin"), vendor.url("big.bin"),
         str(mib << 20)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    measured = orjson.loads(result.stdout.strip().splitlines()[-1])
    assert measured["sha256"] == digest.hexdigest()
    peak_over_base_mb = (measured["hwm_kb"] - measured["base_kb"]) / 1024
    assert peak_over_base_mb < 150, measured
    assert s3.head_object(Bucket=LANDING, Key="big")["ContentLength"] == mib << 20
