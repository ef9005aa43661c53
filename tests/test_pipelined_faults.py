"""The PostgreSQL store's pipelines when the session dies between or inside them.

On psycopg 3 the store sends BEGIN with its claim in one flush, and its
completion with COMMIT in another (docs/benchmarks.md). Here the request's
database session is terminated with ``pg_terminate_backend`` from a second
connection at each point between and inside those flushes, with prepared
statements on and off: the client gets a 503, nothing is half stored (no
order, no key), and a retry with the same key runs. Lease mode's statements,
each on its own, likewise: before the claim, a 503 and nothing kept; before
the completion, the view's answer, its order once, the key held until its
lease ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import DatabaseError, connection
from django.test import Client, override_settings

from django_idempotency.models import IdempotencyKey
from tests.testapp.models import Order

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.urls("tests.testapp.urls"),
    pytest.mark.skipif(
        connection.vendor != "postgresql", reason="pg_terminate_backend: PostgreSQL only"
    ),
]

TABLE = IdempotencyKey._meta.db_table


def terminate_session() -> None:
    """End this thread's database session from a second connection; wait until it is gone."""
    import psycopg

    pid = connection.connection.info.backend_pid
    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    with psycopg.connect(**params, autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s)", [pid])
        # Bounded: a terminated backend leaves pg_stat_activity within moments.
        for _ in range(500):
            gone = other.execute(
                "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = %s)", [pid]
            ).fetchone()
            if gone and gone[0]:
                return
            other.execute("SELECT pg_sleep(0.01)")
    raise AssertionError(f"backend {pid} still there")


@contextlib.contextmanager
def before_statement(word: str, action: Callable[[], None]) -> Iterator[None]:
    """Run ``action`` once, just before the first statement on the key table containing ``word``."""
    done = False

    def wrapper(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        nonlocal done
        if not done and TABLE in sql and word in sql:
            done = True
            action()
        return execute(sql, params, many, context)

    with connection.execute_wrapper(wrapper):
        yield
    assert done, f"no statement with {word!r} ran"


PLAIN = "/plain/"  # atomic mode
LEASE = "/variants/lease/"


def post(key: str, item: str, path: str = PLAIN) -> Any:
    return Client().post(
        path, {"item": item}, content_type="application/json", headers={"Idempotency-Key": key}
    )


@pytest.fixture(params=[True, False], ids=["prepared", "unprepared"])
def store_prepares(request: pytest.FixtureRequest) -> Iterator[bool]:
    stores = {
        "default": {
            "BACKEND": "django_idempotency.stores.database.DatabaseStore",
            "OPTIONS": {"PREPARE": request.param},
        }
    }
    with override_settings(IDEMPOTENCY_STORES=stores):
        yield request.param
    with contextlib.suppress(DatabaseError):
        connection.close()


def assert_nothing_kept_and_a_retry_runs(
    response: Any, key: str, item: str, path: str = PLAIN
) -> None:
    assert response.status_code == 503
    assert response.json()["type"].endswith("store-unavailable")
    with contextlib.suppress(DatabaseError):
        connection.close()  # the terminated session: Django opens a new one
    assert not Order.objects.filter(item=item).exists()
    assert not IdempotencyKey.objects.filter(key=key).exists()

    retry = post(key, item, path)

    assert retry.status_code == 201
    assert "Idempotent-Replayed" not in retry
    assert Order.objects.filter(item=item).count() == 1
    assert IdempotencyKey.objects.get(key=key).state == IdempotencyKey.State.COMPLETED


def test_a_session_gone_before_the_claims_flush(store_prepares: bool) -> None:
    connection.ensure_connection()
    terminate_session()

    response = post("fault-1", "before-claim")

    assert_nothing_kept_and_a_retry_runs(response, "fault-1", "before-claim")


def test_a_session_gone_between_the_claim_and_the_completion(
    store_prepares: bool, view_hooks: dict[str, Any]
) -> None:
    view_hooks["inside"] = terminate_session  # after the view's own INSERT

    response = post("fault-2", "inside-view")

    view_hooks.clear()
    assert_nothing_kept_and_a_retry_runs(response, "fault-2", "inside-view")


def test_a_session_gone_inside_the_completions_pipeline(store_prepares: bool) -> None:
    # The completion is queued, COMMIT not yet sent with it: the flush fails.
    with before_statement("UPDATE", terminate_session):
        response = post("fault-3", "in-completion")

    assert_nothing_kept_and_a_retry_runs(response, "fault-3", "in-completion")


# Lease mode: the claim and the completion each commit on their own (through
# libpq's pipeline calls when prepared, one statement a flush).


def test_lease_mode_a_session_gone_before_the_claim(store_prepares: bool) -> None:
    connection.ensure_connection()
    terminate_session()

    response = post("lease-fault-1", "lease-before-claim", LEASE)

    assert_nothing_kept_and_a_retry_runs(response, "lease-fault-1", "lease-before-claim", LEASE)


def test_lease_mode_a_session_gone_before_the_completion(store_prepares: bool) -> None:
    # The view's order committed on its own; the outcome cannot be stored. The
    # caller gets the view's answer, and the key stays claimed until its lease
    # ends: a retry meanwhile is refused, never run a second time.
    with before_statement("UPDATE", terminate_session):
        response = post("lease-fault-2", "lease-in-completion", LEASE)

    assert response.status_code == 201
    with contextlib.suppress(DatabaseError):
        connection.close()
    assert Order.objects.filter(item="lease-in-completion").count() == 1
    assert IdempotencyKey.objects.get(key="lease-fault-2").state == IdempotencyKey.State.IN_PROGRESS
    retry = post("lease-fault-2", "lease-in-completion", LEASE)
    assert retry.status_code == 409
    assert Order.objects.filter(item="lease-in-completion").count() == 1
