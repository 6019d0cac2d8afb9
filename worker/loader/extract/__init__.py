"""Decoding the ``OutputFile`` protobuf and the pluggable ``TableExtract``.

Both halves come from a Lambda layer in production, so both are named by
``module:attribute`` strings (``OUTPUT_FILE_MESSAGE`` and ``TABLE_EXTRACT``)
and default to the bundled reference schema and ``processOutputData``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError, Message

from worker.core.errors import ConfigError, CorruptObject, ExtractFailed, WorkerError

Rows = dict[str, list[dict[str, Any]]]


def load_plugin(spec: str, variable: str) -> Any:
    """The object ``module:attribute`` names; a ``ConfigError`` naming ``variable`` if none."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(
            f"{variable}={spec!r} is not of the form 'module:attribute'", variable=variable
        )
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except Exception as exc:  # noqa: BLE001 - a plugin's import may fail in any way at all
        raise ConfigError(
            f"{variable}={spec!r} cannot be loaded: {exc!r}", variable=variable
        ) from None
    return target


@dataclass(frozen=True, slots=True)
class Extractor:
    """Bytes -> ``OutputFile`` -> ``{table: [rows]}``."""

    message_class: type[Message]
    process: Callable[[Any], Rows]

    @classmethod
    def from_specs(cls, message_spec: str, extract_spec: str) -> Extractor:
        message_class = load_plugin(message_spec, "OUTPUT_FILE_MESSAGE")
        if not (isinstance(message_class, type) and issubclass(message_class, Message)):
            raise ConfigError(
                f"OUTPUT_FILE_MESSAGE={message_spec!r} is not a protobuf message class",
                variable="OUTPUT_FILE_MESSAGE",
            )
        process = load_plugin(extract_spec, "TABLE_EXTRACT")
        if not callable(process):
            raise ConfigError(
                f"TABLE_EXTRACT={extract_spec!r} is not callable", variable="TABLE_EXTRACT"
            )
        return cls(message_class=message_class, process=process)

    def decode(self, data: bytes) -> Message:
        message = self.message_class()
        try:
            message.ParseFromString(data)
        except DecodeError as exc:
            raise CorruptObject(
                f"not a valid {self.message_class.DESCRIPTOR.full_name}: {exc}"
            ) from None
        if not message.ListFields():
            raise CorruptObject(
                f"decodes to an empty {self.message_class.DESCRIPTOR.full_name}"
                " (no known field is set)"
            )
        return message

    def extract(self, data: bytes) -> Rows:
        """Decode and extract; CPU-bound, so callers run it in a thread."""
        message = self.decode(data)
        try:
            tables = self.process(message)
        except WorkerError:
            raise  # a plugin may say for itself whether a retry can help
        except Exception as exc:  # any plugin failure is this input's failure
            raise ExtractFailed(f"TABLE_EXTRACT raised {exc!r}") from exc
        if not isinstance(tables, dict):
            raise ExtractFailed(f"TABLE_EXTRACT returned {type(tables).__name__}, not a dict")
        return tables
