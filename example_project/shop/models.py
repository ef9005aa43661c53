from __future__ import annotations

from django.conf import settings
from django.db import models


class Order(models.Model):
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="orders"
    )
    item = models.CharField(max_length=100)
    amount = models.DecimalField(max_digits=10, decimal_places=2)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("-created", "-pk")

    def __str__(self) -> str:
        return f"{self.item} ({self.amount})"


class Payment(models.Model):
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="payments"
    )
    order = models.ForeignKey(Order, on_delete=models.PROTECT, related_name="payments")
    amount_cents = models.PositiveIntegerField()
    #: The payment provider's charge id: one per execution, so a replay shows the same one.
    reference = models.CharField(max_length=64, unique=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("-created", "-pk")

    def __str__(self) -> str:
        return self.reference


class LedgerEntry(models.Model):
    """Money booked for a payment: one row per capture the provider reported.

    Rows are only ever added, so a capture message applied twice would book
    the money twice; ``consumers.on_payment_captured`` applies each message once.
    """

    payment = models.ForeignKey(Payment, on_delete=models.PROTECT, related_name="ledger_entries")
    amount_cents = models.PositiveIntegerField()
    booked = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("-booked", "-pk")
        verbose_name_plural = "ledger entries"

    def __str__(self) -> str:
        return f"{self.amount_cents} cents on {self.payment}"
