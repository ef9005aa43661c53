"""Every setting is validated by a system check with a stable id."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.checks import run_checks
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connection
from django.test import override_settings

from django_idempotency.checks import check_settings, check_views
from django_idempotency.stores import Store

DATABASE_STORE = "django_idempotency.stores.database.DatabaseStore"


class LeaseOnlyStore(Store):
    """A store without atomic mode, as a cache store is."""


def ids(**settings: Any) -> set[str]:
    with override_settings(**settings):
        return {message.id for message in check_settings() if message.id}


def errors(**settings: Any) -> set[str]:
    return {id_ for id_ in ids(**settings) if ".E" in id_}


def test_default_settings_pass() -> None:
    assert errors() == set()


@pytest.mark.parametrize(
    ("setting", "value", "check_id"),
    [
        ("IDEMPOTENCY_HEADER", "Idempotency Key", "E001"),
        ("IDEMPOTENCY_HEADER", 42, "E001"),
        ("IDEMPOTENCY_METHODS", ["GET"], "E002"),
        ("IDEMPOTENCY_METHODS", "POST", "E002"),
        ("IDEMPOTENCY_METHODS", [1], "E002"),
        ("IDEMPOTENCY_METHODS", None, "E002"),
        ("IDEMPOTENCY_METHODS", 42, "E002"),
        ("IDEMPOTENCY_REQUIRED", "yes", "E003"),
        ("IDEMPOTENCY_SCOPE", "no.such.function", "E004"),
        ("IDEMPOTENCY_SCOPE", 42, "E004"),
        ("IDEMPOTENCY_FINGERPRINT", "django_idempotency.fingerprints", "E005"),
        ("IDEMPOTENCY_RETENTION", 0, "E006"),
        ("IDEMPOTENCY_RETENTION", "24h", "E006"),
        ("IDEMPOTENCY_RETENTION", timedelta(seconds=-1), "E006"),
        ("IDEMPOTENCY_LEASE", -5, "E007"),
        ("IDEMPOTENCY_LEASE", True, "E007"),
        ("IDEMPOTENCY_WAIT", -1, "E008"),
        ("IDEMPOTENCY_WAIT", None, "E008"),
        ("IDEMPOTENCY_MODE", "optimistic", "E009"),
        ("IDEMPOTENCY_STORES", {"default": {"OPTIONS": {}}}, "E010"),
        ("IDEMPOTENCY_STORES", ["default"], "E010"),
        ("IDEMPOTENCY_STORE", "elsewhere", "E011"),
        ("IDEMPOTENCY_STORE", ["default"], "E011"),
        ("IDEMPOTENCY_STORES", {"default": {"BACKEND": "no.such.Store"}}, "E012"),
        ("IDEMPOTENCY_STORES", {"default": {"BACKEND": "django_idempotency.Nope"}}, "E012"),
        (
            "IDEMPOTENCY_STORES",
            {"default": {"BACKEND": DATABASE_STORE, "OPTIONS": {"DATABSE": "default"}}},
            "E012",
        ),
        (
            "IDEMPOTENCY_STORES",
            {"default": {"BACKEND": DATABASE_STORE, "OPTIONS": {"DATABASE": "nowhere"}}},
            "E014",
        ),
        ("IDEMPOTENCY_REPLAYED_HEADERS", ["Content Type"], "E015"),
        ("IDEMPOTENCY_REPLAYED_HEADERS", "Location", "E015"),
        ("IDEMPOTENCY_REPLAYED_HEADERS", None, "E015"),
        ("IDEMPOTENCY_REPLAYED_HEADERS", ["Location", "set-cookie"], "E016"),
        ("IDEMPOTENCY_RELEASE_STATUSES", [500], "E017"),
        ("IDEMPOTENCY_RELEASE_STATUSES", ["401"], "E017"),
        ("IDEMPOTENCY_RELEASE_STATUSES", None, "E017"),
        ("IDEMPOTENCY_RELEASE_STATUSES", 401, "E017"),
        ("IDEMPOTENCY_MAX_BODY_SIZE", 0, "E018"),
        ("IDEMPOTENCY_MAX_BODY_SIZE", 1.5, "E018"),
        ("IDEMPOTENCY_RETRY_AFTER", -1, "E019"),
    ],
)
def test_each_check_fires_on_a_bad_value(setting: str, value: Any, check_id: str) -> None:
    assert errors(**{setting: value}) == {f"django_idempotency.{check_id}"}


def test_atomic_mode_needs_a_store_that_supports_it() -> None:
    stores = {"default": {"BACKEND": "tests.test_checks.LeaseOnlyStore"}}
    assert errors(IDEMPOTENCY_STORES=stores, IDEMPOTENCY_MODE="atomic") == {
        "django_idempotency.E013"
    }
    assert errors(IDEMPOTENCY_STORES=stores, IDEMPOTENCY_MODE="lease") == set()
    assert errors(IDEMPOTENCY_STORES=stores) == set()  # None: lease where atomic is not possible


def test_good_values_pass() -> None:
    assert (
        errors(
            IDEMPOTENCY_HEADER="X-Request-Key",
            IDEMPOTENCY_METHODS=("post", "PUT", "DELETE"),
            IDEMPOTENCY_SCOPE=lambda request: "x",
            IDEMPOTENCY_RETENTION=timedelta(days=7),
            IDEMPOTENCY_LEASE=2.5,
            IDEMPOTENCY_WAIT=0,
            IDEMPOTENCY_MODE="lease",
            IDEMPOTENCY_REPLAYED_HEADERS=["Content-Type", "ETag"],
            IDEMPOTENCY_RELEASE_STATUSES=[],
            IDEMPOTENCY_MAX_BODY_SIZE=10,
            IDEMPOTENCY_RETRY_AFTER=3,
        )
        == set()
    )


def test_messages_carry_a_hint() -> None:
    with override_settings(IDEMPOTENCY_MODE="optimistic"):
        (message,) = [m for m in check_settings() if m.id == "django_idempotency.E009"]
    assert message.hint
    assert "IDEMPOTENCY_MODE" in message.msg


def test_sqlite_is_flagged_as_serialising_writers() -> None:
    on_sqlite = connection.vendor == "sqlite"
    assert ("django_idempotency.W001" in ids()) == on_sqlite


# Django's own model checks ask every database whether it supports JSONField.
@pytest.mark.django_db(databases="__all__")
@pytest.mark.parametrize(
    ("setting", "check_id"),
    [
        ("IDEMPOTENCY_METHODS", "E002"),
        ("IDEMPOTENCY_REPLAYED_HEADERS", "E015"),
        ("IDEMPOTENCY_RELEASE_STATUSES", "E017"),
    ],
)
def test_a_setting_of_none_is_reported_by_manage_py_check(setting: str, check_id: str) -> None:
    # It used to crash the check itself with a TypeError.
    with (
        override_settings(**{setting: None}, SILENCED_SYSTEM_CHECKS=["django_idempotency.W001"]),
        pytest.raises(SystemCheckError, match=f"django_idempotency.{check_id}"),
    ):
        call_command("check", stdout=StringIO(), stderr=StringIO())


@pytest.mark.django_db
def test_checks_are_registered() -> None:
    with override_settings(IDEMPOTENCY_MODE="optimistic", SILENCED_SYSTEM_CHECKS=[]):
        found = {message.id for message in run_checks(databases=["default"])}
    assert "django_idempotency.E009" in found


# The protected views ------------------------------------------------------------------------

MISCONFIGURED = "tests.testapp.misconfigured"
WITH_LEASE_ONLY = {
    "default": {"BACKEND": DATABASE_STORE},
    "lease-only": {"BACKEND": "tests.test_checks.LeaseOnlyStore"},
}


def view_errors(**settings: Any) -> dict[str, set[str]]:
    """The view checks' error ids, by the view they name."""
    found: dict[str, set[str]] = {}
    with override_settings(**settings):
        for message in check_views():
            view = message.msg.split(" ", 1)[0].removeprefix(f"{MISCONFIGURED}.")
            found.setdefault(view, set()).add(str(message.id))
    return found


