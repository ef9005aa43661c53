"""Erasing a person's stored responses on request (a user-deletion flow).

Stored responses can hold personal data until they expire, and so can what
their executions recorded: step results and outbox message payloads.
:func:`erase_scope` deletes every key of a scope, with its stored response,
its steps and its sent outbox messages, from the stores at once: call it
where an account is deleted, or run ``manage.py erase_idempotency_keys
--scope ...``. Scopes hold identifiers (``user:42``), never personal data, so
naming one is safe to log.

Outbox messages not yet sent are kept by default and counted
(:attr:`Erasure.kept_pending`): each is a follow-up the work still owes (a
confirmation, a refund, a shipment), and deleting it drops that effect
without a trace. Erase again once they are delivered, or pass
``include_pending=True`` to delete them undelivered.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.contrib.auth.base_user import AbstractBaseUser
from django.core.exceptions import ImproperlyConfigured
from django.db import connections

from django_idempotency.conf import app_settings
from django_idempotency.policies import fit_scope
from django_idempotency.scopes import scope_of_user
from django_idempotency.stores import build_store, get_store
from django_idempotency.stores.base import Erasure, Store
from django_idempotency.stores.database import DatabaseStore

__all__ = ["Erasure", "erase_scope", "erase_user"]


def erase_scope(
    scope: str,
    *,
    stores: Iterable[str] | None = None,
    dry_run: bool = False,
    batch_size: int = 1000,
    include_pending: bool = False,
    database: str | None = None,
) -> dict[str, Erasure]:
    """Delete every key of ``scope`` from ``stores`` (default: all configured).

    Returns what was erased (with ``dry_run``: found) per store alias.
    Keys in progress are deleted too; a request of the scope that is running
    at that moment may still store its response afterwards, so stop the
    person's requests (deactivate the account) first. ``database``: for
    database stores, the database alias to erase in instead of the store's
    (raises ``ImproperlyConfigured`` for an unknown one).
    """
    if database is not None and database not in connections.settings:
        known = ", ".join(sorted(connections.settings))
        raise ImproperlyConfigured(f"Unknown database {database!r}; configured: {known}.")
    aliases = list(app_settings.STORES) if stores is None else list(stores)
    stored_scope = fit_scope(scope)
    return {
        alias: _store(alias, database).erase(
            stored_scope, dry_run=dry_run, batch_size=batch_size, include_pending=include_pending
        )
        for alias in aliases
    }


def erase_user(
    user: AbstractBaseUser, *, dry_run: bool = False, include_pending: bool = False
) -> dict[str, Erasure]:
    """:func:`erase_scope` for ``user``'s keys under the default scope (``user:<pk>``).

    With your own ``IDEMPOTENCY_SCOPE`` (a tenant, an API client), call
    :func:`erase_scope` with the scopes your function gives that person.
    """
    return erase_scope(scope_of_user(user), dry_run=dry_run, include_pending=include_pending)


def _store(alias: str, database: str | None) -> Store:
    if database is None:
        return get_store(alias)
    # A store of its own: the shared one must not change database.
    store = build_store(alias)
    if isinstance(store, DatabaseStore):
        store.database = database
    return store
