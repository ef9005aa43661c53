"""``manage.py consume_payment_events [FILE]``: feed "payment captured" messages to the consumer.

One JSON object per line, from FILE or standard input, for example::

    {"id": "evt_1", "payment": "ch_0123", "amount_cents": 450}

It stands in for a queue: each line is one delivery, and the same message may
come several times. One line of output per delivery says what became of it,
as a queue consumer would decide to acknowledge, retry or dead-letter it.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_idempotency import signals
from django_idempotency.exceptions import FingerprintMismatch, RequestInProgress
from example_project.shop.consumers import InvalidMessage, on_payment_captured
from example_project.shop.models import Payment

#: Outcomes after which a queue would acknowledge the message.
DONE = ("applied", "replayed")


class Command(BaseCommand):
    help = (
        'Deliver "payment captured" messages (JSON lines from FILE or standard input) '
        "to the shop's idempotent consumer and print what became of each."
    )
    # call_command(..., stdin=StringIO(...)) in tests.
    stealth_options = ("stdin",)

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "file", nargs="?", default="-", help="File of JSON lines (default: standard input)."
        )

    def handle(self, *args: Any, file: str, **options: Any) -> None:
        counts: Counter[str] = Counter()
        with self._lines(file, options.get("stdin")) as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                outcome, message_id, detail = self._deliver(number, line)
                counts[outcome] += 1
                self.stdout.write(f"{message_id:<12} {outcome:<11} {detail}")
        total = sum(counts.values())
        summary = ", ".join(f"{count} {outcome}" for outcome, count in counts.items())
        self.stdout.write(f"{total} message{'' if total == 1 else 's'}: {summary or 'none'}")
        undone = total - sum(counts[outcome] for outcome in DONE)
        if undone:
            raise CommandError(f"{undone} of {total} messages were not processed.")

    @contextlib.contextmanager
    def _lines(self, file: str, stdin: IO[str] | None) -> Iterator[IO[str]]:
        if file == "-":
            yield stdin or sys.stdin
            return
        try:
            with Path(file).open(encoding="utf-8") as lines:
                yield lines
        except OSError as error:
            raise CommandError(f"Cannot read {file}: {error.strerror}.") from error

    def _deliver(self, number: int, line: str) -> tuple[str, str, str]:
        """(outcome, message id, detail) of one delivery."""
        try:
            message = json.loads(line)
        except ValueError:
            return "invalid", f"line {number}", "not JSON"
        if not isinstance(message, dict) or not isinstance(message.get("id"), str | int):
            return "invalid", f"line {number}", 'not a JSON object with an "id"'
        message_id = str(message["id"])
        try:
            with executed_or_replayed() as outcome:
                result = on_payment_captured(message)
        except RequestInProgress as busy:
            detail = f"another worker has it: retry in {busy.retry_after} s"
            return "in progress", message_id, detail
        except FingerprintMismatch:
            return "mismatch", message_id, "this id came before with a different message"
        except InvalidMessage as error:
            return "invalid", message_id, str(error)
        except Payment.DoesNotExist:
            return "failed", message_id, f"no payment {message['payment']} (yet): redeliver later"
        return outcome[0], message_id, describe(result)


def describe(result: dict[str, Any]) -> str:
    return (
        f"ledger entry {result['ledger_entry']}: {result['amount_cents']} cents "
        f"captured on {result['payment']} ({result['captured_cents']} in all)"
    )


@contextlib.contextmanager
def executed_or_replayed() -> Iterator[list[str]]:
    """Whether the consumer ran or returned a stored result, as the library's signals say.

    Signals are sent in the thread of the call; only this thread's count.
    """
    outcome: list[str] = []
    thread = threading.get_ident()

    def executed(**kwargs: Any) -> None:
        if threading.get_ident() == thread:
            outcome.append("applied")

    def replayed(**kwargs: Any) -> None:
        if threading.get_ident() == thread:
            outcome.append("replayed")

    signals.executed.connect(executed)
    signals.replayed.connect(replayed)
    try:
        yield outcome
    finally:
        signals.executed.disconnect(executed)
        signals.replayed.disconnect(replayed)
