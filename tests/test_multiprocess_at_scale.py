"""The multi-process races again, on a Redis Cluster and behind PgBouncer.

The example shop under gunicorn (see ``test_multiprocess.py``), once with the
Redis store on the cluster the tests start (``redis_cluster``), once with
every database connection through PgBouncer in transaction pooling mode
(``pgbouncer``). A focused selection: simultaneous duplicates, and a fault
under load each: a cluster master killed with SIGKILL, PgBouncer killed and
started again. Afterwards every request that was refused is retried; each
request's effect must exist exactly once, and no answer may be a 5xx other
than the documented 503 of an unavailable store.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from redis.cluster import ClusterNode, RedisCluster

from tests.multiprocess import harness
from tests.multiprocess.harness import PATIENCE, Reply, serial, stampede
from tests.multiprocess.shop import ORDERS, PAYMENTS, Entry, Shop, Target, User, new_key
from tests.servers import PgBouncer, wait_until
from tests.servers import RedisCluster as Cluster
from tests.test_multiprocess import assert_stored_once, tally_one_execution

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.skipif(
        harness.postgres_url() is None,
        reason="needs DATABASE_URL pointing at PostgreSQL (a real server for gunicorn's workers)",
    ),
]

#: Requests per key, and keys, of the simultaneous duplicates.
CROWD = 30
KEYS = 10
#: How long the load runs around a fault (seconds); the fault comes a third in.
LOAD_SECONDS = 6.0

FIGURES: list[str] = []


@contextlib.contextmanager
def running_shop(
    work: Path,
    server_url: str,
    direct_url: str,
    extra: dict[str, str],
    redis_client: RedisCluster | None = None,
) -> Iterator[Shop]:
    """gunicorn serving the shop from ``server_url``; counted through ``direct_url``."""
    fault_dir = work / "faults"
    fault_dir.mkdir()
    with contextlib.ExitStack() as stack:
        closed_port = stack.enter_context(harness.closed_port())
        environ = {**harness.server_environ(server_url, fault_dir, closed_port), **extra}
        users = harness.prepare(environ)
        server = stack.enter_context(harness.gunicorn(environ, work / "gunicorn.log"))
        running = Shop(server, harness.Database(direct_url), users, fault_dir, redis_client)
        stack.callback(running.close)
        yield running


@pytest.fixture(scope="module")
def module_figures() -> Iterator[list[str]]:
    yield FIGURES
    print("\n".join(["", "multi-process figures (at scale):", *FIGURES]))


def through(bouncer: PgBouncer, url: str) -> str:
    """``url`` with PgBouncer's port instead of PostgreSQL's."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{bouncer.port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) > 1 else host))


# Shared checks ---------------------------------------------------------------


def simultaneous_duplicates(shop: Shop, target: Target) -> str:
    """CROWD requests with one key, then KEYS keys x 3, all at once: one execution each."""
    user = shop.alice
    one = [(new_key("crowd"), serial())]
    many = [(new_key("crowd"), serial()) for _ in range(KEYS)]
    replies = stampede(
        [
            partial(shop.send, target, user, key, target.entry.body(user, number))
            for key, number in one
            for _ in range(CROWD)
        ]
    )
    tally = tally_one_execution(replies)
    replies = stampede(
        [
            partial(shop.send, target, user, key, target.entry.body(user, number))
            for key, number in many
            for _ in range(3)
        ]
    )
    for index in range(KEYS):
        tally += tally_one_execution(replies[index * 3 : (index + 1) * 3])
    numbers = [number for _, number in one + many]
    assert shop.executions(target.entry, numbers) == dict.fromkeys(numbers, 1)
    assert_stored_once(shop, target, [key for key, _ in one + many])
    return f"{target}: {dict(tally)}"


