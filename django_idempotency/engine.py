"""The idempotency protocol: claim, replay, complete, release.

The engine knows nothing of HTTP. An adapter turns its input into a
:class:`Call` and a :class:`Policy`, hands over the code to protect and a
function that concludes what of its result is kept, and gets back either
:class:`Executed` or :class:`Replayed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

from asgiref.sync import sync_to_async
from django.core.exceptions import ImproperlyConfigured

from django_idempotency import sealing, signals
from django_idempotency.exceptions import (
    FingerprintMismatch,
    IdempotencyError,
    RequestInProgress,
    SnapshotUnreadable,
    StoreUnavailable,
)
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
    #: Whether this claim took the key over from one whose lease had ended.
    taken_over: bool = False


#: What became of a protected call, as :data:`signals.finished` reports it.
EXECUTED = "executed"
REPLAYED = "replayed"
CONFLICT = "conflict"
MISMATCH = "mismatch"
#: Not run: the store was unavailable (fail closed) or the stored outcome unreadable.
REFUSED = "refused"
#: Run after taking over a claim whose lease had ended; its outcome is stored.
TAKEOVER = "takeover"
#: Run, but another claim took the key over before the outcome was stored.
LEASE_LOST = "lease_lost"
#: Run (or started) and nothing kept: it failed, or its outcome cannot be stored.
RELEASED = "released"
#: Run without protection: the store was unavailable and fails open.
UNPROTECTED = "unprotected"
OUTCOMES = (
    EXECUTED,
    REPLAYED,
    CONFLICT,
    MISMATCH,
    REFUSED,
    TAKEOVER,
    LEASE_LOST,
    RELEASED,
    UNPROTECTED,
)


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


@dataclass
class Guard:
    """A call inside :func:`protected`: its stored outcome, or room for a new one.

    ``claim`` is ``None`` when the store was unreachable and configured to
    fail open: the code then runs unprotected and nothing is stored.
    """

    call: Call
    claim: Claim | None
    #: What the protected code's outcome leaves behind; it sets this before the
    #: block ends. Left unset, nothing is kept.
    conclusion: Conclusion = Discard.FAILURE

    @property
    def replay(self) -> Snapshot | None:
        return None if self.claim is None else self.claim.replay


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
    with protected(call, policy) as guard:
        if guard.replay is not None:
            return Replayed(guard.replay)
        result = execute()
        guard.conclusion = conclude(result)
    return Executed(result)


@contextlib.contextmanager
def protected(call: Call, policy: Policy) -> Iterator[Guard]:
    """The protocol around a block of code, for adapters that cannot pass a callable.

    On entry the key is claimed (or its outcome found: ``guard.replay``); the
    block sets ``guard.conclusion``; on exit the outcome is stored, or the key
    freed if the block raised. In ``atomic`` mode the block runs inside the
    store's transaction.
    """
    store = get_store(policy.store)
    policy = _resolve_mode(store, policy)
    watch = _Watch(call, store, policy)
    try:
        if policy.mode == ATOMIC:
            # Claim, execution and completion share one transaction: the protected
            # code's writes and the stored outcome commit together or not at all.
            with store.atomic():
                guard = _claim_or_refuse(
                    store, call, lambda: _timed(store, "claim", store.claim, call, policy)
                )
                watch.claimed()
                yield guard
                outcome = _finish_atomic(store, guard, policy)
        else:
            guard = _claim_or_refuse(store, call, lambda: _claim_waiting(store, call, policy))
            watch.claimed()
            try:
                yield guard
            except BaseException:
                _release_quietly(store, guard)
                raise
            outcome = _finish_lease(store, guard, policy)
    except BaseException as error:
        watch.report(_failure(error))
        raise
    _report(store, guard, watch, outcome)


async def run_async(
    call: Call,
    policy: Policy,
    execute: Callable[[], Awaitable[T]],
    conclude: Callable[[T], Conclusion],
) -> Executed[T] | Replayed:
    """:func:`run` for coroutines, in ``lease`` mode only.

    A transaction cannot span an ``await`` (Django binds it to one thread), so
    ``atomic`` is refused. The store is used from a worker thread; waiting for
    an in-flight duplicate sleeps without blocking the event loop.
    """
    store = get_store(policy.store)
    if policy.mode == ATOMIC:
        raise ImproperlyConfigured(
            'Async code runs in "lease" mode: a transaction cannot span an await. '
            'Use mode="lease" (and IDEMPOTENCY_MODE = None or "lease").'
        )
    policy = replace(policy, mode=LEASE)
    watch = _Watch(call, store, policy)
    try:
        guard, done, outcome = await _protect_async(store, call, policy, execute, conclude, watch)
    except BaseException as error:
        await sync_to_async(watch.report)(_failure(error))
        raise
    await sync_to_async(_report)(store, guard, watch, outcome)
    return done


async def _protect_async(
    store: Store,
    call: Call,
    policy: Policy,
    execute: Callable[[], Awaitable[T]],
    conclude: Callable[[T], Conclusion],
    watch: _Watch,
) -> tuple[Guard, Executed[T] | Replayed, str]:
    try:
        claim = _opened(await _claim_waiting_async(store, call, policy))
    except IdempotencyError as error:
        guard = await sync_to_async(_refused)(store, call, error)
    else:
        guard = Guard(call, claim)
    watch.claimed()
    if guard.replay is not None:
        return guard, Replayed(guard.replay), REPLAYED
    try:
        result = await execute()
        guard.conclusion = await sync_to_async(conclude)(result)
    except BaseException:
        await sync_to_async(_release_quietly)(store, guard)
        raise
    outcome = await sync_to_async(_finish_lease)(store, guard, policy)
    return guard, Executed(result), outcome


def _resolve_mode(store: Store, policy: Policy) -> Policy:
    if policy.mode is None:
        return replace(policy, mode=ATOMIC if store.supports_atomic else LEASE)
    if policy.mode == ATOMIC and not store.supports_atomic:
        raise ImproperlyConfigured(
            f'The idempotency store {store.alias!r} supports only mode="lease".'
        )
    return policy


def _claim_or_refuse(store: Store, call: Call, claim: Callable[[], Claim]) -> Guard:
    try:
        return Guard(call, _opened(claim()))
    except IdempotencyError as error:
        return _refused(store, call, error)


def _opened(claim: Claim) -> Claim:
    """``claim`` with its stored outcome decrypted, if it has one (see :mod:`.sealing`)."""
    if claim.replay is None:
        return claim
    return replace(claim, replay=sealing.unseal(claim.replay, claim.call))


def _refused(store: Store, call: Call, error: IdempotencyError) -> Guard:
    """Report why ``call`` was not claimed and re-raise, or run it unprotected."""
    if isinstance(error, StoreUnavailable):
        if not store.fail_open:
            logger.error("Store %r unavailable: refused %s", store.alias, call)
            raise error
        logger.error("Store %r unavailable: running %s unprotected (fail open)", store.alias, call)
        return Guard(call, None)
    if isinstance(error, RequestInProgress):
        logger.warning("Conflict: %s is in progress", call)
        signals.conflict.send(sender=type(store), call=call)
    elif isinstance(error, FingerprintMismatch):
        logger.warning("Mismatch: %s was used for a different request", call)
        signals.mismatch.send(sender=type(store), call=call)
    raise error


def _finish_atomic(store: Store, guard: Guard, policy: Policy) -> str:
    """Store the outcome or undo; say what became of the call (an ``OUTCOMES`` value)."""
    if guard.claim is None or guard.replay is not None:
        return _settled(guard)
    conclusion = guard.conclusion
    if conclusion is Discard.FAILURE or store.rollback_pending():
        store.set_rollback()
        return RELEASED
    if conclusion is Discard.UNSTORABLE:
        _timed(store, "release", store.release, guard.claim)
        return RELEASED
    sealed = sealing.seal(conclusion, guard.call)
    _timed(store, "complete", store.complete, guard.claim, sealed, policy)
    return _settled(guard)


def _finish_lease(store: Store, guard: Guard, policy: Policy) -> str:
    """Store the outcome or free the key; say what became of the call."""
    claim, conclusion = guard.claim, guard.conclusion
    if claim is None or claim.replay is not None:
        return _settled(guard)
    if not isinstance(conclusion, Snapshot):
        _release_quietly(store, guard)
        return RELEASED
    sealed = sealing.seal(conclusion, claim.call)
    try:
        completed = _timed(store, "complete", store.complete, claim, sealed, policy)
    except StoreUnavailable:
        # The code ran: its result goes back to the caller all the same; a
        # retry after the lease ends runs again.
        logger.error(
            "Store %r unavailable: the outcome of %s was not stored", store.alias, guard.call
        )
        return RELEASED
    if not completed:
        logger.error("Lease lost: %s was taken over before it completed; not stored", guard.call)
        return LEASE_LOST
    return _settled(guard)


def _release_quietly(store: Store, guard: Guard) -> None:
    """Free the key, without hiding the error that may be on its way up."""
    if guard.claim is None or guard.claim.replay is not None:
        return
    try:
        _timed(store, "release", store.release, guard.claim)
    except StoreUnavailable:
        logger.error(
            "Store %r unavailable: %s stays claimed until its lease ends", store.alias, guard.call
        )


def _report_outcome(store: Store, guard: Guard) -> None:
    if guard.claim is None:
        return
    if guard.replay is not None:
        logger.info("Replayed %s (status %s)", guard.call, guard.replay.status)
        signals.replayed.send(sender=type(store), call=guard.call)
    else:
        signals.executed.send(sender=type(store), call=guard.call)


def _report(store: Store, guard: Guard, watch: _Watch, outcome: str) -> None:
    _report_outcome(store, guard)
    watch.report(outcome)


def _claim_waiting(store: Store, call: Call, policy: Policy) -> Claim:
    """Claim in lease mode, polling with backoff up to ``policy.wait`` seconds."""
    pauses = _pauses(time.monotonic() + policy.wait)
    while True:
        try:
            return _timed(store, "claim", store.claim, call, policy)
        except RequestInProgress:
            pause = next(pauses, None)
            if pause is None:
                raise
            time.sleep(pause)


async def _claim_waiting_async(store: Store, call: Call, policy: Policy) -> Claim:
    pauses = _pauses(time.monotonic() + policy.wait)
    while True:
        try:
            return await sync_to_async(_timed)(store, "claim", store.claim, call, policy)
        except RequestInProgress:
            pause = next(pauses, None)
            if pause is None:
                raise
            await asyncio.sleep(pause)


def _pauses(deadline: float) -> Iterator[float]:
    """Pauses between claim attempts: 50 ms doubling to 1 s, until ``deadline``."""
    pause = 0.05
    while (remaining := deadline - time.monotonic()) > 0:
        yield min(pause, remaining)
        pause = min(pause * 2, 1.0)


class _Watch:
    """Times one protected call and reports what became of it (:data:`signals.finished`)."""

    def __init__(self, call: Call, store: Store, policy: Policy) -> None:
        self.call, self.store, self.mode = call, store, policy.mode or ""
        self.started = time.time_ns()
        self._start = time.perf_counter()
        self.claim_wait: float | None = None

    def claimed(self) -> None:
        self.claim_wait = time.perf_counter() - self._start

    def report(self, outcome: str) -> None:
        duration = time.perf_counter() - self._start
        signals.finished.send(
            sender=type(self.store),
            call=self.call,
            store=self.store.alias,
            mode=self.mode,
            outcome=outcome,
            started=self.started,
            duration=duration,
            claim_wait=duration if self.claim_wait is None else self.claim_wait,
        )


def _settled(guard: Guard) -> str:
    """The outcome of a call whose claim ended normally."""
    if guard.claim is None:
        return UNPROTECTED
    if guard.replay is not None:
        return REPLAYED
    return TAKEOVER if guard.claim.taken_over else EXECUTED


def _failure(error: BaseException) -> str:
    """The outcome of a call that ended with ``error``."""
    if isinstance(error, RequestInProgress):
        return CONFLICT
    if isinstance(error, FingerprintMismatch):
        return MISMATCH
    if isinstance(error, StoreUnavailable | SnapshotUnreadable):
        return REFUSED
    return RELEASED


def _timed(store: Store, operation: str, function: Callable[..., T], *args: Any) -> T:
    """``function(*args)``, a store operation, timed for :data:`signals.store_called`."""
    start = time.perf_counter()
    try:
        return function(*args)
    finally:
        signals.store_called.send(
            sender=type(store),
            store=store.alias,
            operation=operation,
            duration=time.perf_counter() - start,
        )
