"""Recovery points: named steps whose results are committed under the key.

Inside protected code (a view under ``@idempotent`` or ``IdempotencyMixin``,
an ``idempotent_function`` or ``idempotent_block``), :func:`step` runs a piece
of work at most once per key and records its JSON result in the same
transaction as the work's own database writes. When the key runs again (a
retry after the key was released, a takeover after a crash) a recorded step
is not run: its result is returned, and execution resumes at the first step
without a record. :func:`derived_key` gives the key to send to a provider
that deduplicates on one (Stripe's ``Idempotency-Key``, for example).

Steps need the database store. In ``lease`` mode each step is a transaction
of its own, fenced by the claim's token: a worker that lost its lease to a
takeover cannot record a step (:class:`LeaseLost`), and its step's writes roll
back. On PostgreSQL with psycopg 3 that transaction costs no round trip of
its own: BEGIN goes with the work's first statement, COMMIT with the record
(see ``stores/postgresql.py``). In ``atomic`` mode a step is part of the request's transaction: its
record lives and dies with that transaction, like every other write, and a
step that raises dooms the transaction as any failure of the view does.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from django.core.exceptions import ImproperlyConfigured
from django.db import IntegrityError, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.utils import timezone
from django.utils.crypto import salted_hmac

from django_idempotency import sealing, signals
from django_idempotency.engine import Execution, current_execution
from django_idempotency.exceptions import FingerprintMismatch, LeaseLost
from django_idempotency.models import IdempotencyKey, IdempotencyStep
from django_idempotency.protocol import ATOMIC
from django_idempotency.stores import postgresql
from django_idempotency.stores.database import DatabaseStore, reachable

logger = logging.getLogger("django_idempotency")

T = TypeVar("T")

#: The longest step name (the column's size).
MAX_STEP_NAME_LENGTH = 100
_DERIVED_KEY_SALT = "django_idempotency.workflow.derived_key"


class StepError(RuntimeError):
    """A step used wrongly: outside protected code, twice in one execution, badly named."""


@dataclass
class _Progress:
    """The steps one execution has reached, to refuse a name used twice."""

    names: set[str] = field(default_factory=set)
    #: The step running now, if any (the outbox writes into its transaction).
    running: str | None = None
    #: The results recorded before this execution, by step name (read at its first step).
    recorded: dict[str, Any] | None = None


_NOTE = "django_idempotency.workflow"


def step(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` once per key under ``name``, or return the result it recorded.

    ``fn`` takes no arguments (use a ``lambda`` or ``functools.partial``) and
    returns a JSON-serialisable value; the step returns that value as JSON
    decodes it, on the first run as on a resumed one. If ``fn`` raises,
    nothing of the step is recorded and its database writes roll back.
    """
    execution = _require_execution(name)
    progress = _progress_of(execution)
    _check_name(name, progress)
    store_db = database_of(execution, name)
    if progress.recorded is None:
        # One read per execution, at its first step: what earlier ones recorded.
        progress.recorded = _recorded(store_db, execution)
    if name in progress.recorded:
        progress.names.add(name)
        logger.info("Step %r of %s resumed from its record", name, execution.call)
        return progress.recorded[name]  # type: ignore[no-any-return]
    # Lease mode: the step's own transaction. Atomic mode: part of the request's
    # transaction, without a savepoint: a step that raises dooms that
    # transaction, as any failure of the protected code does.
    own_transaction = execution.policy.mode != ATOMIC
    if own_transaction:
        _require_durable(store_db, name)
    connection = transaction.get_connection(store_db)
    block = transaction.atomic(using=store_db, savepoint=own_transaction)
    with block, _beginning(connection, own_transaction):
        progress.running = name
        try:
            result = fn()
        finally:
            progress.running = None
        body = _serialised(name, result)
        _record(connection, execution, name, body, block if own_transaction else None)
    progress.names.add(name)
    signals.step_completed.send(sender=IdempotencyStep, call=execution.call, name=name)
    decoded: T = json.loads(body)
    return decoded


def derived_key(name: str) -> str:
    """A key for a downstream call, stable across every retry of the current key.

    Derived (HMAC with ``SECRET_KEY``) from the scope, the key and ``name``:
    the same on every retry and takeover, different for another scope or key,
    and revealing neither. Send it to a provider that deduplicates on keys.
    """
    execution = _require_execution(name)
    call = execution.call
    digest = salted_hmac(
        _DERIVED_KEY_SALT, f"{call.scope}\0{call.key}\0{name}", algorithm="sha256"
    ).hexdigest()
    return f"idk_{digest}"


