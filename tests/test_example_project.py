"""The example shop: each entry point behaves as the README shows, and the project runs."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from io import StringIO
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.core.management import call_command
from django.db import connections
from django.http.response import HttpResponseBase
from django.test import Client
from rest_framework.authtoken.models import Token

from django_idempotency.models import IdempotencyKey
from example_project.shop import provider
from example_project.shop.management.commands.seed_demo import DEMO_USERS
from example_project.shop.models import Order, Payment

pytestmark = pytest.mark.urls("example_project.urls")

ROOT = Path(__file__).resolve().parent.parent
PROBLEM = "urn:django-idempotency:problem:"


@pytest.fixture
def demo_users(db: None) -> dict[str, AbstractBaseUser]:
    call_command("seed_demo", stdout=StringIO())
    return {user.get_username(): user for user in get_user_model().objects.all()}


def token_client(username: str) -> Client:
    return Client(headers={"Authorization": f"Token {DEMO_USERS[username][1]}"})


def post_json(client: Client, path: str, data: Any, key: str | None = None) -> HttpResponseBase:
    headers = {} if key is None else {"Idempotency-Key": key}
    response: HttpResponseBase = client.post(
        path, json.dumps(data), content_type="application/json", headers=headers
    )
    return response


def problem_type(response: HttpResponseBase) -> str:
    assert response["Content-Type"] == "application/problem+json"
    return str(json.loads(response.content)["type"])


@pytest.fixture
def charges(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Amounts sent to the payment provider (the one external system of the shop)."""
    charged: list[int] = []

    def charge(amount_cents: int, idempotency_key: str | None = None) -> str:
        charged.append(amount_cents)
        return f"ch_test_{len(charged)}"

    monkeypatch.setattr(provider, "charge", charge)
    return charged


def create_order(username: str, item: str = "coffee") -> Order:
    return Order.objects.create(
        owner=get_user_model().objects.get(username=username), item=item, amount="4.50"
    )


# seed_demo


def test_seed_demo_creates_users_with_their_passwords_and_tokens(
    demo_users: dict[str, AbstractBaseUser],
) -> None:
    out = StringIO()
    call_command("seed_demo", stdout=out)  # twice: resets, creates nothing new

    users = get_user_model().objects.order_by("username")
    assert [user.get_username() for user in users] == ["admin", "alice", "bob"]
    for user in users:
        password, token, superuser = DEMO_USERS[user.get_username()]
        assert user.check_password(password)
        assert user.is_superuser is superuser
        assert Token.objects.get(user=user).key == token
    assert "alice  password 'alice'" in out.getvalue()


def test_seed_demo_resets_a_changed_password(demo_users: dict[str, AbstractBaseUser]) -> None:
    alice = demo_users["alice"]
    alice.set_password("changed")
    alice.save()

    call_command("seed_demo", stdout=StringIO())

    alice.refresh_from_db()
    assert alice.check_password("alice")


# POST /api/orders/: DRF viewset with IdempotencyMixin


