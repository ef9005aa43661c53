"""DRF specifics: authentication kinds, check ordering, the mixin's options and hooks."""

from __future__ import annotations

import base64
from datetime import timedelta
from typing import Any

import pytest
import time_machine
from django.core.exceptions import ImproperlyConfigured
from django.test import Client
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.decorators import api_view
from rest_framework.response import Response

from django_idempotency.decorators import idempotent
from django_idempotency.models import IdempotencyKey
from tests.conftest import Endpoint, problem, send
from tests.factories import PASSWORD
from tests.testapp.models import Order

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.testapp.urls")]

CREATE = Endpoint("viewset_create", "POST", "/api/viewset/", drf=True)
GUARDED = Endpoint("guarded", "POST", "/variants/api/guarded/", drf=True)


def token_headers(user: Any) -> dict[str, str]:
    return {"Authorization": f"Token {Token.objects.create(user=user).key}"}


def basic_headers(user: Any) -> dict[str, str]:
    credentials = base64.b64encode(f"{user.username}:{PASSWORD}".encode()).decode()
    return {"Authorization": f"Basic {credentials}"}


def session_client(user: Any) -> tuple[Client, dict[str, str]]:
    client = Client()
    client.force_login(user)
    return client, {}


AUTHENTICATIONS = {
    "session": session_client,
    "token": lambda user: (Client(), token_headers(user)),
    "basic": lambda user: (Client(), basic_headers(user)),
}


# Scoping by the user DRF authenticated -------------------------------------------------


@pytest.mark.parametrize("authentication", AUTHENTICATIONS)
@pytest.mark.parametrize(
    "endpoint", [CREATE, Endpoint("api_function", "POST", "/api/function/", drf=True)], ids=str
)
def test_another_user_reusing_a_key_never_gets_the_first_users_response(
    user: Any, other_user: Any, authentication: str, endpoint: Endpoint
) -> None:
    client_a, headers_a = AUTHENTICATIONS[authentication](user)
    client_b, headers_b = AUTHENTICATIONS[authentication](other_user)

    first = send(client_a, endpoint, headers=headers_a)
    theirs = send(client_b, endpoint, headers=headers_b)

    assert theirs.status_code == 201
    assert "Idempotent-Replayed" not in theirs
    assert theirs.content != first.content
    assert Order.objects.filter(owner=user).count() == 1
    assert Order.objects.filter(owner=other_user).count() == 1
    assert send(client_a, endpoint, headers=headers_a).content == first.content


def test_one_user_is_one_scope_whatever_the_authentication(user: Any) -> None:
    session, _ = session_client(user)
    first = send(session, CREATE)
    by_token = send(Client(), CREATE, headers=token_headers(user))
    by_basic = send(Client(), CREATE, headers=basic_headers(user))

    assert by_token["Idempotent-Replayed"] == by_basic["Idempotent-Replayed"] == "true"
    assert by_token.content == by_basic.content == first.content
    assert Order.objects.count() == 1


def test_anonymous_drf_requests_share_the_anonymous_scope(client: Client) -> None:
    anonymous = Endpoint("anonymous", "POST", "/variants/api/anonymous/", drf=True)
    send(client, anonymous)
    replay = send(Client(), anonymous)

    assert replay["Idempotent-Replayed"] == "true"
    assert IdempotencyKey.objects.get().scope == "anonymous"


# Authentication, permission and throttle run first -----------------------------------


@pytest.mark.parametrize("endpoint", [CREATE, GUARDED], ids=str)
def test_unauthenticated_request_stores_nothing(client: Client, endpoint: Endpoint) -> None:
    response = send(client, endpoint)

    assert response.status_code in {401, 403}
    assert not IdempotencyKey.objects.exists()
    assert Order.objects.count() == 0


def test_bad_credentials_store_nothing(user: Any) -> None:
    headers = {"Authorization": "Token not-a-token"}
    # 403 rather than 401: DRF takes the challenge from the first class, session.
    assert send(Client(), CREATE, headers=headers).status_code == 403
    assert not IdempotencyKey.objects.exists()
    assert Order.objects.count() == 0


