"""The idempotency protocol: claim, replay, complete, release.

The engine knows nothing of HTTP. An adapter turns its input into a
:class:`Call` and a :class:`Policy`, hands over the code to protect and a
function that concludes what of its result is kept, and gets back either
:class:`Executed` or :class:`Replayed`.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from django_idempotency import signals
from django_idempotency.exceptions import FingerprintMismatch, RequestInProgress
from django_idempotency.stores import Store, get_store

logger = logging.getLogger("django_idempotency")

T = TypeVar("T")

ATOMIC = "atomic"
LEASE = "lease"
MODES = (ATOMIC, LEASE)


@dataclass(frozen=True)
class Call:
    """One request for idempotent execution."""

    scope: str
    key: str
    fingerprint: str
    method: str = ""
    path: str = ""

    def __str__(self) -> str:
        # Keys can be secrets of sorts (guessable ones leak replays): log a prefix only.
        return f"scope={self.scope!r} key={self.key[:8]!r}…"


@dataclass(frozen=True)
class Policy:
    """How a call is protected; resolved from per-view options and settings."""

    #: ``None``: ``atomic`` where the store supports it, else ``lease``.
    mode: str | None = None
    retention: float = 86400.0
    lease: float = 30.0
    wait: float = 0.0
    store: str = "default"
    retry_after: int = 1


@dataclass(frozen=True)
class Snapshot:
    """A stored outcome: status, allow-listed headers and body."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


@dataclass(frozen=True)
class Claim:
    """The right to execute a call (``replay is None``), or its stored outcome."""

    call: Call
    token: str
    replay: Snapshot | None = None


class Discard(enum.Enum):
    """Outcomes that are not kept."""

    #: A failure: undo the transaction (atomic) and free the key, so a retry runs.
    FAILURE = "failure"
    #: A success that cannot be snapshotted: its effects stay, the key is freed.
    UNSTORABLE = "unstorable"


Conclusion = Snapshot | Discard


@dataclass(frozen=True)
class Executed(Generic[T]):
    result: T


@dataclass(frozen=True)
class Replayed:
    snapshot: Snapshot


def run(
    call: Call,
    policy: Policy,
    execute: Callable[[], T],
    conclude: Callable[[T], Conclusion],
) -> Executed[T] | Replayed:
    """Execute ``execute`` at most once per (scope, key), or replay its outcome.

    Raises :class:`RequestInProgress` or :class:`FingerprintMismatch` when the
    call must not run now; whatever ``execute`` raises propagates, and the key
    is then free again.
    """
    store = get_store(policy.store)
    if policy.mode is None:
        policy = replace(policy, mode=ATOMIC if store.supports_atomic else LEASE)
    try:
        if policy.mode == ATOMIC:
            outcome = _run_atomic(store, call, policy, execute, conclude)
        else:
            outcome = _run_lease(store, call, policy, execute, conclude)
    except RequestInProgress:
        logger.warning("Conflict: %s is in progress", call)
        signals.conflict.send(sender=type(store), call=call)
        raise
    except FingerprintMismatch:
        logger.warning("Mismatch: %s was used for a different request", call)
        signals.mismatch.send(sender=type(store), call=call)
        raise
    if isinstance(outcome, Replayed):
        logger.info("Replayed %s (status %s)", call, outcome.snapshot.status)
        signals.replayed.send(sender=type(store), call=call)
    else:
        signals.executed.send(sender=type(store), call=call)
    return outcome


def _run_atomic(
    store: Store,
    call: Call,
    policy: Policy,
    execute: Callable[[], T],
    conclude: Callable[[T], Conclusion],
) -> Executed[T] | Replayed:
    # Claim, execution and completion share one transaction: the protected
    # code's writes and the stored outcome commit together or not at all.
    with store.atomic():
        claim = store.claim(call, policy)
        if claim.replay is not None:
            return Replayed(claim.replay)
        result = execute()
        conclusion = conclude(result)
        if conclusion is Discard.FAILURE or store.rollback_pending():
            store.set_rollback()
        elif conclusion is Discard.UNSTORABLE:
            store.release(claim)
        else:
            store.complete(claim, conclusion, policy)
    return Executed(result)


def _run_lease(
    store: Store,
    call: Call,
    policy: Policy,
    execute: Callable[[], T],
    conclude: Callable[[T], Conclusion],
) -> Executed[T] | Replayed:
    claim = _claim_waiting(store, call, policy)
    if claim.replay is not None:
        return Replayed(claim.replay)
    try:
        result = execute()
        conclusion = conclude(result)
    except BaseException:
        store.release(claim)
        raise
    if isinstance(conclusion, Snapshot):
        if not store.complete(claim, conclusion, policy):
            logger.error("Lease lost: %s was taken over before it completed; not stored", call)
    else:
        store.release(claim)
    return Executed(result)


def _claim_waiting(store: Store, call: Call, policy: Policy) -> Claim:
    """Claim in lease mode, polling with backoff up to ``policy.wait`` seconds."""
    deadline = time.monotonic() + policy.wait
    delay = 0.05
    while True:
        try:
            return store.claim(call, policy)
        except RequestInProgress:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 1.0)
