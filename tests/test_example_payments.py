"""The example payment endpoint end to end: steps, the provider's derived key, the outbox.

The fake provider writes its charges through a connection of its own (as an
external system would), so these tests commit for real (``transaction=True``).
"""

from __future__ import annotations

import json
from io import StringIO
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client

from django_idempotency.models import IdempotencyStep, OutboxMessage
from example_project.shop import provider
from example_project.shop.management.commands.seed_demo import DEMO_USERS
from example_project.shop.models import LedgerEntry, Order, Payment, ProviderCharge

pytestmark = [pytest.mark.urls("example_project.urls"), pytest.mark.django_db(transaction=True)]


class Crash(Exception):
    """Stands for the worker dying at a point of the request."""


@pytest.fixture
def alice(settings: Any) -> Client:
    settings.IDEMPOTENCY_OUTBOX_SENDER = "example_project.shop.outbox.deliver"
    call_command("seed_demo", stdout=StringIO())
    return Client(headers={"Authorization": f"Token {DEMO_USERS['alice'][1]}"})


def order_of(username: str) -> int:
    user = get_user_model().objects.get(username=username)
    return Order.objects.create(owner=user, item="coffee", amount="4.50").pk


def pay(client: Client, key: str, body: dict[str, Any]) -> Any:
    return client.post(
        "/api/payments/",
        json.dumps(body),
        content_type="application/json",
        headers={"Idempotency-Key": key},
    )


def relay() -> str:
    out = StringIO()
    call_command("relay_idempotency_outbox", "--once", stdout=out)
    return out.getvalue()


def test_a_payment_charges_once_and_books_once(alice: Client) -> None:
    body = {"order": order_of("alice"), "amount_cents": 450}

    first = pay(alice, "pay-1", body)
    replay = pay(alice, "pay-1", body)

    assert first.status_code == 201
    assert (replay.status_code, replay.content) == (201, first.content)
    (charge,) = ProviderCharge.objects.all()
    assert first.json()["reference"] == charge.reference
    assert charge.idempotency_key is not None
    assert charge.idempotency_key.startswith("idk_")
    assert set(IdempotencyStep.objects.values_list("name", flat=True)) == {
        "payment",
        "charge",
        "capture",
    }
    (message,) = OutboxMessage.objects.all()
    assert message.topic == "payment.captured"
    assert message.payload == {"payment": charge.reference, "amount_cents": 450}
    assert relay().startswith("Sent 1")
    assert relay().startswith("Sent 0")
    assert list(LedgerEntry.objects.values_list("amount_cents", flat=True)) == [450]


@pytest.mark.parametrize("point", ["payment", "provider", "charge"])
def test_a_crash_at_a_step_boundary_resumes_without_charging_twice(
    alice: Client, point: str
) -> None:
    body = {"order": order_of("alice"), "amount_cents": 450}
    crashed: list[str] = []

    def crash_once(**kwargs: Any) -> None:
        if not crashed and kwargs.get("name", "provider") == point:
            crashed.append(point)
            raise Crash(point)

    signal = provider.charged if point == "provider" else _step_completed()
    signal.connect(crash_once, dispatch_uid="crash")
    try:
        with pytest.raises(Crash):
            pay(alice, "pay-2", body)
        retry = pay(alice, "pay-2", body)
    finally:
        signal.disconnect(dispatch_uid="crash")

    assert retry.status_code == 201
    assert Payment.objects.count() == 1
    (charge,) = ProviderCharge.objects.all()
    # The provider was asked again only if its answer had not been recorded.
    assert charge.requests == (2 if point == "provider" else 1)
    assert retry.json()["reference"] == charge.reference
    assert OutboxMessage.objects.count() == 1


def test_a_provider_failure_answers_502_and_a_retry_resumes_at_the_charge(
    alice: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = {"order": order_of("alice"), "amount_cents": 450}
    real_charge = provider.charge

    def unreachable(amount_cents: int, idempotency_key: str | None = None) -> str:
        raise provider.ProviderError("connection reset")

    monkeypatch.setattr(provider, "charge", unreachable)
    failed = pay(alice, "pay-3", body)
    monkeypatch.setattr(provider, "charge", real_charge)
    retry = pay(alice, "pay-3", body)

    assert failed.status_code == 502
    assert retry.status_code == 201
    assert Payment.objects.count() == 1  # step "payment" was kept, not run again
    assert ProviderCharge.objects.count() == 1


def test_the_provider_refuses_a_derived_key_reused_for_another_amount() -> None:
    reference = provider.charge(100, idempotency_key="idk_x")
    assert provider.charge(100, idempotency_key="idk_x") == reference
    with pytest.raises(provider.ProviderError, match="reused for 200 cents"):
        provider.charge(200, idempotency_key="idk_x")
    assert ProviderCharge.objects.get().requests == 3


def _step_completed() -> Any:
    from django_idempotency import signals

    return signals.step_completed
