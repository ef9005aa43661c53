"""Idempotent functions and blocks: queue consumers, tasks, webhook handlers.

The running example is a consumer of "payment captured" messages whose effect
(an ``Order`` row) must be applied once however often the message arrives.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from django_idempotency.decorators import idempotent_block, idempotent_function
from django_idempotency.engine import Call, Policy
from django_idempotency.exceptions import FingerprintMismatch, KeyMalformed, RequestInProgress
from django_idempotency.stores import get_store
from django_idempotency.stores.database import DatabaseStore
from tests.concurrency_helpers import PATIENCE
from tests.lease_stores import (
    DATABASE,
    REDIS,
    STORES,
    redis_records_fixture,  # noqa: F401
    run_together,
    stored,
)
from tests.testapp.models import Order

MESSAGE = {"id": "msg-1", "payment": "pay_123", "amount": "12.50"}
START = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)

#: (mode, store) pairs that idempotent functions run with.
SETUPS = [("atomic", DATABASE), ("lease", DATABASE), ("lease", REDIS)]


@pytest.fixture(autouse=True)
def configured_stores(settings: Any) -> None:
    settings.IDEMPOTENCY_STORES = STORES
    settings.IDEMPOTENCY_STORE = DATABASE


@pytest.fixture(params=SETUPS, ids=["atomic-database", "lease-database", "lease-redis"])
def setup(request: pytest.FixtureRequest) -> dict[str, str]:
    mode, store = request.param
    if store == REDIS:
        request.getfixturevalue("redis_records")
    return {"mode": mode, "store": store}


def consumer(**options: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A "payment captured" consumer, protected with ``options``."""

    @idempotent_function(key=lambda message: message["id"], scope="payments", **options)
    def capture(message: dict[str, Any]) -> dict[str, Any]:
        order = Order.objects.create(item=f"captured:{message['payment']}")
        return {"order": order.pk, "amount": message["amount"]}

    return capture


def captured() -> int:
    return Order.objects.filter(item__startswith="captured:").count()


# Replay, mismatch, release -------------------------------------------------------


@pytest.mark.django_db
def test_a_repeated_message_returns_the_stored_result_without_running(
    setup: dict[str, str],
) -> None:
    capture = consumer(**setup)

    first = capture(MESSAGE)
    again = capture(dict(MESSAGE))

    assert first == again
    assert first["amount"] == "12.50"
    assert captured() == 1


@pytest.mark.django_db
def test_the_first_call_returns_what_a_replay_would(setup: dict[str, str]) -> None:
    runs: list[int] = []

    @idempotent_function(key=lambda n: n, **setup)
    def pair(n: int) -> tuple[int, int]:
        runs.append(n)
        return (n, n)

    assert pair(1) == [1, 1]  # JSON has lists, not tuples: the same both times
    assert pair(1) == [1, 1]
    assert runs == [1]


@pytest.mark.django_db
def test_a_message_id_reused_for_a_different_payload_is_a_mismatch(setup: dict[str, str]) -> None:
    capture = consumer(**setup)
    capture(MESSAGE)

    with pytest.raises(FingerprintMismatch):
        capture({**MESSAGE, "amount": "99.00"})
    assert captured() == 1


@pytest.mark.django_db
def test_an_exception_frees_the_key_so_a_redelivery_runs(setup: dict[str, str]) -> None:
    attempts: list[int] = []

    @idempotent_function(key=lambda message: message["id"], **setup)
    def flaky(message: dict[str, Any]) -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("the payment provider timed out")
        return "done"

    with pytest.raises(ConnectionError):
        flaky(MESSAGE)
    assert flaky(MESSAGE) == "done"
    assert flaky(MESSAGE) == "done"
    assert len(attempts) == 2


@pytest.mark.django_db
def test_a_result_that_is_not_json_is_an_error_and_frees_the_key(setup: dict[str, str]) -> None:
    results: list[Any] = [object(), "fine"]

    @idempotent_function(key=lambda n: n, **setup)
    def produce(n: int) -> Any:
        return results.pop(0)

    with pytest.raises(TypeError, match="JSON-serialisable"):
        produce(1)
    assert produce(1) == "fine"
    assert produce(1) == "fine"
    assert results == []  # ran twice: the failed call and the one that stored "fine"


