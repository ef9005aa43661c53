"""Encryption of stored outcomes at rest (``IDEMPOTENCY_ENCRYPTION_KEYS``).

A sealed snapshot keeps its status in clear (the admin lists it) and carries
its headers and body inside one Fernet token, behind
:data:`SEALED_PREFIX`. The token's plaintext also names the scope and key it
belongs to, so a token copied into another row is refused instead of replayed
to someone else. Keys are tried newest first (``MultiFernet``): older keys
still decrypt, the newest encrypts.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from django_idempotency.conf import app_settings
from django_idempotency.exceptions import SnapshotUnreadable
from django_idempotency.protocol import Call, Snapshot

try:
    from cryptography.fernet import Fernet, InvalidToken, MultiFernet
except ImportError:  # the crypto extra is missing: check E041 reports it if keys are set
    Fernet = MultiFernet = None  # type: ignore[assignment,misc]
    InvalidToken = ValueError  # type: ignore[assignment,misc]

logger = logging.getLogger("django_idempotency")

#: How a sealed body starts; a plain body never needs to (NUL is not text).
SEALED_PREFIX = b"\x00idempotency-fernet\x00"


class Undecryptable(Exception):
    """No configured key decrypts a stored outcome (raised by :func:`reseal`)."""


@dataclass(frozen=True)
class Resealing:
    """What re-encrypting a store did (or, on a dry run, would do)."""

    #: Completed keys looked at.
    examined: int = 0
    #: Outcomes encrypted with the newest key (clear ones included).
    resealed: int = 0
    #: Outcomes that no configured key decrypts: left as they are.
    unreadable: int = 0

    def __add__(self, other: Resealing) -> Resealing:
        return Resealing(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def encryption_keys() -> tuple[str | bytes, ...]:
    """``IDEMPOTENCY_ENCRYPTION_KEYS``, newest first; empty: snapshots stored in clear."""
    value = app_settings.ENCRYPTION_KEYS
    if isinstance(value, str | bytes):
        # A lone key is a common slip; the check reports it, this keeps it usable.
        return (value,)
    return tuple(value)


def enabled() -> bool:
    return bool(encryption_keys())


def is_sealed(body: bytes) -> bool:
    return body.startswith(SEALED_PREFIX)


def seal(snapshot: Snapshot, call: Call) -> Snapshot:
    """``snapshot`` as it is stored: encrypted with the newest key, or as is."""
    keys = encryption_keys()
    if not keys:
        return snapshot
    envelope = json.dumps(
        {"s": call.scope, "k": call.key, "h": [list(header) for header in snapshot.headers]},
        separators=(",", ":"),
    ).encode()
    token = _fernet(keys).encrypt(envelope + b"\n" + snapshot.body)
    return Snapshot(status=snapshot.status, headers=(), body=SEALED_PREFIX + token)


def unseal(snapshot: Snapshot, call: Call) -> Snapshot:
    """The stored ``snapshot`` as it is replayed; raises :class:`SnapshotUnreadable`."""
    keys = encryption_keys()
    if not is_sealed(snapshot.body):
        if keys:
            # With encryption on, a clear body is either older than the keys
            # (reencrypt_idempotency_keys seals it) or a tampered token.
            _refuse(call, "it is stored in clear while encryption is on")
        return snapshot
    if not keys:
        _refuse(call, "it is encrypted and IDEMPOTENCY_ENCRYPTION_KEYS is empty")
    if MultiFernet is None:
        _refuse(call, "the cryptography package is missing")
    try:
        plaintext = _fernet(keys).decrypt(snapshot.body[len(SEALED_PREFIX) :])
    except InvalidToken:
        _refuse(call, "no configured key decrypts it, or it was altered")
    envelope, _, body = plaintext.partition(b"\n")
    meta = json.loads(envelope)
    if meta.get("s") != call.scope or meta.get("k") != call.key:
        _refuse(call, "it was sealed for another key")
    headers = tuple((str(name), str(value)) for name, value in meta.get("h", ()))
    return Snapshot(status=snapshot.status, headers=headers, body=body)


def reseal(body: bytes, scope: str, key: str, headers: Iterable[Any] = ()) -> bytes | None:
    """``body`` sealed with the newest key; ``None`` if it already is.

    For ``reencrypt_idempotency_keys``: a clear body (stored before encryption
    was turned on) is sealed together with its ``headers``; a sealed one is
    re-encrypted with the newest key. Raises :class:`Undecryptable` when no
    configured key decrypts it.
    """
    keys = encryption_keys()
    if not is_sealed(body):
        plain = Snapshot(
            status=0, headers=tuple((str(n), str(v)) for n, v in headers), body=bytes(body)
        )
        return seal(plain, Call(scope=scope, key=key, fingerprint="")).body
    token = body[len(SEALED_PREFIX) :]
    try:
        _fernet(keys[:1]).decrypt(token)
    except InvalidToken:
        pass
    else:
        return None
    try:
        return SEALED_PREFIX + _fernet(keys).rotate(token)
    except InvalidToken as exc:
        raise Undecryptable from exc


def _refuse(call: Call, reason: str) -> Any:
    logger.error("Refused to replay %s: its stored response is unreadable (%s)", call, reason)
    raise SnapshotUnreadable(
        "The stored response for this idempotency key cannot be read; it is not "
        "replayed and the request is not run again."
    )


@functools.lru_cache(maxsize=8)
def _fernet(keys: tuple[str | bytes, ...]) -> MultiFernet:
    # Keyed by the keys themselves: a changed setting (a rotation, or
    # override_settings in tests) builds a new one, with no signal to miss.
    if MultiFernet is None:
        raise ImproperlyConfigured(
            "IDEMPOTENCY_ENCRYPTION_KEYS needs the cryptography package: "
            "install django-idempotency[crypto]."
        )
    return MultiFernet([Fernet(key) for key in keys])
