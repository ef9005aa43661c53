"""Lease mode: claim, run outside any transaction of ours, complete if still the owner.

Every test runs against the database store and the Redis store (the
``lease_store`` fixture). Time is moved with time-machine, overlap is made
certain with events and barriers, never with sleeps.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from django.contrib.auth.models import AnonymousUser
from django.core.checks import Error
from django.core.exceptions import ImproperlyConfigured
from django.db import DEFAULT_DB_ALIAS, connections
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.http.response import HttpResponseBase
from django.test import Client, RequestFactory

from django_idempotency import signals
from django_idempotency.checks import check_settings
from django_idempotency.decorators import idempotent
from django_idempotency.engine import protected
from django_idempotency.exceptions import FingerprintMismatch, RequestInProgress
from django_idempotency.protocol import Call, Claim, Execute, Policy, Snapshot
from django_idempotency.stores import get_store
from django_idempotency.stores.database import DatabaseStore
from tests.concurrency_helpers import PATIENCE, Gate
from tests.lease_stores import (
    Worker,
    lease_store_fixture,  # noqa: F401
    redis_records_fixture,  # noqa: F401
    replayed,
    run_together,
    stored,
)
from tests.testapp.models import Order

LEASE = 30
START = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
SCOPE = "anonymous"
KEY = "lease-key-1"
CALL = Call(scope="tests", key="call-1", fingerprint="f" * 64, method="POST", path="/x/")


def policy_for(alias: str, **changes: Any) -> Policy:
    values: dict[str, Any] = {"mode": "lease", "lease": LEASE, "retention": 3600, "store": alias}
    return Policy(**{**values, **changes})


def post(data: dict[str, Any] | None = None, *, key: str = KEY) -> HttpResponseBase:
    """POST to the plain view from a fresh anonymous client (one per thread)."""
    client = Client(raise_request_exception=False)
    response: HttpResponseBase = client.post(
        "/plain/",
        json.dumps({"item": "widget"} if data is None else data),
        content_type="application/json",
        headers={"Idempotency-Key": key},
    )
    return response


def body(response: HttpResponseBase) -> Any:
    return json.loads(response.content)  # type: ignore[attr-defined]


@pytest.fixture
def frozen(time_machine: Any) -> Any:
    """Time stands still at START until the test moves it."""
    time_machine.move_to(START, tick=False)
    return time_machine


@pytest.fixture(autouse=True)
def lease_length(settings: Any) -> None:
    settings.IDEMPOTENCY_LEASE = LEASE


@pytest.fixture
def hooks(view_hooks: dict[str, Any]) -> dict[str, Any]:
    return view_hooks


@pytest.fixture
def takeovers() -> Iterator[list[Call]]:
    calls: list[Call] = []

    def receiver(sender: type, call: Call, **kwargs: Any) -> None:
        calls.append(call)

    signals.takeover.connect(receiver)
    yield calls
    signals.takeover.disconnect(receiver)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll an observable condition (not a guess at timing) up to PATIENCE."""
    done = threading.Event()
    deadline = threading.Timer(PATIENCE, done.set)
    deadline.start()
    try:
        while not condition():
            if done.wait(0.005):
                raise AssertionError(f"timed out waiting until {what}")
    finally:
        deadline.cancel()


def count_claims(alias: str, monkeypatch: pytest.MonkeyPatch) -> list[Call]:
    """The calls the store has claimed or refused, in order (it still claims them)."""
    store_class = type(get_store(alias))
    claim = store_class.claim
    attempts: list[Call] = []

    def counted_claim(self: Any, call: Call, policy: Policy) -> Claim:
        try:
            return claim(self, call, policy)
        finally:
            attempts.append(call)  # once answered: the store has seen the key's state

    monkeypatch.setattr(store_class, "claim", counted_claim)
    return attempts


# A duplicate during a live lease ---------------------------------------------


@pytest.mark.django_db
def test_duplicate_during_a_live_lease_gets_409_with_the_seconds_left(
    lease_store: str, frozen: Any, hooks: dict[str, Any]
) -> None:
    answers: list[HttpResponseBase] = []

    def duplicate_ten_seconds_later() -> None:
        if not answers:
            frozen.shift(10.5)
            answers.append(post())

    hooks["inside"] = duplicate_ten_seconds_later
    first = post()

    assert first.status_code == 201
    (duplicate,) = answers
    assert duplicate.status_code == 409
    assert duplicate["Retry-After"] == "20"  # ceil(30 - 10.5)
    assert duplicate["Content-Type"] == "application/problem+json"
    assert body(duplicate)["type"] == "urn:django-idempotency:problem:request-in-progress"
    assert Order.objects.count() == 1


