"""Shared fixtures: the entry points under test, a client that sends keys, users."""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from django.contrib.auth.models import AbstractBaseUser
from django.http.response import HttpResponseBase
from django.test import Client, RequestFactory
from hypothesis import settings as hypothesis_settings
from hypothesis.configuration import set_hypothesis_home_dir

from django_idempotency.fingerprints import request_fingerprint
from tests.factories import UserFactory

# REQUIRE_MARKERS: skips of the required markers' tests are failures (hooks, found by name).
from tests.required_markers import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401
from tests.servers import pgbouncer_server_fixture, redis_cluster_server_fixture  # noqa: F401
from tests.testapp import views

# Nothing of hypothesis' in the working tree (examples, Unicode tables).
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "django-idempotency-hypothesis"))
hypothesis_settings.register_profile("django-idempotency", database=None, deadline=None)
hypothesis_settings.load_profile("django-idempotency")

#: A second database alias, created only for the tests that ask for it
#: (``@pytest.mark.django_db(databases=[...])``): keys routed away from "default".
OTHER_DATABASE = "idempotency_other"


@pytest.fixture(scope="session")
def django_db_modify_db_settings(
    request: pytest.FixtureRequest, django_db_modify_db_settings_parallel_suffix: None
) -> None:
    # Only when a selected test asks for it: code that walks every alias
    # (system checks, for one) would otherwise touch it in all other tests.
    if any(OTHER_DATABASE in _databases_of(item) for item in request.session.items):
        _add_other_database()


def _databases_of(item: pytest.Item) -> Any:
    marker = item.get_closest_marker("django_db")
    return () if marker is None else marker.kwargs.get("databases") or ()


def _add_other_database() -> None:
    from django.db import connections

    default = connections.settings["default"]
    other = copy.deepcopy(default)
    test_name = default["TEST"].get("NAME") or f"test_{default['NAME']}"
    other["TEST"] = {**default["TEST"], "NAME": f"{test_name}_other"}
    connections.settings[OTHER_DATABASE] = other


@dataclass(frozen=True)
class Endpoint:
    """One way into a protected view: method and path, and what answers there."""

    name: str
    method: str
    path: str
    drf: bool

    def __str__(self) -> str:
        return self.name


#: Every entry point whose view runs the JSON-driven behaviour of the testapp.
ENDPOINTS = [
    Endpoint("plain", "POST", "/plain/", drf=False),
    Endpoint("cbv", "POST", "/cbv/", drf=False),
    Endpoint("api_function", "POST", "/api/function/", drf=True),
    Endpoint("viewset_create", "POST", "/api/viewset/", drf=True),
    Endpoint("viewset_partial_update", "PATCH", "/api/viewset/1/", drf=True),
    Endpoint("viewset_refund", "POST", "/api/viewset/1/refund/", drf=True),
]


@pytest.fixture(params=ENDPOINTS, ids=str)
def endpoint(request: pytest.FixtureRequest) -> Endpoint:
    endpoint: Endpoint = request.param
    return endpoint


def send(
    client: Client,
    endpoint: Endpoint,
    data: Any = None,
    *,
    key: str | None = "key-1",
    method: str | None = None,
    path: str | None = None,
    headers: dict[str, str] | None = None,
) -> HttpResponseBase:
    """Send ``data`` as JSON to ``endpoint`` with ``key`` in the Idempotency-Key header."""
    all_headers = dict(headers or {})
    if key is not None:
        all_headers["Idempotency-Key"] = key
    body = json.dumps({"item": "widget"} if data is None else data)
    response: HttpResponseBase = client.generic(
        method or endpoint.method,
        path or endpoint.path,
        body,
        content_type="application/json",
        headers=all_headers,
    )
    return response


def fingerprint_for(endpoint: Endpoint, data: Any = None) -> str:
    """The fingerprint the view computes for ``send(client, endpoint, data)``."""
    body = json.dumps({"item": "widget"} if data is None else data)
    request = RequestFactory().generic(
        endpoint.method, endpoint.path, body, content_type="application/json"
    )
    return request_fingerprint(request)


def scope_of(user: AbstractBaseUser) -> str:
    return f"user:{user.pk}"


def problem(response: HttpResponseBase) -> dict[str, Any]:
    """The problem details of an error response, checking its content type."""
    assert response["Content-Type"] == "application/problem+json"
    loaded: dict[str, Any] = json.loads(response.content)
    return loaded


@pytest.fixture
def user(db: None) -> AbstractBaseUser:
    created: AbstractBaseUser = UserFactory()
    return created


@pytest.fixture
def other_user(db: None) -> AbstractBaseUser:
    created: AbstractBaseUser = UserFactory()
    return created


@pytest.fixture
def user_client(user: AbstractBaseUser) -> Client:
    """A client logged in (session) as ``user``."""
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def other_client(other_user: AbstractBaseUser) -> Client:
    client = Client()
    client.force_login(other_user)
    return client


@pytest.fixture
def view_hooks() -> Iterator[dict[str, Any]]:
    """The testapp's hooks, emptied after the test."""
    yield views.hooks
    views.hooks.clear()


@pytest.fixture
def on_commit_calls() -> Iterator[list[int]]:
    """Order ids recorded by the views' ``transaction.on_commit`` callbacks."""
    views.on_commit_calls.clear()
    yield views.on_commit_calls
    views.on_commit_calls.clear()
