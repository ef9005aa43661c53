"""Time per task in one process, without a broker: where an idempotent task's time goes.

    python benchmarks/celery_in_process.py --database-url postgres://postgres@127.0.0.1:5432/bench

Runs the broker tests' tasks (tests/brokered/app.py) with Celery's
``task.apply()`` in this process, on PostgreSQL with persistent connections
(as the throughput benchmark's worker): the unprotected task, the same in a
transaction, the idempotent one (``@idempotent_task``, atomic mode) and the
floor of atomic mode (its transaction and statements alone,
tests/brokered/floor.py). For
each, the wall time and this process' CPU time per task (the rest of the CPU
is PostgreSQL's); for the idempotent task, the store's claim (BEGIN and the
claim in one round trip) and completion (the completion and COMMIT in one)
as ``signals.store_called`` times them. Then the Python that
``@idempotent_task`` and the engine run around the store, measured with a
store that does nothing. Medians over ``--rounds``; printed as Markdown
(docs/benchmarks.md explains them). A database beside the URL's is created
for the run and dropped at its end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from django_idempotency.protocol import Call, Execute, Policy, Snapshot  # noqa: E402
from django_idempotency.stores.base import Store  # noqa: E402
from tests.brokered.harness import SETTINGS, migrate  # noqa: E402
from tests.multiprocess import harness  # noqa: E402

VARIANTS = {
    "unprotected": "book_unprotected",
    "unprotected, in a transaction": "book_unprotected_atomic",
    "idempotent": "book",
    "floor of atomic mode: its statements alone": "book_floor",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", required=True, help="PostgreSQL; a database beside it")
    parser.add_argument("--tasks", type=int, default=500, help="per variant and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--python-calls", type=int, default=5000, help="per round, with the store doing nothing"
    )
    return parser.parse_args(argv)


def per_task(run: Callable[[str], Any], count: int) -> tuple[float, float]:
    """Milliseconds of wall and CPU time per call of ``run`` with a new id."""
    ids = [uuid.uuid4().hex for _ in range(count)]
    wall, cpu = time.perf_counter(), time.process_time()
    for event_id in ids:
        run(event_id)
    return (
        (time.perf_counter() - wall) / count * 1000,
        (time.process_time() - cpu) / count * 1000,
    )


@contextlib.contextmanager
def store_times() -> Iterator[dict[str, list[float]]]:
    """The duration of every store operation while the block runs, by operation."""
    from django_idempotency import signals

    times: dict[str, list[float]] = {}

    def record(operation: str, duration: float, **kwargs: Any) -> None:
        times.setdefault(operation, []).append(duration * 1000)

    signals.store_called.connect(record, dispatch_uid="celery_in_process")
    try:
        yield times
    finally:
        signals.store_called.disconnect(dispatch_uid="celery_in_process")


def measure(args: argparse.Namespace) -> list[str]:
    from tests.brokered import app

    tasks = {name: getattr(app, attribute) for name, attribute in VARIANTS.items()}

    def runner(task: Any) -> Callable[[str], Any]:
        return lambda event_id: task.apply(kwargs={"event": {"id": event_id}}, task_id=event_id)

    for task in tasks.values():  # warm up: the connection, prepared statements
        per_task(runner(task), 50)
    walls: dict[str, list[float]] = {name: [] for name in tasks}
    cpus: dict[str, list[float]] = {name: [] for name in tasks}
    operations: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, task in tasks.items():
            with store_times() as times:
                wall, cpu = per_task(runner(task), args.tasks)
            walls[name].append(wall)
            cpus[name].append(cpu)
            for operation, durations in times.items():
                operations.setdefault(operation, []).append(statistics.median(durations))
    lines = [
        f"{args.tasks} tasks per variant and round, {args.rounds} rounds, `task.apply()`, "
        "PostgreSQL",
        "",
        "| task | wall ms per task | CPU ms per task (this process) |",
        "|---|--:|--:|",
    ]
    for name in tasks:
        lines.append(
            f"| {name} | {statistics.median(walls[name]):.2f} |"
            f" {statistics.median(cpus[name]):.2f} |"
        )
    lines += ["", "| store operation of the idempotent task | median ms |", "|---|--:|"]
    for operation, medians in sorted(operations.items()):
        lines.append(f"| {operation} | {statistics.median(medians):.2f} |")
    return lines


class DoNothing(Store):
    """Claims every key and keeps nothing: what is left is the Python around the store."""

    supports_atomic = True

    def atomic(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def claim(self, call: Call, policy: Policy) -> Execute:
        return Execute(call, "token")

    def complete(self, claim: Execute, snapshot: Snapshot, policy: Policy) -> bool:
        return True

    def release(self, claim: Execute) -> None:
        pass


def python_only(args: argparse.Namespace) -> list[str]:
    """Microseconds per task of the decorator and the engine, with a store doing nothing."""
    from django.test import override_settings

    from tests.brokered import app

    stores = {"default": {"BACKEND": f"{__name__}.DoNothing"}}
    booking = app.book_order
    # The task's effect left out, in both: only the decorator and the engine differ.
    app.book_order = lambda event: {"event": event["id"], "order": 1}
    overheads = []
    try:
        with override_settings(IDEMPOTENCY_STORES=stores):
            protected, plain = app.book.run, app.book_unprotected.run
            calls = args.python_calls
            per_task(lambda event_id: protected({"id": event_id}), calls)  # warm up
            for _ in range(args.rounds):
                base, _ = per_task(lambda event_id: plain({"id": event_id}), calls)
                wall, _ = per_task(lambda event_id: protected({"id": event_id}), calls)
                overheads.append((wall - base) * 1000)
    finally:
        app.book_order = booking
    return [
        "",
        "Python of `@idempotent_task` and the engine around the store, per task "
        f"(a store doing nothing): {statistics.median(overheads):.0f} µs",
    ]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with harness.scratch_database(args.database_url) as database_url:
        migrate(database_url)
        os.environ.update(
            DATABASE_URL=database_url,
            DJANGO_SETTINGS_MODULE=SETTINGS,
            BROKER_TEST_CONN_MAX_AGE="600",
        )
        import django
        from django.db import connections

        django.setup()
        try:
            lines = measure(args) + python_only(args)
        finally:
            connections.close_all()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
