from __future__ import annotations

from django.apps import AppConfig, apps
from django.core.checks import Tags, register
from django.utils.translation import gettext_lazy as _


class IdempotencyConfig(AppConfig):
    name = "django_idempotency"
    verbose_name = _("Idempotency")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django_idempotency import checks
        from django_idempotency.tasks import check_celery_tasks

        register(checks.check_settings, Tags.compatibility)
        register(checks.check_views, Tags.urls)
        register(checks.check_encryption_keys, Tags.security)
        register(checks.check_stored_snapshots, Tags.database)
        register(checks.check_outbox_and_steps, Tags.compatibility)
        register(check_celery_tasks, Tags.compatibility)

        if apps.is_installed("drf_spectacular"):
            # Registers the extension that documents protected DRF views.
            from django_idempotency import openapi  # noqa: F401
