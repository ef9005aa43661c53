"""The floor of atomic mode on PostgreSQL, for the throughput benchmark.

What no implementation of atomic mode on the database store's statements can
do with less: the transaction, the store's claim and its completion, prepared
and sent as the store sends them (BEGIN with the claim in one flush, the
completion with COMMIT in another, through libpq's pipeline: the store's own
``postgresql._send``), with none of the package's code around them: no
decorator, no engine, no signals, no Django cursor or atomic block (the
transaction is opened and ended on the driver, the task's own row inserted
inside it). A key is claimed once per event: the benchmark
never repeats one, so there is no replay path here.
"""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

from django.db import connection
from django.utils import timezone

from django_idempotency.protocol import Call
from django_idempotency.stores import postgresql, sql
from tests.brokered.effects import book_order

SCOPE = "task:brokered.book_floor"
RETENTION = timedelta(days=1)


def book_with_bare_statements(event: dict[str, Any]) -> dict[str, Any]:
    connection.ensure_connection()
    raw: Any = connection.connection
    statements = sql.statements(connection)
    key, token, now = event["id"], uuid.uuid4().hex, timezone.now()
    lock = postgresql.lock_id(Call(scope=SCOPE, key=key, fingerprint=""))
    row = {
        "scope": SCOPE,
        "key": key,
        "fingerprint": "",
        "method": "",
        "path": "",
        "state": "in_progress",
        "token": token,
        "locked_until": None,
        "attempts": 1,
        "response_headers": [],
        "response_body": b"",
        "created": now,
        "expires": now + RETENTION,
    }
    # Django left the connection in autocommit: BEGIN is sent with the claim.
    claimed, _ = postgresql._send(
        raw,
        postgresql._build_claim_sql(statements, True),
        [lock, *sql.new_row_params(connection, row), SCOPE, key],
        True,
        False,
    )
    if not (claimed and claimed[1]):
        raw.execute("ROLLBACK")
        raise RuntimeError(f"the floor task claims each event once: {key} was taken")
    result = book_order(event)  # in the transaction BEGIN opened
    params = sql.completion_params(
        connection,
        status=200,
        headers=[],
        body=json.dumps(result).encode(),
        completed=now,
        expires=now + RETENTION,
        scope=SCOPE,
        key=key,
        token=token,
    )
    _, completed = postgresql._send(raw, statements.complete, params, False, True)
    if completed != 1:
        raise RuntimeError(f"the floor task's completion changed {completed} rows")
    return result
