"""Typed, frozen configuration, built once from the environment at the entry point.

Nothing else in the package reads ``os.environ``: the entry points call
``Settings.from_env()`` and pass the result down. Every value is checked here
against the range AWS (or the worker) accepts, and a bad one is a
``ConfigError`` naming the variable. A product checks what only it needs (a
bucket, a table, a plugin) when the entry point builds it, with ``require``.
The standard AWS variables (``AWS_REGION``, ``AWS_ENDPOINT_URL_DYNAMODB``...)
are read by botocore itself; the S3 endpoint is also read here, for delta-rs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, cast, get_args

from worker.core.backoff import Backoff
from worker.core.errors import ConfigError

NanPolicy = Literal["null", "string", "drop"]
WritePath = Literal["fast", "sdk"]
WritePace = Literal["window", "adaptive"]
StreamFormat = Literal["ndjson", "parquet"]
LogFormat = Literal["auto", "json", "console"]

MiB = 1024 * 1024
SQS_MAX_WAIT_S = 20  # ReceiveMessage's WaitTimeSeconds is 0..20
WRITE_BACKOFF = Backoff(base_s=0.05, cap_s=10.0, attempts=10)
CLAIM_BACKOFF = Backoff(base_s=0.05, cap_s=2.0, attempts=6)

__all__ = ["ConfigError", "Settings"]


def _int(
    env: Mapping[str, str], name: str, default: int, *, minimum: int = 1, maximum: int | None = None
) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw[:40]!r} is not an integer", variable=name) from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise ConfigError(f"{name}={value} must be {bound}", variable=name)
    return value


def _optional_int(env: Mapping[str, str], name: str, *, maximum: int | None = None) -> int | None:
    return _int(env, name, 0, maximum=maximum) or None


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env.get(name, "").strip().lower() or default
    if value not in choices:
        raise ConfigError(
            f"{name}={value[:40]!r} must be one of {', '.join(choices)}", variable=name
        )
    return value


def _text(env: Mapping[str, str], name: str, default: str = "") -> str:
    return env.get(name, "").strip() or default


def _flag(env: Mapping[str, str], name: str) -> bool:
    return _choice(env, name, "false", ("true", "false")) == "true"


_HOST = re.compile(
    r"(\*\.)?[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?)*"
)


def _readable(env: Mapping[str, str], name: str) -> str:
    """A file's path that can be read now, or empty."""
    path = _text(env, name)
    if path and not os.access(path, os.R_OK):
        raise ConfigError(f"{name}={path[:80]!r} is not a readable file", variable=name)
    return path


