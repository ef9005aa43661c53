"""Encryption at rest (``IDEMPOTENCY_ENCRYPTION_KEYS``): AES-256-GCM.

What is sealed: a stored response's headers and body (its status stays in
clear, the admin lists it), a step's recorded result and an outbox message's
payload. A token is::

    prefix | key id (4 bytes) | nonce (12 random bytes) | ciphertext | tag (16 bytes)

The key id names the configured key that sealed it, so opening a token
takes one attempt, whichever key it was. The associated data (authenticated,
not stored) binds a token to its row: the scope and key of a response; the
scope, key and name of a step; the id and topic of an outbox message. A
token copied into another row, or altered, fails authentication and is
refused instead of replayed to someone else.

Each configured key (a ``Fernet.generate_key()`` string: 32 bytes, urlsafe
base64) is not used as is: HKDF-SHA256 derives from it the AES-256 key and
the key id, so the same secret never keys two algorithms (responses sealed
by earlier versions as Fernet tokens, behind :data:`FERNET_PREFIX`, still
open with it; ``reencrypt_idempotency_keys`` moves them to AES-GCM).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any, NoReturn

from django.core.exceptions import ImproperlyConfigured

from django_idempotency.conf import app_settings
from django_idempotency.exceptions import SnapshotUnreadable
from django_idempotency.protocol import Call, Snapshot

try:
    from cryptography.exceptions import InvalidTag
    from cryptography.fernet import Fernet, InvalidToken, MultiFernet
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.hashes import SHA256
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
except ImportError:  # the crypto extra is missing: check E041 reports it if keys are set
    AESGCM = Fernet = MultiFernet = None  # type: ignore[assignment,misc]
    InvalidTag = InvalidToken = ValueError  # type: ignore[assignment,misc]

logger = logging.getLogger("django_idempotency")

#: How a sealed body starts; a plain body never needs to (NUL is not text).
SEALED_PREFIX = b"\x00idempotency-aesgcm\x00"
#: How bodies sealed as Fernet tokens (before AES-GCM) start: still opened.
FERNET_PREFIX = b"\x00idempotency-fernet\x00"
#: How a sealed value starts in a text column (a step's result, an outbox
#: payload): the token in urlsafe base64 follows. A JSON value never starts so.
TEXT_PREFIX = "idempotency-aesgcm:"

KEY_ID_SIZE = 4
NONCE_SIZE = 12
_HKDF_INFO = b"django-idempotency aes-256-gcm v1"
_HEADER = len(SEALED_PREFIX) + KEY_ID_SIZE
# Built once: json.dumps with options builds an encoder per call (microseconds).
_HEADERS_ENCODER = json.JSONEncoder(separators=(",", ":"))


class Undecryptable(Exception):
    """No configured key decrypts a stored value (raised by the ``reseal`` functions)."""


@dataclass(frozen=True)
class Resealing:
    """What re-encrypting a store did (or, on a dry run, would do)."""

    #: Stored values looked at.
    examined: int = 0
    #: Values encrypted with the newest key (clear ones included).
    resealed: int = 0
    #: Values that no configured key decrypts: left as they are.
    unreadable: int = 0

    def __add__(self, other: Resealing) -> Resealing:
        return Resealing(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def encryption_keys() -> tuple[str | bytes, ...]:
    """``IDEMPOTENCY_ENCRYPTION_KEYS``, newest first; empty: stored in clear."""
    value = app_settings.ENCRYPTION_KEYS
    if isinstance(value, str | bytes):
        # A lone key is a common slip; the check reports it, this keeps it usable.
        return (value,)
    return tuple(value)


def enabled() -> bool:
    return bool(encryption_keys())


def is_sealed(body: bytes) -> bool:
    return body.startswith(SEALED_PREFIX) or body.startswith(FERNET_PREFIX)


def key_id(key: str | bytes) -> bytes:
    """The id a token carries for ``key`` (not secret: derived one way from it)."""
    return _derive(key)[1]


# Responses -----------------------------------------------------------------------------------


def seal(snapshot: Snapshot, call: Call) -> Snapshot:
    """``snapshot`` as it is stored: encrypted with the newest key, or as is."""
    keys = encryption_keys()
    if not keys:
        return snapshot
    headers = _HEADERS_ENCODER.encode(snapshot.headers).encode()
    token = _encrypt(keys, headers + b"\n" + snapshot.body, _data("response", call.scope, call.key))
    return Snapshot(status=snapshot.status, headers=(), body=token)


def unseal(snapshot: Snapshot, call: Call) -> Snapshot:
    """The stored ``snapshot`` as it is replayed; raises :class:`SnapshotUnreadable`."""
    body = snapshot.body
    keys = encryption_keys()
    if not body.startswith(SEALED_PREFIX):
        if body.startswith(FERNET_PREFIX):
            return _unseal_fernet(snapshot, call, keys)
        if keys:
            # With encryption on, a clear body is either older than the keys
            # (reencrypt_idempotency_keys seals it) or planted in the row.
            _refuse(call, "it is stored in clear while encryption is on")
        return snapshot
    try:
        plaintext = _decrypt(keys, body, _data("response", call.scope, call.key))
    except _Unopened as exc:
        _refuse(call, str(exc))
    envelope, _, clear_body = plaintext.partition(b"\n")
    # Authenticated, so written by seal(): pairs of strings. (A str parses
    # faster than bytes, whose encoding json would detect first.)
    headers = tuple(map(tuple, json.loads(envelope.decode())))
    return Snapshot(status=snapshot.status, headers=headers, body=clear_body)


def reseal(body: bytes, scope: str, key: str, headers: Iterable[Any] = ()) -> bytes | None:
    """``body`` sealed with the newest key; ``None`` if it already is.

    For ``reencrypt_idempotency_keys``: a clear body (stored before encryption
    was turned on) is sealed together with its ``headers``; a sealed one is
    opened and sealed again with the newest key (Fernet tokens included).
    Raises :class:`Undecryptable` when no configured key decrypts it.
    """
    keys = encryption_keys()
    call = Call(scope=scope, key=key, fingerprint="")
    if not is_sealed(body):
        plain = Snapshot(
            status=0, headers=tuple((str(n), str(v)) for n, v in headers), body=bytes(body)
        )
        return seal(plain, call).body
    try:
        # Opened even under the newest key: an altered row is reported, not skipped.
        opened = unseal(Snapshot(status=0, headers=(), body=bytes(body)), call)
    except SnapshotUnreadable as exc:
        raise Undecryptable from exc
    if _is_current(keys, body):
        return None
    return seal(opened, call).body


# Step results and outbox payloads: text columns ------------------------------------------


def seal_text(text: str, context: tuple[str, ...]) -> str:
    """``text`` as a text column stores it: sealed for ``context`` if encryption is on."""
    keys = encryption_keys()
    if not keys:
        return text
    token = _encrypt(keys, text.encode(), _data(*context))
    return TEXT_PREFIX + base64.urlsafe_b64encode(token[len(SEALED_PREFIX) :]).decode("ascii")


def is_sealed_text(stored: str) -> bool:
    return stored.startswith(TEXT_PREFIX)


def unseal_text(stored: str, context: tuple[str, ...], what: str) -> str:
    """The clear text of a stored value; raises :class:`SnapshotUnreadable` (logged).

    ``what`` names the value in the log ("the result of step 'charge' of ...").
    """
    keys = encryption_keys()
    if not stored.startswith(TEXT_PREFIX):
        if keys:
            _refuse_value(what, "it is stored in clear while encryption is on")
        return stored
    token = _text_token(stored)
    if token is None:
        _refuse_value(what, "it is not a valid token")
    try:
        return _decrypt(keys, token, _data(*context)).decode()
    except _Unopened as exc:
        _refuse_value(what, str(exc))
    except UnicodeDecodeError:
        _refuse_value(what, "it is not text")


def reseal_text(stored: str, context: tuple[str, ...]) -> str | None:
    """``stored`` sealed with the newest key; ``None`` if it already is.

    Raises :class:`Undecryptable` when no configured key decrypts it.
    """
    if stored.startswith(TEXT_PREFIX):
        try:
            clear = unseal_text(stored, context, "a value being re-encrypted")
        except SnapshotUnreadable as exc:
            raise Undecryptable from exc
        token = _text_token(stored)
        if token is not None and _is_current(encryption_keys(), token):
            return None
        stored = clear
    return seal_text(stored, context)


def _text_token(stored: str) -> bytes | None:
    try:
        return SEALED_PREFIX + base64.urlsafe_b64decode(stored[len(TEXT_PREFIX) :])
    except (binascii.Error, ValueError):
        return None


def step_context(scope: str, key: str, name: str) -> tuple[str, ...]:
    """What a step's result is bound to."""
    return ("step", scope, key, name)


