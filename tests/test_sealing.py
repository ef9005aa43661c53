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
from django.contrib.auth.models import AnonymousUser, Permission
from django.core.checks import run_checks
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import transaction
from django.http import HttpResponse
from django.test import Client, RequestFactory
from django.urls import reverse
from django_redis import get_redis_connection

from django_idempotency import outbox, sealing
from django_idempotency.checks import check_encryption_keys, check_stored_snapshots
from django_idempotency.decorators import idempotent, idempotent_block
from django_idempotency.engine import Call, Snapshot
from django_idempotency.exceptions import SnapshotUnreadable
from django_idempotency.fingerprints import request_fingerprint
from django_idempotency.models import IdempotencyKey, IdempotencyStep, OutboxMessage
from django_idempotency.outbox import enqueue
from django_idempotency.stores import get_store
from django_idempotency.stores.cache import CacheStore
from django_idempotency.workflow import step
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
def test_the_command_reports_an_altered_row_under_the_newest_key(store: str) -> None:
    post("altered-1")
    overwrite_body(store, "altered-1", raw_body(store, "altered-1")[:-5] + b"AAAAA")
    out = StringIO()
    with pytest.raises(CommandError, match="cannot be decrypted"):
        call_command("reencrypt_idempotency_keys", "--store", store, stdout=out)
    assert "re-encrypted 0, 1 unreadable" in out.getvalue()


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
    assert "5 stored value(s) examined, re-encrypted 5" in out.getvalue()
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


# Formats: AES-GCM tokens, key ids, Fernet tokens of earlier versions ------------------------


def fernet_token(key: str, call: Call, headers: list[list[str]], body: bytes) -> bytes:
    """A body sealed the way earlier versions did: one Fernet token, scope and key inside."""
    envelope = json.dumps({"s": call.scope, "k": call.key, "h": headers}).encode()
    return sealing.FERNET_PREFIX + Fernet(key).encrypt(envelope + b"\n" + body)


def test_a_token_names_its_key_and_only_that_key_is_tried(
    settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW, OLD]
    call = Call("user:1", "k", "")
    sealed = sealing.seal(Snapshot(201, (), b"hi"), call).body
    prefix = len(sealing.SEALED_PREFIX)
    assert sealed[prefix : prefix + sealing.KEY_ID_SIZE] == sealing.key_id(NEW)
    assert sealing.key_id(NEW) != sealing.key_id(OLD)
    # Key ids differ from one token to the next only in their nonce.
    again = sealing.seal(Snapshot(201, (), b"hi"), call).body
    assert sealed[: prefix + 4] == again[: prefix + 4]
    assert sealed != again
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [OLD]
    with (
        caplog.at_level(logging.ERROR, logger="django_idempotency"),
        pytest.raises(SnapshotUnreadable),
    ):
        sealing.unseal(Snapshot(201, (), sealed), call)
    assert "sealed with a key that is not configured" in caplog.text


def test_keys_are_derived_not_used_as_they_are() -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    # A token opened with the configured key's raw bytes as the AES key fails:
    # the AES-256 key is derived from it (HKDF), as the docs say.
    with_raw_key = AESGCM(base64.urlsafe_b64decode(OLD))
    nonce = b"\0" * sealing.NONCE_SIZE
    derived, _ = sealing._derive(OLD)
    assert derived != base64.urlsafe_b64decode(OLD)
    token = AESGCM(derived).encrypt(nonce, b"x", b"")
    with pytest.raises(Exception):  # noqa: B017, PT011 (cryptography's InvalidTag)
        with_raw_key.decrypt(nonce, token, b"")


