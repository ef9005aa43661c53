"""Steps (recovery points) and derived keys, driven through ``idempotent_block``.

Every effect is an ``Order`` row, so counting rows counts executions. The
lease-mode tests run on the real database of the run (SQLite, PostgreSQL or
MariaDB); the concurrent ones use real threads with their own connections.
"""

from __future__ import annotations

import contextlib
import json
import threading
from datetime import timedelta
from typing import Any

import pytest
import time_machine
from django.contrib.auth.models import AnonymousUser
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.test import RequestFactory
from django.utils import timezone

from django_idempotency.decorators import idempotent, idempotent_block, idempotent_function
from django_idempotency.exceptions import FingerprintMismatch, RequestInProgress
from django_idempotency.models import IdempotencyKey, IdempotencyStep
from django_idempotency.workflow import (
    MAX_STEP_NAME_LENGTH,
    LeaseLost,
    StepError,
    derived_key,
    step,
)
from tests.concurrency_helpers import PATIENCE
from tests.lease_stores import (  # noqa: F401
    DATABASE,
    REDIS,
    STORES,
    Worker,
    redis_records_fixture,
)
from tests.testapp.models import Order

PAYLOAD = {"order": 1, "amount_cents": 450}


@pytest.fixture(autouse=True)
def configured_stores(settings: Any) -> None:
    settings.IDEMPOTENCY_STORES = STORES
    settings.IDEMPOTENCY_STORE = DATABASE


class Boom(Exception):
    pass


def order(item: str) -> int:
    return Order.objects.create(item=item).pk


def items() -> list[str]:
    return sorted(Order.objects.values_list("item", flat=True))


def steps_of(key: str) -> dict[str, str]:
    return dict(IdempotencyStep.objects.filter(key=key).values_list("name", "result"))


def pay(key: str, *, fail_at: str | None = None, mode: str = "lease", **options: Any) -> Any:
    """Three steps; raises ``Boom`` inside step ``fail_at`` after its write."""

    def work(name: str) -> int:
        pk = order(name)
        if name == fail_at:
            raise Boom(name)
        return pk

    with idempotent_block(key, scope="shop", payload=PAYLOAD, mode=mode, **options) as block:
        if not block.replayed:
            block.result = [step(name, lambda name=name: work(name)) for name in ("a", "b", "c")]
    return block.result


# Resuming ------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_retry_after_a_failing_step_resumes_at_that_step() -> None:
    with pytest.raises(Boom):
        pay("k1", fail_at="b")
    # Step a committed with its write; step b rolled back, write and record.
    assert items() == ["a"]
    assert set(steps_of("k1")) == {"a"}
    assert not IdempotencyKey.objects.filter(key="k1").exists()  # released

    result = pay("k1")

    assert items() == ["a", "b", "c"]
    assert result == list(Order.objects.order_by("item").values_list("pk", flat=True))
    assert pay("k1") == result  # replayed, nothing runs
    assert items() == ["a", "b", "c"]


@pytest.mark.django_db(transaction=True)
def test_steps_in_atomic_mode_live_and_die_with_the_transaction() -> None:
    with pytest.raises(Boom):
        pay("k2", fail_at="b", mode="atomic")
    assert items() == []
    assert steps_of("k2") == {}

    result = pay("k2", mode="atomic")

    assert items() == ["a", "b", "c"]
    assert set(steps_of("k2")) == {"a", "b", "c"}
    assert pay("k2", mode="atomic") == result


@pytest.mark.django_db(transaction=True)
def test_a_function_resumes_too() -> None:
    calls: list[str] = []

    @idempotent_function(key=lambda n: n, scope="fn", mode="lease")
    def work(n: str) -> list[int]:
        first = step("first", lambda: order("first"))
        calls.append("between")
        if len(calls) == 1:
            raise Boom
        return [first, step("second", lambda: order("second"))]

    with pytest.raises(Boom):
        work("x")
    assert work("x") == list(Order.objects.order_by("item").values_list("pk", flat=True))
    assert items() == ["first", "second"]


@pytest.mark.django_db(transaction=True)
def test_a_stored_4xx_like_outcome_keeps_its_steps_and_replays() -> None:
    with idempotent_block("k3", scope="shop", payload=PAYLOAD, mode="lease") as block:
        if not block.replayed:
            step("a", lambda: order("a"))
            block.result = {"status": 402}
    assert set(steps_of("k3")) == {"a"}
    with idempotent_block("k3", scope="shop", payload=PAYLOAD, mode="lease") as block:
        assert block.replayed
    assert block.result == {"status": 402}


