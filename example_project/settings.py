"""Settings of the example shop.

SQLite in this directory by default; ``DATABASE_URL`` (for example
``postgres://postgres@127.0.0.1:5432/shop`` or ``mysql://root@127.0.0.1:3306/shop``)
points it elsewhere. ``REDIS_URL`` adds a django-redis cache and an idempotency
store, both named ``redis``.
Not for production: the secret key and the demo users are public.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "demo-only-insecure-secret-key")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]

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
    "example_project.shop",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "example_project.urls"
WSGI_APPLICATION = "example_project.wsgi.application"

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

DATABASES = {"default": dj_database_url.config(default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.mysql":
    # Idempotency keys may hold any printable character; utf8mb4 stores all text.
    DATABASES["default"].setdefault("OPTIONS", {})["charset"] = "utf8mb4"

CACHES: dict[str, dict[str, Any]] = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
}
IDEMPOTENCY_STORES: dict[str, dict[str, Any]] = {
    "default": {"BACKEND": "django_idempotency.stores.database.DatabaseStore"},
}
if os.environ.get("REDIS_URL"):
    CACHES["redis"] = {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": os.environ["REDIS_URL"],
    }
    # For views given store="redis" (lease mode only).
    IDEMPOTENCY_STORES["redis"] = {
        "BACKEND": "django_idempotency.stores.cache.CacheStore",
        "OPTIONS": {"CACHE": "redis"},
    }

# Celery (example_project/celery.py): `celery -A example_project worker`.
# RabbitMQ by default; CELERY_BROKER_URL=redis://127.0.0.1:6379/0 for Redis.
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("CELERY_TASK_DEFAULT_QUEUE", "shop")
# A message is acknowledged after its task ran, and delivered again when the
# worker process died: safe because the tasks are idempotent.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
# One message at a time per process: a crash puts back one, not a batch.
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_IGNORE_RESULT = True
# Redis only: a message not acknowledged within this time is delivered again.
# Longer than any task runs; the idempotent task makes an early one harmless.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"
STATIC_URL = "static/"
LOGIN_URL = "rest_framework:login"
LOGIN_REDIRECT_URL = "index"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
}

# The library's defaults, spelled out to show where they live.
IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_METHODS = ["POST", "PATCH"]
IDEMPOTENCY_RETENTION = 24 * 60 * 60

# Where manage.py relay_idempotency_outbox sends outbox messages.
IDEMPOTENCY_OUTBOX_SENDER = "example_project.shop.outbox.deliver"

# Latency of the fake payment provider, in seconds (see shop/provider.py).
SHOP_PROVIDER_DELAY = float(os.environ.get("SHOP_PROVIDER_DELAY", "0"))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    # Not propagated: under a Celery worker, whose root handler would print it again.
    "loggers": {
        "django_idempotency": {"handlers": ["console"], "level": "INFO", "propagate": False}
    },
}

# The demo runs on SQLite knowingly; the warning is for deployments.
SILENCED_SYSTEM_CHECKS = ["django_idempotency.W001"]
