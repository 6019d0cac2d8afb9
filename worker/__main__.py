"""``python -m worker``: the same as the ``worker`` console script."""

from worker.entry.cli import main

raise SystemExit(main())
