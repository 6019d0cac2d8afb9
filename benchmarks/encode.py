"""CPU per row from a file's bytes to signed BatchWriteItem bodies: the dict path
against the fused encoder, side by side in one process.

    python -m benchmarks.encode [--rows 200000] [--key N|S]

On one ``worker sample`` file (8 tables, 10 columns): the reference walk
(``iterOutputData(raw=True)``), then per slice either ``ItemBuilder.convert``
of the rows as dicts (the dict path) or ``FusedBuilder.convert`` of the upb
rows (the fused encoder), then 25-item request bodies (orjson) signed by the
worker's SigV4 signer. Thread CPU time per row, best of three rounds each,
interleaved; compile bytecode first (``make bench`` does).

Also printed: the floor under any encoder written in Python over upb's API,
the walk and reading each value's kind and value with nothing encoded.
"""

from __future__ import annotations

import argparse
import time

from botocore.credentials import Credentials

from worker.entry.sample import sample_file
from worker.loader.ddb_http import CONTENT_TYPE, TARGET, encode_request
from worker.loader.encode import FusedBuilder
from worker.loader.extract import reference
from worker.loader.items import ItemBuilder, KeyAttribute, KeySchema, Origin
from worker.loader.signer import Signer

BATCH = 25


def cpu_per_row(data: bytes, schema: KeySchema, *, fused: bool) -> float:
    signer = Signer("http://127.0.0.1:1/", "us-east-1", "dynamodb", content_type=CONTENT_TYPE,
                    target=TARGET)  # fmt: skip
    credentials = Credentials("bench", "bench").get_frozen_credentials()
    builders: dict[str, FusedBuilder | ItemBuilder] = {}
    start, rows = time.thread_time(), 0
    for name, chunk in reference.iterOutputData(data, raw=True):
        builder = builders.get(name)
        if builder is None:
            make = FusedBuilder if fused else ItemBuilder
            builder = builders[name] = make(schema, "null", Origin("b", "k", "r", name))
        assert isinstance(chunk, reference.RowSlice)
        items = builder.convert(chunk if fused else chunk.dicts(), rows).items
        rows += len(chunk)
        for at in range(0, len(items), BATCH):
            puts = [{"PutRequest": {"Item": item}} for item in items[at : at + BATCH]]
            signer.headers(credentials, encode_request({name: puts}))
    return (time.thread_time() - start) / rows * 1e6


def floor_per_row(data: bytes) -> float:
    """The walk and every value read through upb, nothing encoded."""
    start, rows = time.thread_time(), 0
    for _, chunk in reference.iterOutputData(data, raw=True):
        assert isinstance(chunk, reference.RowSlice)
        rows += len(chunk)
        for row in chunk.rows:
            for value in row.values:
                kind = value.WhichOneof("kind")
                if kind is not None:
                    getattr(value, kind)
    return (time.thread_time() - start) / rows * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--key", choices=["N", "S"], default="N", help="the tables' hash key")
    args = parser.parse_args()
    data = sample_file(rows=args.rows, tables=8).SerializeToString()
    schema = KeySchema(KeyAttribute("id", args.key))
    rounds = [(cpu_per_row(data, schema, fused=False), cpu_per_row(data, schema, fused=True),
               floor_per_row(data)) for _ in range(3)]  # fmt: skip
    dicts, fused, floor = (min(r[i] for r in rounds) for i in range(3))
    print(f"{args.rows:,} rows, {args.key} key: dict path {dicts:.2f} µs CPU per row, "
          f"fused {fused:.2f} ({fused / dicts:.2f}x); upb reads alone {floor:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
