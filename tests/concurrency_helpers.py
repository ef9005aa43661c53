"""Real threads against the real database, for the concurrency tests.

Every thread has its own ``Client`` and its own database connection (Django's
connections are per thread), which it closes when done. A view's exception is
recorded for the thread that raised it: the test client's own mechanism, a
global signal, would hand it to every client in flight at that moment. Overlap is made
certain with barriers and events, never with sleeps: a :class:`Gate` holds
the first execution inside the view until the test has seen the others
blocked or answered.
"""

from __future__ import annotations

import base64
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.core.signals import got_request_exception
from django.db import connection, connections
from django.http.response import HttpResponseBase
from django.test import Client

#: Upper bound for any wait in these tests; a correct run takes far less.
PATIENCE = 15.0


def basic_auth(username: str, password: str) -> str:
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return f"Basic {token}"


@dataclass
class Gate:
    """Installed as the view hook: holds the first execution until released.

    Later executions pass straight through; ``executions`` counts them all.
    Once released, the held execution calls ``then`` (if given); with
    ``fail_first`` it then raises, after its write, as a failing view would.
    """

    fail_first: bool = False
    then: Callable[[], None] | None = None
    entered: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    executions: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self) -> None:
        with self._lock:
            self.executions += 1
            first = self.executions == 1
        if not first:
            return
        self.entered.set()
        if not self.released.wait(PATIENCE):
            raise AssertionError("the held execution was never released")
        if self.then is not None:
            self.then()
        if self.fail_first:
            from tests.testapp.views import Boom

            raise Boom("the first execution fails after its write")

    def wait_entered(self) -> None:
        assert self.entered.wait(PATIENCE), "the first execution never started"


@dataclass
class Answer:
    """What one thread got: a response, or the exception its request raised."""

    response: HttpResponseBase | None = None
    error: BaseException | None = None
    seconds: float = 0.0

    @property
    def status(self) -> int | None:
        return None if self.response is None else self.response.status_code

    @property
    def replayed(self) -> bool:
        return self.response is not None and self.response.get("Idempotent-Replayed") == "true"

    def json(self) -> Any:
        assert self.response is not None
        return json.loads(self.response.content)  # type: ignore[attr-defined]


class Crowd:
    """``size`` threads that send their requests at the same instant."""

    def __init__(self, size: int, send: Callable[[Client, int], HttpResponseBase]) -> None:
        self.size = size
        self._send = send
        self._started = threading.Event()
        self._start = threading.Barrier(size, action=self._started.set)
        self._answered = threading.Condition()
        self._answers: list[Answer] = []
        self._errors: dict[int, BaseException | None] = {}
        self._threads = [
            threading.Thread(target=self._run, args=(index,), name=f"crowd-{index}")
            for index in range(size)
        ]

    def start(self) -> Crowd:
        got_request_exception.connect(self._record_error, dispatch_uid=id(self), weak=False)
        for thread in self._threads:
            thread.start()
        return self

    @property
    def answered(self) -> int:
        with self._answered:
            return len(self._answers)

    def wait_until_started(self) -> None:
        """Block until every thread is past the start barrier."""
        if not self._started.wait(PATIENCE):
            raise AssertionError("the crowd never started")

    def wait_for_answers(self, count: int) -> None:
        """Block until ``count`` requests have been answered."""
        with self._answered:
            if not self._answered.wait_for(lambda: len(self._answers) >= count, PATIENCE):
                raise AssertionError(f"only {len(self._answers)} of {count} answers arrived")

    def answers(self) -> list[Answer]:
        """All answers, once every thread has finished."""
        for thread in self._threads:
            thread.join(PATIENCE)
            assert not thread.is_alive(), f"{thread.name} is stuck"
        got_request_exception.disconnect(dispatch_uid=id(self))
        return list(self._answers)

    def _record_error(self, **kwargs: Any) -> None:
        # Sent by Django's handler in the thread whose view raised.
        self._errors[threading.get_ident()] = sys.exc_info()[1]

    def _run(self, index: int) -> None:
        answer = Answer()
        try:
            client = Client(raise_request_exception=False)
            self._start.wait(PATIENCE)
            began = time.monotonic()
            try:
                answer.response = self._send(client, index)
            finally:
                answer.seconds = time.monotonic() - began
                answer.error = self._errors.pop(threading.get_ident(), None)
        except BaseException as error:  # recorded for the test to assert on
            answer.error = error
        finally:
            connections.close_all()
            with self._answered:
                self._answers.append(answer)
                self._answered.notify_all()


def lock_waiters() -> int | None:
    """How many sessions on the test database wait for a lock right now.

    ``None`` on SQLite, which cannot tell: its writers wait in a busy loop.
    """
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        elif connection.vendor == "mysql":
            # Row lock waits in InnoDB, and waits for a named lock (GET_LOCK).
            cursor.execute(
                "SELECT (SELECT count(*) FROM information_schema.innodb_trx AS trx"
                " JOIN information_schema.processlist AS process"
                " ON process.id = trx.trx_mysql_thread_id"
                " WHERE trx.trx_state = 'LOCK WAIT' AND process.db = DATABASE())"
                " + (SELECT count(*) FROM information_schema.processlist"
                " WHERE state = 'User lock' AND db = DATABASE())"
            )
        else:
            return None
        (count,) = cursor.fetchone()
    return int(count)


def wait_until(
    condition: Callable[[], bool], what: Callable[[], str], interval: float = 0.01
) -> None:
    """Poll an observable condition (not a guess at timing) up to PATIENCE."""
    deadline = time.monotonic() + PATIENCE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what()}")
        time.sleep(interval)


def wait_for_lock_waiters(count: int) -> None:
    """Block until ``count`` sessions on the test database wait for a lock."""
    wait_until(
        lambda: (lock_waiters() or 0) >= count,
        lambda: f"{count} sessions wait on a lock ({lock_waiters()} do)",
        # MariaDB serves information_schema.innodb_trx from a cache it refreshes
        # only when unread for 100 ms: faster polling would freeze the count.
        interval=0.15,
    )
