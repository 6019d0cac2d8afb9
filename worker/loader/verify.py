"""What a file must be, and what it was.

``Expected`` is a file's size and checksums as its manifest gave them (carried
in the loader message), completed by what the server said (``Content-Length``,
``Content-MD5``, ``Digest``, ``Repr-Digest``) where the manifest is silent.
``Digests`` counts and hashes the bytes while they stream past, and ``check``
compares the two: a difference is a ``ChecksumMismatch`` (or ``SizeMismatch``)
naming both values, and fails the file for good.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from worker.core.errors import ChecksumMismatch, MalformedMessage, SizeMismatch
from worker.core.fetch import b64_hex

_HEX = {"sha256": re.compile(r"[0-9a-f]{64}"), "md5": re.compile(r"[0-9a-f]{32}")}
_DIGEST_NAMES = {"sha-256": "sha256", "md5": "md5"}


@dataclass(frozen=True, slots=True)
class Expected:
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None
    source: str = "manifest"  # whose word the values are: the manifest's, or the server's

    @classmethod
    def from_doc(cls, doc: Any) -> Expected:
        """A message's ``expect`` section; ``MalformedMessage`` when it is not one."""
        if doc is None:
            return cls()
        if not isinstance(doc, dict) or set(doc) - {"size", "sha256", "md5"}:
            raise MalformedMessage("expect is not an object of size, sha256, md5")
        size = doc.get("size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise MalformedMessage("expect.size is not a whole number")
        sums = {name: doc.get(name) for name in _HEX}
        for name, value in sums.items():
            if value is not None and not (isinstance(value, str) and _HEX[name].fullmatch(value)):
                raise MalformedMessage(f"expect.{name} is not a lowercase hex {name} digest")
        return cls(size, sums["sha256"], sums["md5"])

    def to_doc(self) -> dict[str, Any]:
        doc = {"size": self.size, "sha256": self.sha256, "md5": self.md5}
        return {k: v for k, v in doc.items() if v is not None}

    @property
    def checksum(self) -> bool:
        return bool(self.sha256 or self.md5)

    def or_server(self, headers: Mapping[str, str]) -> Expected:
        """Where the manifest is silent, the server's word: its length and digests."""
        if self.size is not None and self.checksum:
            return self
        told = server_digests(headers)
        length = headers.get("Content-Length", "").strip()
        server = Expected(int(length) if length.isdigit() else None, told.get("sha256"),
                          told.get("md5"), source="server")  # fmt: skip
        if self.size is None and not self.checksum:
            return server
        mine = self if self.checksum else server
        return Expected(self.size if self.size is not None else server.size, mine.sha256,
                        mine.md5, source="manifest and server")  # fmt: skip


def server_digests(headers: Mapping[str, str]) -> dict[str, str]:
    """The digests a response names, as hex: ``Content-MD5`` (RFC 1864), ``Digest``
    (RFC 3230: ``SHA-256=b64, MD5=b64``) and ``Repr-Digest`` (RFC 9530:
    ``sha-256=:b64:``). All are of the bytes as served, which are those kept."""
    found: dict[str, str] = {}
    for header in ("Digest", "Repr-Digest"):
        for item in headers.get(header, "").split(","):
            name, _, value = item.strip().partition("=")
            algorithm = _DIGEST_NAMES.get(name.strip().lower())
            digest = b64_hex(value.strip().strip(":")) if algorithm else None
            if algorithm and digest and _HEX[algorithm].fullmatch(digest):
                found.setdefault(algorithm, digest)
    md5 = b64_hex(headers.get("Content-MD5", "").strip())
    if md5 and _HEX["md5"].fullmatch(md5):
        found.setdefault("md5", md5)
    return found


class Digests:
    """The size and digests of bytes as they stream past: SHA-256 always (the
    checksum recorded), MD5 only when there is an MD5 to compare with."""

    def __init__(self, *, md5: bool) -> None:
        self.size = 0
        self._sha256 = hashlib.sha256()
        self._md5 = hashlib.md5() if md5 else None

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        self.size += len(chunk)
        self._sha256.update(chunk)
        if self._md5 is not None:
            self._md5.update(chunk)

    @property
    def sha256(self) -> str:
        return self._sha256.hexdigest()

    @property
    def checksum(self) -> str:
        """The checksum the ledger records: ``sha256:`` and the hex digest."""
        return f"sha256:{self.sha256}"

    def check(self, expected: Expected, what: str) -> None:
        """Raise when the bytes are not what ``expected`` says (size first)."""
        check_size(expected, self.size, what)
        actual = {"sha256": self.sha256, "md5": self._md5.hexdigest() if self._md5 else None}
        for algorithm in ("sha256", "md5"):
            want = getattr(expected, algorithm)
            if want is not None and want != actual[algorithm]:
                raise ChecksumMismatch(
                    f"{what} has {algorithm} {actual[algorithm]}, the {expected.source} "
                    f"says {want}",
                    algorithm=algorithm, expected=want, actual=actual[algorithm],
                )  # fmt: skip


def check_size(expected: Expected, size: int, what: str) -> None:
    if expected.size is not None and expected.size != size:
        raise SizeMismatch(
            f"{what} is {size} bytes, the {expected.source} says {expected.size}",
            algorithm="size", expected=expected.size, actual=size,
        )  # fmt: skip
