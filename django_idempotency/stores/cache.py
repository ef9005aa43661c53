"""The Redis store: keys in a django-redis cache, ``lease`` mode only.

Each (scope, key) is one Redis string holding a JSON record: its state, owner
token, fingerprint, lease end and expiry, and once completed the snapshot.
A claim, a completion and a release are each one Lua script (one round trip:
a replay is one, a first execution two); the claim stores a new record or
decides about the existing one, the others compare the owner token. Every
operation touches a single key and works on Redis Cluster as on a single
server.

Times in the record are the application's clock (milliseconds since the
epoch), as with the database store; Redis' own expiry only collects records
once nobody can need them any more.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import logging
import math
import time
import uuid
from collections.abc import Iterator
from typing import Any

from django.conf import settings
from django.core.cache import caches
from django.core.exceptions import ImproperlyConfigured
from django_redis import get_redis_connection  # type: ignore[import-untyped]
from django_redis.cache import RedisCache  # type: ignore[import-untyped]
from redis import Redis
from redis.exceptions import ClusterError, NoScriptError, RedisClusterException, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from django_idempotency import sealing
from django_idempotency.exceptions import FingerprintMismatch, RequestInProgress, StoreUnavailable
from django_idempotency.protocol import Call, Claim, Execute, Policy, Replay, Snapshot
from django_idempotency.sealing import Resealing
from django_idempotency.stores.base import Erasure, Store

logger = logging.getLogger("django_idempotency")

IN_PROGRESS = "in_progress"
COMPLETED = "completed"

# KEYS[1]: the record. ARGV[1]: a fresh in-progress record (JSON), ARGV[2]:
# now (ms), ARGV[3]: its time to live (ms). Stores the fresh record where there
# is none; decides like the database store does about an existing one.
_CLAIM = """
local raw = redis.call('GET', KEYS[1])
if not raw then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  return {'claimed'}
end
local record = cjson.decode(raw)
local fresh = cjson.decode(ARGV[1])
local now = tonumber(ARGV[2])
local live = record.state == 'in_progress' and record.locked_until > now
if record.expires <= now and not live then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  return {'claimed'}
end
if record.fingerprint ~= fresh.fingerprint then
  return {'mismatch'}
end
if record.state == 'completed' then
  return {'replay', raw}
end
if live then
  return {'in_progress', tostring(record.locked_until - now)}
end
fresh.attempts = record.attempts + 1
fresh.created = record.created
redis.call('SET', KEYS[1], cjson.encode(fresh), 'PX', ARGV[3])
return {'taken_over', tostring(fresh.attempts)}
"""

# KEYS[1]: the record. ARGV[1]: the owner token, ARGV[2]: the completed
# record (JSON), ARGV[3]: its time to live (ms). Stores only for the owner.
_COMPLETE = """
local raw = redis.call('GET', KEYS[1])
if not raw then
  return 0
end
local record = cjson.decode(raw)
if record.token ~= ARGV[1] or record.state ~= 'in_progress' then
  return 0
end
local done = cjson.decode(ARGV[2])
done.attempts = record.attempts
done.created = record.created
redis.call('SET', KEYS[1], cjson.encode(done), 'PX', ARGV[3])
return 1
"""

# KEYS[1]: the record. ARGV[1]: the owner token. Deletes only the owner's claim.
_RELEASE = """
local raw = redis.call('GET', KEYS[1])
if not raw then
  return 0
end
local record = cjson.decode(raw)
if record.token == ARGV[1] and record.state == 'in_progress' then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


# KEYS[1]: a record. ARGV[1]: the scope. Deletes it if it belongs to the scope
# (its name holds only a digest of the scope).
_ERASE = """
local raw = redis.call('GET', KEYS[1])
if raw and cjson.decode(raw).scope == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

# KEYS[1]: a record. ARGV[1]: its value as read, ARGV[2]: the new value.
# Replaces it, keeping its time to live, only if nothing changed it meanwhile.
_SWAP = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
return 1
"""

#: The SHA-1 of each script above, by which EVALSHA names it.
_SHA1 = {
    script: hashlib.sha1(script.encode()).hexdigest() for script in (_CLAIM, _COMPLETE, _RELEASE)
}


