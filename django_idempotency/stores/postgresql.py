"""The PostgreSQL claim: one statement, no lock-timeout juggling on the hot path.

A transaction-level advisory lock on a 64-bit hash of (scope, key) says who is
claiming a key right now. The claim statement takes it without waiting and,
only if it got it, inserts the row (``ON CONFLICT DO NOTHING``), so it never
blocks behind another transaction's uncommitted row of the same key. When it
inserted nothing, the row that holds the key is read: by the same statement
where statements are prepared (a replay is then one statement), by a second
one otherwise. Only when the key is contended and the caller chose to wait
does a bounded wait happen, on the advisory lock itself.

The statement needs no surrounding transaction: in autocommit (lease mode)
the lock lasts for the statement, which is all it has to cover there, since
the row it inserts is committed when the statement ends.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Iterator
from typing import Any

from django.db import DatabaseError, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.utils import CursorWrapper

from django_idempotency.exceptions import RequestInProgress
from django_idempotency.protocol import Call
from django_idempotency.stores import sql
from django_idempotency.stores.sql import Inserted


def lock_id(call: Call) -> int:
    """A signed 64-bit advisory lock id for the call's (scope, key)."""
    digest = hashlib.sha256(f"{call.scope}\0{call.key}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def insert(
    connection: BaseDatabaseWrapper, call: Call, values: dict[str, Any], prepare: bool
) -> tuple[Inserted, sql.Row | None]:
    """Claim ``call``'s key with the new row ``values``.

    Returns what happened and, unless the row was inserted, the row holding
    the key as the claim saw it (``None`` if it saw none: purged, or
    committed by another claim after the statement began). With ``prepare``
    (psycopg 3) the statement is prepared on the server whatever the
    connection's ``prepare_threshold``.
    """
    # A prepared claim returns the row it collided with: a replay is one
    # statement. Unprepared, that join costs more to parse and plan on every
    # request than a separate read of the row when there is one.
    with_row = (prepare and sql.is_psycopg3(connection)) or sql.prepares(connection)
    params = [lock_id(call), *sql.new_row_params(connection, values)]
    if with_row:
        params += [call.scope, call.key]
    with sql.cursor(connection, prepare=prepare) as cursor:
        claim = _claim_sql(connection, with_row=with_row)
        if begins_transaction(connection):
            begin_and_execute(connection, cursor, claim, params)
        else:
            cursor.execute(claim, params)
        acquired, inserted, *row = cursor.fetchone()
        if inserted:
            return Inserted.CLAIMED, None
        if with_row:
            found = None if row[0] is None else sql.to_row(connection, row)
        else:
            found = sql.fetch_row(connection, cursor, call.scope, call.key)
    return (Inserted.TAKEN if acquired else Inserted.CONTENDED), found


def pipelines(connection: BaseDatabaseWrapper) -> bool:
    """Whether the store sends transaction control in one flush with its statements."""
    return sql.is_psycopg3(connection)


def begins_transaction(connection: BaseDatabaseWrapper) -> bool:
    """Whether psycopg is about to send BEGIN on its own before the next statement.

    It does so in a round trip of its own (and waits for it, pipeline or
    not). Only inside an atomic block that Django opened from autocommit,
    which Django ends by putting autocommit back: the store may then send
    BEGIN itself, in autocommit, without anyone seeing the difference.
    """
    if not (pipelines(connection) and connection.in_atomic_block and connection.commit_on_exit):
        return False
    raw: Any = connection.connection
    return not raw.autocommit and raw.pgconn.transaction_status == _idle()


@contextlib.contextmanager
def beginning(connection: BaseDatabaseWrapper, cursor: CursorWrapper) -> Iterator[None]:
    """BEGIN, in one flush with what the block executes; its results are read after it.

    Only where :func:`begins_transaction` says so.
    """
    raw: Any = connection.connection
    raw.autocommit = True  # idle, so nothing is sent: BEGIN is ours to send now
    with raw.pipeline():
        # On the same psycopg cursor (a new one costs its own adapters); the
        # statement after it leaves its results there.
        cursor.cursor.execute("BEGIN", prepare=False)
        yield


def begin_and_execute(
    connection: BaseDatabaseWrapper, cursor: CursorWrapper, statement: str, params: list[Any]
) -> None:
    """BEGIN and ``statement`` in one flush; read the results after it."""
    with beginning(connection, cursor):
        cursor.execute(statement, params)


def complete_and_commit(
    connection: BaseDatabaseWrapper,
    cursor: CursorWrapper,
    statement: str,
    params: list[Any],
    *,
    begin: bool = False,
) -> None:
    """``statement`` and COMMIT in one flush; the transaction is over after it.

    With ``begin`` (where :func:`begins_transaction` says so) BEGIN goes in
    the same flush: a transaction of one statement, one round trip. If the
    statement fails, COMMIT is not run (the server skips the rest of a
    failed pipeline) and the transaction is left to roll back.
    """
    raw: Any = connection.connection
    with beginning(connection, cursor) if begin else raw.pipeline():
        cursor.execute(statement, params)
        raw.execute("COMMIT")