@pytest.mark.django_db
def test_retry_after_follows_the_lease_setting(
    lease_store: str, frozen: Any, hooks: dict[str, Any], settings: Any
) -> None:
    settings.IDEMPOTENCY_LEASE = timedelta(minutes=2)
    answers: list[HttpResponseBase] = []
    hooks["inside"] = lambda: answers.append(post()) if not answers else None

    post()

    assert answers[0]["Retry-After"] == "120"


@pytest.mark.django_db(transaction=True)
def test_a_waiting_duplicate_polls_then_replays(
    lease_store: str, hooks: dict[str, Any], settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.IDEMPOTENCY_WAIT = 10
    gate = Gate()
    hooks["inside"] = gate
    attempts = count_claims(lease_store, monkeypatch)
    first = Worker(post, name="first")
    first.start()
    gate.wait_entered()
    duplicate = Worker(post, name="duplicate")
    duplicate.start()
    # The first claim is the first request's; two more are the duplicate's polls.
    wait_until(lambda: len(attempts) >= 3, "the duplicate has polled twice")
    gate.released.set()

    original, replay = first.outcome(), duplicate.outcome()
    assert original.status_code == 201
    assert replay.status_code == 201
    assert replay["Idempotent-Replayed"] == "true"
    assert replay.content == original.content
    assert gate.executions == 1


@pytest.mark.django_db(transaction=True)
def test_a_waiting_duplicate_gives_up_with_409_when_the_wait_is_over(
    lease_store: str, hooks: dict[str, Any], settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.IDEMPOTENCY_WAIT = 0.2
    gate = Gate()
    hooks["inside"] = gate
    attempts = count_claims(lease_store, monkeypatch)
    first = Worker(post, name="first")
    first.start()
    gate.wait_entered()

    started = time.monotonic()
    duplicate = post()
    waited = time.monotonic() - started
    gate.released.set()

    assert duplicate.status_code == 409
    assert first.outcome().status_code == 201
    # It did wait: it polled (the first claim is the first request's) for the
    # whole wait, not answering 409 at once.
    assert len(attempts) >= 3
    assert waited >= 0.2


# Expired leases: takeover and fencing ------------------------------------------


@pytest.mark.django_db
def test_an_expired_lease_is_taken_over_counted_logged_and_signalled(
    lease_store: str, frozen: Any, takeovers: list[Call], caplog: pytest.LogCaptureFixture
) -> None:
    store, policy = get_store(lease_store), policy_for(lease_store)
    crashed = store.claim(CALL, policy)
    frozen.shift(LEASE - 1)
    with pytest.raises(RequestInProgress):
        store.claim(CALL, policy)

    frozen.shift(1)
    # The store says that it took the key over; it neither logs nor signals.
    with caplog.at_level(logging.WARNING, logger="django_idempotency"):
        successor = store.claim(CALL, policy)
    assert isinstance(successor, Execute)
    assert successor.takeover
    assert (takeovers, caplog.text) == ([], "")
    store.release(successor)
    store.claim(CALL, policy)  # a live claim again, abandoned in turn
    frozen.shift(LEASE)

    # Through the engine, which reports it.
    with (
        caplog.at_level(logging.WARNING, logger="django_idempotency"),
        protected(CALL, policy) as guard,
    ):
        successor = guard.execution
        guard.conclusion = Snapshot(201)

    assert isinstance(successor, Execute)
    assert successor.takeover
    assert successor.token != crashed.token
    record = stored(lease_store, CALL.scope, CALL.key)
    assert record is not None
    assert record["attempts"] == 2
    assert record["token"] == successor.token
    assert takeovers == [CALL]
    assert "Takeover" in caplog.text


@pytest.mark.django_db
def test_the_slow_first_worker_can_neither_complete_nor_release_the_new_claim(
    lease_store: str, frozen: Any
) -> None:
    store, policy = get_store(lease_store), policy_for(lease_store)
    slow = store.claim(CALL, policy)
    frozen.shift(LEASE + 1)
    successor = store.claim(CALL, policy)

    store.release(slow)
    assert not store.complete(slow, Snapshot(201, body=b"slow"), policy)
    record = stored(lease_store, CALL.scope, CALL.key)
    assert record is not None
    assert (record["state"], record["token"]) == ("in_progress", successor.token)

    assert store.complete(successor, Snapshot(201, body=b"successor"), policy)
    assert not store.complete(slow, Snapshot(201, body=b"slow"), policy)
    store.release(slow)
    assert replayed(store.claim(CALL, policy)).body == b"successor"


@pytest.mark.django_db
def test_a_completed_claim_is_replayed_even_after_its_lease_ended(
    lease_store: str, frozen: Any
) -> None:
    store, policy = get_store(lease_store), policy_for(lease_store)
    claim = store.claim(CALL, policy)
    frozen.shift(LEASE + 1)
    # Late, but nobody took over: the outcome is still the owner's to store.
    assert store.complete(claim, Snapshot(201, body=b"late"), policy)

    assert replayed(store.claim(CALL, policy)).body == b"late"


@pytest.mark.django_db(transaction=True)
def test_a_takeover_never_overwrites_a_completion_that_lands_first(
    frozen: Any, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    """The takeover's compare-and-set sees the late completion between read and write.

    The late completion comes from another session (its own thread and
    database connection), committed before the takeover writes.
    """
    store, policy = DatabaseStore("default"), policy_for("default")
    slow = store.claim(CALL, policy)
    frozen.shift(LEASE + 1)
    take_over = DatabaseStore._take_over
    completions: list[bool] = []

    def complete_just_before(self: DatabaseStore, *args: Any, **kwargs: Any) -> Execute | None:
        if not completions:
            late = Worker(
                lambda: DatabaseStore("default").complete(
                    slow, Snapshot(201, body=b"slow"), policy
                ),
                name="late worker",
            )
            late.start()
            completions.append(late.outcome())
        return take_over(self, *args, **kwargs)

    monkeypatch.setattr(DatabaseStore, "_take_over", complete_just_before)
    claim = store.claim(CALL, policy)

    assert completions == [True]
    assert replayed(claim).body == b"slow"


@pytest.mark.django_db(transaction=True)
def test_a_slow_worker_does_not_overwrite_the_outcome_of_the_worker_that_took_over(
    lease_store: str, frozen: Any, hooks: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    gate = Gate()
    hooks["inside"] = gate
    slow = Worker(post, name="slow")
    slow.start()
    gate.wait_entered()
    frozen.shift(LEASE + 1)

    with caplog.at_level(logging.ERROR, logger="django_idempotency"):
        successor = post()
        gate.released.set()
        slow_response = slow.outcome()

    assert successor.status_code == 201
    assert slow_response.status_code == 201
    assert body(successor)["id"] != body(slow_response)["id"]
    assert "Lease lost" in caplog.text
    replay = post()
    assert replay["Idempotent-Replayed"] == "true"
    assert replay.content == successor.content
    record = stored(lease_store, SCOPE, KEY)
    assert record is not None
    assert record["attempts"] == 2


@pytest.mark.django_db(transaction=True)
def test_a_slow_worker_that_fails_does_not_free_the_key_of_the_worker_that_took_over(
    lease_store: str, frozen: Any, hooks: dict[str, Any]
) -> None:
    def fail() -> None:
        raise RuntimeError("the slow worker fails at last")

    gate = Gate(then=fail)
    hooks["inside"] = gate
    slow = Worker(post, name="slow")
    slow.start()
    gate.wait_entered()
    frozen.shift(LEASE + 1)
    successor_gate_passed = post()
    gate.released.set()

    assert slow.outcome().status_code == 500
    assert successor_gate_passed.status_code == 201
    replay = post()
    assert replay["Idempotent-Replayed"] == "true"
    assert replay.content == successor_gate_passed.content


@pytest.mark.concurrency
@pytest.mark.django_db(transaction=True)
def test_of_concurrent_takeovers_exactly_one_wins(lease_store: str, frozen: Any) -> None:
    store, policy = get_store(lease_store), policy_for(lease_store)
    store.claim(CALL, policy)
    frozen.shift(LEASE + 1)

    def take_over() -> Claim | None:
        try:
            return get_store(lease_store).claim(CALL, policy)
        except RequestInProgress:
            return None

    claims = [worker.outcome() for worker in run_together([take_over] * 6)]

    assert len([claim for claim in claims if claim is not None]) == 1
    record = stored(lease_store, CALL.scope, CALL.key)
    assert record is not None
    assert record["attempts"] == 2


# Failures free the key -------------------------------------------------------


@pytest.mark.django_db
def test_an_exception_releases_the_key(lease_store: str) -> None:
    failed = post({"item": "widget", "raise": True})

    assert failed.status_code == 500
    assert stored(lease_store, SCOPE, KEY) is None
    retried = post({"item": "widget", "raise": True})
    assert retried.status_code == 500
    assert Order.objects.count() == 2  # it ran again


@pytest.mark.django_db
@pytest.mark.parametrize("status", [500, 503])
def test_a_5xx_response_releases_the_key(lease_store: str, status: int) -> None:
    first = post({"item": "widget", "status": status})

    assert first.status_code == status
    assert stored(lease_store, SCOPE, KEY) is None
    assert post({"item": "widget", "status": status}).status_code == status
    assert Order.objects.count() == 2


@pytest.mark.django_db
def test_a_completed_key_replays_and_a_different_request_is_a_mismatch(lease_store: str) -> None:
    first = post()
    replay = post()
    mismatch = post({"item": "gadget"})

    assert first.status_code == 201
    assert replay.status_code == 201
    assert replay.content == first.content
    assert replay["Location"] == first["Location"]
    assert replay["Idempotent-Replayed"] == "true"
    assert mismatch.status_code == 422
    assert Order.objects.count() == 1


@pytest.mark.django_db
def test_a_different_request_is_a_mismatch_while_the_first_is_in_flight(lease_store: str) -> None:
    store, policy = get_store(lease_store), policy_for(lease_store)
    store.claim(CALL, policy)

    with pytest.raises(FingerprintMismatch):
        store.claim(Call(CALL.scope, CALL.key, fingerprint="0" * 64), policy)


# Concurrency -----------------------------------------------------------------


@pytest.mark.concurrency
@pytest.mark.django_db(transaction=True)
def test_duplicates_racing_a_held_first_request_get_409(
    lease_store: str, hooks: dict[str, Any]
) -> None:
    gate = Gate()
    hooks["inside"] = gate
    workers = run_together([post] * 6)
    gate.wait_entered()
    wait_until(lambda: sum(not w.is_alive() for w in workers) >= 5, "the duplicates answered")
    gate.released.set()

    statuses = sorted(worker.outcome().status_code for worker in workers)

    assert statuses == [201, 409, 409, 409, 409, 409]
    assert gate.executions == 1
    assert Order.objects.count() == 1


@pytest.mark.concurrency
@pytest.mark.django_db(transaction=True)
def test_an_unheld_burst_of_duplicates_executes_once(
    lease_store: str, settings: Any, hooks: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.IDEMPOTENCY_WAIT = 10
    attempts = count_claims(lease_store, monkeypatch)
    # Not held by the test, but the first request stays inside the view until
    # a duplicate has tried to claim the key: the burst really overlaps it.
    hooks["inside"] = lambda: wait_until(lambda: len(attempts) >= 2, "a duplicate claimed")
    finished: list[str] = []

    def on_finished(mode: str, outcome: str, claim_wait: float, **kwargs: Any) -> None:
        finished.append(f"{mode} {outcome} after {claim_wait:.2f} s")

    signals.finished.connect(on_finished, dispatch_uid="unheld-burst")
    try:
        workers = run_together([post] * 8)
        responses = [worker.outcome() for worker in workers]
    finally:
        signals.finished.disconnect(dispatch_uid="unheld-burst")

    # A duplicate found the key in flight and polled. If not, the requests'
    # mode, outcome and seconds to their claim tell why: atomic or a long
    # lock wait (seconds near the wait), or a wait that was not applied (none).
    why = "; ".join(sorted(finished)) + (
        f"; ATOMIC_REQUESTS={connections.settings[DEFAULT_DB_ALIAS].get('ATOMIC_REQUESTS')}"
    )
    assert Order.objects.count() == 1  # never more than one execution, whatever else
    assert len(attempts) > 8, why
    assert {response.status_code for response in responses} == {201}
    assert len({response.content for response in responses}) == 1
    assert sum(response.has_header("Idempotent-Replayed") for response in responses) == 7


# Configuration ---------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -5, timedelta(0), "30", True, None])
def test_the_system_check_rejects_nonsense_lease_values(settings: Any, value: Any) -> None:
    settings.IDEMPOTENCY_LEASE = value

    ids = [error.id for error in check_settings() if isinstance(error, Error)]

    assert "django_idempotency.E007" in ids


@pytest.mark.parametrize("value", [1, 0.5, timedelta(minutes=5)])
def test_the_system_check_accepts_sensible_lease_values(settings: Any, value: Any) -> None:
    settings.IDEMPOTENCY_LEASE = value

    assert "django_idempotency.E007" not in [error.id for error in check_settings()]


@pytest.mark.parametrize("value", [0, -1, timedelta(seconds=-1)])
def test_a_view_refuses_a_nonsense_lease(value: Any) -> None:
    with pytest.raises(ImproperlyConfigured, match="lease must be positive"):
        idempotent(lease=value)


def anonymous_post(key: str) -> HttpRequest:
    request = RequestFactory().post(
        "/view/", b"{}", content_type="application/json", headers={"Idempotency-Key": key}
    )
    request.user = AnonymousUser()
    return request


@pytest.mark.django_db
def test_the_lease_given_to_the_view_beats_the_setting(lease_store: str, frozen: Any) -> None:
    answers: list[HttpResponseBase] = []

    @idempotent(lease=90)
    def view(request: HttpRequest) -> HttpResponse:
        if not answers:
            answers.append(view(anonymous_post("v")))
        return JsonResponse({}, status=201)

    assert view(anonymous_post("v")).status_code == 201
    assert answers[0]["Retry-After"] == "90"
