from __future__ import annotations

from django.contrib import admin

from example_project.shop.models import LedgerEntry, Order, Payment, ProviderCharge


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


@admin.register(LedgerEntry)
class LedgerEntryAdmin(admin.ModelAdmin):
    list_display = ("payment", "amount_cents", "booked")
    search_fields = ("payment__reference",)
    date_hierarchy = "booked"


@admin.register(ProviderCharge)
class ProviderChargeAdmin(admin.ModelAdmin):
    """The fake provider's books: one row per charge, with the key it was sent."""

    list_display = ("reference", "amount_cents", "requests", "idempotency_key", "created")
    search_fields = ("reference", "idempotency_key")
