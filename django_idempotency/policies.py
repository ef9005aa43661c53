"""The options every adapter shares (mode, lease, wait, retention, store) and the policy they make.

Per-call values override the settings; ``None`` means "the setting". Bad
values are refused when the options are made (at decoration time), not when
the first request arrives.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from django_idempotency.conf import app_settings, to_seconds
from django_idempotency.keys import MAX_KEY_LENGTH
from django_idempotency.protocol import MODES, Policy

Seconds = float | timedelta


@dataclass(frozen=True, kw_only=True)
class ProtocolOptions:
    """How a view or function is protected; ``None`` means "the setting"."""

    retention: Seconds | None = None
    mode: str | None = None
    lease: Seconds | None = None
    wait: Seconds | None = None
    store: str | None = None

    def __post_init__(self) -> None:
        # Subclasses' fields (a view's methods, scope...) are checked too.
        problems = option_problems({f.name: getattr(self, f.name) for f in fields(self)})
        if problems:
            raise ImproperlyConfigured(" ".join(problems))

    def policy(self) -> Policy:
        """The engine's policy, with the settings in force now (``override_settings`` applies).

        Made once and kept until the settings change: a task or view
        protected thousands of times a second asks for it on every call.
        """
        generation = app_settings.generation()
        kept = self.__dict__.get("_kept_policy")
        if kept is not None and generation is not None and kept[0] is generation:
            policy: Policy = kept[1]
            return policy
        policy = self._make_policy()
        if generation is not None:
            # Not a field: the options stay frozen and compare by what they were given.
            object.__setattr__(self, "_kept_policy", (generation, policy))
        return policy

    def _make_policy(self) -> Policy:
        def seconds(value: Seconds | None, default: Seconds) -> float:
            return to_seconds(default if value is None else value)

        return Policy(
            # None: the engine applies IDEMPOTENCY_MODE (and the rule for async code).
            mode=self.mode,
            retention=seconds(self.retention, app_settings.RETENTION),
            lease=seconds(self.lease, app_settings.LEASE),
            wait=seconds(self.wait, app_settings.WAIT),
            store=self.store or app_settings.STORE,
            retry_after=int(app_settings.RETRY_AFTER),
        )


_HTTP_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "POST", "PUT", "PATCH", "DELETE"})


def option_problems(options: Mapping[str, Any], prefix: str = "") -> list[str]:
    """What is wrong with per-view or per-function ``options`` (``None``: "the setting").

    ``prefix`` names them as the caller wrote them (``idempotency_`` for the
    DRF mixin's class attributes). Shared by the options and the system checks.
    """
    problems: list[str] = []

    def wrong(name: str, expected: str) -> None:
        problems.append(f"{prefix}{name} must be {expected}, not {options[name]!r}.")

    def given(name: str) -> bool:
        return options.get(name) is not None

    if given("methods"):
        methods = options["methods"]
        if isinstance(methods, str):
            wrong(
                "methods",
                f'a collection of HTTP methods such as {prefix}methods=("{methods.upper()}",)',
            )
        elif not isinstance(methods, Collection) or not all(
            isinstance(m, str) and m.upper() in _HTTP_METHODS for m in methods
        ):
            wrong(
                "methods", f"a collection of HTTP methods among {', '.join(sorted(_HTTP_METHODS))}"
            )
    if given("required") and not isinstance(options["required"], bool):
        wrong("required", "True, False or None")
    for name in ("scope", "fingerprint"):
        if given(name) and not (callable(options[name]) or isinstance(options[name], str)):
            wrong(name, "a callable taking the request, or its dotted path")
    for name, least in (("retention", "positive"), ("lease", "positive"), ("wait", "zero or more")):
        if given(name) and not _is_seconds(options[name], allow_zero=least != "positive"):
            wrong(name, f"{least} seconds (a number or a timedelta)")
    if given("mode") and options["mode"] not in MODES:
        wrong("mode", f"one of {', '.join(MODES)}")
    if given("store"):
        stores = app_settings.STORES
        if not isinstance(options["store"], str):
            wrong("store", "an alias of IDEMPOTENCY_STORES")
        elif isinstance(stores, Mapping) and options["store"] not in stores:
            wrong("store", f"an alias of IDEMPOTENCY_STORES ({', '.join(map(repr, stores))})")
    return problems


def _is_seconds(value: Any, *, allow_zero: bool) -> bool:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return value >= 0 if allow_zero else value > 0


def fit_scope(scope: str) -> str:
    """Keep long scopes (and function keys) within the column, distinct from one another."""
    if len(scope) <= MAX_KEY_LENGTH:
        return scope
    return "sha256:" + hashlib.sha256(scope.encode()).hexdigest()
