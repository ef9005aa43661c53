"""Erasing a scope's keys and stored responses: erase_scope, erase_user and the command."""

from __future__ import annotations

import hashlib
import json
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client

from django_idempotency.erasure import Erasure, erase_scope, erase_user
from django_idempotency.models import IdempotencyKey, IdempotencyStep, OutboxMessage
from django_idempotency.scopes import ANONYMOUS_SCOPE
from django_idempotency.stores import Store, cache
from tests.conftest import OTHER_DATABASE, scope_of
from tests.lease_stores import (
    STORES,
    lease_store_fixture,  # noqa: F401
    redis_records_fixture,  # noqa: F401
    stored,
)

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.urls")]


def post(client: Client, key: str) -> None:
    response = client.post(
        "/plain/",
        json.dumps({"item": "widget"}),
        content_type="application/json",
        headers={"Idempotency-Key": key},
    )
    assert response.status_code == 201


def test_erasing_a_scope_leaves_other_scopes(
    lease_store: str, user: Any, user_client: Client, other_user: Any, other_client: Client
) -> None:
    for key in ("a", "b", "c"):
        post(user_client, key)
    post(other_client, "a")
    post(Client(), "a")
    mine, theirs = scope_of(user), scope_of(other_user)
    assert erase_scope(mine, stores=[lease_store], dry_run=True) == {lease_store: Erasure(3)}
    assert stored(lease_store, mine, "a") is not None  # a dry run erases nothing
    assert erase_scope(mine, stores=[lease_store]) == {lease_store: Erasure(3)}
    assert [stored(lease_store, mine, key) for key in ("a", "b", "c")] == [None, None, None]
    assert stored(lease_store, theirs, "a") is not None
    assert stored(lease_store, ANONYMOUS_SCOPE, "a") is not None
    assert erase_scope(mine, stores=[lease_store]) == {lease_store: Erasure(0)}


def test_erased_keys_run_again(lease_store: str, user: Any, user_client: Client) -> None:
    post(user_client, "again")
    erase_scope(scope_of(user), stores=[lease_store])
    post(user_client, "again")  # 201 again, not a replay of erased data


def test_erase_user_covers_every_configured_store(
    settings: Any, user: Any, user_client: Client
) -> None:
    settings.IDEMPOTENCY_STORES = STORES
    settings.IDEMPOTENCY_MODE = "lease"
    for alias in STORES:
        settings.IDEMPOTENCY_STORE = alias
        post(user_client, f"in-{alias}")
    assert erase_user(user) == {alias: Erasure(1) for alias in STORES}
    assert erase_user(user) == {alias: Erasure(0) for alias in STORES}


def test_a_long_scope_is_erased_under_the_name_it_is_stored_as() -> None:
    long_scope = "tenant:" + "9" * 300
    IdempotencyKey.objects.create(
        scope="sha256:" + hashlib.sha256(long_scope.encode()).hexdigest(),
        key="k",
        fingerprint="f",
        token="t",
        expires="2099-01-01T00:00:00Z",
    )
    assert erase_scope(long_scope) == {"default": Erasure(1)}


def test_the_command_erases_and_reports(lease_store: str, user: Any, user_client: Client) -> None:
    post(user_client, "cmd")
    out = StringIO()
    call_command(
        "erase_idempotency_keys",
        "--scope",
        scope_of(user),
        "--store",
        lease_store,
        "--dry-run",
        stdout=out,
    )
    assert f"Would erase 1 key(s) of scope '{scope_of(user)}' in store '{lease_store}'." in (
        out.getvalue()
    )
    assert stored(lease_store, scope_of(user), "cmd") is not None
    out = StringIO()
    call_command(
        "erase_idempotency_keys", "--scope", scope_of(user), "--store", lease_store, stdout=out
    )
    assert "Erased 1 key(s)" in out.getvalue()
    assert stored(lease_store, scope_of(user), "cmd") is None


