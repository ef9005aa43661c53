"""The database store: the ``IdempotencyKey`` model, on any Django database."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from django.db import (
    DatabaseError,
    InterfaceError,
    OperationalError,
    router,
    transaction,
)
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import F, QuerySet
from django.utils import timezone

from django_idempotency import sealing
from django_idempotency.exceptions import FingerprintMismatch, RequestInProgress, StoreUnavailable
from django_idempotency.models import IdempotencyKey, IdempotencyStep, OutboxMessage
from django_idempotency.protocol import ATOMIC, Call, Claim, Execute, Policy, Replay, Snapshot
from django_idempotency.sealing import Resealing
from django_idempotency.stores import postgresql, sql
from django_idempotency.stores.base import Erasure, Store
from django_idempotency.stores.sql import Inserted

logger = logging.getLogger("django_idempotency")

State = IdempotencyKey.State

# A claim may race with a purge that deletes the row it collided with; after
# this many rounds (and once its wait, if any, has ended) something else is
# wrong and the caller is told to retry.
_CLAIM_ROUNDS = 3

_MYSQL_LOCK_WAIT_TIMEOUT = 1205
_MYSQL_DEADLOCK = 1213
#: MySQL's refusal of a NOWAIT locking read (MariaDB answers 1205).
_MYSQL_NOWAIT = 3572


class DatabaseStore(Store):
    """Keys in the ``IdempotencyKey`` table; supports both ``atomic`` and ``lease``.

    Option ``DATABASE``: the alias to use; by default the one the database
    router picks for writes of ``IdempotencyKey`` (never a read replica).
    Option ``PREPARE`` (PostgreSQL with psycopg 3): whether the store's own
    statements are prepared on the server whatever the connection's
    ``prepare_threshold`` (by default they are); ``False`` for PgBouncer in
    transaction pooling mode older than 1.21.
    """

    supports_atomic = True

    def __init__(
        self, alias: str, *, DATABASE: str | None = None, PREPARE: bool | None = None
    ) -> None:
        super().__init__(alias)
        self.database = DATABASE
        #: As configured: ``None`` when left to the default (the checks tell).
        self.prepare = PREPARE
        self.prepares_statements = PREPARE is not False
        # The atomic block each thread's request runs in, while it runs.
        self._blocks = threading.local()

    @property
    def db(self) -> str:
        return self.database or router.db_for_write(IdempotencyKey)

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        connection = transaction.get_connection(self.db)
        block = transaction.atomic(using=connection.alias)
        block.__enter__()
        outer, self._blocks.current = getattr(self._blocks, "current", None), block
        try:
            yield
        except BaseException as exc:
            # Ending the block talks to the server; if the connection died,
            # MySQLdb raises even while Django drops it: report that as such.
            with reachable(connection):
                block.__exit__(type(exc), exc, exc.__traceback__)
            raise
        finally:
            self._blocks.current = outer
        with reachable(connection):
            block.__exit__(None, None, None)

    def rollback_pending(self) -> bool:
        return transaction.get_rollback(using=self.db)

    def set_rollback(self) -> None:
        transaction.set_rollback(True, using=self.db)

    def claim(self, call: Call, policy: Policy) -> Claim:
        connection = transaction.get_connection(self.db)
        try:
            with reachable(connection), _claiming(connection, call, policy):
                return self._claim(connection, call, policy)
        except OperationalError as exc:
            # Waited as long as allowed for the transaction that holds the key.
            raise RequestInProgress(retry_after=policy.retry_after) from exc

    def complete(self, claim: Execute, snapshot: Snapshot, policy: Policy) -> bool:
        # One statement, conditional on the token: atomic with or without a
        # surrounding transaction, and a no-op for a claim that was taken over.
        now = timezone.now()
        connection = transaction.get_connection(self.db)
        params = sql.completion_params(
            connection,
            status=snapshot.status,
            headers=[list(header) for header in snapshot.headers],
            body=snapshot.body,
            completed=now,
            expires=now + timedelta(seconds=policy.retention),
            scope=claim.call.scope,
            key=claim.call.key,
            token=claim.token,
        )
        prepare = self.prepares_statements
        statement = sql.statements(connection).complete
        with reachable(connection):
            ends = self._ends_its_transaction(connection)
            if ends and prepare and postgresql.outside_pipeline(connection):
                # The last statement of the store's own transaction: COMMIT
                # goes with it, one round trip (Django's commit then finds the
                # transaction ended and sends nothing).
                changed = postgresql.complete_and_commit_prepared(connection, statement, params)
                return changed == 1
            if ends:
                with sql.cursor(connection, prepare=prepare) as cursor:
                    postgresql.complete_and_commit(connection, cursor, statement, params)
                    updated: int = cursor.rowcount
            else:
                with postgresql.statement_cursor(connection, prepare=prepare) as cursor:
                    cursor.execute(statement, params)
                    updated = cursor.rowcount
        return updated == 1

    def _ends_its_transaction(self, connection: BaseDatabaseWrapper) -> bool:
        """Whether the store may commit now: its own block is the transaction, intact."""
        block = getattr(self._blocks, "current", None)
        return (
            block is not None
            and connection.atomic_blocks == [block]
            and connection.commit_on_exit
            and not connection.needs_rollback
            and postgresql.pipelines(connection)
        )

    def release(self, claim: Execute) -> None:
        connection = transaction.get_connection(self.db)
        params = [claim.call.scope, claim.call.key, claim.token]
        prepare = self.prepares_statements
        with reachable(connection), postgresql.statement_cursor(connection, prepare=prepare) as c:
            c.execute(sql.statements(connection).release, params)

    def erase(
        self,
        scope: str,
        *,
        dry_run: bool = False,
        batch_size: int = 1000,
        include_pending: bool = False,
    ) -> Erasure:
        keys = IdempotencyKey.objects.using(self.db).filter(scope=scope)
        # What the keys' executions recorded goes with them: step results, and
        # outbox messages already sent. Pending ones are follow-ups still owed
        # (a refund notice, a shipment): kept unless asked, and counted.
        steps = IdempotencyStep.objects.using(self.db).filter(scope=scope)
        messages = OutboxMessage.objects.using(self.db).filter(scope=scope)
        pending = messages.filter(state=OutboxMessage.State.PENDING)
        if not include_pending:
            messages = messages.filter(state=OutboxMessage.State.SENT)
        if dry_run:
            return Erasure(
                keys=keys.count(),
                steps=steps.count(),
                messages=messages.count(),
                kept_pending=0 if include_pending else pending.count(),
            )
        return Erasure(
            keys=_delete_in_batches(keys, batch_size),
            steps=_delete_in_batches(steps, batch_size),
            messages=_delete_in_batches(messages, batch_size),
            kept_pending=0 if include_pending else pending.count(),
        )

    def reseal(self, *, dry_run: bool = False, batch_size: int = 1000) -> Resealing:
        """Stored responses, step results and outbox payloads, with the newest key."""
        return (
            self._reseal_responses(dry_run, batch_size)
            + self._reseal_steps(dry_run, batch_size)
            + self._reseal_messages(dry_run, batch_size)
        )

    def _reseal_responses(self, dry_run: bool, batch_size: int) -> Resealing:
        rows = (
            IdempotencyKey.objects.using(self.db)
            .filter(state=State.COMPLETED)
            .order_by("pk")
            .values_list("pk", "scope", "key", "token", "response_headers", "response_body")
        )
        done, last = Resealing(), 0
        while batch := list(rows.filter(pk__gt=last)[:batch_size]):
            last = batch[-1][0]
            # One short transaction per batch: one commit, row locks held briefly.
            with transaction.atomic(using=self.db):
                done += Resealing(examined=len(batch))
                for pk, scope, key, token, headers, body in batch:
                    done += self._reseal_row(pk, scope, key, token, headers, body, dry_run)
        return done

    def _reseal_steps(self, dry_run: bool, batch_size: int) -> Resealing:
        steps = IdempotencyStep.objects.using(self.db)
        rows = steps.order_by("pk").values_list("pk", "scope", "key", "name", "result")
        done, last = Resealing(), 0
        while batch := list(rows.filter(pk__gt=last)[:batch_size]):
            last = batch[-1][0]
            with transaction.atomic(using=self.db):
                for pk, scope, key, name, result in batch:
                    context = sealing.step_context(scope, key, name)
                    try:
                        sealed = sealing.reseal_text(result, context)
                    except sealing.Undecryptable:
                        logger.error("Not re-encrypted: no configured key decrypts step %s", pk)
                        done += Resealing(examined=1, unreadable=1)
                        continue
                    # Only the record this run read (a step is recorded once; a key
                    # released and run again may have recorded it anew).
                    changed = sealed is not None and (
                        dry_run or steps.filter(pk=pk, result=result).update(result=sealed)
                    )
                    done += Resealing(examined=1, resealed=int(bool(changed)))
        return done

    def _reseal_messages(self, dry_run: bool, batch_size: int) -> Resealing:
        messages = OutboxMessage.objects.using(self.db)
        rows = messages.order_by("pk").values_list("pk", "topic", "payload")
        done, last = Resealing(), None
        while batch := list((rows.filter(pk__gt=last) if last else rows)[:batch_size]):
            last = batch[-1][0]
            with transaction.atomic(using=self.db):
                for pk, topic, payload in batch:
                    # A payload never changes once enqueued: no need to compare it.
                    stored = payload if isinstance(payload, str) else json.dumps(payload)
                    context = sealing.message_context(pk, topic)
                    try:
                        sealed = sealing.reseal_text(stored, context)
                    except sealing.Undecryptable:
                        logger.error("Not re-encrypted: no configured key decrypts message %s", pk)
                        done += Resealing(examined=1, unreadable=1)
                        continue
                    if sealed is not None and not dry_run:
                        messages.filter(pk=pk).update(payload=sealed)
                    done += Resealing(examined=1, resealed=int(sealed is not None))
        return done

    def _reseal_row(
        self,
        pk: int,
        scope: str,
        key: str,
        token: str,
        headers: Any,
        body: bytes | memoryview,
        dry_run: bool,
    ) -> Resealing:
        try:
            sealed = sealing.reseal(bytes(body), scope, key, headers)
        except sealing.Undecryptable:
            logger.error(
                "Not re-encrypted: no configured key decrypts scope=%r key %r…", scope, key[:8]
            )
            return Resealing(unreadable=1)
        if sealed is None:
            return Resealing()
        if not dry_run:
            # Only the completion this run read: a key claimed again since keeps its new state.
            updated = (
                IdempotencyKey.objects.using(self.db)
                .filter(pk=pk, token=token, state=State.COMPLETED)
                .update(response_body=sealed, response_headers=[])
            )
            if not updated:
                return Resealing()
        return Resealing(resealed=1)

    def _claim(self, connection: BaseDatabaseWrapper, call: Call, policy: Policy) -> Claim:
        """The claim loop, the same on every database; only the insert differs.

        A caller that waits keeps trying until its wait ends, however many
        rounds that takes (a round that finds the key contended waits on the
        database for its claimer); one that does not wait gets a few rounds,
        for a row purged or taken over under it.
        """
        insert = _INSERTS[connection.vendor]
        deadline = time.monotonic() + policy.wait
        alone = _claims_alone(connection, policy)
        for attempt in itertools.count(1):
            token = uuid.uuid4().hex
            now = timezone.now()
            values = _new_row(call, policy, token, now)
            how = How(self.prepares_statements, max(0.0, deadline - time.monotonic()), alone)
            inserted, row = insert(connection, call, values, how)
            if inserted is Inserted.CLAIMED:
                return Execute(call, token)
            if inserted is Inserted.CONTENDED and not _is_final(row, now):
                # Someone is claiming the key right now; a completed row is
                # final, anything else is theirs to decide.
                _wait_for_claimer(connection, call, policy, deadline - time.monotonic())
            else:
                claim = self._claim_existing(connection, row, call, policy, token, now)
                if claim is not None:
                    return claim
            if attempt >= _CLAIM_ROUNDS and time.monotonic() >= deadline:
                break
        raise RequestInProgress(retry_after=policy.retry_after)

    def _claim_existing(
        self,
        connection: BaseDatabaseWrapper,
        row: sql.Row | None,
        call: Call,
        policy: Policy,
        token: str,
        now: datetime,
    ) -> Claim | None:
        """Decide about the committed row the insert collided with.

        ``None`` when it changed under us (taken over, or purged since the
        collision): the claim then starts over.
        """
        if row is None:
            return None
        live_lease = (
            row.state == State.IN_PROGRESS
            and row.locked_until is not None
            and row.locked_until > now
        )
        if row.expires <= now and not live_lease:
            # Past retention: the key is new again.
            fields = {"attempts": 1, "created": now}
            return self._take_over(connection, row, call, policy, token, now, fields)
        if row.fingerprint != call.fingerprint:
            raise FingerprintMismatch(
                "This idempotency key was already used for a different request."
            )
        if row.state == State.COMPLETED:
            return Replay(call, _snapshot(row))
        if live_lease:
            assert row.locked_until is not None
            left = (row.locked_until - now).total_seconds()
            raise RequestInProgress(retry_after=math.ceil(left))
        if row.locked_until is None:
            # An atomic-mode claim is never committed in progress: this is the
            # caller's own transaction, claiming the key a second time from
            # inside the code the first claim protects.
            raise RequestInProgress(retry_after=policy.retry_after)
        # An in-progress claim whose lease ended: its worker died or stalled.
        fields = {"attempts": F("attempts") + 1}
        claim = self._take_over(connection, row, call, policy, token, now, fields)
        return None if claim is None else replace(claim, takeover=True)

    def _take_over(
        self,
        connection: BaseDatabaseWrapper,
        row: sql.Row,
        call: Call,
        policy: Policy,
        token: str,
        now: datetime,
        fields: dict[str, Any],
    ) -> Execute | None:
        # Compare-and-set on the old token and state: of several requests
        # taking over the same row, exactly one updates it, and none does once
        # the late owner has completed it (its token stays, its state changes).
        updated = (
            IdempotencyKey.objects.using(connection.alias)
            .filter(pk=row.pk, token=row.token, state=row.state)
            .update(
                fingerprint=call.fingerprint,
                method=call.method,
                path=call.path,
                state=State.IN_PROGRESS,
                token=token,
                locked_until=_lease_end(policy, now),
                response_status=None,
                response_headers=[],
                response_body=b"",
                completed=None,
                expires=now + timedelta(seconds=policy.retention),
                **fields,
            )
        )
        return Execute(call, token) if updated == 1 else None


@contextlib.contextmanager
def reachable(connection: BaseDatabaseWrapper) -> Iterator[None]:
    """Report a lost or refused connection as the store being unavailable.

    Lock contention stays an ``OperationalError``: the claim answers it
    with 409. Anything else (the server closed the connection, refused a
    new one, ran out of disk) means the store cannot keep its promise.
    """
    driver = connection.Database  # type: ignore[attr-defined]
    try:
        yield
    except (
        OperationalError,
        InterfaceError,
        # Raised unwrapped by some drivers, e.g. MySQLdb when Django
        # closes a cursor on a connection the server dropped.
        driver.OperationalError,
        driver.InterfaceError,
    ) as exc:
        if isinstance(exc, OperationalError) and _is_lock_contention(exc):
            raise
        raise StoreUnavailable(f"Database {connection.alias!r} is unavailable: {exc}") from exc


@contextlib.contextmanager
def _claiming(connection: BaseDatabaseWrapper, call: Call, policy: Policy) -> Iterator[None]:
    """What a claim needs around its statements besides the insert itself."""
    if connection.vendor == "postgresql":
        # One statement: needs no transaction, and bounds its own wait.
        yield
        return
    deadline = time.monotonic() + policy.wait
    with contextlib.ExitStack() as stack:
        if connection.vendor == "mysql":
            # No transaction of its own: the claim is one statement, which
            # raises no error on a duplicate (INSERT IGNORE).
            if policy.wait > 0:
                stack.enter_context(_one_waiter(connection, call, policy))
            if connection.mysql_is_mariadb:  # type: ignore[attr-defined]
                # The claim bounds its own lock wait (SET STATEMENT ... FOR).
                yield
                return
        # Contention shows as a lock wait on the unique index, bounded here.
        stack.enter_context(_lock_wait(connection, deadline - time.monotonic()))
        yield


@contextlib.contextmanager
def _one_waiter(connection: BaseDatabaseWrapper, call: Call, policy: Policy) -> Iterator[None]:
    """Let one claim of the key at a time wait on InnoDB (MariaDB/MySQL, waiting claims).

    When a transaction that inserted a key rolls back while two or more
    others wait to insert it, InnoDB grants them all a shared lock and then
    deadlocks them against each other, rolling back the victims' whole
    transactions: under ``ATOMIC_REQUESTS`` the request's, which the claim
    cannot resume. A named lock on the key, held by the claim only (it is
    released before the protected code runs), queues the other claims
    outside InnoDB, so at most one of them waits on the row: no deadlock.
    Session-level, so a rollback does not release it; closing the
    connection does.
    """
    name = _lock_name(connection, call)
    with connection.cursor() as cursor:
        cursor.execute("SELECT GET_LOCK(%s, %s)", [name, policy.wait])
        (acquired,) = cursor.fetchone()
    if acquired != 1:
        # Waited as long as allowed for the claims queued before this one.
        raise RequestInProgress(retry_after=policy.retry_after)
    try:
        yield
    finally:
        with contextlib.suppress(DatabaseError), connection.cursor() as cursor:
            cursor.execute("DO RELEASE_LOCK(%s)", [name])


def _lock_name(connection: BaseDatabaseWrapper, call: Call) -> str:
    # Named locks are server-wide and at most 64 characters: the database's
    # name and a hash of the key.
    database = str(connection.settings_dict["NAME"])
    digest = hashlib.sha256(f"{database}\0{call.scope}\0{call.key}".encode()).hexdigest()
    return f"django_idempotency:{digest[:40]}"


class How(NamedTuple):
    """How one round of a claim inserts: what the vendor's insert needs besides the row."""

    #: The store's ``PREPARE`` option (only PostgreSQL prepares).
    prepare: bool
    #: Seconds the insert may wait for another transaction claiming the key.
    wait: float
    #: Whether the claim's transaction holds nothing but the claim (autocommit,
    #: or the store's own atomic block): the server may roll it back whole.
    alone: bool


