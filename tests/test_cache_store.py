"""The Redis store (django-redis), against the real Redis named by ``REDIS_URL``.

The lease contract it shares with the database store is in ``test_lease.py``
(parametrised over both); here are the HTTP contract on both stores, what is
particular to Redis (records, expiry, key names), an unreachable Redis, and
the configuration checks.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from django.core.checks import Error
from django.core.exceptions import ImproperlyConfigured
from django.http.response import HttpResponseBase
from django.test import Client
from django_redis import get_redis_connection

from django_idempotency.checks import check_settings
from django_idempotency.decorators import idempotent_function
from django_idempotency.engine import Call, Policy, Snapshot, run
from django_idempotency.exceptions import StoreUnavailable
from django_idempotency.protocol import Execute
from django_idempotency.stores import cache, get_store
from django_idempotency.stores.cache import CacheStore
from tests.lease_stores import (
    REDIS,
    STORES,
    lease_store_fixture,  # noqa: F401
    redis_records_fixture,  # noqa: F401
    replayed,
    stored,
)
from tests.testapp.models import Order

START = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
CALL = Call(scope="tests", key="call-1", fingerprint="f" * 64, method="POST", path="/x/")
POLICY = Policy(mode="lease", lease=30, retention=3600, store=REDIS)
REDIS_BACKEND = "django_idempotency.stores.cache.CacheStore"


def post(
    data: dict[str, Any] | None = None, *, key: str | None = "cache-key-1"
) -> HttpResponseBase:
    headers = {} if key is None else {"Idempotency-Key": key}
    response: HttpResponseBase = Client(raise_request_exception=False).post(
        "/plain/",
        json.dumps({"item": "widget"} if data is None else data),
        content_type="application/json",
        headers=headers,
    )
    return response


def problem_type(response: HttpResponseBase) -> str:
    assert response["Content-Type"] == "application/problem+json"
    slug: str = json.loads(response.content)["type"]  # type: ignore[attr-defined]
    return slug.rsplit(":", 1)[-1]


@pytest.fixture
def redis_store(settings: Any, redis_records: None) -> CacheStore:
    settings.IDEMPOTENCY_STORES = STORES
    store = get_store(REDIS)
    assert isinstance(store, CacheStore)
    return store


@pytest.fixture
def closed_port() -> int:
    """A local TCP port nothing listens on: bound once, then closed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
def unreachable(settings: Any, closed_port: int) -> dict[str, Any]:
    """Store aliases on a Redis that refuses connections: fail closed and fail open."""
    settings.CACHES = {
        **settings.CACHES,
        "down": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": f"redis://127.0.0.1:{closed_port}/0",
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 1, "SOCKET_TIMEOUT": 1},
        },
    }
    stores = {
        **STORES,
        "closed": {"BACKEND": REDIS_BACKEND, "OPTIONS": {"CACHE": "down"}},
        "open": {"BACKEND": REDIS_BACKEND, "OPTIONS": {"CACHE": "down", "FAIL_OPEN": True}},
    }
    settings.IDEMPOTENCY_STORES = stores
    settings.IDEMPOTENCY_MODE = "lease"
    return stores


# The HTTP contract, on both stores -------------------------------------------


@pytest.mark.django_db
def test_a_new_key_runs_once_and_its_response_is_replayed(lease_store: str) -> None:
    first = post()
    replay = post()

    assert first.status_code == 201
    assert replay.status_code == 201
    assert replay.content == first.content
    assert replay["Content-Type"] == first["Content-Type"]
    assert replay["Location"] == first["Location"]
    assert replay["Idempotent-Replayed"] == "true"
    assert not replay.has_header("X-Not-Replayed")
    assert Order.objects.count() == 1


@pytest.mark.django_db
def test_a_key_reused_for_a_different_body_is_422(lease_store: str) -> None:
    post()

    mismatch = post({"item": "gadget"})

    assert mismatch.status_code == 422
    assert problem_type(mismatch) == "fingerprint-mismatch"
    assert Order.objects.count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize("status", [401, 403, 408, 429, 500])
def test_statuses_a_retry_may_fix_are_not_kept(lease_store: str, status: int) -> None:
    post({"item": "widget", "status": status})
    post({"item": "widget", "status": status})

    assert Order.objects.count() == 2
    assert stored(lease_store, "anonymous", "cache-key-1") is None


