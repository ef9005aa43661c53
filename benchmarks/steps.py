"""What one step and one outbox message add to a protected function, in one run.

    python benchmarks/steps.py --database-url postgres://postgres@127.0.0.1:5432/bench_steps

The database named in the URL is created for the run and dropped at its end
(its name must contain "bench"). Each round runs every variant once, in turn,
with a fresh key (so each is a first execution, never a replay), in ``lease``
and in ``atomic`` mode: the variants are paired in time, and the figures are
the medians over the rounds. Every variant writes one ``Order`` row; a step
wraps that write, a message is enqueued beside it. Round trips are counted
once per variant, on the wire (``benchmarks/wire.py``), after the timed
rounds. Printed as Markdown; docs/benchmarks.md explains it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", required=True, help="database to create, use, drop")
    parser.add_argument("--rounds", type=int, default=2000, help="executions per variant")
    parser.add_argument("--output", type=Path, help="also write the Markdown here")
    args = parser.parse_args(argv)
    name = Path(urlsplit(args.database_url).path).name
    if "bench" not in name:
        parser.error(f"the database name must contain 'bench' (it is dropped): {name!r}")
    return args


def variants() -> dict[str, Callable[[], object]]:
    from benchmarks.models import Order
    from django_idempotency.outbox import enqueue
    from django_idempotency.workflow import step

    def write() -> int:
        return Order.objects.create(item="bench").pk

    def write_and_enqueue() -> int:
        enqueue("bench", {"n": 1})
        return write()

    return {
        "no step": write,
        "one step": lambda: step("write", write),
        "one step + one message": lambda: step("write", write_and_enqueue),
    }


def execute(mode: str, body: Callable[[], object]) -> None:
    from django_idempotency.decorators import idempotent_block

    with idempotent_block(uuid.uuid4().hex, scope="bench", mode=mode) as block:
        block.result = body()


def statements(mode: str, body: Callable[[], object]) -> list[str]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as captured:
        execute(mode, body)
    # Statements bound on the server are logged as "QUERY = '...' - PARAMS = ...".
    texts = [str(query["sql"]).removeprefix("QUERY = '") for query in captured.captured_queries]
    return [text.split(" ", 1)[0].upper() for text in texts]


#: Transaction control, as Django logs it (PostgreSQL's may go in one flush with a statement).
CONTROL = {"BEGIN", "COMMIT"}


def data(kinds: list[str]) -> int:
    return sum(kind not in CONTROL for kind in kinds)


def trips(mode: str, body: Callable[[], object]) -> int | None:
    """Round trips to the server, counted on the wire (``None`` on SQLite: in the process)."""
    from django.db import connection

    from benchmarks.wire import round_trips

    with round_trips(connection) as counter:
        if counter is None:
            return None
        connection.ensure_connection()
        execute(mode, body)  # prepared statements and caches of the new connection
        counter.reset()
        execute(mode, body)
        return counter.reset()


def measure(rounds: int) -> str:
    bodies = variants()
    lines = [
        "| mode | variant | statements | round trips | median ms "
        "| added statements (BEGIN, COMMIT aside) | added round trips | added ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode in ("lease", "atomic"):
        for body in bodies.values():  # warm up: connection, statement caches
            for _ in range(20):
                execute(mode, body)
        timings: dict[str, list[float]] = {name: [] for name in bodies}
        for _ in range(rounds):
            for name, body in bodies.items():
                started = time.perf_counter()
                execute(mode, body)
                timings[name].append((time.perf_counter() - started) * 1000)
        base_count = data(statements(mode, bodies["no step"]))
        base_trips = trips(mode, bodies["no step"])
        base_ms = statistics.median(timings["no step"])
        for name, body in bodies.items():
            kinds = statements(mode, body)
            counted = trips(mode, body)
            median = statistics.median(timings[name])
            if counted is None or base_trips is None:
                trip_columns = "n/a | n/a"
            else:
                trip_columns = f"{counted} | {counted - base_trips:+d}"
            total, added = trip_columns.split(" | ")
            lines.append(
                f"| {mode} | {name} | {len(kinds)} ({', '.join(kinds)}) | {total} "
                f"| {median:.2f} | {data(kinds) - base_count:+d} | {added} "
                f"| {median - base_ms:+.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["BENCH_DATABASE_URL"] = args.database_url
    os.environ.setdefault("BENCH_REDIS_URL", "")
    os.environ["DJANGO_SETTINGS_MODULE"] = "benchmarks.settings"
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.db import connection

    name = connection.settings_dict["NAME"]
    connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
    try:
        table = measure(args.rounds)
    finally:
        connection.creation.destroy_test_db(name, verbosity=0)
    title = f"{connection.display_name}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    markdown = f"### Steps and outbox: {title}, {args.rounds} rounds\n\n{table}\n"
    print(markdown)
    if args.output:
        args.output.write_text(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
