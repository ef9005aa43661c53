"""What the database store sends: how many statements, and prepared where asked.

The counts are the performance targets of the database store (one claim and
one completion for a first execution; a replay in two statements, one on
PostgreSQL with prepared statements), pinned here so that a change that adds a round
trip to every protected request fails a test, not only a benchmark.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from django_idempotency.engine import Call, Executed, Policy, Replayed, Snapshot, protected, run
from django_idempotency.exceptions import FingerprintMismatch, RequestInProgress
from django_idempotency.models import IdempotencyKey
from django_idempotency.stores import postgresql, sql
from tests.factories import OrderFactory
from tests.testapp.models import Order

pytestmark = pytest.mark.django_db

CALL = Call(scope="tests", key="statements-1", fingerprint="f" * 64, method="POST", path="/x/")
TABLE = IdempotencyKey._meta.db_table
CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "SET ", "PRAGMA")


def create_order() -> Order:
    created: Order = OrderFactory()
    return created


def keep(order: Order) -> Snapshot:
    return Snapshot(status=201, headers=(("Location", f"/o/{order.pk}/"),), body=b"made")


def data_statements(captured: CaptureQueriesContext) -> list[str]:
    """Captured statements other than transaction control and session settings."""
    # Server-side bound statements are logged as "QUERY = '...' - PARAMS = ...";
    # Django 5.2 logs no text for them at all (None), as MySQLdb for a failed one.
    # MariaDB's claim bounds its own lock wait: "SET STATEMENT ... FOR INSERT ...".
    statements = [
        re.sub(r"^SET STATEMENT .*? FOR ", "", str(query["sql"]).removeprefix("QUERY = '"))
        for query in captured.captured_queries
    ]
    return [sql for sql in statements if not sql.lstrip().upper().startswith(CONTROL)]


def store_statements(captured: CaptureQueriesContext) -> list[str]:
    # No text ("None"): MySQLdb's failed statement (a duplicate key), or a
    # server-side bound one on Django 5.2; either is the store's.
    return [sql for sql in data_statements(captured) if TABLE in sql or sql == "None"]


def has_shape(statement: str, starts: tuple[str, ...]) -> bool:
    """Whether ``statement`` begins with one of ``starts``, where its text was logged."""
    return statement == "None" or statement.lstrip().upper().startswith(starts)


@pytest.mark.parametrize("mode", ["atomic", "lease"])
def test_a_first_execution_adds_one_claim_and_one_completion(mode: str) -> None:
    with CaptureQueriesContext(connection) as captured:
        outcome = run(CALL, Policy(mode=mode), create_order, keep)

    assert isinstance(outcome, Executed)
    claim, completion = store_statements(captured)
    assert has_shape(claim, ("WITH", "INSERT"))
    assert has_shape(completion, ("UPDATE",))
    if connection.vendor != "mysql":  # MySQL also bounds the lock wait (SET)
        assert len(data_statements(captured)) == 3  # the claim, the view's INSERT, the completion


@pytest.mark.parametrize("mode", ["atomic", "lease"])
def test_a_replay_reads_the_outcome_in_as_few_statements_as_the_database_allows(
    mode: str,
) -> None:
    first = run(CALL, Policy(mode=mode), create_order, keep)
    assert isinstance(first, Executed)

    with CaptureQueriesContext(connection) as captured:
        replay = run(CALL, Policy(mode=mode), create_order, keep)

    assert isinstance(replay, Replayed)
    assert replay.snapshot == keep(first.result)
    # PostgreSQL with prepared statements: the claim returns the row it
    # collided with. MariaDB/MySQL with mysqlclient: the claim and the read of
    # the row are sent as one query. Elsewhere the claim is followed by a read.
    expected = 1 if claim_returns_the_row() or claim_and_read_in_one_query() else 2
    assert len(store_statements(captured)) == expected
    if claim_and_read_in_one_query():
        [query] = store_statements(captured)
        assert has_shape(query, ("INSERT IGNORE",))
        assert "; SELECT" in query
    assert data_statements(captured) == store_statements(captured)  # no ORM query
    assert Order.objects.count() == 1


@pytest.mark.parametrize("mode", ["atomic", "lease"])
def test_a_mismatch_is_found_by_the_same_statements(mode: str) -> None:
    run(CALL, Policy(mode=mode), create_order, keep)
    other = Call(scope=CALL.scope, key=CALL.key, fingerprint="0" * 64)

    with CaptureQueriesContext(connection) as captured, pytest.raises(FingerprintMismatch):
        run(other, Policy(mode=mode), create_order, keep)

    one = claim_returns_the_row() or claim_and_read_in_one_query()
    assert len(store_statements(captured)) == (1 if one else 2)


def claim_returns_the_row() -> bool:
    """PostgreSQL with psycopg 3 (the store prepares its claim by default), or preparing."""
    return sql.is_psycopg3(connection) or sql.prepares(connection)


def claim_and_read_in_one_query() -> bool:
    """MariaDB/MySQL with mysqlclient, which sends several statements in one query."""
    return connection.vendor == "mysql" and connection.Database.__name__ == "MySQLdb"


def test_a_nested_claim_of_the_same_key_in_atomic_mode_is_refused() -> None:
    # The outer claim's row is visible to its own transaction only: the inner
    # claim must not mistake it for an abandoned one and take it over.
    with protected(CALL, Policy(mode="atomic")) as outer:
        assert outer.replay is None
        with pytest.raises(RequestInProgress), protected(CALL, Policy(mode="atomic")):
            pytest.fail("the nested claim ran")
        outer.conclusion = keep(create_order())

    row = IdempotencyKey.objects.get(key=CALL.key)
    assert row.state == IdempotencyKey.State.COMPLETED
    assert row.attempts == 1
    assert Order.objects.count() == 1


# PostgreSQL prepared statements ------------------------------------------------------------

postgresql_with_psycopg3 = pytest.mark.skipif(
    connection.vendor != "postgresql"
    or not hasattr(connection.Database, "__version__")
    or not connection.Database.__version__.startswith("3."),
    reason="prepared statements of the store: PostgreSQL with psycopg 3",
)


def prepared_store_statements() -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        return [statement for (statement,) in cursor.fetchall() if TABLE in statement]


@pytest.fixture
def preparing() -> Iterator[Any]:
    """The connection prepares every statement (``OPTIONS["prepare_threshold"] = 0``)."""
    connection.ensure_connection()
    raw = connection.connection
    saved = raw.prepare_threshold
    raw.prepare_threshold = 0
    yield raw
    raw.prepare_threshold = saved


@postgresql_with_psycopg3
@pytest.mark.parametrize("mode", ["atomic", "lease"])
def test_statements_are_prepared_when_the_connection_prepares(preparing: Any, mode: str) -> None:
    first = run(CALL, Policy(mode=mode), create_order, keep)
    replay = run(CALL, Policy(mode=mode), create_order, keep)
    # (psycopg forgets its prepared statements at any ROLLBACK: look now.)
    prepared = prepared_store_statements()
    with pytest.raises(FingerprintMismatch):
        run(Call(CALL.scope, CALL.key, "0" * 64), Policy(mode=mode), create_order, keep)
    fresh = Call(CALL.scope, "statements-2", CALL.fingerprint)
    with pytest.raises(RuntimeError), protected(fresh, Policy(mode=mode)):
        raise RuntimeError  # the key is released (lease) or rolled back (atomic)

    assert isinstance(first, Executed)
    assert isinstance(replay, Replayed)
    assert replay.snapshot == keep(first.result)
    assert any(" claimed AS (INSERT" in statement for statement in prepared)
    assert any(statement.startswith("UPDATE") for statement in prepared)
    assert not IdempotencyKey.objects.filter(key="statements-2").exists()
    assert Order.objects.count() == 1


@postgresql_with_psycopg3
@pytest.mark.skipif(
    connection.settings_dict.get("OPTIONS", {}).get("prepare_threshold") is not None,
    reason="the suite runs with prepared statements (PREPARE_THRESHOLD)",
)
def test_statements_are_prepared_by_default_whatever_the_connection_does() -> None:
    assert not sql.prepares(connection)  # Django's default: the connection prepares nothing
    run(CALL, Policy(mode="atomic"), create_order, keep)
    run(CALL, Policy(mode="atomic"), create_order, keep)

    assert any(" claimed AS (INSERT" in statement for statement in prepared_store_statements())


@postgresql_with_psycopg3
@pytest.mark.skipif(
    connection.settings_dict.get("OPTIONS", {}).get("prepare_threshold") is not None,
    reason="the suite runs with prepared statements (PREPARE_THRESHOLD)",
)
def test_statements_are_not_prepared_with_the_prepare_option_off() -> None:
    # PgBouncer in transaction pooling mode before 1.21: the store then
    # follows the connection's setting, off by default in Django.
    stores = {
        "default": {
            "BACKEND": "django_idempotency.stores.database.DatabaseStore",
            "OPTIONS": {"PREPARE": False},
        }
    }
    # What earlier tests prepared on this session is not this test's.
    connection.ensure_connection()
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")
    postgresql._prepared_names(connection.connection).clear()
    with override_settings(IDEMPOTENCY_STORES=stores):
        run(CALL, Policy(mode="atomic"), create_order, keep)
        replay = run(CALL, Policy(mode="atomic"), create_order, keep)
        run(
            Call(CALL.scope, "statements-lease", CALL.fingerprint),
            Policy(mode="lease"),
            create_order,
            keep,
        )

    assert isinstance(replay, Replayed)
    assert prepared_store_statements() == []
