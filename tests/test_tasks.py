"""``@idempotent_task`` without a broker: Celery tasks run eagerly, Django's immediate backend.

The real workers, brokers and crashes are in test_celery_brokers.py and
test_django_tasks_worker.py.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, current_app
from django.core.checks import run_checks
from django.core.exceptions import ImproperlyConfigured
from kombu import Connection

from django_idempotency import signals
from django_idempotency.celery import send_outbox_message
from django_idempotency.decorators import idempotent_block
from django_idempotency.exceptions import FingerprintMismatch, KeyMissing, RequestInProgress
from django_idempotency.models import IdempotencyKey
from django_idempotency.tasks import idempotent_task
from tests.testapp import tasks
from tests.testapp.models import Order

pytestmark = pytest.mark.django_db


@pytest.fixture
def runs() -> Iterator[dict[str, int]]:
    counts = {"executed": 0, "replayed": 0}

    def executed(**kwargs: Any) -> None:
        counts["executed"] += 1

    def replayed(**kwargs: Any) -> None:
        counts["replayed"] += 1

    signals.executed.connect(executed)
    signals.replayed.connect(replayed)
    yield counts
    signals.executed.disconnect(executed)
    signals.replayed.disconnect(replayed)
    tasks.failures.clear()


def items() -> list[str]:
    return sorted(Order.objects.values_list("item", flat=True))


# Celery ---------------------------------------------------------------------


def test_a_redelivered_message_returns_the_stored_result(runs: dict[str, int]) -> None:
    first = tasks.by_message.apply(args=["coffee"], task_id="task-1").get()
    again = tasks.by_message.apply(args=["coffee"], task_id="task-1").get()

    assert first == again == {"order": Order.objects.get().pk}
    assert runs == {"executed": 1, "replayed": 1}
    key = IdempotencyKey.objects.get()
    assert (key.scope, key.key) == ("task:testapp.by_message", "task-1")


def test_each_message_runs_by_default(runs: dict[str, int]) -> None:
    tasks.by_message.apply(args=["coffee"], task_id="task-1").get()
    tasks.by_message.apply(args=["coffee"], task_id="task-2").get()

    assert items() == ["coffee", "coffee"]


def test_a_key_over_the_arguments_makes_two_publishes_of_an_event_run_once(
    runs: dict[str, int],
) -> None:
    event = {"id": "evt_1"}
    results = [tasks.by_event.apply(args=[event]).get() for _ in range(3)]

    assert items() == ["evt_1"]
    assert results == [results[0]] * 3
    assert runs == {"executed": 1, "replayed": 2}


def test_a_message_id_reused_with_other_arguments_is_a_mismatch() -> None:
    tasks.by_message.apply(args=["coffee"], task_id="task-1").get()

    with pytest.raises(FingerprintMismatch):
        tasks.by_message.apply(args=["tea"], task_id="task-1").get()
    assert items() == ["coffee"]


def test_a_bound_task_keys_and_fingerprints_its_arguments_without_self() -> None:
    first = tasks.bound.apply(args=["cake"]).get()
    again = tasks.bound.apply(args=["cake"]).get()

    assert first == again == {"order": Order.objects.get().pk, "task": "testapp.bound"}
    assert IdempotencyKey.objects.get().scope == "orders"


def test_a_task_that_raises_keeps_nothing_so_its_retry_runs(runs: dict[str, int]) -> None:
    tasks.failures.append(RuntimeError("provider down"))

    with pytest.raises(RuntimeError, match="provider down"):
        tasks.by_message.apply(args=["coffee"], task_id="task-1").get()
    assert not IdempotencyKey.objects.exists()
    tasks.by_message.apply(args=["coffee"], task_id="task-1").get()

    assert items() == ["coffee"]


def test_a_duplicate_while_the_first_runs_is_refused_not_dropped() -> None:
    # The first delivery holds the key (a lease); an eager run cannot be
    # retried through the broker, so the refusal is raised as it is.
    first = {"args": ["cake"], "kwargs": {}}
    with (
        idempotent_block("cake", scope="orders", payload=first, mode="lease"),
        pytest.raises(RequestInProgress),
    ):
        tasks.bound.apply(args=["cake"]).get()
    assert items() == []


def test_a_direct_call_has_no_message_id_to_key_by() -> None:
    with pytest.raises(KeyMissing, match=r"idempotent_task\(key=\.\.\.\)"):
        tasks.by_message("coffee")
    assert items() == []


def test_a_direct_call_with_a_key_function_runs_once() -> None:
    tasks.by_event({"id": "evt_1"})
    tasks.by_event({"id": "evt_1"})

    assert items() == ["evt_1"]


def test_another_task_calling_the_function_directly_is_not_a_delivery_of_it() -> None:
    @tasks.celery_app.task(name="testapp.caller", shared=False)
    def caller() -> Any:
        return tasks.by_message("coffee")

    with pytest.raises(KeyMissing):
        caller.apply(task_id="outer").get()


def stored_body() -> bytes:
    return bytes(IdempotencyKey.objects.get().response_body)


def test_the_redact_hook_decides_what_a_redelivery_returns(runs: dict[str, int]) -> None:
    first = tasks.redacted.apply(args=["coffee", "ann@example.com"], task_id="task-1").get()
    again = tasks.redacted.apply(args=["coffee", "ann@example.com"], task_id="task-1").get()

    order = Order.objects.get().pk
    # The first delivery returns the whole result; what is stored, and every
    # redelivery returns, is what the hook kept.
    assert first == {"order": order, "email": "ann@example.com"}
    assert again == {"order": order}
    assert b"ann@example.com" not in stored_body()
    assert runs == {"executed": 1, "replayed": 1}


def test_a_redact_hook_that_fails_frees_the_key_so_a_retry_runs() -> None:
    @tasks.celery_app.task(name="testapp.badly_redacted", shared=False)
    @idempotent_task(redact=lambda result: result["missing"])
    def badly_redacted(item: str) -> dict[str, Any]:
        return tasks.book(item)

    with pytest.raises(KeyError):
        badly_redacted.apply(args=["coffee"], task_id="task-1").get()
    # Rolled back with the claim (atomic mode): no booking, no key.
    assert items() == []
    assert not IdempotencyKey.objects.exists()


@pytest.mark.parametrize("redact", [42, "no.such.hook", "django_idempotency.conf.DEFAULT_STORES"])
def test_a_redact_hook_that_is_not_a_callable_is_refused_when_decorating(redact: Any) -> None:
    with pytest.raises(ImproperlyConfigured, match="redact"):
        idempotent_task(redact=redact)


def test_misuse_is_refused_when_decorating() -> None:
    with pytest.raises(ImproperlyConfigured, match="must be a callable"):
        idempotent_task(key="id")  # type: ignore[arg-type]
    with pytest.raises(ImproperlyConfigured, match="mode must be one of"):
        idempotent_task(mode="optimistic")

    async def coroutine() -> None:
        pass

    with pytest.raises(ImproperlyConfigured, match="coroutine"):
        idempotent_task(coroutine)


@pytest.mark.parametrize(
    "task", [tasks.by_message, tasks.django_by_event], ids=["celery", "django-tasks"]
)
def test_placing_it_above_the_task_decorator_is_refused(task: Any) -> None:
    with pytest.raises(ImproperlyConfigured, match="place it under the task decorator"):
        idempotent_task(task)


# System checks --------------------------------------------------------------


@pytest.fixture
def testapp_is_current() -> Iterator[Celery]:
    previous = current_app._get_current_object()
    tasks.celery_app.set_current()
    yield tasks.celery_app
    previous.set_current()


def test_tasks_a_worker_crash_would_lose_are_warned_about(testapp_is_current: Celery) -> None:
    messages = {
        (message.id, message.obj)
        for message in run_checks(databases=["default"])
        if message.id in {"django_idempotency.W005", "django_idempotency.W006"}
    }

    # Not the unprotected task, nor those with acks_late and reject_on_worker_lost.
    assert messages == {
        ("django_idempotency.W005", "testapp.acks_early"),
        ("django_idempotency.W006", "testapp.lost_on_worker_loss"),
    }


def test_the_task_checks_are_quiet_without_idempotent_tasks() -> None:
    app = Celery("quiet", set_as_current=False)
    app.task(name="quiet.unprotected", shared=False, acks_late=False)(tasks.book)
    previous = current_app._get_current_object()
    app.set_current()
    try:
        ids = {message.id for message in run_checks(databases=["default"])}
    finally:
        previous.set_current()

    assert not ids & {"django_idempotency.W005", "django_idempotency.W006"}


# The outbox's Celery sender -------------------------------------------------


class Message:
    """What the outbox relay hands its sender (the attributes of OutboxMessage)."""

    def __init__(self, topic: str, payload: dict[str, Any]) -> None:
        self.id = uuid.uuid4()
        self.topic = topic
        self.payload = payload


def test_an_outbox_message_is_published_with_its_id_as_the_task_id(
    testapp_is_current: Celery,
) -> None:
    message = Message("testapp.by_message", {"item": "coffee"})

    send_outbox_message(message)

    with Connection("memory://") as connection:
        queue = connection.SimpleQueue("celery")
        received = queue.get(timeout=1)
        received.ack()
        queue.close()
    assert received.headers["id"] == str(message.id)
    assert received.headers["task"] == "testapp.by_message"
    assert received.payload[1] == {"item": "coffee"}


def test_the_consumer_of_an_outbox_message_runs_it_once_per_message_id() -> None:
    message = Message("testapp.by_message", {"item": "coffee"})

    for _ in range(2):  # the relay publishes at least once
        tasks.by_message.apply(kwargs=message.payload, task_id=str(message.id)).get()

    assert items() == ["coffee"]


# Django's tasks -------------------------------------------------------------


def test_a_django_task_with_its_context_is_keyed_by_its_result_id() -> None:
    result = tasks.django_by_result.enqueue("coffee")

    key = IdempotencyKey.objects.get()
    assert (key.key, key.scope) == (
        str(result.id),
        "task:tests.testapp.tasks.django_by_result",
    )
    assert result.return_value == {"order": Order.objects.get().pk}


def test_a_django_task_keyed_by_an_event_runs_once(runs: dict[str, int]) -> None:
    first = tasks.django_by_event.enqueue({"id": "evt_1"})
    again = tasks.django_by_event.enqueue({"id": "evt_1"})

    assert items() == ["evt_1"]
    assert first.return_value == again.return_value
    assert runs == {"executed": 1, "replayed": 1}


def test_a_django_task_without_context_or_key_is_refused() -> None:
    result = tasks.django_without_key.enqueue("coffee")

    assert result.status == "FAILED"
    assert result.errors[0].exception_class is KeyMissing
    assert items() == []


def test_a_django_task_stores_what_its_redact_hook_keeps() -> None:
    result = tasks.django_redacted.enqueue("coffee", "ann@example.com")

    assert result.return_value == {"order": Order.objects.get().pk, "email": "ann@example.com"}
    assert b"ann@example.com" not in stored_body()
    assert json.loads(stored_body()) == {"order": Order.objects.get().pk}
