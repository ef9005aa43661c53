"""The shop's Celery tasks: the "payment captured" consumer, fed by a broker.

The payment provider (or the shop itself, through the outbox) publishes
``shop.payment_captured`` with the message as its argument. The task runs
once per message id whatever the broker does: redelivery after a worker
died (``acks_late`` and ``reject_on_worker_lost``: the message is
acknowledged only after the booking committed), the same event published
twice, two workers given it at once (the second waits up to 10 seconds and
returns the first one's result, or is retried later).
"""

from __future__ import annotations

from typing import Any

from celery import shared_task

from django_idempotency.tasks import idempotent_task
from example_project.shop.consumers import book_capture, message_id, whole_message
from example_project.shop.models import Payment


@shared_task(
    name="shop.payment_captured",
    acks_late=True,
    reject_on_worker_lost=True,
    # A capture can arrive before its payment is committed: try again later.
    autoretry_for=(Payment.DoesNotExist,),
    retry_backoff=True,
    max_retries=8,
)
@idempotent_task(key=message_id, scope="payments", fingerprint=whole_message, wait=10)
def payment_captured(message: dict[str, Any]) -> dict[str, Any]:
    """Book a "payment captured" message once per message id (see consumers.py)."""
    return book_capture(message)