# The vendor-specific insert: claim the key with a new row, or say who holds it.
# Each returns what happened and, unless the row was inserted, the row that
# holds the key as the insert saw it (None: none seen, or not looked at).
Insert = Callable[
    [BaseDatabaseWrapper, Call, dict[str, Any], How], tuple[Inserted, "sql.Row | None"]
]


def _insert_postgresql(
    connection: BaseDatabaseWrapper, call: Call, values: dict[str, Any], how: How
) -> tuple[Inserted, sql.Row | None]:
    # One statement that bounds its own wait (see stores/postgresql.py).
    return postgresql.insert(connection, call, values, how.prepare)


def _insert_sqlite(
    connection: BaseDatabaseWrapper, call: Call, values: dict[str, Any], how: How
) -> tuple[Inserted, sql.Row | None]:
    # No row locks: the database lock serialises writers, so the insert either
    # claims the key or finds a committed row.
    params = sql.new_row_params(connection, values)
    with sql.cursor(connection) as cursor:
        cursor.execute(sql.statements(connection).insert_unless_taken, params)
        if cursor.rowcount == 1:
            return Inserted.CLAIMED, None
        return Inserted.TAKEN, sql.fetch_row(connection, cursor, call.scope, call.key)


def _insert_mysql(
    connection: BaseDatabaseWrapper, call: Call, values: dict[str, Any], how: How
) -> tuple[Inserted, sql.Row | None]:
    """Claim with ``INSERT IGNORE``, waiting at most ``how.wait`` on the key's holder.

    A lock wait that times out is not always the key's: the insert also waits
    for gap locks, which InnoDB takes (under READ COMMITTED too) on the index
    records next to a key whose duplicate check found a row: a neighbour's
    replay, take-over, or new claim over a deleted row not yet purged, held
    until that transaction ends. So a timeout is followed by a look at the key
    itself: held by another transaction, the key is in progress (the error is
    raised, and the claim answers 409); otherwise the insert waited on
    another key, and tries again waiting as long as any other statement of
    the connection would (its own ``innodb_lock_wait_timeout``).
    """
    params = sql.new_row_params(connection, values)
    timeout: OperationalError | None = None
    for bound in (how.wait, None):
        try:
            return _insert_ignore(connection, call, params, bound)
        except OperationalError as exc:
            if not _claim_goes_on(connection, exc, how):
                raise
            if exc.args[0] == _MYSQL_DEADLOCK:
                # The holder rolled back: wait for whoever claims next.
                return Inserted.CONTENDED, None
            held, row = _look_at_key(connection, call)
            if held:
                raise
            if row is not None:
                # Committed since the insert began.
                return Inserted.TAKEN, row
            timeout = exc
            if not connection.mysql_is_mariadb:  # type: ignore[attr-defined]
                # The claim's bound is the session's (see _lock_wait): restore
                # the connection's own for the next try.
                _restore_lock_wait(connection)
    # Waited on another key's lock as long as the connection's statements
    # may: the database is too busy to answer about this key.
    raise StoreUnavailable(
        f"Database {connection.alias!r} did not grant a lock on the keys next to "
        f"this one in time: {timeout}"
    ) from timeout


