"""gunicorn settings of the multi-process tests; the socket is passed as ``--bind fd://N``."""

from __future__ import annotations

wsgi_app = "tests.multiprocess.wsgi:application"
workers = 4
worker_class = "sync"
# Workers fork from an arbiter that imported Django once: a fast start, and a
# worker killed by a test is replaced at once.
preload_app = True
# A request held at a gate sends no heartbeat; the arbiter must not kill it
# before the test does (gates give up after views.HOLD_LIMIT seconds).
timeout = 120
graceful_timeout = 5
loglevel = "warning"
errorlog = "-"
