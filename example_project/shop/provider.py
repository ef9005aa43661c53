"""A stand-in for an external payment provider that honours idempotency keys.

Real providers answer over the network, slowly and sometimes not at all, and
their charges do not roll back with the shop's transactions. This fake keeps
its charges in its own table (``ProviderCharge``), written through a database
connection of its own in autocommit: a charge stays made whatever becomes of
the shop's transaction, as it would at a real provider.

Like Stripe, a charge requested with an ``idempotency_key`` that was already
used returns the first charge instead of charging again.
``SHOP_PROVIDER_DELAY`` (seconds) imitates the latency of the charge itself.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, IntegrityError, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.dispatch import Signal
from django.utils import timezone

from example_project.shop.models import ProviderCharge

#: Sent after the provider charged (or found the charge of a repeated key):
#: ``reference`` and ``idempotency_key``. The multi-process tests hold here.
charged = Signal()


class ProviderError(Exception):
    """The provider refused the charge or could not be reached; nothing was charged."""


def charge(amount_cents: int, idempotency_key: str | None = None) -> str:
    """Charge ``amount_cents`` and return the provider's reference for the charge.

    With an ``idempotency_key`` already used, nothing is charged: the first
    charge's reference is returned (or :class:`ProviderError` raised if that
    charge was for another amount, as Stripe refuses a key reused with other
    parameters).
    """
    delay = float(getattr(settings, "SHOP_PROVIDER_DELAY", 0))
    if delay > 0:
        time.sleep(delay)
    with _provider_connection() as connection:
        reference = _charge(connection, amount_cents, idempotency_key)
    charged.send(sender=ProviderCharge, reference=reference, idempotency_key=idempotency_key)
    return reference


def _charge(connection: BaseDatabaseWrapper, amount_cents: int, key: str | None) -> str:
    table = connection.ops.quote_name(ProviderCharge._meta.db_table)
    reference = f"ch_{uuid.uuid4().hex[:20]}"
    now = connection.ops.adapt_datetimefield_value(timezone.now())
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {table} (reference, idempotency_key, amount_cents, requests, created)"
                " VALUES (%s, %s, %s, 1, %s)",
                [reference, key, amount_cents, now],
            )
        return reference
    except IntegrityError:
        if key is None:
            raise
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET requests = requests + 1 WHERE idempotency_key = %s", [key]
        )
        cursor.execute(
            f"SELECT reference, amount_cents FROM {table} WHERE idempotency_key = %s", [key]
        )
        first_reference, first_amount = cursor.fetchone()
    if first_amount != amount_cents:
        raise ProviderError(
            f"idempotency key reused for {amount_cents} cents; it charged {first_amount} cents"
        )
    return str(first_reference)


@contextmanager
def _provider_connection() -> Iterator[BaseDatabaseWrapper]:
    """A connection of the provider's own, in autocommit, closed after use."""
    connection = connections.create_connection(DEFAULT_DB_ALIAS)
    try:
        yield connection
    finally:
        connection.close()
