"""The stores lease mode runs on, as one parametrised fixture, and a look inside them.

Test modules import the fixtures they use from here (pytest finds a fixture in
a module's namespace by its ``name``), so the same contract runs against the
database and Redis: ``lease_store`` configures both stores, makes the
parametrised one the default and selects ``lease`` mode.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import connections
from django_redis import get_redis_connection

from django_idempotency.models import IdempotencyKey
from django_idempotency.protocol import Claim, Replay, Snapshot
from django_idempotency.stores import get_store
from django_idempotency.stores.cache import CacheStore
from tests.concurrency_helpers import PATIENCE

DATABASE = "database"
REDIS = "redis"
STORES: dict[str, dict[str, Any]] = {
    DATABASE: {"BACKEND": "django_idempotency.stores.database.DatabaseStore"},
    REDIS: {"BACKEND": "django_idempotency.stores.cache.CacheStore", "OPTIONS": {"CACHE": "redis"}},
}


def clear_redis_records() -> None:
    """Delete this app's records from the test Redis database, nothing else."""
    client = get_redis_connection("redis")
    for name in client.scan_iter(match="*django_idempotency:*"):
        client.delete(name)


@pytest.fixture(name="redis_records")
def redis_records_fixture() -> Iterator[None]:
    clear_redis_records()
    yield
    clear_redis_records()


@pytest.fixture(name="lease_store", params=[DATABASE, REDIS])
def lease_store_fixture(request: pytest.FixtureRequest, settings: Any) -> str:
    """The alias of the store under test, made the default, in lease mode."""
    alias: str = request.param
    settings.IDEMPOTENCY_STORES = STORES
    settings.IDEMPOTENCY_STORE = alias
    settings.IDEMPOTENCY_MODE = "lease"
    if alias == REDIS:
        request.getfixturevalue("redis_records")
    return alias


def replayed(claim: Claim) -> Snapshot:
    """The stored outcome a claim found; fails the test if it won the right to run."""
    assert isinstance(claim, Replay), claim
    return claim.snapshot


def stored(alias: str, scope: str, key: str) -> dict[str, Any] | None:
    """What the store holds for (scope, key): state, token, attempts, fingerprint."""
    store = get_store(alias)
    if isinstance(store, CacheStore):
        return store.record(scope, key)
    row = IdempotencyKey.objects.filter(scope=scope, key=key).first()
    if row is None:
        return None
    return {
        "state": row.state,
        "token": row.token,
        "attempts": row.attempts,
        "fingerprint": row.fingerprint,
    }


class Worker(threading.Thread):
    """Runs ``work`` in its own thread (own database connection) and keeps the outcome."""

    def __init__(self, work: Callable[[], Any], name: str = "worker") -> None:
        super().__init__(name=name, daemon=True)
        self._work = work
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._work()
        except BaseException as error:  # kept for the test to assert on
            self.error = error
        finally:
            connections.close_all()

    def outcome(self) -> Any:
        """Join, re-raise what the work raised, or return its result."""
        self.join(PATIENCE)
        assert not self.is_alive(), f"{self.name} is stuck"
        if self.error is not None:
            raise self.error
        return self.result


def run_together(works: list[Callable[[], Any]]) -> list[Worker]:
    """Start one thread per work, released at the same instant by a barrier."""
    barrier = threading.Barrier(len(works))

    def at_once(work: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            barrier.wait(PATIENCE)
            return work()

        return run

    workers = [Worker(at_once(work), name=f"worker-{i}") for i, work in enumerate(works)]
    for worker in workers:
        worker.start()
    return workers
