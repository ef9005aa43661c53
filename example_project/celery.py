"""The shop's Celery app: ``celery -A example_project worker --loglevel INFO``.

Settings come from ``example_project/settings.py`` (the ``CELERY_`` ones);
the broker from ``CELERY_BROKER_URL`` (RabbitMQ on the local machine by
default, or Redis: ``redis://127.0.0.1:6379/0``).
"""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")

app = Celery("example_project")
app.config_from_object("django.conf:settings", namespace="CELERY")
# Finds example_project/shop/tasks.py.
app.autodiscover_tasks()
