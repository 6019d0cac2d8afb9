"""Endpoints the benchmarks run against, each in its own process on loopback."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"server on port {port} did not start") from None
            time.sleep(0.1)
        else:
            return


@contextlib.contextmanager
def server_process(module: str, *args: str) -> Iterator[str]:
    """``python -m MODULE ... PORT`` on a free loopback port; yields its URL."""
    port = free_port()
    command = [sys.executable, "-m", module, *args, str(port)]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_port(port, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def moto_process() -> contextlib.AbstractContextManager[str]:
    """moto's server as a separate process (no GIL shared with the client)."""
    return server_process("moto.server", "-H", "127.0.0.1", "-p")


def sink_process() -> contextlib.AbstractContextManager[str]:
    """``benchmarks.sink``, the fast DynamoDB endpoint."""
    return server_process("benchmarks.sink", "--port")


@contextlib.contextmanager
def local_aws_env(endpoint: str) -> Iterator[None]:
    """Point this process's AWS SDKs at a local endpoint with throwaway credentials."""
    with tempfile.NamedTemporaryFile() as empty:
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_REGION="us-east-1",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_CONFIG_FILE=empty.name,
            AWS_SHARED_CREDENTIALS_FILE=empty.name,
        )
        yield
