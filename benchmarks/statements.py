"""The SQL statements a request runs, transaction control included, and their time."""

from __future__ import annotations

import contextlib
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from django.db.backends.base.base import BaseDatabaseWrapper
from django.test.utils import CaptureQueriesContext

TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")
SESSION_SETTINGS = ("SET", "PRAGMA")


# MariaDB's claim bounds its own lock wait: SET STATEMENT ... FOR INSERT ...
_SET_STATEMENT = re.compile(r"^\s*SET\s+STATEMENT\s.*?\sFOR\s", re.IGNORECASE | re.DOTALL)
# mysqlclient sends several statements in one query ("INSERT ...; SELECT ...").
_NEXT_STATEMENT = re.compile(r";\s+(?=(?:SELECT|INSERT|UPDATE|DELETE)\s)", re.IGNORECASE)


def split(query: str) -> list[str]:
    """The statements of one query as logged: one, or several sent at once."""
    return _NEXT_STATEMENT.split(query)


def kind(sql: str) -> str:
    """``transaction``, ``setting`` (lock timeouts) or ``data``."""
    sql = _SET_STATEMENT.sub("", sql)
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
    # Django logs server-side bound statements as "QUERY = '...' - PARAMS = ...".
    queries = (query["sql"].removeprefix("QUERY = '") for query in context.captured_queries)
    result.append(Statements(tuple(sql for query in queries for sql in split(query))))


def _shorten(sql: str, width: int) -> str:
    sql = " ".join(sql.split())
    return sql if len(sql) <= width else sql[: width - 1] + "…"


class DatabaseClock:
    """Wall time spent waiting on the database: statements, BEGIN and COMMIT.

    Statements are timed by an execute wrapper; BEGIN and COMMIT (or
    ROLLBACK), which Django sends outside cursors, by wrapping the
    connection's methods while the clock is installed.
    """

    def __init__(self, connection: BaseDatabaseWrapper) -> None:
        self.connection = connection
        self.seconds = 0.0

    def _timed(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            before = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - before

        return timed

    @contextlib.contextmanager
    def installed(self) -> Iterator[DatabaseClock]:
        names = ("commit", "rollback", "set_autocommit")
        for name in names:
            setattr(self.connection, name, self._timed(getattr(self.connection, name)))
        wrapper = self._timed(lambda execute, *args: execute(*args))
        try:
            with self.connection.execute_wrapper(wrapper):
                yield self
        finally:
            for name in names:
                delattr(self.connection, name)  # back to the class's methods
