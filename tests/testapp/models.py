from __future__ import annotations

from django.conf import settings
from django.db import models


class Order(models.Model):
    """A side effect the protected views create, to count executions."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL)
    item = models.CharField(max_length=100)
    created = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.item
