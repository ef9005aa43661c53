"""DESIGN.md section 2, row by row, for every entry point in each mode and store.

One parametrised matrix: the entry points of the testapp (a function view, a
class-based view, DRF's ``@api_view``, a viewset's create, partial update and
custom action) x (atomic on the database, lease on the database, lease on
Redis) x the rows of the contract. Entry-point specifics (DRF's own 401, 403
and 429, a raised ``APIException``) follow for ``@api_view``.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.db import connection
from django.test import Client

from django_idempotency.protocol import Call, Claim, Policy
from django_idempotency.stores import get_store
from tests.concurrency_helpers import Gate
from tests.conftest import ENDPOINTS, Endpoint, problem, send
from tests.lease_stores import (
    DATABASE,
    REDIS,
    STORES,
    Worker,
    redis_records_fixture,  # noqa: F401
)
from tests.testapp.models import Order

pytestmark = pytest.mark.urls("tests.testapp.urls")

#: (mode, store): where the key is kept, and how.
SETUPS = {
    "atomic-database": ("atomic", DATABASE),
    "lease-database": ("lease", DATABASE),
    "lease-redis": ("lease", REDIS),
}
RELEASED = [401, 403, 408, 429]


@pytest.fixture(params=SETUPS)
def setup(request: pytest.FixtureRequest, settings: Any) -> str:
    mode, store = SETUPS[request.param]
    settings.IDEMPOTENCY_STORES = STORES
    settings.IDEMPOTENCY_STORE = store
    settings.IDEMPOTENCY_MODE = mode
    if store == REDIS:
        request.getfixturevalue("redis_records")
    return str(request.param)


def is_replay(response: Any) -> bool:
    return response.get("Idempotent-Replayed") == "true"


def executions() -> int:
    return Order.objects.count()


# The rows ------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_new_key_runs_once_then_replays(
    user_client: Client, endpoint: Endpoint, setup: str
) -> None:
    first = send(user_client, endpoint)
    replay = send(user_client, endpoint, {"item": "widget"})

    assert first.status_code == replay.status_code
    assert not is_replay(first)
    assert is_replay(replay)
    assert replay.content == first.content
    assert executions() == 1


@pytest.mark.django_db
def test_the_same_key_for_another_request_is_422_and_nothing_runs(
    user_client: Client, endpoint: Endpoint, setup: str
) -> None:
    send(user_client, endpoint)
    mismatch = send(user_client, endpoint, {"item": "gadget"})

    assert mismatch.status_code == 422
    assert problem(mismatch)["type"].endswith(":fingerprint-mismatch")
    assert executions() == 1


@pytest.mark.django_db
@pytest.mark.parametrize("key", [None, "", "k" * 256, "a1,a2"])
def test_a_missing_or_malformed_key_is_400_and_nothing_runs(
    user_client: Client, endpoint: Endpoint, setup: str, key: str | None
) -> None:
    response = send(user_client, endpoint, key=key)

    assert response.status_code == 400
    kind = "key-missing" if key is None else "key-malformed"
    assert problem(response)["type"].endswith(f":{kind}")
    assert executions() == 0


@pytest.mark.django_db
@pytest.mark.parametrize("failure", [{"raise": True}, {"status": 500}, {"status": 503}], ids=str)
def test_a_view_that_raised_or_answered_5xx_keeps_nothing(
    endpoint: Endpoint, setup: str, user: Any, failure: dict[str, Any]
) -> None:
    client = Client(raise_request_exception=False)
    client.force_login(user)

    failed = send(client, endpoint, failure)
    retry = send(client, endpoint, failure)

    assert failed.status_code == retry.status_code >= 500
    assert not is_replay(retry)  # it ran again
    # Atomic mode rolls the failed execution's writes back with the key.
    assert executions() == (0 if setup.startswith("atomic") else 2)


@pytest.mark.django_db
@pytest.mark.parametrize("status", RELEASED)
def test_a_status_a_retry_may_fix_keeps_nothing(
    user_client: Client, endpoint: Endpoint, setup: str, status: int
) -> None:
    refused = send(user_client, endpoint, {"status": status})
    retry = send(user_client, endpoint, {"status": status})

    assert refused.status_code == retry.status_code == status
    assert not is_replay(retry)
    # Atomic mode rolls the refused execution's writes back with the key.
    assert executions() == (0 if setup.startswith("atomic") else 2)


@pytest.mark.django_db
@pytest.mark.parametrize("status", [400, 422])
def test_other_4xx_are_outcomes_and_replayed(
    user_client: Client, endpoint: Endpoint, setup: str, status: int
) -> None:
    first = send(user_client, endpoint, {"status": status})
    replay = send(user_client, endpoint, {"status": status})

    assert first.status_code == replay.status_code == status
    assert is_replay(replay)
    assert executions() == 1


@pytest.mark.django_db(transaction=True)
def test_a_waiting_duplicate_replays_once_the_first_completes(
    endpoint: Endpoint,
    setup: str,
    user: Any,
    settings: Any,
    view_hooks: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings.IDEMPOTENCY_WAIT = 10
    gate = Gate()
    view_hooks["inside"] = gate
    store_class = type(get_store(SETUPS[setup][1]))
    claim = store_class.claim
    attempts: list[Call] = []

    def counted_claim(self: Any, call: Call, policy: Policy) -> Claim:
        attempts.append(call)
        return claim(self, call, policy)

    monkeypatch.setattr(store_class, "claim", counted_claim)

    # Logged in beforehand: logging in writes the user's row, which the first
    # request's order references (InnoDB's foreign key check locks it).
    clients = []
    for _ in range(2):
        clients.append(Client())
        clients[-1].force_login(user)

    def post() -> Any:
        return send(clients.pop(0), endpoint)

    first = Worker(post, name="first")
    first.start()
    assert gate.entered.wait(30)
    duplicate = Worker(post, name="duplicate")
    duplicate.start()
    if connection.vendor == "sqlite" and setup.startswith("atomic"):
        # SQLite's shared-cache test database blocks the duplicate on the
        # first's table locks before it reaches the claim: nothing to observe
        # (as in test_concurrency.py), but it did start while the first held.
        assert duplicate.is_alive()
    else:
        # The duplicate has asked for the key while the first holds it (in
        # atomic mode it is now blocked on the lock; in lease mode it polls).
        _wait_for(lambda: len(attempts) >= 2)
        assert duplicate.is_alive()
    gate.released.set()

    original, replay = first.outcome(), duplicate.outcome()
    assert not is_replay(original)
    assert is_replay(replay)
    assert replay.content == original.content
    assert gate.executions == 1


def _wait_for(condition: Any) -> None:
    done = threading.Event()
    timer = threading.Timer(30, done.set)
    timer.start()
    try:
        while not condition():
            if done.wait(0.005):
                raise AssertionError("timed out")
    finally:
        timer.cancel()


# DRF's @api_view: its own refusals, a raised APIException ----------------------------

GUARDED_FUNCTION = Endpoint("guarded_function", "POST", "/variants/api/guarded-function/", True)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"X-Deny": "1"}, 403), ({"X-Throttle": "1"}, 429)],
    ids=["401", "403", "429"],
)
def test_drfs_own_refusals_in_an_api_view_keep_nothing(
    user_client: Client, setup: str, headers: dict[str, str], status: int
) -> None:
    client = Client() if status == 401 else user_client
    refused = send(client, GUARDED_FUNCTION, headers=headers)
    accepted = send(user_client, GUARDED_FUNCTION)

    assert refused.status_code == status
    assert accepted.status_code == 201
    assert not is_replay(accepted)
    assert executions() == 1


@pytest.mark.django_db
def test_a_raised_api_exception_in_an_api_view_keeps_nothing(
    user_client: Client, setup: str
) -> None:
    first = send(user_client, GUARDED_FUNCTION, {"invalid": True})
    retry = send(user_client, GUARDED_FUNCTION, {"invalid": True})

    assert first.status_code == retry.status_code == 400
    assert retry.json() == {"item": ["This item is not sold here."]}
    assert not is_replay(retry)
    assert executions() == (0 if setup.startswith("atomic") else 2)


def test_every_entry_point_is_in_the_matrix() -> None:
    assert {e.name for e in ENDPOINTS} == {
        "plain",
        "cbv",
        "api_function",
        "viewset_create",
        "viewset_partial_update",
        "viewset_refund",
    }