def _insert_ignore(
    connection: BaseDatabaseWrapper, call: Call, params: list[Any], bound: float | None
) -> tuple[Inserted, sql.Row | None]:
    """One try of the MariaDB/MySQL claim: the insert, and the row when it inserted nothing.

    ``bound``: seconds to wait for locks (MariaDB; on MySQL the session's
    bound applies); ``None``, as long as the connection's own setting says.
    """
    statements = sql.statements(connection)
    claim = statements.insert_ignore
    if bound is not None and connection.mysql_is_mariadb:  # type: ignore[attr-defined]
        seconds = _innodb_seconds(connection, bound)
        claim = f"SET STATEMENT innodb_lock_wait_timeout = {seconds} FOR {claim}"
    key = [call.scope, call.key]
    with sql.cursor(connection) as cursor:
        if not _runs_several_statements(connection):
            cursor.execute(claim, params)
            if cursor.rowcount == 1:
                return Inserted.CLAIMED, None
            return Inserted.TAKEN, sql.fetch_row(connection, cursor, *key)
        # The claim and the read in one round trip: the read answers nothing
        # when the insert inserted.
        cursor.execute(f"{claim}; {statements.select_unless_inserted}", [*params, *key])
        inserted = cursor.rowcount == 1
        cursor.nextset()
        values = cursor.fetchone()
        while cursor.nextset():
            pass
    if inserted:
        return Inserted.CLAIMED, None
    return Inserted.TAKEN, None if values is None else sql.to_row(connection, values)


