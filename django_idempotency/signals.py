"""Signals sent by the engine, so a project can count what happens.

Every signal is sent with ``sender`` set to the store class and ``call``, the
:class:`~django_idempotency.engine.Call` concerned.
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
