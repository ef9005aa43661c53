"""The ``atomic`` mode under real concurrency: threads against the real database.

Run on SQLite (no ``DATABASE_URL``), PostgreSQL and MariaDB. Each test makes
the overlap certain: the first execution is held inside the view (the testapp
hook runs after the view's write) until the duplicates are seen blocked on
the database or answered.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth.models import AbstractBaseUser
from django.db import connection, connections
from django.http.response import HttpResponseBase
from django.test import Client

from django_idempotency import signals
from django_idempotency.models import IdempotencyKey
from tests.concurrency_helpers import (
    PATIENCE,
    Answer,
    Crowd,
    Gate,
    basic_auth,
    lock_waiters,
    wait_for_lock_waiters,
)
from tests.conftest import ENDPOINTS, Endpoint, problem, send
from tests.factories import PASSWORD
from tests.testapp.models import Order
from tests.testapp.views import Boom

pytestmark = [pytest.mark.concurrency, pytest.mark.django_db(transaction=True)]

CROWD = 20
#: The entry points raced here: a plain Django view, a class-based view, a DRF
#: function view, a viewset.
RACED = [e for e in ENDPOINTS if e.name in {"plain", "cbv", "api_function", "viewset_create"}]

needs_row_locks = pytest.mark.skipif(
    connection.vendor == "sqlite",
    reason="SQLite has no row locks: its database lock serialises all writers",
)
sqlite_only = pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite's database lock")


@pytest.fixture(params=RACED, ids=str)
def raced(request: pytest.FixtureRequest) -> Endpoint:
    endpoint: Endpoint = request.param
    return endpoint


@pytest.fixture
def gate(view_hooks: dict[str, Any]) -> Gate:
    view_hooks["inside"] = held = Gate()
    return held


@pytest.fixture
def failing_gate(view_hooks: dict[str, Any]) -> Gate:
    view_hooks["inside"] = held = Gate(fail_first=True)
    return held


@pytest.fixture
def waiting(settings: Any) -> None:
    """Duplicates wait for the first request (bounded) instead of getting 409."""
    settings.IDEMPOTENCY_WAIT = 5


@pytest.fixture
def short_sqlite_busy_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """On SQLite, new connections give up on the database lock after 0.3 s.

    A duplicate on SQLite waits for the database lock like any write (see the
    store); this lets the tests see that outwaiting it is a 409, not a 500.
    """
    if connection.vendor == "sqlite":
        options = connections.settings["default"].setdefault("OPTIONS", {})
        monkeypatch.setitem(options, "timeout", 0.3)


@pytest.fixture
def atomic_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every view in a transaction (read per request, so threads see it too)."""
    monkeypatch.setitem(connections.settings["default"], "ATOMIC_REQUESTS", True)


@pytest.fixture
def sender(user: AbstractBaseUser) -> Callable[..., Callable[[Client, int], HttpResponseBase]]:
    """Build what each thread sends: ``endpoint`` with ``key(index)`` as key."""
    authorization = basic_auth(user.get_username(), PASSWORD)

    def build(
        endpoint: Endpoint, key: Callable[[int], str] = lambda _: "same-key"
    ) -> Callable[[Client, int], HttpResponseBase]:
        def post(client: Client, index: int) -> HttpResponseBase:
            return send(client, endpoint, key=key(index), headers={"Authorization": authorization})

        return post

    return build


def await_duplicates_blocked(crowd: Crowd, count: int) -> None:
    """Return once ``count`` duplicates wait on the database for the held one.

    Where lock waits are visible (PostgreSQL, MariaDB) this is proven; SQLite's
    writers wait in a busy loop that cannot be seen, so there the whole crowd
    has only been seen to start.
    """
    if lock_waiters() is None:
        crowd.wait_until_started()
        return
    wait_for_lock_waiters(count)


def executed(answers: list[Answer]) -> list[Answer]:
    return [a for a in answers if a.status == 201 and not a.replayed]


def assert_no_errors(answers: list[Answer]) -> None:
    assert [a.error for a in answers if a.error is not None] == []
    assert [a.status for a in answers if a.status is None or a.status >= 500] == []


def assert_one_outcome_stored(first: Answer) -> None:
    assert list(Order.objects.values_list("pk", flat=True)) == [first.json()["id"]]
    stored = IdempotencyKey.objects.get()
    assert stored.state == IdempotencyKey.State.COMPLETED
    assert stored.response_status == 201


def assert_in_progress(answer: Answer) -> None:
    assert answer.response is not None
    assert answer.status == 409
    assert int(answer.response["Retry-After"]) >= 1
    assert problem(answer.response)["type"].endswith(":request-in-progress")


