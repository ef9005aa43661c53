"""``python -m tests.brokered.relay``: one pass of the outbox relay into the workers' broker.

``manage.py relay_idempotency_outbox --once`` with the broker tests' Celery
app as Celery's current app, so that ``send_outbox_message`` publishes to the
test's broker and queue.
"""

from __future__ import annotations

import django
from django.core.management import call_command

from tests.brokered.app import app


def main() -> None:
    app.set_current()
    django.setup()
    call_command("relay_idempotency_outbox", "--once")


if __name__ == "__main__":
    main()
