"""The decorators: ``@idempotent`` for views, ``@idempotent_function`` for code."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
from collections.abc import Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from functools import partial, wraps
from typing import Any, TypeVar, overload

from asgiref.sync import sync_to_async
from django.core.exceptions import ImproperlyConfigured
from django.core.serializers.json import DjangoJSONEncoder
from django.http import HttpRequest
from django.http.response import HttpResponseBase

from django_idempotency import engine, redaction
from django_idempotency.conf import app_settings, load_callable, to_seconds
from django_idempotency.engine import Call, Conclusion, Executed, Policy, Replayed, Snapshot
from django_idempotency.exceptions import IdempotencyError, KeyMalformed, KeyMissing
from django_idempotency.keys import MAX_KEY_LENGTH, parse_key
from django_idempotency.responses import conclude, problem_response, replay_response

ViewFunc = TypeVar("ViewFunc", bound=Callable[..., HttpResponseBase])
Seconds = float | timedelta
RequestFunction = Callable[[HttpRequest], str]
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
#: The attribute ``@idempotent`` leaves on the views it wraps: their options.
OPTIONS_ATTRIBUTE = "idempotency_options"


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
    #: ``(request, snapshot) -> snapshot``: what of a response is stored (see redaction.py).
    redact: Callable[[HttpRequest, Snapshot], Snapshot] | str | None = None

    def __post_init__(self) -> None:
        # Resolved now, so that a wrong hook fails where the view is decorated.
        object.__setattr__(self, "redact", redaction.resolve(self.redact))
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
        method = (request.method or "").upper()
        # Safe methods are untouched whatever a view lists (DESIGN.md section 2).
        return method not in _SAFE_METHODS and method in {m.upper() for m in methods}

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
        outcome = engine.run(call, options.policy(), view, _concluder(request, options))
    except IdempotencyError as error:
        return problem_response(error)
    return _response(outcome)


def _concluder(request: HttpRequest, options: Options) -> Callable[[HttpResponseBase], Conclusion]:
    """What of a response is kept: :func:`conclude`, then the view's ``redact`` hook."""
    hook = options.redact
    if hook is None:
        return partial(conclude, request)

    def conclude_redacted(response: HttpResponseBase) -> Conclusion:
        conclusion = conclude(request, response)
        if isinstance(conclusion, Snapshot):
            return redaction.apply(hook, request, conclusion)  # type: ignore[arg-type]
        return conclusion

    return conclude_redacted


def _response(outcome: Executed[HttpResponseBase] | Replayed) -> HttpResponseBase:
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


def _fit(scope: str) -> str:
    """Keep long scopes within the column, distinct from one another."""
    if len(scope) <= MAX_KEY_LENGTH:
        return scope
    return "sha256:" + hashlib.sha256(scope.encode()).hexdigest()


# Async views ---------------------------------------------------------------

AsyncView = Callable[[], Awaitable[HttpResponseBase]]


def _async_view(view_func: Callable[..., Any], options: Options) -> Any:
    if options.mode == engine.ATOMIC:
        raise ImproperlyConfigured(
            f'@idempotent(mode="atomic") cannot protect the async view {view_func.__name__}: '
            'a transaction cannot span an await. Async views run in "lease" mode.'
        )

    @wraps(view_func)
    async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        return await protect_async(request, options, partial(view_func, request, *args, **kwargs))

    return wrapper


async def protect_async(
    request: HttpRequest, options: Options, view: AsyncView
) -> HttpResponseBase:
    """:func:`protect` for an async view, in ``lease`` mode (the default for them)."""
    if not options.protects(request):
        return await view()
    try:
        # The scope reads request.user: a session lookup, which is database work.
        call = await sync_to_async(options.call)(request)
        if call is None:
            return await view()
        # A global IDEMPOTENCY_MODE = "atomic" cannot apply here; the view's
        # own mode="atomic" was refused when it was decorated.
        policy = replace(options.policy(), mode=engine.LEASE)
        outcome = await engine.run_async(call, policy, view, _concluder(request, options))
    except IdempotencyError as error:
        return problem_response(error)
    return _response(outcome)


# Idempotent functions ------------------------------------------------------

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
    options = Options(mode=mode, lease=lease, wait=wait, retention=retention, store=store)
    call = Call(
        scope=_fit(scope), key=_function_key(key), fingerprint=_payload_fingerprint(payload)
    )
    return _protected_block(call, options, redaction.resolve(redact))


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
    options = Options(mode=mode, lease=lease, wait=wait, retention=retention, store=store)
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
            return Call(
                scope=_fit(str(call_scope)),
                key=_function_key(key(*args, **kwargs)),
                fingerprint=_payload_fingerprint(payload),
                path=name,
            )

        @wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with _protected_block(call_of(args, kwargs), options, redact_result) as block:
                if not block.replayed:
                    block.result = func(*args, **kwargs)
            return block.result

        return wrapper  # type: ignore[return-value]

    return decorator


@contextlib.contextmanager
def _protected_block(
    call: Call, options: Options, redact: Callable[[Any], Any] | None = None
) -> Iterator[Block]:
    with engine.protected(call, options.policy()) as guard:
        if guard.replay is not None:
            yield Block(replayed=True, result=json.loads(guard.replay.body))
            return
        block = Block(replayed=False)
        yield block
        # Raising here (a result that is not JSON) frees the key like any error.
        body = _result_body(block.result)
        stored = body if redact is None else _result_body(redact(json.loads(body)))
        guard.conclusion = Snapshot(status=200, headers=_RESULT_HEADERS, body=stored)
        block.result = json.loads(body)


def _function_key(key: str | int) -> str:
    # An int is a common message id; anything else (None above all) would
    # silently make unrelated calls share one key.
    if isinstance(key, int) and not isinstance(key, bool):
        key = str(key)
    if not isinstance(key, str) or not key:
        raise KeyMalformed(f"An idempotency key must be a non-empty string, not {key!r}.")
    return _fit(key)


def _payload_fingerprint(payload: Any) -> str:
    """SHA-256 of the payload as canonical JSON (sorted keys, no white space)."""
    try:
        canonical = json.dumps(
            payload,
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            cls=DjangoJSONEncoder,
        )
    except TypeError as exc:
        raise TypeError(
            f"Cannot fingerprint the arguments as JSON ({exc}); pass fingerprint= "
            "(or payload=) returning the JSON-serialisable data that identifies the call."
        ) from exc
    return hashlib.sha256(canonical.encode()).hexdigest()


def _result_body(result: Any) -> bytes:
    try:
        return json.dumps(result, separators=(",", ":"), ensure_ascii=False).encode()
    except TypeError as exc:
        raise TypeError(
            f"The result of an idempotent function must be JSON-serialisable: {exc}"
        ) from exc
