"""Messages per second through one Celery worker: an idempotent task vs the same task unprotected.

    python benchmarks/celery_throughput.py --database-url postgres://postgres@127.0.0.1:5432/bench

One worker (prefork pool of ``--concurrency`` processes) of the broker tests'
app (tests/brokered/app.py) on PostgreSQL, against RabbitMQ and Redis (those
that answer, or ``--broker``). Each task books one order row; the idempotent
one (``@idempotent_task(key=event id)``, atomic mode) also claims and
completes its key in the same transaction; a third variant is the
unprotected task inside ``transaction.atomic()``, the transaction atomic mode
needs, for comparison. Per round, every variant gets
``--messages`` messages with distinct event ids, published at once; a
variant's time runs from its first publish until its last row is in the
database. Variants rotate their order from round to round; the medians
and the ratios are printed as Markdown (docs/benchmarks.md explains them).
A database beside the URL's is created for the run and dropped at its end.
"""

from __future__ import annotations

import argparse
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
    return parser.parse_args(argv)


def measure(cluster: Cluster, task: str, messages: int) -> float:
    """Messages per second: publish ``messages`` events, wait for their rows."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}-"
    events = [{"id": f"{prefix}{number}"} for number in range(messages)]
    started = time.perf_counter()
    cluster.publish_many(task, events)
    cluster.wait_until(
        lambda: (
            cluster.database.value(
                "SELECT count(*) FROM testapp_order WHERE item LIKE %s", [prefix + "%"]
            )
            == messages
        ),
        f"{messages} messages of {task}",
    )
    return messages / (time.perf_counter() - started)


def run_broker(kind: str, url: str, database_url: str, args: argparse.Namespace) -> list[str]:
    broker = Broker(kind, url)
    with tempfile.TemporaryDirectory() as gates:
        database = harness.Database(database_url)
        cluster = Cluster(
            broker,
            database_url,
            database,
            Path(gates),
            # Persistent database connections, as a production worker keeps them.
            extra_environ={"BROKER_TEST_CONN_MAX_AGE": "600"},
        )
        try:
            cluster.start(1, concurrency=args.concurrency)
            for task in VARIANTS.values():  # warm up: connections, imports
                measure(cluster, task, min(50, args.messages))
            rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
            for round_number in range(args.rounds):
                order = list(VARIANTS.items())
                shift = round_number % len(order)
                order = order[shift:] + order[:shift]
                for name, task in order:
                    rates[name].append(measure(cluster, task, args.messages))
        finally:
            cluster.stop()
            broker.remove()
            database.close()
    plain = statistics.median(rates["unprotected"])
    in_transaction = statistics.median(rates["unprotected, in a transaction"])
    protected = statistics.median(rates["idempotent"])
    return [
        f"| {kind} | {plain:,.0f} | {in_transaction:,.0f} | {protected:,.0f} |"
        f" **{protected / plain:.2f}** | {protected / in_transaction:.2f} |"
        f" {', '.join(f'{rate:,.0f}' for rate in rates['idempotent'])} |"
    ]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    urls = {"rabbitmq": args.rabbitmq_url, "redis": args.redis_url}
    kinds = args.broker or list(urls)
    lines = [
        f"{args.messages} messages per variant and round, {args.rounds} rounds, one worker "
        f"(prefork, {args.concurrency} processes), PostgreSQL",
        "",
        "| broker | unprotected msg/s | unprotected in a transaction msg/s | idempotent msg/s |"
        " ratio to unprotected | ratio to in a transaction | idempotent, each round |",
        "|---|--:|--:|--:|--:|--:|---|",
    ]
    with harness.scratch_database(args.database_url) as database_url:
        migrate(database_url)
        for kind in kinds:
            reason = broker_unavailable(urls[kind])
            if reason is not None:
                print(f"skipping {kind}: {reason}", file=sys.stderr)
                continue
            lines += run_broker(kind, urls[kind], database_url, args)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
