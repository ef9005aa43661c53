"""Views for every entry point, all driven by one behaviour.

The JSON body says what the view does: ``item`` (an order to create),
``status`` (the status to answer), ``raise`` (raise after writing),
``cookie`` (set a cookie), ``big`` (bytes of padding), ``stream`` (stream).
"""

from __future__ import annotations

import json
import threading
from typing import Any

from django.db import transaction
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.utils.decorators import method_decorator
from django.views import View
from rest_framework import status as drf_status
from rest_framework import viewsets
from rest_framework.decorators import action, api_view
from rest_framework.response import Response

from django_idempotency.decorators import idempotent
from django_idempotency.drf import IdempotencyMixin
from tests.testapp.models import Order

#: Hooks the concurrency tests set: called inside the view, after the write.
hooks: dict[str, Any] = {}
on_commit_calls: list[int] = []
_lock = threading.Lock()


class Boom(Exception):
    pass


def behave(data: dict[str, Any], user: Any) -> tuple[int, dict[str, Any]]:
    owner = user if getattr(user, "is_authenticated", False) else None
    order = Order.objects.create(item=str(data.get("item", "thing")), owner=owner)
    transaction.on_commit(lambda: on_commit_calls.append(order.pk))
    hook = hooks.get("inside")
    if hook is not None:
        hook()
    if data.get("raise"):
        raise Boom("view failed after writing")
    return int(data.get("status", 201)), {"id": order.pk, "item": order.item}


def _data(request: HttpRequest) -> dict[str, Any]:
    try:
        loaded = json.loads(request.body or b"{}")
    except (ValueError, RecursionError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _django_response(request: HttpRequest, data: dict[str, Any]) -> HttpResponse:
    if data.get("stream"):
        Order.objects.create(item="streamed")
        return StreamingHttpResponse(iter([b"a", b"b"]), status=201)
    status, payload = behave(data, request.user)
    if data.get("big"):
        payload["padding"] = "x" * int(data["big"])
    response = JsonResponse(payload, status=status)
    response["Location"] = f"/orders/{payload['id']}/"
    response["X-Not-Replayed"] = "1"
    if data.get("cookie"):
        response.set_cookie("secret", "s3cr3t")
    return response


@idempotent
def plain_view(request: HttpRequest) -> HttpResponse:
    return _django_response(request, _data(request))


@idempotent(required=False, wait=5)
def optional_waiting_view(request: HttpRequest) -> HttpResponse:
    return _django_response(request, _data(request))


@method_decorator(idempotent, name="post")
class ClassBasedView(View):
    def post(self, request: HttpRequest) -> HttpResponse:
        return _django_response(request, _data(request))


@api_view(["POST", "GET"])
@idempotent
def api_function_view(request: Any) -> Response:
    if request.method == "GET":
        return Response({"orders": Order.objects.count()})
    status, payload = behave(request.data, request.user)
    return Response(payload, status=status, headers={"Location": f"/orders/{payload['id']}/"})


class OrderViewSet(IdempotencyMixin, viewsets.ViewSet):
    idempotency_methods = ("POST", "PATCH", "PUT", "DELETE")

    def list(self, request: Any) -> Response:
        return Response({"orders": Order.objects.count()})

    def create(self, request: Any) -> Response:
        status, payload = behave(request.data, request.user)
        return Response(payload, status=status, headers={"Location": f"/orders/{payload['id']}/"})

    def partial_update(self, request: Any, pk: str) -> Response:
        status, payload = behave(request.data, request.user)
        return Response(payload, status=status)

    def destroy(self, request: Any, pk: str) -> Response:
        Order.objects.filter(pk=pk).delete()
        return Response(status=drf_status.HTTP_204_NO_CONTENT)

    @action(detail=True, methods=["post"])
    def refund(self, request: Any, pk: str) -> Response:
        status, payload = behave(request.data, request.user)
        return Response(payload, status=status)
