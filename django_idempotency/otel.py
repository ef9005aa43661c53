"""OpenTelemetry spans and metrics for protected calls (extra ``[otel]``).

Call :func:`instrument` once, for example in an ``AppConfig.ready()``::

    from django_idempotency import otel

    otel.instrument()  # the global tracer and meter providers, or pass your own

It listens to the engine's signals (:mod:`django_idempotency.signals`) and
records, for every protected call, a span named ``idempotency`` with its
store, mode, outcome and claim wait, and metrics: ``idempotency.calls``
(counter, by outcome), ``idempotency.claim.wait`` and
``idempotency.store.duration`` (histograms, seconds). The key never leaves
the process: spans carry the first 12 hex digits of a SHA-256 of scope and
key, enough to find one call's spans, not to learn or replay the key.

The span is recorded when the call ends, with its real start and end times,
as a child of the span current at that moment (the request's span with
Django's instrumentation); spans that the protected code makes are its
siblings. Only ``opentelemetry-api`` is needed; the SDK and exporters are
the project's choice.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import Counter, Histogram, MeterProvider
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer, TracerProvider

from django_idempotency import engine, signals
from django_idempotency.protocol import Call

__all__ = ["instrument", "uninstrument"]

_SCOPE_NAME = "django_idempotency"
#: Outcomes that mean the protocol could not keep its promise for this call.
_ERRORS = frozenset({engine.REFUSED, engine.LEASE_LOST})
_UID = "django_idempotency.otel"


@dataclass(frozen=True)
class _Instruments:
    tracer: Tracer
    calls: Counter
    claim_wait: Histogram
    store_duration: Histogram


_instruments: _Instruments | None = None


def instrument(
    tracer_provider: TracerProvider | None = None, meter_provider: MeterProvider | None = None
) -> None:
    """Record spans and metrics from now on (again: with the providers given now)."""
    global _instruments
    meter = metrics.get_meter(_SCOPE_NAME, meter_provider=meter_provider)
    _instruments = _Instruments(
        tracer=trace.get_tracer(_SCOPE_NAME, tracer_provider=tracer_provider),
        calls=meter.create_counter(
            "idempotency.calls", unit="{call}", description="Protected calls, by outcome."
        ),
        claim_wait=meter.create_histogram(
            "idempotency.claim.wait",
            unit="s",
            description="From a call's start until its claim was decided, waits included.",
        ),
        store_duration=meter.create_histogram(
            "idempotency.store.duration",
            unit="s",
            description="Duration of each store operation (claim, complete, release).",
        ),
    )
    signals.finished.connect(_on_finished, dispatch_uid=_UID)
    signals.store_called.connect(_on_store_called, dispatch_uid=_UID)


def uninstrument() -> None:
    """Stop recording."""
    global _instruments
    signals.finished.disconnect(dispatch_uid=_UID)
    signals.store_called.disconnect(dispatch_uid=_UID)
    _instruments = None


def key_hash(call: Call) -> str:
    """What spans carry instead of the key: a short prefix of a SHA-256 of scope and key."""
    return hashlib.sha256(f"{call.scope}\0{call.key}".encode()).hexdigest()[:12]


def _on_finished(
    sender: Any,
    *,
    call: Call,
    store: str,
    mode: str,
    outcome: str,
    started: int,
    duration: float,
    claim_wait: float,
    **kwargs: Any,
) -> None:
    instruments = _instruments
    if instruments is None:
        return
    attributes = {"idempotency.store": store, "idempotency.mode": mode}
    instruments.calls.add(1, {**attributes, "idempotency.outcome": outcome})
    instruments.claim_wait.record(claim_wait, attributes)
    span = instruments.tracer.start_span(
        "idempotency",
        kind=SpanKind.INTERNAL,
        start_time=started,
        attributes={
            **attributes,
            "idempotency.outcome": outcome,
            "idempotency.claim_wait_s": claim_wait,
            "idempotency.key_hash": key_hash(call),
        },
    )
    if outcome in _ERRORS:
        span.set_status(Status(StatusCode.ERROR, outcome))
    span.end(end_time=started + int(duration * 1e9))


def _on_store_called(
    sender: Any, *, store: str, operation: str, duration: float, **kwargs: Any
) -> None:
    instruments = _instruments
    if instruments is not None:
        instruments.store_duration.record(
            duration, {"idempotency.store": store, "idempotency.operation": operation}
        )
