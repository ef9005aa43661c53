"""Benchmark django-idempotency against a plain view, in one run on one database.

    python benchmarks/run.py --database-url postgres://postgres@127.0.0.1:5432/bench
    python benchmarks/run.py --database-url sqlite:////tmp/bench.sqlite3 --quick

The database named in the URL is created for the run and dropped at its end
(its name must contain "bench", so a real database is never clobbered). With
``--redis-url`` the lease mode is measured on the Redis store too. The results
are printed as Markdown (and written to ``--output``); docs/benchmarks.md
explains them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKERS = 2 * (os.cpu_count() or 1) + 1  # gunicorn's rule of thumb


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", required=True, help="database to create, use, drop")
    parser.add_argument("--redis-url", default="", help="also measure the Redis store")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="gunicorn workers")
    parser.add_argument("--quick", action="store_true", help="smoke run: small and fast")
    parser.add_argument("--output", type=Path, help="also write the Markdown here")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--chart", type=Path, help="draw the results into this PNG (matplotlib)")
    parser.add_argument(
        "--baseline", type=Path, help="the --json of an earlier run: the chart's 'before'"
    )
    parser.add_argument(
        "--latency-only",
        action="store_true",
        help="skip the stored-keys and purge phases (a million rows each)",
    )
    parser.add_argument(
        "--view-queries",
        type=int,
        default=0,
        help="the view also runs N primary-key reads: a view doing more work",
    )
    parser.add_argument(
        "--prepare-threshold",
        type=int,
        default=None,
        help="PostgreSQL/psycopg 3: prepare statements after N executions (Django's OPTIONS)",
    )
    args = parser.parse_args(argv)
    name = Path(urlsplit(args.database_url).path).name
    if "bench" not in name:
        parser.error(f"the database name must contain 'bench' (it is dropped): {name!r}")
    return args


def setup(args: argparse.Namespace) -> None:
    os.environ["BENCH_DATABASE_URL"] = args.database_url
    os.environ["BENCH_REDIS_URL"] = args.redis_url
    os.environ["BENCH_PREPARE_THRESHOLD"] = _threshold(args)
    os.environ["BENCH_VIEW_QUERIES"] = str(args.view_queries)
    os.environ["DJANGO_SETTINGS_MODULE"] = "benchmarks.settings"
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup(args)
    from django.conf import settings
    from django.db import connection
    from django.test import Client

    from benchmarks import phases, report

    budget = phases.QUICK if args.quick else phases.FULL
    with_redis = "redis" in settings.IDEMPOTENCY_STORES
    name = connection.settings_dict["NAME"]
    load_at_start = report.load_average()
    connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
    try:
        _clear_redis(with_redis)
        client = Client()
        variants = phases.variants(with_redis)
        results = phases.Results()
        _step("SQL statements")
        phases.prime_replays(client, variants)
        phases.count_statements(client, variants, results)
        _step("in-process latency")
        results.in_process = phases.in_process(client, variants, budget)
        _step("HTTP latency (gunicorn)")
        environ = {
            "BENCH_DATABASE_URL": args.database_url,
            "BENCH_REDIS_URL": args.redis_url,
            "BENCH_PREPARE_THRESHOLD": _threshold(args),
            "BENCH_VIEW_QUERIES": str(args.view_queries),
        }
        results.http = phases.over_http(variants, budget, args.workers, environ)
        if not args.latency_only:
            _step(f"stored keys: {budget.scale_sizes[0]:,} and {budget.scale_sizes[1]:,}")
            results.scaling = phases.scaling(client, budget)
            _step(f"purge of {budget.purge_keys:,} expired keys")
            phases.purge(budget, results)
        title = f"{connection.display_name}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        figures = report.to_json(results, title=title, vendor=connection.vendor)
        markdown = report.render(
            results,
            title=title,
            workers=args.workers,
            quick=args.quick,
            load_at_start=load_at_start,
        )
    finally:
        _clear_redis(with_redis)
        if not args.keep:
            connection.creation.destroy_test_db(name, verbosity=0)
    _step("done")
    print(markdown)
    if args.output:
        args.output.write_text(markdown)
    if args.json:
        report.write_json(args.json, figures)
    if args.chart:
        from benchmarks import charts

        before = json.loads(args.baseline.read_text()) if args.baseline else None
        charts.draw(figures, before, args.chart)
    return 0


_STARTED = time.monotonic()


def _threshold(args: argparse.Namespace) -> str:
    return "" if args.prepare_threshold is None else str(args.prepare_threshold)


def _step(text: str) -> None:
    print(f"-- {time.monotonic() - _STARTED:5.0f} s  {text}", file=sys.stderr, flush=True)


def _clear_redis(with_redis: bool) -> None:
    if with_redis:
        from django.core.cache import caches

        caches["idempotency"].delete_pattern("*")  # only this run's key prefix


if __name__ == "__main__":
    sys.exit(main())