def _runs_several_statements(connection: BaseDatabaseWrapper) -> bool:
    """Whether the driver sends several statements in one query (mysqlclient's default)."""
    database: Any = connection.Database  # type: ignore[attr-defined]
    options = connection.settings_dict.get("OPTIONS", {})
    # PyMySQL, installed as MySQLdb, does not (unless told by client_flag).
    return database.__name__ == "MySQLdb" and options.get("multi_statements", True) is not False


def _look_at_key(connection: BaseDatabaseWrapper, call: Call) -> tuple[bool, sql.Row | None]:
    """Whether another transaction holds ``call``'s key, and its committed row if there is one.

    A locking read of the key that does not wait: under READ COMMITTED (Django's
    default on MariaDB/MySQL) it locks the key's record only, never a gap
    (under REPEATABLE READ, a key without a record locks its gap).
    """
    statements = sql.statements(connection)
    share = "LOCK IN SHARE MODE" if connection.mysql_is_mariadb else "FOR SHARE"  # type: ignore[attr-defined]
    with sql.cursor(connection) as cursor:
        try:
            cursor.execute(f"{statements.select} {share} NOWAIT", [call.scope, call.key])
        except OperationalError as exc:
            if exc.args[:1] in {(_MYSQL_LOCK_WAIT_TIMEOUT,), (_MYSQL_NOWAIT,)}:
                return True, None
            raise
        values = cursor.fetchone()
    return False, None if values is None else sql.to_row(connection, values)


