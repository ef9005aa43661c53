"""Parsing of the ``Idempotency-Key`` header value.

The IETF draft defines the value as a Structured Field String (``"abc"``);
many clients send the bare form (``abc``). Both are accepted. A key is 1 to
255 characters of printable ASCII (0x20 to 0x7E). A bare key holds no comma:
a server joins two ``Idempotency-Key`` fields into one value with a comma
(RFC 9110, section 5.3), and a Structured Field parser reads that as a list,
which is not a key. A comma inside a quoted key is part of it.
"""

from __future__ import annotations

from django_idempotency.exceptions import KeyMalformed

MAX_KEY_LENGTH = 255
_PRINTABLE = frozenset(chr(c) for c in range(0x20, 0x7F))
_OWS = " \t"


def parse_key(value: str) -> str:
    """Return the key carried by a header value, or raise :class:`KeyMalformed`."""
    value = value.strip(_OWS)
    if value.startswith('"'):
        key = _parse_sf_string(value)
    elif "," in value:
        raise KeyMalformed("The request carries more than one idempotency key.")
    else:
        key = value
    if not key:
        raise KeyMalformed("The idempotency key is empty.")
    if len(key) > MAX_KEY_LENGTH:
        raise KeyMalformed(f"The idempotency key is longer than {MAX_KEY_LENGTH} characters.")
    if not _PRINTABLE.issuperset(key):
        raise KeyMalformed("The idempotency key must be printable ASCII.")
    return key


def _parse_sf_string(value: str) -> str:
    """Parse an RFC 8941 sf-string that makes up the whole of ``value``."""
    chars: list[str] = []
    i = 1
    while i < len(value):
        char = value[i]
        if char == "\\":
            if i + 1 >= len(value) or value[i + 1] not in '"\\':
                raise KeyMalformed("The quoted idempotency key has an invalid escape.")
            chars.append(value[i + 1])
            i += 2
        elif char == '"':
            if i != len(value) - 1:
                raise KeyMalformed("Unexpected characters after the quoted idempotency key.")
            return "".join(chars)
        elif char not in _PRINTABLE:
            raise KeyMalformed("The idempotency key must be printable ASCII.")
        else:
            chars.append(char)
            i += 1
    raise KeyMalformed("The quoted idempotency key has no closing quote.")