def test_views_with_a_store_or_mode_that_cannot_work_are_reported() -> None:
    found = view_errors(ROOT_URLCONF=MISCONFIGURED, IDEMPOTENCY_STORES=WITH_LEASE_ONLY)

    assert found == {
        "MixinUnknownStore": {"django_idempotency.E020"},
        "atomic_on_lease_only": {"django_idempotency.E021"},
        "AtomicOnLeaseOnlyView.post": {"django_idempotency.E021"},
        "MixinOnLeaseOnly": {"django_idempotency.E021"},
        "MixinBadAttributes": {"django_idempotency.E025"},
        "TypoActionViewSet": {"django_idempotency.E026"},
        "ActionsStringViewSet": {"django_idempotency.E026"},
        "ActionsOnAnAPIView": {"django_idempotency.E026"},
    }


def test_each_bad_mixin_attribute_and_unknown_action_is_named() -> None:
    with override_settings(ROOT_URLCONF=MISCONFIGURED, IDEMPOTENCY_STORES=WITH_LEASE_ONLY):
        messages = {
            m.msg for m in check_views() if m.id in {f"django_idempotency.E02{n}" for n in (5, 6)}
        }
    text = "\n".join(sorted(messages))
    for fragment in ("idempotency_methods", "idempotency_wait", "idempotency_scope", "'craete'"):
        assert fragment in text
    assert "'refund'" not in text
    assert 'idempotency_methods=("POST",)' in text