@pytest.mark.django_db
def test_a_nested_repeat_while_the_first_runs_is_in_progress() -> None:
    inner: list[BaseException] = []

    @idempotent_function(key=lambda n: n, mode="lease")
    def reenter(n: int) -> int:
        try:
            reenter(n)
        except RequestInProgress as error:
            inner.append(error)
        return n

    assert reenter(7) == 7
    assert len(inner) == 1
    assert inner[0].retry_after >= 1


# Keys, scopes and fingerprints ---------------------------------------------------


@pytest.mark.django_db
def test_the_default_scope_is_the_function_so_functions_do_not_share_keys() -> None:
    runs: list[str] = []

    @idempotent_function(key=lambda n: n)
    def first(n: int) -> str:
        runs.append("first")
        return "first"

    @idempotent_function(key=lambda n: n)
    def second(n: int) -> str:
        runs.append("second")
        return "second"

    assert (first(1), second(1)) == ("first", "second")
    assert (first(1), second(1)) == ("first", "second")
    assert runs == ["first", "second"]
    name = f"{__name__}.test_the_default_scope_is_the_function_so_functions_do_not_share_keys"
    assert stored(DATABASE, f"function:{name}.<locals>.first", "1") is not None


@pytest.mark.django_db
def test_a_scope_can_be_computed_from_the_arguments() -> None:
    runs: list[str] = []

    @idempotent_function(key=lambda tenant, n: n, scope=lambda tenant, n: f"tenant:{tenant}")
    def work(tenant: str, n: int) -> str:
        runs.append(tenant)
        return f"{tenant}/{n}"

    assert work("a", 1) == "a/1"
    assert work("b", 1) == "b/1"  # same key, other scope: runs
    assert work("a", 1) == "a/1"
    assert runs == ["a", "b"]
    assert stored(DATABASE, "tenant:b", "1") is not None


@pytest.mark.django_db
def test_arguments_are_fingerprinted_with_their_defaults_and_json_types() -> None:
    calls: list[Any] = []

    @idempotent_function(key=lambda key, amount, currency="EUR": key)
    def charge(key: str, amount: Decimal, currency: str = "EUR") -> str:
        calls.append(amount)
        return str(amount)

    assert charge("k", Decimal("1.50")) == "1.50"
    assert charge("k", Decimal("1.50"), currency="EUR") == "1.50"  # the same call
    with pytest.raises(FingerprintMismatch):
        charge("k", Decimal("1.50"), "USD")
    assert len(calls) == 1


@pytest.mark.django_db
def test_a_fingerprint_function_decides_which_data_must_match() -> None:
    @idempotent_function(
        key=lambda message: message["id"],
        fingerprint=lambda message: {k: v for k, v in message.items() if k != "delivery"},
    )
    def handle(message: dict[str, Any]) -> str:
        runs.append(message["delivery"])
        return "handled"

    runs: list[int] = []
    assert handle({**MESSAGE, "delivery": 1}) == "handled"
    assert handle({**MESSAGE, "delivery": 2}) == "handled"  # a redelivery, not a new message
    assert runs == [1]


def test_arguments_that_are_not_json_ask_for_a_fingerprint_function() -> None:
    @idempotent_function(key=lambda thing: "k")
    def handle(thing: object) -> None:
        return None

    with pytest.raises(TypeError, match="pass fingerprint="):
        handle(object())


@pytest.mark.django_db
def test_an_integer_message_id_is_a_key() -> None:
    runs: list[int] = []

    @idempotent_function(key=lambda message_id: message_id)
    def handle(message_id: int) -> int:
        runs.append(message_id)
        return message_id

    assert handle(42) == 42
    assert handle(42) == 42
    assert runs == [42]
    assert stored(DATABASE, f"function:{__name__}.{handle.__qualname__}", "42") is not None


