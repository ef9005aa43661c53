"""Where claims and outcomes are kept.

A store is named by an alias in ``IDEMPOTENCY_STORES``; its ``BACKEND`` is the
dotted path of a :class:`Store` subclass and its ``OPTIONS`` are passed to it
as keyword arguments. Each alias is built once, on first use, and built again
after a setting changes (tests override settings).
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.utils.module_loading import import_string

from django_idempotency.conf import app_settings
from django_idempotency.stores.base import Store

__all__ = ["Store", "get_store"]

_built: dict[str, Store] = {}


def get_store(alias: str) -> Store:
    """The store configured under ``alias`` in ``IDEMPOTENCY_STORES``."""
    store = _built.get(alias)
    if store is None:
        store = _built[alias] = build_store(alias)
    return store


def build_store(alias: str) -> Store:
    """A new store from the configuration of ``alias``; raises on a bad one."""
    stores = app_settings.STORES
    config = stores.get(alias) if isinstance(stores, dict) else None
    if config is None:
        raise ImproperlyConfigured(f"No idempotency store is configured as {alias!r}.")
    backend = import_string(config["BACKEND"])
    store = backend(alias, **config.get("OPTIONS", {}))
    if not isinstance(store, Store):
        raise ImproperlyConfigured(f"{config['BACKEND']} is not an idempotency Store.")
    return store


@receiver(setting_changed)
def _forget_stores(**kwargs: Any) -> None:
    # A store reads other settings too (CACHES, DATABASES): any change may matter.
    _built.clear()
