"""What of a response is stored: the ``redact`` hook of views, DRF views and functions."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography.fernet import Fernet
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.test import Client
from django.urls import path
from rest_framework.response import Response
from rest_framework.views import APIView

from django_idempotency import sealing
from django_idempotency.decorators import idempotent, idempotent_function
from django_idempotency.drf import IdempotencyMixin
from django_idempotency.engine import Call, Snapshot
from django_idempotency.models import IdempotencyKey
from django_idempotency.redaction import drop_fields, status_only
from django_idempotency.stores import get_store
from django_idempotency.stores.cache import CacheStore
from tests.lease_stores import (
    lease_store_fixture,  # noqa: F401
    redis_records_fixture,  # noqa: F401
)

pytestmark = [pytest.mark.django_db, pytest.mark.urls(__name__)]

PAYMENT = {"id": 7, "status": "paid", "email": "ann@example.com", "card": {"last4": "4242"}}
runs: list[int] = []


def _payment(request: HttpRequest) -> JsonResponse:
    runs.append(1)
    response = JsonResponse(PAYMENT, status=201)
    response["Location"] = "/payments/7/"
    return response


@idempotent(redact=drop_fields("email", "card.last4"))
def dropping_view(request: HttpRequest) -> HttpResponse:
    return _payment(request)


@idempotent(redact=status_only)
def status_only_view(request: HttpRequest) -> HttpResponse:
    return _payment(request)


@idempotent(redact=lambda request, snapshot: "not a snapshot")
def broken_view(request: HttpRequest) -> HttpResponse:
    return _payment(request)


class PaymentAPIView(IdempotencyMixin, APIView):
    authentication_classes = ()
    permission_classes = ()
    idempotency_redact = drop_fields("email")

    def post(self, request: Any) -> Response:
        runs.append(1)
        return Response(PAYMENT, status=201)


urlpatterns = [
    path("dropping/", dropping_view),
    path("status-only/", status_only_view),
    path("broken/", broken_view),
    path("drf/", PaymentAPIView.as_view()),
]


@pytest.fixture(autouse=True)
def _runs() -> None:
    runs.clear()


def post(url: str, key: str = "pay-1") -> Any:
    return Client().post(
        url, "{}", content_type="application/json", headers={"Idempotency-Key": key}
    )


def stored_body(alias: str | None, key: str = "pay-1") -> bytes:
    store = get_store(alias or "default")
    if isinstance(store, CacheStore):
        record = store.record("anonymous", key)
        assert record is not None
        return base64.b64decode(record["body"])
    return bytes(IdempotencyKey.objects.get(key=key).response_body)


def test_dropped_fields_never_reach_the_store_and_replays_lack_them(lease_store: str) -> None:
    first = post("/dropping/")
    assert json.loads(first.content) == PAYMENT  # the caller gets it whole, once
    assert b"ann@example.com" not in stored_body(lease_store)
    assert b"4242" not in stored_body(lease_store)
    replay = post("/dropping/")
    assert replay["Idempotent-Replayed"] == "true"
    assert json.loads(replay.content) == {"id": 7, "status": "paid", "card": {}}
    assert runs == [1]


def test_status_only_keeps_the_status_and_the_reference(lease_store: str) -> None:
    post("/status-only/")
    assert stored_body(lease_store) == b""
    replay = post("/status-only/")
    assert (replay.status_code, replay.content) == (201, b"")
    assert replay["Location"] == "/payments/7/"
    assert "Content-Type" not in replay
    assert runs == [1]


def test_redaction_happens_before_encryption(settings: Any) -> None:
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]
    post("/dropping/")
    row = IdempotencyKey.objects.get()
    stored = Snapshot(row.response_status or 0, (), bytes(row.response_body))
    opened = sealing.unseal(stored, Call(row.scope, row.key, ""))
    assert json.loads(opened.body) == {"id": 7, "status": "paid", "card": {}}
    assert json.loads(post("/dropping/").content) == {"id": 7, "status": "paid", "card": {}}


def test_the_drf_mixin_takes_the_hook_as_an_attribute() -> None:
    first = post("/drf/")
    assert json.loads(first.content)["email"] == "ann@example.com"
    assert b"ann@example.com" not in stored_body(None)
    assert "email" not in json.loads(post("/drf/").content)
    assert runs == [1]


def test_a_hook_returning_something_else_stores_nothing() -> None:
    with pytest.raises(TypeError, match="must return a Snapshot"):
        post("/broken/")
    assert not IdempotencyKey.objects.exists()


@pytest.mark.parametrize("redact", [42, "no.such.hook", "django_idempotency.conf.DEFAULT_STORES"])
def test_a_hook_that_is_not_a_callable_fails_at_decoration(redact: Any) -> None:
    with pytest.raises(ImproperlyConfigured, match="redact"):
        idempotent(redact=redact)
    with pytest.raises(ImproperlyConfigured, match="redact"):
        idempotent_function(key=lambda message: message["id"], redact=redact)


def test_a_drf_view_with_a_hook_that_is_not_a_callable_fails_when_defined() -> None:
    with pytest.raises(ImproperlyConfigured, match="idempotency_redact"):

        class Broken(IdempotencyMixin, APIView):
            idempotency_redact = 42


def test_a_hook_can_be_a_dotted_path() -> None:
    decorated = idempotent(redact="django_idempotency.redaction.status_only")
    assert callable(decorated)


def test_drop_fields_needs_names() -> None:
    with pytest.raises(ImproperlyConfigured):
        drop_fields()


def test_drop_fields_leaves_other_bodies_alone() -> None:
    redact = drop_fields("email")
    request = HttpRequest()
    for body in (b"not json", b"[1, 2]", b"\xff"):
        snapshot = Snapshot(200, (), body)
        assert redact(request, snapshot) is snapshot


def test_functions_store_what_the_hook_keeps() -> None:
    calls: list[int] = []

    @idempotent_function(
        key=lambda message: message["id"],
        redact=lambda result: {"charge": result["charge"]},
    )
    def capture(message: dict[str, Any]) -> dict[str, Any]:
        calls.append(1)
        return {"charge": "ch_1", "email": "ann@example.com"}

    assert capture({"id": 1}) == {"charge": "ch_1", "email": "ann@example.com"}
    assert b"ann@example.com" not in bytes(IdempotencyKey.objects.get().response_body)
    assert capture({"id": 1}) == {"charge": "ch_1"}
    assert calls == [1]
