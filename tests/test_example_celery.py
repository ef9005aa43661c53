"""The example shop's Celery task: the "payment captured" consumer behind a broker.

Run eagerly here; tests/test_celery_brokers.py runs it under
``celery -A example_project worker`` on RabbitMQ.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from celery import Celery, current_app
from django.core.checks import run_checks

from django_idempotency.exceptions import FingerprintMismatch
from example_project.celery import app
from example_project.shop.consumers import on_payment_captured
from example_project.shop.models import LedgerEntry, Payment
from example_project.shop.tasks import payment_captured
from tests.test_example_consumer import MESSAGE, booked, create_payment


@pytest.fixture
def payment(db: None) -> Payment:
    return create_payment()


def test_every_delivery_of_a_capture_returns_the_one_booking(payment: Payment) -> None:
    results = [
        payment_captured.apply(kwargs={"message": MESSAGE}, task_id=f"delivery-{n}").get()
        for n in range(3)
    ]

    entry = LedgerEntry.objects.get()
    assert results == [results[0]] * 3
    assert results[0]["ledger_entry"] == entry.pk


def test_the_task_and_the_command_path_share_message_ids(payment: Payment) -> None:
    by_command = on_payment_captured(MESSAGE)
    by_task = payment_captured.apply(kwargs={"message": MESSAGE}).get()

    assert by_task == by_command
    assert booked() == [300]


def test_another_message_under_a_used_id_is_refused(payment: Payment) -> None:
    payment_captured.apply(kwargs={"message": MESSAGE}).get()

    with pytest.raises(FingerprintMismatch):
        payment_captured.apply(kwargs={"message": {**MESSAGE, "amount_cents": 1}}).get()
    assert booked() == [300]


@pytest.fixture
def shop_app_is_current() -> Iterator[Celery]:
    previous = current_app._get_current_object()
    app.set_current()
    yield app
    previous.set_current()


@pytest.mark.django_db  # the model checks (JSONField support) ask the database
def test_the_shops_celery_setup_passes_the_task_checks(shop_app_is_current: Celery) -> None:
    assert "shop.payment_captured" in shop_app_is_current.tasks
    ids = {message.id for message in run_checks(databases=["default"])}

    assert not ids & {"django_idempotency.W005", "django_idempotency.W006"}
