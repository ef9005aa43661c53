"""The test side of the broker tests: brokers, a database, Celery workers, waits.

Everything is bounded: every wait has a deadline, every worker and server is
stopped (SIGTERM, then SIGKILL to its process group) whatever happens. The
tests observe state, never the clock: rows in the database, lines in the
workers' logs, messages in the broker's queues.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from kombu import Connection

from tests.multiprocess.harness import PATIENCE, ROOT, Database, wait_until

SETTINGS = "tests.brokered.settings"
RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")
#: Every process the tests start gets this much time to stop on SIGTERM.
STOP_SECONDS = 15


def new_id(prefix: str = "evt") -> str:
    # The log shows the first 8 characters of a key: make them distinct.
    return f"{uuid.uuid4().hex[:8]}-{prefix}"


def broker_unavailable(url: str) -> str | None:
    """Why ``url``'s broker cannot be used, or ``None`` when it answers."""
    try:
        with Connection(url, connect_timeout=2) as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as error:  # kombu raises transport-specific errors
        return f"no broker at {url}: {error}"
    return None


@dataclass
class Broker:
    """A broker URL and a queue of this test's own on it."""

    kind: str
    url: str
    queue: str = field(default_factory=lambda: f"idempotency-test-{uuid.uuid4().hex[:12]}")
    #: A RabbitMQ node of the test's own (else the machine's, where rabbitmqctl looks).
    node: RabbitMQNode | None = None

    @property
    def prefix(self) -> str:
        """Redis: the key prefix of this test's keys (a queue name of its own is not
        enough there: kombu's hash of unacknowledged messages is one per database)."""
        return f"{self.queue}:" if self.kind == "redis" else ""

    def pending(self) -> tuple[int, int]:
        """Messages (waiting in the queue, delivered but not acknowledged)."""
        if self.kind == "redis":
            client = redis.Redis.from_url(self.url)
            with contextlib.closing(client):
                waiting = sum(
                    int(client.llen(f"{self.prefix}{self.queue}{suffix}"))
                    for suffix in ("", "\x06\x163", "\x06\x166", "\x06\x169")
                )
                return waiting, int(client.hlen(f"{self.prefix}unacked"))
        if shutil.which("rabbitmqctl"):
            return _rabbitmq_queue_depth(self.queue, self.node)
        with Connection(self.url) as connection:  # a remote broker: the ready count only
            declared = connection.default_channel.queue_declare(self.queue, passive=True)
            return int(declared.message_count), 0

    def remove(self) -> None:
        if self.kind == "redis":
            client = redis.Redis.from_url(self.url)
            with contextlib.closing(client):
                keys = list(client.scan_iter(match=f"{self.prefix}*", count=1000))
                if keys:
                    client.delete(*keys)
            return
        with contextlib.suppress(Exception), Connection(self.url) as connection:
            connection.default_channel.queue_delete(self.queue)


def _rabbitmq_queue_depth(queue: str, node: RabbitMQNode | None = None) -> tuple[int, int]:
    """(ready, unacknowledged) of a queue on the local node, from ``rabbitmqctl``.

    AMQP itself tells only the ready count; an acknowledgement still on its
    way shows only here.
    """
    done = subprocess.run(
        [
            # The machine's node through the wrapper on PATH (which takes on the
            # rabbitmq user's cookie); a node of the test's own with its own cookie.
            node.executable("rabbitmqctl") if node else "rabbitmqctl",
            *(("--node", node.name) if node else ()),
            "list_queues",
            "--quiet",
            "--no-table-headers",
            *("name", "messages_ready", "messages_unacknowledged"),
        ],
        capture_output=True,
        text=True,
        timeout=PATIENCE,
        check=True,
        env=node.environ() if node else None,
    )
    for line in done.stdout.splitlines():
        name, ready, unacknowledged = line.split("\t")
        if name == queue:
            return int(ready), int(unacknowledged)
    return 0, 0