_INSERTS: dict[str, Insert] = {
    "postgresql": _insert_postgresql,
    "sqlite": _insert_sqlite,
    "mysql": _insert_mysql,
}


def _wait_for_claimer(
    connection: BaseDatabaseWrapper, call: Call, policy: Policy, seconds: float
) -> None:
    """Wait up to ``seconds`` for the transaction that is claiming ``call``'s key to end."""
    if connection.vendor == "postgresql":
        postgresql.wait_for(connection, call, seconds, policy.retry_after)
    elif policy.wait > 0 and not connection.mysql_is_mariadb:  # type: ignore[attr-defined]
        # MySQL: the next insert waits on the new claimer's row itself, for
        # what is left of the wait (on MariaDB, the insert bounds its own).
        _set_lock_wait(connection, seconds)


def _claims_alone(connection: BaseDatabaseWrapper, policy: Policy) -> bool:
    """Whether the claim's transaction holds nothing but the claim (see :class:`How`)."""
    if not connection.in_atomic_block:
        return True  # autocommit: the statement is the transaction
    # Atomic mode: the store's own block (Store.atomic), begun by it.
    return (
        policy.mode == ATOMIC and len(connection.atomic_blocks) == 1 and connection.commit_on_exit
    )


def _claim_goes_on(connection: BaseDatabaseWrapper, exc: OperationalError, how: How) -> bool:
    """Whether the claim may go on after ``exc``: a lock not granted that undid nothing else.

    Claims waiting on one uncommitted key deadlock in InnoDB when its holder
    rolls back, and InnoDB rolls each victim's whole transaction back, as it
    does on a lock wait timeout with ``innodb_rollback_on_timeout``
    (otherwise a timeout undoes the statement only). If the transaction held
    nothing but the claim, nothing else was lost: the claim goes on in the
    transaction the server begins with the next statement. If it was the
    caller's, the caller's block is marked for rollback and the error raised.
    """
    code = exc.args[0] if exc.args else None
    if code not in {_MYSQL_DEADLOCK, _MYSQL_LOCK_WAIT_TIMEOUT}:
        return False
    whole = code == _MYSQL_DEADLOCK or _rolls_back_on_timeout(connection)
    if whole and not how.alone:
        transaction.set_rollback(True, using=connection.alias)
        return False
    return True


