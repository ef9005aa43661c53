"""The example shop seen from outside: its users, entry points, and what they leave.

An entry point (:class:`Entry`) under a protection is a :class:`Target`.
Every request body carries a serial number (:func:`harness.serial`): the order
item ``mp-<serial>`` or the payment of ``<serial>`` cents. Counting the rows
with a serial counts the executions of the request that carried it.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import redis

from tests.multiprocess.harness import CSRF_TOKEN, Database, Gate, InFlight, Reply, Server, send

REDIS_URL = os.environ.get("REDIS_URL")
KEYS_TABLE = "django_idempotency_idempotencykey"


@dataclass(frozen=True)
class User:
    name: str
    pk: int
    token: str
    session: str
    #: An order of theirs, for payments.
    order: int

    @property
    def scope(self) -> str:
        return f"user:{self.pk}"

    def credentials(self, auth: str) -> dict[str, str]:
        if auth == "token":
            return {"Authorization": f"Token {self.token}"}
        # Session authentication: the cookie, and CSRF's double submit.
        return {
            "Cookie": f"sessionid={self.session}; csrftoken={CSRF_TOKEN}",
            "X-CSRFToken": CSRF_TOKEN,
        }


@dataclass(frozen=True)
class Entry:
    """One of the shop's entry points (path relative to a protection's prefix)."""

    name: str
    path: str
    auth: str

    def __str__(self) -> str:
        return self.name

    @property
    def pays(self) -> bool:
        return self.name == "payments"

    def body(self, user: User, number: int) -> dict[str, Any]:
        if self.pays:
            return {"order": user.order, "amount_cents": number}
        return {"item": f"mp-{number}", "amount": "1.00"}


ORDERS = Entry("orders", "api/orders/", "token")  # DRF viewset + IdempotencyMixin
PAYMENTS = Entry("payments", "api/payments/", "token")  # DRF @api_view + @idempotent
PLAIN = Entry("plain", "orders/", "session")  # Django view + @idempotent
ENTRIES = (ORDERS, PAYMENTS, PLAIN)

#: The example project's own protection of each entry point, served at its own URL.
NATIVE = {"orders": "atomic", "payments": "lease", "plain": "atomic"}


@dataclass(frozen=True)
class Target:
    """An entry point under a protection: the example's own view, or one under ``/mp/``."""

    entry: Entry
    protection: str
    #: The example project's view at its own URL (it has no gate: nothing can be held there).
    example: bool = False

    @classmethod
    def native(cls, entry: Entry) -> Target:
        """The entry point as the example project protects it, at its own URL."""
        return cls(entry, NATIVE[entry.name], example=True)

    @classmethod
    def best(cls, entry: Entry, protection: str) -> Target:
        """The example's own view if it has this protection, else the one under ``/mp/``."""
        return cls.native(entry) if NATIVE[entry.name] == protection else cls(entry, protection)

    @property
    def path(self) -> str:
        if self.example:
            return f"/{self.entry.path}"
        return f"/mp/{self.protection}/{self.entry.path}"

    @property
    def in_redis(self) -> bool:
        return self.protection.startswith("redis")

    def __str__(self) -> str:
        return f"{self.entry}/{self.protection}"


def new_key(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:16]}"


class Shop:
    """The running shop: send requests, read what they left behind."""

    def __init__(
        self,
        server: Server,
        database: Database,
        users: Mapping[str, Any],
        fault_dir: Path,
        redis_client: redis.Redis | redis.RedisCluster | None = None,
    ) -> None:
        self.server = server
        self.database = database
        self.users = {name: User(name, **fields) for name, fields in users.items()}
        self.fault_dir = fault_dir
        self.redis_prefix = server.environ["MP_REDIS_PREFIX"]
        if redis_client is None and REDIS_URL:
            redis_client = redis.Redis.from_url(REDIS_URL)
        self.redis = redis_client

    def close(self) -> None:
        if self.redis is not None:
            names = list(self.redis.scan_iter(match=f"{self.redis_prefix}:*"))
            if names:
                self.redis.delete(*names)
            self.redis.close()
        self.database.close()

    @property
    def alice(self) -> User:
        return self.users["alice"]

    @property
    def bob(self) -> User:
        return self.users["bob"]

    def send(
        self,
        target: Target,
        user: User,
        key: str | None,
        body: Any,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        all_headers = {**user.credentials(target.entry.auth), **(headers or {})}
        if key is not None:
            all_headers["Idempotency-Key"] = key
        return send(self.server.port, "POST", target.path, body, all_headers)

    def hold(
        self, gate_name: str, target: Target, user: User, key: str, body: Any
    ) -> tuple[Gate, InFlight]:
        """Send a request that stops at a gate inside the view."""
        gate = Gate(self.fault_dir, gate_name)
        request = InFlight.start(lambda: self.send(target, user, key, body, gate.headers))
        return gate, request

    # What was executed --------------------------------------------------

    def executions(self, entry: Entry, numbers: Iterable[int]) -> dict[int, int]:
        """How many rows each serial number's requests created (absent: none)."""
        numbers = list(numbers)
        if entry.pays:
            rows = self.database.rows(
                "SELECT amount_cents, count(*) FROM shop_payment"
                " WHERE amount_cents = ANY(%s) GROUP BY amount_cents",
                [numbers],
            )
            return {int(number): count for number, count in rows}
        rows = self.database.rows(
            "SELECT item, count(*) FROM shop_order WHERE item = ANY(%s) GROUP BY item",
            [[f"mp-{number}" for number in numbers]],
        )
        return {int(item.removeprefix("mp-")): count for item, count in rows}

    # What is stored -------------------------------------------------------

    def stored(self, target: Target, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The stored records of ``keys`` in ``target``'s store: key -> state, status, attempts."""
        return self.redis_records(keys) if target.in_redis else self.database_records(keys)

    def database_records(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        rows = self.database.rows(
            f"SELECT key, state, response_status, attempts, locked_until FROM {KEYS_TABLE}"
            " WHERE key = ANY(%s)",
            [list(keys)],
        )
        return {
            key: {"state": state, "status": status, "attempts": attempts, "locked_until": until}
            for key, state, status, attempts, until in rows
        }

    def redis_records(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Records of ``keys`` in Redis, by key (of requests in one scope)."""
        wanted = set(keys)
        records = {}
        for record in self.all_redis_records():
            if record["key"] in wanted:
                records[record["key"]] = record
        return records

    def all_redis_records(self) -> Iterator[dict[str, Any]]:
        """Every record of the run, whatever its scope."""
        assert self.redis is not None
        for name in self.redis.scan_iter(match=f"{self.redis_prefix}:*", count=1000):
            raw = self.redis.get(name)
            if raw is not None:
                yield json.loads(raw)

    def lease_end(self, target: Target, key: str) -> float:
        """When the in-progress claim of ``key`` ends (seconds since the epoch)."""
        record = self.stored(target, [key])[key]
        if target.in_redis:
            assert record["state"] == "in_progress", record
            return float(record["locked_until"]) / 1000
        assert record["state"] == "in_progress", record
        until: datetime = record["locked_until"]
        return until.timestamp()