def message_context(message_id: Any, topic: str) -> tuple[str, ...]:
    """What an outbox message's payload is bound to."""
    return ("outbox", str(message_id), topic)


# The cipher ----------------------------------------------------------------------------------


class _Unopened(Exception):
    """Why a token could not be opened (the text goes to the log)."""


def _data(*parts: str) -> bytes:
    # Each part prefixed with its length: ("ab", "c") and ("a", "bc") differ.
    return "".join([f"{len(part)}:{part}" for part in parts]).encode()


def _encrypt(keys: tuple[str | bytes, ...], plaintext: bytes, data: bytes) -> bytes:
    kid, cipher = _keyring(keys).newest
    nonce = os.urandom(NONCE_SIZE)
    sealed: bytes = cipher.encrypt(nonce, plaintext, data)
    return SEALED_PREFIX + kid + nonce + sealed


def _decrypt(keys: tuple[str | bytes, ...], token: bytes, data: bytes) -> bytes:
    if not keys:
        raise _Unopened("it is encrypted and IDEMPOTENCY_ENCRYPTION_KEYS is empty")
    ciphers = _keyring(keys).by_id.get(token[len(SEALED_PREFIX) : _HEADER])
    if not ciphers:
        raise _Unopened("it was sealed with a key that is not configured")
    nonce = token[_HEADER : _HEADER + NONCE_SIZE]
    for cipher in ciphers:  # two keys sharing a 4-byte id: as good as never
        try:
            plaintext: bytes = cipher.decrypt(nonce, token[_HEADER + NONCE_SIZE :], data)
        except (InvalidTag, ValueError):
            continue
        return plaintext
    raise _Unopened("it was altered, or sealed for another row")


