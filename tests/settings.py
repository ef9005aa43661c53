"""Settings for the test suite; the database comes from ``DATABASE_URL``.

Without it the tests use SQLite. ``REDIS_URL`` points the Redis-backed tests at
a server (default: the local one).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from typing import Any

import dj_database_url

SECRET_KEY = "tests-only-not-secret"
DEBUG = False
USE_TZ = True
ROOT_URLCONF = "tests.urls"
ALLOWED_HOSTS = ["*"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_idempotency",
    "tests.testapp",
    "example_project.shop",  # tests/test_example_project.py
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

# SQLite test databases live in a file, not in memory: shared-cache memory
# databases lock differently from the file databases people actually run.
_SQLITE_FILE = os.path.join(tempfile.gettempdir(), f"django-idempotency-{os.getpid()}.sqlite3")

DATABASES = {
    "default": dj_database_url.config(
        default=f"sqlite:///{_SQLITE_FILE}", conn_max_age=0, test_options={}
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["TEST"] = {"NAME": _SQLITE_FILE}
elif DATABASES["default"]["ENGINE"] == "django.db.backends.mysql":
    DATABASES["default"].setdefault("OPTIONS", {})["charset"] = "utf8mb4"
    DATABASES["default"]["TEST"] = {"CHARSET": "utf8mb4", "COLLATION": "utf8mb4_general_ci"}
elif os.environ.get("PREPARE_THRESHOLD"):
    # psycopg 3 prepared statements, which Django leaves off unless asked:
    # CI runs the PostgreSQL suite both ways.
    DATABASES["default"].setdefault("OPTIONS", {})["prepare_threshold"] = int(
        os.environ["PREPARE_THRESHOLD"]
    )

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")

CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    # For the Redis store tests (an IDEMPOTENCY_STORES alias they set up).
    "redis": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": REDIS_URL},
}

REST_FRAMEWORK: dict[str, Any] = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.SessionAuthentication",
        "rest_framework.authentication.BasicAuthentication",
        "rest_framework.authentication.TokenAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
}

# Where drf-spectacular is installed, the API is documented as in a project
# that uses it (tests/test_openapi.py); the schema class is read when views
# are decorated, so it must be set from the start.
if importlib.util.find_spec("drf_spectacular") is not None:
    INSTALLED_APPS.append("drf_spectacular")
    REST_FRAMEWORK["DEFAULT_SCHEMA_CLASS"] = "drf_spectacular.openapi.AutoSchema"

# The live server (tests/test_browser.py) serves the admin's CSS and scripts here.
STATIC_URL = "/static/"

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
SILENCED_SYSTEM_CHECKS = ["django_idempotency.W001"]
