"""Signals and log records: what a project counts and what an operator reads.

Each of the five signals fires once for its event, through the HTTP adapter
(database store, atomic mode) and through the engine on every lease store;
log records carry the scope and a short key prefix, never the whole key or
a body.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import time_machine
from django.dispatch import Signal
from django.test import Client
from django.utils import timezone

from django_idempotency import engine, signals
from django_idempotency.engine import Call, Policy, Snapshot
from django_idempotency.exceptions import FingerprintMismatch, RequestInProgress
from django_idempotency.models import IdempotencyKey
from django_idempotency.stores import get_store
from django_idempotency.stores.database import DatabaseStore
from tests.conftest import ENDPOINTS, fingerprint_for
from tests.factories import IdempotencyKeyFactory
from tests.lease_stores import (
    lease_store_fixture,  # noqa: F401
    redis_records_fixture,  # noqa: F401
)

SIGNALS: dict[str, Signal] = {
    "executed": signals.executed,
    "replayed": signals.replayed,
    "conflict": signals.conflict,
    "mismatch": signals.mismatch,
    "takeover": signals.takeover,
}
PLAIN = ENDPOINTS[0]
#: Long enough that its tail must not show up in the logs.
KEY = "order-7f3a9c2e-secret-tail-4d1b"
SECRET_BODY = "card-4242-4242"


@pytest.fixture
def events() -> Iterator[list[tuple[str, type, Call]]]:
    """Every signal sent during the test, as (name, sender, call)."""
    sent: list[tuple[str, type, Call]] = []
    receivers = {}
    for name, signal in SIGNALS.items():

        def receiver(sender: type, call: Call, _name: str = name, **kwargs: Any) -> None:
            sent.append((_name, sender, call))

        receivers[name] = receiver
        signal.connect(receiver)
    yield sent
    for name, signal in SIGNALS.items():
        signal.disconnect(receivers[name])


def names(events: list[tuple[str, type, Call]]) -> list[str]:
    return [name for name, _, _ in events]


def post(client: Client, data: dict[str, Any] | None = None) -> Any:
    body = json.dumps(data or {"item": "widget", "card": SECRET_BODY})
    return client.post(PLAIN.path, body, "application/json", headers={"Idempotency-Key": KEY})


# -- through HTTP, database store, atomic mode ----------------------------------


@pytest.mark.django_db
def test_executed_then_replayed(client: Client, events: list[tuple[str, type, Call]]) -> None:
    post(client)
    assert names(events) == ["executed"]

    post(client)

    assert names(events) == ["executed", "replayed"]
    for _, sender, call in events:
        assert sender is DatabaseStore
        assert (call.scope, call.key, call.method, call.path) == (
            "anonymous",
            KEY,
            "POST",
            "/plain/",
        )


@pytest.mark.django_db
def test_mismatch(client: Client, events: list[tuple[str, type, Call]]) -> None:
    post(client)

    response = post(client, {"item": "something else"})

    assert response.status_code == 422
    assert names(events) == ["executed", "mismatch"]


@pytest.mark.django_db
def test_conflict(client: Client, events: list[tuple[str, type, Call]]) -> None:
    IdempotencyKeyFactory(key=KEY, in_progress=True, fingerprint=fingerprint_for(PLAIN))

    response = post(client, {"item": "widget"})

    assert response.status_code == 409
    assert names(events) == ["conflict"]


@pytest.mark.django_db
def test_takeover_of_an_abandoned_claim(
    client: Client, events: list[tuple[str, type, Call]]
) -> None:
    IdempotencyKeyFactory(key=KEY, stale=True, fingerprint=fingerprint_for(PLAIN))

    response = post(client, {"item": "widget"})

    assert response.status_code == 201
    assert names(events) == ["takeover", "executed"]
    assert IdempotencyKey.objects.get(key=KEY).attempts == 2


@pytest.mark.django_db
def test_nothing_is_sent_for_unprotected_requests(
    client: Client, events: list[tuple[str, type, Call]]
) -> None:
    client.get(PLAIN.path)
    client.post("/optional/", "{}", "application/json")

    assert events == []


# -- through the engine, on every lease store -------------------------------------


def lease_policy(alias: str) -> Policy:
    return Policy(mode="lease", store=alias, lease=30, retention=3600)


def ok(result: str) -> Snapshot:
    return Snapshot(status=200, body=result.encode())


def run(alias: str, fingerprint: str = "f" * 64) -> Any:
    call = Call(scope="tenant:1", key=KEY, fingerprint=fingerprint)
    return engine.run(call, lease_policy(alias), lambda: "done", ok)


@pytest.mark.django_db(transaction=True)
def test_every_signal_on_each_lease_store(
    lease_store: str, events: list[tuple[str, type, Call]]
) -> None:
    store = get_store(lease_store)
    call = Call(scope="tenant:1", key=KEY, fingerprint="f" * 64)
    with time_machine.travel(timezone.now(), tick=False) as traveller:
        # A worker claims the key and dies without completing or releasing it.
        store.claim(call, lease_policy(lease_store))
        with pytest.raises(RequestInProgress):
            run(lease_store)
        traveller.shift(timedelta(seconds=31))
        run(lease_store)
        run(lease_store)
        with pytest.raises(FingerprintMismatch):
            run(lease_store, fingerprint="0" * 64)

    assert names(events) == ["conflict", "takeover", "executed", "replayed", "mismatch"]
    assert {sender for _, sender, _ in events} == {type(store)}
    assert {call.key for _, _, call in events} == {KEY}


# -- log records -------------------------------------------------------------------


def records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "django_idempotency"]


@pytest.mark.django_db
def test_log_levels_and_what_they_say(client: Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="django_idempotency")

    post(client)
    post(client)
    post(client, {"item": "something else", "card": SECRET_BODY})
    IdempotencyKey.objects.filter(key=KEY).update(
        state=IdempotencyKey.State.IN_PROGRESS,
        locked_until=timezone.now() + timedelta(seconds=30),
    )
    post(client)
    IdempotencyKey.objects.filter(key=KEY).update(
        locked_until=timezone.now() - timedelta(seconds=1)
    )
    post(client)

    logged = [(r.levelname, r.getMessage().split()[0].rstrip(":")) for r in records(caplog)]
    assert logged == [
        ("INFO", "Replayed"),
        ("WARNING", "Mismatch"),
        ("WARNING", "Conflict"),
        ("WARNING", "Takeover"),
    ]
    for record in records(caplog):
        message = record.getMessage()
        assert "scope='anonymous' key='order-7f'…" in message
        assert KEY not in message
        assert SECRET_BODY not in message
        assert "widget" not in message


@pytest.mark.django_db(transaction=True)
def test_a_lost_lease_is_an_error(lease_store: str, caplog: pytest.LogCaptureFixture) -> None:
    store = get_store(lease_store)
    call = Call(scope="tenant:1", key=KEY, fingerprint="f" * 64)
    policy = lease_policy(lease_store)

    def slow_worker() -> str:
        # Past its lease another worker takes the key over; this one's
        # outcome can no longer be stored.
        with time_machine.travel(timezone.now() + timedelta(seconds=31), tick=False):
            store.claim(call, policy)
        return "late"

    with caplog.at_level(logging.INFO, logger="django_idempotency"):
        engine.run(call, policy, slow_worker, ok)

    errors = [r for r in records(caplog) if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "Lease lost: scope='tenant:1' key='order-7f'… was taken over before it completed; "
        "not stored"
    ]


# -- the counter example of docs/operations.md --------------------------------------


@pytest.mark.django_db
def test_counting_events_as_the_docs_show(client: Client) -> None:
    # docs/operations.md, with a plain Counter for prometheus_client's.
    counted: Counter[tuple[str, str]] = Counter()
    events = {signal: name for name, signal in SIGNALS.items()}

    def count_event(sender: type, signal: Signal, **kwargs: Any) -> None:
        counted[events[signal], sender.__name__] += 1

    for signal in events:
        signal.connect(count_event, dispatch_uid="shop-idempotency-metrics")
    try:
        post(client)
        post(client)
        post(client)
        post(client, {"item": "other"})
    finally:
        for signal in events:
            signal.disconnect(dispatch_uid="shop-idempotency-metrics")

    assert counted == {
        ("executed", "DatabaseStore"): 1,
        ("replayed", "DatabaseStore"): 2,
        ("mismatch", "DatabaseStore"): 1,
    }
