"""Steps, derived keys and the outbox under gunicorn on PostgreSQL, with real SIGKILLs.

The example payment endpoint (steps "payment", "charge", "capture"; a derived
key for the provider; the "payment.captured" message through the outbox) is
killed at every step boundary and inside its steps (their work done, their
record and COMMIT not yet sent), and the outbox relay is killed in the middle
of a batch; afterwards every effect is counted in the database.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import test_multiprocess
from tests.multiprocess import harness
from tests.multiprocess.harness import PATIENCE, Gate, InFlight, Reply, serial, stampede
from tests.multiprocess.shop import PAYMENTS, Shop, Target, User, new_key
from tests.test_multiprocess import assert_conflict, assert_dropped, retry_through_lease

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.skipif(
        harness.postgres_url() is None,
        reason="needs DATABASE_URL pointing at PostgreSQL (a real server for gunicorn's workers)",
    ),
]

#: The module's server: the example shop under gunicorn (see tests/test_multiprocess.py).
shop = test_multiprocess.shop

#: The payment view under a 2-second lease, so that a retry soon takes over.
TARGET = Target(PAYMENTS, "lease-short")
#: Where a worker is killed, and whether the provider is asked again by the retry.
BOUNDARIES = {
    # Inside step "payment": the payment row sent, not committed (rolled back).
    "record:payment": 1,
    "step:payment": 1,  # the payment row committed; the charge not yet made
    "provider": 2,  # charged, the charge step not recorded: the retry asks again
    # Inside step "charge": charged, its record and COMMIT about to be sent.
    "record:charge": 2,
    "step:charge": 1,  # the charge recorded
    "step:capture": 1,  # the reference recorded and the message enqueued
}

#: Held inside a step: the payment rows and provider charges visible meanwhile.
HELD_INSIDE = {"record:payment": (0, 0), "record:charge": (1, 1)}


def send_payment(shop: Shop, key: str, number: int, headers: dict[str, str] | None = None) -> Reply:
    body = PAYMENTS.body(shop.alice, number)
    return shop.send(TARGET, shop.alice, key, body, headers)


def payment_rows(shop: Shop, number: int) -> list[tuple[Any, ...]]:
    return shop.database.rows(
        "SELECT id, reference FROM shop_payment WHERE amount_cents = %s", [number]
    )


def charges(shop: Shop, number: int) -> list[tuple[Any, ...]]:
    return shop.database.rows(
        "SELECT reference, idempotency_key, requests FROM shop_providercharge"
        " WHERE amount_cents = %s",
        [number],
    )


def messages(shop: Shop, reference: str) -> list[tuple[Any, ...]]:
    return shop.database.rows(
        "SELECT id, state FROM django_idempotency_outboxmessage WHERE payload->>'payment' = %s",
        [reference],
    )


def ledger(shop: Shop, payment_id: int) -> int:
    return int(
        shop.database.value(
            "SELECT count(*) FROM shop_ledgerentry WHERE payment_id = %s", [payment_id]
        )
    )


def relay_all(shop: Shop) -> None:
    """Run the relay (``--once``) until nothing is pending."""

    def drained() -> bool:
        done = shop.server.manage("relay_idempotency_outbox", "--once", "--claim-timeout", "1s")
        assert done.returncode == 0, done.stderr
        pending = "SELECT count(*) FROM django_idempotency_outboxmessage WHERE state = 'pending'"
        return int(shop.database.value(pending)) == 0

    harness.wait_until(drained, "the outbox to drain")


def assert_paid_once(
    shop: Shop, user: User, key: str, number: int, reply: Reply, asked: int
) -> None:
    """One payment, one charge (asked ``asked`` times with one key), one message, booked once."""
    ((payment_id, reference),) = payment_rows(shop, number)
    ((charge_reference, derived, requests),) = charges(shop, number)
    assert reference == charge_reference
    assert derived.startswith("idk_")
    assert requests == asked
    assert len(messages(shop, reference)) == 1
    body = reply.json()
    assert reply.status == 201
    assert not reply.replayed
    assert (body["id"], body["reference"], body["amount_cents"], body["order"]) == (
        payment_id,
        reference,
        number,
        user.order,
    )
    replay = send_payment(shop, key, number)
    assert replay.replayed
    assert replay.body == reply.body
    relay_all(shop)
    assert [state for _, state in messages(shop, reference)] == ["sent"]
    assert ledger(shop, payment_id) == 1


@pytest.mark.parametrize("boundary", list(BOUNDARIES))
def test_a_worker_killed_at_a_step_boundary_pays_exactly_once(shop: Shop, boundary: str) -> None:
    user = shop.alice
    # What a crash-free run answers, for the shape of the answer.
    clean_number = serial()
    clean = send_payment(shop, new_key("clean"), clean_number)
    assert clean.executed, clean

    key, number = new_key("crash"), serial()
    gate = Gate(shop.fault_dir, f"boundary-{boundary.replace(':', '-')}-{number}")
    headers = {**gate.headers, "X-Hold-At": boundary}
    request = InFlight.start(lambda: send_payment(shop, key, number, headers))
    inside = gate.wait_inside(request)
    if boundary in HELD_INSIDE:  # the step's work done, nothing of it committed
        payments, charged = HELD_INSIDE[boundary]
        assert (len(payment_rows(shop, number)), len(charges(shop, number))) == (payments, charged)
    os.kill(inside["pid"], signal.SIGKILL)
    assert_dropped(request)

    retries = retry_through_lease(
        shop, lambda: send_payment(shop, key, number), shop.lease_end(TARGET, key)
    )
    reply = retries.last
    assert set(reply.json()) == set(clean.json())
    # As a crash-free run answers: the same status, the same headers, the
    # payment's own Location.
    assert reply.status == clean.status
    assert set(reply.headers) - {"date"} == set(clean.headers) - {"date"}
    assert reply.headers["location"].endswith(f"/{reply.json()['id']}/")
    assert_paid_once(shop, user, key, number, reply, BOUNDARIES[boundary])
    shop.server.wait_for_workers()


def test_duplicates_while_a_step_runs_are_refused_and_each_step_runs_once(shop: Shop) -> None:
    key, number = new_key("dup-step"), serial()
    gate = Gate(shop.fault_dir, f"dup-step-{number}")
    request = InFlight.start(
        lambda: send_payment(shop, key, number, {**gate.headers, "X-Hold-At": "provider"})
    )
    gate.wait_inside(request)  # inside step "charge", the provider has charged
    duplicates = stampede([lambda: send_payment(shop, key, number) for _ in range(6)])
    gate.open()
    first = request.result()

    for reply in duplicates:
        assert_conflict(reply)
    assert isinstance(first, Reply), first
    assert first.executed, first
    ((_, _, requests),) = charges(shop, number)
    assert requests == 1
    assert len(payment_rows(shop, number)) == 1
    assert send_payment(shop, key, number).replayed


# The relay, killed in the middle of a batch ------------------------------------


@contextlib.contextmanager
def relay_process(shop: Shop, hold_after: int) -> Iterator[subprocess.Popen[bytes]]:
    environ = {**shop.server.environ, "MP_RELAY_HOLD_AFTER": str(hold_after)}
    log = shop.fault_dir / "relay.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                "manage.py",
                "relay_idempotency_outbox",
                "--once",
                "--claim-timeout",
                "1s",
            ],
            cwd=harness.ROOT,
            env=environ,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(PATIENCE)


def test_a_relay_killed_mid_batch_loses_nothing_and_books_once(shop: Shop) -> None:
    relay_all(shop)  # nothing left over from other tests
    log = shop.fault_dir / "relay-deliveries.log"
    log.unlink(missing_ok=True)
    numbers = [serial() for _ in range(5)]
    for number in numbers:
        assert send_payment(shop, new_key("relay"), number).executed
    references = [payment_rows(shop, number)[0][1] for number in numbers]

    with relay_process(shop, hold_after=3) as relay:
        gate = Gate(shop.fault_dir, "relay")
        inside = _wait_at(gate, relay)
        relay.send_signal(signal.SIGKILL)
        relay.wait(PATIENCE)
    (shop.fault_dir / "relay.inside").unlink()
    delivered_before = _deliveries(log)
    assert len(delivered_before) == 3
    assert inside["pid"] == relay.pid
    relay_all(shop)  # taken again once the killed relay's claim (1 s) has ended

    deliveries = _deliveries(log)
    ids = {
        str(message_id) for reference in references for message_id, _ in messages(shop, reference)
    }
    assert set(deliveries) == ids  # every message delivered
    assert deliveries.count(delivered_before[-1]) == 2  # the one in hand, again
    for number, reference in zip(numbers, references, strict=True):
        ((payment_id, _),) = payment_rows(shop, number)
        assert [state for _, state in messages(shop, reference)] == ["sent"]
        assert ledger(shop, payment_id) == 1  # booked once however often delivered


def _wait_at(gate: Gate, relay: subprocess.Popen[bytes]) -> dict[str, int]:
    inside = gate.directory / f"{gate.name}.inside"

    def arrived() -> bool:
        if relay.poll() is not None:
            output = (gate.directory / "relay.log").read_text(errors="replace")
            raise AssertionError(f"the relay ended before the gate:\n{output}")
        return inside.exists()

    harness.wait_until(arrived, "the relay at its gate")
    loaded: dict[str, int] = json.loads(inside.read_text())
    return loaded


def _deliveries(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []
