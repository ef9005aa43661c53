"""The shop's queue consumer: "payment captured" events from the payment provider.

Queues deliver at least once: a message comes again after a worker crashed, a
broker failed over, or an acknowledgement got lost, and two workers may get
the same message at the same moment. Booking the money is not safe to repeat
(``LedgerEntry`` rows are only added), so ``on_payment_captured`` runs once per
message id and answers repeats with the result it stored the first time.

On the database store the function runs in ``atomic`` mode: its ledger entry
and the record of the message id commit in one transaction (the inbox
pattern). A worker that dies halfway leaves neither, so the redelivery books
the money cleanly; an exception frees the id in the same way.

``tasks.payment_captured`` is the same consumer as a Celery task fed by a
broker (RabbitMQ or Redis); ``manage.py consume_payment_events`` feeds
``on_payment_captured`` JSON lines, without a broker. Both record message ids
in the scope ``"payments"`` with the message as fingerprint, so a message
delivered through both is booked once.
"""

from __future__ import annotations

from typing import Any

from django.db.models import Sum

from django_idempotency.decorators import idempotent_function
from example_project.shop.models import LedgerEntry, Payment


class InvalidMessage(ValueError):
    """A message that no redelivery can make right: dead-letter it."""


def message_id(message: dict[str, Any]) -> Any:
    return message["id"]


def whole_message(message: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint: the same id with another message is a mismatch."""
    return message


def book_capture(message: dict[str, Any]) -> dict[str, Any]:
    """Book the captured amount of a payment in the ledger (unprotected: see below).

    ``message`` is ``{"id": ..., "payment": <charge reference>, "amount_cents": ...}``.
    Returns what was booked. Raises ``Payment.DoesNotExist`` for a payment not
    (yet) in the database, ``InvalidMessage`` for a message no retry can fix.
    """
    reference, amount_cents = _capture_of(message)
    # Locked so that two captures of one payment cannot both pass the check.
    payment = Payment.objects.select_for_update().get(reference=reference)
    captured = _captured_cents(payment)
    if captured + amount_cents > payment.amount_cents:
        raise InvalidMessage(
            f"capturing {amount_cents} cents would exceed the payment {reference}: "
            f"{captured} of {payment.amount_cents} cents are already captured"
        )
    entry = LedgerEntry.objects.create(payment=payment, amount_cents=amount_cents)
    return {
        "payment": payment.reference,
        "ledger_entry": entry.pk,
        "amount_cents": amount_cents,
        "captured_cents": captured + amount_cents,
    }


# wait=10: a duplicate delivered while the first is being booked waits for it
# (up to 10 seconds) and returns its result, instead of failing at once.
@idempotent_function(key=message_id, scope="payments", fingerprint=whole_message, wait=10)
def on_payment_captured(message: dict[str, Any]) -> dict[str, Any]:
    """``book_capture``, once per message id: a repeat returns the stored result.

    A payment not (yet) in the database raises ``Payment.DoesNotExist`` and
    leaves the id free, so a later redelivery books it.
    """
    return book_capture(message)


def _capture_of(message: dict[str, Any]) -> tuple[str, int]:
    reference, amount_cents = message.get("payment"), message.get("amount_cents")
    if not isinstance(reference, str) or not reference:
        raise InvalidMessage('"payment" must be the reference of a charge')
    if not isinstance(amount_cents, int) or isinstance(amount_cents, bool) or amount_cents < 1:
        raise InvalidMessage('"amount_cents" must be a positive integer')
    return reference, amount_cents


def _captured_cents(payment: Payment) -> int:
    total: int | None = payment.ledger_entries.aggregate(total=Sum("amount_cents"))["total"]
    return total or 0
