"""Snapshots of responses, replays, and the problem responses."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from django.http import HttpResponse, StreamingHttpResponse
from django.test import Client, RequestFactory

from django_idempotency.engine import Discard, Snapshot
from django_idempotency.exceptions import (
    FingerprintMismatch,
    KeyMalformed,
    KeyMissing,
    RequestInProgress,
    StoreUnavailable,
)
from django_idempotency.models import IdempotencyKey
from django_idempotency.responses import conclude, problem_response, replay_response
from tests.conftest import Endpoint, send
from tests.testapp.models import Order

PLAIN = Endpoint("plain", "POST", "/plain/", drf=False)
request = RequestFactory().post("/o/")


@pytest.mark.parametrize("status", [200, 201, 204, 301, 400, 404, 409, 422])
def test_outcomes_are_snapshotted(status: int) -> None:
    response = HttpResponse(b"body", status=status, content_type="text/plain")
    response["Location"] = "/o/1/"
    response["X-Other"] = "no"
    assert conclude(request, response) == Snapshot(
        status=status, headers=(("Content-Type", "text/plain"), ("Location", "/o/1/")), body=b"body"
    )


@pytest.mark.parametrize("status", [401, 403, 408, 429, 500, 502, 503, 599])
def test_failures_are_discarded(status: int) -> None:
    assert conclude(request, HttpResponse(status=status)) is Discard.FAILURE


def test_set_cookie_is_never_in_a_snapshot(settings: Any) -> None:
    settings.IDEMPOTENCY_REPLAYED_HEADERS = ["Set-Cookie", "Content-Type"]
    response = HttpResponse(b"x")
    response.set_cookie("session", "secret")
    response["Set-Cookie"] = "raw=1"
    snapshot = conclude(request, response)
    assert isinstance(snapshot, Snapshot)
    assert [name for name, _ in snapshot.headers] == ["Content-Type"]


def test_streaming_responses_are_unstorable(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "django_idempotency"):
        outcome = conclude(request, StreamingHttpResponse(iter([b"a"])))
    assert outcome is Discard.UNSTORABLE
    assert "streaming" in caplog.text


def test_bodies_over_the_size_bound_are_unstorable(
    settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings.IDEMPOTENCY_MAX_BODY_SIZE = 4
    assert isinstance(conclude(request, HttpResponse(b"1234")), Snapshot)
    with caplog.at_level(logging.WARNING, "django_idempotency"):
        assert conclude(request, HttpResponse(b"12345")) is Discard.UNSTORABLE
    assert "IDEMPOTENCY_MAX_BODY_SIZE" in caplog.text


def test_replay_sends_only_what_was_stored() -> None:
    response = replay_response(Snapshot(status=204, headers=(("Location", "/o/1/"),), body=b""))
    assert response.status_code == 204
    assert "Content-Type" not in response
    assert response["Location"] == "/o/1/"
    assert response["Idempotent-Replayed"] == "true"


@pytest.mark.parametrize(
    ("error", "status", "slug"),
    [
        (KeyMissing(), 400, "key-missing"),
        (KeyMalformed("too long"), 400, "key-malformed"),
        (RequestInProgress(retry_after=7), 409, "request-in-progress"),
        (FingerprintMismatch(), 422, "fingerprint-mismatch"),
        (StoreUnavailable(), 503, "store-unavailable"),
    ],
)
def test_problem_responses(error: Any, status: int, slug: str) -> None:
    response = problem_response(error)
    body = json.loads(response.content)

    assert response.status_code == status
    assert response["Content-Type"] == "application/problem+json"
    assert body["type"] == f"urn:django-idempotency:problem:{slug}"
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    assert ("Retry-After" in response) == (status == 409)


def test_retry_after_is_at_least_one_second() -> None:
    assert problem_response(RequestInProgress(retry_after=0))["Retry-After"] == "1"


# Through a view ---------------------------------------------------------------------


@pytest.mark.django_db
def test_streaming_view_runs_passes_through_and_frees_the_key(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "django_idempotency"):
        first = send(client, PLAIN, {"stream": True})
        second = send(client, PLAIN, {"stream": True})

    assert b"".join(first.streaming_content) == b"ab"  # type: ignore[attr-defined]
    assert "Idempotent-Replayed" not in second
    assert Order.objects.count() == 2  # not kept, so each request runs (and its write stays)
    assert not IdempotencyKey.objects.exists()
    assert "streaming" in caplog.text


@pytest.mark.django_db
def test_oversized_response_passes_through_unstored(client: Client, settings: Any) -> None:
    settings.IDEMPOTENCY_MAX_BODY_SIZE = 1000
    big = send(client, PLAIN, {"big": 2000})
    small = send(client, PLAIN, {"item": "small"}, key="key-2")

    assert big.status_code == 201
    assert len(big.content) > 2000
    assert list(IdempotencyKey.objects.values_list("key", flat=True)) == ["key-2"]
    assert small.status_code == 201
    assert Order.objects.count() == 2


@pytest.mark.django_db
def test_drf_response_is_rendered_with_the_negotiated_renderer(user_client: Client) -> None:
    create = Endpoint("create", "POST", "/api/viewset/", drf=True)
    first = send(user_client, create)
    replay = send(user_client, create)

    assert first["Content-Type"] == replay["Content-Type"] == "application/json"
    assert json.loads(replay.content) == json.loads(first.content)
    assert bytes(IdempotencyKey.objects.get().response_body) == first.content


@pytest.mark.django_db
@pytest.mark.urls("tests.testapp.urls")
def test_lazy_template_response_is_rendered_for_the_snapshot(client: Client) -> None:
    template = Endpoint("template", "POST", "/variants/template/", drf=False)
    first = send(client, template)
    replay = send(client, template)

    order = Order.objects.get()
    assert first.content == replay.content == f"order {order.pk}".encode()
    assert replay["Idempotent-Replayed"] == "true"
