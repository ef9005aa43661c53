"""The example shop under gunicorn (4 sync workers) against a real PostgreSQL.

Driven over loopback HTTP by barrier-released threads; faults are injected
for real: worker processes killed with SIGKILL in the middle of a request,
database sessions terminated with ``pg_terminate_backend``, a Redis that is
not there, the purge command running while requests come in.

Needs ``DATABASE_URL`` pointing at PostgreSQL (the tests create and drop a
database of their own beside it) and, for the Redis store, ``REDIS_URL``.
Sizes and durations can be changed through the environment: ``MP_CROWD``,
``MP_KEYS``, ``MP_PER_KEY``, ``MP_PURGE_SECONDS``, ``MP_LOAD_SECONDS``.
Run ``pytest -m multiprocess -s`` to see the figures measured.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.multiprocess import harness
from tests.multiprocess.harness import PATIENCE, InFlight, Reply, serial, stampede
from tests.multiprocess.shop import (
    ENTRIES,
    KEYS_TABLE,
    ORDERS,
    PAYMENTS,
    REDIS_URL,
    Entry,
    Shop,
    Target,
    User,
    new_key,
)

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.skipif(
        harness.postgres_url() is None,
        reason="needs DATABASE_URL pointing at PostgreSQL (a real server for gunicorn's workers)",
    ),
]
needs_redis = pytest.mark.skipif(not REDIS_URL, reason="needs REDIS_URL (the Redis store)")

CROWD = int(os.environ.get("MP_CROWD", "50"))
KEYS = int(os.environ.get("MP_KEYS", "20"))
PER_KEY = int(os.environ.get("MP_PER_KEY", "5"))
PURGE_SECONDS = float(os.environ.get("MP_PURGE_SECONDS", "6"))
LOAD_SECONDS = float(os.environ.get("MP_LOAD_SECONDS", "30"))

#: Measured along the way; printed when the module ends (``-s`` shows them).
FIGURES: list[str] = []


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    url = harness.postgres_url()
    assert url is not None
    work = tmp_path_factory.mktemp("multiprocess")
    fault_dir = work / "faults"
    fault_dir.mkdir()
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        database_url = stack.enter_context(harness.scratch_database(url))
        closed_port = stack.enter_context(harness.closed_port())
        environ = harness.server_environ(database_url, fault_dir, closed_port)
        users = harness.prepare(environ)
        server = stack.enter_context(harness.gunicorn(environ, work / "gunicorn.log"))
        running = Shop(server, harness.Database(database_url), users, fault_dir)
        stack.callback(running.close)
        # First of all at the end: no worker stays held, so gunicorn stops cleanly.
        stack.callback(_open_every_gate, fault_dir)
        FIGURES.append(f"setup (database, migrate, gunicorn): {time.monotonic() - started:.1f} s")
        yield running
    print("\n".join(["", "multi-process figures:", *FIGURES, f"gunicorn's log: {server.log}"]))


def _open_every_gate(fault_dir: Path) -> None:
    for inside in fault_dir.glob("*.inside"):
        (fault_dir / inside.name.replace(".inside", ".open")).touch()


# Checks shared by the scenarios ------------------------------------------


def tally_one_execution(replies: Sequence[Reply]) -> Counter[str]:
    """Check the answers to requests with one key; count them by kind.

    Exactly one executed; every other one is its replay (same status and
    body) or a 409 problem with ``Retry-After``; no 5xx.
    """
    statuses = Counter(reply.status for reply in replies)
    assert not [status for status in statuses if status >= 500], statuses
    executed = [reply for reply in replies if reply.executed]
    assert len(executed) == 1, statuses
    tally: Counter[str] = Counter()
    for reply in replies:
        if reply.executed:
            tally["executed"] += 1
        elif reply.replayed:
            assert (reply.status, reply.body) == (201, executed[0].body)
            tally["replayed"] += 1
        else:
            assert_conflict(reply)
            tally["409"] += 1
    return tally


def assert_conflict(reply: Reply) -> None:
    assert reply.status == 409, reply
    assert reply.problem_type() == "request-in-progress"
    assert int(reply.headers["retry-after"]) >= 1


def assert_stored_once(shop: Shop, target: Target, keys: Sequence[str]) -> None:
    stored = shop.stored(target, keys)
    assert {key: (record["state"], record["status"]) for key, record in stored.items()} == {
        key: ("completed", 201) for key in keys
    }
    if target.in_redis:
        assert shop.database_records(keys) == {}


def assert_dropped(request: InFlight) -> None:
    """The client of a killed worker saw its connection end without an answer."""
    outcome = request.result()
    assert isinstance(outcome, OSError | http.client.HTTPException), outcome


@dataclass
class Retries:
    """Retries of one request until it stops being refused with 409."""

    #: (sent, answered, reply), in time.time() seconds.
    answers: list[tuple[float, float, Reply]] = field(default_factory=list)

    @property
    def last(self) -> Reply:
        return self.answers[-1][2]

    @property
    def conflicts(self) -> list[tuple[float, float, Reply]]:
        return self.answers[:-1]


def retry_through_lease(shop: Shop, send_it: Callable[[], Reply], lease_end: float) -> Retries:
    """Retry until the answer is no longer 409: 409 exactly while the lease lasts.

    The server decides on this machine's clock at some moment between
    sending and answering: answered before ``lease_end``, it must refuse;
    sent after it, it must not.
    """
    retries = Retries()
    deadline = lease_end + PATIENCE
    while time.time() < deadline:
        sent = time.time()
        reply = send_it()
        answered = time.time()
        retries.answers.append((sent, answered, reply))
        if answered < lease_end:
            assert_conflict(reply)
        if reply.status != 409:
            return retries
        assert_conflict(reply)
        assert sent < lease_end, "refused after the lease ended"
        time.sleep(0.1)  # pacing only: the outcome does not depend on it
    raise AssertionError(f"still 409 {PATIENCE} s after the lease ended")


# 1. Simultaneous duplicates ------------------------------------------------

PROTECTIONS = ["atomic", "lease", pytest.param("redis", marks=needs_redis)]


@pytest.mark.parametrize("protection", PROTECTIONS)
@pytest.mark.parametrize("entry", ENTRIES, ids=str)
def test_simultaneous_duplicates_execute_once(shop: Shop, entry: Entry, protection: str) -> None:
    """CROWD requests with one key, then KEYS keys x PER_KEY requests, all at once.

    The crowd really overlaps its execution: every request carries the same
    gate, which only the one that executes reaches; it stays there until the
    test has seen a duplicate refused with 409, then completes, and the
    duplicates still arriving replay it. (Unheld, the first execution was
    over before most duplicates reached a worker: all replays, no overlap.)
    """
    target = Target(entry, protection)  # the views under /mp/ have the gate
    user = shop.alice
    key, number = new_key("crowd"), serial()
    gate = harness.Gate(shop.fault_dir, f"crowd-{entry}-{protection}")

    def duplicate() -> Reply:
        reply = shop.send(target, user, key, entry.body(user, number), gate.headers)
        if reply.status == 409:
            gate.open()  # a duplicate overlapped the execution: let it finish
        return reply

    started = time.monotonic()
    one_replies = stampede([duplicate] * CROWD)
    one_seconds = time.monotonic() - started

    tally = tally_one_execution(one_replies)
    assert tally["409"] >= 1, tally  # the duplicates met the execution in flight
    assert tally["executed"] + tally["409"] + tally["replayed"] == CROWD
    assert shop.executions(entry, [number]) == {number: 1}
    assert_stored_once(shop, target, [key])

    # Many keys at once, unheld, where the example itself protects the entry
    # point: a measure of throughput (four workers cannot hold twenty keys).
    best = Target.best(entry, protection)
    many = [(new_key("crowd"), serial()) for _ in range(KEYS)]
    jobs = [
        partial(shop.send, best, user, many_key, entry.body(user, many_number))
        for many_key, many_number in many
        for _ in range(PER_KEY)
    ]
    started = time.monotonic()
    many_replies = stampede(jobs)
    many_seconds = time.monotonic() - started
    many_tally: Counter[str] = Counter()
    for index in range(KEYS):
        many_tally += tally_one_execution(many_replies[index * PER_KEY : (index + 1) * PER_KEY])
    numbers = [many_number for _, many_number in many]
    assert shop.executions(entry, numbers) == dict.fromkeys(numbers, 1)
    assert_stored_once(shop, best, [many_key for many_key, _ in many])
    FIGURES.append(
        f"{target} at {target.path}: 1 key x {CROWD}, held until a 409, in {one_seconds:.2f} s "
        f"-> {dict(tally)}; {best} at {best.path}: {KEYS} keys x {PER_KEY} in "
        f"{many_seconds:.2f} s -> {dict(many_tally)}"
    )


HELD_DUPLICATES = 20


@pytest.mark.parametrize("protection", PROTECTIONS)
def test_duplicates_of_a_request_in_flight_are_refused(shop: Shop, protection: str) -> None:
    """While the first request is held inside the view, every duplicate gets 409."""
    target, user = Target(ORDERS, protection), shop.alice
    key, number = new_key("held"), serial()
    body = ORDERS.body(user, number)
    gate, first = shop.hold(f"held-{protection}", target, user, key, body)
    gate.wait_inside(first)
    try:
        duplicates = stampede([partial(shop.send, target, user, key, body)] * HELD_DUPLICATES)
    finally:
        gate.open()

    for reply in duplicates:
        assert_conflict(reply)
    answer = first.result()
    assert isinstance(answer, Reply), answer
    assert answer.executed, answer
    replay = shop.send(target, user, key, body)
    assert replay.replayed, replay
    assert replay.body == answer.body
    assert shop.executions(ORDERS, [number]) == {number: 1}


# 2. A worker killed in the middle of a request -----------------------------


def test_killed_worker_atomic_retry_executes_once(shop: Shop) -> None:
    """The order written by the killed request rolls back with its key; a retry runs once."""
    target, user = Target(ORDERS, "atomic"), shop.alice
    key, number = new_key("kill"), serial()
    body = ORDERS.body(user, number)
    gate, request = shop.hold("kill-atomic", target, user, key, body)
    inside = gate.wait_inside(request)
    assert inside["pid"] in shop.server.workers()

    os.kill(inside["pid"], signal.SIGKILL)
    assert_dropped(request)
    # The worker's database session ends when PostgreSQL sees its socket close.
    shop.database.wait_backend_gone(inside["backend_pid"])
    assert shop.executions(ORDERS, [number]) == {}
    assert shop.stored(target, [key]) == {}

    retry = shop.send(target, user, key, body)
    assert retry.executed, retry
    assert shop.executions(ORDERS, [number]) == {number: 1}
    assert shop.stored(target, [key])[key]["attempts"] == 1
    assert shop.send(target, user, key, body).replayed
    _assert_worker_replaced(shop, inside["pid"])


@pytest.mark.parametrize(
    "protection", ["lease-short", pytest.param("redis-short", marks=needs_redis)]
)
def test_killed_worker_lease_refused_until_lease_ends(shop: Shop, protection: str) -> None:
    """The killed payment's claim holds its key for the lease (2 s); then a retry pays once."""
    target, user = Target(PAYMENTS, protection), shop.alice
    key, number = new_key("kill"), serial()
    body = PAYMENTS.body(user, number)
    gate, request = shop.hold(f"kill-{protection}", target, user, key, body)
    inside = gate.wait_inside(request)

    os.kill(inside["pid"], signal.SIGKILL)
    assert_dropped(request)
    lease_end = shop.lease_end(target, key)
    retries = retry_through_lease(shop, partial(shop.send, target, user, key, body), lease_end)

    assert retries.conflicts, "no retry was sent within the lease: the machine is too slow"
    assert retries.last.executed, retries.last
    assert retries.answers[-1][1] >= lease_end
    assert shop.executions(PAYMENTS, [number]) == {number: 1}
    record = shop.stored(target, [key])[key]
    assert (record["state"], record["attempts"]) == ("completed", 2)  # a takeover
    assert shop.send(target, user, key, body).replayed
    _assert_worker_replaced(shop, inside["pid"])
    FIGURES.append(
        f"SIGKILL, {target}: first retry {lease_end - retries.answers[0][0]:.2f} s before the "
        f"lease ended; {len(retries.conflicts)} retries refused with 409; executed "
        f"{retries.answers[-1][1] - lease_end:.2f} s after it ended"
    )


