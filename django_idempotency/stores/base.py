"""The interface every store implements; the engine calls nothing else."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.core.exceptions import ImproperlyConfigured

from django_idempotency.protocol import Call, Claim, Execute, Policy, Snapshot

if TYPE_CHECKING:
    from django_idempotency.sealing import Resealing


@dataclass(frozen=True)
class Erasure:
    """What erasing a scope from a store did (or, on a dry run, would do)."""

    #: Keys erased, with their stored responses.
    keys: int = 0
    #: Recorded step results erased (database store).
    steps: int = 0
    #: Outbox messages erased: those already sent, and pending ones if asked.
    messages: int = 0
    #: Outbox messages not yet delivered, kept (a follow-up still owed).
    kept_pending: int = 0


class Store:
    """The operations the engine needs. Subclasses implement them atomically.

    A store is built once per alias (see :func:`~django_idempotency.stores.get_store`)
    and shared by every thread: keep per-request state out of it.
    """

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
        """Claim ``call``'s key (:class:`Execute`), or return its stored outcome (:class:`Replay`).

        ``policy.mode`` is decided (never ``None``). Raises
        :class:`~django_idempotency.exceptions.RequestInProgress` while another
        claim holds the key and
        :class:`~django_idempotency.exceptions.FingerprintMismatch` when the key
        belongs to a different request. A claim that took an abandoned key
        over says so (``Execute.takeover``); the engine reports it.
        """
        raise NotImplementedError

    def complete(self, claim: Execute, snapshot: Snapshot, policy: Policy) -> bool:
        """Store the outcome if ``claim`` still owns the key; say whether it did."""
        raise NotImplementedError

    def release(self, claim: Execute) -> None:
        """Free the key if ``claim`` still owns it."""
        raise NotImplementedError

    def erase(
        self,
        scope: str,
        *,
        dry_run: bool = False,
        batch_size: int = 1000,
        include_pending: bool = False,
    ) -> Erasure:
        """Delete every key of ``scope``, whatever its state, and what its executions recorded.

        Outbox messages not yet sent are kept unless ``include_pending``.
        """
        raise NotImplementedError(f"The {type(self).__name__} store cannot erase by scope.")

    def reseal(self, *, dry_run: bool = False, batch_size: int = 1000) -> Resealing:
        """Encrypt every stored outcome with the newest key (see :mod:`..sealing`)."""
        raise NotImplementedError(f"The {type(self).__name__} store cannot re-encrypt.")
