"""Django tasks of the worker tests, run by django-tasks-db's ``manage.py db_worker``.

``python -m tests.brokered.django_tasks TASK EVENT_JSON TIMES`` enqueues a
task (from a process with the workers' settings and database) and prints the
result ids.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from django_idempotency.tasks import idempotent_task
from tests.brokered.effects import book_order

try:
    from django.tasks import task
except ImportError:  # Django 5.2: the django-tasks backport
    from django_tasks import task  # type: ignore[no-redef]


# Every enqueue of one event books once; a duplicate running meanwhile waits
# for the first and returns its result.
@task()
@idempotent_task(key=lambda event: event["id"], wait=15)
def book(event: dict[str, Any]) -> dict[str, Any]:
    return book_order(event)


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.brokered.settings")
    import django

    django.setup()
    # Imported by name, not run as __main__: the task's path is what the worker imports.
    from tests.brokered import django_tasks

    name, event, times = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    enqueued = getattr(django_tasks, name)
    print(json.dumps([str(enqueued.enqueue(event).id) for _ in range(times)]))


if __name__ == "__main__":
    main()
