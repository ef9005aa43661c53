"""The database store's statements, built once per database, run without the ORM.

A claim, a replay and a completion are each one statement on the hot path of
every protected request. Compiling them through the ORM cost more than a
millisecond of Python per request; here their SQL is built once per database
alias (quoted names, column types) and only the parameters change.
"""

from __future__ import annotations

import enum
import functools
import json
from datetime import datetime
from typing import Any, NamedTuple

from django.conf import settings
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.utils import CursorWrapper
from django.db.models import Field
from django.utils import timezone

from django_idempotency.models import IdempotencyKey

#: The columns a claim decides on, and those a replay answers with.
ROW_COLUMNS = (
    "id",
    "state",
    "fingerprint",
    "token",
    "locked_until",
    "expires",
    "response_status",
    "response_headers",
    "response_body",
)

#: The columns a new claim writes, in this order.
NEW_ROW_COLUMNS = (
    "scope",
    "key",
    "fingerprint",
    "method",
    "path",
    "state",
    "token",
    "locked_until",
    "attempts",
    "response_headers",
    "response_body",
    "created",
    "expires",
)


class Inserted(enum.Enum):
    """What a vendor's claim insert did."""

    #: The row is ours.
    CLAIMED = "claimed"
    #: A committed row holds the key; nobody else is claiming it now.
    TAKEN = "taken"
    #: Another transaction is claiming the key at this moment.
    CONTENDED = "contended"


class Row(NamedTuple):
    """The stored key, as much of it as the claim needs."""

    pk: int
    state: str
    fingerprint: str
    token: str
    locked_until: datetime | None
    expires: datetime
    response_status: int | None
    response_headers: list[list[str]]
    response_body: bytes


class Statements:
    """The SQL of the store's statements for one database; parameters come per call."""

    def __init__(self, connection: BaseDatabaseWrapper) -> None:
        quote = connection.ops.quote_name
        self.table = quote(IdempotencyKey._meta.db_table)
        names = {*ROW_COLUMNS, *NEW_ROW_COLUMNS, "completed"}
        column = {name: quote(_column(name)) for name in names}
        self.column = column
        self.row_columns = ", ".join(column[name] for name in ROW_COLUMNS)
        self.new_row_columns = ", ".join(column[name] for name in NEW_ROW_COLUMNS)
        self.unique_columns = f"{column['scope']}, {column['key']}"
        self.where_key = f"{column['scope']} = %s AND {column['key']} = %s"
        self.select = f"SELECT {self.row_columns} FROM {self.table} WHERE {self.where_key}"
        placeholders = ", ".join(["%s"] * len(NEW_ROW_COLUMNS))
        self.insert = f"INSERT INTO {self.table} ({self.new_row_columns}) VALUES ({placeholders})"
        #: The insert that does nothing when the key is taken (SQLite, PostgreSQL).
        self.insert_unless_taken = f"{self.insert} ON CONFLICT ({self.unique_columns}) DO NOTHING"
        #: MariaDB/MySQL: the insert that does nothing when the key is taken,
        #: and the read of the row that took it (nothing when the insert was
        #: the previous statement and inserted). A duplicate raises no error,
        #: so the claim needs no savepoint to keep the transaction usable.
        self.insert_ignore = (
            f"INSERT IGNORE INTO {self.table} ({self.new_row_columns}) VALUES ({placeholders})"
        )
        self.select_unless_inserted = (
            f"SELECT {self.row_columns} FROM {self.table}"
            f" WHERE ROW_COUNT() = 0 AND {self.where_key}"
        )
        self.complete = (
            f"UPDATE {self.table} SET {column['state']} = %s, {column['locked_until']} = NULL, "
            f"{column['response_status']} = %s, {column['response_headers']} = %s, "
            f"{column['response_body']} = %s, {column['completed']} = %s, "
            f"{column['expires']} = %s WHERE {self.where_key} AND {column['token']} = %s"
        )
        self.release = f"DELETE FROM {self.table} WHERE {self.where_key} AND {column['token']} = %s"
        self.db_types = {name: _db_type(name, connection) for name in NEW_ROW_COLUMNS}


def new_row_params(connection: BaseDatabaseWrapper, values: dict[str, Any]) -> list[Any]:
    """Parameters of :attr:`Statements.insert` from the field values of a new row."""
    return [_param(connection, name, values[name]) for name in NEW_ROW_COLUMNS]


def completion_params(
    connection: BaseDatabaseWrapper,
    *,
    status: int,
    headers: list[list[str]],
    body: bytes,
    completed: datetime,
    expires: datetime,
    scope: str,
    key: str,
    token: str,
) -> list[Any]:
    """Parameters of :attr:`Statements.complete`."""
    adapt = connection.ops.adapt_datetimefield_value
    return [
        IdempotencyKey.State.COMPLETED.value,
        status,
        _HEADERS.get_db_prep_save(headers, connection),
        _binary(connection, body),
        adapt(completed),
        adapt(expires),
        scope,
        key,
        token,
    ]


def prepares(connection: BaseDatabaseWrapper) -> bool:
    """Whether ``connection`` prepares statements (psycopg 3, ``prepare_threshold`` set).

    Django leaves it off by default, for connection poolers in transaction mode.
    """
    if connection.vendor != "postgresql":
        return False
    connection.ensure_connection()
    threshold = getattr(connection.connection, "prepare_threshold", None)
    return threshold is not None and threshold != ONLY_WHEN_ASKED