class Load:
    """Pairs of simultaneous duplicates with new keys, round after round, on some targets."""

    def __init__(self, shop: Shop, targets: list[Target], per_key: int = 2) -> None:
        self.shop = shop
        self.targets = targets
        self.per_key = per_key
        #: (target, key, serial, reply), every answer of the run.
        self.answers: list[tuple[Target, str, int, Reply]] = []
        self.lock = threading.Lock()

    def run(
        self, seconds: float, fault_after: float = 0.0, fault: Callable[[], None] | None = None
    ) -> None:
        """Rounds for ``seconds``; ``fault`` runs from another thread ``fault_after`` in."""
        timer = threading.Timer(fault_after, fault) if fault is not None else None
        if timer is not None:
            timer.start()
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                self.round()
        finally:
            if timer is not None:
                timer.join(PATIENCE)

    def round(self) -> None:
        user = self.shop.alice
        sent = [(target, new_key("load"), serial()) for target in self.targets for _ in range(2)]
        jobs = [
            partial(self.send, target, user, key, number)
            for target, key, number in sent
            for _ in range(self.per_key)
        ]
        stampede(jobs)

    def send(self, target: Target, user: User, key: str, number: int) -> None:
        reply = self.shop.send(target, user, key, target.entry.body(user, number))
        with self.lock:
            self.answers.append((target, key, number, reply))

    def statuses(self) -> Counter[str]:
        counted: Counter[str] = Counter()
        for _, _, _, reply in self.answers:
            if reply.status >= 500:
                kind = reply.problem_type() if reply.status == 503 else "?"
                counted[f"{reply.status} {kind}"] += 1
            else:
                counted["replayed" if reply.replayed else str(reply.status)] += 1
        return counted

    def retry_refused(self) -> int:
        """Send again every request that no answer executed or replayed, until one does.

        A refused claim may have reached the store before its master died:
        then its key answers 409 until its lease ends, and executes after.
        """
        done = {key for _, key, _, reply in self.answers if reply.status == 201}
        pending = {(target, key, number) for target, key, number, _ in self.answers} - {
            (target, key, number) for target, key, number, _ in self.answers if key in done
        }
        user = self.shop.alice
        for target, key, number in pending:

            def answered(target: Target = target, key: str = key, number: int = number) -> bool:
                reply = self.shop.send(target, user, key, target.entry.body(user, number))
                assert reply.status in (201, 409, 503), reply
                return reply.status == 201

            wait_until(answered, f"{key} to be answered", seconds=PATIENCE)
        return len(pending)

    def assert_each_executed_once(self) -> None:
        for entry in {target.entry for target in self.targets}:
            numbers = {number for target, _, number, _ in self.answers if target.entry is entry}
            assert self.shop.executions(entry, numbers) == dict.fromkeys(numbers, 1)


def assert_no_5xx_but_503(load: Load) -> None:
    server_errors = [
        reply
        for _, _, _, reply in load.answers
        if reply.status >= 500
        and not (reply.status == 503 and reply.problem_type() == "store-unavailable")
    ]
    assert server_errors == []


def assert_5xx_executed_nothing(load: Load) -> Counter[str]:
    """Every request answered 5xx (with no twin executed) left no effect; count them by kind.

    Not every 5xx is the store's: with the database gone, Django's own
    queries (authentication, the view's) fail with 500 before or inside the
    protected call, which then rolls back (atomic) or releases the key.
    """
    executed = {key for _, key, _, reply in load.answers if reply.executed}
    failed = [
        (target, number, reply)
        for target, key, number, reply in load.answers
        if reply.status >= 500 and key not in executed
    ]
    for entry in {target.entry for target, _, _ in failed}:
        numbers = [number for target, number, _ in failed if target.entry is entry]
        assert load.shop.executions(entry, numbers) == {}
    kinds: Counter[str] = Counter()
    for _, _, reply in failed:
        is_store = reply.status == 503 and reply.problem_type() == "store-unavailable"
        kinds["503 store-unavailable" if is_store else str(reply.status)] += 1
    return kinds


# Redis Cluster ---------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_shop(
    tmp_path_factory: pytest.TempPathFactory,
    redis_cluster_server: Cluster,
    module_figures: list[str],
) -> Iterator[Shop]:
    url = harness.postgres_url()
    assert url is not None
    work = tmp_path_factory.mktemp("cluster-shop")
    nodes = [node.address for node in redis_cluster_server.nodes]
    client = RedisCluster(
        startup_nodes=[ClusterNode("127.0.0.1", node.port) for node in redis_cluster_server.nodes]
    )
    with (
        harness.scratch_database(url) as database_url,
        running_shop(
            work,
            database_url,
            database_url,
            {"MP_REDIS_CLUSTER": ",".join(nodes)},
            redis_client=client,
        ) as shop,
    ):
        yield shop


