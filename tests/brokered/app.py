"""The Celery app of the broker tests' workers: ``celery -A tests.brokered.app worker``.

Configured from the environment the test sets: ``BROKER_TEST_URL`` (the
broker), ``BROKER_TEST_QUEUE`` (a queue of the test's own) and
``BROKER_TEST_GATES`` (a directory where the tasks leave marks and wait for
the test's go-ahead). The tasks' one effect is a ``testapp.Order`` row whose
``item`` is the event id, so the test counts effects in the database.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from celery import Celery
from celery.signals import task_postrun

from django_idempotency.tasks import idempotent_task
from tests.brokered.effects import TransientError, book_order, first_time

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.brokered.settings")

app = Celery("brokered")
app.conf.update(
    broker_url=os.environ.get("BROKER_TEST_URL", "memory://"),
    task_default_queue=os.environ.get("BROKER_TEST_QUEUE", "brokered"),
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    worker_enable_remote_control=False,
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        # Redis: when an unacknowledged message is delivered again; every key
        # of the run under one prefix. Not used by RabbitMQ.
        "visibility_timeout": float(os.environ.get("BROKER_TEST_VISIBILITY", "3600")),
        "global_keyprefix": os.environ.get("BROKER_TEST_PREFIX", ""),
    },
)

# The benchmark keeps the database connections, as a production worker should:
# Celery's Django fix-up closes them before and after every task (whatever
# CONN_MAX_AGE says) unless CELERY_DB_REUSE_MAX is set.
if os.environ.get("BROKER_TEST_DB_REUSE_MAX"):
    app.conf.CELERY_DB_REUSE_MAX = int(os.environ["BROKER_TEST_DB_REUSE_MAX"])


# Keyed by the event id: every publish and every delivery of one event books once;
# a duplicate delivered while the first runs waits for it and replays its result.
@app.task(name="brokered.book", autoretry_for=(TransientError,), default_retry_delay=0)
@idempotent_task(key=lambda event: event["id"], wait=15)
def book(event: dict[str, Any]) -> dict[str, Any]:
    return book_order(event)


# Keyed by the task id (the default); a duplicate in progress retries later.
@app.task(name="brokered.book_by_message", max_retries=30)
@idempotent_task(wait=0)
def book_by_message(event: dict[str, Any]) -> dict[str, Any]:
    return book_order(event)


# What is stored, and what a redelivery returns, is what ``redact`` keeps: not the email.
@app.task(name="brokered.book_redacted")
@idempotent_task(key=lambda event: event["id"], redact=lambda result: {"order": result["order"]})
def book_redacted(event: dict[str, Any]) -> dict[str, Any]:
    return {**book_order(event), "email": event["email"]}


# Lease mode on the Redis store (the benchmark's cheapest protection): the key
# is claimed and completed in Redis, the row inserted in autocommit.
@app.task(name="brokered.book_lease_redis")
@idempotent_task(key=lambda event: event["id"], mode="lease", store="redis")
def book_lease_redis(event: dict[str, Any]) -> dict[str, Any]:
    return book_order(event)


# No protection: the benchmark's baseline.
@app.task(name="brokered.book_unprotected")
def book_unprotected(event: dict[str, Any]) -> dict[str, Any]:
    return book_order(event)


# No protection, in the transaction that atomic mode needs: the benchmark's second baseline.
@app.task(name="brokered.book_unprotected_atomic")
def book_unprotected_atomic(event: dict[str, Any]) -> dict[str, Any]:
    from django.db import transaction

    with transaction.atomic():
        return book_order(event)


# The floor of atomic mode, the benchmark's third baseline: the transaction and
# the store's two statements as the store sends them, none of the package's code.
@app.task(name="brokered.book_floor")
def book_floor(event: dict[str, Any]) -> dict[str, Any]:
    from tests.brokered.floor import book_with_bare_statements

    return book_with_bare_statements(event)


@task_postrun.connect
def crash_after_commit(task_id: str, kwargs: dict[str, Any], **extra: Any) -> None:
    """Kill the pool process after the task committed, before its message is acknowledged."""
    event = kwargs.get("event") or {}
    if event.get("crash") == "after_commit" and first_time(f"{event['id']}.crashed"):
        os.kill(os.getpid(), signal.SIGKILL)
