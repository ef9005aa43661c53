"""Counting the SQL statements a request runs, transaction control included."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from django.db.backends.base.base import BaseDatabaseWrapper
from django.test.utils import CaptureQueriesContext

TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")
SESSION_SETTINGS = ("SET", "PRAGMA")


def kind(sql: str) -> str:
    """``transaction``, ``setting`` (lock timeouts) or ``data``."""
    verb = sql.lstrip().split(None, 1)[0].upper() if sql.strip() else ""
    if verb in TRANSACTION_CONTROL:
        return "transaction"
    if verb in SESSION_SETTINGS:
        return "setting"
    return "data"


@dataclass(frozen=True)
class Statements:
    sql: tuple[str, ...]

    @property
    def kinds(self) -> Counter[str]:
        return Counter(kind(sql) for sql in self.sql)

    @property
    def beyond_transaction_control(self) -> int:
        kinds = self.kinds
        return kinds["setting"] + kinds["data"]

    def outline(self, width: int = 70) -> list[str]:
        """The statements, shortened to be read in a table."""
        return [_shorten(sql, width) for sql in self.sql]


@contextlib.contextmanager
def capture(connection: BaseDatabaseWrapper) -> Iterator[list[Statements]]:
    """Capture what runs on ``connection``; the result is appended on exit.

    Django logs BEGIN, COMMIT and ROLLBACK beside the statements that go
    through a cursor, so transaction control is counted too.
    """
    result: list[Statements] = []
    with CaptureQueriesContext(connection) as context:
        yield result
    result.append(Statements(tuple(query["sql"] for query in context.captured_queries)))


def _shorten(sql: str, width: int) -> str:
    sql = " ".join(sql.split())
    return sql if len(sql) <= width else sql[: width - 1] + "…"
