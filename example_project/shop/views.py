"""One view per entry point of django-idempotency.

- ``OrderViewSet``: a DRF viewset, with ``IdempotencyMixin`` first in the bases.
- ``create_payment``: a DRF function view, ``@idempotent`` under ``@api_view``.
- ``create_order``: a plain Django view, ``@idempotent`` under ``login_required``.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from django.contrib.auth.decorators import login_required
from django.db.models import QuerySet
from django.forms import ModelForm
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.views.decorators.http import require_POST
from rest_framework import status, viewsets
from rest_framework.decorators import api_view
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.reverse import reverse as api_reverse
from rest_framework.serializers import BaseSerializer

from django_idempotency.decorators import idempotent
from django_idempotency.drf import IdempotencyMixin
from django_idempotency.outbox import enqueue
from django_idempotency.workflow import derived_key, step
from example_project.shop import provider
from example_project.shop.models import Order, Payment
from example_project.shop.serializers import OrderSerializer, PaymentSerializer


class OrderViewSet(IdempotencyMixin, viewsets.ModelViewSet):  # type: ignore[type-arg]
    """Orders of the authenticated user. POST and PATCH need an ``Idempotency-Key``.

    The default ``atomic`` mode runs the view in the transaction that holds the
    key: the order and the stored response are committed together.
    """

    serializer_class = OrderSerializer

    def get_queryset(self) -> QuerySet[Order]:
        return Order.objects.filter(owner=self.request.user)

    def perform_create(self, serializer: BaseSerializer[Order]) -> None:
        serializer.save(owner=self.request.user)


# The charge goes to an external provider, which a database rollback cannot
# undo: the lease mode keeps the key claimed, outside any transaction, for as
# long as the provider may take, and the work is cut into steps. Each step
# commits its writes with its result under the key, so a retry after a crash
# (or after the provider failed) resumes at the first unfinished step; the
# charge carries a key derived from the request's, so the provider charges
# once however often that step reruns; the "payment captured" message is
# written in the same transaction as the charge's reference (the outbox).
@api_view(["POST"])
@idempotent(mode="lease", lease=10)
def create_payment(request: Request) -> Response:
    """Pay for one of the user's orders."""
    serializer = PaymentSerializer(data=request.data, context={"request": request})
    serializer.is_valid(raise_exception=True)
    amount_cents = serializer.validated_data["amount_cents"]
    payment_id = step("payment", lambda: serializer.save(owner=request.user).pk)
    try:
        reference = step(
            "charge",
            lambda: provider.charge(amount_cents, idempotency_key=derived_key("charge")),
        )
    except provider.ProviderError as error:
        # Nothing was recorded for the charge. A 5xx keeps no idempotency key:
        # the client's retry resumes here, with the same derived key.
        return Response(
            {"detail": f"The payment provider failed: {error}"}, status=status.HTTP_502_BAD_GATEWAY
        )
    step("capture", lambda: _capture(payment_id, reference, amount_cents))
    payment = Payment.objects.get(pk=payment_id)
    return Response(
        PaymentSerializer(payment, context={"request": request}).data,
        status=status.HTTP_201_CREATED,
        headers={"Location": api_reverse("payment-detail", args=[payment.pk], request=request)},
    )


def _capture(payment_id: int, reference: str, amount_cents: int) -> None:
    """Record the charge on the payment and tell the ledger, in one transaction."""
    Payment.objects.filter(pk=payment_id).update(reference=reference)
    enqueue("payment.captured", {"payment": reference, "amount_cents": amount_cents})


@api_view(["GET"])
def payment_detail(request: Request, pk: int) -> Response:
    payment = get_object_or_404(Payment, pk=pk, owner=request.user)
    return Response(PaymentSerializer(payment, context={"request": request}).data)


class OrderForm(ModelForm):  # type: ignore[type-arg]
    class Meta:
        model = Order
        fields = ("item", "amount")


@require_POST
@login_required
@idempotent
def create_order(request: HttpRequest) -> HttpResponse:
    """Create an order from a JSON body, for browser code using the session."""
    data: Any = None
    # Anything but JSON is refused before the body is read: the CSRF
    # middleware has already parsed a form body, and reading it again raises.
    if request.content_type == "application/json":
        # Not JSON, or nested too deep to decode: refused below.
        with contextlib.suppress(ValueError, RecursionError):
            data = json.loads(request.body)
    if not isinstance(data, dict):
        errors = {
            "__all__": [{"message": "Send a JSON object (application/json).", "code": "invalid"}]
        }
        return JsonResponse({"errors": errors}, status=400)
    form = OrderForm(data)
    if not form.is_valid():
        return JsonResponse({"errors": form.errors.get_json_data()}, status=400)
    form.instance.owner = request.user
    order = form.save()
    order.refresh_from_db()  # the amount as stored: 4.5 becomes 4.50
    response = JsonResponse(
        {"id": order.pk, "item": order.item, "amount": str(order.amount)}, status=201
    )
    response["Location"] = reverse("order-detail", args=[order.pk])
    return response


@login_required
def index(request: HttpRequest) -> HttpResponse:
    """A page whose form posts to ``create_order`` with one key per page load."""
    return render(request, "shop/index.html")
