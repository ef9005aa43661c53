"""What a step and an outbox message cost: statements on every database, round trips on servers.

Round trips are counted on the wire by the benchmark's relay
(``benchmarks/wire.py``), as in test_round_trips.py; statements as Django
executes them, as in test_store_statements.py (transaction control and
session settings left out). Each count is what a protected function with
steps adds to the same function without them, so that a change that adds a
round trip to every step fails here, not only in the benchmark
(docs/benchmarks.md, "Steps and the outbox").
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from benchmarks.wire import RoundTrips
from django_idempotency.decorators import idempotent_block
from django_idempotency.models import IdempotencyStep, OutboxMessage
from django_idempotency.outbox import enqueue
from django_idempotency.workflow import step
from tests.test_store_statements import data_statements
from tests.testapp.models import Order
from tests.wire_fixtures import trips_fixture  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)

#: Round trips that steps add, by database and mode: the first step of an
#: execution, each further step, a step whose work sends no statement, and
#: (lease mode: in atomic mode a failure rolls the steps back with the rest)
#: a step resumed from its record.
#:
#: PostgreSQL (psycopg 3), lease mode: the first step reads what the key
#: recorded (SELECT, once per execution); its transaction's BEGIN goes with
#: the work's first statement, and its record (INSERT) with COMMIT. A step
#: without statements of its own sends BEGIN, its record and COMMIT at once.
#: Atomic mode: the same SELECT and INSERT, in the request's transaction.
#: MariaDB/MySQL (MySQLdb: one statement per round trip), lease mode: also
#: SET autocommit=0, COMMIT and SET autocommit=1 around each step.
ADDED = {
    ("postgresql", "lease"): {"first": 2, "further": 1, "no statements": 2, "resumed": 1},
    ("postgresql", "atomic"): {"first": 2, "further": 1, "no statements": 2},
    ("mysql", "lease"): {"first": 5, "further": 4, "no statements": 5, "resumed": 1},
    ("mysql", "atomic"): {"first": 2, "further": 1, "no statements": 2},
}

servers_only = pytest.mark.skipif(
    connection.vendor == "sqlite", reason="SQLite runs in the process: no round trips"
)

STEPS = IdempotencyStep._meta.db_table
OUTBOX = OutboxMessage._meta.db_table


class Failed(Exception):
    pass


def write() -> int:
    return Order.objects.create(item="cost").pk


def write_and_enqueue() -> int:
    enqueue("cost", {"n": 1})
    return write()


def execute(mode: str, body: Callable[[], object], key: str | None = None) -> None:
    with idempotent_block(key or uuid.uuid4().hex, scope="costs", mode=mode) as block:
        if not block.replayed:
            block.result = body()


#: The bodies compared, each run as a first execution with a fresh key.
BODIES: dict[str, Callable[[], object]] = {
    "nothing": lambda: None,
    "one write": write,
    "two writes": lambda: [write(), write()],
    "one step": lambda: step("a", write),
    "two steps": lambda: [step("a", write), step("b", write)],
    "a step without statements": lambda: step("a", lambda: "done"),
    "one step + one message": lambda: step("a", write_and_enqueue),
}


def resume(mode: str, measure: Callable[[Callable[[], None]], Any]) -> Any:
    """What the retry costs whose only step was recorded by a first run that then failed."""
    key = uuid.uuid4().hex

    def then_fail() -> None:
        step("a", write)
        raise Failed

    with pytest.raises(Failed):
        execute(mode, then_fail, key)
    return measure(lambda: execute(mode, lambda: step("a", write), key))


@servers_only
@pytest.mark.parametrize("mode", ["lease", "atomic"])
def test_steps_add_their_round_trips(trips: RoundTrips, mode: str) -> None:
    def measure(run: Callable[[], None]) -> int:
        trips.reset()
        run()
        return trips.reset()

    for body in BODIES.values():  # warm up: prepared statements, caches
        execute(mode, body)
    counted = {
        name: measure(lambda body=body: execute(mode, body)) for name, body in BODIES.items()
    }
    added = {
        "first": counted["one step"] - counted["one write"],
        "further": counted["two steps"]
        - counted["two writes"]
        - (counted["one step"] - counted["one write"]),
        "no statements": counted["a step without statements"] - counted["nothing"],
    }
    if mode == "lease":
        added["resumed"] = resume(mode, measure) - counted["nothing"]
    assert added == ADDED[connection.vendor, mode]
    # An outbox message: its INSERT, one round trip, in the step's transaction.
    assert counted["one step + one message"] - counted["one step"] == 1


@pytest.mark.parametrize("mode", ["lease", "atomic"])
def test_a_step_adds_at_most_two_statements_and_a_message_one_insert(mode: str) -> None:
    def measure(run: Callable[[], None]) -> list[str]:
        with CaptureQueriesContext(connection) as captured:
            run()
        return data_statements(captured)

    for body in BODIES.values():
        execute(mode, body)
    plain = measure(lambda: execute(mode, write))
    one = measure(lambda: execute(mode, BODIES["one step"]))
    two = measure(lambda: execute(mode, BODIES["two steps"]))
    with_message = measure(lambda: execute(mode, BODIES["one step + one message"]))

    # The first step: what the key recorded (read once per execution) and its record.
    assert len(one) - len(plain) == 2
    assert sum(STEPS in sql for sql in one) == 2
    # A further step: its record only; its work (one write) is the plain one's.
    assert len(two) - len(one) == 2
    assert sum(STEPS in sql for sql in two) == 3
    # A message: one INSERT, nothing else.
    (message,) = [sql for sql in with_message if OUTBOX in sql]
    assert message.lstrip().upper().startswith("INSERT")
    assert len(with_message) - len(one) == 1


def test_a_resumed_step_costs_one_read_per_execution() -> None:
    def measure(run: Callable[[], None]) -> list[str]:
        with CaptureQueriesContext(connection) as captured:
            run()
        return data_statements(captured)

    resumed = resume("lease", measure)

    # What the key recorded, read once; neither the step's work nor a record.
    (read,) = [sql for sql in resumed if STEPS in sql]
    assert read.lstrip().upper().startswith("SELECT")
    assert not any(Order._meta.db_table in sql for sql in resumed)
    assert Order.objects.count() == 1