def _assert_worker_replaced(shop: Shop, killed: int) -> None:
    shop.server.wait_for_workers()
    assert killed not in shop.server.workers()


# 3. The database connection dropped in the middle of a request -------------


def _answer_with_its_session_terminated(
    shop: Shop, gate_name: str, target: Target, user: User, key: str, body: Any
) -> Reply:
    """Send a request, terminate its database session while the view holds it, answer."""
    gate, request = shop.hold(gate_name, target, user, key, body)
    inside = gate.wait_inside(request)
    shop.database.terminate(inside["backend_pid"])
    shop.database.wait_backend_gone(inside["backend_pid"])
    gate.open()
    answer = request.result()
    assert isinstance(answer, Reply), answer
    return answer


def test_dropped_connection_atomic(shop: Shop) -> None:
    """The order and the key go with the terminated session; the client gets a 5xx."""
    target, user = Target(ORDERS, "atomic"), shop.alice
    key, number = new_key("drop"), serial()
    body = ORDERS.body(user, number)
    answer = _answer_with_its_session_terminated(shop, "drop-atomic", target, user, key, body)
    assert answer.status >= 500
    assert shop.executions(ORDERS, [number]) == {}
    assert shop.stored(target, [key]) == {}

    retry = shop.send(target, user, key, body)
    assert retry.executed, retry
    assert shop.executions(ORDERS, [number]) == {number: 1}


