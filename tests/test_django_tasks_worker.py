"""Idempotent Django tasks run by a real worker process: django-tasks-db's ``db_worker``.

``django.tasks`` (the django-tasks backport on Django 5.2) with the database
backend of django-tasks-db, on PostgreSQL, in a database the module creates
beside ``DATABASE_URL``'s. Two worker processes take the enqueued tasks;
effects are ``testapp_order`` rows; outcomes are the backend's result rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.brokered.harness import SETTINGS, migrate, new_id, stop_process
from tests.multiprocess import harness
from tests.multiprocess.harness import PATIENCE, ROOT

pytestmark = [
    pytest.mark.broker,
    pytest.mark.skipif(
        harness.postgres_url() is None,
        reason="needs DATABASE_URL pointing at PostgreSQL (the worker shares the database)",
    ),
    pytest.mark.timeout(90),
]
RESULTS = "django_tasks_database_dbtaskresult"


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    url = harness.postgres_url()
    assert url is not None
    with harness.scratch_database(url) as scratch:
        migrate(scratch)
        yield scratch


@pytest.fixture(scope="module")
def database(database_url: str) -> Iterator[harness.Database]:
    connection = harness.Database(database_url)
    yield connection
    connection.close()


class Workers:
    def __init__(self, database_url: str, database: harness.Database, gates: Path) -> None:
        self.database = database
        self.gates = gates
        self.environ = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": SETTINGS,
            "DATABASE_URL": database_url,
            "BROKER_TEST_GATES": str(gates),
        }
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, count: int) -> None:
        for number in range(count):
            log = (self.gates / f"db-worker-{number}.log").open("wb")
            with log:
                self.processes.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "manage.py",
                            "db_worker",
                            "--interval",
                            "0.05",
                            "--no-startup-delay",
                            "--worker-id",
                            f"worker-{number}-{os.getpid()}",
                        ],
                        cwd=ROOT,
                        env=self.environ,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )

    def stop(self) -> None:
        for process in self.processes:
            stop_process(process)

    def enqueue(self, event: dict[str, Any], times: int = 1) -> list[str]:
        done = subprocess.run(
            [
                *(sys.executable, "-m", "tests.brokered.django_tasks"),
                *("book", json.dumps(event), str(times)),
            ],
            cwd=ROOT,
            env=self.environ,
            capture_output=True,
            text=True,
            timeout=PATIENCE,
            check=True,
        )
        ids: list[str] = json.loads(done.stdout)
        return ids

    def statuses(self, ids: list[str]) -> list[str]:
        rows = self.database.rows(
            f"SELECT status FROM {RESULTS} WHERE id::text = ANY(%s)",
            [ids],
        )
        return sorted(status for (status,) in rows)

    def return_values(self, ids: list[str]) -> list[Any]:
        rows = self.database.rows(
            f"SELECT return_value FROM {RESULTS} WHERE id::text = ANY(%s)",
            [ids],
        )
        return [value for (value,) in rows]

    def effects(self, event_id: str) -> int:
        return int(
            self.database.value("SELECT count(*) FROM testapp_order WHERE item = %s", [event_id])
        )

    def wait_until(self, condition: Any, what: str) -> None:
        try:
            harness.wait_until(condition, what)
        except AssertionError as error:
            logs = "\n".join(p.read_text() for p in sorted(self.gates.glob("db-worker-*.log")))
            raise AssertionError(f"{error}\n--- worker logs ---\n{logs[-6000:]}") from None


@pytest.fixture
def workers(database_url: str, database: harness.Database, tmp_path: Path) -> Iterator[Workers]:
    running = Workers(database_url, database, tmp_path)
    try:
        yield running
    finally:
        running.stop()


def test_twenty_enqueues_of_one_event_book_once(workers: Workers) -> None:
    workers.start(2)
    event = {"id": new_id()}
    ids = workers.enqueue(event, times=20)

    workers.wait_until(lambda: workers.statuses(ids) == ["SUCCESSFUL"] * 20, "20 tasks to succeed")

    assert workers.effects(event["id"]) == 1
    values = workers.return_values(ids)
    assert values == [values[0]] * 20
    assert values[0]["event"] == event["id"]


def test_a_failed_task_keeps_nothing_and_enqueued_again_books_once(workers: Workers) -> None:
    workers.start(1)
    event = {"id": new_id(), "fail": True}
    failed = workers.enqueue(event)
    workers.wait_until(lambda: workers.statuses(failed) == ["FAILED"], "the task to fail")
    assert workers.effects(event["id"]) == 0

    again = workers.enqueue(event)
    workers.wait_until(lambda: workers.statuses(again) == ["SUCCESSFUL"], "the retry")

    assert workers.effects(event["id"]) == 1


def test_a_worker_killed_mid_task_leaves_nothing_so_the_task_enqueued_again_books_once(
    workers: Workers,
) -> None:
    workers.start(1)
    event = {"id": new_id(), "crash": "mid"}
    lost = workers.enqueue(event)
    # django-tasks-db runs tasks in the worker's process: SIGKILL ends the worker,
    # and the task's result stays RUNNING (that backend never runs it again).
    workers.processes[0].wait(timeout=PATIENCE)
    assert workers.statuses(lost) == ["RUNNING"]
    assert workers.effects(event["id"]) == 0  # the booking was rolled back

    workers.start(1)
    again = workers.enqueue(event)
    workers.wait_until(lambda: workers.statuses(again) == ["SUCCESSFUL"], "the new enqueue")

    assert workers.effects(event["id"]) == 1
