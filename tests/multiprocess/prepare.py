"""Migrate the test's database and create the two users; print what the client needs.

Run as ``python -m tests.multiprocess.prepare`` with the server's environment.
Prints JSON: per user (alice, bob) the pk, API token, a session key, and an
order of theirs to pay for.
"""

from __future__ import annotations

import io
import json
import os
import sys
from typing import Any


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.multiprocess.settings")
    import django

    django.setup()

    from django.core.management import call_command

    call_command("migrate", interactive=False, verbosity=0)
    call_command("seed_demo", stdout=io.StringIO())
    json.dump({name: _user(name) for name in ("alice", "bob")}, sys.stdout)


def _user(username: str) -> dict[str, Any]:
    from django.contrib.auth import (
        BACKEND_SESSION_KEY,
        HASH_SESSION_KEY,
        SESSION_KEY,
        get_user_model,
    )
    from django.contrib.sessions.backends.db import SessionStore
    from rest_framework.authtoken.models import Token

    from example_project.shop.models import Order

    user = get_user_model()._default_manager.get(username=username)
    # What login() would leave in the session, without a request to log in with.
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.create()
    order = Order.objects.create(owner=user, item="to pay for", amount="10.00")
    return {
        "pk": user.pk,
        "token": Token.objects.get(user=user).key,
        "session": session.session_key,
        "order": order.pk,
    }


if __name__ == "__main__":
    main()
