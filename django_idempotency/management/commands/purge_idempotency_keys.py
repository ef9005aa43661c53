"""``manage.py purge_idempotency_keys``: delete expired keys, safely, while traffic flows."""

from __future__ import annotations

from argparse import ArgumentParser, ArgumentTypeError
from datetime import datetime, timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import connections, router
from django.db.models import Model, Q, QuerySet
from django.utils import timezone

from django_idempotency import purge
from django_idempotency.conf import app_settings, to_seconds
from django_idempotency.durations import parse_duration
from django_idempotency.models import IdempotencyKey, IdempotencyStep, OutboxMessage


def _duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise ArgumentTypeError(str(exc)) from None


def _batch_size(text: str) -> int:
    try:
        size = int(text)
    except ValueError:
        size = 0
    if size <= 0:
        raise ArgumentTypeError(f"{text!r} is not a positive whole number.")
    return size


class Command(BaseCommand):
    help = (
        "Delete idempotency keys whose retention has ended, in short batches, so "
        "it is safe to run from cron while requests come in. Live keys are never deleted. "
        "Expired steps and outbox messages sent longer ago than "
        "IDEMPOTENCY_OUTBOX_RETENTION go too; unsent messages never do."
    )
    # Run from cron, whose mail carries whatever a command prints: the system
    # checks (W001 on SQLite, above all) are for `check`, `runserver` and
    # `migrate`. Purging depends on no setting they validate.
    requires_system_checks = ()

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--older-than",
            type=_duration,
            default=timedelta(0),
            metavar="DURATION",
            help="Only keys that expired more than this long ago, e.g. 30m, 12h, 7d, 2w "
            "(default: every expired key).",
        )
        parser.add_argument(
            "--include-stale",
            action="store_true",
            help="Also delete in-progress claims whose lease ended more than --older-than "
            f"ago (default: {_describe(purge.DEFAULT_STALE_GRACE)}): their worker died.",
        )
        parser.add_argument(
            "--batch-size",
            type=_batch_size,
            default=purge.DEFAULT_BATCH_SIZE,
            help="Rows deleted per transaction (default: %(default)s).",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Count what would be deleted, delete nothing.",
        )
        parser.add_argument(
            "--database",
            help="Database alias (default: where the router writes idempotency keys).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        database = options["database"] or router.db_for_write(IdempotencyKey)
        if database not in connections.settings:
            known = ", ".join(sorted(connections.settings))
            raise CommandError(f"Unknown database {database!r}; configured: {known}.")
        # Commands called in code bypass the parser's type checks.
        batch_size = _checked(_batch_size, options["batch_size"])
        older_than = options["older_than"]
        if isinstance(older_than, str):
            older_than = _checked(_duration, older_than)

        now = timezone.now()
        try:
            now - older_than  # the conditions below compute it
        except OverflowError:
            raise CommandError(
                f"--older-than {_describe(older_than)} reaches back before the year 1; "
                "give a shorter duration."
            ) from None
        targets: list[tuple[str, type[Model], Q, str]] = [
            ("expired keys", IdempotencyKey, purge.expired(now, older_than), "expires")
        ]
        #: Reported only when there are some: most projects use neither.
        quiet_when_none = {"expired steps", "sent outbox messages"}
        if options["include_stale"]:
            grace = older_than or purge.DEFAULT_STALE_GRACE
            targets.append(
                ("stale in-progress claims", IdempotencyKey, purge.stale(now, grace), "expires")
            )
        # Steps and sent outbox messages go with the keys they belong to.
        targets.append(
            ("expired steps", IdempotencyStep, purge.expired_steps(now, older_than), "expires")
        )
        retention = timedelta(seconds=to_seconds(app_settings.OUTBOX_RETENTION)) + older_than
        targets.append(
            ("sent outbox messages", OutboxMessage, purge.sent_messages(now, retention), "sent")
        )

        for label, model, condition, order_by in targets:
            queryset = model._default_manager.using(database).filter(condition)
            quiet = label in quiet_when_none
            if options["dry_run"]:
                self._count(queryset, label, now, quiet)
            else:
                self._delete(queryset, label, batch_size, order_by, options["verbosity"], quiet)

    def _count(self, queryset: QuerySet[Any], label: str, now: datetime, quiet: bool) -> None:
        count = queryset.count()
        if count or not quiet:
            self.stdout.write(f"Would delete {count} {label} (dry run, as of {now.isoformat()}).")

    def _delete(
        self,
        queryset: QuerySet[Any],
        label: str,
        batch_size: int,
        order_by: str,
        verbosity: int,
        quiet: bool,
    ) -> None:
        total = batches = 0
        for deleted in purge.delete_in_batches(queryset, batch_size, order_by):
            total += deleted
            batches += 1
            if verbosity >= 2:
                self.stdout.write(f"  batch {batches}: deleted {deleted} {label}")
        if verbosity >= 1 and (total or not quiet):
            self.stdout.write(f"Deleted {total} {label} in {batches} batch(es).")


def _checked(parse: Any, value: Any) -> Any:
    try:
        return parse(str(value))
    except ArgumentTypeError as exc:
        raise CommandError(str(exc)) from None


def _describe(duration: timedelta) -> str:
    total = int(duration.total_seconds())
    for unit, size in (("w", 604_800), ("d", 86_400), ("h", 3600)):
        if total and not total % size:
            return f"{total // size}{unit}"
    return f"{total}s"
