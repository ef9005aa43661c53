"""OpenAPI documentation of protected DRF views, for drf-spectacular.

Loaded by the app when ``drf_spectacular`` is in ``INSTALLED_APPS``; nothing
else imports it, so the package works without drf-spectacular. Every
operation that :class:`~django_idempotency.drf.IdempotencyMixin` or
``@idempotent`` (under ``@api_view``, or through ``method_decorator``)
protects gets the ``Idempotency-Key`` request header, the ``400``, ``409``
and ``422`` problem responses, and the ``Idempotent-Replayed`` header on its
success responses. Views need no change and the schema class stays
drf-spectacular's (or yours).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from drf_spectacular.extensions import OpenApiViewExtension
from drf_spectacular.plumbing import ComponentRegistry, ResolvedComponent, get_class
from drf_spectacular.utils import OpenApiParameter
from rest_framework.views import APIView

from django_idempotency.conf import app_settings
from django_idempotency.decorators import Options, handler_options
from django_idempotency.drf import IdempotencyMixin
from django_idempotency.exceptions import (
    FingerprintMismatch,
    IdempotencyError,
    KeyMalformed,
    KeyMissing,
    RequestInProgress,
)
from django_idempotency.keys import MAX_KEY_LENGTH
from django_idempotency.responses import PROBLEM_CONTENT_TYPE, REPLAYED_HEADER

PROBLEM_COMPONENT = "IdempotencyProblem"

_PROBLEMS: dict[str, tuple[str, list[type[IdempotencyError]]]] = {
    "400": ("The idempotency key is missing or malformed.", [KeyMissing, KeyMalformed]),
    "409": (
        "A request with this idempotency key is still in progress; retry after Retry-After.",
        [RequestInProgress],
    ),
    "422": (
        "This idempotency key was already used for a different request.",
        [FingerprintMismatch],
    ),
}


def protecting_options(view: APIView, method: str) -> Options | None:
    """The options protecting ``method`` on ``view`` (with its mock request), or ``None``."""
    request: Any = view.request
    if isinstance(view, IdempotencyMixin):
        if not view.is_idempotent_action(request):
            return None
        options = view.get_idempotency_options(request)
    else:
        found = handler_options(
            getattr(view, getattr(view, "action", None) or method.lower(), None)
        )
        if found is None:
            return None
        options = found
    return options if options.protects(request) else None


class IdempotencySchemaMixin:
    """Mixed into a view's ``AutoSchema``: documents the protocol on protected operations."""

    view: APIView
    method: str
    registry: ComponentRegistry

    def get_override_parameters(self) -> list[Any]:
        parameters: list[Any] = super().get_override_parameters()  # type: ignore[misc]
        options = protecting_options(self.view, self.method)
        if options is None:
            return parameters
        required = app_settings.REQUIRED if options.required is None else options.required
        header = OpenApiParameter(
            name=app_settings.HEADER,
            location=OpenApiParameter.HEADER,
            type={"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH + 2},
            required=required,
            description=(
                "A unique value chosen by the client (a UUID, say) to make retries of this "
                "request safe: a retry with the same key and body replays the first response. "
                f"Printable ASCII, at most {MAX_KEY_LENGTH} characters, bare or quoted "
                '(Structured Field string: "abc").'
            ),
        )
        return [*parameters, header]

    def get_operation(self, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        operation: dict[str, Any] | None = super().get_operation(*args, **kwargs)  # type: ignore[misc]
        if operation is None or protecting_options(self.view, self.method) is None:
            return operation
        responses = operation.setdefault("responses", {})
        _mark_replays(responses)
        problem = self._problem_schema()
        for status, (description, errors) in _PROBLEMS.items():
            response = responses.setdefault(status, {"description": description})
            content = response.setdefault("content", {})
            content.setdefault(PROBLEM_CONTENT_TYPE, {"schema": problem})
            if status == "409":
                response.setdefault("headers", {})["Retry-After"] = {
                    "description": "Seconds after which a retry may find the first request done.",
                    "schema": {"type": "integer", "minimum": 1},
                }
            types = ", ".join(f"`{error().type}`" for error in errors)
            if types not in response["description"]:
                response["description"] += f" Problem type: {types}."
        return operation

    def _problem_schema(self) -> dict[str, str]:
        component = ResolvedComponent(  # type: ignore[no-untyped-call]
            name=PROBLEM_COMPONENT,
            type=ResolvedComponent.SCHEMA,
            object=PROBLEM_COMPONENT,
            schema={
                "type": "object",
                "description": "Problem details (RFC 9457) of a refused idempotent request.",
                "properties": {
                    "type": {"type": "string", "description": "Stable; branch on it."},
                    "title": {"type": "string"},
                    "status": {"type": "integer"},
                    "detail": {"type": "string"},
                },
                "required": ["type", "title", "status", "detail"],
            },
        )
        self.registry.register_on_missing(component)
        return component.ref


def _mark_replays(responses: dict[str, Any]) -> None:
    for status, response in responses.items():
        if str(status).startswith("2"):
            response.setdefault("headers", {})[REPLAYED_HEADER] = {
                "description": "Present, with the value true, when this is a replayed response.",
                "schema": {"type": "string", "enum": ["true"]},
            }


def with_idempotency(schema_class: type) -> type:
    """``schema_class`` with :class:`IdempotencySchemaMixin` mixed in (once)."""
    if issubclass(schema_class, IdempotencySchemaMixin):
        return schema_class
    return type(f"Idempotent{schema_class.__name__}", (IdempotencySchemaMixin, schema_class), {})


def is_protected(view_class: type) -> bool:
    """Whether any operation of ``view_class`` may be protected."""
    if issubclass(view_class, IdempotencyMixin):
        return True
    return any(
        handler_options(member) is not None
        for _, member in inspect.getmembers(view_class, inspect.isfunction)
    )


class IdempotencyViewExtension(OpenApiViewExtension):  # type: ignore[no-untyped-call]
    """Documents protected views: replaces each, for schema generation, by a subclass
    whose schema classes (the view's, and any ``@extend_schema`` on its actions)
    have :class:`IdempotencySchemaMixin` mixed in."""

    target_class = "rest_framework.views.APIView"
    match_subclasses = True

    @classmethod
    def _matches(cls, target: Any) -> bool:
        return super()._matches(target) and is_protected(get_class(target))

    def view_replacement(self) -> type[APIView]:
        view_class: type[APIView] = self.target
        attributes: dict[str, Any] = {"schema": with_idempotency(get_class(view_class.schema))()}
        for name, handler in inspect.getmembers(view_class, inspect.isfunction):
            action_schema = getattr(handler, "kwargs", {}).get("schema")
            if action_schema is not None:
                attributes[name] = _with_action_schema(
                    handler, with_idempotency(get_class(action_schema))
                )
        # Named and placed as the original, so that warnings point to the user's code.
        attributes.update(__module__=view_class.__module__, __qualname__=view_class.__qualname__)
        return type(view_class.__name__, (view_class,), attributes)


def _with_action_schema(handler: Callable[..., Any], schema_class: type) -> Callable[..., Any]:
    # @extend_schema on an action gives it its own schema class, which drf-spectacular
    # uses instead of the view's: the mixin has to be in that one too.
    @functools.wraps(handler)
    def action(*args: Any, **kwargs: Any) -> Any:
        return handler(*args, **kwargs)

    action.kwargs = {**handler.kwargs, "schema": schema_class}  # type: ignore[attr-defined]
    return action
