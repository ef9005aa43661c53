"""The admin of steps and outbox messages: a key's steps and messages, failing messages."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from django_idempotency.models import IdempotencyStep, OutboxMessage
from tests.factories import IdempotencyKeyFactory, UserFactory

pytestmark = pytest.mark.django_db

CHANGELIST = "admin:django_idempotency_outboxmessage_changelist"


def message(**fields: object) -> OutboxMessage:
    return OutboxMessage.objects.create(topic=fields.pop("topic", "mail"), payload={}, **fields)


def test_a_key_shows_its_steps_and_messages(admin_client: Client) -> None:
    key = IdempotencyKeyFactory(key="pay-1", scope="user:1")
    now = timezone.now()
    IdempotencyStep.objects.create(
        scope="user:1",
        key="pay-1",
        name="charge",
        fingerprint="f",
        token="t",
        result='"ch_<1>"',
        expires=now + timedelta(days=1),
    )
    IdempotencyStep.objects.create(
        scope="user:2",
        key="pay-1",
        name="not-mine",
        fingerprint="f",
        token="t",
        result="1",
        expires=now + timedelta(days=1),
    )
    message(scope="user:1", idempotency_key="pay-1", step="charge", last_error="Boom: <x>")

    response = admin_client.get(
        reverse("admin:django_idempotency_idempotencykey_change", args=[key.pk])
    )

    page = response.content.decode()
    assert "<td>charge</td>" in page
    assert "&quot;ch_&lt;1&gt;&quot;" in page  # escaped
    assert "not-mine" not in page
    assert "<td>mail</td>" in page
    assert "Boom: &lt;x&gt;" in page


def test_a_key_without_steps_says_so(admin_client: Client) -> None:
    key = IdempotencyKeyFactory()
    page = admin_client.get(
        reverse("admin:django_idempotency_idempotencykey_change", args=[key.pk])
    ).content.decode()
    assert "No step recorded." in page
    assert "No message enqueued." in page


def test_the_outbox_list_filters_failing_messages(admin_client: Client) -> None:
    failing = message(topic="failing", last_error="ConnectionError: down", attempts=3)
    message(topic="fresh")
    message(topic="done", state=OutboxMessage.State.SENT, sent=timezone.now())

    response = admin_client.get(reverse(CHANGELIST), {"delivery": "failing"})
    assert [row.pk for row in response.context["cl"].result_list] == [failing.pk]
    response = admin_client.get(reverse(CHANGELIST), {"state__exact": "sent"})
    assert [row.topic for row in response.context["cl"].result_list] == ["done"]


def test_retry_now_makes_pending_messages_due(admin_client: Client) -> None:
    later = timezone.now() + timedelta(hours=1)
    pending = message(next_attempt=later, last_error="x")
    sent = message(state=OutboxMessage.State.SENT, next_attempt=later)

    response = admin_client.post(
        reverse(CHANGELIST),
        {"action": "retry_now", "_selected_action": [pending.pk, sent.pk]},
        follow=True,
    )

    assert "1 message is due now." in response.content.decode()
    pending.refresh_from_db()
    sent.refresh_from_db()
    assert pending.next_attempt <= timezone.now()
    assert sent.next_attempt == later


def test_messages_are_read_only_and_retry_needs_its_permission(client: Client) -> None:
    staff = UserFactory(is_staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_outboxmessage"))
    client.force_login(staff)
    pending = message()

    page = client.get(reverse(CHANGELIST))
    assert page.status_code == 200
    assert "retry_now" not in page.content.decode()
    detail = client.get(reverse("admin:django_idempotency_outboxmessage_change", args=[pending.pk]))
    assert detail.status_code == 200
    assert client.get(reverse("admin:django_idempotency_outboxmessage_add")).status_code == 403