@dataclass
class Worker:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Cluster:
    """Celery workers on one broker and database, and what they left in their logs."""

    broker: Broker
    database_url: str
    database: Database
    gates: Path
    workers: list[Worker] = field(default_factory=list)
    extra_environ: dict[str, str] = field(default_factory=dict)

    def environ(self) -> dict[str, str]:
        return {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": SETTINGS,
            "DATABASE_URL": self.database_url,
            "BROKER_TEST_URL": self.broker.url,
            "BROKER_TEST_QUEUE": self.broker.queue,
            "BROKER_TEST_PREFIX": self.broker.prefix,
            "BROKER_TEST_GATES": str(self.gates),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            **self.extra_environ,
        }

    def start(self, count: int = 1, concurrency: int = 2, app: str = "tests.brokered.app") -> None:
        """Start ``count`` workers (prefork pools of ``concurrency``); wait until ready."""
        for _ in range(count):
            name = f"w{len(self.workers) + 1}-{self.broker.queue}@127.0.0.1"
            log = self.gates / f"worker-{len(self.workers) + 1}.log"
            with log.open("wb") as output:
                process = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "celery",
                        "-A",
                        app,
                        "worker",
                        "--pool",
                        "prefork",
                        "--concurrency",
                        str(concurrency),
                        "--queues",
                        self.broker.queue,
                        "--hostname",
                        name,
                        "--without-gossip",
                        "--without-mingle",
                        "--without-heartbeat",
                        "--loglevel",
                        "INFO",
                    ],
                    cwd=ROOT,
                    env=self.environ(),
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.workers.append(Worker(name, process, log))
        for worker in self.workers:
            wait_until(lambda w=worker: self._ready(w), f"{worker.name} to be ready")

    def _ready(self, worker: Worker) -> bool:
        if worker.process.poll() is not None:
            raise RuntimeError(f"{worker.name} exited:\n{worker.text()[-3000:]}")
        return " ready." in worker.text()

    def stop(self) -> None:
        for worker in self.workers:
            stop_process(worker.process)

    def publish(
        self,
        task: str,
        event: dict[str, Any],
        *,
        times: int = 1,
        argument: str = "event",
        **options: Any,
    ) -> None:
        """Publish ``task`` with ``event`` as its keyword ``argument``, ``times`` times."""
        self._send(task, [{argument: event}] * times, options)

    def publish_many(self, task: str, events: list[dict[str, Any]]) -> None:
        """Publish ``task`` once per event, over one connection."""
        self._send(task, [{"event": event} for event in events], {})

    def _send(self, task: str, messages: list[dict[str, Any]], options: dict[str, Any]) -> None:
        from celery import Celery

        publisher = Celery("publisher", broker=self.broker.url, set_as_current=False)
        publisher.conf.broker_transport_options = {
            "global_keyprefix": self.broker.prefix,
            # RabbitMQ: publishing returns once the broker has the message (on disk).
            "confirm_publish": True,
        }
        try:
            with publisher.producer_or_acquire(None) as producer:
                for kwargs in messages:
                    publisher.send_task(
                        task, kwargs=kwargs, queue=self.broker.queue, producer=producer, **options
                    )
        finally:
            publisher.close()

    def relay_outbox(self) -> str:
        """One pass of the outbox relay (``relay_idempotency_outbox --once``); its output."""
        done = subprocess.run(
            [sys.executable, "-m", "tests.brokered.relay"],
            cwd=ROOT,
            env=self.environ(),
            capture_output=True,
            text=True,
            timeout=PATIENCE,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"the relay failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def logs(self) -> str:
        return "\n".join(worker.text() for worker in self.workers)

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.logs()))

    def succeeded(self) -> int:
        return self.count(r"\] succeeded in ")

    def replayed(self) -> int:
        return self.count(r"Replayed scope=")

    def wait_for_log(self, pattern: str, times: int = 1, what: str = "") -> None:
        wait_until(
            lambda: self.count(pattern) >= times, what or f"{times} x {pattern!r} in the logs"
        )

    def wait_until(self, condition: Any, what: str, seconds: float = PATIENCE) -> None:
        def check() -> bool:
            for worker in self.workers:
                if worker.process.poll() is not None:
                    raise RuntimeError(f"{worker.name} exited:\n{worker.text()[-3000:]}")
            return bool(condition())

        try:
            wait_until(check, what, seconds)
        except AssertionError as error:
            raise AssertionError(f"{error}\n--- worker logs ---\n{self.logs()[-6000:]}") from None

    def effects(self, event_id: str) -> int:
        return int(
            self.database.value("SELECT count(*) FROM testapp_order WHERE item = %s", [event_id])
        )

    def waiting_on_locks(self) -> int:
        """Sessions of the test's database waiting on a lock (a duplicate at its claim)."""
        return int(
            self.database.value(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )

    def gate_started(self, event_id: str) -> bool:
        return (self.gates / f"{event_id}.started").exists()

    def release(self, event_id: str) -> None:
        (self.gates / f"{event_id}.go").touch()

    def crashed(self, event_id: str) -> bool:
        return (self.gates / f"{event_id}.crashed").exists()


def stop_process(process: subprocess.Popen[Any]) -> None:
    """SIGTERM; SIGKILL to the whole process group if it does not end in time."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_SECONDS)


def migrate(database_url: str) -> None:
    done = subprocess.run(
        [sys.executable, "manage.py", "migrate", "--no-input", "--settings", SETTINGS],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=PATIENCE * 4,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"migrate failed:\n{done.stdout}\n{done.stderr}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class RedisServer:
    """A redis-server of the test's own, on a free port, persisting every write."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        executable = shutil.which("redis-server")
        assert executable is not None
        log = (self.directory / "redis.log").open("ab")
        with log:
            self.process = subprocess.Popen(
                [
                    executable,
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--dir",
                    str(self.directory),
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until(lambda: broker_unavailable(self.url) is None, "the test's redis-server")

    def kill(self) -> None:
        """SIGKILL: what the broker keeps is what it had on disk."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=STOP_SECONDS)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


@dataclass
class RabbitMQNode:
    """A RabbitMQ node of the test's own: its own name, ports, data and cookie.

    Started from ``rabbitmq-server`` with ``RABBITMQ_*`` variables; messages
    and durable queues are on disk in ``directory``, so a restart keeps them.
    """

    directory: Path
    port: int = field(default_factory=free_port)
    distribution_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return f"idempotency{self.port}@localhost"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def environ(self) -> dict[str, str]:
        return {
            **os.environ,
            # Its own Erlang cookie, created there on first start.
            "HOME": str(self.directory),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.distribution_port),
            "RABBITMQ_MNESIA_BASE": str(self.directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.directory / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.directory / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.directory / "rabbitmq.pid"),
        }

    @staticmethod
    def executable(name: str) -> str:
        """RabbitMQ's own script, not Debian's wrapper (which runs it as the rabbitmq user)."""
        found = shutil.which(name, path="/usr/lib/rabbitmq/bin") or shutil.which(name)
        assert found is not None, f"{name} is not installed"
        return found

    def start(self) -> None:
        executable = self.executable("rabbitmq-server")
        # Not the machine's configuration, which binds the machine's port.
        (self.directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        (self.directory / "enabled_plugins").write_text("[].\n")
        with (self.directory / "server.log").open("ab") as log:
            self.process = subprocess.Popen(
                [executable],
                env=self.environ(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def answers() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                log_text = (self.directory / "server.log").read_text(errors="replace")
                raise RuntimeError(f"rabbitmq-server exited:\n{log_text[-3000:]}")
            return broker_unavailable(self.url) is None

        # An Erlang node takes seconds to boot, more on a busy machine.
        wait_until(answers, "the test's RabbitMQ node", seconds=PATIENCE * 3)

    def kill(self) -> None:
        """SIGKILL to the node's process group: what it keeps is what it had on disk."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=STOP_SECONDS)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
