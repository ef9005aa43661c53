"""The example shop's queue consumer: a "payment captured" message is booked once.

However often and however concurrently it is delivered; ``consume_payment_events``
feeds it JSON lines and says what became of each delivery.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from functools import partial
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db.models.signals import post_save
from django.test import Client

from django_idempotency import signals
from django_idempotency.exceptions import FingerprintMismatch
from django_idempotency.models import IdempotencyKey
from example_project.shop.consumers import InvalidMessage, on_payment_captured
from example_project.shop.models import LedgerEntry, Order, Payment
from tests.factories import IdempotencyKeyFactory
from tests.lease_stores import run_together

MESSAGE = {"id": "evt_1", "payment": "ch_1", "amount_cents": 300}


def create_payment(reference: str = "ch_1", amount_cents: int = 450) -> Payment:
    owner = get_user_model().objects.create_user(f"customer-of-{reference}")
    order = Order.objects.create(owner=owner, item="coffee", amount="4.50")
    return Payment.objects.create(
        owner=owner, order=order, amount_cents=amount_cents, reference=reference
    )


def booked() -> list[int]:
    return sorted(LedgerEntry.objects.values_list("amount_cents", flat=True))


@pytest.fixture
def payment(db: None) -> Payment:
    return create_payment()


@pytest.fixture
def run_counts() -> Iterator[dict[str, int]]:
    """How often the consumer ran and how often a stored result was returned."""
    counts = {"executed": 0, "replayed": 0}

    def executed(**kwargs: Any) -> None:
        counts["executed"] += 1

    def replayed(**kwargs: Any) -> None:
        counts["replayed"] += 1

    signals.executed.connect(executed)
    signals.replayed.connect(replayed)
    yield counts
    signals.executed.disconnect(executed)
    signals.replayed.disconnect(replayed)


# The consumer


def test_a_message_is_booked_once_and_a_redelivery_replays(
    payment: Payment, run_counts: dict[str, int]
) -> None:
    first = on_payment_captured(MESSAGE)
    again = on_payment_captured(dict(MESSAGE))

    entry = LedgerEntry.objects.get()
    assert (
        first
        == again
        == {
            "payment": "ch_1",
            "ledger_entry": entry.pk,
            "amount_cents": 300,
            "captured_cents": 300,
        }
    )
    assert (entry.payment, entry.amount_cents) == (payment, 300)
    assert run_counts == {"executed": 1, "replayed": 1}
    key = IdempotencyKey.objects.get()
    assert (key.scope, key.key, key.state) == ("payments", "evt_1", "completed")


def test_messages_with_their_own_ids_are_each_booked(payment: Payment) -> None:
    on_payment_captured(MESSAGE)
    second = on_payment_captured({"id": "evt_2", "payment": "ch_1", "amount_cents": 150})

    assert second["captured_cents"] == 450
    assert booked() == [150, 300]


def test_a_message_id_reused_for_another_capture_is_a_mismatch(payment: Payment) -> None:
    on_payment_captured(MESSAGE)

    with pytest.raises(FingerprintMismatch):
        on_payment_captured({**MESSAGE, "amount_cents": 100})
    assert booked() == [300]


def test_a_capture_before_its_payment_exists_fails_and_the_redelivery_books_it(
    db: None, run_counts: dict[str, int]
) -> None:
    with pytest.raises(Payment.DoesNotExist):
        on_payment_captured(MESSAGE)
    assert not IdempotencyKey.objects.exists()  # the id is free again

    create_payment()
    on_payment_captured(MESSAGE)
    on_payment_captured(MESSAGE)

    assert booked() == [300]
    assert run_counts == {"executed": 1, "replayed": 1}


@pytest.mark.django_db(transaction=True)
def test_a_crash_after_booking_undoes_the_entry_so_the_redelivery_books_once() -> None:
    create_payment()
    crashes = [RuntimeError("the worker died after booking")]

    def crash_once(instance: LedgerEntry, **kwargs: Any) -> None:
        assert LedgerEntry.objects.filter(pk=instance.pk).exists()  # the row is written
        if crashes:
            raise crashes.pop()

    post_save.connect(crash_once, sender=LedgerEntry)
    try:
        with pytest.raises(RuntimeError, match="died after booking"):
            on_payment_captured(MESSAGE)
        assert booked() == []  # rolled back with the record of the message
        assert not IdempotencyKey.objects.exists()

        first = on_payment_captured(MESSAGE)
        assert on_payment_captured(MESSAGE) == first
    finally:
        post_save.disconnect(crash_once, sender=LedgerEntry)
    assert booked() == [300]


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"payment": 1}, '"payment"'),
        ({"amount_cents": "300"}, '"amount_cents"'),
        ({"amount_cents": 0}, '"amount_cents"'),
        ({"amount_cents": True}, '"amount_cents"'),
        ({"amount_cents": 451}, "would exceed the payment ch_1: 0 of 450"),
    ],
)
def test_an_invalid_capture_books_nothing(
    payment: Payment, change: dict[str, Any], error: str
) -> None:
    with pytest.raises(InvalidMessage, match=error):
        on_payment_captured({**MESSAGE, **change})

    assert booked() == []
    assert not IdempotencyKey.objects.exists()


# Concurrent deliveries, with real threads on the test database


@pytest.mark.concurrency
@pytest.mark.django_db(transaction=True)
def test_the_same_message_delivered_many_times_at_once_is_booked_once(
    run_counts: dict[str, int],
) -> None:
    create_payment()

    workers = run_together([lambda: on_payment_captured(dict(MESSAGE))] * 8)
    results = [worker.outcome() for worker in workers]

    assert booked() == [300]
    assert results == [results[0]] * 8
    assert results[0]["ledger_entry"] == LedgerEntry.objects.get().pk
    # The duplicates waited for the first delivery and returned its result.
    assert run_counts == {"executed": 1, "replayed": 7}


@pytest.mark.concurrency
@pytest.mark.django_db(transaction=True)
def test_two_captures_of_one_payment_at_once_cannot_exceed_it() -> None:
    """Different ids, so both run: the payment's row lock orders the two checks."""
    create_payment(amount_cents=450)
    messages = [{"id": f"evt_{n}", "payment": "ch_1", "amount_cents": 300} for n in (1, 2)]

    workers = run_together([partial(on_payment_captured, message) for message in messages])
    outcomes: list[int | str] = []
    for worker in workers:
        try:
            outcomes.append(worker.outcome()["captured_cents"])
        except InvalidMessage as error:
            outcomes.append(str(error))

    assert booked() == [300]
    assert sorted(outcomes, key=str) == [
        300,
        "capturing 300 cents would exceed the payment ch_1: 300 of 450 cents are already captured",
    ]


