"""The shop's outbox sender: where ``relay_idempotency_outbox`` delivers messages.

In production this would publish to a broker (a Celery task, a Kafka topic);
the example delivers in-process to the consumer the broker would feed, with
the message id as the dedup key: a message delivered twice (the relay died
after sending, before marking it sent) is booked once.
"""

from __future__ import annotations

from django_idempotency.models import OutboxMessage
from example_project.shop.consumers import on_payment_captured


def deliver(message: OutboxMessage) -> None:
    """Send one outbox message; raise if it could not be handled (it is retried)."""
    if message.topic == "payment.captured":
        on_payment_captured({"id": str(message.id), **message.payload})
        return
    raise ValueError(f"no consumer for topic {message.topic!r}")