def assert_executed_once(
    answers: list[Answer],
    gate: Gate,
    on_commit_calls: list[int],
    duplicate: Callable[[Answer, Answer], None],
) -> Answer:
    """One answer executed (and committed once); ``duplicate(answer, first)`` holds for the rest."""
    assert_no_errors(answers)
    [first] = executed(answers)
    for answer in answers:
        if answer is not first:
            duplicate(answer, first)
    assert gate.executions == 1
    assert_one_outcome_stored(first)
    assert on_commit_calls == [first.json()["id"]]
    return first


def assert_replay_of(answer: Answer, first: Answer) -> None:
    assert answer.response is not None
    assert first.response is not None
    assert answer.status == 201
    assert answer.replayed
    assert answer.json() == first.json()
    assert answer.response["Location"] == first.response["Location"]


@pytest.mark.usefixtures("short_sqlite_busy_timeout")
def test_duplicates_get_409_while_the_first_runs(
    raced: Endpoint, sender: Any, gate: Gate, on_commit_calls: list[int]
) -> None:
    # wait=0 (the default): at once on PostgreSQL and MariaDB; on SQLite once
    # the connection's busy timeout has passed.
    crowd = Crowd(CROWD, sender(raced)).start()
    assert gate.entered.wait(PATIENCE)
    # Every duplicate is answered while the first one is still inside the view.
    crowd.wait_for_answers(CROWD - 1)
    gate.released.set()
    answers = crowd.answers()

    first = assert_executed_once(
        answers, gate, on_commit_calls, lambda answer, _: assert_in_progress(answer)
    )
    # Once the first has committed, the key replays.
    later = Crowd(1, sender(raced)).start().answers()
    assert_replay_of(later[0], first)


@pytest.mark.usefixtures("short_sqlite_busy_timeout")
def test_waiting_duplicates_whose_wait_runs_out_get_409(
    sender: Any, gate: Gate, settings: Any, on_commit_calls: list[int]
) -> None:
    # They wait on the database for the held first execution (PostgreSQL's
    # lock_timeout, InnoDB's lock wait or the named lock queued before it,
    # SQLite's busy timeout), one second, and are told to retry: not a 500,
    # and the first one is not disturbed.
    settings.IDEMPOTENCY_WAIT = 1
    duplicates = 4
    crowd = Crowd(duplicates + 1, sender(RACED[0])).start()
    assert gate.entered.wait(PATIENCE)
    crowd.wait_for_answers(duplicates)
    gate.released.set()
    answers = crowd.answers()

    assert_executed_once(
        answers, gate, on_commit_calls, lambda answer, _: assert_in_progress(answer)
    )


@pytest.mark.usefixtures("waiting")
def test_waiting_duplicates_replay_the_first(
    raced: Endpoint, sender: Any, gate: Gate, on_commit_calls: list[int]
) -> None:
    crowd = Crowd(CROWD, sender(raced)).start()
    assert gate.entered.wait(PATIENCE)
    await_duplicates_blocked(crowd, CROWD - 1)
    assert crowd.answered == 0
    gate.released.set()
    answers = crowd.answers()

    assert_executed_once(answers, gate, on_commit_calls, assert_replay_of)


@pytest.mark.usefixtures("waiting")
def test_failure_while_duplicates_wait_lets_one_of_them_execute(
    sender: Any, failing_gate: Gate, on_commit_calls: list[int]
) -> None:
    # Every waiter keeps trying until its wait ends: all replay the second.
    answers = race_against_a_failure(sender, failing_gate)

    failed, second = assert_failed_then_executed_once(answers, on_commit_calls)
    assert failing_gate.executions == 2
    for duplicate in answers:
        if duplicate not in (failed, second):
            assert_replay_of(duplicate, second)


@pytest.mark.usefixtures("waiting", "atomic_requests")
def test_failure_while_duplicates_wait_in_atomic_requests(
    sender: Any, failing_gate: Gate, on_commit_calls: list[int], view_hooks: dict[str, Any]
) -> None:
    nesting: list[int] = []

    def inside() -> None:
        nesting.append(len(connection.atomic_blocks))
        failing_gate()

    view_hooks["inside"] = inside
    answers = race_against_a_failure(sender, failing_gate)
    # The view ran in the request's transaction and the claim's savepoint.
    assert set(nesting) == {2}

    # Every waiter waits until the second execution and replays it: on
    # MariaDB no deadlock victim loses the request's transaction (the store
    # lets one waiting claim at a time wait on the row).
    failed, second = assert_failed_then_executed_once(answers, on_commit_calls)
    assert failing_gate.executions == 2
    for duplicate in answers:
        if duplicate not in (failed, second):
            assert_replay_of(duplicate, second)


