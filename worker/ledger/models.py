"""The ledger's records and requests, validated at the boundary (pydantic v2).

The names, status values and the ``fileId`` formula are those of the platform's
existing RunTable and FileTable, kept byte for byte so the worker can run
against them.
"""

from __future__ import annotations

import hashlib
import math
import re
import string
from datetime import date
from enum import StrEnum
from typing import Annotated, Any
from urllib.parse import urlsplit

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    field_validator,
    model_validator,
)

DatasetName = Annotated[
    str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.\-]+$")
]


DATASET_NAMES: TypeAdapter[str] = TypeAdapter(DatasetName)


class RunStatus(StrEnum):
    PENDING = "pending"
    DISPATCHED = "dispatched"
    PROCESSING = "processing"
    SUCCESS = "success"
    FAILED = "failed"
    CANCELLED = "cancelled"


class FileStatus(StrEnum):
    PENDING = "pending"
    FETCHED = "fetched"
    VERIFIED = "verified"
    PREPROCESSED = "preprocessed"
    FAILED = "failed"


class SourceType(StrEnum):
    CONTROL_M = "control-m"
    S3 = "s3"
    MANUAL = "manual"
    INTERNAL = "internal"


OPEN_RUN = (RunStatus.PENDING, RunStatus.DISPATCHED, RunStatus.PROCESSING)
SEALED_RUN = (RunStatus.DISPATCHED, RunStatus.PROCESSING)
OPEN_FILE = (FileStatus.PENDING, FileStatus.FETCHED, FileStatus.VERIFIED)


def file_id(dataset_name: str, business_date: str, location: str) -> str:
    """The platform's formula: ``md5("{datasetName}:{businessDate}:{location}")``."""
    return hashlib.md5(f"{dataset_name}:{business_date}:{location}".encode()).hexdigest()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# S3's rules for a bucket name: 3-63 of a-z 0-9 . -, a letter or digit at each end,
