"""``manage.py erase_idempotency_keys``: delete a person's keys and stored responses."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError

from django_idempotency.conf import app_settings
from django_idempotency.erasure import erase_scope
from django_idempotency.management.commands.purge_idempotency_keys import _batch_size


class Command(BaseCommand):
    help = (
        "Delete every idempotency key of the given scopes, with its stored response, "
        "from every configured store (or --store): for erasure requests."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--scope",
            action="append",
            required=True,
            help="A scope to erase, e.g. user:42 (repeatable).",
        )
        parser.add_argument(
            "--store",
            action="append",
            metavar="ALIAS",
            help="Only this store alias of IDEMPOTENCY_STORES (repeatable; default: all).",
        )
        parser.add_argument("--batch-size", type=_batch_size, default=1000)
        parser.add_argument(
            "--dry-run", action="store_true", help="Count the keys that would be erased."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        scopes: list[str] = options["scope"]
        if any(not scope.strip() for scope in scopes):
            raise CommandError("--scope must not be empty.")
        stores = _aliases(options["store"])
        verb = "Would erase" if options["dry_run"] else "Erased"
        for scope in scopes:
            try:
                counts = erase_scope(
                    scope,
                    stores=stores,
                    dry_run=options["dry_run"],
                    batch_size=options["batch_size"],
                )
            except (ImproperlyConfigured, NotImplementedError) as exc:
                raise CommandError(str(exc)) from exc
            for alias, count in counts.items():
                self.stdout.write(f"{verb} {count} key(s) of scope {scope!r} in store {alias!r}.")


def _aliases(requested: list[str] | None) -> list[str]:
    configured = list(app_settings.STORES)
    unknown = sorted(set(requested or ()) - set(configured))
    if unknown:
        raise CommandError(
            f"Unknown store alias(es): {', '.join(unknown)}; configured: {', '.join(configured)}."
        )
    return requested or configured
