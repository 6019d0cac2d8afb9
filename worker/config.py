"""Typed, frozen configuration, built once from the environment at the entry point.

Nothing else in the package reads ``os.environ``: the entry points call
``Settings.from_env()`` and pass the result down. The standard AWS variables
(``AWS_REGION``, ``AWS_ENDPOINT_URL_DYNAMODB``, ...) are read by botocore itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, cast, get_args

NanPolicy = Literal["null", "string", "drop"]
WritePath = Literal["fast", "sdk"]

MiB = 1024 * 1024


class ConfigError(ValueError):
    """An environment variable holds a value the worker cannot use."""


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 1) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} must be >= {minimum}")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env.get(name, "").strip().lower() or default
    if value not in choices:
        raise ConfigError(f"{name}={value!r} must be one of {', '.join(choices)}")
    return value


@dataclass(frozen=True, kw_only=True, slots=True)
class WriteSettings:
    """How the batch writer paces itself (DESIGN §3.4)."""

    path: WritePath = "fast"
    max_in_flight: int = 32
    max_attempts: int = 10
    backoff_base_s: float = 0.05
    backoff_cap_s: float = 10.0


@dataclass(frozen=True, kw_only=True, slots=True)
class PollSettings:
    """The ECS long poller (``worker poll``)."""

    queue_url: str = ""
    wait_s: int = 20
    shutdown_grace_s: float = 25.0
    retry_delay_s: int = 5
    health_file: str = "/tmp/worker-health"
    health_max_age_s: int = 90
    summary_interval_s: float = 60.0


@dataclass(frozen=True, kw_only=True, slots=True)
class FirehoseSettings:
    """The Firehose transformation (dedupe cache and partitioning)."""

    cache_table: str = ""
    ttl_hours: int = 24
    separator: str = "."
    dedupe_concurrency: int = 16
    max_attempts: int = 6


StreamFormat = Literal["ndjson", "parquet"]


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamSettings:
    """The DynamoDB Streams -> S3 buffer."""

    bucket: str = ""
    prefix: str = "cdc"
    format: StreamFormat = "ndjson"
    max_records: int = 10_000
    max_bytes: int = 64 * MiB
    write_concurrency: int = 8


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    """Everything the worker reads from its environment, validated once."""

    region: str | None = None
    schema_prefix: str = ""
    output_file_message: str = "worker.extract.outputfile_pb2:OutputFile"
    table_extract: str = "worker.extract.reference:processOutputData"
    nan_policy: NanPolicy = "null"
    max_concurrent_objects: int = 4
    max_object_bytes: int = 256 * MiB
    max_decoded_bytes: int = 1024 * MiB
    log_level: str = "INFO"
    deadline_margin_ms: int = 10_000
    table_active_timeout_s: float = 120.0
    write: WriteSettings = field(default_factory=WriteSettings)
    poll: PollSettings = field(default_factory=PollSettings)
    firehose: FirehoseSettings = field(default_factory=FirehoseSettings)
    streams: StreamSettings = field(default_factory=StreamSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        default = cls()
        nan = _choice(env, "NAN_POLICY", default.nan_policy, get_args(NanPolicy))
        return cls(
            region=(env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "").strip() or None,
            schema_prefix=env.get("SCHEMA_PREFIX", default.schema_prefix).strip(),
            output_file_message=env.get("OUTPUT_FILE_MESSAGE", "").strip()
            or default.output_file_message,
            table_extract=env.get("TABLE_EXTRACT", "").strip() or default.table_extract,
            nan_policy=cast(NanPolicy, nan),
            max_concurrent_objects=_int(
                env, "MAX_CONCURRENT_OBJECTS", default.max_concurrent_objects
            ),
            max_object_bytes=_int(env, "MAX_OBJECT_BYTES", default.max_object_bytes),
            max_decoded_bytes=_int(env, "MAX_DECODED_BYTES", default.max_decoded_bytes),
            log_level=_choice(
                env, "LOG_LEVEL", "info", ("debug", "info", "warning", "error")
            ).upper(),
            deadline_margin_ms=_int(
                env, "DEADLINE_MARGIN_MS", default.deadline_margin_ms, minimum=0
            ),
            write=WriteSettings(
                path=cast(WritePath, _choice(env, "DDB_WRITE_PATH", "fast", get_args(WritePath))),
                max_in_flight=_int(env, "MAX_IN_FLIGHT", default.write.max_in_flight),
                max_attempts=_int(env, "MAX_WRITE_ATTEMPTS", default.write.max_attempts),
            ),
            poll=PollSettings(
                queue_url=env.get("QUEUE_URL", "").strip(),
                wait_s=_int(env, "POLL_WAIT_S", default.poll.wait_s, minimum=0),
                shutdown_grace_s=_int(
                    env, "SHUTDOWN_GRACE_S", int(default.poll.shutdown_grace_s), minimum=0
                ),
                retry_delay_s=_int(env, "RETRY_DELAY_S", default.poll.retry_delay_s, minimum=0),
                health_file=env.get("HEALTH_FILE", "").strip() or default.poll.health_file,
                health_max_age_s=_int(env, "HEALTH_MAX_AGE_S", default.poll.health_max_age_s),
                summary_interval_s=_int(
                    env, "SUMMARY_INTERVAL_S", int(default.poll.summary_interval_s)
                ),
            ),
            firehose=FirehoseSettings(
                cache_table=env.get("EVENT_CACHE_TABLE_NAME", "").strip(),
                ttl_hours=_int(env, "EVENT_CACHE_TTL_HOURS", default.firehose.ttl_hours),
                separator=env.get("EVENT_NAME_SEPARATOR", "") or default.firehose.separator,
                dedupe_concurrency=_int(
                    env, "DEDUPE_CONCURRENCY", default.firehose.dedupe_concurrency
                ),
            ),
            streams=StreamSettings(
                bucket=env.get("STREAM_BUCKET", "").strip(),
                prefix=env.get("STREAM_PREFIX", default.streams.prefix).strip().strip("/"),
                format=cast(
                    StreamFormat,
                    _choice(env, "STREAM_FORMAT", default.streams.format, get_args(StreamFormat)),
                ),
                max_records=_int(env, "STREAM_MAX_RECORDS", default.streams.max_records),
                max_bytes=_int(env, "STREAM_MAX_BYTES", default.streams.max_bytes),
                write_concurrency=_int(
                    env, "STREAM_WRITE_CONCURRENCY", default.streams.write_concurrency
                ),
            ),
        )
