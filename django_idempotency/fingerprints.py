"""Request fingerprints: what makes two requests with one key "the same".

What is canonicalised, so that a faithful retry matches:

- the media type: parameters (``charset``, ``boundary``) and case are left out;
- JSON bodies (``application/json``, ``*/*+json``): key order, white space,
  string escapes, and the spelling of numbers (``1``, ``1.0`` and ``10e-1`` are
  one value; ``0.1`` and ``0.10000000000000001`` are two, compared exactly,
  never through a float). A repeated object key counts by its last value, as
  ``json.loads`` reads it;
- ``multipart/form-data`` bodies: the boundary. The parsed fields and files
  (name, size, content type, SHA-256 of the contents) are hashed instead.

Everything else is hashed as sent: form-encoded and other bodies byte for
byte, JSON that does not parse (or nests too deep to) as its raw bytes. The
media type and the kind of body are hashed too, so a form and a text body
with the same bytes, or a JSON body that mirrors a parsed form, differ.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.core.files.uploadedfile import UploadedFile
from django.http import HttpRequest
from django.http.request import RawPostDataException
from django.utils.http import parse_header_parameters

_MULTIPART = "multipart/form-data"
_JSON_NUMBER = re.compile(r"(-?)(\d+)(?:\.(\d+))?(?:[eE]([-+]?\d+))?")


def request_fingerprint(request: HttpRequest) -> str:
    """SHA-256 of the method, the path with its query string, the media type and the body.

    Works on Django's ``HttpRequest`` and on DRF's ``Request`` alike.
    """
    media_type = _media_type(request.content_type)
    kind, body = _canonical_body(request, media_type)
    digest = hashlib.sha256()
    for part in (request.method or "", request.get_full_path(), media_type, kind):
        digest.update(part.encode())
        digest.update(b"\n")
    digest.update(body)
    return digest.hexdigest()


def request_body(request: HttpRequest) -> bytes:
    """The body in canonical form, for hashing."""
    return _canonical_body(request, _media_type(request.content_type))[1]


def canonical_json(value: Any) -> bytes:
    """Serialise ``value`` with sorted keys and no insignificant white space."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _media_type(content_type: str | None) -> str:
    # Django's HttpRequest has the parameters split off already; DRF's Request
    # returns the raw header.
    return parse_header_parameters(content_type or "")[0]


def _canonical_body(request: HttpRequest, media_type: str) -> tuple[str, bytes]:
    """``(kind, bytes)``: the kind keeps canonical forms apart from raw bodies."""
    if media_type == _MULTIPART:
        # Clients draw a new random boundary for every request they build, so
        # a retry's raw bytes differ: hash the parsed fields and files instead.
        # Read the body first where Django allows it: parsing the form would
        # otherwise consume the stream and take request.body from the view.
        # Over DATA_UPLOAD_MAX_MEMORY_SIZE, leave the body unread: the form
        # is then parsed from the stream, as the view itself would.
        with contextlib.suppress(RawPostDataException, RequestDataTooBig):
            request.body  # noqa: B018  (cached on the request)
        return "form-data", _parsed_form(request)
    try:
        body = request.body
    except RawPostDataException:
        # Read as a stream by the time we see it: hash what was parsed from it.
        return "form-data", _parsed_form(request)
    if media_type == "application/json" or media_type.endswith("+json"):
        with contextlib.suppress(ValueError, RecursionError):
            # Not valid JSON (or nested too deep to decode): the raw bytes
            # stand for themselves. UnicodeDecodeError is a ValueError.
            return "json", _exact_json(body)
    return "bytes", body


def _exact_json(body: bytes) -> bytes:
    value = json.loads(body, parse_int=_Number, parse_float=_Number, parse_constant=_Number)
    return _serialise(value).encode()


class _Number(str):
    """A JSON number as written, so that no digit is lost to a float."""


def _serialise(value: Any) -> str:
    if isinstance(value, dict):
        items = sorted(value.items())
        return "{" + ",".join(f"{_string(k)}:{_serialise(v)}" for k, v in items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_serialise(item) for item in value) + "]"
    if isinstance(value, _Number):
        return _exact_number(value)
    if isinstance(value, str):
        return _string(value)
    return json.dumps(value)  # true, false, null


def _string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def _exact_number(number: str) -> str:
    """One spelling per decimal value: ``<sign><digits>e<exponent>``, no trailing zeros."""
    match = _JSON_NUMBER.fullmatch(number)
    if match is None:  # NaN, Infinity, -Infinity: Python's json accepts them
        return number
    sign, whole, fraction, exponent = match.groups(default="")
    digits = (whole + fraction).lstrip("0")
    if not digits:
        return "0"
    stripped = digits.rstrip("0")
    # int() refuses over 4,300 digits: a ValueError, and the body is hashed raw.
    scale = int(exponent or "0") - len(fraction) + len(digits) - len(stripped)
    return f"{sign}{stripped}e{scale}"


def _parsed_form(request: HttpRequest) -> bytes:
    fields = sorted((name, request.POST.getlist(name)) for name in request.POST)
    files = sorted(
        (name, [_file_digest(f) for f in request.FILES.getlist(name)]) for name in request.FILES
    )
    return canonical_json({"fields": fields, "files": files})


def _file_digest(upload: UploadedFile[Any]) -> list[Any]:
    digest = hashlib.sha256()
    for chunk in upload.chunks():
        digest.update(chunk)
    upload.seek(0)  # the view reads it next
    return [upload.name, upload.size, upload.content_type, digest.hexdigest()]
