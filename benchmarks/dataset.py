"""Filling the key table fast, emptying it, and timing a purge of it."""

from __future__ import annotations

import importlib.util
import io
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.core.management import call_command
from django.core.management.color import no_style
from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.test import RequestFactory
from django.utils import timezone

from benchmarks.clients import BODY
from benchmarks.models import Order
from django_idempotency.fingerprints import request_fingerprint
from django_idempotency.models import IdempotencyKey

PURGE_COMMAND = "django_idempotency.management.commands.purge_idempotency_keys"
FALLBACK_BATCH = 10_000
SNAPSHOT_BODY = b'{"id": 0, "item": "book"}'
SNAPSHOT_HEADERS = [["Content-Type", "application/json"]]


def fingerprint(path: str) -> str:
    """The fingerprint of the benchmark's request to ``path``."""
    request = RequestFactory().post(path, BODY, content_type="application/json")
    return request_fingerprint(request)


def empty_tables() -> None:
    """Delete every key and order (TRUNCATE where the database has it)."""
    tables = [IdempotencyKey._meta.db_table, Order._meta.db_table]
    with connection.cursor() as cursor:
        for sql in connection.ops.sql_flush(no_style(), tables):
            cursor.execute(sql)


def insert_keys(path: str, prefix: str, start: int, stop: int, *, expired: bool) -> None:
    """Store completed keys ``prefix<start>`` .. ``prefix<stop-1>`` for ``path``.

    PostgreSQL and SQLite generate the rows in one ``INSERT ... SELECT``;
    other databases get ``bulk_create`` in chunks.
    """
    if stop <= start:
        return
    now = timezone.now()
    created = now - timedelta(days=2) if expired else now
    expires = now - timedelta(days=1) if expired else now + timedelta(days=1)
    values = _row_values(path, created, expires)
    if connection.vendor in ("postgresql", "sqlite"):
        _insert_generated(prefix, start, stop, values)
    else:
        _insert_chunks(prefix, start, stop, values)
    _analyze()


def count_keys(*, expired: bool) -> int:
    now = timezone.now()
    keys = IdempotencyKey.objects.all()
    return (keys.filter(expires__lte=now) if expired else keys.filter(expires__gt=now)).count()


def _row_values(path: str, created: datetime, expires: datetime) -> dict[str, Any]:
    return {
        "scope": "anonymous",
        "fingerprint": fingerprint(path),
        "method": "POST",
        "path": path,
        "state": IdempotencyKey.State.COMPLETED.value,
        "attempts": 1,
        "response_status": 201,
        "response_headers": SNAPSHOT_HEADERS,
        "response_body": SNAPSHOT_BODY,
        "created": created,
        "completed": created,
        "expires": expires,
    }


def _insert_generated(prefix: str, start: int, stop: int, values: dict[str, Any]) -> None:
    ops = connection.ops
    columns = ["key", "token", *values]
    params: list[Any] = []
    expressions = []
    for name, value in values.items():
        field = IdempotencyKey._meta.get_field(name)
        if name == "response_headers":
            value = json.dumps(value)
        elif field.get_internal_type() == "DateTimeField":
            value = ops.adapt_datetimefield_value(value)
        params.append(value)
        expressions.append("%s::jsonb" if _is_postgres_json(name) else "%s")
    column_list = ", ".join(ops.quote_name(_column(name)) for name in columns)
    table = ops.quote_name(IdempotencyKey._meta.db_table)
    if connection.vendor == "postgresql":
        numbers = "SELECT g AS n FROM generate_series(%s, %s) AS g"
        prefix_sql = ""
    else:
        numbers = "SELECT n FROM numbers"
        prefix_sql = (
            "WITH RECURSIVE numbers(n) AS "
            "(SELECT %s UNION ALL SELECT n + 1 FROM numbers WHERE n < %s) "
        )
    sql = (
        f"{prefix_sql}INSERT INTO {table} ({column_list}) "
        f"SELECT %s || n, 'bulk' || n, {', '.join(expressions)} "
        f"FROM ({numbers}) AS series"
    )
    if connection.vendor == "postgresql":
        all_params = [prefix, *params, start, stop - 1]
    else:
        all_params = [start, stop - 1, prefix, *params]
    with connection.cursor() as cursor:
        cursor.execute(sql, all_params)


