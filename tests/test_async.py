"""``@idempotent`` on ``async def`` views, under Django's ``AsyncClient``.

Async views run in lease mode, on the database and the Redis store. The views
live in this module (``pytest.mark.urls``); each test drives its requests from
one event loop, so overlapping requests are made with ``asyncio`` events.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.http.response import HttpResponseBase
from django.test import AsyncClient
from django.urls import path
from django.utils.decorators import method_decorator
from django.views import View

from django_idempotency.decorators import idempotent
from django_idempotency.models import IdempotencyKey
from django_idempotency.protocol import Call, Claim, Policy
from django_idempotency.stores import get_store
from tests.factories import UserFactory
from tests.lease_stores import (
    DATABASE,
    STORES,
    lease_store_fixture,  # noqa: F401
    redis_records_fixture,  # noqa: F401
    stored,
)
from tests.testapp.models import Order

pytestmark = [pytest.mark.urls("tests.test_async"), pytest.mark.django_db]

#: Set by a test: awaited inside the view, after its write.
inside: dict[str, Callable[[], Awaitable[None]]] = {}


async def create_order(request: HttpRequest) -> HttpResponse:
    data = json.loads(request.body or b"{}")
    order = await Order.objects.acreate(item=str(data.get("item", "thing")))
    hook = inside.get("hook")
    if hook is not None:
        await hook()
    if data.get("raise"):
        raise RuntimeError("the async view failed after its write")
    response = JsonResponse({"id": order.pk}, status=int(data.get("status", 201)))
    response["Location"] = f"/orders/{order.pk}/"
    return response


plain = idempotent(create_order)
waiting = idempotent(wait=10)(create_order)
optional = idempotent(required=False)(create_order)


@method_decorator(idempotent, name="post")
class AsyncOrders(View):
    async def post(self, request: HttpRequest) -> HttpResponse:
        return await create_order(request)


urlpatterns = [
    path("async/", plain),
    path("async/waiting/", waiting),
    path("async/optional/", optional),
    path("async/cbv/", AsyncOrders.as_view()),
]


def run(scenario: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return async_to_sync(scenario)()


async def post(
    data: dict[str, Any] | None = None,
    *,
    key: str | None = "async-key",
    path: str = "/async/",
    client: AsyncClient | None = None,
) -> HttpResponseBase:
    client = client or AsyncClient(raise_request_exception=False)
    headers = {} if key is None else {"Idempotency-Key": key}
    response: HttpResponseBase = await client.post(
        path,
        json.dumps({"item": "widget"} if data is None else data),
        content_type="application/json",
        headers=headers,
    )
    return response


@pytest.fixture(autouse=True)
def no_hook() -> Any:
    yield
    inside.clear()


def orders() -> int:
    return Order.objects.count()


# The contract ------------------------------------------------------------------


@pytest.mark.parametrize("url", ["/async/", "/async/cbv/"])
def test_a_new_key_runs_once_and_is_replayed(lease_store: str, url: str) -> None:
    async def scenario() -> tuple[HttpResponseBase, HttpResponseBase]:
        return await post(path=url), await post(path=url)

    first, replay = run(scenario)

    assert first.status_code == replay.status_code == 201
    assert replay.content == first.content
    assert replay["Location"] == first["Location"]
    assert replay["Idempotent-Replayed"] == "true"
    assert orders() == 1


def test_a_key_reused_for_another_body_is_422(lease_store: str) -> None:
    async def scenario() -> HttpResponseBase:
        await post()
        return await post({"item": "gadget"})

    assert run(scenario).status_code == 422
    assert orders() == 1


def test_a_missing_key_is_400(lease_store: str) -> None:
    async def scenario() -> HttpResponseBase:
        return await post(key=None)

    assert run(scenario).status_code == 400
    assert orders() == 0


def test_an_optional_key_left_out_runs_the_view_unprotected(lease_store: str) -> None:
    async def scenario() -> tuple[HttpResponseBase, HttpResponseBase]:
        return await post(key=None, path="/async/optional/"), await post(
            key=None, path="/async/optional/"
        )

    first, second = run(scenario)

    assert first.status_code == second.status_code == 201
    assert orders() == 2


def test_a_safe_method_is_untouched(lease_store: str) -> None:
    async def scenario() -> HttpResponseBase:
        response: HttpResponseBase = await AsyncClient().get("/async/")
        return response

    response = run(scenario)

    assert response.status_code == 201
    assert not response.has_header("Idempotent-Replayed")


@pytest.mark.parametrize("key", ["", "k" * 256, "caf\u00e9", "a1,a2", '"unclosed'])
@pytest.mark.parametrize("url", ["/async/", "/async/cbv/"])
def test_a_malformed_key_is_400_and_nothing_runs(lease_store: str, url: str, key: str) -> None:
    async def scenario() -> HttpResponseBase:
        return await post(key=key, path=url)

    response = run(scenario)

    assert response.status_code == 400
    assert response["Content-Type"] == "application/problem+json"
    assert json.loads(response.content)["type"].endswith(":key-malformed")  # type: ignore[attr-defined]
    assert orders() == 0


@pytest.mark.parametrize("status", [401, 403, 408, 429])
def test_a_status_a_retry_may_fix_keeps_nothing(lease_store: str, status: int) -> None:
    async def scenario() -> tuple[HttpResponseBase, HttpResponseBase]:
        return await post({"status": status}), await post({"status": status})

    refused, retry = run(scenario)

    assert refused.status_code == retry.status_code == status
    assert not retry.has_header("Idempotent-Replayed")
    assert orders() == 2


@pytest.mark.parametrize("data", [{"raise": True}, {"status": 503}], ids=["raises", "503"])
def test_a_failure_frees_the_key(lease_store: str, data: dict[str, Any]) -> None:
    async def scenario() -> tuple[HttpResponseBase, HttpResponseBase]:
        return await post(data), await post(data)

    first, retry = run(scenario)

    expected = 500 if "raise" in data else 503
    assert first.status_code == retry.status_code == expected
    assert orders() == 2
    assert stored(lease_store, "anonymous", "async-key") is None


# Overlapping requests ------------------------------------------------------------


def test_a_duplicate_while_the_first_awaits_gets_409(lease_store: str) -> None:
    async def scenario() -> tuple[HttpResponseBase, HttpResponseBase]:
        entered, resume = asyncio.Event(), asyncio.Event()

        async def hold() -> None:
            entered.set()
            await resume.wait()

        inside["hook"] = hold
        first = asyncio.ensure_future(post())
        await entered.wait()
        inside.clear()
        duplicate = await post()
        resume.set()
        return await first, duplicate

    first, duplicate = run(scenario)

    assert first.status_code == 201
    assert duplicate.status_code == 409
    assert int(duplicate["Retry-After"]) >= 1
    assert duplicate["Content-Type"] == "application/problem+json"
    assert orders() == 1


def test_a_waiting_duplicate_replays_once_the_first_completes(
    lease_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_class = type(get_store(lease_store))
    claim = store_class.claim
    attempts: list[Call] = []

    def counted_claim(self: Any, call: Call, policy: Policy) -> Claim:
        attempts.append(call)
        return claim(self, call, policy)

    monkeypatch.setattr(store_class, "claim", counted_claim)

    async def scenario() -> tuple[HttpResponseBase, HttpResponseBase]:
        entered, resume = asyncio.Event(), asyncio.Event()

        async def hold() -> None:
            entered.set()
            await resume.wait()

        inside["hook"] = hold
        first = asyncio.ensure_future(post(path="/async/waiting/"))
        await entered.wait()
        inside.clear()
        duplicate = asyncio.ensure_future(post(path="/async/waiting/"))

        # The duplicate polls with asyncio.sleep: the loop stays free, so the
        # first request can finish while the duplicate waits. Its attempts are
        # counted: the first request's claim, then two of the duplicate's.
        async def polled_twice() -> None:
            while len(attempts) < 3:
                await asyncio.sleep(0.005)  # lets the duplicate's polls run

        await asyncio.wait_for(polled_twice(), timeout=30)
        assert not duplicate.done()
        resume.set()
        return await first, await duplicate

    first, replay = run(scenario)

    assert first.status_code == replay.status_code == 201
    assert replay["Idempotent-Replayed"] == "true"
    assert replay.content == first.content
    assert orders() == 1


# Mode, scope ------------------------------------------------------------------


@pytest.mark.parametrize("mode_setting", [None, "atomic"], ids=["mode-None", "mode-atomic"])
def test_async_views_run_in_lease_mode_on_the_database_store_whatever_the_mode_setting(
    settings: Any, mode_setting: str | None
) -> None:
    # None would pick atomic for the database store; "atomic" cannot apply either.
    settings.IDEMPOTENCY_STORES = STORES
    settings.IDEMPOTENCY_STORE = DATABASE
    settings.IDEMPOTENCY_MODE = mode_setting
    seen: list[Any] = []

    async def look() -> None:
        row = await IdempotencyKey.objects.aget(key="async-key")
        seen.append((row.state, row.locked_until is not None))

    inside["hook"] = look

    async def scenario() -> HttpResponseBase:
        return await post()

    assert run(scenario).status_code == 201
    assert run(scenario)["Idempotent-Replayed"] == "true"
    assert seen == [(IdempotencyKey.State.IN_PROGRESS, True)]  # a lease, not a row lock
    assert orders() == 1


def test_mode_atomic_on_an_async_view_is_refused_when_decorating() -> None:
    with pytest.raises(ImproperlyConfigured, match="cannot protect the async view create_order"):
        idempotent(mode="atomic")(create_order)


def test_the_scope_is_the_session_user_without_synchronous_only_errors(lease_store: str) -> None:
    user: AbstractBaseUser = UserFactory()

    async def scenario() -> HttpResponseBase:
        client = AsyncClient(raise_request_exception=True)
        await client.aforce_login(user)
        return await post(client=client)

    assert run(scenario).status_code == 201
    assert stored(lease_store, f"user:{user.pk}", "async-key") is not None


def test_an_unreachable_redis_answers_503(settings: Any) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings.CACHES = {
        **settings.CACHES,
        "down": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": f"redis://127.0.0.1:{port}/0",
        },
    }
    settings.IDEMPOTENCY_STORES = {
        "default": STORES[DATABASE],
        "down": {
            "BACKEND": "django_idempotency.stores.cache.CacheStore",
            "OPTIONS": {"CACHE": "down"},
        },
    }
    settings.IDEMPOTENCY_STORE = "down"

    async def scenario() -> HttpResponseBase:
        return await post()

    assert run(scenario).status_code == 503
    assert orders() == 0


def test_the_async_wrapper_is_still_a_coroutine_function() -> None:
    assert inspect.iscoroutinefunction(plain)
    assert not inspect.iscoroutinefunction(idempotent(lambda request: HttpResponse()))
