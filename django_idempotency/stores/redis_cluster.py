"""A django-redis connection factory for Redis Cluster (redis-py's ``RedisCluster``).

django-redis has no cluster client of its own: its clients talk to one server
(or shard keys across independent ones). This factory hands django-redis a
:class:`redis.cluster.RedisCluster` instead of a :class:`redis.Redis`; the
cache's single-key commands and the cache store's scripts then follow each
key to the master that serves its slot, and MOVED/ASK redirections and
failovers are redis-py's business::

    CACHES = {
        "idempotency": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": "redis://redis-cluster.internal:6379",
            "OPTIONS": {
                "CONNECTION_FACTORY": (
                    "django_idempotency.stores.redis_cluster.ClusterConnectionFactory"
                ),
            },
        },
    }

``LOCATION`` is one startup node (the others are discovered from it); more
can be given as ``REDIS_CLIENT_KWARGS={"startup_nodes": [ClusterNode(...), ...]}``,
which also takes :class:`~redis.cluster.RedisCluster`'s other arguments (a
``retry``, for one). ``SOCKET_TIMEOUT``, ``SOCKET_CONNECT_TIMEOUT``,
``USERNAME`` and ``PASSWORD`` apply to every node.
"""

from __future__ import annotations

import threading
from typing import Any, ClassVar

from django_redis.pool import ConnectionFactory  # type: ignore[import-untyped]
from redis.cluster import RedisCluster


class ClusterConnectionFactory(ConnectionFactory):  # type: ignore[misc]
    """Connects django-redis to a Redis Cluster; one client per process and location.

    A ``RedisCluster`` keeps the cluster's map of slots to nodes and a pool of
    connections per node, and is safe to share between threads: building it
    per thread (as django-redis builds its clients) would map the cluster
    again for every thread.
    """

    _clusters: ClassVar[dict[str, RedisCluster]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def connect(self, url: str) -> RedisCluster:
        kwargs = self.make_connection_params(url)
        # Node connections get redis-py's own parser; the cluster takes no pool class.
        kwargs.pop("parser_class", None)
        kwargs.update(self.redis_client_cls_kwargs)
        nodes = list(kwargs.get("startup_nodes", ()))
        if nodes:
            # RedisCluster appends the URL's node to the list it is given.
            kwargs["startup_nodes"] = nodes
        # Caches with the same location and options share a client. (Startup
        # nodes by address: RedisCluster attaches connections to them.)
        options = sorted((name, value) for name, value in kwargs.items() if name != "startup_nodes")
        key = repr((options, [f"{node.host}:{node.port}" for node in nodes]))
        with self._lock:
            cluster = self._clusters.get(key)
            if cluster is None:
                cluster = RedisCluster(**kwargs)
                self._clusters[key] = cluster
        return cluster

    def disconnect(self, connection: Any) -> None:
        with self._lock:
            for key, cluster in list(self._clusters.items()):
                if cluster is connection:
                    del self._clusters[key]
        connection.close()
