"""Views whose idempotency options cannot work: the URLconf of the view checks' tests.

Decorating them succeeds (settings may change before the first request);
``check_views`` (E020, E021) reports them.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.urls import path
from django.utils.decorators import method_decorator
from django.views import View
from rest_framework.decorators import api_view
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from django_idempotency.decorators import idempotent
from django_idempotency.drf import IdempotencyMixin


@idempotent(store="nowhere")
def unknown_store(request: HttpRequest) -> HttpResponse:
    return HttpResponse(status=201)


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


@api_view(["POST"])
@idempotent(store="nowhere")
def api_unknown_store(request: Request) -> Response:
    return Response(status=201)


class MixinOnLeaseOnly(IdempotencyMixin, APIView):
    idempotency_mode = "atomic"
    idempotency_store = "lease-only"

    def post(self, request: Request) -> Response:
        return Response(status=201)


urlpatterns = [
    path("unknown-store/", unknown_store),
    path("atomic-on-lease-only/", atomic_on_lease_only),
    path("lease-on-lease-only/", lease_on_lease_only),
    path("async-on-lease-only/", async_on_lease_only),
    path("cbv/", AtomicOnLeaseOnlyView.as_view()),
    path("api/", api_unknown_store),
    path("mixin/", MixinOnLeaseOnly.as_view()),
]