class NoEraseStore(Store):
    pass


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ([], "--scope"),
        (["--scope", " "], "must not be empty"),
        (["--scope", "user:1", "--store", "nowhere"], "Unknown store"),
        (["--scope", "user:1", "--batch-size", "-1"], "positive whole number"),
        (["--scope", "user:1", "--store", "plain"], "cannot erase by scope"),
        (["--scope", "user:1", "--database", "nowhere"], "Unknown database 'nowhere'"),
    ],
)
def test_the_command_refuses_bad_input(settings: Any, arguments: list[str], message: str) -> None:
    settings.IDEMPOTENCY_STORES = {
        "default": {"BACKEND": "django_idempotency.stores.database.DatabaseStore"},
        "plain": {"BACKEND": f"{__name__}.NoEraseStore"},
    }
    with pytest.raises(CommandError, match=message):
        call_command("erase_idempotency_keys", *arguments, stdout=StringIO())


def test_scan_patterns_match_a_key_prefix_literally() -> None:
    assert cache._glob_escape("a*b?[c]\\d") == "a\\*b\\?\\[c\\]\\\\d"


def step(scope: str, database: str = "default") -> IdempotencyStep:
    return IdempotencyStep.objects.using(database).create(
        scope=scope,
        key="k",
        name="charge",
        fingerprint="f",
        token="t",
        result='{"card": "4242"}',
        expires="2099-01-01T00:00:00Z",
    )


def message(scope: str, state: str) -> OutboxMessage:
    return OutboxMessage.objects.create(
        topic="receipts",
        payload={"email": "ann@example.com"},
        state=state,
        scope=scope,
        idempotency_key="k",
    )


def test_steps_and_sent_messages_go_with_the_keys_pending_messages_stay() -> None:
    step("user:1"), step("user:2")
    message("user:1", OutboxMessage.State.SENT)
    pending = message("user:1", OutboxMessage.State.PENDING)
    message("user:2", OutboxMessage.State.SENT)
    found = erase_scope("user:1", dry_run=True)
    assert found == {"default": Erasure(keys=0, steps=1, messages=1, kept_pending=1)}
    assert IdempotencyStep.objects.count() == 2  # a dry run erases nothing
    assert erase_scope("user:1") == found
    assert list(IdempotencyStep.objects.values_list("scope", flat=True)) == ["user:2"]
    assert sorted(OutboxMessage.objects.values_list("scope", "state")) == [
        ("user:1", "pending"),
        ("user:2", "sent"),
    ]
    assert OutboxMessage.objects.filter(scope="user:1").get() == pending


def test_pending_messages_are_erased_only_when_asked_and_the_command_says_so() -> None:
    message("user:1", OutboxMessage.State.PENDING)
    message("user:2", OutboxMessage.State.PENDING)
    step("user:1")
    out = StringIO()
    call_command("erase_idempotency_keys", "--scope", "user:1", stdout=out)
    assert (
        "Erased 0 key(s) of scope 'user:1' in store 'default', with 1 step result(s) and "
        "0 outbox message(s). Kept 1 outbox message(s) not yet sent: follow-ups still owed; "
        "erase again once they are delivered, or use --include-pending."
    ) in out.getvalue()
    assert OutboxMessage.objects.filter(scope="user:1").exists()
    out = StringIO()
    call_command("erase_idempotency_keys", "--scope", "user:1", "--include-pending", stdout=out)
    assert "with 0 step result(s) and 1 outbox message(s)." in out.getvalue()
    assert "Kept" not in out.getvalue()
    assert list(OutboxMessage.objects.values_list("scope", flat=True)) == ["user:2"]


@pytest.mark.django_db(databases=["default", OTHER_DATABASE])
def test_the_database_option_erases_in_that_database_only() -> None:
    for database in ("default", OTHER_DATABASE):
        IdempotencyKey.objects.using(database).create(
            scope="user:1", key="k", fingerprint="f", token="t", expires="2099-01-01T00:00:00Z"
        )
        step("user:1", database)
    out = StringIO()
    call_command(
        "erase_idempotency_keys", "--scope", "user:1", "--database", OTHER_DATABASE, stdout=out
    )
    assert "Erased 1 key(s) of scope 'user:1' in store 'default', with 1 step result(s)" in (
        out.getvalue()
    )
    assert not IdempotencyKey.objects.using(OTHER_DATABASE).exists()
    assert not IdempotencyStep.objects.using(OTHER_DATABASE).exists()
    assert IdempotencyKey.objects.count() == IdempotencyStep.objects.count() == 1
    # The shared store was not moved to the other database.
    assert erase_scope("user:1") == {"default": Erasure(keys=1, steps=1)}
