"""The PostgreSQL claim: one statement, no lock-timeout juggling on the hot path.

A transaction-level advisory lock on a 64-bit hash of (scope, key) says who is
claiming a key right now. The claim statement takes it without waiting and,
only if it got it, inserts the row (``ON CONFLICT DO NOTHING``), so it never
blocks behind another transaction's uncommitted row of the same key. Only when
the key is contended and the caller chose to wait does a bounded wait happen,
on the advisory lock itself.
"""

from __future__ import annotations

import enum
import hashlib
from typing import Any

from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Field

from django_idempotency.engine import Call
from django_idempotency.exceptions import RequestInProgress
from django_idempotency.models import IdempotencyKey


class Inserted(enum.Enum):
    #: The row is ours.
    CLAIMED = "claimed"
    #: A committed row holds the key; nobody else is claiming it now.
    TAKEN = "taken"
    #: Another transaction is claiming the key at this moment.
    CONTENDED = "contended"


def lock_id(call: Call) -> int:
    """A signed 64-bit advisory lock id for the call's (scope, key)."""
    digest = hashlib.sha256(f"{call.scope}\0{call.key}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def insert(connection: BaseDatabaseWrapper, call: Call, values: dict[str, Any]) -> Inserted:
    sql, params = _claim_sql(connection, values)
    with connection.cursor() as cursor:
        cursor.execute(sql, [lock_id(call), *params])
        acquired, inserted = cursor.fetchone()
    if inserted:
        return Inserted.CLAIMED
    return Inserted.TAKEN if acquired else Inserted.CONTENDED


def wait_for(connection: BaseDatabaseWrapper, call: Call, seconds: float, retry_after: int) -> None:
    """Wait up to ``seconds`` until the transaction claiming ``call``'s key ends.

    Raises :class:`RequestInProgress` at once when ``seconds`` is 0; on timeout,
    PostgreSQL's lock_timeout error propagates (the store turns it into 409).
    """
    if seconds <= 0:
        raise RequestInProgress(retry_after=retry_after)
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL lock_timeout = %s", [f"{max(1, int(seconds * 1000))}ms"])
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [lock_id(call)])
        cursor.execute("SET LOCAL lock_timeout TO DEFAULT")


def _claim_sql(connection: BaseDatabaseWrapper, values: dict[str, Any]) -> tuple[str, list[Any]]:
    quote = connection.ops.quote_name
    columns, casts, params = [], [], []
    for name, value in values.items():
        field = _field(name)
        columns.append(quote(_column(field)))
        # Explicit casts: in INSERT ... SELECT the parameters carry no type.
        casts.append(f"CAST(%s AS {field.db_type(connection)})")
        params.append(field.get_db_prep_save(value, connection))
    unique = ", ".join(quote(_column(_field(name))) for name in ("scope", "key"))
    table = quote(IdempotencyKey._meta.db_table)
    sql = (
        "WITH lock AS (SELECT pg_try_advisory_xact_lock(%s) AS acquired), "
        f"claimed AS (INSERT INTO {table} ({', '.join(columns)}) "
        f"SELECT {', '.join(casts)} FROM lock WHERE lock.acquired "
        f"ON CONFLICT ({unique}) DO NOTHING RETURNING 1) "
        "SELECT lock.acquired, EXISTS (SELECT 1 FROM claimed) FROM lock"
    )
    return sql, params


def _field(name: str) -> Field[Any, Any]:
    field = IdempotencyKey._meta.get_field(name)
    assert isinstance(field, Field)
    return field


def _column(field: Field[Any, Any]) -> str:
    assert field.column is not None  # a concrete field always has one
    return field.column