def race_against_a_failure(sender: Any, failing_gate: Gate) -> list[Answer]:
    plain = next(e for e in RACED if e.name == "plain")
    crowd = Crowd(CROWD, sender(plain)).start()
    assert failing_gate.entered.wait(PATIENCE)
    await_duplicates_blocked(crowd, CROWD - 1)
    failing_gate.released.set()
    return crowd.answers()


def assert_failed_then_executed_once(
    answers: list[Answer], on_commit_calls: list[int]
) -> tuple[Answer, Answer]:
    [failed] = [a for a in answers if a.error is not None]
    assert isinstance(failed.error, Boom)
    assert failed.status == 500
    others = [a for a in answers if a is not failed]
    assert_no_errors(others)
    [second] = executed(others)
    # The failed execution's order and key were rolled back with it.
    assert_one_outcome_stored(second)
    assert on_commit_calls == [second.json()["id"]]
    return failed, second


@needs_row_locks
def test_different_keys_run_in_parallel(
    raced: Endpoint, sender: Any, view_hooks: dict[str, Any]
) -> None:
    parallel = 10
    # Each execution waits inside the view for all the others: if claims were
    # serialised, the first to arrive would wait alone and the barrier break.
    all_inside = threading.Barrier(parallel, timeout=PATIENCE / 2)
    view_hooks["inside"] = all_inside.wait
    keys = sender(raced, key=lambda index: f"{raced.name}-key-{index}")
    answers = Crowd(parallel, keys).start().answers()

    assert_no_errors(answers)
    assert len(executed(answers)) == parallel
    assert Order.objects.count() == parallel
    assert IdempotencyKey.objects.filter(state=IdempotencyKey.State.COMPLETED).count() == parallel


@sqlite_only
def test_sqlite_serialises_different_keys_instead_of_refusing_them(
    raced: Endpoint, sender: Any, gate: Gate
) -> None:
    # SQLite's lock covers the whole database: that it is busy says nothing
    # about a key, so other keys wait for it, as any write would, even with wait=0.
    crowd = Crowd(10, sender(raced, key=lambda index: f"key-{index}")).start()
    assert gate.entered.wait(PATIENCE)
    crowd.wait_until_started()
    gate.released.set()
    answers = crowd.answers()

    assert_no_errors(answers)
    assert len(executed(answers)) == 10
    assert Order.objects.count() == 10


@pytest.mark.usefixtures("short_sqlite_busy_timeout")
def test_an_unheld_burst_of_duplicates_executes_once(
    raced: Endpoint, sender: Any, view_hooks: dict[str, Any]
) -> None:
    # No gate the test opens: the natural race, including duplicates arriving
    # after the commit. Only, the first execution stays in the view until a
    # duplicate has been refused, so that the burst is sure to overlap it.
    refused = threading.Event()

    def on_conflict(**kwargs: Any) -> None:
        refused.set()

    signals.conflict.connect(on_conflict)
    view_hooks["inside"] = lambda: refused.wait(PATIENCE)
    try:
        answers = Crowd(CROWD, sender(raced)).start().answers()
    finally:
        signals.conflict.disconnect(on_conflict)

    assert_no_errors(answers)
    assert any(answer.status == 409 for answer in answers)  # they did overlap
    [first] = executed(answers)
    for other in answers:
        if other is first:
            continue
        if other.status == 409:
            assert_in_progress(other)
        else:
            assert_replay_of(other, first)
    assert_one_outcome_stored(first)


def test_lock_wait_is_restored_for_the_view(
    sender: Any, view_hooks: dict[str, Any], waiting: None
) -> None:
    # The claim bounds lock waits; the view's own queries must not inherit that.
    outside = lock_wait_setting()
    inside: list[str] = []
    view_hooks["inside"] = lambda: inside.append(lock_wait_setting())
    plain = next(e for e in RACED if e.name == "plain")
    [answer] = Crowd(1, sender(plain)).start().answers()

    assert_no_errors([answer])
    assert answer.status == 201
    assert inside == [outside]


def lock_wait_setting() -> str:
    statement = {
        "postgresql": "SHOW lock_timeout",
        "mysql": "SELECT @@SESSION.innodb_lock_wait_timeout",
        "sqlite": "PRAGMA busy_timeout",
    }[connection.vendor]
    with connection.cursor() as cursor:
        cursor.execute(statement)
        (value,) = cursor.fetchone()
    return str(value)