def _is_postgres_json(name: str) -> bool:
    return name == "response_headers" and connection.vendor == "postgresql"


def _column(name: str) -> str:
    return str(IdempotencyKey._meta.get_field(name).column)


def _insert_chunks(prefix: str, start: int, stop: int, values: dict[str, Any]) -> None:
    for chunk_start in range(start, stop, 5_000):
        rows = [
            IdempotencyKey(key=f"{prefix}{n}", token=f"bulk{n}", **values)
            for n in range(chunk_start, min(stop, chunk_start + 5_000))
        ]
        IdempotencyKey.objects.bulk_create(rows)


def _analyze() -> None:
    # Statistics (and, on PostgreSQL, the visibility map) as after a quiet
    # night, so that plans and index-only scans match a long-running table.
    table = connection.ops.quote_name(IdempotencyKey._meta.db_table)
    statement = {
        "postgresql": f"VACUUM ANALYZE {table}",
        "sqlite": "ANALYZE",
        "mysql": f"ANALYZE TABLE {table}",
    }.get(connection.vendor)
    if statement:
        with connection.cursor() as cursor:
            cursor.execute(statement)


@dataclass(frozen=True)
class PurgeResult:
    method: str
    deleted: int
    seconds: float
    statements: int
    longest_seconds: float
    longest_sql: str
    #: Longest time from a transaction's first statement to its commit.
    longest_transaction: float

    @property
    def rows_per_second(self) -> float:
        return self.deleted / self.seconds if self.seconds else 0.0


def purge_expired() -> PurgeResult:
    """Delete the expired keys with the purge command (or batches by pk without it)."""
    timings = _Timings()
    before = count_keys(expired=True)
    started = time.perf_counter()
    with timings.recording():
        if importlib.util.find_spec(PURGE_COMMAND) is not None:
            output = io.StringIO()
            call_command("purge_idempotency_keys", stdout=output, stderr=io.StringIO())
            method = "`manage.py purge_idempotency_keys` with its defaults"
        else:
            _delete_in_batches(FALLBACK_BATCH)
            method = f"batched DELETE by pk, {FALLBACK_BATCH} rows (no purge command yet)"
    seconds = time.perf_counter() - started
    deleted = before - count_keys(expired=True)
    longest_seconds, longest_sql = max(timings.statements, default=(0.0, ""))
    return PurgeResult(
        method,
        deleted,
        seconds,
        len(timings.statements),
        longest_seconds,
        longest_sql,
        max(timings.transactions, default=0.0),
    )


def _delete_in_batches(batch: int) -> None:
    now = timezone.now()
    expired = IdempotencyKey.objects.filter(expires__lte=now).order_by()
    while ids := list(expired.values_list("pk", flat=True)[:batch]):
        IdempotencyKey.objects.filter(pk__in=ids).delete()


class _Timings:
    """Durations of statements, and of transactions up to their commit."""

    def __init__(self) -> None:
        self.statements: list[tuple[float, str]] = []
        self.transactions: list[float] = []
        self._transaction_start: float | None = None

    def _time(self, execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        before = time.perf_counter()
        if self._transaction_start is None and not connection.get_autocommit():
            self._transaction_start = before
        try:
            return execute(sql, params, many, context)
        finally:
            self.statements.append((time.perf_counter() - before, sql))

    def _commit(self) -> None:
        wrapper = connections[DEFAULT_DB_ALIAS]
        type(wrapper).commit(wrapper)
        if self._transaction_start is not None:
            self.transactions.append(time.perf_counter() - self._transaction_start)
            self._transaction_start = None

    @contextmanager
    def recording(self) -> Iterator[None]:
        wrapper = connections[DEFAULT_DB_ALIAS]
        wrapper.commit = self._commit  # type: ignore[method-assign]
        try:
            with wrapper.execute_wrapper(self._time):
                yield
        finally:
            del wrapper.commit
