"""Short durations such as ``90s``, ``15m``, ``12h``, ``7d``, ``2w`` or ``1d12h``."""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_PART = re.compile(r"(\d+)([smhdw])")
_WHOLE = re.compile(r"(?:\d+[smhdw])+")


def parse_duration(text: str) -> timedelta:
    """The duration ``text`` spells: numbers each followed by a unit (s, m, h, d, w).

    Raises :class:`ValueError`, with a message fit for a user, on anything else.
    """
    compact = text.strip().lower()
    if not _WHOLE.fullmatch(compact):
        raise ValueError(
            f"{text!r} is not a duration: use a number followed by a unit among "
            "s, m, h, d, w (for example 90s, 15m, 12h, 7d, 2w or 1d12h)."
        )
    parts: dict[str, int] = {}
    for number, unit in _PART.findall(compact):
        name = _UNITS[unit]
        parts[name] = parts.get(name, 0) + int(number)
    try:
        return timedelta(**parts)
    except OverflowError:
        raise ValueError(f"{text!r} is too long a duration.") from None