# no "..", not an IP address.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
_TEMPLATE_FIELDS = frozenset({"datasetName", "businessDate"})
MAX_JSON_DEPTH = 16  # metadata and sourceTrigger: DynamoDB allows 32 levels of maps
_MAX_NUMBER = 10**38  # DynamoDB's numbers have 38 significant digits


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` as (bucket, key)."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def _check_bucket(bucket: str) -> None:
    if not _BUCKET.fullmatch(bucket) or ".." in bucket or re.fullmatch(r"[0-9.]+", bucket):
        raise ValueError(f"{bucket!r} is not an S3 bucket name (3-63 of a-z 0-9 . -)")


def _check_template(template: str) -> None:
    """Only plain ``{datasetName}`` and ``{businessDate}``: no format spec, no
    conversion, no index (a spec such as ``:>400000000`` would allocate at will)."""
    try:
        fields = [(n, spec, conv) for _, n, spec, conv in string.Formatter().parse(template)]
    except ValueError as exc:
        raise ValueError(f"is not a template: {exc}") from None
    for name, spec, conversion in fields:
        if name is not None and (name not in _TEMPLATE_FIELDS or spec or conversion):
            raise ValueError(f"may use only {{datasetName}} and {{businessDate}}, not {{{name}}}")


def _check_json(value: Any) -> None:
    """A JSON document DynamoDB can store as it is: at most ``MAX_JSON_DEPTH`` deep,
    numbers within its 38 digits."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"is nested deeper than {MAX_JSON_DEPTH} levels")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(item, float) and not (math.isfinite(item) and abs(item) < _MAX_NUMBER):
            raise ValueError("holds a number DynamoDB cannot store")
        elif isinstance(item, int) and not isinstance(item, bool) and abs(item) >= _MAX_NUMBER:
            raise ValueError("holds an integer of more than 38 digits")


def _check_url_template(value: str, schemes: tuple[str, ...]) -> str:
    """A URL template: one of ``schemes``, plain fields only, no credentials in it."""
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.netloc:
        raise ValueError(f"must be a {' or '.join(s + '://' for s in schemes)} URL template")
    if "@" in parts.netloc:
        raise ValueError("carries credentials: name a secret in the dataset instead")
    if parts.scheme == "s3":
        _check_bucket(parts.netloc)
    _check_template(value)
    return value


URL = Annotated[str, StringConstraints(min_length=8, max_length=2048)]
SecretName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9/_+=.@\-]{1,512}$")]
HTTP = ("https", "http")
MAX_DATASET_FILES = 1000


class DatasetIn(_Strict):
    """``PUT /datasets/{name}``: where the dataset's files live, exactly one of:
    ``location`` (an S3 prefix template), ``files`` (URL templates) or
    ``manifest`` (the URL template of a manifest listing the files). ``secret``:
    the Secrets Manager name of the credentials for an HTTP(S) source."""

    location: Annotated[str, StringConstraints(min_length=6, max_length=1024)] | None = None
    files: Annotated[list[URL], Field(min_length=1, max_length=MAX_DATASET_FILES)] | None = None
    manifest: URL | None = None
    suffix: Annotated[str, StringConstraints(max_length=256)] | None = None
    secret: SecretName | None = None

    @field_validator("location")
    @classmethod
    def _s3_template(cls, value: str) -> str:
        if not value.startswith("s3://"):
            raise ValueError("must be an s3://BUCKET/... template")
        bucket, _ = split_s3_uri(value)
        _check_bucket(bucket)
        _check_template(value)
        return value

    @field_validator("files")
    @classmethod
    def _url_templates(cls, value: list[str]) -> list[str]:
        return [_check_url_template(url, HTTP) for url in value]

    @field_validator("manifest")
    @classmethod
    def _manifest_template(cls, value: str) -> str:
        return _check_url_template(value, (*HTTP, "s3"))

    @model_validator(mode="after")
    def _one_source(self) -> DatasetIn:
        given = [n for n in ("location", "files", "manifest") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of location, files, manifest"
                + (f" (given: {', '.join(given)})" if given else "")
            )
        if self.suffix is not None and self.location is None:
            raise ValueError("suffix filters an S3 location's keys: give it with location only")
        return self

    @property
    def buckets(self) -> list[str]:
        """The S3 buckets the dataset names (its location's, its manifest's)."""
        uri = self.location or self.manifest or ""
        return [split_s3_uri(uri)[0]] if uri.startswith("s3://") else []

    def prefix_for(self, dataset_name: str, business_date: str) -> tuple[str, str]:
        """The bucket and key prefix of one business date's files."""
        assert self.location is not None
        uri = self.location.format(datasetName=dataset_name, businessDate=business_date)
        return split_s3_uri(uri)

    def urls_for(self, dataset_name: str, business_date: str) -> list[str]:
        """The ``files`` of one business date, sorted, each once."""
        fields = {"datasetName": dataset_name, "businessDate": business_date}
        return sorted({url.format(**fields) for url in self.files or ()})

    def manifest_for(self, dataset_name: str, business_date: str) -> str:
        assert self.manifest is not None
        return self.manifest.format(datasetName=dataset_name, businessDate=business_date)


class ManifestFile(BaseModel):
    """One file of a manifest: its URL (relative to the manifest's), and what the
    vendor says it is."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    url: Annotated[str, StringConstraints(min_length=1, max_length=2048)]
    size: Annotated[int, Field(ge=0)] | None = None
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$")] | None = None
    md5: Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{32}$")] | None = None

    @field_validator("sha256", "md5")
    @classmethod
    def _lower(cls, value: str | None) -> str | None:
        return value.lower() if value else value


MAX_MANIFEST_FILES = 100_000


class Manifest(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    files: Annotated[list[ManifestFile], Field(max_length=MAX_MANIFEST_FILES)]


_URLS = Annotated[
    list[Annotated[str, StringConstraints(min_length=1, max_length=2048)]],
    Field(max_length=MAX_MANIFEST_FILES),
]
MANIFESTS: TypeAdapter[Manifest | list[str]] = TypeAdapter(Manifest | _URLS)


class RunIn(_Strict):
    """``POST /runs``. ``supersede``: end the date's open run, if any, as ``cancelled``
    (else a submit while one is open is 409)."""

    datasetName: DatasetName  # noqa: N815 - the API's field names are the tables'
    businessDate: date  # noqa: N815
    sourceType: SourceType = SourceType.MANUAL  # noqa: N815
    sourceTrigger: dict[str, Any] = Field(default_factory=dict)  # noqa: N815
    metadata: dict[str, Any] = Field(default_factory=dict)
    supersede: bool = False

    @field_validator("sourceTrigger", "metadata")
    @classmethod
    def _storable(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_json(value)
        return value

    def fingerprint(self) -> str:
        """What an Idempotency-Key's repeat must match: the request, less ``supersede``."""
        doc = self.model_dump(mode="json", exclude={"supersede"})
        return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()


class Page(_Strict):
    """One page of a listing, and the token of the next."""

    items: list[dict[str, Any]]
    nextToken: str | None = None  # noqa: N815
