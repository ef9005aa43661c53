"""Where a protected request's time goes: a pyinstrument profile, in process.

    python benchmarks/profile.py --database-url postgres://postgres@127.0.0.1:5432/profile_bench

Runs many requests of one kind through ``django.test.Client`` (no HTTP, no
server) under pyinstrument and prints the top of the profile: functions by
their own time (``--flat``, the default) or the call tree (``--tree``).
Kinds: ``replay`` (a ``@idempotent`` view in atomic mode, the stored key sent
again), ``drf-replay`` (the same with a DRF viewset and IdempotencyMixin),
``first`` (a fresh key each time). The database is created and dropped (its
name must contain "bench"). Needs pyinstrument (the ``bench`` group).
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PATHS = {"replay": "/atomic/", "drf-replay": "/drf-atomic/", "first": "/atomic/"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--kind", choices=sorted(PATHS), default="replay")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--top", type=int, default=30, help="lines of the profile to print")
    parser.add_argument("--tree", action="store_true", help="the call tree, not a flat list")
    args = parser.parse_args(argv)
    if "bench" not in args.database_url.rsplit("/", 1)[-1]:
        parser.error("the database name must contain 'bench' (it is dropped)")
    sys.path.insert(0, str(ROOT))
    from benchmarks import run

    run.setup(
        argparse.Namespace(
            database_url=args.database_url, redis_url="", prepare_threshold=None, view_queries=0
        )
    )
    from django.db import connection

    name = connection.settings_dict["NAME"]
    connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
    try:
        print(profile(args.kind, args.requests, args.top, flat=not args.tree))
    finally:
        connection.creation.destroy_test_db(name, verbosity=0)
    return 0


def profile(kind: str, requests: int, top: int, *, flat: bool) -> str:
    from django.test import Client
    from pyinstrument import Profiler
    from pyinstrument.renderers import ConsoleRenderer

    client = Client()
    path = PATHS[kind]

    def post(key: str) -> None:
        response = client.post(
            path,
            b'{"item": "book"}',
            content_type="application/json",
            headers={"Idempotency-Key": key},
        )
        assert response.status_code == 201, response.status_code

    replayed = f"profile-{kind}"
    for _ in range(50):  # warm: connection, caches, the key stored
        post(replayed if kind != "first" else uuid.uuid4().hex)
    keys = [replayed if kind != "first" else uuid.uuid4().hex for _ in range(requests)]
    profiler = Profiler(interval=0.0005)
    profiler.start()
    for key in keys:
        post(key)
    profiler.stop()
    renderer = ConsoleRenderer(unicode=True, flat=flat, time="percent_of_total", short_mode=True)
    lines = profiler.output(renderer).splitlines()
    session = profiler.last_session
    assert session is not None
    return "\n".join([*_by_package(session.root_frame(), requests), "", *lines[: top + 8]])


#: Where a frame's own time is counted, by the first of these in its file's path.
PACKAGES = (
    ("django_idempotency/", "django_idempotency"),
    ("rest_framework/", "DRF"),
    ("psycopg", "database driver (psycopg, MySQLdb, sqlite3) and waiting on the server"),
    ("MySQLdb", "database driver (psycopg, MySQLdb, sqlite3) and waiting on the server"),
    ("sqlite3", "database driver (psycopg, MySQLdb, sqlite3) and waiting on the server"),
    ("django/db/", "Django's database layer (cursors, transactions)"),
    ("django/", "Django (handler, middleware, test client, request, response)"),
)


def _by_package(root: Any, requests: int) -> list[str]:
    """Each package's own time per request, in microseconds, from the profile's tree."""
    totals: dict[str, float] = {}

    def visit(frame: Any, inherited: str) -> None:
        path = frame.file_path or ""
        category = next((name for part, name in PACKAGES if part in path), None)
        if category is None:
            category = inherited if not path or "<" in path else "other (the standard library, …)"
        own = frame.time - sum(child.time for child in frame.children)
        totals[category] = totals.get(category, 0.0) + own
        for child in frame.children:
            visit(child, category)

    visit(root, "other (the standard library, …)")
    lines = ["| own time of | µs per request |", "|---|--:|"]
    for category, seconds in sorted(totals.items(), key=lambda item: -item[1]):
        lines.append(f"| {category} | {seconds / requests * 1e6:.0f} |")
    lines.append(f"| all | {sum(totals.values()) / requests * 1e6:.0f} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
