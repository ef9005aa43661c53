"""The transactional outbox: enqueue with the work, relay at least once, retry with backoff."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
import time_machine
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import transaction
from django.utils import timezone

from django_idempotency import outbox
from django_idempotency.decorators import idempotent_block
from django_idempotency.models import OutboxMessage
from django_idempotency.outbox import OutboxError, enqueue
from django_idempotency.workflow import step
from tests.lease_stores import DATABASE, STORES

PAYLOAD = {"order": 1}
SENT: list[OutboxMessage] = []


@pytest.fixture(autouse=True)
def configured(settings: Any) -> None:
    settings.IDEMPOTENCY_STORES = STORES
    settings.IDEMPOTENCY_STORE = DATABASE
    settings.IDEMPOTENCY_OUTBOX_SENDER = "tests.test_outbox.record"
    SENT.clear()


def record(message: OutboxMessage) -> None:
    """The sender of these tests: keeps what it was given."""
    SENT.append(message)


def failing(message: OutboxMessage) -> None:
    raise ConnectionError("broker down")


def topics() -> list[str]:
    return sorted(OutboxMessage.objects.values_list("topic", flat=True))


def relay_once(**options: Any) -> str:
    out = StringIO()
    call_command("relay_idempotency_outbox", "--once", stdout=out, **options)
    return out.getvalue()


# Enqueue: with the work, or not at all -----------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_message_of_a_step_commits_with_it_and_a_replay_adds_none() -> None:
    for _ in range(2):
        with idempotent_block("k1", scope="shop", payload=PAYLOAD, mode="lease") as block:
            if not block.replayed:
                block.result = step("notify", lambda: str(enqueue("mail", {"to": "a"}).pk))
    message = OutboxMessage.objects.get()
    assert str(message.pk) == block.result
    assert (message.scope, message.idempotency_key, message.step) == ("shop", "k1", "notify")
    assert message.payload == {"to": "a"}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("mode", ["atomic", "lease"])
def test_a_message_of_failed_work_is_never_written(mode: str) -> None:
    with (
        pytest.raises(ZeroDivisionError),
        idempotent_block("k2", scope="shop", payload=PAYLOAD, mode=mode),
    ):
        step("notify", lambda: (enqueue("mail", {}), 1 / 0))
    assert topics() == []


@pytest.mark.django_db(transaction=True)
def test_atomic_mode_enqueues_with_the_stored_outcome() -> None:
    def fail() -> None:
        with idempotent_block("k3", scope="shop", payload=PAYLOAD):
            enqueue("mail", {})
            raise KeyError

    with pytest.raises(KeyError):
        fail()
    assert topics() == []
    with idempotent_block("k3", scope="shop", payload=PAYLOAD) as block:
        enqueue("mail", {})
        block.result = 1
    assert topics() == ["mail"]


@pytest.mark.django_db(transaction=True)
def test_lease_mode_refuses_a_message_outside_a_step() -> None:
    with (
        pytest.raises(OutboxError, match="must run inside a step"),
        idempotent_block("k4", scope="shop", payload=PAYLOAD, mode="lease"),
    ):
        enqueue("mail", {})
    assert topics() == []


@pytest.mark.django_db
def test_outside_protected_code_it_joins_the_callers_transaction() -> None:
    def fail() -> None:
        with transaction.atomic():
            enqueue("mail", {})
            raise KeyError

    with pytest.raises(KeyError):
        fail()
    message = enqueue("mail", {"n": 1})
    assert (message.scope, message.idempotency_key, message.step) == ("", "", "")
    assert topics() == ["mail"]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("topic", "payload", "error"),
    [
        ("", {}, "non-empty string"),
        ("t" * 201, {}, "at most 200"),
        (None, {}, "non-empty string"),
        ("mail", [1], "must be a dict"),
        ("mail", {"when": object()}, "JSON-serialisable"),
    ],
)
def test_bad_messages_are_refused(topic: Any, payload: Any, error: str) -> None:
    with pytest.raises(OutboxError, match=error):
        enqueue(topic, payload)
    assert topics() == []


def test_enqueueing_is_one_insert(django_assert_num_queries: Any, db: None) -> None:
    with django_assert_num_queries(1):
        enqueue("mail", {})


# The relay ----------------------------------------------------------------------


@pytest.mark.django_db
def test_the_relay_sends_each_due_message_once_in_order() -> None:
    first = enqueue("a", {"n": 1})
    second = enqueue("b", {"n": 2})

    assert relay_once(batch_size=1) == "Sent 2 outbox message(s); 0 failed and will be retried.\n"
    assert [message.pk for message in SENT] == [first.pk, second.pk]
    assert relay_once().startswith("Sent 0")
    assert set(OutboxMessage.objects.values_list("state", flat=True)) == {"sent"}
    assert all(message.sent is not None for message in OutboxMessage.objects.all())


@pytest.mark.django_db
def test_a_failing_message_is_retried_with_backoff_never_dropped(settings: Any) -> None:
    settings.IDEMPOTENCY_OUTBOX_SENDER = "tests.test_outbox.failing"
    message = enqueue("mail", {})
    with time_machine.travel(timezone.now(), tick=False) as traveller:
        assert "1 failed" in relay_once()
        message.refresh_from_db()
        assert (message.state, message.attempts) == ("pending", 1)
        assert message.last_error == "ConnectionError: broker down"
        assert message.next_attempt == timezone.now() + timedelta(seconds=10)
        assert "Sent 0" in relay_once()  # not due yet
        traveller.shift(timedelta(seconds=10))
        assert "1 failed" in relay_once()
        message.refresh_from_db()
        assert message.attempts == 2
        assert message.next_attempt == timezone.now() + timedelta(seconds=20)
    assert outbox.backoff(30) == timedelta(hours=1)
    settings.IDEMPOTENCY_OUTBOX_SENDER = "tests.test_outbox.record"
    assert outbox.retry_now("default", [message.pk]) == 1
    assert "Sent 1" in relay_once()


@pytest.mark.django_db
def test_a_relay_that_died_leaves_its_batch_to_be_sent_again() -> None:
    enqueue("mail", {})
    with time_machine.travel(timezone.now(), tick=False) as traveller:
        # Taken, as by a relay killed before it sent anything.
        (taken,) = outbox._take("default", 10, timedelta(seconds=30))
        assert relay_once().startswith("Sent 0")
        traveller.shift(timedelta(seconds=31))
        assert relay_once().startswith("Sent 1")
    assert [message.pk for message in SENT] == [taken.pk]


@pytest.mark.django_db
def test_a_stop_request_returns_the_rest_of_the_batch() -> None:
    for n in range(3):
        enqueue("mail", {"n": n})
    stop = threading.Event()

    def send_then_stop(message: OutboxMessage) -> None:
        SENT.append(message)
        stop.set()

    report = outbox.relay(send_then_stop, stop=stop)
    assert (report.sent, report.returned) == (1, 2)
    due = OutboxMessage.objects.filter(state="pending", next_attempt__lte=timezone.now())
    assert due.count() == 2
    assert set(due.values_list("attempts", flat=True)) == {0}


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        (["--batch-size", "0"], "not a positive whole number"),
        (["--interval", "-1"], "not a positive number of seconds"),
        (["--claim-timeout", "soon"], "is not a duration"),
        (["--database", "nowhere"], "Unknown database 'nowhere'"),
        (["--once", "--loop"], "not allowed with argument"),
    ],
)
def test_bad_arguments_are_command_errors(arguments: list[str], error: str) -> None:
    with pytest.raises(CommandError, match=error):
        call_command("relay_idempotency_outbox", *arguments, stdout=StringIO())


@pytest.mark.django_db
def test_an_unset_sender_is_a_command_error(settings: Any) -> None:
    del settings.IDEMPOTENCY_OUTBOX_SENDER
    with pytest.raises(CommandError, match="IDEMPOTENCY_OUTBOX_SENDER is not set"):
        relay_once()


def test_the_loop_stops_cleanly_on_sigterm(tmp_path: Any) -> None:
    """A real relay process in --loop: SIGTERM ends it with exit code 0."""
    script = (
        "import django, os, sys\n"
        "os.environ['DJANGO_SETTINGS_MODULE'] = 'tests.settings'\n"
        "django.setup()\n"
        "from django.conf import settings\n"
        "settings.IDEMPOTENCY_OUTBOX_SENDER = 'django_idempotency.outbox.log_sender'\n"
        "from django_idempotency import outbox\n"
        "from unittest import mock\n"
        "def relay(*args, **kwargs):\n"
        "    print('looping', flush=True)\n"
        "    return outbox.Report()\n"
        "with mock.patch.object(outbox, 'relay', relay):\n"
        "    from django.core.management import call_command\n"
        "    call_command('relay_idempotency_outbox', '--loop', '--interval', '60')\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "looping\n"
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(15)
    assert process.returncode == 0, err
    assert "Sent 0 outbox message(s)" in out


# Purge ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_purge_deletes_expired_steps_and_old_sent_messages_never_unsent_ones() -> None:
    from django_idempotency.models import IdempotencyStep

    now = timezone.now()
    for name, expires in (("old", now - timedelta(seconds=1)), ("live", now + timedelta(hours=1))):
        IdempotencyStep.objects.create(
            scope="s", key="k", name=name, fingerprint="f", token="t", result="1", expires=expires
        )
    week = timedelta(days=7)
    enqueue("unsent-old", {})
    OutboxMessage.objects.filter(topic="unsent-old").update(created=now - week * 2)
    for topic, sent in (("sent-old", now - week - timedelta(seconds=1)), ("sent-new", now)):
        message = enqueue(topic, {})
        OutboxMessage.objects.filter(pk=message.pk).update(state="sent", sent=sent)

    out = StringIO()
    call_command("purge_idempotency_keys", stdout=out)

    assert out.getvalue() == (
        "Deleted 0 expired keys in 0 batch(es).\n"
        "Deleted 1 expired steps in 1 batch(es).\n"
        "Deleted 1 sent outbox messages in 1 batch(es).\n"
    )
    assert list(IdempotencyStep.objects.values_list("name", flat=True)) == ["live"]
    assert topics() == ["sent-new", "unsent-old"]
