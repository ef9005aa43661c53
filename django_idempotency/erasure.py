"""Erasing a person's stored responses on request (a user-deletion flow).

Stored responses can hold personal data until they expire. :func:`erase_scope`
deletes every key of a scope, with its stored response, from the stores at
once: call it where an account is deleted, or run
``manage.py erase_idempotency_keys --scope ...``. Scopes hold identifiers
(``user:42``), never personal data, so naming one is safe to log.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.contrib.auth.base_user import AbstractBaseUser

from django_idempotency.conf import app_settings
from django_idempotency.policies import fit_scope
from django_idempotency.scopes import scope_of_user
from django_idempotency.stores import get_store


def erase_scope(
    scope: str,
    *,
    stores: Iterable[str] | None = None,
    dry_run: bool = False,
    batch_size: int = 1000,
) -> dict[str, int]:
    """Delete every key of ``scope`` from ``stores`` (default: all configured).

    Returns the number erased (with ``dry_run``: found) per store alias.
    Keys in progress are deleted too; a request of the scope that is running
    at that moment may still store its response afterwards, so stop the
    person's requests (deactivate the account) first.
    """
    aliases = list(app_settings.STORES) if stores is None else list(stores)
    stored_scope = fit_scope(scope)
    return {
        alias: get_store(alias).erase(stored_scope, dry_run=dry_run, batch_size=batch_size)
        for alias in aliases
    }


def erase_user(user: AbstractBaseUser, *, dry_run: bool = False) -> dict[str, int]:
    """:func:`erase_scope` for ``user``'s keys under the default scope (``user:<pk>``).

    With your own ``IDEMPOTENCY_SCOPE`` (a tenant, an API client), call
    :func:`erase_scope` with the scopes your function gives that person.
    """
    return erase_scope(scope_of_user(user), dry_run=dry_run)
