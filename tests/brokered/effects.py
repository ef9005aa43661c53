"""What the broker tests' tasks do: book an order, crash, fail or wait where told.

``BROKER_TEST_GATES`` is a directory where the tasks leave marks (a crash
happened, a task started) and wait for the test's go-ahead.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

GATES = Path(os.environ.get("BROKER_TEST_GATES", "/nonexistent"))
#: The longest a task waits for the test's go-ahead.
PATIENCE = 30.0


class TransientError(Exception):
    """A failure that a retry gets past."""


def first_time(mark: str) -> bool:
    """True the first time ``mark`` is passed, in any process (an exclusive file create)."""
    try:
        (GATES / mark).open("x").close()
    except FileExistsError:
        return False
    return True


def wait_for_gate(name: str) -> None:
    (GATES / f"{name}.started").touch()
    deadline = time.monotonic() + PATIENCE
    while not (GATES / f"{name}.go").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no go-ahead for {name}")
        time.sleep(0.01)


def book_order(event: dict[str, Any]) -> dict[str, Any]:
    from tests.testapp.models import Order

    if event.get("hold"):
        wait_for_gate(event["id"])
    order = Order.objects.create(item=event["id"])
    if event.get("crash") == "mid" and first_time(f"{event['id']}.crashed"):
        # The row above is written but not committed: the redelivery must not see it.
        os.kill(os.getpid(), signal.SIGKILL)
    if event.get("fail") and first_time(f"{event['id']}.failed"):
        # Also written but not committed: the retry books on a clean slate.
        raise TransientError(f"transient failure booking {event['id']}")
    return {"event": event["id"], "order": order.pk}
