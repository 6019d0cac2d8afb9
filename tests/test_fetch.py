"""The fetcher reaches only what the operator allowed (core.fetch), against a
vendor's server on loopback."""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from tests.vendor import Vendor, redirect, status, trickle
from worker.core.aws import Clients
from worker.core.backoff import Backoff
from worker.core.config import AcquireSettings, Settings
from worker.core.errors import (
    AddressNotAllowed,
    ConfigError,
    FetchFailed,
    FetchUnavailable,
    HostNotAllowed,
    ObjectTooLarge,
    SourceNotAllowed,
)
from worker.core.fetch import Fetcher, Secrets, address_allowed, host_allowed, read_body
from worker.entry import demo_vendor

FAST = Backoff(base_s=0.01, cap_s=0.05, attempts=3)


class Names(AbstractResolver):
    """DNS for the tests: each name to the address the test gives it."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names

    async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[ResolveResult]:
        address = self.names[host]
        return [{"hostname": host, "host": address, "port": port, "family": socket.AF_INET,
                 "proto": 0, "flags": 0}]  # fmt: skip

    async def close(self) -> None:
        return None


class VendorOnly(Fetcher):
    """Private addresses refused, but for the vendor's own socket (it is on loopback,
    as everything here is): every other address meets the real guard."""

    def __init__(self, vendor: Vendor, settings: AcquireSettings, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self._vendor = vendor

    def _socket(self, addr_info: Any) -> socket.socket:
        family, kind, proto, _, (host, port, *_) = addr_info
        if (host, port) == ("127.0.0.1", self._vendor.port):
            return socket.socket(family, kind, proto)
        return super()._socket(addr_info)


def rules(**changes: Any) -> AcquireSettings:
    base = {"allowed_hosts": ("127.0.0.1", "*.vendor.test"), "allow_http": True,
            "allow_private": True, "backoff": FAST, "read_timeout_s": 5}  # fmt: skip
    return AcquireSettings(**{**base, **changes})


@pytest.fixture
def vendor() -> Iterator[Vendor]:
    with Vendor() as server:
        yield server


async def get(fetcher: Fetcher, url: str, deadline_s: float = 10, **kwargs: Any) -> bytes:
    try:
        return await fetcher.fetch(
            url, lambda r: read_body(r, 1 << 20, "body"), deadline=time.monotonic() + deadline_s,
            **kwargs,
        )  # fmt: skip
    finally:
        await fetcher.aclose()


def test_hosts_match_exactly_or_under_a_suffix() -> None:
    allowed = ("data.vendor.com", "*.cdn.net")
    assert host_allowed("DATA.vendor.com.", allowed) and host_allowed("a.b.cdn.net", allowed)
    for host in ("vendor.com", "evil-data.vendor.com", "cdn.net", "xcdn.net", "data.vendor.co"):
        assert not host_allowed(host, allowed), host


@pytest.mark.parametrize(
    ("address", "private_allowed", "allowed"),
    [
        ("93.184.216.34", False, True),
        ("2606:2800:220:1:248:1893:25c8:1946", False, True),
        *[(a, False, False) for a in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1",
                                     "169.254.10.10", "100.64.0.1", "224.0.0.1", "0.0.0.0",
                                     "::1", "fe80::1%eth0", "::ffff:127.0.0.1", "fc00::1")],
        *[(a, True, True) for a in ("127.0.0.1", "10.1.2.3", "::1")],
        *[(a, True, False) for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254",
                                    "::ffff:169.254.169.254")],
    ],
)  # fmt: skip
def test_addresses_are_global_unless_private_ones_are_allowed_and_metadata_never(
    address: str, private_allowed: bool, allowed: bool
) -> None:
    assert address_allowed(address, allow_private=private_allowed) is allowed


async def test_the_body_comes_as_served_with_no_decompression(vendor: Vendor) -> None:
    url = vendor.serve("a.gz", b"\x1f\x8bnot really gzip", **{"Content-Encoding": "gzip"})
    assert await get(Fetcher(rules()), url) == b"\x1f\x8bnot really gzip"


@pytest.mark.parametrize(
    ("url", "changes", "error", "says"),
    [
        ("http://127.0.0.1:{port}/a", {"allow_http": False}, SourceNotAllowed, "ALLOW_HTTP"),
        ("ftp://127.0.0.1:{port}/a", {}, SourceNotAllowed, "only https://"),
        ("http://user:pw@127.0.0.1:{port}/a", {}, SourceNotAllowed, "no credentials"),
        ("http://localhost:{port}/a", {}, HostNotAllowed, "'localhost' is not in"),
        ("http://127.0.0.1:{port}/a", {"allowed_hosts": ()}, HostNotAllowed, "ACQUIRE_ALLOWED"),
    ],
)  # fmt: skip
async def test_a_url_the_rules_refuse_is_never_requested(
    vendor: Vendor, url: str, changes: dict[str, Any], error: type[Exception], says: str
) -> None:
    vendor.serve("a", b"data")
    with pytest.raises(error, match=says):
        await get(Fetcher(rules(**changes)), url.format(port=vendor.port))
    assert vendor.hits["a"] == 0


async def test_every_redirect_hop_meets_the_host_rule(vendor: Vendor) -> None:
    vendor.then("a", redirect(vendor.url("b")))
    vendor.then("b", redirect("http://evil.example.com/loot"))
    with pytest.raises(HostNotAllowed, match=r"evil\.example\.com"):
        await get(Fetcher(rules()), vendor.url("a"))
    assert vendor.hits["a"] == vendor.hits["b"] == 1


async def test_at_most_five_redirects(vendor: Vendor) -> None:
    for chain, hops in (("five", 5), ("six", 6)):
        for hop in range(hops):
            vendor.then(f"{chain}{hop}", redirect(vendor.url(f"{chain}{hop + 1}")))
        vendor.serve(f"{chain}{hops}", chain.encode())
    assert await get(Fetcher(rules()), vendor.url("five0")) == b"five"
    with pytest.raises(FetchFailed, match="more than 5 redirects"):
        await get(Fetcher(rules()), vendor.url("six0"))
    assert vendor.hits["six6"] == 0 and vendor.hits["six5"] == 1


@pytest.mark.parametrize("target", ["169.254.169.254", "127.0.0.2"])
async def test_a_redirect_to_metadata_or_loopback_is_refused_at_the_socket(
    vendor: Vendor, target: str
) -> None:
    """The vendor itself is let through (it is on loopback); the redirect's address
    meets the real guard: the metadata address even with private ones allowed."""
    vendor.then("a", redirect(f"http://{target}/latest/meta-data/"))
    fetcher = VendorOnly(
        vendor, rules(allowed_hosts=("127.0.0.1", target), allow_private=target != "127.0.0.2")
    )
    with pytest.raises(AddressNotAllowed, match=target):
        await get(fetcher, vendor.url("a"))


async def test_a_name_that_resolves_to_a_private_address_is_refused(vendor: Vendor) -> None:
    vendor.serve("a", b"data")
    names = Names({"files.vendor.test": "127.0.0.1"})
    url = vendor.url("a", host="files.vendor.test")
    with pytest.raises(AddressNotAllowed, match=r"127\.0\.0\.1"):
        await get(Fetcher(rules(allow_private=False), resolver=names), url)
    assert vendor.hits["a"] == 0
    assert await get(Fetcher(rules(), resolver=names), url) == b"data"  # when allowed


async def test_a_name_rebound_to_the_metadata_address_is_refused_on_connect(
    vendor: Vendor,
) -> None:
    """The name passed the host rule; the address it resolves to now is what counts."""
    names = Names({"files.vendor.test": "169.254.169.254"})
    with pytest.raises(AddressNotAllowed, match=r"169\.254\.169\.254"):
        await get(Fetcher(rules(), resolver=names), vendor.url("a", host="files.vendor.test"))


async def test_a_404_is_permanent_and_asked_once(vendor: Vendor) -> None:
    with pytest.raises(FetchFailed, match="answered 404") as failed:
        await get(Fetcher(rules()), vendor.url("missing"))
    assert failed.value.context["status"] == 404 and vendor.hits["missing"] == 1


@pytest.mark.parametrize("code", [500, 503, 408, 429])
async def test_a_5xx_408_or_429_is_tried_again(vendor: Vendor, code: int) -> None:
    vendor.serve("a", b"data")
    vendor.then("a", status(code))
    assert await get(Fetcher(rules()), vendor.url("a")) == b"data"
    assert vendor.hits["a"] == 2


async def test_a_5xx_that_outlives_the_attempts_is_retriable(vendor: Vendor) -> None:
    vendor.then("a", *[status(502)] * 3)
    with pytest.raises(FetchUnavailable, match="after 3 attempts") as failed:
        await get(Fetcher(rules()), vendor.url("a"))
    assert failed.value.retriable and vendor.hits["a"] == 3


async def test_retry_after_is_honoured_within_the_deadline(vendor: Vendor) -> None:
    vendor.serve("a", b"data")
    vendor.then("a", status(429, **{"Retry-After": "1"}))
    started = time.monotonic()
    assert await get(Fetcher(rules()), vendor.url("a")) == b"data"
    assert time.monotonic() - started >= 1.0
    vendor.then("a", status(429, **{"Retry-After": "120"}))
    started = time.monotonic()
    with pytest.raises(FetchUnavailable, match="would pass the deadline"):
        await get(Fetcher(rules()), vendor.url("a"), deadline_s=30)
    assert time.monotonic() - started < 5


async def test_a_server_that_trickles_fails_on_the_read_timeout(vendor: Vendor) -> None:
    vendor.then("a", *[trickle(b"slow", every_s=2)] * 3)
    started = time.monotonic()
    with pytest.raises(FetchUnavailable, match="Timeout"):
        await get(Fetcher(rules(read_timeout_s=1)), vendor.url("a"))
    assert time.monotonic() - started < 10


async def test_a_server_that_trickles_within_the_read_timeout_meets_the_deadline(
    vendor: Vendor,
) -> None:
    vendor.then("a", trickle(b"x" * 100, every_s=0.1))
    started = time.monotonic()
    with pytest.raises(FetchUnavailable, match="within its deadline"):
        await get(Fetcher(rules()), vendor.url("a"), deadline_s=1)
    assert time.monotonic() - started < 2


async def test_a_manifest_body_is_capped(vendor: Vendor) -> None:
    told = vendor.serve("big", b"x" * (2 << 20))
    vendor.streams["chunked"] = (None, lambda: iter([b"x" * (1 << 20)] * 2))
    with pytest.raises(ObjectTooLarge, match="over 1048576"):
        await get(Fetcher(rules()), told)
    with pytest.raises(ObjectTooLarge, match="passed 1048576"):
        await get(Fetcher(rules()), vendor.url("chunked"))


@pytest.fixture
async def secrets(moto: str) -> AsyncIterator[tuple[Clients, Any]]:
    client = boto3.client("secretsmanager")
    async with Clients.from_settings(Settings.from_env()) as clients:
        yield clients, client


@pytest.mark.parametrize(
    ("secret", "header"),
    [
        ('{"username": "ann", "password": "s3cr:et"}',
         "Basic " + base64.b64encode(b"ann:s3cr:et").decode()),
        ('{"token": "tok-1"}', "Bearer tok-1"),
        ("tok-2", "Bearer tok-2"),
    ],
)  # fmt: skip
async def test_credentials_come_from_secrets_manager_and_stay_on_their_host(
    vendor: Vendor, secrets: tuple[Clients, Any], secret: str, header: str
) -> None:
    clients, sm = secrets
    name = f"worker/acquire/{len(vendor.auth)}-{hash(secret) & 0xFFFF}"
    sm.create_secret(Name=name, SecretString=secret)
    vendor.serve("a", b"data")
    vendor.then("a", redirect(vendor.url("a", host="localhost")))  # another host: no credentials
    fetcher = Fetcher(
        rules(allowed_hosts=("127.0.0.1", "localhost")),
        Secrets(clients.secrets, "worker/acquire/"),
    )
    assert await get(fetcher, vendor.url("a"), secret=name) == b"data"
    assert vendor.auth == [header, None]


async def test_a_secret_outside_the_prefix_or_missing_or_malformed_is_refused(
    vendor: Vendor, secrets: tuple[Clients, Any]
) -> None:
    clients, sm = secrets
    sm.create_secret(Name="worker/acquire/odd", SecretString='{"user": "x"}')
    store = Secrets(clients.secrets, "worker/acquire/")
    fetcher = Fetcher(rules(), store)
    with pytest.raises(SourceNotAllowed, match="not under ACQUIRE_SECRET_PREFIX"):
        await get(fetcher, vendor.url("a"), secret="prod/db-password")
    with pytest.raises(FetchFailed, match="ResourceNotFoundException"):
        await get(fetcher, vendor.url("a"), secret="worker/acquire/absent")
    with pytest.raises(FetchFailed, match="is none of"):
        await get(fetcher, vendor.url("a"), secret="worker/acquire/odd")
    assert vendor.hits["a"] == 0


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"ACQUIRE_ALLOWED_HOSTS": "vendor.com,*.com"}, "ACQUIRE_ALLOWED_HOSTS"),
        ({"ACQUIRE_ALLOWED_HOSTS": "https://vendor.com"}, "ACQUIRE_ALLOWED_HOSTS"),
        ({"ACQUIRE_ALLOW_HTTP": "yes"}, "ACQUIRE_ALLOW_HTTP"),
        ({"ACQUIRE_ALLOW_PRIVATE": "1"}, "ACQUIRE_ALLOW_PRIVATE"),
        ({"ACQUIRE_READ_TIMEOUT_S": "0"}, "ACQUIRE_READ_TIMEOUT_S"),
        ({"ACQUIRE_SECRET_PREFIX": "no spaces"}, "ACQUIRE_SECRET_PREFIX"),
    ],
)
def test_acquisition_settings_are_validated_at_start_up(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env(env)
    assert refused.value.context["variable"] == variable


def test_an_http_file_needs_a_landing_bucket_and_allowed_hosts() -> None:
    with pytest.raises(ConfigError, match="LANDING_BUCKET"):
        AcquireSettings(allowed_hosts=("a.com",)).require()
    with pytest.raises(ConfigError, match="ACQUIRE_ALLOWED_HOSTS"):
        AcquireSettings(landing_bucket="landing").require()


async def test_the_session_is_reused_and_closed(vendor: Vendor) -> None:
    fetcher = Fetcher(rules())
    vendor.serve("a", b"data")
    for _ in range(2):
        await fetcher.fetch(vendor.url("a"), lambda r: r.read(), deadline=time.monotonic() + 5)
    session = fetcher._session
    assert isinstance(session, aiohttp.ClientSession) and not session.closed
    await fetcher.aclose()
    assert session.closed


async def test_https_is_verified_against_the_system_and_the_ca_bundle(tmp_path: Path) -> None:
    ca_file, tls = demo_vendor.make_certificates(tmp_path)
    async with demo_vendor.vendor({"a.pb": b"over tls"}, tls) as base:
        trusted = Fetcher(rules(ca_bundle=str(ca_file)))
        assert await get(trusted, f"{base}/a.pb") == b"over tls"
        with pytest.raises(FetchFailed, match="TLS failed") as failed:
            await get(Fetcher(rules()), f"{base}/a.pb")  # a CA no one told it about
        assert not failed.value.retriable


def test_a_ca_bundle_that_cannot_be_read_is_refused_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ACQUIRE_CA_BUNDLE"):
        Settings.from_env({"ACQUIRE_CA_BUNDLE": str(tmp_path / "missing.pem")})
