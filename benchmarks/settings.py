"""Settings of the benchmark project, read from the environment ``run.py`` sets.

``BENCH_DATABASE_URL`` names the database (created and dropped by the run);
``BENCH_REDIS_URL``, when set, adds the Redis store as ``redis``.
"""

from __future__ import annotations

import importlib.util
import os

import dj_database_url

SECRET_KEY = "benchmark-only-not-secret"
DEBUG = False
USE_TZ = True
ROOT_URLCONF = "benchmarks.urls"
ALLOWED_HOSTS = ["127.0.0.1", "testserver"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django_idempotency",
    "benchmarks",
]
if importlib.util.find_spec("rest_framework") is not None:
    INSTALLED_APPS.append("rest_framework")

# What an API deployment typically runs; none of it queries the database for
# an anonymous request without a session cookie.
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]

_database = dj_database_url.parse(os.environ["BENCH_DATABASE_URL"], conn_max_age=None)
# Persistent connections, as in production: otherwise connecting would
# dominate every request. The run creates and drops the database under the
# very name given (``TEST.NAME``), never a ``test_`` prefixed one.
_database["TEST"] = {"NAME": _database["NAME"]}
# --view-queries: primary-key reads the view makes besides its INSERT.
VIEW_QUERIES = int(os.environ.get("BENCH_VIEW_QUERIES") or 0)
# --prepare-threshold: psycopg 3 prepared statements, off unless asked (Django's default).
PREPARE_THRESHOLD = os.environ.get("BENCH_PREPARE_THRESHOLD", "")
if PREPARE_THRESHOLD and _database["ENGINE"] == "django.db.backends.postgresql":
    _database.setdefault("OPTIONS", {})["prepare_threshold"] = int(PREPARE_THRESHOLD)
DATABASES = {"default": _database}

IDEMPOTENCY_STORES: dict[str, dict[str, object]] = {
    "default": {"BACKEND": "django_idempotency.stores.database.DatabaseStore"},
}

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "")
HAS_CACHE_STORE = importlib.util.find_spec("django_idempotency.stores.cache") is not None
if REDIS_URL and HAS_CACHE_STORE:
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "idempotency": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": "django-idempotency-bench",
        },
    }
    IDEMPOTENCY_STORES["redis"] = {
        "BACKEND": "django_idempotency.stores.cache.CacheStore",
        "OPTIONS": {"CACHE": "idempotency"},
    }

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    # Replays and conflicts log at INFO/WARNING; a benchmark measures, not logs.
    "loggers": {"django_idempotency": {"level": "ERROR"}},
}
