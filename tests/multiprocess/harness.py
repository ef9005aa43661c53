"""The test side: a database of the test's own, gunicorn, an HTTP client, gates.

Everything here is bounded: every request has a timeout, every wait a
deadline (:data:`PATIENCE`), and the server is stopped (SIGTERM, then SIGKILL)
whatever happens.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import dj_database_url
import psycopg

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = "tests.multiprocess.settings"
WORKERS = 4
#: Upper bound of any single wait; a correct run needs a fraction of it.
PATIENCE = 30.0
#: Sent as both the CSRF cookie and header by the session-authenticated client.
CSRF_TOKEN = "multiprocesstestsonlycsrftoken00"

T = TypeVar("T")


def postgres_url() -> str | None:
    """``DATABASE_URL`` if it names a PostgreSQL database, else ``None``."""
    url = os.environ.get("DATABASE_URL", "")
    if not url:
        return None
    engine = dj_database_url.parse(url)["ENGINE"]
    return url if engine == "django.db.backends.postgresql" else None


# The database -------------------------------------------------------------


@contextlib.contextmanager
def scratch_database(url: str) -> Iterator[str]:
    """Create a database beside ``url``'s, yield its URL, drop it at the end.

    Its name carries this process' id, so it clashes neither with pytest-django's
    ``test_<name>`` nor with a parallel run.
    """
    config = dj_database_url.parse(url)
    name = f"{config['NAME'] or 'postgres'}_mp_{os.getpid()}"

    def admin(statement: str) -> None:
        with psycopg.connect(**_conninfo(config, "postgres"), autocommit=True) as connection:
            connection.execute(statement)

    admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin(f'CREATE DATABASE "{name}"')
    try:
        parts = urlsplit(url)
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _conninfo(config: Mapping[str, Any], dbname: str) -> dict[str, Any]:
    info = {
        "dbname": dbname,
        "user": config.get("USER") or None,
        "password": config.get("PASSWORD") or None,
        "host": config.get("HOST") or None,
        "port": config.get("PORT") or None,
    }
    return {name: value for name, value in info.items() if value is not None}


class Database:
    """Direct SQL on the server's database: what was executed, what is stored."""

    def __init__(self, url: str) -> None:
        config = dj_database_url.parse(url)
        self.connection = psycopg.connect(**_conninfo(config, config["NAME"]), autocommit=True)
        self._lock = threading.Lock()

    def close(self) -> None:
        self.connection.close()

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock, self.connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def value(self, sql: str, params: Sequence[Any] = ()) -> Any:
        (row,) = self.rows(sql, params)
        return row[0]

    def backend_alive(self, pid: int) -> bool:
        return bool(self.value("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid]))

    def terminate(self, pid: int) -> None:
        assert self.value("SELECT pg_terminate_backend(%s)", [pid]) is True

    def wait_backend_gone(self, pid: int) -> None:
        """Until PostgreSQL has ended session ``pid`` (and rolled its transaction back)."""
        wait_until(lambda: not self.backend_alive(pid), f"backend {pid} to end")


def wait_until(condition: Callable[[], bool], what: str, seconds: float = PATIENCE) -> None:
    """Poll ``condition`` until it holds; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {seconds} s")
        time.sleep(0.01)


# The server ---------------------------------------------------------------


@dataclass
class Server:
    """gunicorn serving tests.multiprocess.urls on a loopback port."""

    port: int
    process: subprocess.Popen[bytes]
    environ: dict[str, str]
    log: Path

    def workers(self) -> set[int]:
        """Pids of the arbiter's live worker processes."""
        return {pid for pid, parent in _processes() if parent == self.process.pid}

    def wait_for_workers(self) -> None:
        wait_until(lambda: len(self.workers()) == WORKERS, f"{WORKERS} workers")

    def manage(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        """``manage.py`` with the server's settings and database."""
        return subprocess.run(
            [sys.executable, "manage.py", *arguments],
            cwd=ROOT,
            env=self.environ,
            capture_output=True,
            text=True,
            timeout=PATIENCE * 2,
            check=False,
        )

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _processes() -> Iterator[tuple[int, int]]:
    """(pid, parent pid) of every process, from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # The command name may hold spaces and parentheses: split after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            yield int(entry.name), int(fields[1])


def server_environ(database_url: str, fault_dir: Path, closed_port: int) -> dict[str, str]:
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": SETTINGS,
        "DATABASE_URL": database_url,
        "MP_FAULT_DIR": str(fault_dir),
        "MP_CLOSED_PORT": str(closed_port),
        "MP_REDIS_PREFIX": f"mp{os.getpid()}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


def prepare(environ: dict[str, str]) -> dict[str, Any]:
    """Migrate the database and create the users (see prepare.py)."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.multiprocess.prepare"],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=PATIENCE * 4,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"preparing the database failed:\n{done.stderr}")
    loaded: dict[str, Any] = json.loads(done.stdout)
    return loaded


@contextlib.contextmanager
def gunicorn(environ: dict[str, str], log: Path) -> Iterator[Server]:
    """Start gunicorn; yield it once it answers; SIGTERM, then SIGKILL, at the end.

    The test binds the listening socket and hands it over (``fd://``), so
    the port cannot be taken by anyone else in between.
    """
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        listener.bind(("127.0.0.1", 0))
        listener.listen(1024)
        output = stack.enter_context(log.open("wb"))
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--config",
                str(ROOT / "tests" / "multiprocess" / "gunicorn.conf.py"),
                "--bind",
                f"fd://{listener.fileno()}",
            ],
            cwd=ROOT,
            env=environ,
            stdout=output,
            stderr=subprocess.STDOUT,
            pass_fds=(listener.fileno(),),
        )
        stack.callback(_stop, process)
        server = Server(listener.getsockname()[1], process, environ, log)
        _wait_until_serving(server)
        server.wait_for_workers()
        yield server