@pytest.mark.django_db
def test_other_4xx_are_outcomes_and_replayed(lease_store: str) -> None:
    first = post({"item": "widget", "status": 409})
    replay = post({"item": "widget", "status": 409})

    assert first.status_code == replay.status_code == 409
    assert replay["Idempotent-Replayed"] == "true"
    assert Order.objects.count() == 1


@pytest.mark.django_db
def test_set_cookie_is_never_stored(lease_store: str) -> None:
    first = post({"item": "widget", "cookie": True})
    replay = post({"item": "widget", "cookie": True})

    assert "secret" in first.cookies
    assert "secret" not in replay.cookies
    assert replay["Idempotent-Replayed"] == "true"


@pytest.mark.django_db
def test_a_streaming_response_is_not_stored(lease_store: str) -> None:
    first = post({"stream": True})
    again = post({"stream": True})

    assert first.status_code == again.status_code == 201
    assert not again.has_header("Idempotent-Replayed")
    assert stored(lease_store, "anonymous", "cache-key-1") is None


@pytest.mark.django_db
def test_a_missing_key_is_400_and_nothing_runs(lease_store: str) -> None:
    response = post(key=None)

    assert response.status_code == 400
    assert problem_type(response) == "key-missing"
    assert Order.objects.count() == 0


@pytest.mark.django_db
def test_a_key_past_its_retention_is_new(lease_store: str, time_machine: Any) -> None:
    time_machine.move_to(START, tick=False)
    post()
    time_machine.shift(timedelta(hours=24, seconds=1))

    again = post()

    assert again.status_code == 201
    assert not again.has_header("Idempotent-Replayed")
    assert Order.objects.count() == 2


@pytest.mark.django_db
def test_keys_of_different_scopes_do_not_meet(lease_store: str) -> None:
    store = get_store(lease_store)
    policy = Policy(mode="lease", lease=30, retention=60, store=lease_store)
    claim = store.claim(CALL, policy)
    store.complete(claim, Snapshot(201, body=b"tests"), policy)

    other = store.claim(Call("other", CALL.key, CALL.fingerprint), policy)

    assert isinstance(other, Execute)


# What Redis holds --------------------------------------------------------------


def test_a_claim_is_one_redis_key_with_a_json_record(
    redis_store: CacheStore, time_machine: Any
) -> None:
    time_machine.move_to(START, tick=False)
    claim = redis_store.claim(CALL, POLICY)

    client = get_redis_connection("redis")
    names = list(client.scan_iter(match="*django_idempotency:*"))
    assert names == [redis_store.record_name(CALL.scope, CALL.key).encode()]
    record = json.loads(client.get(names[0]))
    now_ms = int(START.timestamp() * 1000)
    assert record["state"] == "in_progress"
    assert record["token"] == claim.token
    assert record["fingerprint"] == CALL.fingerprint
    assert record["locked_until"] == now_ms + 30_000
    assert record["expires"] == now_ms + 3_600_000
    assert record["attempts"] == 1
    assert 3_590_000 < client.pttl(names[0]) <= 3_600_000


def test_a_completed_record_keeps_the_snapshot_for_the_retention(redis_store: CacheStore) -> None:
    policy = Policy(mode="lease", lease=30, retention=120, store=REDIS)
    claim = redis_store.claim(CALL, policy)
    snapshot = Snapshot(201, headers=(("Location", "/o/1/"),), body=b"\x00\xffbinary")

    assert redis_store.complete(claim, snapshot, policy)

    name = redis_store.record_name(CALL.scope, CALL.key)
    assert 110_000 < get_redis_connection("redis").pttl(name) <= 120_000
    record = redis_store.record(CALL.scope, CALL.key)
    assert record is not None
    assert record["state"] == "completed"
    assert record["status"] == 201
    assert replayed(redis_store.claim(CALL, policy)) == snapshot


def test_a_snapshot_without_headers_replays_without_headers(redis_store: CacheStore) -> None:
    claim = redis_store.claim(CALL, POLICY)
    redis_store.complete(claim, Snapshot(204), POLICY)

    replay = replayed(redis_store.claim(CALL, POLICY))

    assert replay == Snapshot(204, headers=(), body=b"")


def test_a_lease_longer_than_the_retention_keeps_the_claim_alive(
    redis_store: CacheStore,
) -> None:
    redis_store.claim(CALL, Policy(mode="lease", lease=600, retention=60, store=REDIS))

    name = redis_store.record_name(CALL.scope, CALL.key)
    assert get_redis_connection("redis").pttl(name) > 590_000


