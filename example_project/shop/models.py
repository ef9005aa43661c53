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
    #: The payment provider's charge id, once the charge is recorded (empty before).
    reference = models.CharField(max_length=64, unique=True, null=True, blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("-created", "-pk")

    def __str__(self) -> str:
        return self.reference or f"payment {self.pk} (not charged yet)"


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


class ProviderCharge(models.Model):
    """A charge the fake payment provider made (its own books, not the shop's).

    One row per charge. Like Stripe, the provider remembers the idempotency
    key a charge was requested with: a second request with the same key
    returns the first charge instead of charging again (``requests`` counts them).
    """

    reference = models.CharField(max_length=64, unique=True)
    idempotency_key = models.CharField(max_length=255, unique=True, null=True, blank=True)
    amount_cents = models.PositiveIntegerField()
    requests = models.PositiveIntegerField(default=1)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("-created", "-pk")

    def __str__(self) -> str:
        return f"{self.reference} ({self.amount_cents} cents)"