@contextlib.contextmanager
def begin_with_next_statement(connection: BaseDatabaseWrapper) -> Iterator[None]:
    """In the block, send BEGIN in one flush with the first statement, not alone.

    For an atomic block opened from autocommit around code that runs its own
    statements through Django (a step's work): its first statement carries
    BEGIN, where psycopg would wait for BEGIN on its own first. Errors of
    that flush are raised as Django's, as the statement's own would be.
    """

    def wrapper(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        cursor = context["cursor"]
        # Server-side cursors (QuerySet.iterator()) do not run in a pipeline.
        if not begins_transaction(connection) or getattr(cursor.cursor, "name", None):
            return execute(sql, params, many, context)
        with connection.wrap_database_errors, beginning(connection, cursor):
            return execute(sql, params, many, context)

    if not pipelines(connection):
        yield
        return
    with connection.execute_wrapper(wrapper):
        yield


@functools.cache
def _idle() -> Any:
    from psycopg.pq import TransactionStatus

    return TransactionStatus.IDLE


#: Waits for the key's advisory lock and lets it go in the same statement (the
#: subquery, kept apart by OFFSET 0, runs first): a waiter holds nothing once
#: the statement returns, whatever its thread does next, and in whatever
#: transaction it runs. Session-level, so the caller's transaction is not
#: what releases it.
_WAIT_SQL = (
    "SELECT pg_advisory_unlock(CAST(%s AS bigint)) "
    "FROM (SELECT pg_advisory_lock(CAST(%s AS bigint)) OFFSET 0) AS waited"
)


def wait_for(connection: BaseDatabaseWrapper, call: Call, seconds: float, retry_after: int) -> None:
    """Wait up to ``seconds`` until the transaction claiming ``call``'s key ends.

    Raises :class:`RequestInProgress` at once when ``seconds`` is 0; on timeout,
    PostgreSQL's lock_timeout error propagates (the store turns it into 409).
    The wait takes the key's lock only for as long as its one statement runs:
    the waiters queued behind it, and the claim that follows, never wait on a
    waiter.
    """
    if seconds <= 0:
        raise RequestInProgress(retry_after=retry_after)
    lock = lock_id(call)
    # SET LOCAL needs a transaction: one of its own, or a savepoint in the
    # caller's, which a failed wait rolls back to (the caller's goes on).
    with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
        cursor.execute("SET LOCAL lock_timeout = %s", [f"{max(1, int(seconds * 1000))}ms"])
        try:
            with transaction.atomic(using=connection.alias):
                cursor.execute(_WAIT_SQL, [lock, lock])
        except DatabaseError as exc:
            if not _lock_not_granted(exc):
                # Cancelled, maybe between the lock and its release: a
                # session-level lock outlives the statement. Released in
                # this transaction, so on this server session even behind a
                # pooler (a connection that failed took the lock with it).
                _release_quietly(connection, lock)
            raise
        cursor.execute("SET LOCAL lock_timeout TO DEFAULT")


def _lock_not_granted(exc: DatabaseError) -> bool:
    cause = exc.__cause__  # psycopg 3 names the code sqlstate, psycopg2 pgcode
    code = getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)
    return code == "55P03"  # lock_not_available


def _release_quietly(connection: BaseDatabaseWrapper, lock: int) -> None:
    """Release the session's hold on ``lock`` if it has one; never raises."""
    # Quiet when the connection failed: its session, lock included, is gone.
    with contextlib.suppress(DatabaseError), connection.cursor() as cursor:
        # Only if held (pg_advisory_unlock warns otherwise). A bigint lock
        # shows as its high half in classid and its low half in objid.
        cursor.execute(
            "SELECT pg_advisory_unlock(CAST(%s AS bigint)) FROM pg_locks "
            "WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted "
            "AND objsubid = 1 AND classid::bigint = (CAST(%s AS bigint) >> 32) & 4294967295 "
            "AND objid::bigint = CAST(%s AS bigint) & 4294967295",
            [lock, lock, lock],
        )


def _claim_sql(connection: BaseDatabaseWrapper, *, with_row: bool) -> str:
    return _build_claim_sql(sql.statements(connection), with_row)


@functools.cache  # once per database (Statements are built once per database)
def _build_claim_sql(statements: sql.Statements, with_row: bool) -> str:
    # Explicit casts: in INSERT ... SELECT the parameters carry no type.
    casts = ", ".join(f"CAST(%s AS {statements.db_types[name]})" for name in sql.NEW_ROW_COLUMNS)
    claim = (
        "WITH lock AS (SELECT pg_try_advisory_xact_lock(CAST(%s AS bigint)) AS acquired), "
        f"claimed AS (INSERT INTO {statements.table} ({statements.new_row_columns}) "
        f"SELECT {casts} FROM lock WHERE lock.acquired "
        f"ON CONFLICT ({statements.unique_columns}) DO NOTHING RETURNING 1) "
        "SELECT lock.acquired, EXISTS (SELECT 1 FROM claimed)"
    )
    if not with_row:
        return f"{claim} FROM lock"
    column = statements.column
    row = ", ".join(f"held.{column[name]}" for name in sql.ROW_COLUMNS)
    # The row that holds the key, when the insert did not happen. (The
    # statement's snapshot never shows the row it inserts itself.)
    return (
        f"{claim}, {row} FROM lock LEFT JOIN {statements.table} held "
        f"ON held.{column['scope']} = CAST(%s AS {statements.db_types['scope']}) "
        f"AND held.{column['key']} = CAST(%s AS {statements.db_types['key']})"
    )
