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
import itertools
import re
import select
import weakref
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
    claim = _claim_sql(connection, with_row=with_row)
    begin = begins_transaction(connection)
    # Prepared, BEGIN and the claim go through libpq's pipeline directly; a
    # claim without BEGIN is a statement on its own (statement_cursor).
    in_one_flush = begin and prepare and outside_pipeline(connection)
    if in_one_flush:
        opened = one_flush(connection, begin=True)
    elif begin:
        opened = sql.cursor(connection, prepare=prepare)
    else:
        opened = statement_cursor(connection, prepare=prepare)
    with opened as cursor:
        if begin and not in_one_flush:
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


def complete_and_commit_prepared(
    connection: BaseDatabaseWrapper, statement: str, params: list[Any]
) -> int:
    """Prepared ``statement`` and COMMIT in one flush; the rows it changed.

    As :func:`complete_and_commit`, through libpq's pipeline directly
    (:func:`one_flush`). If the statement fails, COMMIT is not run and the
    transaction is left to roll back.
    """
    with one_flush(connection, commit=True) as cursor:
        cursor.execute(statement, params)
        updated: int = cursor.rowcount
    return updated


def one_flush(
    connection: BaseDatabaseWrapper, *, begin: bool = False, commit: bool = False
) -> CursorWrapper:
    """A cursor for one prepared statement, sent with BEGIN before it or COMMIT after it.

    The same messages as psycopg's pipeline (:func:`begin_and_execute`,
    :func:`complete_and_commit`), one round trip, sent and read with libpq's
    own calls: psycopg's pipeline costs about 80 µs of Python per flush,
    which is most of what a claim costs the client (docs/benchmarks.md, "The
    floor"). Django's cursor wrapper is around it, so its execute wrappers
    and query logging see the statement (not BEGIN or COMMIT, as with
    psycopg's pipeline). Only where :func:`begins_transaction` says so for
    ``begin``, and where the store's transaction ends for ``commit``.
    """
    connection.ensure_connection()
    connection.validate_thread_sharing()
    flush = _OneFlush(connection.connection, begin=begin, commit=commit)
    if connection.queries_logged:
        return connection.make_debug_cursor(flush)  # type: ignore[arg-type]
    return connection.make_cursor(flush)  # type: ignore[arg-type]


def statement_cursor(connection: BaseDatabaseWrapper, *, prepare: bool) -> CursorWrapper:
    """A cursor for one of the store's statements, on its own (no BEGIN, no COMMIT).

    Prepared (psycopg 3, outside a psycopg pipeline), it is :func:`one_flush`:
    the same one round trip as psycopg's cursor, without its Python. Lease
    mode's claim, completion and release, each in autocommit, go this way.
    Otherwise :func:`sql.cursor`.
    """
    if prepare and _may_flush_alone(connection):
        return one_flush(connection)
    return sql.cursor(connection, prepare=prepare)


def _may_flush_alone(connection: BaseDatabaseWrapper) -> bool:
    """Whether a statement may go through :func:`one_flush` without BEGIN or COMMIT.

    Not where psycopg owes the session a BEGIN (autocommit off, no
    transaction begun yet: the first statement of an atomic block): it
    sends that BEGIN itself before its next statement, so a statement sent
    past it would run outside the block's transaction.
    """
    if not sql.is_psycopg3(connection):
        return False
    connection.ensure_connection()
    raw: Any = connection.connection
    owes_begin = not raw.autocommit and raw.pgconn.transaction_status == _idle()
    return outside_pipeline(connection) and not owes_begin


def outside_pipeline(connection: BaseDatabaseWrapper) -> bool:
    """Whether :func:`one_flush` may run: no psycopg pipeline is open on the connection.

    (Inside one, the statements go through it, as the caller's do.)
    """
    raw: Any = connection.connection
    return bool(raw.pgconn.pipeline_status == 0)  # PipelineStatus.OFF


class _OneFlush:
    """What Django's cursor wrapper runs the statement on; see :func:`one_flush`.

    It offers what the store reads of a cursor (``fetchone``, ``rowcount``)
    and what Django's wrappers use (``connection``, ``close``).
    """

    def __init__(self, raw: Any, *, begin: bool, commit: bool) -> None:
        self.connection = raw
        self._begin = begin
        self._commit = commit
        self._row: tuple[Any, ...] | None = None
        self.rowcount = -1
        # Where Django's query log reads a psycopg cursor's statement from
        # (DatabaseOperations.last_executed_query): the text the server ran.
        self._query: _Sent | None = None

    def execute(self, query: str, params: Any = None) -> None:
        raw = self.connection
        params = list(params or [])
        self._query = _Sent(_numbered(query))
        if self._begin:
            # Idle, so setting it sends nothing: BEGIN is ours to send, and
            # Django's commit at the block's end finds the state it expects.
            raw.autocommit = True
        # A statement sent on its own outside a transaction (autocommit and
        # idle: not after a BEGIN the store sent itself) is its own transaction.
        alone = (
            not (self._begin or self._commit)
            and raw.autocommit
            and raw.pgconn.transaction_status == _idle()
        )
        try:
            self._row, self.rowcount = _send(raw, query, params, self._begin, self._commit)
        except _statement_gone():
            # Our prepared statement is gone from the session (DISCARD ALL,
            # DEALLOCATE): prepared anew. Again only where nothing else was
            # lost with it: this flush began the transaction, which the
            # failure rolled back with nothing in it, or the statement was
            # its own transaction. Otherwise the transaction is lost, and the
            # error is the database's (the next flush prepares the statement).
            if self._begin:
                raw.execute("ROLLBACK")
            elif not alone:
                raise
            self._row, self.rowcount = _send(raw, query, params, self._begin, self._commit)

    def fetchone(self) -> tuple[Any, ...] | None:
        row, self._row = self._row, None
        return row

    def close(self) -> None:
        self._row = None


