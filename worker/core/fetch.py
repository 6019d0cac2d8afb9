"""HTTP(S) GETs of outside sources, within the rules the operator set.

Dataset documents and manifests come from outside the worker, so every request
is held to the same rules, whoever makes it (the loader fetching a file, the
ledger reading a manifest):

1. **Scheme and host.** ``https``, or ``http`` with ``ACQUIRE_ALLOW_HTTP``; the
   host in ``ACQUIRE_ALLOWED_HOSTS`` (exact, or ``*.suffix`` for any name under
   it), for the first request and every redirect hop, at most
   ``MAX_REDIRECTS``. A URL carrying a user or password is refused: credentials
   come from Secrets Manager only, and go only to the host they were asked for.
2. **Address.** Checked on the socket about to connect (the connector's socket
   factory), not on the name: a name that resolves, or re-resolves (DNS
   rebinding), to a loopback, private, link-local, multicast or other
   non-global address is refused unless ``ACQUIRE_ALLOW_PRIVATE``. The
   instance and container metadata addresses are refused always.
3. **Time.** A connect timeout, a read timeout between two reads of the body
   (a server trickling a byte a minute fails), and a deadline for the whole
   transfer, retries included.
4. **Retries.** A 5xx, 408 or 429 (its ``Retry-After`` honoured when it ends
   before the deadline) and a broken connection are tried again, the whole
   exchange, with ``core.backoff``'s waits; any other 4xx is permanent.
5. **As served.** The body is not decompressed (``Content-Length`` and the
   checksums are the bytes' own), and no proxy is taken from the environment.
6. **TLS** is verified against the system's CAs and ``ACQUIRE_CA_BUNDLE``'s; a
   certificate that fails is permanent (``FetchFailed``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import functools
import ipaddress
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urljoin, urlsplit

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver

from worker.core.aws import ANY_AWS_FAILURE, aws_error
from worker.core.config import AcquireSettings
from worker.core.errors import (
    AddressNotAllowed,
    FetchFailed,
    FetchUnavailable,
    HostNotAllowed,
    ObjectTooLarge,
    SourceNotAllowed,
    first_line,
)
from worker.core.log import get_logger

if TYPE_CHECKING:
    from types_aiobotocore_secretsmanager import SecretsManagerClient

T = TypeVar("T")
log = get_logger(__name__)
CHUNK = 1024 * 1024
MAX_REDIRECTS = 5
SECRET_TTL_S = 300.0  # a rotated secret is read again within five minutes
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_RETRIED = frozenset({408, 429})
# The instance metadata service (IPv4 and IPv6), and the ECS and EKS credential
# endpoints: never reachable, whatever ACQUIRE_ALLOW_PRIVATE says.
METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "169.254.170.23", "fd00:ec2::254", "fd00:ec2::23")
)
_REFUSED: ContextVar[list[str] | None] = ContextVar("refused_addresses", default=None)


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """``host`` is one of ``allowed`` or under one of its ``*.suffix`` entries."""
    host = host.lower().rstrip(".")
    return any(host == a or (a.startswith("*.") and host.endswith(a[1:])) for a in allowed)


def address_allowed(address: str, *, allow_private: bool) -> bool:
    """A global unicast address; any but the metadata ones with ``allow_private``."""
    ip = ipaddress.ip_address(address.partition("%")[0])  # an IPv6 scope dropped
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA:
        return False
    return allow_private or (ip.is_global and not ip.is_multicast)


def shown(url: str) -> str:
    """A URL as logs and errors carry it: no query (it may hold a signed token)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


