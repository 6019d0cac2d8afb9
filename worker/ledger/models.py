"""The ledger's records and requests, validated at the boundary (pydantic v2).

The names, status values and the ``fileId`` formula are those of the platform's
existing RunTable and FileTable, kept byte for byte so the worker can run
against them.
"""

from __future__ import annotations

import hashlib
from datetime import date
from enum import StrEnum
from typing import Annotated, Any

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


class DatasetIn(_Strict):
    """``PUT /datasets/{name}``: where the dataset's files live."""

    location: Annotated[str, StringConstraints(min_length=6, max_length=1024)]
    suffix: Annotated[str, StringConstraints(max_length=256)] | None = None

    @field_validator("location")
    @classmethod
    def _s3_template(cls, value: str) -> str:
        if not value.startswith("s3://") or not value[5:].split("/", 1)[0]:
            raise ValueError("must be an s3://BUCKET/... template")
        try:
            value.format(datasetName="d", businessDate="2026-01-01")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"may use only {{datasetName}} and {{businessDate}}: {exc!r}"
            ) from None
        return value

    def prefix_for(self, dataset_name: str, business_date: str) -> tuple[str, str]:
        """The bucket and key prefix of one business date's files."""
        uri = self.location.format(datasetName=dataset_name, businessDate=business_date)
        bucket, _, prefix = uri[5:].partition("/")
        return bucket, prefix


class RunIn(_Strict):
    """``POST /runs``."""

    datasetName: DatasetName  # noqa: N815 - the API's field names are the tables'
    businessDate: date  # noqa: N815
    sourceType: SourceType = SourceType.MANUAL  # noqa: N815
    sourceTrigger: dict[str, Any] = Field(default_factory=dict)  # noqa: N815
    metadata: dict[str, Any] = Field(default_factory=dict)


class Page(_Strict):
    """One page of a listing, and the token of the next."""

    items: list[dict[str, Any]]
    nextToken: str | None = None  # noqa: N815
