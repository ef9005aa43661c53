"""The Redis store on a real Redis Cluster (3 masters, 3 replicas), started by the tests.

The cache named ``redis`` points at the cluster through
:class:`~django_idempotency.stores.redis_cluster.ClusterConnectionFactory`,
and a focused part of the store's contract (``test_cache_store.py``,
``test_lease.py``) runs again on it, imported from there. Then what is
particular to a cluster: records spread over the masters, and a master killed
with SIGKILL: its slots refuse claims (503, or run unprotected where the store
fails open) until its replica has taken over, the others go on, and a claim
made before the kill is still there after it.

Multi-process races on the cluster are in ``test_scale_multiprocess.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.cache import caches
from django.test import Client
from django_redis import get_redis_connection
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from django_idempotency.exceptions import RequestInProgress, StoreUnavailable
from django_idempotency.protocol import Call, Execute, Policy, Snapshot
from django_idempotency.stores import get_store
from django_idempotency.stores.cache import CacheStore
from tests.lease_stores import REDIS, STORES, clear_redis_records, replayed
from tests.servers import RedisCluster as Cluster
from tests.servers import RedisNode, wait_until
from tests.test_cache_store import (
    test_a_claim_is_one_redis_key_with_a_json_record,
    test_a_completed_record_keeps_the_snapshot_for_the_retention,
    test_a_key_past_its_retention_is_new,
    test_a_key_reused_for_a_different_body_is_422,
    test_a_lease_longer_than_the_retention_keeps_the_claim_alive,
    test_a_new_key_runs_once_and_its_response_is_replayed,
    test_a_record_gone_from_redis_is_claimed_anew,
    test_keys_of_different_scopes_do_not_meet,
)
from tests.test_lease import (
    frozen,  # noqa: F401
    hooks,  # noqa: F401
    lease_length,  # noqa: F401
    takeovers,  # noqa: F401
    test_a_waiting_duplicate_polls_then_replays,
    test_an_expired_lease_is_taken_over_counted_logged_and_signalled,
    test_an_unheld_burst_of_duplicates_executes_once,
    test_duplicate_during_a_live_lease_gets_409_with_the_seconds_left,
    test_of_concurrent_takeovers_exactly_one_wins,
    test_the_slow_first_worker_can_neither_complete_nor_release_the_new_claim,
)

pytestmark = pytest.mark.redis_cluster

FACTORY = "django_idempotency.stores.redis_cluster.ClusterConnectionFactory"
BACKEND = "django_idempotency.stores.cache.CacheStore"
POLICY = Policy(mode="lease", lease=30, retention=3600, store=REDIS)

__all__ = [
    "test_a_claim_is_one_redis_key_with_a_json_record",
    "test_a_completed_record_keeps_the_snapshot_for_the_retention",
    "test_a_key_past_its_retention_is_new",
    "test_a_key_reused_for_a_different_body_is_422",
    "test_a_lease_longer_than_the_retention_keeps_the_claim_alive",
    "test_a_new_key_runs_once_and_its_response_is_replayed",
    "test_a_record_gone_from_redis_is_claimed_anew",
    "test_a_waiting_duplicate_polls_then_replays",
    "test_an_expired_lease_is_taken_over_counted_logged_and_signalled",
    "test_an_unheld_burst_of_duplicates_executes_once",
    "test_duplicate_during_a_live_lease_gets_409_with_the_seconds_left",
    "test_keys_of_different_scopes_do_not_meet",
    "test_of_concurrent_takeovers_exactly_one_wins",
    "test_the_slow_first_worker_can_neither_complete_nor_release_the_new_claim",
]


def cluster_cache(cluster: Cluster, **client_kwargs: Any) -> dict[str, Any]:
    """A django-redis cache on ``cluster``, every node a startup node."""
    startup = [ClusterNode("127.0.0.1", node.port) for node in cluster.nodes]
    return {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": cluster.url,
        "OPTIONS": {
            "CONNECTION_FACTORY": FACTORY,
            "SOCKET_CONNECT_TIMEOUT": 1,
            "SOCKET_TIMEOUT": 1,
            "REDIS_CLIENT_KWARGS": {"startup_nodes": startup, **client_kwargs},
        },
    }


@pytest.fixture(autouse=True)
def on_the_cluster(settings: Any, redis_cluster_server: Cluster) -> Iterator[None]:
    """The ``redis`` cache (and so the ``redis`` store) on the cluster, emptied around the test."""
    settings.CACHES = {**settings.CACHES, "redis": cluster_cache(redis_cluster_server)}
    clear_redis_records()
    yield
    clear_redis_records()


@pytest.fixture(name="lease_store")
def lease_store_fixture(settings: Any) -> str:
    """The Redis store only (the database store's runs are elsewhere), in lease mode."""
    settings.IDEMPOTENCY_STORES = STORES
    settings.IDEMPOTENCY_STORE = REDIS
    settings.IDEMPOTENCY_MODE = "lease"
    return REDIS


@pytest.fixture(name="redis_store")
def redis_store_fixture(lease_store: str) -> CacheStore:
    store = get_store(lease_store)
    assert isinstance(store, CacheStore)
    return store


@pytest.fixture(name="redis_records")
def redis_records_fixture() -> None:
    """Emptied by :func:`on_the_cluster` already."""


def test_the_cache_talks_to_the_cluster(
    redis_store: CacheStore, redis_cluster_server: Cluster
) -> None:
    client = get_redis_connection("redis")

    assert isinstance(client, RedisCluster)
    flags = [str(node["flags"]) for node in client.cluster_nodes().values()]
    assert sum("master" in flag for flag in flags) == 3
    assert sum("slave" in flag for flag in flags) == 3


def test_caches_with_the_same_location_and_options_share_one_client(
    redis_store: CacheStore, redis_cluster_server: Cluster, settings: Any
) -> None:
    redis_store.claim(Call("tests", "share", "f" * 64), POLICY)  # the client is in use
    settings.CACHES = {**settings.CACHES, "twin": cluster_cache(redis_cluster_server)}

    assert get_redis_connection("twin") is get_redis_connection("redis")


def test_closing_the_cache_disconnects_its_cluster_client(
    redis_cluster_server: Cluster, settings: Any
) -> None:
    closing = cluster_cache(redis_cluster_server, socket_keepalive=True)
    closing["OPTIONS"]["CLOSE_CONNECTION"] = True
    settings.CACHES = {**settings.CACHES, "closing": closing}
    first = get_redis_connection("closing")
    assert first.set("closing-test", "1")

    caches["closing"].close()

    second = get_redis_connection("closing")
    assert second is not first
    assert second.get("closing-test") == b"1"
    assert second.delete("closing-test") == 1


def test_records_are_spread_over_every_master(
    redis_store: CacheStore, redis_cluster_server: Cluster
) -> None:
    calls = [Call("tests", f"spread-{n}", "f" * 64) for n in range(30)]
    for call in calls:
        redis_store.claim(call, POLICY)

    holders = {
        redis_cluster_server.master_of(redis_store.record_name(call.scope, call.key)).port
        for call in calls
    }
    assert holders == {node.port for node in redis_cluster_server.masters()}
    for call in calls:
        with pytest.raises(RequestInProgress):
            redis_store.claim(call, POLICY)


# A master killed ------------------------------------------------------------


def call_on(
    cluster: Cluster, store: CacheStore, master: RedisNode, label: str, scope: str = "tests"
) -> Call:
    """A call whose record lives on ``master`` (or, with ``master`` dead, would)."""
    for n in range(10_000):
        call = Call(scope, f"{label}-{n}", "f" * 64, method="POST", path="/x/")
        if cluster.master_of(store.record_name(call.scope, call.key)).port == master.port:
            return call
    raise AssertionError(f"no key found on master {master.port}")


@pytest.fixture
def no_retries(settings: Any, redis_cluster_server: Cluster) -> dict[str, Any]:
    """Stores whose client does not retry: a refusal shows at once, fail closed and open."""
    kwargs = {"retry": Retry(NoBackoff(), 0)}
    settings.CACHES = {
        **settings.CACHES,
        "redis": cluster_cache(redis_cluster_server, **kwargs),
    }
    stores = {
        **STORES,
        "open": {"BACKEND": BACKEND, "OPTIONS": {"CACHE": "redis", "FAIL_OPEN": True}},
    }
    settings.IDEMPOTENCY_STORES = stores
    settings.IDEMPOTENCY_MODE = "lease"
    return stores


@pytest.fixture
def killed_master(redis_cluster_server: Cluster) -> Iterator[RedisNode]:
    """A master with its replica held back from taking over; restarted afterwards.

    The test lets the replica take over when it chooses to
    (:meth:`~tests.servers.RedisCluster.allow_failover`), so the refusals
    before it are certain, not a race against the failover timer.
    """
    cluster = redis_cluster_server
    master = cluster.masters()[-1]
    replica = cluster.replica_of(master)
    cluster.allow_failover(replica, False)
    yield master
    cluster.allow_failover(replica, True)
    if not master.alive():
        cluster.restart(master)


@pytest.mark.django_db
def test_a_killed_master_refuses_its_slots_until_the_replica_takes_over(
    no_retries: dict[str, Any],
    redis_cluster_server: Cluster,
    killed_master: RedisNode,
    settings: Any,
) -> None:
    cluster = redis_cluster_server
    store = get_store(REDIS)
    assert isinstance(store, CacheStore)
    before = call_on(cluster, store, killed_master, "before")
    claimed = store.claim(before, POLICY)
    assert isinstance(claimed, Execute)
    on_dead = call_on(cluster, store, killed_master, "dead")
    elsewhere = next(
        call_on(cluster, store, node, "alive")
        for node in cluster.masters()
        if node.port != killed_master.port
    )
    # Replication is asynchronous: the test makes sure the claim reached the replica.
    with killed_master.client() as client:
        assert client.execute_command("WAIT", 1, 5000) == 1
    replica = cluster.replica_of(killed_master)

    cluster.kill(killed_master)

    for _ in range(3):
        with pytest.raises(StoreUnavailable):
            store.claim(on_dead, POLICY)
    assert isinstance(store.claim(elsewhere, POLICY), Execute)

    cluster.allow_failover(replica, True)
    after_failover(settings, cluster)
    store = get_store(REDIS)
    assert isinstance(store, CacheStore)

    # The replica serves the slots now, with the claim made before the kill.
    assert cluster.master_of(store.record_name(on_dead.scope, on_dead.key)).port == replica.port
    with pytest.raises(RequestInProgress):
        store.claim(before, POLICY)
    assert store.complete(claimed, Snapshot(201, body=b"first"), POLICY)
    assert replayed(store.claim(before, POLICY)) == Snapshot(201, body=b"first")
    assert isinstance(store.claim(on_dead, POLICY), Execute)


@pytest.mark.django_db
def test_a_killed_master_over_http_503_or_unprotected_as_configured(
    no_retries: dict[str, Any],
    redis_cluster_server: Cluster,
    killed_master: RedisNode,
    settings: Any,
) -> None:
    from tests.testapp.models import Order

    cluster = redis_cluster_server
    store = get_store(REDIS)
    assert isinstance(store, CacheStore)
    key = call_on(cluster, store, killed_master, "http", scope="anonymous").key
    replica = cluster.replica_of(killed_master)
    cluster.kill(killed_master)

    settings.IDEMPOTENCY_STORE = REDIS
    refused = post(key)
    assert refused.status_code == 503
    assert json.loads(refused.content)["type"].endswith(":store-unavailable")
    assert Order.objects.count() == 0
    settings.IDEMPOTENCY_STORE = "open"
    assert [post(key).status_code for _ in range(2)] == [201, 201]
    assert Order.objects.count() == 2  # fail open: nothing protected them

    cluster.allow_failover(replica, True)
    after_failover(settings, cluster)
    settings.IDEMPOTENCY_STORE = REDIS
    first, replay = post(key), post(key)
    assert (first.status_code, replay.status_code) == (201, 201)
    assert replay["Idempotent-Replayed"] == "true"
    assert Order.objects.count() == 3


def post(key: str) -> Any:
    return Client(raise_request_exception=False).post(
        "/plain/",
        json.dumps({"item": "widget"}),
        content_type="application/json",
        headers={"Idempotency-Key": key},
    )


def after_failover(settings: Any, cluster: Cluster) -> None:
    """Wait for the replica to take over; then a client that retries, as by default.

    (The client without retries answers its first command after the failover
    with the error that makes it learn the new layout.)
    """
    wait_until(cluster.healthy, "the replica to take over")
    settings.CACHES = {**settings.CACHES, "redis": cluster_cache(cluster)}
