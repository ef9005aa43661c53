"""The shop's three entry points under other protections, and a fault gate.

Each protection (a name in :data:`PROTECTIONS`) gets the shop's order viewset,
payment view and plain order view, running the shop's own code, protected
with that protection's options. The example project's URLs stay as they are.

A request sent with ``X-Hold: <name>`` stops at a gate inside the protected
view: it writes ``<name>.inside`` (its worker's pid and its database
backend's pid) in ``settings.FAULT_DIR``, then waits until the test creates
``<name>.open``. While it waits, the test knows it is in flight and which
process and database session to kill. Orders are held after their write;
payments before the provider is called.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import time
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.db import connection
from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from django.views.decorators.http import require_POST
from rest_framework.decorators import api_view
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import BaseSerializer

from django_idempotency import signals
from django_idempotency.decorators import idempotent
from django_idempotency.models import IdempotencyStep, OutboxMessage
from example_project.shop import provider
from example_project.shop import views as shop
from example_project.shop.models import Order
from example_project.shop.outbox import deliver
from example_project.shop.serializers import PaymentSerializer

#: Options of ``@idempotent`` per protection; the views under ``/mp/<name>/``.
PROTECTIONS: dict[str, dict[str, Any]] = {
    "atomic": {"mode": "atomic"},
    "lease": {"mode": "lease", "lease": 10},
    "redis": {"mode": "lease", "lease": 10, "store": "redis"},
    # Short leases, for the takeover after a crash.
    "lease-short": {"mode": "lease", "lease": 2},
    "redis-short": {"mode": "lease", "lease": 2, "store": "redis"},
    # The Redis store failing open (with a Redis Cluster, where it is configured).
    "redis-open": {"mode": "lease", "lease": 10, "store": "redis_open"},
    # Keys that expire a second after completion, for the purge.
    "brief": {"mode": "atomic", "retention": 1},
    # A Redis that cannot be reached: refused (the default) or run unprotected.
    "redis-down": {"mode": "lease", "store": "redis_down"},
    "redis-down-open": {"mode": "lease", "store": "redis_down_open"},
}

#: How long a held request waits for its gate before giving up (seconds).
HOLD_LIMIT = 60.0
_GATE_NAME = re.compile(r"[a-z0-9-]{1,64}")


def ready(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ready", content_type="text/plain")


def hold_if_asked(request: HttpRequest) -> None:
    """Stop at the gate named by ``X-Hold``, if the request has one (and no ``X-Hold-At``)."""
    name = request.headers.get("X-Hold")
    if name is None or request.headers.get("X-Hold-At"):
        return
    hold(name)


def hold(name: str) -> None:
    """Stop at the gate ``name``: say who is inside, wait until the test opens it."""
    if not _GATE_NAME.fullmatch(name):
        raise ValueError(f"bad gate name {name!r}")
    fault_dir = getattr(settings, "FAULT_DIR", "")
    if not fault_dir:
        raise RuntimeError("X-Hold needs MP_FAULT_DIR: where the gates are")
    directory = Path(fault_dir)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (backend_pid,) = cursor.fetchone()
    inside = {"pid": os.getpid(), "backend_pid": backend_pid}
    # Written whole, then renamed: the test never reads half a file.
    draft = directory / f"{name}.inside.tmp"
    draft.write_text(json.dumps(inside))
    draft.replace(directory / f"{name}.inside")
    gate = directory / f"{name}.open"
    deadline = time.monotonic() + HOLD_LIMIT
    # A file, polled, rather than a lock in the database: a worker killed here
    # leaves its database session idle, and PostgreSQL ends it at once.
    while not gate.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"gate {name!r} never opened")
        time.sleep(0.01)


class HeldOrderViewSet(shop.OrderViewSet):
    def perform_create(self, serializer: BaseSerializer[Order]) -> None:
        super().perform_create(serializer)
        hold_if_asked(self.request)


def order_viewset(name: str, options: dict[str, Any]) -> Callable[..., HttpResponseBase]:
    attributes = {f"idempotency_{option}": value for option, value in options.items()}
    viewset: type[HeldOrderViewSet] = type(f"OrderViewSet_{name}", (HeldOrderViewSet,), attributes)
    view: Callable[..., HttpResponseBase] = viewset.as_view({"post": "create"})
    return view


def _under_api_view(view: Any) -> Callable[..., Any]:
    """The function that ``@api_view`` turned into ``view``, its other decorators removed."""
    # DRF keeps it only in the closure of the handler it installs.
    (cell,) = view.cls.post.__closure__
    function: Callable[..., Any] = inspect.unwrap(cell.cell_contents)
    return function


_payment_logic = _under_api_view(shop.create_payment)
_order_logic = inspect.unwrap(shop.create_order)


def _payment_without_steps(request: Request) -> HttpResponseBase:
    """The payment as written for a store that keeps no steps (Redis): one piece.

    The shop's own view records steps, which need the database store; under
    the Redis store the whole view is what lease mode protects.
    """
    serializer = PaymentSerializer(data=request.data, context={"request": request})
    serializer.is_valid(raise_exception=True)
    reference = provider.charge(serializer.validated_data["amount_cents"])
    serializer.save(owner=request.user, reference=reference)
    return Response(serializer.data, status=201)


def payment_view(options: dict[str, Any]) -> Callable[..., HttpResponseBase]:
    steps = not str(options.get("store", "")).startswith("redis")
    logic = _payment_logic if steps else _payment_without_steps

    @api_view(["POST"])
    @idempotent(**options)
    def create_payment(request: Request) -> HttpResponseBase:
        hold_if_asked(request)
        response: HttpResponseBase = logic(request)
        return response

    return create_payment


def plain_order_view(options: dict[str, Any]) -> Callable[..., HttpResponseBase]:
    @require_POST
    @login_required
    @idempotent(**options)
    def create_order(request: HttpRequest) -> HttpResponseBase:
        response: HttpResponseBase = _order_logic(request)
        hold_if_asked(request)
        return response

    return create_order


# Holding at a step boundary -------------------------------------------------
#
# ``X-Hold-At: step:<name>`` holds the request at gate ``X-Hold`` once step
# <name> is recorded; ``X-Hold-At: provider`` once the fake provider charged
# (inside the charge step, before its record); ``X-Hold-At: record:<name>``
# inside step <name>, its work done and its writes sent but not committed,
# just before its record and COMMIT are sent. Read from the request by the
# middleware, since signal receivers get no request.

_hold_at: ContextVar[tuple[str, str] | None] = ContextVar("mp_hold_at", default=None)


def remember_hold_point(get_response: Callable[[HttpRequest], Any]) -> Callable[..., Any]:
    def middleware(request: HttpRequest) -> Any:
        point, gate = request.headers.get("X-Hold-At"), request.headers.get("X-Hold")
        token = _hold_at.set((point, gate) if point and gate else None)
        try:
            if point and gate and point.startswith("record:"):
                with connection.execute_wrapper(_hold_before_record):
                    return get_response(request)
            return get_response(request)
        finally:
            _hold_at.reset(token)

    return middleware


def _hold_at_point(point: str) -> None:
    wanted = _hold_at.get()
    if wanted is not None and wanted[0] == point:
        hold(wanted[1])


_STEPS_TABLE = IdempotencyStep._meta.db_table


def _hold_before_record(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
    """Hold before the statement that records a step (its name is its third parameter)."""
    if sql.startswith("INSERT") and _STEPS_TABLE in sql:
        _hold_at_point(f"record:{params[2]}")
    return execute(sql, params, many, context)


def _after_step(name: str, **kwargs: Any) -> None:
    _hold_at_point(f"step:{name}")


def _after_charge(**kwargs: Any) -> None:
    _hold_at_point("provider")


signals.step_completed.connect(_after_step, dispatch_uid="mp-hold-after-step")
provider.charged.connect(_after_charge, dispatch_uid="mp-hold-after-charge")


# The relay's sender ------------------------------------------------------------


def deliver_and_hold(message: OutboxMessage) -> None:
    """The shop's sender, logging each delivery; holds after ``MP_RELAY_HOLD_AFTER`` of them.

    The log (``relay-deliveries.log`` in the fault directory, one message id a
    line) shows how often each message was delivered.
    """
    deliver(message)
    directory = Path(getattr(settings, "FAULT_DIR", ""))
    log = directory / "relay-deliveries.log"
    with log.open("a") as lines:
        lines.write(f"{message.pk}\n")
    hold_after = int(os.environ.get("MP_RELAY_HOLD_AFTER", "0"))
    if hold_after and len(log.read_text().splitlines()) == hold_after:
        hold("relay")
