"""Between Django responses and stored snapshots, and the problem responses."""

from __future__ import annotations

import json
import logging

from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from django.template.response import SimpleTemplateResponse

from django_idempotency.conf import app_settings
from django_idempotency.exceptions import IdempotencyError, RequestInProgress
from django_idempotency.protocol import Conclusion, Discard, Snapshot

logger = logging.getLogger("django_idempotency")

REPLAYED_HEADER = "Idempotent-Replayed"
PROBLEM_CONTENT_TYPE = "application/problem+json"
# Never replayed, whatever the allow-list says: it would hand one client's
# session to whoever repeats the key.
_NEVER_STORED = frozenset({"set-cookie"})


def conclude(request: HttpRequest, response: HttpResponseBase) -> Conclusion:
    """What of ``response`` is kept: a snapshot, or why nothing is."""
    status = response.status_code
    if status >= 500 or status in frozenset(app_settings.RELEASE_STATUSES):
        return Discard.FAILURE
    if response.streaming:
        logger.warning(
            "Not stored: %s %s returned a streaming response", request.method, request.path
        )
        return Discard.UNSTORABLE
    _render(request, response)
    body = response.content  # type: ignore[attr-defined]
    if len(body) > int(app_settings.MAX_BODY_SIZE):
        logger.warning(
            "Not stored: %s %s returned %d bytes, over IDEMPOTENCY_MAX_BODY_SIZE",
            request.method,
            request.path,
            len(body),
        )
        return Discard.UNSTORABLE
    headers = tuple(
        (name, response[name])
        for name in app_settings.REPLAYED_HEADERS
        if name.lower() not in _NEVER_STORED and response.has_header(name)
    )
    return Snapshot(status=status, headers=headers, body=bytes(body))


def replay_response(snapshot: Snapshot) -> HttpResponse:
    """The stored outcome, marked as a replay."""
    response = HttpResponse(snapshot.body, status=snapshot.status)
    del response["Content-Type"]  # only what was stored is sent back
    for name, value in snapshot.headers:
        response[name] = value
    response[REPLAYED_HEADER] = "true"
    return response


def problem_response(error: IdempotencyError) -> HttpResponse:
    """An ``application/problem+json`` (RFC 9457) response for ``error``."""
    response = HttpResponse(
        json.dumps(error.problem()), status=error.status, content_type=PROBLEM_CONTENT_TYPE
    )
    if isinstance(error, RequestInProgress):
        response["Retry-After"] = str(error.retry_after)
    return response


def _render(request: HttpRequest, response: HttpResponseBase) -> None:
    """Render a lazy response now, inside the transaction, to snapshot its bytes."""
    if not isinstance(response, SimpleTemplateResponse) or response.is_rendered:
        return
    # A DRF Response renders through the view's negotiated renderer, which the
    # view sets in finalize_response(); DRF's Request knows its view. Duck
    # typing keeps this module free of DRF imports.
    view = getattr(request, "parser_context", {}).get("view")
    if view is not None and hasattr(view, "finalize_response"):
        view.finalize_response(request, response)
    response.render()