@pytest.mark.django_db(transaction=True)
def test_a_released_key_with_steps_refuses_another_request() -> None:
    with pytest.raises(Boom):
        pay("k4", fail_at="b")
    with (
        pytest.raises(FingerprintMismatch),
        idempotent_block("k4", scope="shop", payload={"other": 1}, mode="lease"),
    ):
        step("a", lambda: order("other"))
    assert items() == ["a"]


@pytest.mark.django_db(transaction=True)
def test_steps_expire_with_the_key() -> None:
    with time_machine.travel(timezone.now(), tick=False) as traveller:
        with pytest.raises(Boom):
            pay("k5", fail_at="b", retention=60)
        traveller.shift(timedelta(seconds=61))
        pay("k5", retention=60)
    # The expired step a ran again: a new key, new steps.
    assert items() == ["a", "a", "b", "c"]


# Fencing and concurrency -----------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_late_owner_cannot_record_over_a_takeover() -> None:
    inside, release = threading.Event(), threading.Event()

    def slow() -> int:
        inside.set()
        assert release.wait(PATIENCE)
        return order("late")

    def first() -> Any:
        with idempotent_block("k6", scope="shop", payload=PAYLOAD, mode="lease", lease=1) as b:
            b.result = step("charge", slow)
        return b.result

    late = Worker(first, "late")
    with time_machine.travel(timezone.now(), tick=False) as traveller:
        late.start()
        assert inside.wait(PATIENCE)
        traveller.shift(timedelta(seconds=5))  # the lease has ended
        with idempotent_block("k6", scope="shop", payload=PAYLOAD, mode="lease") as block:
            block.result = step("charge", lambda: order("new"))
        release.set()
        late.join(PATIENCE)
    assert isinstance(late.error, LeaseLost), late.error
    assert items() == ["new"]  # the late step's write rolled back with it
    assert steps_of("k6") == {"charge": str(block.result)}


@pytest.mark.django_db(transaction=True)
def test_a_view_whose_step_lost_its_lease_answers_409_not_500() -> None:
    """The late worker's client is told to retry; its retry gets the new owner's outcome."""
    inside, release = threading.Event(), threading.Event()

    @idempotent(mode="lease", lease=1)
    def charge(request: HttpRequest) -> HttpResponse:
        def slow() -> int:
            if threading.current_thread().name == "late":  # the first worker, held
                inside.set()
                assert release.wait(PATIENCE)
                return order("late")
            return order("new")

        return HttpResponse(str(step("charge", slow)), status=201)

    def post() -> HttpResponse:
        request = RequestFactory().post("/charge/", headers={"Idempotency-Key": "k-view"})
        request.user = AnonymousUser()
        return charge(request)

    late = Worker(post, "late")
    with time_machine.travel(timezone.now(), tick=False) as traveller:
        late.start()
        assert inside.wait(PATIENCE)
        traveller.shift(timedelta(seconds=5))  # the lease has ended
        taken_over = post()  # the new owner: runs the step, records it
        release.set()
        late.join(PATIENCE)
    assert late.error is None, late.error
    response = late.result
    assert response.status_code == 409
    assert response["Content-Type"] == "application/problem+json"
    assert json.loads(response.content)["type"] == "urn:django-idempotency:problem:lease-lost"
    assert response["Retry-After"]
    assert taken_over.status_code == 201
    assert items() == ["new"]  # the late step's write rolled back with it
    assert post().content == taken_over.content  # the retry replays the new owner's outcome


@pytest.mark.django_db(transaction=True)
def test_a_duplicate_while_a_step_runs_is_refused_and_the_step_runs_once() -> None:
    inside, release = threading.Event(), threading.Event()
    runs: list[str] = []

    def charge() -> int:
        runs.append("charge")
        inside.set()
        assert release.wait(PATIENCE)
        return order("charge")

    def request() -> Any:
        with idempotent_block("k7", scope="shop", payload=PAYLOAD, mode="lease") as b:
            if not b.replayed:
                b.result = step("charge", charge)
        return b.result

    first = Worker(request, "first")
    first.start()
    assert inside.wait(PATIENCE)
    duplicates = [Worker(request, f"dup{n}") for n in range(3)]
    for worker in duplicates:
        worker.start()
    for worker in duplicates:
        worker.join(PATIENCE)
        assert isinstance(worker.error, RequestInProgress), worker.error
    release.set()
    first.join(PATIENCE)
    assert first.error is None
    assert request() == first.result
    assert runs == ["charge"]
    assert items() == ["charge"]


