"""One piece of work (create an order, answer 201 JSON), plain and protected."""

from __future__ import annotations

import json

from django.conf import settings
from django.db import transaction
from django.http import HttpRequest, JsonResponse
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


atomic = require_POST(idempotent(mode="atomic")(create_order))
lease = require_POST(idempotent(mode="lease")(create_order))
# Only with a Redis store configured: an unknown store alias is refused when decorating.
lease_redis = (
    require_POST(idempotent(mode="lease", store="redis")(create_order))
    if "redis" in settings.IDEMPOTENCY_STORES
    else None
)