_rollback_on_timeout: dict[str, bool] = {}


def _rolls_back_on_timeout(connection: BaseDatabaseWrapper) -> bool:
    """The server's ``innodb_rollback_on_timeout`` (read-only while it runs), read once."""
    alias = connection.alias
    if alias not in _rollback_on_timeout:
        with connection.cursor() as cursor:
            cursor.execute("SELECT @@GLOBAL.innodb_rollback_on_timeout")
            _rollback_on_timeout[alias] = bool(cursor.fetchone()[0])
    return _rollback_on_timeout[alias]


def _snapshot(row: sql.Row) -> Snapshot:
    return Snapshot(
        status=row.response_status or 0,
        headers=tuple((str(name), str(value)) for name, value in row.response_headers),
        body=bytes(row.response_body),
    )


def _new_row(call: Call, policy: Policy, token: str, now: datetime) -> dict[str, Any]:
    return {
        "scope": call.scope,
        "key": call.key,
        "fingerprint": call.fingerprint,
        "method": call.method,
        "path": call.path,
        "state": State.IN_PROGRESS,
        "token": token,
        "locked_until": _lease_end(policy, now),
        "attempts": 1,
        "response_headers": [],
        "response_body": b"",
        "created": now,
        "expires": now + timedelta(seconds=policy.retention),
    }