def test_a_record_gone_from_redis_is_claimed_anew(redis_store: CacheStore) -> None:
    """The claim script stores a new record where there is none (or it expired)."""
    client = get_redis_connection("redis")
    name = redis_store.record_name(CALL.scope, CALL.key)
    fresh = json.dumps({"state": "in_progress", "token": "t", "fingerprint": CALL.fingerprint})
    verdict = client.register_script(cache._CLAIM)(
        keys=[name], args=[fresh, 0, 60_000], client=client
    )

    assert verdict == [b"claimed"]
    assert json.loads(client.get(name))["token"] == "t"


def test_a_replay_is_one_round_trip_and_a_first_execution_two(redis_store: CacheStore) -> None:
    """Every command of redis-py is one round trip (no pipeline): they are counted."""
    client = get_redis_connection("redis")
    commands: list[str] = []
    send = client.execute_command

    def counted(*args: Any, **kwargs: Any) -> Any:
        commands.append(str(args[0]))
        return send(*args, **kwargs)

    redis_store.claim(CALL, POLICY)  # the scripts loaded (SCRIPT LOAD once per server)
    client.execute_command = counted  # this client object only
    try:
        claim = redis_store.claim(Call(CALL.scope, "call-2", CALL.fingerprint), POLICY)
        assert isinstance(claim, Execute)
        redis_store.complete(claim, Snapshot(201, body=b"made"), POLICY)
        first = list(commands)
        commands.clear()
        replayed(redis_store.claim(Call(CALL.scope, "call-2", CALL.fingerprint), POLICY))
    finally:
        del client.execute_command

    assert first == ["EVALSHA", "EVALSHA"]  # the claim, the completion
    assert commands == ["EVALSHA"]  # the claim finds the outcome


def test_scripts_the_server_forgot_are_sent_again(redis_store: CacheStore) -> None:
    """After SCRIPT FLUSH (or a restart) EVALSHA fails with NOSCRIPT: EVAL sends the text."""
    client = get_redis_connection("redis")
    claim = redis_store.claim(CALL, POLICY)
    assert isinstance(claim, Execute)
    client.script_flush()

    assert redis_store.complete(claim, Snapshot(201, body=b"made"), POLICY)
    client.script_flush()
    assert replayed(redis_store.claim(CALL, POLICY)) == Snapshot(201, body=b"made")
    other = redis_store.claim(Call(CALL.scope, "call-2", CALL.fingerprint), POLICY)
    assert isinstance(other, Execute)
    client.script_flush()
    redis_store.release(other)
    assert redis_store.record(CALL.scope, "call-2") is None
    # EVAL loaded the script: EVALSHA finds it again.
    assert client.script_exists(cache._SHA1[cache._RELEASE]) == [True]


def test_record_names_honour_the_cache_key_prefix_and_are_unambiguous(
    settings: Any, redis_records: None
) -> None:
    settings.CACHES = {
        **settings.CACHES,
        "prefixed": {**settings.CACHES["redis"], "KEY_PREFIX": "shop"},
    }
    store = CacheStore("prefixed", CACHE="prefixed")

    assert store.record_name("a", "b").startswith("shop:")
    assert store.record_name("a:b", "c") != store.record_name("a", "b:c")


# An unreachable Redis ----------------------------------------------------------


