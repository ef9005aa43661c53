"""Idempotent Celery tasks on real brokers: RabbitMQ and Redis, PostgreSQL, real workers.

Celery workers (prefork pools of two processes) run ``tests/brokered/app.py``
in processes of their own, against a database the module creates beside
``DATABASE_URL``'s. Faults are real: pool processes killed with SIGKILL in the
middle of a task and after its commit, a broker killed and restarted. Effects
are counted in the database (one ``testapp_order`` row per booking); what the
workers did is read from their logs; what the broker still holds, from the
broker.

Needs PostgreSQL (``DATABASE_URL``), RabbitMQ (``RABBITMQ_URL``, default the
local guest account) and Redis (``REDIS_URL``); outside CI the tests skip
without them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.brokered.harness import (
    RABBITMQ_URL,
    REDIS_URL,
    Broker,
    Cluster,
    RabbitMQNode,
    RedisServer,
    broker_unavailable,
    migrate,
    new_id,
)
from tests.multiprocess import harness

pytestmark = [
    pytest.mark.broker,
    pytest.mark.skipif(
        harness.postgres_url() is None,
        reason="needs DATABASE_URL pointing at PostgreSQL (real workers share the database)",
    ),
    pytest.mark.timeout(150),
]

BROKERS = {"rabbitmq": RABBITMQ_URL, "redis": REDIS_URL}
#: How long a worker may take to find a restarted broker again.
RECONNECT_PATIENCE = 60.0


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    url = harness.postgres_url()
    assert url is not None
    with harness.scratch_database(url) as scratch:
        migrate(scratch)
        yield scratch


@pytest.fixture(scope="module")
def database(database_url: str) -> Iterator[harness.Database]:
    connection = harness.Database(database_url)
    yield connection
    connection.close()


@pytest.fixture(params=sorted(BROKERS))
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    url = BROKERS[request.param]
    reason = broker_unavailable(url)
    if reason is not None:
        pytest.skip(reason)
    created = Broker(request.param, url)
    yield created
    created.remove()


@pytest.fixture
def cluster(
    broker: Broker, database_url: str, database: harness.Database, tmp_path: Path
) -> Iterator[Cluster]:
    running = Cluster(broker, database_url, database, tmp_path)
    try:
        yield running
    finally:
        running.stop()


def assert_drained(cluster: Cluster) -> None:
    """Every message acknowledged (a retry's original is acknowledged after its new
    message may have run: waited for), and nothing comes back when the workers stop."""
    cluster.wait_until(lambda: cluster.broker.pending() == (0, 0), "every message acknowledged")
    cluster.stop()
    assert cluster.broker.pending() == (0, 0)


def test_fifty_publishes_of_one_event_book_once(cluster: Cluster) -> None:
    cluster.start(2)
    event = {"id": new_id()}
    cluster.publish("brokered.book", event, times=50)

    cluster.wait_until(lambda: cluster.succeeded() == 50, "50 deliveries to succeed")

    assert cluster.effects(event["id"]) == 1
    assert cluster.replayed() == 49
    assert " ERROR" not in cluster.logs()
    assert_drained(cluster)


def test_pool_process_killed_mid_task_is_redelivered_and_books_once(cluster: Cluster) -> None:
    cluster.start(1)
    event = {"id": new_id(), "crash": "mid"}
    cluster.publish("brokered.book", event)

    cluster.wait_until(lambda: cluster.succeeded() == 1, "the redelivery to succeed")

    assert cluster.crashed(event["id"])
    assert cluster.count(r"exited with .signal 9 \(SIGKILL\)") == 1
    # The first attempt's row was rolled back with its transaction: one booking.
    assert cluster.effects(event["id"]) == 1
    assert cluster.replayed() == 0
    assert_drained(cluster)


def test_killed_after_commit_before_ack_the_redelivery_replays(cluster: Cluster) -> None:
    cluster.start(1)
    event = {"id": new_id(), "crash": "after_commit"}
    cluster.publish("brokered.book", event)

    # The killed attempt logged its success (Celery does before task_postrun,
    # where the test kills it); the redelivery logs the second.
    cluster.wait_until(lambda: cluster.succeeded() == 2, "the redelivery to succeed")

    assert cluster.crashed(event["id"])
    assert cluster.count(r"exited with .signal 9 \(SIGKILL\)") == 1
    assert cluster.effects(event["id"]) == 1
    # The redelivery found the stored result instead of booking again.
    assert cluster.replayed() == 1
    assert_drained(cluster)


def test_the_redelivery_after_a_crash_returns_the_redacted_stored_result(
    cluster: Cluster,
) -> None:
    cluster.start(1)
    event = {"id": new_id(), "crash": "after_commit", "email": "ann@example.com"}
    cluster.publish("brokered.book_redacted", event)

    cluster.wait_until(lambda: cluster.succeeded() == 2, "the redelivery to succeed")

    assert cluster.crashed(event["id"])
    assert cluster.effects(event["id"]) == 1
    assert cluster.replayed() == 1
    order = cluster.database.value("SELECT id FROM testapp_order WHERE item = %s", [event["id"]])
    # Celery logs what each delivery returned: the killed one its whole result,
    # the redelivery the stored one, which the hook cut down.
    returned = re.findall(r"\] succeeded in [\d.]+s: (.*)", cluster.logs())
    assert returned == [
        repr({"event": event["id"], "order": order, "email": "ann@example.com"}),
        repr({"order": order}),
    ]
    stored = cluster.database.value(
        "SELECT response_body FROM django_idempotency_idempotencykey WHERE key = %s",
        [event["id"]],
    )
    assert json.loads(bytes(stored)) == {"order": order}
    assert_drained(cluster)


def test_one_message_delivered_twice_at_once_the_duplicate_waits(cluster: Cluster) -> None:
    cluster.start(2)
    event = {"id": new_id(), "hold": True}
    task_id = new_id("task")
    cluster.publish("brokered.book", event, times=2, task_id=task_id)

    cluster.wait_until(lambda: cluster.gate_started(event["id"]), "the first delivery to start")
    # The duplicate is at its claim, blocked by the first one's lock.
    cluster.wait_until(lambda: cluster.waiting_on_locks() == 1, "the duplicate to wait")
    cluster.release(event["id"])
    cluster.wait_until(lambda: cluster.succeeded() == 2, "both deliveries to succeed")

    assert cluster.effects(event["id"]) == 1
    assert cluster.replayed() == 1
    assert " ERROR" not in cluster.logs()
    assert_drained(cluster)


def test_one_message_delivered_twice_at_once_the_duplicate_retries(cluster: Cluster) -> None:
    cluster.start(2)
    event = {"id": new_id(), "hold": True}
    task_id = new_id("task")
    cluster.publish("brokered.book_by_message", event, times=2, task_id=task_id)

    cluster.wait_until(lambda: cluster.gate_started(event["id"]), "the first delivery to start")
    # wait=0: the duplicate does not block; Celery retries it after the claim's Retry-After.
    cluster.wait_for_log(r"Retry in \d+s: RequestInProgress")
    cluster.release(event["id"])
    cluster.wait_until(lambda: cluster.succeeded() == 2, "both deliveries to succeed")

    assert cluster.effects(event["id"]) == 1
    assert cluster.replayed() == 1
    assert " ERROR" not in cluster.logs()
    assert_drained(cluster)


def test_a_raising_task_stores_nothing_and_its_retry_books_once(cluster: Cluster) -> None:
    cluster.start(1)
    event = {"id": new_id(), "fail": True}
    cluster.publish("brokered.book", event)

    cluster.wait_until(lambda: cluster.succeeded() == 1, "the retry to succeed")

    assert cluster.count(r"Retry in \d+s: TransientError") == 1
    assert cluster.effects(event["id"]) == 1
    assert cluster.replayed() == 0
    assert_drained(cluster)


def test_an_outbox_message_relayed_twice_runs_its_task_once(cluster: Cluster) -> None:
    """The relay publishes at least once; the task id is the message id, the task's key."""
    event = {"id": new_id("outbox")}
    message_id = str(uuid.uuid4())
    cluster.database.rows(
        "INSERT INTO django_idempotency_outboxmessage (id, topic, payload, state, attempts, "
        "next_attempt, last_error, created, scope, idempotency_key, step) VALUES "
        "(%s, 'brokered.book_by_message', %s, 'pending', 0, now(), '', now(), '', '', '')",
        [message_id, json.dumps({"event": event})],
    )
    cluster.start(1)

    cluster.relay_outbox()
    cluster.wait_until(lambda: cluster.succeeded() == 1, "the relayed task to run")
    # As if the relay had died after publishing, before recording it: sent again.
    cluster.database.rows(
        "UPDATE django_idempotency_outboxmessage SET state = 'pending', sent = NULL, "
        "next_attempt = now() WHERE id = %s",
        [message_id],
    )
    cluster.relay_outbox()
    cluster.wait_until(lambda: cluster.succeeded() == 2, "the second publish to be consumed")

    assert cluster.count(re.escape(f"[{message_id}] succeeded")) == 2
    assert cluster.effects(event["id"]) == 1
    assert cluster.replayed() == 1
    state = cluster.database.value(
        "SELECT state FROM django_idempotency_outboxmessage WHERE id = %s", [message_id]
    )
    assert state == "sent"
    assert_drained(cluster)


