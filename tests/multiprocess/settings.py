"""The example shop's settings, plus what the multi-process tests need.

Read in the gunicorn workers and in the preparation and purge subprocesses.
The test harness sets the environment: ``DATABASE_URL`` (a database of the
test's own), ``MP_FAULT_DIR`` (where held requests meet their gates),
``MP_CLOSED_PORT`` (a port where no Redis answers) and ``MP_REDIS_PREFIX``
(a key prefix of the run's own in ``REDIS_URL``'s database).
"""

from __future__ import annotations

import os

from example_project.settings import *  # noqa: F403
from example_project.settings import CACHES, DATABASES, IDEMPOTENCY_STORES, MIDDLEWARE

# Server errors as plain 500s, as in production, not debug pages.
DEBUG = False
ROOT_URLCONF = "tests.multiprocess.urls"

FAULT_DIR = os.environ.get("MP_FAULT_DIR", "")

# X-Hold-At: hold a request at a step boundary (see views.remember_hold_point).
MIDDLEWARE = [*MIDDLEWARE, "tests.multiprocess.views.remember_hold_point"]
# The shop's sender, logging deliveries and, if asked, holding the relay.
IDEMPOTENCY_OUTBOX_SENDER = "tests.multiprocess.views.deliver_and_hold"

# One database session per worker, kept, as deployments do: a session
# terminated under a request is then one the worker had been reusing.
DATABASES["default"]["CONN_MAX_AGE"] = 600
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True

if os.environ.get("MP_REDIS_CLUSTER"):
    # The Redis store on a Redis Cluster (tests/test_multiprocess_at_scale.py):
    # every node ("host:port,...") a startup node, so that a worker started
    # after a master died still finds the cluster.
    from redis.cluster import ClusterNode

    CACHES["redis"] = {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": f"redis://{os.environ['MP_REDIS_CLUSTER'].split(',')[0]}",
        "OPTIONS": {
            "CONNECTION_FACTORY": (
                "django_idempotency.stores.redis_cluster.ClusterConnectionFactory"
            ),
            "SOCKET_CONNECT_TIMEOUT": 1,
            "SOCKET_TIMEOUT": 1,
            "REDIS_CLIENT_KWARGS": {
                "startup_nodes": [
                    ClusterNode(*address.rsplit(":", 1))
                    for address in os.environ["MP_REDIS_CLUSTER"].split(",")
                ]
            },
        },
    }
    IDEMPOTENCY_STORES["redis"] = {
        "BACKEND": "django_idempotency.stores.cache.CacheStore",
        "OPTIONS": {"CACHE": "redis"},
    }

if os.environ.get("MP_BEHIND_POOLER"):
    # PgBouncer in transaction pooling mode: no cursor may outlive its
    # transaction, and statements are prepared only where it keeps them
    # (MP_STORE_PREPARE: "1" for PgBouncer 1.21+ with max_prepared_statements).
    DATABASES["default"]["DISABLE_SERVER_SIDE_CURSORS"] = True
    IDEMPOTENCY_STORES["default"] = {
        "BACKEND": "django_idempotency.stores.database.DatabaseStore",
        "OPTIONS": {"PREPARE": os.environ.get("MP_STORE_PREPARE") == "1"},
    }
    if os.environ.get("PREPARE_THRESHOLD"):
        DATABASES["default"].setdefault("OPTIONS", {})["prepare_threshold"] = int(
            os.environ["PREPARE_THRESHOLD"]
        )

if "redis" in CACHES:
    # Every record of the run under one prefix: found and removed together.
    CACHES["redis"]["KEY_PREFIX"] = os.environ.get("MP_REDIS_PREFIX", "")
    IDEMPOTENCY_STORES["redis_open"] = {
        "BACKEND": "django_idempotency.stores.cache.CacheStore",
        "OPTIONS": {"CACHE": "redis", "FAIL_OPEN": True},
    }

# A Redis that is not there: the port is held by the test, bound but never listening.
CACHES["redis_down"] = {
    "BACKEND": "django_redis.cache.RedisCache",
    "LOCATION": f"redis://127.0.0.1:{os.environ.get('MP_CLOSED_PORT', '1')}/0",
    "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 1, "SOCKET_TIMEOUT": 1},
}
IDEMPOTENCY_STORES["redis_down"] = {
    "BACKEND": "django_idempotency.stores.cache.CacheStore",
    "OPTIONS": {"CACHE": "redis_down"},
}
IDEMPOTENCY_STORES["redis_down_open"] = {
    "BACKEND": "django_idempotency.stores.cache.CacheStore",
    "OPTIONS": {"CACHE": "redis_down", "FAIL_OPEN": True},
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    # Conflicts and takeovers are warnings; thousands of replays need no line each.
    "loggers": {
        "django_idempotency": {"handlers": ["console"], "level": "WARNING"},
        # The tracebacks of 500s, in gunicorn's log, which a failing test shows.
        "django.request": {"handlers": ["console"], "level": "ERROR"},
    },
}
