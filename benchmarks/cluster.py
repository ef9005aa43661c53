"""The Redis store's replay on a Redis Cluster against the same on one Redis server.

    python benchmarks/cluster.py --redis-url redis://127.0.0.1:6379/15

Starts a Redis Cluster of its own (3 masters, 3 replicas, as the tests do:
tests/servers.py), stores ``--keys`` completed keys in both the single
server (``--redis-url``) and the cluster, then replays them: rounds
alternate between the two so both see the same machine load. A replay is
one store claim that finds the completed record (``SET NX`` fails, the
script returns the snapshot): two round trips on both. Prints the
median and 99th percentile per replay; docs/benchmarks.md quotes a run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", required=True, help="the single Redis server")
    parser.add_argument("--keys", type=int, default=200, help="completed keys replayed")
    parser.add_argument("--rounds", type=int, default=20, help="alternating rounds")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import django

    django.setup()
    from django.test import override_settings

    from django_idempotency.protocol import Call, Execute, Policy, Replay, Snapshot
    from django_idempotency.stores.cache import CacheStore
    from tests.servers import redis_cluster

    factory = "django_idempotency.stores.redis_cluster.ClusterConnectionFactory"
    snapshot = Snapshot(201, (("Content-Type", "application/json"),), os.urandom(1024))
    calls = [Call("bench", f"replay-{n}", "f" * 64, "POST", "/bench/") for n in range(args.keys)]
    with redis_cluster() as cluster:
        caches = {
            "single": {
                "BACKEND": "django_redis.cache.RedisCache",
                "LOCATION": args.redis_url,
                "KEY_PREFIX": "bench-cluster",
            },
            "cluster": {
                "BACKEND": "django_redis.cache.RedisCache",
                "LOCATION": cluster.url,
                "KEY_PREFIX": "bench-cluster",
                "OPTIONS": {"CONNECTION_FACTORY": factory},
            },
        }
        with override_settings(CACHES=caches):
            stores = {name: CacheStore(name, CACHE=name) for name in caches}
            policy = Policy(mode="lease", lease=30, retention=600, store="single")
            for store in stores.values():
                for call in calls:
                    claim = store.claim(call, policy)
                    if isinstance(claim, Execute):
                        store.complete(claim, snapshot, policy)
            timings: dict[str, list[float]] = {name: [] for name in stores}
            for _ in range(args.rounds):
                for name, store in stores.items():
                    for call in calls:
                        started = time.perf_counter()
                        replay = store.claim(call, policy)
                        timings[name].append(time.perf_counter() - started)
                        assert isinstance(replay, Replay)
                        assert replay.snapshot == snapshot
            for store in stores.values():
                for call in calls:
                    from django_redis import get_redis_connection

                    get_redis_connection(store.cache).delete(
                        store.record_name(call.scope, call.key)
                    )
    medians = {name: statistics.median(values) * 1000 for name, values in timings.items()}
    print(f"{args.keys} keys x {args.rounds} rounds, 1 KiB body, replays alternating per round")
    print("| store | median | p99 |")
    print("|---|---|---|")
    for name, values in timings.items():
        p99 = statistics.quantiles(values, n=100)[98] * 1000
        print(f"| Redis {name} | {medians[name]:.3f} ms | {p99:.3f} ms |")
    print(f"cluster / single (median): {medians['cluster'] / medians['single']:.2f}")


if __name__ == "__main__":
    main()
