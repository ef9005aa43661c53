"""Idempotent tasks of the test suite: Celery's (on an app of their own) and Django's.

Each books one ``Order`` whose ``item`` names what it was given, so the tests
count executions in the database.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, Task

from django_idempotency.tasks import idempotent_task
from tests.testapp.models import Order

try:
    from django.tasks import task
except ImportError:  # Django 5.2: the django-tasks backport
    from django_tasks import task  # type: ignore[no-redef]

#: Never connected to: the in-memory transport, for publishing in tests.
celery_app = Celery("testapp", broker="memory://", set_as_current=False)
celery_app.conf.update(task_acks_late=True, task_reject_on_worker_lost=True)
failures: list[Exception] = []


def book(item: str) -> dict[str, Any]:
    if failures:
        raise failures.pop()
    return {"order": Order.objects.create(item=item).pk}


@celery_app.task(name="testapp.by_message", shared=False)
@idempotent_task
def by_message(item: str) -> dict[str, Any]:
    return book(item)


@celery_app.task(name="testapp.by_event", shared=False)
@idempotent_task(key=lambda event: event["id"])
def by_event(event: dict[str, Any]) -> dict[str, Any]:
    return book(event["id"])


@celery_app.task(name="testapp.bound", shared=False, bind=True)
@idempotent_task(key=lambda item: item, scope="orders", mode="lease")
def bound(self: Task, item: str) -> dict[str, Any]:  # type: ignore[type-arg]
    return {**book(item), "task": self.name}


def order_only(result: dict[str, Any]) -> dict[str, Any]:
    """The ``redact`` hook of the redacted tasks: keep the order, drop the customer."""
    return {"order": result["order"]}


@celery_app.task(name="testapp.redacted", shared=False)
@idempotent_task(redact=order_only)
def redacted(item: str, email: str) -> dict[str, Any]:
    return {**book(item), "email": email}


@celery_app.task(name="testapp.acks_early", shared=False, acks_late=False)
@idempotent_task
def acks_early(item: str) -> dict[str, Any]:
    return book(item)


@celery_app.task(name="testapp.lost_on_worker_loss", shared=False, reject_on_worker_lost=False)
@idempotent_task
def lost_on_worker_loss(item: str) -> dict[str, Any]:
    return book(item)


@celery_app.task(name="testapp.unprotected", shared=False, acks_late=False)
def unprotected(item: str) -> dict[str, Any]:
    return book(item)


@task(takes_context=True)
@idempotent_task
def django_by_result(context: Any, item: str) -> dict[str, Any]:
    return book(item)


@task()
@idempotent_task(key=lambda event: event["id"])
def django_by_event(event: dict[str, Any]) -> dict[str, Any]:
    return book(event["id"])


@task()
@idempotent_task
def django_without_key(item: str) -> dict[str, Any]:
    return book(item)


@task(takes_context=True)
@idempotent_task(redact="tests.testapp.tasks.order_only")
def django_redacted(context: Any, item: str, email: str) -> dict[str, Any]:
    return {**book(item), "email": email}