def test_dropped_connection_lease(shop: Shop) -> None:
    """No payment; the claim, which cannot be released, holds the key until its lease ends."""
    target, user = Target(PAYMENTS, "lease-short"), shop.alice
    key, number = new_key("drop"), serial()
    body = PAYMENTS.body(user, number)
    answer = _answer_with_its_session_terminated(shop, "drop-lease", target, user, key, body)
    assert answer.status >= 500
    assert shop.executions(PAYMENTS, [number]) == {}
    assert shop.stored(target, [key])[key]["state"] == "in_progress"

    lease_end = shop.lease_end(target, key)
    retries = retry_through_lease(shop, partial(shop.send, target, user, key, body), lease_end)
    assert retries.last.executed, retries.last
    assert shop.executions(PAYMENTS, [number]) == {number: 1}
    FIGURES.append(
        f"pg_terminate_backend, {target}: answered {answer.status}; "
        f"{len(retries.conflicts)} retries refused with 409 until the lease ended"
    )


# 4. Redis unreachable ------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES, ids=str)
def test_redis_unreachable_refuses_with_503(shop: Shop, entry: Entry) -> None:
    target, user = Target(entry, "redis-down"), shop.alice
    number = serial()
    reply = shop.send(target, user, new_key("down"), entry.body(user, number))
    assert reply.status == 503
    assert reply.problem_type() == "store-unavailable"
    assert shop.executions(entry, [number]) == {}