def _is_final(row: sql.Row | None, now: datetime) -> bool:
    """Whether ``row`` is a completed, unexpired outcome: replayed as it is."""
    return row is not None and row.state == State.COMPLETED and row.expires > now


def _lease_end(policy: Policy, now: datetime) -> datetime | None:
    # In atomic mode the transaction's lock, not a lease, holds the claim.
    return None if policy.mode == ATOMIC else now + timedelta(seconds=policy.lease)


@contextlib.contextmanager
def _lock_wait(connection: BaseDatabaseWrapper, seconds: float) -> Iterator[None]:
    """Bound how long statements wait for a lock held by another transaction."""
    # (PostgreSQL claims through stores/postgresql.py, which bounds its own wait.)
    vendor = connection.vendor
    if vendor == "sqlite" and seconds <= 0:
        # Only ever raised, never lowered (see below): nothing to do.
        yield
        return
    with connection.cursor() as cursor:
        if vendor == "mysql":
            cursor.execute(
                "SET @idempotency_saved_wait = @@SESSION.innodb_lock_wait_timeout,"
                " @@SESSION.innodb_lock_wait_timeout = %s",
                [_innodb_seconds(connection, seconds)],
            )
        elif vendor == "sqlite":
            cursor.execute("PRAGMA busy_timeout")
            saved = cursor.fetchone()[0]
            # One lock covers the whole database: that it is busy says nothing
            # about this key (most often another key's request is writing).
            # Wait at least as long as any other write on this connection would.
            cursor.execute(f"PRAGMA busy_timeout = {max(int(saved), int(seconds * 1000))}")
    try:
        yield
    finally:
        with contextlib.suppress(DatabaseError), connection.cursor() as cursor:
            if vendor == "mysql":
                cursor.execute("SET @@SESSION.innodb_lock_wait_timeout = @idempotency_saved_wait")
            elif vendor == "sqlite":
                cursor.execute(f"PRAGMA busy_timeout = {int(saved)}")