def test_order_is_created_once_and_replayed(demo_users: dict[str, AbstractBaseUser]) -> None:
    client = token_client("alice")
    order = {"item": "coffee", "amount": "4.50"}

    first = post_json(client, "/api/orders/", order, key="order-1")
    second = post_json(client, "/api/orders/", order, key="order-1")

    assert first.status_code == second.status_code == 201
    assert second["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first
    assert second.content == first.content
    order_id = json.loads(first.content)["id"]
    assert second["Location"] == first["Location"] == f"http://testserver/api/orders/{order_id}/"
    assert Order.objects.filter(owner=demo_users["alice"]).count() == 1


def test_order_key_reused_for_another_order_is_refused(
    demo_users: dict[str, AbstractBaseUser],
) -> None:
    client = token_client("alice")
    post_json(client, "/api/orders/", {"item": "coffee", "amount": "4.50"}, key="order-1")

    response = post_json(client, "/api/orders/", {"item": "tea", "amount": "4.50"}, key="order-1")

    assert response.status_code == 422
    assert problem_type(response) == PROBLEM + "fingerprint-mismatch"
    assert list(Order.objects.values_list("item", flat=True)) == ["coffee"]


def test_order_without_key_is_refused(demo_users: dict[str, AbstractBaseUser]) -> None:
    response = post_json(token_client("alice"), "/api/orders/", {"item": "tea", "amount": "1"})

    assert response.status_code == 400
    assert problem_type(response) == PROBLEM + "key-missing"
    assert not Order.objects.exists()


def test_same_key_of_two_users_creates_two_orders(
    demo_users: dict[str, AbstractBaseUser],
) -> None:
    order = {"item": "coffee", "amount": "4.50"}

    post_json(token_client("alice"), "/api/orders/", order, key="order-1")
    response = post_json(token_client("bob"), "/api/orders/", order, key="order-1")

    assert response.status_code == 201
    assert "Idempotent-Replayed" not in response
    assert sorted(Order.objects.values_list("owner__username", flat=True)) == ["alice", "bob"]


def test_anonymous_order_is_refused_before_a_key_is_kept(db: None) -> None:
    response = post_json(Client(), "/api/orders/", {"item": "tea", "amount": "1"}, key="k")

    # 401 or 403, depending on which authentication class comes first.
    assert response.status_code in (401, 403)
    assert not IdempotencyKey.objects.exists()


def test_listing_orders_needs_no_key(demo_users: dict[str, AbstractBaseUser]) -> None:
    create_order("alice")
    create_order("bob")

    response = token_client("alice").get("/api/orders/")

    assert response.status_code == 200
    assert [order["item"] for order in response.json()] == ["coffee"]


# POST /api/payments/: @api_view above @idempotent, lease mode around the provider


def test_payment_is_charged_once_and_replayed(
    demo_users: dict[str, AbstractBaseUser], charges: list[int]
) -> None:
    client = token_client("alice")
    payment = {"order": create_order("alice").pk, "amount_cents": 450}

    first = post_json(client, "/api/payments/", payment, key="pay-1")
    second = post_json(client, "/api/payments/", payment, key="pay-1")

    assert first.status_code == second.status_code == 201
    assert second["Idempotent-Replayed"] == "true"
    assert second.content == first.content
    assert json.loads(first.content)["reference"] == "ch_test_1"
    assert first["Location"] == f"http://testserver/api/payments/{json.loads(first.content)['id']}/"
    assert charges == [450]
    assert Payment.objects.count() == 1


def test_payment_detail_is_the_owners_only(
    demo_users: dict[str, AbstractBaseUser], charges: list[int]
) -> None:
    payment = {"order": create_order("alice").pk, "amount_cents": 450}
    location = post_json(token_client("alice"), "/api/payments/", payment, key="pay-1")["Location"]

    assert token_client("alice").get(location).json()["reference"] == "ch_test_1"
    assert token_client("bob").get(location).status_code == 404


def test_paying_for_someone_elses_order_charges_nothing(
    demo_users: dict[str, AbstractBaseUser], charges: list[int]
) -> None:
    payment = {"order": create_order("alice").pk, "amount_cents": 450}

    response = post_json(token_client("bob"), "/api/payments/", payment, key="pay-1")

    assert response.status_code == 400
    assert "order" in response.json()
    assert charges == []
    assert not Payment.objects.exists()


@pytest.mark.concurrency
@pytest.mark.django_db(transaction=True)
def test_duplicate_payment_while_the_first_is_charging_gets_409(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    call_command("seed_demo", stdout=StringIO())
    payment = {"order": create_order("alice").pk, "amount_cents": 450}
    charging, release = threading.Event(), threading.Event()

    def slow_charge(amount_cents: int, idempotency_key: str | None = None) -> str:
        charging.set()
        assert release.wait(timeout=30), "the test never released the charge"
        return "ch_slow"

    monkeypatch.setattr(provider, "charge", slow_charge)
    first: list[HttpResponseBase] = []

    def pay() -> None:
        try:
            first.append(post_json(token_client("alice"), "/api/payments/", payment, key="pay-1"))
        finally:
            connections.close_all()

    thread = threading.Thread(target=pay)
    thread.start()
    try:
        assert charging.wait(timeout=30)
        duplicate = post_json(token_client("alice"), "/api/payments/", payment, key="pay-1")
    finally:
        release.set()
        thread.join(timeout=30)

    assert duplicate.status_code == 409
    assert problem_type(duplicate) == PROBLEM + "request-in-progress"
    assert 1 <= int(duplicate["Retry-After"]) <= 10  # the view's 10-second lease
    assert first[0].status_code == 201
    replay = post_json(token_client("alice"), "/api/payments/", payment, key="pay-1")
    assert replay["Idempotent-Replayed"] == "true"
    assert list(Payment.objects.values_list("reference", flat=True)) == ["ch_slow"]


# POST /orders/: plain Django view, login_required above @idempotent


@pytest.fixture
def alice_session(demo_users: dict[str, AbstractBaseUser]) -> Client:
    client = Client()
    client.force_login(demo_users["alice"])
    return client


def test_plain_view_creates_the_order_once(alice_session: Client) -> None:
    order = {"item": "coffee", "amount": 4.5}

    first = post_json(alice_session, "/orders/", order, key="order-1")
    second = post_json(alice_session, "/orders/", order, key="order-1")

    assert first.status_code == second.status_code == 201
    created = json.loads(first.content)
    assert created["item"] == "coffee"
    assert created["amount"] == "4.50"
    assert first["Location"] == second["Location"] == f"/api/orders/{created['id']}/"
    assert second["Idempotent-Replayed"] == "true"
    assert Order.objects.get().owner.get_username() == "alice"


@pytest.mark.parametrize(
    ("body", "field"),
    [(b"not json", "__all__"), (b"[1, 2]", "__all__"), (b'{"item": "tea"}', "amount")],
)
def test_plain_view_refuses_a_bad_order(alice_session: Client, body: bytes, field: str) -> None:
    response = alice_session.post(
        "/orders/", body, content_type="application/json", headers={"Idempotency-Key": "bad"}
    )

    assert response.status_code == 400
    assert field in response.json()["errors"]
    assert not Order.objects.exists()


def test_plain_view_refuses_a_multipart_body_through_the_csrf_check(
    demo_users: dict[str, AbstractBaseUser],
) -> None:
    # As a browser sends it: the CSRF middleware reads request.POST first.
    client = Client(enforce_csrf_checks=True)
    client.force_login(demo_users["alice"])
    token = client.get("/").context["csrf_token"]
    response = client.post(
        "/orders/",
        {"item": "tea", "amount": "1", "csrfmiddlewaretoken": str(token)},
        headers={"Idempotency-Key": "multipart"},
    )

    assert response.status_code == 400
    assert "__all__" in response.json()["errors"]
    assert Order.objects.count() == 0


def test_plain_view_refuses_deeply_nested_json(alice_session: Client) -> None:
    response = alice_session.post(
        "/orders/",
        b"[" * 100_000 + b"]" * 100_000,
        content_type="application/json",
        headers={"Idempotency-Key": "deep"},
    )

    assert response.status_code == 400
    assert "__all__" in response.json()["errors"]


def test_plain_view_sends_anonymous_users_to_log_in(db: None) -> None:
    response = post_json(Client(), "/orders/", {"item": "tea", "amount": 1}, key="k")

    assert response.status_code == 302
    assert response["Location"].endswith("?next=/orders/")
    assert not IdempotencyKey.objects.exists()


def test_plain_view_only_accepts_post(alice_session: Client) -> None:
    assert alice_session.get("/orders/").status_code == 405


def test_index_page_posts_with_a_key(alice_session: Client) -> None:
    response = alice_session.get("/")

    assert response.status_code == 200
    assert b'"Idempotency-Key": key' in response.content


# Admin


@pytest.mark.parametrize("path", ["/admin/shop/order/", "/admin/shop/payment/"])
def test_admin_lists_the_shop(demo_users: dict[str, AbstractBaseUser], path: str) -> None:
    client = Client()
    client.force_login(demo_users["admin"])
    create_order("alice")

    assert client.get(path).status_code == 200


# Settings


@pytest.fixture
def example_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The example settings module, re-read after a test changes the environment."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    module = importlib.import_module("example_project.settings")
    yield module
    monkeypatch.undo()
    importlib.reload(module)


def test_settings_default_to_sqlite_in_the_project(example_settings: ModuleType) -> None:
    settings = importlib.reload(example_settings)

    database = settings.DATABASES["default"]
    assert database["ENGINE"] == "django.db.backends.sqlite3"
    assert Path(database["NAME"]) == ROOT / "example_project" / "db.sqlite3"
    assert "redis" not in settings.CACHES
    assert "redis" not in settings.IDEMPOTENCY_STORES


@pytest.mark.parametrize(
    ("url", "engine"),
    [
        ("postgres://postgres@127.0.0.1:5432/shop", "django.db.backends.postgresql"),
        ("mysql://root@127.0.0.1:3306/shop", "django.db.backends.mysql"),
    ],
)
def test_settings_follow_database_url(
    example_settings: ModuleType, monkeypatch: pytest.MonkeyPatch, url: str, engine: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", url)

    database = importlib.reload(example_settings).DATABASES["default"]

    assert (database["ENGINE"], database["NAME"]) == (engine, "shop")
    if engine.endswith("mysql"):
        assert database["OPTIONS"]["charset"] == "utf8mb4"


def test_settings_add_a_redis_cache_and_store_for_redis_url(
    example_settings: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/3")

    settings = importlib.reload(example_settings)

    assert settings.CACHES["redis"]["BACKEND"] == "django_redis.cache.RedisCache"
    assert settings.CACHES["redis"]["LOCATION"] == "redis://127.0.0.1:6379/3"
    assert settings.IDEMPOTENCY_STORES["redis"]["OPTIONS"] == {"CACHE": "redis"}


# The project as a newcomer runs it


def test_manage_py_checks_migrates_and_seeds_a_fresh_database(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "example_project.settings",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'shop.sqlite3'}",
        # So that the check covers the Redis store's configuration too.
        "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15"),
    }

    def manage(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "no issues" in manage("check", "--fail-level", "WARNING")
    manage("makemigrations", "--check", "--dry-run")
    manage("migrate", "--no-input")
    assert "bob" in manage("seed_demo")
