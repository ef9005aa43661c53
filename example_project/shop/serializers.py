from __future__ import annotations

from typing import Any

from rest_framework import serializers

from example_project.shop.models import Order, Payment


class OrderSerializer(serializers.HyperlinkedModelSerializer):
    class Meta:
        model = Order
        fields = ("id", "url", "item", "amount", "created")


class CustomerOrderField(serializers.PrimaryKeyRelatedField):  # type: ignore[type-arg]
    """An order of the requesting user: nobody pays for someone else's order."""

    def get_queryset(self) -> Any:
        return Order.objects.filter(owner=self.context["request"].user)


class PaymentSerializer(serializers.ModelSerializer):  # type: ignore[type-arg]
    order = CustomerOrderField()
    amount_cents = serializers.IntegerField(min_value=1)

    class Meta:
        model = Payment
        fields = ("id", "order", "amount_cents", "reference", "created")
        read_only_fields = ("reference",)