def _wait_until_serving(server: Server) -> None:
    def answers() -> bool:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"gunicorn exited ({server.process.returncode}):\n{server.log_tail()}"
            )
        with contextlib.suppress(OSError, http.client.HTTPException):
            return send(server.port, "GET", "/mp/ready/", timeout=5).status == 200
        return False

    wait_until(answers, "gunicorn to answer", seconds=PATIENCE * 2)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=15)


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port bound for the duration, never listening: connections are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]


# The client ---------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes
    seconds: float = 0.0

    @property
    def replayed(self) -> bool:
        return self.headers.get("idempotent-replayed") == "true"

    @property
    def executed(self) -> bool:
        """A first execution's answer (not a replay, not an error)."""
        return self.status == 201 and not self.replayed

    def json(self) -> Any:
        return json.loads(self.body)

    def problem_type(self) -> str:
        assert self.headers.get("content-type") == "application/problem+json", self
        kind: str = self.json()["type"]
        return kind.rsplit(":", 1)[1]


def send(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = PATIENCE,
) -> Reply:
    """One request on a new connection; ``body`` is sent as JSON."""
    all_headers = dict(headers or {})
    payload = None
    if body is not None:
        payload = json.dumps(body).encode()
        all_headers["Content-Type"] = "application/json"
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    started = time.monotonic()
    try:
        connection.request(method, path, body=payload, headers=all_headers)
        response = connection.getresponse()
        data = response.read()
        headers_read = {name.lower(): value for name, value in response.getheaders()}
        return Reply(response.status, headers_read, data, time.monotonic() - started)
    finally:
        connection.close()


def stampede(jobs: Sequence[Callable[[], T]]) -> list[T]:
    """Run ``jobs`` on as many threads, released together by a barrier."""
    barrier = threading.Barrier(len(jobs), timeout=PATIENCE)
    results: list[Any] = [None] * len(jobs)

    def run(index: int, job: Callable[[], T]) -> None:
        try:
            barrier.wait()
            results[index] = job()
        except BaseException as error:  # handed to the test below
            results[index] = error

    threads = [threading.Thread(target=run, args=item, daemon=True) for item in enumerate(jobs)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + PATIENCE * 2
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "a request never ended"
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


@dataclass
class InFlight:
    """A request sent from a thread of its own, for the test to interfere with."""

    thread: threading.Thread
    outcome: list[Reply | BaseException] = field(default_factory=list)

    @classmethod
    def start(cls, send_it: Callable[[], Reply]) -> InFlight:
        outcome: list[Reply | BaseException] = []

        def run() -> None:
            try:
                outcome.append(send_it())
            except BaseException as error:  # read by the test
                outcome.append(error)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return cls(thread, outcome)

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()

    def result(self) -> Reply | BaseException:
        self.thread.join(PATIENCE)
        assert not self.thread.is_alive(), "the request in flight never ended"
        return self.outcome[0]


@dataclass(frozen=True)
class Gate:
    """The test's side of views.hold_if_asked: see who is inside, then let them go."""

    directory: Path
    name: str

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Hold": self.name}

    def wait_inside(self, request: InFlight) -> dict[str, int]:
        """The held request's worker pid and database backend pid, once it is at the gate."""
        inside = self.directory / f"{self.name}.inside"

        def arrived() -> bool:
            if request.done:
                raise AssertionError(f"the request ended before the gate: {request.result()}")
            return inside.exists()

        wait_until(arrived, f"a request at gate {self.name!r}")
        loaded: dict[str, int] = json.loads(inside.read_text())
        return loaded

    def open(self) -> None:
        (self.directory / f"{self.name}.open").touch()


_serials = itertools.count(1)


def serial() -> int:
    """A number no other request of the run uses: it tags what one execution creates."""
    return next(_serials)
