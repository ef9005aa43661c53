"""Deciding what of a response is stored: the ``redact`` option and ready-made hooks.

A stored response is what a replay returns, and it may hold personal data
until it expires. ``@idempotent(redact=...)`` (``idempotency_redact`` on the
DRF mixin) takes a function ``(request, snapshot) -> snapshot`` that is
applied before anything reaches the store: the first response goes back to
its caller whole, replays return what the function kept. For idempotent
functions, ``redact`` takes the result and returns what to store.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest

from django_idempotency.conf import load_callable
from django_idempotency.protocol import Snapshot

Redact = Callable[[HttpRequest, Snapshot], Snapshot]


def status_only(request: HttpRequest, snapshot: Snapshot) -> Snapshot:
    """Store the status and the ``Location`` header (a reference), no body."""
    location = tuple((n, v) for n, v in snapshot.headers if n.lower() == "location")
    return Snapshot(status=snapshot.status, headers=location, body=b"")


def drop_fields(*paths: str) -> Redact:
    """A hook that removes fields from a JSON body; ``"card.number"`` reaches into objects.

    A body that is not a JSON object is stored as is; so are missing fields.
    """
    if not paths or not all(isinstance(p, str) and p for p in paths):
        raise ImproperlyConfigured("drop_fields() needs one or more field names.")
    split = [path.split(".") for path in paths]

    def redact(request: HttpRequest, snapshot: Snapshot) -> Snapshot:
        try:
            data = json.loads(snapshot.body)
        except (ValueError, UnicodeDecodeError):
            return snapshot
        if not isinstance(data, dict):
            return snapshot
        for parts in split:
            _drop(data, parts)
        return replace(snapshot, body=json.dumps(data, separators=(",", ":")).encode())

    return redact


def resolve(value: Any, name: str = "redact") -> Callable[..., Any] | None:
    """The hook ``value`` names (a callable or its dotted path), checked when decorating."""
    if value is None:
        return None
    try:
        hook = load_callable(value)
    except ImportError as exc:
        raise ImproperlyConfigured(f"{name}={value!r} cannot be imported: {exc}") from exc
    if not callable(hook):
        raise ImproperlyConfigured(
            f"{name} must be a callable (or its dotted path) deciding what is stored, "
            f"not {value!r}."
        )
    return hook


def apply(hook: Redact, request: HttpRequest, snapshot: Snapshot) -> Snapshot:
    """``snapshot`` as ``hook`` lets it be stored."""
    kept = hook(request, snapshot)
    if not isinstance(kept, Snapshot):
        raise TypeError(
            f"The redact hook {hook!r} must return a Snapshot (dataclasses.replace() the one "
            f"it receives), not {type(kept).__name__}."
        )
    return kept


def _drop(data: dict[str, Any], parts: list[str]) -> None:
    *parents, last = parts
    for part in parents:
        child = data.get(part)
        if not isinstance(child, dict):
            return
        data = child
    data.pop(last, None)
