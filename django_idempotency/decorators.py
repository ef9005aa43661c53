"""The view decorator ``@idempotent`` and the per-view :class:`Options`.

``idempotent_function`` and ``idempotent_block`` live in
:mod:`django_idempotency.functions` (functions are not views) and are
importable from here too, their documented path.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from functools import lru_cache, partial, wraps
from typing import Any, TypeVar, overload

from asgiref.sync import sync_to_async
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest
from django.http.request import HttpHeaders
from django.http.response import HttpResponseBase

from django_idempotency import engine, redaction
from django_idempotency.conf import app_settings, load_callable
from django_idempotency.exceptions import IdempotencyError, KeyMissing

# Functions are not views; their documented import path is this module (DESIGN.md 5).
from django_idempotency.functions import Block, idempotent_block, idempotent_function
from django_idempotency.keys import parse_key
from django_idempotency.policies import ProtocolOptions, Seconds, fit_scope
from django_idempotency.protocol import Call, Conclusion, Snapshot
from django_idempotency.responses import conclude, problem_response, replay_response

ViewFunc = TypeVar("ViewFunc", bound=Callable[..., HttpResponseBase])
RequestFunction = Callable[[HttpRequest], str]
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
#: The attribute ``@idempotent`` leaves on the views it wraps: their options.
OPTIONS_ATTRIBUTE = "idempotency_options"


@dataclass(frozen=True, kw_only=True)
class Options(ProtocolOptions):
    """Per-view options; ``None`` means "the setting"."""

    methods: Collection[str] | None = None
    required: bool | None = None
    scope: RequestFunction | str | None = None
    fingerprint: RequestFunction | str | None = None
    #: ``(request, snapshot) -> snapshot``: what of a response is stored (see redaction.py).
    redact: Callable[[HttpRequest, Snapshot], Snapshot] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        # Resolved now, so that a wrong hook fails where the view is decorated.
        object.__setattr__(self, "redact", redaction.resolve(self.redact))

    def kept(self, request: HttpRequest, response: HttpResponseBase) -> Conclusion:
        """What of ``response`` is stored: :func:`conclude`, then the ``redact`` hook."""
        conclusion = conclude(request, response)
        if self.redact is None or not isinstance(conclusion, Snapshot):
            return conclusion
        return redaction.apply(self.redact, request, conclusion)  # type: ignore[arg-type]

    def protects(self, request: HttpRequest) -> bool:
        methods = app_settings.METHODS if self.methods is None else self.methods
        method = (request.method or "").upper()
        # Safe methods are untouched whatever a view lists (DESIGN.md section 2).
        return method not in _SAFE_METHODS and method in {m.upper() for m in methods}

    def call(self, request: HttpRequest) -> Call | None:
        """The engine's call for ``request``; ``None`` for an optional key left out."""
        header = request.META.get(_meta_name(str(app_settings.HEADER)))
        if header is None:
            required = app_settings.REQUIRED if self.required is None else self.required
            if required:
                raise KeyMissing(f"This request requires an {app_settings.HEADER} header.")
            return None
        key = parse_key(header)
        scope = load_callable(self.scope or app_settings.SCOPE)(request)
        fingerprint = load_callable(self.fingerprint or app_settings.FINGERPRINT)(request)
        return Call(
            scope=fit_scope(str(scope)),
            key=key,
            fingerprint=str(fingerprint),
            method=request.method or "",
            path=request.get_full_path(),
        )


@lru_cache(maxsize=8)
def _meta_name(header: str) -> str:
    """Where ``request.META`` holds ``header``: read there, not through
    ``request.headers``, which parses every header of the request on first use."""
    name = header.upper().replace("-", "_")
    return name if name in HttpHeaders.UNPREFIXED_HEADERS else f"HTTP_{name}"


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
        with engine.protected(call, options.policy()) as guard:
            if guard.replay is not None:
                return replay_response(guard.replay)
            response = view()
            guard.conclusion = options.kept(request, response)
    except IdempotencyError as error:
        return problem_response(error)
    return response


async def aprotect(
    request: HttpRequest, options: Options, view: Callable[[], Awaitable[HttpResponseBase]]
) -> HttpResponseBase:
    """:func:`protect` for an async view (which runs in ``lease`` mode: see the engine)."""
    if not options.protects(request):
        return await view()
    try:
        # The scope reads request.user: a session lookup, which is database work.
        call = await sync_to_async(options.call)(request)
        if call is None:
            return await view()
        async with engine.aprotected(call, options.policy()) as guard:
            if guard.replay is not None:
                return replay_response(guard.replay)
            response = await view()
            guard.conclusion = await sync_to_async(options.kept)(request, response)
    except IdempotencyError as error:
        return problem_response(error)
    return response


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
    redact: Callable[[HttpRequest, Snapshot], Snapshot] | str | None = None,
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
        if inspect.iscoroutinefunction(view_func):
            async_view: ViewFunc = _async_view(view_func, resolved)
            setattr(async_view, OPTIONS_ATTRIBUTE, resolved)
            return async_view

        @wraps(view_func)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            return protect(request, resolved, partial(view_func, request, *args, **kwargs))

        # Lets the system checks and the OpenAPI extension find protected views.
        setattr(wrapper, OPTIONS_ATTRIBUTE, resolved)
        return wrapper  # type: ignore[return-value]

    return decorator(view) if view is not None else decorator


def handler_options(handler: Any) -> Options | None:
    """The options ``@idempotent`` gave ``handler`` (a view or view method), if it did.

    Sees through ``functools.wraps`` chains (``method_decorator`` included) and
    through DRF's ``@api_view``, which turns the function into a handler of
    its own that calls it.
    """
    function = getattr(handler, "__func__", handler)
    while function is not None:
        options = getattr(function, OPTIONS_ATTRIBUTE, None)
        if isinstance(options, Options):
            return options
        if getattr(function, "__module__", None) == "rest_framework.decorators":
            options = _options_in_closure(function)
            if options is not None:
                return options
        function = getattr(function, "__wrapped__", None)
    return None


def _options_in_closure(function: Any) -> Options | None:
    for cell in getattr(function, "__closure__", None) or ():
        try:
            options = getattr(cell.cell_contents, OPTIONS_ATTRIBUTE, None)
        except ValueError:  # an empty cell
            continue
        if isinstance(options, Options):
            return options
    return None


def _refuse_undecoratable(view_func: Callable[..., Any]) -> None:
    view_class = getattr(view_func, "cls", None) or getattr(view_func, "view_class", None)
    if view_class is not None and hasattr(view_class, "finalize_response"):
        # Above @api_view it would run before DRF authenticates the request:
        # token-authenticated users would all share the anonymous scope.
        raise ImproperlyConfigured(
            f"@idempotent wraps the DRF view {view_class.__name__}; place it under "
            "@api_view (or use IdempotencyMixin) so that it runs after authentication."
        )


def _async_view(view_func: Callable[..., Any], options: Options) -> Any:
    refusal = engine.async_mode_refusal(options.mode)
    if refusal is not None:
        raise ImproperlyConfigured(
            f'@idempotent(mode="atomic") cannot protect the async view {view_func.__name__}: '
            f"{refusal}"
        )

    @wraps(view_func)
    async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        return await aprotect(request, options, partial(view_func, request, *args, **kwargs))

    return wrapper


#: The name this function had first.
protect_async = aprotect

__all__ = [
    "Block",
    "Options",
    "aprotect",
    "handler_options",
    "idempotent",
    "idempotent_block",
    "idempotent_function",
    "protect",
    "protect_async",
]