class CacheStore(Store):
    """Keys in Redis, through a django-redis cache; supports ``lease`` only.

    Options: ``CACHE``, the alias in ``CACHES`` (a ``django_redis`` backend);
    ``FAIL_OPEN``: when Redis cannot be reached, run the code unprotected and
    log an error (``True``) instead of refusing it with 503 (``False``, the
    default).
    """

    supports_atomic = False

    def __init__(self, alias: str, *, CACHE: str = "default", FAIL_OPEN: bool = False) -> None:
        super().__init__(alias)
        if CACHE not in settings.CACHES:
            raise ImproperlyConfigured(f"CACHE {CACHE!r} is not an alias in CACHES.")
        if not isinstance(caches[CACHE], RedisCache):
            raise ImproperlyConfigured(
                f"CACHE {CACHE!r} must use django-redis (django_redis.cache.RedisCache)."
            )
        if not isinstance(FAIL_OPEN, bool):
            raise ImproperlyConfigured(f"FAIL_OPEN must be True or False, not {FAIL_OPEN!r}.")
        self.cache = CACHE
        self.fail_open = FAIL_OPEN

    def claim(self, call: Call, policy: Policy) -> Claim:
        token = uuid.uuid4().hex
        now = _now_ms()
        name = self.record_name(call.scope, call.key)
        fresh = _dumps(_in_progress(call, policy, token, now))
        ttl = _ms(max(policy.retention, policy.lease))
        with self._reachable() as client:
            decision = _run(client, _CLAIM, name, fresh, now, ttl)
        return self._decide(call, token, decision)

    def complete(self, claim: Execute, snapshot: Snapshot, policy: Policy) -> bool:
        now = _now_ms()
        done = _completed(claim, snapshot, policy, now)
        name = self.record_name(claim.call.scope, claim.call.key)
        with self._reachable() as client:
            stored = _run(client, _COMPLETE, name, claim.token, _dumps(done), _ms(policy.retention))
        return bool(stored)

    def release(self, claim: Execute) -> None:
        name = self.record_name(claim.call.scope, claim.call.key)
        with self._reachable() as client:
            _run(client, _RELEASE, name, claim.token)

    def record(self, scope: str, key: str) -> dict[str, Any] | None:
        """The stored record of (scope, key), decoded; for inspection and tests."""
        with self._reachable() as client:
            raw = client.get(self.record_name(scope, key))
        return None if raw is None else _loads(raw)

    def record_name(self, scope: str, key: str) -> str:
        """The Redis key of (scope, key): hashed, so any scope and key fit unambiguously.

        It starts with a digest of the scope alone, so that :meth:`erase` finds
        a scope's records with ``SCAN MATCH``.
        """
        digest = hashlib.sha256(f"{scope}\0{key}".encode()).hexdigest()
        return self._name(f"{_scope_digest(scope)}:{digest}")

    def erase(
        self,
        scope: str,
        *,
        dry_run: bool = False,
        batch_size: int = 1000,
        include_pending: bool = False,
    ) -> Erasure:
        # Only keys: steps and outbox messages need the database store.
        pattern = f"{_glob_escape(self._name(_scope_digest(scope)))}:*"
        erased = 0
        with self._reachable() as client:
            erase = client.register_script(_ERASE)
            for name in client.scan_iter(match=pattern, count=batch_size):
                if dry_run:
                    raw = client.get(name)
                    erased += raw is not None and _loads(raw).get("scope") == scope
                else:
                    erased += int(erase(keys=[name], args=[scope], client=client))
        return Erasure(keys=erased)

    def sample_outcomes(self, limit: int) -> list[tuple[str, str, bytes]]:
        """Up to ``limit`` stored outcomes, as (scope, key, body): for check E042.

        Whichever ``SCAN`` meets first (Redis keeps no order), looking at no
        more than a hundred times ``limit`` records.
        """
        sample: list[tuple[str, str, bytes]] = []
        with self._reachable() as client:
            names = client.scan_iter(match=f"{_glob_escape(self._name(''))}*", count=limit * 5)
            for name in itertools.islice(names, limit * 100):
                raw = client.get(name)
                record = None if raw is None else _loads(raw)
                if record is not None and record.get("state") == COMPLETED:
                    body = base64.b64decode(record.get("body", ""))
                    sample.append((record["scope"], record["key"], body))
                    if len(sample) >= limit:
                        break
        return sample

    def reseal(self, *, dry_run: bool = False, batch_size: int = 1000) -> Resealing:
        done = Resealing()
        with self._reachable() as client:
            swap = client.register_script(_SWAP)
            for name in client.scan_iter(
                match=f"{_glob_escape(self._name(''))}*", count=batch_size
            ):
                raw = client.get(name)
                record = None if raw is None else _loads(raw)
                if raw is None or record is None or record.get("state") != COMPLETED:
                    continue
                done += Resealing(examined=1) + self._reseal_record(
                    swap, client, name, raw, record, dry_run
                )
        return done

    def _reseal_record(
        self,
        swap: Any,
        client: Redis,
        name: bytes,
        raw: bytes | str,
        record: dict[str, Any],
        dry_run: bool,
    ) -> Resealing:
        body = base64.b64decode(record.get("body", ""))
        try:
            sealed = sealing.reseal(
                body, record["scope"], record["key"], record.get("headers") or ()
            )
        except sealing.Undecryptable:
            logger.error("Not re-encrypted: no configured key decrypts Redis key %r", name)
            return Resealing(unreadable=1)
        if sealed is None:
            return Resealing()
        if not dry_run:
            record.update(headers=[], body=base64.b64encode(sealed).decode("ascii"))
            # Swapped only if unchanged since read: a key claimed again meanwhile keeps its state.
            if not swap(keys=[name], args=[raw, _dumps(record)], client=client):
                return Resealing()
        return Resealing(resealed=1)

    def _name(self, suffix: str) -> str:
        name: str = caches[self.cache].make_key(f"django_idempotency:{suffix}")
        return name

    @contextlib.contextmanager
    def _reachable(self) -> Iterator[Redis]:
        try:
            yield get_redis_connection(self.cache)
        except (
            RedisConnectionError,
            RedisTimeoutError,
            # Redis Cluster: slots without a master (a failover under way), or
            # no node reachable to learn the cluster's layout from.
            ClusterError,
            TryAgainError,
            RedisClusterException,
        ) as exc:
            raise StoreUnavailable(f"Redis (cache {self.cache!r}) cannot be reached.") from exc

    def _decide(self, call: Call, token: str, decision: list[bytes]) -> Claim:
        verdict = decision[0].decode()
        if verdict == "claimed":
            return Execute(call, token)
        if verdict == "taken_over":
            return Execute(call, token, takeover=True)
        if verdict == "mismatch":
            raise FingerprintMismatch(
                "This idempotency key was already used for a different request."
            )
        if verdict == "replay":
            record = _loads(decision[1])
            return Replay(call, _snapshot(record))
        left_ms = int(decision[1])
        raise RequestInProgress(retry_after=math.ceil(left_ms / 1000))


