from __future__ import annotations

import uuid
from typing import Any

from django.db import models
from django.db.backends.base.base import BaseDatabaseWrapper
from django.utils import timezone
from django.utils.translation import gettext_lazy as _


class ExactCharField(models.CharField):  # type: ignore[type-arg]
    """A ``CharField`` compared byte for byte on every database.

    MySQL and MariaDB compare with the table's collation, usually case- and
    trailing-space-insensitive: keys ``abc``, ``ABC`` and ``abc `` would then
    collide in the unique constraint. There the column gets a binary,
    no-pad collation; PostgreSQL and SQLite compare exactly already.
    """

    def db_type(self, connection: BaseDatabaseWrapper) -> str | None:
        db_type = super().db_type(connection)
        if connection.vendor == "mysql" and db_type:
            collation = "utf8mb4_nopad_bin" if connection.mysql_is_mariadb else "utf8mb4_0900_bin"  # type: ignore[attr-defined]
            return f"{db_type} CHARACTER SET utf8mb4 COLLATE {collation}"
        return db_type


class IdempotencyKey(models.Model):
    """One idempotency key in its scope: its claim and, once completed, the response."""

    class State(models.TextChoices):
        IN_PROGRESS = "in_progress", _("in progress")
        COMPLETED = "completed", _("completed")

    scope = ExactCharField(
        _("scope"), max_length=255, help_text=_("Namespace of the key, by default the user.")
    )
    key = ExactCharField(_("key"), max_length=255)
    fingerprint = models.CharField(
        _("fingerprint"), max_length=64, help_text=_("SHA-256 of the request.")
    )
    method = models.CharField(_("method"), max_length=16, blank=True)
    path = models.TextField(_("path"), blank=True)
    state = models.CharField(
        _("state"), max_length=16, choices=State.choices, default=State.IN_PROGRESS
    )
    token = models.CharField(
        _("owner token"),
        max_length=32,
        help_text=_("Fencing token of the claim that owns the key."),
    )
    locked_until = models.DateTimeField(
        _("locked until"),
        null=True,
        blank=True,
        help_text=_("End of the lease of an in-progress claim (lease mode)."),
    )
    attempts = models.PositiveIntegerField(
        _("attempts"), default=1, help_text=_("Claims of this key, takeovers included.")
    )
    response_status = models.PositiveSmallIntegerField(_("response status"), null=True, blank=True)
    response_headers = models.JSONField(_("response headers"), default=list, blank=True)
    response_body = models.BinaryField(_("response body"), default=b"", blank=True)
    created = models.DateTimeField(_("created"), default=timezone.now)
    completed = models.DateTimeField(_("completed"), null=True, blank=True)
    expires = models.DateTimeField(_("expires"))

    class Meta:
        verbose_name = _("idempotency key")
        verbose_name_plural = _("idempotency keys")
        constraints = (
            models.UniqueConstraint(fields=("scope", "key"), name="idempotency_scope_key_uniq"),
        )
        indexes = (models.Index(fields=("expires",), name="idempotency_expires_idx"),)
        # Seeing stored responses in clear when they are encrypted at rest
        # (IDEMPOTENCY_ENCRYPTION_KEYS): separate from "view", which shows
        # them as "encrypted, N bytes".
        permissions = (("view_decrypted_response", _("Can view decrypted stored responses")),)

    def __str__(self) -> str:
        return f"{self.scope} / {self.key}"

    def is_expired(self, now: Any = None) -> bool:
        return self.expires <= (now or timezone.now())


class IdempotencyStep(models.Model):
    """The recorded result of one step (recovery point) of a key's execution.

    Kept by (scope, key) rather than by the key's row: a key released after a
    failure is deleted and claimed anew by the retry, which resumes at the first
    step that has no record. Purged once ``expires`` has passed.
    """

    scope = ExactCharField(_("scope"), max_length=255)
    key = ExactCharField(_("key"), max_length=255)
    name = ExactCharField(_("name"), max_length=100)
    fingerprint = models.CharField(
        _("fingerprint"), max_length=64, help_text=_("Fingerprint of the request that ran it.")
    )
    token = models.CharField(
        _("owner token"), max_length=32, help_text=_("Fencing token of the claim that ran it.")
    )
    result = models.TextField(_("result"), help_text=_("The step's result, as JSON."))
    created = models.DateTimeField(_("recorded"), default=timezone.now)
    expires = models.DateTimeField(_("expires"))

    class Meta:
        verbose_name = _("idempotency step")
        verbose_name_plural = _("idempotency steps")
        constraints = (
            models.UniqueConstraint(fields=("scope", "key", "name"), name="idempotency_step_uniq"),
        )
        indexes = (models.Index(fields=("expires",), name="idempotency_step_expires_idx"),)

    def __str__(self) -> str:
        return f"{self.scope} / {self.key} / {self.name}"


class OutboxMessage(models.Model):
    """A follow-up message, written in the transaction of the work it follows.

    ``id`` is stable across deliveries: consumers deduplicate on it.
    """

    class State(models.TextChoices):
        PENDING = "pending", _("pending")
        SENT = "sent", _("sent")

    id = models.UUIDField(_("message id"), primary_key=True, default=uuid.uuid4, editable=False)
    topic = models.CharField(_("topic"), max_length=200)
    payload = models.JSONField(_("payload"), default=dict)
    state = models.CharField(
        _("state"), max_length=16, choices=State.choices, default=State.PENDING
    )
    attempts = models.PositiveIntegerField(_("attempts"), default=0)
    next_attempt = models.DateTimeField(
        _("next attempt"),
        default=timezone.now,
        help_text=_("When a relay may (re)send it; pushed back while a relay sends it."),
    )
    last_error = models.TextField(_("last error"), blank=True)
    created = models.DateTimeField(_("created"), default=timezone.now)
    sent = models.DateTimeField(_("sent"), null=True, blank=True)
    scope = ExactCharField(
        _("scope"), max_length=255, blank=True, help_text=_("Scope of the key that enqueued it.")
    )
    idempotency_key = ExactCharField(
        _("idempotency key"), max_length=255, blank=True, help_text=_("The key that enqueued it.")
    )
    step = models.CharField(
        _("step"), max_length=100, blank=True, help_text=_("The step that enqueued it, if any.")
    )

    class Meta:
        verbose_name = _("outbox message")
        verbose_name_plural = _("outbox messages")
        indexes = (
            models.Index(fields=("state", "next_attempt"), name="idempotency_outbox_due_idx"),
            models.Index(fields=("scope", "idempotency_key"), name="idempotency_outbox_key_idx"),
        )

    def __str__(self) -> str:
        return f"{self.topic} {self.id}"
