"""Views that vary one option each, for the contract tests (see tests/testapp/urls.py)."""

from __future__ import annotations

import hashlib

from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.template import engines
from django.template.response import SimpleTemplateResponse
from rest_framework import viewsets
from rest_framework.authentication import BasicAuthentication, SessionAuthentication
from rest_framework.decorators import (
    api_view,
    authentication_classes,
    permission_classes,
    throttle_classes,
)
from rest_framework.exceptions import ValidationError
from rest_framework.permissions import AllowAny, BasePermission, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import BaseThrottle
from rest_framework.views import APIView

from django_idempotency.decorators import idempotent
from django_idempotency.drf import IdempotencyMixin
from tests.testapp.models import Order
from tests.testapp.views import OrderViewSet, _data, _django_response, behave


def respond(request: HttpRequest) -> HttpResponse:
    return _django_response(request, _data(request))


def tenant_scope(request: HttpRequest) -> str:
    """A scope from a header, as a multi-tenant project would derive it."""
    return "tenant:" + request.headers.get("X-Tenant", "none")


def item_fingerprint(request: HttpRequest) -> str:
    """Only the ``item`` field counts: other fields may differ between retries."""
    return hashlib.sha256(str(_data(request).get("item")).encode()).hexdigest()


@idempotent(retention=60)
def short_retention_view(request: HttpRequest) -> HttpResponse:
    return respond(request)


@idempotent(scope=tenant_scope)
def tenant_view(request: HttpRequest) -> HttpResponse:
    return respond(request)


@idempotent(fingerprint=item_fingerprint)
def item_fingerprint_view(request: HttpRequest) -> HttpResponse:
    return respond(request)


@idempotent(mode="lease")
def lease_view(request: HttpRequest) -> HttpResponse:
    return respond(request)


@idempotent(mode="atomic", methods=("POST", "PUT", "DELETE"))
def put_delete_view(request: HttpRequest) -> HttpResponse:
    return respond(request)


class InnerFailure(Exception):
    pass


@idempotent
def template_view(request: HttpRequest) -> SimpleTemplateResponse:
    """A lazy response: rendered by the snapshot, inside the transaction."""
    order = Order.objects.create(item="templated")
    template = engines["django"].from_string("order {{ pk }}")
    return SimpleTemplateResponse(template, {"pk": order.pk}, status=201)


@idempotent
def nested_atomic_view(request: HttpRequest) -> HttpResponse:
    """Writes in a kept savepoint, and in one it rolls back itself."""
    with transaction.atomic():
        Order.objects.create(item="kept-in-savepoint")
    try:
        with transaction.atomic():
            Order.objects.create(item="rolled-back-in-savepoint")
            raise InnerFailure
    except InnerFailure:
        pass
    return respond(request)


# DRF -----------------------------------------------------------------------


class DenyWithHeader(BasePermission):
    """Refuses requests that carry ``X-Deny`` (a permission that fails today)."""

    def has_permission(self, request: Request, view: APIView) -> bool:
        return "X-Deny" not in request.headers


class ThrottleWithHeader(BaseThrottle):
    """Throttles requests that carry ``X-Throttle``."""

    def allow_request(self, request: Request, view: APIView) -> bool:
        return "X-Throttle" not in request.headers

    def wait(self) -> float:
        return 7.0


class GuardedViewSet(IdempotencyMixin, viewsets.ViewSet):
    permission_classes = (IsAuthenticated, DenyWithHeader)
    throttle_classes = (ThrottleWithHeader,)

    def create(self, request: Request) -> Response:
        status, payload = behave(request.data, request.user)
        if request.data.get("invalid"):
            # Raised, not returned: DRF turns it into a 400 after we have let go.
            raise ValidationError({"item": ["This item is not sold here."]})
        return Response(payload, status=status)


class SelectiveViewSet(OrderViewSet):
    """Protects ``create`` only; ``refund`` runs unprotected."""

    idempotency_actions = ("create",)


class ClassAttributeViewSet(OrderViewSet):
    # Plain functions in the class body: called with the request alone.
    idempotency_scope = tenant_scope
    idempotency_fingerprint = item_fingerprint
    idempotency_retention = 60
    idempotency_required = False


class StaticAttributeViewSet(OrderViewSet):
    # A staticmethod and a dotted path work as well as a plain function.
    idempotency_scope = staticmethod(tenant_scope)
    idempotency_fingerprint = "tests.testapp.variants.item_fingerprint"


class HookViewSet(OrderViewSet):
    """Decides per request, from headers, through the ``get_idempotency_*`` hooks."""

    def get_idempotency_required(self, request: Request) -> bool | None:
        return request.headers.get("X-Require") != "no"

    def get_idempotency_scope(self, request: HttpRequest) -> str:
        return "hook:" + request.headers.get("X-Tenant", "none")

    def get_idempotency_mode(self, request: Request) -> str | None:
        return request.headers.get("X-Mode") or None

    def get_idempotency_retention(self, request: Request) -> float | None:
        return 60.0 if request.headers.get("X-Short") else None

    def get_idempotency_methods(self, request: Request) -> tuple[str, ...] | None:
        return ("POST",)


@api_view(["POST"])
@permission_classes([AllowAny])
@idempotent
def anonymous_api_view(request: Request) -> Response:
    status, payload = behave(request.data, request.user)
    return Response(payload, status=status)


@api_view(["POST"])
@authentication_classes([BasicAuthentication, SessionAuthentication])  # 401, not 403
@permission_classes([IsAuthenticated, DenyWithHeader])
@throttle_classes([ThrottleWithHeader])
@idempotent
def guarded_api_view(request: Request) -> Response:
    """DRF's own 401, 403 and 429 before the key is looked at; a raised APIException."""
    status, payload = behave(request.data, request.user)
    if request.data.get("invalid"):
        raise ValidationError({"item": ["This item is not sold here."]})
    return Response(payload, status=status)
