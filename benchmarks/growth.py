"""The key table's growth on PostgreSQL: bytes per row, and the purge's speed.

    python benchmarks/growth.py --database-url postgres://postgres@127.0.0.1:5432/scale_growth

Creates the database named in the URL (its name must contain "growth"),
migrates it, inserts ``--rows`` completed keys with a realistic snapshot
(``--body-bytes`` of incompressible body, two headers, a UUID key, a user
scope), measures the table's size with its indexes and TOAST
(``pg_total_relation_size``) after ``VACUUM ANALYZE``, then lets every row
expire and times ``manage.py purge_idempotency_keys`` deleting them. Prints
the figures and their extrapolation to 100, 1,000 and 10,000 new keys per
second (one key per request, kept for the default retention of 24 hours);
drops the database at the end. docs/operations-at-scale.md quotes a run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import psycopg

ROOT = Path(__file__).resolve().parent.parent
TABLE = "django_idempotency_idempotencykey"
RATES = (100, 1_000, 10_000)
DAY = 86_400


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", required=True, help="database to create, use, drop")
    parser.add_argument("--rows", type=int, default=200_000, help="keys to insert")
    parser.add_argument("--body-bytes", type=int, default=1024, help="snapshot body size")
    return parser.parse_args(argv)


def admin(url: str, statement: str) -> None:
    parts = urlsplit(url)
    with psycopg.connect(
        host=parts.hostname,
        port=parts.port or 5432,
        user=parts.username or "postgres",
        password=parts.password,
        dbname="postgres",
        autocommit=True,
    ) as connection:
        connection.execute(statement)  # type: ignore[arg-type]


def manage(url: str, *arguments: str) -> float:
    """Run ``manage.py`` on the database; return its wall time in seconds."""
    environ = {**os.environ, "DATABASE_URL": url}
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "manage.py", *arguments, "--settings", "tests.settings"],
        cwd=ROOT,
        env=environ,
        check=True,
        capture_output=True,
        text=True,
    )
    return time.monotonic() - started


def insert_rows(connection: psycopg.Connection, rows: int, body_bytes: int) -> None:
    # One md5 is 16 bytes; the body is made of distinct ones, so nothing compresses.
    chunks = max(1, body_bytes // 16)
    connection.execute(
        f"""
        INSERT INTO {TABLE} (scope, key, fingerprint, method, path, state, token,
            locked_until, attempts, response_status, response_headers, response_body,
            created, completed, expires)
        SELECT 'user:' || (100000 + n % 50000), gen_random_uuid()::text,
            encode(sha256(n::text::bytea), 'hex'), 'POST', '/api/orders/', 'completed',
            md5(n::text), NULL, 1, 201,
            jsonb_build_array(jsonb_build_array('Content-Type', 'application/json'),
                              jsonb_build_array('Location', '/api/orders/' || n || '/')),
            (SELECT string_agg(decode(md5(n::text || ':' || i), 'hex'), ''::bytea)
               FROM generate_series(1, {chunks}) AS i),
            now(), now(), now() + interval '24 hours'
        FROM generate_series(1, {rows}) AS n
        """  # type: ignore[arg-type]
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    name = urlsplit(args.database_url).path.lstrip("/")
    if "growth" not in name:
        raise SystemExit(f"the database name must contain 'growth' (it is dropped): {name!r}")
    admin(args.database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin(args.database_url, f'CREATE DATABASE "{name}"')
    try:
        manage(args.database_url, "migrate", "--no-input", "-v0")
        parts = urlsplit(args.database_url)
        with psycopg.connect(
            host=parts.hostname,
            port=parts.port or 5432,
            user=parts.username or "postgres",
            password=parts.password,
            dbname=name,
            autocommit=True,
        ) as connection:
            started = time.monotonic()
            insert_rows(connection, args.rows, args.body_bytes)
            inserted = time.monotonic() - started
            connection.execute(f"VACUUM ANALYZE {TABLE}")  # type: ignore[arg-type]
            sizes = connection.execute(
                f"SELECT pg_total_relation_size('{TABLE}'), pg_relation_size('{TABLE}'),"  # type: ignore[arg-type]
                f" pg_indexes_size('{TABLE}'), avg(octet_length(response_body)) FROM {TABLE}"
            ).fetchone()
            assert sizes is not None
            total, heap, indexes, body = sizes
            connection.execute(f"UPDATE {TABLE} SET expires = now() - interval '1 hour'")  # type: ignore[arg-type]
            connection.execute(f"VACUUM ANALYZE {TABLE}")  # type: ignore[arg-type]
        purge_seconds = manage(args.database_url, "purge_idempotency_keys")
    finally:
        admin(args.database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    per_row = total / args.rows
    rate = args.rows / purge_seconds
    print(f"rows: {args.rows:,}, body {float(body):.0f} bytes, inserted in {inserted:.1f} s")
    print(
        f"size: {total / 2**20:.1f} MiB in all ({heap / 2**20:.1f} MiB table, "
        f"{indexes / 2**20:.1f} MiB indexes): {per_row:.0f} bytes per row"
    )
    print(f"purge: {args.rows:,} rows in {purge_seconds:.1f} s ({rate:,.0f} rows/s)")
    print("| new keys per second | rows per day | size on disk | purge of a day's rows |")
    print("|---|---|---|---|")
    for per_second in RATES:
        rows = per_second * DAY
        print(
            f"| {per_second:,} | {rows / 1e6:,.2f} M | {rows * per_row / 2**30:,.1f} GiB "
            f"| {rows / rate / 60:,.0f} min |"
        )


if __name__ == "__main__":
    main()
