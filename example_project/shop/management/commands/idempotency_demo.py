"""``manage.py idempotency_demo``: the main scenarios against the shop's API, in-process.

Requests go through Django's test client to the real views, on the project's
own database, as a demo user the command creates. Keys are new on every run,
so the demo can run again and again. The payment provider is scripted for the
run: it holds one charge until a duplicate has been answered (no timing
guesses) and fails one charge on purpose.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from unittest import mock

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError, connection, connections
from django.http.response import HttpResponseBase
from django.test import Client
from rest_framework.authtoken.models import Token

from example_project.shop import provider
from example_project.shop.models import Order, Payment

DEMO_USER = "idempotency-demo"
#: How long the demo waits for a held request to reach the provider; a correct
#: run takes milliseconds.
PATIENCE = 10.0


ORDERS = "/api/orders/"
PAYMENTS = "/api/payments/"


@dataclass
class Step:
    """One request of the demo, what it should get, and what it got."""

    path: str
    data: dict[str, Any]
    #: ``k1``, ``k2``...: the key's label; ``None`` sends no key.
    key: str | None
    #: The status the step should get, and whether it should be a replay.
    expect: int
    shows: str
    expect_replay: bool = False
    response: HttpResponseBase | None = None

    @property
    def request(self) -> str:
        if "item" in self.data:
            return f"POST {self.path} {self.data['item']} {self.data['amount']}"
        return f"POST {self.path} {self.data['amount_cents']} cents"

    @property
    def status(self) -> int | None:
        return None if self.response is None else self.response.status_code

    @property
    def replayed(self) -> bool:
        return self.response is not None and self.response.get("Idempotent-Replayed") == "true"

    @property
    def as_described(self) -> bool:
        return (self.status, self.replayed) == (self.expect, self.expect_replay)

    def json(self) -> Any:
        assert self.response is not None
        return json.loads(self.response.content)  # type: ignore[attr-defined]


class ScriptedProvider:
    """The fake payment provider, told by the demo to hold or to fail its next charge."""

    def __init__(self) -> None:
        self.charges: list[str] = []
        self.failures = 0
        self.fail_next = False
        self.hold_next = False
        self.holding = threading.Event()
        self.release = threading.Event()
        self.by_key: dict[str, str] = {}

    def charge(self, amount_cents: int, idempotency_key: str | None = None) -> str:
        if self.fail_next:
            self.fail_next = False
            self.failures += 1
            raise provider.ProviderError("connection reset before the charge")
        if self.hold_next:
            self.hold_next = False
            self.holding.set()
            if not self.release.wait(PATIENCE):
                raise provider.ProviderError("the demo never released this charge")
        if idempotency_key in self.by_key:
            return self.by_key[idempotency_key]  # as the real provider: the first charge
        reference = f"ch_demo_{uuid.uuid4().hex[:12]}"
        self.charges.append(reference)
        if idempotency_key is not None:
            self.by_key[idempotency_key] = reference
        return reference


class Command(BaseCommand):
    help = (
        "Run the main idempotency scenarios in-process against the shop's API "
        "(replay, mismatch, missing key, concurrent duplicate, failure and retry) "
        "and print what happened."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        run = uuid.uuid4().hex[:8]
        user, client = self._demo_client()
        orders_before = Order.objects.filter(owner_id=user.pk).count()
        payments_before = Payment.objects.filter(owner_id=user.pk).count()
        scripted = ScriptedProvider()
        with mock.patch.object(provider, "charge", scripted.charge):
            steps = Demo(client, run, scripted).run()
        self.stdout.write(
            f"Run {run}: keys demo-{run}-k1 to -k3, user {DEMO_USER}, "
            f"database {connection.alias!r} ({connection.vendor}).\n"
        )
        self.stdout.write(render(steps))
        orders = Order.objects.filter(owner_id=user.pk).count() - orders_before
        payments = Payment.objects.filter(owner_id=user.pk).count() - payments_before
        self.stdout.write(
            f"\n{len(steps)} requests; created {counted(orders, 'order')} and "
            f"{counted(payments, 'payment')}; the provider made "
            f"{counted(len(scripted.charges), 'charge')} and failed "
            f"{counted(scripted.failures, 'time')}."
        )
        wrong = [str(number) for number, step in enumerate(steps, 1) if not step.as_described]
        if wrong:
            raise CommandError(f"Step(s) {', '.join(wrong)} did not go as described.")

    def _demo_client(self) -> tuple[AbstractBaseUser, Client]:
        try:
            user, created = get_user_model()._default_manager.get_or_create(username=DEMO_USER)
            if created:
                user.set_unusable_password()
                user.save()
            token, _ = Token.objects.get_or_create(user=user)
        except DatabaseError as error:
            raise CommandError(f"{error}: run `manage.py migrate` first.") from error
        # SERVER_NAME: a host ALLOWED_HOSTS accepts outside the test runner.
        client = Client(SERVER_NAME="localhost", headers={"Authorization": f"Token {token.key}"})
        return user, client


class Demo:
    """The scenarios, in order; each step records the response it got."""

    def __init__(self, client: Client, run: str, scripted: ScriptedProvider) -> None:
        self.client = client
        self.run_id = run
        self.scripted = scripted
        self.steps: list[Step] = []

    def run(self) -> list[Step]:
        order_id = self._orders()
        self._concurrent_payment(order_id)
        self._failed_payment(order_id)
        return self.steps

    def _orders(self) -> int | None:
        coffee = {"item": "coffee", "amount": "4.50"}
        tea = {"item": "tea", "amount": "4.50"}
        first = self._send(
            Step(ORDERS, coffee, "k1", 201, "new key: the view runs; order and response stored")
        )
        self._send(
            Step(
                ORDERS,
                coffee,
                "k1",
                201,
                "a retry: the stored response, no new order",
                expect_replay=True,
            )
        )
        self._send(Step(ORDERS, tea, "k1", 422, "the key reused for another order: nothing runs"))
        self._send(Step(ORDERS, tea, None, 400, "no key where one is required: refused"))
        return first.json().get("id") if first.status == 201 else None

    def _concurrent_payment(self, order_id: int | None) -> None:
        payment = {"order": order_id, "amount_cents": 450}
        held = self._record(
            Step(PAYMENTS, payment, "k2", 201, "held at the provider until 6 is answered; charged")
        )
        self.scripted.hold_next = True
        with self._in_thread(lambda: self._answer(held)):
            # Until the charge is held (or the request ended without reaching it).
            self.scripted.holding.wait(PATIENCE)
            duplicate = self._send(
                Step(PAYMENTS, payment, "k2", 409, "the same key while 5 charges")
            )
        retry_after = duplicate.response.get("Retry-After") if duplicate.response else None
        duplicate.shows += f": in progress, Retry-After {retry_after} s"
        replay = self._send(
            Step(
                PAYMENTS,
                payment,
                "k2",
                201,
                "after 5 finished: its response, same charge",
                expect_replay=True,
            )
        )
        if held.status == replay.status == 201 and held.json() != replay.json():
            replay.shows += " (NOT the same body!)"

    def _failed_payment(self, order_id: int | None) -> None:
        payment = {"order": order_id, "amount_cents": 200}
        self.scripted.fail_next = True
        self._send(Step(PAYMENTS, payment, "k3", 502, "provider failed: a 5xx keeps nothing"))
        self._send(Step(PAYMENTS, payment, "k3", 201, "the retry runs again and is charged"))

    @contextmanager
    def _in_thread(self, work: Callable[[], None]) -> Iterator[None]:
        """Run ``work`` in a thread of its own while the block runs; release it after."""

        def run() -> None:
            try:
                work()
            finally:
                self.scripted.holding.set()  # never leave the main thread waiting
                connections.close_all()  # this thread's own connections

        thread = threading.Thread(target=run, name="idempotency-demo-first")
        thread.start()
        try:
            yield
        finally:
            self.scripted.release.set()
            thread.join(PATIENCE)
        if thread.is_alive():
            raise CommandError("The held request did not finish.")

    def _record(self, step: Step) -> Step:
        self.steps.append(step)
        return step

    def _send(self, step: Step) -> Step:
        self._answer(self._record(step))
        return step

    def _answer(self, step: Step) -> None:
        headers = {} if step.key is None else {"Idempotency-Key": f"demo-{self.run_id}-{step.key}"}
        step.response = self.client.post(
            step.path, json.dumps(step.data), content_type="application/json", headers=headers
        )


def counted(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def render(steps: list[Step]) -> str:
    """The steps as a plain-text table."""
    header = ("step", "request", "key", "status", "replayed", "what it shows")
    rows = [header]
    for number, step in enumerate(steps, 1):
        shows = step.shows
        if not step.as_described:
            shows = f"UNEXPECTED (expected {step.expect}): {shows}"
        replayed = "yes" if step.replayed else "no"
        key = step.key or "-"
        rows.append((str(number), step.request, key, str(step.status), replayed, shows))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)