@pytest.mark.django_db
def test_responses_sealed_as_fernet_tokens_still_replay_and_the_command_moves_them(
    settings: Any,
) -> None:
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [OLD]
    first = post("fernet-1")
    row = IdempotencyKey.objects.get(key="fernet-1")
    call = Call(row.scope, row.key, "")
    headers = [["Content-Type", "application/json"], ["Location", first["Location"]]]
    row.response_body = fernet_token(OLD, call, headers, first.content)
    row.save()
    replay = post("fernet-1")
    assert (replay.status_code, replay.content) == (201, first.content)
    assert replay["Location"] == first["Location"]
    out = StringIO()
    call_command("reencrypt_idempotency_keys", stdout=out)
    assert "re-encrypted 1, 0 unreadable" in out.getvalue()
    resealed = bytes(IdempotencyKey.objects.get(key="fernet-1").response_body)
    assert resealed.startswith(sealing.SEALED_PREFIX)
    assert post("fernet-1").content == first.content
    # A Fernet token moved to another key's row is refused, as before.
    post("fernet-2")
    other = IdempotencyKey.objects.get(key="fernet-2")
    other.response_body = fernet_token(OLD, call, headers, first.content)
    other.save()
    assert post("fernet-2").status_code == 503


# Steps and outbox messages ------------------------------------------------------------------


def pay(key: str, *, fail_at: str | None = None) -> Any:
    """Two steps holding personal data; raises inside step ``fail_at``."""

    def work(name: str) -> dict[str, Any]:
        Order.objects.create(item=name)
        if name == fail_at:
            raise RuntimeError(name)
        return {"step": name, "card_holder": "Ann Example"}

    with idempotent_block(key, scope="shop", payload={}, mode="lease") as block:
        if not block.replayed:
            block.result = [step(name, partial(work, name)) for name in ("a", "b")]
    return block.result


def items() -> list[str]:
    return sorted(Order.objects.values_list("item", flat=True))


@pytest.fixture
def encrypted(settings: Any) -> None:
    settings.IDEMPOTENCY_STORES = STORES
    settings.IDEMPOTENCY_STORE = DATABASE
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [OLD]
    settings.IDEMPOTENCY_OUTBOX_SENDER = "tests.test_sealing.record_sent"


SENT: list[dict[str, Any]] = []


def record_sent(message: OutboxMessage) -> None:
    SENT.append(message.payload)


@pytest.mark.django_db(transaction=True)
def test_step_results_are_sealed_at_rest_and_resume_in_clear(encrypted: None) -> None:
    with pytest.raises(RuntimeError):
        pay("steps-1", fail_at="b")
    stored = IdempotencyStep.objects.get(key="steps-1", name="a").result
    assert sealing.is_sealed_text(stored)
    assert "Ann Example" not in stored
    result = pay("steps-1")  # resumes at b, a's result read back in clear
    assert result == [{"step": n, "card_holder": "Ann Example"} for n in ("a", "b")]
    assert items() == ["a", "b"]  # b's write rolled back with its step, then ran once


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda result, other: result[:-6] + "AAAAAA", id="altered"),
        pytest.param(lambda result, other: other, id="moved-from-another-key"),
        pytest.param(lambda result, other: '{"step": "a"}', id="clear-planted"),
        pytest.param(lambda result, other: sealing.TEXT_PREFIX + "%%%", id="not-base64"),
    ],
)
def test_a_tampered_step_result_is_refused_logged_and_the_step_not_rerun(
    encrypted: None, tamper: Any, caplog: pytest.LogCaptureFixture
) -> None:
    for key in ("victim", "tampered"):
        with pytest.raises(RuntimeError):
            pay(key, fail_at="b")
    victim = IdempotencyStep.objects.get(key="victim").result
    row = IdempotencyStep.objects.get(key="tampered")
    row.result = tamper(row.result, victim)
    row.save()
    with (
        caplog.at_level(logging.ERROR, logger="django_idempotency"),
        pytest.raises(SnapshotUnreadable),
    ):
        pay("tampered")
    assert "Refused to use the recorded result of step 'a'" in caplog.text
    assert items() == ["a", "a"]  # neither a nor b ran again