def test_permission_denied_stores_nothing(user_client: Client) -> None:
    response = send(user_client, GUARDED, headers={"X-Deny": "1"})

    assert response.status_code == 403
    assert not IdempotencyKey.objects.exists()
    assert Order.objects.count() == 0


def test_throttled_request_stores_nothing(user_client: Client) -> None:
    response = send(user_client, GUARDED, headers={"X-Throttle": "1"})

    assert response.status_code == 429
    assert not IdempotencyKey.objects.exists()
    assert Order.objects.count() == 0


def test_checks_run_before_a_key_is_even_parsed(client: Client) -> None:
    # An anonymous caller learns nothing about keys, not even that one is malformed.
    assert send(client, CREATE, key="").status_code == 403
    assert send(client, CREATE, key=None).status_code == 403


def test_a_replay_is_only_given_to_a_caller_who_passes_the_checks_today(
    user_client: Client,
) -> None:
    send(user_client, GUARDED)

    assert send(user_client, GUARDED, headers={"X-Deny": "1"}).status_code == 403
    assert send(user_client, GUARDED, headers={"X-Throttle": "1"}).status_code == 429
    assert send(user_client, GUARDED)["Idempotent-Replayed"] == "true"
    assert Order.objects.count() == 1


# Decorator placement ---------------------------------------------------------------------


def test_idempotent_above_api_view_is_refused_at_decoration_time() -> None:
    def create(request: Any) -> Response:
        return Response()

    with pytest.raises(ImproperlyConfigured, match="under"):
        idempotent(api_view(["POST"])(create))
    with pytest.raises(ImproperlyConfigured):
        idempotent(mode="lease")(api_view(["POST"])(create))


def test_idempotent_under_api_view_is_accepted() -> None:
    def create(request: Any) -> Response:
        return Response()

    assert api_view(["POST"])(idempotent(create)) is not None


# Viewset actions ---------------------------------------------------------------------------


def test_destroy_is_protected_where_configured(user_client: Client) -> None:
    order = Order.objects.create(item="to delete")
    destroy = Endpoint("destroy", "DELETE", f"/api/viewset/{order.pk}/", drf=True)

    first = send(user_client, destroy, key="delete-1")
    replay = send(user_client, destroy, key="delete-1")

    assert first.status_code == replay.status_code == 204
    assert replay["Idempotent-Replayed"] == "true"
    assert not Order.objects.exists()
    row = IdempotencyKey.objects.get()
    assert (row.method, row.response_status) == ("DELETE", 204)
    assert send(user_client, destroy, key=None).status_code == 400


def test_destroy_with_a_different_target_is_a_mismatch(user_client: Client) -> None:
    first, second = Order.objects.create(item="a"), Order.objects.create(item="b")
    send(user_client, Endpoint("d", "DELETE", f"/api/viewset/{first.pk}/", drf=True))
    response = send(user_client, Endpoint("d", "DELETE", f"/api/viewset/{second.pk}/", drf=True))

    assert response.status_code == 422
    assert Order.objects.get() == second


def test_list_is_untouched(user_client: Client) -> None:
    response = user_client.get("/api/viewset/", headers={"Idempotency-Key": "k"})
    assert response.status_code == 200
    assert not IdempotencyKey.objects.exists()


def test_idempotency_actions_limits_the_protected_actions(user_client: Client) -> None:
    create = Endpoint("create", "POST", "/variants/api/selective/", drf=True)
    refund = Endpoint("refund", "POST", "/variants/api/selective/1/refund/", drf=True)

    assert send(user_client, create, key=None).status_code == 400
    for _ in range(2):
        assert send(user_client, refund, key="refund-1").status_code == 201

    assert Order.objects.count() == 2
    assert not IdempotencyKey.objects.exists()


