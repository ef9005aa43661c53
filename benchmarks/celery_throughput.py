"""Messages per second through one Celery worker: an idempotent task vs the same task unprotected.

    python benchmarks/celery_throughput.py --database-url postgres://postgres@127.0.0.1:5432/bench

One worker (prefork pool of ``--concurrency`` processes) of the broker tests'
app (tests/brokered/app.py) on PostgreSQL, against RabbitMQ and Redis (those
that answer, or ``--broker``). Each task books one order row; the idempotent
one (``@idempotent_task(key=event id)``, atomic mode) also claims and
completes its key in the same transaction; the unprotected task inside
``transaction.atomic()``, the transaction atomic mode needs, is there for
comparison, and so is the task in lease mode on the Redis store (the key in
Redis, the row inserted in autocommit), and the floor of atomic mode: the
transaction and the store's two statements sent as the store sends them, with
none of the package's code (tests/brokered/floor.py).

Two ways of running the worker's database connections (``--connections``):
Celery's default, where its Django fix-up closes the connections before and
after every task whatever ``CONN_MAX_AGE`` says (each task connects anew), and
connections kept (``CELERY_DB_REUSE_MAX`` set, and ``CONN_MAX_AGE``). Per
round, every variant gets
``--messages`` messages with distinct event ids, published at once; a
variant's time runs from its first publish until its last row is in the
database. Variants rotate their order from round to round; the medians
and the ratios are printed as Markdown (docs/benchmarks.md explains them).
A database beside the URL's is created for the run and dropped at its end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.brokered.harness import (  # noqa: E402
    RABBITMQ_URL,
    REDIS_URL,
    Broker,
    Cluster,
    broker_unavailable,
    migrate,
)
from tests.multiprocess import harness  # noqa: E402

VARIANTS = {
    "unprotected": "brokered.book_unprotected",
    "unprotected, in a transaction": "brokered.book_unprotected_atomic",
    "idempotent": "brokered.book",
    "floor of atomic mode: its statements alone": "brokered.book_floor",
    "idempotent, lease mode, Redis store": "brokered.book_lease_redis",
}
#: The worker's environment for each way of running its database connections.
CONNECTIONS = {
    "per-task": {"BROKER_TEST_CONN_MAX_AGE": "600"},
    "kept": {"BROKER_TEST_CONN_MAX_AGE": "600", "BROKER_TEST_DB_REUSE_MAX": "1000000"},
}
CONNECTIONS_TITLE = {
    "per-task": "a new connection per task (Celery's default)",
    "kept": "connections kept (CELERY_DB_REUSE_MAX)",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", required=True, help="PostgreSQL; a database beside it")
    parser.add_argument("--broker", choices=["rabbitmq", "redis"], action="append")
    parser.add_argument("--rabbitmq-url", default=RABBITMQ_URL)
    parser.add_argument("--redis-url", default=REDIS_URL)
    parser.add_argument("--messages", type=int, default=500, help="per variant and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=2, help="the worker's pool size")
    parser.add_argument(
        "--connections", choices=[*CONNECTIONS, "both"], default="both", help="see above"
    )
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="also report CPU ms per message by process (Linux; processes that exit are missed)",
    )
    return parser.parse_args(argv)


#: Process groups whose CPU time ``--cpu`` reports, by what their command line holds.
CPU_GROUPS = (
    ("celery", "the worker"),
    ("postgres", "PostgreSQL"),
    ("beam", "RabbitMQ"),
    ("redis-server", "Redis"),
)


def cpu_seconds() -> dict[str, float]:
    """CPU time (user + system) of the running processes by group, from /proc (Linux)."""
    ticks = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"{entry.path}/stat") as stat, open(f"{entry.path}/cmdline", "rb") as cmd:
                fields = stat.read().rpartition(")")[2].split()
                command = cmd.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if int(entry.name) == os.getpid():
            group = "this benchmark"
        else:
            group = next((name for marker, name in CPU_GROUPS if marker in command), "other")
        # utime and stime: fields 14 and 15 of /proc/PID/stat, 12 and 13 after the name.
        totals[group] = totals.get(group, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return totals


def measure(cluster: Cluster, task: str, messages: int) -> float:
    """Messages per second: publish ``messages`` events, wait for their rows."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}-"
    events = [{"id": f"{prefix}{number}"} for number in range(messages)]
    # The rows after the last one so far: one variant runs at a time. Counted
    # on the primary key's index, every 10 ms: the check costs the same
    # however large the table has grown (a scan of it would not).
    last = cluster.database.value("SELECT coalesce(max(id), 0) FROM testapp_order")
    started = time.perf_counter()
    cluster.publish_many(task, events)
    cluster.wait_until(
        lambda: (
            cluster.database.value("SELECT count(*) FROM testapp_order WHERE id > %s", [last])
            == messages
        ),
        f"{messages} messages of {task}",
    )
    return messages / (time.perf_counter() - started)


