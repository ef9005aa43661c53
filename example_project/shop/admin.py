from __future__ import annotations

from django.contrib import admin

from example_project.shop.models import Order, Payment


@admin.register(Order)
class OrderAdmin(admin.ModelAdmin):
    list_display = ("id", "item", "amount", "owner", "created")
    list_filter = ("owner",)
    search_fields = ("item",)


@admin.register(Payment)
class PaymentAdmin(admin.ModelAdmin):
    list_display = ("reference", "order", "amount_cents", "owner", "created")
    list_filter = ("owner",)
    search_fields = ("reference",)
