"""Scopes: a key is unique within its scope, by default the authenticated user."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import AnonymousUser
from django.test import Client, RequestFactory

from django_idempotency.models import IdempotencyKey
from django_idempotency.scopes import ANONYMOUS_SCOPE, user_scope
from tests.conftest import Endpoint, scope_of, send
from tests.testapp.models import Order

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.testapp.urls")]

PLAIN = Endpoint("plain", "POST", "/plain/", drf=False)
CBV = Endpoint("cbv", "POST", "/cbv/", drf=False)
TENANT = Endpoint("tenant", "POST", "/variants/tenant/", drf=False)


def header_scope(request: Any) -> str:
    return request.headers.get("X-Scope", "none")


def test_user_scope_names_the_user(user: Any) -> None:
    request = RequestFactory().post("/")
    request.user = user
    assert user_scope(request) == f"user:{user.pk}"


def test_user_scope_of_anonymous_and_userless_requests() -> None:
    request = RequestFactory().post("/")
    assert user_scope(request) == ANONYMOUS_SCOPE
    request.user = AnonymousUser()
    assert user_scope(request) == ANONYMOUS_SCOPE


@pytest.mark.parametrize("endpoint", [PLAIN, CBV], ids=str)
def test_another_session_user_reusing_a_key_gets_their_own_response(
    user: Any, other_user: Any, user_client: Client, other_client: Client, endpoint: Endpoint
) -> None:
    first = send(user_client, endpoint)
    theirs = send(other_client, endpoint)

    assert theirs.status_code == 201
    assert "Idempotent-Replayed" not in theirs
    assert theirs.content != first.content
    assert sorted(IdempotencyKey.objects.values_list("scope", flat=True)) == sorted(
        [scope_of(user), scope_of(other_user)]
    )
    assert send(user_client, endpoint).content == first.content
    assert send(other_client, endpoint).content == theirs.content
    assert Order.objects.count() == 2


def test_anonymous_requests_share_one_scope(client: Client, user_client: Client) -> None:
    first = send(client, PLAIN)
    replay = send(Client(), PLAIN)
    logged_in = send(user_client, PLAIN)

    assert replay["Idempotent-Replayed"] == "true"
    assert replay.content == first.content
    assert "Idempotent-Replayed" not in logged_in
    assert IdempotencyKey.objects.filter(scope=ANONYMOUS_SCOPE).count() == 1


def test_scope_per_view(client: Client) -> None:
    send(client, TENANT, headers={"X-Tenant": "acme"})
    same_tenant = send(Client(), TENANT, headers={"X-Tenant": "acme"})
    other_tenant = send(client, TENANT, headers={"X-Tenant": "zeta"})

    assert same_tenant["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in other_tenant
    assert set(IdempotencyKey.objects.values_list("scope", flat=True)) == {
        "tenant:acme",
        "tenant:zeta",
    }


@pytest.mark.parametrize("setting", [header_scope, "tests.test_scopes.header_scope"], ids=str)
def test_scope_setting(client: Client, settings: Any, setting: Any) -> None:
    settings.IDEMPOTENCY_SCOPE = setting
    send(client, PLAIN, headers={"X-Scope": "a"})
    assert send(client, PLAIN, headers={"X-Scope": "a"})["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in send(client, PLAIN, headers={"X-Scope": "b"})
    assert set(IdempotencyKey.objects.values_list("scope", flat=True)) == {"a", "b"}


def test_the_view_scope_wins_over_the_setting(client: Client, settings: Any) -> None:
    settings.IDEMPOTENCY_SCOPE = header_scope
    send(client, TENANT, headers={"X-Tenant": "acme", "X-Scope": "ignored"})
    assert IdempotencyKey.objects.get().scope == "tenant:acme"


@pytest.mark.parametrize("length", [255, 256, 1000])
def test_long_scopes_work_and_stay_distinct(client: Client, settings: Any, length: int) -> None:
    settings.IDEMPOTENCY_SCOPE = header_scope
    # Two scopes sharing their first 255 characters must not share keys.
    scope_a = "s" * (length - 1) + "a"
    scope_b = "s" * (length - 1) + "b"

    first = send(client, PLAIN, headers={"X-Scope": scope_a})
    replay = send(client, PLAIN, headers={"X-Scope": scope_a})
    other = send(client, PLAIN, headers={"X-Scope": scope_b})

    assert first.status_code == 201
    assert replay["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in other
    scopes = list(IdempotencyKey.objects.values_list("scope", flat=True))
    assert len(set(scopes)) == 2
    assert all(len(scope) <= 255 for scope in scopes)
