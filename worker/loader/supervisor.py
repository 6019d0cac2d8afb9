"""``worker poll --processes N``: N independent poller processes under one parent.

One Python process is bound by the GIL, so a container with several vCPUs runs
several pollers. The parent forwards SIGTERM/SIGINT to every child, waits for
them to drain, and exits non-zero if any child dies unexpectedly (after
stopping the others), so ECS replaces the task.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType

from worker.core.log import get_logger

log = get_logger(__name__)


def supervise(count: int, child_args: Sequence[str]) -> int:
    command = [sys.executable, "-m", "worker", "poll", "--processes", "1", *child_args]
    children = [subprocess.Popen(command) for _ in range(count)]
    log.info("supervisor_started", children=[c.pid for c in children])
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _watch(children, lambda: stopping)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _watch(children: list[subprocess.Popen[bytes]], is_stopping: Callable[[], bool]) -> int:
    while True:
        codes = [child.poll() for child in children]
        if all(code is not None for code in codes):
            worst = max((abs(code) for code in codes if code is not None), default=0)
            log.info("supervisor_stopped", exit_codes=codes)
            return worst if is_stopping() else max(worst, 1)
        dead = [c for c, code in zip(children, codes, strict=True) if code is not None]
        if dead and not is_stopping():
            log.error(
                "child_died", pids=[c.pid for c in dead], exit_codes=[c.returncode for c in dead]
            )
            for child in children:
                if child.poll() is None:
                    child.terminate()
            for child in children:
                child.wait()
            return 1
        time.sleep(0.2)