@pytest.mark.django_db
def test_a_view_whose_step_record_is_unreadable_answers_503(encrypted: None) -> None:
    @idempotent(mode="atomic")
    def view(request: Any) -> HttpResponse:
        return HttpResponse(json.dumps(step("charge", lambda: {"card": "4242"})))

    request = RequestFactory().post(
        "/", b"{}", content_type="application/json", headers={"Idempotency-Key": "v1"}
    )
    request.user = AnonymousUser()
    IdempotencyStep.objects.create(
        scope="anonymous",
        key="v1",
        name="charge",
        fingerprint=request_fingerprint(request),
        token="t",
        result=sealing.TEXT_PREFIX + "AAAA",
        expires="2099-01-01T00:00:00Z",
    )
    response = view(request)
    assert response.status_code == 503
    assert json.loads(response.content)["type"] == UNREADABLE
    assert not IdempotencyKey.objects.filter(key="v1").exists()  # rolled back, free again


@pytest.mark.django_db(transaction=True)
def test_outbox_payloads_are_sealed_at_rest_and_relayed_in_clear(encrypted: None) -> None:
    SENT.clear()
    with transaction.atomic():
        message = enqueue("receipts", {"email": "ann@example.com"})
    assert message.payload == {"email": "ann@example.com"}  # the caller's copy stays clear
    stored = OutboxMessage.objects.values_list("payload", flat=True).get()
    assert isinstance(stored, str)
    assert sealing.is_sealed_text(stored)
    assert "ann@example.com" not in stored
    assert outbox.relay(outbox.get_sender()).sent == 1
    assert SENT == [{"email": "ann@example.com"}]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda payload, other: payload[:-6] + "AAAAAA", id="altered"),
        pytest.param(lambda payload, other: other, id="moved-from-another-message"),
        pytest.param(lambda payload, other: {"email": "eve@example.com"}, id="clear-planted"),
    ],
)
def test_a_tampered_payload_is_refused_logged_and_never_sent(
    encrypted: None, tamper: Any, caplog: pytest.LogCaptureFixture
) -> None:
    SENT.clear()
    with transaction.atomic():
        victim = enqueue("receipts", {"email": "ann@example.com"})
        tampered = enqueue("receipts", {"email": "bob@example.com"})
    rows = OutboxMessage.objects.filter(pk__in=[victim.pk, tampered.pk])
    payloads = dict(rows.values_list("pk", "payload"))
    OutboxMessage.objects.filter(pk=tampered.pk).update(
        payload=tamper(payloads[tampered.pk], payloads[victim.pk])
    )
    with caplog.at_level(logging.ERROR, logger="django_idempotency"):
        report = outbox.relay(outbox.get_sender())
    assert (report.sent, report.failed) == (1, 1)
    assert SENT == [{"email": "ann@example.com"}]
    row = OutboxMessage.objects.get(pk=tampered.pk)
    assert row.state == OutboxMessage.State.PENDING  # kept, retried later, never dropped
    assert row.last_error.startswith("SnapshotUnreadable: ")
    assert f"Refused to use the payload of outbox message {tampered.pk}" in caplog.text


@pytest.mark.django_db(transaction=True)
def test_the_command_reseals_steps_and_payloads_clear_or_under_an_older_key(
    encrypted: None, settings: Any
) -> None:
    SENT.clear()
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = []
    with pytest.raises(RuntimeError):
        pay("old-clear", fail_at="b")
    with transaction.atomic():
        enqueue("receipts", {"n": 1})
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [OLD]
    with pytest.raises(RuntimeError):
        pay("old-sealed", fail_at="b")
    with transaction.atomic():
        enqueue("receipts", {"n": 2})
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW, OLD]
    out = StringIO()
    call_command("reencrypt_idempotency_keys", stdout=out)
    assert "4 stored value(s) examined, re-encrypted 4, 0 unreadable" in out.getvalue()
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW]  # the old key retired
    assert len(pay("old-clear")) == len(pay("old-sealed")) == 2
    assert items() == ["a", "a", "b", "b"]  # a resumed from its record, twice
    assert outbox.relay(outbox.get_sender()).sent == 2
    assert sorted(p["n"] for p in SENT) == [1, 2]


