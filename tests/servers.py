"""Servers the tests start for themselves: a Redis Cluster and PgBouncer.

Each runs from the binary Debian installs (``redis-server``/``redis-cli``,
``pgbouncer``), on free loopback ports, with its files in a temporary
directory, in a process group of its own that is killed (SIGKILL) when the
fixture ends, whatever happened in between. Where a binary is missing the
tests that need it skip with the reason (``REQUIRE_MARKERS`` turns that into a
failure, as CI does).

Waits are bounded (:data:`PATIENCE`) and poll a condition, never a fixed sleep.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dj_database_url
import pytest
import redis

#: Upper bound of any single wait; a healthy start needs a fraction of it.
PATIENCE = 60.0

#: A master unreachable this long (ms) is failed over to its replica. Short,
#: so that a test sees the takeover within seconds; production keeps the
#: default (15 s) or what its network needs.
NODE_TIMEOUT_MS = 1000


def wait_until(condition: Callable[[], bool], what: str, seconds: float = PATIENCE) -> None:
    """Poll ``condition`` until it holds; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {seconds} s")
        time.sleep(0.05)


def free_ports(count: int, *, offset: int = 0) -> list[int]:
    """``count`` loopback ports nobody listens on (and ``port + offset`` free too).

    Redis Cluster nodes also listen on their port + 10000 (the cluster bus).
    """
    ports: list[int] = []
    with contextlib.ExitStack() as stack:
        while len(ports) < count:
            probe = stack.enter_context(socket.socket())
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
            if offset and (port + offset > 65535 or not _port_free(port + offset)):
                continue
            ports.append(port)
    return ports


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``process``' whole group (it leads one of its own) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=PATIENCE)


