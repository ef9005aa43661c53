"""The database store behind PgBouncer in transaction pooling mode, started by the tests.

After pytest-django has created the test database (directly on PostgreSQL),
every connection of the ``default`` alias goes through PgBouncer for this
module: the claim's advisory lock, the lock waits (``SET LOCAL``), atomic
mode's transaction around the view and lease mode's one-statement claims
must all hold when consecutive transactions of one Django connection land
on different server connections. Prepared statements (the store's own,
option ``PREPARE``, and psycopg's ``prepare_threshold``) are on where
PgBouncer keeps them across transactions (1.21 and later, with
``max_prepared_statements``) and off where it does not.

A focused part of the contract runs again here, imported from
``test_concurrency.py`` (atomic mode, threads) and ``test_lease.py`` (lease
mode). The multi-process races behind PgBouncer, and PgBouncer restarted
under load, are in ``test_multiprocess_at_scale.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection, connections

from tests.lease_stores import DATABASE, STORES
from tests.servers import PgBouncer
from tests.test_concurrency import (
    atomic_requests,  # noqa: F401
    failing_gate,  # noqa: F401
    gate,  # noqa: F401
    raced,  # noqa: F401
    sender,  # noqa: F401
    short_sqlite_busy_timeout,  # noqa: F401
    test_duplicates_get_409_while_the_first_runs,
    test_failure_while_duplicates_wait_lets_one_of_them_execute,
    test_waiting_duplicates_replay_the_first,
    waiting,  # noqa: F401
)
from tests.test_lease import (
    frozen,  # noqa: F401
    hooks,  # noqa: F401
    lease_length,  # noqa: F401
    takeovers,  # noqa: F401
    test_a_waiting_duplicate_polls_then_replays,
    test_an_expired_lease_is_taken_over_counted_logged_and_signalled,
    test_an_unheld_burst_of_duplicates_executes_once,
    test_duplicates_racing_a_held_first_request_get_409,
    test_of_concurrent_takeovers_exactly_one_wins,
)

pytestmark = [
    pytest.mark.pgbouncer,
    pytest.mark.concurrency,
    pytest.mark.django_db(transaction=True),
]

__all__ = [
    "test_a_waiting_duplicate_polls_then_replays",
    "test_an_expired_lease_is_taken_over_counted_logged_and_signalled",
    "test_an_unheld_burst_of_duplicates_executes_once",
    "test_duplicates_get_409_while_the_first_runs",
    "test_duplicates_racing_a_held_first_request_get_409",
    "test_failure_while_duplicates_wait_lets_one_of_them_execute",
    "test_of_concurrent_takeovers_exactly_one_wins",
    "test_waiting_duplicates_replay_the_first",
]


@pytest.fixture(scope="module", autouse=True)
def through_pgbouncer(
    django_db_setup: None, django_db_blocker: Any, pgbouncer_server: PgBouncer
) -> Iterator[PgBouncer]:
    """Every new connection of ``default`` goes through PgBouncer while the module runs.

    The settings dict is the one each thread's connection is built from, so
    the test's threads connect through PgBouncer too.
    """
    settings_dict = connections.settings["default"]
    saved = {name: settings_dict.get(name) for name in ("HOST", "PORT", "OPTIONS")}
    saved_cursors = settings_dict.get("DISABLE_SERVER_SIDE_CURSORS", False)
    options = dict(settings_dict.get("OPTIONS") or {})
    options.pop("prepare_threshold", None)
    if pgbouncer_server.prepared_statements:
        options["prepare_threshold"] = 0
    with django_db_blocker.unblock():
        connection.close()
        settings_dict.update(HOST="127.0.0.1", PORT=str(pgbouncer_server.port), OPTIONS=options)
        settings_dict["DISABLE_SERVER_SIDE_CURSORS"] = True
        try:
            yield pgbouncer_server
        finally:
            connection.close()
            settings_dict.update(saved)
            settings_dict["DISABLE_SERVER_SIDE_CURSORS"] = saved_cursors


@pytest.fixture(autouse=True)
def stores_for_the_pooler(settings: Any, through_pgbouncer: PgBouncer) -> None:
    """The database store prepares its statements only where PgBouncer keeps them."""
    database = {
        **STORES[DATABASE],
        "OPTIONS": {"PREPARE": through_pgbouncer.prepared_statements},
    }
    settings.IDEMPOTENCY_STORES = {**STORES, "default": database, DATABASE: database}


@pytest.fixture(name="lease_store")
def lease_store_fixture(settings: Any) -> str:
    """The database store only, in lease mode."""
    settings.IDEMPOTENCY_STORE = DATABASE
    settings.IDEMPOTENCY_MODE = "lease"
    return DATABASE


def test_connections_go_through_pgbouncer(through_pgbouncer: PgBouncer) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT inet_server_port(), current_setting('application_name')")
        (server_port, _) = cursor.fetchone()
    # PostgreSQL serves the query; the client talked to PgBouncer's port.
    assert connection.settings_dict["PORT"] == str(through_pgbouncer.port)
    assert server_port != through_pgbouncer.port
    prepares = connection.connection.prepare_threshold is not None
    assert prepares == through_pgbouncer.prepared_statements
