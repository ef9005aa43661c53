"""The measurements of one run, each interleaving the variants it compares.

Interleaving (round after round of every variant) spreads any drift of a
shared machine over all variants alike, so that the ratios stay meaningful.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from django.db import DEFAULT_DB_ALIAS, connections
from django.test import Client

from benchmarks import dataset
from benchmarks.clients import (
    Sample,
    Variant,
    fixed_key,
    fresh_key,
    no_key,
    run_http,
    run_in_process,
    stored_key,
)
from benchmarks.server import gunicorn
from benchmarks.statements import DatabaseClock, Statements, capture
from benchmarks.wire import round_trips

PLAIN = Variant("plain view", "/plain/", no_key)
PLAIN_IN_TRANSACTION = Variant("plain view in transaction.atomic", "/plain-in-transaction/", no_key)
ATOMIC_FIRST = Variant("atomic (database), first execution", "/atomic/", fresh_key)
#: The least a replay can cost (benchmarks.views.replay_floor): the replay
#: targets' floor, measured in the same rounds. Not a "replay": no target of its own.
REPLAY_FLOOR = Variant(
    "floor of a replay: the answer without reading it",
    "/replay-floor/",
    fixed_key("replay-floor"),
    replays=True,
)

#: The floor of a replay that reads its outcome, one read and nothing else
#: (benchmarks.views): the stored answer of the atomic-mode replays' key from
#: the database, of the Redis replays' key from Redis.
REPLAY_FLOOR_SQL = Variant(
    "floor of a replay: one read of the row (database)",
    "/replay-floor-sql/",
    fixed_key("replay-atomic-"),
    replays=True,
)
REPLAY_FLOOR_REDIS = Variant(
    "floor of a replay: one read of the record (Redis)",
    "/replay-floor-redis/",
    fixed_key("replay-lease-redis-"),
    replays=True,
)


@dataclass(frozen=True)
class Budget:
    """How much a run measures; every phase is bounded by it."""

    rounds: int
    in_process_requests: int  # per variant and round
    http_requests: int  # per variant, round and concurrency...
    http_seconds: float  # ...or this long, whichever ends first
    scale_sizes: tuple[int, int]
    scale_requests: int  # per variant and round
    purge_keys: int


FULL = Budget(
    rounds=5,
    in_process_requests=40,
    http_requests=400,
    http_seconds=1.0,
    scale_sizes=(10_000, 1_000_000),
    scale_requests=40,
    purge_keys=1_000_000,
)
QUICK = Budget(
    rounds=2,
    in_process_requests=10,
    http_requests=40,
    http_seconds=0.5,
    scale_sizes=(1_000, 10_000),
    scale_requests=10,
    purge_keys=10_000,
)


@dataclass
class Results:
    statements: dict[str, Statements] = field(default_factory=dict)
    #: Round trips to the database server per request (``None``: SQLite, in-process).
    round_trips: dict[str, int | None] = field(default_factory=dict)
    in_process: dict[str, Sample] = field(default_factory=dict)
    http: dict[int, dict[str, Sample]] = field(default_factory=dict)
    scaling: dict[int, dict[str, Sample]] = field(default_factory=dict)
    purge: dataset.PurgeResult | None = None
    live_keys: tuple[int, int] = (0, 0)  # before and after the purge


def variants(with_redis: bool) -> list[Variant]:
    """The plain views and each mode's first execution and replay."""
    modes = [("atomic (database)", "/atomic/"), ("lease (database)", "/lease/")]
    if with_redis:
        modes.append(("lease (Redis)", "/lease-redis/"))
    protected = []
    for label, path in modes:
        protected.append(Variant(f"{label}, first execution", path, fresh_key))
        replay_key = fixed_key(f"replay{path.replace('/', '-')}")
        protected.append(Variant(f"{label}, replay", path, replay_key, replays=True))
    floors = [REPLAY_FLOOR, REPLAY_FLOOR_SQL, *([REPLAY_FLOOR_REDIS] if with_redis else [])]
    return [PLAIN, PLAIN_IN_TRANSACTION, *protected, *floors]


def prime_replays(client: Client, variants: list[Variant]) -> None:
    """Execute each replay variant's key once, so that later requests replay it."""
    for variant in variants:
        if variant.replays:
            response = client.post(
                variant.path,
                b'{"item": "book"}',
                content_type="application/json",
                headers=variant.headers(),
            )
            assert response.status_code == 201, (variant.label, response.status_code)


def count_statements(client: Client, variants: list[Variant], results: Results) -> None:
    """One request of each variant, after warming up: its statements and round trips."""
    connection = connections[DEFAULT_DB_ALIAS]
    with round_trips(connection) as trips:
        for variant in variants:
            run_in_process(client, variant, 3)  # warm: connection, caches, prepared state
            if trips is not None:
                trips.reset()
            with capture(connection) as captured:
                sample = run_in_process(client, variant, 1)
            assert sample.unexpected == 0, (variant.label, sample.statuses)
            results.statements[variant.label] = captured[0]
            results.round_trips[variant.label] = None if trips is None else trips.reset()


def in_process(client: Client, variants: list[Variant], budget: Budget) -> dict[str, Sample]:
    samples = {variant.label: Sample() for variant in variants}
    for variant in variants:
        run_in_process(client, variant, max(5, budget.in_process_requests // 5))
    with DatabaseClock(connections[DEFAULT_DB_ALIAS]).installed() as clock:
        for _ in range(budget.rounds):
            for variant in variants:
                sample = run_in_process(client, variant, budget.in_process_requests, clock)
                samples[variant.label].merge(sample)
    return samples


def over_http(
    variants: list[Variant], budget: Budget, workers: int, environ: dict[str, str]
) -> dict[int, dict[str, Sample]]:
    results: dict[int, dict[str, Sample]] = {}
    with gunicorn(workers, environ) as port:
        for variant in variants:  # every worker connects and loads its code
            run_http(port, variant, concurrency=8, requests=workers * 4, seconds=30)
        for concurrency in (1, 8):
            samples = {variant.label: Sample() for variant in variants}
            for _ in range(budget.rounds):
                for variant in variants:
                    samples[variant.label].merge(
                        run_http(
                            port,
                            variant,
                            concurrency=concurrency,
                            requests=budget.http_requests,
                            seconds=budget.http_seconds,
                        )
                    )
            results[concurrency] = samples
    return results


def scaling(client: Client, budget: Budget) -> dict[int, dict[str, Sample]]:
    """First executions and replays with few and with many stored keys."""
    dataset.empty_tables()
    results: dict[int, dict[str, Sample]] = {}
    stored = 0
    for size in budget.scale_sizes:
        dataset.insert_keys(ATOMIC_FIRST.path, "stored-", stored, size, expired=False)
        stored = size
        replay = Variant(
            "atomic (database), replay of a random stored key",
            ATOMIC_FIRST.path,
            stored_key("stored-", size),
            replays=True,
        )
        per_size = replace(budget, in_process_requests=budget.scale_requests)
        results[size] = in_process(client, [PLAIN, ATOMIC_FIRST, replay], per_size)
    return results


def purge(budget: Budget, results: Results) -> None:
    """Time the purge of ``purge_keys`` expired keys beside the live ones."""
    dataset.insert_keys(ATOMIC_FIRST.path, "expired-", 0, budget.purge_keys, expired=True)
    live_before = dataset.count_keys(expired=False)
    results.purge = dataset.purge_expired()
    results.live_keys = (live_before, dataset.count_keys(expired=False))
