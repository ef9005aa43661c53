"""The transactional outbox: follow-up messages written with the work they follow.

:func:`enqueue` adds an :class:`~django_idempotency.models.OutboxMessage` in
the current transaction: inside a step (its transaction), inside an
``atomic``-mode view or function (the transaction that stores the outcome),
or inside any ``transaction.atomic`` block of your own. The message exists if
and only if that transaction commits, and a replay never enqueues again,
because a replay does not run the code.

:func:`relay` hands due messages to the sender (``IDEMPOTENCY_OUTBOX_SENDER``,
called as ``sender(message)``; it returns on success and raises on failure),
at least once each: a relay that dies after sending and before marking the
message sent leaves it to be sent again. Consumers deduplicate on
``message.id`` (an ``idempotent_function`` keyed by it does exactly that).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db import connections, router, transaction
from django.db.models import F
from django.utils import timezone

from django_idempotency import engine, sealing, workflow
from django_idempotency.conf import app_settings, load_callable
from django_idempotency.exceptions import SnapshotUnreadable
from django_idempotency.models import OutboxMessage
from django_idempotency.protocol import ATOMIC

logger = logging.getLogger("django_idempotency")

Sender = Callable[[OutboxMessage], object]
State = OutboxMessage.State

MAX_TOPIC_LENGTH = 200
#: First pause after a failed send; it doubles per attempt up to MAX_BACKOFF.
FIRST_BACKOFF = timedelta(seconds=10)
MAX_BACKOFF = timedelta(hours=1)
#: How long a relay holds the messages it took before another relay may take them.
DEFAULT_CLAIM_TIMEOUT = timedelta(minutes=5)


class OutboxError(ValueError):
    """A message that cannot be enqueued: bad topic or payload, or nowhere safe to write it."""


def enqueue(topic: str, payload: dict[str, Any]) -> OutboxMessage:
    """Write a message for ``topic`` in the current transaction; one INSERT.

    ``payload`` is a JSON-serialisable dict. Inside protected code in
    ``lease`` mode there is no transaction to join outside a step: enqueue
    from within a :func:`~django_idempotency.workflow.step`.
    """
    _check(topic, payload)
    execution = engine.current_execution()
    if execution is None:
        database = router.db_for_write(OutboxMessage)
        message = OutboxMessage(topic=topic, payload=payload)
    else:
        database = workflow.database_of(execution, f"enqueue {topic}")
        step = workflow.running_step(execution) or ""
        if not step and execution.policy.mode != ATOMIC:
            raise OutboxError(
                f"enqueue({topic!r}) in lease mode must run inside a step: outside one, "
                "the message would commit at once, whatever becomes of the work it follows."
            )
        message = OutboxMessage(
            topic=topic,
            payload=payload,
            scope=execution.call.scope,
            idempotency_key=execution.call.key,
            step=step,
        )
    # Sealed when encryption is on (the payload may name a person), bound to
    # the message's id and topic; the caller keeps the payload in clear.
    message.payload = seal_payload(message.pk, topic, payload)
    message.save(using=database, force_insert=True)
    message.payload = payload
    return message


def seal_payload(message_id: Any, topic: str, payload: dict[str, Any]) -> Any:
    """``payload`` as the column stores it: a dict, or a sealed string with encryption on."""
    if not sealing.enabled():
        return payload
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return sealing.seal_text(text, sealing.message_context(message_id, topic))


def open_payload(message: OutboxMessage) -> dict[str, Any]:
    """The payload of a stored message in clear; raises ``SnapshotUnreadable`` (logged).

    A sealed payload that no configured key opens (altered, moved from another
    message, its key removed), or a clear one while encryption is on, is refused.
    """
    stored = message.payload
    text = stored if isinstance(stored, str) else json.dumps(stored)
    what = f"the payload of outbox message {message.pk} ({message.topic})"
    payload = json.loads(sealing.unseal_text(text, payload_context(message), what))
    if not isinstance(payload, dict):
        raise SnapshotUnreadable(f"The payload of outbox message {message.pk} is not a dict.")
    return payload


def payload_context(message: OutboxMessage) -> tuple[str, ...]:
    return sealing.message_context(message.pk, message.topic)


def _check(topic: Any, payload: Any) -> None:
    if not isinstance(topic, str) or not topic or len(topic) > MAX_TOPIC_LENGTH:
        raise OutboxError(
            f"An outbox topic must be a non-empty string of at most {MAX_TOPIC_LENGTH} "
            f"characters, not {topic!r:.60}."
        )
    if not isinstance(payload, dict):
        raise OutboxError(f"An outbox payload must be a dict, not {type(payload).__name__}.")
    try:
        json.dumps(payload)
    except (TypeError, ValueError) as exc:
        raise OutboxError(f"The payload of {topic!r} must be JSON-serialisable: {exc}") from exc


def get_sender() -> Sender:
    """The callable ``IDEMPOTENCY_OUTBOX_SENDER`` names."""
    path = app_settings.OUTBOX_SENDER
    if not path:
        raise ImproperlyConfigured(
            "IDEMPOTENCY_OUTBOX_SENDER is not set: name the callable that sends an outbox "
            'message, e.g. "myproject.queues.send_outbox_message".'
        )
    sender: Sender = load_callable(path)
    return sender


def backoff(attempts: int) -> timedelta:
    """The pause before the next send after ``attempts`` failed ones."""
    pause: timedelta = FIRST_BACKOFF * 2 ** max(0, min(attempts - 1, 20))
    return min(pause, MAX_BACKOFF)


@dataclass
class Report:
    """What one :func:`relay` pass did."""

    sent: int = 0
    failed: int = 0
    #: Taken but left for a later pass because the relay was asked to stop.
    returned: int = 0

    @property
    def taken(self) -> int:
        return self.sent + self.failed + self.returned


def relay(
    sender: Sender,
    *,
    batch_size: int = 100,
    claim_timeout: timedelta = DEFAULT_CLAIM_TIMEOUT,
    database: str | None = None,
    stop: threading.Event | None = None,
) -> Report:
    """Send up to ``batch_size`` due messages, oldest first; mark each sent or failed.

    The batch is taken in one short transaction (``SKIP LOCKED`` where the
    database has it, so relays running side by side share the work) by moving
    its messages' ``next_attempt`` past ``claim_timeout``; they are then sent
    outside any transaction. A relay killed meanwhile leaves them to be taken
    again once ``claim_timeout`` has passed: delivery is at least once.
    """
    if batch_size <= 0:
        raise ValueError("batch_size must be positive.")
    database = database or router.db_for_write(OutboxMessage)
    report = Report()
    for message in _take(database, batch_size, claim_timeout):
        if stop is not None and stop.is_set():
            _return(database, message)
            report.returned += 1
        elif _send(database, sender, message):
            report.sent += 1
        else:
            report.failed += 1
    return report


def _take(database: str, batch_size: int, claim_timeout: timedelta) -> list[OutboxMessage]:
    skip_locked = connections[database].features.has_select_for_update_skip_locked
    now = timezone.now()
    with transaction.atomic(using=database):
        due = (
            OutboxMessage.objects.using(database)
            .filter(state=State.PENDING, next_attempt__lte=now)
            .order_by("next_attempt")
            .select_for_update(skip_locked=skip_locked)
        )
        messages = list(due[:batch_size])
        if messages:
            OutboxMessage.objects.using(database).filter(
                pk__in=[message.pk for message in messages]
            ).update(next_attempt=now + claim_timeout, attempts=F("attempts") + 1)
    for message in messages:
        message.attempts += 1
    return messages


def _send(database: str, sender: Sender, message: OutboxMessage) -> bool:
    try:
        message.payload = open_payload(message)
        sender(message)
    except Exception as exc:
        pause = backoff(message.attempts)
        logger.warning(
            "Outbox message %s (%s) failed, attempt %d; next in %s: %r",
            message.pk,
            message.topic,
            message.attempts,
            pause,
            exc,
        )
        OutboxMessage.objects.using(database).filter(pk=message.pk).update(
            last_error=f"{type(exc).__name__}: {exc}"[:2000],
            next_attempt=timezone.now() + pause,
        )
        return False
    OutboxMessage.objects.using(database).filter(pk=message.pk).update(
        state=State.SENT, sent=timezone.now()
    )
    return True


def _return(database: str, message: OutboxMessage) -> None:
    """Give back a message taken but not sent, due at once for the next relay."""
    OutboxMessage.objects.using(database).filter(pk=message.pk, state=State.PENDING).update(
        next_attempt=timezone.now(), attempts=F("attempts") - 1
    )


def retry_now(database: str, ids: list[Any]) -> int:
    """Make pending messages due at once (the admin's "retry now")."""
    return (
        OutboxMessage.objects.using(database)
        .filter(pk__in=ids, state=State.PENDING)
        .update(next_attempt=timezone.now())
    )


def log_sender(message: OutboxMessage) -> None:
    """A sender for development: log the message and count it as sent."""
    logger.info("Outbox message %s on %r: %s", message.pk, message.topic, message.payload)
