"""The package without Django REST framework installed: the core imports and works.

Not collected by the main suite (its conftest and settings need DRF): ``nox -s
nodrf`` runs it alone, in an environment with Django and pytest only::

    python -m pytest --noconftest tests/without_drf.py

Django is configured here, on an in-memory SQLite database.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import pkgutil
import sys

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("rest_framework") is not None,
    reason="DRF is installed: this module runs in `nox -s nodrf`",
)

#: Modules that need an extra: DRF, drf-spectacular, django-redis.
NEEDS_AN_EXTRA = {
    "django_idempotency.celery",
    "django_idempotency.drf",
    "django_idempotency.openapi",
    "django_idempotency.otel",
    "django_idempotency.stores.cache",
    "django_idempotency.stores.redis_cluster",
}


@pytest.fixture(scope="module", autouse=True)
def django_without_drf() -> None:
    import django
    from django.conf import settings
    from django.core.management import call_command

    settings.configure(
        INSTALLED_APPS=[
            "django.contrib.admin",
            "django.contrib.auth",
            "django.contrib.contenttypes",
            "django.contrib.sessions",
            "django.contrib.messages",
            "django_idempotency",
        ],
        MIDDLEWARE=[
            "django.contrib.sessions.middleware.SessionMiddleware",
            "django.contrib.auth.middleware.AuthenticationMiddleware",
            "django.contrib.messages.middleware.MessageMiddleware",
        ],
        TEMPLATES=[
            {
                "BACKEND": "django.template.backends.django.DjangoTemplates",
                "APP_DIRS": True,
                "OPTIONS": {
                    "context_processors": [
                        "django.template.context_processors.request",
                        "django.contrib.auth.context_processors.auth",
                        "django.contrib.messages.context_processors.messages",
                    ]
                },
            }
        ],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        SILENCED_SYSTEM_CHECKS=["django_idempotency.W001"],
        USE_TZ=True,
    )
    django.setup()
    call_command("migrate", verbosity=0)


def core_modules() -> list[str]:
    import django_idempotency

    found = pkgutil.walk_packages(django_idempotency.__path__, "django_idempotency.")
    return sorted(info.name for info in found if info.name not in NEEDS_AN_EXTRA)


def test_every_core_module_imports_without_drf() -> None:
    modules = core_modules()
    for name in modules:
        importlib.import_module(name)
    assert "django_idempotency.decorators" in modules
    assert "django_idempotency.admin" in modules
    assert "rest_framework" not in sys.modules


def test_system_checks_pass() -> None:
    from django.core.management import call_command

    call_command("check", fail_level="WARNING")


def test_plain_view_executes_once_then_replays() -> None:
    from django.http import HttpRequest, HttpResponse
    from django.test import RequestFactory

    from django_idempotency.decorators import idempotent

    runs: list[str] = []

    @idempotent
    def create_order(request: HttpRequest) -> HttpResponse:
        runs.append(request.body.decode())
        return HttpResponse(json.dumps({"id": len(runs)}), status=201)

    def post(body: str, key: str | None = "order-1") -> HttpResponse:
        headers = {"Idempotency-Key": key} if key else {}
        request = RequestFactory().post("/orders/", body, "application/json", headers=headers)
        response: HttpResponse = create_order(request)
        return response

    first, retry = post('{"item": "tea"}'), post('{"item": "tea"}')
    assert (first.status_code, retry.status_code) == (201, 201)
    assert retry.content == first.content
    assert retry["Idempotent-Replayed"] == "true"
    assert runs == ['{"item": "tea"}']

    assert post('{"item": "coffee"}').status_code == 422
    assert post('{"item": "tea"}', key=None).status_code == 400
    assert len(runs) == 1
    assert "rest_framework" not in sys.modules


def test_drf_module_says_what_to_install() -> None:
    with pytest.raises(ImportError, match=r"django-idempotency\[drf\]"):
        importlib.import_module("django_idempotency.drf")