def _send(
    raw: Any, query: str, params: list[Any], begin: bool, commit: bool
) -> tuple[tuple[Any, ...] | None, int]:
    """Send [BEGIN,] the prepared ``query`` [, COMMIT] in one flush; its first row and row count."""
    from psycopg import errors
    from psycopg.adapt import PyFormat, Transformer
    from psycopg.pq import ExecStatus

    adapter = Transformer(raw)  # the connection's dumpers and loaders, as a cursor's
    values = adapter.dump_sequence(params, [PyFormat.AUTO] * len(params))
    # psycopg dumps some values by what they hold (an int as int2, int4 or
    # int8): a statement is prepared per set of parameter types, as psycopg does.
    names = _prepared_names(raw)
    types = tuple(adapter.types or ())
    name = names.get((query, types))
    new_name = None
    with raw.lock:
        pgconn = raw.pgconn
        pgconn.enter_pipeline_mode()
        try:
            if begin:
                pgconn.send_query_params(b"BEGIN", None)
            if name is None:
                name = new_name = f"django_idempotency_{next(_NAME_NUMBERS)}".encode()
                pgconn.send_prepare(name, _numbered(query), types)
            pgconn.send_query_prepared(name, values, param_formats=adapter.formats)
            if commit:
                pgconn.send_query_params(b"COMMIT", None)
            pgconn.pipeline_sync()
            while pgconn.flush():
                _wait(pgconn.socket, write=True)
            results = _read_until_sync(pgconn)
            pgconn.exit_pipeline_mode()
        except BaseException:
            _abandon(raw)
            raise
    # BEGIN's, the prepare's, the statement's, COMMIT's: the first that failed
    # is the error (the ones after it were skipped).
    failed = next((r for r in results if r.status == ExecStatus.FATAL_ERROR), None)
    if failed is not None:
        error = errors.error_from_result(failed, encoding=raw.info.encoding)
        if isinstance(error, _statement_gone()):
            names.clear()  # prepared anew by the next flush
        raise error
    if new_name is not None:
        names[query, types] = new_name
    result = results[-2] if commit else results[-1]
    row = None
    if result.status == ExecStatus.TUPLES_OK and result.ntuples:
        adapter.set_pgresult(result)
        row = adapter.load_row(0, tuple)
    return row, result.command_tuples if result.command_tuples is not None else -1


class _Sent:
    """The statement as sent, where Django's query log looks for it."""

    def __init__(self, query: bytes) -> None:
        self.query = query


def _statement_gone() -> type[Exception]:
    """The error of a statement this connection prepared and the session no longer has.

    (Never of a statement prepared in the same flush: its Parse would have failed first.)
    """
    from psycopg import errors

    return errors.InvalidSqlStatementName


#: Names of the store's statements prepared on each psycopg connection, by
#: (statement, parameter types); forgotten with the connection.
_PREPARED: weakref.WeakKeyDictionary[Any, dict[tuple[str, tuple[int, ...]], bytes]] = (
    weakref.WeakKeyDictionary()
)
_NAME_NUMBERS = itertools.count(1)


def _prepared_names(raw: Any) -> dict[tuple[str, tuple[int, ...]], bytes]:
    names = _PREPARED.get(raw)
    if names is None:
        names = _PREPARED[raw] = {}
    return names


@functools.lru_cache(maxsize=64)
def _numbered(query: str) -> bytes:
    """``query`` with PostgreSQL's ``$n`` placeholders for psycopg's ``%s``."""
    numbers = itertools.count(1)
    return re.sub(
        r"%(s|%)", lambda match: "%" if match[1] == "%" else f"${next(numbers)}", query
    ).encode()


def _read_until_sync(pgconn: Any) -> list[Any]:
    """The results of a pipeline up to its Sync, waiting for the server as needed."""
    from psycopg.pq import ExecStatus

    results: list[Any] = []
    while True:
        while pgconn.is_busy():
            _wait(pgconn.socket, write=False)
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:  # between one command's results and the next
            continue
        if result.status == ExecStatus.PIPELINE_SYNC:
            return results
        results.append(result)


def _wait(fileno: int, *, write: bool) -> None:
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fileno, select.POLLOUT if write else select.POLLIN)
        poller.poll()
    else:  # pragma: no cover - Windows
        select.select([], [fileno], []) if write else select.select([fileno], [], [])


def _abandon(raw: Any) -> None:
    """Leave pipeline mode after a failure part-way; a session it cannot leave is closed.

    Results left unread (a signal, the server gone) would be read as the
    next statement's: the connection is then closed, and Django replaces it.
    """
    from psycopg.pq import ConnStatus

    pgconn = raw.pgconn
    with contextlib.suppress(Exception):
        if pgconn.status == ConnStatus.OK:
            pgconn.exit_pipeline_mode()
            return
    raw.close()


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
