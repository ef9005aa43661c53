"""The HTTP contract (DESIGN.md section 2) through every entry point.

Each test runs against the plain function view, the class-based view, the DRF
``@api_view`` function and the DRF viewset's create, partial_update and custom
``refund`` action (the ``endpoint`` fixture); DRF-only behaviour is in
test_drf.py, scopes in test_scopes.py.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
import time_machine
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpResponse
from django.test import Client, override_settings
from django.utils import timezone

from django_idempotency.decorators import Options, idempotent, idempotent_function
from django_idempotency.engine import protected
from django_idempotency.models import IdempotencyKey
from django_idempotency.protocol import Call, Snapshot
from tests.conftest import Endpoint, fingerprint_for, problem, scope_of, send
from tests.factories import IdempotencyKeyFactory
from tests.testapp.models import Order
from tests.testapp.views import Boom

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.testapp.urls")]

PROBLEM = "urn:django-idempotency:problem:"


@pytest.fixture
def executions(view_hooks: dict[str, Any]) -> list[int]:
    """Counts the times a view body runs, rolled back or not."""
    runs: list[int] = []
    view_hooks["inside"] = lambda: runs.append(1)
    return runs


# New key, replay --------------------------------------------------------------


def test_new_key_runs_the_view_once_and_stores_its_response(
    user_client: Client, user: Any, endpoint: Endpoint
) -> None:
    response = send(user_client, endpoint)

    assert response.status_code == 201
    assert "Idempotent-Replayed" not in response
    assert Order.objects.count() == 1
    row = IdempotencyKey.objects.get()
    assert (row.scope, row.key, row.state) == (scope_of(user), "key-1", "completed")
    assert (row.method, row.path) == (endpoint.method, endpoint.path)
    assert row.response_status == 201
    assert bytes(row.response_body) == response.content


def test_replay_returns_the_stored_response_without_running_the_view(
    user_client: Client, endpoint: Endpoint
) -> None:
    first = send(user_client, endpoint)
    replay = send(user_client, endpoint)

    assert replay.status_code == first.status_code
    assert replay.content == first.content
    assert replay["Content-Type"] == first["Content-Type"]
    assert replay.get("Location") == first.get("Location")
    assert replay["Idempotent-Replayed"] == "true"
    assert Order.objects.count() == 1


def test_headers_outside_the_allow_list_are_not_replayed(user_client: Client) -> None:
    plain = Endpoint("plain", "POST", "/plain/", drf=False)
    first = send(user_client, plain)
    replay = send(user_client, plain)

    assert first["X-Not-Replayed"] == "1"
    assert "X-Not-Replayed" not in replay
    assert replay["Location"] == first["Location"]


def test_the_allow_list_is_a_setting(user_client: Client, settings: Any) -> None:
    settings.IDEMPOTENCY_REPLAYED_HEADERS = ["Content-Type", "X-Not-Replayed"]
    plain = Endpoint("plain", "POST", "/plain/", drf=False)
    send(user_client, plain)
    replay = send(user_client, plain)

    assert replay["X-Not-Replayed"] == "1"
    assert "Location" not in replay


@pytest.mark.parametrize("path", ["/plain/", "/cbv/"])
@pytest.mark.parametrize(
    "replayed_headers",
    [None, ("Content-Type", "Location", "Set-Cookie")],
    ids=["default", "listed"],
)
def test_set_cookie_is_never_stored_nor_replayed(
    user_client: Client, settings: Any, path: str, replayed_headers: Any
) -> None:
    if replayed_headers is not None:
        settings.IDEMPOTENCY_REPLAYED_HEADERS = replayed_headers
    endpoint = Endpoint(path, "POST", path, drf=False)
    first = send(user_client, endpoint, {"cookie": True})
    replay = send(user_client, endpoint, {"cookie": True})

    assert first.cookies["secret"].value == "s3cr3t"
    assert "secret" not in replay.cookies
    assert replay["Idempotent-Replayed"] == "true"
    stored = IdempotencyKey.objects.get().response_headers
    assert all(name.lower() != "set-cookie" for name, _ in stored)


# In flight ------------------------------------------------------------------


def test_key_in_flight_answers_409_with_retry_after(
    user_client: Client, user: Any, endpoint: Endpoint
) -> None:
    with time_machine.travel(timezone.now(), tick=False):
        row = IdempotencyKeyFactory(
            in_progress=True,
            scope=scope_of(user),
            key="key-1",
            fingerprint=fingerprint_for(endpoint),
            locked_until=timezone.now() + timedelta(seconds=30),
        )
        response = send(user_client, endpoint)

    assert response.status_code == 409
    assert response["Retry-After"] == "30"
    assert problem(response)["type"] == PROBLEM + "request-in-progress"
    assert problem(response)["status"] == 409
    assert Order.objects.count() == 0
    row.refresh_from_db()
    assert row.state == "in_progress"


# Different fingerprint ---------------------------------------------------------


def _assert_mismatch(response: Any, first_body: bytes) -> None:
    assert response.status_code == 422
    assert problem(response)["type"] == PROBLEM + "fingerprint-mismatch"
    assert Order.objects.count() == 1
    row = IdempotencyKey.objects.get()
    assert bytes(row.response_body) == first_body


def test_same_key_with_a_different_body_answers_422(
    user_client: Client, endpoint: Endpoint
) -> None:
    first = send(user_client, endpoint, {"item": "widget"})
    response = send(user_client, endpoint, {"item": "gadget"})
    _assert_mismatch(response, first.content)


def test_same_key_with_a_different_query_string_answers_422(
    user_client: Client, endpoint: Endpoint
) -> None:
    first = send(user_client, endpoint)
    response = send(user_client, endpoint, path=endpoint.path + "?coupon=1")
    _assert_mismatch(response, first.content)


@pytest.mark.parametrize(
    ("first_method", "second_method", "path"),
    [
        ("POST", "PATCH", "/plain/"),
        ("POST", "PUT", "/variants/put-delete/"),
        ("PATCH", "DELETE", "/api/viewset/1/"),
    ],
)
def test_same_key_with_a_different_method_answers_422(
    user_client: Client, first_method: str, second_method: str, path: str
) -> None:
    endpoint = Endpoint(path, first_method, path, drf=path.startswith("/api/"))
    first = send(user_client, endpoint)
    response = send(user_client, endpoint, method=second_method)
    _assert_mismatch(response, first.content)


def test_json_key_order_and_whitespace_do_not_change_the_fingerprint(
    user_client: Client, endpoint: Endpoint
) -> None:
    first = user_client.generic(
        endpoint.method,
        endpoint.path,
        '{"item": "widget", "note": "x"}',
        content_type="application/json",
        headers={"Idempotency-Key": "k"},
    )
    replay = user_client.generic(
        endpoint.method,
        endpoint.path,
        '{ "note":"x",\n "item":"widget" }',
        content_type="application/json",
        headers={"Idempotency-Key": "k"},
    )
    assert replay["Idempotent-Replayed"] == "true"
    assert replay.content == first.content


# Missing and malformed keys -----------------------------------------------------


def test_missing_key_answers_400_when_required(user_client: Client, endpoint: Endpoint) -> None:
    response = send(user_client, endpoint, key=None)

    assert response.status_code == 400
    assert problem(response)["type"] == PROBLEM + "key-missing"
    assert Order.objects.count() == 0
    assert not IdempotencyKey.objects.exists()


def test_missing_key_is_allowed_by_the_required_setting(
    user_client: Client, endpoint: Endpoint, settings: Any
) -> None:
    settings.IDEMPOTENCY_REQUIRED = False
    send(user_client, endpoint, key=None)
    send(user_client, endpoint, key=None)

    assert Order.objects.count() == 2
    assert not IdempotencyKey.objects.exists()


def test_optional_key_left_out_runs_unprotected(client: Client) -> None:
    optional = Endpoint("optional", "POST", "/optional/", drf=False)
    assert send(client, optional, key=None).status_code == 201
    assert send(client, optional, key=None).status_code == 201
    assert Order.objects.count() == 2
    assert not IdempotencyKey.objects.exists()


def test_optional_key_given_is_honoured(client: Client) -> None:
    optional = Endpoint("optional", "POST", "/optional/", drf=False)
    send(client, optional)
    assert send(client, optional)["Idempotent-Replayed"] == "true"
    assert Order.objects.count() == 1


MALFORMED_KEYS = {
    "empty": "",
    "whitespace": "   ",
    "too-long": "k" * 256,
    "non-ascii": "cl\u00e9",
    "control-char": "a\x01b",
    "tab-inside": "a\tb",
    "delete-char": "a\x7fb",
    "unclosed-quote": '"abc',
    "bad-escape": '"a\\bc"',
    "after-closing-quote": '"abc"def',
    "quoted-empty": '""',
    "quoted-too-long": '"' + "k" * 256 + '"',
    "quoted-with-parameters": '"abc";x=1',
}


@pytest.mark.parametrize("key", MALFORMED_KEYS.values(), ids=MALFORMED_KEYS.keys())
def test_malformed_key_answers_400(user_client: Client, endpoint: Endpoint, key: str) -> None:
    response = send(user_client, endpoint, key=key)

    assert response.status_code == 400
    assert problem(response)["type"] == PROBLEM + "key-malformed"
    assert Order.objects.count() == 0
    assert not IdempotencyKey.objects.exists()


def test_longest_key_is_accepted(user_client: Client, endpoint: Endpoint) -> None:
    key = "k" * 255
    send(user_client, endpoint, key=key)
    assert send(user_client, endpoint, key=key)["Idempotent-Replayed"] == "true"
    assert IdempotencyKey.objects.get().key == key


@pytest.mark.parametrize(
    ("stored", "sent"), [("abc", '"abc"'), ('"abc"', "abc"), ('a"b', '"a\\"b"')]
)
def test_bare_and_quoted_forms_are_the_same_key(
    user_client: Client, endpoint: Endpoint, stored: str, sent: str
) -> None:
    send(user_client, endpoint, key=stored)
    replay = send(user_client, endpoint, key=sent)

    assert replay["Idempotent-Replayed"] == "true"
    assert Order.objects.count() == 1


def test_keys_differing_in_case_or_trailing_space_are_different_keys(
    user_client: Client, endpoint: Endpoint
) -> None:
    for key in ("abc", "ABC", '"abc "'):
        assert "Idempotent-Replayed" not in send(user_client, endpoint, key=key)
    assert Order.objects.count() == 3


# Failures are not kept -------------------------------------------------------------


def test_view_raising_keeps_nothing_and_a_retry_executes(
    user_client: Client, endpoint: Endpoint, view_hooks: dict[str, Any]
) -> None:
    failures = [Boom("first attempt fails after writing")]

    def fail_once() -> None:
        if failures:
            raise failures.pop()

    view_hooks["inside"] = fail_once
    with pytest.raises(Boom):
        send(user_client, endpoint)
    assert not IdempotencyKey.objects.exists()
    assert Order.objects.count() == 0  # atomic: the view's write went with the key

    retry = send(user_client, endpoint)
    assert retry.status_code == 201
    assert "Idempotent-Replayed" not in retry
    assert Order.objects.count() == 1
    assert IdempotencyKey.objects.get().state == "completed"


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_keeps_nothing_and_rolls_back_the_views_writes(
    user_client: Client, endpoint: Endpoint, executions: list[int], status: int
) -> None:
    # Our documented choice: in atomic mode a 5xx is a failure like an exception.
    for _ in range(2):
        response = send(user_client, endpoint, {"status": status})
        assert response.status_code == status
        assert "Idempotent-Replayed" not in response

    assert len(executions) == 2
    assert not IdempotencyKey.objects.exists()
    assert Order.objects.count() == 0


@pytest.mark.parametrize("status", [401, 403, 408, 429])
def test_retryable_4xx_keeps_nothing(
    user_client: Client, endpoint: Endpoint, executions: list[int], status: int
) -> None:
    for _ in range(2):
        assert send(user_client, endpoint, {"status": status}).status_code == status

    assert len(executions) == 2
    assert not IdempotencyKey.objects.exists()
    assert Order.objects.count() == 0


@pytest.mark.parametrize("status", [400, 404, 409, 422])
def test_other_4xx_are_outcomes_and_replayed(
    user_client: Client, endpoint: Endpoint, executions: list[int], status: int
) -> None:
    first = send(user_client, endpoint, {"status": status})
    replay = send(user_client, endpoint, {"status": status})

    assert replay.status_code == first.status_code == status
    assert replay.content == first.content
    assert replay["Idempotent-Replayed"] == "true"
    assert len(executions) == 1
    assert Order.objects.count() == 1


def test_release_statuses_are_a_setting(
    user_client: Client, executions: list[int], settings: Any
) -> None:
    settings.IDEMPOTENCY_RELEASE_STATUSES = [409]
    plain = Endpoint("plain", "POST", "/plain/", drf=False)
    for _ in range(2):
        send(user_client, plain, {"status": 409}, key="conflict")
        send(user_client, plain, {"status": 403}, key="forbidden")

    assert len(executions) == 3  # 409 twice, 403 once then replayed
    assert list(IdempotencyKey.objects.values_list("key", flat=True)) == ["forbidden"]


# Retention ---------------------------------------------------------------------


def test_key_older_than_the_retention_is_new_again(user_client: Client, endpoint: Endpoint) -> None:
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        send(user_client, endpoint)
    with time_machine.travel(start + timedelta(hours=23, minutes=59), tick=False):
        assert send(user_client, endpoint)["Idempotent-Replayed"] == "true"
    with time_machine.travel(start + timedelta(hours=24, seconds=1), tick=False):
        again = send(user_client, endpoint)

    assert again.status_code == 201
    assert "Idempotent-Replayed" not in again
    assert Order.objects.count() == 2
    row = IdempotencyKey.objects.get()
    assert row.expires == start + timedelta(hours=48, seconds=1)


def test_expired_key_reused_with_a_different_request_is_new_not_a_mismatch(
    user_client: Client, endpoint: Endpoint
) -> None:
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        send(user_client, endpoint, {"item": "widget"})
    with time_machine.travel(start + timedelta(days=2), tick=False):
        response = send(user_client, endpoint, {"item": "gadget"})

    assert response.status_code == 201
    assert Order.objects.count() == 2


def test_retention_is_a_setting(user_client: Client, settings: Any) -> None:
    settings.IDEMPOTENCY_RETENTION = 10
    plain = Endpoint("plain", "POST", "/plain/", drf=False)
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        send(user_client, plain)
    with time_machine.travel(start + timedelta(seconds=11), tick=False):
        assert "Idempotent-Replayed" not in send(user_client, plain)


def test_retention_per_view(user_client: Client) -> None:
    short = Endpoint("short", "POST", "/variants/short-retention/", drf=False)
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        send(user_client, short)
    with time_machine.travel(start + timedelta(seconds=59), tick=False):
        assert send(user_client, short)["Idempotent-Replayed"] == "true"
    with time_machine.travel(start + timedelta(seconds=61), tick=False):
        assert "Idempotent-Replayed" not in send(user_client, short)
    assert Order.objects.count() == 2


# Safe methods ------------------------------------------------------------------------


# DRF's @api_view answers HEAD only where it is listed: not on /api/function/.
@pytest.mark.parametrize(
    ("method", "path"),
    [
        (m, p)
        for p in ("/plain/", "/api/function/", "/api/viewset/")
        for m in ("GET", "HEAD", "OPTIONS")
        if (m, p) != ("HEAD", "/api/function/")
    ],
)
@pytest.mark.parametrize("key", ["key-1", ""], ids=["key", "malformed-key"])
def test_safe_methods_are_untouched(user_client: Client, method: str, path: str, key: str) -> None:
    for _ in range(2):
        response = user_client.generic(method, path, headers={"Idempotency-Key": key})
        assert response.status_code in {200, 201}
        assert "Idempotent-Replayed" not in response

    assert not IdempotencyKey.objects.exists()
    if path == "/plain/":
        assert Order.objects.count() == 2  # the function view ran both times


def test_unprotected_unsafe_method_is_untouched(user_client: Client) -> None:
    # PUT is not in the default methods: no key needed, nothing stored.
    for _ in range(2):
        assert user_client.put("/plain/", "{}", content_type="application/json").status_code == 201
    assert Order.objects.count() == 2
    assert not IdempotencyKey.objects.exists()


def test_methods_are_a_setting(user_client: Client, settings: Any) -> None:
    settings.IDEMPOTENCY_METHODS = ["PUT"]
    put = Endpoint("put", "PUT", "/plain/", drf=False)
    send(user_client, put)
    assert send(user_client, put)["Idempotent-Replayed"] == "true"
    assert (
        send(user_client, Endpoint("post", "POST", "/plain/", drf=False), key=None).status_code
        == 201
    )


# Problem responses ---------------------------------------------------------------------


def test_problem_bodies_follow_rfc_9457(user_client: Client, endpoint: Endpoint) -> None:
    body = problem(send(user_client, endpoint, key=""))
    assert set(body) == {"type", "title", "status", "detail"}
    assert body["status"] == 400
    assert json.dumps(body)  # plain JSON values


def test_the_header_name_is_a_setting(user_client: Client, settings: Any) -> None:
    settings.IDEMPOTENCY_HEADER = "X-Request-Key"
    plain = Endpoint("plain", "POST", "/plain/", drf=False)
    assert send(user_client, plain, key="ignored").status_code == 400
    send(user_client, plain, key=None, headers={"X-Request-Key": "k"})
    replay = send(user_client, plain, key=None, headers={"X-Request-Key": "k"})
    assert replay["Idempotent-Replayed"] == "true"


# Decoration ---------------------------------------------------------------------------


def test_decorator_keeps_the_view_name() -> None:
    @idempotent(required=False)
    def create_order(request: Any) -> Any:
        """Creates an order."""

    assert create_order.__name__ == "create_order"
    assert create_order.__doc__ == "Creates an order."


@pytest.mark.parametrize(
    "options",
    [
        {"mode": "optimistic"},
        {"retention": 0},
        {"lease": -1},
        {"wait": -1},
        {"retention": timedelta(0)},
        {"methods": "POST"},
        {"methods": "post"},
        {"methods": ["POST", "PSOT"]},
        {"methods": ["POST", 1]},
        {"methods": 1},
        {"required": "yes"},
        {"scope": 42},
        {"fingerprint": object()},
        {"retention": "24h"},
        {"retention": True},
        {"lease": timedelta(seconds=-5)},
        {"wait": "5"},
        {"store": "nowhere"},
        {"store": 42},
        {"mode": 1},
    ],
    ids=str,
)
def test_bad_options_are_refused_at_decoration_time(options: dict[str, Any]) -> None:
    with pytest.raises(ImproperlyConfigured):
        idempotent(**options)


def test_a_methods_string_names_what_was_meant() -> None:
    with pytest.raises(ImproperlyConfigured, match=r'methods=\("POST",\)'):
        idempotent(methods="POST")


@pytest.mark.parametrize(
    "options",
    [
        {"methods": ["post", "PUT", "delete", "PATCH"]},
        {"methods": ("POST", "GET")},
        {"methods": frozenset({"POST"})},
        {"scope": "tests.testapp.variants.tenant_scope"},
        {"fingerprint": lambda request: "x"},
        {"retention": timedelta(hours=1), "lease": 0.5, "wait": 0},
        {"store": "default"},
    ],
    ids=str,
)
def test_good_options_are_accepted(options: dict[str, Any]) -> None:
    assert idempotent(**options)


def test_a_bad_function_option_is_refused_when_decorated() -> None:
    with pytest.raises(ImproperlyConfigured, match="store"):
        idempotent_function(key=lambda n: n, store="nowhere")


@pytest.mark.django_db
def test_options_fall_back_to_the_settings_at_call_time(settings: Any) -> None:
    options = Options()
    settings.IDEMPOTENCY_RETENTION = timedelta(minutes=5)
    settings.IDEMPOTENCY_MODE = "lease"
    settings.IDEMPOTENCY_WAIT = 2
    policy = options.policy()
    assert (policy.retention, policy.wait) == (300.0, 2.0)
    assert Options(retention=timedelta(minutes=1), mode="atomic").policy().retention == 60.0
    # The mode left unset is the setting's, which the engine reads when it claims.
    assert policy.mode is None
    with protected(Call("scope", "fallback", "f"), policy) as guard:
        row = IdempotencyKey.objects.get(key="fallback")
        guard.conclusion = Snapshot(201)
    assert row.locked_until is not None  # a lease: committed before the block ran


def test_a_policy_is_made_once_and_made_again_when_the_settings_change() -> None:
    options = Options(lease=5)
    policy = options.policy()

    assert options.policy() is policy
    with override_settings(IDEMPOTENCY_WAIT=3):
        inside = options.policy()
        assert (inside.wait, inside.lease) == (3.0, 5.0)
        assert options.policy() is inside
        with override_settings(IDEMPOTENCY_WAIT=4):
            assert options.policy().wait == 4.0
        assert options.policy().wait == 3.0
    assert options.policy().wait == policy.wait == 0.0
    assert options == Options(lease=5)  # what it keeps is no part of what it compares


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
def test_safe_methods_stay_untouched_even_when_listed(method: str, rf: Any) -> None:
    # Section 2: safe methods are untouched, whatever a view's methods say.
    ran: list[str] = []

    @idempotent(methods=["POST", method])
    def view(request: Any) -> Any:
        ran.append(request.method)
        return HttpResponse()

    response = view(rf.generic(method, "/"))
    assert response.status_code == 200
    assert ran == [method]
