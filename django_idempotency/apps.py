from __future__ import annotations

from django.apps import AppConfig, apps
from django.utils.translation import gettext_lazy as _


class IdempotencyConfig(AppConfig):
    name = "django_idempotency"
    verbose_name = _("Idempotency")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Importing them registers their system checks.
        from django_idempotency import checks, tasks  # noqa: F401

        if apps.is_installed("drf_spectacular"):
            # Registers the extension that documents protected DRF views.
            from django_idempotency import openapi  # noqa: F401