@pytest.mark.parametrize("bad", [None, "", b"bytes", True, 1.5])
def test_a_key_that_is_not_a_string_or_integer_is_refused(bad: Any) -> None:
    @idempotent_function(key=lambda value: value)
    def handle(value: Any) -> None:
        return None

    with pytest.raises(KeyMalformed):
        handle(bad)


@pytest.mark.django_db
def test_a_very_long_key_is_hashed_to_fit() -> None:
    runs: list[str] = []

    @idempotent_function(key=lambda value: value)
    def handle(value: str) -> int:
        runs.append(value[-1])
        return len(value)

    assert handle("k" * 1000) == 1000
    assert handle("k" * 1000) == 1000
    assert handle("k" * 999 + "j") == 1000  # a distinct key, not a mismatch
    assert runs == ["k", "j"]


def test_a_key_that_is_not_callable_is_refused() -> None:
    with pytest.raises(ImproperlyConfigured, match="must be a callable"):
        idempotent_function(key="message_id")  # type: ignore[arg-type]


def test_a_coroutine_function_is_refused() -> None:
    decorator = idempotent_function(key=lambda n: n)

    async def handle(n: int) -> None:
        return None

    with pytest.raises(ImproperlyConfigured, match="coroutine"):
        decorator(handle)


@pytest.mark.parametrize("options", [{"mode": "eventual"}, {"lease": 0}, {"wait": -1}])
def test_nonsense_options_are_refused_when_decorating(options: dict[str, Any]) -> None:
    with pytest.raises(ImproperlyConfigured):
        idempotent_function(key=lambda n: n, **options)


# The atomic mode: the inbox pattern ----------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_in_atomic_mode_the_effect_and_the_record_commit_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    capture = consumer(mode="atomic")

    def store_fails(*args: Any, **kwargs: Any) -> bool:
        raise RuntimeError("the database went away while storing the result")

    monkeypatch.setattr(DatabaseStore, "complete", store_fails)
    with pytest.raises(RuntimeError):
        capture(MESSAGE)
    assert captured() == 0  # the effect was rolled back with the record
    assert stored(DATABASE, "payments", MESSAGE["id"]) is None

    monkeypatch.undo()
    capture(MESSAGE)
    assert captured() == 1
    assert stored(DATABASE, "payments", MESSAGE["id"])["state"] == "completed"  # type: ignore[index]


@pytest.mark.django_db(transaction=True)
def test_in_lease_mode_the_effect_stays_when_the_function_fails_after_it() -> None:
    """The documented difference: lease mode does not undo the function's writes."""

    @idempotent_function(key=lambda message: message["id"], mode="lease")
    def capture_then_fail(message: dict[str, Any]) -> None:
        Order.objects.create(item=f"captured:{message['payment']}")
        raise RuntimeError("failed after the write")

    with pytest.raises(RuntimeError):
        capture_then_fail(MESSAGE)
    assert captured() == 1
    assert stored(DATABASE, "payments", MESSAGE["id"]) is None


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("store", [DATABASE, REDIS])
def test_a_redelivery_after_a_crashed_worker_runs_once_the_lease_ends(
    time_machine: Any, store: str, request: pytest.FixtureRequest
) -> None:
    """Lease mode only: an atomic claim dies with its transaction, nothing is left."""
    if store == REDIS:
        request.getfixturevalue("redis_records")
    setup = {"mode": "lease", "store": store}
    time_machine.move_to(START, tick=False)
    capture = consumer(lease=60, **setup)
    # A worker claimed the message and died: its claim stays until the lease ends.
    fingerprint = arguments_fingerprint({"message": MESSAGE})
    crashed = Call(scope="payments", key=MESSAGE["id"], fingerprint=fingerprint)
    get_store(setup["store"]).claim(crashed, Policy(mode="lease", lease=60, store=setup["store"]))

    with pytest.raises(RequestInProgress) as conflict:
        capture(MESSAGE)
    assert conflict.value.retry_after == 60

    time_machine.shift(61)
    assert capture(MESSAGE)["amount"] == "12.50"
    assert captured() == 1


