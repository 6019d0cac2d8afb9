"""Decoding the ``OutputFile`` protobuf and the pluggable ``TableExtract``.

Both halves come from a Lambda layer in production, so both are named by
``module:attribute`` strings (``OUTPUT_FILE_MESSAGE`` and ``TABLE_EXTRACT``)
and default to the bundled reference schema and ``processOutputData``.

**Streaming.** When the ``TABLE_EXTRACT`` module also defines
``iterOutputData(data: bytes) -> Iterable[(table, rows)]``, the loader uses it
instead: it decodes the bytes itself (``OUTPUT_FILE_MESSAGE`` is not used)
and yields slices of rows, table after table, so memory holds the file's bytes
and a few slices, never the whole file as dicts. Its result may carry
``table_names`` (every table, known before any row is parsed); the loader then
checks the file's tables before it creates one. A hook that takes a
``max_tables`` keyword gets ``MAX_TABLES_PER_FILE``, to refuse a file as soon
as it passes it. Without ``iterOutputData``,
``processOutputData`` gets the whole decoded message and returns every row at
once: the memory-hungry path.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

from google.protobuf.message import DecodeError, Message

from worker.core.errors import (
    ConfigError,
    CorruptObject,
    ExtractFailed,
    ObjectTooLarge,
    WorkerError,
)
from worker.loader.budget import MESSAGE_BYTES, MiB
from worker.loader.extract.wire import message_count

Rows = dict[str, list[dict[str, Any]]]
Slice = tuple[str, Sequence[dict[str, Any]]]  # (table name, some of its rows)
SLICE_ROWS = 4096
_REFERENCE = "worker.loader.extract.reference"


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
    iterate: Callable[..., Iterable[Slice]] | None = None
    iterate_takes_max_tables: bool = False

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
        module = importlib.import_module(extract_spec.partition(":")[0])
        iterate = getattr(module, "iterOutputData", None)
        if not callable(iterate):
            return cls(message_class, process)
        takes = "max_tables" in inspect.signature(iterate).parameters
        return cls(message_class, process, iterate, iterate_takes_max_tables=takes)

    @property
    def fusable(self) -> bool:
        """The bundled reference extract streams: its slices can go to the fused
        encoder as upb parsed them (``reference.RowSlice``)."""
        return getattr(self.iterate, "__module__", None) == _REFERENCE

    def stream(
        self,
        data: bytes | bytearray,
        *,
        max_tables: int | None = None,
        memory: int | None = None,
        raw: bool = False,
    ) -> Tables:
        """The file's rows as slices: streamed when the extract can (``max_tables``
        passed on when it takes it; ``raw``: as ``RowSlice`` when ``fusable``),
        else the whole file extracted at once, within ``memory`` bytes, and then
        sliced."""
        if self.iterate is None:
            return WholeFile(self.extract(data, memory=memory))
        try:
            if raw and self.fusable:
                return Tables(self.iterate(data, max_tables=max_tables, raw=True))
            if self.iterate_takes_max_tables:
                return Tables(self.iterate(data, max_tables=max_tables))
            return Tables(self.iterate(data))
        except WorkerError:
            raise
        except Exception as exc:  # any plugin failure is this input's failure
            raise ExtractFailed(f"iterOutputData raised {exc!r}") from exc

    def decode(self, data: bytes | bytearray, *, memory: int | None = None) -> Message:
        """The whole message; refused before upb parses it when its messages would
        take more than ``memory`` bytes (``budget.MESSAGE_BYTES`` each)."""
        if memory is not None:
            need = len(data) + MESSAGE_BYTES * message_count(data, self.message_class.DESCRIPTOR)
            if need > memory:
                raise ObjectTooLarge(
                    f"decoding the whole file would take about {need // MiB} MB,"
                    f" over the {memory // MiB} MB MAX_DECODED_BYTES allows"
                    " (a TABLE_EXTRACT with iterOutputData streams it)",
                    size=len(data),
                )
        message = self.message_class()
        try:
            message.ParseFromString(cast(bytes, data))  # upb reads any buffer, uncopied
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

    def extract(self, data: bytes | bytearray, *, memory: int | None = None) -> Rows:
        """Decode and extract; CPU-bound, so callers run it in a thread."""
        message = self.decode(data, memory=memory)
        try:
            tables = self.process(message)
        except WorkerError:
            raise  # a plugin may say for itself whether a retry can help
        except Exception as exc:  # any plugin failure is this input's failure
            raise ExtractFailed(f"TABLE_EXTRACT raised {exc!r}") from exc
        if not isinstance(tables, dict):
            raise ExtractFailed(f"TABLE_EXTRACT returned {type(tables).__name__}, not a dict")
        return tables


class Tables:
    """Slices of rows from an extract, checked as they come; ``table_names`` when
    the extract knows them up front."""

    def __init__(self, slices: Iterable[Slice]) -> None:
        self._slices = slices
        names = getattr(slices, "table_names", None)
        self.table_names: list[str] | None = None if names is None else list(names)

    def __iter__(self) -> Iterator[Slice]:
        iterator = iter(self._slices)
        while True:
            try:
                got = next(iterator, None)
            except WorkerError:
                raise
            except Exception as exc:
                raise ExtractFailed(f"iterOutputData raised {exc!r}") from exc
            if got is None:
                return
            if not (
                isinstance(got, tuple)
                and len(got) == 2
                and isinstance(got[1], Sequence)
                and not isinstance(got[1], str | bytes)
            ):
                raise ExtractFailed(
                    f"iterOutputData yielded {type(got).__name__}, not (name, rows)"
                )
            yield got


class WholeFile(Tables):
    """A whole-file extract's tables, handed out in slices; each table's rows are
    let go once its slices are taken."""

    def __init__(self, tables: Rows) -> None:
        super().__init__(())
        self._tables = tables
        self.table_names = list(tables)

    def __iter__(self) -> Iterator[Slice]:
        while self._tables:
            name = next(iter(self._tables))
            rows = self._tables.pop(name)
            for start in range(0, len(rows), SLICE_ROWS):
                yield name, rows[start : start + SLICE_ROWS]
