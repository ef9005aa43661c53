"""One piece of work (create an order, answer 201 JSON), plain and protected."""

from __future__ import annotations

import base64
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


def _stored_answer(status: int, headers: list[list[str]], body: bytes) -> HttpResponse:
    response = HttpResponse(body, status=status)
    for name, value in headers:
        response[name] = value
    response["Idempotent-Replayed"] = "true"
    return response


@require_POST
def replay_floor_redis(request: HttpRequest) -> HttpResponse:
    """The floor of a replay on Redis: authenticated, the stored record read (one GET), answered.

    No fingerprint, no claim script, no engine: the record of the key the
    Redis replays use, read by redis-py and turned into the response.
    """
    from django_redis import get_redis_connection  # type: ignore[import-untyped]

    from django_idempotency.scopes import user_scope
    from django_idempotency.stores import get_store

    key = request.headers.get("Idempotency-Key")
    if not key:
        return HttpResponse(status=400)
    name = get_store("redis").record_name(user_scope(request), key)  # type: ignore[attr-defined]
    record = json.loads(get_redis_connection("idempotency").get(name))
    return _stored_answer(record["status"], record["headers"], base64.b64decode(record["body"]))


@require_POST
def replay_floor_sql(request: HttpRequest) -> HttpResponse:
    """The floor of a replay on the database: authenticated, the stored row read (one SELECT).

    On PostgreSQL with psycopg 3 the SELECT is prepared and sent through
    libpq's pipeline calls (what the store's own flushes use), in autocommit:
    one round trip, the cheapest a read of the row can be made. Elsewhere
    through Django's cursor.
    """
    from django.db import connection

    from django_idempotency.scopes import user_scope
    from django_idempotency.stores import postgresql, sql

    key = request.headers.get("Idempotency-Key")
    if not key:
        return HttpResponse(status=400)
    q = connection.ops.quote_name
    query = (
        f"SELECT {q('response_status')}, {q('response_headers')}, {q('response_body')}"
        f" FROM {q('django_idempotency_idempotencykey')}"
        f" WHERE {q('scope')} = %s AND {q('key')} = %s"
    )
    params = [user_scope(request), key]
    if sql.is_psycopg3(connection):
        connection.ensure_connection()
        row, _ = postgresql._send(connection.connection, query, params, False, False)
    else:
        with connection.cursor() as cursor:
            cursor.execute(query, params)
            row = cursor.fetchone()
    assert row is not None
    status, headers, body = row
    if isinstance(headers, str):  # MariaDB and SQLite: JSON as text
        headers = json.loads(headers)
    return _stored_answer(status, headers, bytes(body))


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
