"""System checks for the ``IDEMPOTENCY_*`` settings and the protected views.

Registered by :meth:`~django_idempotency.apps.IdempotencyConfig.ready`. They
validate the raw values of :data:`~django_idempotency.conf.app_settings`
(whatever their type: a check reports, it never crashes) and build stores
with :func:`~django_idempotency.stores.get_store`, as requests do.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any

from django.core.checks import CheckMessage, Error, Warning
from django.core.exceptions import ImproperlyConfigured
from django.db import connections, router
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils.module_loading import import_string

from django_idempotency.conf import app_settings
from django_idempotency.decorators import handler_options
from django_idempotency.policies import option_problems
from django_idempotency.protocol import ATOMIC, MODES
from django_idempotency.stores import get_store

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 field name
_KNOWN_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def _error(id_: int, msg: str, hint: str) -> Error:
    return Error(msg, hint=hint, id=f"django_idempotency.E{id_:03d}")


def _is_seconds(value: Any, *, allow_zero: bool = False) -> bool:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return value >= 0 if allow_zero else value > 0


def _is_callable_path(value: Any) -> bool:
    if callable(value):
        return True
    if not isinstance(value, str):
        return False
    try:
        return callable(import_string(value))
    except ImportError:
        return False


def _strings(value: Any) -> list[str] | None:
    """``value`` as a list if it is a collection of strings (not one string)."""
    if not isinstance(value, list | tuple | set | frozenset):
        return None
    items = list(value)
    return items if all(isinstance(item, str) for item in items) else None


def check_settings(**kwargs: Any) -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    header = app_settings.HEADER
    if not isinstance(header, str) or not _TOKEN.match(header):
        errors.append(
            _error(
                1,
                "IDEMPOTENCY_HEADER must be a header name.",
                'Use a name such as "Idempotency-Key".',
            )
        )
    methods = _strings(app_settings.METHODS)
    if methods is None or not {m.upper() for m in methods} <= _KNOWN_METHODS:
        errors.append(
            _error(
                2,
                "IDEMPOTENCY_METHODS must list unsafe HTTP methods.",
                f"Choose among {', '.join(sorted(_KNOWN_METHODS))}; "
                "safe methods are never protected.",
            )
        )
    if not isinstance(app_settings.REQUIRED, bool):
        errors.append(
            _error(
                3,
                "IDEMPOTENCY_REQUIRED must be True or False.",
                "True refuses protected requests without a key with 400.",
            )
        )
    for id_, name in ((4, "SCOPE"), (5, "FINGERPRINT")):
        if not _is_callable_path(getattr(app_settings, name)):
            errors.append(
                _error(
                    id_,
                    f"IDEMPOTENCY_{name} must be a callable or its dotted path.",
                    "It is called with the request and returns a string.",
                )
            )
    for id_, name in ((6, "RETENTION"), (7, "LEASE")):
        if not _is_seconds(getattr(app_settings, name)):
            errors.append(
                _error(
                    id_,
                    f"IDEMPOTENCY_{name} must be a positive number of seconds.",
                    "Give seconds as a number or a datetime.timedelta.",
                )
            )
    if not _is_seconds(app_settings.WAIT, allow_zero=True):
        errors.append(
            _error(
                8,
                "IDEMPOTENCY_WAIT must be zero or a positive number of seconds.",
                "0 answers 409 at once; a number waits for the first request.",
            )
        )
    mode = app_settings.MODE
    if mode is not None and mode not in MODES:
        errors.append(
            _error(
                9,
                f"IDEMPOTENCY_MODE must be one of {', '.join(MODES)} or None.",
                "None uses atomic where the store supports it, else lease.",
            )
        )
    errors.extend(_check_stores(mode))
    errors.extend(_check_responses())
    return errors


def _check_stores(mode: str | None) -> list[CheckMessage]:
    stores = app_settings.STORES
    if not isinstance(stores, dict) or not all(
        isinstance(c, dict) and isinstance(c.get("BACKEND"), str) for c in stores.values()
    ):
        return [
            _error(
                10,
                "IDEMPOTENCY_STORES must map aliases to {'BACKEND': ..., 'OPTIONS': ...}.",
                "See the settings reference for the store backends.",
            )
        ]
    errors: list[CheckMessage] = []
    if not isinstance(app_settings.STORE, str) or app_settings.STORE not in stores:
        errors.append(
            _error(
                11,
                f"IDEMPOTENCY_STORE {app_settings.STORE!r} is not in IDEMPOTENCY_STORES.",
                "Name one of the configured aliases.",
            )
        )
    for alias in stores:
        try:
            # Built as requests build it; kept for them if it works.
            store = get_store(alias)
        except Exception as exc:  # a check reports; it never crashes
            errors.append(
                _error(
                    12,
                    f"Idempotency store {alias!r} cannot be created: {exc}",
                    "Check its BACKEND path and OPTIONS.",
                )
            )
            continue
        if mode == ATOMIC and alias == app_settings.STORE and not store.supports_atomic:
            errors.append(
                _error(
                    13,
                    f"Idempotency store {alias!r} does not support atomic mode.",
                    'Set IDEMPOTENCY_MODE = "lease" or use the database store.',
                )
            )
        database = getattr(store, "database", None)
        if database is not None and database not in connections.settings:
            errors.append(
                _error(
                    14,
                    f"Idempotency store {alias!r} names the unknown database {database!r}.",
                    "Use an alias from DATABASES.",
                )
            )
        errors.extend(_check_prepare(alias, store))
    return errors + _check_sqlite()


def _check_prepare(alias: str, store: Any) -> list[CheckMessage]:
    """The database store's ``PREPARE`` option against the database's own settings."""
    if not hasattr(store, "prepare"):
        return []  # not a database store
    from django_idempotency.models import IdempotencyKey

    prepare = store.prepare
    if prepare is not None and not isinstance(prepare, bool):
        return [
            _error(
                46,
                f"Idempotency store {alias!r}: OPTIONS['PREPARE'] must be True or False.",
                "False for PgBouncer in transaction pooling mode before 1.21.",
            )
        ]
    database = store.database or router.db_for_write(IdempotencyKey)
    config = connections.settings.get(database, {})
    if config.get("ENGINE") != "django.db.backends.postgresql":
        return []
    options = config.get("OPTIONS") or {}
    threshold = options.get("prepare_threshold")
    # PREPARE left to its default (None): prepared, unless the database's
    # settings suggest a pooler that cannot have it. An explicit True says
    # the pooler can.
    if prepare is None and "prepare_threshold" in options and threshold is None:
        reason = "its OPTIONS turn prepared statements off (prepare_threshold=None)"
    elif prepare is None and config.get("DISABLE_SERVER_SIDE_CURSORS"):
        reason = "DISABLE_SERVER_SIDE_CURSORS says a pooler in transaction mode may be in between"
    elif prepare is False and threshold is not None:
        return [
            Warning(
                f"Idempotency store {alias!r} has PREPARE False, but database {database!r} "
                f"prepares every statement run {threshold} times (prepare_threshold), "
                "the store's included.",
                hint="Either the pooler supports prepared statements (then drop PREPARE) "
                "or it does not (then drop prepare_threshold too).",
                id="django_idempotency.W012",
            )
        ]
    else:
        return []
    return [
        Warning(
            f"Idempotency store {alias!r} prepares its statements on the server, but "
            f"for database {database!r} {reason}.",
            hint="Behind PgBouncer in transaction pooling mode before 1.21, set the "
            "store's OPTIONS['PREPARE'] = False; otherwise set it to True to say so.",
            id="django_idempotency.W012",
        )
    ]


def _check_sqlite() -> list[CheckMessage]:
    from django_idempotency.models import IdempotencyKey

    alias = router.db_for_write(IdempotencyKey)
    if connections.settings.get(alias, {}).get("ENGINE") != "django.db.backends.sqlite3":
        return []
    return [
        Warning(
            "Idempotency keys are stored in SQLite, which serialises all writers.",
            hint="Fine for development and tests. A concurrent duplicate waits for the "
            "database lock, then replays (409 only after the connection's timeout), and "
            "unrelated writes wait too. Use PostgreSQL or MariaDB in production; silence "
            'it with SILENCED_SYSTEM_CHECKS = ["django_idempotency.W001"].',
            id="django_idempotency.W001",
        )
    ]


def _check_responses() -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    headers = _strings(app_settings.REPLAYED_HEADERS)
    if headers is None or not all(_TOKEN.match(h) for h in headers):
        errors.append(
            _error(
                15,
                "IDEMPOTENCY_REPLAYED_HEADERS must list header names.",
                'For example ("Content-Type", "Location", "ETag").',
            )
        )
    elif any(h.lower() == "set-cookie" for h in headers):
        errors.append(
            _error(
                16,
                "Set-Cookie cannot be replayed.",
                "A replay would hand one client's cookies to another; remove it.",
            )
        )
    statuses = app_settings.RELEASE_STATUSES
    if not isinstance(statuses, list | tuple | set | frozenset) or not all(
        isinstance(s, int) and not isinstance(s, bool) and 400 <= s <= 499 for s in statuses
    ):
        errors.append(
            _error(
                17,
                "IDEMPOTENCY_RELEASE_STATUSES must list 4xx status codes.",
                "5xx responses are never kept; list the 4xx a retry may fix.",
            )
        )
    for id_, name in ((18, "MAX_BODY_SIZE"), (19, "RETRY_AFTER")):
        value = getattr(app_settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            errors.append(
                _error(
                    id_,
                    f"IDEMPOTENCY_{name} must be a positive integer.",
                    "Bytes for MAX_BODY_SIZE, seconds for RETRY_AFTER.",
                )
            )
    return errors


# The views ---------------------------------------------------------------------------------


def check_views(**kwargs: Any) -> list[CheckMessage]:
    """Each protected view names a configured store that supports the view's mode.

    Looks at every view the URLconf routes to: ``@idempotent`` functions and
    methods (``method_decorator`` and ``@api_view`` included) and
    ``IdempotencyMixin`` classes (their ``idempotency_mode`` and
    ``idempotency_store``; overridden ``get_idempotency_*`` hooks are not
    called). Without this, such a view fails on its first request.
    """
    stores = app_settings.STORES
    if not isinstance(stores, dict):
        return []  # E010
    mixin = _idempotency_mixin()
    try:
        patterns = get_resolver().url_patterns
        views = list(_protected_views(patterns, mixin))
        routed = _routed_mixin_views(patterns, mixin) if mixin is not None else {}
    except Exception:  # a broken URLconf: Django's own checks report it
        return []
    errors: list[CheckMessage] = []
    for view_class, actions in routed.items():
        errors.extend(_check_mixin_attributes(view_class))
        errors.extend(_check_mixin_actions(view_class, actions))
    for name, mode, alias in dict.fromkeys(views):
        if alias is not None and alias not in stores:
            errors.append(
                _error(
                    20,
                    f"{name} uses the idempotency store {alias!r}, "
                    "which is not in IDEMPOTENCY_STORES.",
                    "Name one of the configured aliases.",
                )
            )
            continue
        effective = mode or app_settings.MODE
        if effective != ATOMIC or (mode is None and alias is None):
            continue  # lease or automatic; the global mode on the default store is E013's
        store = alias or app_settings.STORE
        if store in stores and not _supports_atomic(store):
            errors.append(
                _error(
                    21,
                    f'{name} runs in mode "atomic" on the idempotency store {store!r}, '
                    "which supports only lease mode.",
                    'Give the view mode="lease", or a database store.',
                )
            )
    return errors


def _protected_views(
    patterns: Iterable[Any], mixin: type | None
) -> Iterator[tuple[str, str | None, str | None]]:
    """(name, mode, store) of each protected view or handler the patterns route to."""
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            yield from _protected_views(pattern.url_patterns, mixin)
        elif isinstance(pattern, URLPattern):
            yield from _protections(pattern.callback, mixin)


def _protections(view: Any, mixin: type | None) -> Iterator[tuple[str, str | None, str | None]]:
    options = handler_options(view)
    if options is not None and not inspect.iscoroutinefunction(view):  # async: always lease
        yield _name(view), options.mode, options.store
    view_class = getattr(view, "view_class", None) or getattr(view, "cls", None)
    if view_class is None:
        return
    if mixin is not None and issubclass(view_class, mixin):
        yield _name(view_class), view_class.idempotency_mode, view_class.idempotency_store
        return
    for attribute, member in inspect.getmembers(view_class, inspect.isfunction):
        options = handler_options(member)
        if options is not None and not inspect.iscoroutinefunction(member):
            yield f"{_name(view_class)}.{attribute}", options.mode, options.store


def _routed_mixin_views(patterns: Iterable[Any], mixin: type) -> dict[type, set[str]]:
    """Each ``IdempotencyMixin`` class the patterns route to, with its routed actions."""
    found: dict[type, set[str]] = {}
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            for view_class, actions in _routed_mixin_views(pattern.url_patterns, mixin).items():
                found.setdefault(view_class, set()).update(actions)
        elif isinstance(pattern, URLPattern):
            routed_class = getattr(pattern.callback, "cls", None)
            if isinstance(routed_class, type) and issubclass(routed_class, mixin):
                # A router's callback maps HTTP methods to the viewset's actions.
                routes: dict[str, str] = getattr(pattern.callback, "actions", None) or {}
                found.setdefault(routed_class, set()).update(routes.values())
    return found


def _check_mixin_attributes(view_class: type) -> list[CheckMessage]:
    values = {
        name: _static_option(view_class, f"idempotency_{name}")
        # The store is E020's.
        for name in (
            "methods",
            "required",
            "scope",
            "fingerprint",
            "retention",
            "mode",
            "lease",
            "wait",
        )
    }
    return [
        _error(
            25,
            f"{_name(view_class)} has a bad idempotency option: {problem}",
            "Fix the class attribute; get_idempotency_* hooks are checked on each request.",
        )
        for problem in option_problems(values, prefix="idempotency_")
    ]


def _static_option(view_class: type, attribute: str) -> Any:
    # As the mixin reads scope and fingerprint: a plain function assigned in
    # the class body is an option, not a method.
    value = inspect.getattr_static(view_class, attribute, None)
    return value.__func__ if isinstance(value, staticmethod) else value


def _check_mixin_actions(view_class: type, routed: set[str]) -> list[CheckMessage]:
    actions = getattr(view_class, "idempotency_actions", None)
    if actions is None:
        return []
    if isinstance(actions, str) or not isinstance(actions, Iterable):
        unknown = [repr(actions)]
    else:
        unknown = sorted(repr(a) for a in actions if a not in routed)
    if not unknown:
        return []
    known = ", ".join(sorted(routed)) or "none: it is not a routed viewset"
    return [
        _error(
            26,
            f"{_name(view_class)} lists idempotency_actions {', '.join(unknown)}, which "
            "the URLconf routes to no action of the view: they protect nothing.",
            f"Give a collection of its action names (routed actions: {known}).",
        )
    ]


def _name(view: Any) -> str:
    # __name__: DRF's @api_view names its view class after the function.
    return f"{view.__module__}.{getattr(view, '__name__', view)}"


def _idempotency_mixin() -> type | None:
    """``IdempotencyMixin``, where DRF is installed."""
    if importlib.util.find_spec("rest_framework") is None:
        return None
    from django_idempotency.drf import IdempotencyMixin

    return IdempotencyMixin


def _supports_atomic(alias: str) -> bool:
    try:
        store = get_store(alias)
    except Exception:  # E012 reports it
        return True
    return store.supports_atomic


def check_outbox_and_steps(**kwargs: Any) -> list[CheckMessage]:
    """Steps and the outbox: the sender, the retention, and where their tables live."""
    from django_idempotency.models import IdempotencyKey, IdempotencyStep, OutboxMessage

    errors: list[CheckMessage] = []
    sender = app_settings.OUTBOX_SENDER
    if sender is not None and not _is_callable_path(sender):
        errors.append(
            _error(
                30,
                "IDEMPOTENCY_OUTBOX_SENDER must be a callable or its dotted path.",
                "It is called as sender(message) with one OutboxMessage; it returns on "
                "success and raises on failure. None leaves the relay command unusable.",
            )
        )
    if not _is_seconds(app_settings.OUTBOX_RETENTION):
        errors.append(
            _error(
                31,
                "IDEMPOTENCY_OUTBOX_RETENTION must be a positive number of seconds.",
                "Give seconds as a number or a datetime.timedelta (default: 7 days).",
            )
        )
    keys = router.db_for_write(IdempotencyKey)
    for model in (IdempotencyStep, OutboxMessage):
        database = router.db_for_write(model)
        if database != keys:
            errors.append(
                _error(
                    32,
                    f"{model.__name__} is routed to database {database!r}, idempotency keys "
                    f"to {keys!r}.",
                    "Steps and outbox messages are written in the transaction of the key "
                    "they belong to: route them to the same database as IdempotencyKey.",
                )
            )
    return errors


# Encryption of stored outcomes ------------------------------------------------------------

#: Newest rows sampled by the stored-snapshot check (by the indexed expiry).
_SAMPLED_ROWS = 20


def check_encryption_keys(**kwargs: Any) -> list[CheckMessage]:
    keys = app_settings.ENCRYPTION_KEYS
    if not keys:
        return []
    if isinstance(keys, str | bytes) or not isinstance(keys, list | tuple):
        return [
            _error(
                40,
                "IDEMPOTENCY_ENCRYPTION_KEYS must be a list of Fernet keys, newest first.",
                "Wrap a single key in a list: [os.environ['IDEMPOTENCY_KEY']].",
            )
        ]
    if importlib.util.find_spec("cryptography") is None:
        return [
            _error(
                41,
                "IDEMPOTENCY_ENCRYPTION_KEYS is set but the cryptography package is missing.",
                "Install django-idempotency[crypto].",
            )
        ]
    from cryptography.fernet import Fernet

    errors: list[CheckMessage] = []
    for index, key in enumerate(keys):
        try:
            Fernet(key)
        except (TypeError, ValueError):
            errors.append(
                _error(
                    40,
                    f"IDEMPOTENCY_ENCRYPTION_KEYS[{index}] is not a Fernet key.",
                    "Generate one with: python -c 'from cryptography.fernet import Fernet; "
                    "print(Fernet.generate_key().decode())'",
                )
            )
    if not errors and len(set(keys)) != len(keys):
        errors.append(
            Warning(
                "IDEMPOTENCY_ENCRYPTION_KEYS lists a key twice.",
                hint="List each key once, the newest first.",
                id="django_idempotency.W010",
            )
        )
    return errors


def check_stored_snapshots(
    databases: Iterable[str] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """Whether the configured keys read the newest stored values (``check --database``).

    Samples each database given (responses, step results, outbox payloads)
    and every configured Redis store (responses).
    """
    if not databases or check_encryption_keys():
        return []
    messages: list[CheckMessage] = []
    for database in databases:
        messages.extend(_check_database(database))
    messages.extend(_check_cache_stores())
    return messages


def _check_database(database: str) -> list[CheckMessage]:
    from django.db import DatabaseError

    from django_idempotency.models import IdempotencyKey, IdempotencyStep, OutboxMessage

    responses = (
        IdempotencyKey.objects.using(database)
        .filter(state=IdempotencyKey.State.COMPLETED)
        .order_by("-expires")
        .values_list("scope", "key", "response_body")
    )
    steps = (
        IdempotencyStep.objects.using(database)
        .order_by("-expires")
        .values_list("scope", "key", "name", "result")
    )
    payloads = (
        OutboxMessage.objects.using(database)
        .filter(state=OutboxMessage.State.PENDING)
        .order_by("-created")
        .values_list("pk", "topic", "payload")
    )
    try:
        verdicts = [
            _read_response(scope, key, body) for scope, key, body in responses[:_SAMPLED_ROWS]
        ]
        verdicts += [_read_step(*row) for row in steps[:_SAMPLED_ROWS]]
        verdicts += [_read_payload(*row) for row in payloads[:_SAMPLED_ROWS]]
    except DatabaseError:  # not migrated yet: nothing stored to read
        return []
    return _verdict(f"database {database!r}", verdicts)


def _check_cache_stores() -> list[CheckMessage]:
    from django_idempotency.exceptions import StoreUnavailable
    from django_idempotency.stores import build_store

    stores = app_settings.STORES
    messages: list[CheckMessage] = []
    for alias in stores if isinstance(stores, dict) else ():
        try:
            store = build_store(alias)
            # The Redis store (imported only where configured: it needs django-redis).
            sample = getattr(store, "sample_outcomes", None)
            if sample is None:
                continue
            outcomes = sample(_SAMPLED_ROWS)
        except (ImproperlyConfigured, ImportError, StoreUnavailable):
            continue  # E012 reports a bad store; an unreachable one has nothing to say
        verdicts = [_read_response(scope, key, body) for scope, key, body in outcomes]
        messages.extend(_verdict(f"Redis store {alias!r}", verdicts))
    return messages


#: What a sampled value is: readable, stored in clear, or unreadable.
_READABLE, _CLEAR, _UNREADABLE = "readable", "clear", "unreadable"


def _read_response(scope: str, key: str, stored: bytes | memoryview) -> str:
    from django_idempotency import sealing
    from django_idempotency.exceptions import SnapshotUnreadable
    from django_idempotency.protocol import Call, Snapshot

    body = bytes(stored)
    if not sealing.is_sealed(body):
        return _CLEAR
    try:
        sealing.unseal(Snapshot(0, (), body), Call(scope, key, ""))
    except SnapshotUnreadable:
        return _UNREADABLE
    return _READABLE


def _read_step(scope: str, key: str, name: str, result: str) -> str:
    from django_idempotency import sealing

    return _read_text(result, sealing.step_context(scope, key, name), f"step {name!r}")


def _read_payload(pk: Any, topic: str, payload: Any) -> str:
    from django_idempotency import sealing

    if not isinstance(payload, str):
        return _CLEAR
    return _read_text(payload, sealing.message_context(pk, topic), f"outbox message {pk}")


def _read_text(stored: str, context: tuple[str, ...], what: str) -> str:
    from django_idempotency import sealing
    from django_idempotency.exceptions import SnapshotUnreadable

    if not sealing.is_sealed_text(stored):
        return _CLEAR
    try:
        sealing.unseal_text(stored, context, what)
    except SnapshotUnreadable:
        return _UNREADABLE
    return _READABLE


def _verdict(where: str, verdicts: list[str]) -> list[CheckMessage]:
    from django_idempotency import sealing

    unreadable, clear = verdicts.count(_UNREADABLE), verdicts.count(_CLEAR)
    if unreadable:
        return [
            _error(
                42,
                f"{unreadable} of the {len(verdicts)} newest stored values sampled in {where} "
                "cannot be decrypted with IDEMPOTENCY_ENCRYPTION_KEYS.",
                "Put back the key they were sealed with (older keys go after the newest); "
                "their replays are refused with 503 until then.",
            )
        ]
    if clear and sealing.enabled():
        return [
            Warning(
                f"{clear} of the {len(verdicts)} newest stored values sampled in {where} "
                "are stored in clear while encryption is on.",
                hint="Run manage.py reencrypt_idempotency_keys: until then their replays "
                "are refused with 503.",
                id="django_idempotency.W011",
            )
        ]
    return []
