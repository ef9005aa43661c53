"""The options every adapter shares (mode, lease, wait, retention, store) and the policy they make.

Per-call values override the settings; ``None`` means "the setting". Bad
values are refused when the options are made (at decoration time), not when
the first request arrives.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import timedelta

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
        if self.mode is not None and self.mode not in MODES:
            raise ImproperlyConfigured(
                f"mode must be one of {', '.join(MODES)}, not {self.mode!r}."
            )
        for name in ("retention", "lease"):
            value = getattr(self, name)
            if value is not None and to_seconds(value) <= 0:
                raise ImproperlyConfigured(f"{name} must be positive, not {value!r}.")
        if self.wait is not None and to_seconds(self.wait) < 0:
            raise ImproperlyConfigured(f"wait must be zero or positive, not {self.wait!r}.")

    def policy(self) -> Policy:
        """The engine's policy, the settings read now (``override_settings`` applies)."""

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


def fit_scope(scope: str) -> str:
    """Keep long scopes (and function keys) within the column, distinct from one another."""
    if len(scope) <= MAX_KEY_LENGTH:
        return scope
    return "sha256:" + hashlib.sha256(scope.encode()).hexdigest()