class OwnBroker:
    """A broker server of the test's own, to kill and restart: Redis or RabbitMQ."""

    def __init__(self, server: RedisServer | RabbitMQNode, broker: Broker) -> None:
        self.server = server
        self.broker = broker

    def kill(self) -> None:
        self.server.kill()

    def start(self) -> None:
        self.server.start()


@pytest.fixture(params=["redis", "rabbitmq"])
def own_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OwnBroker]:
    kind = request.param
    executable = {"redis": "redis-server", "rabbitmq": "rabbitmq-server"}[kind]
    if not shutil.which(executable, path=f"/usr/lib/rabbitmq/bin:{os.environ['PATH']}"):
        pytest.skip(f"no {executable} to start a broker of the test's own")
    directory = tmp_path / kind
    directory.mkdir()
    server: RedisServer | RabbitMQNode
    if kind == "redis":
        server = RedisServer(directory)
        server.start()
        broker = Broker(kind, server.url)
    else:
        server = RabbitMQNode(directory)
        server.start()
        broker = Broker(kind, server.url, node=server)
    try:
        yield OwnBroker(server, broker)
    finally:
        server.stop()


def test_broker_restarted_mid_run_loses_nothing_and_books_each_once(
    own_broker: OwnBroker, database_url: str, database: harness.Database, tmp_path: Path
) -> None:
    broker = own_broker.broker
    cluster = Cluster(
        broker,
        database_url,
        database,
        tmp_path,
        # Redis: a message whose acknowledgement was lost with the connection comes
        # back soon. (RabbitMQ puts it back when the connection drops.)
        extra_environ={"BROKER_TEST_VISIBILITY": "3"},
    )
    with contextlib.ExitStack() as stack:
        stack.callback(cluster.stop)
        cluster.start(1)
        held = {"id": new_id("held"), "hold": True}
        before = [{"id": new_id("before")} for _ in range(5)]
        after = [{"id": new_id("after")} for _ in range(5)]
        for event in [held, *before]:
            cluster.publish("brokered.book", event)
        # Killed with one task in flight and nothing else to acknowledge: an
        # acknowledgement attempted while Redis is down stays in its unacked
        # hash until the visibility timeout, which kombu may take long to honour.
        cluster.wait_until(lambda: cluster.gate_started(held["id"]), "the held task to start")
        cluster.wait_until(
            lambda: all(cluster.effects(event["id"]) for event in before), "the others booked"
        )
        cluster.wait_until(lambda: broker.pending() == (0, 1), "only the held one unacknowledged")

        own_broker.kill()
        if broker.kind == "rabbitmq":
            # The worker's connection drops with the node; RabbitMQ puts the held,
            # unacknowledged message back. (With Redis, the client reconnects on its
            # next command; the held message waits in the persisted unacked hash.)
            cluster.wait_for_log(r"Connection to broker lost")
        own_broker.start()
        cluster.release(held["id"])
        for event in after:
            cluster.publish("brokered.book", event)

        events = [held, *before, *after]
        # The worker reconnects with Celery's back-off (2 s, 4 s, ...).
        cluster.wait_until(
            lambda: all(cluster.effects(event["id"]) for event in events),
            "every event to be booked",
            seconds=RECONNECT_PATIENCE,
        )
        cluster.wait_until(
            lambda: broker.pending() == (0, 0),
            "the broker to be drained",
            seconds=RECONNECT_PATIENCE,
        )
        assert [cluster.effects(event["id"]) for event in events] == [1] * len(events)