@pytest.mark.redis_cluster
@pytest.mark.parametrize("entry", [ORDERS, PAYMENTS], ids=str)
def test_cluster_simultaneous_duplicates_execute_once(cluster_shop: Shop, entry: Entry) -> None:
    FIGURES.append(simultaneous_duplicates(cluster_shop, Target(entry, "redis")))


@pytest.mark.redis_cluster
def test_cluster_master_killed_mid_load(cluster_shop: Shop, redis_cluster_server: Cluster) -> None:
    """Refused (503) or run unprotected (fail open) while its slots have no master; never twice."""
    cluster = redis_cluster_server
    closed, opened = Target(ORDERS, "redis"), Target(PAYMENTS, "redis-open")
    victim = cluster.masters()[0]
    load = Load(cluster_shop, [closed])
    # Fail open protects nothing while the slots are down: one request per key,
    # so that "executed once" holds for it too.
    unprotected = Load(cluster_shop, [opened], per_key=1)

    def kill() -> None:
        cluster.kill(victim)

    try:
        beside = threading.Thread(target=unprotected.run, args=(LOAD_SECONDS,), daemon=True)
        beside.start()
        load.run(LOAD_SECONDS, LOAD_SECONDS / 3, kill)
        beside.join(LOAD_SECONDS + PATIENCE)
        wait_until(cluster.healthy, "the replica to take over")
        retried = load.retry_refused()
    finally:
        if not victim.alive():
            cluster.restart(victim)

    assert not victim.alive() or cluster.healthy()
    assert_no_5xx_but_503(load)
    load.assert_each_executed_once()
    assert [reply.status for *_, reply in unprotected.answers if reply.status != 201] == []
    unprotected.assert_each_executed_once()
    FIGURES.append(
        f"cluster master killed under load: fail closed {dict(load.statuses())}, "
        f"{retried} refused requests retried after the failover; fail open "
        f"{dict(unprotected.statuses())}"
    )


# PgBouncer -------------------------------------------------------------------


@pytest.fixture(scope="module")
def bouncer_shop(
    tmp_path_factory: pytest.TempPathFactory, pgbouncer_server: PgBouncer, module_figures: list[str]
) -> Iterator[Shop]:
    url = harness.postgres_url()
    assert url is not None
    work = tmp_path_factory.mktemp("bouncer-shop")
    extra = {"MP_BEHIND_POOLER": "1", "PREPARE_THRESHOLD": "", "MP_STORE_PREPARE": "0"}
    if pgbouncer_server.prepared_statements:
        extra.update(PREPARE_THRESHOLD="0", MP_STORE_PREPARE="1")
    with (
        harness.scratch_database(url) as database_url,
        running_shop(work, through(pgbouncer_server, database_url), database_url, extra) as shop,
    ):
        FIGURES.append(
            f"PgBouncer {'.'.join(map(str, pgbouncer_server.version))}, prepared statements "
            f"{'on' if pgbouncer_server.prepared_statements else 'off'}"
        )
        yield shop


@pytest.mark.pgbouncer
@pytest.mark.parametrize("protection", ["atomic", "lease"])
def test_pgbouncer_simultaneous_duplicates_execute_once(
    bouncer_shop: Shop, protection: str
) -> None:
    FIGURES.append(simultaneous_duplicates(bouncer_shop, Target(ORDERS, protection)))


@pytest.mark.pgbouncer
def test_pgbouncer_restarted_mid_load(bouncer_shop: Shop, pgbouncer_server: PgBouncer) -> None:
    """Killed and started again: what failed executed nothing; a retry executes once."""
    load = Load(bouncer_shop, [Target(ORDERS, "atomic"), Target(PAYMENTS, "lease")])

    load.run(LOAD_SECONDS, LOAD_SECONDS / 3, pgbouncer_server.restart)
    failures = assert_5xx_executed_nothing(load)
    retried = load.retry_refused()

    load.assert_each_executed_once()
    FIGURES.append(
        f"PgBouncer killed and restarted under load: {dict(load.statuses())}; failed without "
        f"effect {dict(failures)}; {retried} requests retried after, each executed once"
    )
