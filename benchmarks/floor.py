"""What the database store's statements cost at best, with raw psycopg on PostgreSQL.

    python benchmarks/floor.py --database-url postgres://postgres@127.0.0.1:5432/floor_bench

No Django request, no HTTP: the store's own claim and completion statements
(the SQL the store builds) and an order ``INSERT`` for the view, sent on one
psycopg connection in the ways the store could send them, interleaved round
after round. For each: the median and 99th percentile in microseconds and the
round trips (waits for the server, counted as ``benchmarks/wire.py`` does),
the client's CPU time per request (this thread's: the relay counting round
trips runs in another) and the server's (its backend process' user and
system time from /proc, in clock ticks summed over every round: where the
server is not on this machine, 0).
It shows which lever pays and the floor no code above the driver can beat.
The database is created and dropped (its name must contain "bench").
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

Step = Callable[[], None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=100, help="per variant and round")
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

    if connection.vendor != "postgresql":
        parser.error("PostgreSQL only: the levers measured are psycopg 3's")
    name = connection.settings_dict["NAME"]
    connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
    try:
        print(measure(args.rounds, args.requests))
    finally:
        connection.creation.destroy_test_db(name, verbosity=0)
    return 0


def measure(rounds: int, requests: int) -> str:
    from django.db import connection

    from benchmarks.wire import round_trips

    with round_trips(connection) as counter:
        assert counter is not None
        connection.ensure_connection()
        variants = Variants(connection.connection)
        timings: dict[str, list[float]] = {label: [] for label in variants.all}
        trips: dict[str, set[int]] = {label: set() for label in variants.all}
        cpu: dict[str, list[float]] = {label: [] for label in variants.all}
        server: dict[str, float] = dict.fromkeys(variants.all, 0.0)
        backend = connection.connection.info.backend_pid
        for _ in range(rounds):
            for label, request in variants.all.items():
                server[label] -= backend_cpu(backend)
                for _ in range(requests):
                    counter.reset()
                    before, thread_before = time.perf_counter(), time.thread_time()
                    request()
                    timings[label].append(time.perf_counter() - before)
                    cpu[label].append(time.thread_time() - thread_before)
                    trips[label].add(counter.reset())
                server[label] += backend_cpu(backend)
    lines = [
        "| statements, sent how | round trips | median µs | p99 µs | client CPU µs"
        " | server CPU µs |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for label, values in timings.items():
        p99 = statistics.quantiles(values, n=100, method="inclusive")[98]
        counted = "/".join(str(n) for n in sorted(trips[label]))
        lines.append(
            f"| {label} | {counted} | {statistics.median(values) * 1e6:.0f} | {p99 * 1e6:.0f} |"
            f" {statistics.fmean(cpu[label]) * 1e6:.0f} |"
            f" {server[label] / (rounds * requests) * 1e6:.0f} |"
        )
    return "\n".join(lines)


def backend_cpu(pid: int) -> float:
    """CPU seconds (user + system) of the server process ``pid`` so far, from /proc.

    The server runs on this machine (the benchmark connects to 127.0.0.1);
    where /proc cannot tell (another OS, a server elsewhere), 0.
    """
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    # utime and stime: fields 14 and 15 of /proc/PID/stat, 12 and 13 after the name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Variants:
    """Each variant is one request's worth of statements on connection ``raw``."""

    def __init__(self, raw: Any) -> None:
        from django.db import connection

        from django_idempotency.stores import postgresql, sql

        self.raw = raw
        # As the store does: with Django's default (no threshold) psycopg
        # ignores ``prepare=True``; a threshold no statement reaches lets it
        # prepare what is asked, and only that.
        if raw.prepare_threshold is None:
            raw.prepare_threshold = sql.ONLY_WHEN_ASKED
        statements = sql.statements(connection)
        self.claim_sql = postgresql._build_claim_sql(statements, True)
        self.complete_sql = statements.complete
        self.insert_order = (
            "INSERT INTO benchmarks_order (item, created) VALUES (%s, now()) RETURNING id"
        )
        self.sql = sql
        self.postgresql = postgresql
        self.replay_key = "floor-replay"
        self._claim(self.replay_key, prepare=False)
        self._complete(self.replay_key, prepare=False)
        self.raw.commit()
        self.all: dict[str, Step] = {
            "one round trip (`SELECT 1`), autocommit": self.select_one,
            "the view alone: `INSERT`, autocommit": self.plain_insert,
            "the view alone: BEGIN, `INSERT`, COMMIT": self.insert_in_transaction,
            "BEGIN, claim, INSERT, completion, COMMIT; unprepared (today)": self.sequential,
            "the same, prepared": self.sequential_prepared,
            "prepared; BEGIN + claim, INSERT, completion + COMMIT": self.pipelined,
            "the same, libpq's pipeline without psycopg's": self.pipelined_libpq,
            "prepared; all five in one pipeline (no view could)": self.one_pipeline,
            "lease mode: claim, INSERT, completion, each in autocommit; prepared": self.lease,
            "the same, through libpq's calls": self.lease_libpq,
            "one message each: `BEGIN; claim`, INSERT, `completion; COMMIT`; unprepared": (
                self.messages
            ),
            "the same, SQL-level PREPARE and EXECUTE": self.messages_prepared,
            "replay: BEGIN, claim returning the row, COMMIT; prepared": self.replay_in_transaction,
            "replay: `BEGIN; EXECUTE claim`, COMMIT": self.replay_messages,
            "replay: BEGIN + claim returning the row, COMMIT; prepared": self.replay_pipelined,
            "replay: claim returning the row, autocommit; prepared": self.replay_autocommit,
        }

    # -- the parts -------------------------------------------------------

    def _params(self, key: str) -> list[Any]:
        from django.db import connection
        from django.utils import timezone

        now = timezone.now()
        values = {
            "scope": "floor",
            "key": key,
            "fingerprint": "f" * 64,
            "method": "POST",
            "path": "/orders/",
            "state": "in_progress",
            "token": uuid.uuid4().hex,
            "locked_until": None,
            "attempts": 1,
            "response_headers": [],
            "response_body": b"",
            "created": now,
            "expires": now + timedelta(days=1),
        }
        self.token = values["token"]
        lock = int.from_bytes(uuid.uuid4().bytes[:8], "big", signed=True)
        return [lock, *self.sql.new_row_params(connection, values), "floor", key]

    def _store_cursor(self, prepare: bool) -> Any:
        # As the store's: Django's cursors bind parameters in the client
        # (``ClientCursor``), which never prepares; the store's prepared
        # statements go through a server-binding cursor.
        import psycopg

        return psycopg.Cursor(self.raw) if prepare else self.raw.cursor()

    def _claim(self, key: str, *, prepare: bool) -> Any:
        cursor = self._store_cursor(prepare)
        cursor.execute(self.claim_sql, self._params(key), prepare=prepare)
        return cursor

    def _complete(self, key: str, *, prepare: bool) -> Any:
        cursor = self._store_cursor(prepare)
        cursor.execute(self.complete_sql, self._completion_params(key), prepare=prepare)
        return cursor

    def _order(self, *, prepare: bool | None = None) -> Any:
        cursor = self.raw.cursor()
        cursor.execute(self.insert_order, ["book"], prepare=prepare)
        return cursor

    def _client_cursor(self) -> Any:
        import psycopg

        return psycopg.ClientCursor(self.raw)

    def _prepare_once(self) -> None:
        if getattr(self, "_prepared", False):
            return
        numbered = self.postgresql._numbered
        self.raw.execute(f"PREPARE floor_claim AS {numbered(self.claim_sql).decode()}")
        self.raw.execute(f"PREPARE floor_complete AS {numbered(self.complete_sql).decode()}")
        self._prepared = True

    def _execute_sql(self, name: str, count: int) -> str:
        return f"EXECUTE {name}({', '.join(['%s'] * count)})"

    # -- the variants ----------------------------------------------------

    def select_one(self) -> None:
        self.raw.execute("SELECT 1").fetchone()

    def plain_insert(self) -> None:
        self._order().fetchone()

    def insert_in_transaction(self) -> None:
        self.raw.autocommit = False
        self._order().fetchone()
        self.raw.commit()
        self.raw.autocommit = True

    def sequential(self, prepare: bool = False) -> None:
        self.raw.autocommit = False  # psycopg sends BEGIN before the first statement
        key = uuid.uuid4().hex
        self._claim(key, prepare=prepare).fetchone()
        self._order().fetchone()
        self._complete(key, prepare=prepare)
        self.raw.commit()
        self.raw.autocommit = True

    def sequential_prepared(self) -> None:
        self.sequential(prepare=True)

    def pipelined(self) -> None:
        # psycopg syncs (and waits) after the BEGIN it sends itself in a
        # pipeline: the store would send its own, in autocommit.
        # Results are read after the pipeline's end, whose Sync is its one wait.
        key = uuid.uuid4().hex
        with self.raw.pipeline():
            self.raw.execute("BEGIN")
            claim = self._claim(key, prepare=True)
        claim.fetchone()
        self._order().fetchone()
        with self.raw.pipeline():
            self._complete(key, prepare=True)
            self.raw.execute("COMMIT")

    def pipelined_libpq(self) -> None:
        # The same messages as pipelined(), sent and read through libpq's own
        # calls, as the store sends them (``postgresql._send``): what psycopg's
        # Python pipeline machinery costs, measured by leaving it out.
        key = uuid.uuid4().hex
        send = self.postgresql._send
        claimed, _ = send(self.raw, self.claim_sql, self._params(key), True, False)
        if not (claimed and claimed[1]):
            raise RuntimeError(f"{key} was not claimed")
        self._order().fetchone()
        _, completed = send(self.raw, self.complete_sql, self._completion_params(key), False, True)
        if completed != 1:
            raise RuntimeError(f"the completion of {key} changed {completed} rows")

    def _completion_params(self, key: str) -> list[Any]:
        from django.db import connection
        from django.utils import timezone

        now = timezone.now()
        return self.sql.completion_params(
            connection,
            status=201,
            headers=[["Content-Type", "application/json"]],
            body=b'{"id": 1, "item": "book"}',
            completed=now,
            expires=now + timedelta(days=1),
            scope="floor",
            key=key,
            token=self.token,
        )

    def lease(self) -> None:
        # Each statement commits on its own: the claim must be visible to
        # every other request before the view runs, the completion after it.
        key = uuid.uuid4().hex
        self._claim(key, prepare=True).fetchone()
        self._order().fetchone()
        self._complete(key, prepare=True)

    def lease_libpq(self) -> None:
        key = uuid.uuid4().hex
        send = self.postgresql._send
        send(self.raw, self.claim_sql, self._params(key), False, False)
        self._order().fetchone()
        send(self.raw, self.complete_sql, self._completion_params(key), False, False)

    def one_pipeline(self) -> None:
        key = uuid.uuid4().hex
        with self.raw.pipeline():
            self.raw.execute("BEGIN")
            self._claim(key, prepare=True)
            self._order()
            self._complete(key, prepare=True)
            self.raw.execute("COMMIT")

    def messages(self, prepared: bool = False) -> None:
        key = uuid.uuid4().hex
        cursor = self._client_cursor()
        params = self._params(key)
        claim = self._execute_sql("floor_claim", len(params)) if prepared else self.claim_sql
        cursor.execute(f"BEGIN; {claim}", params)
        cursor.nextset()
        cursor.fetchone()
        self._order().fetchone()
        params = self._completion_params(key)
        complete = (
            self._execute_sql("floor_complete", len(params)) if prepared else self.complete_sql
        )
        cursor.execute(f"{complete}; COMMIT", params)

    def messages_prepared(self) -> None:
        self._prepare_once()
        self.messages(prepared=True)

    def replay_messages(self) -> None:
        self._prepare_once()
        cursor = self._client_cursor()
        params = self._params(self.replay_key)
        cursor.execute(f"BEGIN; {self._execute_sql('floor_claim', len(params))}", params)
        cursor.nextset()
        cursor.fetchone()
        self.raw.execute("COMMIT")

    def replay_in_transaction(self) -> None:
        self.raw.autocommit = False
        self._claim(self.replay_key, prepare=True).fetchone()
        self.raw.commit()
        self.raw.autocommit = True

    def replay_pipelined(self) -> None:
        with self.raw.pipeline():
            self.raw.execute("BEGIN")
            claim = self._claim(self.replay_key, prepare=True)
        claim.fetchone()
        self.raw.execute("COMMIT")

    def replay_autocommit(self) -> None:
        self._claim(self.replay_key, prepare=True).fetchone()


if __name__ == "__main__":
    sys.exit(main())
