"""Encrypted snapshots (IDEMPOTENCY_ENCRYPTION_KEYS): at rest, at replay, rotated, tampered.

Runs on the database store in both modes and on the Redis store; the
re-encryption command and the checks are here too, the admin in test_admin.py.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from functools import partial
from io import StringIO
from typing import Any

import pytest
from cryptography.fernet import Fernet
from django.contrib import auth
from django.contrib.auth.models import Permission
from django.core.checks import run_checks
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from django.urls import reverse
from django_redis import get_redis_connection

from django_idempotency import sealing
from django_idempotency.checks import check_encryption_keys, check_stored_snapshots
from django_idempotency.engine import Call, Snapshot
from django_idempotency.exceptions import SnapshotUnreadable
from django_idempotency.models import IdempotencyKey
from django_idempotency.stores import get_store
from django_idempotency.stores.cache import CacheStore
from tests.factories import UserFactory
from tests.lease_stores import (
    DATABASE,
    REDIS,
    STORES,
    Worker,
    redis_records_fixture,  # noqa: F401
)
from tests.testapp.models import Order

pytestmark = pytest.mark.urls("tests.urls")

OLD, NEW = Fernet.generate_key().decode(), Fernet.generate_key().decode()
UNREADABLE = "urn:django-idempotency:problem:snapshot-unreadable"


@pytest.fixture(params=[(DATABASE, "atomic"), (DATABASE, "lease"), (REDIS, "lease")], ids=str)
def store(request: pytest.FixtureRequest, settings: Any) -> str:
    """Each store and mode, with encryption on (key OLD)."""
    alias, mode = request.param
    settings.IDEMPOTENCY_STORES = STORES
    settings.IDEMPOTENCY_STORE = alias
    settings.IDEMPOTENCY_MODE = mode
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [OLD]
    if alias == REDIS:
        request.getfixturevalue("redis_records")
    return str(alias)


def post(key: str, item: str = "secret-widget") -> Any:
    return Client().post(
        "/plain/",
        json.dumps({"item": item}),
        content_type="application/json",
        headers={"Idempotency-Key": key},
    )


def raw_body(alias: str, key: str) -> bytes:
    """The body as the store holds it, for (anonymous, key)."""
    store = get_store(alias)
    if isinstance(store, CacheStore):
        record = store.record("anonymous", key)
        assert record is not None
        return base64.b64decode(record["body"])
    return bytes(IdempotencyKey.objects.get(key=key).response_body)


def overwrite_body(alias: str, key: str, body: bytes) -> None:
    store = get_store(alias)
    if isinstance(store, CacheStore):
        name = store.record_name("anonymous", key)
        client = get_redis_connection("redis")
        record = json.loads(client.get(name))
        record["body"] = base64.b64encode(body).decode()
        client.set(name, json.dumps(record), keepttl=True)
    else:
        IdempotencyKey.objects.filter(key=key).update(response_body=body)


@pytest.mark.django_db
def test_bodies_and_headers_are_encrypted_at_rest_and_replayed_in_clear(store: str) -> None:
    first = post("enc-1")
    assert first.status_code == 201
    stored = raw_body(store, "enc-1")
    assert sealing.is_sealed(stored)
    assert b"secret-widget" not in stored
    assert b"/orders/" not in stored  # the Location header is inside the token
    if store == DATABASE:
        assert IdempotencyKey.objects.get(key="enc-1").response_headers == []
    replay = post("enc-1")
    assert replay["Idempotent-Replayed"] == "true"
    assert (replay.status_code, replay.content) == (201, first.content)
    assert replay["Location"] == first["Location"]
    assert replay["Content-Type"] == "application/json"
    assert Order.objects.count() == 1


@pytest.mark.django_db
def test_older_keys_still_decrypt_and_the_command_moves_them_to_the_newest(
    store: str, settings: Any
) -> None:
    first = post("rot-1")
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW, OLD]
    assert post("rot-1").content == first.content
    out = StringIO()
    call_command("reencrypt_idempotency_keys", "--store", store, stdout=out)
    assert "examined, re-encrypted 1, 0 unreadable" in out.getvalue()
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW]
    replay = post("rot-1")
    assert (replay.status_code, replay.content) == (201, first.content)
    # A second run finds nothing left to do.
    out = StringIO()
    call_command("reencrypt_idempotency_keys", "--store", store, stdout=out)
    assert "re-encrypted 0" in out.getvalue()
    assert Order.objects.count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda body: body[:-5] + b"AAAAA", id="altered-token"),
        pytest.param(lambda body: body[len(sealing.SEALED_PREFIX) :], id="prefix-removed"),
        pytest.param(lambda body: b'{"id": 1}', id="clear-body-planted"),
    ],
)
def test_a_tampered_row_is_refused_logged_and_never_replayed_or_rerun(
    store: str, tamper: Any, caplog: pytest.LogCaptureFixture
) -> None:
    post("tamper-1")
    overwrite_body(store, "tamper-1", tamper(raw_body(store, "tamper-1")))
    with caplog.at_level(logging.ERROR, logger="django_idempotency"):
        response = post("tamper-1")
    assert response.status_code == 503
    assert response["Content-Type"] == "application/problem+json"
    assert json.loads(response.content)["type"] == UNREADABLE
    assert "Idempotent-Replayed" not in response
    assert any("unreadable" in r.getMessage() for r in caplog.records)
    assert Order.objects.count() == 1  # not run again


@pytest.mark.django_db
def test_a_token_copied_from_another_key_is_refused(store: str) -> None:
    post("victim", item="victim-data")
    post("attacker", item="attacker-data")
    overwrite_body(store, "attacker", raw_body(store, "victim"))
    response = post("attacker", item="attacker-data")
    assert response.status_code == 503
    assert b"victim-data" not in response.content


@pytest.mark.django_db
def test_a_removed_key_refuses_replays(store: str, settings: Any) -> None:
    post("gone-1")
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW]
    assert post("gone-1").status_code == 503
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = []
    assert post("gone-1").status_code == 503
    assert Order.objects.count() == 1


@pytest.mark.django_db
def test_clear_rows_from_before_encryption_are_sealed_by_the_command(
    store: str, settings: Any
) -> None:
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = []
    first = post("clear-1")
    assert not sealing.is_sealed(raw_body(store, "clear-1"))
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [OLD]
    assert post("clear-1").status_code == 503  # refused until sealed
    out = StringIO()
    call_command("reencrypt_idempotency_keys", "--store", store, "--dry-run", stdout=out)
    assert "would re-encrypt 1" in out.getvalue()
    assert not sealing.is_sealed(raw_body(store, "clear-1"))
    call_command("reencrypt_idempotency_keys", "--store", store, stdout=StringIO())
    assert sealing.is_sealed(raw_body(store, "clear-1"))
    replay = post("clear-1")
    assert (replay.status_code, replay.content) == (201, first.content)
    assert replay["Location"] == first["Location"]


@pytest.mark.django_db
def test_the_command_reports_unreadable_rows_and_fails(store: str, settings: Any) -> None:
    post("lost-1")
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW]
    out = StringIO()
    with pytest.raises(CommandError, match="cannot be decrypted"):
        call_command("reencrypt_idempotency_keys", "--store", store, stdout=out)
    assert "1 unreadable" in out.getvalue()


@pytest.mark.django_db
def test_the_command_works_in_batches(settings: Any) -> None:
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [OLD]
    for n in range(5):
        post(f"batch-{n}")
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW, OLD]
    out = StringIO()
    call_command(
        "reencrypt_idempotency_keys", "--batch-size", "2", "--database", "default", stdout=out
    )
    assert "5 stored response(s) examined, re-encrypted 5" in out.getvalue()
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW]
    assert all(post(f"batch-{n}").status_code == 201 for n in range(5))


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("arguments", "keys", "message"),
    [
        ([], [], "IDEMPOTENCY_ENCRYPTION_KEYS is empty"),
        ([], ["not-a-key"], "is not a Fernet key"),
        (["--database", "nowhere"], [OLD], "Unknown database"),
        (["--store", "nowhere"], [OLD], "Unknown store"),
        (["--batch-size", "0"], [OLD], "not a positive whole number"),
    ],
)
def test_the_command_refuses_bad_input(
    settings: Any, arguments: list[str], keys: list[str], message: str
) -> None:
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = keys
    with pytest.raises(CommandError, match=message):
        call_command("reencrypt_idempotency_keys", *arguments, stdout=StringIO())


# The checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "check_id"),
    [
        ("one-key-not-in-a-list", "django_idempotency.E040"),
        (["short"], "django_idempotency.E040"),
        ([OLD, OLD], "django_idempotency.W010"),
    ],
)
def test_bad_keys_are_reported_at_startup(settings: Any, keys: Any, check_id: str) -> None:
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = keys
    assert [m.id for m in check_encryption_keys()] == [check_id]


# Django's JSONField check asks every database whether it supports JSON.
@pytest.mark.django_db(databases="__all__")
def test_the_encryption_checks_are_registered(settings: Any) -> None:
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [OLD]
    post("registered")
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = ["not-a-key"]
    assert "django_idempotency.E040" in {m.id for m in run_checks()}
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW]
    assert "django_idempotency.E042" in {m.id for m in run_checks(databases=["default"])}
    assert "django_idempotency.E042" not in {m.id for m in run_checks()}


def test_good_keys_pass(settings: Any) -> None:
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW, OLD]
    assert check_encryption_keys() == []


def test_a_missing_cryptography_package_is_reported(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [OLD]
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "cryptography" else find_spec(name, *a),
    )
    assert [m.id for m in check_encryption_keys()] == ["django_idempotency.E041"]


@pytest.mark.django_db
def test_stored_rows_that_the_keys_cannot_read_fail_the_database_check(settings: Any) -> None:
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [OLD]
    post("check-1")
    assert check_stored_snapshots(databases=["default"]) == []
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW]
    assert [m.id for m in check_stored_snapshots(databases=["default"])] == [
        "django_idempotency.E042"
    ]
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = []  # the key missing altogether
    assert [m.id for m in check_stored_snapshots(databases=["default"])] == [
        "django_idempotency.E042"
    ]
    assert check_stored_snapshots() == []  # without --database: no queries


@pytest.mark.django_db
def test_clear_rows_while_encryption_is_on_are_a_warning(settings: Any) -> None:
    post("check-clear")
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [OLD]
    assert [m.id for m in check_stored_snapshots(databases=["default"])] == [
        "django_idempotency.W011"
    ]


def test_unseal_refuses_a_snapshot_sealed_for_another_call(settings: Any) -> None:
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [OLD]
    call = Call("user:1", "k", "")
    sealed = sealing.seal(Snapshot(200, (("Content-Type", "text/plain"),), b"hi"), call)
    assert sealing.unseal(sealed, call) == Snapshot(200, (("Content-Type", "text/plain"),), b"hi")
    with pytest.raises(SnapshotUnreadable):
        sealing.unseal(sealed, Call("user:2", "k", ""))


# Rotation under load ------------------------------------------------------------------------


@pytest.mark.concurrency
@pytest.mark.django_db(transaction=True)
def test_a_rotation_while_requests_run_leaves_no_snapshot_unreadable(settings: Any) -> None:
    """Deploy [NEW, OLD], re-encrypt while threads store and replay, then drop OLD."""
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [OLD]
    settings.IDEMPOTENCY_MODE = "lease"
    threads, rounds = 4, 12
    rotated = threading.Event()
    halfway = threading.Barrier(threads + 1)
    failures: list[str] = []
    conflicts: list[str] = []
    bodies: dict[str, bytes] = {}

    def work(worker: int) -> None:
        for n in range(rounds):
            if n == rounds // 2:
                halfway.wait(timeout=30)  # the rotation starts here
                rotated.wait(timeout=30)
            key = f"w{worker}-{n}"
            first = answered(key)
            again = answered(key)
            if first.status_code != 201 or again.content != first.content:
                failures.append(f"{key}: {first.status_code} then {again.status_code}")
            bodies[key] = first.content

    def answered(key: str) -> Any:
        # A 409 (the re-encryption holding a row lock past the claim's lock
        # wait, on MariaDB) is an answer a client retries; anything else counts.
        for _ in range(50):
            response = post(key, item=key)
            if response.status_code != 409:
                return response
            conflicts.append(key)
        return response

    workers = [Worker(partial(work, w), name=f"worker-{w}") for w in range(threads)]
    for worker in workers:
        worker.start()
    halfway.wait(timeout=30)
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW, OLD]
    rotated.set()
    call_command("reencrypt_idempotency_keys", "--batch-size", "5", stdout=StringIO())
    for worker in workers:
        worker.outcome()
    call_command("reencrypt_idempotency_keys", stdout=StringIO())
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW]
    unreadable = [key for key, body in bodies.items() if post(key, item=key).content != body]
    assert failures == []
    assert len(bodies) == threads * rounds
    assert unreadable == []
    assert Order.objects.count() == threads * rounds


# The admin's view of encrypted responses -----------------------------------------------------


def admin_detail(client: Client, key: str) -> str:
    row = IdempotencyKey.objects.get(key=key)
    response = client.get(reverse("admin:django_idempotency_idempotencykey_change", args=[row.pk]))
    assert response.status_code == 200
    return response.content.decode()


@pytest.fixture
def staff_client(db: None) -> Client:
    """A staff user who may view keys, but not decrypted responses."""
    user = UserFactory(is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_idempotencykey"))
    client = Client()
    client.force_login(user)
    return client


@pytest.mark.django_db
def test_the_admin_shows_only_the_size_without_the_permission(
    settings: Any, staff_client: Client
) -> None:
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [OLD]
    post("admin-1")
    size = len(IdempotencyKey.objects.get(key="admin-1").response_body)
    page = admin_detail(staff_client, "admin-1")
    assert f"encrypted, {size} bytes" in page
    assert "secret-widget" not in page
    assert "/orders/" not in page


@pytest.mark.django_db
def test_the_admin_decrypts_for_users_with_the_permission(
    settings: Any, staff_client: Client
) -> None:
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [OLD]
    post("admin-2")
    user = auth.get_user(staff_client)
    user.user_permissions.add(Permission.objects.get(codename="view_decrypted_response"))
    page = admin_detail(staff_client, "admin-2")
    assert "secret-widget" in page
    assert "Location: /orders/" in page
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW]  # the key it was sealed with is gone
    page = admin_detail(staff_client, "admin-2")
    assert "cannot be decrypted with the configured keys" in page
    assert "secret-widget" not in page
