"""``manage.py reencrypt_idempotency_keys``: seal stored responses with the newest key."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError
from django.db import connections

from django_idempotency import sealing
from django_idempotency.checks import check_encryption_keys
from django_idempotency.management.commands.erase_idempotency_keys import _aliases
from django_idempotency.management.commands.purge_idempotency_keys import _batch_size
from django_idempotency.stores import build_store
from django_idempotency.stores.database import DatabaseStore


class Command(BaseCommand):
    help = (
        "Re-encrypt stored responses, step results and outbox payloads with the newest "
        "key of IDEMPOTENCY_ENCRYPTION_KEYS (and encrypt those stored in clear, or sealed "
        "in the older Fernet format), in batches. Run it after adding a key, "
        "before removing the old one."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--store",
            action="append",
            metavar="ALIAS",
            help="Only this store alias of IDEMPOTENCY_STORES (repeatable; default: all).",
        )
        parser.add_argument(
            "--database",
            help="For database stores: the database alias (default: the store's).",
        )
        parser.add_argument("--batch-size", type=_batch_size, default=1000)
        parser.add_argument(
            "--dry-run", action="store_true", help="Count what would be re-encrypted."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not sealing.enabled():
            raise CommandError("IDEMPOTENCY_ENCRYPTION_KEYS is empty: there is no key to use.")
        problems = check_encryption_keys()
        if problems:
            raise CommandError(problems[0].msg)
        database = options["database"]
        if database is not None and database not in connections.settings:
            raise CommandError(f"Unknown database {database!r}.")
        failed = False
        for alias in _aliases(options["store"]):
            try:
                # A store of its own: the shared one must not change database.
                store = build_store(alias)
                if database is not None and isinstance(store, DatabaseStore):
                    store.database = database
                done = store.reseal(dry_run=options["dry_run"], batch_size=options["batch_size"])
            except (ImproperlyConfigured, NotImplementedError) as exc:
                raise CommandError(str(exc)) from exc
            verb = "would re-encrypt" if options["dry_run"] else "re-encrypted"
            self.stdout.write(
                f"Store {alias!r}: {done.examined} stored value(s) examined, "
                f"{verb} {done.resealed}, {done.unreadable} unreadable."
            )
            failed = failed or bool(done.unreadable)
        if failed:
            raise CommandError(
                "Some stored values cannot be decrypted with any configured key "
                "(see the log): they are left as they are and refused at replay."
            )