#: psycopg's ``prepare_threshold`` on connections Django left unprepared: no
#: statement is executed this often, so only those run with ``prepare=True``
#: (the store's) are prepared.
ONLY_WHEN_ASKED = 2**62


def is_psycopg3(connection: BaseDatabaseWrapper) -> bool:
    database: Any = connection.Database  # type: ignore[attr-defined]
    return connection.vendor == "postgresql" and database.__name__ == "psycopg"


def cursor(connection: BaseDatabaseWrapper, *, prepare: bool = False) -> CursorWrapper:
    """A cursor for the store's statements.

    With ``prepare`` (psycopg 3), each statement is prepared on the server the
    first time a connection runs it, whatever its ``prepare_threshold``: their
    text never changes, so the server parses and plans each once per
    connection. On connections that :func:`prepares` anyway, they use
    server-side binding even where the ORM does not. Otherwise this is
    ``connection.cursor()``.
    """
    prepared = is_psycopg3(connection) and (prepare or prepares(connection))
    if not prepared:
        return connection.cursor()
    connection.ensure_connection()
    connection.validate_thread_sharing()
    raw: Any = connection.connection
    if prepare and raw.prepare_threshold is None:
        # psycopg prepares nothing at all, not even what is asked, while the
        # threshold is None (Django's default): a threshold no statement
        # reaches lets it prepare what is asked, and only that.
        raw.prepare_threshold = ONLY_WHEN_ASKED
    cursor_class = _preparing_cursor() if prepare else _server_binding_cursor()
    server_bound = cursor_class(raw)
    if connection.queries_logged:
        return connection.make_debug_cursor(server_bound)
    return connection.make_cursor(server_bound)


@functools.cache
def _server_binding_cursor() -> Any:
    # Importable only where psycopg is installed.
    from django.db.backends.postgresql.base import ServerBindingCursor

    return ServerBindingCursor


@functools.cache
def _preparing_cursor() -> Any:
    base: Any = _server_binding_cursor()

    class PreparingCursor(base):  # type: ignore[misc]
        """Prepares every statement it runs (unless told ``prepare=False``)."""

        def execute(
            self, query: Any, params: Any = None, *, prepare: bool | None = None, **kwargs: Any
        ) -> Any:
            return super().execute(query, params, prepare=prepare is not False, **kwargs)

    return PreparingCursor


def fetch_row(
    connection: BaseDatabaseWrapper, cursor: CursorWrapper, scope: str, key: str
) -> Row | None:
    """The stored row of (scope, key), if any."""
    cursor.execute(statements(connection).select, [scope, key])
    values = cursor.fetchone()
    return None if values is None else to_row(connection, values)


def to_row(connection: BaseDatabaseWrapper, values: tuple[Any, ...] | list[Any]) -> Row:
    """A :class:`Row` from the values of :data:`ROW_COLUMNS`, as the driver gives them."""
    pk, state, fingerprint, token, locked_until, expires, status, headers, body = values
    if isinstance(headers, (str, bytes)):
        # The JSON column comes as text (the ORM decodes it in the field).
        headers = json.loads(headers)
    return Row(
        pk=pk,
        state=state,
        fingerprint=fingerprint,
        token=token,
        locked_until=_from_db(connection, locked_until),
        expires=_from_db(connection, expires),
        response_status=status,
        response_headers=headers or [],
        response_body=bytes(body or b""),
    )


def _param(connection: BaseDatabaseWrapper, name: str, value: Any) -> Any:
    if isinstance(value, datetime):
        return connection.ops.adapt_datetimefield_value(value)
    if name == "response_headers":
        return _HEADERS.get_db_prep_save(value, connection)
    if isinstance(value, bytes):
        return _binary(connection, value)
    return value


def _binary(connection: BaseDatabaseWrapper, value: bytes) -> Any:
    database: Any = connection.Database  # type: ignore[attr-defined]
    return database.Binary(value)


def _from_db(connection: BaseDatabaseWrapper, value: datetime | None) -> Any:
    # Without time zone support the database hands back naive datetimes in the
    # connection's time zone, which the ORM's converters would make aware.
    if value is not None and settings.USE_TZ and timezone.is_naive(value):
        return timezone.make_aware(value, connection.timezone)
    return value


_statements: dict[tuple[str, str], Statements] = {}


def statements(connection: BaseDatabaseWrapper) -> Statements:
    """The :class:`Statements` of ``connection``'s database, built on first use."""
    cache_key = (connection.alias, connection.vendor)
    built = _statements.get(cache_key)
    if built is None:
        built = _statements[cache_key] = Statements(connection)
    return built


def _field(name: str) -> Field[Any, Any]:
    field = IdempotencyKey._meta.get_field(name)
    assert isinstance(field, Field)
    return field


def _column(name: str) -> str:
    column = _field(name).column
    assert column is not None  # a concrete field always has one
    return column


def _db_type(name: str, connection: BaseDatabaseWrapper) -> str:
    db_type = _field(name).db_type(connection)
    assert db_type is not None  # a concrete column always has one
    return db_type


_HEADERS = _field("response_headers")
