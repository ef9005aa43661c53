"""The engine and the database store in ``atomic`` mode, one request at a time.

Concurrency is in test_concurrency.py and lease mode in test_lease.py; here:
expiry and takeover, mismatch, replay, signals, the transaction around the
view (rollback, ``ATOMIC_REQUESTS``, nested atomic blocks, ``on_commit``) and
the database the keys are written to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connections, transaction
from django.test import Client
from django.utils import timezone

from django_idempotency import signals
from django_idempotency.engine import (
    Call,
    Discard,
    Executed,
    Policy,
    Replayed,
    Snapshot,
    run,
)
from django_idempotency.exceptions import FingerprintMismatch, RequestInProgress
from django_idempotency.models import IdempotencyKey
from django_idempotency.stores import get_store
from tests.conftest import OTHER_DATABASE, Endpoint, fingerprint_for, send
from tests.factories import IdempotencyKeyFactory, OrderFactory
from tests.testapp.models import Order
from tests.testapp.views import Boom

pytestmark = pytest.mark.urls("tests.testapp.urls")

PLAIN = Endpoint("plain", "POST", "/plain/", drf=False)
CALL = Call(scope="tests", key="call-1", fingerprint="f" * 64, method="POST", path="/x/")
ATOMIC = Policy(mode="atomic", retention=3600)
SNAPSHOT = Snapshot(status=201, headers=(("Content-Type", "text/plain"),), body=b"made")


def create_order() -> Order:
    created: Order = OrderFactory()
    return created


def keep(order: Order) -> Snapshot:
    return Snapshot(status=201, body=str(order.pk).encode())


@pytest.fixture
def received() -> Iterator[dict[str, list[Call]]]:
    """The calls each engine signal was sent for."""
    seen: dict[str, list[Call]] = {}
    receivers = []
    for name in ("executed", "replayed", "conflict", "mismatch", "takeover"):
        seen[name] = []

        def receiver(sender: Any, call: Call, _name: str = name, **kwargs: Any) -> None:
            seen[_name].append(call)

        getattr(signals, name).connect(receiver, weak=False)
        receivers.append((name, receiver))
    yield seen
    for name, receiver in receivers:
        getattr(signals, name).disconnect(receiver)


# The engine, without HTTP ----------------------------------------------------------------


@pytest.mark.django_db
def test_run_executes_once_then_replays(received: dict[str, list[Call]]) -> None:
    first = run(CALL, ATOMIC, create_order, keep)
    second = run(CALL, ATOMIC, create_order, keep)

    assert isinstance(first, Executed)
    assert isinstance(second, Replayed)
    assert second.snapshot.body == str(first.result.pk).encode()
    assert Order.objects.count() == 1
    assert received["executed"] == [CALL]
    assert received["replayed"] == [CALL]


@pytest.mark.django_db
def test_run_raises_mismatch_and_signals_it(received: dict[str, list[Call]]) -> None:
    run(CALL, ATOMIC, create_order, keep)
    other = Call(scope=CALL.scope, key=CALL.key, fingerprint="0" * 64)

    with pytest.raises(FingerprintMismatch):
        run(other, ATOMIC, create_order, keep)
    assert received["mismatch"] == [other]
    assert Order.objects.count() == 1
    assert IdempotencyKey.objects.get().fingerprint == CALL.fingerprint


@pytest.mark.django_db
def test_run_raises_conflict_for_a_live_claim(received: dict[str, list[Call]]) -> None:
    IdempotencyKeyFactory(
        in_progress=True, scope=CALL.scope, key=CALL.key, fingerprint=CALL.fingerprint
    )
    with pytest.raises(RequestInProgress) as caught:
        run(CALL, ATOMIC, create_order, keep)

    assert 29 <= caught.value.retry_after <= 30
    assert received["conflict"] == [CALL]
    assert Order.objects.count() == 0


@pytest.mark.django_db
def test_failure_conclusion_rolls_back_and_frees_the_key() -> None:
    outcome = run(CALL, ATOMIC, create_order, lambda order: Discard.FAILURE)

    assert isinstance(outcome, Executed)
    assert not Order.objects.exists()
    assert not IdempotencyKey.objects.exists()


@pytest.mark.django_db
def test_unstorable_conclusion_keeps_the_effects_and_frees_the_key() -> None:
    run(CALL, ATOMIC, create_order, lambda order: Discard.UNSTORABLE)
    run(CALL, ATOMIC, create_order, lambda order: Discard.UNSTORABLE)

    assert Order.objects.count() == 2
    assert not IdempotencyKey.objects.exists()


@pytest.mark.django_db
def test_an_exception_propagates_and_leaves_nothing() -> None:
    def fail() -> Order:
        create_order()
        raise Boom

    with pytest.raises(Boom):
        run(CALL, ATOMIC, fail, keep)
    assert not Order.objects.exists()
    assert not IdempotencyKey.objects.exists()
    assert isinstance(run(CALL, ATOMIC, create_order, keep), Executed)


@pytest.mark.django_db
def test_a_transaction_marked_for_rollback_by_the_code_stores_nothing() -> None:
    def create_then_mark_rollback() -> Order:
        order = create_order()
        transaction.set_rollback(True)
        return order

    run(CALL, ATOMIC, create_then_mark_rollback, keep)
    assert not Order.objects.exists()
    assert not IdempotencyKey.objects.exists()


@pytest.mark.django_db
def test_mode_none_picks_atomic_for_the_database_store() -> None:
    def open_savepoints() -> int:
        return len(connections["default"].savepoint_ids)

    # The test runs in a transaction already: the engine's own shows as a savepoint.
    outside = open_savepoints()
    outcome = run(CALL, Policy(mode=None), open_savepoints, lambda result: SNAPSHOT)
    assert isinstance(outcome, Executed)
    assert outcome.result == outside + 1


def test_unknown_store_alias_is_a_configuration_error() -> None:
    with pytest.raises(ImproperlyConfigured, match="nowhere"):
        get_store("nowhere")


# Expiry and takeover ---------------------------------------------------------------------


@pytest.mark.django_db
def test_expired_completed_key_is_claimed_afresh(client: Client) -> None:
    row = IdempotencyKeyFactory(
        expired=True, key="key-1", fingerprint=fingerprint_for(PLAIN), attempts=3
    )
    response = send(client, PLAIN)

    assert response.status_code == 201
    assert "Idempotent-Replayed" not in response
    row.refresh_from_db()
    assert row.attempts == 1
    assert row.state == "completed"
    assert bytes(row.response_body) == response.content
    assert row.expires > timezone.now() + timedelta(hours=23)


@pytest.mark.django_db
def test_in_progress_row_past_its_lease_is_taken_over(
    client: Client, received: dict[str, list[Call]]
) -> None:
    # A worker that died in lease mode left its claim; atomic mode takes it over too.
    IdempotencyKeyFactory(stale=True, key="key-1", fingerprint=fingerprint_for(PLAIN))
    response = send(client, PLAIN)

    assert response.status_code == 201
    row = IdempotencyKey.objects.get()
    assert (row.state, row.attempts) == ("completed", 2)
    assert len(received["takeover"]) == 1


@pytest.mark.django_db
def test_in_flight_conflict_wins_over_expiry(client: Client) -> None:
    # Past retention but still leased: the first request is running, not forgotten.
    IdempotencyKeyFactory(
        in_progress=True,
        key="key-1",
        fingerprint=fingerprint_for(PLAIN),
        expires=timezone.now() - timedelta(seconds=1),
    )
    assert send(client, PLAIN).status_code == 409


@pytest.mark.django_db
def test_mismatch_in_flight_is_422(client: Client) -> None:
    IdempotencyKeyFactory(in_progress=True, key="key-1")
    assert send(client, PLAIN).status_code == 422
    assert Order.objects.count() == 0


@pytest.mark.django_db
def test_replay_of_a_factory_row_returns_its_snapshot(client: Client) -> None:
    IdempotencyKeyFactory(
        key="key-1",
        fingerprint=fingerprint_for(PLAIN),
        response_status=202,
        response_headers=[["Content-Type", "text/csv"], ["Location", "/r/"]],
        response_body=b"a,b",
    )
    response = send(client, PLAIN)

    assert (response.status_code, response.content) == (202, b"a,b")
    assert response["Content-Type"] == "text/csv"
    assert response["Location"] == "/r/"
    assert Order.objects.count() == 0


# Atomic mode: one transaction around the view --------------------------------------------


@pytest.mark.django_db
def test_view_raising_after_writing_rolls_back_its_writes_and_the_key(
    client: Client, view_hooks: dict[str, Any]
) -> None:
    executions: list[int] = []

    def write_then_fail_once() -> None:
        executions.append(1)
        OrderFactory(item="side effect")
        if len(executions) == 1:
            raise Boom

    view_hooks["inside"] = write_then_fail_once
    with pytest.raises(Boom):
        send(client, PLAIN)
    assert not Order.objects.exists()
    assert not IdempotencyKey.objects.exists()

    assert send(client, PLAIN).status_code == 201
    assert send(client, PLAIN)["Idempotent-Replayed"] == "true"
    assert len(executions) == 2
    assert Order.objects.count() == 2  # the retry's order and its side effect, once


@pytest.mark.django_db
def test_nested_atomic_blocks_in_the_view(client: Client) -> None:
    nested = Endpoint("nested", "POST", "/variants/nested-atomic/", drf=False)
    first = send(client, nested)
    replay = send(client, nested)

    assert first.status_code == 201
    assert replay["Idempotent-Replayed"] == "true"
    assert sorted(Order.objects.values_list("item", flat=True)) == ["kept-in-savepoint", "widget"]


@pytest.mark.django_db
def test_nested_atomic_view_failing_rolls_back_its_savepoints_too(client: Client) -> None:
    nested = Endpoint("nested", "POST", "/variants/nested-atomic/", drf=False)
    assert send(client, nested, {"status": 503}).status_code == 503
    assert not Order.objects.exists()
    assert not IdempotencyKey.objects.exists()


@pytest.fixture
def atomic_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    # ATOMIC_REQUESTS is read from the connection's settings on each request.
    monkeypatch.setitem(connections.settings["default"], "ATOMIC_REQUESTS", True)


@pytest.mark.django_db
@pytest.mark.usefixtures("atomic_requests")
@pytest.mark.parametrize(
    "endpoint",
    [PLAIN, Endpoint("cbv", "POST", "/cbv/", drf=False)],
    ids=str,
)
def test_atomic_requests(user_client: Client, endpoint: Endpoint) -> None:
    first = send(user_client, endpoint)
    replay = send(user_client, endpoint)
    failed = send(user_client, endpoint, {"status": 500}, key="key-2")

    assert first.status_code == 201
    assert replay["Idempotent-Replayed"] == "true"
    assert failed.status_code == 500
    assert Order.objects.count() == 1
    assert list(IdempotencyKey.objects.values_list("key", flat=True)) == ["key-1"]


@pytest.mark.django_db
@pytest.mark.usefixtures("atomic_requests")
def test_atomic_requests_with_drf(user_client: Client) -> None:
    create = Endpoint("create", "POST", "/api/viewset/", drf=True)
    send(user_client, create)
    assert send(user_client, create)["Idempotent-Replayed"] == "true"
    assert send(user_client, create, {"status": 503}, key="key-2").status_code == 503
    assert Order.objects.count() == 1


@pytest.mark.django_db
def test_on_commit_callbacks_run_once_after_commit_and_not_on_replay(
    client: Client,
    on_commit_calls: list[int],
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    with django_capture_on_commit_callbacks(execute=True) as first_callbacks:
        first = send(client, PLAIN)
    with django_capture_on_commit_callbacks(execute=True) as replay_callbacks:
        send(client, PLAIN)

    assert len(first_callbacks) == 1
    assert replay_callbacks == []
    assert on_commit_calls == [first.json()["id"]]  # type: ignore[attr-defined]


@pytest.mark.django_db
def test_on_commit_callbacks_are_dropped_on_rollback(
    client: Client,
    on_commit_calls: list[int],
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        send(client, PLAIN, {"status": 500})
        with pytest.raises(Boom):
            send(client, PLAIN, {"raise": True}, key="key-2")

    assert callbacks == []
    assert on_commit_calls == []


@pytest.mark.django_db(transaction=True)
def test_on_commit_with_real_commits(client: Client, on_commit_calls: list[int]) -> None:
    first = send(client, PLAIN)
    assert on_commit_calls == [first.json()["id"]]  # type: ignore[attr-defined]

    send(client, PLAIN)
    send(client, PLAIN, {"status": 500}, key="key-2")
    with pytest.raises(Boom):
        send(client, PLAIN, {"raise": True}, key="key-3")

    assert on_commit_calls == [first.json()["id"]]  # type: ignore[attr-defined]
    assert Order.objects.count() == 1
    assert list(IdempotencyKey.objects.values_list("key", flat=True)) == ["key-1"]


# Where the keys are written ---------------------------------------------------------------


class KeysElsewhereRouter:
    """Sends idempotency keys to the other database, everything else to default."""

    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        return OTHER_DATABASE if model is IdempotencyKey else None

    db_for_read = db_for_write


def _keys_in(alias: str) -> list[str]:
    return list(IdempotencyKey.objects.using(alias).values_list("key", flat=True))


@pytest.mark.django_db(databases=["default", OTHER_DATABASE])
def test_database_option_sends_keys_to_that_database(client: Client, settings: Any) -> None:
    settings.IDEMPOTENCY_STORES = {
        "default": {
            "BACKEND": "django_idempotency.stores.database.DatabaseStore",
            "OPTIONS": {"DATABASE": OTHER_DATABASE},
        }
    }
    send(client, PLAIN)
    replay = send(client, PLAIN)
    send(client, PLAIN, {"status": 500}, key="key-2")

    assert replay["Idempotent-Replayed"] == "true"
    assert _keys_in(OTHER_DATABASE) == ["key-1"]
    assert _keys_in("default") == []
    # The transaction is the keys' database's: writes elsewhere, even those of
    # the failed request, are not rolled back with it.
    assert Order.objects.using("default").count() == 2


@pytest.mark.django_db(databases=["default", OTHER_DATABASE])
def test_router_decides_where_keys_are_written(client: Client, settings: Any) -> None:
    settings.DATABASE_ROUTERS = [KeysElsewhereRouter()]
    send(client, PLAIN)
    assert send(client, PLAIN)["Idempotent-Replayed"] == "true"

    assert _keys_in(OTHER_DATABASE) == ["key-1"]
    assert _keys_in("default") == []


@pytest.mark.django_db(databases=["default", OTHER_DATABASE])
def test_store_setting_picks_the_alias(client: Client, settings: Any) -> None:
    settings.IDEMPOTENCY_STORES = {
        "default": {"BACKEND": "django_idempotency.stores.database.DatabaseStore"},
        "elsewhere": {
            "BACKEND": "django_idempotency.stores.database.DatabaseStore",
            "OPTIONS": {"DATABASE": OTHER_DATABASE},
        },
    }
    settings.IDEMPOTENCY_STORE = "elsewhere"
    send(client, PLAIN)
    settings.IDEMPOTENCY_STORE = "default"
    send(client, PLAIN)

    assert _keys_in(OTHER_DATABASE) == ["key-1"]
    assert _keys_in("default") == ["key-1"]
    assert Order.objects.count() == 2


# The layering ---------------------------------------------------------------------------


def test_a_store_is_built_once_per_alias_and_again_after_a_setting_changes(settings: Any) -> None:
    first = get_store("default")
    assert get_store("default") is first
    settings.IDEMPOTENCY_STORES = {
        "default": {
            "BACKEND": "django_idempotency.stores.database.DatabaseStore",
            "OPTIONS": {"DATABASE": OTHER_DATABASE},
        }
    }
    rebuilt = get_store("default")
    assert rebuilt is not first
    assert getattr(rebuilt, "database", None) == OTHER_DATABASE


def test_neither_the_contract_nor_the_stores_import_the_engine_or_the_adapters() -> None:
    # Read from the source, so that imports under TYPE_CHECKING count too.
    import ast
    import pathlib

    import django_idempotency

    package = pathlib.Path(django_idempotency.__file__).parent
    higher = {"engine", "decorators", "functions", "drf", "responses", "checks", "openapi"}
    lower = [
        package / "protocol.py",
        package / "conf.py",
        *sorted((package / "stores").glob("*.py")),
    ]
    for path in lower:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                names = {a.name for a in node.names}
            else:
                continue
            climbs = {n for n in names for h in higher if n == f"django_idempotency.{h}"}
            assert not climbs, f"{path.name} imports {climbs}"
