"""A stand-in for an external payment provider.

Real providers answer over the network, slowly and sometimes not at all; that
is why the payment view uses the ``lease`` mode. ``SHOP_PROVIDER_DELAY``
(seconds) imitates their latency, so that a duplicate sent while a charge is
in flight can be seen to get ``409 Conflict``.
"""

from __future__ import annotations

import time
import uuid

from django.conf import settings


class ProviderError(Exception):
    """The provider refused the charge or could not be reached; nothing was charged."""


def charge(amount_cents: int) -> str:
    """Charge ``amount_cents`` and return the provider's reference for the charge.

    Raises :class:`ProviderError` when nothing was charged (this fake never does).
    """
    delay = float(getattr(settings, "SHOP_PROVIDER_DELAY", 0))
    if delay > 0:
        time.sleep(delay)
    return f"ch_{uuid.uuid4().hex[:20]}"
