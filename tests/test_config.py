"""Settings are read once from the environment, validated, and frozen (README "Configuration")."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import pytest

from tests.processes import ROOT
from worker.core.config import ConfigError, Settings


def test_defaults_apply_when_the_environment_is_empty() -> None:
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.nan_policy == "null" and settings.write.max_in_flight == 32


def test_every_variable_is_read() -> None:
    settings = Settings.from_env(
        {
            "SCHEMA_PREFIX": "dev",
            "OUTPUT_FILE_MESSAGE": "m:C",
            "TABLE_EXTRACT": "m:f",
            "NAN_POLICY": "String",
            "MAX_IN_FLIGHT": "4",
            "MAX_CONCURRENT_OBJECTS": "2",
            "MAX_WRITE_ATTEMPTS": "3",
            "MAX_OBJECT_BYTES": "100",
            "MAX_DECODED_BYTES": "200",
            "LOG_LEVEL": "debug",
            "DEADLINE_MARGIN_MS": "0",
        }
    )
    assert (settings.schema_prefix, settings.output_file_message, settings.table_extract) == (
        "dev",
        "m:C",
        "m:f",
    )
    assert settings.nan_policy == "string" and settings.log_level == "DEBUG"
    assert (settings.write.max_in_flight, settings.write.max_attempts) == (4, 3)
    assert (settings.max_object_bytes, settings.max_decoded_bytes) == (100, 200)
    assert settings.max_concurrent_objects == 2 and settings.deadline_margin_ms == 0


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"NAN_POLICY": "zero"}, "NAN_POLICY"),
        ({"MAX_IN_FLIGHT": "many"}, "MAX_IN_FLIGHT"),
        ({"MAX_WRITE_ATTEMPTS": "0"}, "MAX_WRITE_ATTEMPTS=0 must be between 1 and 100"),
        ({"POLL_WAIT_S": "30"}, "POLL_WAIT_S=30 must be between 0 and 20"),
        ({"RETRY_DELAY_S": "901"}, "RETRY_DELAY_S"),
        ({"DEADLINE_MARGIN_MS": "-1"}, "DEADLINE_MARGIN_MS"),
        ({"STREAM_FORMAT": "csv"}, "STREAM_FORMAT"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"MAX_TABLES_PER_FILE": "0"}, "MAX_TABLES_PER_FILE"),
        ({"WRITE_BACKOFF_CAP_MS": "x"}, "WRITE_BACKOFF_CAP_MS"),
        ({"ENVIRONMENT": "dev"}, "ENVIRONMENT='dev' must be one of staging, prod"),
        ({"LOADER_MAX_RECEIVES": "0"}, "LOADER_MAX_RECEIVES"),
        ({"RUN_DISPATCH_TIMEOUT_S": "5"}, "RUN_DISPATCH_TIMEOUT_S"),
        ({"RUN_MAX_AGE_H": "0"}, "RUN_MAX_AGE_H"),
        ({"RUN_STALL_MARGIN_S": "-1"}, "RUN_STALL_MARGIN_S"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
        ({"LAKE_TOMBSTONE_RETENTION_HOURS": "0"}, "LAKE_TOMBSTONE_RETENTION_HOURS=0 must be"),
        ({"MAX_BYTES_IN_FLIGHT": "0"}, "MAX_BYTES_IN_FLIGHT=0 must be"),
        ({"MAX_DECODED_BYTES": "-1"}, "MAX_DECODED_BYTES=-1 must be"),
        ({"AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "20000"}, "AWS_LAMBDA_FUNCTION_MEMORY_SIZE=20000"),
    ],
)
def test_a_bad_value_is_refused_with_its_name(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        Settings.from_env(env)


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().schema_prefix = "x"  # type: ignore[misc]


def test_the_ledger_settings_are_read_and_required_by_name() -> None:
    env = {"RUN_TABLE_NAME": "r", "FILE_TABLE_NAME": "f", "ENVIRONMENT": "PROD"}
    ledger = Settings.from_env(env).ledger
    assert (ledger.run_table, ledger.file_table, ledger.environment) == ("r", "f", "prod")
    timing = {"RUN_DISPATCH_TIMEOUT_S": "60", "RUN_MAX_AGE_H": "48", "RUN_STALL_MARGIN_S": "0"}
    timed = Settings.from_env(env | timing).ledger
    assert (timed.dispatch_timeout_s, timed.max_age_h, timed.stall_margin_s) == (60, 48, 0)
    assert ledger.enabled and ledger.tables == ("r", "f")
    with pytest.raises(ConfigError, match="DATASET_TABLE_NAME"):
        ledger.require()
    complete = dataclasses.replace(ledger, dataset_table="d")
    complete.require()
    with pytest.raises(ConfigError, match="LOADER_QUEUE_URL"):
        complete.require(dispatch=True)


def test_the_tombstone_retention_default_is_the_one_the_databricks_job_uses() -> None:
    """Written twice (the core cannot import a product; the job imports only the rules):
    held equal here."""
    from worker.cdc import cdc_rules

    default = Settings.from_env({}).lake_tombstone_retention_hours
    assert default == cdc_rules.TOMBSTONE_RETENTION_HOURS == 168


def test_every_variable_the_settings_read_is_documented_in_the_readme() -> None:
    class Recording(dict[str, str]):
        read: ClassVar[set[str]] = set()

        def get(self, key: str, default: Any = None) -> Any:
            self.read.add(key)
            return super().get(key, default)

    Settings.from_env(Recording())
    readme = (ROOT / "README.md").read_text()
    assert len(Recording.read) > 50
    assert {name for name in Recording.read if f"`{name}`" not in readme} == set()