class _Retry(Exception):
    """A failure the next attempt may not see; ``after``: the server's Retry-After."""

    def __init__(self, why: str, after: float | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.after = after


class Secrets:
    """A source's credentials, from Secrets Manager by name under the prefix;
    read once per ``SECRET_TTL_S``, never logged. A secret is JSON
    ``{"username", "password"}`` (basic) or ``{"token"}`` (bearer), or the token
    itself as plain text."""

    def __init__(self, client: Callable[[], Awaitable[SecretsManagerClient]], prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._cache: dict[str, tuple[float, str]] = {}

    async def header(self, name: str) -> str:
        """The ``Authorization`` header that secret ``name`` makes."""
        if not name.startswith(self._prefix):
            raise SourceNotAllowed(
                f"secret {name!r} is not under ACQUIRE_SECRET_PREFIX={self._prefix!r}", secret=name
            )
        cached = self._cache.get(name)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        try:
            value = await (await self._client()).get_secret_value(SecretId=name)
        except ANY_AWS_FAILURE as exc:
            refused = functools.partial(FetchFailed, secret=name)
            raise aws_error(f"cannot read secret {name!r}", exc, refused) from None
        header = _auth_header(name, value.get("SecretString", ""))
        self._cache[name] = (time.monotonic() + SECRET_TTL_S, header)
        return header


def _auth_header(name: str, text: str) -> str:
    text = text.strip()
    if text and not text.startswith("{"):
        if text.isprintable() and " " not in text:
            return f"Bearer {text}"
    elif text:
        try:
            doc = orjson.loads(text)
        except orjson.JSONDecodeError:
            doc = None
        if isinstance(doc, dict):
            token, user, password = doc.get("token"), doc.get("username"), doc.get("password")
            if isinstance(token, str) and token.isprintable() and token and " " not in token:
                return f"Bearer {token}"
            if isinstance(user, str) and isinstance(password, str) and user:
                return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    raise FetchFailed(
        f"secret {name!r} is none of: {{username, password}}, {{token}}, a token", secret=name
    )


class Fetcher:
    """One long-lived HTTP client that keeps the rules above (``fetch``)."""

    def __init__(
        self,
        settings: AcquireSettings,
        secrets: Secrets | None = None,
        *,
        resolver: AbstractResolver | None = None,
    ) -> None:
        self.settings = settings
        self._secrets = secrets
        self._resolver = resolver
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            trust = ssl.create_default_context()
            if self.settings.ca_bundle:
                trust.load_verify_locations(cafile=self.settings.ca_bundle)
            connector = aiohttp.TCPConnector(
                resolver=self._resolver, socket_factory=self._socket, limit=32, ssl=trust
            )
            timeout = aiohttp.ClientTimeout(
                sock_connect=self.settings.connect_timeout_s,
                sock_read=self.settings.read_timeout_s,
            )
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=timeout, auto_decompress=False, trust_env=False
            )
        return self._session

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _socket(self, addr_info: Any) -> socket.socket:
        """The connector's socket factory: the one place every address passes."""
        family, kind, proto, _, sockaddr = addr_info
        if not address_allowed(sockaddr[0], allow_private=self.settings.allow_private):
            refused = _REFUSED.get()
            if refused is not None:
                refused.append(sockaddr[0])
            raise OSError(errno.EACCES, f"{sockaddr[0]} is not an address the worker may reach")
        return socket.socket(family, kind, proto)

    def check(self, url: str) -> None:
        """Refuse a URL the rules do not allow (scheme, credentials, host)."""
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http"):
            raise SourceNotAllowed(f"{shown(url)}: only https:// (or http://) URLs are fetched")
        if parts.scheme == "http" and not self.settings.allow_http:
            raise SourceNotAllowed(f"{shown(url)}: http:// needs ACQUIRE_ALLOW_HTTP=true")
        if parts.username is not None or parts.password is not None:
            raise SourceNotAllowed(
                f"{parts.scheme}://{parts.hostname}: a URL carries no credentials "
                "(name a secret in the dataset instead)"
            )
        if not parts.hostname or not host_allowed(parts.hostname, self.settings.allowed_hosts):
            raise HostNotAllowed(
                f"{shown(url)}: host {parts.hostname!r} is not in ACQUIRE_ALLOWED_HOSTS",
                host=parts.hostname,
            )

    async def fetch(
        self,
        url: str,
        consume: Callable[[aiohttp.ClientResponse], Awaitable[T]],
        *,
        deadline: float,
        secret: str | None = None,
    ) -> T:
        """GET ``url`` and hand its 200 response to ``consume``, all before
        ``deadline`` (a ``time.monotonic()`` value). A transient failure, in the
        exchange or in ``consume`` reading the body, starts the whole exchange
        again: ``consume`` must be able to begin anew."""
        self.check(url)
        auth = None
        if secret:
            if self._secrets is None:
                raise FetchFailed(f"{shown(url)}: no secrets store to read {secret!r} from")
            auth = await self._secrets.header(secret)
        backoff = self.settings.backoff
        loop = asyncio.get_running_loop()
        attempt = 0
        try:
            async with asyncio.timeout_at(loop.time() + (deadline - time.monotonic())):
                while True:
                    attempt += 1
                    try:
                        return await self._attempt(url, auth, consume)
                    except _Retry as retry:
                        if not backoff.retries_left(attempt):
                            raise FetchUnavailable(
                                f"{shown(url)}: {retry.why} (after {attempt} attempts)",
                                url=shown(url),
                            ) from None
                        wait = max(retry.after or 0.0, backoff.delay(attempt))
                        if time.monotonic() + wait > deadline:
                            raise FetchUnavailable(
                                f"{shown(url)}: {retry.why}; a retry in {wait:.0f} s would "
                                "pass the deadline",
                                url=shown(url),
                            ) from None
                        log.info("fetch_retried", url=shown(url), why=retry.why, wait_s=wait)
                        await asyncio.sleep(wait)
        except TimeoutError:
            raise FetchUnavailable(
                f"{shown(url)}: not fetched within its deadline "
                f"(ACQUIRE_DEADLINE_S={self.settings.deadline_s}, or the invocation's)",
                url=shown(url),
            ) from None

    async def _attempt(
        self,
        url: str,
        auth: str | None,
        consume: Callable[[aiohttp.ClientResponse], Awaitable[T]],
    ) -> T:
        origin = urlsplit(url).hostname
        refused: list[str] = []
        _REFUSED.set(refused)
        for _ in range(MAX_REDIRECTS + 1):
            host = urlsplit(url).hostname
            headers = {"Authorization": auth} if auth and host == origin else {}
            try:
                async with self._client().get(
                    url, headers=headers, allow_redirects=False
                ) as response:
                    if response.status in _REDIRECTS:
                        url = self._redirect(url, response)
                        continue
                    if response.status == 200:
                        return await consume(response)
                    raise _status_error(url, response)
            except aiohttp.ClientSSLError as exc:  # no retry makes a certificate trusted
                raise FetchFailed(
                    f"{shown(url)}: TLS failed: {first_line(exc)} (ACQUIRE_CA_BUNDLE for a "
                    "private CA)",
                    url=shown(url),
                ) from None
            except aiohttp.ClientError as exc:
                if refused:
                    raise AddressNotAllowed(
                        f"{shown(url)}: {host} is at {refused[0]}, an address the worker may "
                        "not reach (loopback, private, link-local, multicast or metadata; "
                        "ACQUIRE_ALLOW_PRIVATE)",
                        address=refused[0],
                    ) from None
                raise _Retry(f"{type(exc).__name__}: {exc}") from None
        raise FetchFailed(f"{shown(url)}: more than {MAX_REDIRECTS} redirects", url=shown(url))

    def _redirect(self, url: str, response: aiohttp.ClientResponse) -> str:
        location = response.headers.get("Location")
        if not location:
            raise FetchFailed(f"{shown(url)}: {response.status} with no Location")
        target = urljoin(url, location)
        self.check(target)
        return target


def _status_error(url: str, response: aiohttp.ClientResponse) -> Exception:
    status = response.status
    if status >= 500 or status in _RETRIED:
        return _Retry(f"answered {status}", _retry_after(response.headers.get("Retry-After")))
    return FetchFailed(f"{shown(url)} answered {status}", status=status, url=shown(url))


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds: a number, or an HTTP date."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


async def read_body(response: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    """A small body (a manifest) whole, refused past ``limit`` bytes."""
    if (response.content_length or 0) > limit:
        raise ObjectTooLarge(f"{what} is {response.content_length} bytes, over {limit}")
    body = bytearray()
    async for chunk in response.content.iter_chunked(CHUNK):
        body += chunk
        if len(body) > limit:
            raise ObjectTooLarge(f"{what} passed {limit} bytes")
    return bytes(body)


def b64_hex(value: str) -> str | None:
    """A base64 digest (``Content-MD5``, ``Digest``) as hex; None when it is not one."""
    try:
        return base64.b64decode(value, validate=True).hex()
    except (binascii.Error, ValueError):
        return None
