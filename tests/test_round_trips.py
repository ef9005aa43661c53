"""How often a protected request waits for the database server: its round trips.

Counted on the wire by the benchmark's relay (``benchmarks/wire.py``), for a
view protected with ``@idempotent`` against the same view unprotected, on
PostgreSQL and MariaDB/MySQL (SQLite runs in the process: no round trips; its
statements are pinned in test_store_statements.py). The counts are the
performance targets of docs/benchmarks.md, pinned so that a change adding a
round trip to every protected request fails here, not only in a benchmark.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

import pytest
from django.db import connection
from django.http import HttpRequest, HttpResponse
from django.test import RequestFactory

from benchmarks.wire import RoundTrips
from django_idempotency.decorators import idempotent
from django_idempotency.models import IdempotencyKey
from tests.testapp.models import Order
from tests.wire_fixtures import trips_fixture  # noqa: F401

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        connection.vendor == "sqlite", reason="SQLite runs in the process: no round trips"
    ),
]

#: Round trips a protected request adds to the same view unprotected (one
#: INSERT, one round trip), by database and mode.
ADDED_TO_A_FIRST_EXECUTION = {
    # BEGIN with the claim, the completion with COMMIT: one flush each.
    ("postgresql", "atomic"): 2,
    # The claim and the completion, each in autocommit.
    ("postgresql", "lease"): 2,
    # MySQLdb has no pipeline: Django's transaction costs SET autocommit=0,
    # COMMIT and SET autocommit=1, and the claim (which bounds its own lock
    # wait on MariaDB, and needs no savepoint) and the completion one each.
    ("mysql", "atomic"): 5,
    # The claim and the completion, each in autocommit.
    ("mysql", "lease"): 2,
}
#: Round trips of a replay, by database and mode. On PostgreSQL the claim
#: returns the row it collided with (a prepared statement).
REPLAY = {
    ("postgresql", "atomic"): 2,  # BEGIN with the claim, COMMIT
    ("postgresql", "lease"): 1,  # the claim
    # The claim and the read of the row it collided with are one query (two
    # statements), inside Django's transaction (SET autocommit=0, COMMIT,
    # SET autocommit=1) in atomic mode.
    ("mysql", "atomic"): 4,
    ("mysql", "lease"): 1,
}


def create_order(request: HttpRequest) -> HttpResponse:
    order = Order.objects.create(item=json.loads(request.body)["item"])
    return HttpResponse(json.dumps({"id": order.pk}), status=201, content_type="application/json")


def post(view: Callable[[HttpRequest], HttpResponse], key: str | None) -> HttpResponse:
    headers = {} if key is None else {"Idempotency-Key": key}
    request = RequestFactory().post(
        "/orders/", b'{"item": "book"}', content_type="application/json", headers=headers
    )
    return view(request)


def counted(trips: RoundTrips, request: Callable[[], HttpResponse]) -> tuple[int, HttpResponse]:
    trips.reset()
    response = request()
    return trips.reset(), response


@pytest.mark.parametrize("mode", ["atomic", "lease"])
def test_a_first_execution_adds_its_round_trips_to_the_plain_views(
    trips: RoundTrips, mode: str
) -> None:
    protected = idempotent(mode=mode)(create_order)
    post(protected, "warm-up")  # the connection's prepared statements, if any

    plain, response = counted(trips, lambda: post(create_order, None))
    assert response.status_code == 201
    first, response = counted(trips, lambda: post(protected, uuid.uuid4().hex))
    assert response.status_code == 201

    assert plain == 1
    assert first - plain == ADDED_TO_A_FIRST_EXECUTION[connection.vendor, mode]


@pytest.mark.parametrize("mode", ["atomic", "lease"])
def test_a_replay_takes_its_round_trips(trips: RoundTrips, mode: str) -> None:
    protected = idempotent(mode=mode)(create_order)
    assert post(protected, "replayed").status_code == 201

    replay, response = counted(trips, lambda: post(protected, "replayed"))

    assert response.status_code == 201
    assert response["Idempotent-Replayed"] == "true"
    assert replay == REPLAY[connection.vendor, mode]
    assert Order.objects.count() == 1


@pytest.mark.skipif(connection.vendor != "mysql", reason="mysqlclient's several statements")
@pytest.mark.parametrize("mode", ["atomic", "lease"])
def test_without_several_statements_per_query_a_replay_reads_the_row_apart(
    trips: RoundTrips, mode: str
) -> None:
    # OPTIONS["multi_statements"] = False (or PyMySQL): the claim, then the read.
    settings = connection.settings_dict
    saved = settings.get("OPTIONS")
    settings["OPTIONS"] = {**(saved or {}), "multi_statements": False}
    try:
        connection.close()
        connection.ensure_connection()
        protected = idempotent(mode=mode)(create_order)
        assert post(protected, "replayed").status_code == 201

        replay, response = counted(trips, lambda: post(protected, "replayed"))
    finally:
        settings["OPTIONS"] = saved
        connection.close()

    assert response["Idempotent-Replayed"] == "true"
    assert replay == REPLAY[connection.vendor, mode] + 1
    assert Order.objects.count() == 1


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the floor is psycopg's")
def test_the_celery_benchmarks_floor_sends_what_an_idempotent_task_sends(
    trips: RoundTrips,
) -> None:
    """benchmarks/celery_throughput.py's floor of atomic mode: the task's wire, not its code.

    The floor stands for the least any atomic-mode protection on the store's
    statements can cost, so it must send what an ``@idempotent_task`` sends
    (BEGIN with the claim, the task's row, the completion with COMMIT) and
    leave the key completed with the result, as the task does.
    """
    from tests.brokered.floor import SCOPE, book_with_bare_statements
    from tests.testapp import tasks

    tasks.by_event.apply(kwargs={"event": {"id": "warm-up"}})  # statements prepared
    book_with_bare_statements({"id": "warm-up, floor"})

    trips.reset()
    tasks.by_event.apply(kwargs={"event": {"id": "task"}}).get()
    task = trips.reset()
    result = book_with_bare_statements({"id": "floor"})
    floor = trips.reset()

    assert task == floor == 3
    key = IdempotencyKey.objects.get(scope=SCOPE, key="floor")
    assert key.state == IdempotencyKey.State.COMPLETED
    assert json.loads(bytes(key.response_body)) == result
    assert list(Order.objects.filter(item="floor").values_list("pk", flat=True)) == [
        result["order"]
    ]
