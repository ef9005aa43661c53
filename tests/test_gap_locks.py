"""A claim is refused as "in progress" for its own key only (MariaDB/MySQL).

InnoDB's duplicate check of a unique index takes next-key locks: the record
it found and the gap before it, under READ COMMITTED too. A claim that
finds a row under its key (a replay, a take-over, or a new claim over a row
deleted but not yet purged) holds such locks on its neighbours' gaps until
its transaction ends, which in atomic mode is after the view. Another key's
claim that falls into that gap waits for it; with ``wait=0`` (no waiting)
that wait timed out at once and read as "this key is in progress": a 409 for
a key nobody was using. Real transactions on two threads; the deleted row is
kept from purge by a consistent snapshot held open on a third connection.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import DEFAULT_DB_ALIAS, connection, connections

from django_idempotency.engine import Call, Executed, Policy, Snapshot, protected, run
from django_idempotency.exceptions import RequestInProgress
from django_idempotency.models import IdempotencyKey
from tests.concurrency_helpers import PATIENCE, lock_waiters, wait_until

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "mysql", reason="InnoDB's gap locks"),
]

DONE = Snapshot(status=201, headers=(), body=b"done")


def call(key: str) -> Call:
    return Call(scope="gaps", key=key, fingerprint="f" * 64, method="POST", path="/x/")


def complete(key: str) -> None:
    assert isinstance(run(call(key), Policy(mode="atomic"), lambda: None, lambda _: DONE), Executed)


@pytest.fixture
def deleted_but_not_purged() -> Iterator[None]:
    """Keys "key-1" and "key-3" completed, then "key-3" deleted; its record stays."""
    complete("key-1")
    complete("key-3")
    reader = connections.create_connection(DEFAULT_DB_ALIAS)
    assert reader.settings_dict["NAME"] == connection.settings_dict["NAME"]
    try:
        with reader.cursor() as cursor:
            cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            cursor.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT")
            cursor.execute(f"SELECT count(*) FROM {IdempotencyKey._meta.db_table}")
        # Purge cannot remove a record an open snapshot may still read.
        IdempotencyKey.objects.filter(key="key-3").delete()
        yield
    finally:
        reader.close()


class Holder(threading.Thread):
    """Claims ``key`` in atomic mode and keeps its transaction open until released."""

    def __init__(self, key: str) -> None:
        super().__init__(daemon=True)
        self.key = key
        self.holding = threading.Event()
        self.released = threading.Event()
        self.outcome: list[Any] = []

    def run(self) -> None:
        try:
            with protected(call(self.key), Policy(mode="atomic")) as guard:
                assert guard.replay is None
                self.holding.set()
                self.released.wait(PATIENCE)
                guard.conclusion = DONE
            self.outcome.append("executed")
        except BaseException as exc:
            self.outcome.append(exc)
        finally:
            self.holding.set()
            connection.close()

    def __enter__(self) -> Holder:
        self.start()
        assert self.holding.wait(PATIENCE)
        assert not self.outcome, self.outcome
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.released.set()
        self.join(PATIENCE)
        assert self.outcome == ["executed"]


class Claimer(threading.Thread):
    """Claims ``key`` with ``wait=0`` and runs; its outcome, or what it raised."""

    def __init__(self, key: str) -> None:
        super().__init__(daemon=True)
        self.key = key
        self.outcome: list[Any] = []

    def run(self) -> None:
        try:
            self.outcome.append(
                run(call(self.key), Policy(mode="atomic"), lambda: 1, lambda _: DONE)
            )
        except BaseException as exc:
            self.outcome.append(exc)
        finally:
            connection.close()


@pytest.mark.usefixtures("deleted_but_not_purged")
def test_a_claim_over_a_deleted_row_does_not_refuse_the_keys_next_to_it() -> None:
    with Holder("key-3"):  # its duplicate check locks the gap where "key-2" goes
        claimer = Claimer("key-2")
        claimer.start()
        # Either refused at once (the defect), or waiting for the holder's gap.
        wait_until(
            lambda: claimer.outcome != [] or (lock_waiters() or 0) >= 1,
            lambda: "the claim of key-2 ends or waits",
            # MariaDB refreshes innodb_trx only when unread for 100 ms.
            interval=0.15,
        )
        assert claimer.outcome == []
    claimer.join(PATIENCE)

    [outcome] = claimer.outcome
    assert isinstance(outcome, Executed)
    assert IdempotencyKey.objects.get(key="key-2").state == IdempotencyKey.State.COMPLETED


@pytest.mark.usefixtures("deleted_but_not_purged")
def test_a_duplicate_of_the_held_key_is_still_refused_at_once() -> None:
    with Holder("key-3") as holder:
        # In this thread, while the holder waits to be released: a claim that
        # waited for the holder would block the test until PATIENCE ran out.
        with pytest.raises(RequestInProgress):
            run(call("key-3"), Policy(mode="atomic"), lambda: 1, lambda _: DONE)
        assert holder.is_alive()
        assert not holder.released.is_set()


def test_a_duplicate_of_a_new_key_is_refused_at_once() -> None:
    complete("key-1")
    with Holder("key-2") as holder:
        with pytest.raises(RequestInProgress):
            run(call("key-2"), Policy(mode="atomic"), lambda: 1, lambda _: DONE)
        assert holder.is_alive()