def test_a_global_atomic_mode_applies_to_views_that_name_a_lease_only_store() -> None:
    found = view_errors(
        ROOT_URLCONF=MISCONFIGURED,
        IDEMPOTENCY_STORES=WITH_LEASE_ONLY,
        IDEMPOTENCY_MODE="atomic",
    )

    # The view that asked for lease keeps it; the async one always runs in lease.
    assert "lease_on_lease_only" not in found
    assert "async_on_lease_only" not in found
    assert found["atomic_on_lease_only"] == {"django_idempotency.E021"}


def test_the_suites_and_the_example_projects_views_pass() -> None:
    assert view_errors() == {}
    assert view_errors(ROOT_URLCONF="example_project.urls") == {}


def test_the_view_checks_run_with_the_urls_tag() -> None:
    with override_settings(ROOT_URLCONF=MISCONFIGURED, IDEMPOTENCY_STORES=WITH_LEASE_ONLY):
        messages = run_checks(tags=["urls"])

    assert {"django_idempotency.E020", "django_idempotency.E021"} <= {m.id for m in messages}


def prepare_warnings(prepare: Any, database_options: dict[str, Any], **database: Any) -> set[str]:
    """W012 and E046 for a database store with ``PREPARE`` (absent: ``...``) on PostgreSQL."""
    from django.db import connections

    options: dict[str, Any] = {"DATABASE": "checked"}
    if prepare is not ...:
        options["PREPARE"] = prepare
    stores = {"default": {"BACKEND": DATABASE_STORE, "OPTIONS": options}}
    checked = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "unused",
        "OPTIONS": database_options,
        **database,
    }
    # The checks read a database's settings and never connect to it: one more
    # alias in them is enough, without overriding DATABASES.
    saved = connections.settings
    connections.settings = {**saved, "checked": checked}
    try:
        found = ids(IDEMPOTENCY_STORES=stores)
    finally:
        connections.settings = saved
    return {id_ for id_ in found if id_.endswith(("W012", "E046"))}


@pytest.mark.parametrize(
    ("prepare", "database_options", "database", "expected"),
    [
        (..., {}, {}, set()),  # Django's defaults: the store prepares its own statements
        (True, {"prepare_threshold": None}, {}, set()),  # said explicitly: the pooler can
        (False, {}, {}, set()),
        (False, {"prepare_threshold": None}, {}, set()),
        (True, {"prepare_threshold": 5}, {}, set()),
        (..., {"prepare_threshold": None}, {}, {"W012"}),  # prepares turned off on purpose
        (..., {}, {"DISABLE_SERVER_SIDE_CURSORS": True}, {"W012"}),  # a transaction pooler
        (False, {"prepare_threshold": 5}, {}, {"W012"}),  # the connection prepares anyway
        ("no", {}, {}, {"E046"}),
    ],
)
def test_the_database_stores_prepare_option_against_the_databases_settings(
    prepare: Any, database_options: dict[str, Any], database: dict[str, Any], expected: set[str]
) -> None:
    found = prepare_warnings(prepare, database_options, **database)

    assert found == {f"django_idempotency.{id_}" for id_ in expected}
