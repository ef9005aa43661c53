"""Views whose idempotency options cannot work: the URLconf of the view checks' tests.

What can only be seen once the URLconf and the settings are loaded (a store
that cannot serve the view's mode, a mixin's class attributes, viewset actions
that do not exist) is reported by ``check_views`` (E020, E021, E025, E026).
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.urls import include, path
from django.utils.decorators import method_decorator
from django.views import View
from rest_framework import viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.routers import SimpleRouter
from rest_framework.views import APIView

from django_idempotency.decorators import idempotent
from django_idempotency.drf import IdempotencyMixin


@idempotent(mode="atomic", store="lease-only")
def atomic_on_lease_only(request: HttpRequest) -> HttpResponse:
    return HttpResponse(status=201)


@idempotent(mode="lease", store="lease-only")
def lease_on_lease_only(request: HttpRequest) -> HttpResponse:
    return HttpResponse(status=201)


@idempotent(store="lease-only")
async def async_on_lease_only(request: HttpRequest) -> HttpResponse:
    return HttpResponse(status=201)  # async views always run in lease mode


class AtomicOnLeaseOnlyView(View):
    @method_decorator(idempotent(mode="atomic", store="lease-only"))
    def post(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse(status=201)


class MixinOnLeaseOnly(IdempotencyMixin, APIView):
    idempotency_mode = "atomic"
    idempotency_store = "lease-only"

    def post(self, request: Request) -> Response:
        return Response(status=201)


class MixinUnknownStore(IdempotencyMixin, APIView):
    idempotency_store = "nowhere"

    def post(self, request: Request) -> Response:
        return Response(status=201)


class MixinBadAttributes(IdempotencyMixin, APIView):
    idempotency_methods = "POST"
    idempotency_wait = -1
    idempotency_scope = 42

    def post(self, request: Request) -> Response:
        return Response(status=201)


class TypoActionViewSet(IdempotencyMixin, viewsets.ViewSet):
    idempotency_actions = frozenset({"craete", "refund"})

    def create(self, request: Request) -> Response:
        return Response(status=201)

    @action(detail=True, methods=["post"])
    def refund(self, request: Request, pk: str) -> Response:
        return Response(status=201)


class ActionsStringViewSet(IdempotencyMixin, viewsets.ViewSet):
    idempotency_actions = "create"

    def create(self, request: Request) -> Response:
        return Response(status=201)


class ActionsOnAnAPIView(IdempotencyMixin, APIView):
    idempotency_actions = ("post",)

    def post(self, request: Request) -> Response:
        return Response(status=201)


router = SimpleRouter()
router.register("typo", TypoActionViewSet, basename="typo")
router.register("actions-string", ActionsStringViewSet, basename="actions-string")

urlpatterns = [
    path("unknown-store/", MixinUnknownStore.as_view()),
    path("bad-attributes/", MixinBadAttributes.as_view()),
    path("actions-on-api-view/", ActionsOnAnAPIView.as_view()),
    path("", include(router.urls)),
    path("atomic-on-lease-only/", atomic_on_lease_only),
    path("lease-on-lease-only/", lease_on_lease_only),
    path("async-on-lease-only/", async_on_lease_only),
    path("cbv/", AtomicOnLeaseOnlyView.as_view()),
    path("mixin/", MixinOnLeaseOnly.as_view()),
]
