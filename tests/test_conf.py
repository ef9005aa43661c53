"""Settings are read at call time, so ``override_settings`` is honoured everywhere."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.test import override_settings

from django_idempotency.conf import DEFAULT_STORES, app_settings, load_callable, to_seconds
from django_idempotency.scopes import user_scope

DEFAULTS = {
    "HEADER": "Idempotency-Key",
    "METHODS": ("POST", "PATCH"),
    "REQUIRED": True,
    "SCOPE": "django_idempotency.scopes.user_scope",
    "FINGERPRINT": "django_idempotency.fingerprints.request_fingerprint",
    "RETENTION": timedelta(hours=24),
    "MODE": None,
    "LEASE": 30,
    "WAIT": 0,
    "RETRY_AFTER": 1,
    "STORE": "default",
    "STORES": DEFAULT_STORES,
    "REPLAYED_HEADERS": ("Content-Type", "Location"),
    "RELEASE_STATUSES": (401, 403, 408, 429),
    "MAX_BODY_SIZE": 1024 * 1024,
}


@pytest.mark.parametrize(("name", "default"), DEFAULTS.items())
def test_defaults(name: str, default: Any) -> None:
    assert getattr(app_settings, name) == default


OVERRIDES = [
    ("HEADER", "X-Key", "X-Key"),
    ("METHODS", ["post", "put"], ["post", "put"]),
    ("REQUIRED", False, False),
    ("SCOPE", "tests.test_conf.fixed_scope", "tests.test_conf.fixed_scope"),
    ("FINGERPRINT", "x.y", "x.y"),
    ("RETENTION", 60, 60),
    ("MODE", "lease", "lease"),
    ("LEASE", timedelta(minutes=2), timedelta(minutes=2)),
    ("WAIT", 5, 5),
    ("RETRY_AFTER", 3, 3),
    ("STORE", "other", "other"),
    ("STORES", {"other": {"BACKEND": "x.Y"}}, {"other": {"BACKEND": "x.Y"}}),
    ("REPLAYED_HEADERS", ["ETag"], ["ETag"]),
    ("RELEASE_STATUSES", [409], [409]),
    ("MAX_BODY_SIZE", 10, 10),
]


def fixed_scope(request: Any) -> str:
    return "fixed"


@pytest.mark.parametrize("name", DEFAULTS)
def test_values_are_raw_so_the_checks_see_them_as_they_are(name: str) -> None:
    # Conversion happens where a value is used; a bad value reaches its check.
    bad = object()
    with override_settings(**{f"IDEMPOTENCY_{name}": bad}):
        assert getattr(app_settings, name) is bad


@pytest.mark.parametrize(("name", "value", "expected"), OVERRIDES)
def test_override_settings_is_honoured_at_call_time(name: str, value: Any, expected: Any) -> None:
    with override_settings(**{f"IDEMPOTENCY_{name}": value}):
        assert getattr(app_settings, name) == expected
    assert getattr(app_settings, name) == DEFAULTS[name]


def test_pytest_django_settings_fixture_is_honoured(settings: Any) -> None:
    settings.IDEMPOTENCY_HEADER = "X-Other"
    assert app_settings.HEADER == "X-Other"
    del settings.IDEMPOTENCY_HEADER
    assert app_settings.HEADER == "Idempotency-Key"


def test_reading_never_writes_defaults_onto_settings() -> None:
    from django.conf import settings

    def configured() -> set[str]:
        return {name for name in dir(settings) if name.startswith("IDEMPOTENCY_")}

    before = configured()
    for name in DEFAULTS:
        getattr(app_settings, name)
    assert configured() == before


def test_load_callable_takes_a_callable_or_its_dotted_path() -> None:
    assert load_callable(user_scope) is user_scope
    assert load_callable("django_idempotency.scopes.user_scope") is user_scope
    with pytest.raises(ImportError):
        load_callable("django_idempotency.scopes.nothing_here")


@pytest.mark.parametrize(
    ("value", "seconds"), [(5, 5.0), (2.5, 2.5), (timedelta(minutes=1, milliseconds=500), 60.5)]
)
def test_to_seconds(value: Any, seconds: float) -> None:
    assert to_seconds(value) == seconds


def test_a_setting_read_before_an_override_is_read_afresh_inside_and_after_it() -> None:
    assert app_settings.WAIT == 0  # read, and kept

    with override_settings(IDEMPOTENCY_WAIT=5):
        assert app_settings.WAIT == 5
        with override_settings(IDEMPOTENCY_WAIT=7):
            assert app_settings.WAIT == 7
        assert app_settings.WAIT == 5

    assert app_settings.WAIT == 0


def test_a_dotted_path_is_imported_once_and_then_served_as_the_same_object() -> None:
    path = "django_idempotency.scopes.user_scope"

    assert load_callable(path) is load_callable(path) is user_scope
