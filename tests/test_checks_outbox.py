"""The system checks of steps and the outbox (E030-E032)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.core.checks import run_checks
from django.test import override_settings

from django_idempotency.checks import check_outbox_and_steps
from django_idempotency.models import OutboxMessage


class OutboxElsewhere:
    """A router that sends outbox messages to another database than the keys."""

    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        return "elsewhere" if model is OutboxMessage else None


def errors(**settings: Any) -> set[str]:
    with override_settings(**settings):
        return {str(message.id) for message in check_outbox_and_steps()}


def test_defaults_pass() -> None:
    assert errors() == set()


@pytest.mark.parametrize(
    ("setting", "value", "check_id"),
    [
        ("IDEMPOTENCY_OUTBOX_SENDER", "no.such.sender", "E030"),
        ("IDEMPOTENCY_OUTBOX_SENDER", 42, "E030"),
        ("IDEMPOTENCY_OUTBOX_RETENTION", 0, "E031"),
        ("IDEMPOTENCY_OUTBOX_RETENTION", "7d", "E031"),
        ("DATABASE_ROUTERS", ["tests.test_checks_outbox.OutboxElsewhere"], "E032"),
    ],
)
def test_each_check_fires_on_a_bad_value(setting: str, value: Any, check_id: str) -> None:
    found = errors(**{setting: value})
    assert found == {f"django_idempotency.{check_id}"}


def test_good_values_pass() -> None:
    assert (
        errors(
            IDEMPOTENCY_OUTBOX_SENDER="django_idempotency.outbox.log_sender",
            IDEMPOTENCY_OUTBOX_RETENTION=timedelta(days=1),
        )
        == set()
    )
    assert errors(IDEMPOTENCY_OUTBOX_SENDER=lambda message: None) == set()


@pytest.mark.django_db
def test_messages_carry_a_hint_and_are_registered() -> None:
    with override_settings(IDEMPOTENCY_OUTBOX_SENDER="no.such.sender", SILENCED_SYSTEM_CHECKS=[]):
        found = run_checks(databases=["default"])
        (message,) = [m for m in found if m.id == "django_idempotency.E030"]
    assert "sender(message)" in (message.hint or "")
