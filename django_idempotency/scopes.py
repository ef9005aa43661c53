"""Scope functions: the namespace a key is unique in."""

from __future__ import annotations

from django.http import HttpRequest

ANONYMOUS_SCOPE = "anonymous"


def user_scope(request: HttpRequest) -> str:
    """The authenticated user (``user:<pk>``); anonymous requests share one scope.

    For DRF views this sees the user that DRF authenticated (token, basic, ...).
    """
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        return f"user:{user.pk}"
    return ANONYMOUS_SCOPE
