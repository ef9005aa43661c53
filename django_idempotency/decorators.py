"""The decorators: ``@idempotent`` for views, ``@idempotent_function`` for code."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import timedelta
from functools import partial, wraps
from typing import Any, TypeVar, overload

from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest
from django.http.response import HttpResponseBase

from django_idempotency import engine
from django_idempotency.conf import app_settings, load_callable, to_seconds
from django_idempotency.engine import Call, Policy, Replayed
from django_idempotency.exceptions import IdempotencyError, KeyMissing
from django_idempotency.keys import MAX_KEY_LENGTH, parse_key
from django_idempotency.responses import conclude, problem_response, replay_response

ViewFunc = TypeVar("ViewFunc", bound=Callable[..., HttpResponseBase])
Seconds = float | timedelta
RequestFunction = Callable[[HttpRequest], str]


@dataclass(frozen=True)
class Options:
    """Per-view options; ``None`` means "the setting"."""

    methods: Collection[str] | None = None
    required: bool | None = None
    scope: RequestFunction | str | None = None
    fingerprint: RequestFunction | str | None = None
    retention: Seconds | None = None
    mode: str | None = None
    lease: Seconds | None = None
    wait: Seconds | None = None
    store: str | None = None

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in engine.MODES:
            raise ImproperlyConfigured(
                f"mode must be one of {', '.join(engine.MODES)}, not {self.mode!r}."
            )
        for name in ("retention", "lease"):
            value = getattr(self, name)
            if value is not None and to_seconds(value) <= 0:
                raise ImproperlyConfigured(f"{name} must be positive, not {value!r}.")
        if self.wait is not None and to_seconds(self.wait) < 0:
            raise ImproperlyConfigured(f"wait must be zero or positive, not {self.wait!r}.")

    def protects(self, request: HttpRequest) -> bool:
        methods = app_settings.METHODS if self.methods is None else self.methods
        return (request.method or "").upper() in {m.upper() for m in methods}

    def call(self, request: HttpRequest) -> Call | None:
        """The engine's call for ``request``; ``None`` for an optional key left out."""
        header = request.headers.get(app_settings.HEADER)
        if header is None:
            required = app_settings.REQUIRED if self.required is None else self.required
            if required:
                raise KeyMissing(f"This request requires an {app_settings.HEADER} header.")
            return None
        key = parse_key(header)
        scope = load_callable(self.scope or app_settings.SCOPE)(request)
        fingerprint = load_callable(self.fingerprint or app_settings.FINGERPRINT)(request)
        return Call(
            scope=_fit(str(scope)),
            key=key,
            fingerprint=str(fingerprint),
            method=request.method or "",
            path=request.get_full_path(),
        )

    def policy(self) -> Policy:
        def seconds(value: Seconds | None, default: Seconds) -> float:
            return to_seconds(default if value is None else value)

        return Policy(
            mode=self.mode or app_settings.MODE,
            retention=seconds(self.retention, app_settings.RETENTION),
            lease=seconds(self.lease, app_settings.LEASE),
            wait=seconds(self.wait, app_settings.WAIT),
            store=self.store or app_settings.STORE,
            retry_after=app_settings.RETRY_AFTER,
        )


def protect(
    request: HttpRequest, options: Options, view: Callable[[], HttpResponseBase]
) -> HttpResponseBase:
    """Run ``view`` for ``request`` under the idempotency protocol."""
    if not options.protects(request):
        return view()
    try:
        call = options.call(request)
        if call is None:
            return view()
        outcome = engine.run(call, options.policy(), view, partial(conclude, request))
    except IdempotencyError as error:
        return problem_response(error)
    if isinstance(outcome, Replayed):
        return replay_response(outcome.snapshot)
    return outcome.result


@overload
def idempotent(view: ViewFunc, /) -> ViewFunc: ...


@overload
def idempotent(
    *,
    methods: Collection[str] | None = None,
    required: bool | None = None,
    scope: RequestFunction | str | None = None,
    fingerprint: RequestFunction | str | None = None,
    retention: Seconds | None = None,
    mode: str | None = None,
    lease: Seconds | None = None,
    wait: Seconds | None = None,
    store: str | None = None,
) -> Callable[[ViewFunc], ViewFunc]: ...


def idempotent(view: Any = None, /, **options: Any) -> Any:
    """Make a view safe to retry with an ``Idempotency-Key`` header.

    Use as ``@idempotent`` or ``@idempotent(mode="atomic", wait=5, ...)``. For
    DRF, place it *under* ``@api_view`` so that it sees the authenticated user;
    put access decorators such as ``login_required`` above it.
    """
    resolved = Options(**options)

    def decorator(view_func: ViewFunc) -> ViewFunc:
        _refuse_undecoratable(view_func)

        @wraps(view_func)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            return protect(request, resolved, partial(view_func, request, *args, **kwargs))

        return wrapper  # type: ignore[return-value]

    return decorator(view) if view is not None else decorator


def _refuse_undecoratable(view_func: Callable[..., Any]) -> None:
    if inspect.iscoroutinefunction(view_func):
        raise ImproperlyConfigured(
            f"@idempotent does not support the async view {view_func.__name__} yet."
        )
    view_class = getattr(view_func, "cls", None) or getattr(view_func, "view_class", None)
    if view_class is not None and hasattr(view_class, "finalize_response"):
        # Above @api_view it would run before DRF authenticates the request:
        # token-authenticated users would all share the anonymous scope.
        raise ImproperlyConfigured(
            f"@idempotent wraps the DRF view {view_class.__name__}; place it under "
            "@api_view (or use IdempotencyMixin) so that it runs after authentication."
        )


def _fit(scope: str) -> str:
    """Keep long scopes within the column, distinct from one another."""
    if len(scope) <= MAX_KEY_LENGTH:
        return scope
    return "sha256:" + hashlib.sha256(scope.encode()).hexdigest()
