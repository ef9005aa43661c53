"""One piece of work (create an order, answer 201 JSON), plain and protected."""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.db import transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_POST

from benchmarks.models import Order
from django_idempotency.decorators import idempotent


def create_order(request: HttpRequest) -> JsonResponse:
    data = json.loads(request.body)
    order = Order.objects.create(item=str(data["item"]))
    for _ in range(settings.VIEW_QUERIES):  # --view-queries: a view doing more work
        Order.objects.filter(pk=order.pk).values_list("item", flat=True).get()
    response = JsonResponse({"id": order.pk, "item": order.item}, status=201)
    response["Location"] = f"/orders/{order.pk}/"
    return response


@require_POST
def plain(request: HttpRequest) -> JsonResponse:
    return create_order(request)


@require_POST
def plain_in_transaction(request: HttpRequest) -> JsonResponse:
    # What atomic mode costs beyond the transaction a careful view has anyway.
    with transaction.atomic():
        return create_order(request)


#: What a replay of create_order answers (benchmarks.phases primes one first).
STORED_ANSWER = json.dumps({"id": 1, "item": "book"}).encode()


@require_POST
def replay_floor(request: HttpRequest) -> HttpResponse:
    """The least a replay can cost: the request handled, authenticated, the key read.

    Then the stored answer, as if it had been read from a store that costs
    nothing: no store, no fingerprint, no round trip. The replay targets are
    measured against what this reaches in the same rounds.
    """
    if request.user.is_authenticated:  # authentication first, as for every replay
        pass
    if not request.headers.get("Idempotency-Key"):
        return HttpResponse(status=400)
    response = HttpResponse(STORED_ANSWER, status=201, content_type="application/json")
    response["Location"] = "/orders/1/"
    response["Idempotent-Replayed"] = "true"
    return response


atomic = require_POST(idempotent(mode="atomic")(create_order))
lease = require_POST(idempotent(mode="lease")(create_order))
# Only with a Redis store configured: an unknown store alias is refused when decorating.
lease_redis = (
    require_POST(idempotent(mode="lease", store="redis")(create_order))
    if "redis" in settings.IDEMPOTENCY_STORES
    else None
)


# The same work as a DRF viewset: DRF's request handling (authentication,
# permissions, throttles, content negotiation) runs before the replay.
try:
    from rest_framework import serializers, viewsets
except ImportError:  # DRF is an extra: the benchmark runs without it
    drf_plain = drf_protected = None
else:
    from django_idempotency.drf import IdempotencyMixin

    class OrderSerializer(serializers.ModelSerializer[Order]):
        class Meta:
            model = Order
            fields = ("id", "item")

    class OrderViewSet(viewsets.GenericViewSet[Order]):
        queryset = Order.objects.all()
        serializer_class = OrderSerializer

        def create(self, request: Any) -> Any:
            from rest_framework.response import Response

            serializer = self.get_serializer(data=request.data)
            serializer.is_valid(raise_exception=True)
            order = serializer.save()
            return Response(serializer.data, status=201, headers={"Location": f"/o/{order.pk}/"})

    class IdempotentOrderViewSet(IdempotencyMixin, OrderViewSet):
        idempotency_mode = "atomic"

    drf_plain = OrderViewSet.as_view({"post": "create"})
    drf_protected = IdempotentOrderViewSet.as_view({"post": "create"})
