"""Where claims and outcomes are kept.

A store is named by an alias in ``IDEMPOTENCY_STORES``; its ``BACKEND`` is the
dotted path of a :class:`Store` subclass and its ``OPTIONS`` are passed to it
as keyword arguments.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from django_idempotency.conf import app_settings

if TYPE_CHECKING:
    from django_idempotency.engine import Call, Claim, Policy, Snapshot
    from django_idempotency.sealing import Resealing


class Store:
    """The operations the engine needs. Subclasses implement them atomically."""

    #: Whether the ``atomic`` mode (one transaction around the view) is possible.
    supports_atomic = False
    #: When :meth:`claim` raises ``StoreUnavailable``: run the code unprotected
    #: (``True``) or refuse it (``False``, answered 503 over HTTP).
    fail_open = False

    def __init__(self, alias: str) -> None:
        # Subclasses take their OPTIONS as keyword-only arguments, so that a
        # misspelt option fails the system check instead of being ignored.
        self.alias = alias

    def atomic(self) -> contextlib.AbstractContextManager[Any]:
        """The transaction that spans claim, execution and completion (atomic mode)."""
        raise ImproperlyConfigured(f"The {type(self).__name__} store does not support atomic mode.")

    def rollback_pending(self) -> bool:
        """Whether the surrounding transaction is already bound to roll back."""
        return False

    def set_rollback(self) -> None:
        """Roll the transaction of :meth:`atomic` back when it ends."""

    def claim(self, call: Call, policy: Policy) -> Claim:
        """Claim ``call``'s key, or return its stored outcome.

        Raises :class:`~django_idempotency.exceptions.RequestInProgress` while
        another claim holds the key and
        :class:`~django_idempotency.exceptions.FingerprintMismatch` when the key
        belongs to a different request.
        """
        raise NotImplementedError

    def complete(self, claim: Claim, snapshot: Snapshot, policy: Policy) -> bool:
        """Store the outcome if ``claim`` still owns the key; say whether it did."""
        raise NotImplementedError

    def release(self, claim: Claim) -> None:
        """Free the key if ``claim`` still owns it."""
        raise NotImplementedError

    def erase(self, scope: str, *, dry_run: bool = False, batch_size: int = 1000) -> int:
        """Delete every key of ``scope``, whatever its state; return how many (there were)."""
        raise NotImplementedError(f"The {type(self).__name__} store cannot erase by scope.")

    def reseal(self, *, dry_run: bool = False, batch_size: int = 1000) -> Resealing:
        """Encrypt every stored outcome with the newest key (see :mod:`..sealing`)."""
        raise NotImplementedError(f"The {type(self).__name__} store cannot re-encrypt.")


def get_store(alias: str) -> Store:
    """The store configured under ``alias`` in ``IDEMPOTENCY_STORES``."""
    try:
        config = app_settings.STORES[alias]
    except KeyError:
        raise ImproperlyConfigured(f"No idempotency store is configured as {alias!r}.") from None
    backend = import_string(config["BACKEND"])
    store: Store = backend(alias, **config.get("OPTIONS", {}))
    return store
