"""Celery integration (the ``[celery]`` extra): idempotent tasks and the outbox sender.

``idempotent_task`` goes under ``@app.task`` / ``@shared_task``; see
:mod:`django_idempotency.tasks`. Run idempotent tasks with
``acks_late=True`` and ``reject_on_worker_lost=True``: a message is then
acknowledged only after the task ran, a worker that dies mid-task gets it
delivered again, and the decorator makes that redelivery safe. The system
checks ``django_idempotency.W005`` and ``W006`` warn about tasks set up
otherwise.
"""

from __future__ import annotations

from typing import Any, Protocol
from uuid import UUID

try:
    from celery import current_app
except ImportError as exc:  # pragma: no cover - exercised without the extra only
    raise ImportError(
        "django_idempotency.celery needs Celery: pip install 'django-idempotency[celery]'."
    ) from exc

from django_idempotency.tasks import idempotent_task

__all__ = ["idempotent_task", "send_outbox_message"]


class OutboxMessage(Protocol):
    """What the outbox relay hands its sender."""

    id: UUID | str
    topic: str
    payload: dict[str, Any]


def send_outbox_message(message: OutboxMessage) -> None:
    """Publish an outbox message as the Celery task named by its topic.

    For ``IDEMPOTENCY_OUTBOX_SENDER = "django_idempotency.celery.send_outbox_message"``.
    The payload becomes the task's keyword arguments and the message id its
    task id: the relay may publish a message more than once (it publishes at
    least once), and an ``@idempotent_task`` keyed by the task id (the default)
    runs it once. Raises when the broker does not take the message, so the
    relay tries again later.
    """
    current_app.send_task(message.topic, kwargs=dict(message.payload), task_id=str(message.id))