def _run(client: Redis, script: str, name: str, *args: Any) -> Any:
    """Run one of the scripts above on the record ``name``: ``EVALSHA``, ``EVAL`` the first time.

    What redis-py's ``register_script`` does, without building a ``Script``
    (and hashing its text) on every call: a replay's whole claim is this one
    command.
    """
    try:
        return client.evalsha(_SHA1[script], 1, name, *args)
    except NoScriptError:  # not in the server's script cache yet (or flushed from it)
        return client.eval(script, 1, name, *args)


def _in_progress(call: Call, policy: Policy, token: str, now: int) -> dict[str, Any]:
    return {
        "state": IN_PROGRESS,
        "token": token,
        "scope": call.scope,
        "key": call.key,
        "fingerprint": call.fingerprint,
        "method": call.method,
        "path": call.path,
        "attempts": 1,
        "created": now,
        "locked_until": now + _ms(policy.lease),
        "expires": now + _ms(policy.retention),
    }


def _completed(claim: Execute, snapshot: Snapshot, policy: Policy, now: int) -> dict[str, Any]:
    call = claim.call
    return {
        "state": COMPLETED,
        "token": claim.token,
        "scope": call.scope,
        "key": call.key,
        "fingerprint": call.fingerprint,
        "method": call.method,
        "path": call.path,
        "completed": now,
        "locked_until": 0,
        "expires": now + _ms(policy.retention),
        "status": snapshot.status,
        "headers": [list(header) for header in snapshot.headers],
        "body": base64.b64encode(snapshot.body).decode("ascii"),
    }


def _snapshot(record: dict[str, Any]) -> Snapshot:
    # Lua's cjson writes an empty list as {}: "or ()" reads both as no headers.
    headers = record.get("headers") or ()
    return Snapshot(
        status=int(record["status"]),
        headers=tuple((str(name), str(value)) for name, value in headers),
        body=base64.b64decode(record.get("body", "")),
    )


def _scope_digest(scope: str) -> str:
    return hashlib.sha256(scope.encode()).hexdigest()[:32]


def _glob_escape(text: str) -> str:
    """``text`` matched literally by ``SCAN MATCH`` (a KEY_PREFIX may hold ``*`` or ``[``)."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"))


def _loads(raw: bytes | str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(raw)
    return loaded


def _now_ms() -> int:
    return int(time.time() * 1000)


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))
