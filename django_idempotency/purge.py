"""Which stored keys may go, and deleting them in short batches.

A key is *live* while a request may still replay it or is still running it:
until it expires, and for as long as an in-progress claim holds its lease
(mirroring :class:`~django_idempotency.stores.database.DatabaseStore`). Only
keys that are not live are ever deleted here, and the condition is part of the
``DELETE`` itself, so a key that a request claims again concurrently survives.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from django.db import connections, transaction
from django.db.models import Q, QuerySet

from django_idempotency.models import IdempotencyKey, OutboxMessage

State = IdempotencyKey.State

#: How long past the end of its lease an in-progress claim counts as stale by default.
DEFAULT_STALE_GRACE = timedelta(hours=1)
DEFAULT_BATCH_SIZE = 5000


def live_lease(now: datetime) -> Q:
    """In-progress claims whose lease still runs: their worker may yet complete them."""
    return Q(state=State.IN_PROGRESS, locked_until__gt=now)


def expired(now: datetime, older_than: timedelta = timedelta(0)) -> Q:
    """Keys that expired more than ``older_than`` before ``now`` and hold no live lease."""
    return Q(expires__lte=now - older_than) & ~live_lease(now)


def stale(now: datetime, grace: timedelta = DEFAULT_STALE_GRACE) -> Q:
    """In-progress claims whose lease ended more than ``grace`` before ``now``.

    Such a claim's worker died or stalled; the next request with its key would
    take it over anyway. Atomic-mode claims have no lease and are never stale:
    other transactions do not see them until they commit, completed.
    """
    return Q(state=State.IN_PROGRESS, locked_until__lte=now - grace)


def expired_steps(now: datetime, older_than: timedelta = timedelta(0)) -> Q:
    """Steps past their retention: their key is new again, and so are they."""
    return Q(expires__lte=now - older_than)


def sent_messages(now: datetime, retention: timedelta) -> Q:
    """Outbox messages sent more than ``retention`` ago. Unsent ones are never purged."""
    return Q(state=OutboxMessage.State.SENT, sent__lte=now - retention)


def delete_in_batches(
    queryset: QuerySet[Any], batch_size: int = DEFAULT_BATCH_SIZE, order_by: str = "expires"
) -> Iterator[int]:
    """Delete the rows of ``queryset``, ``batch_size`` at a time; yield each batch's count.

    Each batch is its own short transaction: it locks the oldest matching
    rows (by the ``expires`` index) and deletes them by primary key. Where the
    database can, rows that a request holds locked are skipped rather than
    waited for; they are picked up by a later run if they are still expired.
    """
    if batch_size <= 0:
        raise ValueError("batch_size must be positive.")
    database = queryset.db
    skip_locked = connections[database].features.has_select_for_update_skip_locked
    while True:
        with transaction.atomic(using=database):
            batch = list(
                queryset.select_for_update(skip_locked=skip_locked)
                .order_by(order_by)
                .values_list("pk", flat=True)[:batch_size]
            )
            if not batch:
                return
            # The filter is repeated in the DELETE: a row taken over since the
            # SELECT (where the database could not lock it) no longer matches.
            deleted, _ = queryset.filter(pk__in=batch).delete()
        yield deleted
        if len(batch) < batch_size:
            return