def running_step(execution: Execution) -> str | None:
    """The name of the step of ``execution`` running now, if one is."""
    progress = execution.notes.get(_NOTE)
    return progress.running if isinstance(progress, _Progress) else None


def _require_execution(name: str) -> Execution:
    execution = current_execution()
    if execution is None:
        raise StepError(
            f"Step {name!r} is used outside protected code: steps and derived keys work "
            "inside a view under @idempotent or IdempotencyMixin, an idempotent_function "
            "or an idempotent_block, where an idempotency key is claimed (synchronous "
            "code only: async views have no steps)."
        )
    return execution


def _progress_of(execution: Execution) -> _Progress:
    progress = execution.notes.get(_NOTE)
    if not isinstance(progress, _Progress):
        progress = execution.notes[_NOTE] = _Progress()
    return progress


def _beginning(
    connection: BaseDatabaseWrapper, own_transaction: bool
) -> contextlib.AbstractContextManager[None]:
    """The step's own transaction begins with its first statement, in one round trip."""
    if not own_transaction:
        return contextlib.nullcontext()
    return postgresql.begin_with_next_statement(connection)


def _require_durable(database: str, name: str) -> None:
    """Refuse a lease-mode step inside a transaction: its record would not be durable."""
    blocks = transaction.get_connection(database).atomic_blocks
    # Django's own test cases wrap every test in a transaction: not a caller's.
    if blocks and not getattr(blocks[-1], "_from_testcase", False):
        raise StepError(
            f"Step {name!r} runs in lease mode inside a transaction (ATOMIC_REQUESTS, or "
            "transaction.atomic around the protected code): its record would commit only "
            "with that transaction, and a crash would lose it. Exclude the view with "
            "@transaction.non_atomic_requests, or call the step outside the atomic block."
        )


def _check_name(name: str, progress: _Progress) -> None:
    if not isinstance(name, str) or not name:
        raise StepError(f"A step name must be a non-empty string, not {name!r}.")
    if len(name) > MAX_STEP_NAME_LENGTH:
        raise StepError(
            f"Step name {name[:20]!r}… is {len(name)} characters long; "
            f"the most is {MAX_STEP_NAME_LENGTH}."
        )
    if name in progress.names:
        raise StepError(
            f"Step {name!r} runs twice in one execution: give each step its own name "
            "(in a loop, put the item's id in the name)."
        )
    if progress.running is not None:
        raise StepError(f"Step {name!r} is nested in step {progress.running!r}: steps do not nest.")


def database_of(execution: Execution, name: str) -> str:
    if not isinstance(execution.store, DatabaseStore):
        raise ImproperlyConfigured(
            f"Step {name!r} needs the database store; the idempotency store "
            f"{execution.store.alias!r} ({type(execution.store).__name__}) keeps no steps."
        )
    return execution.store.db


def _recorded(database: str, execution: Execution) -> dict[str, Any]:
    """The results recorded under the current key, by step name."""
    call = execution.call
    connection = transaction.get_connection(database)
    with connection.cursor() as cursor:
        cursor.execute(_statements(connection).select, [call.scope, call.key])
        rows = cursor.fetchall()
    now = timezone.now()
    recorded = {}
    expired = []
    for name, fingerprint, result, expires in rows:
        if _aware(connection, expires) <= now:
            expired.append(name)  # the key's retention ended: the key is new again
        elif fingerprint != call.fingerprint:
            raise FingerprintMismatch(
                "This idempotency key has recorded steps of a different request."
            )
        else:
            # Sealed when encryption is on; a tampered record is refused (503),
            # never taken as the step's result nor a reason to run it again.
            context = sealing.step_context(call.scope, call.key, name)
            what = f"the recorded result of step {name!r} of {call}"
            recorded[name] = json.loads(sealing.unseal_text(result, context, what))
    if expired:
        IdempotencyStep.objects.using(database).filter(
            scope=call.scope, key=call.key, name__in=expired
        ).delete()
    return recorded