def _is_current(keys: tuple[str | bytes, ...], token: bytes) -> bool:
    """Whether ``token`` (an AES-GCM one) names the newest key."""
    return bool(keys) and token[len(SEALED_PREFIX) : _HEADER] == _keyring(keys).newest[0]


def _unseal_fernet(snapshot: Snapshot, call: Call, keys: tuple[str | bytes, ...]) -> Snapshot:
    """A snapshot sealed by an earlier version: one Fernet token, scope and key inside."""
    if not keys:
        _refuse(call, "it is encrypted and IDEMPOTENCY_ENCRYPTION_KEYS is empty")
    try:
        plaintext = _keyring(keys).fernet.decrypt(snapshot.body[len(FERNET_PREFIX) :])
    except InvalidToken:
        _refuse(call, "no configured key decrypts it, or it was altered")
    envelope, _, body = plaintext.partition(b"\n")
    meta = json.loads(envelope)
    if meta.get("s") != call.scope or meta.get("k") != call.key:
        _refuse(call, "it was sealed for another key")
    headers = tuple((str(name), str(value)) for name, value in meta.get("h", ()))
    return Snapshot(status=snapshot.status, headers=headers, body=body)


def _refuse(call: Call, reason: str) -> NoReturn:
    logger.error("Refused to replay %s: its stored response is unreadable (%s)", call, reason)
    raise SnapshotUnreadable(
        "The stored response for this idempotency key cannot be read; it is not "
        "replayed and the request is not run again."
    )


def _refuse_value(what: str, reason: str) -> NoReturn:
    logger.error("Refused to use %s: it is unreadable (%s)", what, reason)
    raise SnapshotUnreadable(
        "A value recorded for this idempotency key cannot be read; it is not used, "
        "and the work it records is not run again."
    )


@dataclass(frozen=True)
class _Keyring:
    newest: tuple[bytes, Any]
    by_id: dict[bytes, tuple[Any, ...]]
    keys: tuple[str | bytes, ...]

    @functools.cached_property
    def fernet(self) -> Any:
        """For tokens sealed by earlier versions only (built on first need)."""
        return MultiFernet([Fernet(key) for key in self.keys])


@functools.lru_cache(maxsize=8)
def _keyring(keys: tuple[str | bytes, ...]) -> _Keyring:
    # Keyed by the keys themselves: a changed setting (a rotation, or
    # override_settings in tests) builds a new one, with no signal to miss.
    if AESGCM is None:
        raise ImproperlyConfigured(
            "IDEMPOTENCY_ENCRYPTION_KEYS needs the cryptography package: "
            "install django-idempotency[crypto]."
        )
    by_id: dict[bytes, tuple[Any, ...]] = {}
    first: tuple[bytes, Any] | None = None
    for key in keys:
        secret, kid = _derive(key)
        cipher = AESGCM(secret)
        by_id[kid] = (*by_id.get(kid, ()), cipher)
        first = first or (kid, cipher)
    assert first is not None
    return _Keyring(newest=first, by_id=by_id, keys=keys)


@functools.lru_cache(maxsize=32)
def _derive(key: str | bytes) -> tuple[bytes, bytes]:
    """The AES-256 key and the key id of a configured key."""
    try:
        raw = base64.urlsafe_b64decode(key)
    except (binascii.Error, ValueError, TypeError):
        raw = b""
    if len(raw) != 32:
        raise ImproperlyConfigured(
            "An IDEMPOTENCY_ENCRYPTION_KEYS entry is not a key of 32 bytes in urlsafe "
            "base64 (make one with Fernet.generate_key())."
        )
    derived = HKDF(algorithm=SHA256(), length=32 + KEY_ID_SIZE, salt=None, info=_HKDF_INFO)
    material = derived.derive(raw)
    return material[:32], material[32:]