# manage.py consume_payment_events


def consume(lines: list[Any], *args: str) -> tuple[str, CommandError | None]:
    """The command's output for ``lines`` on standard input, and its error if any."""
    stdin = StringIO(
        "".join(f"{line if isinstance(line, str) else json.dumps(line)}\n" for line in lines)
    )
    out = StringIO()
    try:
        call_command("consume_payment_events", *args, stdin=stdin, stdout=out)
    except CommandError as error:
        return out.getvalue(), error
    return out.getvalue(), None


def test_the_command_applies_a_message_once_and_replays_its_redeliveries(payment: Payment) -> None:
    output, error = consume([MESSAGE, MESSAGE, "", MESSAGE])

    entry = LedgerEntry.objects.get().pk
    booking = f"ledger entry {entry}: 300 cents captured on ch_1 (300 in all)"
    assert output.splitlines() == [
        f"evt_1        applied     {booking}",
        f"evt_1        replayed    {booking}",
        f"evt_1        replayed    {booking}",
        "3 messages: 1 applied, 2 replayed",
    ]
    assert error is None


def test_the_command_reports_what_it_could_not_process(payment: Payment) -> None:
    output, error = consume(
        [
            MESSAGE,
            {**MESSAGE, "amount_cents": 100},
            "not json",
            ["evt_9"],
            {"id": "evt_2", "payment": "ch_404", "amount_cents": 100},
            {"id": "evt_3", "payment": "ch_1", "amount_cents": 200},
            {"id": 4, "payment": "ch_1", "amount_cents": 150},
        ]
    )

    lines = output.splitlines()
    assert lines[1] == "evt_1        mismatch    this id came before with a different message"
    assert lines[2] == "line 3       invalid     not JSON"
    assert lines[3] == 'line 4       invalid     not a JSON object with an "id"'
    assert lines[4] == "evt_2        failed      no payment ch_404 (yet): redeliver later"
    assert lines[5].startswith("evt_3        invalid     capturing 200 cents would exceed")
    assert lines[6].startswith("4            applied     ledger entry")
    assert lines[7] == "7 messages: 2 applied, 1 mismatch, 3 invalid, 1 failed"
    assert str(error) == "5 of 7 messages were not processed."
    assert booked() == [150, 300]


def test_the_command_says_when_another_worker_holds_the_message(payment: Payment) -> None:
    # A claim of another worker, in progress for 30 more seconds.
    # The fingerprint is the message itself (shared with the Celery task's).
    arguments = json.dumps(MESSAGE, sort_keys=True, separators=(",", ":"))
    IdempotencyKeyFactory(
        scope="payments",
        key="evt_1",
        fingerprint=hashlib.sha256(arguments.encode()).hexdigest(),
        in_progress=True,
    )

    output, error = consume([MESSAGE])

    assert output.splitlines()[0] == "evt_1        in progress another worker has it: retry in 30 s"
    assert str(error) == "1 of 1 messages were not processed."
    assert booked() == []


def test_the_command_reads_a_file(payment: Payment, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps(MESSAGE) + "\n" + json.dumps(MESSAGE) + "\n", encoding="utf-8")

    output, error = consume([], str(events))

    assert output.splitlines()[-1] == "2 messages: 1 applied, 1 replayed"
    assert error is None


def test_the_command_refuses_a_file_it_cannot_read(db: None, tmp_path: Path) -> None:
    with pytest.raises(CommandError, match=r"Cannot read .*missing\.jsonl: No such file"):
        call_command("consume_payment_events", str(tmp_path / "missing.jsonl"), stdout=StringIO())


def test_the_command_with_nothing_to_read_says_so(db: None) -> None:
    assert consume([]) == ("0 messages: none\n", None)


# The admin


@pytest.mark.urls("example_project.urls")
def test_the_admin_lists_the_ledger(payment: Payment) -> None:
    on_payment_captured(MESSAGE)
    client = Client()
    client.force_login(get_user_model().objects.create_superuser("root", password="x"))

    response = client.get("/admin/shop/ledgerentry/")

    assert response.status_code == 200
    assert b"ch_1" in response.content