def run_broker(
    kind: str, url: str, database_url: str, connections: str, args: argparse.Namespace
) -> tuple[list[str], list[str]]:
    """The rows of the rates table and, with ``--cpu``, of the CPU table."""
    broker = Broker(kind, url)
    with tempfile.TemporaryDirectory() as gates:
        database = harness.Database(database_url)
        cluster = Cluster(
            broker,
            database_url,
            database,
            Path(gates),
            extra_environ=CONNECTIONS[connections],
        )
        try:
            cluster.start(1, concurrency=args.concurrency)
            for task in VARIANTS.values():  # warm up: connections, imports
                measure(cluster, task, min(50, args.messages))
            rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
            cpu: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
            for round_number in range(args.rounds):
                order = list(VARIANTS.items())
                shift = round_number % len(order)
                order = order[shift:] + order[:shift]
                for name, task in order:
                    before = cpu_seconds() if args.cpu else {}
                    rates[name].append(measure(cluster, task, args.messages))
                    if args.cpu:
                        after = cpu_seconds()
                        cpu[name].append(
                            {
                                group: (after[group] - before.get(group, 0.0))
                                / args.messages
                                * 1000
                                for group in after
                            }
                        )
        finally:
            cluster.stop()
            broker.remove()
            database.close()
    plain = statistics.median(rates["unprotected"])
    in_transaction = statistics.median(rates["unprotected, in a transaction"])
    lines = []
    for name in VARIANTS:
        rate = statistics.median(rates[name])
        lines.append(
            f"| {kind} | {connections} | {name} | {rate:,.0f} | **{rate / plain:.2f}** |"
            f" {rate / in_transaction:.2f} | {', '.join(f'{r:,.0f}' for r in rates[name])} |"
        )
    return lines, cpu_lines(kind, connections, cpu) if args.cpu else []


CPU_COLUMNS = [name for _, name in CPU_GROUPS] + ["this benchmark", "other"]


def cpu_lines(kind: str, connections: str, cpu: dict[str, list[dict[str, float]]]) -> list[str]:
    """Median CPU ms per message of each process group, per variant."""
    lines = []
    for name, rounds in cpu.items():
        medians = {
            group: statistics.median(round_.get(group, 0.0) for round_ in rounds)
            for group in CPU_COLUMNS
        }
        cells = " | ".join(f"{medians[group]:.2f}" for group in CPU_COLUMNS)
        total = sum(medians.values())
        lines.append(f"| {kind} | {connections} | {name} | {cells} | {total:.2f} |")
    return lines


def forget_redis_records() -> int:
    """Delete the lease-mode variant's records from the Redis store's database.

    They would otherwise stay for the retention (a day) in the database the
    test suite's Redis store uses too (``REDIS_URL``, tests/settings.py).
    """
    import redis

    # The store's record names begin with the digest of the scope (erase() looks for them so).
    from django_idempotency.stores.cache import _scope_digest

    scope = _scope_digest("task:" + VARIANTS["idempotent, lease mode, Redis store"])
    client = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15"))
    names = list(client.scan_iter(match=f"*django_idempotency:{scope}:*"))
    for start in range(0, len(names), 1000):
        client.delete(*names[start : start + 1000])
    return len(names)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    urls = {"rabbitmq": args.rabbitmq_url, "redis": args.redis_url}
    kinds = args.broker or list(urls)
    regimes = list(CONNECTIONS) if args.connections == "both" else [args.connections]
    lines = [
        f"{args.messages} messages per variant and round, {args.rounds} rounds, one worker "
        f"(prefork, {args.concurrency} processes), PostgreSQL; connections: "
        + "; ".join(f"{regime}, {CONNECTIONS_TITLE[regime]}" for regime in regimes),
        "",
        "| broker | connections | task | msg/s | ratio to unprotected |"
        " ratio to unprotected in a transaction | each round |",
        "|---|---|---|--:|--:|--:|---|",
    ]
    cpu_rows: list[str] = []
    with harness.scratch_database(args.database_url) as database_url:
        migrate(database_url)
        for kind in kinds:
            reason = broker_unavailable(urls[kind])
            if reason is not None:
                print(f"skipping {kind}: {reason}", file=sys.stderr)
                continue
            try:
                for regime in regimes:
                    rates, cpu = run_broker(kind, urls[kind], database_url, regime, args)
                    lines += rates
                    cpu_rows += cpu
            finally:
                forget_redis_records()
    if cpu_rows:
        lines += [
            "",
            "CPU ms per message, medians of the rounds (the worker: its main process and pool)",
            "",
            "| broker | connections | task | " + " | ".join(CPU_COLUMNS) + " | all |",
            "|---|---|---|" + "--:|" * (len(CPU_COLUMNS) + 1),
            *cpu_rows,
        ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
