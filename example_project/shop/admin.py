from __future__ import annotations

from django.contrib import admin

from example_project.shop.models import LedgerEntry, Order, Payment


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
