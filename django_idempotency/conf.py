"""Settings, read lazily so that ``override_settings`` works everywhere.

Every setting is optional and prefixed ``IDEMPOTENCY_``. Values are validated
by the system checks in :mod:`django_idempotency.checks`, not here: reading a
setting never raises on a bad value that a check would report.

A protected request reads a dozen settings, most of them usually left unset;
Django answers each unset one by raising and catching ``AttributeError``
(several microseconds). So each setting is read once and kept until the
settings change: ``setting_changed``, or other settings put in place (as
``override_settings`` does).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from datetime import timedelta
from typing import Any, cast

from django.conf import settings
from django.core.signals import setting_changed
from django.utils.functional import empty
from django.utils.module_loading import import_string

DEFAULT_STORES: dict[str, dict[str, Any]] = {
    "default": {"BACKEND": "django_idempotency.stores.database.DatabaseStore"},
}


def load_callable(value: str | Callable[..., Any]) -> Callable[..., Any]:
    """Return ``value`` itself or the object its dotted path names."""
    if isinstance(value, str):
        return _import(value)
    return value


@functools.lru_cache(maxsize=128)  # a dotted path names the same object for good
def _import(path: str) -> Callable[..., Any]:
    loaded: Callable[..., Any] = import_string(path)
    return loaded


def to_seconds(value: float | timedelta) -> float:
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value)


class Settings:
    """One property per setting, each read from ``django.conf.settings`` on access.

    Each returns the raw value (or its default, which lives only here): the
    system checks validate it, and code converts it where it is used, so a
    bad value reaches the check that reports it instead of crashing it.
    (Read once, then kept until the settings change: see the module's docstring.)
    """

    def __init__(self) -> None:
        # The settings object the values were read from, and the values: one
        # pair, replaced whole, so that a thread still reading the settings
        # that were just replaced keeps its value out of the new pair.
        self._kept: tuple[object, dict[str, Any]] = (empty, {})

    def _current(self) -> tuple[object, dict[str, Any]]:
        # override_settings (and pytest-django's ``settings``, which deletes
        # without a signal) put new settings in place: kept values go with it.
        source = cast(Any, settings)._wrapped
        kept = self._kept
        if kept[0] is not source:
            kept = self._kept = (source, {})
        return kept

    def _read(self, name: str, default: Any) -> Any:
        source, values = self._current()
        try:
            return values[name]
        except KeyError:
            value = getattr(settings, name, default)
            if source is not empty:  # not configured yet: never keep
                values[name] = value
            return value

    def generation(self) -> object | None:
        """What stays the same object for as long as the settings do.

        Code that derives something from settings (a view's policy) keeps it
        against this and derives it again when it changes; ``None`` while
        the settings are not configured, when nothing may be kept.
        """
        kept = self._current()
        return None if kept[0] is empty else kept

    def forget(self) -> None:
        """Read every setting afresh from now on."""
        self._kept = (empty, {})

    @property
    def HEADER(self) -> str:
        """Name of the request header carrying the key."""
        value: str = self._read("IDEMPOTENCY_HEADER", "Idempotency-Key")
        return value

    @property
    def METHODS(self) -> Collection[str]:
        """HTTP methods that are protected (any case); others pass through untouched."""
        value: Collection[str] = self._read("IDEMPOTENCY_METHODS", ("POST", "PATCH"))
        return value

    @property
    def REQUIRED(self) -> bool:
        """Whether a protected request without a key is refused with 400."""
        value: bool = self._read("IDEMPOTENCY_REQUIRED", True)
        return value

    @property
    def SCOPE(self) -> str | Callable[..., str]:
        """Callable (or its dotted path) mapping a request to the key's scope."""
        value: str | Callable[..., str] = self._read(
            "IDEMPOTENCY_SCOPE", "django_idempotency.scopes.user_scope"
        )
        return value

    @property
    def FINGERPRINT(self) -> str | Callable[..., str]:
        """Callable (or its dotted path) mapping a request to its fingerprint."""
        value: str | Callable[..., str] = self._read(
            "IDEMPOTENCY_FINGERPRINT",
            "django_idempotency.fingerprints.request_fingerprint",
        )
        return value

    @property
    def RETENTION(self) -> float | timedelta:
        """How long a completed key is kept and replayed (seconds or timedelta)."""
        value: float | timedelta = self._read("IDEMPOTENCY_RETENTION", timedelta(hours=24))
        return value

    @property
    def MODE(self) -> str | None:
        """``"atomic"``, ``"lease"``, or ``None``: atomic where the store supports it."""
        value: str | None = self._read("IDEMPOTENCY_MODE", None)
        return value

    @property
    def LEASE(self) -> float | timedelta:
        """How long a ``lease`` claim is held before another request may take it over."""
        value: float | timedelta = self._read("IDEMPOTENCY_LEASE", 30)
        return value

    @property
    def WAIT(self) -> float | timedelta:
        """Seconds to wait for an in-flight duplicate before answering 409 (0: at once)."""
        value: float | timedelta = self._read("IDEMPOTENCY_WAIT", 0)
        return value

    @property
    def RETRY_AFTER(self) -> int:
        """``Retry-After`` seconds sent with a 409 when the remaining time is unknown."""
        value: int = self._read("IDEMPOTENCY_RETRY_AFTER", 1)
        return value

    @property
    def STORE(self) -> str:
        """Alias, in ``IDEMPOTENCY_STORES``, of the store views use by default."""
        value: str = self._read("IDEMPOTENCY_STORE", "default")
        return value

    @property
    def STORES(self) -> dict[str, dict[str, Any]]:
        """Store aliases: ``{"alias": {"BACKEND": dotted path, "OPTIONS": {...}}}``."""
        value: dict[str, dict[str, Any]] = self._read("IDEMPOTENCY_STORES", DEFAULT_STORES)
        return value

    @property
    def REPLAYED_HEADERS(self) -> Collection[str]:
        """Response headers stored and replayed (besides the status and body)."""
        value: Collection[str] = self._read(
            "IDEMPOTENCY_REPLAYED_HEADERS", ("Content-Type", "Location")
        )
        return value

    @property
    def RELEASE_STATUSES(self) -> Collection[int]:
        """Statuses (besides every 5xx) after which nothing is kept, so a retry runs."""
        value: Collection[int] = self._read("IDEMPOTENCY_RELEASE_STATUSES", (401, 403, 408, 429))
        return value

    @property
    def ENCRYPTION_KEYS(self) -> Any:
        """Keys (Fernet's format), newest first, that stored values are sealed with; empty: none."""
        return self._read("IDEMPOTENCY_ENCRYPTION_KEYS", None) or ()

    @property
    def MAX_BODY_SIZE(self) -> int:
        """Largest response body, in bytes, that is stored for replay."""
        value: int = self._read("IDEMPOTENCY_MAX_BODY_SIZE", 1024 * 1024)
        return value

    # Outbox (django_idempotency.outbox) -----------------------------------

    @property
    def OUTBOX_SENDER(self) -> str | Callable[..., object] | None:
        """Callable (or its dotted path) that sends one outbox message; ``None``: unset."""
        value: str | Callable[..., object] | None = getattr(
            settings, "IDEMPOTENCY_OUTBOX_SENDER", None
        )
        return value

    @property
    def OUTBOX_RETENTION(self) -> float | timedelta:
        """How long sent outbox messages are kept before the purge deletes them."""
        value: float | timedelta = getattr(
            settings, "IDEMPOTENCY_OUTBOX_RETENTION", timedelta(days=7)
        )
        return value


app_settings = Settings()


def _setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting.startswith("IDEMPOTENCY_"):
        app_settings.forget()


setting_changed.connect(_setting_changed, dispatch_uid="django_idempotency.conf")