def test_redis_unreachable_fail_open_runs_unprotected(shop: Shop) -> None:
    """Chosen explicitly (FAIL_OPEN): the view runs, and nothing stops a duplicate."""
    target, user = Target(ORDERS, "redis-down-open"), shop.alice
    key, number = new_key("down"), serial()
    body = ORDERS.body(user, number)
    replies = [shop.send(target, user, key, body) for _ in range(2)]
    assert [reply.executed for reply in replies] == [True, True]
    assert shop.executions(ORDERS, [number]) == {number: 2}


# 5. The purge command while traffic flows -----------------------------------

PURGE_REPORT = re.compile(r"Deleted (\d+) expired keys")
SEEDED_EXPIRED = 3000
SEEDED_LIVE_LEASES = 20


def test_purge_while_traffic_flows(shop: Shop) -> None:
    """Expired keys go, live ones stay, requests see nothing of it."""
    _seed_keys(shop)
    deadline = time.monotonic() + PURGE_SECONDS
    purges: list[subprocess.CompletedProcess[str]] = []
    traffic = Traffic(shop)

    def purge_loop() -> None:
        while time.monotonic() < deadline:
            purges.append(shop.server.manage("purge_idempotency_keys", "--batch-size", "200"))

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            roll = rng.random()
            if roll < 0.4:
                traffic.new(Target(ORDERS, "brief"), live=False)
            elif roll < 0.7:
                traffic.new(Target.native(rng.choice([ORDERS, PAYMENTS])), live=True)
            else:
                traffic.replay(rng)

    threads = [threading.Thread(target=purge_loop, daemon=True)]
    threads += [threading.Thread(target=client, args=(seed,), daemon=True) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(PURGE_SECONDS + PATIENCE * 2)
    assert not any(thread.is_alive() for thread in threads)
    purges.append(shop.server.manage("purge_idempotency_keys"))

    assert traffic.errors == []
    assert [run.returncode for run in purges] == [0] * len(purges)
    assert [run.stderr for run in purges if "Traceback" in run.stderr] == []
    deleted = sum(int(match) for run in purges for match in PURGE_REPORT.findall(run.stdout))
    assert deleted >= SEEDED_EXPIRED
    # Nothing expired is left; nothing live was touched.
    assert _seeded_left(shop) == {"completed": 0, "in_progress": SEEDED_LIVE_LEASES}
    live = traffic.sent(live=True)
    stored = shop.database_records(key for key, _, _ in live)
    assert {key: record["state"] for key, record in stored.items()} == {
        key: "completed" for key, _, _ in live
    }
    for entry in (ORDERS, PAYMENTS):
        numbers = [number for _, target, number in traffic.sent() if target.entry is entry]
        assert shop.executions(entry, numbers) == dict.fromkeys(numbers, 1)
    FIGURES.append(
        f"purge: {len(purges)} runs deleted {deleted} keys during {PURGE_SECONDS:.0f} s of "
        f"traffic: {dict(traffic.tally)}"
    )


def _seed_keys(shop: Shop) -> None:
    """Expired keys to purge, and expired ones still held by a live lease (to keep)."""
    columns = (
        "scope, key, fingerprint, method, path, state, token, locked_until, attempts,"
        " response_status, response_headers, response_body, created, completed, expires"
    )
    shop.database.rows(
        f"INSERT INTO {KEYS_TABLE} ({columns})"
        " SELECT 'mp:seeded', 'expired-' || n, repeat('0', 64), 'POST', '/', 'completed',"
        " md5(n::text), NULL, 1, 201, '[]', '', now() - interval '2 days',"
        " now() - interval '2 days', now() - interval '1 day' FROM generate_series(1, %s) n",
        [SEEDED_EXPIRED],
    )
    shop.database.rows(
        f"INSERT INTO {KEYS_TABLE} ({columns})"
        " SELECT 'mp:seeded', 'leased-' || n, repeat('0', 64), 'POST', '/', 'in_progress',"
        " md5(n::text), now() + interval '1 hour', 1, NULL, '[]', '', now() - interval '2 days',"
        " NULL, now() - interval '1 day' FROM generate_series(1, %s) n",
        [SEEDED_LIVE_LEASES],
    )


def _seeded_left(shop: Shop) -> dict[str, int]:
    rows = shop.database.rows(
        f"SELECT state, count(*) FROM {KEYS_TABLE} WHERE scope = 'mp:seeded' GROUP BY state"
    )
    return {"completed": 0, "in_progress": 0, **dict(rows)}


class Traffic:
    """New keys and replays from several threads, for the purge test."""

    def __init__(self, shop: Shop) -> None:
        self.shop = shop
        self.lock = threading.Lock()
        #: (key, target, serial, the executed reply's body, whether the key is live).
        self.completed: list[tuple[str, Target, int, bytes, bool]] = []
        self.tally: Counter[str] = Counter()
        self.errors: list[str] = []

    def new(self, target: Target, *, live: bool) -> None:
        user, key, number = self.shop.alice, new_key("purge"), serial()
        reply = self.shop.send(target, user, key, target.entry.body(user, number))
        with self.lock:
            self.tally["new"] += 1
            if not reply.executed:
                self.errors.append(f"new key {key} at {target}: {reply}")
            self.completed.append((key, target, number, reply.body, live))

    def replay(self, rng: random.Random) -> None:
        with self.lock:
            live = [sent for sent in self.completed if sent[4]]
        if not live:
            return
        key, target, number, body, _ = rng.choice(live)
        user = self.shop.alice
        reply = self.shop.send(target, user, key, target.entry.body(user, number))
        with self.lock:
            self.tally["replay"] += 1
            if not (reply.replayed and reply.body == body):
                self.errors.append(f"replay of {key} at {target}: {reply}")

    def sent(self, *, live: bool | None = None) -> list[tuple[str, Target, int]]:
        return [
            (key, target, number)
            for key, target, number, _, is_live in self.completed
            if live is None or is_live == live
        ]


# 6. Mixed load from two users -----------------------------------------------

CLIENTS_PER_USER = 3
#: (operation, weight) of the mixed load.
OPERATIONS = {"new": 35, "replay": 25, "conflict": 15, "mismatch": 15, "other_user": 10}


@dataclass(frozen=True)
class Execution:
    """A key whose request executed: what a replay must give back."""

    user: User
    target: Target
    key: str
    number: int
    body: bytes


class MixedLoad:
    """New keys, replays, conflicts, mismatches and another user's keys, from threads."""

    def __init__(self, shop: Shop, targets: Sequence[Target]) -> None:
        self.shop = shop
        self.targets = targets
        self.lock = threading.Lock()
        self.executions: list[Execution] = []
        self.used: set[tuple[str, str]] = set()  # (user, key)
        self.operations: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()
        self.seconds: list[float] = []
        self.errors: list[str] = []

    def client(self, user: User, seed: int, deadline: float) -> None:
        rng = random.Random(seed)
        names, weights = list(OPERATIONS), list(OPERATIONS.values())
        while time.monotonic() < deadline:
            (name,) = rng.choices(names, weights)
            with self.lock:
                self.operations[name] += 1
            try:
                getattr(self, name)(user, rng)
            except Exception as error:  # an assertion or a transport error: reported at the end
                with self.lock:
                    self.errors.append(f"{name} by {user.name}: {error!r}")

    def send(self, target: Target, user: User, key: str, body: Any) -> Reply:
        reply = self.shop.send(target, user, key, body)
        self._count(reply)
        return reply

    def new(self, user: User, rng: random.Random) -> None:
        target, key, number = rng.choice(self.targets), new_key("mix"), serial()
        reply = self.send(target, user, key, target.entry.body(user, number))
        assert reply.executed, reply
        self._executed(user, target, key, number, reply)

    def replay(self, user: User, rng: random.Random) -> None:
        done = self._pick(lambda execution: execution.user == user, rng)
        if done is None:
            return self.new(user, rng)
        reply = self.send(done.target, user, done.key, done.target.entry.body(user, done.number))
        assert reply.replayed, reply
        assert reply.body == done.body

    def conflict(self, user: User, rng: random.Random) -> None:
        """The same new key twice at once: one executes, the other is refused or replayed."""
        target, key, number = rng.choice(self.targets), new_key("mix"), serial()
        body = target.entry.body(user, number)
        replies = stampede([partial(self.shop.send, target, user, key, body)] * 2)
        for reply in replies:
            self._count(reply)
        tally_one_execution(replies)
        (executed,) = [reply for reply in replies if reply.executed]
        self._executed(user, target, key, number, executed)

    def mismatch(self, user: User, rng: random.Random) -> None:
        done = self._pick(lambda execution: execution.user == user, rng)
        if done is None:
            return self.new(user, rng)
        changed = {**done.target.entry.body(user, done.number), "note": "changed"}
        reply = self.send(done.target, user, done.key, changed)
        assert reply.status == 422, reply
        assert reply.problem_type() == "fingerprint-mismatch"

    def other_user(self, user: User, rng: random.Random) -> None:
        """Another user's key: a key of its own in this user's scope, never their response."""
        done = self._pick(
            lambda execution: (
                execution.user != user and (user.name, execution.key) not in self.used
            ),
            rng,
            reserve_for=user,
        )
        if done is None:
            return self.new(user, rng)
        number = serial()
        reply = self.send(done.target, user, done.key, done.target.entry.body(user, number))
        assert reply.executed, reply
        assert reply.body != done.body
        self._executed(user, done.target, done.key, number, reply)

    def _pick(
        self,
        wanted: Callable[[Execution], bool],
        rng: random.Random,
        *,
        reserve_for: User | None = None,
    ) -> Execution | None:
        """A random execution that is ``wanted``; its key reserved for ``reserve_for``."""
        with self.lock:
            candidates = [execution for execution in self.executions if wanted(execution)]
            if not candidates:
                return None
            done = rng.choice(candidates)
            if reserve_for is not None:
                # No other thread of the same user may send this key with another body.
                self.used.add((reserve_for.name, done.key))
            return done

    def _executed(self, user: User, target: Target, key: str, number: int, reply: Reply) -> None:
        with self.lock:
            self.executions.append(Execution(user, target, key, number, reply.body))
            self.used.add((user.name, key))

    def _count(self, reply: Reply) -> None:
        kind = "replayed" if reply.replayed else str(reply.status)
        with self.lock:
            self.statuses[kind] += 1
            self.seconds.append(reply.seconds)


def test_mixed_load_keeps_invariants(shop: Shop) -> None:
    """Executions == completed keys, nothing left in progress, no 5xx."""
    targets = [Target.native(entry) for entry in ENTRIES]
    if REDIS_URL:
        targets.append(Target(PAYMENTS, "redis"))
    load = MixedLoad(shop, targets)
    deadline = time.monotonic() + LOAD_SECONDS
    threads = [
        threading.Thread(target=load.client, args=(user, seed, deadline), daemon=True)
        for seed, user in enumerate([shop.alice, shop.bob] * CLIENTS_PER_USER)
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LOAD_SECONDS + PATIENCE * 2)
    assert not any(thread.is_alive() for thread in threads)
    elapsed = time.monotonic() - started

    assert load.errors == []
    assert not [kind for kind in load.statuses if kind.isdigit() and int(kind) >= 500]
    for entry in ENTRIES:
        numbers = [e.number for e in load.executions if e.target.entry is entry]
        assert shop.executions(entry, numbers) == dict.fromkeys(numbers, 1)
    stored = _mixed_load_keys(shop)
    in_database = sum(not e.target.in_redis for e in load.executions)
    in_redis = sum(e.target.in_redis for e in load.executions)
    # Counters compare missing kinds as zero: nothing in progress anywhere.
    assert stored == Counter(
        {("database", "completed"): in_database, ("redis", "completed"): in_redis}
    )
    requests = sum(load.statuses.values())
    FIGURES.append(
        f"mixed load, 2 users x {CLIENTS_PER_USER} clients, {elapsed:.1f} s: {requests} requests "
        f"({requests / elapsed:.0f}/s; {_latencies(load.seconds)}); operations "
        f"{dict(load.operations)}; answers {dict(load.statuses)}; "
        f"{len(load.executions)} executions = {in_database} + {in_redis} completed keys"
    )


def _latencies(seconds: Sequence[float]) -> str:
    ordered = sorted(seconds)
    median, p99 = ordered[len(ordered) // 2], ordered[int(len(ordered) * 0.99)]
    return f"latency median {median * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms"


def _mixed_load_keys(shop: Shop) -> Counter[tuple[str, str]]:
    """Stored keys of the mixed load, counted by store and state."""
    rows = shop.database.rows(
        f"SELECT state, count(*) FROM {KEYS_TABLE} WHERE key LIKE 'mix-%%' GROUP BY state"
    )
    stored: Counter[tuple[str, str]] = Counter({("database", state): n for state, n in rows})
    if shop.redis is not None:
        for record in shop.all_redis_records():
            if record["key"].startswith("mix-"):
                stored[("redis", record["state"])] += 1
    return stored