def _hosts(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma list of host names, each exact or ``*.suffix``."""
    hosts = tuple(h.strip().lower() for h in env.get(name, "").split(",") if h.strip())
    for host in hosts:
        if not _HOST.fullmatch(host) or (host.startswith("*.") and "." not in host[2:]):
            raise ConfigError(
                f"{name}: {host[:60]!r} is not a host name or *.domain (e.g. *.vendor.com)",
                variable=name,
            )
    return hosts


def _backoff(
    env: Mapping[str, str], prefix: str, default: Backoff, *, attempts_name: str
) -> Backoff:
    return Backoff(
        base_s=_int(env, f"{prefix}_BACKOFF_BASE_MS", round(default.base_s * 1000), maximum=60_000)
        / 1000,
        cap_s=_int(env, f"{prefix}_BACKOFF_CAP_MS", round(default.cap_s * 1000), maximum=900_000)
        / 1000,
        attempts=_int(env, attempts_name, default.attempts, maximum=100),
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class WriteSettings:
    """How the batch writer paces itself (ARCHITECTURE.md, "Writing")."""

    path: WritePath = "fast"
    pace: WritePace = "adaptive"  # a send rate per table from its throttles; window: none
    max_in_flight: int = 32
    backoff: Backoff = WRITE_BACKOFF

    @property
    def max_attempts(self) -> int:
        return self.backoff.attempts


@dataclass(frozen=True, kw_only=True, slots=True)
class PollSettings:
    """The ECS long poller (``worker poll``)."""

    queue_url: str = ""
    wait_s: int = SQS_MAX_WAIT_S
    shutdown_grace_s: float = 25.0
    retry_delay_s: int = 5
    health_file: str = "/tmp/worker-health"
    health_max_age_s: int = 90
    summary_interval_s: float = 60.0

    @property
    def retry_backoff(self) -> Backoff:
        """Visibility of a message whose load may succeed later: RETRY_DELAY_S * 2^n, <= 15 min."""
        return Backoff(base_s=self.retry_delay_s, cap_s=900, jitter=False)

    def require(self) -> None:
        if not self.queue_url:
            raise ConfigError("no queue: pass --queue-url or set QUEUE_URL", variable="QUEUE_URL")


@dataclass(frozen=True, kw_only=True, slots=True)
class FirehoseSettings:
    """The Firehose transformation (dedupe cache and partitioning)."""

    cache_table: str = ""
    ttl_hours: int = 24
    separator: str = "."
    dedupe_concurrency: int = 16
    backoff: Backoff = CLAIM_BACKOFF

    def require(self) -> None:
        if not self.cache_table:
            raise ConfigError(
                "EVENT_CACHE_TABLE_NAME is not set: the Firehose transform deduplicates there",
                variable="EVENT_CACHE_TABLE_NAME",
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamSettings:
    """The DynamoDB Streams -> S3 buffer."""

    bucket: str = ""
    prefix: str = "cdc"
    format: StreamFormat = "ndjson"
    max_records: int = 10_000
    max_bytes: int = 64 * MiB
    write_concurrency: int = 8

    def require(self) -> None:
        if not self.bucket:
            raise ConfigError(
                "STREAM_BUCKET is not set: the streams buffer writes its parts there",
                variable="STREAM_BUCKET",
            )


Environment = Literal["staging", "prod"]


@dataclass(frozen=True, kw_only=True, slots=True)
class LedgerSettings:
    """The run/file ledger, its API, and the loader queue runs are dispatched to."""

    run_table: str = ""
    file_table: str = ""
    dataset_table: str = ""
    environment: Environment = "staging"
    loader_queue_url: str = ""
    max_receives: int = 5  # the loader queue's maxReceiveCount: the last receive fails a file
    dispatch_timeout_s: int = 180  # a dispatch silent this long is resumed by the sweep
    max_age_h: int = 24  # a run open this long is failed by the sweep (expired)
    stall_margin_s: int = 300  # added to visibility x maxReceiveCount to call a file stalled

    @property
    def enabled(self) -> bool:
        return bool(self.run_table and self.file_table)

    @property
    def tables(self) -> tuple[str, ...]:
        return tuple(t for t in (self.run_table, self.file_table, self.dataset_table) if t)

    def require(self, *, dispatch: bool = False) -> None:
        for variable, value in (
            ("RUN_TABLE_NAME", self.run_table),
            ("FILE_TABLE_NAME", self.file_table),
            ("DATASET_TABLE_NAME", self.dataset_table),
        ):
            if not value:
                raise ConfigError(
                    f"{variable} is not set: the ledger keeps runs there", variable=variable
                )
        if dispatch and not self.loader_queue_url:
            raise ConfigError(
                "LOADER_QUEUE_URL is not set: runs send their files there",
                variable="LOADER_QUEUE_URL",
            )


ACQUIRE_BACKOFF = Backoff(base_s=0.5, cap_s=20.0, attempts=4)


@dataclass(frozen=True, kw_only=True, slots=True)
class AcquireSettings:
    """Fetching a run's files from HTTP(S) sources into the landing bucket."""

    landing_bucket: str = ""
    allowed_hosts: tuple[str, ...] = ()  # exact names or "*.suffix"
    allow_http: bool = False
    allow_private: bool = False  # loopback, private, link-local and multicast addresses
    secret_prefix: str = "worker/acquire/"
    ca_bundle: str = ""  # PEM certificates trusted beside the system's (a private CA)
    connect_timeout_s: int = 10
    read_timeout_s: int = 30  # the longest silence between two reads of a body
    deadline_s: int = 600  # one file's whole transfer, retries included
    max_manifest_bytes: int = 8 * MiB
    backoff: Backoff = ACQUIRE_BACKOFF

    def require(self) -> None:
        """What an HTTP(S) file needs: somewhere to land, and hosts to reach."""
        if not self.landing_bucket:
            raise ConfigError(
                "LANDING_BUCKET is not set: HTTP(S) files are fetched into it",
                variable="LANDING_BUCKET",
            )
        if not self.allowed_hosts:
            raise ConfigError(
                "ACQUIRE_ALLOWED_HOSTS is not set: no HTTP(S) host may be fetched from",
                variable="ACQUIRE_ALLOWED_HOSTS",
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class AwsSettings:
    """Client timeouts, and the S3 endpoint that delta-rs must be told about."""

    region: str | None = None
    connect_timeout_s: int = 5
    read_timeout_s: int = 60
    s3_endpoint_url: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    """Everything the worker reads from its environment, validated once."""

    aws: AwsSettings = field(default_factory=AwsSettings)
    schema_prefix: str = ""
    source_buckets: tuple[str, ...] = ()  # "*": any; required outside local use
    output_file_message: str = "worker.loader.extract.outputfile_pb2:OutputFile"
    table_extract: str = "worker.loader.extract.reference:processOutputData"
    nan_policy: NanPolicy = "null"
    max_concurrent_objects: int = 4
    max_objects_per_message: int = 100
    max_tables_per_file: int = 256
    max_object_bytes: int = 256 * MiB
    max_decoded_bytes: int | None = None  # None: derived from the memory (loader.budget)
    max_bytes_in_flight: int | None = None  # None: derived from the memory, if known
    lambda_memory_mb: int | None = None  # AWS_LAMBDA_FUNCTION_MEMORY_SIZE, set by Lambda
    log_level: str = "INFO"
    log_format: LogFormat = "auto"
    deadline_margin_ms: int = 10_000
    table_active_timeout_s: float = 120.0
    write: WriteSettings = field(default_factory=WriteSettings)
    poll: PollSettings = field(default_factory=PollSettings)
    firehose: FirehoseSettings = field(default_factory=FirehoseSettings)
    streams: StreamSettings = field(default_factory=StreamSettings)
    ledger: LedgerSettings = field(default_factory=LedgerSettings)
    acquire: AcquireSettings = field(default_factory=AcquireSettings)
    lake_tombstone_retention_hours: int = 7 * 24

    @property
    def region(self) -> str | None:
        return self.aws.region

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        d = cls()
        buckets = tuple(b.strip() for b in env.get("SOURCE_BUCKETS", "").split(",") if b.strip())
        return cls(
            aws=_aws(env),
            schema_prefix=_text(env, "SCHEMA_PREFIX"),
            source_buckets=buckets,
            output_file_message=_text(env, "OUTPUT_FILE_MESSAGE", d.output_file_message),
            table_extract=_text(env, "TABLE_EXTRACT", d.table_extract),
            nan_policy=cast(
                NanPolicy, _choice(env, "NAN_POLICY", d.nan_policy, get_args(NanPolicy))
            ),
            max_concurrent_objects=_int(
                env, "MAX_CONCURRENT_OBJECTS", d.max_concurrent_objects, maximum=1000
            ),
            max_objects_per_message=_int(
                env, "MAX_OBJECTS_PER_MESSAGE", d.max_objects_per_message, maximum=10_000
            ),
            max_tables_per_file=_int(
                env, "MAX_TABLES_PER_FILE", d.max_tables_per_file, maximum=10_000
            ),
            max_object_bytes=_int(env, "MAX_OBJECT_BYTES", d.max_object_bytes),
            max_decoded_bytes=_optional_int(env, "MAX_DECODED_BYTES"),
            max_bytes_in_flight=_optional_int(env, "MAX_BYTES_IN_FLIGHT"),
            lambda_memory_mb=_optional_int(env, "AWS_LAMBDA_FUNCTION_MEMORY_SIZE", maximum=10_240),
            log_level=_choice(
                env, "LOG_LEVEL", "info", ("debug", "info", "warning", "error")
            ).upper(),
            log_format=cast(
                LogFormat, _choice(env, "LOG_FORMAT", d.log_format, get_args(LogFormat))
            ),
            deadline_margin_ms=_int(
                env, "DEADLINE_MARGIN_MS", d.deadline_margin_ms, minimum=0, maximum=900_000
            ),
            table_active_timeout_s=_int(
                env, "TABLE_ACTIVE_TIMEOUT_S", int(d.table_active_timeout_s), maximum=3600
            ),
            write=_write(env),
            poll=_poll(env),
            firehose=_firehose(env),
            streams=_streams(env),
            ledger=_ledger(env),
            acquire=_acquire(env),
            lake_tombstone_retention_hours=_int(
                env,
                "LAKE_TOMBSTONE_RETENTION_HOURS",
                d.lake_tombstone_retention_hours,
                maximum=24 * 366,
            ),
        )


def _aws(env: Mapping[str, str]) -> AwsSettings:
    d = AwsSettings()
    return AwsSettings(
        region=_text(env, "AWS_REGION") or _text(env, "AWS_DEFAULT_REGION") or None,
        connect_timeout_s=_int(env, "AWS_CONNECT_TIMEOUT_S", d.connect_timeout_s, maximum=300),
        read_timeout_s=_int(env, "AWS_READ_TIMEOUT_S", d.read_timeout_s, maximum=900),
        s3_endpoint_url=_text(env, "AWS_ENDPOINT_URL_S3") or _text(env, "AWS_ENDPOINT_URL") or None,
    )


def _write(env: Mapping[str, str]) -> WriteSettings:
    d = WriteSettings()
    return WriteSettings(
        path=cast(WritePath, _choice(env, "DDB_WRITE_PATH", d.path, get_args(WritePath))),
        pace=cast(WritePace, _choice(env, "WRITE_PACE", d.pace, get_args(WritePace))),
        max_in_flight=_int(env, "MAX_IN_FLIGHT", d.max_in_flight, maximum=1024),
        backoff=_backoff(env, "WRITE", d.backoff, attempts_name="MAX_WRITE_ATTEMPTS"),
    )


def _poll(env: Mapping[str, str]) -> PollSettings:
    d = PollSettings()
    return PollSettings(
        queue_url=_text(env, "QUEUE_URL"),
        wait_s=_int(env, "POLL_WAIT_S", d.wait_s, minimum=0, maximum=SQS_MAX_WAIT_S),
        shutdown_grace_s=_int(
            env, "SHUTDOWN_GRACE_S", int(d.shutdown_grace_s), minimum=0, maximum=3600
        ),
        retry_delay_s=_int(env, "RETRY_DELAY_S", d.retry_delay_s, minimum=0, maximum=900),
        health_file=_text(env, "HEALTH_FILE", d.health_file),
        health_max_age_s=_int(env, "HEALTH_MAX_AGE_S", d.health_max_age_s, minimum=3),
        summary_interval_s=_int(env, "SUMMARY_INTERVAL_S", int(d.summary_interval_s)),
    )


def _firehose(env: Mapping[str, str]) -> FirehoseSettings:
    d = FirehoseSettings()
    return FirehoseSettings(
        cache_table=_text(env, "EVENT_CACHE_TABLE_NAME"),
        ttl_hours=_int(env, "EVENT_CACHE_TTL_HOURS", d.ttl_hours, maximum=24 * 366),
        separator=env.get("EVENT_NAME_SEPARATOR", "") or d.separator,
        dedupe_concurrency=_int(env, "DEDUPE_CONCURRENCY", d.dedupe_concurrency, maximum=1000),
        backoff=_backoff(env, "EVENT_CACHE", d.backoff, attempts_name="EVENT_CACHE_MAX_ATTEMPTS"),
    )


def _ledger(env: Mapping[str, str]) -> LedgerSettings:
    d = LedgerSettings()
    return LedgerSettings(
        run_table=_text(env, "RUN_TABLE_NAME"),
        file_table=_text(env, "FILE_TABLE_NAME"),
        dataset_table=_text(env, "DATASET_TABLE_NAME"),
        environment=cast(
            Environment,
            _choice(env, "ENVIRONMENT", d.environment, get_args(Environment)),
        ),
        loader_queue_url=_text(env, "LOADER_QUEUE_URL"),
        max_receives=_int(env, "LOADER_MAX_RECEIVES", d.max_receives, maximum=1000),
        dispatch_timeout_s=_int(
            env, "RUN_DISPATCH_TIMEOUT_S", d.dispatch_timeout_s, minimum=10, maximum=86_400
        ),
        max_age_h=_int(env, "RUN_MAX_AGE_H", d.max_age_h, maximum=24 * 366),
        stall_margin_s=_int(env, "RUN_STALL_MARGIN_S", d.stall_margin_s, minimum=0, maximum=86_400),
    )


def _streams(env: Mapping[str, str]) -> StreamSettings:
    d = StreamSettings()
    return StreamSettings(
        bucket=_text(env, "STREAM_BUCKET"),
        prefix=env.get("STREAM_PREFIX", d.prefix).strip().strip("/"),
        format=cast(StreamFormat, _choice(env, "STREAM_FORMAT", d.format, get_args(StreamFormat))),
        max_records=_int(env, "STREAM_MAX_RECORDS", d.max_records, maximum=1_000_000),
        max_bytes=_int(env, "STREAM_MAX_BYTES", d.max_bytes, minimum=1024, maximum=5 * 1024 * MiB),
        write_concurrency=_int(env, "STREAM_WRITE_CONCURRENCY", d.write_concurrency, maximum=256),
    )


def _acquire(env: Mapping[str, str]) -> AcquireSettings:
    d = AcquireSettings()
    prefix = _text(env, "ACQUIRE_SECRET_PREFIX", d.secret_prefix)
    if not re.fullmatch(r"[A-Za-z0-9/_+=.@\-]{1,256}", prefix):
        raise ConfigError(
            f"ACQUIRE_SECRET_PREFIX={prefix[:40]!r} is not a Secrets Manager name prefix",
            variable="ACQUIRE_SECRET_PREFIX",
        )
    return AcquireSettings(
        landing_bucket=_text(env, "LANDING_BUCKET"),
        allowed_hosts=_hosts(env, "ACQUIRE_ALLOWED_HOSTS"),
        allow_http=_flag(env, "ACQUIRE_ALLOW_HTTP"),
        allow_private=_flag(env, "ACQUIRE_ALLOW_PRIVATE"),
        secret_prefix=prefix,
        ca_bundle=_readable(env, "ACQUIRE_CA_BUNDLE"),
        connect_timeout_s=_int(env, "ACQUIRE_CONNECT_TIMEOUT_S", d.connect_timeout_s, maximum=300),
        read_timeout_s=_int(env, "ACQUIRE_READ_TIMEOUT_S", d.read_timeout_s, maximum=900),
        deadline_s=_int(env, "ACQUIRE_DEADLINE_S", d.deadline_s, maximum=43_200),
        max_manifest_bytes=_int(
            env, "ACQUIRE_MAX_MANIFEST_BYTES", d.max_manifest_bytes, maximum=256 * MiB
        ),
        backoff=_backoff(env, "ACQUIRE", d.backoff, attempts_name="ACQUIRE_MAX_ATTEMPTS"),
    )