# Bad input: clear errors, nothing half-written -------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("mode", ["atomic", "lease"])
def test_a_non_serialisable_result_records_nothing(mode: str) -> None:
    def run() -> None:
        with idempotent_block("k8", scope="shop", payload=PAYLOAD, mode=mode):
            step("ok", lambda: order("ok"))
            step("bad", lambda: (order("bad"), object())[1])

    with pytest.raises(TypeError, match="step 'bad' must be JSON-serialisable"):
        run()
    assert items() == ([] if mode == "atomic" else ["ok"])
    assert set(steps_of("k8")) == (set() if mode == "atomic" else {"ok"})


@pytest.mark.django_db(transaction=True)
def test_a_step_name_used_twice_is_refused_before_it_runs() -> None:
    def run() -> None:
        with idempotent_block("k9", scope="shop", payload=PAYLOAD, mode="lease"):
            step("a", lambda: order("a1"))
            step("a", lambda: order("a2"))

    with pytest.raises(StepError, match="Step 'a' runs twice"):
        run()
    assert items() == ["a1"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("name", ["x" * (MAX_STEP_NAME_LENGTH + 1), "", 3])
def test_a_bad_step_name_is_refused_before_it_runs(name: Any) -> None:
    with (
        pytest.raises(StepError),
        idempotent_block("k10", scope="shop", payload=PAYLOAD, mode="lease"),
    ):
        step(name, lambda: order("never"))
    assert items() == []
    assert not IdempotencyStep.objects.exists()


def test_a_step_outside_protected_code_is_refused_by_name() -> None:
    with pytest.raises(StepError, match="Step 'charge' is used outside protected code"):
        step("charge", lambda: 1)
    with pytest.raises(StepError, match="outside protected code"):
        derived_key("charge")


@pytest.mark.django_db(transaction=True)
def test_steps_do_not_nest() -> None:
    with (
        pytest.raises(StepError, match="nested in step 'outer'"),
        idempotent_block("k11", scope="shop", payload=PAYLOAD, mode="lease"),
    ):
        step("outer", lambda: step("inner", lambda: 1))


@pytest.mark.django_db(transaction=True)
def test_steps_need_the_database_store(redis_records: None) -> None:
    with (
        pytest.raises(ImproperlyConfigured, match="Step 'a' needs the database store"),
        idempotent_block("k12", scope="shop", payload=PAYLOAD, store=REDIS),
    ):
        step("a", lambda: order("never"))
    assert items() == []


# Derived keys ------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_derived_keys_are_stable_per_key_and_reveal_nothing() -> None:
    def derive(scope: str, key: str, name: str) -> str:
        derived: list[str] = []
        with contextlib.suppress(Boom), idempotent_block(key, scope=scope, payload=PAYLOAD):
            derived.append(derived_key(name))
            raise Boom  # frees the key: the next call with it runs again
        return derived[0]

    seen = [
        derive(scope, key, name)
        for scope, key, name in [
            ("user:1", "abc", "charge"),
            ("user:1", "abc", "charge"),
            ("user:2", "abc", "charge"),
            ("user:1", "abd", "charge"),
            ("user:1", "abc", "refund"),
        ]
    ]
    assert seen[0] == seen[1]
    assert len(set(seen)) == 4
    for value in seen:
        assert value.startswith("idk_")
        assert len(value) == 68
        assert "user" not in value
        assert "abc" not in value


@pytest.mark.django_db(transaction=True)
def test_a_lease_mode_step_inside_a_transaction_is_refused() -> None:
    def run() -> None:
        with (
            transaction.atomic(),
            idempotent_block("k13", scope="shop", payload=PAYLOAD, mode="lease"),
        ):
            step("a", lambda: order("never"))

    with pytest.raises(StepError, match="inside a transaction"):
        run()
    assert items() == []
