"""The PostgreSQL store's flushes through libpq's pipeline (``postgresql.one_flush``).

With its statements prepared (the default), the store sends BEGIN with its
claim and its completion with COMMIT each in one flush, through libpq's
pipeline calls directly. Here what that path must keep of a psycopg cursor:
a statement prepared per set of parameter types, a prepared statement the
session lost is prepared again, a failure leaves the connection out of
pipeline mode with the transaction to roll back, and Django's query log and
execute wrappers see the statement. The session killed between and inside
the flushes is in test_pipelined_faults.py.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from django.db import (
    DEFAULT_DB_ALIAS,
    DatabaseError,
    DataError,
    connection,
    connections,
    transaction,
)
from django.http import HttpRequest, HttpResponse
from django.test import RequestFactory
from django.test.utils import CaptureQueriesContext

from django_idempotency.decorators import idempotent
from django_idempotency.models import IdempotencyKey
from django_idempotency.stores import postgresql
from tests.testapp.models import Order

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _postgresql_only() -> None:
    if connections[DEFAULT_DB_ALIAS].vendor != "postgresql":
        pytest.skip("libpq's pipeline: PostgreSQL only")


@pytest.fixture(autouse=True)
def _new_session(_postgresql_only: None) -> None:
    """Each test on a session of its own: what earlier tests prepared is not counted."""
    connection.close()


@idempotent
def create_order(request: HttpRequest) -> HttpResponse:
    order = Order.objects.create(item=json.loads(request.body)["item"])
    return HttpResponse(json.dumps({"id": order.pk}), status=201, content_type="application/json")


def post(key: str, item: str = "book", view: Any = create_order) -> HttpResponse:
    request = RequestFactory().post(
        "/orders/",
        json.dumps({"item": item}),
        content_type="application/json",
        headers={"Idempotency-Key": key},
    )
    response: HttpResponse = view(request)
    return response


def raw() -> Any:
    connection.ensure_connection()
    return connection.connection


def prepared_names() -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT name FROM pg_prepared_statements WHERE name LIKE 'django_idempotency_%%'"
        )
        return {name for (name,) in cursor.fetchall()}


def test_a_first_execution_and_its_replay_prepare_the_store_statements_once() -> None:
    assert post("flush-1").status_code == 201
    names = prepared_names()

    assert post("flush-2").status_code == 201
    replay = post("flush-1")

    assert replay.status_code == 201
    assert replay["Idempotent-Replayed"] == "true"
    assert len(names) == 2  # the claim and the completion
    assert prepared_names() == names
    assert Order.objects.count() == 2


@idempotent(mode="lease")
def create_order_in_lease_mode(request: HttpRequest) -> HttpResponse:
    return create_order.__wrapped__(request)  # type: ignore[attr-defined,no-any-return]


def post_in_lease_mode(key: str) -> HttpResponse:
    return post(key, view=create_order_in_lease_mode)


def test_lease_mode_sends_its_statements_through_libpq_prepared_once() -> None:
    with CaptureQueriesContext(connection) as queries:
        assert post_in_lease_mode("lease-1").status_code == 201
    names = prepared_names()
    assert post_in_lease_mode("lease-2").status_code == 201
    replay = post_in_lease_mode("lease-1")

    assert replay["Idempotent-Replayed"] == "true"
    assert len(names) == 2  # the claim and the completion
    assert prepared_names() == names
    # Each in autocommit, as before: no transaction control around them.
    assert [q["sql"].split()[0] for q in queries] == ["WITH", "INSERT", "UPDATE"]


def test_a_lease_statement_the_session_lost_is_prepared_again() -> None:
    # Outside a transaction the statement is its own: nothing else is lost
    # with it, so it is prepared again and sent again.
    assert post_in_lease_mode("lease-lost-1").status_code == 201
    raw().execute("DEALLOCATE ALL")

    assert post_in_lease_mode("lease-lost-2").status_code == 201
    assert post_in_lease_mode("lease-lost-1")["Idempotent-Replayed"] == "true"
    assert IdempotencyKey.objects.get(key="lease-lost-2").state == IdempotencyKey.State.COMPLETED
    assert len(prepared_names()) == 2
    assert Order.objects.count() == 2


def test_lease_mode_inside_an_atomic_block_claims_in_the_blocks_transaction() -> None:
    # The claim is the block's first statement: the store sends the block's
    # BEGIN with it (as in atomic mode), so the claim is inside the block.
    with transaction.atomic():
        assert post_in_lease_mode("lease-in-block").status_code == 201
        transaction.set_rollback(True)

    assert not IdempotencyKey.objects.filter(key="lease-in-block").exists()
    assert Order.objects.count() == 0
    assert post_in_lease_mode("lease-in-block").status_code == 201
    assert IdempotencyKey.objects.get(key="lease-in-block").state == IdempotencyKey.State.COMPLETED


def test_lease_mode_with_autocommit_turned_off_claims_in_the_sessions_transaction() -> None:
    # Autocommit off by hand (no atomic block): psycopg owes the session a
    # BEGIN before the next statement, so the claim goes through psycopg,
    # inside the transaction, and the rollback takes it back.
    transaction.set_autocommit(False)
    try:
        assert post_in_lease_mode("lease-no-autocommit").status_code == 201
        transaction.rollback()
    finally:
        transaction.set_autocommit(True)

    assert not IdempotencyKey.objects.filter(key="lease-no-autocommit").exists()
    assert Order.objects.count() == 0


def test_a_statement_is_prepared_again_for_other_parameter_types() -> None:
    # psycopg dumps an int by its size: int2 here, int8 there.
    small, _ = postgresql._send(raw(), "SELECT CAST(%s AS bigint) + 1", [1], False, False)
    large, _ = postgresql._send(raw(), "SELECT CAST(%s AS bigint) + 1", [2**40], False, False)

    assert small == (2,)
    assert large == (2**40 + 1,)
    assert len(prepared_names()) == 2


def test_statements_the_session_lost_are_prepared_again() -> None:
    assert post("lost-1").status_code == 201
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")
    assert not prepared_names()

    response = post("lost-2")

    assert response.status_code == 201
    assert IdempotencyKey.objects.get(key="lost-2").state == IdempotencyKey.State.COMPLETED
    assert post("lost-2")["Idempotent-Replayed"] == "true"
    assert Order.objects.count() == 2
    assert len(prepared_names()) == 2


def test_a_completion_whose_statement_the_session_lost_fails_as_the_database() -> None:
    # Lost in the middle of a transaction (the view ran DEALLOCATE ALL): the
    # transaction cannot go on, the error is the database's, and the next
    # flush prepares the statement again.
    from psycopg import errors

    statement = "SELECT CAST(%s AS integer) + 1"
    assert postgresql._send(raw(), statement, [1], False, False)[0] == (2,)
    raw().execute("DEALLOCATE ALL")

    with pytest.raises(errors.InvalidSqlStatementName):
        postgresql._send(raw(), statement, [1], False, False)
    assert postgresql._send(raw(), statement, [1], False, False)[0] == (2,)
    raw().execute("DEALLOCATE ALL")

    with pytest.raises(DatabaseError), postgresql.one_flush(connection, commit=True) as cursor:
        cursor.execute(statement, [1])

    assert postgresql._send(raw(), statement, [1], False, False)[0] == (2,)


def test_a_failed_statement_leaves_pipeline_mode_and_the_transaction_to_roll_back() -> None:
    from psycopg import errors
    from psycopg.pq import PipelineStatus, TransactionStatus

    connection_ = raw()
    connection_.autocommit = True

    with pytest.raises(errors.DivisionByZero):
        postgresql._send(connection_, "SELECT 1 / CAST(%s AS integer)", [0], True, True)

    assert connection_.pgconn.pipeline_status == PipelineStatus.OFF
    # BEGIN ran, the statement failed, COMMIT was skipped.
    assert connection_.pgconn.transaction_status == TransactionStatus.INERROR
    connection_.execute("ROLLBACK")
    assert connection_.execute("SELECT 1").fetchone() == (1,)


def test_a_percent_sign_is_passed_through_and_placeholders_numbered() -> None:
    assert postgresql._numbered("SELECT %s, '%%', %s") == b"SELECT $1, '%', $2"
    row, _ = postgresql._send(raw(), "SELECT CAST(%s AS text) || '%%'", ["50"], False, False)
    assert row == ("50%",)


def test_djangos_query_log_and_execute_wrappers_see_the_claim_and_the_completion() -> None:
    wrapped: list[str] = []

    def wrapper(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        wrapped.append(sql)
        return execute(sql, params, many, context)

    key = uuid.uuid4().hex
    with CaptureQueriesContext(connection) as queries, connection.execute_wrapper(wrapper):
        assert post(key).status_code == 201

    table = IdempotencyKey._meta.db_table
    logged = [query["sql"] for query in queries.captured_queries if table in query["sql"]]
    assert [sql.split()[0] for sql in logged] == ["WITH", "UPDATE"]
    assert "$1" in logged[0]  # the text the server ran
    assert [sql.split()[0] for sql in wrapped if table in sql] == ["WITH", "UPDATE"]


def test_an_error_in_a_flush_is_raised_as_djangos() -> None:
    with pytest.raises(DataError), postgresql.one_flush(connection, begin=True) as cursor:
        cursor.execute("SELECT 1 / CAST(%s AS integer)", [0])  # division by zero

    assert connection.connection.pgconn.pipeline_status == 0  # off
    connection.connection.execute("ROLLBACK")
    assert not IdempotencyKey.objects.exists()


def test_inside_a_psycopg_pipeline_the_store_sends_through_it() -> None:
    connection_ = raw()
    with connection_.pipeline():
        assert not postgresql.outside_pipeline(connection)
        response = post("in-a-pipeline")

    assert response.status_code == 201
    assert postgresql.outside_pipeline(connection)
    assert IdempotencyKey.objects.get(key="in-a-pipeline").state == IdempotencyKey.State.COMPLETED
