"""``manage.py relay_idempotency_outbox``: send due outbox messages, once or in a loop."""

from __future__ import annotations

import signal
import threading
from argparse import ArgumentParser, ArgumentTypeError
from datetime import timedelta
from types import FrameType
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError
from django.db import connections, router

from django_idempotency import outbox
from django_idempotency.durations import parse_duration
from django_idempotency.models import OutboxMessage


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ArgumentTypeError(f"{text!r} is not a positive whole number.")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ArgumentTypeError(f"{text!r} is not a positive number of seconds.")
    return value


def _duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise ArgumentTypeError(str(exc)) from None


class Command(BaseCommand):
    help = (
        "Send due outbox messages through IDEMPOTENCY_OUTBOX_SENDER, at least once each. "
        "--once (for cron) sends what is due and exits; --loop keeps going until SIGTERM "
        "or SIGINT, finishing the message in hand."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        how = parser.add_mutually_exclusive_group()
        how.add_argument("--once", action="store_true", help="Send what is due, then exit.")
        how.add_argument("--loop", action="store_true", help="Keep sending until stopped.")
        parser.add_argument(
            "--batch-size",
            type=_positive,
            default=100,
            help="Messages taken per transaction (default: %(default)s).",
        )
        parser.add_argument(
            "--interval",
            type=_seconds,
            default=1.0,
            help="With --loop, seconds to pause when nothing is due (default: %(default)s).",
        )
        parser.add_argument(
            "--claim-timeout",
            type=_duration,
            default=outbox.DEFAULT_CLAIM_TIMEOUT,
            metavar="DURATION",
            help="How long a taken batch is held before another relay may send it again, "
            "e.g. 30s, 5m (default: 5m). Longer than the slowest send.",
        )
        parser.add_argument(
            "--database",
            help="Database alias (default: where the router writes outbox messages).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        database = options["database"] or router.db_for_write(OutboxMessage)
        if database not in connections.settings:
            known = ", ".join(sorted(connections.settings))
            raise CommandError(f"Unknown database {database!r}; configured: {known}.")
        try:
            sender = outbox.get_sender()
        except (ImproperlyConfigured, ImportError) as exc:
            raise CommandError(str(exc)) from None
        batch_size = _checked(_positive, options["batch_size"])
        claim_timeout = options["claim_timeout"]
        if isinstance(claim_timeout, str):
            claim_timeout = _checked(_duration, claim_timeout)
        stop = threading.Event()
        restore = _stop_on_signals(stop) if options["loop"] else None
        total = outbox.Report()
        try:
            while not stop.is_set():
                report = outbox.relay(
                    sender,
                    batch_size=batch_size,
                    claim_timeout=claim_timeout,
                    database=database,
                    stop=stop,
                )
                total.sent += report.sent
                total.failed += report.failed
                total.returned += report.returned
                if options["verbosity"] >= 2 and report.taken:
                    self.stdout.write(f"  batch: sent {report.sent}, failed {report.failed}")
                if report.taken < batch_size:
                    if not options["loop"]:
                        break
                    stop.wait(_checked(_seconds, options["interval"]))
        finally:
            if restore is not None:
                restore()
        if options["verbosity"] >= 1:
            self.stdout.write(
                f"Sent {total.sent} outbox message(s); {total.failed} failed and will be retried."
            )


def _stop_on_signals(stop: threading.Event) -> Any:
    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


def _checked(parse: Any, value: Any) -> Any:
    try:
        return parse(str(value))
    except ArgumentTypeError as exc:
        raise CommandError(str(exc)) from None
