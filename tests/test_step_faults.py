"""A lease-mode step's pipelined transaction when its session dies or a statement fails.

On PostgreSQL with psycopg 3 a step's BEGIN goes in one flush with the first
statement of its work, and its record with COMMIT in another (with BEGIN too
when the work sent no statement; docs/benchmarks.md). Here the session is
terminated with ``pg_terminate_backend`` from a second connection before,
between and inside those flushes, and statements fail in them: each time
nothing of the step is kept (its write and its record roll back together),
the error says what happened, and a retry with the same key runs the step
again. The last tests check that the first statement's results read after
its flush are the ones it would have without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import DatabaseError, DataError, OperationalError, connection, connections
from django.test import override_settings

from django_idempotency.decorators import idempotent_block
from django_idempotency.exceptions import StoreUnavailable
from django_idempotency.models import IdempotencyKey, IdempotencyStep
from django_idempotency.workflow import LeaseLost, step
from tests.test_pipelined_faults import terminate_session
from tests.testapp.models import Order

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        connection.vendor != "postgresql", reason="pg_terminate_backend: PostgreSQL only"
    ),
]

STEPS = IdempotencyStep._meta.db_table
KEYS = IdempotencyKey._meta.db_table


@pytest.fixture(autouse=True)
def database_store() -> Iterator[None]:
    stores = {"default": {"BACKEND": "django_idempotency.stores.database.DatabaseStore"}}
    with override_settings(IDEMPOTENCY_STORES=stores, IDEMPOTENCY_STORE="default"):
        yield
    with contextlib.suppress(DatabaseError):
        connection.close()


def pay(key: str, work: Callable[[], object]) -> object:
    with idempotent_block(key, scope="faults", mode="lease") as block:
        if not block.replayed:
            block.result = step("charge", work)
    return block.result


def write(item: str) -> int:
    return Order.objects.create(item=item).pk


@contextlib.contextmanager
def before_recording(action: Callable[[], None]) -> Iterator[None]:
    """Run ``action`` once, just before the step's record is queued in its flush."""
    done = False

    def wrapper(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        nonlocal done
        if not done and sql.startswith("INSERT") and STEPS in sql:
            done = True
            action()
        return execute(sql, params, many, context)

    with connection.execute_wrapper(wrapper):
        yield
    assert done, "the step recorded nothing"


def assert_nothing_kept_and_a_retry_runs(key: str, item: str) -> None:
    with contextlib.suppress(DatabaseError):
        connection.close()  # the terminated session: Django opens a new one
    assert not Order.objects.filter(item=item).exists()
    assert not IdempotencyStep.objects.filter(key=key).exists()
    assert not IdempotencyKey.objects.filter(key=key).exists()  # released

    result = pay(key, lambda: write(item))

    assert Order.objects.filter(item=item).count() == 1
    assert result == Order.objects.get(item=item).pk
    (recorded,) = IdempotencyStep.objects.filter(key=key).values_list("result", flat=True)
    assert recorded == str(result)
    assert IdempotencyKey.objects.get(key=key).state == IdempotencyKey.State.COMPLETED


def test_a_session_gone_before_the_steps_first_flush() -> None:
    def work() -> int:
        terminate_session()
        return write("before-begin")  # carries BEGIN: the flush fails

    with pytest.raises(OperationalError):
        pay("fault-1", work)

    assert_nothing_kept_and_a_retry_runs("fault-1", "before-begin")


def test_a_session_gone_between_the_steps_flushes() -> None:
    def work() -> int:
        pk = write("between")  # BEGIN and this INSERT: the first flush
        terminate_session()
        return pk

    with pytest.raises(StoreUnavailable, match="unavailable"):
        pay("fault-2", work)

    assert_nothing_kept_and_a_retry_runs("fault-2", "between")


def test_a_session_gone_inside_the_records_flush() -> None:
    with before_recording(terminate_session), pytest.raises(StoreUnavailable):
        pay("fault-3", lambda: write("in-record"))

    assert_nothing_kept_and_a_retry_runs("fault-3", "in-record")


def test_a_session_gone_before_a_step_without_statements_records() -> None:
    # BEGIN, the record and COMMIT: one flush, which fails whole.
    with before_recording(terminate_session), pytest.raises(StoreUnavailable):
        pay("fault-4", lambda: "charged")
    with contextlib.suppress(DatabaseError):
        connection.close()
    assert not IdempotencyStep.objects.filter(key="fault-4").exists()

    assert pay("fault-4", lambda: "charged") == "charged"
    assert IdempotencyStep.objects.get(key="fault-4").result == '"charged"'


def test_a_record_refused_by_the_fence_commits_none_of_the_steps_writes() -> None:
    def taken_over() -> None:
        # Another worker took the key over: committed by its own connection.
        other = connections.create_connection("default")
        try:
            with other.cursor() as cursor:
                cursor.execute(
                    f"UPDATE {KEYS} SET token = %s WHERE key = %s", ["0" * 32, "fault-5"]
                )
        finally:
            other.close()

    with before_recording(taken_over), pytest.raises(LeaseLost, match="taken over"):
        pay("fault-5", lambda: write("fenced"))

    # The record failed, so the COMMIT queued behind it never ran.
    assert not Order.objects.filter(item="fenced").exists()
    assert not IdempotencyStep.objects.filter(key="fault-5").exists()
    assert IdempotencyKey.objects.get(key="fault-5").token == "0" * 32  # the new owner's


def test_a_failing_first_statement_raises_djangos_error_and_keeps_nothing() -> None:
    def work() -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 / 0")  # carries BEGIN; fails in the flush
        return write("never")

    with pytest.raises(DataError):
        pay("fault-6", work)

    assert_nothing_kept_and_a_retry_runs("fault-6", "never")


# The first statement's results, read after its flush --------------------------


def test_an_update_first_reports_its_row_count() -> None:
    Order.objects.bulk_create([Order(item="old"), Order(item="old")])

    assert pay("first-1", lambda: Order.objects.filter(item="old").update(item="new")) == 2
    assert Order.objects.filter(item="new").count() == 2


def test_a_server_side_cursor_first_reads_every_row() -> None:
    Order.objects.bulk_create([Order(item=f"row-{n}") for n in range(5)])

    def work() -> list[str]:
        return [order.item for order in Order.objects.order_by("item").iterator(chunk_size=2)]

    assert pay("first-2", work) == [f"row-{n}" for n in range(5)]


def test_a_bulk_insert_first_returns_its_rows() -> None:
    def work() -> list[int]:
        return [
            order.pk for order in Order.objects.bulk_create([Order(item="b") for _ in range(3)])
        ]

    pks = pay("first-3", work)

    assert isinstance(pks, list)
    assert sorted(Order.objects.values_list("pk", flat=True)) == sorted(pks)
    assert len(set(pks)) == 3
