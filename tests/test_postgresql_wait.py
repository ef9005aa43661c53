"""The bounded wait for a key's claimer on PostgreSQL holds nothing once it returns.

A duplicate that finds the key contended waits on the key's advisory lock
until the claimer's transaction ends. It takes that lock and lets it go in one
statement: whatever the waiter's thread does next, and in whatever
transaction it waits, it never keeps the claimer's lock from the next
waiter, nor from the next claim.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from django.db import DEFAULT_DB_ALIAS, OperationalError, connections, transaction

from django_idempotency.protocol import Call
from django_idempotency.stores import postgresql
from tests.concurrency_helpers import PATIENCE, wait_for_lock_waiters
from tests.lease_stores import Worker

pytestmark = [pytest.mark.concurrency, pytest.mark.django_db(transaction=True)]

CALL = Call(scope="anonymous", key="wait-key", fingerprint="f")


@pytest.fixture(autouse=True)
def _postgresql_only() -> None:
    if connections[DEFAULT_DB_ALIAS].vendor != "postgresql":
        pytest.skip("advisory locks: PostgreSQL only")


def free(lock: int) -> bool:
    """Whether another session could take ``lock`` now (and lets it go again)."""
    with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [lock])
        (taken,) = cursor.fetchone()
        if taken:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [lock])
    return bool(taken)


@pytest.fixture(name="claimer")
def claimer_fixture() -> Iterator[threading.Event]:
    """A claimer holding the key's transaction-level lock until the event is set."""
    holding, done = threading.Event(), threading.Event()

    def claim() -> None:
        with transaction.atomic(), connections[DEFAULT_DB_ALIAS].cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [postgresql.lock_id(CALL)])
            holding.set()
            assert done.wait(PATIENCE), "never released"

    thread = Worker(claim)
    thread.start()
    assert holding.wait(PATIENCE)
    yield done
    done.set()
    thread.outcome()


def test_a_waiter_inside_a_transaction_holds_no_lock_once_its_wait_returns(
    claimer: threading.Event,
) -> None:
    waited, stop_stalling = threading.Event(), threading.Event()

    def wait_then_stall() -> None:
        # A waiter in atomic mode: its own transaction goes on after the wait.
        with transaction.atomic():
            postgresql.wait_for(connections[DEFAULT_DB_ALIAS], CALL, PATIENCE, 1)
            waited.set()
            assert stop_stalling.wait(PATIENCE)

    waiter = Worker(wait_then_stall)
    waiter.start()
    try:
        wait_for_lock_waiters(1)  # the waiter blocks on the claimer's lock
        claimer.set()
        assert waited.wait(PATIENCE)

        # The waiter is still inside its transaction: the key is free all the same.
        assert free(postgresql.lock_id(CALL))
    finally:
        stop_stalling.set()
        waiter.outcome()


def test_waiters_queued_on_one_claimer_all_return_when_it_ends(
    claimer: threading.Event,
) -> None:
    stalled, stop_stalling = threading.Semaphore(0), threading.Event()

    def wait_then_stall() -> None:
        with transaction.atomic():
            postgresql.wait_for(connections[DEFAULT_DB_ALIAS], CALL, PATIENCE, 1)
            stalled.release()
            assert stop_stalling.wait(PATIENCE)

    waiters = [Worker(wait_then_stall) for _ in range(3)]
    for waiter in waiters:
        waiter.start()
    try:
        wait_for_lock_waiters(3)
        claimer.set()
        # None waits on another: each returns while the others still stall.
        for _ in waiters:
            assert stalled.acquire(timeout=PATIENCE)
    finally:
        stop_stalling.set()
        for waiter in waiters:
            waiter.outcome()


def test_a_wait_that_runs_out_leaves_the_callers_transaction_usable(
    claimer: threading.Event,
) -> None:
    connection = connections[DEFAULT_DB_ALIAS]
    with transaction.atomic():
        with pytest.raises(OperationalError) as raised:
            postgresql.wait_for(connection, CALL, 0.05, 1)
        assert raised.value.__cause__.sqlstate == "55P03"  # type: ignore[union-attr]

        with connection.cursor() as cursor:
            cursor.execute("SHOW lock_timeout")
            (lock_timeout,) = cursor.fetchone()
    assert not connection.needs_rollback
    assert lock_timeout == "0"  # the wait's bound ended with it
    assert not free(postgresql.lock_id(CALL))  # still the claimer's


def test_a_wait_cancelled_by_the_statement_timeout_holds_nothing(
    claimer: threading.Event,
) -> None:
    connection = connections[DEFAULT_DB_ALIAS]
    lock = postgresql.lock_id(CALL)
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL statement_timeout = '50ms'")
        with pytest.raises(OperationalError) as raised:
            postgresql.wait_for(connection, CALL, PATIENCE, 1)
        assert raised.value.__cause__.sqlstate == "57014"  # type: ignore[union-attr]
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                " AND pid = pg_backend_pid() AND objid::bigint = %s & 4294967295",
                [lock],
            )
            (held,) = cursor.fetchone()
    assert held == 0
    assert not connection.needs_rollback


def test_no_wait_answers_in_progress_at_once() -> None:
    from django_idempotency.exceptions import RequestInProgress

    with pytest.raises(RequestInProgress):
        postgresql.wait_for(connections[DEFAULT_DB_ALIAS], CALL, 0, 7)


@pytest.mark.parametrize("lock", [5, -5, 2**62 + 3, -(2**62) - 3, 2**63 - 1, -(2**63)])
def test_a_lock_left_held_by_a_failed_wait_is_released(lock: int) -> None:
    connection = connections[DEFAULT_DB_ALIAS]
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_lock(%s)", [lock])
    other: list[bool] = []
    checker = Worker(lambda: other.append(free(lock)))
    checker.start()
    checker.outcome()
    assert other == [False]

    postgresql._release_quietly(connection, lock)
    postgresql._release_quietly(connection, lock)  # not held: nothing, no warning

    checker = Worker(lambda: other.append(free(lock)))
    checker.start()
    checker.outcome()
    assert other == [False, True]
