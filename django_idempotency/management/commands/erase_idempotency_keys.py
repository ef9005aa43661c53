"""``manage.py erase_idempotency_keys``: delete a person's keys and stored responses."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError

from django_idempotency.conf import app_settings
from django_idempotency.erasure import Erasure, erase_scope
from django_idempotency.management.commands.purge_idempotency_keys import _batch_size


class Command(BaseCommand):
    help = (
        "Delete every idempotency key of the given scopes, with its stored response, "
        "its recorded steps and its sent outbox messages, from every configured store "
        "(or --store): for erasure requests. Outbox messages not yet sent are kept and "
        "counted (follow-ups still owed) unless --include-pending."
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
        parser.add_argument(
            "--database",
            help="For database stores: the database alias (default: the store's).",
        )
        parser.add_argument("--batch-size", type=_batch_size, default=1000)
        parser.add_argument(
            "--include-pending",
            action="store_true",
            help="Also delete the scope's outbox messages not yet sent (their follow-ups are "
            "then never delivered).",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="Count the keys that would be erased."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        scopes: list[str] = options["scope"]
        if any(not scope.strip() for scope in scopes):
            raise CommandError("--scope must not be empty.")
        stores = _aliases(options["store"])
        dry_run = options["dry_run"]
        for scope in scopes:
            try:
                erased = erase_scope(
                    scope,
                    stores=stores,
                    dry_run=dry_run,
                    batch_size=options["batch_size"],
                    include_pending=options["include_pending"],
                    database=options["database"],
                )
            except (ImproperlyConfigured, NotImplementedError) as exc:
                raise CommandError(str(exc)) from exc
            for alias, done in erased.items():
                self.stdout.write(_report(scope, alias, done, dry_run))


def _report(scope: str, alias: str, done: Erasure, dry_run: bool) -> str:
    verb = "Would erase" if dry_run else "Erased"
    line = f"{verb} {done.keys} key(s) of scope {scope!r} in store {alias!r}"
    if done.steps or done.messages:
        line += f", with {done.steps} step result(s) and {done.messages} outbox message(s)"
    line += "."
    if done.kept_pending:
        kept = "Would keep" if dry_run else "Kept"
        line += (
            f" {kept} {done.kept_pending} outbox message(s) not yet sent: follow-ups still "
            "owed; erase again once they are delivered, or use --include-pending."
        )
    return line


def _aliases(requested: list[str] | None) -> list[str]:
    configured = list(app_settings.STORES)
    unknown = sorted(set(requested or ()) - set(configured))
    if unknown:
        raise CommandError(
            f"Unknown store alias(es): {', '.join(unknown)}; configured: {', '.join(configured)}."
        )
    return requested or configured
