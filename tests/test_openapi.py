"""The drf-spectacular extension: protected operations document the protocol.

Schemas are generated for the test project's URLs, for views declared here
that exercise the options (actions, optional keys, ``@extend_schema``, custom
schema classes), and for the example project when it is there.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest
from django.conf import settings
from django.test import override_settings
from django.urls import path
from django.utils.decorators import method_decorator
from rest_framework import serializers, viewsets
from rest_framework.decorators import action, api_view
from rest_framework.response import Response
from rest_framework.routers import SimpleRouter
from rest_framework.views import APIView

pytest.importorskip("drf_spectacular")

from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.utils import extend_schema
from drf_spectacular.validation import validate_schema

from django_idempotency import openapi
from django_idempotency.decorators import idempotent
from django_idempotency.drf import IdempotencyMixin

HEADER = "Idempotency-Key"
PROBLEM_REF = {"$ref": "#/components/schemas/IdempotencyProblem"}


def test_the_test_settings_are_those_of_a_spectacular_project() -> None:
    # The one setting every drf-spectacular project has; nothing of ours.
    assert settings.REST_FRAMEWORK["DEFAULT_SCHEMA_CLASS"] == "drf_spectacular.openapi.AutoSchema"


def generate(urlconf: str | None = None, patterns: list[Any] | None = None) -> dict[str, Any]:
    generator = SchemaGenerator(urlconf=urlconf, patterns=patterns)
    schema: dict[str, Any] = generator.get_schema(request=None, public=True)
    validate_schema(schema)
    return schema


def operation(schema: dict[str, Any], route: str, method: str) -> dict[str, Any]:
    found: dict[str, Any] = schema["paths"][route][method]
    return found


def key_header(op: dict[str, Any], name: str = HEADER) -> dict[str, Any] | None:
    for parameter in op.get("parameters", []):
        if parameter["in"] == "header" and parameter["name"] == name:
            found: dict[str, Any] = parameter
            return found
    return None


def assert_protected(op: dict[str, Any], *, required: bool = True, name: str = HEADER) -> None:
    header = key_header(op, name)
    assert header is not None, f"no {name} header in {op['operationId']}"
    assert header.get("required", False) is required
    assert header["schema"] == {"type": "string", "minLength": 1, "maxLength": 257}
    responses = op["responses"]
    for status in ("400", "409", "422"):
        assert responses[status]["content"]["application/problem+json"]["schema"] == PROBLEM_REF
    assert "urn:django-idempotency:problem:key-missing" in responses["400"]["description"]
    assert "urn:django-idempotency:problem:key-malformed" in responses["400"]["description"]
    assert "request-in-progress" in responses["409"]["description"]
    assert "fingerprint-mismatch" in responses["422"]["description"]
    assert responses["409"]["headers"]["Retry-After"]["schema"]["type"] == "integer"
    successes = [r for status, r in responses.items() if status.startswith("2")]
    assert successes
    for response in successes:
        assert response["headers"]["Idempotent-Replayed"]["schema"] == {
            "type": "string",
            "enum": ["true"],
        }


def assert_unprotected(op: dict[str, Any]) -> None:
    assert key_header(op) is None
    assert not {"409", "422"} & set(op["responses"])


# -- the test project ---------------------------------------------------------------


@pytest.fixture(scope="module")
def test_project_schema() -> dict[str, Any]:
    return generate("tests.urls")


@pytest.mark.parametrize(
    ("route", "method"),
    [
        ("/api/function/", "post"),
        ("/api/viewset/", "post"),
        ("/api/viewset/{id}/", "patch"),
        ("/api/viewset/{id}/", "delete"),
        ("/api/viewset/{id}/refund/", "post"),
    ],
)
def test_protected_operations_of_the_test_project(
    test_project_schema: dict[str, Any], route: str, method: str
) -> None:
    assert_protected(operation(test_project_schema, route, method))


@pytest.mark.parametrize(("route", "method"), [("/api/function/", "get"), ("/api/viewset/", "get")])
def test_safe_operations_are_left_alone(
    test_project_schema: dict[str, Any], route: str, method: str
) -> None:
    assert_unprotected(operation(test_project_schema, route, method))


def test_the_problem_component(test_project_schema: dict[str, Any]) -> None:
    component = test_project_schema["components"]["schemas"]["IdempotencyProblem"]

    assert component["required"] == ["type", "title", "status", "detail"]
    assert set(component["properties"]) == {"type", "title", "status", "detail"}


def test_example_project_schema() -> None:
    if importlib.util.find_spec("example_project.urls") is None:
        pytest.skip("no example project in this checkout")
    schema = generate("example_project.urls")

    operations = {
        (route, method): op
        for route, item in schema["paths"].items()
        for method, op in item.items()
    }
    protected = {name for name, op in operations.items() if key_header(op) is not None}
    assert ("/api/orders/", "post") in protected
    assert ("/api/payments/", "post") in protected
    for (_, method), op in operations.items():
        if (_, method) in protected:
            assert method in {"post", "put", "patch", "delete"}
            assert_protected(op, required=key_header(op).get("required", False))  # type: ignore[union-attr]
        else:
            assert_unprotected(op)


# -- views exercising the options ------------------------------------------------------


class ItemSerializer(serializers.Serializer[Any]):
    item = serializers.CharField()


class ErrorSerializer(serializers.Serializer[Any]):
    errors = serializers.DictField()


class ItemViewSet(IdempotencyMixin, viewsets.GenericViewSet[Any]):
    """Only ``create`` and ``refund`` are protected; the key is optional."""

    serializer_class = ItemSerializer
    idempotency_actions = ("create", "refund")
    idempotency_required = False

    def create(self, request: Any) -> Response:
        return Response(status=201)

    def partial_update(self, request: Any, pk: str) -> Response:
        return Response()

    @extend_schema(responses={202: ItemSerializer, 400: ErrorSerializer})
    @action(detail=True, methods=["post"])
    def refund(self, request: Any, pk: str) -> Response:
        return Response(status=202)


class TaggingSchema(AutoSchema):
    def get_tags(self) -> list[str]:
        return ["custom-tag"]


class TaggedView(IdempotencyMixin, APIView):
    schema = TaggingSchema()

    @extend_schema(request=ItemSerializer, responses={201: ItemSerializer})
    def post(self, request: Any) -> Response:
        return Response(status=201)


@method_decorator(idempotent, name="post")
class DecoratedView(APIView):
    @extend_schema(request=ItemSerializer, responses={201: ItemSerializer})
    def post(self, request: Any) -> Response:
        return Response(status=201)

    @extend_schema(responses={200: ItemSerializer})
    def get(self, request: Any) -> Response:
        return Response()


@extend_schema(request=ItemSerializer, responses={201: ItemSerializer})
@api_view(["POST"])
@idempotent(required=False, methods=("POST",))
def optional_function(request: Any) -> Response:
    return Response(status=201)


@extend_schema(request=ItemSerializer, responses={201: ItemSerializer})
@api_view(["POST"])
def plain_function(request: Any) -> Response:
    return Response(status=201)


router = SimpleRouter()
router.register("items", ItemViewSet, basename="item")
PATTERNS = [
    *router.urls,
    path("tagged/", TaggedView.as_view()),
    path("decorated/", DecoratedView.as_view()),
    path("optional-function/", optional_function),
    path("plain-function/", plain_function),
]


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return generate(patterns=PATTERNS)


def test_only_the_listed_actions_and_an_optional_key(schema: dict[str, Any]) -> None:
    assert_protected(operation(schema, "/items/", "post"), required=False)
    assert_unprotected(operation(schema, "/items/{id}/", "patch"))


def test_an_action_with_its_own_extend_schema(schema: dict[str, Any]) -> None:
    refund = operation(schema, "/items/{id}/refund/", "post")

    assert_protected(refund, required=False)
    # Its own responses stay: 202, and the 400 of its validation errors next
    # to the 400 problem of a bad key.
    assert refund["responses"]["202"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Item"
    }
    assert set(refund["responses"]["400"]["content"]) == {
        "application/json",
        "application/problem+json",
    }


def test_a_custom_schema_class_keeps_working(schema: dict[str, Any]) -> None:
    tagged = operation(schema, "/tagged/", "post")

    assert tagged["tags"] == ["custom-tag"]
    assert_protected(tagged)


def test_method_decorator_on_an_api_view(schema: dict[str, Any]) -> None:
    assert_protected(operation(schema, "/decorated/", "post"))
    assert_unprotected(operation(schema, "/decorated/", "get"))


def test_api_view_functions(schema: dict[str, Any]) -> None:
    assert_protected(operation(schema, "/optional-function/", "post"), required=False)
    assert_unprotected(operation(schema, "/plain-function/", "post"))


def test_the_header_setting_names_the_parameter() -> None:
    with override_settings(IDEMPOTENCY_HEADER="X-Request-Key"):
        renamed = generate(patterns=PATTERNS)

    tagged = operation(renamed, "/tagged/", "post")
    assert key_header(tagged) is None
    assert_protected(tagged, name="X-Request-Key")


def test_views_are_unchanged_outside_schema_generation() -> None:
    # The extension documents replacements; the routed classes stay as they were.
    generate(patterns=PATTERNS)

    assert type(TaggedView.schema) is TaggingSchema
    assert not isinstance(ItemViewSet.refund.kwargs["schema"], openapi.IdempotencySchemaMixin)
    assert not issubclass(ItemViewSet.refund.kwargs["schema"], openapi.IdempotencySchemaMixin)


# -- an optional dependency ---------------------------------------------------------------


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if name != "DATABASE_URL"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**env, "DJANGO_SETTINGS_MODULE": "tests.settings"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_package_works_without_drf_spectacular() -> None:
    result = run_python(
        """
        import sys
        sys.modules["drf_spectacular"] = None  # as if it were not installed
        import django
        django.setup()
        from django_idempotency import admin, decorators, drf
        assert "django_idempotency.openapi" not in sys.modules
        print("ok")
        """
    )

    assert result.stdout == "ok\n", result.stderr


def test_the_extension_loads_when_drf_spectacular_is_installed() -> None:
    result = run_python(
        """
        import sys
        import django
        django.setup()
        assert "django_idempotency.openapi" in sys.modules
        from drf_spectacular.extensions import OpenApiViewExtension
        from django_idempotency.openapi import IdempotencyViewExtension
        assert IdempotencyViewExtension in OpenApiViewExtension._registry
        print("ok")
        """
    )

    assert result.stdout == "ok\n", result.stderr