def _record(
    connection: BaseDatabaseWrapper,
    execution: Execution,
    name: str,
    body: str,
    block: transaction.Atomic | None,
) -> None:
    """Record the step, if the claim still owns the key (one statement).

    ``block`` is the step's own transaction, if it has one: where the
    database pipelines, the record and COMMIT go in one flush (with BEGIN,
    if the step's work sent no statement). A claim that lost the key makes
    the statement fail (its token is NULL then), so COMMIT never follows it.
    """
    call, claim = execution.call, execution.claim
    now = timezone.now()
    adapt = connection.ops.adapt_datetimefield_value
    expires = now + timedelta(seconds=execution.policy.retention)
    params = [
        call.scope,
        call.key,
        name,
        call.fingerprint,
        call.scope,
        call.key,
        claim.token,
        IdempotencyKey.State.IN_PROGRESS.value,
        sealing.seal_text(body, sealing.step_context(call.scope, call.key, name)),
        adapt(now),
        adapt(expires),
    ]
    statement = _statements(connection).record
    try:
        with reachable(connection), connection.cursor() as cursor:
            if block is not None and _ends_its_transaction(connection, block):
                begin = postgresql.begins_transaction(connection)
                with connection.wrap_database_errors:
                    postgresql.complete_and_commit(
                        connection, cursor, statement, params, begin=begin
                    )
            else:
                cursor.execute(statement, params)
    except IntegrityError as exc:
        # Not the owner any more (the token is NULL), or recorded meanwhile by
        # an owner that lost its lease late (the step's unique constraint).
        raise LeaseLost(
            f"Step {name!r} of {call} was not recorded: the key was taken over while it "
            "ran, or another execution of the key recorded it first."
        ) from exc


def _ends_its_transaction(connection: BaseDatabaseWrapper, block: transaction.Atomic) -> bool:
    """Whether the step may commit with its record: its own block is the transaction, intact."""
    return (
        connection.atomic_blocks == [block]
        and connection.commit_on_exit
        and not connection.needs_rollback
        and postgresql.pipelines(connection)
    )


def _serialised(name: str, result: Any) -> str:
    try:
        return json.dumps(result, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"The result of step {name!r} must be JSON-serialisable: {exc}") from exc


def _aware(connection: BaseDatabaseWrapper, value: Any) -> datetime:
    if isinstance(value, str):  # SQLite hands back text
        value = datetime.fromisoformat(value)
    if timezone.is_naive(value):
        return timezone.make_aware(value, connection.timezone)
    result: datetime = value
    return result


@dataclass(frozen=True)
class _Statements:
    select: str
    record: str


_cache: dict[tuple[str, str], _Statements] = {}


def _statements(connection: BaseDatabaseWrapper) -> _Statements:
    cache_key = (connection.alias, connection.vendor)
    built = _cache.get(cache_key)
    if built is None:
        built = _cache[cache_key] = _build(connection)
    return built


def _build(connection: BaseDatabaseWrapper) -> _Statements:
    quote = connection.ops.quote_name
    steps = quote(IdempotencyStep._meta.db_table)
    keys = quote(IdempotencyKey._meta.db_table)

    def column(model: Any, name: str) -> str:
        return quote(model._meta.get_field(name).column)

    names = ("scope", "key", "name", "fingerprint", "token", "result", "created", "expires")
    columns = ", ".join(column(IdempotencyStep, name) for name in names)
    selected = ", ".join(
        column(IdempotencyStep, name) for name in ("name", "fingerprint", "result", "expires")
    )
    select = (
        f"SELECT {selected} FROM {steps} WHERE "
        f"{column(IdempotencyStep, 'scope')} = %s AND {column(IdempotencyStep, 'key')} = %s"
    )
    # Fenced: the token is the claim's only while the claim still owns the
    # key, NULL otherwise, which the column refuses: a step whose claim was
    # taken over fails, and its transaction cannot commit.
    owner = (
        f"(SELECT {column(IdempotencyKey, 'token')} FROM {keys} WHERE "
        f"{column(IdempotencyKey, 'scope')} = %s AND {column(IdempotencyKey, 'key')} = %s "
        f"AND {column(IdempotencyKey, 'token')} = %s AND {column(IdempotencyKey, 'state')} = %s)"
    )
    record = f"INSERT INTO {steps} ({columns}) VALUES (%s, %s, %s, %s, {owner}, %s, %s, %s)"
    return _Statements(select=select, record=record)