def _start(command: Sequence[str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as output:
        return subprocess.Popen(
            command, cwd=cwd, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )


# Redis Cluster ------------------------------------------------------------


def redis_cluster_missing() -> str | None:
    """Why a cluster cannot be started here, or ``None``."""
    for binary in ("redis-server", "redis-cli"):
        if shutil.which(binary) is None:
            return f"needs {binary} (Debian's redis-server package) for a Redis Cluster"
    return None


@dataclass
class RedisNode:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass
class RedisCluster:
    """Three masters, each with one replica, on loopback ports."""

    directory: Path
    nodes: list[RedisNode] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The startup node, as django-redis' ``LOCATION`` (the client finds the others)."""
        return f"redis://{self.nodes[0].address}"

    def cluster_nodes(self) -> dict[str, dict[str, object]]:
        """``CLUSTER NODES`` as a live node sees it, by address (``flags``, ``master_id``...)."""
        node = next(node for node in self.nodes if node.alive())
        with node.client() as client:
            nodes: dict[str, dict[str, object]] = client.execute_command("CLUSTER NODES")
        return nodes

    def master_of(self, name: str) -> RedisNode:
        """The node that serves the slot of Redis key ``name`` now."""
        node = next(node for node in self.nodes if node.alive())
        with node.client() as client:
            slot = int(client.execute_command("CLUSTER KEYSLOT", name))
            for start, end, master, *_ in client.execute_command("CLUSTER SLOTS"):
                if int(start) <= slot <= int(end):
                    return self.node(int(master[1]))
        raise AssertionError(f"no master serves slot {slot}")

    def node(self, port: int) -> RedisNode:
        return next(node for node in self.nodes if node.port == port)

    def masters(self) -> list[RedisNode]:
        addresses = {
            address
            for address, entry in self.cluster_nodes().items()
            if "master" in str(entry["flags"]) and "fail" not in str(entry["flags"])
        }
        return [node for node in self.nodes if node.address in addresses and node.alive()]

    def kill(self, node: RedisNode) -> None:
        """SIGKILL one node: no goodbye to the cluster, no data written anywhere."""
        _stop_group(node.process)

    def restart(self, node: RedisNode) -> None:
        """Start a killed node again: it rejoins, as the replica of whoever took over."""
        assert not node.alive()
        log = self.directory / f"redis-{node.port}.log"
        node.process = _start(_redis_node_command(node.port), log, self.directory)
        wait_until(lambda: _answers(node), f"redis-server on {node.port}")
        wait_until(self.healthy, "the cluster to serve every slot")
        wait_until(self.replicas_in_sync, "every master's replica to be in sync")

    def replica_of(self, master: RedisNode) -> RedisNode:
        nodes = self.cluster_nodes()
        master_id = nodes[master.address]["node_id"]
        (replica,) = (
            node
            for node in self.nodes
            if node.alive() and nodes[node.address]["master_id"] == master_id
        )
        return replica

    def allow_failover(self, replica: RedisNode, allowed: bool) -> None:
        """Let ``replica`` take over from its failed master, or hold it back."""
        with replica.client() as client:
            client.config_set("cluster-replica-no-failover", "no" if allowed else "yes")

    def healthy(self) -> bool:
        """Every slot served by a live master, as every live node sees it.

        (``cluster_state:ok`` alone does not say it: with
        ``cluster-require-full-coverage no`` the state stays ok while the
        slots of a dead master wait for its replica.)
        """
        live = {node.port for node in self.nodes if node.alive()}
        for node in self.nodes:
            if not node.alive():
                continue
            try:
                with node.client() as client:
                    state = client.execute_command("CLUSTER INFO").get("cluster_state")
                    ranges = client.execute_command("CLUSTER SLOTS")
            except redis.RedisError:
                return False
            served = sum(
                int(end) - int(start) + 1
                for start, end, master, *_ in ranges
                if int(master[1]) in live
            )
            if state != "ok" or served != 16384:
                return False
        return True

    def replicas_in_sync(self) -> bool:
        """Every live master has a replica whose link is up."""
        for node in self.masters():
            with node.client() as client:
                info = client.info("replication")
            if not any(
                name.startswith("slave") and value.get("state") == "online"
                for name, value in info.items()
                if isinstance(value, dict)
            ):
                return False
        return True


def _redis_node_command(port: int) -> list[str]:
    return [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        f"nodes-{port}.conf",
        "--cluster-node-timeout",
        str(NODE_TIMEOUT_MS),
        # Only the dead master's slots stop; the others keep serving.
        "--cluster-require-full-coverage",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
    ]


@contextlib.contextmanager
def redis_cluster(masters: int = 3) -> Iterator[RedisCluster]:
    """A Redis Cluster of ``masters`` masters with one replica each; killed at the end."""
    with tempfile.TemporaryDirectory(prefix="idempotency-redis-cluster-") as work:
        cluster = RedisCluster(Path(work))
        try:
            for port in free_ports(masters * 2, offset=10000):
                log = cluster.directory / f"redis-{port}.log"
                process = _start(_redis_node_command(port), log, cluster.directory)
                cluster.nodes.append(RedisNode(port, process))
            for node in cluster.nodes:
                wait_until(lambda node=node: _answers(node), f"redis-server on {node.port}")
            created = subprocess.run(
                [
                    "redis-cli",
                    "--cluster",
                    "create",
                    *(node.address for node in cluster.nodes),
                    "--cluster-replicas",
                    "1",
                    "--cluster-yes",
                ],
                capture_output=True,
                text=True,
                timeout=PATIENCE,
                check=False,
            )
            if created.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout}")
            wait_until(cluster.healthy, "the cluster to serve every slot")
            wait_until(cluster.replicas_in_sync, "every master's replica to be in sync")
            yield cluster
        finally:
            for node in cluster.nodes:
                _stop_group(node.process)


def _answers(node: RedisNode) -> bool:
    if not node.alive():
        raise RuntimeError(f"redis-server on {node.port} exited ({node.process.returncode})")
    try:
        with node.client() as client:
            return bool(client.ping())
    except redis.ConnectionError:
        return False


# PgBouncer ----------------------------------------------------------------

#: PgBouncer releases prepared statements across transactions from this version on.
PREPARED_STATEMENTS_SINCE = (1, 21)


def pgbouncer_missing() -> str | None:
    """Why PgBouncer cannot be started here, or ``None``."""
    if shutil.which("pgbouncer") is None and not Path("/usr/sbin/pgbouncer").exists():
        return "needs pgbouncer (Debian's pgbouncer package)"
    return None


def _pgbouncer_binary() -> str:
    return shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def pgbouncer_version() -> tuple[int, ...]:
    """PgBouncer's version, from ``pgbouncer --version``."""
    done = subprocess.run(
        [_pgbouncer_binary(), "--version"], capture_output=True, text=True, timeout=30, check=True
    )
    found = re.search(r"PgBouncer (\d+)\.(\d+)(?:\.(\d+))?", done.stdout)
    if found is None:
        raise RuntimeError(f"cannot read PgBouncer's version from {done.stdout!r}")
    return tuple(int(part) for part in found.groups(default="0"))


@dataclass
class PgBouncer:
    """PgBouncer in transaction pooling mode, in front of one PostgreSQL server."""

    directory: Path
    port: int
    version: tuple[int, ...]
    process: subprocess.Popen[bytes] | None = None

    @property
    def prepared_statements(self) -> bool:
        """Whether it keeps protocol-level prepared statements across transactions."""
        return self.version >= PREPARED_STATEMENTS_SINCE

    @property
    def config(self) -> Path:
        return self.directory / "pgbouncer.ini"

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        command = [_pgbouncer_binary(), str(self.config)]
        if os.geteuid() == 0:
            # PgBouncer refuses to run as root unless told which user to be.
            command[1:1] = ["-u", _unprivileged_user()]
        self.process = _start(command, self.directory / "pgbouncer.log", self.directory)
        wait_until(self._answers, f"pgbouncer on {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            _stop_group(self.process)

    def restart(self) -> None:
        """SIGKILL, then start again on the same port: every client connection drops."""
        self.stop()
        self.start()

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            log = (self.directory / "pgbouncer.log").read_text(errors="replace")
            raise RuntimeError(f"pgbouncer exited ({self.process.returncode}):\n{log}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1):
            return True
        return False


def _unprivileged_user() -> str:
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("no unprivileged user to run pgbouncer as")


def _pgbouncer_ini(bouncer: PgBouncer, host: str, port: int, users: Sequence[str]) -> str:
    lines = [
        "[databases]",
        # Every database of the server, under its own name.
        f"* = host={host} port={port}",
        "",
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        f"listen_port = {bouncer.port}",
        "unix_socket_dir =",
        f"pidfile = {bouncer.directory / 'pgbouncer.pid'}",
        # The local server trusts loopback connections; PgBouncer does the same
        # for the users listed in the auth file.
        "auth_type = trust",
        f"auth_file = {bouncer.directory / 'users.txt'}",
        "admin_users = " + ",".join(users),
        "pool_mode = transaction",
        "max_client_conn = 200",
        "default_pool_size = 40",
        # A transaction may stay open this long between statements; longer
        # means a stuck client, whose server connection is closed.
        "idle_transaction_timeout = 60",
        "ignore_startup_parameters = extra_float_digits",
        "log_connections = 0",
        "log_disconnections = 0",
    ]
    if bouncer.prepared_statements:
        lines.append("max_prepared_statements = 200")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def pgbouncer(host: str, port: int, users: Sequence[str]) -> Iterator[PgBouncer]:
    """PgBouncer (transaction pooling) in front of ``host:port``; killed at the end."""
    with tempfile.TemporaryDirectory(prefix="idempotency-pgbouncer-") as work:
        directory = Path(work)
        os.chmod(directory, 0o755)  # readable by the unprivileged user it runs as
        (bouncer_port,) = free_ports(1)
        bouncer = PgBouncer(directory, bouncer_port, pgbouncer_version())
        (directory / "users.txt").write_text("".join(f'"{user}" ""\n' for user in users))
        bouncer.config.write_text(_pgbouncer_ini(bouncer, host, port, users))
        if os.geteuid() == 0:
            owner = pwd.getpwnam(_unprivileged_user())
            os.chown(directory, owner.pw_uid, owner.pw_gid)
        try:
            bouncer.start()
            yield bouncer
        finally:
            bouncer.stop()


# Fixtures (imported by tests/conftest.py) ------------------------------------


@pytest.fixture(name="redis_cluster_server", scope="session")
def redis_cluster_server_fixture() -> Iterator[RedisCluster]:
    """A Redis Cluster for the whole session, stopped at its end whatever happens."""
    missing = redis_cluster_missing()
    if missing:
        pytest.skip(missing)
    with redis_cluster() as cluster:
        yield cluster


@pytest.fixture(name="pgbouncer_server", scope="session")
def pgbouncer_server_fixture() -> Iterator[PgBouncer]:
    """PgBouncer in front of ``DATABASE_URL``'s PostgreSQL, for the whole session."""
    missing = pgbouncer_missing()
    if missing:
        pytest.skip(missing)
    url = os.environ.get("DATABASE_URL", "")
    config = dj_database_url.parse(url) if url else {}
    if config.get("ENGINE") != "django.db.backends.postgresql":
        pytest.skip("needs DATABASE_URL pointing at PostgreSQL (PgBouncer goes in front of it)")
    users = [str(config.get("USER") or "postgres")]
    host, port = str(config.get("HOST") or "127.0.0.1"), int(config.get("PORT") or 5432)
    with pgbouncer(host, port, users) as bouncer:
        yield bouncer
