"""Signals sent by the engine, so a project can count what happens.

Every signal is sent with ``sender`` set to the store class; all but
:data:`store_called` with ``call``, the :class:`~django_idempotency.engine.Call`
concerned. :mod:`django_idempotency.otel` turns them into spans and metrics.
"""

from __future__ import annotations

from django.dispatch import Signal

#: The protected code ran for a new key (sent after its outcome was handled).
executed = Signal()
#: A stored outcome was returned instead of running again.
replayed = Signal()
#: A duplicate arrived while the first was still in flight (answered 409).
conflict = Signal()
#: A key was reused with a different request fingerprint (answered 422).
mismatch = Signal()
#: An in-progress claim whose lease had ended was taken over.
takeover = Signal()
#: A step's result was recorded (in lease mode, once its transaction committed;
#: in atomic mode it commits with the request); sent with ``name`` as well.
step_completed = Signal()
#: A protected call ended, however it ended. Also sent: ``store`` (alias),
#: ``mode``, ``outcome`` (one of ``engine.OUTCOMES``: executed, replayed,
#: conflict, mismatch, refused, takeover, lease_lost, released, unprotected),
#: ``started`` (wall clock, ns since the epoch), ``duration`` and
#: ``claim_wait`` (seconds from the start until the claim was decided,
#: waiting for an in-flight duplicate included).
finished = Signal()
#: One store operation returned or raised. Sent with ``store`` (alias),
#: ``operation`` ("claim", "complete" or "release") and ``duration`` (seconds).
store_called = Signal()
