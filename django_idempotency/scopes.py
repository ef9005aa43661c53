"""Scope functions: the namespace a key is unique in.

A scope is stored in clear beside each key and shown in the admin, so it holds
identifiers (a primary key, a tenant id), never personal data such as a user
name or an e-mail address.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest

ANONYMOUS_SCOPE = "anonymous"


def user_scope(request: HttpRequest) -> str:
    """The authenticated user (``user:<pk>``); anonymous requests share one scope.

    For DRF views this sees the user that DRF authenticated (token, basic, ...).
    """
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        return scope_of_user(user)
    return ANONYMOUS_SCOPE


def scope_of_user(user: Any) -> str:
    """The scope :func:`user_scope` gives ``user``'s requests: its primary key only."""
    return f"user:{user.pk}"
