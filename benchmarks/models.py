from __future__ import annotations

from django.db import models


class Order(models.Model):
    """The write every benchmarked view makes."""

    item = models.CharField(max_length=100)
    created = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.item