@pytest.mark.django_db
def test_fail_closed_answers_503_and_the_view_does_not_run(
    unreachable: dict[str, Any], settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings.IDEMPOTENCY_STORE = "closed"

    with caplog.at_level(logging.ERROR, logger="django_idempotency"):
        response = post()

    assert response.status_code == 503
    assert problem_type(response) == "store-unavailable"
    assert Order.objects.count() == 0
    assert "unavailable" in caplog.text


def test_fail_closed_is_the_default(unreachable: dict[str, Any]) -> None:
    assert get_store("closed").fail_open is False
    with pytest.raises(StoreUnavailable):
        get_store("closed").claim(CALL, POLICY)


@pytest.mark.django_db
def test_fail_open_runs_the_view_unprotected_and_logs_an_error(
    unreachable: dict[str, Any], settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings.IDEMPOTENCY_STORE = "open"

    with caplog.at_level(logging.ERROR, logger="django_idempotency"):
        first = post()
        second = post()

    assert first.status_code == second.status_code == 201
    assert not second.has_header("Idempotent-Replayed")
    assert Order.objects.count() == 2  # nothing protected it
    assert "unprotected" in caplog.text


def test_fail_open_runs_an_idempotent_function(unreachable: dict[str, Any]) -> None:
    calls: list[int] = []

    @idempotent_function(key=lambda n: n, store="open")
    def count(n: int) -> int:
        calls.append(n)
        return n

    assert count(1) == count(1) == 1
    assert calls == [1, 1]


@pytest.fixture
def own_redis(settings: Any, closed_port: int) -> Iterator[Callable[[], None]]:
    """A Redis server of the test's own on a free port; calling the fixture kills it.

    The store alias "own" lives on it, so that the test can lose Redis for
    real between two store operations, whatever else uses the shared Redis.
    """
    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server (apt-get install redis-server)")
    options = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    server = subprocess.Popen(
        ["redis-server", "--port", str(closed_port), *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_until_listening(closed_port)
        settings.CACHES = {
            **settings.CACHES,
            "own": {
                "BACKEND": "django_redis.cache.RedisCache",
                "LOCATION": f"redis://127.0.0.1:{closed_port}/0",
                "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 1, "SOCKET_TIMEOUT": 1},
            },
        }
        settings.IDEMPOTENCY_STORES = {
            **STORES,
            "own": {"BACKEND": REDIS_BACKEND, "OPTIONS": {"CACHE": "own"}},
        }

        def stop() -> None:
            server.kill()
            server.wait(timeout=10)

        yield stop
    finally:
        server.kill()
        server.wait(timeout=10)


def _wait_until_listening(port: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
                connection.sendall(b"PING\r\n")
                if connection.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.02)  # the server is starting: poll, bounded


OWN = replace(POLICY, store="own")


def test_redis_going_away_after_the_claim_still_returns_the_result(
    own_redis: Callable[[], None], caplog: pytest.LogCaptureFixture
) -> None:
    def view() -> str:
        own_redis()  # Redis dies while the view runs: the claim is made, completion fails
        return "done"

    with caplog.at_level(logging.ERROR, logger="django_idempotency"):
        outcome = run(CALL, OWN, view, lambda result: Snapshot(200))

    assert outcome.result == "done"  # type: ignore[union-attr]
    assert "was not stored" in caplog.text


def test_redis_going_away_while_releasing_keeps_the_original_error(
    own_redis: Callable[[], None],
) -> None:
    def fail() -> None:
        own_redis()
        raise ValueError("the protected code failed")

    with pytest.raises(ValueError, match="protected code failed"):
        run(CALL, OWN, fail, lambda result: Snapshot(200))


def test_a_redis_that_is_down_from_the_start_is_503_not_500(
    own_redis: Callable[[], None],
) -> None:
    own_redis()
    with pytest.raises(StoreUnavailable):
        run(CALL, OWN, lambda: "never", lambda result: Snapshot(200))


# Configuration -----------------------------------------------------------------


def error_ids() -> list[str]:
    return [error.id or "" for error in check_settings() if isinstance(error, Error)]


def test_atomic_mode_on_the_redis_store_is_a_system_check_error(settings: Any) -> None:
    settings.IDEMPOTENCY_STORES = STORES
    settings.IDEMPOTENCY_STORE = REDIS
    settings.IDEMPOTENCY_MODE = "atomic"

    assert "django_idempotency.E013" in error_ids()


def test_lease_mode_on_the_redis_store_passes_the_checks(settings: Any) -> None:
    settings.IDEMPOTENCY_STORES = STORES
    settings.IDEMPOTENCY_STORE = REDIS
    settings.IDEMPOTENCY_MODE = None

    assert error_ids() == []


@pytest.mark.parametrize(
    "options",
    [
        {"CACHE": "nowhere"},
        {"CACHE": "default"},  # LocMemCache, not django-redis
        {"CACHE": "redis", "FAIL_OPEN": "yes"},
        {"CACHE": "redis", "TIMEOUT": 5},
    ],
    ids=["unknown-cache", "not-redis", "fail-open-not-bool", "unknown-option"],
)
def test_a_misconfigured_redis_store_is_a_system_check_error(
    settings: Any, options: dict[str, Any]
) -> None:
    settings.IDEMPOTENCY_STORES = {**STORES, "bad": {"BACKEND": REDIS_BACKEND, "OPTIONS": options}}

    assert "django_idempotency.E012" in error_ids()


def test_atomic_mode_asked_of_the_redis_store_at_run_time_is_refused(
    redis_store: CacheStore,
) -> None:
    with pytest.raises(ImproperlyConfigured, match='supports only mode="lease"'):
        run(
            CALL,
            Policy(mode="atomic", store=REDIS),
            lambda: None,
            lambda result: Snapshot(200),
        )