def test_class_attribute_callables_receive_the_request(user_client: Client) -> None:
    attributes = Endpoint("attributes", "POST", "/variants/api/attributes/", drf=True)

    send(user_client, attributes, {"item": "widget", "note": "a"}, headers={"X-Tenant": "acme"})
    replay = send(
        user_client, attributes, {"item": "widget", "note": "b"}, headers={"X-Tenant": "acme"}
    )
    mismatch = send(user_client, attributes, {"item": "gadget"}, headers={"X-Tenant": "acme"})
    other_tenant = send(user_client, attributes, {"item": "gadget"}, headers={"X-Tenant": "zeta"})

    assert replay["Idempotent-Replayed"] == "true"  # the fingerprint ignores "note"
    assert mismatch.status_code == 422
    assert other_tenant.status_code == 201
    assert set(IdempotencyKey.objects.values_list("scope", flat=True)) == {
        "tenant:acme",
        "tenant:zeta",
    }


def test_class_attributes_set_required_and_retention(user_client: Client) -> None:
    attributes = Endpoint("attributes", "POST", "/variants/api/attributes/", drf=True)
    assert send(user_client, attributes, key=None).status_code == 201  # required = False

    start = timezone.now()
    with time_machine.travel(start, tick=False):
        send(user_client, attributes)
    with time_machine.travel(start + timedelta(seconds=61), tick=False):
        assert "Idempotent-Replayed" not in send(user_client, attributes)
    assert Order.objects.count() == 3


def test_hooks_decide_per_request(user_client: Client) -> None:
    hooks = Endpoint("hooks", "POST", "/variants/api/hooks/", drf=True)

    assert send(user_client, hooks, key=None).status_code == 400
    assert send(user_client, hooks, key=None, headers={"X-Require": "no"}).status_code == 201

    send(user_client, hooks, headers={"X-Tenant": "acme", "X-Mode": "lease"})
    assert IdempotencyKey.objects.get().scope == "hook:acme"

    start = timezone.now()
    with time_machine.travel(start, tick=False):
        send(user_client, hooks, key="short", headers={"X-Short": "1"})
    with time_machine.travel(start + timedelta(seconds=61), tick=False):
        assert "Idempotent-Replayed" not in send(user_client, hooks, key="short")


def test_hooks_methods_leave_other_methods_unprotected(user_client: Client) -> None:
    # get_idempotency_methods() says POST only: PATCH runs without a key.
    patch = Endpoint("hooks", "PATCH", "/variants/api/hooks/1/", drf=True)
    assert send(user_client, patch, key=None).status_code == 201
    assert not IdempotencyKey.objects.exists()


def test_problem_responses_from_drf_views_are_problem_json(user_client: Client) -> None:
    response = send(user_client, CREATE, key=None)
    body = problem(response)
    assert body["type"] == "urn:django-idempotency:problem:key-missing"
    assert body["status"] == 400


def test_static_and_dotted_path_attributes(user_client: Client) -> None:
    static = Endpoint("static", "POST", "/variants/api/static/", drf=True)
    send(user_client, static, {"item": "widget", "note": "a"}, headers={"X-Tenant": "acme"})
    replay = send(
        user_client, static, {"item": "widget", "note": "b"}, headers={"X-Tenant": "acme"}
    )

    assert replay["Idempotent-Replayed"] == "true"
    assert IdempotencyKey.objects.get().scope == "tenant:acme"


def test_a_raised_api_exception_keeps_nothing_and_rolls_back(user_client: Client) -> None:
    # "View raised": DRF answers 400 for it, but the key is free and the write undone.
    first = send(user_client, GUARDED, {"invalid": True})
    retry = send(user_client, GUARDED, {"invalid": True})

    assert first.status_code == retry.status_code == 400
    assert "Idempotent-Replayed" not in retry
    assert not IdempotencyKey.objects.exists()
    assert Order.objects.count() == 0


def test_a_hook_returning_a_bad_option_is_a_clear_error_not_an_unprotected_view(
    user: Any,
) -> None:
    from rest_framework.test import APIRequestFactory, force_authenticate

    from tests.testapp.views import OrderViewSet

    class MethodsAsString(OrderViewSet):
        def get_idempotency_methods(self, request: Any) -> Any:
            return "POST"

    request = APIRequestFactory().post("/", {"item": "x"}, format="json")
    force_authenticate(request, user)
    view = MethodsAsString.as_view({"post": "create"})
    with pytest.raises(ImproperlyConfigured, match=r"MethodsAsString.*get_idempotency_\*"):
        view(request)
    assert Order.objects.count() == 0
