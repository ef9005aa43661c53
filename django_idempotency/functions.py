"""Idempotent functions and blocks: Celery tasks, queue consumers, webhook handlers.

The same protocol as for views, keyed by what the caller passes instead of a
request header; the outcome kept is the JSON of the function's result.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import wraps
from typing import Any, TypeVar

from django.core.exceptions import ImproperlyConfigured
from django.core.serializers.json import DjangoJSONEncoder

from django_idempotency import engine, redaction
from django_idempotency.exceptions import KeyMalformed
from django_idempotency.policies import ProtocolOptions, Seconds, fit_scope
from django_idempotency.protocol import Call, Snapshot

Function = TypeVar("Function", bound=Callable[..., Any])
_RESULT_HEADERS = (("Content-Type", "application/json"),)


@dataclass
class Block:
    """What the body of :func:`idempotent_block` finds and leaves.

    ``replayed`` is true when the key was used before: ``result`` is then the
    stored result, and the body must not do the work again. Otherwise the
    body does the work and sets ``result`` (JSON-serialisable), which is
    stored; after the block, ``result`` reads as a replay would return it.
    """

    replayed: bool
    result: Any = None


def idempotent_block(
    key: str | int,
    *,
    scope: str,
    payload: Any = None,
    mode: str | None = None,
    lease: Seconds | None = None,
    wait: Seconds | None = None,
    retention: Seconds | None = None,
    store: str | None = None,
    redact: Callable[[Any], Any] | None = None,
) -> contextlib.AbstractContextManager[Block]:
    """Run a block at most once per (scope, key); for code that is not a function.

    ``payload`` is the JSON-serialisable data the key stands for: reusing the
    key with a different payload raises ``FingerprintMismatch``. A duplicate
    while the first block runs raises ``RequestInProgress`` (after waiting up to
    ``wait`` seconds); an exception in the block frees the key. ``redact``,
    called with the result, returns what is stored instead. In ``atomic``
    mode the block runs in the store's transaction, so its own database writes
    and the stored result commit together::

        with idempotent_block(message["id"], scope="payments", payload=message) as block:
            if not block.replayed:
                block.result = capture(message)
        return block.result
    """
    options = ProtocolOptions(mode=mode, lease=lease, wait=wait, retention=retention, store=store)
    call = function_call(key, scope=scope, payload=payload)
    return protected_block(call, options, redaction.resolve(redact))


def idempotent_function(
    *,
    key: Callable[..., str | int],
    scope: str | Callable[..., str] | None = None,
    fingerprint: Callable[..., Any] | None = None,
    mode: str | None = None,
    lease: Seconds | None = None,
    wait: Seconds | None = None,
    retention: Seconds | None = None,
    store: str | None = None,
    redact: Callable[[Any], Any] | None = None,
) -> Callable[[Function], Function]:
    """Make a function (task, queue consumer, webhook handler) run once per key.

    ``key`` is called with the function's arguments and returns the key, for
    example ``key=lambda message: message["id"]``. ``scope`` (a string, or a
    callable like ``key``) defaults to the function's dotted name.
    ``fingerprint``, called like ``key``, returns the JSON-serialisable data
    that must match for a repeat to be the same call; by default all the
    arguments. The result must be JSON-serialisable: it is stored, and a
    repeat returns it (decoded from JSON, as the first call does) without
    running the function. ``redact``, called with the result, returns what is
    stored instead (the first call still returns the whole result). Otherwise
    as :func:`idempotent_block`.
    """
    options = ProtocolOptions(mode=mode, lease=lease, wait=wait, retention=retention, store=store)
    redact_result = redaction.resolve(redact)
    if not callable(key):
        raise ImproperlyConfigured(
            "idempotent_function(key=...) must be a callable receiving the function's "
            'arguments, for example key=lambda message: message["id"].'
        )

    def decorator(func: Function) -> Function:
        if inspect.iscoroutinefunction(func):
            raise ImproperlyConfigured(
                f"idempotent_function does not support the coroutine function {func.__name__}."
            )
        name = f"{func.__module__}.{func.__qualname__}"
        signature = inspect.signature(func)

        def call_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
            if fingerprint is not None:
                payload = fingerprint(*args, **kwargs)
            else:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                payload = bound.arguments
            if scope is None:
                call_scope = f"function:{name}"
            else:
                call_scope = scope(*args, **kwargs) if callable(scope) else scope
            return function_call(
                key(*args, **kwargs), scope=str(call_scope), payload=payload, path=name
            )

        @wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with protected_block(call_of(args, kwargs), options, redact_result) as block:
                if not block.replayed:
                    block.result = func(*args, **kwargs)
            return block.result

        return wrapper  # type: ignore[return-value]

    return decorator


def function_call(key: str | int, *, scope: str, payload: Any, path: str = "") -> Call:
    """The engine's call for ``key`` in ``scope``, fingerprinted by ``payload`` (as JSON)."""
    return Call(
        scope=fit_scope(scope),
        key=_function_key(key),
        fingerprint=_payload_fingerprint(payload),
        path=path,
    )


@contextlib.contextmanager
def protected_block(
    call: Call, options: ProtocolOptions, redact: Callable[[Any], Any] | None = None
) -> Iterator[Block]:
    """The :class:`Block` of ``call``, for adapters that make ``options`` once.

    :func:`idempotent_block` and the function and task decorators run their
    code in one; ``redact`` is a resolved hook (:func:`redaction.resolve`).
    """
    with engine.protected(call, options.policy()) as guard:
        if guard.replay is not None:
            yield Block(replayed=True, result=json.loads(guard.replay.body))
            return
        block = Block(replayed=False)
        yield block
        # Raising here (a result that is not JSON) frees the key like any error.
        text = _result_json(block.result)
        kept = text if redact is None else _result_json(redact(json.loads(text)))
        guard.conclusion = Snapshot(status=200, headers=_RESULT_HEADERS, body=kept.encode())
        block.result = json.loads(text)


def _function_key(key: str | int) -> str:
    # An int is a common message id; anything else (None above all) would
    # silently make unrelated calls share one key.
    if isinstance(key, int) and not isinstance(key, bool):
        key = str(key)
    if not isinstance(key, str) or not key:
        raise KeyMalformed(f"An idempotency key must be a non-empty string, not {key!r}.")
    return fit_scope(key)


# Made once: json.dumps() with options builds an encoder on every call.
_CANONICAL = DjangoJSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _payload_fingerprint(payload: Any) -> str:
    """SHA-256 of the payload as canonical JSON (sorted keys, no white space)."""
    try:
        canonical = _CANONICAL.encode(payload)
    except TypeError as exc:
        raise TypeError(
            f"Cannot fingerprint the arguments as JSON ({exc}); pass fingerprint= "
            "(or payload=) returning the JSON-serialisable data that identifies the call."
        ) from exc
    return hashlib.sha256(canonical.encode()).hexdigest()


def _result_json(result: Any) -> str:
    try:
        return _COMPACT.encode(result)
    except TypeError as exc:
        raise TypeError(
            f"The result of an idempotent function must be JSON-serialisable: {exc}"
        ) from exc