def arguments_fingerprint(arguments: dict[str, Any]) -> str:
    """The documented fingerprint: SHA-256 of the arguments as canonical JSON."""
    canonical = json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@pytest.mark.django_db
def test_the_fingerprint_is_the_hash_of_the_arguments_as_canonical_json() -> None:
    consumer()(MESSAGE)

    record = stored(DATABASE, "payments", MESSAGE["id"])
    assert record is not None
    assert record["fingerprint"] == arguments_fingerprint({"message": MESSAGE})


# Blocks ----------------------------------------------------------------------


@pytest.mark.django_db
def test_a_block_runs_once_and_then_finds_its_result(setup: dict[str, str]) -> None:
    def handle(message: dict[str, Any]) -> tuple[bool, Any]:
        with idempotent_block(message["id"], scope="payments", payload=message, **setup) as block:
            if not block.replayed:
                order = Order.objects.create(item=f"captured:{message['payment']}")
                block.result = {"order": order.pk}
        return block.replayed, block.result

    replayed_first, first = handle(MESSAGE)
    replayed_again, again = handle(MESSAGE)

    assert (replayed_first, replayed_again) == (False, True)
    assert first == again
    assert captured() == 1


@pytest.mark.django_db
def test_a_block_that_sets_no_result_stores_null(setup: dict[str, str]) -> None:
    with idempotent_block("k", scope="s", **setup) as block:
        pass
    with idempotent_block("k", scope="s", **setup) as again:
        pass

    assert (block.result, again.replayed, again.result) == (None, True, None)


@pytest.mark.django_db
def test_a_block_that_raises_frees_the_key(setup: dict[str, str]) -> None:
    with pytest.raises(ZeroDivisionError), idempotent_block("k", scope="s", **setup):
        _ = 1 / 0

    with idempotent_block("k", scope="s", **setup) as block:
        assert not block.replayed


@pytest.mark.django_db
def test_a_block_reused_with_another_payload_is_a_mismatch(setup: dict[str, str]) -> None:
    with idempotent_block("k", scope="s", payload={"amount": 1}, **setup):
        pass

    with (
        pytest.raises(FingerprintMismatch),
        idempotent_block("k", scope="s", payload={"amount": 2}, **setup),
    ):
        pass


# Concurrent deliveries -----------------------------------------------------------


@pytest.mark.concurrency
@pytest.mark.django_db(transaction=True)
def test_the_same_message_delivered_many_times_at_once_is_applied_once(
    setup: dict[str, str],
) -> None:
    capture = consumer(wait=PATIENCE, **setup)

    workers = run_together([lambda: capture(dict(MESSAGE))] * 8)
    results = [worker.outcome() for worker in workers]

    assert captured() == 1
    assert all(result == results[0] for result in results)
    assert results[0]["order"] == Order.objects.get().pk


@pytest.mark.concurrency
@pytest.mark.django_db(transaction=True)
def test_a_concurrent_delivery_that_does_not_wait_is_told_to_retry(
    setup: dict[str, str],
) -> None:
    entered, resume = threading.Event(), threading.Event()

    @idempotent_function(key=lambda message: message["id"], wait=0, **setup)
    def slow_capture(message: dict[str, Any]) -> str:
        Order.objects.create(item=f"captured:{message['payment']}")
        entered.set()
        assert resume.wait(PATIENCE)
        return "captured"

    first = run_together([lambda: slow_capture(MESSAGE)])[0]
    assert entered.wait(PATIENCE)
    with pytest.raises(RequestInProgress):
        slow_capture(MESSAGE)
    resume.set()

    assert first.outcome() == "captured"
    assert slow_capture(MESSAGE) == "captured"
    assert captured() == 1


def test_the_function_adapters_keep_their_documented_import_path() -> None:
    from django_idempotency import decorators, functions

    assert decorators.idempotent_function is functions.idempotent_function
    assert decorators.idempotent_block is functions.idempotent_block
    assert decorators.Block is functions.Block
