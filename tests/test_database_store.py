"""The database store when its connection is lost mid-request.

The connection is really closed (the driver's own connection object), not
mocked: what matters is how the store reports the driver's real error.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import pytest
from django.db import DatabaseError, connection
from django.test import Client

from django_idempotency.models import IdempotencyKey
from tests.testapp.models import Order
from tests.testapp.views import Boom

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.urls("tests.testapp.urls"),
    pytest.mark.skipif(
        connection.vendor == "sqlite",
        reason="SQLite reports a closed connection as a programming error, not a lost server",
    ),
]


def _drop_connection() -> None:
    connection.connection.close()


def _forget_connection() -> None:
    """Let Django open a fresh connection; closing a dropped one may raise."""
    with contextlib.suppress(DatabaseError):
        connection.close()


def _post(path: str, data: dict[str, Any], key: str = "lost-1") -> Any:
    return Client().post(
        path, data, content_type="application/json", headers={"Idempotency-Key": key}
    )


@pytest.fixture(autouse=True)
def _reconnect() -> Any:
    yield
    _forget_connection()


def test_lease_outcome_lost_with_the_connection_is_logged_and_still_answered(
    view_hooks: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    view_hooks["inside"] = _drop_connection
    with caplog.at_level(logging.ERROR, logger="django_idempotency"):
        response = _post("/variants/lease/", {"item": "kept"})

    assert response.status_code == 201  # the view ran: its answer goes back
    assert "was not stored" in caplog.text
    _forget_connection()
    assert Order.objects.filter(item="kept").count() == 1
    row = IdempotencyKey.objects.get(key="lost-1")
    assert row.state == IdempotencyKey.State.IN_PROGRESS  # claimed until its lease ends
    view_hooks.clear()
    retry = _post("/variants/lease/", {"item": "kept"})
    assert retry.status_code == 409
    assert Order.objects.filter(item="kept").count() == 1


def test_lease_release_lost_with_the_connection_keeps_the_views_own_error(
    view_hooks: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    view_hooks["inside"] = _drop_connection
    with caplog.at_level(logging.ERROR, logger="django_idempotency"), pytest.raises(Boom):
        _post("/variants/lease/", {"item": "failed", "raise": True})

    assert "stays claimed until its lease ends" in caplog.text


def test_atomic_mode_answers_503_when_the_connection_dies_before_completion(
    view_hooks: dict[str, Any],
) -> None:
    view_hooks["inside"] = _drop_connection
    response = _post("/plain/", {"item": "lost"})

    assert response.status_code == 503
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["type"].endswith("store-unavailable")
    _forget_connection()
    # The transaction died with the connection: nothing of it was kept.
    assert not Order.objects.filter(item="lost").exists()
    assert not IdempotencyKey.objects.filter(key="lost-1").exists()
