"""Errors of the idempotency protocol.

Each error has a stable problem ``type`` (RFC 9457) and an HTTP status, so the
HTTP adapters can answer with ``application/problem+json`` and clients can
branch on ``type``. Outside HTTP (idempotent functions) they are raised as is.
"""

from __future__ import annotations

from typing import ClassVar

PROBLEM_BASE = "urn:django-idempotency:problem:"


class IdempotencyError(Exception):
    """Base class: a request that the idempotency layer refuses to run."""

    status: ClassVar[int] = 400
    slug: ClassVar[str] = "error"
    title: ClassVar[str] = "Idempotency error"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title

    @property
    def type(self) -> str:
        return PROBLEM_BASE + self.slug

    def problem(self) -> dict[str, object]:
        """The RFC 9457 problem details object for this error."""
        return {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }


class KeyMissing(IdempotencyError):
    status = 400
    slug = "key-missing"
    title = "Idempotency key missing"


class KeyMalformed(IdempotencyError):
    status = 400
    slug = "key-malformed"
    title = "Idempotency key malformed"


class RequestInProgress(IdempotencyError):
    """A request with the same key is still being executed."""

    status = 409
    slug = "request-in-progress"
    title = "A request with this idempotency key is in progress"

    def __init__(self, detail: str = "", *, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = max(1, retry_after)


class FingerprintMismatch(IdempotencyError):
    """The key was already used for a different request."""

    status = 422
    slug = "fingerprint-mismatch"
    title = "Idempotency key reused with a different request"


class StoreUnavailable(IdempotencyError):
    """The store could not be reached; the request was not run."""

    status = 503
    slug = "store-unavailable"
    title = "Idempotency store unavailable"


class SnapshotUnreadable(IdempotencyError):
    """A stored outcome could not be decrypted or verified; nothing is replayed or run.

    The row was tampered with, or was sealed with a key that is no longer
    configured. The key stays taken: running the request again could repeat
    an effect that already happened.
    """

    status = 503
    slug = "snapshot-unreadable"
    title = "Stored idempotent response unreadable"


class LeaseLost(RequestInProgress, RuntimeError):
    """The claim was taken over while a step ran: the step's result was not recorded.

    Raised by :func:`django_idempotency.workflow.step` (and importable from
    there). Another worker owns the key now; the step's own writes were rolled back.
    A view answers ``409`` (problem type ``lease-lost``, with ``Retry-After``):
    the client's retry gets the new owner's outcome. Functions raise it as is.
    """

    slug = "lease-lost"
    title = "The idempotency key was taken over while this request ran"
