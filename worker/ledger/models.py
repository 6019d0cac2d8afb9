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

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, field_validator

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


class DatasetIn(_Strict):
    """``PUT /datasets/{name}``: where the dataset's files live."""

    location: Annotated[str, StringConstraints(min_length=6, max_length=1024)]
    suffix: Annotated[str, StringConstraints(max_length=256)] | None = None

    @field_validator("location")
    @classmethod
    def _s3_template(cls, value: str) -> str:
        if not value.startswith("s3://"):
            raise ValueError("must be an s3://BUCKET/... template")
        bucket, _ = split_s3_uri(value)
        _check_bucket(bucket)
        _check_template(value)
        return value

    @property
    def bucket(self) -> str:
        return split_s3_uri(self.location)[0]

    def prefix_for(self, dataset_name: str, business_date: str) -> tuple[str, str]:
        """The bucket and key prefix of one business date's files."""
        uri = self.location.format(datasetName=dataset_name, businessDate=business_date)
        return split_s3_uri(uri)


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
