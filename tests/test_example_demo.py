"""``manage.py idempotency_demo``: every scenario answers as its table says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError

from django_idempotency.models import IdempotencyKey
from example_project.shop import provider
from example_project.shop.management.commands.idempotency_demo import DEMO_USER
from example_project.shop.models import Order, Payment

ROOT = Path(__file__).resolve().parent.parent

#: (status, replayed) of the nine steps, in order.
EXPECTED = [
    ("201", "no"),  # new key
    ("201", "yes"),  # retry replayed
    ("422", "no"),  # same key, other order
    ("400", "no"),  # no key
    ("201", "no"),  # the held payment
    ("409", "no"),  # its duplicate while it charges
    ("201", "yes"),  # the duplicate again once it finished
    ("502", "no"),  # the provider failed
    ("201", "no"),  # the retry runs
]

pytestmark = [
    pytest.mark.urls("example_project.urls"),
    # The held payment runs in a thread of its own: it must see committed rows.
    pytest.mark.django_db(transaction=True),
    pytest.mark.concurrency,
]


def table_rows(output: str) -> list[list[str]]:
    """The table's rows, split into their columns (two or more spaces apart)."""
    return [
        re.split(r"\s{2,}", line) for line in output.splitlines() if re.match(r"\d+ {2,}", line)
    ]


def demo() -> str:
    out = StringIO()
    call_command("idempotency_demo", stdout=out)
    return out.getvalue()


def test_the_demo_gets_the_status_each_scenario_describes() -> None:
    output = demo()

    rows = table_rows(output)
    assert [(row[3], row[4]) for row in rows] == EXPECTED
    assert [row[2] for row in rows] == ["k1"] * 3 + ["-"] + ["k2"] * 3 + ["k3"] * 2
    assert rows[5][5].startswith("the same key while 5 charges: in progress, Retry-After ")
    assert "UNEXPECTED" not in output
    assert "created 1 order and 2 payments; the provider made 2 charges and failed 1 time" in output


def test_the_demo_leaves_one_order_two_payments_and_its_keys() -> None:
    demo()

    user = get_user_model().objects.get(username=DEMO_USER)
    assert not user.has_usable_password()
    assert Order.objects.filter(owner=user).count() == 1
    payments = Payment.objects.filter(owner=user)
    assert sorted(payments.values_list("amount_cents", flat=True)) == [200, 450]
    # k1 and k2 are kept; k3 only from its successful retry.
    assert IdempotencyKey.objects.filter(state="completed").count() == 3


def test_the_demo_runs_again_with_new_keys() -> None:
    first, second = demo(), demo()

    assert [(row[3], row[4]) for row in table_rows(second)] == EXPECTED
    assert first.splitlines()[0] != second.splitlines()[0]  # another run id
    assert Order.objects.filter(owner__username=DEMO_USER).count() == 2


def test_the_demo_puts_the_real_provider_back() -> None:
    charge = provider.charge

    demo()

    assert provider.charge is charge


def test_the_demo_fails_when_a_step_does_not_go_as_described(settings: Any) -> None:
    settings.IDEMPOTENCY_REQUIRED = False  # step 4 then runs instead of answering 400

    out = StringIO()
    with pytest.raises(CommandError, match=r"^Step\(s\) 4 did not go as described\.$"):
        call_command("idempotency_demo", stdout=out)

    row = table_rows(out.getvalue())[3]
    assert (row[3], row[5]) == (
        "201",
        "UNEXPECTED (expected 400): no key where one is required: refused",
    )


@pytest.mark.django_db(transaction=False)
def test_manage_py_runs_the_demo_on_a_fresh_database(tmp_path: Path) -> None:
    """As a newcomer would: the example's own settings, migrate, then the demo."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "example_project.settings",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'shop.sqlite3'}",
    }

    def manage(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    unmigrated = manage("idempotency_demo")
    assert unmigrated.returncode == 1
    assert "run `manage.py migrate` first" in unmigrated.stderr

    assert manage("migrate", "--no-input").returncode == 0
    result = manage("idempotency_demo")
    assert result.returncode == 0, result.stderr
    assert [(row[3], row[4]) for row in table_rows(result.stdout)] == EXPECTED
