"""``python -m benchmarks``: the whole benchmark (see ``benchmarks/harness.py``)."""

from benchmarks.harness import main

main()
