"""A gunicorn serving the benchmark project on a free loopback port."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def gunicorn(workers: int, environ: dict[str, str]) -> Iterator[int]:
    """Start gunicorn with ``workers`` sync workers; yield its port; stop it.

    The listening socket is bound here and handed over as ``fd://``, so the
    port is never free for someone else to take in between.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "benchmarks.wsgi",
        "--bind",
        f"fd://{listener.fileno()}",
        "--workers",
        str(workers),
        "--worker-class",
        "sync",
        "--preload",
        "--log-level",
        "warning",
    ]
    env = {
        **os.environ,
        **environ,
        "DJANGO_SETTINGS_MODULE": "benchmarks.settings",
        "PYTHONPATH": str(ROOT),
    }
    process = subprocess.Popen(command, cwd=ROOT, env=env, pass_fds=(listener.fileno(),))
    try:
        _wait_until_serving(port, process)
        yield port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        listener.close()


def _wait_until_serving(port: int, process: subprocess.Popen[bytes]) -> None:
    # The socket already listens, so a request just queues until a worker
    # takes it: one request answered means the application is up.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gunicorn exited with status {process.returncode}")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            connection.request("GET", "/plain/")
            connection.getresponse().read()
            return
        except (OSError, http.client.HTTPException):
            continue
        finally:
            connection.close()
    raise RuntimeError("gunicorn did not answer within 60 seconds")
