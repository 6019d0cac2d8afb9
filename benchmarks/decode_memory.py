"""The memory model behind the derived caps (``worker.loader.budget``), measured.

    python -m benchmarks.decode_memory [--mb 10]

Prints the runtime's own peak (``worker load`` of a 1,000-row file: the
interpreter, the SDK, the clients) and, for crafted files of ``--mb`` decoded
megabytes and the benchmark's typical file, the peak of ``worker load`` over
that runtime, per path, beside what the model allows:
- streamed: ``WORKING_SET + STREAMED_RATIO x decoded``;
- whole file: ``WHOLE_FILE_RATIO x decoded`` (a file whose messages would take
  more is refused before upb parses it).
Each file is loaded with ``MAX_DECODED_BYTES`` at its own size: at the cap.
Each load runs in a fresh process against the fast DynamoDB sink; VmHWM from
``/proc/self/status``. tests/test_decode_memory.py runs the same at a small
size, so the constants cannot drift from what the code does.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchmarks.memory import WHOLE_FILE, peak_mb, sample
from benchmarks.servers import sink_process
from worker.loader.budget import RUNTIME_PEAK, STREAMED_RATIO, WHOLE_FILE_RATIO, WORKING_SET
from worker.loader.extract.wire import encode_varint

MiB = 1024 * 1024


def _len(number: int, payload: bytes) -> bytes:
    return encode_varint(number << 3 | 2) + encode_varint(len(payload)) + payload


def _table(body: bytes) -> bytes:
    return _len(4, _len(1, b"t") + _len(2, b"id") + body)


CRAFTED: dict[str, Callable[[int], bytes]] = {
    "created_at repeated (18 00)": lambda size: b"\x18\x00" * (size // 2),
    "empty tables (22 00)": lambda size: _len(1, b"f") + b"\x22\x00" * (size // 2),
    "empty rows (1a 00)": lambda size: _table(b"\x1a\x00" * (size // 2)),
    "one row of unset values": lambda size: _table(_len(3, b"\x0a\x00" * (size // 2))),
    "rows of one int": lambda size: _table(_len(3, _len(1, b"\x10\x02")) * (size // 6)),
    "many columns": lambda size: _len(
        4, b"".join(_len(2, b"%05d" % (i % 99_999)) for i in range(size // 7))
    ),
}


def measure(env: dict[str, str], scratch: Path, size: int) -> dict[str, float]:
    """Peaks over the runtime, in MB, keyed ``"{file} / {path}"``; and the runtime."""
    tiny = scratch / "tiny.pb"
    sample(tiny, 1_000, env)
    paths = {"streamed": env, "whole file": {**env, "TABLE_EXTRACT": WHOLE_FILE}}
    runtime = {name: peak_mb(tiny, path_env)[0] for name, path_env in paths.items()}
    results = {"runtime": runtime["streamed"]}
    files = {name: make(size) for name, make in CRAFTED.items()}
    typical = scratch / "typical.pb"
    sample(typical, size // 100, env)  # about 100 bytes a row
    files["typical (benchmark sample)"] = typical.read_bytes()
    for name, data in files.items():
        path = scratch / "crafted.pb"
        path.write_bytes(data)
        at_cap = {"MAX_OBJECT_BYTES": str(len(data)), "MAX_DECODED_BYTES": str(len(data))}
        for path_name, path_env in paths.items():
            peak, code = peak_mb(path, {**path_env, **at_cap})
            results[f"{name} / {path_name}"] = peak - runtime[path_name]
            results[f"{name} / {path_name} / exit"] = code
    return results


def allowed_mb(path_name: str, decoded_mb: float) -> float:
    """What the derived cap promises over the runtime (``budget._what_fits``: the
    working set is reserved on both paths)."""
    ratio = STREAMED_RATIO if path_name == "streamed" else WHOLE_FILE_RATIO
    return WORKING_SET / MiB + ratio * decoded_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=10)
    args = parser.parse_args()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
           "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "LOG_LEVEL": "ERROR",
           "SCHEMA_PREFIX": "mem", "SOURCE_BUCKETS": "*"}  # fmt: skip
    size = args.mb * MiB
    with tempfile.TemporaryDirectory() as scratch, sink_process() as sink:
        results = measure({**env, "AWS_ENDPOINT_URL_DYNAMODB": sink}, Path(scratch), size)
    print(f"runtime peak: {results.pop('runtime'):.1f} MB (RUNTIME_PEAK = {RUNTIME_PEAK // MiB})")
    for key, over in results.items():
        if key.endswith("/ exit"):
            continue
        path_name = key.rsplit(" / ", 1)[1]
        allowed = allowed_mb(path_name, args.mb)
        print(f"  {key:<48} {over:7.1f} MB over the runtime (model allows {allowed:6.1f}),"
              f" exit {results[key + ' / exit']:.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
