"""``manage.py seed_demo``: the demo users, with known passwords and API tokens."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction
from rest_framework.authtoken.models import Token

# Public on purpose: the README's curl session uses them.
DEMO_USERS = {
    # username: (password, API token, superuser)
    "admin": ("admin", "demo-token-admin", True),
    "alice": ("alice", "demo-token-alice", False),
    "bob": ("bob", "demo-token-bob", False),
}


class Command(BaseCommand):
    help = "Create or reset the demo users admin, alice and bob (password = username)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--database", default="default", help="Database alias to seed (default: default)."
        )

    def handle(self, *args: Any, database: str, **options: Any) -> None:
        with transaction.atomic(using=database):
            for username, (password, token, superuser) in DEMO_USERS.items():
                self._seed(database, username, password, token, superuser=superuser)
        for username, (password, token, _superuser) in DEMO_USERS.items():
            self.stdout.write(f"{username:6} password {password!r:8} token {token}")

    def _seed(
        self, database: str, username: str, password: str, token: str, *, superuser: bool
    ) -> None:
        user_model = get_user_model()
        user, _created = user_model._default_manager.db_manager(database).get_or_create(
            username=username
        )
        user.set_password(password)
        user.is_staff = user.is_superuser = superuser
        user.save(using=database)
        Token.objects.using(database).filter(user=user).exclude(key=token).delete()
        Token.objects.using(database).get_or_create(user=user, key=token)