@pytest.mark.django_db(transaction=True)
def test_the_admin_shows_sealed_steps_and_payloads_only_with_the_permission(
    encrypted: None, staff_client: Client
) -> None:
    with pytest.raises(RuntimeError):
        pay("admin-steps", fail_at="b")
    with transaction.atomic():
        message = enqueue("receipts", {"email": "ann@example.com"})
    IdempotencyKey.objects.create(
        scope="shop", key="admin-steps", fingerprint="f", token="t", expires="2099-01-01T00:00Z"
    )
    user = auth.get_user(staff_client)
    user.user_permissions.add(Permission.objects.get(codename="view_outboxmessage"))
    message_page = reverse("admin:django_idempotency_outboxmessage_change", args=[message.pk])
    key_page = admin_detail(staff_client, "admin-steps")
    assert "Ann Example" not in key_page
    assert "encrypted, " in key_page
    page = staff_client.get(message_page).content.decode()
    assert "ann@example.com" not in page
    assert "encrypted, " in page
    user.user_permissions.add(Permission.objects.get(codename="view_decrypted_response"))
    user = auth.get_user(staff_client)
    assert "Ann Example" in admin_detail(staff_client, "admin-steps")
    assert "ann@example.com" in staff_client.get(message_page).content.decode()


# Check E042 beyond the responses table ------------------------------------------------------


@pytest.mark.django_db
def test_the_check_samples_a_redis_store(settings: Any, redis_records: None) -> None:
    settings.IDEMPOTENCY_STORES = STORES
    settings.IDEMPOTENCY_STORE = REDIS
    settings.IDEMPOTENCY_MODE = "lease"
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = []
    post("redis-clear")
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [OLD]
    post("redis-sealed")
    [warning] = check_stored_snapshots(databases=["default"])
    assert warning.id == "django_idempotency.W011"
    assert "1 of the 2 newest stored values sampled in Redis store 'redis'" in warning.msg
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW]
    [error] = check_stored_snapshots(databases=["default"])
    assert error.id == "django_idempotency.E042"
    assert "1 of the 2 newest stored values sampled in Redis store 'redis'" in error.msg
    call_command("erase_idempotency_keys", "--scope", "anonymous", stdout=StringIO())
    assert check_stored_snapshots(databases=["default"]) == []


@pytest.mark.django_db(transaction=True)
def test_the_check_samples_step_results_and_outbox_payloads(encrypted: None, settings: Any) -> None:
    with pytest.raises(RuntimeError):
        pay("check-steps", fail_at="b")
    with transaction.atomic():
        enqueue("receipts", {"email": "ann@example.com"})
    assert check_stored_snapshots(databases=["default"]) == []
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW]
    [error] = check_stored_snapshots(databases=["default"])
    assert error.id == "django_idempotency.E042"
    assert "2 of the 2 newest stored values sampled in database 'default'" in error.msg


@pytest.mark.django_db(transaction=True)
def test_the_command_reports_steps_and_payloads_no_key_decrypts(
    encrypted: None, settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [OLD]
    with pytest.raises(RuntimeError):
        pay("lost-key", fail_at="b")  # step "a" recorded, sealed under OLD
    with transaction.atomic():
        enqueue("receipts", {"n": 1})
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [NEW]  # OLD retired too early
    out = StringIO()
    with (
        caplog.at_level(logging.ERROR, logger="django_idempotency"),
        pytest.raises(CommandError, match="cannot be decrypted"),
    ):
        call_command("reencrypt_idempotency_keys", stdout=out)
    assert "re-encrypted 0, 2 unreadable" in out.getvalue()
    assert "no configured key decrypts step" in caplog.text
    assert "no configured key decrypts message" in caplog.text
