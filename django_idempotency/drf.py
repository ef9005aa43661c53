"""Django REST framework integration: :class:`IdempotencyMixin`.

This is the only module that imports DRF, so the rest of the package works
without it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection
from functools import partial
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest
from django.http.response import HttpResponseBase

from django_idempotency.conf import app_settings, load_callable
from django_idempotency.decorators import Options, RequestFunction, protect
from django_idempotency.policies import Seconds
from django_idempotency.protocol import Snapshot

try:
    from rest_framework.request import Request
except ImportError as missing:  # the "drf" extra is not installed
    raise ImportError(
        "django_idempotency.drf needs Django REST framework: pip install 'django-idempotency[drf]'"
    ) from missing


class IdempotencyMixin:
    """Protect the unsafe actions of an ``APIView`` or ``ViewSet``.

    Put it first in the bases. The check runs after DRF's authentication,
    permission and throttle checks. Options are class attributes named like
    the arguments of ``@idempotent`` with an ``idempotency_`` prefix (``None``
    means "the setting"); the ``get_idempotency_*`` methods decide per request.
    """

    idempotency_methods: Collection[str] | None = None
    #: Names of the viewset actions to protect (``None``: all of them).
    idempotency_actions: Collection[str] | None = None
    idempotency_required: bool | None = None
    idempotency_scope: RequestFunction | str | None = None
    idempotency_fingerprint: RequestFunction | str | None = None
    idempotency_retention: Seconds | None = None
    idempotency_mode: str | None = None
    idempotency_lease: Seconds | None = None
    idempotency_wait: Seconds | None = None
    idempotency_store: str | None = None
    #: ``(request, snapshot) -> snapshot``: what of a response is stored.
    idempotency_redact: Callable[[HttpRequest, Snapshot], Snapshot] | str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A wrong hook fails where the class is defined, like @idempotent(redact=...);
        # a dotted path is imported at the first request (importing now could cycle).
        redact = inspect.getattr_static(cls, "idempotency_redact", None)
        if isinstance(redact, staticmethod):
            redact = redact.__func__
        if redact is not None and not isinstance(redact, str) and not callable(redact):
            raise ImproperlyConfigured(
                f"{cls.__name__}.idempotency_redact must be a callable (or its dotted path), "
                f"not {redact!r}."
            )

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)  # type: ignore[misc]
        # DRF looks the handler up after initial(): wrap it on this instance
        # (one per request), so that nothing runs before the checks above.
        name = (request.method or "").lower()
        handler = getattr(self, name, None)
        if handler is not None and self.is_idempotent_action(request):
            try:
                options = self.get_idempotency_options(request)
            except ImproperlyConfigured as error:
                # Seen only now: a get_idempotency_* hook decided it (class
                # attributes are system check E025).
                raise ImproperlyConfigured(
                    f"{type(self).__name__}: an idempotency_* attribute or "
                    f"get_idempotency_* hook gave a bad option for this request: {error}"
                ) from error
            setattr(self, name, partial(_protected, handler, options))

    def is_idempotent_action(self, request: Request) -> bool:
        """Whether this request's action is protected at all."""
        actions = self.idempotency_actions
        return actions is None or getattr(self, "action", None) in actions

    def get_idempotency_options(self, request: Request) -> Options:
        return Options(
            methods=self.get_idempotency_methods(request),
            required=self.get_idempotency_required(request),
            scope=self.get_idempotency_scope,
            fingerprint=self.get_idempotency_fingerprint,
            retention=self.get_idempotency_retention(request),
            mode=self.get_idempotency_mode(request),
            lease=self.get_idempotency_lease(request),
            wait=self.get_idempotency_wait(request),
            store=self.get_idempotency_store(request),
            redact=self.get_idempotency_redact(request),
        )

    def get_idempotency_methods(self, request: Request) -> Collection[str] | None:
        return self.idempotency_methods

    def get_idempotency_required(self, request: Request) -> bool | None:
        return self.idempotency_required

    def get_idempotency_scope(self, request: HttpRequest) -> str:
        """The scope of this request's key (by default the setting's function)."""
        return _call_option(self, "idempotency_scope", "SCOPE", request)

    def get_idempotency_fingerprint(self, request: HttpRequest) -> str:
        """The fingerprint of this request (by default the setting's function)."""
        return _call_option(self, "idempotency_fingerprint", "FINGERPRINT", request)

    def get_idempotency_retention(self, request: Request) -> Seconds | None:
        return self.idempotency_retention

    def get_idempotency_mode(self, request: Request) -> str | None:
        return self.idempotency_mode

    def get_idempotency_lease(self, request: Request) -> Seconds | None:
        return self.idempotency_lease

    def get_idempotency_wait(self, request: Request) -> Seconds | None:
        return self.idempotency_wait

    def get_idempotency_store(self, request: Request) -> str | None:
        return self.idempotency_store

    def get_idempotency_redact(
        self, request: Request
    ) -> Callable[[HttpRequest, Snapshot], Snapshot] | str | None:
        # Read statically: a function assigned in the class body is not a method.
        value = inspect.getattr_static(type(self), "idempotency_redact", None)
        return value.__func__ if isinstance(value, staticmethod) else value


def _protected(
    handler: Callable[..., HttpResponseBase],
    options: Options,
    request: Request,
    *args: Any,
    **kwargs: Any,
) -> HttpResponseBase:
    return protect(request, options, partial(handler, request, *args, **kwargs))


def _call_option(view: IdempotencyMixin, attribute: str, setting: str, request: HttpRequest) -> str:
    # Read statically, so that a plain function assigned in the class body is
    # called with the request alone rather than bound to the view.
    value = inspect.getattr_static(type(view), attribute, None)
    if isinstance(value, staticmethod):
        value = value.__func__
    function = load_callable(value or getattr(app_settings, setting))
    return str(function(request))
