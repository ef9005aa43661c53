"""The test suite's settings, for task workers: the database a broker test made.

The test sets ``DATABASE_URL`` (a database of its own) before starting the
workers; the idempotency log goes to the worker's output, where the test
counts replays.
"""

from __future__ import annotations

import os

from tests.settings import *  # noqa: F403
from tests.settings import DATABASES, INSTALLED_APPS

# The benchmark keeps connections, as a production worker does; the tests
# open one per task (Django's default), which also covers reconnecting.
DATABASES["default"]["CONN_MAX_AGE"] = int(os.environ.get("BROKER_TEST_CONN_MAX_AGE", "0"))

INSTALLED_APPS = [*INSTALLED_APPS, "django_tasks_db"]

# The database store by default; the Redis store for the benchmark's lease-mode task.
IDEMPOTENCY_STORES = {
    "default": {"BACKEND": "django_idempotency.stores.database.DatabaseStore"},
    "redis": {
        "BACKEND": "django_idempotency.stores.cache.CacheStore",
        "OPTIONS": {"CACHE": "redis"},
    },
}

# The outbox relay publishes to Celery (tests/brokered/relay.py).
IDEMPOTENCY_OUTBOX_SENDER = "django_idempotency.celery.send_outbox_message"

# Django's tasks: the database backend, whose worker is `manage.py db_worker`.
TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "django_idempotency": {"handlers": ["console"], "level": "INFO", "propagate": False},
    },
}