def create_payment(database: harness.Database, reference: str, amount_cents: int) -> None:
    """A payment of the example shop (with its customer and order), in plain SQL."""
    user_id = database.value(
        "INSERT INTO auth_user (username, password, is_superuser, first_name, last_name, "
        "email, is_staff, is_active, date_joined) "
        "VALUES (%s, '!', false, '', '', '', false, true, now()) RETURNING id",
        [f"customer-{reference}"],
    )
    order_id = database.value(
        "INSERT INTO shop_order (owner_id, item, amount, created) "
        "VALUES (%s, 'coffee', %s, now()) RETURNING id",
        [user_id, amount_cents / 100],
    )
    database.rows(
        "INSERT INTO shop_payment (owner_id, order_id, amount_cents, reference, created) "
        "VALUES (%s, %s, %s, %s, now())",
        [user_id, order_id, amount_cents, reference],
    )


def test_the_example_shops_worker_books_a_capture_once_however_often_it_comes(
    database_url: str, database: harness.Database, tmp_path: Path
) -> None:
    """``celery -A example_project worker`` on RabbitMQ, as the README runs it."""
    if (reason := broker_unavailable(RABBITMQ_URL)) is not None:
        pytest.skip(reason)
    broker = Broker("rabbitmq", RABBITMQ_URL)
    cluster = Cluster(
        broker,
        database_url,
        database,
        tmp_path,
        extra_environ={
            "DJANGO_SETTINGS_MODULE": "example_project.settings",
            "CELERY_BROKER_URL": broker.url,
            "CELERY_TASK_DEFAULT_QUEUE": broker.queue,
        },
    )
    reference = new_id("ch")
    create_payment(database, reference, 450)
    message = {"id": new_id(), "payment": reference, "amount_cents": 300}
    with contextlib.ExitStack() as stack:
        stack.callback(broker.remove)
        stack.callback(cluster.stop)
        cluster.start(2, app="example_project")
        cluster.publish("shop.payment_captured", message, times=10, argument="message")

        cluster.wait_until(lambda: cluster.succeeded() == 10, "10 deliveries to succeed")

        entries = database.rows(
            "SELECT e.amount_cents FROM shop_ledgerentry e "
            "JOIN shop_payment p ON p.id = e.payment_id WHERE p.reference = %s",
            [reference],
        )
        assert entries == [(300,)]
        assert cluster.replayed() == 9
        assert_drained(cluster)
