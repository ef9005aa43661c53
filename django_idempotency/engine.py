"""The idempotency protocol: claim, replay, complete, release.

The engine knows nothing of HTTP. An adapter turns its input into a
:class:`~django_idempotency.protocol.Call` and a
:class:`~django_idempotency.protocol.Policy` and runs the code to protect
inside :func:`protected` (or :func:`aprotected`, its async twin): the
:class:`Guard` it gets says whether to replay a stored outcome or to run the
code and set what of its outcome is kept. The engine decides the mode, calls
the store and sends every signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

from asgiref.sync import sync_to_async
from django.core.exceptions import ImproperlyConfigured

from django_idempotency import sealing, signals
from django_idempotency.conf import app_settings
from django_idempotency.exceptions import (
    FingerprintMismatch,
    IdempotencyError,
    LeaseLost,
    RequestInProgress,
    SnapshotUnreadable,
    StoreUnavailable,
)
from django_idempotency.protocol import (
    ATOMIC,
    LEASE,
    MODES,
    Call,
    Claim,
    Conclusion,
    Discard,
    Execute,
    Policy,
    Replay,
    Snapshot,
)
from django_idempotency.stores import Store, get_store

__all__ = [
    "ATOMIC",
    "LEASE",
    "MODES",
    "OUTCOMES",
    "Call",
    "Claim",
    "Conclusion",
    "Discard",
    "Execute",
    "Executed",
    "Execution",
    "Guard",
    "Policy",
    "Replay",
    "Replayed",
    "Snapshot",
    "aprotected",
    "async_mode_refusal",
    "current_execution",
    "protected",
    "run",
    "run_async",
]

logger = logging.getLogger("django_idempotency")

T = TypeVar("T")

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
        """The stored outcome to return instead of running the code, if any."""
        return self.claim.snapshot if isinstance(self.claim, Replay) else None

    @property
    def execution(self) -> Execute | None:
        """The claim this call runs under; ``None`` for a replay or when unprotected."""
        return self.claim if isinstance(self.claim, Execute) else None


@dataclass(frozen=True)
class Execution:
    """The claimed call whose protected code is running in this context.

    Steps and the outbox (:mod:`django_idempotency.workflow`,
    :mod:`django_idempotency.outbox`) read it through :func:`current_execution`,
    so they need no argument threaded through the protected code.
    """

    call: Call
    claim: Execute
    store: Store
    policy: Policy
    #: What code running inside keeps for the length of the execution (steps reached).
    notes: dict[str, Any] = field(default_factory=dict)


_execution: ContextVar[Execution | None] = ContextVar("idempotency_execution", default=None)


def current_execution() -> Execution | None:
    """The execution :func:`protected` is running here, if any (sync code only)."""
    return _execution.get()


@contextlib.contextmanager
def _executing(store: Store, guard: Guard, policy: Policy) -> Iterator[None]:
    claim = guard.execution
    if claim is None:
        yield
        return
    token = _execution.set(Execution(guard.call, claim, store, policy))
    try:
        yield
    finally:
        _execution.reset(token)


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


async def run_async(
    call: Call,
    policy: Policy,
    execute: Callable[[], Awaitable[T]],
    conclude: Callable[[T], Conclusion],
) -> Executed[T] | Replayed:
    """:func:`run` for coroutines (see :func:`aprotected`)."""
    async with aprotected(call, policy) as guard:
        if guard.replay is not None:
            return Replayed(guard.replay)
        result = await execute()
        guard.conclusion = await sync_to_async(conclude)(result)
    return Executed(result)


# The protocol, sync and async ------------------------------------------------------


@contextlib.contextmanager
def protected(call: Call, policy: Policy) -> Iterator[Guard]:
    """The protocol around a block of code: every adapter runs its code in one.

    On entry the key is claimed (or its outcome found: ``guard.replay``); the
    block sets ``guard.conclusion``; on exit the outcome is stored, or the key
    freed if the block raised. In ``atomic`` mode the block runs inside the
    store's transaction.
    """
    store = get_store(policy.store)
    policy = _decide_mode(store, policy, asynchronous=False)
    watch = _Watch(call, store, policy)
    try:
        if policy.mode == ATOMIC:
            # Claim, execution and completion share one transaction: the protected
            # code's writes and the stored outcome commit together or not at all.
            with store.atomic():
                guard = _guard(store, call, lambda: _claim(store, call, policy))
                watch.claimed()
                with _executing(store, guard, policy):
                    yield guard
                outcome = _finish_atomic(store, guard, policy)
        else:
            guard = _guard(store, call, lambda: _claim_waiting(store, call, policy))
            watch.claimed()
            try:
                with _executing(store, guard, policy):
                    yield guard
            except BaseException:
                _release_quietly(store, guard)
                raise
            outcome = _finish_lease(store, guard, policy)
    except BaseException as error:
        watch.report(_failure(error))
        raise
    _report(store, guard, watch, outcome)


@contextlib.asynccontextmanager
async def aprotected(call: Call, policy: Policy) -> AsyncIterator[Guard]:
    """:func:`protected` for async code, which always runs in ``lease`` mode.

    The store is used from a worker thread; waiting for an in-flight
    duplicate sleeps without blocking the event loop.
    """
    store = get_store(policy.store)
    policy = _decide_mode(store, policy, asynchronous=True)
    watch = _Watch(call, store, policy)
    try:
        try:
            guard = Guard(call, await _claim_waiting_async(store, call, policy))
        except IdempotencyError as error:
            guard = await sync_to_async(_refused)(store, call, error)
        watch.claimed()
        if guard.execution is not None:
            try:
                yield guard
            except BaseException:
                await sync_to_async(_release_quietly)(store, guard)
                raise
            outcome = await sync_to_async(_finish_lease)(store, guard, policy)
        else:
            yield guard
            outcome = _settled(guard)
    except BaseException as error:
        await sync_to_async(watch.report)(_failure(error))
        raise
    await sync_to_async(_report)(store, guard, watch, outcome)


def async_mode_refusal(mode: str | None) -> str | None:
    """Why async code cannot run in ``mode``; ``None`` when it can.

    The one rule for async code: a transaction cannot span an ``await``
    (Django binds it to one thread), so async code runs in ``lease`` mode,
    whatever ``IDEMPOTENCY_MODE`` says; asking for ``atomic`` is an error.
    """
    if mode == ATOMIC:
        return 'a transaction cannot span an await. Async code runs in "lease" mode.'
    return None


def _decide_mode(store: Store, policy: Policy, *, asynchronous: bool) -> Policy:
    """The policy with the mode the call runs in: the one place that decides it."""
    if asynchronous:
        refusal = async_mode_refusal(policy.mode)
        if refusal is not None:
            raise ImproperlyConfigured(f'mode="atomic" cannot protect async code: {refusal}')
        return _with_mode(policy, LEASE)
    mode = policy.mode or app_settings.MODE
    if mode is None:
        mode = ATOMIC if store.supports_atomic else LEASE
    elif mode == ATOMIC and not store.supports_atomic:
        raise ImproperlyConfigured(
            f'The idempotency store {store.alias!r} supports only mode="lease".'
        )
    return _with_mode(policy, mode)


@functools.lru_cache(maxsize=256)
def _with_mode(policy: Policy, mode: str) -> Policy:
    # Policies are few and immutable (one per protected view or task and
    # settings); replace() would rebuild the same one on every call.
    return policy if policy.mode == mode else replace(policy, mode=mode)


# The steps both twins share (none of them awaits) ---------------------------------


def _guard(store: Store, call: Call, claim: Callable[[], Claim]) -> Guard:
    try:
        return Guard(call, claim())
    except IdempotencyError as error:
        return _refused(store, call, error)


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
    claim = guard.execution
    if claim is None:
        return _settled(guard)
    conclusion = guard.conclusion
    if conclusion is Discard.FAILURE or store.rollback_pending():
        store.set_rollback()
        return RELEASED
    if conclusion is Discard.UNSTORABLE:
        _timed(store, "release", store.release, claim)
        return RELEASED
    sealed = sealing.seal(conclusion, claim.call)
    _timed(store, "complete", store.complete, claim, sealed, policy)
    return _settled(guard)


def _finish_lease(store: Store, guard: Guard, policy: Policy) -> str:
    """Store the outcome or free the key; say what became of the call."""
    claim, conclusion = guard.execution, guard.conclusion
    if claim is None:
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
    claim = guard.execution
    if claim is None:
        return
    try:
        _timed(store, "release", store.release, claim)
    except StoreUnavailable:
        logger.error(
            "Store %r unavailable: %s stays claimed until its lease ends", store.alias, guard.call
        )


def _report_outcome(store: Store, guard: Guard) -> None:
    claim = guard.claim
    if isinstance(claim, Replay):
        logger.info("Replayed %s (status %s)", guard.call, claim.snapshot.status)
        signals.replayed.send(sender=type(store), call=guard.call)
    elif isinstance(claim, Execute):
        signals.executed.send(sender=type(store), call=guard.call)


def _claimed(store: Store, claim: Claim) -> Claim:
    """Report a takeover: the store only says that it happened."""
    if isinstance(claim, Execute) and claim.takeover:
        logger.warning("Takeover: %s had an expired lease", claim.call)
        signals.takeover.send(sender=type(store), call=claim.call)
    return claim


def _claim(store: Store, call: Call, policy: Policy) -> Claim:
    claim = _claimed(store, _timed(store, "claim", store.claim, call, policy))
    if isinstance(claim, Replay):
        # Decrypted here, where every path reads a stored outcome (see sealing.py).
        return replace(claim, snapshot=sealing.unseal(claim.snapshot, claim.call))
    return claim


def _report(store: Store, guard: Guard, watch: _Watch, outcome: str) -> None:
    _report_outcome(store, guard)
    watch.report(outcome)


def _claim_waiting(store: Store, call: Call, policy: Policy) -> Claim:
    """Claim in lease mode, polling with backoff up to ``policy.wait`` seconds."""
    pauses = _pauses(time.monotonic() + policy.wait)
    while True:
        try:
            return _claim(store, call, policy)
        except RequestInProgress:
            pause = next(pauses, None)
            if pause is None:
                raise
            time.sleep(pause)


async def _claim_waiting_async(store: Store, call: Call, policy: Policy) -> Claim:
    pauses = _pauses(time.monotonic() + policy.wait)
    while True:
        try:
            return await sync_to_async(_claim)(store, call, policy)
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


# What the engine reports besides its signals of events (otel.py builds on it) -----


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
    claim = guard.claim
    if claim is None:
        return UNPROTECTED
    if isinstance(claim, Replay):
        return REPLAYED
    return TAKEOVER if claim.takeover else EXECUTED


def _failure(error: BaseException) -> str:
    """The outcome of a call that ended with ``error``."""
    if isinstance(error, LeaseLost):
        return LEASE_LOST
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