def _restore_lock_wait(connection: BaseDatabaseWrapper) -> None:
    """Put back the bound :func:`_lock_wait` saved (MySQL), before it ends."""
    with connection.cursor() as cursor:
        cursor.execute("SET @@SESSION.innodb_lock_wait_timeout = @idempotency_saved_wait")


def _set_lock_wait(connection: BaseDatabaseWrapper, seconds: float) -> None:
    """Change the bound that :func:`_lock_wait` set (MariaDB/MySQL)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SET @@SESSION.innodb_lock_wait_timeout = %s", [_innodb_seconds(connection, seconds)]
        )


def _innodb_seconds(connection: BaseDatabaseWrapper, seconds: float) -> int:
    # Whole seconds; MySQL's least is 1, MariaDB's 0 (no wait at all).
    minimum = 0 if connection.mysql_is_mariadb else 1  # type: ignore[attr-defined]
    return max(minimum, math.ceil(seconds))


def _is_lock_contention(exc: OperationalError) -> bool:
    """Whether ``exc`` says a lock was not granted in time (not a broken connection)."""
    cause = exc.__cause__
    sqlstate = getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)
    if sqlstate is not None:
        return sqlstate in {"55P03", "40P01", "40001"}  # lock timeout, deadlock, serialization
    code = exc.args[0] if exc.args else None
    if isinstance(code, int):
        return code in {1205, 1213}  # MySQL: lock wait timeout, deadlock
    message = str(exc).lower()
    return "locked" in message or "busy" in message  # SQLite


def _delete_in_batches(queryset: QuerySet[Any], batch_size: int) -> int:
    """Delete the rows of ``queryset``, ``batch_size`` per statement; return how many."""
    deleted = 0
    while batch := list(queryset.values_list("pk", flat=True)[:batch_size]):
        deleted += queryset.filter(pk__in=batch).delete()[0]
    return deleted
